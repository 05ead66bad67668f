"""In-process Predictor: the PixelLLM tasks over a loaded checkpoint.

Like segment-anything's ``SamPredictor`` it caches image embeddings: the vision encoder runs once per
image content (``set_image`` or an LRU keyed by a pixel digest), so a second prompt on the same image
only runs the prompt adapter, the language model and the heads (or, for ``segment`` on a model with its
own mask decoder, the decoder alone).
"""

from __future__ import annotations

import logging
import math
import os
import threading
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..bounds import DEFAULT_MAX_REGIONS, DEFAULT_MIN_SCORE
from ..bounds import check as check_bound
from ..config import VisionConfig
from ..errors import InvalidBoxError, InvalidImageError, InvalidPromptError, PixelLLMError
from ..geometry import clip_box
from ..io import ImageInput, ImageLimits, load_image, load_image_scaled
from ..modeling.inputs import ImageEmbedding
from ..tokenizer import validate_text
from .arguments import adapter_name, image_list, per_image
from .arguments import check_generation as _check_generation
from .arguments import check_labels as _check_labels
from .calibration import words as text_words
from .compose import align_words, compose_caption
from .decoding import generate, with_word_bias
from .preprocess import PreparedImage, prepare_image_keyed
from .results import Detection, MaskResult, RegionCaption, TracedCaption, Word

log = logging.getLogger(__name__)

MAX_PROMPT_CHARS = 2000
TEXT_CACHE_SIZE = 4096  # prompts whose token ids are kept
MASK_ENGINE_ENV = "PIXELLLM_MASK_ENGINE"
# A click's object: the proposal (of at most this many, scored at least this) that holds the point, nearest
# centre first. Measured on varied test scenes, such a box is far closer to the object's own than the box of
# the click's mask (box IoU 0.84 vs 0.71), and captions and masks read from it are better.
POINT_PROPOSALS = 40
POINT_PROPOSAL_MIN_SCORE = 0.02
NO_MASK_ENGINE = ("this model has no mask decoder yet; pass --mask-engine sam:PATH (a local SAM checkpoint "
                  "folder) or set PIXELLLM_MASK_ENGINE, or use a checkpoint trained with heads.mask_decoder > 0")
NO_POINT_PROMPTS = ("this model's mask decoder takes no point prompts (prompt.points is false): prompt it with "
                    "texts or boxes, or pass --mask-engine sam:PATH (a local SAM checkpoint folder; or set "
                    "PIXELLLM_MASK_ENGINE) for points")
NO_POINT_REGIONS = ("this model takes no point prompts (prompt.points is false) and has no mask engine to turn a "
                    "point into a box: give boxes, or pass --mask-engine sam:PATH (a local SAM checkpoint folder; "
                    "or set PIXELLLM_MASK_ENGINE) so that each point is captioned as the box of its mask")


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


@dataclass
class PreparedInput:
    """An image already loaded, resized and hashed (``Predictor.prepare``): callers such as the worker's
    request threads do this work in parallel, outside the inference lock."""

    prepared: PreparedImage
    digest: str

    @property
    def size(self) -> tuple[int, int]:
        """The original image's (width, height), the pixels results are given in."""
        return self.prepared.original_size


def prepare_input(image: ImageInput | PreparedInput, vision: VisionConfig,
                  limits: ImageLimits | None = None) -> PreparedInput:
    """Load, resize and hash an image for a model with this vision config (no model needed). JPEG files
    and bytes are decoded at a reduced scale when they are far larger than the model's input."""
    if isinstance(image, PreparedInput):
        return image
    loaded, original = load_image_scaled(image, limits, vision.image_size)
    return PreparedInput(*prepare_image_keyed(loaded, vision, original_size=original))


@dataclass
class _Image:
    """A loaded image, its preprocessing and its cache key (content digest + active adapter)."""

    prepared: PreparedImage
    key: str


@dataclass
class _Row:
    """One prompt: which image, the prompt box in canvas pixels, context and text token ids, and a point
    prompt in canvas pixels (``prompt.points`` models only) read next to the box."""

    image: int
    box: list[float]
    context: list[int]
    text: list[int] | None = None
    point: tuple[float, float] | None = None


@dataclass
class _MaskPrompt:
    """One prompt of the model's own mask decoder: its image, box (and point) in canvas pixels, and what its
    result reports: ``what`` names it in errors, ``box`` / ``score`` (None: the mask's box / the mask score)
    and ``text`` (text prompts)."""

    image: int
    canvas_box: list[float]
    point: tuple[float, float] | None
    label: int
    what: str
    box: tuple | None = None
    score: float | None = None
    text: str | None = None


class Predictor:
    """Run PixelLLM on images. Implements ``PredictorProtocol``.

    ``model`` is a checkpoint folder, a preset name (``tiny``: random weights, for tests), or None for
    the embedded default model. ``mask_engine`` (for ``segment``): a mask engine
    (``inference.mask_engine``) or its spec ``"sam:PATH"`` (a local SAM checkpoint folder, loaded now);
    without one, ``PIXELLLM_MASK_ENGINE`` is loaded on the first ``segment`` call, and without that either, a
    model with its own mask decoder (``heads.mask_decoder > 0``) segments with it (``mask_source``).
    """

    def __init__(self, model: str | Path | torch.nn.Module | None = None, *, tokenizer=None,
                 model_version: str | None = None, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None, cache_size: int = 32, batch_size: int = 32,
                 limits: ImageLimits | None = None, mask_engine=None):
        if isinstance(device, str):
            from ..argtypes import check_device

            device = check_device(device)  # an unknown or absent device: the project's error, naming those here
        self.device = torch.device(device) if device else default_device()
        self.dtype = dtype or default_dtype(self.device)
        from .mask_engine import resolve_mask_engine

        self._mask_engine = resolve_mask_engine(mask_engine, self.device)  # a bad spec fails before the model
        if isinstance(model, torch.nn.Module):  # an in-memory model (trainer evaluation, tests)
            if tokenizer is None:
                raise PixelLLMError("Predictor(model=<module>) needs tokenizer=")
            net, version = model, model_version or f"{model.config.preset}-in-memory"
        else:
            from ..checkpoint import load_pretrained

            net, tokenizer, version = load_pretrained(None if model is None else str(model))
        self.model = net.to(self.device, self.dtype).eval()
        self._base_tokenizer = tokenizer
        # adapter name -> (its tokenizer, its new words), for adapters that bring new words (modeling.new_words)
        self._adapter_vocab: dict[str, tuple[object, list[str]]] = {}
        self.base_version = version
        self.config = net.config
        self.cache_size = cache_size
        self.batch_size = batch_size
        self.limits = limits or ImageLimits()
        # content key -> the image's ImageEmbedding (tokens, and maps when the model reads them)
        self._cache: OrderedDict[str, tuple[torch.Tensor, dict[str, torch.Tensor] | None]] = OrderedDict()
        self._current: str | None = None
        self._adapter: str | None = None
        self._adapter_paths: dict[str, str] = {}
        self._image_adapters: set[str] = set()  # adapters that change image embeddings (see _load)
        self._text_cache: OrderedDict[tuple, list[int]] = OrderedDict()  # see _encode
        self._lock = threading.RLock()  # one forward at a time per model
        self.stats = {"vision_calls": 0, "cache_hits": 0}
        # box scores through the checkpoint's score_calibration when it has one (inference/calibration.py)
        self.calibrated = True

    # ---- identity ------------------------------------------------------------------------------------
    @property
    def model_version(self) -> str:
        return self.base_version if not self._adapter else f"{self.base_version}+{self._adapter}"

    def info(self) -> dict:
        return {
            "model_version": self.base_version,
            "preset": self.config.preset,
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "image_size": self.config.vision.image_size,
            "adapters": sorted(self._adapter_paths),
            "new_words": {name: list(words) for name, (_, words) in sorted(self._adapter_vocab.items())},
        }

    # ---- adapters ------------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        """The tokenizer of the adapter in use (one with new words brings its own), else the base's."""
        vocab = self._adapter_vocab.get(self._adapter)
        return vocab[0] if vocab is not None else self._base_tokenizer

    def load_adapter(self, path: str | Path, name: str | None = None) -> str:
        """Load a LoRA adapter folder (peft format) under ``name`` (default: the folder name)."""
        from ..modeling import lora, new_words
        from ..tokenizer import PixelTokenizer

        path = adapter_name(path, "load_adapter's path")
        name = name or Path(path).name
        with self._lock:
            info = new_words.read_words(path)
            tokenizer = PixelTokenizer.load(path) if info is not None else None
            lora.load_adapter(self.model, str(path), name)
            self.model.to(self.device, self.dtype).eval()
            self._adapter_paths[name] = str(path)
            if lora.adapter_changes_image_side(self.model, name):
                self._image_adapters.add(name)
            self._adapter_vocab.pop(name, None)
            self._forget_texts(name)
            if tokenizer is not None:
                self._adapter_vocab[name] = (tokenizer, info["words"])
        return name

    def unload_adapter(self, name: str) -> None:
        """Remove a loaded adapter and free its weights (the worker's adapter LRU calls this)."""
        from ..modeling import lora

        with self._lock:
            if name not in self._adapter_paths:
                raise PixelLLMError(f"adapter {name!r} is not loaded (loaded: {sorted(self._adapter_paths) or 'none'})")
            if self._adapter == name:
                self._use_adapter(None)
            lora.delete_adapter(self.model, name)
            del self._adapter_paths[name]
            self._image_adapters.discard(name)
            self._adapter_vocab.pop(name, None)
            self._forget_texts(name)
            self._cache = OrderedDict((k, v) for k, v in self._cache.items() if not k.endswith(f":{name}"))

    def _adapter_words(self) -> set[str]:
        """The new words of the adapter in use (``modeling.new_words``). Their texts keep the model's own box
        score: the checkpoint's calibration maps were fitted on the base, which never learned them, and
        under the adapter that learned them both maps are further off than the raw score (on "pentagon"
        after 8 / 32 corrections, ECE 0.23 / 0.29 with the unknown-word map, 0.10 / 0.15 raw)."""
        vocab = self._adapter_vocab.get(self._adapter)
        return set(vocab[1]) if vocab is not None else set()

    def _forget_texts(self, adapter: str) -> None:
        """Drop the cached token ids of ``adapter``'s own tokenizer (it is being replaced or removed)."""
        for key in [k for k in self._text_cache if k[0] == adapter]:
            del self._text_cache[key]

    def _use_adapter(self, adapter: str | None) -> None:
        if adapter is not None:
            adapter = adapter_name(adapter)
        if adapter is not None and adapter not in self._adapter_paths:
            by_path = {v: k for k, v in self._adapter_paths.items()}
            adapter = by_path.get(str(adapter), adapter)  # a folder given again: the name it was loaded as
        if adapter == self._adapter:
            return
        from ..modeling import lora

        if adapter is not None and adapter not in self._adapter_paths:
            if Path(adapter).is_dir():
                adapter = self.load_adapter(adapter)
            else:
                raise PixelLLMError(f"unknown adapter {adapter!r}; load it with Predictor.load_adapter(path) "
                                    f"(loaded: {sorted(self._adapter_paths) or 'none'})")
        lora.set_active_adapter(self.model, adapter)
        self._adapter = adapter

    # ---- images and the embedding cache ------------------------------------------------------------
    def prepare(self, image: ImageInput | PreparedInput, limits: ImageLimits | None = None) -> PreparedInput:
        """Load, resize and hash an image (thread-safe, no model call); ``limits`` replace the Predictor's."""
        return prepare_input(image, self.config.vision, limits or self.limits)

    def _load(self, images: Sequence[ImageInput | PreparedInput]) -> list[_Image]:
        out = []
        for i, source in enumerate(images):
            try:
                ready = self.prepare(source)
            except PixelLLMError as exc:
                raise type(exc)(f"image {i}: {exc}") from exc
            # an embedding is the base's unless the adapter in use changes the image side: adapters that
            # only change the language side (correction rounds) share it, so switching costs no vision pass
            side = self._adapter if self._adapter in self._image_adapters else ""
            out.append(_Image(ready.prepared, f"{ready.digest}:{side}"))
        return out

    def set_image(self, image: ImageInput) -> str:
        """Embed one image now and keep it cached (like ``SamPredictor.set_image``); returns its key."""
        with self._lock:
            loaded = self._load([image])
            self._embed(loaded)
            self._current = loaded[0].key
            return self._current

    def clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()
            self._current = None

    @torch.inference_mode()
    def _embed(self, images: list[_Image], *, maps: bool = False) -> ImageEmbedding:
        """The images' ``ImageEmbedding``, running the vision pass only on cache misses; ``maps`` asks for
        the proposal maps even when the model's prompts do not read them (dense captioning)."""
        keys = list(dict.fromkeys(im.key for im in images))
        missing = [k for k in keys if k not in self._cache or (maps and "heatmap" not in (self._cache[k].maps or {}))]
        by_key = {im.key: im for im in images}
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start:start + self.batch_size]
            pixels = torch.stack([by_key[k].prepared.pixel_values for k in chunk]).to(self.device, self.dtype)
            computed = self.model.embed_images(pixels, maps=True if maps else None)
            self.stats["vision_calls"] += 1
            for k, part in zip(chunk, computed.split()):
                self._cache[k] = part
        self.stats["cache_hits"] += len(images) - len(missing)
        parts = []
        for im in images:
            self._cache.move_to_end(im.key)
            parts.append(self._cache[im.key])
        self._evict()
        return ImageEmbedding.stack(parts)

    def _evict(self) -> None:
        while len(self._cache) > max(self.cache_size, 1):
            key = next(iter(self._cache))
            if key == self._current and len(self._cache) > 1:
                self._cache.move_to_end(key)
                key = next(iter(self._cache))
            del self._cache[key]

    # ---- text ----------------------------------------------------------------------------------------
    def _clean_text(self, text: str, what: str) -> str:
        text = validate_text(text, f"{what}: text")
        if len(text) > MAX_PROMPT_CHARS:
            warnings.warn(f"{what}: text of {len(text)} characters truncated to {MAX_PROMPT_CHARS}",
                          stacklevel=3)
            text = text[:MAX_PROMPT_CHARS]
        return text

    def _encode(self, text: str, max_len: int, *, add_bos: bool, what: str) -> list[int]:
        """Token ids (shared, do not modify); cached, as annotation tools send the same prompts again and
        again and tokenizing is a real share of a batched call's time on a small model."""
        key = (self._adapter if self._adapter in self._adapter_vocab else None, text, max_len, add_bos)
        ids = self._text_cache.get(key)
        if ids is not None:
            self._text_cache.move_to_end(key)
            return ids
        ids = self.tokenizer.encode(text, max_len=None, add_bos=add_bos, add_eos=True)
        if len(ids) > max_len:
            warnings.warn(f"{what}: prompt is {len(ids)} tokens; truncated to the model's {max_len}",
                          stacklevel=3)
            ids = self.tokenizer.encode(text, max_len=max_len, add_bos=add_bos, add_eos=True)
        self._text_cache[key] = ids
        if len(self._text_cache) > TEXT_CACHE_SIZE:
            self._text_cache.popitem(last=False)
        return ids

    def _pad(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in seqs)
        pad = self.tokenizer.pad_id
        # two tensors from Python lists: per-row slice assignments cost three torch calls a row
        ids = torch.tensor([[*s, *[pad] * (width - len(s))] for s in seqs], dtype=torch.long)
        mask = torch.tensor([[True] * len(s) + [False] * (width - len(s)) for s in seqs], dtype=torch.bool)
        return ids.to(self.device), mask.to(self.device)

    # ---- model calls over prompt rows --------------------------------------------------------------
    def _boxes(self, rows: list[_Row]) -> torch.Tensor:
        """[R,4] the rows' prompt boxes in canvas pixels."""
        return torch.tensor([r.box for r in rows], dtype=torch.float32, device=self.device).to(self.dtype)

    def _sizes(self, images: list[_Image]) -> torch.Tensor:
        """[B,2] (w,h) of the resized, un-padded images in canvas pixels."""
        return torch.tensor([image.prepared.resized_size for image in images], dtype=torch.float32,
                            device=self.device)

    def _row_index(self, rows: list[_Row]) -> torch.Tensor:
        return torch.tensor([r.image for r in rows], device=self.device)

    def _teacher_forced(self, embedding: ImageEmbedding, sizes, rows, *, refer: bool = False
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """Points and confidence logits at every text position: (points [R,T,4], conf [R,T]); ``sizes``:
        ``_sizes`` of the images. ``refer``: each row's text names one object, so a model with
        ``heads.candidate_words`` lets its zoom vote on the candidates."""
        ctx, ctx_mask = self._pad([r.context for r in rows])
        txt, txt_mask = self._pad([r.text for r in rows])
        index = self._row_index(rows)
        vote = None
        if refer:  # the words between BOS and EOS
            words, words_mask = self._pad([r.text[1:-1] or [self.tokenizer.pad_id] for r in rows])
            vote = self.model.refer_word_vote(embedding, index, sizes, words, words_mask & (words != self.tokenizer.pad_id))
        out = self.model.prompt_pass(embedding, self._boxes(rows), index, sizes, ctx, ctx_mask, txt, txt_mask,
                                     cell_bias=vote)
        return out.points.float(), out.confidence.float()

    def _generate(self, embedding: ImageEmbedding, sizes, rows, max_new_tokens, num_beams, *, regions: bool = False):
        """``regions``: the rows' boxes each hold one object (region and dense captions), so a model with
        ``prompt.zoom_words`` lets its zoom vote on the words."""
        boxes, index = self._boxes(rows), self._row_index(rows)
        visual = self.model.prompt_tokens(embedding, boxes, index, sizes, *self._row_points(rows))
        ctx, ctx_mask = self._pad([r.context for r in rows])
        tok = self.tokenizer
        vote = self.model.region_word_vote(embedding, boxes, index) if regions else None
        return generate(self.model.language, visual, ctx, ctx_mask, bos_id=tok.bos_id, eos_id=tok.eos_id,
                        pad_id=tok.pad_id, max_new_tokens=max_new_tokens, num_beams=num_beams, word_bias=vote)

    def _row_points(self, rows: list[_Row]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(points [R,1,2] canvas pixels, labels [R,1]) of rows that all have a point prompt; (None, None) for
        rows without (a chunk is one or the other: ``_captions`` groups them)."""
        if rows[0].point is None:
            return None, None
        points = torch.tensor([[r.point] for r in rows], dtype=torch.float32, device=self.device).to(self.dtype)
        return points, torch.ones(len(rows), 1, dtype=torch.long, device=self.device)

    def _chunks(self, rows: list) -> list[list]:
        return [rows[i:i + self.batch_size] for i in range(0, len(rows), self.batch_size)]

    def _global_box(self, image: _Image) -> list[float]:
        w, h = image.prepared.resized_size
        return [0.0, 0.0, float(w), float(h)]

    def _region_rows(self, images: list[_Image], boxes_per_image) -> tuple[list[_Row], list[tuple]]:
        lang = self.config.language
        context = self._encode(self.config.templates.region_prompt, lang.max_context_tokens, add_bos=False,
                               what="region prompt")
        rows, originals = [], []
        for i, (image, boxes) in enumerate(zip(images, boxes_per_image)):
            w, h = image.prepared.original_size
            for box in boxes:
                original = clip_box(box, w, h)
                rows.append(_Row(i, image.prepared.to_canvas(original), context))
                originals.append(original)
        return rows, originals

    # ---- the four tasks ------------------------------------------------------------------------------
    @torch.inference_mode()
    def refer(self, images: Sequence[ImageInput], texts: Sequence[Sequence[str]], *,
              adapter: str | None = None) -> list[list[list[Detection]]]:
        images = image_list(images, "refer", PreparedInput)
        texts = per_image(texts, len(images), "text lists", "refer")
        if not images:
            return []
        with self._lock:
            self._use_adapter(adapter)
            return self._refer_loaded(self._load(images), texts)

    def _refer_loaded(self, loaded: list[_Image], texts: Sequence[Sequence[str]]) -> list[list[list[Detection]]]:
        """``refer`` over images already loaded (under the lock, in inference mode)."""
        lang, prefix = self.config.language, self.config.templates.refer_prefix
        rows: list[_Row] = []
        row_texts: list[str] = []
        for i, image_texts in enumerate(texts):
            if image_texts is None:
                raise InvalidPromptError(f"image {i}: refer needs a list of texts, got None")
            for j, raw in enumerate(_as_list(image_texts, f"image {i}: texts")):
                text = self._clean_text(raw, f"image {i} text {j}")
                row_texts.append(text)
                context = self._encode(prefix + text, lang.max_context_tokens, add_bos=False,
                                       what=f"image {i} text {j}")
                target = self._encode(text, lang.max_text_tokens, add_bos=True, what=f"image {i} text {j}")
                rows.append(_Row(i, self._global_box(loaded[i]), context, target))
        embedding = self._embed(loaded)
        sizes = self._sizes(loaded)
        boxes, scores = [], []
        for chunk in self._chunks(rows):
            points, conf = self._teacher_forced(embedding, sizes, chunk, refer=True)
            last = torch.tensor([len(r.text) - 2 for r in chunk], device=points.device)
            ar = torch.arange(len(chunk), device=points.device)
            boxes.append(points[ar, last])
            scores.append(torch.sigmoid(conf[ar, last]))
        out: list[list[list[Detection]]] = [[] for _ in loaded]
        if rows:
            sizes = torch.tensor([loaded[r.image].prepared.original_size for r in rows], dtype=torch.float32)
            all_boxes = (torch.cat(boxes).float().cpu() * sizes.repeat(1, 2)).tolist()  # to original pixels
            all_scores = torch.cat(scores).float().cpu().tolist()
            calibration = getattr(self.model, "score_calibration", None)
            if calibration is not None and self.calibrated:
                learned = self._adapter_words()
                all_scores = [score if learned & set(text_words(text)) else float(calibration.for_text(text)(score))
                              for text, score in zip(row_texts, all_scores)]
            labels: dict[tuple, str] = {}
            for row, (x0, y0, x1, y1), score in zip(rows, all_boxes, all_scores):
                w, h = loaded[row.image].prepared.original_size
                box = _clip_soft((min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)), w, h)
                key = tuple(row.text)
                if key not in labels:
                    labels[key] = self.tokenizer.decode(row.text)
                out[row.image].append([Detection(box, round(score, 4), labels[key], self.model_version)])
        return out

    @torch.inference_mode()
    def region_text_logits(self, image: ImageInput, boxes: Sequence[Sequence[float]], texts: Sequence[str], *,
                           adapter: str | None = None) -> list[tuple[list[int], torch.Tensor]]:
        """Teacher-forced: per (box, text) of one image, the text's token ids (BOS ... EOS) and the language
        model's next-token logits at each of them ([T, V] float32 on the CPU; row t predicts token t + 1), with
        the zoom's vote added as region captions are written (``prompt.zoom_words``). How likely the model
        finds a caption for a box, and what it would rather have written."""
        if len(boxes) != len(texts):
            raise InvalidPromptError(f"region_text_logits got {len(boxes)} boxes but {len(texts)} texts")
        with self._lock:
            self._use_adapter(adapter)
            loaded = self._load([image])
            rows, _ = self._region_rows(loaded, [list(boxes)])
            lang = self.config.language
            for k, (row, text) in enumerate(zip(rows, texts)):
                row.text = self._encode(self._clean_text(text, f"text {k}"), lang.max_text_tokens, add_bos=True,
                                        what=f"text {k}")
            embedding, sizes = self._embed(loaded), self._sizes(loaded)
            out = []
            for chunk in self._chunks(rows):
                ctx, ctx_mask = self._pad([r.context for r in chunk])
                txt, txt_mask = self._pad([r.text for r in chunk])
                boxes, index = self._boxes(chunk), self._row_index(chunk)
                result = self.model.prompt_pass(embedding, boxes, index, sizes, ctx, ctx_mask, txt, txt_mask)
                vote = self.model.region_word_vote(embedding, boxes, index)
                logits = with_word_bias(result.logits.float(), None if vote is None else vote[:, None, :],
                                        self.tokenizer.eos_id).cpu()
                out += [(list(r.text), logits[k, :len(r.text)]) for k, r in enumerate(chunk)]
            return out

    @torch.inference_mode()
    def caption_regions(self, images: Sequence[ImageInput],
                        boxes: Sequence[Sequence[Sequence[float]] | None] | None = None,
                        points: Sequence[Sequence[Sequence[float]] | None] | None = None, *,
                        adapter: str | None = None, max_new_tokens: int = 20,
                        num_beams: int = 1) -> list[list[RegionCaption]]:
        """One caption per prompt, per image in prompt order: per image its ``boxes`` (``x1, y1, x2, y2``
        image pixels) or its ``points`` (``x, y`` image pixels, one prompt each), not both. Each argument is
        None or one entry per image (None for an image prompted the other way).

        A point's region: with a mask engine, the box of the mask it finds at the point; with the model's
        own decoder (``prompt.points``), the model's region proposal that holds the point with the nearest
        centre (``POINT_PROPOSALS``), else the box of the decoder's mask at the point; the whole image when
        that mask is empty and the model reads points; else, on a ``prompt.points`` model, the whole image. The language
        model then reads that box, plus the point itself on a ``prompt.points`` model. A model with neither
        refuses points (``NO_POINT_REGIONS``). Each point's ``RegionCaption`` has ``point`` = the given
        ``[x, y]`` and ``box_xyxy`` = its region."""
        images = image_list(images, "caption_regions", PreparedInput)
        n = len(images)
        if boxes is None and points is None:
            raise InvalidPromptError("caption_regions needs boxes or points: one list per image")
        if boxes is not None:
            boxes = per_image(boxes, n, "box lists", "caption_regions")
        if points is not None:
            points = per_image(points, n, "point lists", "caption_regions")
        max_new_tokens, num_beams = _check_generation(max_new_tokens, num_beams)
        if not n:
            return []
        box_lists: list = []
        for i in range(n):
            b, p = (boxes[i] if boxes is not None else None), (points[i] if points is not None else None)
            if b is not None and p is not None:
                raise InvalidPromptError(f"image {i}: give boxes or points, not both (each point is a prompt of "
                                         "its own)")
            if b is None and p is None:
                raise InvalidPromptError(f"image {i}: caption_regions needs boxes or points")
            box_lists.append(_as_list(b) if b is not None else [])
        with self._lock:
            self._use_adapter(adapter)
            loaded = self._load(images)
            rows, originals = self._region_rows(loaded, box_lists)
            asked: list[tuple[float, float] | None] = [None] * len(rows)
            point_lists = {i: _as_list(points[i]) for i in range(n) if points is not None and points[i] is not None}
            checked = {i: [_check_point(i, j, p, *loaded[i].prepared.original_size) for j, p in enumerate(pts)]
                       for i, pts in point_lists.items()}
            checked = {i: pts for i, pts in checked.items() if pts}
            if checked:
                context = rows[0].context if rows else self._encode(
                    self.config.templates.region_prompt, self.config.language.max_context_tokens, add_bos=False,
                    what="region prompt")
                for i, regions in self._point_regions(images, loaded, checked).items():
                    for point, (canvas_box, original, canvas_point) in zip(checked[i], regions):
                        rows.append(_Row(i, canvas_box, context, point=canvas_point))
                        originals.append(original)
                        asked.append(point)
                order = sorted(range(len(rows)), key=lambda k: rows[k].image)  # stable: prompt order per image
                rows, originals, asked = ([seq[k] for k in order] for seq in (rows, originals, asked))
            embedding = self._embed(loaded)
            texts, scores = self._captions(embedding, self._sizes(loaded), rows, max_new_tokens, num_beams)
            out: list[list[RegionCaption]] = [[] for _ in images]
            for row, original, text, score, point in zip(rows, originals, texts, scores, asked):
                out[row.image].append(RegionCaption(original, text, score, self.model_version, point))
            return out

    def _point_regions(self, images, loaded: list[_Image], points: dict[int, list[tuple[float, float]]]
                       ) -> dict[int, list[tuple[list[float], tuple, tuple[float, float] | None]]]:
        """Per image, per point (image pixels): (box prompt in canvas pixels, that box in image pixels, the
        point in canvas pixels for a ``prompt.points`` model else None); see ``caption_regions``."""
        from ..masks import mask_to_box

        reads_points = bool(self.config.prompt.points)
        engine = self.mask_engine
        own = engine is None and reads_points and getattr(self.model, "mask_decoder", None) is not None
        if engine is None and not reads_points:
            raise PixelLLMError(NO_POINT_REGIONS)
        found: dict[int, list[tuple | None]] = {i: [None] * len(pts) for i, pts in points.items()}
        if engine is not None:
            for i, pts in points.items():
                if isinstance(images[i], PreparedInput):
                    raise InvalidImageError(f"image {i}: a point becomes a box through the mask engine, which "
                                            "needs the image itself, not a PreparedInput")
                try:
                    image = load_image(images[i], self.limits)
                except PixelLLMError as exc:
                    raise type(exc)(f"image {i}: {exc}") from exc
                masks = engine.predict(image, points=pts, point_labels=[1] * len(pts))
                found[i] = [mask_to_box(m) if np.asarray(m).any() else None for m, _ in masks]
        elif own:
            proposed = self._point_proposals(loaded, points)
            found = {i: list(boxes) for i, boxes in proposed.items()}
            prompts = [_MaskPrompt(i, self._global_box(loaded[i]), tuple(loaded[i].prepared.to_canvas(p)), 1,
                                   f"point {j}") for i, pts in points.items() for j, p in enumerate(pts)
                       if proposed[i][j] is None]
            masks = iter(self._decode_masks(loaded, prompts))
            for boxes in found.values():
                for j, box in enumerate(boxes):
                    if box is None:
                        mask, _ = next(masks)
                        boxes[j] = mask_to_box(mask) if mask.any() else None
        out = {}
        for i, pts in points.items():
            prepared = loaded[i].prepared
            w, h = prepared.original_size
            regions = []
            for j, ((x, y), box) in enumerate(zip(pts, found[i])):
                if box is None:
                    if not reads_points:
                        raise PixelLLMError(f"image {i} point {j} ({x:g}, {y:g}): the mask engine found no "
                                            "object there, so there is no region to caption; give a box, or a "
                                            "point on an object")
                    box = (0.0, 0.0, float(w), float(h))
                canvas_point = tuple(prepared.to_canvas((x, y))) if reads_points else None
                regions.append((prepared.to_canvas(box), tuple(float(v) for v in box), canvas_point))
            out[i] = regions
        return out

    def _captions(self, embedding: ImageEmbedding, sizes, rows, max_new_tokens, num_beams) -> tuple[list[str], list[float]]:
        """Generated text and score per row, in row order; rows with and without a point prompt run in
        separate chunks (a point adds a prompt token)."""
        texts: list[str] = [""] * len(rows)
        scores: list[float] = [0.0] * len(rows)
        for group in ([k for k, r in enumerate(rows) if r.point is None],
                      [k for k, r in enumerate(rows) if r.point is not None]):
            for chunk in self._chunks(group):
                result = self._generate(embedding, sizes, [rows[k] for k in chunk], max_new_tokens, num_beams,
                                        regions=True)
                for k, tokens, score in zip(chunk, result.tokens, result.scores):
                    texts[k] = self.tokenizer.decode(tokens)
                    scores[k] = round(float(torch.tensor(score).exp().clamp(0, 1)), 4)
        return texts, scores

    @torch.inference_mode()
    def caption(self, images: Sequence[ImageInput], *, trace: bool = True, adapter: str | None = None,
                max_new_tokens: int = 40, num_beams: int = 1,
                from_regions: bool | None = None) -> list[TracedCaption]:
        """Whole-image captions, each word with its location (``trace``).

        ``from_regions`` (default: whenever the model has a proposal head) composes the caption from the
        model's dense captions, objects left to right, each object's words pointing at its box (see
        ``inference.compose``); an image where nothing is found gets the language model's own caption.
        ``from_regions=False``: the language model writes the caption from the whole image."""
        images = image_list(images, "caption", PreparedInput)
        max_new_tokens, num_beams = _check_generation(max_new_tokens, num_beams)
        if not images:
            return []
        if from_regions is None:
            from_regions = self.model.proposal_head is not None
        if from_regions:
            return self._caption_from_regions(images, trace, adapter, max_new_tokens, num_beams)
        lang = self.config.language
        with self._lock:
            self._use_adapter(adapter)
            loaded = self._load(images)
            context = self._encode(self.config.templates.caption_prompt, lang.max_context_tokens,
                                   add_bos=False, what="caption prompt")
            rows = [_Row(i, self._global_box(im), context) for i, im in enumerate(loaded)]
            embedding = self._embed(loaded)
            sizes = self._sizes(loaded)
            out = []
            for chunk in self._chunks(rows):
                result = self._generate(embedding, sizes, chunk, max_new_tokens, num_beams)
                for row, ids in zip(chunk, result.tokens):
                    row.text = list(ids)
                points = self._teacher_forced(embedding, sizes, chunk)[0].cpu() if trace else None
                for k, (row, score) in enumerate(zip(chunk, result.scores)):
                    words = self._words(row.text, points[k], loaded[row.image].prepared) if trace else []
                    out.append(TracedCaption(self.tokenizer.decode(row.text), words,
                                             round(float(torch.tensor(score).exp()), 4), self.model_version))
            return out

    def _caption_from_regions(self, images: Sequence[ImageInput], trace: bool, adapter: str | None,
                              max_new_tokens: int, num_beams: int) -> list[TracedCaption]:
        loaded = []
        for i, image in enumerate(images):  # decoded once; the calls below reuse the prepared images
            try:
                loaded.append(self.prepare(image))
            except PixelLLMError as exc:
                raise type(exc)(f"image {i}: {exc}") from exc
        with self._lock:
            regions = self.dense_caption(loaded, adapter=adapter)
            composed = [compose_caption([r.text for r in rs], [(r.box_xyxy[0] + r.box_xyxy[2]) / 2 for r in rs])
                        for rs in regions]
            found = [i for i, c in enumerate(composed) if c.text]
            missing = [i for i, c in enumerate(composed) if not c.text]
            out: list[TracedCaption | None] = [None] * len(images)
            if missing:
                free = self.caption([loaded[i] for i in missing], trace=trace, adapter=adapter,
                                    max_new_tokens=max_new_tokens, num_beams=num_beams, from_regions=False)
                for i, c in zip(missing, free):
                    out[i] = c
            if not found:
                return out
            traced = [[] for _ in found]
            if trace:
                with warnings.catch_warnings():  # a long list outgrows the text length: completed below
                    warnings.simplefilter("ignore")
                    traced = self.trace_points([loaded[i] for i in found], [composed[i].text for i in found])
            for i, words in zip(found, traced):
                words[:] = _region_words(words, composed[i].words, regions[i]) if trace else []
                score = float(np.mean([r.score for r in regions[i]]))
                out[i] = TracedCaption(composed[i].text, words, round(score, 4), self.model_version)
            return out

    def trace_points(self, images: Sequence[ImageInput], captions: Sequence[str]) -> list[list[Word]]:
        """Per-word boxes for given captions (teacher-forced): what ``caption`` traces, for known text."""
        images = image_list(images, "trace_points", PreparedInput)
        captions = per_image(captions, len(images), "captions", "trace_points")
        if not images:
            return []
        lang = self.config.language
        with self._lock, torch.inference_mode():
            loaded = self._load(images)
            context = self._encode(self.config.templates.caption_prompt, lang.max_context_tokens,
                                   add_bos=False, what="caption prompt")
            rows = [_Row(i, self._global_box(im), context,
                         self._encode(self._clean_text(c, f"caption {i}"), lang.max_text_tokens, add_bos=True,
                                      what=f"caption {i}"))
                    for i, (im, c) in enumerate(zip(loaded, captions))]
            embedding = self._embed(loaded)
            sizes = self._sizes(loaded)
            out = []
            for chunk in self._chunks(rows):
                points = self._teacher_forced(embedding, sizes, chunk)[0].cpu()
                out += [self._words(r.text, points[k], loaded[r.image].prepared) for k, r in enumerate(chunk)]
            return out

    def _words(self, ids: list[int], points: torch.Tensor, prepared: PreparedImage) -> list[Word]:
        """Group word pieces into words; a word's box spans its pieces' predicted points."""
        w, h = prepared.original_size
        words = []
        for text, positions in self.tokenizer.words(ids):
            pts = prepared.normalised_to_original(points[positions]).reshape(-1, 2)
            x0, y0 = pts.min(0).values.tolist()
            x1, y1 = pts.max(0).values.tolist()
            box = _clip_soft((x0, y0, x1, y1), w, h)
            words.append(Word(text, box, [(box[0], box[1]), (box[2], box[3])]))
        return words

    @torch.inference_mode()
    def dense_caption(self, images: Sequence[ImageInput], *, max_regions: int = DEFAULT_MAX_REGIONS, min_score: float = DEFAULT_MIN_SCORE,
                      adapter: str | None = None, max_new_tokens: int = 20) -> list[list[RegionCaption]]:
        if self.model.proposal_head is None:
            raise PixelLLMError(f"model {self.base_version} has no proposal head; dense captioning needs a "
                                "checkpoint trained with heads.proposals=true")
        images = image_list(images, "dense_caption", PreparedInput)
        max_regions = int(check_bound("max_regions", max_regions))
        min_score = float(check_bound("min_score", min_score))
        max_new_tokens = int(check_bound("max_new_tokens", max_new_tokens))
        if not images:
            return []
        with self._lock:
            self._use_adapter(adapter)
            loaded = self._load(images)
            embedding = self._embed(loaded, maps=True)  # one set of maps: proposals and captions
            sizes = self._sizes(loaded)
            boxes, scores = self.model.propose(embedding, sizes, max_regions, min_score)
            boxes, scores = boxes.float().cpu(), scores.float().cpu()
            per_image, proposal_scores = [], []
            for im, b, s in zip(loaded, boxes, scores):
                keep = (s >= min_score) & (s > 0)
                w, h = im.prepared.original_size
                kept = []
                for nb, sc in zip(b[keep], s[keep]):
                    x0, y0, x1, y1 = im.prepared.normalised_to_original(nb).tolist()
                    box = _clip_soft((x0, y0, x1, y1), w, h)
                    if box[2] - box[0] >= 1 and box[3] - box[1] >= 1:
                        kept.append((box, float(sc)))
                kept = sorted(kept, key=lambda x: -x[1])[:max_regions]
                per_image.append([k[0] for k in kept])
                proposal_scores.append([k[1] for k in kept])
            rows, originals = self._region_rows(loaded, per_image)
            texts, _ = self._captions(embedding, sizes, rows, max_new_tokens, 1)
            out: list[list[RegionCaption]] = [[] for _ in images]
            flat_scores = [s for ss in proposal_scores for s in ss]
            for row, original, text, score in zip(rows, originals, texts, flat_scores):
                out[row.image].append(RegionCaption(original, text, round(score, 4), self.model_version))
            return out

    # ---- segmentation (text / box / point -> mask) ---------------------------------------------------
    @property
    def mask_engine(self):
        """The mask engine ``segment`` uses: the constructor's, else ``PIXELLLM_MASK_ENGINE`` (loaded on first
        use), else None."""
        if self._mask_engine is None:
            spec = os.environ.get(MASK_ENGINE_ENV, "").strip()
            if spec:
                from .mask_engine import parse_mask_engine

                with self._lock:
                    if self._mask_engine is None:
                        self._mask_engine = parse_mask_engine(spec, self.device)
        return self._mask_engine

    @property
    def mask_source(self) -> str | None:
        """What ``segment`` uses: the mask engine's name (one given to the constructor, else
        ``PIXELLLM_MASK_ENGINE``: an engine asked for wins), else ``"model"`` when the model has its own mask
        decoder (``heads.mask_decoder > 0``), else None (``segment`` then raises ``NO_MASK_ENGINE``)."""
        engine = self.mask_engine
        if engine is not None:
            return str(getattr(engine, "name", type(engine).__name__))
        return "model" if getattr(self.model, "mask_decoder", None) is not None else None

    def segment(self, images: Sequence[ImageInput], texts: Sequence[Sequence[str] | None] | None = None,
                boxes: Sequence[Sequence[Sequence[float]] | None] | None = None,
                points: Sequence[Sequence[Sequence[float]] | None] | None = None,
                point_labels: Sequence[Sequence[int] | None] | None = None, *,
                adapter: str | None = None) -> list[list[MaskResult]]:
        """Masks for prompts: per image exactly one of its ``texts`` (each referred to a box by ``refer``, the
        box then prompts the mask), its ``boxes`` (``x1, y1, x2, y2`` image pixels) or its ``points``
        (``x, y`` image pixels, one prompt per point; ``point_labels`` 1 object / 0 not the object, default
        1). Each argument is None or one entry per image (None for an image prompted another way).

        The masks come from ``mask_source``: a mask engine when one was asked for, else the model's own mask
        decoder (the prompt's box; for a point, the point plus, when it marks the object (label 1), the
        model's region proposal that holds it with the nearest centre, else the whole image; points need
        ``prompt.points``; the best of its K masks by predicted IoU, upsampled to the image's pixels).

        Per image, one ``MaskResult`` per prompt in prompt order: ``box_xyxy`` the referred box (text), the
        given box clipped to the image (box) or the mask's box (point); ``score`` refer's score (text) or the
        mask score; ``mask`` COCO RLE and ``polygons`` in original image pixels; ``mask_score`` the mask's
        predicted IoU. An empty mask fails its image's call with a message naming the prompt."""
        images = image_list(images, "segment", PreparedInput)
        n = len(images)
        texts, boxes, points, point_labels = (
            None if value is None else per_image(value, n, f"entries of {name} (None for an image prompted "
                                                  "another way)", "segment")
            for name, value in (("texts", texts), ("boxes", boxes), ("points", points),
                                ("point_labels", point_labels)))
        kinds = [self._segment_kind(i, texts, boxes, points, point_labels) for i in range(n)]
        engine = self.mask_engine
        if engine is None:
            if getattr(self.model, "mask_decoder", None) is None:
                raise PixelLLMError(NO_MASK_ENGINE)
            return self._segment_model(images, kinds, texts, boxes, points, point_labels, adapter)
        with self._lock, torch.inference_mode():
            loaded = []
            for i, source in enumerate(images):
                if isinstance(source, PreparedInput):
                    raise InvalidImageError(f"image {i}: segment needs the image itself (masks are in its "
                                            "original pixels), not a PreparedInput")
                try:
                    loaded.append(load_image(source, self.limits))
                except PixelLLMError as exc:
                    raise type(exc)(f"image {i}: {exc}") from exc
            # text prompts: checked, then one refer call for every image that has them
            text_images = [i for i, kind in enumerate(kinds) if kind == "texts"]
            clean = {i: [self._clean_text(t, f"image {i} text {j}") if isinstance(t, str) else _not_text(i, j, t)
                         for j, t in enumerate(_as_list(texts[i]))] for i in text_images}
            referred: dict[int, list[Detection]] = {}
            asked = [i for i in text_images if clean[i]]
            if asked:
                found = self.refer([loaded[i] for i in asked], [clean[i] for i in asked], adapter=adapter)
                referred = {i: [dets[0] for dets in per_text] for i, per_text in zip(asked, found)}
            out: list[list[MaskResult]] = []
            for i, (image, kind) in enumerate(zip(loaded, kinds)):
                out.append(self._segment_image(engine, i, image, kind, referred.get(i),
                                               boxes[i] if kind == "boxes" else None,
                                               points[i] if kind == "points" else None,
                                               point_labels[i] if point_labels is not None else None))
            return out

    @torch.inference_mode()
    def _segment_model(self, images, kinds: list[str], texts, boxes, points, point_labels,
                       adapter: str | None) -> list[list[MaskResult]]:
        """``segment`` through the model's own mask decoder: every prompt of every image checked, the texts
        referred (one batched refer), then one decoder pass per chunk of prompts over the cached
        embeddings."""
        from ..masks import mask_to_box, mask_to_rle

        with self._lock:
            self._use_adapter(adapter)
            loaded = self._load(images)
            prompts: list[list[_MaskPrompt]] = [[] for _ in loaded]
            clean: dict[int, list[str]] = {}
            clicks: dict[int, tuple[list, list[int]]] = {}  # image -> (points, labels)
            for i, (image, kind) in enumerate(zip(loaded, kinds)):
                prepared = image.prepared
                w, h = prepared.original_size
                if kind == "texts":
                    clean[i] = [self._clean_text(t, f"image {i} text {j}") if isinstance(t, str)
                                else _not_text(i, j, t) for j, t in enumerate(_as_list(texts[i]))]
                elif kind == "boxes":
                    for j, box in enumerate(_as_list(boxes[i])):
                        try:
                            clipped = clip_box(box, w, h)
                        except InvalidBoxError as exc:
                            raise InvalidBoxError(f"image {i} box {j}: {exc}") from None
                        prompts[i].append(_MaskPrompt(i, prepared.to_canvas(clipped), None, 1, f"box {j}", clipped))
                else:
                    pts = [_check_point(i, j, p, w, h) for j, p in enumerate(_as_list(points[i]))]
                    given = point_labels[i] if point_labels is not None else None
                    labels = [1] * len(pts) if given is None else _check_labels(i, given, len(pts))
                    if pts and not self.config.prompt.points:
                        raise InvalidPromptError(f"image {i}: {NO_POINT_PROMPTS}")
                    clicks[i] = (pts, labels)
            # a positive click's box: its proposal, found for every image in one pass (else the whole image)
            held = self._point_proposals(loaded, {i: [p for p, lb in zip(pts, labels) if lb]
                                                  for i, (pts, labels) in clicks.items()})
            for i, (pts, labels) in clicks.items():
                boxes_held, prepared = iter(held[i]), loaded[i].prepared
                for j, ((x, y), label) in enumerate(zip(pts, labels)):
                    box = next(boxes_held) if label else None
                    canvas_box = self._global_box(loaded[i]) if box is None else prepared.to_canvas(box)
                    prompts[i].append(_MaskPrompt(i, canvas_box, tuple(prepared.to_canvas((x, y))), label,
                                                  f"point {j} ({x:g}, {y:g})"))
            asked = [i for i in clean if clean[i]]
            if asked:
                found = self._refer_loaded([loaded[i] for i in asked], [clean[i] for i in asked])
                for i, per_text in zip(asked, found):
                    prepared = loaded[i].prepared
                    w, h = prepared.original_size
                    for j, (d, *_) in enumerate(per_text):
                        prompts[i].append(_MaskPrompt(i, prepared.to_canvas(_at_least_a_pixel(d.box_xyxy, w, h)),
                                                      None, 1, f"text {j} ({d.text!r})", tuple(d.box_xyxy),
                                                      d.score, d.text))
            flat = [p for per_image in prompts for p in per_image]
            masks = self._decode_masks(loaded, flat)
            for p, (mask, _) in zip(flat, masks):
                if not mask.any():
                    raise PixelLLMError(f"image {p.image} {p.what}: the model's mask decoder predicted an empty "
                                        "mask; try another prompt (a tighter box, a point on the object)")
            out: list[list[MaskResult]] = [[] for _ in loaded]
            for p, (mask, mask_score) in zip(flat, masks):
                box = p.box if p.box is not None else mask_to_box(mask)
                score = p.score if p.score is not None else mask_score
                out[p.image].append(MaskResult(tuple(round(float(v), 2) for v in box), score, mask_to_rle(mask),
                                               _polygons(mask), mask_score, p.text, self.model_version))
            return out

    def _decode_masks(self, loaded: list[_Image], prompts: list[_MaskPrompt]) -> list[tuple[np.ndarray, float]]:
        """Per prompt, in order: (the best of the decoder's K masks by predicted IoU, as bool [H, W] of the
        original image; that predicted IoU clipped to [0, 1]). The image embeddings come from the cache."""
        import torch.nn.functional as F

        if not prompts:
            return []
        embedding = self._embed(loaded)
        sizes = self._sizes(loaded)
        canvas = self.config.vision.image_size
        out: list = [None] * len(prompts)
        for group in ([k for k, p in enumerate(prompts) if p.point is None],
                      [k for k, p in enumerate(prompts) if p.point is not None]):
            for chunk in self._chunks(group):
                ps = [prompts[k] for k in chunk]
                boxes = torch.tensor([p.canvas_box for p in ps], dtype=torch.float32, device=self.device)
                index = torch.tensor([p.image for p in ps], device=self.device)
                pts = labels = None
                if ps[0].point is not None:
                    pts = torch.tensor([[p.point] for p in ps], dtype=torch.float32, device=self.device)
                    pts = pts.to(self.dtype)
                    labels = torch.tensor([[p.label] for p in ps], dtype=torch.long, device=self.device)
                logits, iou = self.model.prompt_masks(embedding, boxes.to(self.dtype), index, sizes, pts, labels)
                iou = iou.float()
                best = iou.argmax(-1)
                ar = torch.arange(len(ps), device=best.device)
                low = logits[ar, best].float()  # [m, s, s] on the padded canvas (stride 4, or 1 refined)
                scores = iou[ar, best].clamp(0, 1).cpu().tolist()
                for n, (k, p) in enumerate(zip(chunk, ps)):
                    out[k] = (_to_original(low[n], loaded[p.image].prepared, canvas, F), round(float(scores[n]), 4))
        return out

    def _point_proposals(self, loaded: list[_Image], points: dict[int, list[tuple[float, float]]]
                         ) -> dict[int, list[tuple[float, float, float, float] | None]]:
        """Per image, per point (image pixels): the model's region proposal (image pixels) that holds the
        point with the nearest centre, or None (no proposal holds it, or the model has no proposal head)."""
        out: dict[int, list] = {i: [None] * len(pts) for i, pts in points.items()}
        asked = [i for i, pts in points.items() if pts]
        if not asked or getattr(self.model, "proposal_head", None) is None:
            return out
        images = [loaded[i] for i in asked]
        boxes, scores = self.model.propose(self._embed(images), self._sizes(images), POINT_PROPOSALS,
                                           POINT_PROPOSAL_MIN_SCORE)
        boxes, scores = boxes.float().cpu(), scores.float().cpu()
        for i, image_boxes, image_scores in zip(asked, boxes, scores):
            kept = image_boxes[(image_scores >= POINT_PROPOSAL_MIN_SCORE) & (image_scores > 0)]
            if not len(kept):
                continue
            proposals = loaded[i].prepared.normalised_to_original(kept)
            for j, (x, y) in enumerate(points[i]):
                holds = ((proposals[:, 0] <= x) & (x <= proposals[:, 2]) & (proposals[:, 1] <= y)
                         & (y <= proposals[:, 3]))
                if holds.any():
                    centres = (proposals[:, :2] + proposals[:, 2:]) / 2
                    distance = ((centres - torch.tensor([x, y])) ** 2).sum(1).masked_fill(~holds, float("inf"))
                    w, h = loaded[i].prepared.original_size
                    out[i][j] = _clip_soft(tuple(proposals[int(distance.argmin())].tolist()), w, h)
        return out

    @staticmethod
    def _segment_kind(i: int, texts, boxes, points, point_labels) -> str:
        present = [name for name, value in (("texts", texts), ("boxes", boxes), ("points", points))
                   if value is not None and value[i] is not None]
        if not present:
            raise InvalidPromptError(f"image {i}: segment needs texts, boxes or points")
        if len(present) > 1:
            raise InvalidPromptError(f"image {i}: give only one of texts, boxes or points, not "
                                     f"{' and '.join(present)}")
        if point_labels is not None and point_labels[i] is not None and present[0] != "points":
            raise InvalidPromptError(f"image {i}: point_labels go with points, not {present[0]}")
        return present[0]

    def _segment_image(self, engine, i: int, image, kind: str, referred, boxes, points,
                       labels) -> list[MaskResult]:
        from ..masks import mask_to_box, mask_to_rle

        w, h = image.size
        if kind == "texts":
            if not referred:
                return []
            prompts = [tuple(d.box_xyxy) for d in referred]
            masks = engine.predict(image, boxes=[_at_least_a_pixel(b, w, h) for b in prompts])
            what = [f"text {j} ({d.text!r})" for j, d in enumerate(referred)]
        elif kind == "boxes":
            prompts = []
            for j, box in enumerate(_as_list(boxes)):
                try:
                    prompts.append(clip_box(box, w, h))
                except InvalidBoxError as exc:
                    raise InvalidBoxError(f"image {i} box {j}: {exc}") from None
            if not prompts:
                return []
            masks = engine.predict(image, boxes=prompts)
            what = [f"box {j}" for j in range(len(prompts))]
        else:
            pts = [_check_point(i, j, p, w, h) for j, p in enumerate(_as_list(points))]
            labels = [1] * len(pts) if labels is None else _check_labels(i, labels, len(pts))
            if not pts:
                return []
            masks = engine.predict(image, points=pts, point_labels=labels)
            what = [f"point {j} ({p[0]:g}, {p[1]:g})" for j, p in enumerate(pts)]
        if len(masks) != len(what):
            raise PixelLLMError(f"image {i}: the mask engine answered {len(masks)} masks for {len(what)} prompts")
        results = []
        for j, (mask, mask_score) in enumerate(masks):
            mask = np.asarray(mask, dtype=bool)
            if mask.shape != (h, w):
                raise PixelLLMError(f"image {i}: the mask engine answered a {mask.shape[1]}x{mask.shape[0]} mask "
                                    f"for the {w}x{h} image")
            if not mask.any():
                raise PixelLLMError(f"image {i} {what[j]}: the mask engine predicted an empty mask; try another "
                                    "prompt (a tighter box, a point on the object)")
            mask_score = round(float(mask_score), 4)
            if kind == "texts":
                box, score, text = prompts[j], referred[j].score, referred[j].text
            elif kind == "boxes":
                box, score, text = prompts[j], mask_score, None
            else:
                box, score, text = mask_to_box(mask), mask_score, None
            results.append(MaskResult(tuple(round(float(v), 2) for v in box), score, mask_to_rle(mask),
                                      _polygons(mask), mask_score, text, self.model_version))
        return results


def _polygons(mask: np.ndarray) -> list[dict]:
    """``masks.mask_to_polygons`` of a mask, traced in its box only (the same polygons, in less time: the
    outline's work grows with the pixels it scans)."""
    from ..masks import mask_to_box, mask_to_polygons, offset_polygons

    x0, y0, x1, y1 = (int(v) for v in mask_to_box(mask))
    if x1 <= x0:
        return []
    return offset_polygons(mask_to_polygons(mask[y0:y1, x0:x1]), x0, y0)


def _to_original(logits: torch.Tensor, prepared: PreparedImage, canvas: int, F) -> np.ndarray:
    """Mask logits [s, s] over the padded canvas -> bool mask [H, W] of the original image: bilinear to the
    canvas's extent in original pixels, the padding cropped away, logits > 0."""
    w, h = prepared.original_size
    rw, rh = prepared.resized_size
    ext_w, ext_h = round(canvas * w / rw), round(canvas * h / rh)  # >= w, h: the image lies top-left
    up = F.interpolate(logits[None, None], size=(ext_h, ext_w), mode="bilinear", align_corners=False)
    return (up[0, 0, :h, :w] > 0).cpu().numpy()


def _region_words(traced: list[Word], composed: list[tuple[str, int | None]],
                  regions: list[RegionCaption]) -> list[Word]:
    """The traced words of a composed caption, each object word on its region's box (rather than the
    teacher-forced pointer); words past the model's text length are added: an object's on its box, a
    filler word on the box of the object it leads to (or the last one)."""
    def on(text: str, k: int) -> Word:
        b = regions[k].box_xyxy
        return Word(text, b, [(b[0], b[1]), (b[2], b[3])])

    words = [word if owner is None else on(word.text, owner)
             for word, owner in zip(traced, align_words([w.text for w in traced], composed))]
    if len(words) < len(composed) and [w.text for w in words] == [w for w, _ in composed[:len(words)]]:
        rest = composed[len(words):]
        for n, (text, owner) in enumerate(rest):
            if owner is None:
                owner = next((k for _, k in rest[n:] if k is not None), None)
                if owner is None:
                    owner = next(k for _, k in reversed(composed) if k is not None)
            words.append(on(text, owner))
    return words


def _clip_soft(box, width: float, height: float) -> tuple[float, float, float, float]:
    """Clip a predicted box to the image without raising (predictions may fall outside)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    x0, x1 = sorted((min(max(x0, 0.0), width), min(max(x1, 0.0), width)))
    y0, y1 = sorted((min(max(y0, 0.0), height), min(max(y1, 0.0), height)))
    return (round(x0, 2), round(y0, 2), round(x1, 2), round(y1, 2))


def _as_list(value, what: str = "prompts") -> list:
    """A per-image prompt list (a lone string is one text)."""
    if isinstance(value, str):
        return [value]
    try:
        return list(value)
    except TypeError:
        raise InvalidPromptError(f"{what} must be a list, got {type(value).__name__}") from None


def _not_text(i: int, j: int, value) -> str:
    raise InvalidPromptError(f"image {i} text {j}: must be a string, got {type(value).__name__}")


def _at_least_a_pixel(box, width: float, height: float) -> tuple[float, float, float, float]:
    """A referred box as a SAM prompt: at least one pixel wide and high, inside the image."""
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    x0, x1 = min(x0, cx - 0.5), max(x1, cx + 0.5)
    y0, y1 = min(y0, cy - 0.5), max(y1, cy + 0.5)
    return (max(x0, 0.0), max(y0, 0.0), min(x1, float(width)), min(y1, float(height)))


def _check_point(i: int, j: int, point, width: int, height: int) -> tuple[float, float]:
    numbers = (isinstance(point, (list, tuple)) and len(point) == 2
               and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in point))
    if not numbers or not all(math.isfinite(float(v)) for v in point):
        raise InvalidPromptError(f"image {i} point {j}: must be 2 finite numbers [x, y] in image pixels, "
                                 f"got {str(point)[:60]}")
    x, y = float(point[0]), float(point[1])
    if not (0 <= x <= width and 0 <= y <= height):
        raise InvalidPromptError(f"image {i} point {j}: ({x:g}, {y:g}) lies outside the {width}x{height} image")
    return (x, y)
