"""Conv stem (ours; ``vision.conv_stem``): strided 3x3 convs before the ViT's patch projection.

The paper's ViT patchifies with one linear projection; a small model trained from scratch learns far faster
from early convolutions (Xiao et al. 2021, "Early convolutions help transformers see better"). The stem's
stride-4 and stride-8 maps also feed the fine map and the detail tokens (``fine_map.py``,
``detail_tokens.py``). The ViT holds it as ``vision.stem``.
"""

from __future__ import annotations

from torch import Tensor, nn


def stem_plan(patch_size: int) -> tuple[int, int]:
    """(number of stride-2 3x3 convs, kernel/stride of the final patch projection)."""
    k = 0
    while k < 3 and patch_size % (2 ** (k + 1)) == 0:
        k += 1
    return k, patch_size // (2**k)


class ConvStem(nn.Module):
    """Strided 3x3 convs; widths grow dim/8 -> dim/4 -> dim/2; GroupNorm keeps it batch-size independent."""

    def __init__(self, dim: int, num_convs: int):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        self.stage_channels: list[int] = []  # output channels after each stride-2 stage
        for i in range(num_convs):
            c_out = max(8, dim // (2 ** (num_convs - i)))
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False),
                       nn.GroupNorm(min(8, c_out), c_out), nn.GELU()]
            c_in = c_out
            self.stage_channels.append(c_out)
        self.layers = nn.Sequential(*layers)
        self.out_channels = c_in
        self._per_stage = 3

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)

    def forward_stages(self, x: Tensor) -> list[Tensor]:
        """The output of every stage (strides 2, 4, 8, ...); the last one is ``forward``'s."""
        outs = []
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if (i + 1) % self._per_stage == 0:
                outs.append(x)
        return outs
