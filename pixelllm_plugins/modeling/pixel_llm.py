"""PixelLLM: vision encoder -> box-prompted adapter -> language model -> per-token points (+ proposals).

Prompts are flattened to ``M`` valid (image, prompt) pairs for the language model; outputs are scattered
back to ``[B,N,...]`` with zeros at invalid prompts. Frames and shapes are documented in ``inputs.py``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from ..config import PixelLLMConfig
from ..errors import PixelLLMError
from .heads import ConfidenceHead, GridPointHead, PointHead, ProposalHead, zero_linear
from .inputs import ModelInputs, ModelOutput
from .language import build_language_model
from .losses import combine_losses
from .prompt_adapter import PromptAdapter, sample_lattice
from .prompt_encoder import BoxExtentEncoder, PromptEncoder
from .vision import build_vision_encoder


def _scatter(flat: Tensor, valid: Tensor) -> Tensor:
    """[M,...] rows of the True entries of ``valid`` [B,N] -> [B,N,...] with zeros elsewhere."""
    b, n = valid.shape
    if flat.shape[0] == b * n:
        return flat.view(b, n, *flat.shape[1:])
    out = flat.new_zeros(b, n, *flat.shape[1:])
    out[valid] = flat
    return out


class PixelLLM(nn.Module):
    def __init__(self, config: PixelLLMConfig, vocab_size: int):
        super().__init__()
        config.language.vocab_size = vocab_size
        self.config = config
        self.canvas_size = config.vision.image_size
        self.model_version = f"{config.preset}-random"  # set by load_pretrained / save_pretrained
        self.vision = build_vision_encoder(config.vision)
        if config.vision.freeze and config.vision.kind == "vit":
            self.vision.requires_grad_(False)
        self.prompt_encoder = PromptEncoder(config.prompt.embed_dim, self.canvas_size)
        self.prompt_adapter = PromptAdapter(config.prompt, vision_dim=self.vision.out_dim)
        self.language = build_language_model(config.language, visual_dim=config.prompt.output_dim,
                                             vocab_size=vocab_size)
        if config.language.freeze and config.language.kind == "git":
            self.language.requires_grad_(False)
        h, heads = self.language.hidden_size, config.heads
        self.confidence_head = ConfidenceHead(h, heads.point_hidden) if heads.confidence else None
        self.proposal_head = (ProposalHead(self.vision.out_dim, heads.proposal_hidden, self.vision.grid_size,
                                           detail_dim=getattr(self.vision, "detail_dim", 0))
                              if heads.proposals else None)
        self.map_token_proj = None
        if config.prompt.map_tokens > 0:
            if self.proposal_head is None:
                raise PixelLLMError("prompt.map_tokens samples the proposal head's features: it needs "
                                    "heads.proposals true")
            self.map_token_proj = nn.Linear(self.proposal_head.feature_dim, config.prompt.output_dim)
            self.map_token_pe = nn.Linear(config.prompt.embed_dim, config.prompt.output_dim)
        fine_dim = getattr(self.vision, "fine_dim", 0)
        if config.vision.fine_channels and not fine_dim:
            raise PixelLLMError("vision.fine_channels needs the built-in ViT (vision.kind 'vit')")
        self.fine_token_proj = None
        if config.prompt.fine_grid > 0:
            if not fine_dim or self.map_token_proj is None:
                raise PixelLLMError("prompt.fine_grid adds samples of the fine map to the map tokens: it needs "
                                    "vision.fine_channels > 0 and prompt.map_tokens > 0")
            g, m = config.prompt.fine_grid, config.prompt.map_tokens
            self.fine_token_proj = zero_linear(g * g * fine_dim, m * m * config.prompt.output_dim)
        self.box_extent = (BoxExtentEncoder(config.prompt.output_dim, self.canvas_size)
                           if config.prompt.box_extent else None)
        self.word_head = None
        if heads.box_words:
            if self.proposal_head is None:
                raise PixelLLMError("heads.box_words reads the proposal head's features: it needs heads.proposals")
            dim = self.proposal_head.feature_dim
            self.word_head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, vocab_size))
        if heads.candidate_fine_grid > 0 and not (fine_dim and heads.relation_layers > 0):
            raise PixelLLMError("heads.candidate_fine_grid adds fine-map samples to the relation candidates: it "
                                "needs vision.fine_channels > 0 and heads.relation_layers > 0")
        if heads.point_mode == "grid":
            if self.proposal_head is None or heads.num_points != 2:
                raise PixelLLMError("heads.point_mode 'grid' points at proposal-map cells: it needs "
                                    "heads.proposals true and heads.num_points 2")
            self.point_head = GridPointHead(h, self.proposal_head.feature_dim, heads.point_hidden,
                                            self.proposal_head.map_size, self.canvas_size,
                                            heads.relation_layers, heads.relation_candidates,
                                            heads.point_context_layers, config.language.max_positions,
                                            heads.point_refine, heads.point_coords,
                                            fine_dim, heads.candidate_fine_grid)
        elif heads.point_mode == "mlp":
            if heads.point_context_layers or heads.point_refine or heads.point_coords or heads.candidate_fine_grid:
                raise PixelLLMError("heads.point_context_layers, point_refine, point_coords and candidate_fine_grid "
                                    "belong to the grid point head: set heads.point_mode 'grid' or leave them at "
                                    "0 / false")
            self.point_head = PointHead(h, heads.point_hidden, heads.point_layers, heads.num_points)
        else:
            raise PixelLLMError(f"unknown heads.point_mode {heads.point_mode!r}; use 'mlp' or 'grid'")

    # ---- pieces --------------------------------------------------------------------------------------
    def encode_images(self, pixel_values: Tensor) -> Tensor:
        """[B,3,S,S] normalised canvas -> image tokens [B,L,C] (the part worth caching per image)."""
        return self.vision(pixel_values)

    def encode_images_with_fine(self, pixel_values: Tensor) -> tuple[Tensor, Tensor | None]:
        """Image tokens and the vision encoder's fine map (None without ``vision.fine_channels``)."""
        if getattr(self.vision, "fine", None) is None:
            return self.vision(pixel_values), None
        return self.vision.forward_with_fine(pixel_values)

    def image_maps(self, image_tokens: Tensor, fine: Tensor | None = None) -> dict[str, Tensor]:
        """The proposal head's maps of the images, plus the fine map under ``"fine"`` when there is one:
        everything per image that prompts read, cached next to the tokens."""
        maps = self.proposal_head(image_tokens)
        if fine is not None:
            maps["fine"] = fine
        return maps

    @property
    def needs_maps(self) -> bool:
        """Whether visual tokens or points read the proposal head's maps (``proposal_head(image_tokens)``)."""
        return self.points_need_maps or self.map_token_proj is not None

    def visual_tokens_flat(self, image_tokens: Tensor, boxes: Tensor, image_index: Tensor,
                           maps: dict[str, Tensor] | None = None, image_sizes: Tensor | None = None) -> Tensor:
        """image_tokens [B,L,C], boxes [M,4] canvas px, image_index [M] -> visual tokens [M,Q(+g*g),Dv].

        ``maps`` (``proposal_head`` of the same image tokens) is computed when needed and absent.
        ``image_sizes`` [B,2] (w,h canvas px of the un-padded images) is needed with ``prompt.box_extent``.
        """
        visual = self._prompt_tokens(image_tokens, boxes, image_index, maps)
        if self.box_extent is None:
            return visual
        if image_sizes is None:
            raise PixelLLMError("this model's prompt.box_extent reads each image's size: pass image_sizes [B,2] "
                                "(w,h of the resized, un-padded images in canvas pixels)")
        extent = self.box_extent(boxes, image_sizes.index_select(0, image_index))
        return visual + extent[:, None, :].to(visual.dtype)

    def _prompt_tokens(self, image_tokens: Tensor, boxes: Tensor, image_index: Tensor,
                       maps: dict[str, Tensor] | None) -> Tensor:
        pe = self.prompt_encoder
        boxes01 = (boxes.float() / self.canvas_size).clamp(0, 1)
        roi = None
        if self.prompt_adapter.roi_grid > 0:
            roi = self.prompt_adapter.roi_tokens(image_tokens, self.vision.grid_size, boxes01, image_index, pe.pe)
        visual = self.prompt_adapter(image_tokens, pe.dense_pe(self.vision.grid_size), pe.dense_embedding(),
                                     pe.embed_boxes(boxes), image_index, roi)
        if self.map_token_proj is None:
            return visual
        if maps is None:
            maps = self.proposal_head(image_tokens)
        sampled, points = sample_lattice(maps["features"], boxes01.to(maps["features"].dtype), image_index,
                                         self.config.prompt.map_tokens)
        extra = self.map_token_proj(sampled) + self.map_token_pe(pe.pe.encode(points).to(sampled.dtype))
        if self.fine_token_proj is not None:
            if "fine" not in maps:
                raise PixelLLMError("this model's prompt.fine_grid reads the fine map: pass maps from "
                                    "image_maps(*encode_images_with_fine(pixels))")
            fine, _ = sample_lattice(maps["fine"], boxes01.to(maps["fine"].dtype), image_index,
                                     self.config.prompt.fine_grid)
            extra = extra + self.fine_token_proj(fine.flatten(1).to(extra.dtype)).view(extra.shape)
        return torch.cat([visual, extra.to(visual.dtype)], dim=1)

    def visual_tokens(self, image_tokens: Tensor, prompt_boxes: Tensor, image_sizes: Tensor | None = None
                      ) -> Tensor:
        """image_tokens [B,L,C], prompt_boxes [B,N,4] canvas px -> visual tokens [B,N,Q,Dv].

        ``image_sizes`` [B,2] is needed only with ``prompt.box_extent``; prompts are encoded in the canvas frame.
        """
        b, n = prompt_boxes.shape[:2]
        index = torch.arange(b, device=prompt_boxes.device).repeat_interleave(n)
        flat = self.visual_tokens_flat(image_tokens, prompt_boxes.reshape(b * n, 4), index,
                                       image_sizes=image_sizes)
        return flat.view(b, n, *flat.shape[1:])

    @property
    def points_need_maps(self) -> bool:
        return self.config.heads.point_mode == "grid"  # (the head may sit inside a peft wrapper)

    def predict_points(self, hidden: Tensor, maps: dict[str, Tensor] | None = None,
                       image_index: Tensor | None = None, image_sizes: Tensor | None = None,
                       choices: dict[str, Tensor] | None = None, text_mask: Tensor | None = None
                       ) -> tuple[Tensor, Tensor]:
        """hidden [M,T,H] -> (points [M,T,4] normalised x0,y0,x1,y1, confidence logits [M,T]).

        A grid point head also needs the proposal ``maps`` of the images, each row's ``image_index`` and
        the images' ``image_sizes`` [B,2]; pass a dict as ``choices`` to receive its cell logits and cell
        boxes (for the pointer loss), and ``text_mask`` [M,T] (real tokens) when rows are padded. Without a
        confidence head the logits are 0 (score 0.5).
        """
        if self.points_need_maps:
            if maps is None or image_index is None or image_sizes is None:
                raise PixelLLMError("this model's grid point head needs the proposal maps, image index and "
                                    "image sizes (PixelLLM.predict_points)")
            points, cell_logits, cell_boxes = self.point_head(hidden, maps, image_index, image_sizes,
                                                              text_mask=text_mask, with_choices=True)
            if choices is not None:
                choices.update(cell_logits=cell_logits, cell_boxes=cell_boxes)
        else:
            points = self.point_head(hidden)
        if self.confidence_head is None:
            return points, hidden.new_zeros(hidden.shape[:-1])
        return points, self.confidence_head(hidden)

    @torch.no_grad()
    def propose(self, image_tokens: Tensor, image_sizes: Tensor, max_proposals: int | None = None,
                min_score: float = 0.0, maps: dict[str, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """-> (boxes [B,K,4] normalised to the image, scores [B,K]); slots below ``min_score`` are zero."""
        if self.proposal_head is None:
            raise PixelLLMError("this model has no proposal head (heads.proposals is false), so it cannot "
                                "propose regions for dense captioning; pass boxes or use another checkpoint")
        k = max_proposals or self.config.heads.max_proposals
        if maps is None:
            maps = self.proposal_head(image_tokens)
        return self.proposal_head.decode(maps, image_sizes, self.canvas_size, k, min_score)

    # ---- full pass -----------------------------------------------------------------------------------
    def forward(self, inputs: ModelInputs, image_tokens: Tensor | None = None) -> ModelOutput:
        fine = None
        if image_tokens is None:
            image_tokens, fine = self.encode_images_with_fine(inputs.pixel_values)
        out = ModelOutput()
        if self.proposal_head is not None and (self.training or inputs.gt_boxes is not None
                                               or (self.needs_maps and inputs.text_ids is not None)):
            out.proposals = self.image_maps(image_tokens, fine)  # at inference ``propose`` is the entry point
        valid = inputs.prompt_mask.bool()
        flat: dict[str, Tensor] = {}
        if inputs.text_ids is not None:
            text_mask = inputs.text_mask if inputs.text_mask is not None else torch.ones_like(inputs.text_ids,
                                                                                            dtype=torch.bool)
            b_idx = valid.nonzero(as_tuple=True)[0]
            if b_idx.numel():
                visual = self.visual_tokens_flat(image_tokens, inputs.prompt_boxes[valid], b_idx,
                                                 out.proposals or None, inputs.image_sizes)
                logits, hidden = self.language(visual, inputs.context_ids[valid], inputs.context_mask[valid],
                                               inputs.text_ids[valid], text_mask[valid])
                choices: dict[str, Tensor] = {}
                points, confidence = self.predict_points(hidden, out.proposals or None, b_idx,
                                                         inputs.image_sizes, choices, text_mask[valid])
                flat = {"logits": logits, "hidden": hidden, "points": points, "confidence": confidence}
                for name, value in flat.items():
                    setattr(out, name, _scatter(value, valid))
                flat.update(choices)
            else:
                b, n, t = inputs.text_ids.shape
                z = image_tokens.new_zeros
                out.logits, out.hidden = z(b, n, t, self.language.vocab_size), z(b, n, t, self.language.hidden_size)
                out.points, out.confidence = z(b, n, t, 2 * self.config.heads.num_points), z(b, n, t)
        if inputs.text_loss_mask is not None or inputs.target_points is not None or inputs.gt_boxes is not None:
            out.loss, out.losses = self._loss(inputs, valid, flat, out.proposals)
        return out

    BOX_WORD_TASKS = ("region", "refer")  # sources whose text describes the object in the target box

    def box_word_logits(self, maps: dict[str, Tensor], boxes: Tensor, image_index: Tensor,
                        image_sizes: Tensor) -> Tensor:
        """Word logits [R,V] from the proposal features inside boxes [R,4] (normalised to each image)."""
        scale = (image_sizes.float().index_select(0, image_index) / self.canvas_size).repeat(1, 2)
        boxes01 = (boxes.float() * scale).clamp(0, 1)
        sampled, _ = sample_lattice(maps["features"], boxes01.to(maps["features"].dtype), image_index, 2)
        return self.word_head(sampled.mean(1))

    def _box_words(self, inputs: ModelInputs, valid: Tensor, maps: dict[str, Tensor]) -> dict[str, Tensor]:
        """Inputs of the box-words loss for region/refer batches: each prompt's text against its target box."""
        if self.word_head is None or not maps:
            return {}
        has = None
        if (inputs.task in self.BOX_WORD_TASKS and inputs.target_points is not None
                and inputs.point_mask is not None and inputs.text_ids is not None):
            pm = inputs.point_mask.bool() & valid[..., None]
            has = pm.any(-1)  # [B,N]
        if has is None or not has.any():
            # the head still joins the graph (with weight 0), as DDP expects of every parameter
            return {"word_logits": self.word_head(maps["features"].flatten(2).mean(-1))}
        first = pm.float().argmax(-1)  # [B,N] first position with a target
        boxes = inputs.target_points.gather(2, first[..., None, None].expand(-1, -1, 1, 4))[:, :, 0][has]
        b_idx = has.nonzero(as_tuple=True)[0]
        text_mask = inputs.text_mask if inputs.text_mask is not None else torch.ones_like(inputs.text_ids, dtype=torch.bool)
        return {"word_logits": self.box_word_logits(maps, boxes, b_idx, inputs.image_sizes),
                "word_text_ids": inputs.text_ids[has], "word_text_mask": text_mask[has]}

    def _loss(self, inputs: ModelInputs, valid: Tensor, flat: dict[str, Tensor],
              maps: dict[str, Tensor]) -> tuple[Tensor | None, dict[str, float]]:
        kw: dict = self._box_words(inputs, valid, maps)
        if flat:
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
        return combine_losses(self.config.loss, **kw)

    # ---- utilities -----------------------------------------------------------------------------------
    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    @classmethod
    def from_pretrained(cls, name_or_path: str | None = None, *, device: torch.device | str | None = None,
                        dtype: torch.dtype | None = None) -> PixelLLM:
        """The model of ``checkpoint.load_pretrained`` (use that function to also get the tokenizer)."""
        from ..checkpoint import load_pretrained

        return load_pretrained(name_or_path, device=device, dtype=dtype)[0]

    def save_pretrained(self, directory: str | Path, tokenizer, **kwargs) -> str:
        """``checkpoint.save_pretrained(self, tokenizer, directory, ...)`` -> model_version."""
        from ..checkpoint import save_pretrained

        return save_pretrained(self, tokenizer, directory, **kwargs)
