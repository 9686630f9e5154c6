"""Boxes: draw a red rectangle into frames (tracking targets) and find it again by colour.

Boxes are ``(x0, y0, x1, y1)`` in pixels, inclusive, in the frame's own coordinates.
"""

from __future__ import annotations

import numpy as np

RED = (255, 0, 0)


def draw_box(
    frames_THWC: np.ndarray,
    box: tuple[float, float, float, float],
    thickness: int = 1,
    color: tuple[int, int, int] = RED,
) -> np.ndarray:
    """Return a copy of ``(T, H, W, 3)`` (or ``(H, W, 3)``) frames with a rectangle outline."""
    out = np.array(frames_THWC, dtype=np.uint8, copy=True)
    h, w = out.shape[-3], out.shape[-2]
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    x0, x1 = sorted((max(0, min(w - 1, x0)), max(0, min(w - 1, x1))))
    y0, y1 = sorted((max(0, min(h - 1, y0)), max(0, min(h - 1, y1))))
    t = max(1, thickness)
    c = np.asarray(color, np.uint8)
    out[..., y0 : min(y0 + t, y1 + 1), x0 : x1 + 1, :] = c
    out[..., max(y1 - t + 1, y0) : y1 + 1, x0 : x1 + 1, :] = c
    out[..., y0 : y1 + 1, x0 : min(x0 + t, x1 + 1), :] = c
    out[..., y0 : y1 + 1, max(x1 - t + 1, x0) : x1 + 1, :] = c
    return out


def find_red_box(
    frame_HWC: np.ndarray, min_red: int = 150, max_other: int = 100, min_pixels: int = 4
) -> tuple[int, int, int, int] | None:
    """Bounding box of strongly red pixels in one frame, or None if fewer than ``min_pixels``."""
    f = frame_HWC.astype(np.int16)
    mask = (f[..., 0] >= min_red) & (f[..., 1] <= max_other) & (f[..., 2] <= max_other)
    if mask.sum() < min_pixels:
        return None
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())
