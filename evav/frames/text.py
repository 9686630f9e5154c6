"""Text -> frames: one token per frame, white on black, monospace, sized to fill the width.

Tokens are word-level by default (runs of letters/digits, and each punctuation mark alone), or
SentencePiece pieces when ``RenderSpec.tokenizer`` names a model (train one with
``evav tokenizer train``). The font size follows the paper: ``min(W * 1.65 / len(token), W)``
for a font whose advance is 0.6 em, so a token spans ~99% of the frame width. Tokens longer than
``max_token_chars`` are cut into pieces first, so no glyph shrinks below ``W * 1.65 /
max_token_chars`` pixels (about 6.6 px at 64x64) and stays legible and distinct.

Rendered token frames are cached per renderer instance (an LRU of ``cache_size`` frames); the
renderer has no other state, and the output depends only on the token and the RenderSpec.
"""

from __future__ import annotations

import re
from collections import OrderedDict

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from evav.frames.spec import RenderSpec

WORD_RE = re.compile(r"\w+|[^\w\s]", re.UNICODE)
SEPARATOR = "|"


def split_words(text: str) -> list[str]:
    """Word-level tokens: whitespace and punctuation split; every punctuation mark is a token."""
    return WORD_RE.findall(text)


class TextRenderer:
    """Renders tokens to ``(H, W, 3)`` uint8 frames for one RenderSpec, with a glyph cache."""

    def __init__(self, spec: RenderSpec | None = None, cache_size: int = 20000):
        self.spec = spec or RenderSpec()
        self.cache_size = cache_size
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._fonts: dict[float, ImageFont.FreeTypeFont] = {}
        self._sp = None
        if self.spec.tokenizer:
            import sentencepiece as spm

            self._sp = spm.SentencePieceProcessor(model_file=self.spec.tokenizer)

    # -- tokens ---------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[str]:
        """Split text into the tokens that become frames (long tokens cut into pieces)."""
        if self._sp is not None:
            pieces = [p.replace("\u2581", "") for p in self._sp.encode(text, out_type=str)]
            tokens = [p for p in pieces if p]
        else:
            tokens = split_words(text)
        n = self.spec.max_token_chars
        return [tok[i : i + n] for tok in tokens for i in range(0, len(tok), n)]

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
        if token:
            size = min(w * self.spec.font_scale / len(token), float(w))
            size = round(size * 4) / 4  # quarter-pixel steps keep the font cache small
            ImageDraw.Draw(img).text(
                (w / 2, h / 2), token, fill=255, font=self._font(size), anchor="mm"
            )
        grey = np.asarray(img)
        return np.repeat(grey[:, :, None], 3, axis=2)
