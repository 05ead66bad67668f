"""SAM-style prompt encoder: random-Fourier positional encoding of box corners (spec 2.2, 3.4).

Coordinates are canvas pixels; they are shifted to pixel centres (+0.5), divided by the canvas size S,
mapped to [-1, 1], multiplied by a fixed Gaussian matrix and 2π, and encoded as ``[sin, cos]``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

NUM_FILLER_TOKENS = 3  # the reference pads the 2 box-corner tokens to 5 with the no-mask embedding


class RandomFourierPE(nn.Module):
    """Positional encoding with random spatial frequencies (Tancik et al. 2020), as in SAM."""

    def __init__(self, embed_dim: int, scale: float = 1.0):
        super().__init__()
        if embed_dim % 2:
            raise ValueError(f"prompt embed_dim must be even, got {embed_dim}")
        # Fixed (never trained) but saved with the checkpoint: it is random at construction.
        self.register_buffer("gaussian", scale * torch.randn(2, embed_dim // 2))

    def encode(self, coords: Tensor) -> Tensor:
        """coords [..., 2] in [0, 1] -> [..., embed_dim]."""
        coords = (2 * coords.float() - 1) @ self.gaussian.float()
        coords = 2 * math.pi * coords
        return torch.cat([coords.sin(), coords.cos()], dim=-1)

    def grid(self, grid_size: tuple[int, int]) -> Tensor:
        """PE at the cell centres of a gh x gw grid covering the canvas -> [gh*gw, embed_dim]."""
        gh, gw = grid_size
        device = self.gaussian.device
        ys = (torch.arange(gh, device=device, dtype=torch.float32) + 0.5) / gh
        xs = (torch.arange(gw, device=device, dtype=torch.float32) + 0.5) / gw
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        return self.encode(torch.stack([xx, yy], dim=-1)).reshape(gh * gw, -1)


class PromptEncoder(nn.Module):
    """Box prompt -> 2 corner tokens (PE + corner-type embedding) + filler tokens (no-mask embedding)."""

    def __init__(self, embed_dim: int, canvas_size: int):
        super().__init__()
        self.embed_dim = embed_dim
        self.canvas_size = canvas_size
        self.pe = RandomFourierPE(embed_dim)
        self.corner_embed = nn.Parameter(torch.randn(2, embed_dim))  # top-left, bottom-right
        self.no_mask_embed = nn.Parameter(torch.randn(1, embed_dim))
        self.num_tokens = 2 + NUM_FILLER_TOKENS

    def embed_boxes(self, boxes: Tensor) -> Tensor:
        """boxes [..., 4] x1,y1,x2,y2 canvas pixels -> prompt tokens [..., 5, embed_dim]."""
        corners = (boxes.float().reshape(*boxes.shape[:-1], 2, 2) + 0.5) / self.canvas_size
        dtype = self.corner_embed.dtype
        tokens = self.pe.encode(corners).to(dtype) + self.corner_embed
        fillers = self.no_mask_embed.expand(*boxes.shape[:-1], NUM_FILLER_TOKENS, self.embed_dim)
        return torch.cat([tokens, fillers], dim=-2)

    def dense_pe(self, grid_size: tuple[int, int]) -> Tensor:
        """PE of the image-token grid -> [gh*gw, embed_dim]."""
        return self.pe.grid(grid_size).to(self.corner_embed.dtype)

    def dense_embedding(self) -> Tensor:
        """The "no mask" dense prompt added to every image token -> [1, embed_dim]."""
        return self.no_mask_embed
