"""Decoding image bytes with Pillow: accepted formats only, the pixel limit read from the header
before any pixel is decoded, the first frame decoded completely."""

from __future__ import annotations

import io
import re

from ..errors import ImageError
from .limits import ImageLimits, hint
from .naming import describe

#: Pillow formats accepted (``Image.open(..., formats=FORMATS)``): what chat clients send.
#: Exotic formats are not even probed (EPS, for one, would run Ghostscript). Multi-picture
#: JPEGs from phones (MPO) open through the JPEG plugin.
FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP")


def decode(data: bytes, source: str, limits: ImageLimits):
    """Image bytes → ``(RGB PIL image, Pillow format)``; the first frame fully decoded.

    The size from the header is checked against ``max_pixels`` before any pixel is decoded.
    Transparent images are composited on white (as the Hugging Face processor does).
    """
    from PIL import Image

    label = describe(source)
    too_many = f"over the {limits.max_pixels}-pixel limit (decompression-bomb guard); {hint('max_pixels')}"
    Image.init()  # registers every plugin once, so FORMATS can be named (WEBP)
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # Only raised by Pillow past its own limit (>= ours); a warning only when warnings are errors.
        raise ImageError(f"{label}: image is {_pillow_size(e)}{too_many}") from None
    except Image.UnidentifiedImageError:
        raise ImageError(
            f"{label}: not an image in an accepted format ({', '.join(FORMATS)}), or its header is cut off"
        ) from None
    except Exception as e:  # any failure on hostile bytes is the request's problem, not a 500
        raise ImageError(f"{label}: not a readable image ({type(e).__name__}: {e})") from None
    with image:
        width, height = image.size
        if width * height > limits.max_pixels:
            raise ImageError(f"{label}: image is {width}x{height} = {width * height} pixels, {too_many}")
        try:
            image.load()  # the first frame, completely: truncated data raises here
            if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
                rgba = image.convert("RGBA")
                rgb = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                rgb.alpha_composite(rgba)
                rgb = rgb.convert("RGB")
            else:
                rgb = image.convert("RGB")
        except Exception as e:
            raise ImageError(f"{label}: not a readable image, decoding failed ({type(e).__name__}: {e})") from None
        return rgb, image.format


def _pillow_size(e: BaseException) -> str:
    match = re.search(r"\((\d+) pixels\)", str(e))
    return f"{match.group(1)} pixels, " if match else ""
