"""Save a clip so a person can see what the model sees: PNG contact sheet, GIF or MP4.

Every writer goes through a temporary file and a rename, so a half-written output is never
visible under its final name.
"""

from __future__ import annotations

import os
from pathlib import Path

import av
import numpy as np
from PIL import Image


def contact_sheet(frames_THWC: np.ndarray, columns: int = 8, gap: int = 2) -> np.ndarray:
    """Frames laid out in a grid (row-major) on a grey background, ``(rows*H', cols*W', 3)``."""
    t, h, w, _ = frames_THWC.shape
    cols = max(1, min(columns, t))
    rows = max(1, -(-t // cols))
    sheet = np.full((rows * (h + gap) + gap, cols * (w + gap) + gap, 3), 96, np.uint8)
    for i, f in enumerate(frames_THWC):
        r, c = divmod(i, cols)
        y, x = gap + r * (h + gap), gap + c * (w + gap)
        sheet[y : y + h, x : x + w] = f
    return sheet


def save_clip(frames_THWC: np.ndarray, out: str | Path, fps: float = 4.0, columns: int = 8) -> Path:
    """Write frames to ``out``: ``.png`` (contact sheet), ``.gif`` or ``.mp4``, chosen by suffix."""
    out = Path(out)
    suffix = out.suffix.lower()
    if suffix not in (".png", ".gif", ".mp4"):
        raise ValueError(f"{out}: output must end in .png, .gif or .mp4")
    if len(frames_THWC) == 0:
        raise ValueError("no frames to save")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}{suffix}")
    try:
        if suffix == ".png":
            Image.fromarray(contact_sheet(frames_THWC, columns)).save(tmp)
        elif suffix == ".gif":
            images = [Image.fromarray(f) for f in frames_THWC]
            images[0].save(
                tmp, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0
            )
        else:
            _write_mp4(frames_THWC, tmp, fps)
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _write_mp4(frames_THWC: np.ndarray, path: Path, fps: float) -> None:
    """H.264 for viewing (yuv420p needs even sizes; odd ones are padded by one black pixel)."""
    t, h, w, _ = frames_THWC.shape
    hh, ww = h + h % 2, w + w % 2
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=int(round(fps)) or 1)
        stream.width, stream.height, stream.pix_fmt = ww, hh, "yuv420p"
        stream.options = {"crf": "10"}
        for f in frames_THWC:
            if (hh, ww) != (h, w):
                f = np.pad(f, ((0, hh - h), (0, ww - w), (0, 0)))
            container.mux(
                stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24"))
            )
        container.mux(stream.encode(None))
