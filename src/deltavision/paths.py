"""Where deltavision keeps converted weights and downloaded data."""

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$DELTAVISION_CACHE`` or ``~/.cache/deltavision``, created on demand."""
    root = Path(os.environ.get("DELTAVISION_CACHE") or Path.home() / ".cache" / "deltavision")
    root.mkdir(parents=True, exist_ok=True)
    return root
