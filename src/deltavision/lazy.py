"""Package attributes loaded on first use, so importing a package stays light (no timm until needed)."""

from importlib import import_module


def lazy_attributes(package: str, homes: dict[str, str]):
    """A module ``__getattr__`` that imports ``package.<homes[name]>`` when ``name`` is first read."""

    def __getattr__(name: str):
        if name in homes:
            return getattr(import_module(f".{homes[name]}", package), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
