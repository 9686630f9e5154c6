"""The builder interface: list a raw corpus's inputs, turn one input into one example.

A builder reads one dataset's official raw layout. The runner (preprocessing/runner.py) does
everything else: splitting work over workers and machines, rendering the clip
``[task][inputs][separator][outputs]``, encoding, writing shards, quarantine and the manifest.

    class MyBuilder(Builder):
        name = "mine"
        Options = MyOptions              # a dataclass; `evav preprocess mine key=value` fills it

        def list_items(self) -> dict[str, list[Item]]:   # split -> inputs, in a fixed order
            ...                          # ValueError (saying what was expected) if the layout is wrong
        def example(self, item: Item) -> Example:        # one input -> frames
            ...                          # BadInputError(path, reason) for a bad input

``list_items`` must be cheap (no decoding) and deterministic: the same source gives the same
items in the same order, in every process. ``example`` must be a pure function of the item,
the options, the RenderSpec and the seed (draw randomness from ``self.rng(...)``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from evav.codec import DEFAULT_CODEC
from evav.frames import RenderSpec, TextRenderer


@dataclass(frozen=True)
class Item:
    """One raw input: ``source`` names it (a path, or ``file:row``) in metadata and quarantine."""

    source: str
    data: Any = None  # small builder-specific payload (a label, a row's text, an index)


@dataclass
class Example:
    """One rendered example; the runner adds the task frame and the separator."""

    task: str
    inputs: np.ndarray  # (T_in, H, W, 3) uint8
    outputs: np.ndarray | None = None  # (T_out, H, W, 3) uint8; None for pretraining clips
    answer: str = ""
    label: Any = None
    supervise: str = "outputs"  # "outputs" (answer frames) or "all"
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class NoOptions:
    pass


class Builder:
    """Base class; subclasses set ``name`` and implement ``list_items`` and ``example``."""

    name: ClassVar[str] = ""
    version: ClassVar[int] = 1  # bump when the same input would give different samples
    Options: ClassVar[type] = NoOptions
    codec: ClassVar[str] = DEFAULT_CODEC  # default codec (evav.codec preset) for this data
    needs_src: ClassVar[bool] = True

    def __init__(self, src: str | Path | None, options: Any, spec: RenderSpec, seed: int = 0):
        if self.needs_src and src is None:
            raise ValueError(f"builder {self.name!r} needs --src (the raw dataset folder)")
        self.src = Path(src) if src is not None else None
        if self.src is not None and not self.src.exists():
            raise ValueError(f"--src {self.src}: no such file or folder")
        self.options = options
        self.spec = spec
        self.seed = seed
        self.text = TextRenderer(spec)

    def list_items(self) -> dict[str, list[Item]]:
        raise NotImplementedError

    def example(self, item: Item) -> Example:
        raise NotImplementedError

    # -- helpers for subclasses -----------------------------------------------------------
    def rng(self, *key: object) -> np.random.Generator:
        """A generator seeded by (seed, builder, key...): independent of workers and order."""
        import zlib

        words = [self.seed, zlib.crc32(self.name.encode())]
        words += [zlib.crc32(str(k).encode()) for k in key]
        return np.random.default_rng(words)

    def expect(self, ok: bool, what: str) -> None:
        """A malformed source: stop early, saying what was expected."""
        if not ok:
            raise ValueError(f"{self.name}: --src {self.src}: {what}")

    def words(self, text: str) -> np.ndarray:
        return self.text.render_text(text)
