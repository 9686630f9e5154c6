"""Text -> frames: one token per frame, white on black, monospace, sized to fill the width.

Tokens are word-level by default (runs of letters/digits, and each punctuation mark alone), or
SentencePiece pieces when ``RenderSpec.tokenizer`` names a model (train one with
``evav tokenizer train``; both need the optional extra ``pip install 'evav[sentencepiece]'``,
and say so when it is missing). The font size follows the paper: ``min(W * 1.65 / len(token), W)``
for a font whose advance is 0.6 em, so a token spans ~99% of the frame width. Tokens longer than
``max_token_chars`` are cut into pieces first, so no glyph shrinks below ``W * 1.65 /
max_token_chars`` pixels (about 6.6 px at 64x64) and stays legible and distinct.

Characters the font cannot draw (no glyph in its Unicode character map: emoji, most scripts
DejaVu Sans Mono lacks) and invisible ones (control characters, format characters such as
zero-width joiners and direction marks, lone surrogates) would all look alike (a missing-glyph
box, or nothing). Each becomes a token of its own and is drawn as its code point, ``U+1F600``:
distinct for distinct characters, deterministic, and readable. Tokens of drawable characters
(all of printable ASCII) are drawn exactly as before.

Rendered token frames are cached per renderer instance (an LRU of ``cache_size`` frames); the
renderer has no other state, and the output depends only on the token and the RenderSpec.
"""

from __future__ import annotations

import bisect
import functools
import re
import struct
import unicodedata
from collections import OrderedDict
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from evav.frames.spec import RenderSpec

WORD_RE = re.compile(r"\w+|[^\w\s]", re.UNICODE)
SEPARATOR = "|"


INVISIBLE = {"Cc", "Cf", "Cs"}  # control, format, surrogate: drawn as their code points


def split_words(text: str) -> list[str]:
    """Word-level tokens: whitespace and punctuation split; every punctuation mark is a token."""
    return WORD_RE.findall(text)


def code_point(ch: str) -> str:
    """How a character the font cannot draw is shown: ``U+1F600``."""
    return f"U+{ord(ch):04X}"


class FontCoverage:
    """The code points a TrueType/OpenType font maps to a glyph (its Unicode ``cmap``).

    Read from the file's bytes (formats 4 and 12, the Unicode subtable FreeType itself picks:
    full-range first); ValueError if the file is not a font with a Unicode character map.
    """

    def __init__(self, ranges: list[tuple[int, int]]):
        self.starts = [lo for lo, _ in ranges]
        self.ends = [hi for _, hi in ranges]

    def __contains__(self, cp: int) -> bool:
        i = bisect.bisect_right(self.starts, cp) - 1
        return i >= 0 and cp <= self.ends[i]

    @classmethod
    def of(cls, path: str | Path) -> FontCoverage:
        p = Path(path)
        st = p.stat()
        return _coverage(str(p), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _coverage(path: str, size: int, mtime_ns: int) -> FontCoverage:
    data = Path(path).read_bytes()
    try:
        return FontCoverage(_merge(_cmap_codes(data)))
    except (struct.error, IndexError, ValueError) as e:
        raise ValueError(f"font file {path}: cannot read its character map (cmap): {e}") from None


def _cmap_codes(data: bytes):
    def u16(o: int) -> int:
        return struct.unpack_from(">H", data, o)[0]

    def u32(o: int) -> int:
        return struct.unpack_from(">I", data, o)[0]

    base = u32(12) if data[:4] == b"ttcf" else 0  # a collection: its first font, as Pillow
    cmap = next(
        (
            u32(base + 12 + 16 * i + 8)
            for i in range(u16(base + 4))
            if data[base + 12 + 16 * i : base + 16 + 16 * i] == b"cmap"
        ),
        None,
    )
    if cmap is None:
        raise ValueError("no cmap table")
    subtables = {}
    for i in range(u16(cmap + 2)):
        rec = cmap + 4 + 8 * i
        subtables.setdefault((u16(rec), u16(rec + 2)), cmap + u32(rec + 4))
    for key in ((3, 10), (0, 6), (0, 4), (3, 1), (0, 3), (0, 2), (0, 1), (0, 0)):
        t = subtables.get(key)
        if t is None or u16(t) not in (4, 12):
            continue
        if u16(t) == 12:
            for g in range(u32(t + 12)):
                lo, hi, glyph = struct.unpack_from(">III", data, t + 16 + 12 * g)
                hi = min(hi, 0x10FFFF)
                if lo <= hi:
                    yield (lo + 1 if glyph == 0 else lo), hi  # glyph 0 is .notdef
            return
        segs = u16(t + 6) // 2
        ends, starts = t + 14, t + 16 + 2 * segs
        deltas, offsets = starts + 2 * segs, starts + 4 * segs
        budget = 1 << 17  # segments of a well-formed table cover each 16-bit code at most once
        for i in range(segs):
            lo, hi = u16(starts + 2 * i), u16(ends + 2 * i)
            delta, ro = u16(deltas + 2 * i), u16(offsets + 2 * i)
            budget -= max(0, min(hi, 0xFFFE) + 1 - lo)
            if budget < 0:
                raise ValueError("format 4 segments overlap far beyond 65536 codes")
            for c in range(lo, min(hi, 0xFFFE) + 1):
                if ro == 0:
                    glyph = (c + delta) & 0xFFFF
                else:
                    at = offsets + 2 * i + ro + 2 * (c - lo)
                    glyph = u16(at) if at + 2 <= len(data) else 0
                    glyph = (glyph + delta) & 0xFFFF if glyph else 0
                if glyph:
                    yield c, c
        return
    raise ValueError("no Unicode character map (format 4 or 12)")


def _merge(ranges) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return [(lo, hi) for lo, hi in out]


SENTENCEPIECE_EXTRA = "pip install 'evav[sentencepiece]'"


def import_sentencepiece(what: str):
    """The sentencepiece module (an optional extra), or ValueError naming ``what`` needs it."""
    try:
        import sentencepiece
    except ImportError:
        raise ValueError(f"{what} needs the sentencepiece package: {SENTENCEPIECE_EXTRA}") from None
    return sentencepiece


class TextRenderer:
    """Renders tokens to ``(H, W, 3)`` uint8 frames for one RenderSpec, with a glyph cache."""

    def __init__(self, spec: RenderSpec | None = None, cache_size: int = 20000):
        self.spec = spec or RenderSpec()
        self.cache_size = cache_size
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._fonts: dict[float, ImageFont.FreeTypeFont] = {}
        self._sp = None
        font = self.spec.font_path
        try:  # a bad font file fails here, once, not on every token of a build
            ImageFont.truetype(str(font), size=16)
        except OSError as e:
            raise ValueError(f"font file {font}: not a font FreeType can load ({e})") from None
        self._coverage = FontCoverage.of(font)
        self._ascii_drawable = all(ord(c) in self._coverage for c in map(chr, range(33, 127)))
        if self.spec.tokenizer:
            spm = import_sentencepiece(f"tokenizer={self.spec.tokenizer}")
            try:
                self._sp = spm.SentencePieceProcessor(model_file=self.spec.tokenizer)
            except (OSError, RuntimeError) as e:
                raise ValueError(
                    f"tokenizer model {self.spec.tokenizer}: not a SentencePiece model ({e})"
                ) from None

    # -- tokens ---------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[str]:
        """Split text into the tokens that become frames (long tokens cut into pieces)."""
        if self._sp is not None:
            pieces = [p.replace("\u2581", "") for p in self._sp.encode(text, out_type=str)]
            tokens = [p for p in pieces if p]
        else:
            tokens = split_words(text)
        n = self.spec.max_token_chars
        return [
            piece[i : i + n]
            for tok in tokens
            for piece in self._isolate(tok)
            for i in range(0, len(piece), n)
        ]

    def drawable(self, ch: str) -> bool:
        """Whether one character is drawn as itself (else as its code point, ``U+1F600``)."""
        return unicodedata.category(ch) not in INVISIBLE and ord(ch) in self._coverage

    def _plain(self, token: str) -> bool:
        if token.isascii() and token.isprintable() and self._ascii_drawable:
            return True  # the common case, without a look-up per character
        return all(self.drawable(c) for c in token)

    def _isolate(self, token: str) -> list[str]:
        """Each character that is drawn as its code point becomes a token of its own."""
        if self._plain(token):
            return [token]
        out, run = [], ""
        for ch in token:
            if self.drawable(ch):
                run += ch
            else:
                out += [run, ch] if run else [ch]
                run = ""
        return out + [run] if run else out

    def shown(self, token: str) -> str:
        """The text drawn for a token: itself, with undrawable characters as code points."""
        if self._plain(token):
            return token
        return "".join(c if self.drawable(c) else code_point(c) for c in token)

    # -- frames ---------------------------------------------------------------------------
    def render_token(self, token: str) -> np.ndarray:
        """One token -> ``(H, W, 3)`` uint8 (a read-only cached array)."""
        frame = self._cache.get(token)
        if frame is not None:
            self._cache.move_to_end(token)
            return frame
        frame = self._draw(token)
        frame.setflags(write=False)
        self._cache[token] = frame
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return frame

    def render_tokens(self, tokens: list[str]) -> np.ndarray:
        """Tokens -> ``(T, H, W, 3)`` uint8."""
        if not tokens:
            return np.zeros((0, self.spec.height, self.spec.width, 3), np.uint8)
        return np.stack([self.render_token(t) for t in tokens])

    def render_text(self, text: str) -> np.ndarray:
        """A string -> ``(T, H, W, 3)`` uint8, one frame per token."""
        return self.render_tokens(self.tokenize(text))

    def separator(self) -> np.ndarray:
        """The separator frame between question and answer: a rendered ``|``."""
        return self.render_token(SEPARATOR)

    def task_frame(self, task: str) -> np.ndarray:
        """The task name as one frame (the whole name, however long, as a single token)."""
        return self.render_token(task)

    def uncached_render_token(self, token: str) -> np.ndarray:
        """Render without touching the cache (benchmarks use it as the baseline)."""
        return self._draw(token)

    def _font(self, size: float) -> ImageFont.FreeTypeFont:
        font = self._fonts.get(size)
        if font is None:
            font = ImageFont.truetype(str(self.spec.font_path), size=size)
            self._fonts[size] = font
        return font

    def _draw(self, token: str) -> np.ndarray:
        h, w = self.spec.height, self.spec.width
        img = Image.new("L", (w, h), 0)
        token = self.shown(token)
        if token:
            size = min(w * self.spec.font_scale / len(token), float(w))
            size = round(size * 4) / 4  # quarter-pixel steps keep the font cache small
            ImageDraw.Draw(img).text(
                (w / 2, h / 2), token, fill=255, font=self._font(size), anchor="mm"
            )
        grey = np.asarray(img)
        return np.repeat(grey[:, :, None], 3, axis=2)
