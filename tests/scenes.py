"""Small drawn images for tests that need a picture but not the generator."""

from __future__ import annotations

from PIL import Image, ImageDraw


def make_scene(path=None, size=(160, 120), seed=0) -> Image.Image:
    """A red circle and a blue square on grey: enough for shape/size checks without the generator."""
    image = Image.new("RGB", size, (128, 128, 128))
    draw = ImageDraw.Draw(image)
    w, h = size
    draw.ellipse((0.1 * w, 0.2 * h, 0.4 * w, 0.6 * h), fill=(220, 30, 30))
    draw.rectangle((0.55 * w, 0.3 * h, 0.9 * w, 0.8 * h), fill=(30, 30, 220 - seed % 50))
    if path is not None:
        image.save(path)
    return image
