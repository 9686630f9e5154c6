"""Video -> frames: any container PyAV reads, uniformly subsampled to a frame budget, fitted to H x W.

Frames are decoded sequentially and only the chosen ones are converted and resized, so a long
1080p clip costs one decode pass and ``num_frames`` resizes. A stream that ends well before the
frame count its header declares is reported as truncated rather than silently shortened.

Frames are shown the way a player shows them: the display matrix (the mp4 rotation a phone
writes, as side data on each decoded frame) is applied with the rules of the ``ffmpeg`` command's
autorotate (a quarter turn, a half turn and the flips that go with them exactly; another angle is
rotated with the frame enlarged to hold it). A stream whose frames exceed
``PIL.Image.MAX_IMAGE_PIXELS``, with no frames, or that FFmpeg cannot decode is refused.
"""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
from PIL import Image

from evav.codec import sws_one_thread
from evav.errors import BadInputError, check_nonempty_file
from evav.frames.image import check_image_size, fit_image
from evav.frames.spec import RenderSpec

_DECODE_THREADS = 0  # 0: FFmpeg chooses (frame/slice threads); 1: decode on the calling thread
MAX_FRAMES = 10_000  # the largest frame budget: one clip is held in memory whole


def set_decode_threads(n: int) -> None:
    """Threads FFmpeg may use per video decode (0: its own choice). Parallel preprocessing sets 1:
    with one worker per core, decoder threads only compete with the other workers."""
    global _DECODE_THREADS
    if n < 0:
        raise ValueError("decode threads must be >= 0")
    _DECODE_THREADS = n


def uniform_indices(total: int, budget: int) -> list[int]:
    """``budget`` indices spread evenly over ``range(total)`` (all of them if fewer)."""
    if total <= budget:
        return list(range(total))
    return [int(i * total / budget + total / (2 * budget)) for i in range(budget)]


def render_video(path: str | Path, spec: RenderSpec, num_frames: int = 16) -> np.ndarray:
    """A video file -> ``(T, H, W, 3)`` uint8 with ``T = min(num_frames, frames in the file)``."""
    if not 1 <= num_frames <= MAX_FRAMES:
        raise ValueError(f"num_frames must be between 1 and {MAX_FRAMES}, got {num_frames}")
    path = check_nonempty_file(path)
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise BadInputError(path, "no video stream")
            stream = container.streams.video[0]
            ctx = stream.codec_context
            if ctx.width and ctx.height:  # before decoding a frame of a bomb
                check_image_size(ctx.width, ctx.height, path)
            if _DECODE_THREADS == 1:
                stream.thread_count = 1
            else:
                stream.thread_type = "AUTO"
                stream.thread_count = _DECODE_THREADS
            declared = stream.frames or 0
            if declared > 0:
                frames, decoded = _decode_selected(
                    container, stream, uniform_indices(declared, num_frames), spec
                )
                if decoded < 0.9 * declared:
                    raise BadInputError(
                        path,
                        f"truncated: header declares {declared} frames, only {decoded} decoded",
                    )
            else:  # no frame count in the header: keep all (resized), then subsample
                frames, decoded = _decode_selected(container, stream, None, spec)
                frames = [frames[i] for i in uniform_indices(len(frames), num_frames)]
    except BadInputError:
        raise
    except (av.error.FFmpegError, ValueError, EOFError) as e:
        raise BadInputError(path, f"not a readable video file: {e}") from None
    if not frames:
        raise BadInputError(path, "no video frames decoded")
    return np.stack(frames)


def _decode_selected(container, stream, indices, spec):
    wanted = None if indices is None else set(indices)
    last = None if indices is None else max(indices)
    frames, n = [], 0
    for frame in container.decode(stream):
        if wanted is None or n in wanted:
            rgb = Image.fromarray(frame.to_ndarray(format="rgb24", **sws_one_thread()))
            rgb = upright(rgb, display_matrix(frame))
            frames.append(fit_image(rgb, spec.height, spec.width, spec.fit))
        n += 1
        if last is not None and n > last and n >= 0.9 * (stream.frames or 0):
            break
    return frames, n


def display_matrix(frame: av.VideoFrame) -> np.ndarray | None:
    """The frame's display matrix (FFmpeg's 3x3 int32 layout, 9 values), or None."""
    side = getattr(frame, "side_data", None)
    data = side.get("DISPLAYMATRIX") if side is not None else None
    if data is None:
        return None
    m = np.frombuffer(bytes(data), "<i4")
    return m if m.size == 9 else None


def upright(img: Image.Image, matrix: np.ndarray | None) -> Image.Image:
    """Apply a display matrix to a decoded frame as ``ffmpeg``'s autorotate does.

    ``theta`` is the clockwise rotation (FFmpeg's ``get_rotation``: minus
    ``av_display_rotation_get``, rounded, in [0, 360)); the matrix entries' signs choose the
    flips (fftools/ffmpeg_filter.c).
    """
    if matrix is None:
        return img
    a, b, c, d = (float(v) / 65536.0 for v in (matrix[0], matrix[1], matrix[3], matrix[4]))
    sx, sy = float(np.hypot(a, c)), float(np.hypot(b, d))
    if sx == 0.0 or sy == 0.0:  # a degenerate matrix says nothing
        return img
    theta = float(round(np.degrees(np.arctan2(b / sy, a / sx))))  # clockwise degrees
    theta -= 360.0 * np.floor(theta / 360.0 + 0.9 / 360.0)
    T = Image.Transpose
    if abs(theta - 90) < 1.0:
        return img.transpose(T.TRANSPOSE if matrix[3] > 0 else T.ROTATE_270)
    if abs(theta - 180) < 1.0:
        if matrix[0] < 0:
            img = img.transpose(T.FLIP_LEFT_RIGHT)
        if matrix[4] < 0:
            img = img.transpose(T.FLIP_TOP_BOTTOM)
        return img
    if abs(theta - 270) < 1.0:
        return img.transpose(T.TRANSVERSE if matrix[3] < 0 else T.ROTATE_90)
    if abs(theta) > 1.0:
        return img.rotate(-theta, Image.BICUBIC, expand=True)  # PIL turns counter-clockwise
    if matrix[4] < 0:
        return img.transpose(T.FLIP_TOP_BOTTOM)
    return img
