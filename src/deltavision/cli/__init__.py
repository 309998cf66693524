"""The ``deltavision`` command line.

User errors (unknown backbone or method, bad option, unreadable data, an
adapter for another model, an existing output) print one ``error:`` line and
exit with status 2; they never show a traceback.
"""


from __future__ import annotations

import sys
import warnings

from ..errors import DeltaVisionError
from . import models, runs  # noqa: F401  (register their commands)
from .common import app, err_console

from ..mist.cli import edge_app, serve_command  # noqa: E402

app.command("serve")(serve_command)
app.add_typer(edge_app, name="edge")

from .bench import bench_app  # noqa: E402

app.add_typer(bench_app, name="bench")


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Our own warnings as one ``warning:`` line; others as Python shows them."""
    from ..errors import NewerVersionWarning

    if issubclass(category, NewerVersionWarning):
        if str(message) not in _warned:
            _warned.add(str(message))
            err_console.print(f"warning: {message}", highlight=False, soft_wrap=True, markup=False)
    else:
        _python_show_warning(message, category, filename, lineno, file, line)


_python_show_warning = warnings.showwarning
_warned: set[str] = set()


def main() -> None:
    warnings.showwarning = _show_warning
    try:
        app()
    except DeltaVisionError as err:
        from rich.markup import escape

        err_console.print(f"[red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)  # "[export]" stays
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("interrupted; `--resume` continues a training run from its last epoch")
        sys.exit(130)


