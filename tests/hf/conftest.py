"""Tiny random Hugging Face models for the tests in tests/hf: built from configs, saved, loaded by path.

Nothing is downloaded. Each model is written once per session.
"""

from __future__ import annotations

import pytest
import torch

VOCAB = 64
# ids shared by the tiny LMs: T5 convention (BOS = PAD = 0, EOS = 1); GPT-2 gets the same ids.
PAD, EOS = 0, 1


@pytest.fixture(scope="session", autouse=True)
def _quiet_transformers():
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("hf-models")


def _save(model, path) -> str:
    model.save_pretrained(path)
    return str(path)


def _vision_kwargs(**extra):
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                patch_size=8, **extra)


# name -> number of prefix tokens (CLS, registers) the wrapper must drop
VISION_PREFIX = {"clip_vision": 1, "clip_dual": 1, "siglip_vision": 0, "vit": 1, "dinov2": 1,
                 "dinov2_registers": 5}


def build_vision(name: str):
    import transformers as tf

    if name == "clip_vision":
        return tf.CLIPVisionModel(tf.CLIPVisionConfig(**_vision_kwargs()))
    if name == "clip_dual":
        text = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                    num_attention_heads=2, max_position_embeddings=16)
        return tf.CLIPModel(tf.CLIPConfig(text_config=text, vision_config=_vision_kwargs(), projection_dim=16))
    if name == "siglip_vision":
        return tf.SiglipVisionModel(tf.SiglipVisionConfig(**_vision_kwargs()))
    if name == "vit":
        return tf.ViTModel(tf.ViTConfig(**_vision_kwargs()), add_pooling_layer=False)
    dino = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2, image_size=32,
                patch_size=8)
    if name == "dinov2":
        return tf.Dinov2Model(tf.Dinov2Config(**dino))
    if name == "dinov2_registers":
        return tf.Dinov2WithRegistersModel(tf.Dinov2WithRegistersConfig(num_register_tokens=4, **dino))
    raise KeyError(name)


@pytest.fixture(scope="session")
def vision_tower(hf_dir):
    """name -> (path, prefix tokens); built on first use."""
    cache: dict[str, tuple[str, int]] = {}

    def get(name: str) -> tuple[str, int]:
        if name not in cache:
            torch.manual_seed(0)
            cache[name] = (_save(build_vision(name).eval(), hf_dir / name), VISION_PREFIX[name])
        return cache[name]

    return get


@pytest.fixture(scope="session")
def tiny_gpt2(hf_dir) -> str:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=128, n_embd=32, n_layer=2, n_head=2, bos_token_id=PAD,
                     eos_token_id=EOS, pad_token_id=PAD, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return _save(GPT2LMHeadModel(cfg), hf_dir / "gpt2")


@pytest.fixture(scope="session")
def tiny_t5(hf_dir) -> str:
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    # transformers 5.x: a T5Config built from scratch has no decoder_start_token_id; set the ids explicitly
    cfg = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                   decoder_start_token_id=PAD, pad_token_id=PAD, eos_token_id=EOS, dropout_rate=0.0,
                   tie_word_embeddings=False)
    return _save(T5ForConditionalGeneration(cfg), hf_dir / "t5")


@pytest.fixture(scope="session")
def lm_paths(tiny_gpt2, tiny_t5) -> dict[str, str]:
    return {"hf-causal": tiny_gpt2, "hf-seq2seq": tiny_t5}
