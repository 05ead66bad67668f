"""SAM-style prompt encoder: random-Fourier positional encoding of box corners (spec 2.2, 3.4), and, with
``prompt.points``, of point prompts (SAM's ``_embed_points``).

Coordinates are canvas pixels; they are shifted to pixel centres (+0.5), divided by the canvas size S,
mapped to [-1, 1], multiplied by a fixed Gaussian matrix and 2π, and encoded as ``[sin, cos]``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..errors import PixelLLMError

NUM_FILLER_TOKENS = 3  # the reference pads the 2 box-corner tokens to 5 with the no-mask embedding
POINT_NEGATIVE, POINT_POSITIVE, POINT_PADDING = 0, 1, -1  # point labels (SAM's)


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
    """Box prompt -> 2 corner tokens (PE + corner-type embedding) + filler tokens (no-mask embedding); point
    prompts (after ``add_points``) -> one token each (PE + positive / negative embedding, SAM's)."""

    def __init__(self, embed_dim: int, canvas_size: int):
        super().__init__()
        self.embed_dim = embed_dim
        self.canvas_size = canvas_size
        self.pe = RandomFourierPE(embed_dim)
        self.corner_embed = nn.Parameter(torch.randn(2, embed_dim))  # top-left, bottom-right
        self.no_mask_embed = nn.Parameter(torch.randn(1, embed_dim))
        self.num_tokens = 2 + NUM_FILLER_TOKENS
        self.point_embed: nn.Parameter | None = None  # [2, E]: negative, positive (prompt.points)
        self.not_a_point_embed: nn.Parameter | None = None  # [1, E]: a padding point

    def add_points(self) -> None:
        """Create the point-prompt embeddings (``prompt.points``). ``PixelLLM`` calls it after every other
        part, so a seeded model's other weights are the same with or without points."""
        self.point_embed = nn.Parameter(torch.randn(2, self.embed_dim))
        self.not_a_point_embed = nn.Parameter(torch.randn(1, self.embed_dim))

    def embed_points(self, points: Tensor, labels: Tensor, pad: bool = False) -> Tensor:
        """points [M,P,2] x,y canvas pixels, labels [M,P] (1 positive, 0 negative, -1 padding) -> tokens
        [M,P(+1),E]: the point's PE plus its label's embedding; a padding point is the not-a-point embedding
        alone. ``pad`` appends one padding point (SAM does when a prompt has no box)."""
        if self.point_embed is None or self.not_a_point_embed is None:
            raise PixelLLMError("this model takes no point prompts (prompt.points is false): prompt it with "
                                "boxes only, or use a model built with prompt.points")
        points, labels = points.float() + 0.5, labels.long()
        if pad:
            points = torch.cat([points, points.new_zeros(points.shape[0], 1, 2)], 1)
            labels = torch.cat([labels, labels.new_full((labels.shape[0], 1), POINT_PADDING)], 1)
        dtype = self.point_embed.dtype
        pe = self.pe.encode(points / self.canvas_size).to(dtype)
        label = labels[..., None]
        typed = torch.where(label == POINT_POSITIVE, self.point_embed[1], self.point_embed[0])
        return torch.where(label == POINT_PADDING, self.not_a_point_embed[0], pe + typed)

    def embed(self, boxes: Tensor, points: Tensor | None = None, point_labels: Tensor | None = None) -> Tensor:
        """A prompt's tokens: the box's (``embed_boxes``) then, when given, its points' -> [M,5(+P),E].
        Without points this is exactly ``embed_boxes``."""
        tokens = self.embed_boxes(boxes)
        if points is None:
            return tokens
        if point_labels is None or point_labels.shape != points.shape[:-1] or points.shape[0] != boxes.shape[0]:
            raise PixelLLMError(f"point prompts need points [M,P,2] and point_labels [M,P] for the M boxes; got "
                                f"{tuple(points.shape)}, "
                                f"{None if point_labels is None else tuple(point_labels.shape)} for {boxes.shape[0]}")
        return torch.cat([tokens, self.embed_points(points, point_labels)], dim=-2)

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
