"""``python -m deltavision.cli``: the command line."""

from . import main

main()
