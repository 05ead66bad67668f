"""End to end: a PixelLLM from ``hf_config(vision, lm)`` with tiny random HF towers (built, saved, loaded by path)."""

from __future__ import annotations

import pytest
import torch
from peft.tuners.lora import LoraLayer

from pixelllm_plugins.config import HeadsConfig, PromptConfig, hf_config
from pixelllm_plugins.inference.decoding import generate
from pixelllm_plugins.modeling import lora
from pixelllm_plugins.modeling.language_hf import BASE_LM_ADAPTER, HFCausalLM, HFSeq2SeqLM
from pixelllm_plugins.modeling.vision_hf import HFVisionEncoder

from .conftest import EOS, PAD, VOCAB
from .test_lora import make_inputs, same


def build(vision_path, lm_path, seed=0):
    from pixelllm_plugins.modeling.pixel_llm import PixelLLM

    config = hf_config(vision_path, lm_path, lora_r=4, image_size=32)
    # keep the paper-sized adapter/heads out of a CPU unit test
    config.prompt = PromptConfig(embed_dim=16, hidden_size=32, depth=1, num_heads=2, mlp_dim=64, num_queries=4,
                                 output_dim=24)
    config.heads = HeadsConfig(point_hidden=32, point_layers=2, proposal_hidden=16, max_proposals=5)
    torch.manual_seed(seed)
    return PixelLLM(config, vocab_size=VOCAB)


@pytest.mark.parametrize(("vision", "lm", "lm_class"), [("clip_dual", "t5", HFSeq2SeqLM),
                                                        ("dinov2_registers", "gpt2", HFCausalLM)])
def test_forward_backward(vision_tower, tiny_t5, tiny_gpt2, vision, lm, lm_class):
    vision_path, _ = vision_tower(vision)
    model = build(vision_path, {"t5": tiny_t5, "gpt2": tiny_gpt2}[lm])
    assert isinstance(model.vision, HFVisionEncoder) and isinstance(model.language, lm_class)
    assert model.config.language.lora_alpha == 8 and model.config.language.freeze
    inputs = make_inputs(model.config, VOCAB)
    model.train()
    out = model(inputs)
    b, n, t = inputs.text_ids.shape
    assert out.logits.shape == (b, n, t, VOCAB) and out.points.shape == (b, n, t, 4)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    hf_lm = {name for name, _ in model.named_parameters() if name.startswith("language.model.")}
    assert all(".lora_" in name for name in hf_lm if name in grads)  # the HF LM is frozen but its LoRA
    assert any(".lora_B." in name and g is not None and g.abs().sum() > 0 for name, g in grads.items())
    for part in ("language.visual_proj.weight", "prompt_adapter.queries", "point_head.mlp.1.weight"):
        assert grads[part] is not None and grads[part].abs().sum() > 0, part
    assert any(name.startswith("vision.tower.") for name in grads)  # hf_config leaves the tower trainable

    # decoding straight from the model's language model
    model.eval()
    with torch.no_grad():
        visual = model.prompt_tokens(model.embed_images(inputs.pixel_values), inputs.prompt_boxes.flatten(0, 1),
                                     torch.arange(b).repeat_interleave(n), inputs.image_sizes)
        res = generate(model.language, visual, inputs.context_ids.flatten(0, 1),
                       inputs.context_mask.flatten(0, 1), bos_id=PAD, eos_id=EOS, pad_id=PAD, max_new_tokens=4,
                       num_beams=2)
    assert len(res.tokens) == b * n and all(seq[0] == PAD for seq in res.tokens)


def test_project_adapter_stacks_on_the_lm_lora(vision_tower, tiny_t5, tmp_path):
    vision_path, _ = vision_tower("siglip_vision")
    model = build(vision_path, tiny_t5).eval()
    with torch.no_grad():  # make the LM's own LoRA matter
        for name, p in model.named_parameters():
            if f".lora_B.{BASE_LM_ADAPTER}." in name:
                p.normal_(0, 0.2)
    inputs = make_inputs(model.config, VOCAB)
    with torch.no_grad():
        base = model(inputs)
    originals = {id(p): p.detach().clone() for p in model.parameters()}

    lora.add_lora(model, "proj", r=2)
    adapted = [name for name, m in model.named_modules() if isinstance(m, LoraLayer) and "proj" in m.active_adapters]
    assert any(".SelfAttention.q" in t for t in adapted) and any(".EncDecAttention.v" in t for t in adapted)
    assert any(t.startswith("prompt_adapter.") for t in adapted)
    assert not any(t.startswith("vision.") for t in adapted)
    layer = model.get_submodule(next(t for t in adapted if t.endswith(".SelfAttention.q")))
    assert sorted(layer.active_adapters) == sorted([BASE_LM_ADAPTER, "proj"])
    trainable = lora.trainable_parameters(model)
    assert trainable and not any(BASE_LM_ADAPTER in name for name in trainable)
    opt = torch.optim.AdamW(trainable.values(), lr=0.05)
    model.train()
    model(inputs).loss.backward()
    opt.step()
    model.eval()
    for p in model.parameters():
        if id(p) in originals:
            assert torch.equal(p, originals[id(p)])
    with torch.no_grad():
        tuned = model(inputs)
        lora.set_active_adapter(model, None)
        assert layer.active_adapters == [BASE_LM_ADAPTER]  # the base model keeps its own LoRA
        assert same((model(inputs).logits,), (base.logits,))
    lora.save_adapter(model, tmp_path / "proj", "proj")

    fresh = build(vision_path, tiny_t5).eval()  # same seed: same base weights, except the LM LoRA set above
    with torch.no_grad():
        for name, p in fresh.named_parameters():
            if f".lora_B.{BASE_LM_ADAPTER}." in name:
                p.copy_(model.get_parameter(name))
    lora.load_adapter(fresh, tmp_path / "proj", activate=True)
    with torch.no_grad():
        again = fresh(inputs)
    assert same((again.logits, again.points), (tuned.logits, tuned.points))

    # deleting the project adapter keeps the LM's own LoRA and gives the base model back
    lora.delete_adapter(fresh, "proj")
    layer = fresh.get_submodule(next(t for t in adapted if t.endswith(".SelfAttention.q")))
    assert layer.active_adapters == [BASE_LM_ADAPTER] and lora.list_adapters(fresh) == []
    assert not any("modules_to_save" in k or "original_module" in k for k in fresh.state_dict())
    with torch.no_grad():
        assert same((fresh(inputs).logits,), (base.logits,))
