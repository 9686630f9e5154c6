"""Builder registry: every module here (except ``base``) defines ``BUILDER``, a Builder subclass.

Adding a builder is adding a module; see preprocessing/README.md.
"""

from __future__ import annotations

import importlib
import pkgutil

from preprocessing.builders.base import Builder, Example, Item, NoOptions

__all__ = ["Builder", "Example", "Item", "NoOptions", "builder_names", "get_builder"]


def builder_names() -> list[str]:
    """Names of every available builder (module names), sorted."""
    return sorted(
        m.name
        for m in pkgutil.iter_modules(__path__)
        if m.name != "base" and not m.name.startswith("_")
    )


def get_builder(name: str) -> type[Builder]:
    """The Builder class registered under ``name``; ValueError lists the known ones."""
    if name not in builder_names():
        raise ValueError(f"unknown builder {name!r}; available: {', '.join(builder_names())}")
    cls = importlib.import_module(f"{__name__}.{name}").BUILDER
    assert cls.name == name, f"builder module {name} registers {cls.name!r}"
    return cls
