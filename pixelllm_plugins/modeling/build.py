"""Builders: a config names each part's kind, and the builder picks its implementation (as SAM's
``build_sam.py``). Parts import their interfaces, never this module, so there is no import cycle."""

from __future__ import annotations

from torch import nn

from ..config import LanguageConfig, VisionConfig
from ..errors import CheckpointError
from .language import LanguageModel


def build_vision_encoder(config: VisionConfig) -> nn.Module:
    """The built-in ViT (``kind="vit"``) or a Hugging Face vision tower (``kind="hf"``)."""
    if config.kind == "vit":
        from .vision import ViT

        return ViT(config)
    if config.kind == "hf":
        from .vision_hf import HFVisionEncoder

        return HFVisionEncoder(config)
    raise CheckpointError(f"unknown vision encoder kind {config.kind!r}; use 'vit' or 'hf'")


def build_language_model(config: LanguageConfig, visual_dim: int, vocab_size: int) -> LanguageModel:
    """The built-in GIT-style decoder (``git``) or a Hugging Face causal / encoder-decoder language model."""
    if config.kind == "git":
        from .language_git import GitDecoder

        return GitDecoder(config, visual_dim=visual_dim, vocab_size=vocab_size)
    if config.kind == "hf-causal":
        from .language_hf import HFCausalLM

        return HFCausalLM(config, visual_dim=visual_dim)
    if config.kind == "hf-seq2seq":
        from .language_hf import HFSeq2SeqLM

        return HFSeq2SeqLM(config, visual_dim=visual_dim)
    raise CheckpointError(f"unknown language model kind {config.kind!r}; use git, hf-causal or hf-seq2seq")
