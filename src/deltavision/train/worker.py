"""``python -m deltavision.train.worker SETTINGS.json SUMMARY.json``: one run from resolved settings.

``compare --nproc N`` launches this under ``torchrun`` for each method, so a
method trains data-parallel exactly as ``deltavision train`` would; the main
process writes the run's summary as JSON.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..io import save_json
from .distributed import World, launched_by_torchrun
from .run import config_from_settings, run_training


def main(settings_path: str, summary_path: str) -> None:
    config = config_from_settings(json.loads(Path(settings_path).read_text()))
    summary = run_training(config)
    import torch.distributed as dist

    rank = dist.get_rank() if launched_by_torchrun() and dist.is_initialized() else World().rank
    if rank == 0:
        save_json(json.loads(json.dumps(summary, default=str)), Path(summary_path))


if __name__ == "__main__":
    main(*sys.argv[1:3])
