"""The batch the model consumes and what it returns. Shapes: B images, N prompts per image,
Tc context tokens, T text tokens, M ground-truth boxes, V vocabulary, H LM hidden size.

Coordinate frames inside the model:
- ``prompt_boxes`` are x1,y1,x2,y2 in pixels of the square canvas (the resized image sits at the
  top-left, zero padding to the right/bottom); ``image_sizes`` gives the resized image's (w, h) there.
- Every point/box *target and prediction* is normalised by the un-padded image size: (0,0) is the
  image's top-left and (1,1) its bottom-right, so multiplying by the original (W, H) gives original pixels.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
from torch import Tensor


@dataclass
class ModelInputs:
    pixel_values: Tensor  # [B,3,S,S] float, normalised, padded area zero
    image_sizes: Tensor  # [B,2] float (w,h) of the resized, un-padded image in canvas pixels
    prompt_boxes: Tensor  # [B,N,4] float, canvas pixels; the global box is [0,0,w,h]
    prompt_mask: Tensor  # [B,N] bool, True for real prompts
    context_ids: Tensor  # [B,N,Tc] long, padded with the tokenizer's pad id; ends with EOS
    context_mask: Tensor  # [B,N,Tc] bool
    text_ids: Tensor | None = None  # [B,N,T] long: BOS + text + EOS, then PAD
    text_mask: Tensor | None = None  # [B,N,T] bool
    # ---- training targets --------------------------------------------------------------------
    target_points: Tensor | None = None  # [B,N,T,4] normalised (x0,y0,x1,y1) per text position
    point_mask: Tensor | None = None  # [B,N,T] bool, positions with a point target
    text_loss_mask: Tensor | None = None  # [B,N] bool, prompts whose text gets cross-entropy
    gt_boxes: Tensor | None = None  # [B,M,4] normalised xyxy, for the proposal head
    gt_boxes_mask: Tensor | None = None  # [B,M] bool
    # target masks (heads.mask_decoder; data.collate_with_masks fills them): each prompt row's mask on the
    # padded canvas at S/stride x S/stride (stride 4 matches the decoder; others are resized to its logits)
    target_masks: Tensor | None = None  # [B,N,S/stride,S/stride] bool
    mask_valid: Tensor | None = None  # [B,N] bool, rows with a target mask
    # the box that prompts the mask decoder, canvas pixels: the target's box (a refer row's prompt box is the
    # whole image; at inference the refer head's box takes its place); None = prompt_boxes
    mask_boxes: Tensor | None = None  # [B,N,4] float
    # point prompts (prompt.points; data.collate_for_model draws them in training): canvas pixels x,y and
    # labels 1 positive, 0 negative, -1 padding; a row whose labels are all -1 is a box-only prompt.
    # prompt_points go with prompt_boxes (the language model's prompt), mask_points with mask_boxes (the
    # mask decoder's): a refer row's language prompt is the whole image, so it never carries the object's point
    prompt_points: Tensor | None = None  # [B,N,P,2] float
    prompt_point_labels: Tensor | None = None  # [B,N,P] long
    mask_points: Tensor | None = None  # [B,N,P,2] float
    mask_point_labels: Tensor | None = None  # [B,N,P] long
    task: str = ""  # source/task name of the batch (for logging)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> ModelInputs:
        moved = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Tensor):
                if dtype is not None and v.is_floating_point() and f.name == "pixel_values":
                    v = v.to(device=device, dtype=dtype)
                else:
                    v = v.to(device)
            moved[f.name] = v
        return ModelInputs(**moved)

    @property
    def batch_size(self) -> int:
        return self.pixel_values.shape[0]


@dataclass
class ModelOutput:
    logits: Tensor | None = None  # [B,N,T,V]
    hidden: Tensor | None = None  # [B,N,T,H]
    points: Tensor | None = None  # [B,N,T,4] normalised x0,y0,x1,y1 (unclipped, as in the paper)
    confidence: Tensor | None = None  # [B,N,T] logits of the predicted-IoU head
    # heads.mask_decoder, when the batch has target masks (zeros at rows without one)
    mask_logits: Tensor | None = None  # [B,N,K,s,s] on the padded canvas (s = S/4, or S refined)
    mask_iou: Tensor | None = None  # [B,N,K] predicted IoU of each mask
    proposals: dict[str, Tensor] = field(default_factory=dict)  # raw proposal-head maps
    loss: Tensor | None = None
    losses: dict[str, float] = field(default_factory=dict)


@dataclass
class ImageEmbedding:
    """One vision pass over a batch of images: what every prompt on those images reads.

    ``tokens`` [B,L,C] are the vision encoder's image tokens; ``maps`` the proposal head's maps (and the fine
    map under ``"fine"``) when the model's prompts or points read them, or when asked for (dense
    captioning). The Predictor caches one per image (``split``/``stack``) without looking inside.
    """

    tokens: Tensor
    maps: dict[str, Tensor] | None = None

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def split(self) -> list[ImageEmbedding]:
        """One embedding per image (views, no copy)."""
        return [ImageEmbedding(t, None if self.maps is None else {k: v[i] for k, v in self.maps.items()})
                for i, t in enumerate(self.tokens)]

    @staticmethod
    def stack(parts: list[ImageEmbedding]) -> ImageEmbedding:
        """A batch from per-image embeddings (the maps every part has)."""
        tokens = torch.stack([p.tokens for p in parts])
        if any(p.maps is None for p in parts):
            return ImageEmbedding(tokens)
        shared = [k for k in parts[0].maps if all(k in p.maps for p in parts)]
        return ImageEmbedding(tokens, {k: torch.stack([p.maps[k] for p in parts]) for k in shared} or None)


@dataclass
class PromptOutput:
    """The prompt pass over M (image, prompt) rows: text logits, hidden states, 2 points and a confidence
    per text position; a grid point head adds its cell logits and boxes (the pointer loss reads them)."""

    logits: Tensor  # [M,T,V]
    hidden: Tensor  # [M,T,H]
    points: Tensor  # [M,T,4] normalised x0,y0,x1,y1
    confidence: Tensor  # [M,T] logits (0 without a confidence head)
    cell_logits: Tensor | None = None
    cell_boxes: Tensor | None = None
