"""Generated test scenes: a few coloured shapes per image with known boxes and referring expressions."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
from fakes import FakePredictor
from PIL import Image, ImageDraw

COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square")


def make_scenes(out_dir: Path, n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    scenes = []
    for i in range(n):
        w, h = rng.choice([(160, 120), (128, 128), (200, 140)])
        image = Image.new("RGB", (w, h), (235, 235, 225))
        draw = ImageDraw.Draw(image)
        objects, taken = [], []
        for color in rng.sample(sorted(COLORS), 2):
            shape = rng.choice(SHAPES)
            for _ in range(50):
                s = rng.randint(24, 48)
                x1, y1 = rng.randint(0, w - s - 1), rng.randint(0, h - s - 1)
                box = (x1, y1, x1 + s, y1 + s)
                if all(box[2] <= t[0] or box[0] >= t[2] or box[3] <= t[1] or box[1] >= t[3] for t in taken):
                    break
            taken.append(box)
            (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLORS[color])
            objects.append({"label": f"{color} {shape}", "box": box, "expression": f"the {color} {shape}"})
        path = out_dir / f"scene_{i:03d}.png"
        image.save(path)
        scenes.append({"filepath": str(path), "size": (w, h), "objects": objects})
    return scenes


def build_dataset(scenes: list[dict], name: str):
    import fiftyone as fo

    ds = fo.Dataset(name)
    samples = []
    for sc in scenes:
        w, h = sc["size"]
        dets = [fo.Detection(label=o["label"],
                             bounding_box=[o["box"][0] / w, o["box"][1] / h, (o["box"][2] - o["box"][0]) / w,
                                           (o["box"][3] - o["box"][1]) / h])
                for o in sc["objects"]]
        samples.append(fo.Sample(filepath=sc["filepath"], ground_truth=fo.Detections(detections=dets),
                                 refexp=sc["objects"][0]["expression"]))
    ds.add_samples(samples)
    return ds


class OraclePredictor:
    """A PredictorProtocol that answers from the scenes' ground truth (exact boxes, label captions).

    Lets a test check written labels against the ground truth through every conversion, and gives the App
    screenshot meaningful boxes, captions and word traces.
    """

    model_version = "oracle-1"

    def __init__(self, scenes: list[dict]):
        from pixelllm_plugins.io import image_digest, load_image

        self._digest, self._load = image_digest, load_image
        self.by_digest = {image_digest(load_image(sc["filepath"])): sc for sc in scenes}
        self.calls: list[tuple[str, int]] = []

    def _scene(self, image) -> dict:
        return self.by_digest[self._digest(self._load(image))]

    def refer(self, images, texts, *, adapter=None):
        from pixelllm_plugins.inference.results import Detection

        self.calls.append(("refer", len(images)))
        out = []
        for image, image_texts in zip(images, texts):
            objects = self._scene(image)["objects"]
            per_text = []
            for t in image_texts:
                match = next((o for o in objects if o["expression"] == t or o["label"] in t), objects[0])
                per_text.append([Detection(tuple(map(float, match["box"])), 0.99, t, self.model_version)])
            out.append(per_text)
        return out

    def caption_regions(self, images, boxes, *, adapter=None, max_new_tokens=20, num_beams=1):
        from pixelllm_plugins.geometry import iou
        from pixelllm_plugins.inference.results import RegionCaption

        self.calls.append(("caption_regions", len(images)))
        out = []
        for image, image_boxes in zip(images, boxes):
            objects = self._scene(image)["objects"]
            out.append([RegionCaption(tuple(b), f"a {max(objects, key=lambda o: iou(o['box'], b))['label']}", 0.95,
                                      self.model_version) for b in image_boxes])
        return out

    def caption(self, images, *, trace=True, adapter=None, max_new_tokens=40, num_beams=1, from_regions=None):
        from pixelllm_plugins.inference.results import TracedCaption, Word

        self.calls.append(("caption", len(images)))
        out = []
        for image in images:
            a, b = self._scene(image)["objects"][:2]
            words = []
            for obj, text in ((a, f"a {a['label']}"), (None, "and"), (b, f"a {b['label']}")):
                if obj is None:
                    x1 = (a["box"][0] + b["box"][0]) / 2
                    y1 = (a["box"][1] + b["box"][1]) / 2
                    box = (x1, y1, x1 + 4, y1 + 4)
                else:
                    box = tuple(map(float, obj["box"]))
                words += [Word(w, box, [box[:2], box[2:]]) for w in text.split()]
            text = " ".join(w.text for w in words)
            out.append(TracedCaption(text, words if trace else [], 0.9, self.model_version))
        return out

    def segment(self, images, texts=None, boxes=None, points=None, point_labels=None, *, adapter=None):
        """The object's own shape (circle or square) as the mask: for a text, the object it names; for a box,
        the object it overlaps most; for a point, the object under it."""
        from PIL import Image, ImageDraw

        from pixelllm_plugins.geometry import iou

        self.calls.append(("segment", len(images)))
        out = []
        for i, (image, (kind, prompts)) in enumerate(zip(images, _segment_prompts(images, texts, boxes, points))):
            scene = self._scene(image)
            w, h = scene["size"]
            results = []
            for j, p in enumerate(prompts):
                if kind == "texts":
                    obj = next((o for o in scene["objects"] if o["expression"] == p or o["label"] in p),
                               scene["objects"][0])
                elif kind == "boxes":
                    obj = max(scene["objects"], key=lambda o: iou(o["box"], p))
                else:
                    x, y = _check_point(i, j, p, w, h)
                    obj = min(scene["objects"], key=lambda o: abs((o["box"][0] + o["box"][2]) / 2 - x)
                              + abs((o["box"][1] + o["box"][3]) / 2 - y))
                canvas = Image.new("L", (w, h), 0)
                x1, y1, x2, y2 = obj["box"]
                draw = ImageDraw.Draw(canvas)
                (draw.ellipse if obj["label"].endswith("circle") else draw.rectangle)(obj["box"], fill=255)
                if obj["label"].endswith("square"):  # squares get a round hole: masks with holes in the App
                    cx, cy, r = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 5
                    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=0)
                mask = np.asarray(canvas) > 127
                results.append(_mask_result(mask, obj["box"], 0.97, p if kind == "texts" else None,
                                            self.model_version))
            out.append(results)
        return out

    def dense_caption(self, images, *, max_regions=20, min_score=0.3, adapter=None):
        from pixelllm_plugins.inference.results import RegionCaption

        self.calls.append(("dense_caption", len(images)))
        return [[RegionCaption(tuple(map(float, o["box"])), f"a {o['label']} on a plain background", 0.9,
                               self.model_version) for o in self._scene(image)["objects"]][:max_regions]
                for image in images]


def ring_mask(width: int, height: int, box) -> np.ndarray:
    """A boolean mask: the box filled, with a hole (a third of its size) in the middle: masks with holes."""

    x1, y1, x2, y2 = (int(round(v)) for v in box)
    m = np.zeros((height, width), bool)
    m[y1:y2, x1:x2] = True
    hw, hh = max(1, (x2 - x1) // 3), max(1, (y2 - y1) // 3)
    if x2 - x1 >= 6 and y2 - y1 >= 6:
        m[y1 + hh:y2 - hh, x1 + hw:x2 - hw] = False
    return m


def _mask_result(mask, box, score, text, version):
    from pixelllm_plugins.inference.results import MaskResult
    from pixelllm_plugins.masks import mask_to_polygons, mask_to_rle

    return MaskResult(tuple(float(v) for v in box), float(score), mask_to_rle(mask), mask_to_polygons(mask), 0.9,
                      text, version)


def _segment_prompts(images, texts, boxes, points):
    """Per image: (kind, its prompts); as the real predictor, exactly one kind per image."""
    out = []
    for i in range(len(images)):
        given = [(k, v[i]) for k, v in (("texts", texts), ("boxes", boxes), ("points", points))
                 if v is not None and v[i] is not None]
        if len(given) != 1:
            from pixelllm_plugins.errors import InvalidPromptError

            raise InvalidPromptError(f"image {i}: segment needs exactly one of texts, boxes or points")
        out.append(given[0])
    return out


def _check_point(i, j, p, w, h):
    from pixelllm_plugins.errors import InvalidPromptError

    x, y = float(p[0]), float(p[1])
    if not (0 <= x <= w and 0 <= y <= h):  # NaN fails here too
        raise InvalidPromptError(f"image {i} point {j}: ({x:g}, {y:g}) lies outside the {w}x{h} image")
    return x, y


class SegmentingFake(FakePredictor):
    """``FakePredictor`` plus ``segment``: every prompt gets a ring mask (a filled box with a hole), from the
    text's fake box, the box itself, or a 20 px box around the point."""

    def segment(self, images, texts=None, boxes=None, points=None, point_labels=None, *, adapter=None):
        from pixelllm_plugins.geometry import clip_box
        from pixelllm_plugins.io import load_image

        self.calls.append(("segment", len(images)))
        out = []
        for i, (image, (kind, prompts)) in enumerate(zip(images, _segment_prompts(images, texts, boxes, points))):
            w, h = load_image(image).size
            results = []
            if kind == "texts":
                for t, (d,) in zip(prompts, FakePredictor.refer(self, [image], [list(prompts)])[0]):
                    results.append(_mask_result(ring_mask(w, h, d.box_xyxy), d.box_xyxy, d.score, t,
                                                self.model_version))
                self.calls.pop()  # the refer call above is part of this one
            elif kind == "boxes":
                for b in prompts:
                    b = clip_box(b, w, h)
                    results.append(_mask_result(ring_mask(w, h, b), b, 0.8, None, self.model_version))
            else:
                for j, p in enumerate(prompts):
                    x, y = _check_point(i, j, p, w, h)
                    b = clip_box((x - 10, y - 10, x + 10, y + 10), w, h)
                    results.append(_mask_result(ring_mask(w, h, b), b, 0.7, None, self.model_version))
            out.append(results)
        return out
