"""tinyvirat: TinyVIRAT low-resolution activity videos: action labels, or colorization.

Official layout: ``tiny_{train,test}.json`` (or ``tiny_{split}_v2.json``) listing tubes
``{"path": "VIRAT_S_.../N.mp4", "label": ["activity_walking", ...], ...}`` (as a list or under
``"tubes"``), and the videos in ``videos/{train,test}/PATH``.

- ``task=action`` (default): ``num_frames`` frames -> the label words (multi-label: all labels,
  sorted, lower-cased, separated by spaces).
- ``task=colorize``: the frames in grey -> the same frames in colour.

A tube without a non-empty list of string labels (mislabelled) or with an unreadable video is
quarantined.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

import numpy as np

from evav.errors import BadInputError
from evav.frames import render_video
from preprocessing.builders.base import Builder, Example, Item


@dataclass
class TinyViratOptions:
    task: Literal["action", "colorize"] = "action"
    num_frames: int = 8


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
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not readable JSON ({e})") from None
        tubes = data.get("tubes") if isinstance(data, dict) else data
        self.expect(
            isinstance(tubes, list) and all(isinstance(t, dict) and "path" in t for t in tubes),
            f"{path.name}: expected a list of tubes with 'path' and 'label'",
        )
        videos = self.src / "videos" / split
        return [Item(str(videos / t["path"]), t.get("label")) for t in tubes]

    def example(self, item: Item) -> Example:
        labels = item.data
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
