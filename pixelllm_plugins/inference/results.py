"""Typed results of the Predictor. Boxes are x1,y1,x2,y2 in pixels of the original image."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..geometry import Box


def _box(values) -> Box:
    return tuple(float(v) for v in values)  # type: ignore[return-value]


@dataclass
class Detection:
    """A box found for a referring text (text -> box)."""

    box_xyxy: Box
    score: float
    text: str
    model_version: str = ""

    def to_dict(self) -> dict:
        return asdict(self) | {"box_xyxy": list(self.box_xyxy)}

    @classmethod
    def from_dict(cls, d: dict) -> Detection:
        return cls(box_xyxy=_box(d["box_xyxy"]), score=float(d["score"]), text=d["text"],
                   model_version=d.get("model_version", ""))


@dataclass
class RegionCaption:
    """A caption for a region (box -> text, point -> text, or a dense-caption proposal).

    ``point``: for a point prompt (``caption_regions(points=...)``), the ``[x, y]`` it answers, and
    ``box_xyxy`` the region the caption is of (see ``Predictor.caption_regions``); None for a box prompt
    (then absent from ``to_dict``)."""

    box_xyxy: Box
    text: str
    score: float
    model_version: str = ""
    point: tuple[float, float] | None = None

    def to_dict(self) -> dict:
        out = {"box_xyxy": list(self.box_xyxy), "text": self.text, "score": self.score,
               "model_version": self.model_version}
        if self.point is not None:
            out["point"] = [float(v) for v in self.point]
        return out

    @classmethod
    def from_dict(cls, d: dict) -> RegionCaption:
        point = d.get("point")
        return cls(box_xyxy=_box(d["box_xyxy"]), text=d["text"], score=float(d["score"]),
                   model_version=d.get("model_version", ""),
                   point=None if point is None else (float(point[0]), float(point[1])))


@dataclass
class Word:
    """One word of a traced caption and where it points: a box and its 2 predicted points."""

    text: str
    box_xyxy: Box
    points: list[tuple[float, float]]

    def to_dict(self) -> dict:
        return {"text": self.text, "box_xyxy": list(self.box_xyxy), "points": [list(p) for p in self.points]}

    @classmethod
    def from_dict(cls, d: dict) -> Word:
        return cls(text=d["text"], box_xyxy=_box(d["box_xyxy"]),
                   points=[(float(p[0]), float(p[1])) for p in d["points"]])

    @property
    def center(self) -> tuple[float, float]:
        x1, y1, x2, y2 = self.box_xyxy
        return ((x1 + x2) / 2.0, (y1 + y2) / 2.0)


@dataclass
class TracedCaption:
    """A whole-image caption whose every word carries a location."""

    text: str
    words: list[Word] = field(default_factory=list)
    score: float = 1.0
    model_version: str = ""

    def to_dict(self) -> dict:
        return {"text": self.text, "words": [w.to_dict() for w in self.words], "score": self.score,
                "model_version": self.model_version}

    @classmethod
    def from_dict(cls, d: dict) -> TracedCaption:
        return cls(text=d["text"], words=[Word.from_dict(w) for w in d.get("words", [])],
                   score=float(d.get("score", 1.0)), model_version=d.get("model_version", ""))


@dataclass
class MaskResult:
    """A mask found for a prompt (text / box / point -> mask).

    ``mask`` is COCO RLE of the original image, ``{"size": [h, w], "counts": str}``; ``polygons`` the same
    region as pixel polygons ``[{"exterior": [[x, y], ...], "holes": [...]}]`` (pixel corners, see
    :mod:`pixelllm_plugins.masks`); ``box_xyxy`` the box that was found (or prompted), ``score`` its score and
    ``mask_score`` the mask's own quality score.
    """

    box_xyxy: Box
    score: float
    mask: dict
    polygons: list[dict]
    mask_score: float
    text: str | None = None
    model_version: str = ""

    def to_dict(self) -> dict:
        counts = self.mask["counts"]
        return {"box_xyxy": list(self.box_xyxy), "score": self.score,
                "mask": {"size": [int(v) for v in self.mask["size"]],
                         "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts},
                "polygons": [{"exterior": [list(p) for p in poly["exterior"]],
                              "holes": [[list(p) for p in hole] for hole in poly.get("holes", [])]}
                             for poly in self.polygons],
                "mask_score": self.mask_score, "text": self.text, "model_version": self.model_version}

    @classmethod
    def from_dict(cls, d: dict) -> MaskResult:
        mask = d["mask"]
        counts = mask["counts"]
        return cls(box_xyxy=_box(d["box_xyxy"]), score=float(d["score"]),
                   mask={"size": [int(v) for v in mask["size"]],
                         "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts},
                   polygons=[{"exterior": [[float(v) for v in p] for p in poly["exterior"]],
                              "holes": [[[float(v) for v in p] for p in hole]
                                        for hole in poly.get("holes", [])]}
                             for poly in d.get("polygons", [])],
                   mask_score=float(d["mask_score"]), text=d.get("text"),
                   model_version=d.get("model_version", ""))

    def to_mask(self):
        """The mask as a boolean array ``[h, w]``."""
        from ..masks import rle_to_mask  # pycocotools only when masks are used

        return rle_to_mask(self.mask)
