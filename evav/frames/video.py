"""Video -> frames: any container PyAV reads, uniformly subsampled to a frame budget, fitted to H x W.

Frames are decoded sequentially and only the chosen ones are converted and resized, so a long
1080p clip costs one decode pass and ``num_frames`` resizes. A stream that ends well before the
frame count its header declares is reported as truncated rather than silently shortened.
"""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
from PIL import Image

from evav.codec import sws_one_thread
from evav.errors import BadInputError, check_nonempty_file
from evav.frames.image import fit_image
from evav.frames.spec import RenderSpec

_DECODE_THREADS = 0  # 0: FFmpeg chooses (frame/slice threads); 1: decode on the calling thread


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
    if num_frames < 1:
        raise ValueError("num_frames must be >= 1")
    path = check_nonempty_file(path)
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise BadInputError(path, "no video stream")
            stream = container.streams.video[0]
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
            frames.append(fit_image(rgb, spec.height, spec.width, spec.fit))
        n += 1
        if last is not None and n > last and n >= 0.9 * (stream.frames or 0):
            break
    return frames, n
