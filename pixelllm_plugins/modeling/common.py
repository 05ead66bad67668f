"""Layers and samplers more than one part of the model uses."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def zero_linear(in_dim: int, out_dim: int) -> nn.Linear:
    """A linear layer that outputs zero until trained: an addition that starts as a no-op, so it can be grown
    onto a trained checkpoint without changing a single answer."""
    layer = nn.Linear(in_dim, out_dim)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def sample_lattice(fmap: Tensor, boxes01: Tensor, image_index: Tensor, g: int) -> tuple[Tensor, Tensor]:
    """Bilinear samples of feature maps [B,C,H,W] (covering the canvas) at the centres of a g x g
    lattice inside each box. boxes01 [M,4] x1,y1,x2,y2 normalised to the canvas, image_index [M]
    -> (features [M,g*g,C], lattice points [M,g*g,2] normalised to the canvas)."""
    steps = (torch.arange(g, device=boxes01.device, dtype=boxes01.dtype) + 0.5) / g
    xs = boxes01[:, 0:1] + steps * (boxes01[:, 2:3] - boxes01[:, 0:1])  # [M,g]
    ys = boxes01[:, 1:2] + steps * (boxes01[:, 3:4] - boxes01[:, 1:2])
    points = torch.stack([xs[:, None, :].expand(-1, g, -1), ys[:, :, None].expand(-1, -1, g)], -1)  # [M,g,g,2]
    fmap = fmap.index_select(0, image_index)
    sampled = F.grid_sample(fmap, (2 * points - 1).to(fmap.dtype), mode="bilinear", align_corners=False)
    return sampled.flatten(2).transpose(1, 2), points.reshape(len(points), -1, 2)
