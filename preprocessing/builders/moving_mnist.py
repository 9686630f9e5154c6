"""moving_mnist: Moving MNIST generated from the MNIST idx files, video -> video.

Official layout: ``{train,t10k}-images-idx3-ubyte[.gz]`` (the labels are not needed). Each
split that has its file is built: train from ``train-images``, test from ``t10k-images``.
Sequence ``i`` of a split bounces ``digits`` random digits of that split around the frame
(Srivastava et al. 2015: 28x28 digits on a 64x64 canvas, scaled with the frame), drawn from
``rng(split, i)``; the first ``input_frames`` are the input, the next ``output_frames`` the
answer. An idx file that is not one (magic number, sizes, length), or a gzip file that does not
decompress, stops the build before any work: it is the layout, not one input. The file is read
only as far as its header says (at most ``MAX_IDX_BYTES``), so a gzip bomb cannot fill memory.
"""

from __future__ import annotations

import functools
import gzip
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from preprocessing.builders.base import Builder, Example, Item, check_num_frames, file_identity

FILES = {"train": "train-images-idx3-ubyte", "test": "t10k-images-idx3-ubyte"}


MAX_IDX_BYTES = 2**31  # MNIST's training images are 47 MB; EMNIST's largest 700 MB
MAX_SEQUENCES = 10_000_000


@dataclass
class MovingMnistOptions:
    train_sequences: int = 10000
    test_sequences: int = 1000
    digits: int = 2
    input_frames: int = 4
    output_frames: int = 4

    def __post_init__(self):
        for name in ("train_sequences", "test_sequences"):
            if not 0 <= getattr(self, name) <= MAX_SEQUENCES:
                raise ValueError(f"{name} must be in 0..{MAX_SEQUENCES}, got {getattr(self, name)}")
        if not 1 <= self.digits <= 64:
            raise ValueError(f"digits must be in 1..64, got {self.digits}")
        check_num_frames(self.input_frames, name="input_frames")
        check_num_frames(self.output_frames, name="output_frames")


def load_idx_images(path: str) -> np.ndarray:
    """An idx3 image file (optionally gzipped) -> ``(N, rows, cols)`` uint8; ValueError (a
    layout error) naming the file if it is not one."""
    return _load_idx_images(path, *file_identity(path))


@functools.lru_cache(maxsize=2)  # keyed by size and mtime too: a rewritten file is read again
def _load_idx_images(path: str, size_: int, mtime_ns: int) -> np.ndarray:
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            head = f.read(16)
            magic, n, rows, cols = (int.from_bytes(head[i : i + 4], "big") for i in range(0, 16, 4))
            size = n * rows * cols
            if len(head) < 16 or magic != 2051 or rows == 0 or cols == 0 or size > MAX_IDX_BYTES:
                raise ValueError(
                    f"{path}: not an idx3 image file (magic {magic}, {n}x{rows}x{cols})"
                )
            body = f.read(size + 1)  # one byte more: a longer file is not this idx file either
    except (OSError, EOFError, zlib.error) as e:
        raise ValueError(f"{path}: unreadable idx file ({type(e).__name__}: {e})") from None
    if len(body) != size:
        raise ValueError(
            f"{path}: not an idx3 image file (magic {magic}, {16 + len(body)} bytes, "
            f"header says {16 + size})"
        )
    return np.frombuffer(body, np.uint8).reshape(n, rows, cols)


class MovingMnistBuilder(Builder):
    name = "moving_mnist"
    Options = MovingMnistOptions

    def _file(self, split: str) -> Path | None:
        for name in (FILES[split], FILES[split] + ".gz"):
            if (self.src / name).is_file():
                return self.src / name
        return None

    def list_items(self) -> dict[str, list[Item]]:
        files = {s: self._file(s) for s in FILES}
        self.expect(
            any(files.values()),
            "expected MNIST idx files train-images-idx3-ubyte[.gz] and/or t10k-images-idx3-ubyte[.gz]",
        )
        counts = {"train": self.options.train_sequences, "test": self.options.test_sequences}
        for f in files.values():
            if f is not None:
                self.expect(len(load_idx_images(str(f))) > 0, f"{f.name}: no images")
        return {
            s: [Item(f"moving_mnist:{s}:{i}", (str(f), s, i)) for i in range(counts[s])]
            for s, f in files.items()
            if f is not None
        }

    def example(self, item: Item) -> Example:
        path, split, i = item.data
        digits = load_idx_images(path)
        o = self.options
        frames = self.sequence(digits, self.rng(split, i), o.input_frames + o.output_frames)
        return Example("moving_mnist", frames[: o.input_frames], frames[o.input_frames :])

    def sequence(self, digits: np.ndarray, rng: np.random.Generator, num_frames: int) -> np.ndarray:
        h, w = self.spec.height, self.spec.width
        d = max(4, round(28 * min(h, w) / 64))  # digit size, scaled like the canvas
        picks = rng.integers(0, len(digits), self.options.digits)
        glyphs = [_resize(digits[p], d) for p in picks]
        pos = rng.uniform(0, 1, (len(picks), 2)) * [h - d, w - d]
        theta = rng.uniform(0, 2 * np.pi, len(picks))
        vel = np.stack([np.sin(theta), np.cos(theta)], 1) * (3.0 * min(h, w) / 64)
        canvas = np.zeros((num_frames, h, w), np.uint8)
        for t in range(num_frames):
            for g, (y, x) in zip(glyphs, pos):
                yi, xi = int(round(y)), int(round(x))
                np.maximum(
                    canvas[t, yi : yi + d, xi : xi + d], g, out=canvas[t, yi : yi + d, xi : xi + d]
                )
            pos += vel
            for k in range(2):  # bounce off the edges
                hi = (h, w)[k] - d
                over = (pos[:, k] < 0) | (pos[:, k] > hi)
                vel[over, k] *= -1
                pos[:, k] = np.clip(pos[:, k], 0, hi)
        return np.repeat(canvas[..., None], 3, axis=3)


def _resize(img: np.ndarray, size: int) -> np.ndarray:
    if img.shape == (size, size):
        return img
    from PIL import Image

    return np.asarray(Image.fromarray(img).resize((size, size), Image.BILINEAR))


BUILDER = MovingMnistBuilder
