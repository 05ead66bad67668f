"""Mask refiner (``heads.mask_refine = C``): the mask decoder's stride-4 logits sharpened to every canvas pixel.

SAM's decoder predicts masks at stride 4. On our canvas that is the limit, not the decoder: the ground-truth
masks of the varied test split, area-averaged to stride 4 and upsampled back, reach a mean IoU of only
0.85 (stride 2: 0.93, stride 1: 0.98), because the objects are small and thin parts (ring strokes) fall
between cells. The refiner reads the canvas pixels where the edges are: a small convolutional stem over
the normalised image (once per image) and, per prompt, the K coarse masks (bilinear to stride 1, as
probabilities) added to those features, two more 3x3 convs (the first dilated, so that the refiner sees
about 5 pixels around each edge, more than the coarse mask's error) and a residual onto the upsampled
logits. The residual starts at zero: a grown model answers as before until trained (SAM-HQ and
CascadePSP refine masks the same way, with image features at the finer scale).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Without gradients (inference) each prompt is refined only in a window around the pixels where its coarse
# masks are not surely background (some logit above -SURE_BACKGROUND), widened by WINDOW_MARGIN pixels:
# more than the refiner's reach (5 pixels: stem 2, dilated conv 2, residual 1), so inside those pixels the
# answer is the full canvas's, exactly; outside, the upsampled coarse logits stand. A prompt's window is
# a small part of the canvas, so this is several times cheaper.
SURE_BACKGROUND = 4.0
WINDOW_MARGIN = 8


class MaskRefiner(nn.Module):
    """coarse logits [M,K,s,s] + canvas pixels [B,3,S,S] -> logits [M,K,S,S] (``channels``: the width)."""

    def __init__(self, channels: int, num_masks: int):
        super().__init__()
        if channels < 1:
            raise ValueError(f"a mask refiner needs at least one channel, got {channels}")
        self.stem = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), nn.GELU(),
                                  nn.Conv2d(channels, channels, 3, padding=1))
        self.mask_in = nn.Conv2d(num_masks, channels, 1)
        self.body = nn.Sequential(nn.GELU(), nn.Conv2d(channels, channels, 3, padding=2, dilation=2), nn.GELU())
        self.residual = nn.Conv2d(channels, num_masks, 3, padding=1)
        nn.init.zeros_(self.residual.weight)
        nn.init.zeros_(self.residual.bias)

    def forward(self, coarse: Tensor, pixels: Tensor, image_index: Tensor, windowed: bool | None = None) -> Tensor:
        """coarse [M,K,s,s] logits on the padded canvas, pixels [B,3,S,S] (the normalised canvas the image
        embedding came from), image_index [M] -> refined logits [M,K,S,S]. ``windowed`` (default: when no
        gradient is recorded): refine each prompt in its window only (``SURE_BACKGROUND``)."""
        up = F.interpolate(coarse, size=pixels.shape[-2:], mode="bilinear", align_corners=False)
        pixels = pixels.to(up.dtype)
        if windowed if windowed is not None else not torch.is_grad_enabled():
            return self._windowed(up, pixels, image_index)
        used, rows = image_index.unique(return_inverse=True)  # the stem once per image these prompts are on
        features = self.stem(pixels.index_select(0, used)).index_select(0, rows)
        return up + self._residual(features, up)

    def _residual(self, features: Tensor, up: Tensor) -> Tensor:
        return self.residual(self.body(features + self.mask_in(up.sigmoid())))

    def _windowed(self, up: Tensor, pixels: Tensor, image_index: Tensor) -> Tensor:
        out = up.clone()
        height, width = up.shape[-2:]
        unsure = up.amax(1) > -SURE_BACKGROUND  # [M,S,S]
        for m in range(up.shape[0]):
            ys, xs = unsure[m].nonzero(as_tuple=True)
            if not len(ys):
                continue
            y0, y1 = max(0, int(ys.min()) - WINDOW_MARGIN), min(height, int(ys.max()) + 1 + WINDOW_MARGIN)
            x0, x1 = max(0, int(xs.min()) - WINDOW_MARGIN), min(width, int(xs.max()) + 1 + WINDOW_MARGIN)
            window = up[m : m + 1, :, y0:y1, x0:x1]
            features = self.stem(pixels[image_index[m], :, y0:y1, x0:x1].unsqueeze(0))
            out[m, :, y0:y1, x0:x1] += self._residual(features, window)[0]
        return out
