"""One shard sample -> model-ready arrays: decode the clip, check it, crop/pad it, build the masks.

Checks that catch silent corruption: the decoder's own error log (FFV1 slice CRCs, H.264
bitstream errors: FFmpeg conceals these and returns frames anyway), the decoded frame count
against the metadata's (a truncated mp4 can decode a few frames without error), and the frame
size against the dataset's RenderSpec. Any failure raises ``BadSample`` with the reason and a
``kind`` from ``REASONS``; the loader skips the sample, counts it per kind (``data/skipped/KIND``)
and logs it with its shard and key.

Decoders (``DataConfig.decoder``), both through ``evav.codec.decode_clip``:

- ``pyav`` (default): PyAV with FFmpeg's error log captured, so a corrupt clip is detected.
- ``decord``: faster on FFV1, PyAV as fallback when it raises. For trusted shards only: decord
  conceals CRC errors and, on some corrupt mp4 headers, crashes the process (segfault), which no
  ``try`` can catch (measured, see docs/benchmarks.md, loader section). An optional extra
  (``pip install 'evav[decord]'``): ``check_decoder`` refuses it, before any sample is read,
  when it is not installed, and a missing package is never taken for a bad sample.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import av.logging
import numpy as np

from evav.codec import DECORD_EXTRA, ClipShapeError, decode_clip, have_decord
from evav.data.augment import augment_inputs
from evav.data.order import rng
from evav.manifest import SampleMeta, clip_checksum, parse_sample_meta

DECODERS = ("pyav", "decord")


def check_decoder(decoder: str) -> str | None:
    """Why ``data.decoder`` cannot be used here (one line naming the key and the fix), or None."""
    if decoder not in DECODERS:
        return f"data.decoder must be one of {DECODERS}, got {decoder!r}"
    if decoder == "decord" and not have_decord():
        return (
            f"data.decoder=decord needs the decord package: {DECORD_EXTRA} (or data.decoder=pyav)"
        )
    return None


# Why a sample was skipped: the fixed vocabulary of ``BadSample.kind`` (and of the loader's
# ``data/skipped/KIND`` metrics, which need one fixed set to be summed over ranks).
REASONS = (
    "missing_sample",  # the shard holds fewer samples than its manifest says (cut or corrupt tar)
    "missing_member",  # KEY.mp4 or KEY.json absent
    "bad_metadata",  # KEY.json not JSON, not an object, a field missing or of the wrong type
    "checksum",  # the KEY.mp4 bytes differ from the metadata's clip_sha256
    "render_hash",  # rendered with another RenderSpec than its dataset's manifest
    "decode",  # the decoder failed or reported errors
    "frame_count",  # decoded frames differ from the metadata's num_frames
    "frame_size",  # decoded frames differ from the dataset's RenderSpec
    "read_error",  # the shard file could not be read (vanished, not a file, not a tar)
    "too_long",  # its task frame(s) and answer alone are data.clip_frames or more (crop_window)
    "other",  # anything else raised while making the sample
)


class BadSample(ValueError):
    """One sample cannot be used; ``str(e)`` says why, ``e.kind`` is one of ``REASONS``."""

    def __init__(self, message: str, kind: str = "other"):
        super().__init__(message)
        self.kind = kind if kind in REASONS else "other"


@dataclass
class Sample:
    frames: np.ndarray  # (T, H, W, 3) uint8, T <= the clip budget (the batch pads it)
    loss_mask: np.ndarray  # (T,) bool
    task: str
    key: str
    answer: str
    cropped: bool = False  # longer than data.clip_frames: a window was kept (crop_window)


def crop_window(
    meta: SampleMeta, t: int, clip_frames: int, seed: int, key: str, policy: str = "middle"
) -> list[tuple[int, int]]:
    """The frames ``[start, stop)`` pieces to keep of a ``t``-frame clip so that it fits in
    ``clip_frames``: a list of (start, stop) ranges, one piece when nothing is cut.

    A supervised clip (``supervise: outputs``) keeps its task frame(s) and everything after its
    input (separator, answer) and, of its input, the middle ``clip_frames - task - answer``
    frames (``policy="middle"``), or is refused (``policy="refuse"``); so is one whose task and
    answer alone leave no input frame (``BadSample``, kind ``too_long``). A pretraining clip
    (``supervise: all``) keeps a window chosen from (seed, key): exact on resume, worker-free."""
    if t <= clip_frames:
        return [(0, t)]
    seg = meta.segments
    if meta.supervise == "all" or not seg.get("output"):
        start = int(rng(seed, "crop", key).integers(0, t - clip_frames + 1))
        return [(start, start + clip_frames)]
    task = seg.get("task", 1)
    inp = seg.get("input", t - task - seg["output"])
    tail = t - task - inp  # separator and answer
    keep = clip_frames - task - tail
    if policy == "refuse" or keep < 1:
        why = (
            "data.crop=refuse"
            if policy == "refuse" and keep >= 1
            else f"its task frame(s) and answer alone are {task + tail}"
        )
        raise BadSample(
            f"{t} frames ({task} task, {inp} input, {tail} answer) do not fit in "
            f"data.clip_frames={clip_frames} ({why})",
            "too_long",
        )
    first = task + (inp - keep) // 2  # the middle of the input
    return [(0, task), (first, first + keep), (task + inp, t)]


def decode(
    data: bytes,
    backend: str = "pyav",
    max_frames: int | None = None,
    frame_hw: tuple[int, int] | None = None,
) -> np.ndarray:
    """mp4 bytes -> ``(T, H, W, 3)`` uint8; ``BadSample`` (kind ``decode``) if it does not decode
    cleanly, whatever the decoder raised (PyAV, decord and numpy have their own exceptions).

    ``max_frames`` / ``frame_hw`` (the metadata's frame count, the dataset's frame size) bound the
    decode itself: a clip with more or larger frames stops at the first such frame (kind
    ``frame_count`` / ``frame_size``), so a forged clip cannot make the decoder allocate more
    than the sample says it holds."""
    if backend == "decord":
        try:
            return decode_clip(data, "decord", max_frames, frame_hw)
        except ClipShapeError as e:
            raise BadSample(str(e), e.kind) from None
        except ImportError:  # decord not installed: the install's problem, not this sample's
            raise
        except Exception as e:  # noqa: BLE001 - any decoder failure is this sample's
            raise BadSample(_why(e), "decode") from None
    old = av.logging.get_level()
    av.logging.set_level(av.logging.ERROR)  # PyAV keeps FFmpeg's log off unless asked
    try:
        with av.logging.Capture() as logs:
            frames = decode_clip(data, "pyav", max_frames, frame_hw)
    except ClipShapeError as e:
        raise BadSample(str(e), e.kind) from None
    except Exception as e:  # noqa: BLE001 - any decoder failure is this sample's
        raise BadSample(_why(e), "decode") from None
    finally:
        av.logging.set_level(old)
    errors = [msg.strip() for level, _, msg in logs if level <= av.logging.ERROR]
    if errors:
        raise BadSample(f"decoder errors ({errors[0][:80]}; {len(errors)} in all)", "decode")
    return frames


def _why(e: Exception) -> str:
    """A decoder exception as a reason: ours (ValueError) as they are, others with their type."""
    return str(e) if type(e) is ValueError else f"{type(e).__name__}: {str(e)[:200]}"


def expected_frames(meta: dict) -> int:
    seg = meta.get("segments") or {}
    return int(meta.get("num_frames") or sum(seg.values()))


def loss_mask_for(meta: dict, num_frames: int) -> np.ndarray:
    """Supervised frames from the metadata: the answer frames, or all after the task frame."""
    mask = np.zeros(num_frames, dtype=bool)
    seg = meta.get("segments") or {}
    if meta.get("supervise", "outputs") == "all" or not seg.get("output"):
        mask[seg.get("task", 1) :] = True
    else:
        mask[num_frames - seg["output"] :] = True
    return mask


def checked_meta(members: dict[str, bytes], render_hash: str | None = None) -> SampleMeta:
    """The sample's metadata, checked, and its clip bytes checked against it (before decoding):
    both members present, ``KEY.json`` well formed (``parse_sample_meta``), the ``KEY.mp4`` bytes
    matching ``clip_sha256``, and (if given) the sample rendered with ``render_hash``. Any
    failure is ``BadSample`` with the reason."""
    if "mp4" not in members or "json" not in members:
        raise BadSample(
            f"missing member(s): has {sorted(members)}, needs mp4 and json", "missing_member"
        )
    try:
        meta = parse_sample_meta(members["json"], "KEY.json")
    except Exception as e:  # noqa: BLE001 - ValueError by contract; anything else is bad data too
        raise BadSample(_why(e), "bad_metadata") from None
    if clip_checksum(members["mp4"]) != meta.clip_sha256:
        raise BadSample(
            "clip checksum mismatch (the KEY.mp4 bytes differ from clip_sha256)", "checksum"
        )
    if render_hash is not None and meta.render_hash != render_hash:
        raise BadSample(
            f"rendered with hash {meta.render_hash[:16]}, the dataset's is {render_hash}",
            "render_hash",
        )
    return meta


def _input_frames(meta: SampleMeta, num_frames: int) -> np.ndarray:
    """Which of the clip's frames are its ``input`` segment (after its task frame(s))."""
    seg = meta.segments
    task = seg.get("task", 1)
    out = np.zeros(num_frames, dtype=bool)
    out[task : task + seg.get("input", 0)] = True
    return out


def make_sample(
    members: dict[str, bytes],
    key: str,
    clip_frames: int,
    frame_hw: tuple[int, int],
    seed: int,
    backend: str = "pyav",
    render_hash: str | None = None,
    crop: str = "middle",
    augment: str = "none",
    augment_key: tuple[str, int] = ("", 0),
) -> Sample:
    """Decode and check one sample; crop it to at most ``clip_frames`` (``crop_window``; padding
    is the batch's: it writes each clip once, into its own buffer). ``augment`` (not ``none``):
    its input frames are augmented, drawn from (seed, ``augment_key`` = (dataset, epoch), key)
    (evav.data.augment)."""
    meta = checked_meta(members, render_hash)
    frames = decode(members["mp4"], backend, meta.num_frames, frame_hw)
    want = meta.num_frames
    if len(frames) != want:
        raise BadSample(
            f"decoded {len(frames)} frames, metadata says {want} (truncated clip?)", "frame_count"
        )
    if frames.shape[1:3] != tuple(frame_hw):
        raise BadSample(
            f"frame size {frames.shape[1:3]}, dataset renders {tuple(frame_hw)}", "frame_size"
        )
    mask = loss_mask_for(asdict(meta), len(frames))
    pieces = crop_window(meta, len(frames), clip_frames, seed, key, crop)
    cropped = pieces != [(0, len(frames))]
    is_input = _input_frames(meta, len(frames)) if augment != "none" else None
    if cropped:
        keep = np.concatenate([np.arange(a, b) for a, b in pieces])
        frames, mask = frames[keep], mask[keep]
        is_input = is_input[keep] if is_input is not None else None
    if is_input is not None:
        frames = augment_inputs(frames, is_input, augment, seed, *augment_key, key)
    return Sample(frames, mask, meta.task, key, meta.answer, cropped)
