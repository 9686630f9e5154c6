"""moving_mnist: Moving MNIST generated from the MNIST idx files, video -> video.

Official layout: ``{train,t10k}-images-idx3-ubyte[.gz]`` (the labels are not needed). Each
split that has its file is built: train from ``train-images``, test from ``t10k-images``.
Sequence ``i`` of a split bounces ``digits`` random digits of that split around the frame
(Srivastava et al. 2015: 28x28 digits on a 64x64 canvas, scaled with the frame), drawn from
``rng(split, i)``; the first ``input_frames`` are the input, the next ``output_frames`` the
answer.
"""

from __future__ import annotations

import functools
import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from preprocessing.builders.base import Builder, Example, Item

FILES = {"train": "train-images-idx3-ubyte", "test": "t10k-images-idx3-ubyte"}


@dataclass
class MovingMnistOptions:
    train_sequences: int = 10000
    test_sequences: int = 1000
    digits: int = 2
    input_frames: int = 4
    output_frames: int = 4


@functools.lru_cache(maxsize=2)
def load_idx_images(path: str) -> np.ndarray:
    """An idx3 image file (optionally gzipped) -> ``(N, rows, cols)`` uint8."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise ValueError(f"{path}: unreadable idx file ({e})") from None
    magic, n, rows, cols = (int.from_bytes(raw[i : i + 4], "big") for i in range(0, 16, 4))
    if magic != 2051 or len(raw) != 16 + n * rows * cols:
        raise ValueError(f"{path}: not an idx3 image file (magic {magic}, {len(raw)} bytes)")
    return np.frombuffer(raw, np.uint8, offset=16).reshape(n, rows, cols)


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
