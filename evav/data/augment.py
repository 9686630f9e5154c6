"""Training-time image augmentation of a sample's input frames (``data.augment``).

``flip_crop`` is the paper's CIFAR-10 recipe: a random horizontal flip (p = 0.5), then pad and
crop back to the frame size at a random offset, so the content moves by up to a quarter of the
frame side in each direction. A quarter is CIFAR-10's 8 of 32 source pixels at any frame size
(16 frame pixels at 64 x 64, the paper's), because the builder stretches the whole 32 x 32
image over the frame; the offset is drawn in frame pixels (at 64 x 64 a step is half a source
pixel). The border the shift uncovers is filled by reflection (``flip_crop``, as the first
author's public code does: torchvision ``Pad``/``RandomCrop`` with ``padding_mode='reflect'``,
which pads 8 twice and so shifts a 64-pixel frame by up to 16 pixels too; its second pad
reflects the first, evav reflects the frame once) or with zeros (``flip_crop_zeros``, the
usual torchvision CIFAR recipe ``RandomCrop(32, padding=...)``, black: the frame background).
That code also applies a colour jitter; evav does not.

Only the frames of the sample's ``input`` segment change (an image sample has one); the task
frame, the separator and the answer frames are left as they are, and every input frame of one
sample gets the same flip and offset (a video input stays consistent). That suits tasks whose
answer does not depend on the geometry (image -> class word); for tasks whose answer frames are
aligned with the input (tracking, colourisation) the answer would need the same transform, which
this does not do: do not use it there.

The draw is a pure function of (seed, dataset name, epoch, sample key): the same on resume, with
any number of ranks or workers, and different in every epoch. The Loader applies it to the
``train`` split only, never to validation (``split="val"``) or evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from evav.config import ConfigError
from evav.data.order import rng

AUGMENTS = ("none", "flip_crop", "flip_crop_zeros")
PAD_MODES = {"flip_crop": "reflect", "flip_crop_zeros": "constant"}
SHIFT_FRACTION = 8 / 32  # CIFAR-10's pad of 8 source pixels, as a fraction of the frame side


def max_shift(side: int) -> int:
    """How far (frame pixels) the content may move along a side of ``side`` pixels."""
    return int(side * SHIFT_FRACTION)


def augments_for(value: str | list[str], num_dirs: int) -> list[str]:
    """``data.augment`` as one augmentation per ``data.train`` directory: a single value is for
    every directory, a list gives one each. ConfigError naming the key for anything else."""
    values = [value] * num_dirs if isinstance(value, str) else list(value)
    if not isinstance(value, (str, list, tuple)) or len(values) != num_dirs:
        raise ConfigError(
            f"data.augment must be one of {AUGMENTS} or a list of them, one per data.train "
            f"directory ({num_dirs}), got {value!r}"
        )
    bad = [v for v in values if v not in AUGMENTS]
    if bad:
        raise ConfigError(f"data.augment: {bad[0]!r} is not one of {list(AUGMENTS)}")
    return values


@dataclass(frozen=True)
class Draw:
    flip: bool  # mirrored left-right (before the shift)
    top: int  # crop offset in the padded frame: content moves down by pad - top
    left: int  # content moves right by pad - left
    pad_h: int
    pad_w: int


def draw(seed: int, dataset: str, epoch: int, key: str, height: int, width: int) -> Draw:
    """The flip and offset of one sample in one epoch (see the module docstring)."""
    g = rng(seed, "augment", dataset, epoch, key)
    ph, pw = max_shift(height), max_shift(width)
    flip = bool(g.random() < 0.5)
    top, left = int(g.integers(0, 2 * ph + 1)), int(g.integers(0, 2 * pw + 1))
    return Draw(flip, top, left, ph, pw)


def apply(frames: np.ndarray, d: Draw, kind: str) -> np.ndarray:
    """``(N, H, W, 3)`` frames flipped and shifted by ``d``; border by ``PAD_MODES[kind]``."""
    if kind not in PAD_MODES:
        raise ValueError(f"augmentation {kind!r} is not one of {list(PAD_MODES)}")
    h, w = frames.shape[1:3]
    if d.flip:
        frames = frames[:, :, ::-1]
    pad = ((0, 0), (d.pad_h, d.pad_h), (d.pad_w, d.pad_w), (0, 0))
    mode = PAD_MODES[kind]
    if mode == "reflect" and (d.pad_h >= h or d.pad_w >= w):
        mode = "symmetric"  # reflect needs a pad smaller than the side (never at 1/4)
    padded = np.pad(frames, pad, mode=mode)
    return np.ascontiguousarray(padded[:, d.top : d.top + h, d.left : d.left + w])


def augment_inputs(
    frames: np.ndarray,
    is_input: np.ndarray,
    kind: str,
    seed: int,
    dataset: str,
    epoch: int,
    key: str,
) -> np.ndarray:
    """``frames`` with those marked ``is_input`` augmented (a new array; the others as they are)."""
    if kind == "none" or not is_input.any():
        return frames
    d = draw(seed, dataset, epoch, key, frames.shape[1], frames.shape[2])
    out = np.array(frames)  # decoded frames may be read-only views
    out[is_input] = apply(frames[is_input], d, kind)
    return out
