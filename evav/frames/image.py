"""Images -> one frame: any image Pillow reads, converted to RGB and fitted to H x W.

``fit`` (from the RenderSpec) is ``stretch`` (resize, aspect ratio not kept; the paper's choice),
``letterbox`` (keep the aspect ratio, pad with black) or ``crop`` (keep it, centre-crop).
The same fitting serves video frames.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from evav.errors import BadInputError, check_nonempty_file
from evav.frames.spec import RenderSpec


def fit_image(img: Image.Image, height: int, width: int, fit: str = "stretch") -> np.ndarray:
    """Resize a PIL image to ``(height, width, 3)`` uint8 with the given fit mode."""
    img = img.convert("RGB")
    w0, h0 = img.size
    if fit == "stretch" or (w0 * height == h0 * width):
        out = img.resize((width, height), Image.BICUBIC)
    elif fit == "crop":
        scale = max(width / w0, height / h0)
        tw, th = max(width, round(w0 * scale)), max(height, round(h0 * scale))
        img = img.resize((tw, th), Image.BICUBIC)
        left, top = (tw - width) // 2, (th - height) // 2
        out = img.crop((left, top, left + width, top + height))
    elif fit == "letterbox":
        scale = min(width / w0, height / h0)
        tw, th = max(1, round(w0 * scale)), max(1, round(h0 * scale))
        out = Image.new("RGB", (width, height), (0, 0, 0))
        out.paste(img.resize((tw, th), Image.BICUBIC), ((width - tw) // 2, (height - th) // 2))
    else:
        raise ValueError(f"unknown fit mode {fit!r}: expected stretch, letterbox or crop")
    return np.asarray(out, dtype=np.uint8)


def load_image(path: str | Path) -> Image.Image:
    """Open and fully decode an image file; BadInputError names the file and the reason."""
    path = check_nonempty_file(path)
    try:
        with Image.open(path) as img:
            img.load()
            return img.copy()
    except UnidentifiedImageError:
        raise BadInputError(
            path, "not an image Pillow can read (unknown or corrupt format)"
        ) from None
    except OSError as e:  # Pillow's truncated-file and decoder errors
        raise BadInputError(path, f"corrupt or truncated image: {e}") from None
    except Image.DecompressionBombError as e:
        raise BadInputError(path, f"image too large: {e}") from None


def render_image(image: str | Path | Image.Image | np.ndarray, spec: RenderSpec) -> np.ndarray:
    """An image file, PIL image or ``(h, w[, 3])`` uint8 array -> ``(1, H, W, 3)`` uint8."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    elif not isinstance(image, Image.Image):
        image = load_image(image)
    return fit_image(image, spec.height, spec.width, spec.fit)[None]
