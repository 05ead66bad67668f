"""Box words (ours; ``heads.box_words``): an auxiliary word head on the proposal features (training only).

A linear head predicts the words of a region caption or referring expression from the proposal features
inside its target box (``losses.box_words_loss``: cross-entropy against the uniform distribution over the
text's words). It teaches the proposal features object attributes, which the grid point head and the map
tokens read. The model holds it as ``word_head``; it answers nothing at inference.
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

    def box_logits(self, maps: dict[str, Tensor], boxes: Tensor, image_index: Tensor, image_sizes: Tensor
                   ) -> Tensor:
        """Word logits [R,V] from the proposal features inside boxes [R,4] (normalised to each image)."""
        scale = (image_sizes.float().index_select(0, image_index) / self.canvas_size).repeat(1, 2)
        boxes01 = (boxes.float() * scale).clamp(0, 1)
        sampled, _ = sample_lattice(maps["features"], boxes01.to(maps["features"].dtype), image_index, 2)
        return self(sampled.mean(1))

    def loss_inputs(self, inputs: ModelInputs, valid: Tensor, maps: dict[str, Tensor]) -> dict[str, Tensor]:
        """The box-words loss's inputs (``combine_losses``'s ``word_*``) for region/refer batches: each valid
        prompt's text against its target box. ``valid`` [B,N]: the prompts of the pass."""
        if not maps:
            return {}
        has = None
        if (inputs.task in BOX_WORD_TASKS and inputs.target_points is not None
                and inputs.point_mask is not None and inputs.text_ids is not None):
            pm = inputs.point_mask.bool() & valid[..., None]
            has = pm.any(-1)  # [B,N]
        if has is None or not has.any():
            # the head still joins the graph (with weight 0), as DDP expects of every parameter
            return {"word_logits": self(maps["features"].flatten(2).mean(-1))}
        first = pm.float().argmax(-1)  # [B,N] first position with a target
        boxes = inputs.target_points.gather(2, first[..., None, None].expand(-1, -1, 1, 4))[:, :, 0][has]
        b_idx = has.nonzero(as_tuple=True)[0]
        text_mask = (inputs.text_mask if inputs.text_mask is not None
                     else torch.ones_like(inputs.text_ids, dtype=torch.bool))
        return {"word_logits": self.box_logits(maps, boxes, b_idx, inputs.image_sizes),
                "word_text_ids": inputs.text_ids[has], "word_text_mask": text_mask[has]}
