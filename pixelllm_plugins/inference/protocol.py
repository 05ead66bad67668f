"""The one seam: both plugins, the CLI and the worker talk to this protocol.

``Predictor`` (in-process) and ``RemotePredictor`` (HTTP to the GPU worker) implement it.
Images may be paths, bytes, PIL images or numpy arrays (see ``pixelllm_plugins.io``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from ..bounds import DEFAULT_MAX_REGIONS, DEFAULT_MIN_SCORE
from ..io import ImageInput
from .results import Detection, MaskResult, RegionCaption, TracedCaption


@runtime_checkable
class PredictorProtocol(Protocol):
    model_version: str

    def refer(self, images: Sequence[ImageInput], texts: Sequence[Sequence[str]], *,
              adapter: str | None = None) -> list[list[list[Detection]]]:
        """For each image, for each of its texts: detections sorted by score (best first)."""

    def caption_regions(self, images: Sequence[ImageInput],
                        boxes: Sequence[Sequence[Sequence[float]] | None] | None = None,
                        points: Sequence[Sequence[Sequence[float]] | None] | None = None, *,
                        adapter: str | None = None, max_new_tokens: int = 20,
                        num_beams: int = 1) -> list[list[RegionCaption]]:
        """For each image, one caption per prompt, in order: per image its boxes or its points (not both;
        original-image pixels; None for an image prompted the other way). A point's caption names it
        (``RegionCaption.point``) and its region (``box_xyxy``)."""

    def caption(self, images: Sequence[ImageInput], *, trace: bool = True, adapter: str | None = None,
                max_new_tokens: int = 40, num_beams: int = 1,
                from_regions: bool | None = None) -> list[TracedCaption]:
        """One whole-image caption per image; with ``trace`` every word carries a box and points.
        ``from_regions``: composed from the model's dense captions (default when it has a proposal head),
        or (False) written by the language model from the whole image."""

    def dense_caption(self, images: Sequence[ImageInput], *, max_regions: int = DEFAULT_MAX_REGIONS, min_score: float = DEFAULT_MIN_SCORE,
                      adapter: str | None = None) -> list[list[RegionCaption]]:
        """Proposals from the detection head, each captioned; sorted by score."""

    def segment(self, images: Sequence[ImageInput], texts: Sequence[Sequence[str] | None] | None = None,
                boxes: Sequence[Sequence[Sequence[float]] | None] | None = None,
                points: Sequence[Sequence[Sequence[float]] | None] | None = None,
                point_labels: Sequence[Sequence[int] | None] | None = None, *,
                adapter: str | None = None) -> list[list[MaskResult]]:
        """For each image, one mask per prompt, in order: per image exactly one of its texts (text -> box ->
        mask), its boxes or its points (one prompt per point; ``point_labels`` 1/0, default 1)."""
