"""Builder registry: where a builder name on the command line leads.

- a module here (except ``base`` and names starting with ``_``), which defines ``BUILDER``, a
  Builder subclass; the name is the module's (``cifar10``);
- an entry point in the group ``evav.builders`` of an installed package
  (``[project.entry-points."evav.builders"] mycorpus = "mypkg.mymodule:MyBuilder"``); a built-in
  name wins over an entry point of the same name;
- ``MODULE:CLASS``, a Builder subclass importable from ``sys.path``
  (``evav preprocess mypkg.mymodule:MyBuilder ...``).

Adding a builder is adding a module, or one of the other two; see preprocessing/README.md.
Anything else, or an object that is not a Builder subclass, is a ValueError naming it.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from importlib.metadata import EntryPoint, entry_points

from evav.errors import describe_error
from preprocessing.builders.base import Builder, Example, Item, NoOptions

__all__ = ["Builder", "Example", "Item", "NoOptions", "builder_names", "get_builder"]

ENTRY_POINT_GROUP = "evav.builders"


def builder_names() -> list[str]:
    """Names of every available builder (modules here and entry points), sorted."""
    return sorted(set(_module_names()) | set(_entry_points()))


def get_builder(name: str) -> type[Builder]:
    """The Builder class that ``name`` leads to; ValueError says why there is none."""
    if name in _module_names():
        cls = importlib.import_module(f"{__name__}.{name}").BUILDER
        assert cls.name == name, f"builder module {name} registers {cls.name!r}"
        return cls
    if ":" in name:
        module, _, attr = name.partition(":")
        return _checked(name, lambda: _load(module, attr))
    points = _entry_points()
    if name in points:
        return _checked(f"{name} (entry point {points[name].value})", points[name].load)
    raise ValueError(
        f"unknown builder {name!r}; available: {', '.join(builder_names())}, "
        "or MODULE:CLASS for a Builder subclass of your own"
    )


def _module_names() -> list[str]:
    return [
        m.name
        for m in pkgutil.iter_modules(__path__)
        if m.name != "base" and not m.name.startswith("_")
    ]


def _entry_points() -> dict[str, EntryPoint]:
    points: dict[str, EntryPoint] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        points.setdefault(ep.name, ep)  # the first installed one of a name
    return points


def _load(module: str, attr: str) -> object:
    if not module or not attr:
        raise ValueError("expected MODULE:CLASS, e.g. mypkg.mymodule:MyBuilder")
    try:
        obj = importlib.import_module(module)
    except Exception as e:  # ImportError, or whatever the module raises while importing
        raise ValueError(f"cannot import module {module!r}: {describe_error(e)}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"module {module!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def _checked(what: str, load) -> type[Builder]:
    """``load()`` if it gives a usable Builder subclass; else ValueError naming ``what``."""
    try:
        obj = load()
    except ValueError as e:
        raise ValueError(f"builder {what}: {e}") from None
    except Exception as e:  # an entry point whose module fails to import
        raise ValueError(f"builder {what}: cannot load: {describe_error(e)}") from None
    if not (isinstance(obj, type) and issubclass(obj, Builder)) or obj is Builder:
        got = f"class {obj.__qualname__}" if isinstance(obj, type) else f"a {type(obj).__name__}"
        raise ValueError(
            f"builder {what}: got {got}, not a subclass of preprocessing.builders.Builder"
        )
    if not dataclasses.is_dataclass(obj.Options):
        raise ValueError(f"builder {what}: its Options ({obj.Options!r}) is not a dataclass")
    return obj
