"""Grid pointing (ours; ``heads.point_mode = "grid"``): a token's box is the box of the object it points at.

Instead of the paper's MLP regressing coordinates from a token's hidden state, the token's query scores
the peaks of the proposal heatmap (the objects the proposal head sees) and takes the box of the best one:
a softmax blend while training, plus a pointer cross-entropy toward the candidate that matches the target
(``losses.pointer_loss``). Optional parts, each zero at the start so it can be grown onto a trained model:
``heads.relation_layers`` (:class:`CandidateRelations`, with ``heads.candidate_zoom`` each candidate's own
pixels zoomed in), ``heads.point_context_layers``
(:class:`PointContext`), ``heads.point_refine`` and ``heads.point_coords``. The model holds the head as
``point_head``, where the paper's ``PointHead`` sits otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...config import HeadsConfig
from ..common import zero_linear
from ..heads import ProposalHead
from .zoom import ZoomEncoder, canvas_pixels


class CandidateRelations(nn.Module):
    """Transformer decoder layers over one row's candidates: self-attention among them (each with its box),
    cross-attention to the row's text. Relations and ordinals ("above the red square", "leftmost") need
    candidates that know about each other and about what is asked; a dot product per candidate cannot
    compare objects. The output only adds to the first-stage scores (zero-initialised), so training
    starts from the plain grid head."""

    def __init__(self, dim: int, text_dim: int, num_layers: int, num_heads: int = 4, zoom: int = 0):
        super().__init__()
        self.box_embed = nn.Sequential(nn.Linear(4, dim), nn.GELU(), nn.Linear(dim, dim))
        self.text_proj = nn.Sequential(nn.LayerNorm(text_dim, eps=1e-6), nn.Linear(text_dim, dim))
        self.layers = nn.ModuleList(
            nn.TransformerDecoderLayer(dim, num_heads, 2 * dim, dropout=0.0, activation="gelu",
                                       batch_first=True, norm_first=True)
            for _ in range(num_layers))
        self.out = nn.Sequential(nn.LayerNorm(dim, eps=1e-6), zero_linear(dim, dim))
        # heads.candidate_zoom: each candidate's own pixels, zoomed in; zero at the start (made last, so a
        # seeded model's other weights are the same with or without it)
        self.zoom = ZoomEncoder(zoom, num_tokens=1, output_dim=dim) if zoom else None

    def forward(self, keys: Tensor, boxes: Tensor, valid: Tensor, text: Tensor, text_mask: Tensor | None,
                zoomed: Tensor | None = None) -> Tensor:
        """keys [M,K,d], boxes [M,K,4] (x0,y0,x1,y1 in the image frame), valid [M,K], text [M,T,H],
        text_mask [M,T] or None, zoomed [M,K,d] (``zoom_candidates``, with ``heads.candidate_zoom``)
        -> candidate vectors [M,K,d] for the tokens' queries to score."""
        centre, size = (boxes[..., :2] + boxes[..., 2:]) / 2, (boxes[..., 2:] - boxes[..., :2])
        x = keys + self.box_embed(torch.cat([centre, size], -1).clamp(-1, 2).to(keys.dtype))
        if zoomed is not None:
            x = x + zoomed.to(x.dtype)
        memory = self.text_proj(text).to(x.dtype)
        text_pad = None if text_mask is None else ~text_mask.bool()
        for layer in self.layers:
            x = layer(x, memory, tgt_key_padding_mask=~valid, memory_key_padding_mask=text_pad)
        return self.out(x)

    def zoom_candidates(self, pixels: Tensor, boxes01: Tensor) -> Tensor:
        """pixels [B,3,S,S] (the normalised canvas), each image's candidate boxes01 [B,K,4] normalised to
        the canvas -> [B,K,d]."""
        b, k = boxes01.shape[:2]
        image_index = torch.arange(b, device=boxes01.device).repeat_interleave(k)
        return self.zoom(pixels, boxes01.reshape(b * k, 4).clamp(0, 1), image_index).view(b, k, -1)


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
    frame and shape match the paper's ``PointHead`` (``num_points`` 2). Optional, all zero at the start:
    candidate relation layers, a bidirectional point context for the queries, an x/y preference and a box
    refinement (``heads.relation_layers``, ``point_context_layers``, ``point_coords``, ``point_refine``).
    """

    # candidates per row that the relation layers compare: the strongest by detection score
    relation_candidates = 8
    COORD_GAIN = 8.0  # so that a modest weight can separate neighbours a tenth of the image apart

    def __init__(self, config: HeadsConfig, in_dim: int, feature_dim: int, map_size: tuple[int, int],
                 canvas_size: int, max_positions: int = 128):
        """``config``: its ``point_hidden`` (query width) and the options below; ``in_dim``: the language
        model's hidden size; ``feature_dim``, ``map_size``: the proposal head's feature map;
        ``max_positions``: the longest text the point context reads."""
        super().__init__()
        hidden = config.point_hidden
        self.canvas_size = canvas_size
        # point_coords: each token may prefer candidates linearly along x and y ("the rightmost ..." = the
        # largest x among the candidates its content scores favour), which a learned position table cannot
        self.coords = zero_linear(hidden, 2) if config.point_coords else None
        self.context = (PointContext(in_dim, config.point_context_layers, max_positions)
                        if config.point_context_layers > 0 else None)
        # point_refine: a per-token correction of the picked box, in units of its size
        self.refine = zero_linear(hidden, 4) if config.point_refine else None
        self.relations = (CandidateRelations(hidden, in_dim, config.relation_layers, zoom=config.candidate_zoom)
                          if config.relation_layers > 0 else None)
        self.query = nn.Sequential(nn.LayerNorm(in_dim, eps=1e-6), nn.Linear(in_dim, hidden), nn.GELU(),
                                   nn.Linear(hidden, hidden))
        self.key = nn.Sequential(nn.LayerNorm(feature_dim, eps=1e-6), nn.Linear(feature_dim, hidden))
        self.key_position = nn.Parameter(torch.randn(map_size[0] * map_size[1], hidden) * 0.02)
        self.scale = hidden ** -0.5

    def top_candidates(self, image_prior: Tensor) -> tuple[Tensor, Tensor]:
        """Each image's ``relation_candidates`` strongest cells of :meth:`candidates`' log-prior [B,L]:
        (their log-prior [B,K], their cell index [B,K])."""
        return image_prior.topk(min(self.relation_candidates, image_prior.shape[1]), dim=1)

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
                *, text_mask: Tensor | None = None, with_choices: bool = False, cell_bias: Tensor | None = None):
        """hidden [M,T,H], proposal maps of B images, image_index [M], image_sizes [B,2] (w,h canvas px)
        -> points [M,T,4] as x0,y0,x1,y1 normalised to each row's image; with ``with_choices`` also
        (cell logits [M,T,L], cell boxes [M,L,4] in the same frame) for the pointer loss. ``text_mask``
        [M,T] marks real tokens for the relation layers and the point context (all tokens count when None);
        ``cell_bias`` [M,L] is added to every token's cell scores (``PixelLLM.refer_word_vote``)."""
        features = maps["features"].flatten(2).transpose(1, 2)  # [B,L,C]
        keys = (self.key(features) + self.key_position).index_select(0, image_index)  # [M,L,h]
        query = self.query(hidden if self.context is None else self.context(hidden, text_mask)).to(keys.dtype)
        logits = torch.einsum("mtd,mld->mtl", query, keys).float() * self.scale
        image_prior = self.candidates(maps, image_sizes)  # [B,L]
        prior = image_prior.index_select(0, image_index)  # [M,L]
        logits = logits + prior[:, None, :]
        size = image_sizes.float().index_select(0, image_index).repeat(1, 2)[:, None, :]
        canvas_boxes = ProposalHead.cell_boxes(maps, self.canvas_size)  # [B,L,4] canvas px
        boxes = canvas_boxes.index_select(0, image_index) / size  # [M,L,4]
        if self.coords is not None:  # candidates' box centres, about -0.5 .. 0.5 across the image
            centres = ((boxes[..., :2] + boxes[..., 2:]) / 2 - 0.5).clamp(-1, 1)
            logits = logits + self.COORD_GAIN * torch.einsum("mtc,mlc->mtl", self.coords(query).float(), centres)
        if self.relations is not None:
            # the candidates are an image's (its prior's top K), the same for every row of that image
            image_top, image_cells = self.top_candidates(image_prior)  # [B,K]
            top, cells = image_top.index_select(0, image_index), image_cells.index_select(0, image_index)  # [M,K]
            valid = torch.isfinite(top)
            picked = keys.gather(1, cells[..., None].expand(-1, -1, keys.shape[-1]))
            cand_boxes = boxes.gather(1, cells[..., None].expand(-1, -1, 4))
            zoomed = None
            if self.relations.zoom is not None:  # zoomed in once per image that has rows, then given to them
                used, row_image = image_index.unique(return_inverse=True)
                image_boxes01 = canvas_boxes.gather(1, image_cells[..., None].expand(-1, -1, 4)) / self.canvas_size
                pixels = canvas_pixels(maps, "heads.candidate_zoom").index_select(0, used)
                zoomed = self.relations.zoom_candidates(pixels, image_boxes01.index_select(0, used))
                zoomed = zoomed.index_select(0, row_image)
            related = self.relations(picked, cand_boxes, valid, hidden, text_mask, zoomed)  # [M,K,h]
            delta = torch.einsum("mtd,mkd->mtk", query, related).float() * self.scale
            delta = delta.masked_fill(~valid[:, None, :], 0.0)
            logits = logits.scatter_add(2, cells[:, None, :].expand(-1, logits.shape[1], -1), delta)
        if cell_bias is not None:
            logits = logits + cell_bias[:, None, :].float()
        if self.training:
            points = torch.bmm(logits.softmax(-1), boxes)
        else:  # at inference a token points at one object: the box of its best candidate, not a blend
            points = boxes.gather(1, logits.argmax(-1)[..., None].expand(-1, -1, 4))
        if self.refine is not None:
            size = (points[..., 2:] - points[..., :2]).detach().clamp(min=0).repeat(1, 1, 2)
            points = points + torch.tanh(self.refine(query).float()) * size
        points = points.to(hidden.dtype)
        return (points, logits, boxes) if with_choices else points
