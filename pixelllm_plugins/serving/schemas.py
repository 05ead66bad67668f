"""JSON shapes of the worker (request bodies and responses); they are also the OpenAPI schema.

Fields follow the CLI's ``--batch`` lines: ``text``/``texts``, ``boxes``; results carry ``detections`` /
``captions`` / ``caption`` + ``words`` / ``regions``, ``image_size`` ``[w, h]`` and ``model_version``.
Boxes are ``[x1, y1, x2, y2]`` in pixels of the original image.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

ADAPTER_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$"


class ImageRef(BaseModel):
    """Exactly one of ``b64`` (the image file's bytes, base64; a ``data:`` URL is fine) or ``url``."""

    model_config = ConfigDict(extra="forbid")
    b64: str | None = Field(None, description="image file bytes, base64 (standard or URL-safe alphabet)")
    url: str | None = Field(None, max_length=4096,
                            description="http(s) URL on a host in PIXELLLM_WORKER_ALLOWED_HOSTS")

    @model_validator(mode="after")
    def _one_source(self) -> ImageRef:
        if (self.b64 is None) == (self.url is None):
            raise ValueError("image needs exactly one of 'b64' (base64 file bytes) or 'url'")
        return self


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image: ImageRef
    adapter: str | None = Field(None, pattern=ADAPTER_PATTERN,
                                description="name of a LoRA adapter known to the worker (per project)")
    timeout_s: float | None = Field(None, gt=0, description="give up after this many seconds "
                                    "(capped by the worker's PIXELLLM_WORKER_TIMEOUT_S)")


class ReferRequest(_Request):
    text: str | None = Field(None, description="one referring expression")
    texts: list[str] | None = Field(None, description="several referring expressions for the same image")

    @model_validator(mode="after")
    def _has_text(self) -> ReferRequest:
        if (self.text is None) == (self.texts is None):
            raise ValueError("refer needs exactly one of 'text' (a string) or 'texts' (a list of strings)")
        return self

    def all_texts(self) -> list[str]:
        return [self.text] if self.text is not None else list(self.texts or [])


class CaptionRegionsRequest(_Request):
    boxes: list[list[float]] = Field(..., description="[[x1, y1, x2, y2], ...] in image pixels")
    max_new_tokens: int = Field(20, ge=1)
    num_beams: int = Field(1, ge=1)


class CaptionRequest(_Request):
    trace: bool = True
    max_new_tokens: int = Field(40, ge=1)
    num_beams: int = Field(1, ge=1)


class DenseCaptionRequest(_Request):
    max_regions: int = Field(20, ge=1)
    min_score: float = Field(0.3, ge=0.0, le=1.0)


class DetectionOut(BaseModel):
    box_xyxy: list[float]
    score: float
    text: str
    model_version: str = ""


class RegionCaptionOut(BaseModel):
    box_xyxy: list[float]
    text: str
    score: float
    model_version: str = ""


class WordOut(BaseModel):
    text: str
    box_xyxy: list[float]
    points: list[list[float]]


class _Response(BaseModel):
    model_version: str
    image_size: list[int] = Field(..., description="[width, height] of the decoded image")


class ReferResponse(_Response):
    detections: list[DetectionOut] = Field(..., description="all texts' detections (each names its text)")
    per_text: list[list[DetectionOut]] = Field(..., description="detections grouped per requested text")


class CaptionRegionsResponse(_Response):
    captions: list[RegionCaptionOut]


class CaptionResponse(_Response):
    caption: str
    score: float
    words: list[WordOut]


class DenseCaptionResponse(_Response):
    regions: list[RegionCaptionOut]


class ErrorResponse(BaseModel):
    error: str = Field(..., description="what went wrong and what to do about it")
    type: str = Field(..., description="error class, e.g. InvalidImageError, QueueFull, ValidationError")
    detail: list[dict] | None = None
