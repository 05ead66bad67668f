"""Mask engines: prompt (box or point) -> mask, for ``Predictor.segment``.

A model with ``heads.mask_decoder`` answers with its own decoder; the paper's recipe for real images is a
frozen SAM prompted with PixelLLM's box, and ``SamMaskEngine`` is that SAM: transformers' ``SamModel`` and its image processor,
loaded from a LOCAL checkpoint folder only (``local_files_only=True``) and from ``safetensors`` only (no
pickle is ever loaded). Like segment-anything's ``SamPredictor`` it keeps image embeddings, so several
prompts on one image run the vision encoder once.

``parse_mask_engine("sam:PATH")`` builds an engine from the spec the CLI (``--mask-engine``), the worker
(``--mask-engine`` / ``PIXELLLM_MASK_ENGINE``) and ``Predictor(mask_engine=...)`` take.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image

from ..errors import CheckpointError, InvalidPromptError
from ..io import image_digest

log = logging.getLogger(__name__)

ENGINES = ("sam",)
ENV_VAR = "PIXELLLM_MASK_ENGINE"
PROMPTS_PER_CALL = 16  # masks decoded and upsampled to the original size at once (bounds memory)


@runtime_checkable
class MaskEngine(Protocol):
    """What ``Predictor.segment`` needs of a mask engine."""

    name: str

    def predict(self, image: Image.Image, boxes: Sequence[Sequence[float]] | None = None,
                points: Sequence[Sequence[float]] | None = None,
                point_labels: Sequence[int] | None = None) -> list[tuple[np.ndarray, float]]:
        """One ``(mask bool[H, W] in original image pixels, mask score)`` per prompt, in order."""


def _image_processor_class():
    try:  # transformers >= 5: the PIL backend needs no torchvision
        from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

        return SamImageProcessorPil
    except ImportError:
        from transformers import SamImageProcessor

        return SamImageProcessor


def _check_folder(path: Path, spec: str) -> dict:
    """The folder's ``config.json``, after checking that the folder is a SAM checkpoint with safetensors."""
    if not path.is_dir():
        what = "is a file, not a folder" if path.exists() else "does not exist"
        raise CheckpointError(f"mask engine {spec}: {path} {what}; give a local SAM checkpoint folder "
                              "(config.json + model.safetensors, e.g. facebook/sam-vit-base downloaded once)")
    config_file = path / "config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"mask engine {spec}: {path} is not a SAM checkpoint (no config.json)") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"mask engine {spec}: cannot read {config_file} ({exc})") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type != "sam":
        raise CheckpointError(f"mask engine {spec}: {path} is not a SAM checkpoint (config.json model_type is "
                              f"{model_type!r}, expected 'sam')")
    if not (path / "model.safetensors").is_file() and not (path / "model.safetensors.index.json").is_file():
        raise CheckpointError(f"mask engine {spec}: {path} has no model.safetensors; weights are loaded from "
                              "safetensors only (never from pickled .bin files)")
    return config


class SamMaskEngine:
    """A frozen SAM (transformers ``SamModel``) answering box and point prompts with masks.

    ``predict`` runs one SAM decoder pass per prompt (batched), asks for SAM's three candidate masks and
    keeps the one with the best predicted IoU; that IoU is the mask's score.
    """

    def __init__(self, model, processor, *, name: str = "sam", device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None, cache_size: int = 4):
        self.device = torch.device(device) if device else torch.device("cpu")
        self.dtype = dtype or torch.float32
        self.model = model.to(self.device, self.dtype).eval()
        self.processor = processor
        self.name = name
        self.cache_size = max(1, cache_size)
        self._cache: OrderedDict[str, tuple[torch.Tensor, tuple[int, int], tuple[int, int]]] = OrderedDict()
        self._lock = threading.RLock()
        self.stats = {"vision_calls": 0, "cache_hits": 0}

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None, **kwargs: Any) -> SamMaskEngine:
        """Load a local SAM checkpoint folder (``config.json`` + ``model.safetensors``; its
        ``preprocessor_config.json`` when present, else SAM's preprocessing at the model's input size)."""
        path = Path(path).expanduser()
        spec = f"sam:{path}"
        _check_folder(path, spec)
        from transformers import SamModel

        try:
            model = SamModel.from_pretrained(str(path), local_files_only=True, use_safetensors=True)
        except Exception as exc:  # noqa: BLE001 - any loading failure is a checkpoint problem
            raise CheckpointError(f"mask engine {spec}: cannot load the SAM model "
                                  f"({type(exc).__name__}: {str(exc)[:300]})") from exc
        size = int(model.config.vision_config.image_size)
        processor_cls = _image_processor_class()
        try:
            if (path / "preprocessor_config.json").is_file():
                processor = processor_cls.from_pretrained(str(path), local_files_only=True)
            else:
                processor = processor_cls(size={"longest_edge": size}, pad_size={"height": size, "width": size})
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(f"mask engine {spec}: cannot read preprocessor_config.json "
                                  f"({type(exc).__name__}: {str(exc)[:300]})") from exc
        longest = (getattr(processor, "size", None) or {}).get("longest_edge")
        prompt_size = int(model.config.prompt_encoder_config.image_size)
        if longest is not None and (int(longest) != size or prompt_size != size):
            raise CheckpointError(f"mask engine {spec}: preprocessor_config.json resizes to {longest} px but the "
                                  f"model's input is {size} px (prompt encoder {prompt_size} px)")
        return cls(model, processor, name=spec, device=device, dtype=dtype, **kwargs)

    # ---- image embeddings --------------------------------------------------------------------------
    @torch.inference_mode()
    def _embed(self, image: Image.Image) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
        """(embedding [1,C,h,w], original (H, W), resized (H, W)) of an RGB image, cached by content."""
        key = image_digest(image)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                self.stats["cache_hits"] += 1
                return hit
            inputs = self.processor(images=image, return_tensors="pt")
            pixels = inputs["pixel_values"].to(self.device, self.dtype)
            embedding = self.model.get_image_embeddings(pixels)
            self.stats["vision_calls"] += 1
            original = tuple(int(v) for v in inputs["original_sizes"][0].tolist())
            resized = tuple(int(v) for v in inputs["reshaped_input_sizes"][0].tolist())
            entry = (embedding, original, resized)
            self._cache[key] = entry
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
            return entry

    def set_image(self, image: Image.Image) -> str:
        """Embed an image now and keep it cached (like ``SamPredictor.set_image``); returns its key."""
        image = _rgb(image)
        self._embed(image)
        return image_digest(image)

    def clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()

    # ---- prompts -> masks --------------------------------------------------------------------------
    @torch.inference_mode()
    def predict(self, image: Image.Image, boxes: Sequence[Sequence[float]] | None = None,
                points: Sequence[Sequence[float]] | None = None,
                point_labels: Sequence[int] | None = None) -> list[tuple[np.ndarray, float]]:
        """One ``(mask, score)`` per prompt: each box (``x1, y1, x2, y2``), or each point (``x, y``, with its
        label: 1 the object, 0 not the object; default 1), in original image pixels. Masks are ``bool``
        arrays ``[H, W]`` of the original image."""
        if (boxes is None) == (points is None):
            raise InvalidPromptError("a mask engine takes either boxes or points")
        image = _rgb(image)
        with self._lock:
            embedding, (oh, ow), (rh, rw) = self._embed(image)
            sx, sy = rw / ow, rh / oh  # original pixels -> the model's resized frame
            if boxes is not None:
                prompts = [[float(b[0]) * sx, float(b[1]) * sy, float(b[2]) * sx, float(b[3]) * sy] for b in boxes]
            else:
                labels = [1] * len(points) if point_labels is None else [int(v) for v in point_labels]
                if len(labels) != len(points):
                    raise InvalidPromptError(f"{len(points)} points but {len(labels)} point labels")
                prompts = [[float(p[0]) * sx, float(p[1]) * sy] for p in points]
            out: list[tuple[np.ndarray, float]] = []
            for start in range(0, len(prompts), PROMPTS_PER_CALL):
                chunk = prompts[start:start + PROMPTS_PER_CALL]
                coords = torch.tensor(chunk, dtype=torch.float32, device=self.device)
                if boxes is not None:
                    result = self.model(image_embeddings=embedding, input_boxes=coords[None],
                                        multimask_output=True)
                else:
                    chunk_labels = torch.tensor(labels[start:start + PROMPTS_PER_CALL], device=self.device)
                    result = self.model(image_embeddings=embedding, input_points=coords[None, :, None, :],
                                        input_labels=chunk_labels[None, :, None], multimask_output=True)
                scores = result.iou_scores[0].float()  # [N, 3]
                best = scores.argmax(-1)
                ar = torch.arange(len(chunk), device=best.device)
                low_res = result.pred_masks[0].float()[ar, best]  # [N, h, w]
                masks = self.processor.post_process_masks(
                    low_res[None, :, None].cpu(), [[oh, ow]], [[rh, rw]], binarize=True)[0]  # [N, 1, H, W]
                for mask, score in zip(masks[:, 0].numpy().astype(bool), scores[ar, best].cpu().tolist()):
                    out.append((mask, float(score)))
            return out


def _rgb(image: Image.Image) -> Image.Image:
    if not isinstance(image, Image.Image):
        raise TypeError(f"a mask engine takes PIL images, got {type(image).__name__}")
    return image if image.mode == "RGB" else image.convert("RGB")


def parse_mask_engine(spec: str, device: str | torch.device | None = None,
                      dtype: torch.dtype | None = None) -> SamMaskEngine:
    """``"sam:PATH"`` (a local SAM checkpoint folder) -> a loaded engine; ``CheckpointError`` for an unknown
    engine name, a missing folder or a folder that is not a SAM checkpoint."""
    if not isinstance(spec, str) or not spec.strip():
        raise CheckpointError(f"mask engine {spec!r}: give sam:PATH (a local SAM checkpoint folder)")
    name, sep, path = spec.strip().partition(":")
    if not sep or name.lower() not in ENGINES:
        raise CheckpointError(f"unknown mask engine {spec!r}; the engines are: sam:PATH (a local SAM "
                              "checkpoint folder)")
    if not path.strip():
        raise CheckpointError(f"mask engine {spec!r}: give the SAM checkpoint folder after 'sam:'")
    return SamMaskEngine.from_pretrained(path.strip(), device=device, dtype=dtype)


def resolve_mask_engine(engine: Any, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None):
    """An engine object as is; a spec string (``sam:PATH``) loaded; None stays None."""
    if engine is None or not isinstance(engine, (str, Path)):
        return engine
    return parse_mask_engine(str(engine), device=device, dtype=dtype)


__all__ = ["ENV_VAR", "MaskEngine", "SamMaskEngine", "parse_mask_engine", "resolve_mask_engine"]
