"""Image preprocessing shared by inference and evaluation: resize the longer side, normalise, pad."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..config import VisionConfig
from ..io import image_digest


@dataclass
class PreparedImage:
    pixel_values: torch.Tensor  # [3,S,S] normalised, zero padding right/bottom
    original_size: tuple[int, int]  # (W, H) of the input image
    resized_size: tuple[int, int]  # (w, h) of the image inside the canvas
    scale: float  # canvas pixels per original pixel

    def __reduce__(self):
        # pickled as numpy (raw bytes): a torch tensor pickles through torch.save, far slower, and the
        # worker sends every prepared image to its model process
        return _prepared_from_numpy, (self.pixel_values.numpy(), self.original_size, self.resized_size, self.scale)

    def to_canvas(self, box_xyxy) -> list[float]:
        return [float(v) * self.scale for v in box_xyxy]

    def normalised_to_original(self, xy: torch.Tensor) -> torch.Tensor:
        """[..., 2k] normalised (x, y, x, y, ...) -> original-image pixels."""
        w, h = self.original_size
        factors = torch.tensor([w, h], dtype=xy.dtype, device=xy.device).repeat(xy.shape[-1] // 2)
        return xy * factors


def _prepared_from_numpy(pixels: np.ndarray, original_size, resized_size, scale) -> PreparedImage:
    return PreparedImage(torch.from_numpy(pixels), tuple(original_size), tuple(resized_size), scale)


def resize_longer_side(image: Image.Image, size: int, original_size: tuple[int, int] | None = None
                       ) -> tuple[Image.Image, float, float]:
    """Resize so the longer side is ``size`` -> (image, x scale, y scale). Training and inference share it.

    ``original_size``: the size the image had before a reduced decode (``io.load_image_scaled``); the
    output size and the scales are then those of the original, so boxes keep their meaning.
    """
    w, h = original_size or image.size
    f = size / max(w, h)
    new = (max(1, round(w * f)), max(1, round(h * f)))
    resized = image if new == image.size else image.resize(new, Image.BILINEAR)
    return resized, new[0] / w, new[1] / h


def normalise_and_pad(image: Image.Image, size: int, vision: VisionConfig) -> torch.Tensor:
    """RGB image (already resized) -> [3,size,size] normalised tensor, zero padding right/bottom."""
    arr = np.asarray(image, dtype=np.float32)  # numpy: cheaper than torch ops on small arrays
    mean = np.asarray(vision.pixel_mean, dtype=np.float32) * 255.0
    inv_std = 1.0 / (np.asarray(vision.pixel_std, dtype=np.float32) * 255.0)
    out = np.zeros((size, size, 3), dtype=np.float32)
    out[: arr.shape[0], : arr.shape[1]] = (arr - mean) * inv_std
    return torch.from_numpy(out.transpose(2, 0, 1).copy())


def prepare_image(image: Image.Image, vision: VisionConfig) -> PreparedImage:
    return prepare_image_keyed(image, vision, key=False)[0]


def prepare_image_keyed(image: Image.Image, vision: VisionConfig, *, key: bool = True,
                        original_size: tuple[int, int] | None = None) -> tuple[PreparedImage, str | None]:
    """``prepare_image`` and a content key of what the model will see (the resized pixels): the same model
    input gets the same key, and hashing it is cheaper than hashing the original (for a 12-megapixel photo,
    about 1/100 of the bytes). ``original_size``: see ``resize_longer_side``."""
    original = tuple(original_size or image.size)
    resized, sx, _ = resize_longer_side(image, vision.image_size, original)
    prepared = PreparedImage(normalise_and_pad(resized, vision.image_size, vision), original, resized.size, sx)
    return prepared, image_digest(resized) if key else None
