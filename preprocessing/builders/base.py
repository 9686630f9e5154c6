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
items in the same order, in every process. An item's ``stratum`` (its class or label, when
the listing knows it cheaply) lets ``--limit N`` keep every class in proportion; items without
one are sampled uniformly. ``example`` must be a pure function of the item,
the options, the RenderSpec and the seed (draw randomness from ``self.rng(...)``).

Reading raw files is done one way in every builder (the helpers below): text is split on
line feeds only (CR LF tolerated), never ``str.splitlines`` (which also splits on U+2028,
form feeds and more, shifting every later FILE:LINE); TSV and CSV go through the ``csv``
module (quoting, embedded delimiters and newlines), with each record's first line as its
LINE; a file, record or line that cannot be read is the input's problem, never the build's.
A name read from the data (an annotation's video path) becomes a path only through
``relative_path``, which refuses absolute paths and ``..``.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar

import numpy as np

from evav.codec import DEFAULT_CODEC
from evav.frames import RenderSpec, TextRenderer


@dataclass(frozen=True)
class Item:
    """One raw input: ``source`` names it (a path, or ``file:row``) in metadata and quarantine."""

    source: str
    data: Any = None  # small builder-specific payload (a label, a row's text, an index)
    stratum: str | int | None = None  # its class, for a stratified --limit; None: unlabelled


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


# -- reading raw files ---------------------------------------------------------------------------
def check_num_frames(n: int, lo: int = 1, name: str = "num_frames") -> None:
    """Options: a frame count in ``lo..MAX_FRAMES`` (checked before work, not per input)."""
    from evav.frames.video import MAX_FRAMES

    if not lo <= n <= MAX_FRAMES:
        raise ValueError(f"{name} must be between {lo} and {MAX_FRAMES}, got {n}")


def file_identity(path: str | Path) -> tuple[int, int]:
    """(size, mtime) of a file, to key a cache of its parsed content (-1s if it cannot be
    stat'ed: the reader then reports the problem)."""
    try:
        st = os.stat(path)
    except OSError:
        return -1, -1
    return st.st_size, st.st_mtime_ns


def load_json(path: Path) -> Any:
    """A layout file's JSON (an annotation or question file); ValueError naming the file."""
    try:
        return json.loads(Path(path).read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        # RecursionError: a hostile file nests thousands of brackets deep
        raise ValueError(f"{path}: not a readable JSON file ({type(e).__name__}: {e})") from None


def read_lines(path: Path) -> list[str]:
    """A small list file (split names, sequence lists): its lines, split on line feeds only,
    stripped, empty ones dropped; ValueError naming the file and line if it is not UTF-8."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"{path}: unreadable ({e.strerror or e})") from None
    lines = []
    for n, line in enumerate(raw.split(b"\n"), start=1):
        try:
            text = line.decode("utf-8").strip()
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}:{n}: not UTF-8 ({e})") from None
        if text:
            lines.append(text)
    return lines


def read_table(path: Path, delimiter: str) -> Iterator[tuple[int, list[str] | None, str]]:
    """Rows of a TSV/CSV file by the csv module's rules: ``(line, fields, "")`` for a record
    starting on ``line`` (lines count line feeds), or ``(line, None, reason)`` for one that
    cannot be read (invalid UTF-8, a csv error such as a stray carriage return or a field over
    the csv module's size limit). OSError if the file cannot be opened."""
    with open(path, encoding="utf-8", errors="surrogateescape", newline="\n") as f:
        reader = csv.reader(f, delimiter=delimiter, quotechar='"', doublequote=True, strict=False)
        done = 0
        while True:
            start = done + 1
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                done = reader.line_num
                yield start, None, f"unreadable row: {e}"
                continue
            done = reader.line_num
            bad = next((c for c in "".join(row) if "\udc80" <= c <= "\udcff"), None)
            if bad is not None:  # surrogateescape marks each byte that is not UTF-8
                yield start, None, f"invalid UTF-8 (byte 0x{ord(bad) - 0xDC00:02x})"
            else:
                yield start, row, ""


def relative_path(root: Path, name: object) -> Path | None:
    """``root / name`` for a name read from the data, or None unless it is a plain relative
    path inside ``root`` (no absolute path, no ``..``, no NUL)."""
    if not isinstance(name, str) or not name or "\0" in name:
        return None
    p = PurePosixPath(name)
    if p.is_absolute() or ".." in p.parts:
        return None
    return root / p


def escapes(root: Path, path: Path) -> str | None:
    """Why ``path``, found under ``root``, may not be read: it is (or lies in) a symbolic link
    that leads out of ``root``; None when its real location stays inside ``root``."""
    real, top = os.path.realpath(path), os.path.realpath(root)
    if real == top or real.startswith(top.rstrip(os.sep) + os.sep):
        return None
    return f"symbolic link out of --src (to {real})"


def label_folders(builder: Builder, suffixes: set[str]) -> dict[str, list[Item]]:
    """The inputs of a ``SRC/{split}/{label}/FILE`` layout: split -> items in sorted order, for
    every FILE whose suffix (any case) is in ``suffixes``; ``data`` is ``(label, "")``, or
    ``(label, reason)`` for a file that may not be read (a symbolic link out of SRC, a file
    outside any label folder), and ``stratum`` is the label. Hidden names are skipped. A split
    or label folder that leads out of SRC, or a layout without label folders, is a ValueError."""
    src = builder.src
    builder.expect(src.is_dir(), "expected a folder {split}/{label}/FILE")

    def folders(parent: Path) -> list[Path]:
        found = sorted(p for p in parent.iterdir() if p.is_dir() and not p.name.startswith("."))
        for folder in found:  # checked before anything in it is listed
            why = escapes(src, folder)
            builder.expect(why is None, f"{folder.relative_to(src)}/: {why}")
        return found

    out: dict[str, list[Item]] = {}
    for split in folders(src):
        labels = folders(split)
        items = [
            Item(str(f), (None, f"not inside a label folder {split.name}/{{label}}/"))
            for f in sorted(split.iterdir())
            if f.suffix.lower() in suffixes and not f.is_dir() and not f.name.startswith(".")
        ]
        for folder in labels:
            for f in sorted(folder.iterdir()):
                if f.suffix.lower() in suffixes and not f.name.startswith("."):
                    item = (folder.name, escapes(src, f) or "")
                    items.append(Item(str(f), item, folder.name))
        if items:
            out[split.name] = items
    builder.expect(
        bool(out),
        f"expected {{split}}/{{label}}/FILE with FILE ending in {' '.join(sorted(suffixes))}",
    )
    return out


def check_task(task: object) -> None:
    """Options: a task name (rendered as the clip's first frame) must be a non-blank string."""
    if not isinstance(task, str) or not task.strip():
        raise ValueError(f"task must be a non-empty name, got {task!r}")
