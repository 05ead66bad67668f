"""Pictures of results: boxes with their text, masks, and word traces like the paper's figures."""

from __future__ import annotations

import colorsys
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

from .inference.results import Detection, MaskResult, RegionCaption, TracedCaption


def _palette(n: int) -> list[tuple[int, int, int]]:
    return [tuple(int(255 * c) for c in colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.85, 1.0))
            for i in range(max(n, 1))]


def _font(image: Image.Image) -> ImageFont.ImageFont:
    size = max(11, min(image.size) // 32)
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _label(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, color, font) -> None:
    x, y = xy
    left, top, right, bottom = draw.textbbox((x, y), text, font=font)
    if top < 0:
        y -= top
        left, top, right, bottom = draw.textbbox((x, y), text, font=font)
    draw.rectangle((left - 2, top - 1, right + 2, bottom + 1), fill=(0, 0, 0))
    draw.text((x, y), text, fill=color, font=font)


def draw_boxes(image: Image.Image, items: Sequence[Detection | RegionCaption]) -> Image.Image:
    """Boxes with their text and score (and, for a point prompt's caption, a dot at its point)."""
    canvas = image.convert("RGB").copy()
    draw = ImageDraw.Draw(canvas)
    font = _font(canvas)
    width = max(2, min(canvas.size) // 150)
    r = max(3, min(canvas.size) // 80)
    for item, color in zip(items, _palette(len(items))):
        x1, y1, x2, y2 = item.box_xyxy
        draw.rectangle((x1, y1, x2, y2), outline=color, width=width)
        point = getattr(item, "point", None)
        if point is not None:
            px, py = point
            draw.ellipse((px - r, py - r, px + r, py + r), fill=color, outline=(0, 0, 0))
        _label(draw, (x1 + 2, y1 - font.size - 4 if y1 > font.size + 4 else y1 + 2),
               f"{item.text} {item.score:.2f}", color, font)
    return canvas


def draw_masks(image: Image.Image, items: Sequence[MaskResult], alpha: int = 110) -> Image.Image:
    """Masks filled translucent (``alpha`` of 255) with their outlines, each labelled with its text (text
    prompts) and score at its box."""
    import numpy as np

    canvas = image.convert("RGB").copy()
    font = _font(canvas)
    width = max(1, min(canvas.size) // 200)
    overlay = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    odraw = ImageDraw.Draw(overlay)
    colors = _palette(len(items))
    for item, color in zip(items, colors):
        mask = item.to_mask()
        if mask.shape != (canvas.height, canvas.width):
            continue  # a mask of another image: nothing sensible to draw
        fill = Image.fromarray(np.where(mask, alpha, 0).astype(np.uint8), "L")
        overlay.paste(Image.new("RGBA", canvas.size, color + (255,)), (0, 0), fill)
        for poly in item.polygons:
            for ring in [poly["exterior"], *poly.get("holes", [])]:
                if len(ring) >= 2:
                    odraw.line([tuple(p) for p in ring] + [tuple(ring[0])], fill=color + (255,), width=width)
    canvas = Image.alpha_composite(canvas.convert("RGBA"), overlay).convert("RGB")
    draw = ImageDraw.Draw(canvas)
    for item, color in zip(items, colors):
        x1, y1 = item.box_xyxy[:2]
        label = f"{item.text} {item.score:.2f}" if item.text else f"{item.score:.2f}"
        _label(draw, (x1 + 2, y1 - font.size - 4 if y1 > font.size + 4 else y1 + 2), label, color, font)
    return canvas


def draw_trace(image: Image.Image, caption: TracedCaption) -> Image.Image:
    """Each word gets a colour, its box, and a numbered dot; a line joins the words in order.

    The caption is written under the image with each word in its colour, so a reader can match
    words to places at a glance.
    """
    base = image.convert("RGB")
    font = _font(base)
    words = caption.words
    colors = _palette(len(words))
    # room below the image for the coloured caption
    lines, line, max_w = [], [], base.width - 16
    probe = ImageDraw.Draw(base)
    for k, word in enumerate(words):
        candidate = line + [(k, word.text)]
        text = " ".join(t for _, t in candidate)
        if line and probe.textlength(text, font=font) > max_w:
            lines.append(line)
            candidate = [(k, word.text)]
        line = candidate
    if line:
        lines.append(line)
    line_h = font.size + 6
    canvas = Image.new("RGB", (base.width, base.height + line_h * max(len(lines), 1) + 8), (20, 20, 20))
    canvas.paste(base, (0, 0))
    overlay = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    odraw = ImageDraw.Draw(overlay)
    for word, color in zip(words, colors):
        odraw.rectangle(word.box_xyxy, fill=color + (40,), outline=color + (220,), width=2)
    canvas = Image.alpha_composite(canvas.convert("RGBA"), overlay).convert("RGB")
    draw = ImageDraw.Draw(canvas)
    centers = [w.center for w in words]
    if len(centers) > 1:
        draw.line(centers, fill=(255, 255, 255), width=2)
    r = max(3, min(base.size) // 80)
    for k, ((cx, cy), color) in enumerate(zip(centers, colors)):
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=color, outline=(0, 0, 0))
        draw.text((cx + r + 1, cy - r - 1), str(k + 1), fill=color, font=font)
    y = base.height + 4
    for row in lines:
        x = 8
        for k, text in row:
            draw.text((x, y), text, fill=colors[k], font=font)
            x += draw.textlength(text + " ", font=font)
        y += line_h
    return canvas
