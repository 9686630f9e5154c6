"""Save a clip so a person can see what the model sees: PNG contact sheet, GIF or MP4.

Every writer goes through a temporary file and a rename, so a half-written output is never
visible under its final name.
"""

from __future__ import annotations

import os
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from evav.errors import one_line
from evav.frames.spec import BUNDLED_FONT


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


LABEL_PX = 14  # font size of the labels on example sheets
MIN_FRAME_PX = (
    192  # frames are upscaled (nearest) to at least this height, when integer scaling allows
)


def labelled_sheet(title: str, rows: list[tuple[str, np.ndarray]], scale: int | None = None):
    """A title, then one block per row: its label on a line, its frames side by side, upscaled
    by ``scale`` (default: enough for 64 px frames to read, ``MIN_FRAME_PX``) with nearest
    neighbour, so pixels stay pixels. Returns ``(H, W, 3)`` uint8."""
    frames = [np.asarray(f) for _, f in rows]
    h = max((f.shape[1] for f in frames if len(f)), default=64)
    scale = scale or max(1, MIN_FRAME_PX // h)
    cols = max(max(len(f) for f in frames), 1)
    blocks = []
    for f in frames:
        sheet = contact_sheet(f, columns=cols) if len(f) else np.zeros((h, h, 3), np.uint8)
        blocks.append(sheet.repeat(scale, 0).repeat(scale, 1))
    font = ImageFont.truetype(str(BUNDLED_FONT), LABEL_PX)
    line = LABEL_PX + 8
    width = max(max(b.shape[1] for b in blocks), 480)
    height = line + sum(line + b.shape[0] + 6 for b in blocks)
    img = Image.new("RGB", (width, height), (24, 24, 24))
    draw = ImageDraw.Draw(img)
    chars = width // (LABEL_PX * 6 // 10)  # a monospace glyph is about 0.6 em wide
    fit = lambda t: t if len(t) <= chars else t[: chars - 3] + "..."  # noqa: E731
    draw.text((4, 3), fit(_printable(title)), fill=(255, 255, 0), font=font)
    y = line
    for (label, _), b in zip(rows, blocks):
        draw.text((4, y + 3), fit(_printable(label)), fill=(200, 200, 200), font=font)
        img.paste(Image.fromarray(b), (0, y + line))
        y += line + b.shape[0] + 6
    return np.asarray(img)


def _printable(s: str) -> str:
    return one_line(s, 500)


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
