"""Hostile inputs, made here, through every builder that reads them and through `evav render`.

Each case is one file (or row, or line) a hostile user could hand evav, with its exact outcome:
quarantined with a reason (a substring of it), or rendered, checked against a reference made
independently (the same pixels prepared another way, or a clean file with the same content). A
build holds every case of its modality at once next to a good input, so it also shows that one
hostile input never stops the build or changes another; every build has inputs = samples +
quarantined. `evav render` must give exit code 2 and one line ``evav render: error: PATH:
reason`` for every case that a build quarantines, and the same frames for every case a build
renders. Layout-level files (question files, idx files, pickles, options) stop a build before
any work, with one line naming the problem; nothing in a pickle ever runs.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import re
import struct
import subprocess
import sys
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from evav.cli import main
from evav.frames import RenderSpec, TextRenderer, load_image, render_audio, render_image
from evav.frames.image import fit_image
from evav.manifest import load_manifest
from tests.test_preprocess import read_samples

SPEC = RenderSpec()
TEXT = TextRenderer(SPEC)
REPO = Path(__file__).resolve().parents[1]
T = Image.Transpose


# -- file makers ----------------------------------------------------------------------------------
def wav(samples, rate=8000, fmt="pcm16", channels=1, data_bytes=None, riff_size=None) -> bytes:
    """A RIFF WAV file: 16-bit PCM or 32-bit float; the size fields may lie."""
    x = np.asarray(samples, np.float64)
    if fmt == "pcm16":
        body, tag, bits = np.clip(np.round(x * 32767), -32768, 32767).astype("<i2").tobytes(), 1, 16
    else:
        body, tag, bits = x.astype("<f4").tobytes(), 3, 32
    block = channels * bits // 8
    fmt_chunk = struct.pack("<HHIIHH", tag, channels, rate, rate * block, block, bits)
    n = len(body) if data_bytes is None else data_bytes
    riff = 4 + 8 + len(fmt_chunk) + 8 + len(body) if riff_size is None else riff_size
    head = b"RIFF" + struct.pack("<I", riff) + b"WAVE"
    return (
        head + b"fmt " + struct.pack("<I", 16) + fmt_chunk + b"data" + struct.pack("<I", n) + body
    )


TONE_T = np.arange(3200) / 8000
TONE = 0.5 * np.sin(2 * np.pi * np.cumsum(300 + 2000 * TONE_T / 0.4) / 8000)  # a 0.4 s chirp


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(width, height, depth=8, colour=2, raw: bytes | None = None, chunks=None) -> bytes:
    """A PNG written byte by byte: any header, any bit depth (16-bit RGB, which Pillow cannot
    write), declared sizes that lie."""
    ihdr = png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0))
    if chunks is None:
        chunks = [png_chunk(b"IDAT", zlib.compress(raw if raw is not None else b""))]
    return b"\x89PNG\r\n\x1a\n" + ihdr + b"".join(chunks) + png_chunk(b"IEND", b"")


def test_picture(w=40, h=24) -> np.ndarray:
    """An asymmetric RGB picture: any rotation or flip of it is a different picture."""
    a = np.zeros((h, w, 3), np.uint8)
    a[: h // 2, : w // 2] = (250, 30, 30)
    a[h // 2 :, w // 2 :] = (20, 200, 60)
    a[:, ::7] = (30, 30, 240)
    a[2:5, 30:36] = 255
    return a


test_picture.__test__ = False


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    b = io.BytesIO()
    img.save(b, fmt, **kw)
    return b.getvalue()


def mp4(frames: list[np.ndarray], rotation: int | None = None) -> bytes:
    """Lossless H.264 (qp 0, 4:4:4); ``rotation``: a display matrix turning it counter-clockwise."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "v.mp4"
        with av.open(str(path), "w") as c:
            s = c.add_stream("libx264", rate=4)
            s.height, s.width = frames[0].shape[:2]
            s.pix_fmt, s.options = "yuv444p", {"qp": "0"}
            if rotation is not None:
                s.set_display_rotation(rotation)
            for f in frames:
                c.mux(s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
            c.mux(s.encode(None))
        return path.read_bytes()


def clip_frames(n=3) -> list[np.ndarray]:
    return [np.roll(test_picture(32, 48), 5 * i, axis=1) for i in range(n)]


def raw_video(path: Path) -> list[np.ndarray]:
    """The stored pixels of every frame, display matrix ignored (the reference's input)."""
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


# -- cases ------------------------------------------------------------------------------------------
Check = Callable[[np.ndarray, Path, Path], None]  # (rendered input frames, the file, a scratch dir)


@dataclass(frozen=True)
class Case:
    id: str
    name: str  # the file name (its suffix is the one the builders look for)
    make: Callable[[Path], None]  # writes the hostile file at the given path
    reason: str = ""  # quarantined / refused with a reason containing this
    check: Check | None = None  # else rendered, and checked by this

    def __post_init__(self):
        assert bool(self.reason) != (self.check is not None), self.id


def data(b: bytes) -> Callable[[Path], None]:
    return lambda p: p.write_bytes(b)


def directory(p: Path) -> None:
    p.mkdir()


def fifo(p: Path) -> None:
    os.mkfifo(p)


def dangling(p: Path) -> None:
    os.symlink("nowhere-at-all", p)


def loop(p: Path) -> None:
    os.symlink(p.name, p)  # a link to itself


FILE_CASES = [  # every modality: what the file system can do to a name
    ("zero-byte", data(b""), "empty file (0 bytes)"),
    ("directory", directory, "not a regular file (a directory)"),
    ("fifo", fifo, "not a regular file (a named pipe (FIFO))"),
    ("dangling-symlink", dangling, "dangling symbolic link (to nowhere-at-all)"),
    ("symlink-loop", loop, "cannot read: Too many levels of symbolic links"),
]


def same_as(reference: Callable[[Path], np.ndarray], tol: int = 0) -> Check:
    def check(frames: np.ndarray, path: Path, scratch: Path) -> None:
        want = reference(scratch)
        assert frames.shape == want.shape
        assert np.abs(frames.astype(int) - want).max() <= tol

    return check


def audio_of(samples, **kw) -> Callable[[Path], np.ndarray]:
    def ref(scratch: Path) -> np.ndarray:
        path = scratch / f"ref-{len(list(scratch.iterdir()))}.wav"
        path.write_bytes(wav(samples, **kw))
        return render_audio(path, SPEC)

    return ref


NAN = np.where(np.arange(3200) == 100, np.nan, TONE)
INF = np.where(np.arange(3200) == 100, -np.inf, TONE)
DITHER = np.random.default_rng(0).integers(-1, 2, 3200) / 32767  # +-1 step of 16-bit PCM

AUDIO = [Case(i, f"{i}.wav", make, reason) for i, make, reason in FILE_CASES] + [
    Case("not-audio", "not-audio.wav", data(b"\x00\x01garbage" * 50), "not a readable audio file"),
    Case("png-named-wav", "png.wav", data(png(2, 2, raw=b"\0" + bytes(6)) * 2), "no audio stream"),
    Case("header-only", "header-only.wav", data(wav([])), "no audio samples decoded"),
    Case("truncated", "truncated.wav", data(wav(TONE)[:3000]), "truncated: WAV header declares"),
    Case(
        "header-claims-4x-the-data",
        "lies.wav",
        data(wav(TONE, data_bytes=4 * 6400)),
        "truncated: WAV header declares 25600 data bytes, file holds 6400",
    ),
    Case("nan-sample", "nan.wav", data(wav(NAN, fmt="float")), "samples are not finite (NaN or"),
    Case("inf-sample", "inf.wav", data(wav(INF, fmt="float")), "samples are not finite (NaN or"),
    Case("huge-1e30", "huge.wav", data(wav(TONE * 1e30, fmt="float")), "absurd amplitude: peak"),
    Case("all-zeros", "zeros.wav", data(wav(np.zeros(3200))), "silent: peak amplitude 0 is below"),
    Case("dither-only", "dither.wav", data(wav(DITHER)), "below 0.0001 (-80 dBFS)"),
    Case("one-hertz-rate", "slow.wav", data(wav(TONE, rate=1)), "longer than 1200 s"),
    Case("zero-rate", "rate0.wav", data(wav(TONE, rate=0)), "not a readable audio file"),
    Case("zero-channels", "chan0.wav", data(wav(TONE, channels=0)), "not a readable audio file"),
    Case(
        "riff-size-lies",
        "riff.wav",
        data(wav(TONE, riff_size=123456789)),
        check=same_as(audio_of(TONE)),
    ),
    Case(
        "stereo-same-channels",
        "stereo.wav",
        data(wav(np.repeat(TONE, 2), channels=2)),
        check=same_as(audio_of(TONE)),
    ),
    Case(  # 12 dB over full scale: refused only far beyond; the picture is gain-invariant
        "float-4x-full-scale",
        "hot.wav",
        data(wav(TONE * 4, fmt="float")),
        check=same_as(audio_of(TONE), tol=1),
    ),
]


def image_of(
    make_reference: Callable[[], Image.Image | np.ndarray],
) -> Callable[[Path], np.ndarray]:
    return lambda scratch: render_image(make_reference(), SPEC)


PIC = test_picture()


def smooth16(h: int, w: int, channels: int = 0) -> np.ndarray:
    """A 16-bit picture: gradients with noise in the low byte (what 16-bit precision holds)."""
    ramp = np.linspace(0, 1, w)[None, :] * np.linspace(0.2, 1, h)[:, None]
    if channels:
        ramp = ramp[..., None] * np.linspace(1, 0.5, channels)
    noise = np.random.default_rng(channels).integers(-200, 200, ramp.shape)
    return np.clip(np.round(ramp * 65535) + noise, 0, 65535).astype(np.uint16)


GREY16, RGB16 = smooth16(24, 40), smooth16(24, 40, 3)


def to8(a16: np.ndarray) -> np.ndarray:
    return np.round(a16 / 257).astype(np.uint8)


def exif_jpeg(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(Image.fromarray(PIC), "JPEG", quality=95, exif=exif)


def upright_of_stored(method: T) -> Check:
    """The stored (unrotated) pixels, turned by the EXIF spec's rule; and not the unturned."""

    def check(frames: np.ndarray, path: Path, scratch: Path) -> None:
        with Image.open(path) as im:
            stored = np.asarray(im.convert("RGB"))
        want = render_image(Image.fromarray(stored).transpose(method), SPEC)
        assert np.array_equal(frames, want)
        assert not np.array_equal(frames, render_image(stored, SPEC))

    return check


def palette_with_transparency() -> bytes:
    p = Image.new("P", (8, 8), 0)
    p.putpalette([255, 255, 255, 200, 0, 0] + [0] * 762)  # index 0 is white, and transparent
    p.paste(1, (4, 0, 8, 8))
    return encode(p, "PNG", transparency=0)


def rgba_hiding_white() -> bytes:
    a = np.zeros((8, 8, 4), np.uint8)
    a[:, :4] = (255, 255, 255, 0)  # white, fully transparent
    a[:, 4:] = (0, 200, 0, 255)
    return encode(Image.fromarray(a, "RGBA"), "PNG")


def left_black_right(colour) -> Callable[[], np.ndarray]:
    def ref():
        a = np.zeros((8, 8, 3), np.uint8)
        a[:, 4:] = colour
        return a

    return ref


def grey_alpha() -> bytes:
    a = np.stack(
        [np.full((8, 8), 200, np.uint8), np.tile(np.arange(0, 256, 32, dtype=np.uint8), (8, 1))], 2
    )
    return encode(Image.fromarray(a, "LA"), "PNG")


def grey_alpha_reference() -> np.ndarray:
    alpha = np.tile(np.arange(0, 256, 32), (8, 1))
    return np.repeat(np.round(200 * alpha / 255).astype(np.uint8)[..., None], 3, 2)


def split_idat_broken_chunk() -> bytes:
    """IDAT data continued in a chunk whose type is garbage: Pillow raises SyntaxError (not
    OSError) while decoding, the kind of error no renderer check expects."""
    body = zlib.compress(b"".join(b"\0" + bytes(range(12 * i, 12 * i + 12)) for i in range(3)))
    half = len(body) // 2
    return png(
        4, 3, chunks=[png_chunk(b"IDAT", body[:half]), png_chunk(b"\x18\x18\x0cu", body[half:])]
    )


def eight_bit_of(a16: np.ndarray) -> Check:
    """The file's pixels are its 16-bit values scaled to 8 bits, within 1 level (Pillow takes
    the high byte of 16-bit RGB, evav rounds 16-bit grey); the frame renders those pixels."""

    def check(frames: np.ndarray, path: Path, scratch: Path) -> None:
        pixels = np.asarray(load_image(path)).astype(int)
        want = to8(a16).astype(int)
        assert np.abs(pixels - (want if want.ndim == 3 else want[..., None])).max() <= 1
        assert np.array_equal(frames, render_image(pixels.astype(np.uint8), SPEC))
        assert frames.mean() < 200  # not the near-white of 16-bit values clipped to 255

    return check


def grey16_png() -> bytes:
    return encode(Image.fromarray(GREY16), "PNG")  # Pillow writes I;16 as a 16-bit grey PNG


def rgb16_png() -> bytes:
    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in RGB16)
    return png(40, 24, depth=16, colour=2, raw=rows)


IMAGES = [Case(i, f"{i}.png", make, reason) for i, make, reason in FILE_CASES] + [
    Case(
        "garbage",
        "garbage.jpg",
        data(b"\xff\xd8\xff\xe0 not a jpeg" * 20),
        "corrupt or truncated image",
    ),
    Case("truncated-png", "cut.png", data(encode(Image.fromarray(PIC), "PNG")[:60]), "image"),
    Case(
        "broken-chunk-png",
        "broken.png",
        data(split_idat_broken_chunk()),
        "SyntaxError: broken PNG file",
    ),
    Case(
        "bomb-10-gigapixel",
        "bomb.png",
        data(png(100000, 100000)),
        "image too large: Image size (10000000000 pixels) exceeds limit",
    ),
    Case(  # between 1x and 2x Pillow's limit Pillow only warns; evav refuses
        "bomb-96-megapixel",
        "bomb96.png",
        data(png(12000, 8000)),
        "image too large: 12000x8000 = 96000000 pixels",
    ),
    Case("zero-width", "zero.png", data(png(0, 10)), "not an image evav reads"),
    Case(  # Pillow would open it as EPS and run Ghostscript on it (where installed): refused
        "eps-named-jpg",
        "vector.jpg",
        data(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nnewpath 0 0 moveto showpage\n"),
        "not an image evav reads",
    ),
    Case(
        "float-tiff",
        "float.png",
        data(
            encode(Image.fromarray(np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)), "TIFF")
        ),
        "unsupported image: 32-bit floating-point pixels (mode F)",
    ),
    Case(
        "gif-named-jpg",
        "gif.jpg",
        data(encode(Image.fromarray(PIC).quantize(16), "GIF")),
        check=same_as(image_of(lambda: Image.fromarray(PIC).quantize(16))),
    ),
    Case(
        "tiff-named-jpg",
        "tiff.jpg",
        data(encode(Image.fromarray(PIC), "TIFF")),
        check=same_as(image_of(lambda: PIC)),
    ),
    Case(
        "cmyk-jpeg",
        "cmyk.jpg",
        data(encode(Image.fromarray(PIC).convert("CMYK"), "JPEG", quality=95)),
        check=same_as(image_of(lambda: PIC), tol=8),  # JPEG loss only; inverted would be ~200
    ),
    Case(
        "palette-transparency",
        "palette.png",
        data(palette_with_transparency()),
        check=same_as(image_of(left_black_right((200, 0, 0)))),
    ),
    Case(
        "rgba-hiding-white",
        "rgba.png",
        data(rgba_hiding_white()),
        check=same_as(image_of(left_black_right((0, 200, 0)))),
    ),
    Case("grey-alpha", "la.png", data(grey_alpha()), check=same_as(image_of(grey_alpha_reference))),
    Case(
        "one-bit",
        "bits.png",
        data(encode(Image.fromarray(PIC[..., 0] > 128), "PNG")),
        check=same_as(image_of(lambda: np.where(PIC[..., 0] > 128, 255, 0).astype(np.uint8))),
    ),
    Case(
        "one-pixel",
        "pixel.png",
        data(encode(Image.new("RGB", (1, 1), (200, 10, 30)), "PNG")),
        check=same_as(lambda s: np.broadcast_to(np.uint8([200, 10, 30]), (1, 64, 64, 3))),
    ),
    Case("16-bit-grey-png", "grey16.png", data(grey16_png()), check=eight_bit_of(GREY16)),
    Case("16-bit-rgb-png", "rgb16.png", data(rgb16_png()), check=eight_bit_of(RGB16)),
    Case("exif-rotate-180", "exif3.jpg", data(exif_jpeg(3)), check=upright_of_stored(T.ROTATE_180)),
    Case(
        "exif-rotate-90-cw", "exif6.jpg", data(exif_jpeg(6)), check=upright_of_stored(T.ROTATE_270)
    ),
    Case(
        "exif-rotate-90-ccw", "exif8.jpg", data(exif_jpeg(8)), check=upright_of_stored(T.ROTATE_90)
    ),
]


def turned(method: T | None) -> Check:
    """Every frame is the stored frame turned by ``method`` (the display matrix), then fitted."""

    def check(frames: np.ndarray, path: Path, scratch: Path) -> None:
        stored = raw_video(path)
        want = [Image.fromarray(f) for f in stored]
        if method is not None:
            want = [im.transpose(method) for im in want]
        want = np.stack([fit_image(im, 64, 64) for im in want])
        assert np.array_equal(frames, want)
        if method is not None:
            plain = np.stack([fit_image(Image.fromarray(f), 64, 64) for f in stored])
            assert not np.array_equal(frames, plain)

    return check


def audio_only_mp4() -> bytes:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "a.mp4"
        with av.open(str(path), "w") as c:
            s = c.add_stream("aac", rate=16000)
            for _ in range(4):
                f = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), "fltp", "mono")
                f.sample_rate = 16000
                c.mux(s.encode(f))
            c.mux(s.encode(None))
        return path.read_bytes()


def empty_video_track() -> bytes:
    """A video stream with no frame: FFmpeg drops the empty track, so there is no stream."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "z.mp4"
        with av.open(str(path), "w") as c:
            s = c.add_stream("libx264", rate=4)
            s.width = s.height = 32
            c.start_encoding()
        return path.read_bytes()


VIDEO_BYTES = mp4(clip_frames(3))
VIDEOS = [Case(i, f"{i}.mp4", make, reason) for i, make, reason in FILE_CASES] + [
    Case("garbage", "garbage.mp4", data(b"\x00\x01garbage" * 50), "not a readable video file"),
    Case(
        "truncated", "cut.mp4", data(VIDEO_BYTES[: len(VIDEO_BYTES) // 3]), "not a readable video"
    ),
    Case("zero-frames", "zero.mp4", data(empty_video_track()), "no video stream"),
    Case("audio-only", "audio.mp4", data(audio_only_mp4()), "no video stream"),
    Case("one-frame", "one.mp4", data(mp4(clip_frames(1))), check=turned(None)),
    Case(
        "rotated-90-ccw",
        "r90.mp4",
        data(mp4(clip_frames(), rotation=90)),
        check=turned(T.ROTATE_90),
    ),
    Case(
        "rotated-180",
        "r180.mp4",
        data(mp4(clip_frames(), rotation=180)),
        check=turned(T.ROTATE_180),
    ),
    Case(
        "rotated-90-cw",
        "r270.mp4",
        data(mp4(clip_frames(), rotation=-90)),
        check=turned(T.ROTATE_270),
    ),
]


# -- builds ---------------------------------------------------------------------------------------
Outcome = tuple[str, object, Path]  # ("quarantined", reason, file) or ("rendered", frames, file)


def run_build(builder: str, raw: Path, out: Path, *extra: str) -> tuple[dict, dict]:
    """Build through the CLI; -> ({source: reason}, {source: (meta, clip)}), invariants checked."""
    assert main(["preprocess", builder, "--src", str(raw), "--out", str(out), *extra]) == 0
    m = load_manifest(out)
    for name, s in m.splits.items():
        assert s.inputs == s.samples + sum(q.split == name for q in m.quarantined)
    samples = read_samples(out)
    assert len(samples) == m.num_samples
    return {q.source: q.reason for q in m.quarantined}, {
        meta.source: (meta, clip) for meta, clip in samples.values()
    }


def collect(cases, where: dict[str, tuple[str, Path]], q: dict, s: dict, frames_of):
    """Case id -> outcome; each case's source is exactly one of quarantined or a sample."""
    out: dict[str, Outcome] = {}
    for c in cases:
        src, file = where[c.id]
        assert (src in q) != (src in s), f"{c.id}: {src} must be quarantined or a sample"
        if src in q:
            out[c.id] = ("quarantined", q[src], file)
        else:
            out[c.id] = ("rendered", frames_of(*s[src]), file)
    return out


GOOD_WAV = wav(TONE * 0.8)


def build_audio(builder: str, root: Path) -> dict[str, Outcome]:
    raw, where = root / "raw", {}
    if builder == "fsdd":
        folder = raw / "recordings"
        folder.mkdir(parents=True)
        (folder / "1_good_20.wav").write_bytes(GOOD_WAV)
        names = {c.id: f"0_hostile_{30 + k}.wav" for k, c in enumerate(AUDIO)}
    else:
        folder = raw / "data" / "07"
        folder.mkdir(parents=True)
        (folder / "1_07_0.wav").write_bytes(GOOD_WAV)
        names = {c.id: f"0_07_{30 + k}.wav" for k, c in enumerate(AUDIO)}
    for c in AUDIO:
        c.make(folder / names[c.id])
        where[c.id] = (str(folder / names[c.id]), folder / names[c.id])
    q, s = run_build(builder, raw, root / "out", "--shard-samples", "5")
    assert len(s) == 1 + sum(c.check is not None for c in AUDIO)  # and the good file
    return collect(AUDIO, where, q, s, lambda meta, clip: clip[1:2])


def build_images(builder: str, root: Path) -> dict[str, Outcome]:
    raw, where = root / "raw", {}
    good = encode(Image.fromarray(PIC), "PNG")
    if builder == "cifar10":
        folder = raw / "test" / "cat"
        folder.mkdir(parents=True)
        (folder / "good.png").write_bytes(good)
        for c in IMAGES:
            c.make(folder / c.name)
            where[c.id] = (str(folder / c.name), folder / c.name)
        q, s = run_build(builder, raw, root / "out")
    else:  # lasot: each case is the first frame of a 2-frame sequence (named .jpg, any content)
        for k, c in enumerate(IMAGES):
            seq = raw / "cat" / f"cat-{k}"
            (seq / "img").mkdir(parents=True)
            c.make(seq / "img" / "00000001.jpg")
            (seq / "img" / "00000002.jpg").write_bytes(good)
            (seq / "groundtruth.txt").write_text("0,0,0,0\n0,0,0,0\n")  # no box drawn
            where[c.id] = (f"{seq}:0", seq / "img" / "00000001.jpg")
        q, s = run_build(builder, raw, root / "out", "num_frames=2", "stride=1", "--codec", "ffv1")
    return collect(IMAGES, where, q, s, lambda meta, clip: clip[1:2])


QUESTION = "what color"


def build_videos(builder: str, root: Path) -> dict[str, Outcome]:
    raw, where = root / "raw", {}
    raw.mkdir()
    if builder == "video":
        for c in VIDEOS:
            c.make(raw / c.name)
            where[c.id] = (str(raw / c.name), raw / c.name)
        (raw / "good.mp4").write_bytes(VIDEO_BYTES)

        def frames_of(meta, clip):
            return clip[1:]

    elif builder == "clevrer":
        folder = raw / "video_validation" / "video_00000-01000"
        folder.mkdir(parents=True)
        scenes = {}
        for k, c in enumerate(VIDEOS):
            c.make(folder / f"video_{k:05d}.mp4")
            q = {"question_id": 0, "question_type": "descriptive", "question": QUESTION}
            scenes[str(k)] = {"questions": [{**q, "answer": "red"}]}
            where[c.id] = (f"validation.json:{k}:0", folder / f"video_{k:05d}.mp4")
        (raw / "validation.json").write_text(json.dumps(scenes))

        def frames_of(meta, clip):
            return clip[1 : 1 + meta.segments["input"] - len(TEXT.tokenize(QUESTION))]

    else:  # tinyvirat
        folder = raw / "videos" / "train" / "VIRAT_S_01"
        folder.mkdir(parents=True)
        tubes = []
        for c in VIDEOS:
            c.make(folder / c.name)
            tubes.append({"path": f"VIRAT_S_01/{c.name}", "label": ["activity_walking"]})
            where[c.id] = (str(folder / c.name), folder / c.name)
        (raw / "tiny_train.json").write_text(json.dumps({"tubes": tubes}))

        def frames_of(meta, clip):
            return clip[1 : 1 + meta.segments["input"]]

    q, s = run_build(builder, raw, root / "out", "num_frames=4", "--codec", "ffv1")
    return collect(VIDEOS, where, q, s, frames_of)


BUILDS = {
    "audio": (AUDIO, build_audio, ["fsdd", "audiomnist"]),
    "image": (IMAGES, build_images, ["cifar10", "lasot"]),
    "video": (VIDEOS, build_videos, ["video", "clevrer", "tinyvirat"]),
}
BUILDER_CASES = [
    pytest.param(kind, builder, case, id=f"{builder}-{case.id}")
    for kind, (cases, _, builders) in BUILDS.items()
    for builder in builders
    for case in cases
]
RENDER_CASES = [
    pytest.param(case, id=f"{kind}-{case.id}")
    for kind, (cases, _, _) in BUILDS.items()
    for case in cases
]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Callable[[str, str], dict[str, Outcome]]:
    """Each (modality, builder) is built once for the module, holding all its cases."""
    cache: dict[tuple[str, str], dict[str, Outcome]] = {}

    def get(kind: str, builder: str) -> dict[str, Outcome]:
        if (kind, builder) not in cache:
            cache[kind, builder] = BUILDS[kind][1](builder, tmp_path_factory.mktemp(builder))
        return cache[kind, builder]

    return get


@pytest.mark.parametrize("kind, builder, case", BUILDER_CASES)
def test_hostile_file_in_a_build(built, tmp_path, kind, builder, case):
    outcome, value, file = built(kind, builder)[case.id]
    if case.check is None:
        assert outcome == "quarantined", f"{case.id} was rendered, expected: {case.reason}"
        assert case.reason in value and "\n" not in value, value
    else:
        assert outcome == "rendered", value
        case.check(value, file, tmp_path)


@pytest.mark.parametrize("case", RENDER_CASES)
def test_hostile_file_in_evav_render(tmp_path, capsys, case):
    """`evav render FILE`: one line `evav render: error: FILE: reason` and exit 2 for every
    file a build quarantines; the same frames as a build for every other."""
    (tmp_path / "in").mkdir()
    path = tmp_path / "in" / case.name
    case.make(path)
    out = tmp_path / "out.png"
    rc = main(["render", str(path), "--out", str(out)])
    captured = capsys.readouterr()
    if case.check is None:
        assert rc == 2 and not out.exists()
        assert captured.err.startswith(f"evav render: error: {path}: "), captured.err
        assert case.reason in captured.err and captured.err.count("\n") == 1, captured.err
    else:
        assert rc == 0, captured.err
        n = int(re.search(r": (\d+) frames of 64x64", captured.out).group(1))
        case.check(sheet_frames(out, n), path, tmp_path)


def sheet_frames(png_path: Path, n: int, size: int = 64, gap: int = 2) -> np.ndarray:
    """The frames of an `evav render` contact sheet (8 columns, 2-pixel gaps)."""
    sheet = np.asarray(Image.open(png_path).convert("RGB"))
    cols = min(8, n)
    frames = []
    for i in range(n):
        r, c = divmod(i, cols)
        y, x = gap + r * (size + gap), gap + c * (size + gap)
        frames.append(sheet[y : y + size, x : x + size])
    return np.stack(frames)


# -- files no one may read ------------------------------------------------------------------------
def write_only_kernel_file() -> Path | None:
    """A sysfs attribute without read permission: opening it fails with EACCES even for root
    (the kernel checks the mode itself); reading it has no side effect."""
    for pattern in ("/sys/bus/*/drivers_probe", "/sys/devices/*/*/rescan", "/sys/bus/*/uevent"):
        for p in sorted(Path("/").glob(pattern.lstrip("/"))):
            try:
                if p.is_file() and not p.stat().st_mode & 0o444 and p.stat().st_size > 0:
                    return p
            except OSError:
                continue
    return None


def test_a_file_that_cannot_be_opened_even_by_root(tmp_path, capsys):
    target = write_only_kernel_file()
    if target is None:
        pytest.skip("no write-only sysfs attribute here to stand for an unreadable file")
    rec = tmp_path / "raw" / "recordings"
    rec.mkdir(parents=True)
    (rec / "1_good_20.wav").write_bytes(GOOD_WAV)
    (rec / "2_locked_30.wav").symlink_to(target)
    q, s = run_build("fsdd", tmp_path / "raw", tmp_path / "out")
    assert q == {str(rec / "2_locked_30.wav"): "cannot read: Permission denied"}
    assert list(s) == [str(rec / "1_good_20.wav")]
    capsys.readouterr()
    assert main(["render", str(rec / "2_locked_30.wav"), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err == f"evav render: error: {rec / '2_locked_30.wav'}: cannot read: Permission denied\n"


def without_file_permission_override() -> None:
    """In the child, before exec: drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the
    bounding set, so that root meets file permissions like any user."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # linux/capability.h
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_chmod_000_file_for_a_user_without_the_override(tmp_path):
    """The plain case: a file its user may not read. Root reads anything (CAP_DAC_OVERRIDE), so
    the commands run in a child without that capability, as a user would meet the file."""
    rec = tmp_path / "raw" / "recordings"
    rec.mkdir(parents=True)
    (rec / "1_good_20.wav").write_bytes(GOOD_WAV)
    locked = rec / "2_locked_30.wav"
    locked.write_bytes(GOOD_WAV)
    locked.chmod(0o000)
    probe = subprocess.run(
        ["cat", str(locked)], preexec_fn=without_file_permission_override, capture_output=True
    )
    if probe.returncode == 0:
        pytest.skip("cannot drop the permission override here (no CAP_SETPCAP?)")

    def evav(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "evav.cli", *args],
            cwd=REPO,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            preexec_fn=without_file_permission_override,
            capture_output=True,
            text=True,
            timeout=300,
        )

    done = evav(
        "preprocess", "fsdd", "--src", str(tmp_path / "raw"), "--out", str(tmp_path / "out")
    )
    assert done.returncode == 0, done.stderr
    m = load_manifest(tmp_path / "out")
    assert [(q.source, q.reason) for q in m.quarantined] == [
        (str(locked), "cannot read: Permission denied")
    ]
    assert m.num_samples == 1
    done = evav("render", str(locked), "--out", str(tmp_path / "x.png"))
    assert done.returncode == 2
    assert done.stderr == f"evav render: error: {locked}: cannot read: Permission denied\n"


# -- text: rows and lines -------------------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    id: str
    text: bytes  # the raw bytes of the row (or line), its line ending included
    reason: str = ""  # quarantined with this reason
    tokens: tuple[str, ...] = ()  # else a sample of exactly these tokens
    label: int | None = None
    same_frame: tuple[int, str] | None = None  # token i is drawn exactly as this text


SST2_ROWS = [
    Row("plain", b"plain good film\t1\n", tokens=("plain", "good", "film"), label=1),
    Row(
        "line-separator-u2028",
        "a\u2028b film\t0\n".encode(),
        tokens=("a", "b", "film"),
        label=0,
    ),
    Row("form-feed", b"form\x0cfeed film\t1\n", tokens=("form", "feed", "film"), label=1),
    Row("vertical-tab", b"vertical\x0btab\t1\n", tokens=("vertical", "tab"), label=1),
    Row(
        "quoted-field-with-tab",
        b'"quoted\ttab film"\t1\n',
        tokens=("quoted", "tab", "film"),
        label=1,
    ),
    Row(
        "quoted-field-with-newline",
        b'"multi\nline film"\t0\n',
        tokens=("multi", "line", "film"),
        label=0,
    ),
    Row("after-the-two-line-row", b"after it\t1\n", tokens=("after", "it"), label=1),
    Row("doubled-quote", b'"say ""hi"""\t1\n', tokens=("say", '"', "hi", '"'), label=1),
    Row("crlf", b"crlf row\t1\r\n", tokens=("crlf", "row"), label=1),
    Row(
        "bare-carriage-return",
        b"bare\rcr\t1\n",
        reason="unreadable row: new-line character seen in unquoted field",
    ),
    Row("invalid-utf8", b"bad \xff byte\t0\n", reason="invalid UTF-8 (byte 0xff)"),
    Row("three-fields", b"three\tfields\t1\n", reason="broken row: 3 tab-separated fields"),
    Row("no-label", b"no label at all\n", reason="broken row: 1 tab-separated fields"),
    Row("label-2", b"bad label\t2\n", reason="label '2' is not 0 or 1"),
    Row("empty-sentence", b"\t1\n", reason="empty sentence"),
    Row("punctuation-only", b"...\t0\n", tokens=(".", ".", "."), label=0),
    Row(
        "nul",
        b"nul\x00char\t0\n",
        tokens=("nul", "\x00", "char"),
        label=0,
        same_frame=(1, "U+0000"),
    ),
    Row(
        "emoji",
        "emoji \U0001f600 film\t1\n".encode(),
        tokens=("emoji", "\U0001f600", "film"),
        label=1,
        same_frame=(1, "U+1F600"),
    ),
    Row(
        "emoji-in-a-word",
        "ab\U0001f600cd\t1\n".encode(),
        tokens=("ab", "\U0001f600", "cd"),
        label=1,
        same_frame=(1, "U+1F600"),
    ),
    Row(
        "hebrew-not-in-the-font",
        "\u05e9\u05dc\t1\n".encode(),
        tokens=("\u05e9", "\u05dc"),
        label=1,
        same_frame=(0, "U+05E9"),
    ),
    Row(
        "arabic-in-the-font",
        "\u0633\u0644\u0627\u0645 film\t0\n".encode(),
        tokens=("\u0633\u0644\u0627\u0645", "film"),
        label=0,
    ),
    Row(
        "rtl-mark-and-zero-width-joiner",
        "a\u200fb\u200dc\t1\n".encode(),
        tokens=("a", "\u200f", "b", "\u200d", "c"),
        label=1,
        same_frame=(1, "U+200F"),
    ),
    Row(
        "very-long-token",
        b"x" * 100 + b"\t1\n",
        tokens=tuple(["x" * 16] * 6 + ["x" * 4]),
        label=1,
    ),
    Row(
        "field-over-the-csv-limit",
        b"y" * 140000 + b"\t1\n",
        reason="unreadable row: field larger than field limit (131072)",
    ),
    Row(  # last: an unclosed quote runs to the end of the file (the csv module's rule)
        "unclosed-quote",
        b'"unterminated\t1\nswallowed row\t0\n',
        reason="broken row: 1 tab-separated fields",
    ),
]


def row_lines(rows: list[Row]) -> dict[str, int]:
    """Row id -> the line it starts on (after the header, line 1)."""
    lines, n = {}, 2
    for r in rows:
        lines[r.id] = n
        n += r.text.count(b"\n")
    return lines


@pytest.fixture(scope="module")
def sst2_build(tmp_path_factory):
    root = tmp_path_factory.mktemp("sst2")
    (root / "raw").mkdir()
    tsv = root / "raw" / "dev.tsv"
    tsv.write_bytes(b"sentence\tlabel\n" + b"".join(r.text for r in SST2_ROWS))
    q, s = run_build("sst2", root / "raw", root / "out")
    assert len(q) + len(s) == len(SST2_ROWS)  # one input per record, never split or merged
    return tsv, q, s


def check_row(row: Row, source: str, q: dict, s: dict) -> None:
    if row.reason:
        assert source in q and row.reason in q[source], q.get(source, "not quarantined")
        return
    assert source in s, q.get(source, f"{source} is not a sample")
    meta, clip = s[source]
    tokens = list(row.tokens)
    assert clip.shape[0] - meta.segments["input"] >= 1
    frames = clip[1 : 1 + meta.segments["input"]]
    assert meta.segments["input"] == len(tokens), (meta.extra, tokens)
    assert np.array_equal(frames, TEXT.render_tokens(tokens))
    if row.label is not None:
        assert meta.label == row.label
    if row.same_frame is not None:
        i, shown = row.same_frame
        assert np.array_equal(frames[i], TEXT.render_token(shown))


@pytest.mark.parametrize("row", SST2_ROWS, ids=lambda r: r.id)
def test_hostile_sst2_row(sst2_build, row):
    """Every row keeps its own FILE:LINE (its first line), label and text."""
    tsv, q, s = sst2_build
    check_row(row, f"{tsv}:{row_lines(SST2_ROWS)[row.id]}", q, s)


TEXT_LINES = [
    Row("u2028-inside", "the cat\u2028sat\n".encode(), tokens=("the", "cat", "sat")),
    Row("form-feed", b"form\x0cfeed\n", tokens=("form", "feed")),
    Row("bare-carriage-return", b"bare\rcr\n", tokens=("bare", "cr")),
    Row("crlf", b"crlf line\r\n", tokens=("crlf", "line")),
    Row(
        "invalid-utf8", b"bad \xff\xfe here\n", reason="invalid UTF-8: invalid start byte at byte 4"
    ),
    Row("nul-and-emoji", "nul \x00 \U0001f600\n".encode(), tokens=("nul", "\x00", "\U0001f600")),
    Row("line-after-them", b"still right\n", tokens=("still", "right")),
]
JSONL_LINES = [
    Row("object", b'{"text": "hello world"}\n', tokens=("hello", "world")),
    Row(
        "nested-100000-deep",
        b"[" * 100000 + b"]" * 100000 + b"\n",
        reason="not a JSON object with a text field: RecursionError",
    ),
    Row(
        "lone-surrogate-escape",
        b'{"text": "lone \\ud800 one"}\n',
        tokens=("lone", "\ud800", "one"),
        same_frame=(1, "U+D800"),
    ),
    Row("a-list", b"[1, 2]\n", reason="not a JSON object with a text field: a JSON list"),
    Row("not-a-string", b'{"text": 5}\n', reason="field 'text' is not a string"),
    Row("no-field", b'{"other": 1}\n', reason="no field 'text'"),
    Row(
        "5000-digit-number",
        b'{"n": 1' + b"0" * 5000 + b', "text": "x"}\n',
        reason="not a JSON object with a text field: ValueError: Exceeds the limit",
    ),
    Row("not-json", b"not json\n", reason="not a JSON object with a text field: JSONDecodeError"),
    Row("u2028-in-a-string", '{"text": "a\u2028b"}\n'.encode(), tokens=("a", "b")),
    Row("invalid-utf8", b'{"text": "\xc3("}\n', reason="invalid UTF-8"),
    Row("line-after-them", b'{"text": "still right"}\n', tokens=("still", "right")),
]


@pytest.fixture(scope="module")
def text_build(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    raw = root / "raw"
    raw.mkdir()
    (raw / "train.txt").write_bytes(b"".join(r.text for r in TEXT_LINES))
    (raw / "val.jsonl").write_bytes(b"".join(r.text for r in JSONL_LINES))
    (raw / "test.txt").mkdir()  # a folder named like a corpus file
    os.mkfifo(raw / "dev.jsonl")  # a FIFO: opening it would block forever
    q, s = run_build("text", raw, root / "out")
    return raw, q, s


@pytest.mark.parametrize(
    "file, row",
    [("train.txt", r) for r in TEXT_LINES] + [("val.jsonl", r) for r in JSONL_LINES],
    ids=lambda v: v if isinstance(v, str) else v.id,
)
def test_hostile_text_corpus_line(text_build, file, row):
    raw, q, s = text_build
    rows = TEXT_LINES if file == "train.txt" else JSONL_LINES
    n = {r.id: k for k, r in enumerate(rows, start=1)}[row.id]  # one line each: never split
    source = f"{raw / file}:{n}" + ("" if row.reason else ":0")
    check_row(row, source, q, s)


@pytest.mark.parametrize(
    "name, reason",
    [("test.txt", "not a regular file (a directory)"), ("dev.jsonl", "a named pipe (FIFO)")],
)
def test_text_corpus_entry_that_is_not_a_file(text_build, name, reason):
    raw, q, s = text_build
    assert reason in q[str(raw / name)]


# -- CIFAR-10 pickle batches ------------------------------------------------------------------------
def py2_batch(data: np.ndarray, labels: list[int]) -> bytes:
    """The bytes Python 2's cPickle (protocol 2) wrote for the official batches: a dict of str
    keys (bytes here) holding a numpy uint8 array and a list of ints."""

    def s(b: bytes) -> bytes:
        return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<i", len(b)) + b

    def i(v: int) -> bytes:
        return b"J" + struct.pack("<i", v)

    array = (
        b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n"
        + i(0)
        + b"\x85"
        + s(b"b")
        + b"\x87R("
        + i(1)
        + i(data.shape[0])
        + i(data.shape[1])
        + b"\x86cnumpy\ndtype\n"
        + s(b"u1")
        + i(0)
        + i(1)
        + b"\x87R("
        + i(3)
        + s(b"|")
        + b"NNN"
        + i(-1)
        + i(-1)
        + i(0)
        + b"tb\x89"
        + s(data.tobytes())
        + b"tb"
    )
    labs = b"](" + b"".join(i(v) for v in labels) + b"e"
    return b"\x80\x02}(" + s(b"data") + array + s(b"labels") + labs + b"u."


class Payload:
    """Unpickling this runs ``call(*args)``: what a crafted batch file would do."""

    def __init__(self, call, *args):
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


ROWS = np.stack([PIC[:24, :32].repeat(2, 0)[:32].transpose(2, 0, 1).reshape(-1)] * 2)


def batch_cases(marker: Path) -> list[tuple[str, bytes, str]]:
    """(case id, batch bytes, quarantine reason or "" for a batch whose rows are built)."""
    good = {b"data": ROWS, b"labels": [3, 7]}
    touch = ["touch", str(marker)]
    return [
        ("python2-official-format", py2_batch(ROWS, [3, 7]), ""),
        ("python3-protocol-5", pickle.dumps(good, protocol=5), ""),
        (
            "os-system",
            pickle.dumps({b"data": Payload(os.system, f"touch {marker}"), b"labels": [1]}),
            "refused pickle global posix.system",
        ),
        (
            "subprocess-after-the-data",
            pickle.dumps({**good, b"x": Payload(subprocess.call, touch)}),
            "refused pickle global subprocess.call",
        ),
        (
            "builtins-exec",
            pickle.dumps(Payload(exec, f"open({str(marker)!r}, 'w')")),
            "refused pickle global builtins.exec",
        ),
        (
            "protocol-0-text-global",
            f"cos\nsystem\n(S'touch {marker}'\ntR.".encode(),
            "refused pickle global os.system",
        ),
        (
            "numpy-attribute-chain",
            b"\x80\x04\x8c\x05numpy\x8c\x15ndarray.__reduce_ex__\x93.",
            "refused pickle global numpy.ndarray.__reduce_ex__",
        ),
        ("truncated", pickle.dumps(good)[:100], "not a CIFAR-10 pickle batch"),
        (
            "float-pixels",
            pickle.dumps({b"data": ROWS.astype(np.float32), b"labels": [3, 7]}),
            "expected (N, 3072) uint8",
        ),
        ("not-a-dict", pickle.dumps([1, 2, 3]), "expected a dict with b'data'"),
    ]


@pytest.fixture(scope="module")
def cifar_build(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    marker = root / "pwned"
    folder = root / "raw" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    cases = batch_cases(marker)
    names = [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]
    # the loader knows six names: build in rounds of six batches, every round one build
    outcome = {}
    for start in range(0, len(cases), len(names)):
        for f in folder.iterdir():
            f.unlink()
        chunk = cases[start : start + len(names)]
        for (_, blob, _), name in zip(chunk, names):
            (folder / name).write_bytes(blob)
        q, s = run_build("cifar10", root / "raw", root / f"out{start}")
        for (case_id, _, _), name in zip(chunk, names):
            path = str(folder / name)
            rows = [s[f"{path}:{i}"] for i in range(2) if f"{path}:{i}" in s]
            outcome[case_id] = (q.get(path), rows)
    return marker, outcome


@pytest.mark.parametrize("case_id, reason", [(c, r) for c, _, r in batch_cases(Path("m"))])
def test_hostile_cifar_pickle_batch(cifar_build, case_id, reason):
    """A batch whose pickle asks for anything but numpy arrays is refused without running it
    (quarantined as one input naming the global); the official format loads."""
    marker, outcome = cifar_build
    refused, rows = outcome[case_id]
    assert not marker.exists(), "a pickle ran code"
    if reason:
        assert refused is not None and reason in refused and not rows, (refused, rows)
    else:
        assert refused is None and [m.label for m, _ in rows] == [3, 7]
        image = ROWS[0].reshape(3, 32, 32).transpose(1, 2, 0)
        assert np.array_equal(rows[0][1][1:2], render_image(image, SPEC))


# -- layouts, annotations and options --------------------------------------------------------------
def write_files(raw: Path, files: dict[str, bytes]) -> None:
    for rel, blob in files.items():
        (raw / rel).parent.mkdir(parents=True, exist_ok=True)
        (raw / rel).write_bytes(blob)


DEEP = b"[" * 100000 + b"]" * 100000
IDX_HEADER = struct.pack(">IIII", 2051, 3, 28, 28)


@pytest.mark.parametrize(
    "builder, files, extra, message",
    [
        pytest.param(
            "moving_mnist",
            {"t10k-images-idx3-ubyte.gz": b"this is not gzip at all"},
            [],
            "unreadable idx file (BadGzipFile: Not a gzipped file",
            id="moving_mnist-gzip-garbage",
        ),
        pytest.param(
            "moving_mnist",
            {"t10k-images-idx3-ubyte": struct.pack(">IIII", 2051, 2**32 - 1, 28, 28) + bytes(784)},
            [],
            "not an idx3 image file (magic 2051, 4294967295x28x28)",
            id="moving_mnist-header-claims-4-billion-images",
        ),
        pytest.param(
            "moving_mnist",
            {"t10k-images-idx3-ubyte": struct.pack(">IIII", 2051, 10, 28, 28) + bytes(784)},
            [],
            "800 bytes, header says 7856",
            id="moving_mnist-idx-shorter-than-its-header",
        ),
        pytest.param(
            "moving_mnist",
            {"t10k-images-idx3-ubyte.gz": gzip.compress(IDX_HEADER + bytes(784 * 3))[:40]},
            [],
            "unreadable idx file (EOFError",
            id="moving_mnist-gzip-cut-short",
        ),
        pytest.param(
            "clevrer",
            {"validation.json": DEEP},
            [],
            "not a readable JSON file (RecursionError",
            id="clevrer-questions-nested-100000-deep",
        ),
        pytest.param(
            "clevrer",
            {"validation.json": b'[{"scene_index": "x", "questions": []}]'},
            [],
            "scene_index 'x' is not an integer >= 0",
            id="clevrer-scene-index-not-a-number",
        ),
        pytest.param(
            "tinyvirat",
            {"tiny_train.json": DEEP},
            [],
            "not a readable JSON file (RecursionError",
            id="tinyvirat-annotations-nested-100000-deep",
        ),
        pytest.param(
            "tinyvirat",
            {"tiny_train.json": b"\xff\xfe{}"},
            [],
            "not a readable JSON file (UnicodeDecodeError",
            id="tinyvirat-annotations-not-utf8",
        ),
        pytest.param(
            "sst2",
            {"dev.tsv": b"sentence\xff\tlabel\n"},
            [],
            "expected the header 'sentence<TAB>label'",
            id="sst2-header-not-utf8",
        ),
        pytest.param(
            "audiomnist",
            {
                "data/01/0_01_0.wav": GOOD_WAV,
                "train.txt": b"data/01/0_01_0.wav\n\xff\n",
                "valid.txt": b"",
                "test.txt": b"",
            },
            [],
            "train.txt:2: not UTF-8",
            id="audiomnist-split-file-not-utf8",
        ),
        pytest.param(
            "video",
            {"a.mp4": VIDEO_BYTES},
            ["num_frames=0"],
            "num_frames must be between 1 and 10000, got 0",
            id="video-num-frames-0",
        ),
        pytest.param(
            "clevrer",
            {"validation.json": b"[]"},
            ["num_frames=-4"],
            "num_frames must be between 1 and 10000, got -4",
            id="clevrer-num-frames-negative",
        ),
        pytest.param(
            "tinyvirat",
            {"tiny_train.json": b"[]"},
            ["num_frames=100000"],
            "num_frames must be between 1 and 10000, got 100000",
            id="tinyvirat-num-frames-huge",
        ),
        pytest.param(
            "lasot",
            {"cat/cat-1/img/00000001.jpg": b"x"},
            ["num_frames=1"],
            "num_frames must be in 2..10000",
            id="lasot-num-frames-1",
        ),
        pytest.param(
            "lasot",
            {"cat/cat-1/img/00000001.jpg": b"x"},
            ["max_windows=-1"],
            "max_windows must be >= 0",
            id="lasot-max-windows-negative",
        ),
        pytest.param(
            "moving_mnist",
            {},
            ["digits=0"],
            "digits must be in 1..64, got 0",
            id="moving_mnist-no-digits",
        ),
        pytest.param(
            "moving_mnist",
            {},
            ["input_frames=0"],
            "input_frames must be between 1 and 10000",
            id="moving_mnist-input-frames-0",
        ),
        pytest.param(
            "moving_mnist",
            {},
            ["test_sequences=-1"],
            "test_sequences must be in 0..10000000",
            id="moving_mnist-sequences-negative",
        ),
        pytest.param(
            "sst2",
            {"dev.tsv": b"sentence\tlabel\n"},
            ["max_words=0"],
            "max_words must be >= 1, got 0",
            id="sst2-max-words-0",
        ),
        pytest.param(
            "text",
            {"a.txt": b"x\n"},
            ["clip_tokens=0"],
            "clip_tokens must be >= 1",
            id="text-clip-tokens-0",
        ),
        pytest.param(
            "text",
            {"a.txt": b"x\n"},
            ["field="],
            "field must name the jsonl field",
            id="text-empty-field",
        ),
        pytest.param(
            "fsdd",
            {"recordings/1_a_5.wav": GOOD_WAV},
            ["render.height=4"],
            "frame size must be between 8 and 1024",
            id="render-height-4",
        ),
        pytest.param(
            "fsdd",
            {"recordings/1_a_5.wav": GOOD_WAV},
            ["render.font=/etc/hostname"],
            "not a font FreeType can load",
            id="render-font-not-a-font",
        ),
        pytest.param(
            "fsdd",
            {"recordings/1_a_5.wav": GOOD_WAV},
            ["render.audio.window_s=nan"],
            "audio.window_s must be in (0, 3600]",
            id="render-window-nan",
        ),
    ],
)
def test_bad_layouts_and_options_stop_before_any_work(
    tmp_path, capsys, builder, files, extra, message
):
    raw = tmp_path / "raw"
    raw.mkdir()
    write_files(raw, files)
    rc = main(["preprocess", builder, "--src", str(raw), "--out", str(tmp_path / "out"), *extra])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("evav preprocess: error: ") and err.count("\n") == 1, err
    assert message in err, err
    assert not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.parametrize(
    "out, message",
    [
        ("raw/out", "is inside --src"),
        ("raw", "is inside --src"),
        ("raw/recordings/deeper/still", "is inside --src"),
        ("afile", "exists and is not a folder"),
    ],
)
def test_out_inside_src_or_a_file_is_refused_before_any_work(tmp_path, capsys, out, message):
    rec = tmp_path / "raw" / "recordings"
    rec.mkdir(parents=True)
    (rec / "1_good_5.wav").write_bytes(GOOD_WAV)
    (tmp_path / "afile").write_text("x")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    for _ in range(2):  # the first run and any rerun alike
        rc = main(
            ["preprocess", "fsdd", "--src", str(tmp_path / "raw"), "--out", str(tmp_path / out)]
        )
        assert rc == 2 and message in capsys.readouterr().err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written


def test_out_beside_src_builds_and_rebuilds(tmp_path, capsys):
    rec = tmp_path / "raw" / "recordings"
    rec.mkdir(parents=True)
    (rec / "1_good_5.wav").write_bytes(GOOD_WAV)
    args = [
        "preprocess",
        "fsdd",
        "--src",
        str(tmp_path / "raw"),
        "--out",
        str(tmp_path / "raw-out"),
    ]
    assert main(args) == 0 and main(args) == 0
    assert "1 of 1 shards already done" in capsys.readouterr().out


TUBES = [
    ("good", "VIRAT_S_01/good.mp4", ""),
    ("parent-escape", "../../../../etc/passwd", "is not a relative path inside videos/train/"),
    ("absolute", "/etc/passwd", "is not a relative path inside videos/train/"),
    ("dot-dot-inside", "VIRAT_S_01/../../x.mp4", "is not a relative path inside videos/train/"),
    ("empty", "", "is not a relative path inside videos/train/"),
    ("a-number", 5, "tube path 5 is not a relative path"),
    ("nul-byte", "VIRAT_S_01/a\x00.mp4", "is not a relative path inside videos/train/"),
    ("missing-file", "VIRAT_S_01/none.mp4", "no such file"),
]


@pytest.fixture(scope="module")
def tinyvirat_build(tmp_path_factory):
    root = tmp_path_factory.mktemp("tinyvirat")
    raw = root / "raw"
    write_files(raw, {"videos/train/VIRAT_S_01/good.mp4": VIDEO_BYTES})
    tubes = [{"path": p, "label": ["activity_walking"]} for _, p, _ in TUBES]
    tubes += [{"label": ["no path"]}, "not an object"]
    (raw / "tiny_train.json").write_text(json.dumps({"tubes": tubes}))
    q, s = run_build("tinyvirat", raw, root / "out", "num_frames=2")
    return raw, q, s


@pytest.mark.parametrize("case_id, path, reason", TUBES, ids=[t[0] for t in TUBES])
def test_tinyvirat_tube_paths_never_leave_the_dataset(tinyvirat_build, case_id, path, reason):
    raw, q, s = tinyvirat_build
    n = [t[0] for t in TUBES].index(case_id)
    safe = f"{raw / 'videos' / 'train' / path}" if reason in ("", "no such file") else None
    source = safe or f"{raw / 'tiny_train.json'}:{n}"
    if not reason:
        assert source in s
    else:
        assert reason in q[source]
    assert not any("/etc/" in k for k in s)


def test_tinyvirat_tube_without_a_path_or_not_an_object(tinyvirat_build):
    raw, q, s = tinyvirat_build
    n = len(TUBES)
    assert "tube path None is not a relative path" in q[f"{raw / 'tiny_train.json'}:{n}"]
    assert "tube path not an object" in q[f"{raw / 'tiny_train.json'}:{n + 1}"]


def test_clevrer_malformed_questions_are_quarantined_one_by_one(tmp_path):
    raw = tmp_path / "raw"
    write_files(raw, {"video_validation/v/video_00001.mp4": VIDEO_BYTES})
    choice = {"choice_id": 0, "choice": "the cube", "answer": "correct"}
    questions = [
        {
            "question_id": 0,
            "question_type": "descriptive",
            "question": "what color",
            "answer": "red",
        },
        {
            "question_id": 1,
            "question_type": "descriptive",
            "question": ["a", "list"],
            "answer": "x",
        },
        "not an object",
        {
            "question_id": 3,
            "question_type": "explanatory",
            "question": "why",
            "choices": [choice, 7],
        },
        {"question_id": 4, "question_type": "descriptive", "question": 12},  # no answer: skipped
    ]
    (raw / "validation.json").write_text(json.dumps({"1": {"questions": questions}}))
    q, s = run_build("clevrer", raw, tmp_path / "out", "num_frames=2", "multiple_choice=true")
    assert set(s) == {"validation.json:1:0", "validation.json:1:3:0"}
    assert q == {
        "validation.json:1:1": "question or question_type is not a string",
        "validation.json:1:#2": "question is not an object",
        "validation.json:1:3:#1": "choice is not an object with a string choice",
    }


def test_two_workers_quarantine_exactly_what_one_worker_does(tmp_path):
    """Hostile inputs in worker processes: none dies, the shards and quarantine are the same."""
    folder = tmp_path / "raw" / "test" / "cat"
    folder.mkdir(parents=True)
    for c in IMAGES:
        c.make(folder / c.name)
    (folder / "good.png").write_bytes(encode(Image.fromarray(PIC), "PNG"))
    manifests = []
    for workers in ("1", "2"):
        out = tmp_path / f"out{workers}"
        args = ["--workers", workers, "--shard-samples", "4"]
        run_build("cifar10", tmp_path / "raw", out, *args)
        manifests.append(load_manifest(out))
    one, two = manifests
    assert [(q.source, q.reason) for q in one.quarantined] == [
        (q.source, q.reason) for q in two.quarantined
    ]
    assert len(one.quarantined) == sum(c.check is None for c in IMAGES)
    assert [sh.sha256 for sh in one.splits["test"].shards] == [
        sh.sha256 for sh in two.splits["test"].shards
    ]


# -- evav render: text and options ----------------------------------------------------------------
@pytest.mark.parametrize(
    "text, shown",
    [
        pytest.param("\U0001f600", ["U+1F600"], id="emoji"),
        pytest.param("a\U0001f600b", ["a", "U+1F600", "b"], id="emoji-inside-a-word"),
        pytest.param("\u05e9\u05dc", ["U+05E9", "U+05DC"], id="hebrew"),
        pytest.param("nul\x00", ["nul", "U+0000"], id="nul"),
        pytest.param("\ud800", ["U+D800"], id="lone-surrogate"),
        pytest.param("line\u2028break", ["line", "break"], id="u2028-is-whitespace"),
    ],
)
def test_evav_render_text_the_font_cannot_draw(tmp_path, capsys, text, shown):
    out = tmp_path / "t.png"
    assert main(["render", "--text", text, "--out", str(out)]) == 0
    frames = sheet_frames(out, len(shown))
    assert np.array_equal(frames, np.stack([TEXT.render_token(w) for w in shown]))
    assert "frames of 64x64" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        pytest.param(
            ["--frames", "0"], "--frames must be between 1 and 10000, got 0", id="frames-0"
        ),
        pytest.param(
            ["--frames", "-1"], "--frames must be between 1 and 10000, got -1", id="frames-negative"
        ),
        pytest.param(
            ["--frames", "10001"], "--frames must be between 1 and 10000", id="frames-huge"
        ),
        pytest.param(["height=0"], "frame size must be between 8 and 1024", id="height-0"),
        pytest.param(
            ["audio.sample_rate=-1"],
            "audio.sample_rate must be between 1 and 384000",
            id="sample-rate-negative",
        ),
        pytest.param(
            ["font_scale=inf"], "font_scale must be in (0, 100], got inf", id="font-scale-inf"
        ),
        pytest.param(
            ["max_token_chars=0"],
            "max_token_chars must be between 1 and 1024",
            id="max-token-chars-0",
        ),
        pytest.param(["font=/etc/hostname"], "not a font FreeType can load", id="font-not-a-font"),
        pytest.param(
            ["--kind", "audio"], "moving_square.mp4: no audio stream", id="video-as-audio"
        ),
        pytest.param(
            ["--config", "/nonexistent.yaml"],
            "config file /nonexistent.yaml: not found",
            id="missing-config",
        ),
    ],
)
def test_evav_render_bad_options_are_one_line(tmp_path, capsys, args, message):
    src = REPO / "tests" / "data" / "moving_square.mp4"
    assert main(["render", str(src), "--out", str(tmp_path / "o.png"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("evav render: error: ") and err.count("\n") == 1, err
    assert message in err, err


def test_evav_render_unwritable_out(tmp_path, capsys):
    (tmp_path / "taken.png").mkdir()  # a folder where the output should go
    assert main(["render", "--text", "hi", "--out", str(tmp_path / "taken.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"evav render: error: --out {tmp_path / 'taken.png'}: cannot write: ")
