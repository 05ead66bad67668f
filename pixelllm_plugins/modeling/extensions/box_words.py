"""Box words (ours; ``heads.box_words``): an auxiliary word head on the proposal features (training only).

A linear head predicts the words of a region caption or referring expression from the proposal features
inside its target box (``losses.box_words_loss``: cross-entropy against the uniform distribution over the
text's words). It teaches the proposal features object attributes, which the grid point head and the map
tokens read. The model holds it as ``word_head``; it answers nothing at inference. With ``prompt.zoom`` the
zoom's own word head (``ZoomEncoder.words``) joins the same loss on the same boxes (their logits are
stacked, so each head has half of the term).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..common import sample_lattice
from ..inputs import ModelInputs

BOX_WORD_TASKS = ("region", "refer")  # sources whose text describes the object in the target box


class BoxWordHead(nn.Sequential):
    """LayerNorm -> Linear: proposal features [R,C] -> word logits [R,V]."""

    def __init__(self, feature_dim: int, vocab_size: int, canvas_size: int):
        super().__init__(nn.LayerNorm(feature_dim), nn.Linear(feature_dim, vocab_size))
        self.canvas_size = canvas_size

    def canvas_boxes(self, boxes: Tensor, image_index: Tensor, image_sizes: Tensor) -> Tensor:
        """boxes [R,4] normalised to each image -> normalised to the canvas."""
        scale = (image_sizes.float().index_select(0, image_index) / self.canvas_size).repeat(1, 2)
        return (boxes.float() * scale).clamp(0, 1)

    def box_logits(self, maps: dict[str, Tensor], boxes01: Tensor, image_index: Tensor) -> Tensor:
        """Word logits [R,V] from the proposal features inside boxes01 [R,4] (normalised to the canvas)."""
        sampled, _ = sample_lattice(maps["features"], boxes01.to(maps["features"].dtype), image_index, 2)
        return self(sampled.mean(1))

    def loss_inputs(self, inputs: ModelInputs, valid: Tensor, maps: dict[str, Tensor], zoom=None
                    ) -> dict[str, Tensor]:
        """The box-words loss's inputs (``combine_losses``'s ``word_*``) for region/refer batches: each valid
        prompt's text against its target box. ``valid`` [B,N]: the prompts of the pass. ``zoom``: the model's
        ``ZoomEncoder``, whose word head (if any) is asked for the same words."""
        if not maps:
            return {}
        zoom_words = zoom is not None and zoom.words is not None and "pixels" in maps
        has = None
        if (inputs.task in BOX_WORD_TASKS and inputs.target_points is not None
                and inputs.point_mask is not None and inputs.text_ids is not None):
            pm = inputs.point_mask.bool() & valid[..., None]
            has = pm.any(-1)  # [B,N]
        if has is None or not has.any():
            # the heads still join the graph (with weight 0), as DDP expects of every parameter
            logits = self(maps["features"].flatten(2).mean(-1))
            if zoom_words:
                whole = torch.tensor([[0.0, 0.0, 1.0, 1.0]], device=logits.device)
                logits = torch.cat([logits, zoom.word_logits(maps["pixels"], whole, whole.new_zeros(1).long())])
            return {"word_logits": logits}
        first = pm.float().argmax(-1)  # [B,N] first position with a target
        boxes = inputs.target_points.gather(2, first[..., None, None].expand(-1, -1, 1, 4))[:, :, 0][has]
        b_idx = has.nonzero(as_tuple=True)[0]
        text_mask = (inputs.text_mask if inputs.text_mask is not None
                     else torch.ones_like(inputs.text_ids, dtype=torch.bool))
        boxes01 = self.canvas_boxes(boxes, b_idx, inputs.image_sizes)
        logits, ids, mask = self.box_logits(maps, boxes01, b_idx), inputs.text_ids[has], text_mask[has]
        if zoom_words:
            zoomed = zoom.word_logits(maps["pixels"], boxes01, b_idx)
            logits, ids, mask = torch.cat([logits, zoomed.to(logits.dtype)]), ids.repeat(2, 1), mask.repeat(2, 1)
        return {"word_logits": logits, "word_text_ids": ids, "word_text_mask": mask}
