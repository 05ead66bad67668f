"""Samples -> :class:`ModelInputs`, with the paper's target construction per task.

- refer: global prompt box; context ``templates.refer_prefix + expr`` + EOS; text BOS + expr + EOS; one
  point target (the box corners) at the position whose next token is EOS; no text loss.
- trace: global box; context ``templates.caption_prompt``; text loss; every word-piece position gets the
  box of the utterance assigned to it by position (spec 4.1, :func:`utterance_assignment`).
- region: the region box is the prompt; context ``templates.region_prompt``; text loss; the region box is
  the point target on every word-piece position.
- caption: global box; context ``"a photo of "`` (or the record's own); text loss only.

All targets are normalised by the un-padded image size. Padding prompt rows (``prompt_mask`` False) hold a
minimal valid sequence (context ``[EOS]``, text ``[BOS, EOS]``) so that no attention row is empty; they
carry no loss.

Masks: :func:`collate` ignores ``PromptRecord.target_mask`` (its transforms drop them rather than map them:
no cost); :func:`collate_with_masks` returns the same :class:`ModelInputs` (the same random draws) with
``target_masks`` / ``mask_valid`` and ``mask_boxes`` (each row's target box: the mask decoder's box prompt)
filled, plus :class:`MaskTargets`, each prompt row's target mask on the
padded canvas, for the mask decoder's loss (``heads.mask_decoder``).

Training batches for a given model: :func:`collate_for_model` is :func:`collate` for a model without a mask
decoder or point prompts (the very same batch), and otherwise adds what that model trains on: target
masks at stride 4 (``heads.mask_decoder > 0``) and, with ``point_prompt_prob`` (``prompt.points``), point
prompts (:func:`sample_point_prompts`): a fraction of region rows (box -> text) and of mask rows get a
positive point inside the object's mask (near the box centre without one), sometimes a negative point
outside it, and half of them lose their box for the whole image's (a point alone).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..config import PixelLLMConfig, PromptTemplates
from ..masks import rle_to_mask
from ..modeling.inputs import ModelInputs
from ..tokenizer import PixelTokenizer
from .transforms import TASK_AUGMENT, AugmentConfig, TransformedSample, _Rng, eval_transform, train_transform
from .types import Box, GroundedSample, PromptRecord

CAPTION_SHORT_PROMPT = "a photo of "  # spec 3.6; the config has no template for short captions
DEFAULT_MAX_PROMPTS = 8
MASK_STRIDE = 4  # the mask decoder's logits: stride 4 on the canvas (stride 1 with heads.mask_refine)
# point prompts (collate_for_model): per point-prompted row
POINT_SLOTS = 2  # a positive point, then a negative one or padding (label -1)
POINT_KEEP_BOX_PROB = 0.5  # the row keeps its box (box + points); else the whole image's box (points alone)
POINT_NEGATIVE_PROB = 0.5  # a negative point outside the object joins the positive one
POINT_NEGATIVE_MARGIN = 0.5  # ... drawn in the object's box grown by this fraction of its sides per side
POINT_NEGATIVE_TRIES = 16
POINT_CENTRE_JITTER = 0.1  # no mask: the positive point is the box centre +- this fraction of its sides
REGION_BOX_JITTER = 0.1  # a jittered region box: each side moves by up to this fraction of the box's size


@dataclass
class EncodedPrompt:
    prompt_box: Box  # canvas pixels
    context_ids: list[int]
    text_ids: list[int]
    target_points: np.ndarray  # [T,4] float32, normalised
    point_mask: np.ndarray  # [T] bool
    text_loss: bool


def context_text(record: PromptRecord, templates: PromptTemplates) -> str:
    if record.task == "refer":
        return templates.refer_prefix + record.text
    if record.context is not None:
        return record.context
    if record.task == "region":
        return templates.region_prompt
    if record.task == "trace":
        return templates.caption_prompt
    return CAPTION_SHORT_PROMPT


def utterance_assignment(num_tokens: int, valid: Sequence[bool]) -> np.ndarray:
    """Utterance index for each of ``num_tokens`` word-piece tokens (spec 4.1), -1 when none is valid.

    The k-th valid utterance (k = 1..K) sits at k/K, invalid ones at -1; token j (j = 1..J) sits at
    1/K + (j/J)(1 - 1/K) and takes the nearest utterance. Purely positional: no string matching.
    """
    positions = np.full(len(valid), -1.0)
    k_valid = int(sum(bool(v) for v in valid))
    if k_valid == 0 or num_tokens == 0:
        return np.full(num_tokens, -1, dtype=np.int64)
    positions[np.flatnonzero(np.asarray(valid, dtype=bool))] = np.arange(1, k_valid + 1) / k_valid
    p_min, p_max = 1.0 / k_valid, 1.0
    q = p_min + np.arange(1, num_tokens + 1) / num_tokens * (p_max - p_min)
    return np.argmin((q[:, None] - positions[None, :]) ** 2, axis=1)


def _norm(box: Box, w: float, h: float) -> list[float]:
    return [box[0] / w, box[1] / h, box[2] / w, box[3] / h]


def encode_prompt(record: PromptRecord, image_size: tuple[float, float], tokenizer: PixelTokenizer,
                  config: PixelLLMConfig) -> EncodedPrompt:
    """Token ids and targets of one prompt; boxes of ``record`` in canvas pixels of an image of ``image_size``."""
    w, h = image_size
    lang = config.language
    context = tokenizer.encode(context_text(record, config.templates), max_len=lang.max_context_tokens,
                               add_bos=False, add_eos=True)
    full = tokenizer.encode(record.text, add_bos=True, add_eos=True)
    text = tokenizer.encode(record.text, max_len=lang.max_text_tokens, add_bos=True, add_eos=True)
    specials = {tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id}
    T = len(text)
    points = np.zeros((T, 4), dtype=np.float32)
    mask = np.zeros(T, dtype=bool)
    words = [i for i in range(1, T - 1) if text[i] not in specials]  # word-piece positions (truncated text)
    global_box: Box = (0.0, 0.0, float(w), float(h))
    if record.task == "refer":
        if record.target_box is not None and T >= 3:
            points[T - 2] = _norm(record.target_box, w, h)
            mask[T - 2] = True
        return EncodedPrompt(global_box, context, text, points, mask, False)
    if record.task == "region":
        box = record.box if record.box is not None else record.target_box or global_box
        target = record.target_box if record.target_box is not None else box
        points[words] = _norm(target, w, h)
        mask[words] = True
        return EncodedPrompt(box, context, text, points, mask, True)
    if record.task == "trace":
        # assign on the full token sequence, then keep the truncated prefix (truncation must not squeeze
        # every utterance into fewer tokens)
        full_words = [i for i in range(len(full)) if full[i] not in specials]
        assign = utterance_assignment(len(full_words), record.utterance_valid)
        for pos, utt in zip(full_words, assign):
            if pos >= T - 1 or utt < 0:
                continue
            rel = record.utterance_boxes_rel[utt]
            if rel is None:
                continue
            points[pos] = np.clip(rel, 0.0, 1.0)
            mask[pos] = True
        return EncodedPrompt(global_box, context, text, points, mask, True)
    return EncodedPrompt(global_box, context, text, points, mask, True)


def _augment_for(sample: GroundedSample, augment: AugmentConfig | Mapping[str, AugmentConfig] | None) -> AugmentConfig:
    if isinstance(augment, AugmentConfig):
        return augment
    table = augment if augment is not None else TASK_AUGMENT
    task = sample.prompts[0].task if sample.prompts else "caption"
    return table.get(task, AugmentConfig())


def _select(prompts: list[PromptRecord], max_prompts: int, rng: _Rng | None) -> list[PromptRecord]:
    if len(prompts) <= max_prompts:
        return prompts
    if rng is None:
        return prompts[:max_prompts]
    pool = list(range(len(prompts)))
    chosen = sorted(pool.pop(rng.randint(0, len(pool) - 1)) for _ in range(max_prompts))
    return [prompts[i] for i in chosen]


@dataclass
class MaskTargets:
    """Target masks of a batch's prompt rows, aligned with :class:`ModelInputs`' ``[B, N]`` rows."""

    masks: torch.Tensor  # [B, N, S // stride, S // stride] bool, on the padded canvas; zeros where no mask
    mask_valid: torch.Tensor  # [B, N] bool: the row is a prompt with an annotated mask
    stride: int = 1  # canvas pixels per mask cell (a cell is in when >= half its pixels are)


def collate(samples: Sequence[GroundedSample | TransformedSample], tokenizer: PixelTokenizer,
            config: PixelLLMConfig, train: bool = False,
            generator: torch.Generator | np.random.Generator | None = None, *,
            max_prompts: int = DEFAULT_MAX_PROMPTS,
            augment: AugmentConfig | Mapping[str, AugmentConfig] | None = None,
            task: str | None = None) -> ModelInputs:
    """Transform (train: random augmentation from ``generator``; eval: resize + pad) and batch ``samples``.

    At most ``max_prompts`` prompts per image (train: a random subset; eval: the first ones). Token
    sequences are truncated to ``config.language.max_context_tokens`` / ``max_text_tokens`` and padded to
    the longest in the batch.
    """
    return _collate(samples, tokenizer, config, train, generator, max_prompts, augment, task, masks=False)[0]


def collate_with_masks(samples: Sequence[GroundedSample | TransformedSample], tokenizer: PixelTokenizer,
                       config: PixelLLMConfig, train: bool = False,
                       generator: torch.Generator | np.random.Generator | None = None, *,
                       max_prompts: int = DEFAULT_MAX_PROMPTS,
                       augment: AugmentConfig | Mapping[str, AugmentConfig] | None = None,
                       task: str | None = None, mask_stride: int = 1) -> tuple[ModelInputs, MaskTargets]:
    """:func:`collate` (identical inputs for the same generator state) plus the rows' target masks, which
    also fill the inputs' ``target_masks`` and ``mask_valid`` (what ``PixelLLM.forward``'s mask loss reads;
    ``mask_stride`` 4 matches the mask decoder's logits), and ``mask_boxes``: each row's target box (canvas
    pixels), which prompts the mask decoder (a refer row's prompt box is the whole image)."""
    inputs, items, selected = _collate(samples, tokenizer, config, train, generator, max_prompts, augment,
                                       task, masks=True)
    return _with_masks(inputs, items, selected, config, mask_stride)


def _with_masks(inputs: ModelInputs, items: Sequence[TransformedSample], selected: Sequence[Sequence[PromptRecord]],
                config: PixelLLMConfig, stride: int) -> tuple[ModelInputs, MaskTargets]:
    targets = prompt_masks(items, selected, config.vision.image_size, inputs.prompt_mask.shape[1], stride)
    mask_boxes = inputs.prompt_boxes.clone()  # the decoder's box prompt: the target's box (refer rows)
    for b, prompts in enumerate(selected):
        for n, p in enumerate(prompts[: mask_boxes.shape[1]]):
            if p.target_box is not None:
                mask_boxes[b, n] = torch.tensor(p.target_box, dtype=mask_boxes.dtype)
    return dataclasses.replace(inputs, target_masks=targets.masks, mask_valid=targets.mask_valid,
                               mask_boxes=mask_boxes), targets


def mask_stride(config: PixelLLMConfig) -> int:
    """Canvas pixels per cell of ``config``'s mask logits: :data:`MASK_STRIDE`, or 1 with a mask refiner."""
    return 1 if config.heads.mask_refine > 0 else MASK_STRIDE


def collate_for_model(samples: Sequence[GroundedSample | TransformedSample], tokenizer: PixelTokenizer,
                      config: PixelLLMConfig, train: bool = False,
                      generator: torch.Generator | np.random.Generator | None = None, *,
                      max_prompts: int = DEFAULT_MAX_PROMPTS,
                      augment: AugmentConfig | Mapping[str, AugmentConfig] | None = None,
                      task: str | None = None, point_prompt_prob: float = 0.0,
                      point_rng: torch.Generator | np.random.Generator | None = None,
                      masks: bool = True) -> ModelInputs:
    """The training batch of ``config``'s model: :func:`collate` (the same batch, bit for bit) for a model
    without a mask decoder or point prompts; otherwise the same inputs (the same draws from ``generator``)
    plus target masks at the decoder's stride, :func:`mask_stride` (``heads.mask_decoder > 0``, as
    :func:`collate_with_masks`; a row whose mask is empty at that stride, an object smaller than about two
    cells, gets ``mask_valid`` False) and, when ``train`` and ``point_prompt_prob > 0`` with ``prompt.points``,
    point prompts drawn from ``point_rng`` (default: ``generator``, after every other draw) by
    :func:`sample_point_prompts`. ``masks=False`` leaves the target masks out even for a model with a mask
    decoder (one that does not learn: the same draws, no mask loss to compute)."""
    with_masks = masks and config.heads.mask_decoder > 0
    with_points = train and point_prompt_prob > 0 and config.prompt.points
    if not with_masks and not with_points:
        return collate(samples, tokenizer, config, train, generator, max_prompts=max_prompts, augment=augment,
                       task=task)
    inputs, items, selected = _collate(samples, tokenizer, config, train, generator, max_prompts, augment,
                                       task, masks=True)
    if with_masks:
        inputs = _with_masks(inputs, items, selected, config, mask_stride(config))[0]
        # an object too small to fill half a cell at the decoder's stride has no target there: no mask loss
        inputs.mask_valid = inputs.mask_valid & inputs.target_masks.flatten(2).any(-1)
    if with_points:
        inputs = sample_point_prompts(inputs, items, selected, point_prompt_prob,
                                      point_rng if point_rng is not None else generator, masks=with_masks)
    return inputs


def sample_point_prompts(inputs: ModelInputs, items: Sequence[TransformedSample],
                         selected: Sequence[Sequence[PromptRecord]], prob: float,
                         generator: torch.Generator | np.random.Generator | None, *, masks: bool) -> ModelInputs:
    """Point prompts for a fraction ``prob`` of the batch's region rows and, with ``masks`` (the batch trains
    the mask decoder), of its refer rows with a target mask: one positive point, uniform over the object's
    mask (``target_mask``; without one, the box centre +- :data:`POINT_CENTRE_JITTER`), plus, with
    :data:`POINT_NEGATIVE_PROB`, one negative point in the grown box outside the mask (outside the box without
    one). With :data:`POINT_KEEP_BOX_PROB` the row keeps its box, else its box becomes the whole image's
    ``[0, 0, w, h]`` (the point is the only location). Region rows: ``prompt_points`` (the language model's
    prompt) and ``mask_points``; refer rows (whose language prompt is the whole image): ``mask_points`` only.
    Points are canvas pixels (integer pixel indices; the prompt encoder takes pixel centres), labels 1 / 0,
    -1 for an empty slot; a row without points has only -1 (a box-only prompt in the model)."""
    rng = _Rng(generator)
    b_, n_ = inputs.prompt_mask.shape
    text_points = np.zeros((b_, n_, POINT_SLOTS, 2), np.float32)
    text_labels = np.full((b_, n_, POINT_SLOTS), -1, np.int64)
    mask_points, mask_labels = text_points.copy(), text_labels.copy()
    prompt_boxes = inputs.prompt_boxes.clone()
    mask_boxes = inputs.mask_boxes.clone() if inputs.mask_boxes is not None else None
    for b, (it, prompts) in enumerate(zip(items, selected)):
        w, h = it.image_size
        for n, p in enumerate(prompts[:n_]):
            region = p.task == "region"
            if not (region or (masks and p.task == "refer" and p.target_mask is not None)):
                continue
            if rng.uniform(0.0, 1.0) >= prob:
                continue
            box = p.target_box if p.target_box is not None else p.box
            if box is None:
                continue
            mask = rle_to_mask(p.target_mask) if p.target_mask is not None else None
            points, labels = _draw_points(rng, box, mask, w, h)
            whole_image = rng.uniform(0.0, 1.0) >= POINT_KEEP_BOX_PROB
            mask_points[b, n, : len(points)], mask_labels[b, n, : len(labels)] = points, labels
            if mask_boxes is not None and whole_image:
                mask_boxes[b, n] = torch.tensor((0.0, 0.0, w, h), dtype=mask_boxes.dtype)
            if region:
                text_points[b, n], text_labels[b, n] = mask_points[b, n], mask_labels[b, n]
                if whole_image:
                    prompt_boxes[b, n] = torch.tensor((0.0, 0.0, w, h), dtype=prompt_boxes.dtype)
    t = torch.from_numpy
    return dataclasses.replace(inputs, prompt_boxes=prompt_boxes, mask_boxes=mask_boxes,
                               prompt_points=t(text_points), prompt_point_labels=t(text_labels),
                               mask_points=t(mask_points), mask_point_labels=t(mask_labels))


def jitter_region_boxes(inputs: ModelInputs, prob: float, generator: np.random.Generator,
                        scale: float = REGION_BOX_JITTER) -> ModelInputs:
    """A region batch (``inputs.task == "region"``) with a fraction ``prob`` of its rows' box prompts moved:
    each side by a uniform draw of up to ``scale`` of the box's width or height, clipped to the image, so
    the captions (and the masks, whose decoder box moves with it) learn to hold for boxes drawn loosely, as
    people and region proposals draw them. Rows whose box is the whole image (point prompts) keep it. Other
    batches come back unchanged."""
    if inputs.task != "region" or prob <= 0:
        return inputs
    boxes = inputs.prompt_boxes.clone()
    mask_boxes = inputs.mask_boxes.clone() if inputs.mask_boxes is not None else None
    for b in range(boxes.shape[0]):
        w, h = (float(v) for v in inputs.image_sizes[b])
        for n in range(boxes.shape[1]):
            if not bool(inputs.prompt_mask[b, n]) or generator.uniform() >= prob:
                continue
            x0, y0, x1, y1 = (float(v) for v in boxes[b, n])
            if x0 <= 0.5 and y0 <= 0.5 and x1 >= w - 0.5 and y1 >= h - 0.5:
                continue
            bw, bh = x1 - x0, y1 - y0
            dx0, dy0, dx1, dy1 = generator.uniform(-scale, scale, 4) * (bw, bh, bw, bh)
            moved = (min(max(x0 + dx0, 0.0), w), min(max(y0 + dy0, 0.0), h),
                     min(max(x1 + dx1, 0.0), w), min(max(y1 + dy1, 0.0), h))
            if moved[2] - moved[0] < 1 or moved[3] - moved[1] < 1:
                continue
            boxes[b, n] = torch.tensor(moved, dtype=boxes.dtype)
            if mask_boxes is not None:
                mask_boxes[b, n] = boxes[b, n].to(mask_boxes.dtype)
    return dataclasses.replace(inputs, prompt_boxes=boxes, mask_boxes=mask_boxes)


def _draw_points(rng: _Rng, box: Box, mask: np.ndarray | None, w: float, h: float
                 ) -> tuple[list[tuple[float, float]], list[int]]:
    """A positive point on the object (and maybe a negative one off it), canvas pixel indices."""
    x1, y1, x2, y2 = box
    wmax, hmax = max(0, int(math.ceil(w)) - 1), max(0, int(math.ceil(h)) - 1)
    ys, xs = np.nonzero(mask) if mask is not None else (np.zeros(0, np.int64), np.zeros(0, np.int64))
    if len(xs):
        k = rng.randint(0, len(xs) - 1)
        pos = (float(xs[k]), float(ys[k]))
    else:
        jx, jy = POINT_CENTRE_JITTER * (x2 - x1), POINT_CENTRE_JITTER * (y2 - y1)
        cx, cy = rng.uniform(-jx, jx) + (x1 + x2) / 2, rng.uniform(-jy, jy) + (y1 + y2) / 2
        pos = (float(min(max(int(cx), 0), wmax)), float(min(max(int(cy), 0), hmax)))
    points, labels = [pos], [1]
    if rng.uniform(0.0, 1.0) < POINT_NEGATIVE_PROB:
        mx, my = POINT_NEGATIVE_MARGIN * (x2 - x1), POINT_NEGATIVE_MARGIN * (y2 - y1)
        lo_x, hi_x = max(0, int(x1 - mx)), min(wmax, int(x2 + mx))
        lo_y, hi_y = max(0, int(y1 - my)), min(hmax, int(y2 + my))
        for _ in range(POINT_NEGATIVE_TRIES):
            x, y = rng.randint(lo_x, hi_x), rng.randint(lo_y, hi_y)
            inside = (bool(mask[y, x]) if mask is not None and y < mask.shape[0] and x < mask.shape[1]
                      else mask is None and x1 <= x + 0.5 <= x2 and y1 <= y + 0.5 <= y2)
            if not inside:
                points.append((float(x), float(y)))
                labels.append(0)
                break
    return points, labels


def prompt_masks(items: Sequence[TransformedSample], selected: Sequence[Sequence[PromptRecord]], size: int,
                 num_rows: int, stride: int = 1) -> MaskTargets:
    """``selected[b][n]``'s ``target_mask`` (un-padded canvas frame) on the ``size`` x ``size`` padded canvas,
    downsampled by ``stride`` (a cell is in when at least half its pixels are)."""
    if stride < 1 or size % stride:
        raise ValueError(f"mask stride {stride} must divide the canvas size {size}")
    g = size // stride
    masks = np.zeros((len(items), num_rows, g, g), bool)
    valid = np.zeros((len(items), num_rows), bool)
    for b, prompts in enumerate(selected):
        for n, p in enumerate(prompts[:num_rows]):
            if p.target_mask is None:
                continue
            m = rle_to_mask(p.target_mask)
            canvas = np.zeros((size, size), bool)
            h, w = min(m.shape[0], size), min(m.shape[1], size)
            canvas[:h, :w] = m[:h, :w]
            if stride > 1:
                canvas = canvas.reshape(g, stride, g, stride).mean(axis=(1, 3)) >= 0.5
            masks[b, n] = canvas
            valid[b, n] = True
    return MaskTargets(torch.from_numpy(masks), torch.from_numpy(valid), stride)


def _collate(samples: Sequence[GroundedSample | TransformedSample], tokenizer: PixelTokenizer,
             config: PixelLLMConfig, train: bool, generator: torch.Generator | np.random.Generator | None,
             max_prompts: int, augment: AugmentConfig | Mapping[str, AugmentConfig] | None,
             task: str | None, *, masks: bool
             ) -> tuple[ModelInputs, list[TransformedSample], list[list[PromptRecord]]]:
    if not samples:
        raise ValueError("collate needs at least one sample")
    rng = _Rng(generator) if train else None
    items: list[TransformedSample] = []
    for s in samples:
        if isinstance(s, TransformedSample):
            items.append(s)
        elif train:
            items.append(train_transform(s, config.vision, _augment_for(s, augment), generator, masks=masks))
        else:
            items.append(eval_transform(s, config.vision, masks=masks))
    selected = [_select(it.prompts, max_prompts, rng) for it in items]  # the same draws, in the same order
    encoded = [[encode_prompt(p, it.image_size, tokenizer, config) for p in sel]
               for it, sel in zip(items, selected)]
    B = len(items)
    N = max(1, max(len(e) for e in encoded))
    Tc = max([1] + [len(p.context_ids) for e in encoded for p in e])
    T = max([2] + [len(p.text_ids) for e in encoded for p in e])
    M = max([1] + [len(it.gt_boxes) for it in items])
    pad = tokenizer.pad_id
    # filled as numpy arrays and converted once: many small torch ops are slow in data workers
    prompt_boxes = np.zeros((B, N, 4), np.float32)
    prompt_mask = np.zeros((B, N), bool)
    context_ids = np.full((B, N, Tc), pad, np.int64)
    context_mask = np.zeros((B, N, Tc), bool)
    text_ids = np.full((B, N, T), pad, np.int64)
    text_mask = np.zeros((B, N, T), bool)
    target_points = np.zeros((B, N, T, 4), np.float32)
    point_mask = np.zeros((B, N, T), bool)
    text_loss_mask = np.zeros((B, N), bool)
    gt_boxes = np.zeros((B, M, 4), np.float32)
    gt_boxes_mask = np.zeros((B, M), bool)
    for b, (it, prompts) in enumerate(zip(items, encoded)):
        w, h = it.image_size
        for n in range(N):
            if n < len(prompts):
                p = prompts[n]
                ctx, txt = p.context_ids, p.text_ids
                prompt_boxes[b, n] = p.prompt_box
                prompt_mask[b, n] = True
                target_points[b, n, : len(txt)] = p.target_points
                point_mask[b, n, : len(txt)] = p.point_mask
                text_loss_mask[b, n] = p.text_loss
            else:  # padding row: a minimal valid sequence, no loss
                ctx, txt = [tokenizer.eos_id], [tokenizer.bos_id, tokenizer.eos_id]
                prompt_boxes[b, n] = (0.0, 0.0, w, h)
            context_ids[b, n, : len(ctx)] = ctx
            context_mask[b, n, : len(ctx)] = True
            text_ids[b, n, : len(txt)] = txt
            text_mask[b, n, : len(txt)] = True
        for m, box in enumerate(it.gt_boxes):
            gt_boxes[b, m] = _norm(box, w, h)
            gt_boxes_mask[b, m] = True
    if task is None:
        task = "+".join(sorted({p.task for it in items for p in it.prompts})) or "none"
    t = torch.from_numpy
    inputs = ModelInputs(
        pixel_values=_stack_pixels(items, config.vision.image_size),
        image_sizes=t(np.asarray([it.image_size for it in items], np.float32)),
        prompt_boxes=t(prompt_boxes), prompt_mask=t(prompt_mask), context_ids=t(context_ids),
        context_mask=t(context_mask), text_ids=t(text_ids), text_mask=t(text_mask),
        target_points=t(target_points), point_mask=t(point_mask), text_loss_mask=t(text_loss_mask),
        gt_boxes=t(gt_boxes), gt_boxes_mask=t(gt_boxes_mask), task=task)
    return inputs, items, selected


def _stack_pixels(items: list[TransformedSample], size: int) -> torch.Tensor:
    shapes = {tuple(it.pixel_values.shape) for it in items}
    if shapes != {(3, size, size)}:
        raise ValueError(f"transformed samples have pixel shapes {sorted(shapes)}, but the config's canvas is "
                         f"3x{size}x{size}; transform them with the same VisionConfig")
    return torch.from_numpy(np.stack([it.pixel_values.numpy() for it in items]))
