"""The one sample representation every loader produces and the transforms / collate consume."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from ..errors import TrainingError
from ..io import ImageLimits, load_image

Box = tuple[float, float, float, float]
TASKS = ("refer", "trace", "region", "caption")


class AnnotationError(TrainingError):
    """An annotation file cannot be used at all (unreadable, not JSON, a required top-level field missing)."""


class AnnotationWarning(UserWarning):
    """One record of an annotation file was malformed and skipped; the rest loaded."""


@dataclass
class PromptRecord:
    """One prompt of an image: a task, its target text and its boxes.

    Frames: ``box``/``target_box`` are xyxy pixels of the sample's image (original pixels for a
    :class:`GroundedSample`, canvas pixels after a transform). ``utterance_boxes_rel`` are xyxy relative to
    that image (0..1), the way Localized Narratives stores traces. ``target_mask`` (optional) is the target's
    instance mask as COCO RLE ``{"size": [h, w], "counts": str}`` (:mod:`pixelllm_plugins.masks`): of the
    annotation's image for a :class:`GroundedSample` (its ``size`` says which; the transforms rescale it when
    the image differs), of the un-padded canvas image after a transform.
    """

    task: str  # "refer" | "trace" | "region" | "caption"
    text: str  # teacher-forced target: the expression, narrative, region caption or caption
    box: Box | None = None  # location prompt; None = the global box of the image
    target_box: Box | None = None  # refer: the referred object; region: the region (== box)
    context: str | None = None  # overrides the task's prompt template (refer: the expression is used)
    utterances: tuple[str, ...] = ()  # trace: LN utterances, in order
    utterance_valid: tuple[bool, ...] = ()  # trace: validity by the LN rule (text and trace centre)
    utterance_boxes_rel: tuple[Box | None, ...] = ()  # trace: per utterance; None = invalid or cropped out
    ref_id: str = ""  # id in the source file (refexp / region / caption id)
    target_mask: dict | None = None  # refer / region: COCO RLE of the target; None = no mask annotated

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; expected one of {TASKS}")


@dataclass
class GroundedSample:
    """One image with its prompts and all its object boxes (for the proposal head)."""

    image: str | Path | Image.Image
    prompts: list[PromptRecord]
    gt_boxes: list[Box] = field(default_factory=list)  # xyxy original pixels
    width: int | None = None  # original size, when the annotation file states it
    height: int | None = None
    image_id: str = ""
    source: str = ""

    def load_image(self, limits: ImageLimits | None = None) -> Image.Image:
        image = load_image(self.image, limits)
        if self.width and self.height and image.size != (self.width, self.height):
            warnings.warn(f"{self.image if not isinstance(self.image, Image.Image) else 'image'}: size "
                          f"{image.size} differs from the annotation's {(self.width, self.height)}; "
                          "boxes are scaled to the actual size", AnnotationWarning, stacklevel=2)
        return image

    @property
    def tasks(self) -> list[str]:
        return sorted({p.task for p in self.prompts})
