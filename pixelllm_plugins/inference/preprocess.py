"""Image preprocessing shared by inference and evaluation: resize the longer side, normalise, pad."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..config import VisionConfig


@dataclass
class PreparedImage:
    pixel_values: torch.Tensor  # [3,S,S] normalised, zero padding right/bottom
    original_size: tuple[int, int]  # (W, H) of the input image
    resized_size: tuple[int, int]  # (w, h) of the image inside the canvas
    scale: float  # canvas pixels per original pixel

    def to_canvas(self, box_xyxy) -> list[float]:
        return [float(v) * self.scale for v in box_xyxy]

    def normalised_to_original(self, xy: torch.Tensor) -> torch.Tensor:
        """[..., 2k] normalised (x, y, x, y, ...) -> original-image pixels."""
        w, h = self.original_size
        factors = torch.tensor([w, h], dtype=xy.dtype, device=xy.device).repeat(xy.shape[-1] // 2)
        return xy * factors


def resize_longer_side(image: Image.Image, size: int) -> tuple[Image.Image, float]:
    w, h = image.size
    scale = size / max(w, h)
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    if new != image.size:
        image = image.resize(new, Image.BILINEAR)
    return image, scale


def prepare_image(image: Image.Image, vision: VisionConfig) -> PreparedImage:
    size = vision.image_size
    resized, scale = resize_longer_side(image, size)
    array = np.asarray(resized, dtype=np.float32) / 255.0
    mean = np.asarray(vision.pixel_mean, dtype=np.float32)
    std = np.asarray(vision.pixel_std, dtype=np.float32)
    array = (array - mean) / std
    canvas = torch.zeros(3, size, size)
    h, w = array.shape[:2]
    canvas[:, :h, :w] = torch.from_numpy(array).permute(2, 0, 1)
    return PreparedImage(canvas, image.size, (w, h), scale)
