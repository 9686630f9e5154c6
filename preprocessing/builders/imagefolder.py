"""imagefolder: any folder of labelled images, image -> label text; no code to write.

Layout: ``--src`` holds one folder per split and in it one folder per label,
``{split}/{label}/*.png|jpg|jpeg|bmp|gif|webp|tif|tiff`` (raster formats only, any case). The
answer is the label folder's name; ``task=NAME`` names the task (default ``imagefolder``).
Files are read in sorted order. An image that cannot be used (see the image rows of
preprocessing/README.md), a file that is a symbolic link leading out of ``--src``, or an image
directly in a split folder (no label) is quarantined; a split or label folder that leads out of
``--src`` stops the build before any work.
"""

from __future__ import annotations

from dataclasses import dataclass

from evav.errors import BadInputError
from evav.frames import render_image
from preprocessing.builders.base import Builder, Example, Item, check_task, label_folders

# Raster formats only: never a suffix of a format Pillow hands to an interpreter (EPS/PS go
# to Ghostscript), even though Pillow reads a file by its content, not its name.
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass
class ImageFolderOptions:
    task: str = "imagefolder"

    def __post_init__(self):
        check_task(self.task)


class ImageFolderBuilder(Builder):
    name = "imagefolder"
    Options = ImageFolderOptions

    def list_items(self) -> dict[str, list[Item]]:
        return label_folders(self, IMAGE_SUFFIXES)

    def example(self, item: Item) -> Example:
        label, why = item.data
        if why:
            raise BadInputError(item.source, why)
        frames = render_image(item.source, self.spec)
        return Example(self.options.task, frames, self.words(label), label, label)


BUILDER = ImageFolderBuilder
