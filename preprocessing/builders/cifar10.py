"""cifar10: CIFAR-10, image -> class word.

Two official layouts, found automatically:

- the python pickle batches (``cifar-10-batches-py/``: ``data_batch_1..5`` -> train,
  ``test_batch`` -> test, ``batches.meta`` for the class names), directly in ``--src`` or in
  that subfolder;
- an image folder ``{split}/{class}/*.png|jpg`` (``test`` and ``train`` as found; class folders
  must be CIFAR-10 class names).

Unreadable images and labels outside 0-9 are quarantined. A batch file is unpickled by
``SafeUnpickler``, which builds only what the official batches hold (dicts, lists, bytes, ints
and numpy arrays) and refuses every other global, so a crafted batch cannot run code; a batch
that cannot be read is quarantined as one input (its rows are unknown), with the reason.
"""

from __future__ import annotations

import codecs
import functools
import importlib
import pickle
from pathlib import Path

import numpy as np

from evav.errors import BadInputError
from evav.frames import render_image
from preprocessing.builders.base import Builder, Example, Item, NoOptions, file_identity

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles of bytes use it, and for nothing else."""
    if not isinstance(text, str) or codecs.lookup(encoding).name != "iso8859-1":
        raise pickle.UnpicklingError(f"refused _codecs.encode({type(text).__name__}, {encoding!r})")
    return text.encode("latin1")


def _numpy_global(module: str, name: str):
    """numpy 2 keeps these in ``numpy._core`` (``numpy.core`` is a shim that warns), numpy 1
    only in ``numpy.core``: a pickle written by either loads under either."""
    for m in (
        module.replace("numpy.core", "numpy._core"),
        module.replace("numpy._core", "numpy.core"),
    ):
        try:
            return getattr(importlib.import_module(m), name)
        except (ImportError, AttributeError):
            continue
    raise pickle.UnpicklingError(f"{module}.{name} is not in this numpy")


# What pickles of a dict with a numpy uint8 array and a list of ints reference, written by
# Python 2 (the official files) or 3 with numpy 1 or 2, protocols 0-5: nothing that runs code.
SAFE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class SafeUnpickler(pickle.Unpickler):
    """An unpickler for CIFAR batches: every global outside SAFE_GLOBALS is refused."""

    def find_class(self, module: str, name: str):
        if (module, name) not in SAFE_GLOBALS:
            raise RefusedGlobal(f"{module}.{name}")
        if module == "_codecs":
            return _latin1_encode
        return _numpy_global(module, name)


class RefusedGlobal(pickle.UnpicklingError):
    """A pickle asked for a global that SafeUnpickler does not build."""


def load_batch(path: str) -> dict:
    """One pickle batch: ``data`` (N, 3072) uint8 and ``labels``; BadInputError if unreadable
    or if it references anything but numpy's array reconstruction."""
    return _load_batch(path, *file_identity(path))


@functools.lru_cache(maxsize=2)  # keyed by size and mtime too: a rewritten file is read again
def _load_batch(path: str, size: int, mtime_ns: int) -> dict:
    try:
        with open(path, "rb") as f:
            d = SafeUnpickler(f, encoding="bytes").load()
    except RefusedGlobal as e:
        raise BadInputError(
            path, f"refused pickle global {e} (a CIFAR-10 batch holds only numpy arrays)"
        ) from None
    except Exception as e:  # anything else a malformed pickle raises (it runs no code)
        raise BadInputError(path, f"not a CIFAR-10 pickle batch: {type(e).__name__}: {e}") from None
    data = d.get(b"data") if isinstance(d, dict) else None
    labels = d.get(b"labels") if isinstance(d, dict) else None
    if not isinstance(data, np.ndarray) or not isinstance(labels, list):
        raise BadInputError(
            path, "not a CIFAR-10 pickle batch: expected a dict with b'data' (array), b'labels'"
        )
    if (
        data.dtype != np.uint8
        or data.ndim != 2
        or data.shape[1] != 3072
        or len(labels) != len(data)
    ):
        raise BadInputError(
            path,
            f"data {data.shape} {data.dtype} / {len(labels)} labels, expected (N, 3072) uint8 / N",
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
                try:
                    labels = load_batch(str(path))["labels"]
                except BadInputError as e:  # one quarantined input stands for the whole file
                    out.setdefault(split, []).append(Item(str(path), ("bad", e.reason)))
                    continue
                out.setdefault(split, []).extend(
                    Item(f"{path}:{i}", (str(path), i), _stratum(label))
                    for i, label in enumerate(labels)
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
                Item(str(f), CLASSES.index(c.name), CLASSES.index(c.name))
                for c in classes
                for f in sorted(c.iterdir())
                if f.suffix.lower() in IMAGE_SUFFIXES
            ]
        return out

    def example(self, item: Item) -> Example:
        if isinstance(item.data, tuple) and item.data[0] == "bad":
            raise BadInputError(item.source, item.data[1])
        if isinstance(item.data, tuple):  # (batch file, row)
            batch = load_batch(item.data[0])
            label = batch["labels"][item.data[1]]
            image = batch["data"][item.data[1]].reshape(3, 32, 32).transpose(1, 2, 0)
            frames = render_image(image, self.spec)
        else:
            label = item.data
            frames = render_image(item.source, self.spec)
        if (
            not isinstance(label, (int, np.integer))
            or isinstance(label, bool)
            or not 0 <= label <= 9
        ):
            raise BadInputError(item.source, f"label {label!r} is not a class index 0-9")
        label = int(label)
        word = CLASSES[label]
        return Example("cifar10", frames, self.words(word), word, label)


def _stratum(label: object) -> int | None:
    """A row's label as its --limit stratum (a bad label has none; ``example`` refuses it)."""
    ok = isinstance(label, int) and not isinstance(label, bool) and 0 <= label <= 9
    return int(label) if ok else None


BUILDER = Cifar10Builder
