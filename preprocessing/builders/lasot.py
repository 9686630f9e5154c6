"""lasot: LaSOT single-object tracking, video -> video: the first frame with a red box, then
the following frames with the box drawn where the target is.

Official layout: ``{class}/{class}-{n}/img/00000001.jpg ...`` and ``groundtruth.txt`` (one
``x,y,w,h`` line per frame, in pixels); ``testing_set.txt`` (sequence names, one per line) at
``--src`` puts those sequences in test, the rest in train (without it, all are train).

Each sequence is cut into windows of ``num_frames`` frames taken every ``stride`` frames; the
first is the input, the rest are the answer. A missing or malformed groundtruth line is
quarantined (source ``SEQUENCE:START``); a frame with an empty box (full occlusion) gets none.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from evav.errors import BadInputError
from evav.frames import draw_box, fit_image, load_image
from preprocessing.builders.base import Builder, Example, Item


@dataclass
class LasotOptions:
    num_frames: int = 8
    stride: int = 10
    max_windows: int = 0  # per sequence; 0 = all

    def __post_init__(self):
        if self.num_frames < 2 or self.stride < 1:
            raise ValueError("num_frames must be >= 2 and stride >= 1")


@functools.lru_cache(maxsize=8)
def read_groundtruth(path: str) -> list[str]:
    try:
        return Path(path).read_text().split()
    except OSError as e:
        raise BadInputError(path, f"unreadable groundtruth: {e}") from None


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
            test = set((self.src / "testing_set.txt").read_text().split())
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
            try:
                x, y, w, h = (float(v) for v in gt[i].split(","))
            except (IndexError, ValueError):
                raise BadInputError(
                    f"{seq}/groundtruth.txt", f"line {i + 1}: expected x,y,w,h"
                ) from None
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
