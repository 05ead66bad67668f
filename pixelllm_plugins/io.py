"""The one image loader: every image enters the project here, with size and pixel limits."""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import ImageTooLargeError, InvalidImageError

ImageInput = str | os.PathLike | bytes | Image.Image | np.ndarray

DEFAULT_MAX_PIXELS = int(os.environ.get("PIXELLLM_MAX_PIXELS", 64_000_000))
DEFAULT_MAX_BYTES = int(os.environ.get("PIXELLLM_MAX_IMAGE_BYTES", 50 * 1024 * 1024))


@dataclass(frozen=True)
class ImageLimits:
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_bytes: int = DEFAULT_MAX_BYTES


def _describe(source: ImageInput) -> str:
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if isinstance(source, bytes):
        return f"<{len(source)} bytes>"
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
    limits = limits or ImageLimits()
    what = _describe(source)
    if isinstance(source, Image.Image):
        _check_pixels(source.width, source.height, limits, what)
        return source.convert("RGB") if source.mode != "RGB" else source
    if isinstance(source, np.ndarray):
        array = source
        if array.ndim == 2:
            array = np.stack([array] * 3, axis=-1)
        if array.ndim != 3 or array.shape[2] not in (3, 4):
            raise InvalidImageError(f"{what}: array must be HxW, HxWx3 or HxWx4, got shape {source.shape}")
        _check_pixels(array.shape[1], array.shape[0], limits, what)
        if array.dtype != np.uint8:
            array = np.clip(array, 0, 255).astype(np.uint8)
        return Image.fromarray(array[..., :3], "RGB")
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise InvalidImageError(f"{what}: file not found; check the path")
        size = path.stat().st_size
        if size > limits.max_bytes:
            raise ImageTooLargeError(f"{what}: {size:,} bytes exceeds the limit of {limits.max_bytes:,}")
        data = path.read_bytes()
    elif isinstance(source, (bytes, bytearray)):
        data = bytes(source)
        if len(data) > limits.max_bytes:
            raise ImageTooLargeError(f"{what}: exceeds the limit of {limits.max_bytes:,} bytes")
    else:
        raise InvalidImageError(f"unsupported image input of type {type(source).__name__}; "
                                "pass a path, bytes, a PIL image or a numpy array")
    if not data:
        raise InvalidImageError(f"{what}: empty file")
    return decode_image_bytes(data, limits, what)


def decode_image_bytes(data: bytes, limits: ImageLimits, what: str = "image") -> Image.Image:
    """Decode bytes, checking the pixel count from the header before decoding any pixel."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            _check_pixels(image.width, image.height, limits, what)
            image.load()
    except (ImageTooLargeError, InvalidImageError):
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLargeError(f"{what}: refused as a decompression bomb ({exc}); downscale the image "
                                 "(the limit is PIXELLLM_MAX_PIXELS)") from exc
    except UnidentifiedImageError as exc:
        raise InvalidImageError(f"{what}: not a readable image (PNG, JPEG, WebP, BMP, TIFF, GIF)") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise InvalidImageError(f"{what}: image is truncated or corrupt ({exc})") from exc
    return image if image.mode == "RGB" else image.convert("RGB")  # convert() would copy an RGB image


def image_digest(image: Image.Image) -> str:
    """A content key for the image-embedding cache (same pixels -> same key)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{image.mode}{image.size}".encode())
    h.update(image.tobytes())
    return h.hexdigest()
