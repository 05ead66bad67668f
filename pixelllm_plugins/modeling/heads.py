"""Output heads: the paper's per-token points (spec 2.5) and CenterNet proposals for dense captioning.

The grid point head and the confidence head are ours (``extensions/grid_pointing.py``,
``extensions/confidence.py``).

Frames: points and boxes are normalised by the un-padded image size (see ``inputs.py``). The proposal
map covers the padded square canvas, so it converts with ``image_sizes / S`` at its boundary.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class PointHead(nn.Module):
    """LN -> MLP (GELU) -> ``num_points * 2`` numbers -> points ``(raw + 1) / 2`` (unclipped, as the paper).

    The last layer starts small, so initial predictions sit near the image centre.
    """

    def __init__(self, in_dim: int, hidden: int, num_layers: int, num_points: int = 2):
        super().__init__()
        layers: list[nn.Module] = [nn.LayerNorm(in_dim, eps=1e-6)]
        d = in_dim
        for _ in range(num_layers):
            layers += [nn.Linear(d, hidden), nn.GELU()]
            d = hidden
        last = nn.Linear(d, num_points * 2)
        nn.init.normal_(last.weight, std=0.01)
        nn.init.zeros_(last.bias)
        self.mlp = nn.Sequential(*layers, last)

    def forward(self, hidden: Tensor) -> Tensor:
        """hidden [...,H] -> points [..., num_points*2] as x0,y0,x1,y1,... normalised to the image."""
        return (self.mlp(hidden) + 1) / 2


def gaussian_radius(w: Tensor, h: Tensor, min_overlap: float = 0.7) -> Tensor:
    """CenterNet's radius (in the units of w,h) within which a shifted box keeps IoU >= min_overlap."""
    b1, c1 = h + w, w * h * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 + (b1**2 - 4 * c1).clamp(min=0).sqrt()) / 2
    b2, c2 = 2 * (h + w), (1 - min_overlap) * w * h
    r2 = (b2 + (b2**2 - 16 * c2).clamp(min=0).sqrt()) / 2
    a3, b3, c3 = 4 * min_overlap, -2 * min_overlap * (h + w), (min_overlap - 1) * w * h
    r3 = (b3 + (b3**2 - 4 * a3 * c3).clamp(min=0).sqrt()) / 2
    return torch.minimum(torch.minimum(r1, r2), r3).clamp(min=0)


class ProposalHead(nn.Module):
    """Class-agnostic CenterNet on the image-token grid: heatmap logit, box size (w,h), centre offset.

    The token grid is upsampled ``upsample`` times (a stride of 16 px is coarse for small objects).
    Sizes are canvas-normalised (``w / S``); offsets are in map cells.
    """

    def __init__(self, in_dim: int, hidden: int, grid_size: tuple[int, int], upsample: int = 2,
                 detail_dim: int = 0):
        super().__init__()
        if detail_dim and upsample != 2:
            raise ValueError("detail channels (2x2 sub-patches) need upsample 2")
        self.grid_size = grid_size
        self.detail_dim = detail_dim  # the tokens' last channels: 2x2 sub-patch features (vision.detail_channels)
        layers: list[nn.Module] = [nn.Conv2d(in_dim, hidden, 3, padding=1), nn.GELU(),
                                   nn.Conv2d(hidden, hidden, 3, padding=1), nn.GELU()]
        if upsample > 1:  # after the 3x3 convs: they cost upsample**2 times more on the finer map
            layers += [nn.ConvTranspose2d(hidden, hidden, upsample, stride=upsample), nn.GELU()]
        self.body = nn.Sequential(*layers)
        self.heatmap = nn.Conv2d(hidden, 1, 1)
        self.size = nn.Conv2d(hidden, 2, 1)
        self.offset = nn.Conv2d(hidden, 2, 1)
        nn.init.constant_(self.heatmap.bias, -math.log((1 - 0.01) / 0.01))  # prior: 1% of cells are centres
        nn.init.constant_(self.size.bias, 0.1)
        nn.init.constant_(self.offset.bias, 0.5)
        self.map_size = (grid_size[0] * upsample, grid_size[1] * upsample)
        # maps["features"]: body output + the upsampled image tokens (+ their unpacked sub-patch detail)
        self.feature_dim = hidden + in_dim - detail_dim + detail_dim // 4

    def forward(self, image_tokens: Tensor) -> dict[str, Tensor]:
        """image_tokens [B,gh*gw,C] -> {"heatmap": [B,1,h,w] logits, "size": [B,2,h,w], "offset": [B,2,h,w],
        "features": [B,feature_dim,h,w]}."""
        b, n, c = image_tokens.shape
        gh, gw = self.grid_size
        grid = image_tokens.transpose(1, 2).reshape(b, c, gh, gw)
        x = self.body(grid)
        # "features" serve the grid point head, map tokens and box words: the detection body alone
        # learns to ignore colour and shape (objectness needs neither), the image tokens keep them
        coarse, detail = grid[:, : c - self.detail_dim], grid[:, c - self.detail_dim:]
        up = F.interpolate(coarse, size=x.shape[-2:], mode="bilinear", align_corners=False)
        if self.detail_dim:  # sub-patch features back at their own resolution (== the map's)
            up = torch.cat([up, F.pixel_shuffle(detail, 2)], 1)
        return {"heatmap": self.heatmap(x), "size": self.size(x), "offset": self.offset(x),
                "features": torch.cat([x, up.to(x.dtype)], 1)}

    @staticmethod
    def cell_boxes(maps: dict[str, Tensor], canvas_size: int) -> Tensor:
        """The box each map cell proposes, [B,h*w,4] xyxy in canvas pixels (unclipped)."""
        b, _, h, w = maps["heatmap"].shape
        stride_x, stride_y = canvas_size / w, canvas_size / h
        ys, xs = torch.meshgrid(torch.arange(h, device=maps["heatmap"].device),
                                torch.arange(w, device=maps["heatmap"].device), indexing="ij")
        offset, size = maps["offset"].float().flatten(2), maps["size"].float().flatten(2).clamp(min=0)
        cx = (xs.flatten()[None] + offset[:, 0]) * stride_x
        cy = (ys.flatten()[None] + offset[:, 1]) * stride_y
        bw, bh = size[:, 0] * canvas_size, size[:, 1] * canvas_size
        return torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], dim=-1)

    @staticmethod
    def encode_targets(gt_boxes: Tensor, gt_mask: Tensor, image_sizes: Tensor, canvas_size: int,
                       map_size: tuple[int, int]) -> dict[str, Tensor]:
        """Normalised gt boxes [B,M,4] -> heatmap [B,1,h,w], cell index [B,M], size/offset [B,M,2], valid [B,M]."""
        h, w = map_size
        scale = torch.tensor([w, h], device=gt_boxes.device, dtype=torch.float32) / canvas_size
        boxes = gt_boxes.float() * image_sizes.float()[:, None, :].repeat(1, 1, 2)  # canvas pixels
        centre = (boxes[..., :2] + boxes[..., 2:]) / 2 * scale  # map cells
        wh = (boxes[..., 2:] - boxes[..., :2]).clamp(min=0)
        cell = centre.floor()
        valid = gt_mask.bool() & (cell[..., 0] >= 0) & (cell[..., 0] < w) & (cell[..., 1] >= 0) & (cell[..., 1] < h)
        cell = cell.clamp(min=0)
        cell = torch.stack([cell[..., 0].clamp(max=w - 1), cell[..., 1].clamp(max=h - 1)], -1)
        wh_cells = wh * scale
        sigma = (2 * gaussian_radius(wh_cells[..., 0], wh_cells[..., 1]) + 1) / 6  # [B,M]
        ys = torch.arange(h, device=boxes.device, dtype=torch.float32)
        xs = torch.arange(w, device=boxes.device, dtype=torch.float32)
        d2 = ((xs[None, None, None, :] - cell[..., 0, None, None]) ** 2
              + (ys[None, None, :, None] - cell[..., 1, None, None]) ** 2)  # [B,M,h,w]
        g = torch.exp(-d2 / (2 * sigma[..., None, None] ** 2)) * valid[..., None, None]
        heatmap = g.amax(dim=1, keepdim=True) if g.shape[1] else g.new_zeros(g.shape[0], 1, h, w)
        index = (cell[..., 1] * w + cell[..., 0]).long()
        return {"heatmap": heatmap, "index": index, "size": wh / canvas_size, "offset": centre - cell,
                "valid": valid}

    def decode(self, maps: dict[str, Tensor], image_sizes: Tensor, canvas_size: int, k: int,
               min_score: float = 0.0) -> tuple[Tensor, Tensor]:
        """Top-k peaks (3x3 max-pool NMS) -> boxes [B,k,4] normalised to the image, scores [B,k]; padded with 0."""
        heat = maps["heatmap"].float().sigmoid()
        b, _, h, w = heat.shape
        stride = canvas_size / w, canvas_size / h
        peaks = heat == F.max_pool2d(heat, 3, stride=1, padding=1)
        xs = torch.arange(w, device=heat.device) * stride[0]
        ys = torch.arange(h, device=heat.device) * stride[1]
        inside = (xs[None, None, :] < image_sizes[:, 0, None, None]) & (ys[None, :, None] < image_sizes[:, 1, None, None])
        heat = (heat * peaks * inside[:, None]).flatten(1)
        kk = min(k, h * w)
        scores, index = heat.topk(kk, dim=1)
        boxes = ProposalHead.cell_boxes(maps, canvas_size).gather(1, index[..., None].expand(-1, -1, 4))
        boxes = (boxes / image_sizes.float()[:, None, :].repeat(1, 1, 2)).clamp(0, 1)
        keep = scores >= max(min_score, 1e-12)
        scores, boxes = scores * keep, boxes * keep[..., None]
        if kk < k:
            scores = F.pad(scores, (0, k - kk))
            boxes = F.pad(boxes, (0, 0, 0, k - kk))
        return boxes, scores
