"""Built-in ViT image encoder.

Every vision encoder maps a normalised, padded canvas ``[B,3,S,S]`` to image tokens ``[B,gh*gw,out_dim]``
(no cls token) and exposes ``out_dim`` and ``grid_size``. Pixel normalisation happens in the data
pipeline, not here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import VisionConfig
from ..errors import CheckpointError
from .extensions.conv_stem import ConvStem, stem_plan
from .extensions.detail_tokens import DetailBranch
from .extensions.fine_map import FineBranch


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample while training."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    """Pre-LN transformer block."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ViT(nn.Module):
    """Plain ViT: patch projection -> learned abs pos-embed -> pre-LN blocks -> LN.

    Beyond the paper (``modeling/extensions``), each None / identity when its option is off: ``stem``, a conv
    stem before the patch projection (``conv_stem``); ``detail``, whose channels end every token
    (``detail_channels``, ``detail_dim`` of them); ``fine``, a stride-4 map returned next to the tokens by
    ``forward_with_fine`` (``fine_channels``).
    """

    def __init__(self, config: VisionConfig):
        super().__init__()
        dim, size = config.hidden_size, config.image_size
        if config.conv_stem:
            num_convs, proj = stem_plan(config.patch_size)
            self.stem: nn.Module = ConvStem(dim, num_convs)
            in_ch = self.stem.out_channels
            n = size
            for _ in range(num_convs):
                n = (n - 1) // 2 + 1  # 3x3, stride 2, padding 1
        else:
            self.stem, in_ch, n, proj = nn.Identity(), 3, size, config.patch_size
        self.patch_embed = nn.Conv2d(in_ch, dim, kernel_size=proj, stride=proj)
        g = n // proj
        self.grid_size: tuple[int, int] = (g, g)
        self.detail = None
        if config.detail_channels > 0:
            if not config.conv_stem or proj != 2:
                raise CheckpointError("vision.detail_channels needs vision.conv_stem and patch_size 16 "
                                      "(the stem ends at stride 8, half the token stride)")
            self.detail = DetailBranch(in_ch, config.detail_channels)
        self.detail_dim: int = self.detail.out_dim if self.detail is not None else 0
        self.fine = None
        if config.fine_channels > 0:
            if not config.conv_stem or stem_plan(config.patch_size)[0] < 2:
                raise CheckpointError("vision.fine_channels needs vision.conv_stem and a patch_size divisible by "
                                      "4 (it reads the stem's stride-4 map)")
            self.fine = FineBranch(self.stem.stage_channels[1], config.fine_channels)
        self.fine_dim: int = self.fine.out_dim if self.fine is not None else 0
        self.out_dim: int = dim + self.detail_dim
        self.pos_embed = nn.Parameter(torch.zeros(1, g * g, dim))
        rates = torch.linspace(0, config.drop_path, config.num_layers).tolist()
        self.blocks = nn.ModuleList(Block(dim, config.num_heads, config.mlp_ratio, r) for r in rates)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.forward_with_fine(pixel_values)[0]

    def forward_with_fine(self, pixel_values: Tensor) -> tuple[Tensor, Tensor | None]:
        """-> (image tokens [B,L,out_dim], the fine map [B,fine_dim,S/4,S/4] or None)."""
        fine = None
        if self.fine is not None:
            stages = self.stem.forward_stages(pixel_values)
            stem, fine = stages[-1], self.fine(stages[1])
        else:
            stem = self.stem(pixel_values)
        x = self.patch_embed(stem).flatten(2).transpose(1, 2)
        x = x + self.pos_embed
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        if self.detail is not None:
            x = torch.cat([x, self.detail(stem, self.grid_size).to(x.dtype)], dim=-1)
        return x, fine
