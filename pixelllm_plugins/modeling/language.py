"""The language-model interface every LM implementation follows.

A language model reads, per prompt, Q visual tokens plus context tokens as a prefix and the text
tokens after it. It returns logits for the next token and the hidden state at every text position
(the point head reads these). For decoding it exposes a KV-cache API used by
``pixelllm_plugins.inference.decoding``.

Implementations: ``language_git.GitDecoder`` (built-in GIT-style prefix decoder),
``language_hf.HFCausalLM`` and ``language_hf.HFSeq2SeqLM`` (frozen Hugging Face LMs with LoRA).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn


class LanguageModel(nn.Module):
    """Base class. ``visual_dim`` is the width of incoming visual tokens (projected inside)."""

    hidden_size: int
    vocab_size: int

    def forward(self, visual: Tensor, context_ids: Tensor, context_mask: Tensor, text_ids: Tensor,
                text_mask: Tensor) -> tuple[Tensor, Tensor]:
        """visual [M,Q,Dv], context [M,Tc], text [M,T] -> (logits [M,T,V], hidden [M,T,H]).

        ``logits[:, i]`` predicts text token i+1; ``hidden[:, i]`` has read text tokens 0..i.
        """
        raise NotImplementedError

    def start_decoding(self, visual: Tensor, context_ids: Tensor, context_mask: Tensor) -> Any:
        """Run the prefix once and return a cache state for ``decode_step``."""
        raise NotImplementedError

    def decode_step(self, state: Any, token_ids: Tensor) -> tuple[Tensor, Tensor, Any]:
        """Feed one token per row ([M]) -> (logits [M,V], hidden [M,H], new state)."""
        raise NotImplementedError

    def reorder_state(self, state: Any, index: Tensor) -> Any:
        """Select/reorder cache rows (beam search): new row i = old row index[i]."""
        raise NotImplementedError
