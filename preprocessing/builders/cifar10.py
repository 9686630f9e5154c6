"""cifar10: CIFAR-10, image -> class word.

Two official layouts, found automatically:

- the python pickle batches (``cifar-10-batches-py/``: ``data_batch_1..5`` -> train,
  ``test_batch`` -> test, ``batches.meta`` for the class names), directly in ``--src`` or in
  that subfolder;
- an image folder ``{split}/{class}/*.png|jpg`` (``test`` and ``train`` as found; class folders
  must be CIFAR-10 class names).

Unreadable images and labels outside 0-9 are quarantined.
"""

from __future__ import annotations

import functools
import pickle
from pathlib import Path

import numpy as np

from evav.errors import BadInputError
from evav.frames import render_image
from preprocessing.builders.base import Builder, Example, Item, NoOptions

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


@functools.lru_cache(maxsize=2)
def load_batch(path: str) -> dict:
    """One pickle batch: ``data`` (N, 3072) uint8 and ``labels``; BadInputError if unreadable."""
    try:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="bytes")
        data = np.asarray(d[b"data"], dtype=np.uint8)
        labels = list(d[b"labels"])
    except (OSError, pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError) as e:
        raise BadInputError(path, f"not a CIFAR-10 pickle batch: {e}") from None
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise BadInputError(
            path, f"data {data.shape} / {len(labels)} labels, expected (N, 3072) / N"
        )
    return {"data": data, "labels": labels}


class Cifar10Builder(Builder):
    name = "cifar10"
    Options = NoOptions

    def list_items(self) -> dict[str, list[Item]]:
        root = (
            self.src / "cifar-10-batches-py"
            if (self.src / "cifar-10-batches-py").is_dir()
            else self.src
        )
        if any((root / b).is_file() for names in BATCHES.values() for b in names):
            return self._list_batches(root)
        return self._list_folders()

    def _list_batches(self, root: Path) -> dict[str, list[Item]]:
        out: dict[str, list[Item]] = {}
        for split, names in BATCHES.items():
            for name in names:
                path = root / name
                if not path.is_file():
                    continue
                n = len(load_batch(str(path))["labels"])
                out.setdefault(split, []).extend(
                    Item(f"{path}:{i}", (str(path), i)) for i in range(n)
                )
        return out

    def _list_folders(self) -> dict[str, list[Item]]:
        splits = sorted(p for p in self.src.iterdir() if p.is_dir() and not p.name.startswith("."))
        self.expect(
            bool(splits),
            "expected CIFAR-10 pickle batches (data_batch_1..5, test_batch) or image folders "
            "{split}/{class}/*.png|jpg",
        )
        out = {}
        for split in splits:
            classes = sorted(p for p in split.iterdir() if p.is_dir())
            bad = [c.name for c in classes if c.name not in CLASSES]
            self.expect(
                not bad, f"{split.name}/: class folders {bad} are not CIFAR-10 classes {CLASSES}"
            )
            self.expect(bool(classes), f"{split.name}/: no class folders")
            out[split.name] = [
                Item(str(f), CLASSES.index(c.name))
                for c in classes
                for f in sorted(c.iterdir())
                if f.suffix.lower() in IMAGE_SUFFIXES
            ]
        return out

    def example(self, item: Item) -> Example:
        if isinstance(item.data, tuple):  # (batch file, row)
            batch = load_batch(item.data[0])
            label = batch["labels"][item.data[1]]
            image = batch["data"][item.data[1]].reshape(3, 32, 32).transpose(1, 2, 0)
            frames = render_image(image, self.spec)
        else:
            label = item.data
            frames = render_image(item.source, self.spec)
        if not isinstance(label, int) or not 0 <= label <= 9:
            raise BadInputError(item.source, f"label {label!r} is not a class index 0-9")
        word = CLASSES[label]
        return Example("cifar10", frames, self.words(word), word, label)


BUILDER = Cifar10Builder
