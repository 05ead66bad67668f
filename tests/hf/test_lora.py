"""modeling/lora.py: named adapters over a whole model (stand-in module and the real tiny PixelLLM)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from pixelllm_plugins.config import PromptConfig, get_preset
from pixelllm_plugins.errors import CheckpointError, TrainingError
from pixelllm_plugins.modeling import lora
from pixelllm_plugins.modeling.inputs import ModelInputs
from pixelllm_plugins.modeling.language import LanguageModel
from pixelllm_plugins.modeling.prompt_adapter import PromptAdapter

# ---- a small stand-in with the same kinds of parts as PixelLLM ------------------------------------------


class ToyAttentionLM(LanguageModel):
    def __init__(self, dim=16, vocab=20):
        super().__init__()
        self.hidden_size, self.vocab_size = dim, vocab
        self.embed = nn.Embedding(vocab, dim)
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out = nn.Linear(dim, vocab)

    def forward(self, visual, context_ids, context_mask, text_ids, text_mask):
        x = torch.cat([visual, self.embed(text_ids)], 1)
        att = torch.softmax(self.q_proj(x) @ self.k_proj(x).transpose(1, 2), -1) @ self.v_proj(x)
        h = att[:, visual.shape[1]:]
        return self.out(h), h


class StandIn(nn.Module):
    def __init__(self):
        super().__init__()
        self.prompt_adapter = PromptAdapter(PromptConfig(embed_dim=8, hidden_size=16, depth=1, num_heads=2,
                                                         mlp_dim=32, num_queries=3, output_dim=16), vision_dim=16)
        self.language = ToyAttentionLM()
        self.point_head = nn.Sequential(nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 4))
        self.confidence_head = nn.Linear(16, 1)

    def forward(self, image, text):
        m = image.shape[0]
        visual = self.prompt_adapter(image, torch.zeros(image.shape[1], 8), torch.zeros(1, 8),
                                     torch.ones(m, 2, 8), torch.arange(m))
        logits, h = self.language(visual, None, None, text, None)
        return logits, self.point_head(h), self.confidence_head(h)


def standin(seed=0):
    torch.manual_seed(seed)
    return StandIn().eval()


def standin_batch():
    g = torch.Generator().manual_seed(9)
    return torch.randn(2, 5, 16, generator=g), torch.randint(0, 20, (2, 4), generator=g)


def train_step(model, loss_fn, lr=0.05):
    opt = torch.optim.AdamW(lora.trainable_parameters(model).values(), lr=lr, weight_decay=0.1)
    loss_fn(model).backward()
    opt.step()
    opt.zero_grad()


def standin_loss(model):
    logits, points, conf = model(*standin_batch())
    return logits.logsumexp(-1).mean() + points.pow(2).mean() + conf.mean()


def same(a, b):
    """Equal up to float reassociation (BLAS kernels may differ with memory alignment between runs)."""
    return all(torch.allclose(x, y, rtol=0, atol=1e-6) for x, y in zip(a, b))


def test_defaults_only_adapters_train_and_base_is_untouched():
    model = standin()
    assert lora.default_target_modules(model) == sorted(
        ["language.q_proj", "language.v_proj"]
        + [f"prompt_adapter.transformer.{p}.{qv}" for p in ("final_attn_token_to_image",
                                                             "layers.0.cross_attn_image_to_token",
                                                             "layers.0.cross_attn_token_to_image",
                                                             "layers.0.self_attn") for qv in ("q_proj", "v_proj")])
    assert lora.default_modules_to_save(model) == ["point_head", "confidence_head"]
    originals = {id(p): p.detach().clone() for p in model.parameters()}
    config = lora.add_lora(model, "proj", r=4)
    assert config.lora_alpha == 8  # alpha = 2r: scale 2
    assert lora.list_adapters(model) == ["proj"] and lora.get_active_adapter(model) == "proj"
    trainable = lora.trainable_parameters(model)
    assert trainable and all(".lora_" in n or ".modules_to_save.proj." in n for n in trainable)
    assert any(n.startswith("point_head.modules_to_save.proj.") for n in trainable)
    for _ in range(2):
        train_step(model, standin_loss)
    for p in model.parameters():
        if id(p) in originals:
            assert torch.equal(p, originals[id(p)])  # every base tensor is bit-identical
    assert any(not torch.equal(p, torch.zeros_like(p)) for n, p in trainable.items() if "lora_B" in n)


def test_save_load_round_trip_and_switching(tmp_path):
    trained = standin()
    with torch.no_grad():
        base_out = trained(*standin_batch())
    lora.add_lora(trained, "proj", r=4)
    train_step(trained, standin_loss)
    with torch.no_grad():
        tuned_out = trained(*standin_batch())
    assert not same(tuned_out, base_out)
    folder = lora.save_adapter(trained, tmp_path / "proj", "proj")
    config = json.loads((folder / lora.ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert sorted(config["modules_to_save"]) == ["confidence_head", "point_head"]
    keys = list(load_file(str(folder / lora.ADAPTER_WEIGHTS)))
    assert all(k.startswith("base_model.model.") and ".proj." not in k for k in keys)
    assert "base_model.model.point_head.0.weight" in keys

    fresh = standin()  # same base weights, no adapter
    name = lora.load_adapter(fresh, folder)
    loaded, saved = fresh.state_dict(), trained.state_dict()
    assert set(loaded) == set(saved) and all(torch.equal(loaded[k], saved[k]) for k in saved)
    assert name == "proj" and lora.get_active_adapter(fresh) is None
    assert not lora.trainable_parameters(fresh) or all(
        ".lora_" not in n for n in lora.trainable_parameters(fresh))
    with torch.no_grad():
        assert same(fresh(*standin_batch()), base_out)
        lora.set_active_adapter(fresh, "proj")
        assert same(fresh(*standin_batch()), tuned_out)
        lora.set_active_adapter(fresh, None)
        assert same(fresh(*standin_batch()), base_out)

    # a second adapter: switching picks the right one; deleting restores the original module layout
    lora.load_adapter(fresh, folder, "other", activate=True)
    assert lora.list_adapters(fresh) == ["other", "proj"]
    with torch.no_grad():
        assert same(fresh(*standin_batch()), tuned_out)
    lora.delete_adapter(fresh, "other")
    lora.delete_adapter(fresh, "proj")
    assert lora.list_adapters(fresh) == []
    assert set(fresh.state_dict()) == set(standin().state_dict())
    with torch.no_grad():
        assert same(fresh(*standin_batch()), base_out)


def test_errors(tmp_path):
    model = standin()
    lora.add_lora(model, "a", r=2)
    with pytest.raises(TrainingError, match="already exists"):
        lora.add_lora(model, "a", r=2)
    with pytest.raises(CheckpointError, match="load_adapter"):
        lora.set_active_adapter(model, "nope")
    with pytest.raises(CheckpointError, match="adapter_config.json"):
        lora.load_adapter(model, tmp_path / "empty")
    lora.save_adapter(model, tmp_path / "a", "a")
    with pytest.raises(CheckpointError, match="already loaded"):
        lora.load_adapter(model, tmp_path / "a")
    lora.load_adapter(model, tmp_path / "a", overwrite=True)

    class Other(nn.Module):  # a different architecture
        def __init__(self):
            super().__init__()
            self.language = ToyAttentionLM(dim=8)
            self.point_head = nn.Linear(8, 4)

    with pytest.raises(CheckpointError):
        lora.load_adapter(Other(), tmp_path / "a")
    with pytest.raises(TrainingError, match="target_modules"):
        lora.add_lora(nn.Sequential(nn.Linear(2, 2)))


# ---- the real PixelLLM --------------------------------------------------------------------------------

def make_inputs(config, vocab, b=2, n=2, tc=5, t=6, seed=3):
    g = torch.Generator().manual_seed(seed)
    s = config.vision.image_size
    ids = lambda *shape: torch.randint(4, vocab, shape, generator=g)  # noqa: E731
    boxes = torch.tensor([[0.0, 0.0, s, s], [s * 0.1, s * 0.2, s * 0.6, s * 0.9]]).expand(b, n, 4).clone()
    pts = torch.rand(b, n, t, 4, generator=g)
    return ModelInputs(
        pixel_values=torch.randn(b, 3, s, s, generator=g), image_sizes=torch.full((b, 2), float(s)),
        prompt_boxes=boxes, prompt_mask=torch.ones(b, n, dtype=torch.bool), context_ids=ids(b, n, tc),
        context_mask=torch.ones(b, n, tc, dtype=torch.bool), text_ids=ids(b, n, t),
        text_mask=torch.ones(b, n, t, dtype=torch.bool),
        target_points=torch.cat([pts[..., :2].minimum(pts[..., 2:]), pts[..., :2].maximum(pts[..., 2:])], -1),
        point_mask=torch.ones(b, n, t, dtype=torch.bool), text_loss_mask=torch.ones(b, n, dtype=torch.bool),
        gt_boxes=torch.tensor([[[0.1, 0.1, 0.5, 0.6]]]).expand(b, 1, 4).clone(),
        gt_boxes_mask=torch.ones(b, 1, dtype=torch.bool))


def outputs(model, inputs):
    with torch.no_grad():
        out = model(inputs)
    return out.logits, out.points, out.confidence


def test_pixel_llm_tiny_adapter_round_trip(tmp_path):
    from pixelllm_plugins.modeling.pixel_llm import PixelLLM

    def build():
        torch.manual_seed(0)
        return PixelLLM(get_preset("tiny"), vocab_size=40).eval()

    model = build()
    inputs = make_inputs(model.config, 40)
    base_out = outputs(model, inputs)
    originals = {id(p): p.detach().clone() for p in model.parameters()}
    lora.add_lora(model, "proj", r=4)
    targets = model.peft_config["proj"].target_modules
    assert any(t.startswith("language.") for t in targets) and any(t.startswith("prompt_adapter.") for t in targets)
    opt = torch.optim.AdamW(lora.trainable_parameters(model).values(), lr=0.05)
    model.train()
    for _ in range(2):
        loss = model(inputs).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    for p in model.parameters():
        if id(p) in originals:
            assert torch.equal(p, originals[id(p)])
    tuned_out = outputs(model, inputs)
    assert not same(tuned_out, base_out)
    lora.save_adapter(model, tmp_path / "proj", "proj")

    fresh = build()
    lora.load_adapter(fresh, tmp_path / "proj", activate=True)
    assert same(outputs(fresh, inputs), tuned_out)
    lora.set_active_adapter(fresh, None)
    assert same(outputs(fresh, inputs), base_out)


def test_an_extra_copy_is_the_module_named_not_every_module_whose_name_ends_so(tmp_path):
    """peft matches modules_to_save by suffix: "zoom.proj" (the prompt zoom's layer) would also wrap the
    candidate zoom's "relations.zoom.proj" inside the point head's copy. Copies are made by exact name, and
    the saved folder loads back onto the same modules."""
    from pixelllm_plugins.checkpoint import load_pretrained

    def build():
        torch.manual_seed(0)
        return load_pretrained("synth-small")[0]

    model = build()
    lora.add_lora(model, "a", r=2, extra_modules_to_save=["zoom.proj"])
    wrapped = sorted(name for name, m in model.named_modules() if lora._is_mts_wrapper(m))
    assert wrapped == ["confidence_head", "point_head", "zoom.proj"]
    lora.save_adapter(model, tmp_path / "a", "a")
    keys = load_file(str(tmp_path / "a" / lora.ADAPTER_WEIGHTS))
    assert {"base_model.model.zoom.proj.weight", "base_model.model.point_head.relations.zoom.proj.weight"} <= set(keys)
    assert json.loads((tmp_path / "a" / lora.ADAPTER_CONFIG).read_text())["modules_to_save"] == [
        "confidence_head", "point_head", "zoom.proj"]
    fresh = build()
    lora.load_adapter(fresh, tmp_path / "a", "a")
    assert sorted(name for name, m in fresh.named_modules() if lora._is_mts_wrapper(m)) == wrapped
