"""Project-wide defaults, importable without torch or timm (the CLI reads them at start-up)."""

EMBEDDED_BACKBONE = "tf_efficientnet_lite0"  # ships real ImageNet weights offline (see embedded.py)
EMBEDDED_DATA = "fashion-mnist"
VERSION = "0.1.0"  # the package version (pyproject.toml reads it from here)
