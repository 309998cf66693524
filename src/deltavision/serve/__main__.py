"""``python -m deltavision.serve serve|edge ...``: the MIST commands on their own."""

import sys

import typer

from ..errors import DeltaVisionError
from .cli import edge_app, serve_command

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
app.command("serve")(serve_command)
app.add_typer(edge_app, name="edge")

if __name__ == "__main__":
    try:
        app()
    except DeltaVisionError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
