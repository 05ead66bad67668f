"""Fine map (ours; ``vision.fine_channels``): a stride-4 conv map cached next to the image tokens.

A 3x3 conv on the conv stem's stride-4 map gives a d-channel map that does not join the image tokens: the
model keeps it with the proposal maps in the ``ImageEmbedding`` (``maps["fine"]``), and the map tokens
sample it inside each prompt box (``prompt.fine_grid``, ``map_tokens.py``): telling a hexagon from a circle
a dozen pixels wide needs finer features than 16 px patches. The ViT holds it as ``vision.fine``; adding
it to a trained model leaves the image tokens as they were.
"""

from __future__ import annotations

from torch import Tensor, nn


class FineBranch(nn.Module):
    """A 3x3 conv (GroupNorm, GELU) on the stem's stride-4 map: shape features at a quarter of the patch
    stride."""

    def __init__(self, in_channels: int, channels: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(in_channels, channels, 3, padding=1, bias=False),
                                  nn.GroupNorm(min(8, channels), channels), nn.GELU())
        self.out_dim = channels

    def forward(self, stride4_map: Tensor) -> Tensor:
        return self.body(stride4_map)
