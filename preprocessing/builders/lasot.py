"""lasot: LaSOT single-object tracking, video -> video: the first frame with a red box, then
the following frames with the box drawn where the target is.

Official layout: ``{class}/{class}-{n}/img/00000001.jpg ...`` and ``groundtruth.txt`` (one
``x,y,w,h`` line per frame, in pixels); ``testing_set.txt`` (sequence names, one per line) at
``--src`` puts those sequences in test, the rest in train (without it, all are train).

Each sequence is cut into windows of ``num_frames`` frames taken every ``stride`` frames; the
first is the input, the rest are the answer. A missing or malformed groundtruth line (not four
finite comma-separated numbers, read with the csv module's rules), or a missing or unreadable
frame, quarantines its window (source ``SEQUENCE:START``); a frame with an empty box (full
occlusion) gets none.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from evav.errors import BadInputError, check_nonempty_file
from evav.frames import draw_box, fit_image, load_image
from evav.frames.video import MAX_FRAMES
from preprocessing.builders.base import (
    Builder,
    Example,
    Item,
    file_identity,
    read_lines,
    read_table,
)


@dataclass
class LasotOptions:
    num_frames: int = 8
    stride: int = 10
    max_windows: int = 0  # per sequence; 0 = all

    def __post_init__(self):
        if not 2 <= self.num_frames <= MAX_FRAMES or self.stride < 1:
            raise ValueError(f"num_frames must be in 2..{MAX_FRAMES} and stride >= 1")
        if self.max_windows < 0:
            raise ValueError(f"max_windows must be >= 0, got {self.max_windows}")


def read_groundtruth(path: str) -> dict[int, list[str] | str]:
    """``groundtruth.txt`` -> {line: fields, or why the line cannot be read}."""
    check_nonempty_file(path)
    return _read_groundtruth(path, *file_identity(path))


@functools.lru_cache(maxsize=8)  # keyed by size and mtime too: a rewritten file is read again
def _read_groundtruth(path: str, size: int, mtime_ns: int) -> dict[int, list[str] | str]:
    try:
        return {n: row if row is not None else why for n, row, why in read_table(path, ",")}
    except OSError as e:
        raise BadInputError(path, f"unreadable groundtruth: {e}") from None


def parse_box(row: list[str] | str | None) -> tuple[float, float, float, float] | str:
    """A groundtruth row -> ``(x, y, w, h)``, or why not."""
    if row is None:
        return "missing"
    if isinstance(row, str):
        return row
    try:
        box = tuple(float(v) for v in row)
    except ValueError:
        return f"expected x,y,w,h, got {','.join(row)[:80]!r}"
    if len(box) != 4:
        return f"expected x,y,w,h, got {len(box)} values"
    if not all(math.isfinite(v) and abs(v) <= 1e7 for v in box):  # pixels, not light-years
        return f"expected finite x,y,w,h within 1e7 pixels, got {box}"
    return box


class LasotBuilder(Builder):
    name = "lasot"
    Options = LasotOptions
    codec = "h264-444-qp0"

    def list_items(self) -> dict[str, list[Item]]:
        seqs = sorted(p.parent for p in self.src.glob("*/*/img") if p.is_dir())
        self.expect(
            bool(seqs),
            "expected LaSOT sequences {class}/{class}-{n}/img/*.jpg with groundtruth.txt",
        )
        test = set()
        if (self.src / "testing_set.txt").is_file():
            test = set(read_lines(self.src / "testing_set.txt"))
        o = self.options
        span = (o.num_frames - 1) * o.stride + 1
        out: dict[str, list[Item]] = {"train": []}
        for seq in seqs:
            n = sum(1 for _ in (seq / "img").glob("*.jpg"))
            starts = list(range(0, n - span + 1, span))
            if o.max_windows:
                starts = starts[: o.max_windows]
            split = "test" if seq.name in test else "train"
            out.setdefault(split, []).extend(Item(f"{seq}:{s}", (str(seq), s)) for s in starts)
        return out

    def example(self, item: Item) -> Example:
        seq, start = item.data
        o = self.options
        gt = read_groundtruth(f"{seq}/groundtruth.txt")
        frames, boxes = [], []
        for k in range(o.num_frames):
            i = start + k * o.stride
            img = load_image(f"{seq}/img/{i + 1:08d}.jpg")
            box = parse_box(gt.get(i + 1))
            if isinstance(box, str):
                raise BadInputError(f"{seq}/groundtruth.txt", f"line {i + 1}: {box}")
            x, y, w, h = box
            sx, sy = self.spec.width / img.width, self.spec.height / img.height
            frame = fit_image(img, self.spec.height, self.spec.width, "stretch")
            box = None
            if w > 0 and h > 0:
                box = [x * sx, y * sy, (x + w) * sx - 1, (y + h) * sy - 1]
                frame = draw_box(frame, tuple(box))
            frames.append(frame)
            boxes.append(box)
        frames = np.stack(frames)
        return Example("lasot", frames[:1], frames[1:], "", None, extra={"boxes": boxes})


BUILDER = LasotBuilder
