"""Training losses (spec 4): label-smoothed CE, point L1, confidence (IoU) BCE, CenterNet detection; with
``heads.mask_decoder``, SAM's mask losses (focal + dice of the best of K masks, MSE of the predicted IoU).

Each function returns a scalar and is given already-flattened valid prompts. ``combine_losses`` weights
the terms from ``LossConfig`` and skips a term whose targets are absent.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import LossConfig
from .heads import ProposalHead

SIZE_WEIGHT = 5.0  # canvas-normalised box size L1, relative to the heatmap focal loss
OFFSET_WEIGHT = 1.0  # centre offset L1 in map cells


def text_loss(logits: Tensor, text_ids: Tensor, text_mask: Tensor, smoothing: float) -> Tensor:
    """GRiT-style smoothed CE: ``1 - eps`` on the target, ``eps / (V - 1)`` elsewhere.

    logits [M,T,V] (position i predicts token i+1), text_ids/text_mask [M,T]. No loss for predicting
    BOS (position 0 is only an input); EOS counts; padded targets are skipped.
    """
    valid = text_mask[:, 1:].bool()
    if not valid.any():
        return logits.sum() * 0.0
    logp = F.log_softmax(logits[:, :-1][valid].float(), dim=-1)  # [K,V]
    target = text_ids[:, 1:][valid]
    nll = -logp.gather(1, target[:, None]).squeeze(1)
    v = logp.shape[-1]
    other = -(logp.sum(-1) + nll) / max(v - 1, 1)  # mean NLL over the non-target tokens
    return ((1 - smoothing) * nll + smoothing * other).mean()


def point_loss(points: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Mean L1 over coordinates of normalised points at ``mask`` positions: points/target [...,4], mask [...]."""
    mask = mask.bool()
    if not mask.any():
        return points.sum() * 0.0
    return (points[mask].float() - target[mask].float()).abs().mean()


def points_to_boxes(points: Tensor) -> Tensor:
    """[..., 2k] points -> [..., 4] boxes as min/max over the k points."""
    xy = points.reshape(*points.shape[:-1], -1, 2)
    return torch.cat([xy.amin(-2), xy.amax(-2)], dim=-1)


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """Elementwise IoU of xyxy boxes [...,4]."""
    lt, rb = torch.maximum(a[..., :2], b[..., :2]), torch.minimum(a[..., 2:], b[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_a = (a[..., 2:] - a[..., :2]).clamp(min=0).prod(-1)
    area_b = (b[..., 2:] - b[..., :2]).clamp(min=0).prod(-1)
    return inter / (area_a + area_b - inter).clamp(min=1e-9)


def confidence_loss(logits: Tensor, points: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """BCE-with-logits of the confidence against IoU(detached predicted box, target box) at ``mask``."""
    mask = mask.bool()
    if not mask.any():
        return logits.sum() * 0.0
    iou = box_iou(points_to_boxes(points[mask].detach().float()), points_to_boxes(target[mask].float()))
    return F.binary_cross_entropy_with_logits(logits[mask].float(), iou)


def pointer_loss(cell_logits: Tensor, cell_boxes: Tensor, target: Tensor, mask: Tensor,
                 min_iou: float = 0.3) -> Tensor:
    """Cross-entropy of a grid point head's cell logits [M,T,L] toward the candidate cell whose box
    (cell_boxes [M,L,4]) overlaps the target box [M,T,4] most, at ``mask`` [M,T] positions where that
    overlap reaches ``min_iou`` (a target no candidate covers teaches nothing about the choice)."""
    mask = mask.bool()
    nothing = cell_boxes.sum() * 0.0  # (the logits hold -inf at non-candidates: 0 * -inf is nan)
    if not mask.any():
        return nothing
    rows = mask.nonzero(as_tuple=True)[0]
    logits = cell_logits[mask].float()  # [R,L]
    iou = box_iou(cell_boxes[rows].detach().float(), target[mask].float()[:, None, :])  # [R,L]
    iou = iou.masked_fill(~torch.isfinite(logits), -1.0)
    best_iou, best = iou.max(-1)
    keep = best_iou >= min_iou
    if not keep.any():
        return nothing
    return F.cross_entropy(logits[keep], best[keep])


def box_words_loss(word_logits: Tensor, text_ids: Tensor, text_mask: Tensor) -> Tensor:
    """Cross-entropy of word logits [R,V] against the uniform distribution over each row's words
    (text_ids [R,T] without the first (BOS) and last valid (EOS) token, nor ids of V or more; text_mask [R,T])."""
    mask = text_mask.bool().clone()
    if not mask.any():
        return word_logits.sum() * 0.0
    last = mask.sum(1) - 1
    mask[:, 0] = False
    mask[torch.arange(len(mask), device=mask.device), last.clamp(min=0)] = False
    vocab = word_logits.shape[-1]
    mask &= text_ids < vocab  # an adapter's new words (modeling.new_words) have no box-word row
    target = torch.zeros_like(word_logits, dtype=torch.float32)
    target.scatter_add_(1, text_ids.long().clamp(max=vocab - 1), mask.float())
    target = (target > 0).float()
    rows = target.sum(1) > 0
    if not rows.any():
        return word_logits.sum() * 0.0
    target = target[rows] / target[rows].sum(1, keepdim=True)
    return -(target * F.log_softmax(word_logits[rows].float(), -1)).sum(1).mean()


def sigmoid_focal_loss(logits: Tensor, target: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Sigmoid focal loss (Lin et al. 2017; SAM's mask loss, as in DETR) averaged over the last two dims:
    logits/target [..., H, W] -> [...]."""
    logits, target = logits.float(), target.float()
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = p * target + (1 - p) * (1 - target)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * target + (1 - alpha) * (1 - target)) * loss
    return loss.flatten(-2).mean(-1)


def dice_loss(logits: Tensor, target: Tensor, smooth: float = 1.0) -> Tensor:
    """``1 - (2 sum(p t) + s) / (sum(p) + sum(t) + s)`` of the sigmoid over the last two dims (DETR's, SAM's):
    logits/target [..., H, W] -> [...]."""
    p, target = logits.float().sigmoid().flatten(-2), target.float().flatten(-2)
    return 1 - (2 * (p * target).sum(-1) + smooth) / (p.sum(-1) + target.sum(-1) + smooth)


def mask_iou_values(logits: Tensor, target: Tensor) -> Tensor:
    """IoU of the binarised masks (logit > 0) with the target over the last two dims -> [...] (1 when both
    are empty)."""
    pred, target = logits > 0, target.bool()
    inter = (pred & target).flatten(-2).sum(-1).float()
    union = (pred | target).flatten(-2).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def mask_losses(logits: Tensor, iou_pred: Tensor, target: Tensor, focal_weight: float = 20.0,
                dice_weight: float = 1.0) -> dict[str, Tensor]:
    """SAM's mask losses for R prompts with K masks each: logits [R,K,h,w], iou_pred [R,K], target [R,H,W].

    The logits are resized (bilinear) to the target's H x W when they differ. Per prompt, the mask with the
    lowest ``focal_weight * focal + dice_weight * dice`` is the one trained (SAM's minimum over the masks of
    an ambiguous prompt); ``mask_focal`` and ``mask_dice`` are its terms averaged over prompts. ``mask_iou``
    is the MSE of every mask's predicted IoU against its real IoU with the target (binarised at logit 0,
    no gradient). Unweighted; ``combine_losses`` applies ``LossConfig``'s weights."""
    if logits.shape[-2:] != target.shape[-2:]:
        logits = F.interpolate(logits.float(), size=target.shape[-2:], mode="bilinear", align_corners=False)
    target = target[:, None].expand_as(logits).float()
    focal, dice = sigmoid_focal_loss(logits, target), dice_loss(logits, target)  # [R,K]
    best = (focal_weight * focal + dice_weight * dice).argmin(1, keepdim=True)
    iou = mask_iou_values(logits.detach(), target)
    return {"mask_focal": focal.gather(1, best).mean(), "mask_dice": dice.gather(1, best).mean(),
            "mask_iou": F.mse_loss(iou_pred.float(), iou)}


def focal_heatmap_loss(logits: Tensor, target: Tensor, alpha: float = 2.0, beta: float = 4.0) -> Tensor:
    """CenterNet penalty-reduced focal loss over Gaussian heatmap targets, per positive."""
    logits, target = logits.float(), target.float()
    p = logits.sigmoid()
    pos = target >= 1.0
    pos_loss = -(F.logsigmoid(logits) * (1 - p) ** alpha)[pos].sum()
    neg_loss = -(F.logsigmoid(-logits) * p**alpha * (1 - target) ** beta)[~pos].sum()
    return (pos_loss + neg_loss) / pos.sum().clamp(min=1)


def detection_loss(maps: dict[str, Tensor], gt_boxes: Tensor, gt_mask: Tensor, image_sizes: Tensor,
                   canvas_size: int) -> dict[str, Tensor]:
    """Heatmap focal loss + L1 on size (canvas-normalised) and offset (cells) at the gt centres."""
    h, w = maps["heatmap"].shape[-2:]
    t = ProposalHead.encode_targets(gt_boxes, gt_mask, image_sizes, canvas_size, (h, w))
    heat = focal_heatmap_loss(maps["heatmap"], t["heatmap"])
    valid = t["valid"]
    if not valid.any():
        zero = (maps["size"].sum() + maps["offset"].sum()) * 0.0
        return {"det_heatmap": heat, "det_size": zero, "det_offset": zero}
    index = t["index"].clamp(max=h * w - 1)

    def at_centres(x: Tensor) -> Tensor:  # [B,2,h,w] -> [B,M,2]
        return x.float().flatten(2).gather(2, index[:, None, :].expand(-1, 2, -1)).transpose(1, 2)

    size = (at_centres(maps["size"]) - t["size"]).abs()[valid].mean()
    offset = (at_centres(maps["offset"]) - t["offset"]).abs()[valid].mean()
    return {"det_heatmap": heat, "det_size": size, "det_offset": offset}


def combine_losses(config: LossConfig, *, logits: Tensor | None = None, text_ids: Tensor | None = None,
                   text_mask: Tensor | None = None, points: Tensor | None = None,
                   confidence: Tensor | None = None, target_points: Tensor | None = None,
                   point_mask: Tensor | None = None, cell_logits: Tensor | None = None,
                   cell_boxes: Tensor | None = None, word_logits: Tensor | None = None,
                   word_text_ids: Tensor | None = None, word_text_mask: Tensor | None = None,
                   maps: dict[str, Tensor] | None = None,
                   gt_boxes: Tensor | None = None, gt_mask: Tensor | None = None,
                   image_sizes: Tensor | None = None, canvas_size: int = 0,
                   mask_logits: Tensor | None = None, mask_iou: Tensor | None = None,
                   target_masks: Tensor | None = None, mask_valid: Tensor | None = None
                   ) -> tuple[Tensor, dict[str, float]]:
    """Weighted sum of the terms whose targets are given -> (total, {name: float}).

    Masks (``heads.mask_decoder``): mask_logits [M,K,h,w], mask_iou [M,K], target_masks [M,H,W] and
    mask_valid [M] (the rows with a target mask) for the same M prompts.

    ``text_mask`` must already exclude prompts without text loss. Outputs that are present but have no
    targets still join the graph with weight 0, so every parameter gets a (zero) gradient (DDP-friendly).
    """
    terms: dict[str, Tensor] = {}
    zero_terms: list[Tensor] = []
    if logits is not None and text_ids is not None and text_mask is not None:
        terms["text"] = config.text_weight * text_loss(logits, text_ids, text_mask, config.label_smoothing)
    elif logits is not None:
        zero_terms.append(logits.sum())
    if points is not None and target_points is not None and point_mask is not None:
        terms["points"] = config.point_weight * point_loss(points, target_points, point_mask)
        if confidence is not None:
            terms["confidence"] = config.confidence_weight * confidence_loss(
                confidence, points, target_points, point_mask)
        if cell_logits is not None and cell_boxes is not None:
            terms["pointer"] = config.pointer_weight * pointer_loss(cell_logits, cell_boxes, target_points,
                                                                    point_mask)
    else:
        zero_terms += [x.sum() for x in (points, confidence) if x is not None]
    if word_logits is not None and word_text_ids is not None and word_text_mask is not None:
        terms["box_words"] = config.box_words_weight * box_words_loss(word_logits, word_text_ids, word_text_mask)
    elif word_logits is not None:
        zero_terms.append(word_logits.sum())
    if maps and gt_boxes is not None and gt_mask is not None and image_sizes is not None:
        det = detection_loss(maps, gt_boxes, gt_mask, image_sizes, canvas_size)
        terms["det_heatmap"] = config.detection_weight * det["det_heatmap"]
        terms["det_size"] = config.detection_weight * SIZE_WEIGHT * det["det_size"]
        terms["det_offset"] = config.detection_weight * OFFSET_WEIGHT * det["det_offset"]
    elif maps:
        zero_terms += [x.sum() for x in maps.values()]
    if mask_logits is not None and mask_iou is not None and target_masks is not None:
        rows = (mask_valid.bool() if mask_valid is not None
                else torch.ones(len(target_masks), dtype=torch.bool, device=target_masks.device))
        if rows.any():
            mask = mask_losses(mask_logits[rows], mask_iou[rows], target_masks[rows],
                               config.mask_focal_weight, config.mask_dice_weight)
            terms["mask_focal"] = config.mask_focal_weight * mask["mask_focal"]
            terms["mask_dice"] = config.mask_dice_weight * mask["mask_dice"]
            terms["mask_iou"] = config.mask_iou_weight * mask["mask_iou"]
        else:
            zero_terms += [mask_logits.sum(), mask_iou.sum()]
    else:
        zero_terms += [x.sum() for x in (mask_logits, mask_iou) if x is not None]
    if not terms and not zero_terms:
        raise ValueError("combine_losses needs at least one output")
    total = sum(terms.values()) + sum(z.float() * 0.0 for z in zero_terms)
    losses = {k: float(v.detach()) for k, v in terms.items()}
    losses["total"] = float(total.detach())
    return total, losses
