"""One shard sample -> model-ready arrays: decode the clip, check it, crop/pad it, build the masks.

Checks that catch silent corruption: the decoded frame count must equal the metadata's (a
truncated mp4 can decode a few frames without error), and the frame size must match the
dataset's RenderSpec. Any failure raises ``BadSample`` with the reason; the loader skips the
sample, counts it and logs it with its shard and key.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import numpy as np

from evav.data.order import rng


class BadSample(ValueError):
    pass


@dataclass
class Sample:
    frames: np.ndarray  # (T, H, W, 3) uint8, padded to the clip budget
    loss_mask: np.ndarray  # (T,) bool
    pad_mask: np.ndarray  # (T,) bool, True on padding
    task: str
    key: str
    answer: str


def decode_clip(data: bytes, backend: str = "decord") -> np.ndarray:
    """mp4 bytes -> ``(T, H, W, 3)`` uint8, with decord (fast) or PyAV (fallback)."""
    if backend == "decord":
        try:
            import decord

            vr = decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0), num_threads=1)
            return vr.get_batch(list(range(len(vr)))).asnumpy()
        except Exception as e:  # noqa: BLE001 - decord raises its own error types
            try:
                return decode_clip(data, "pyav")
            except BadSample:
                raise BadSample(f"undecodable clip ({type(e).__name__}: {str(e)[:120]})") from None
    import av

    try:
        with av.open(io.BytesIO(data)) as c:
            frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    except (av.error.FFmpegError, ValueError, IndexError) as e:
        raise BadSample(f"undecodable clip ({e})") from None
    if not frames:
        raise BadSample("clip has no frames")
    return np.stack(frames)


def expected_frames(meta: dict) -> int:
    seg = meta.get("segments") or {}
    return int(meta.get("num_frames") or sum(seg.values()))


def loss_mask_for(meta: dict, num_frames: int) -> np.ndarray:
    """Supervised frames from the metadata: the answer frames, or all after the task frame."""
    mask = np.zeros(num_frames, dtype=bool)
    seg = meta.get("segments") or {}
    if meta.get("supervise", "outputs") == "all" or not seg.get("output"):
        mask[seg.get("task", 1):] = True
    else:
        mask[num_frames - seg["output"]:] = True
    return mask


def make_sample(members: dict[str, bytes], key: str, clip_frames: int, frame_hw: tuple[int, int],
                seed: int, backend: str = "decord") -> Sample:
    """Decode and check one sample; crop or pad it to ``clip_frames``."""
    if "mp4" not in members or "json" not in members:
        raise BadSample(f"missing member(s): has {sorted(members)}, needs mp4 and json")
    try:
        meta = json.loads(members["json"])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadSample(f"metadata is not JSON ({e})") from None
    frames = decode_clip(members["mp4"], backend)
    want = expected_frames(meta)
    if want and len(frames) != want:
        raise BadSample(f"decoded {len(frames)} frames, metadata says {want} (truncated clip?)")
    if frames.shape[1:3] != tuple(frame_hw):
        raise BadSample(f"frame size {frames.shape[1:3]}, dataset renders {tuple(frame_hw)}")
    mask = loss_mask_for(meta, len(frames))
    t = len(frames)
    if t > clip_frames:
        # Keep the answer when there is one (the clip's end); otherwise a window chosen from
        # (seed, key), so the choice is exact on resume and independent of workers.
        has_answer = mask.any() and not mask[: t - clip_frames].any()
        start = t - clip_frames if has_answer or meta.get("supervise") != "all" else int(
            rng(seed, "crop", key).integers(0, t - clip_frames + 1))
        frames, mask = frames[start : start + clip_frames], mask[start : start + clip_frames]
        t = clip_frames
    pad = np.zeros(clip_frames, dtype=bool)
    if t < clip_frames:
        frames = np.concatenate([frames, np.zeros((clip_frames - t, *frames.shape[1:]), np.uint8)])
        mask = np.concatenate([mask, np.zeros(clip_frames - t, dtype=bool)])
        pad[t:] = True
    return Sample(frames, mask, pad, str(meta.get("task", "")), key, str(meta.get("answer", "")))
