"""Images -> one frame: any image Pillow reads, converted to RGB and fitted to H x W.

``fit`` (from the RenderSpec) is ``stretch`` (resize, aspect ratio not kept; the paper's choice),
``letterbox`` (keep the aspect ratio, pad with black) or ``crop`` (keep it, centre-crop).
The same fitting serves video frames.

What a file's pixels mean is decided here, once (preprocessing/README.md lists it per modality):

- the EXIF orientation tag is applied (a phone photo stands the way it was shot);
- 16-bit greyscale (``I;16*``, and ``I`` holding 0..65535, as 16-bit PNGs open) is scaled to
  8 bits (``round(v / 257)``), not clipped to white; 32-bit float (``F``) has no defined
  range and is refused;
- transparency (an alpha channel, or a palette's or colour's transparent entry) is composited
  over black, the frame's background, instead of showing whatever colour hides under alpha 0;
- an image of zero width or height, or of more than ``PIL.Image.MAX_IMAGE_PIXELS`` pixels (a
  decompression bomb: a few bytes that declare a gigapixel), is refused before decoding.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from evav.errors import BadInputError, check_nonempty_file
from evav.frames.spec import RenderSpec

SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}
ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow image -> mode RGB, 8 bits per channel (see the module docstring); ValueError
    for pixels without a defined range."""
    if img.mode == "RGB" and "transparency" not in img.info:
        return img
    if img.mode in SIXTEEN_BIT_MODES or img.mode == "I":
        a = np.asarray(img)
        lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)
        if lo < 0 or hi > 65535:
            raise ValueError(
                f"32-bit integer pixels in {lo}..{hi}: only 0..65535 (16-bit) is understood"
            )
        grey = ((a.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)  # round(v / 257)
        return Image.fromarray(grey, "L").convert("RGB")
    if img.mode == "F":
        raise ValueError("32-bit floating-point pixels (mode F) have no defined range")
    if img.mode in ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        black = Image.new("RGBA", img.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("RGB")
    return img.convert("RGB")


def fit_image(img: Image.Image, height: int, width: int, fit: str = "stretch") -> np.ndarray:
    """Resize a PIL image to ``(height, width, 3)`` uint8 with the given fit mode."""
    img = to_rgb(img)
    w0, h0 = img.size
    if w0 == 0 or h0 == 0:
        raise ValueError(f"cannot fit an image of zero size ({w0}x{h0})")
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


def check_image_size(width: int, height: int, path: str | Path) -> None:
    """BadInputError for a zero-size image or one over Pillow's decompression-bomb limit."""
    if width <= 0 or height <= 0:
        raise BadInputError(path, f"zero-size image ({width}x{height})")
    limit = Image.MAX_IMAGE_PIXELS
    if limit and width * height > limit:
        raise BadInputError(
            path,
            f"image too large: {width}x{height} = {width * height} pixels, more than {limit} "
            "(PIL.Image.MAX_IMAGE_PIXELS; a decompression bomb?)",
        )


IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF", "PPM")


def load_image(path: str | Path) -> Image.Image:
    """Open and fully decode an image file to RGB, upright (EXIF orientation applied);
    BadInputError names the file and the reason."""
    path = check_nonempty_file(path)
    try:
        with warnings.catch_warnings():  # between 1x and 2x the limit Pillow only warns
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            # plain raster formats only: Pillow picks the decoder from the bytes, and EPS/PS
            # would hand the file to Ghostscript (an interpreter) whatever its name says
            img = Image.open(path, formats=IMAGE_FORMATS)
        with img:
            check_image_size(img.width, img.height, path)  # before decoding a bomb
            img.load()
            upright = ImageOps.exif_transpose(img)  # a new image, rotated per its EXIF tag
        return to_rgb(upright)
    except UnidentifiedImageError:
        raise BadInputError(
            path,
            f"not an image evav reads (formats {', '.join(IMAGE_FORMATS)}; unknown or corrupt)",
        ) from None
    except Image.DecompressionBombError as e:
        raise BadInputError(path, f"image too large: {e}") from None
    except OSError as e:  # Pillow's truncated-file and decoder errors
        raise BadInputError(path, f"corrupt or truncated image: {e}") from None
    except ValueError as e:  # BadInputError passes through; to_rgb's unsupported pixels
        if isinstance(e, BadInputError):
            raise
        raise BadInputError(path, f"unsupported image: {e}") from None


def render_image(image: str | Path | Image.Image | np.ndarray, spec: RenderSpec) -> np.ndarray:
    """An image file, PIL image or ``(h, w[, 1|3|4])`` uint8 (or uint16 grey) array ->
    ``(1, H, W, 3)`` uint8."""
    if isinstance(image, np.ndarray):
        image = _from_array(image)
    elif not isinstance(image, Image.Image):
        image = load_image(image)
    return fit_image(image, spec.height, spec.width, spec.fit)[None]


def _from_array(a: np.ndarray) -> Image.Image:
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    ok = (a.dtype == np.uint8 and (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4)))) or (
        a.dtype == np.uint16 and a.ndim == 2
    )
    if not ok:
        raise ValueError(
            f"image array: expected (h, w[, 1|3|4]) uint8 or (h, w) uint16, got {a.shape} {a.dtype}"
        )
    return Image.fromarray(np.ascontiguousarray(a))
