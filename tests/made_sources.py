"""Made stand-ins for the real raw datasets, so that loader tests run without ../shared/datasets.

``make_sources(root)`` writes, under ``root``, small raw folders in the official layouts that
the real builders read, and returns them by the name of the folder in ../shared/datasets:

- ``fsdd``: ``recordings/{digit}_synth_{take}.wav``, 4 train takes (5-8) of each digit (40 in
  the train split), each a 0.4 s tone whose pitch depends on the digit and the take;
- ``sst2``: ``train.tsv`` (60 rows) and ``dev.tsv`` (12), sentences of 1 to 12 words from a
  small vocabulary (so clips of 4 to 15 frames, some longer than 8), labels 0 and 1 alternately;
- ``videos``: 6 H.264 ``.mp4`` files of 16 frames (96x128), a coloured square moving over a
  gradient, a different colour and path in each.

The ``raw_sources`` fixture (tests/conftest.py) gives these ("made") and, when the real datasets
are present, the real folders ("real"): a test that takes it runs on both, and on the made ones
alone without ../shared. The made data are deterministic, not realistic: tests on them check the
loader's mechanics (shapes, masks, mixing, resume, bad data), not what real data looks like.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

WORDS = ["the", "film", "is", "good", "bad", "very", "not", "a", "story", "of", "fun", "dull"]


def _wav(samples: np.ndarray, rate: int = 8000) -> bytes:
    """A 16-bit mono PCM RIFF WAV file."""
    body = np.clip(np.round(samples * 32767), -32768, 32767).astype("<i2").tobytes()
    fmt = struct.pack("<HHIIHH", 1, 1, rate, rate * 2, 2, 16)
    return (
        b"RIFF"
        + struct.pack("<I", 4 + 8 + len(fmt) + 8 + len(body))
        + b"WAVE"
        + b"fmt "
        + struct.pack("<I", len(fmt))
        + fmt
        + b"data"
        + struct.pack("<I", len(body))
        + body
    )


def _mp4(path: Path, frames: list[np.ndarray], fps: int = 8) -> None:
    import av

    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=fps)
        s.height, s.width = frames[0].shape[:2]
        s.pix_fmt = "yuv420p"
        for f in frames:
            c.mux(s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        c.mux(s.encode(None))


def make_fsdd(root: Path) -> Path:
    rec = root / "recordings"
    rec.mkdir(parents=True)
    t = np.arange(3200) / 8000  # 0.4 s at 8 kHz
    for digit in range(10):
        for take in range(5, 9):  # takes 0-4 are FSDD's test split
            hz = 300 * 2 ** ((digit + take / 4) / 4)
            (rec / f"{digit}_synth_{take}.wav").write_bytes(_wav(0.5 * np.sin(2 * np.pi * hz * t)))
    return root


def make_sst2(root: Path) -> Path:
    root.mkdir(parents=True)
    for name, rows, offset in (("train.tsv", 60, 0), ("dev.tsv", 12, 5)):
        lines = ["sentence\tlabel"]
        for n in range(rows):
            length = 1 + (n * 5 + offset) % 12
            words = [WORDS[(n + 3 * i + offset) % len(WORDS)] for i in range(length)]
            lines.append(f"{' '.join(words)} \t{n % 2}")
        (root / name).write_text("\n".join(lines) + "\n")
    return root


def make_videos(root: Path, n: int = 6, frames: int = 16) -> Path:
    root.mkdir(parents=True)
    h, w = 96, 128
    ramp = np.linspace(0, 160, w, dtype=np.float32)[None, :, None]
    background = np.broadcast_to(ramp, (h, w, 3)).astype(np.uint8)
    for v in range(n):
        colour = np.array([(70 * v) % 256, 255 - 40 * v, 60 + 30 * v], np.uint8)
        clip = []
        for f in range(frames):
            img = background.copy()
            y, x = (8 + 4 * f + 7 * v) % (h - 24), (4 + 6 * f * (1 + v % 2) + 11 * v) % (w - 24)
            img[y : y + 24, x : x + 24] = colour
            clip.append(img)
        _mp4(root / f"clip_{v}.mp4", clip)
    return root


def make_sources(root: Path) -> dict[str, Path]:
    """The made raw folders under ``root``, named as in ../shared/datasets."""
    return {
        "fsdd": make_fsdd(root / "fsdd"),
        "sst2": make_sst2(root / "sst2"),
        "videos": make_videos(root / "videos"),
    }
