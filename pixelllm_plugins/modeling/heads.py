"""Output heads: per-token points (spec 2.5), per-token box confidence (ours), CenterNet proposals.

Frames: points and boxes are normalised by the un-padded image size (see ``inputs.py``). The proposal
map covers the padded square canvas, so it converts with ``image_sizes / S`` at its boundary.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .common import zero_linear


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


class ConfidenceHead(nn.Module):
    """Per-token logit of the IoU between the token's predicted box and its target box."""

    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.LayerNorm(in_dim, eps=1e-6), nn.Linear(in_dim, hidden), nn.GELU(),
                                 nn.Linear(hidden, 1))
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.mlp(hidden).squeeze(-1)


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


class CandidateRelations(nn.Module):
    """Transformer decoder layers over one row's candidates: self-attention among them (each with its box),
    cross-attention to the row's text. Relations and ordinals ("above the red square", "leftmost") need
    candidates that know about each other and about what is asked; a dot product per candidate cannot
    compare objects. The output only adds to the first-stage scores (zero-initialised), so training
    starts from the plain grid head."""

    def __init__(self, dim: int, text_dim: int, num_layers: int, num_heads: int = 4):
        super().__init__()
        self.box_embed = nn.Sequential(nn.Linear(4, dim), nn.GELU(), nn.Linear(dim, dim))
        self.text_proj = nn.Sequential(nn.LayerNorm(text_dim, eps=1e-6), nn.Linear(text_dim, dim))
        self.layers = nn.ModuleList(
            nn.TransformerDecoderLayer(dim, num_heads, 2 * dim, dropout=0.0, activation="gelu",
                                       batch_first=True, norm_first=True)
            for _ in range(num_layers))
        self.out = nn.Sequential(nn.LayerNorm(dim, eps=1e-6), zero_linear(dim, dim))

    def forward(self, keys: Tensor, boxes: Tensor, valid: Tensor, text: Tensor, text_mask: Tensor | None) -> Tensor:
        """keys [M,K,d], boxes [M,K,4] (x0,y0,x1,y1 in the image frame), valid [M,K], text [M,T,H],
        text_mask [M,T] or None -> candidate vectors [M,K,d] for the tokens' queries to score."""
        centre, size = (boxes[..., :2] + boxes[..., 2:]) / 2, (boxes[..., 2:] - boxes[..., :2])
        x = keys + self.box_embed(torch.cat([centre, size], -1).clamp(-1, 2).to(keys.dtype))
        memory = self.text_proj(text).to(x.dtype)
        text_pad = None if text_mask is None else ~text_mask.bool()
        for layer in self.layers:
            x = layer(x, memory, tgt_key_padding_mask=~valid, memory_key_padding_mask=text_pad)
        return self.out(x)


class PointContext(nn.Module):
    """Bidirectional self-attention over one row's token states, used only to form the pointing queries.

    The language model is causal, so in "a small red circle" the state of "a" or "small" cannot know which
    object the phrase is about, yet a trace puts those words on it. Points are read from a finished text
    (teacher-forced, also after generation, ``Predictor.caption``), so the query of each token may look at
    the words after it. The output only adds to the hidden state (zero-initialised): training starts from
    the causal head."""

    def __init__(self, dim: int, num_layers: int, max_positions: int, num_heads: int = 4):
        super().__init__()
        self.position = nn.Parameter(torch.randn(max_positions, dim) * 0.02)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, num_heads, 2 * dim, dropout=0.0, activation="gelu", batch_first=True,
                                       norm_first=True)
            for _ in range(num_layers))
        self.out = nn.Sequential(nn.LayerNorm(dim, eps=1e-6), zero_linear(dim, dim))

    def forward(self, hidden: Tensor, text_mask: Tensor | None) -> Tensor:
        """hidden [M,T,H], text_mask [M,T] (real tokens; None = all) -> hidden [M,T,H] with context added."""
        t = hidden.shape[1]
        if t > self.position.shape[0]:
            raise ValueError(f"{t} text tokens exceed the point context's {self.position.shape[0]} positions")
        x = hidden + self.position[:t].to(hidden.dtype)
        pad = None if text_mask is None else ~text_mask.bool()
        for layer in self.layers:
            x = layer(x, src_key_padding_mask=pad)
        return hidden + self.out(x).to(hidden.dtype)


class GridPointHead(nn.Module):
    """Points by pointing (ours; ``heads.point_mode = "grid"``): a token's box is the box its query picks.

    Candidates are the peaks of the proposal heatmap (3x3 max-pool, inside the image), i.e. the objects
    the proposal head sees. The token's hidden state becomes a query that scores each candidate's map
    features (plus a learned position embedding), with the detached log detection score as a prior. The
    output is the softmax-weighted average of the candidates' boxes. Training adds a pointer loss
    (cross-entropy toward the candidate whose box matches the target best, ``losses.pointer_loss``).
    Compared with the paper's MLP on the hidden state, localisation becomes a choice among detected
    objects, which a small model trained from scratch learns quickly instead of collapsing to the
    image centre. In eval mode the output is the best candidate's box rather than the blend. Output
    frame and shape match :class:`PointHead` (``num_points`` 2). Optional, all zero at the start: candidate
    relation layers, a bidirectional point context for the queries, an x/y preference and a box refinement
    (``HeadsConfig``).
    """

    def __init__(self, in_dim: int, feature_dim: int, hidden: int, map_size: tuple[int, int], canvas_size: int,
                 relation_layers: int = 0, relation_candidates: int = 8, context_layers: int = 0,
                 max_positions: int = 128, refine: bool = False, coords: bool = False):
        super().__init__()
        self.canvas_size = canvas_size
        # coords: each token may prefer candidates linearly along x and y ("the rightmost ..." = the largest
        # x among the candidates its content scores favour), a score a learned position table cannot give
        self.coords = zero_linear(hidden, 2) if coords else None
        self.context = PointContext(in_dim, context_layers, max_positions) if context_layers > 0 else None
        # refine: a per-token correction of the picked box, in units of its size
        self.refine = zero_linear(hidden, 4) if refine else None
        self.relation_candidates = relation_candidates
        self.relations = (CandidateRelations(hidden, in_dim, relation_layers) if relation_layers > 0 else None)
        self.query = nn.Sequential(nn.LayerNorm(in_dim, eps=1e-6), nn.Linear(in_dim, hidden), nn.GELU(),
                                   nn.Linear(hidden, hidden))
        self.key = nn.Sequential(nn.LayerNorm(feature_dim, eps=1e-6), nn.Linear(feature_dim, hidden))
        self.key_position = nn.Parameter(torch.randn(map_size[0] * map_size[1], hidden) * 0.02)
        self.scale = hidden ** -0.5

    COORD_GAIN = 8.0  # so that a modest weight can separate neighbours a tenth of the image apart

    def candidates(self, maps: dict[str, Tensor], image_sizes: Tensor) -> Tensor:
        """Log-prior per map cell [B,L]: the detached log detection score at heatmap peaks inside the
        image, -inf elsewhere (the strongest cell always stays a candidate)."""
        heat = maps["heatmap"].detach().float()
        b, _, h, w = heat.shape
        xs = (torch.arange(w, device=heat.device) + 0.5) * (self.canvas_size / w)
        ys = (torch.arange(h, device=heat.device) + 0.5) * (self.canvas_size / h)
        inside = ((xs[None, None, :] < image_sizes[:, 0, None, None])
                  & (ys[None, :, None] < image_sizes[:, 1, None, None]))  # [B,h,w]
        masked = heat[:, 0].masked_fill(~inside, float("-inf"))
        peak = (masked == F.max_pool2d(masked[:, None], 3, stride=1, padding=1)[:, 0]) & inside
        peak = peak.flatten(1)
        peak[torch.arange(b, device=heat.device), masked.flatten(1).argmax(1)] = True
        return F.logsigmoid(heat.flatten(1)).masked_fill(~peak, float("-inf"))

    def forward(self, hidden: Tensor, maps: dict[str, Tensor], image_index: Tensor, image_sizes: Tensor,
                *, text_mask: Tensor | None = None, with_choices: bool = False):
        """hidden [M,T,H], proposal maps of B images, image_index [M], image_sizes [B,2] (w,h canvas px)
        -> points [M,T,4] as x0,y0,x1,y1 normalised to each row's image; with ``with_choices`` also
        (cell logits [M,T,L], cell boxes [M,L,4] in the same frame) for the pointer loss. ``text_mask``
        [M,T] marks real tokens for the relation layers and the point context (all tokens count when None)."""
        features = maps["features"].flatten(2).transpose(1, 2)  # [B,L,C]
        keys = (self.key(features) + self.key_position).index_select(0, image_index)  # [M,L,h]
        query = self.query(hidden if self.context is None else self.context(hidden, text_mask)).to(keys.dtype)
        logits = torch.einsum("mtd,mld->mtl", query, keys).float() * self.scale
        prior = self.candidates(maps, image_sizes).index_select(0, image_index)  # [M,L]
        logits = logits + prior[:, None, :]
        size = image_sizes.float().index_select(0, image_index).repeat(1, 2)[:, None, :]
        boxes = ProposalHead.cell_boxes(maps, self.canvas_size).index_select(0, image_index) / size  # [M,L,4]
        if self.coords is not None:  # candidates' box centres, about -0.5 .. 0.5 across the image
            centres = ((boxes[..., :2] + boxes[..., 2:]) / 2 - 0.5).clamp(-1, 1)
            logits = logits + self.COORD_GAIN * torch.einsum("mtc,mlc->mtl", self.coords(query).float(), centres)
        if self.relations is not None:
            top, cells = prior.topk(min(self.relation_candidates, prior.shape[1]), dim=1)  # [M,K]
            valid = torch.isfinite(top)
            picked = keys.gather(1, cells[..., None].expand(-1, -1, keys.shape[-1]))
            cand_boxes = boxes.gather(1, cells[..., None].expand(-1, -1, 4))
            related = self.relations(picked, cand_boxes, valid, hidden, text_mask)  # [M,K,h]
            delta = torch.einsum("mtd,mkd->mtk", query, related).float() * self.scale
            delta = delta.masked_fill(~valid[:, None, :], 0.0)
            logits = logits.scatter_add(2, cells[:, None, :].expand(-1, logits.shape[1], -1), delta)
        if self.training:
            points = torch.bmm(logits.softmax(-1), boxes)
        else:  # at inference a token points at one object: the box of its best candidate, not a blend
            points = boxes.gather(1, logits.argmax(-1)[..., None].expand(-1, -1, 4))
        if self.refine is not None:
            size = (points[..., 2:] - points[..., :2]).detach().clamp(min=0).repeat(1, 1, 2)
            points = points + torch.tanh(self.refine(query).float()) * size
        points = points.to(hidden.dtype)
        return (points, logits, boxes) if with_choices else points
