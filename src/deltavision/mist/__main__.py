"""``python -m deltavision.mist serve|edge ...``: the MIST commands on their own."""

from .cli import main

if __name__ == "__main__":
    main()
