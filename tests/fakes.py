"""A deterministic fake of the PredictorProtocol, for unit tests of plugin/worker logic only.

Integration tests use the real ``Predictor`` on a ``tiny`` checkpoint instead.
"""

from __future__ import annotations

import hashlib

from pixelllm_plugins.geometry import clip_box
from pixelllm_plugins.inference.results import Detection, RegionCaption, TracedCaption, Word
from pixelllm_plugins.io import load_image


def _unit(text: str, salt: str) -> float:
    return int(hashlib.sha1(f"{salt}:{text}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


class FakePredictor:
    model_version = "fake-1"

    def __init__(self):
        self.calls: list[tuple[str, int]] = []  # (method, number of images) per call: checks batching

    def refer(self, images, texts, *, adapter=None):
        self.calls.append(("refer", len(images)))
        out = []
        for image, image_texts in zip(images, texts):
            img = load_image(image)
            w, h = img.size
            per_text = []
            for t in image_texts:
                x, y = _unit(t, "x") * w * 0.5, _unit(t, "y") * h * 0.5
                box = clip_box((x, y, x + w * 0.4, y + h * 0.4), w, h)
                per_text.append([Detection(box, round(_unit(t, "s"), 4), t, self.model_version)])
            out.append(per_text)
        return out

    def caption_regions(self, images, boxes=None, points=None, *, adapter=None, max_new_tokens=20, num_beams=1):
        self.calls.append(("caption_regions", len(images)))
        out = []
        for k, image in enumerate(images):
            w, h = load_image(image).size
            image_points = points[k] if points is not None and points[k] is not None else None
            if image_points is not None:  # a point answers with a small box around it
                out.append([RegionCaption(clip_box((x - 5, y - 5, x + 5, y + 5), w, h), f"point {i}", 0.9,
                                          self.model_version, point=(float(x), float(y)))
                            for i, (x, y) in enumerate(image_points)])
                continue
            out.append([RegionCaption(clip_box(b, w, h), f"region {i}", 0.9, self.model_version)
                        for i, b in enumerate(boxes[k] or [])])
        return out

    def caption(self, images, *, trace=True, adapter=None, max_new_tokens=40, num_beams=1, from_regions=None):
        self.calls.append(("caption", len(images)))
        out = []
        for image in images:
            w, h = load_image(image).size
            words = [Word("a", (0, 0, w / 2, h / 2), [(0, 0), (w / 2, h / 2)]),
                     Word("shape", (w / 2, h / 2, w, h), [(w / 2, h / 2), (w, h)])]
            out.append(TracedCaption("a shape", words if trace else [], 1.0, self.model_version))
        return out

    def dense_caption(self, images, *, max_regions=20, min_score=0.3, adapter=None):
        self.calls.append(("dense_caption", len(images)))
        out = []
        for image in images:
            w, h = load_image(image).size
            regions = [RegionCaption((0, 0, w / 2, h / 2), "a thing", 0.8, self.model_version),
                       RegionCaption((w / 2, h / 2, w, h), "another thing", 0.6, self.model_version)]
            out.append([r for r in regions if r.score >= min_score][:max_regions])
        return out
