"""video: a folder of videos -> next-frame pretraining clips (every frame supervised).

``--src`` is searched recursively for ``.mp4 .mkv .mov .avi .webm`` names; each becomes one clip
of ``num_frames`` frames uniformly spread over the video (rotated as a player shows it). Every
``val_every``-th file (in sorted order; 0 = none) goes to the val split. Unreadable, empty or
truncated files, and entries that are not regular files (a directory or FIFO with a video
suffix, a dangling symbolic link), are quarantined.
"""

from __future__ import annotations

from dataclasses import dataclass

from evav.frames import render_video
from preprocessing.builders.base import Builder, Example, Item, check_num_frames

SUFFIXES = {".mp4", ".mkv", ".mov", ".avi", ".webm"}


@dataclass
class VideoOptions:
    num_frames: int = 8
    val_every: int = 0

    def __post_init__(self):
        check_num_frames(self.num_frames)
        if self.val_every < 0:
            raise ValueError(f"val_every must be >= 0, got {self.val_every}")


class VideoBuilder(Builder):
    name = "video"
    Options = VideoOptions
    codec = "h264-444-qp0"

    def list_items(self) -> dict[str, list[Item]]:
        files = sorted(p for p in self.src.rglob("*") if p.suffix.lower() in SUFFIXES)
        self.expect(
            bool(files), f"expected video files ({' '.join(sorted(SUFFIXES))}) in the folder"
        )
        out: dict[str, list[Item]] = {"train": []}
        every = self.options.val_every
        for n, f in enumerate(files):
            split = "val" if every and n % every == every - 1 else "train"
            out.setdefault(split, []).append(Item(str(f)))
        return out

    def example(self, item: Item) -> Example:
        frames = render_video(item.source, self.spec, self.options.num_frames)
        return Example("video", frames, supervise="all")


BUILDER = VideoBuilder
