"""The one image loader: every image enters the project here, with size and pixel limits."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import math
import os
import struct
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .bounds import from_env
from .errors import ImageTooLargeError, InvalidImageError


@dataclass(frozen=True)
class EncodedImage:
    """An image file's bytes, checked from the header but not decoded (``open_encoded``).

    Whoever needs the pixels decodes them: the Predictor, at a reduced scale for a large JPEG, or a
    worker, to which ``RemotePredictor`` sends the bytes as they are instead of re-encoding a PNG.
    """

    data: bytes
    size: tuple[int, int]  # (width, height), read from the header
    format: str = ""
    what: str = "image"
    mode: str = ""  # PIL's mode from the header ("RGB", "RGBA", "1", "I;16", ...)

    @functools.cached_property
    def orientation(self) -> int:
        """The EXIF orientation tag (1: stored upright; 0: unreadable), which the loader does not apply. Read
        on first use, not by ``open_encoded``: a PNG's EXIF may follow its pixels, so reading it decodes them."""
        try:
            with Image.open(io.BytesIO(self.data), formats=IMAGE_FORMATS) as image:
                return int(image.getexif().get(0x0112, 1))
        except (OSError, SyntaxError, ValueError, struct.error):
            return 0

    @property
    def decode_bytes(self) -> int:
        """Memory that decoding it takes at peak: see ``decode_cost``."""
        return decode_cost(self.size, self.mode)

    @property
    def width(self) -> int:
        return self.size[0]

    @property
    def height(self) -> int:
        return self.size[1]

    def __repr__(self) -> str:  # never dumps the bytes
        return f"EncodedImage({self.what}, {self.format or '?'} {self.size[0]}x{self.size[1]}, {len(self.data):,} bytes)"


ImageInput = str | os.PathLike | bytes | EncodedImage | Image.Image | np.ndarray

# Formats the loader opens; anything else PIL knows (EPS through Ghostscript, PSD, ICNS, ...) is refused.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF")

DEFAULT_MAX_PIXELS = 64_000_000
DEFAULT_MAX_BYTES = 50 * 1024 * 1024


def env_max_pixels() -> int:
    """``PIXELLLM_MAX_PIXELS`` (checked: ``bounds.from_env``), else :data:`DEFAULT_MAX_PIXELS`."""
    return int(from_env("PIXELLLM_MAX_PIXELS", "max_pixels", DEFAULT_MAX_PIXELS))


def env_max_bytes() -> int:
    """``PIXELLLM_MAX_IMAGE_BYTES`` (checked: ``bounds.from_env``), else :data:`DEFAULT_MAX_BYTES`."""
    return int(from_env("PIXELLLM_MAX_IMAGE_BYTES", "max_image_bytes", DEFAULT_MAX_BYTES))


@dataclass(frozen=True)
class ImageLimits:
    """Pixels and bytes one image may have; by default the environment's (read when a limit is made)."""

    max_pixels: int = field(default_factory=env_max_pixels)
    max_bytes: int = field(default_factory=env_max_bytes)


def _describe(source: ImageInput) -> str:
    if isinstance(source, EncodedImage):
        return source.what
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if isinstance(source, bytes):
        return f"image of {len(source):,} bytes"
    return f"<{type(source).__name__}>"


def _check_pixels(width: int, height: int, limits: ImageLimits, what: str) -> None:
    if width * height > limits.max_pixels:
        raise ImageTooLargeError(
            f"{what}: {width}x{height} = {width * height:,} pixels exceeds the limit of "
            f"{limits.max_pixels:,}; downscale the image or raise PIXELLLM_MAX_PIXELS"
        )
    if width < 1 or height < 1:
        raise InvalidImageError(f"{what}: image has no pixels ({width}x{height})")


def load_image(source: ImageInput, limits: ImageLimits | None = None) -> Image.Image:
    """Load an image as RGB, refusing missing, truncated, non-image or oversized input."""
    return load_image_scaled(source, limits)[0]


def load_image_scaled(source: ImageInput, limits: ImageLimits | None = None,
                      min_side: int | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """``load_image`` for a consumer that shrinks the image until its longer side is ``min_side``.

    A JPEG file is then decoded with libjpeg's DCT scaling at the smallest scale (1/2, 1/4 or 1/8) that
    still gives at least that many pixels per side: a 1600x1200 photo going to 384 px decodes about 5x
    faster. Returns the image and the original (width, height), the size boxes are given in.
    """
    limits = limits or ImageLimits()
    what = _describe(source)
    if isinstance(source, Image.Image):
        _check_pixels(source.width, source.height, limits, what)
        return (source.convert("RGB") if source.mode != "RGB" else source), source.size
    if isinstance(source, np.ndarray):
        array = source
        if array.ndim == 2:
            array = np.stack([array] * 3, axis=-1)
        if array.ndim != 3 or array.shape[2] not in (3, 4):
            raise InvalidImageError(f"{what}: array must be HxW, HxWx3 or HxWx4, got shape {source.shape}")
        _check_pixels(array.shape[1], array.shape[0], limits, what)
        if array.dtype != np.uint8:
            array = np.clip(array, 0, 255).astype(np.uint8)
        return Image.fromarray(array[..., :3], "RGB"), (array.shape[1], array.shape[0])
    return decode_image_scaled(read_image_bytes(source, limits), limits, what, min_side)


def read_image_bytes(source: ImageInput, limits: ImageLimits | None = None) -> bytes:
    """The bytes of a path, bytes or ``EncodedImage`` input, within the byte limit (nothing decoded)."""
    limits = limits or ImageLimits()
    what = _describe(source)
    if isinstance(source, EncodedImage):
        data = source.data
    elif isinstance(source, (str, os.PathLike)):
        data = _read_file(Path(source), limits, what)
    elif isinstance(source, (bytes, bytearray)):
        data = bytes(source)
    else:
        raise InvalidImageError(f"unsupported image input of type {type(source).__name__}; "
                                "pass a path, bytes, a PIL image or a numpy array")
    if len(data) > limits.max_bytes:
        raise ImageTooLargeError(f"{what}: {len(data):,} bytes exceeds the limit of {limits.max_bytes:,} bytes")
    if not data:
        raise InvalidImageError(f"{what}: empty file")
    return data


def _read_file(path: Path, limits: ImageLimits, what: str) -> bytes:
    try:
        if path.is_dir():
            raise InvalidImageError(f"{what} is a folder, not an image file")
        if not path.is_file():
            if os.path.lexists(path):  # there, but a device, a pipe, a socket or a link that leads nowhere
                raise InvalidImageError(f"{what} is not a regular file (a device, pipe or broken or looping "
                                        "link); give an image file")
            raise InvalidImageError(f"{what}: file not found; check the path")
        size = path.stat().st_size
        if size > limits.max_bytes:
            raise ImageTooLargeError(f"{what}: {size:,} bytes exceeds the limit of {limits.max_bytes:,}")
        return path.read_bytes()
    except (OSError, ValueError) as exc:  # a name too long, no permission, a NUL in the path ...
        reason = getattr(exc, "strerror", None) or type(exc).__name__
        raise InvalidImageError(f"{what}: cannot read the file ({reason})") from None


def open_encoded(source: str | os.PathLike | bytes, limits: ImageLimits | None = None,
                 what: str | None = None) -> EncodedImage:
    """Read an image file's bytes and check its header (a known format, within the pixel limit) without
    decoding any pixel. A truncated body is found later, by whoever decodes it."""
    limits = limits or ImageLimits()
    what = what or _describe(source)
    data = read_image_bytes(source, limits)
    with _decoding(what), Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
        size, fmt, mode = image.size, image.format or "", image.mode
        _check_pixels(size[0], size[1], limits, what)
    return EncodedImage(data, size, fmt, what, mode)


def decode_cost(size: tuple[int, int], mode: str = "") -> int:
    """Bytes of memory decoding an image of this size and PIL mode takes at peak: the decoded pixels in the
    file's own mode plus the RGB copy the model gets. PIL keeps 1-bit, L and P pixels in one byte, 16-bit
    grey in two and every other mode (RGB included) in four, so a tiny PNG of a huge canvas costs as much
    as a photo of it: an 8000x8000 1-bit PNG of 8 KB takes 61 MiB decoded plus 244 MiB for its RGB copy."""
    pixels = size[0] * size[1]
    own = 1 if mode in ("1", "L", "P") else 2 if mode.startswith("I;16") else 4
    return pixels * (own + (0 if mode == "RGB" else 4))


def decode_image_bytes(data: bytes, limits: ImageLimits, what: str = "image") -> Image.Image:
    """Decode bytes, checking the pixel count from the header before decoding any pixel."""
    return decode_image_scaled(data, limits, what)[0]


def decode_image_scaled(data: bytes, limits: ImageLimits, what: str = "image",
                        min_side: int | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """``decode_image_bytes`` with the JPEG scaling of ``load_image_scaled``: (image, original size)."""
    with _decoding(what):
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
        original = image.size
        _check_pixels(image.width, image.height, limits, what)
        if min_side and image.format == "JPEG" and max(original) > 2 * min_side:
            f = min_side / max(original)  # draft keeps each side >= the size asked for
            image.draft(None, (math.ceil(original[0] * f), math.ceil(original[1] * f)))
        image.load()
    return (image if image.mode == "RGB" else image.convert("RGB")), original  # convert() copies even RGB


@contextlib.contextmanager
def _decoding(what: str) -> Iterator[None]:
    """Turn PIL's errors while opening or decoding into the project's, with a message that says what to do."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except (ImageTooLargeError, InvalidImageError):
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLargeError(f"{what}: refused as a decompression bomb ({exc}); downscale the image "
                                 "(the limit is PIXELLLM_MAX_PIXELS)") from exc
    except UnidentifiedImageError as exc:
        raise InvalidImageError(f"{what}: not a readable image (PNG, JPEG, WebP, BMP, TIFF, GIF)") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise InvalidImageError(f"{what}: image is truncated or corrupt ({exc})") from exc


def image_digest(image: Image.Image) -> str:
    """A content key for the image-embedding cache (same pixels -> same key)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{image.mode}{image.size}".encode())
    h.update(image.tobytes())
    return h.hexdigest()
