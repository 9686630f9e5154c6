"""tinyvirat: TinyVIRAT low-resolution activity videos: action labels, or colorization.

Official layout: ``tiny_{train,test}.json`` (or ``tiny_{split}_v2.json``) listing tubes
``{"path": "VIRAT_S_.../N.mp4", "label": ["activity_walking", ...], ...}`` (as a list or under
``"tubes"``), and the videos in ``videos/{train,test}/PATH``.

- ``task=action`` (default): ``num_frames`` frames -> the label words (multi-label: all labels,
  sorted, lower-cased, separated by spaces).
- ``task=colorize``: the frames in grey -> the same frames in colour.

A tube without a non-empty list of string labels (mislabelled), with an unreadable video, or
whose ``path`` is not a plain relative path inside ``videos/{split}/`` (absolute, with ``..``,
not a string: a name from the data never reaches outside the dataset) is quarantined.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from evav.errors import BadInputError
from evav.frames import render_video
from preprocessing.builders.base import (
    Builder,
    Example,
    Item,
    check_num_frames,
    load_json,
    relative_path,
)


@dataclass
class TinyViratOptions:
    task: Literal["action", "colorize"] = "action"
    num_frames: int = 8

    def __post_init__(self):
        check_num_frames(self.num_frames)


class TinyViratBuilder(Builder):
    name = "tinyvirat"
    Options = TinyViratOptions
    codec = "h264-444-qp0"

    def list_items(self) -> dict[str, list[Item]]:
        out = {}
        for split in ("train", "test"):
            for name in (f"tiny_{split}.json", f"tiny_{split}_v2.json"):
                path = self.src / name
                if path.is_file():
                    out[split] = self._items(path, split)
                    break
        self.expect(
            bool(out),
            "expected TinyVIRAT annotation files tiny_train.json / tiny_test.json and videos/{split}/",
        )
        return out

    def _items(self, path, split: str) -> list[Item]:
        data = load_json(path)
        tubes = data.get("tubes") if isinstance(data, dict) else data
        self.expect(
            isinstance(tubes, list),
            f"{path.name}: expected a list of tubes with 'path' and 'label'",
        )
        videos = self.src / "videos" / split
        items = []
        for n, t in enumerate(tubes):
            video = relative_path(videos, t.get("path")) if isinstance(t, dict) else None
            if video is None:
                what = repr(t.get("path"))[:200] if isinstance(t, dict) else "not an object"
                why = f"tube path {what} is not a relative path inside videos/{split}/"
                items.append(Item(f"{path}:{n}", ("bad", why)))
            else:
                items.append(Item(str(video), ("ok", t.get("label"))))
        return items

    def example(self, item: Item) -> Example:
        kind, labels = item.data
        if kind == "bad":
            raise BadInputError(item.source, labels)
        if (
            not isinstance(labels, list)
            or not labels
            or not all(isinstance(x, str) and x for x in labels)
        ):
            raise BadInputError(
                item.source, f"label {labels!r} is not a non-empty list of label names"
            )
        frames = render_video(item.source, self.spec, self.options.num_frames)
        if self.options.task == "colorize":
            grey = frames.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
            grey = np.repeat(np.round(grey).astype(np.uint8)[..., None], 3, axis=3)
            return Example("colorize", grey, frames, "", None)
        words = sorted(x.lower() for x in labels)
        answer = " ".join(words)
        return Example("tinyvirat", frames, self.words(answer), answer, words)


BUILDER = TinyViratBuilder
