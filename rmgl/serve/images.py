"""Uploaded images: decoded only when they are what they claim, and never too large.

Every upload is opened with Pillow restricted to a few formats (JPEG, PNG, WebP, BMP); the
header alone gives the size, so an image with more pixels than the limit (a decompression
bomb: a few kB of PNG that decode to gigabytes) is refused before any pixel is decoded.
Only then is it decoded, exactly as ``rmgl extract`` decodes a file
(:func:`rmgl.data.loading.read_image`: Pillow, then RGB), so a descriptor of an upload
equals the descriptor of the same file extracted.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from rmgl.serve.errors import RequestError

__all__ = ["FORMATS", "OPEN_FORMATS", "DecodedImage", "decode_image", "media_type"]

# Pillow format -> (file suffix, media type); MPO is a JPEG with extra pictures
FORMATS = {
    "JPEG": (".jpg", "image/jpeg"),
    "MPO": (".jpg", "image/jpeg"),
    "PNG": (".png", "image/png"),
    "WEBP": (".webp", "image/webp"),
    "BMP": (".bmp", "image/bmp"),
}
ACCEPTED = "JPEG, PNG, WebP or BMP"
Image.init()
# the decoders Pillow is asked to try (MPO comes through JPEG's); WebP only where Pillow has it
OPEN_FORMATS = tuple(name for name in ("JPEG", "PNG", "WEBP", "BMP") if name in Image.OPEN)
_MEDIA_TYPES = {suffix: media for suffix, media in FORMATS.values()}


@dataclass
class DecodedImage:
    """An upload that decoded: how messages name it, its bytes as received, the RGB image,
    its format and the file name the client gave (kept as a label, never used as a path)."""

    name: str
    data: bytes
    image: Image.Image
    format: str
    filename: str = ""

    @property
    def suffix(self) -> str:
        return FORMATS[self.format][0]


def media_type(suffix: str) -> str:
    """The media type of a stored crop's suffix (``.jpg`` -> ``image/jpeg``)."""
    return _MEDIA_TYPES.get(suffix.lower(), "application/octet-stream")


def decode_image(data: bytes, name: str, max_pixels: int, filename: str = "") -> DecodedImage:
    """Decode an upload or raise :class:`RequestError`: 400 (empty, damaged), 413 (more
    than ``max_pixels`` pixels, from the header, before decoding) or 415 (not an image of
    an accepted format). ``name`` says which upload in the messages."""
    if not data:
        raise RequestError(400, f"{name} is empty (0 bytes); upload a {ACCEPTED} image")
    try:
        with warnings.catch_warnings():
            # Pillow warns (then refuses) above its own global limit; ours is per server
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=OPEN_FORMATS)
    except Image.DecompressionBombError as err:
        raise RequestError(413, f"{name} has too many pixels ({err})") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise RequestError(415, f"{name} is not a {ACCEPTED} image") from None
    width, height = image.size
    if width < 1 or height < 1:
        raise RequestError(400, f"{name} has no pixels ({width} x {height})")
    if width * height > max_pixels:
        raise RequestError(
            413,
            f"{name} is {width} x {height} pixels, more than the limit of {max_pixels:,} "
            "(--max-pixels); send the person crop, not the whole frame",
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            rgb = image.convert("RGB")  # decodes (the first frame of an animated file)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise RequestError(400, f"{name} is a damaged {image.format} image ({err})") from None
    finally:
        image.close()
    return DecodedImage(name, data, rgb, image.format, filename)
