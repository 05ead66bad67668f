"""PixelLLM: vision encoder -> box-prompted adapter -> language model -> per-token points (+ proposals).

The parts beyond the paper live in ``extensions/`` and are called through named hooks (see ``PixelLLM``).

Prompts are flattened to ``M`` valid (image, prompt) pairs for the language model; outputs are scattered
back to ``[B,N,...]`` with zeros at invalid prompts. Frames and shapes are documented in ``inputs.py``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config import PixelLLMConfig
from ..errors import PixelLLMError
from .build import build_language_model, build_vision_encoder
from .extensions.box_extent import BoxExtentEncoder
from .extensions.box_words import BoxWordHead
from .extensions.confidence import ConfidenceHead
from .extensions.grid_pointing import GridPointHead
from .extensions.map_tokens import MapTokens
from .extensions.zoom import VOTE_FLOOR, ZoomEncoder, canvas_pixels
from .heads import PointHead, ProposalHead
from .inputs import ImageEmbedding, ModelInputs, ModelOutput, PromptOutput
from .losses import combine_losses
from .mask_decoder import MaskDecoder
from .prompt_adapter import PromptAdapter
from .prompt_encoder import PromptEncoder


def _scatter(flat: Tensor, valid: Tensor) -> Tensor:
    """[M,...] rows of the True entries of ``valid`` [B,N] -> [B,N,...] with zeros elsewhere."""
    b, n = valid.shape
    if flat.shape[0] == b * n:
        return flat.view(b, n, *flat.shape[1:])
    out = flat.new_zeros(b, n, *flat.shape[1:])
    out[valid] = flat
    return out


def _rows_of(points: Tensor | None, labels: Tensor | None, rows: Tensor) -> tuple[Tensor | None, Tensor | None]:
    """The point prompts ``[B,N,P,...]`` of the True rows of ``rows`` [B,N] (None when there are none)."""
    if points is None or labels is None:
        return None, None
    return points[rows], labels[rows]


def _mask_map(embedding: ImageEmbedding, key: str, what: str) -> Tensor:
    """The embedding's map the mask decoder reads under ``key``, or a clear error when it was left out."""
    if embedding.maps is None or key not in embedding.maps:
        raise PixelLLMError(f"this model's mask decoder {what}: embed the images with PixelLLM.embed_images")
    return embedding.maps[key]


def _by_point_rows(fn, row_args: tuple[Tensor, ...], points: Tensor | None, labels: Tensor | None):
    """``fn(*row_args, points, labels)`` over M prompt rows, where a row whose point labels are all padding
    (-1) is a box-only prompt (``fn`` gets None for its points): a batch that mixes rows with and without
    points gives each row the answer it gets alone. ``fn`` returns a tensor or a tuple of tensors [M,...]."""
    if points is None or labels is None:
        return fn(*row_args, None, None)
    has = (labels >= 0).any(-1)
    if bool(has.all()):
        return fn(*row_args, points, labels)
    if not bool(has.any()):
        return fn(*row_args, None, None)
    plain = fn(*(a[~has] for a in row_args), None, None)
    pointed = fn(*(a[has] for a in row_args), points[has], labels[has])

    def merge(x: Tensor, y: Tensor) -> Tensor:
        out = x.new_empty(has.shape[0], *x.shape[1:])
        out[~has], out[has] = x, y.to(x.dtype)
        return out

    if isinstance(plain, tuple):
        return tuple(merge(x, y) for x, y in zip(plain, pointed))
    return merge(plain, pointed)


class PixelLLM(nn.Module):
    """The paper's model: vision encoder, prompt encoder and adapter, language model, point head, plus
    the proposal head for dense captioning. The parts beyond the paper (``modeling/extensions``) hang on
    named hooks, each None when its option is off: ``map_tokens``, ``box_extent``, ``word_head``,
    ``confidence_head``, a grid ``point_head`` (and, inside the ViT, ``stem``, ``detail``, ``fine``).
    Referring segmentation: ``mask_decoder`` (``heads.mask_decoder``; SAM's) and point prompts in the prompt
    encoder (``prompt.points``), both None / off unless asked for."""

    def __init__(self, config: PixelLLMConfig, vocab_size: int):
        super().__init__()
        config.validate()
        config.language.vocab_size = vocab_size
        self.config = config
        self.canvas_size = config.vision.image_size
        self.model_version = f"{config.preset}-random"  # set by load_pretrained / save_pretrained
        prompt, heads = config.prompt, config.heads
        # (the order below is the order of a seeded model's random weights: keep it)
        self.vision = build_vision_encoder(config.vision)
        if config.vision.freeze and config.vision.kind == "vit":
            self.vision.requires_grad_(False)
        self.prompt_encoder = PromptEncoder(prompt.embed_dim, self.canvas_size)
        self.prompt_adapter = PromptAdapter(prompt, vision_dim=self.vision.out_dim)
        self.language = build_language_model(config.language, visual_dim=prompt.output_dim,
                                             vocab_size=vocab_size)
        if config.language.freeze and config.language.kind == "git":
            self.language.requires_grad_(False)
        h = self.language.hidden_size
        self.confidence_head = ConfidenceHead(h, heads.point_hidden) if heads.confidence else None
        self.proposal_head = (ProposalHead(self.vision.out_dim, heads.proposal_hidden, self.vision.grid_size,
                                           detail_dim=getattr(self.vision, "detail_dim", 0))
                              if heads.proposals else None)
        feature_dim = self.proposal_head.feature_dim if self.proposal_head is not None else 0
        self.map_tokens = MapTokens.from_config(prompt)
        self.map_token_proj = self.map_token_pe = self.fine_token_proj = None  # its layers (checkpoint names)
        if self.map_tokens is not None:
            self.map_token_proj, self.map_token_pe, self.fine_token_proj = self.map_tokens.layers(
                feature_dim, getattr(self.vision, "fine_dim", 0), prompt.embed_dim, prompt.output_dim)
        self.box_extent = BoxExtentEncoder(prompt.output_dim, self.canvas_size) if prompt.box_extent else None
        self.word_head = BoxWordHead(feature_dim, vocab_size, self.canvas_size) if heads.box_words else None
        if heads.point_mode == "grid":
            self.point_head = GridPointHead(heads, h, feature_dim, self.proposal_head.map_size,
                                            self.canvas_size, config.language.max_positions)
        else:
            self.point_head = PointHead(h, heads.point_hidden, heads.point_layers, heads.num_points)
        # created last: a seeded model's other weights are the same with or without them
        if prompt.points:
            self.prompt_encoder.add_points()
        self.mask_decoder = None
        if heads.mask_decoder:
            self.mask_decoder = MaskDecoder(
                heads.mask_decoder, vision_dim=self.vision.out_dim, embed_dim=prompt.embed_dim,
                dim=prompt.hidden_size, num_heads=prompt.num_heads, mlp_dim=prompt.mlp_dim,
                downsample=prompt.attention_downsample, grid=self.vision.grid_size[0],
                canvas_size=self.canvas_size, fine_dim=getattr(self.vision, "fine_dim", 0),
                refine=heads.mask_refine)
        self.zoom = (ZoomEncoder(prompt.zoom, self.map_tokens.num_tokens, prompt.output_dim,
                                 vocab_size=vocab_size if heads.box_words else 0)
                     if prompt.zoom and self.map_tokens is not None else None)

    # ---- the public surface: embed images once, then run any number of prompt passes ---------------------
    def embed_images(self, pixel_values: Tensor, *, maps: bool | None = None) -> ImageEmbedding:
        """[B,3,S,S] normalised canvas -> ``ImageEmbedding`` (the part worth caching per image).

        ``maps``: compute the proposal (and fine) maps; None: only when this model's prompts or points
        read them. Dense captioning asks for them, as proposals are decoded from them.
        """
        if getattr(self.vision, "fine", None) is None:
            tokens, fine = self.vision(pixel_values), None
        else:
            tokens, fine = self.vision.forward_with_fine(pixel_values)
        want = self._needs_maps if maps is None else maps
        image_maps = self.proposal_head(tokens) if want and self.proposal_head is not None else {}
        if fine is not None and (image_maps or self._masks_read_fine):  # the mask decoder reads it without them
            image_maps["fine"] = fine
        if self._reads_pixels:
            image_maps["pixels"] = pixel_values
        return ImageEmbedding(tokens, image_maps or None)

    def prompt_tokens(self, embedding: ImageEmbedding, boxes: Tensor, image_index: Tensor,
                      image_sizes: Tensor | None = None, points: Tensor | None = None,
                      point_labels: Tensor | None = None) -> Tensor:
        """Location prompts -> the visual tokens the language model reads: boxes [M,4] in canvas pixels,
        ``image_index`` [M] into the embedding, ``image_sizes`` [B,2] (w,h of the resized, un-padded images
        in canvas pixels), optional point prompts (``prompt.points``): points [M,P,2] x,y in canvas pixels and
        point_labels [M,P] (1 positive, 0 negative, -1 padding) -> [M,Q(+extra),Dv]."""
        boxes01 = (boxes.float() / self.canvas_size).clamp(0, 1)
        visual = self._adapter_tokens(embedding.tokens, boxes, boxes01, image_index, points, point_labels)
        if self.map_tokens is not None:
            maps = self._maps_for_prompts(embedding)
            visual = self.map_tokens(self, visual, maps, boxes01, image_index)
            if self.zoom is not None:
                visual = self.zoom.add_to(visual, canvas_pixels(maps, "prompt.zoom"), boxes01, image_index)
        if self.box_extent is not None:
            visual = self.box_extent.add_to(visual, boxes, image_index, image_sizes)
        return visual

    def region_word_vote(self, embedding: ImageEmbedding, boxes: Tensor, image_index: Tensor) -> Tensor | None:
        """``prompt.zoom_words``: the zoom word head's vote [M,V] for captions of the prompt boxes [M,4]
        (canvas pixels; ``ZoomEncoder.word_vote``), or None for a model without it. For boxes around one
        object (region captions, dense captions), not whole-image captions: the head never saw those."""
        weight = self.config.prompt.zoom_words
        if not weight or self.zoom is None or self.zoom.words is None:
            return None
        boxes01 = (boxes.float() / self.canvas_size).clamp(0, 1)
        return self.zoom.word_vote(canvas_pixels(self._maps_for_prompts(embedding), "prompt.zoom_words"), boxes01,
                                   image_index, weight, self.config.prompt.zoom_views)

    def refer_word_vote(self, embedding: ImageEmbedding, image_index: Tensor, image_sizes: Tensor, word_ids: Tensor,
                        word_mask: Tensor) -> Tensor | None:
        """``heads.candidate_words``: the zoom word head's vote [M,L] on the grid head's cells for rows whose
        texts' words (ids without BOS/EOS, [M,T], ``word_mask`` [M,T]) refer to one object: each image's
        candidates get ``ZoomEncoder.candidate_vote``, every other cell the lowest vote. None for a model
        without it. Give it to ``prompt_pass(cell_bias=)``; for referring texts, not captions or traces."""
        weight = self.config.heads.candidate_words
        if not weight or self.zoom is None or self.zoom.words is None or not self._points_need_maps:
            return None
        maps = self._maps_for_prompts(embedding)
        head = self.point_head
        _, cells = head.top_candidates(head.candidates(maps, image_sizes))  # [B,K]
        # each image's candidates are read once, and only those of images that have rows here
        used, row_image = image_index.unique(return_inverse=True)
        boxes01 = ProposalHead.cell_boxes(maps, self.canvas_size).gather(1, cells[..., None].expand(-1, -1, 4))
        vote = self.zoom.candidate_vote(canvas_pixels(maps, "heads.candidate_words").index_select(0, used),
                                        (boxes01.index_select(0, used) / self.canvas_size).clamp(0, 1), row_image,
                                        word_ids, word_mask, weight)  # [M,K]
        cells_per_map = maps["heatmap"].shape[-2] * maps["heatmap"].shape[-1]
        bias = vote.new_full((vote.shape[0], cells_per_map), weight * VOTE_FLOOR)
        return bias.scatter(1, cells.index_select(0, image_index), vote)

    def prompt_pass(self, embedding: ImageEmbedding, boxes: Tensor, image_index: Tensor, image_sizes: Tensor,
                    context_ids: Tensor, context_mask: Tensor, text_ids: Tensor, text_mask: Tensor, *,
                    points: Tensor | None = None, point_labels: Tensor | None = None,
                    cell_bias: Tensor | None = None) -> PromptOutput:
        """The one pass over M (image, prompt) rows that training and inference share: visual tokens of
        each box, the language model over [visual | context | text], then points and confidence at every
        text position. Shapes: boxes [M,4], context [M,Tc], text [M,T] (BOS + text + EOS, padded); optional
        point prompts as in ``prompt_tokens``. Masks are ``prompt_masks``'s: their box is the object's, which
        for refer is not the prompt box here (the whole image) but the box this pass answers."""
        visual = self.prompt_tokens(embedding, boxes, image_index, image_sizes, points, point_labels)
        logits, hidden = self.language(visual, context_ids, context_mask, text_ids, text_mask)
        if self._points_need_maps:
            maps = self._maps_for_prompts(embedding)
            out_points, cell_logits, cell_boxes = self.point_head(hidden, maps, image_index, image_sizes,
                                                                  text_mask=text_mask, with_choices=True,
                                                                  cell_bias=cell_bias)
        else:
            out_points, cell_logits, cell_boxes = self.point_head(hidden), None, None
        confidence = (hidden.new_zeros(hidden.shape[:-1]) if self.confidence_head is None
                      else self.confidence_head(hidden))
        return PromptOutput(logits, hidden, out_points, confidence, cell_logits, cell_boxes)

    def prompt_masks(self, embedding: ImageEmbedding, boxes: Tensor, image_index: Tensor,
                     image_sizes: Tensor | None = None, points: Tensor | None = None,
                     point_labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Segmentation (``heads.mask_decoder = K``, SAM's decoder): prompts as in ``prompt_tokens`` (the
        object's box, plus optional points) -> (mask logits [M,K,s,s] on the padded canvas, at stride 4, or
        stride 1 with ``heads.mask_refine``; predicted IoU [M,K]). No language model runs: for referring
        segmentation, the box is the one a refer pass answers (training: the target's,
        ``ModelInputs.mask_boxes``). ``image_sizes`` is accepted for a uniform seam; the decoder does not
        read it."""
        if self.mask_decoder is None:
            raise PixelLLMError("this model has no mask decoder (heads.mask_decoder is 0); segment with a "
                                "model built with heads.mask_decoder > 0")
        pe = self.prompt_encoder
        fine = _mask_map(embedding, "fine", "reads the fine map") if self._masks_read_fine else None
        pixels = _mask_map(embedding, "pixels", "refines on the canvas pixels") if self._masks_read_pixels else None
        dense_pe, dense = pe.dense_pe(self.vision.grid_size), pe.dense_embedding()

        def decode(rows_boxes, rows_index, rows_points, rows_labels):
            return self.mask_decoder(embedding.tokens, self.vision.grid_size, dense_pe, dense,
                                     pe.embed(rows_boxes, rows_points, rows_labels), rows_index, fine, pixels)

        return _by_point_rows(decode, (boxes, image_index), points, point_labels)

    @torch.no_grad()
    def propose(self, embedding: ImageEmbedding, image_sizes: Tensor, max_proposals: int | None = None,
                min_score: float = 0.0) -> tuple[Tensor, Tensor]:
        """Region proposals: (boxes [B,K,4] normalised to each image, scores [B,K]); slots below
        ``min_score`` are zero."""
        if self.proposal_head is None:
            raise PixelLLMError("this model has no proposal head (heads.proposals is false), so it cannot "
                                "propose regions for dense captioning; pass boxes or use another checkpoint")
        k = max_proposals or self.config.heads.max_proposals
        maps = embedding.maps
        if maps is None or "heatmap" not in maps:  # (a mask decoder's embedding may hold only the fine map)
            maps = self.proposal_head(embedding.tokens)
        return self.proposal_head.decode(maps, image_sizes, self.canvas_size, k, min_score)

    def forward(self, inputs: ModelInputs, embedding: ImageEmbedding | None = None) -> ModelOutput:
        """Training's pass: embed the images (unless given), one prompt pass over the valid prompts, losses."""
        if embedding is None:
            wants_maps = self.proposal_head is not None and (
                self.training or inputs.gt_boxes is not None or (self._needs_maps and inputs.text_ids is not None))
            embedding = self.embed_images(inputs.pixel_values, maps=wants_maps)
        out = ModelOutput(proposals=(embedding.maps or {}) if self.proposal_head is not None else {})
        valid = inputs.prompt_mask.bool()
        with_masks = self.mask_decoder is not None and inputs.target_masks is not None
        flat: dict[str, Tensor] = {}
        rows = self._mask_rows(inputs, valid)
        if with_masks and rows.any():  # prompted by the target's box (mask_boxes), not the row's prompt box
            mask_boxes = inputs.mask_boxes if inputs.mask_boxes is not None else inputs.prompt_boxes
            m_idx = rows.nonzero(as_tuple=True)[0]
            m_points, m_labels = _rows_of(inputs.mask_points, inputs.mask_point_labels, rows)
            flat["mask_logits"], flat["mask_iou"] = self.prompt_masks(embedding, mask_boxes[rows], m_idx,
                                                                      inputs.image_sizes, m_points, m_labels)
            out.mask_logits, out.mask_iou = _scatter(flat["mask_logits"], rows), _scatter(flat["mask_iou"], rows)
        if inputs.text_ids is not None:
            text_mask = inputs.text_mask if inputs.text_mask is not None else torch.ones_like(inputs.text_ids,
                                                                                            dtype=torch.bool)
            b_idx = valid.nonzero(as_tuple=True)[0]
            if b_idx.numel():
                p_points, p_labels = _rows_of(inputs.prompt_points, inputs.prompt_point_labels, valid)
                result = self.prompt_pass(embedding, inputs.prompt_boxes[valid], b_idx, inputs.image_sizes,
                                          inputs.context_ids[valid], inputs.context_mask[valid],
                                          inputs.text_ids[valid], text_mask[valid], points=p_points,
                                          point_labels=p_labels)
                text_flat = {"logits": result.logits, "hidden": result.hidden, "points": result.points,
                             "confidence": result.confidence}
                for name, value in text_flat.items():
                    setattr(out, name, _scatter(value, valid))
                flat.update(text_flat)
                if result.cell_logits is not None:
                    flat.update(cell_logits=result.cell_logits, cell_boxes=result.cell_boxes)
            else:
                b, n, t = inputs.text_ids.shape
                z = embedding.tokens.new_zeros
                out.logits, out.hidden = z(b, n, t, self.language.vocab_size), z(b, n, t, self.language.hidden_size)
                out.points, out.confidence = z(b, n, t, 2 * self.config.heads.num_points), z(b, n, t)
        if (inputs.text_loss_mask is not None or inputs.target_points is not None or inputs.gt_boxes is not None
                or with_masks):
            out.loss, out.losses = self._loss(inputs, valid, flat, out.proposals)
        return out

    # ---- internals ---------------------------------------------------------------------------------------
    @property
    def _points_need_maps(self) -> bool:
        return self.config.heads.point_mode == "grid"  # (the head may sit inside a peft wrapper)

    @property
    def _needs_maps(self) -> bool:
        """Whether visual tokens, points or masks read the proposal head's maps (or the fine map kept with
        them)."""
        return self._points_need_maps or self.map_tokens is not None or self._masks_read_fine

    @property
    def _masks_read_fine(self) -> bool:
        return self.mask_decoder is not None and self.mask_decoder.fine_proj is not None

    @property
    def _reads_pixels(self) -> bool:
        """Whether a part reads the canvas pixels (kept as ``maps["pixels"]`` in the image embedding)."""
        return self._masks_read_pixels or self.zoom is not None or self.config.heads.candidate_zoom > 0

    @property
    def _masks_read_pixels(self) -> bool:
        return self.mask_decoder is not None and self.mask_decoder.refiner is not None

    @staticmethod
    def _mask_rows(inputs: ModelInputs, valid: Tensor) -> Tensor:
        """[B,N]: the prompt rows with a target mask (the rows the mask decoder runs on in training)."""
        return valid & inputs.mask_valid.bool() if inputs.mask_valid is not None else valid

    def _maps_for_prompts(self, embedding: ImageEmbedding) -> dict[str, Tensor]:
        if embedding.maps is None:
            raise PixelLLMError("this model's prompts read the proposal maps: embed the images with "
                                "PixelLLM.embed_images (maps are computed when the model needs them)")
        return embedding.maps

    def _adapter_tokens(self, image_tokens: Tensor, boxes: Tensor, boxes01: Tensor, image_index: Tensor,
                        points: Tensor | None = None, point_labels: Tensor | None = None) -> Tensor:
        """The prompt encoder and adapter: Q visual tokens per box (and its points, if any; with
        ``prompt.roi_grid``, RoI samples of the image tokens join the adapter's tokens)."""
        pe = self.prompt_encoder
        dense_pe, dense = pe.dense_pe(self.vision.grid_size), pe.dense_embedding()

        def adapt(rows_boxes, rows_boxes01, rows_index, rows_points, rows_labels):
            roi = None
            if self.prompt_adapter.roi_grid > 0:
                roi = self.prompt_adapter.roi_tokens(image_tokens, self.vision.grid_size, rows_boxes01, rows_index,
                                                     pe.pe)
            return self.prompt_adapter(image_tokens, dense_pe, dense, pe.embed(rows_boxes, rows_points, rows_labels),
                                       rows_index, roi)

        return _by_point_rows(adapt, (boxes, boxes01, image_index), points, point_labels)

    def _loss(self, inputs: ModelInputs, valid: Tensor, flat: dict[str, Tensor],
              maps: dict[str, Tensor]) -> tuple[Tensor | None, dict[str, float]]:
        kw: dict = {} if self.word_head is None else self.word_head.loss_inputs(inputs, valid, maps, zoom=self.zoom)
        if "mask_logits" in flat and inputs.target_masks is not None:
            kw.update(mask_logits=flat["mask_logits"], mask_iou=flat["mask_iou"],
                      target_masks=inputs.target_masks[self._mask_rows(inputs, valid)])
        if "logits" in flat:
            kw.update(logits=flat["logits"], points=flat["points"],
                      confidence=flat["confidence"] if self.confidence_head is not None else None,
                      cell_logits=flat.get("cell_logits"), cell_boxes=flat.get("cell_boxes"))
            if inputs.text_loss_mask is not None:
                rows = inputs.text_loss_mask.bool()[valid]
                mask = inputs.text_mask[valid] if inputs.text_mask is not None else torch.ones_like(rows[:, None])
                kw.update(text_ids=inputs.text_ids[valid], text_mask=mask.bool() & rows[:, None])
            if inputs.target_points is not None and inputs.point_mask is not None:
                kw.update(target_points=inputs.target_points[valid], point_mask=inputs.point_mask[valid])
        if maps:
            kw["maps"] = maps
            if inputs.gt_boxes is not None:
                gt_mask = (inputs.gt_boxes_mask if inputs.gt_boxes_mask is not None
                           else torch.ones(inputs.gt_boxes.shape[:2], dtype=torch.bool, device=valid.device))
                kw.update(gt_boxes=inputs.gt_boxes, gt_mask=gt_mask, image_sizes=inputs.image_sizes,
                          canvas_size=self.canvas_size)
        if not kw:
            return None, {}
        total, losses = combine_losses(self.config.loss, **kw)
        if self.training and torch.is_grad_enabled():  # parts this batch did not use: a zero gradient (DDP)
            unused = [p for p in (self.prompt_encoder.point_embed, self.prompt_encoder.not_a_point_embed)
                      if p is not None]
            if self.mask_decoder is not None and "mask_logits" not in flat:
                unused += list(self.mask_decoder.parameters())
            if unused:
                total = total + sum(p.sum() for p in unused) * 0.0
        return total, losses

    # ---- utilities -----------------------------------------------------------------------------------
    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)
