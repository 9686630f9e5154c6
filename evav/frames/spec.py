"""RenderSpec: everything that decides how inputs become pixels, and its stable hash.

The hash travels with every shard, checkpoint and evaluation result, so a model is never fed
frames rendered differently from those it was trained on. It covers the *content* of the font
and tokenizer files (not their paths), so moving a file keeps the hash and editing it changes it.
It also covers ``RENDERER_VERSION``, bumped whenever the same input and fields give other pixels.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

BUNDLED_FONT = Path(__file__).with_name("fonts") / "DejaVuSansMono.ttf"
# 2: characters the font lacks drawn as code points; EXIF orientation, 16-bit greyscale,
# transparency over black; mp4 display matrices applied; silence drawn black.
RENDERER_VERSION = 2


@dataclass(frozen=True)
class AudioSpec:
    """Log-mel spectrogram parameters. Audio is resampled to ``sample_rate`` before the STFT."""

    sample_rate: int = 16000
    n_fft: int = 512
    hop_length: int = 128
    n_mels: int = 64
    f_min: float = 0.0
    f_max: float | None = None  # None: sample_rate / 2
    top_db: float = 80.0  # dynamic range kept below each clip's peak, mapped to [0, 255]
    window_s: float | None = None  # None: whole clip -> one frame (paper); else seconds per frame

    def __post_init__(self):
        for name, hi in (
            ("sample_rate", 384_000),
            ("n_fft", 65_536),
            ("hop_length", 65_536),
            ("n_mels", 4096),
        ):
            if not 1 <= getattr(self, name) <= hi:
                raise ValueError(
                    f"audio.{name} must be between 1 and {hi}, got {getattr(self, name)}"
                )
        f_max = self.f_max if self.f_max is not None else self.sample_rate / 2
        if not 0 <= self.f_min < f_max <= self.sample_rate / 2:  # False for NaN too
            raise ValueError(
                f"audio: need 0 <= f_min < f_max <= sample_rate/2, got {self.f_min}, {f_max}"
            )
        if not 0 < self.top_db <= 200:
            raise ValueError(f"audio.top_db must be in (0, 200] dB, got {self.top_db}")
        if self.window_s is not None and not 0 < self.window_s <= 3600:
            raise ValueError(
                f"audio.window_s must be in (0, 3600] s (or null for one frame per clip), "
                f"got {self.window_s}"
            )


@dataclass(frozen=True)
class RenderSpec:
    """How every modality is rendered into ``(T, height, width, 3)`` uint8 frames."""

    height: int = 64
    width: int = 64
    font: str | None = None  # a TrueType file; None: the bundled DejaVu Sans Mono
    font_scale: float = 1.65  # paper: font size = min(width * 1.65 / len(token), width)
    tokenizer: str | None = None  # None: word-level; else a SentencePiece .model file
    max_token_chars: int = 16  # longer tokens are cut into pieces of this many characters
    fit: Literal["stretch", "letterbox", "crop"] = "stretch"  # images and video frames
    audio: AudioSpec = field(default_factory=AudioSpec)

    def __post_init__(self):
        if not (8 <= self.height <= 1024 and 8 <= self.width <= 1024):
            raise ValueError(
                f"frame size must be between 8 and 1024 pixels, got {self.height}x{self.width}"
            )
        if not 1 <= self.max_token_chars <= 1024:
            raise ValueError(
                f"max_token_chars must be between 1 and 1024, got {self.max_token_chars}"
            )
        if not 0 < self.font_scale <= 100:  # False for NaN too
            raise ValueError(f"font_scale must be in (0, 100], got {self.font_scale}")
        if self.font is not None and not Path(self.font).is_file():
            raise ValueError(f"font file {self.font}: not found")
        if self.tokenizer is not None and not Path(self.tokenizer).is_file():
            raise ValueError(f"tokenizer model {self.tokenizer}: not found")

    @property
    def font_path(self) -> Path:
        return Path(self.font) if self.font else BUNDLED_FONT

    def identity(self) -> dict:
        """The hashed content: every field, with files replaced by the sha256 of their bytes."""
        from evav.config import to_dict

        d = to_dict(self)
        d["font"] = file_sha256(self.font_path)
        d["tokenizer"] = file_sha256(self.tokenizer) if self.tokenizer else None
        d["renderer_version"] = RENDERER_VERSION
        return d

    @functools.cached_property
    def hash(self) -> str:
        """A short stable hash (16 hex chars) of ``identity()``."""
        blob = json.dumps(self.identity(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, cached per (path, size, mtime)."""
    st = Path(path).stat()
    return _sha256_cached(str(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
