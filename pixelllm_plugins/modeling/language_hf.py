"""Hugging Face language models behind the ``LanguageModel`` interface (spec 2.4 b).

- ``HFCausalLM`` (GPT-2, LLaMA-likes, ...): one sequence ``[visual | context | text]``; padded context
  positions are masked and skipped by the position ids, so a row's result does not depend on how much
  padding the batch gave it. Logits and hidden states are returned for the text positions only.
- ``HFSeq2SeqLM`` (T5, the paper's Flan-T5 variant): the encoder reads ``[visual | context]`` (the visual
  part gets no token embedding), the decoder reads the text with teacher forcing; ``hidden`` is the final
  decoder hidden state (after the last layer norm).

Visual tokens enter through ``Linear(visual_dim -> d_model) + LayerNorm`` (init N(0, 0.02)), always trained.
With ``config.freeze`` the HF weights are frozen; with ``config.lora_r > 0`` LoRA adapters (peft) are put on
the attention projections (q,v by default) under the adapter name ``BASE_LM_ADAPTER``, with
``lora_alpha = config.lora_alpha or 2 * r`` (the paper's update ``W + 2·A·B``: scale 2, not divided by rank).
These LoRA weights belong to the base model: they are saved in ``model.safetensors`` with everything else,
and per-project adapters from ``modeling.lora`` stack on top of them.

Decoding uses the model's own KV cache (transformers 5.x ``Cache`` objects). Cache objects are updated in
place, so a state is consumed by ``decode_step`` / ``reorder_state``: keep using the returned state only.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..config import LanguageConfig
from ..errors import CheckpointError
from .language import LanguageModel

BASE_LM_ADAPTER = "pixelllm_lm"  # peft adapter name of the LM's own LoRA (part of the base model)

_FALLBACK_TARGETS = (("q_proj", "v_proj"), ("q", "v"), ("query", "value"), ("c_attn",), ("query_key_value",),
                     ("qkv_proj",), ("Wqkv",))


def _load_hf(auto_name: str, name_or_path: str | None) -> nn.Module:
    import transformers

    if not name_or_path:
        raise CheckpointError("language.kind hf-causal/hf-seq2seq needs language.hf_name_or_path "
                              "(a local folder or a hub id)")
    causal = "Causal" in auto_name
    kind = "hf-causal (decoder-only)" if causal else "hf-seq2seq (encoder-decoder)"
    try:
        hf_config = transformers.AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(
            f"cannot read the config of language model {name_or_path!r}: {exc}. Pass a local folder written by "
            "save_pretrained (config.json + weights) or a hub id (needs network access)."
        ) from exc
    if bool(getattr(hf_config, "is_encoder_decoder", False)) == causal:
        other = "hf-seq2seq" if causal else "hf-causal"
        raise CheckpointError(f"{name_or_path!r} ({hf_config.model_type}) is not a {kind} model; "
                              f"set language.kind={other!r}")
    try:
        return getattr(transformers, auto_name).from_pretrained(name_or_path, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(
            f"cannot load {name_or_path!r} as a {kind} language model with {auto_name}: {exc}. T5-style models "
            "need language.kind='hf-seq2seq', decoder-only models language.kind='hf-causal'."
        ) from exc


def _text_config(model: nn.Module):
    cfg = model.config
    get = getattr(cfg, "get_text_config", None)
    return get() if callable(get) else cfg


def _leaf_names(model: nn.Module) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name, _ in model.named_modules() if name}


def default_lora_targets(model: nn.Module) -> list[str]:
    """q,v-style attention projections of a HF LM (peft's per-architecture table, then name patterns)."""
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as table

    model_type = getattr(_text_config(model), "model_type", None) or getattr(model.config, "model_type", "")
    leaves = _leaf_names(model)
    for key in (model_type, getattr(model.config, "model_type", "")):
        targets = table.get(key)
        if targets and all(t in leaves for t in targets):
            return list(targets)
    for targets in _FALLBACK_TARGETS:
        if all(t in leaves for t in targets):
            return list(targets)
    raise CheckpointError(
        f"cannot tell which modules of {type(model).__name__} ({model_type}) are the attention q/v "
        "projections; set language.lora_target_modules (e.g. ['q_proj', 'v_proj'])"
    )


def apply_lora(model: nn.Module, config: LanguageConfig) -> list[str]:
    """Inject LoRA (peft) into a HF model in place; returns the target module names used."""
    from peft import LoraConfig, inject_adapter_in_model

    targets = list(config.lora_target_modules or default_lora_targets(model))
    fan_in_fan_out = False
    try:
        from transformers.pytorch_utils import Conv1D

        fan_in_fan_out = any(isinstance(m, Conv1D) for n, m in model.named_modules()
                             if n.rsplit(".", 1)[-1] in targets)
    except ImportError:  # pragma: no cover
        pass
    lora_config = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha or 2 * config.lora_r,
                             lora_dropout=config.lora_dropout, target_modules=targets, bias="none",
                             fan_in_fan_out=fan_in_fan_out)
    try:
        inject_adapter_in_model(lora_config, model, adapter_name=BASE_LM_ADAPTER)
    except ValueError as exc:
        raise CheckpointError(f"cannot put LoRA on {targets} of {type(model).__name__}: {exc}; "
                              "check language.lora_target_modules") from exc
    return targets


@dataclass
class CausalDecodingState:
    cache: Any  # transformers Cache (updated in place)
    attention_mask: Tensor  # [M, L] long, every position fed so far
    next_position: Tensor  # [M] long, position id of the next token


@dataclass
class Seq2SeqDecodingState:
    encoder_hidden: Tensor  # [M, Le, D]
    encoder_mask: Tensor  # [M, Le] long
    cache: Any  # EncoderDecoderCache or None before the first step


class _HFLanguageModel(LanguageModel):
    _auto_class = ""

    def __init__(self, config: LanguageConfig, visual_dim: int):
        super().__init__()
        self.config = config
        self.model = _load_hf(self._auto_class, config.hf_name_or_path)
        text_cfg = _text_config(self.model)
        d = getattr(text_cfg, "hidden_size", None) or getattr(text_cfg, "d_model", None)
        if not d:
            raise CheckpointError(f"cannot read the hidden size of {config.hf_name_or_path!r}")
        self.hidden_size = int(d)
        out_emb = self.model.get_output_embeddings()
        self.vocab_size = int(out_emb.weight.shape[0]) if out_emb is not None else int(text_cfg.vocab_size)
        self.visual_proj = nn.Linear(visual_dim, self.hidden_size)
        self.visual_norm = nn.LayerNorm(self.hidden_size)
        nn.init.normal_(self.visual_proj.weight, std=0.02)
        nn.init.zeros_(self.visual_proj.bias)
        self.lora_targets: list[str] = []
        if config.lora_r > 0:
            self.lora_targets = apply_lora(self.model, config)
        for name, p in self.model.named_parameters():
            if ".lora_" not in name:
                p.requires_grad_(not config.freeze)
        params = inspect.signature(self.model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._has_position_ids = "position_ids" in params
        self._has_logits_to_keep = "logits_to_keep" in params

    # ---- helpers ---------------------------------------------------------------------------------
    def embed(self, ids: Tensor) -> Tensor:
        return self.model.get_input_embeddings()(ids)

    def project_visual(self, visual: Tensor) -> Tensor:
        dtype = self.model.get_input_embeddings().weight.dtype
        x = self.visual_norm(self.visual_proj(visual.to(self.visual_proj.weight.dtype)))
        return x.to(dtype)

    @staticmethod
    def _out_cache(out) -> Any:
        cache = getattr(out, "cache", None)
        if cache is None:
            cache = getattr(out, "past_key_values", None)
        return cache

    @staticmethod
    def _reorder_cache(cache: Any, index: Tensor) -> Any:
        if cache is None:
            return None
        if hasattr(cache, "reorder_cache"):
            cache.reorder_cache(index)
            return cache
        # legacy tuple-of-tuples caches
        return tuple(tuple(t.index_select(0, index.to(t.device)) for t in layer) for layer in cache)


class HFCausalLM(_HFLanguageModel):
    """A decoder-only HF LM reading ``[visual | context | text]`` as one sequence."""

    _auto_class = "AutoModelForCausalLM"

    def _prefix(self, visual: Tensor, context_ids: Tensor, context_mask: Tensor) -> tuple[Tensor, Tensor]:
        vis = self.project_visual(visual)
        embeds = torch.cat([vis, self.embed(context_ids)], 1)
        ones = torch.ones(vis.shape[:2], dtype=torch.long, device=vis.device)
        return embeds, torch.cat([ones, context_mask.long()], 1)

    def _call(self, embeds: Tensor, mask: Tensor, positions: Tensor, *, cache: Any = None,
              use_cache: bool = False, keep: int | None = None):
        kwargs: dict[str, Any] = {}
        if self._has_position_ids:
            kwargs["position_ids"] = positions
        if keep is not None and self._has_logits_to_keep:
            kwargs["logits_to_keep"] = keep
        if cache is not None:
            kwargs[self._cache_kw] = cache
        return self.model(inputs_embeds=embeds, attention_mask=mask, use_cache=use_cache,
                          output_hidden_states=True, return_dict=True, **kwargs)

    def forward(self, visual: Tensor, context_ids: Tensor, context_mask: Tensor, text_ids: Tensor,
                text_mask: Tensor) -> tuple[Tensor, Tensor]:
        embeds, mask = self._prefix(visual, context_ids, context_mask)
        embeds = torch.cat([embeds, self.embed(text_ids)], 1)
        mask = torch.cat([mask, text_mask.long()], 1)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        t = text_ids.shape[1]
        out = self._call(embeds, mask, positions, keep=t)
        return out.logits[:, -t:], out.hidden_states[-1][:, -t:]

    def start_decoding(self, visual: Tensor, context_ids: Tensor, context_mask: Tensor) -> CausalDecodingState:
        embeds, mask = self._prefix(visual, context_ids, context_mask)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        out = self._call(embeds, mask, positions, use_cache=True, keep=1)
        return CausalDecodingState(cache=self._out_cache(out), attention_mask=mask,
                                   next_position=mask.sum(1))

    def decode_step(self, state: CausalDecodingState, token_ids: Tensor) -> tuple[Tensor, Tensor, Any]:
        mask = torch.cat([state.attention_mask, state.attention_mask.new_ones(token_ids.shape[0], 1)], 1)
        out = self._call(self.embed(token_ids[:, None]), mask, state.next_position[:, None],
                         cache=state.cache, use_cache=True, keep=1)
        new = CausalDecodingState(cache=self._out_cache(out), attention_mask=mask,
                                  next_position=state.next_position + 1)
        return out.logits[:, -1], out.hidden_states[-1][:, -1], new

    def reorder_state(self, state: CausalDecodingState, index: Tensor) -> CausalDecodingState:
        index = index.to(state.attention_mask.device)
        return CausalDecodingState(cache=self._reorder_cache(state.cache, index),
                                   attention_mask=state.attention_mask.index_select(0, index),
                                   next_position=state.next_position.index_select(0, index))


class HFSeq2SeqLM(_HFLanguageModel):
    """An encoder-decoder HF LM (T5): encoder reads ``[visual | context]``, decoder reads the text."""

    _auto_class = "AutoModelForSeq2SeqLM"

    def _encoder_inputs(self, visual: Tensor, context_ids: Tensor, context_mask: Tensor) -> tuple[Tensor, Tensor]:
        vis = self.project_visual(visual)
        embeds = torch.cat([vis, self.embed(context_ids)], 1)
        ones = torch.ones(vis.shape[:2], dtype=torch.long, device=vis.device)
        return embeds, torch.cat([ones, context_mask.long()], 1)

    def forward(self, visual: Tensor, context_ids: Tensor, context_mask: Tensor, text_ids: Tensor,
                text_mask: Tensor) -> tuple[Tensor, Tensor]:
        embeds, mask = self._encoder_inputs(visual, context_ids, context_mask)
        out = self.model(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=text_ids,
                         decoder_attention_mask=text_mask.long(), use_cache=False, output_hidden_states=True,
                         return_dict=True)
        return out.logits, out.decoder_hidden_states[-1]

    def start_decoding(self, visual: Tensor, context_ids: Tensor, context_mask: Tensor) -> Seq2SeqDecodingState:
        embeds, mask = self._encoder_inputs(visual, context_ids, context_mask)
        enc = self.model.get_encoder()(inputs_embeds=embeds, attention_mask=mask, return_dict=True)
        return Seq2SeqDecodingState(encoder_hidden=enc.last_hidden_state, encoder_mask=mask, cache=None)

    def decode_step(self, state: Seq2SeqDecodingState, token_ids: Tensor) -> tuple[Tensor, Tensor, Any]:
        from transformers.modeling_outputs import BaseModelOutput

        kwargs: dict[str, Any] = {}
        if state.cache is not None:
            kwargs[self._cache_kw] = state.cache
        out = self.model(encoder_outputs=BaseModelOutput(last_hidden_state=state.encoder_hidden),
                         attention_mask=state.encoder_mask, decoder_input_ids=token_ids[:, None],
                         use_cache=True, output_hidden_states=True, return_dict=True, **kwargs)
        new = Seq2SeqDecodingState(encoder_hidden=state.encoder_hidden, encoder_mask=state.encoder_mask,
                                   cache=self._out_cache(out))
        return out.logits[:, -1], out.decoder_hidden_states[-1][:, -1], new

    def reorder_state(self, state: Seq2SeqDecodingState, index: Tensor) -> Seq2SeqDecodingState:
        index = index.to(state.encoder_hidden.device)
        return Seq2SeqDecodingState(encoder_hidden=state.encoder_hidden.index_select(0, index),
                                    encoder_mask=state.encoder_mask.index_select(0, index),
                                    cache=self._reorder_cache(state.cache, index))
