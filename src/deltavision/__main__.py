"""``python -m deltavision`` (and ``torchrun -m deltavision train ...``) runs the command line."""

from .cli import main

main()
