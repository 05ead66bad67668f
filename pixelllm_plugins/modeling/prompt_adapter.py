"""Prompt adapter ("prompt feature extractor", spec 2.3): Q learned queries read the image under a box prompt.

A SAM ``TwoWayTransformer`` runs over ``[Q queries | prompt tokens]`` and the image tokens; each of the Q
query outputs then goes through its own Linear to become one visual token for the language model. This
cross-attention is the only place the language model's input reads the image (no RoI pooling).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import PromptConfig
from .common import sample_lattice


class Attention(nn.Module):
    """SAM attention: q/k/v projected to ``dim // downsample`` channels, SDPA, projected back."""

    def __init__(self, dim: int, num_heads: int, downsample: int = 1):
        super().__init__()
        inner = dim // downsample
        if inner % num_heads:
            raise ValueError(f"attention width {inner} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, inner)
        self.k_proj = nn.Linear(dim, inner)
        self.v_proj = nn.Linear(dim, inner)
        self.out_proj = nn.Linear(inner, dim)

    def _heads(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        return x.view(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        q, k, v = self._heads(self.q_proj(q)), self._heads(self.k_proj(k)), self._heads(self.v_proj(v))
        out = F.scaled_dot_product_attention(q, k, v)
        b, h, n, d = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, h * d))


class TwoWayAttentionBlock(nn.Module):
    """Token self-attn -> token->image cross-attn -> MLP -> image->token cross-attn (post-norm, as SAM)."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, downsample: int, skip_first_layer_pe: bool):
        super().__init__()
        self.self_attn = Attention(dim, num_heads)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn_token_to_image = Attention(dim, num_heads, downsample)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.ReLU(), nn.Linear(mlp_dim, dim))
        self.norm3 = nn.LayerNorm(dim)
        self.norm4 = nn.LayerNorm(dim)
        self.cross_attn_image_to_token = Attention(dim, num_heads, downsample)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(self, queries: Tensor, keys: Tensor, query_pe: Tensor, key_pe: Tensor) -> tuple[Tensor, Tensor]:
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)
        k = keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(queries + query_pe, k, keys))
        queries = self.norm3(queries + self.mlp(queries))
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, queries + query_pe, queries))
        return queries, keys


class TwoWayTransformer(nn.Module):
    """SAM's two-way transformer over token sequences (image tokens already flattened)."""

    def __init__(self, depth: int, dim: int, num_heads: int, mlp_dim: int, downsample: int):
        super().__init__()
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(dim, num_heads, mlp_dim, downsample, skip_first_layer_pe=(i == 0))
            for i in range(depth)
        )
        self.final_attn_token_to_image = Attention(dim, num_heads, downsample)
        self.norm_final_attn = nn.LayerNorm(dim)

    def forward(self, image: Tensor, image_pe: Tensor, tokens: Tensor) -> Tensor:
        """image [M,L,C], image_pe [1 or M,L,C], tokens [M,P,C] -> updated tokens [M,P,C]."""
        queries, keys = tokens, image
        for layer in self.layers:
            queries, keys = layer(queries, keys, tokens, image_pe)
        out = self.final_attn_token_to_image(queries + tokens, keys + image_pe, keys)
        return self.norm_final_attn(queries + out)


class PromptAdapter(nn.Module):
    """``[Q learned queries | prompt tokens] <-> image tokens`` -> Q visual tokens per prompt."""

    def __init__(self, config: PromptConfig, vision_dim: int):
        super().__init__()
        h, q = config.hidden_size, config.num_queries
        self.num_queries, self.output_dim = q, config.output_dim
        self.image_proj = nn.Linear(vision_dim, h)
        self.dense_proj = nn.Linear(config.embed_dim, h)  # the "no mask" dense prompt
        self.pe_proj = nn.Linear(config.embed_dim, h)
        self.prompt_proj = nn.Linear(config.embed_dim, h)
        self.queries = nn.Parameter(torch.randn(q, h))
        self.roi_grid = config.roi_grid
        self.roi_proj = nn.Linear(vision_dim, h) if config.roi_grid > 0 else None
        self.transformer = TwoWayTransformer(config.depth, h, config.num_heads, config.mlp_dim,
                                             config.attention_downsample)
        # Q independent Linear(h -> output_dim), stored stacked so they run as one einsum.
        self.out_weight = nn.Parameter(torch.empty(q, h, config.output_dim))
        self.out_bias = nn.Parameter(torch.empty(q, config.output_dim))
        bound = 1 / math.sqrt(h)
        nn.init.uniform_(self.out_weight, -bound, bound)
        nn.init.uniform_(self.out_bias, -bound, bound)

    def roi_tokens(self, image_tokens: Tensor, grid_size: tuple[int, int], boxes01: Tensor,
                   image_index: Tensor, pe) -> Tensor:
        """Bilinear samples of the image features at a g x g lattice inside each box (+ their PE).

        boxes01 [M,4] are x1,y1,x2,y2 normalised to the canvas -> [M,g*g,hidden]."""
        gh, gw = grid_size
        fmap = image_tokens.transpose(1, 2).reshape(image_tokens.shape[0], -1, gh, gw)
        sampled, points = sample_lattice(fmap, boxes01, image_index, self.roi_grid)
        return self.roi_proj(sampled) + self.pe_proj(pe.encode(points).to(sampled.dtype))

    def forward(self, image_tokens: Tensor, image_pe: Tensor, dense_embedding: Tensor, prompt_tokens: Tensor,
                image_index: Tensor, roi: Tensor | None = None) -> Tensor:
        """image_tokens [B,L,Cv], image_pe [L,E], dense_embedding [1,E], prompt_tokens [M,P,E],
        image_index [M] (the image of each prompt), roi [M,R,hidden] (optional RoI tokens)
        -> visual tokens [M,Q,output_dim]."""
        src = self.image_proj(image_tokens) + self.dense_proj(dense_embedding)  # projected once per image
        src = src.index_select(0, image_index)
        pe = self.pe_proj(image_pe).unsqueeze(0)
        m = prompt_tokens.shape[0]
        parts = [self.queries.unsqueeze(0).expand(m, -1, -1), self.prompt_proj(prompt_tokens)]
        tokens = torch.cat(parts + ([roi] if roi is not None else []), 1)
        out = self.transformer(src, pe, tokens)[:, : self.num_queries]
        return torch.einsum("mqh,qho->mqo", out, self.out_weight) + self.out_bias
