"""Built-in GIT-style prefix decoder (spec 2.4a).

One post-LN BERT-style transformer stack runs over ``[visual (Q) | context (Tc) | text (T)]``:
the prefix (visual + context) attends bidirectionally within itself and never sees the text; text
tokens see the whole prefix plus a causal mask over the text; padded context/text keys are masked.
Context and text both use the word + learned position embeddings with positions restarting at 0.
Because the prefix never reads the text, its keys/values are computed once for decoding (KV cache).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import LanguageConfig
from ..errors import PixelLLMError
from .language import LanguageModel


@dataclass
class GitDecodeState:
    """KV cache: per layer keys/values ``[M,heads,P+t,d]``, the key mask ``[M,P+t]``, next text position."""

    keys: list[Tensor]
    values: list[Tensor]
    key_mask: Tensor
    position: int


class GitLayer(nn.Module):
    """Post-LN BERT block (self-attention, GELU FFN) that can extend a key/value cache."""

    def __init__(self, hidden: int, num_heads: int, intermediate: int, dropout: float):
        super().__init__()
        if hidden % num_heads:
            raise ValueError(f"LM hidden size {hidden} is not divisible by {num_heads} heads")
        self.num_heads, self.dropout = num_heads, dropout
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.attn_out = nn.Linear(hidden, hidden)
        self.attn_norm = nn.LayerNorm(hidden, eps=1e-12)
        self.ffn = nn.Sequential(nn.Linear(hidden, intermediate), nn.GELU(), nn.Linear(intermediate, hidden))
        self.ffn_norm = nn.LayerNorm(hidden, eps=1e-12)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor, past: tuple[Tensor, Tensor] | None = None
                ) -> tuple[Tensor, Tensor, Tensor]:
        """x [M,S,H], mask [M,1,S,S_past+S] bool (True = may attend) -> (x, keys, values incl. past)."""
        m, s, h = x.shape
        qkv = self.qkv(x).view(m, s, 3, self.num_heads, h // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        x = self.attn_norm(x + self.drop(self.attn_out(out.transpose(1, 2).reshape(m, s, h))))
        x = self.ffn_norm(x + self.drop(self.ffn(x)))
        return x, k, v


class GitDecoder(LanguageModel):
    def __init__(self, config: LanguageConfig, visual_dim: int, vocab_size: int):
        super().__init__()
        h = config.hidden_size
        self.hidden_size, self.vocab_size = h, vocab_size
        self.max_positions = config.max_positions
        self.visual_proj = nn.Sequential(nn.Linear(visual_dim, h), nn.LayerNorm(h, eps=1e-12))
        self.word_embed = nn.Embedding(vocab_size, h)
        self.pos_embed = nn.Embedding(config.max_positions, h)
        self.embed_norm = nn.LayerNorm(h, eps=1e-12)
        self.embed_drop = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(
            GitLayer(h, config.num_heads, config.intermediate_size, config.dropout)
            for _ in range(config.num_layers)
        )
        self.output = nn.Linear(h, vocab_size)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)

    # ---- embeddings ---------------------------------------------------------------------------------
    def _embed_tokens(self, ids: Tensor, start: int = 0) -> Tensor:
        end = start + ids.shape[1]
        if end > self.max_positions:
            raise PixelLLMError(
                f"{end} tokens exceed the language model's max_positions={self.max_positions}; "
                "shorten the prompt/text or lower max_new_tokens")
        pos = torch.arange(start, end, device=ids.device)
        return self.embed_drop(self.embed_norm(self.word_embed(ids) + self.pos_embed(pos)))

    def _prefix(self, visual: Tensor, context_ids: Tensor, context_mask: Tensor) -> tuple[Tensor, Tensor]:
        """-> prefix embeddings [M,Q+Tc,H] and their key mask [M,Q+Tc]."""
        vis = self.visual_proj(visual.to(self.word_embed.weight.dtype))
        x = torch.cat([vis, self._embed_tokens(context_ids)], dim=1)
        ones = torch.ones(vis.shape[:2], dtype=torch.bool, device=vis.device)
        return x, torch.cat([ones, context_mask.bool()], dim=1)

    # ---- LanguageModel API ---------------------------------------------------------------------------
    def forward(self, visual: Tensor, context_ids: Tensor, context_mask: Tensor, text_ids: Tensor,
                text_mask: Tensor) -> tuple[Tensor, Tensor]:
        prefix, prefix_mask = self._prefix(visual, context_ids, context_mask)
        x = torch.cat([prefix, self._embed_tokens(text_ids)], dim=1)
        p, t = prefix.shape[1], text_ids.shape[1]
        s = p + t
        allowed = torch.zeros(s, s, dtype=torch.bool, device=x.device)
        allowed[:, :p] = True  # everyone sees the prefix; the prefix sees nothing else
        allowed[p:, p:] = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        key_valid = torch.cat([prefix_mask, text_mask.bool()], dim=1)
        mask = (allowed.unsqueeze(0) & key_valid.unsqueeze(1)).unsqueeze(1)
        for layer in self.layers:
            x, _, _ = layer(x, mask)
        hidden = x[:, p:]
        return self.output(hidden), hidden

    def start_decoding(self, visual: Tensor, context_ids: Tensor, context_mask: Tensor) -> GitDecodeState:
        x, key_mask = self._prefix(visual, context_ids, context_mask)
        mask = key_mask[:, None, None, :].expand(-1, 1, x.shape[1], -1)
        keys, values = [], []
        for layer in self.layers:
            x, k, v = layer(x, mask)
            keys.append(k)
            values.append(v)
        return GitDecodeState(keys, values, key_mask, 0)

    def decode_step(self, state: GitDecodeState, token_ids: Tensor) -> tuple[Tensor, Tensor, GitDecodeState]:
        x = self._embed_tokens(token_ids.view(-1, 1), start=state.position)
        key_mask = torch.cat([state.key_mask, state.key_mask.new_ones(x.shape[0], 1)], dim=1)
        mask = key_mask[:, None, None, :]
        keys, values = [], []
        for layer, k_past, v_past in zip(self.layers, state.keys, state.values):
            x, k, v = layer(x, mask, past=(k_past, v_past))
            keys.append(k)
            values.append(v)
        hidden = x[:, 0]
        return self.output(hidden), hidden, GitDecodeState(keys, values, key_mask, state.position + 1)

    def reorder_state(self, state: GitDecodeState, index: Tensor) -> GitDecodeState:
        index = index.to(state.key_mask.device)
        return GitDecodeState([k.index_select(0, index) for k in state.keys],
                              [v.index_select(0, index) for v in state.values],
                              state.key_mask.index_select(0, index), state.position)
