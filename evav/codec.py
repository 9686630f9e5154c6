"""Clip codec: ``(T, H, W, 3)`` uint8 frames <-> mp4 bytes (PyAV to encode; PyAV or decord to decode).

    from evav.codec import CodecSpec, encode_clip, decode_clip
    data = encode_clip(frames_THWC, CodecSpec.parse("ffv1"))   # bytes of an .mp4
    frames = decode_clip(data)                                  # decord, PyAV fallback
    frames = decode_clip(data, "pyav")                          # PyAV only

decord is an optional extra (``pip install 'evav[decord]'``); PyAV is always installed.

A codec is ``CODEC:PIX_FMT[:crf=N|qp=N]`` (e.g. ``libx264:yuv420p:crf=18``) or one of the named
presets in ``PRESETS``. Defaults were chosen by measurement (``tools/bench_codec.py``,
docs/benchmarks.md): ``ffv1`` (FFV1 in RGB, ``bgr0``) is exactly lossless, so every text glyph
reads back bit for bit; it is the fastest encoder and as small as H.264 qp 0 on text,
spectrogram and image clips. On natural video, ``h264-444-qp0`` (H.264 4:4:4, qp 0) is half
FFV1's size at a max error of 2 levels (PSNR ~52 dB), so builders of real video default to it.
decord and PyAV decode all of these from an mp4. yuv420p loses colour (a red tracking box is
off by up to 144 levels) and crf > 0 blurs glyph edges, so neither is a default.

Encoding is single-threaded. The lossless presets (FFV1, and H.264 with qp=0) are
deterministic: the same frames give the same bytes, so shards are reproducible and a resumed
build is byte-identical. The CRF presets are not: measured on a loaded 2-core machine,
``h264-444-crf10`` and ``h264-420-crf18`` gave different bytes for the same frames in about one
encode in four (x264's rate control with threads=1; cause not found), so a build with them is
reproducible in content, not in bytes.
"""

from __future__ import annotations

import functools
import importlib.util
import io
from dataclasses import dataclass

import av
import numpy as np

# name -> spec string; the first is the default.
PRESETS = {
    "ffv1": "ffv1:bgr0",
    "h264-rgb": "libx264rgb:rgb24:qp=0",
    "h264-444-qp0": "libx264:yuv444p:qp=0",
    "h264-420-qp0": "libx264:yuv420p:qp=0",
    "h264-444-crf10": "libx264:yuv444p:crf=10",
    "h264-420-crf18": "libx264:yuv420p:crf=18",
}
DEFAULT_CODEC = "ffv1"
DETERMINISTIC = ("ffv1", "h264-rgb", "h264-444-qp0", "h264-420-qp0")  # byte-identical re-encodes
FPS = 8  # nominal; clips are sequences of frames, the rate only sets timestamps


@dataclass(frozen=True)
class CodecSpec:
    """One video codec setting: an FFmpeg encoder, its pixel format and rate control."""

    codec: str = "ffv1"
    pix_fmt: str = "bgr0"
    crf: int | None = None
    qp: int | None = None

    @classmethod
    def parse(cls, text: str) -> CodecSpec:
        """``ffv1`` / ``h264-rgb`` (presets) or ``CODEC:PIX_FMT[:crf=N|:qp=N]``."""
        s = PRESETS.get(text, text)
        parts = s.split(":")
        if len(parts) < 2:
            raise ValueError(
                f"codec {text!r}: expected a preset ({', '.join(PRESETS)}) "
                "or CODEC:PIX_FMT[:crf=N|:qp=N], e.g. libx264:yuv444p:crf=0"
            )
        kw: dict[str, int] = {}
        for p in parts[2:]:
            key, _, val = p.partition("=")
            if key not in ("crf", "qp") or not val.isdigit():
                raise ValueError(f"codec {text!r}: bad option {p!r} (expected crf=N or qp=N)")
            kw[key] = int(val)
        spec = cls(parts[0], parts[1], **kw)
        spec.check()
        return spec

    def __str__(self) -> str:
        opts = [f"{k}={v}" for k, v in (("crf", self.crf), ("qp", self.qp)) if v is not None]
        return ":".join([self.codec, self.pix_fmt, *opts])

    @property
    def lossless(self) -> bool:
        """True when decoding gives back the exact RGB input."""
        rgb = self.pix_fmt in ("bgr0", "rgb24", "bgr24", "gbrp", "rgb0")
        return rgb and (self.codec == "ffv1" or self.qp == 0 or self.crf == 0)

    def check(self) -> None:
        """ValueError unless this FFmpeg build has the encoder and it accepts the pixel format."""
        try:
            codec = av.codec.Codec(self.codec, "w")
        except (av.error.FFmpegError, ValueError):
            raise ValueError(f"codec {self.codec!r}: no such encoder in this FFmpeg") from None
        fmts = {f.name for f in (codec.video_formats or [])}
        if fmts and self.pix_fmt not in fmts:
            raise ValueError(
                f"codec {self.codec!r} does not take pix_fmt {self.pix_fmt!r} "
                f"(it takes {', '.join(sorted(fmts))})"
            )

    def options(self) -> dict[str, str]:
        opts = {k: str(v) for k, v in (("crf", self.crf), ("qp", self.qp)) if v is not None}
        if self.codec.startswith("libx264"):
            opts.update(preset="medium", threads="1")  # threads=1: byte-identical output
        return opts


def encode_clip(frames_THWC: np.ndarray, codec: CodecSpec | None = None) -> bytes:
    """Encode ``(T, H, W, 3)`` uint8 frames as an mp4; returns its bytes."""
    codec = codec or CodecSpec.parse(DEFAULT_CODEC)
    if frames_THWC.ndim != 4 or frames_THWC.shape[-1] != 3 or frames_THWC.dtype != np.uint8:
        raise ValueError(f"expected (T, H, W, 3) uint8 frames, got {frames_THWC.shape}")
    t, h, w, _ = frames_THWC.shape
    if t == 0:
        raise ValueError("cannot encode a clip with no frames")
    if codec.pix_fmt.endswith("420p") and (h % 2 or w % 2):
        raise ValueError(f"{codec}: 4:2:0 needs even frame sizes, got {h}x{w}")
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream(codec.codec, rate=FPS)
        stream.width, stream.height, stream.pix_fmt = w, h, codec.pix_fmt
        stream.thread_count = 1
        stream.options = codec.options()
        for f in frames_THWC:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")
            # converted here, on one thread, so the encoder has nothing left to convert
            frame = frame.reformat(format=codec.pix_fmt, **sws_one_thread())
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return buf.getvalue()


@functools.cache
def sws_one_thread() -> dict:
    """Keyword arguments that make PyAV's pixel-format conversion (swscale) use one thread.

    Recent PyAV sizes a swscale thread pool to the CPUs the process may use (``threads=0``); on
    our small frames its start-up costs more than the conversion: decoding 64x64 clips was 2.7x
    slower per CPU second with 2 CPUs allowed than with 1 (a loader worker, like a preprocessing
    worker, is meant to be one core). Older PyAV has no ``threads`` and converts on one thread.
    """
    try:
        av.VideoFrame(2, 2, "rgb24").reformat(format="yuv444p", threads=1)
    except TypeError:
        return {}
    return {"threads": 1}


class ClipShapeError(ValueError):
    """A clip with more frames than expected, or frames of another size (``kind`` says which:
    ``frame_count`` or ``frame_size``, the loader's reason slugs)."""

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind


def decode_clip_pyav(
    data: bytes, max_frames: int | None = None, frame_hw: tuple[int, int] | None = None
) -> np.ndarray:
    """mp4 bytes -> ``(T, H, W, 3)`` uint8 with PyAV; ValueError if nothing decodes.

    ``max_frames`` / ``frame_hw``: what the caller expects (from the sample's metadata and the
    dataset's RenderSpec). Decoding stops with a ValueError at the first frame past
    ``max_frames`` or of another size, before converting it: a small hostile mp4 of many large
    flat frames is refused without allocating them.
    """
    frames = []
    try:
        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.video[0]
            # one thread, as decord's num_threads=1: a loader worker is one core, and FFmpeg's
            # slice/frame threads cost more than they give on small clips
            stream.thread_count = 1
            for f in container.decode(stream):
                if frame_hw is not None and (f.height, f.width) != tuple(frame_hw):
                    raise ClipShapeError(
                        f"frame size {(f.height, f.width)}, dataset renders {tuple(frame_hw)}",
                        "frame_size",
                    )
                if max_frames is not None and len(frames) >= max_frames:
                    raise ClipShapeError(
                        f"more than the {max_frames} frames expected", "frame_count"
                    )
                frames.append(f.to_ndarray(format="rgb24", **sws_one_thread()))
    except (av.error.FFmpegError, IndexError, EOFError) as e:
        raise ValueError(f"undecodable clip: {e}") from None
    if not frames:
        raise ValueError("undecodable clip: no video frames")
    return np.stack(frames)


# decord is an optional extra (no wheels for some platforms): PyAV is always installed.
DECORD_EXTRA = "pip install 'evav[decord]'"


def have_decord() -> bool:
    """Whether the optional decord package is installed (found, not imported: importing it in
    the parent before the loader forks its workers is left to the workers)."""
    try:
        return importlib.util.find_spec("decord") is not None
    except (ImportError, ValueError):  # a broken entry in sys.modules / sys.path
        return False


def decode_clip_decord(
    data: bytes, max_frames: int | None = None, frame_hw: tuple[int, int] | None = None
) -> np.ndarray:
    """mp4 bytes -> ``(T, H, W, 3)`` uint8 with decord (decodes FFV1, x264 and x264rgb too);
    ``max_frames`` / ``frame_hw`` as in ``decode_clip_pyav``, checked before decoding.
    ImportError (not ValueError, so never taken for a bad clip) when decord is not installed."""
    try:
        import decord
    except ImportError as e:
        raise ImportError(
            f"decoding with decord needs the decord package: {DECORD_EXTRA} (or decode with PyAV)"
        ) from e

    try:
        vr = decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0), num_threads=1)
        n = len(vr)
        if max_frames is not None and n > max_frames:
            raise ClipShapeError(f"{n} frames, more than the {max_frames} expected", "frame_count")
        if frame_hw is not None and n and tuple(vr[0].shape[:2]) != tuple(frame_hw):
            raise ClipShapeError(
                f"frame size {tuple(vr[0].shape[:2])}, dataset renders {tuple(frame_hw)}",
                "frame_size",
            )
        return vr.get_batch(list(range(n))).asnumpy()
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 - decord raises its own (DECORDError, RuntimeError)
        raise ValueError(f"undecodable clip ({type(e).__name__}: {str(e)[:200]})") from None


def decode_clip(
    data: bytes,
    backend: str = "decord",
    max_frames: int | None = None,
    frame_hw: tuple[int, int] | None = None,
) -> np.ndarray:
    """mp4 bytes -> frames with ``backend`` (``decord``, falling back to PyAV on a clip decord
    cannot decode; or ``pyav``); ``max_frames`` / ``frame_hw``: refuse clips longer or of another
    size (see above). ``decord`` without the decord package raises ImportError: no fallback."""
    if backend == "pyav":
        return decode_clip_pyav(data, max_frames, frame_hw)
    if backend != "decord":
        raise ValueError(f"decode backend must be 'decord' or 'pyav', got {backend!r}")
    try:
        return decode_clip_decord(data, max_frames, frame_hw)
    except ValueError:
        return decode_clip_pyav(data, max_frames, frame_hw)


def probe(data: bytes) -> str:
    """The codec of an encoded clip as ``CODEC:PIX_FMT`` (decoder names, e.g. ``ffv1:bgr0``)."""
    try:
        with av.open(io.BytesIO(data)) as container:
            s = container.streams.video[0]
            return f"{s.codec_context.name}:{s.codec_context.pix_fmt}"
    except (av.error.FFmpegError, IndexError) as e:
        raise ValueError(f"not a readable clip: {e}") from None
