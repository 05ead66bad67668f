"""Box extent (ours; ``prompt.box_extent``): the prompt box's place and size in its image, added to every
visual token.

"small" and "large" are relative to the image, but a non-square image is padded to the square canvas, so
neither the box corners (canvas frame) nor the image tokens say how large a box is for its image. The box
relative to its image goes through a small MLP whose last layer starts at zero (growing it onto a trained
model is a no-op), and the result is added to every visual token of the prompt. The model holds it as
``box_extent``; ``prompt_tokens`` then needs each image's size, which ``forward`` and the Predictor pass.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ...errors import PixelLLMError
from ..common import zero_linear


class BoxExtentEncoder(nn.Module):
    """A prompt box relative to its image -> a vector added to every visual token.

    Features: the corners in the image frame, the sides over the image's shorter side, and the image's
    sides over the canvas. The last layer starts at zero, so growing it onto a trained model is a no-op."""

    NUM_FEATURES = 8

    def __init__(self, output_dim: int, canvas_size: int, hidden: int = 64):
        super().__init__()
        self.canvas_size = canvas_size
        self.mlp = nn.Sequential(nn.Linear(self.NUM_FEATURES, hidden), nn.GELU(),
                                 zero_linear(hidden, output_dim))

    def features(self, boxes: Tensor, image_sizes: Tensor) -> Tensor:
        """boxes [M,4] canvas px, image_sizes [M,2] (w,h of each box's image, canvas px) -> [M,8]."""
        boxes, size = boxes.float(), image_sizes.float().clamp(min=1)
        corners = boxes / size.repeat(1, 2)
        sides = (boxes[:, 2:] - boxes[:, :2]).clamp(min=0) / size.min(dim=1, keepdim=True).values
        return torch.cat([corners, sides, size / self.canvas_size], dim=1).clamp(-1, 4)

    def forward(self, boxes: Tensor, image_sizes: Tensor) -> Tensor:
        """-> [M,output_dim]."""
        weight = self.mlp[0].weight
        return self.mlp(self.features(boxes, image_sizes).to(weight.dtype))

    def add_to(self, visual: Tensor, boxes: Tensor, image_index: Tensor,
               image_sizes: Tensor | None) -> Tensor:
        """visual tokens [M,Q,D] of boxes [M,4] (canvas px) on images ``image_index`` [M] of ``image_sizes``
        [B,2] -> the tokens with each box's extent added."""
        if image_sizes is None:
            raise PixelLLMError("this model's prompt.box_extent reads each image's size: pass image_sizes "
                                "[B,2] (w,h of the resized, un-padded images in canvas pixels)")
        extent = self(boxes, image_sizes.index_select(0, image_index))
        return visual + extent[:, None, :].to(visual.dtype)
