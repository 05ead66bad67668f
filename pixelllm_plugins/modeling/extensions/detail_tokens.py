"""Detail tokens (ours; ``vision.detail_channels``): stride-8 conv features packed into the image tokens.

A conv branch on the conv stem's stride-8 map (half the patch stride); its d channels travel inside each
image token as the token's 2x2 sub-patches (space-to-depth, 4d more channels per token), and the proposal
head unpacks them back onto its stride-8 map (depth-to-space, exact: ``ProposalHead(detail_dim=...)``).
Small objects' shapes live at that resolution; everything that reads image tokens sees one wider tensor.
The ViT holds it as ``vision.detail``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class ResidualConvBlock(nn.Module):
    """Two 3x3 convs with GroupNorm and a skip connection (a ResNet basic block)."""

    def __init__(self, channels: int):
        super().__init__()
        groups = min(8, channels)
        self.body = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                                  nn.GroupNorm(groups, channels), nn.GELU(),
                                  nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                                  nn.GroupNorm(groups, channels))
        self.act = nn.GELU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(x + self.body(x))


class DetailBranch(nn.Module):
    """Conv features at half the patch stride, packed into the tokens as 2x2 sub-patches (space-to-depth).

    A 3x3 conv and one residual block on the stem's last map (receptive field about 60 px at patch 16):
    enough to tell a small hexagon from a circle, which a 16 px patch token learns only slowly.
    """

    def __init__(self, in_channels: int, channels: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(in_channels, channels, 3, padding=1, bias=False),
                                  nn.GroupNorm(min(8, channels), channels), nn.GELU(),
                                  ResidualConvBlock(channels))
        self.out_dim = 4 * channels

    def forward(self, stem_map: Tensor, grid_size: tuple[int, int]) -> Tensor:
        """stem map [B,C,h,w] -> [B,gh*gw,4*channels] (channel-major blocks of each token's 2x2 cells)."""
        gh, gw = grid_size
        x = self.body(stem_map)[..., : 2 * gh, : 2 * gw]
        return F.pixel_unshuffle(x, 2).flatten(2).transpose(1, 2)
