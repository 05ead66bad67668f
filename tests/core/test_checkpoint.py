"""Checkpoint folders: round trip, fp16, tied weights, helpful errors, and no unpickling."""

from __future__ import annotations

import json
import logging
import pickle

import pytest
import torch

from pixelllm_plugins import checkpoint as ckpt
from pixelllm_plugins.checkpoint import load_pretrained, save_pretrained
from pixelllm_plugins.config import PixelLLMConfig, get_preset
from pixelllm_plugins.errors import CheckpointError
from pixelllm_plugins.modeling.inputs import ModelInputs
from pixelllm_plugins.modeling.pixel_llm import PixelLLM


@pytest.fixture(scope="module")
def random_tiny():
    torch.manual_seed(0)
    model, tokenizer, version = load_pretrained("tiny")
    return model, tokenizer, version


def _inputs(model, tokenizer) -> ModelInputs:
    s = model.config.vision.image_size
    ctx = torch.tensor([tokenizer.encode("where is the red circle", max_len=8)])
    text = torch.tensor([tokenizer.encode("the red circle", add_bos=True, max_len=8)])
    return ModelInputs(pixel_values=torch.randn(1, 3, s, s, generator=torch.Generator().manual_seed(3)),
                       image_sizes=torch.tensor([[s, s * 0.5]]), prompt_boxes=torch.tensor([[[0, 0, s, s * 0.5]]]),
                       prompt_mask=torch.ones(1, 1, dtype=torch.bool), context_ids=ctx[None],
                       context_mask=torch.ones_like(ctx[None], dtype=torch.bool), text_ids=text[None],
                       text_mask=torch.ones_like(text[None], dtype=torch.bool))


def test_preset_gives_random_weights_with_warning(random_tiny, caplog):
    model, tokenizer, version = random_tiny
    assert version == "tiny-random" and not model.training
    assert model.config.language.vocab_size == tokenizer.vocab_size
    with caplog.at_level(logging.WARNING):
        load_pretrained("tiny")
    assert "random weights" in caplog.text


def test_round_trip_identical_outputs(random_tiny, tmp_path):
    model, tokenizer, _ = random_tiny
    version = save_pretrained(model, tokenizer, tmp_path, extra_meta={"steps": 7})
    assert version.startswith("tiny-") and len(version) == len("tiny-") + 8
    for name in ("config.json", "model.safetensors", "tokenizer.json", "README.md", "meta.json"):
        assert (tmp_path / name).is_file(), name
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["model_version"] == version and meta["steps"] == 7
    loaded, tok2, version2 = load_pretrained(tmp_path)
    assert version2 == version and not loaded.training
    assert tok2.encode("a red circle") == tokenizer.encode("a red circle")
    inputs = _inputs(model, tokenizer)
    with torch.no_grad():
        a, b = model(inputs), loaded(inputs)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.points, b.points)
    # same weights -> same version
    assert save_pretrained(loaded, tok2, tmp_path / "again") == version


def test_fp16_storage_halves_size_and_upcasts(random_tiny, tmp_path):
    model, tokenizer, _ = random_tiny
    save_pretrained(model, tokenizer, tmp_path / "f32")
    save_pretrained(model, tokenizer, tmp_path / "f16", dtype=torch.float16)
    size32 = (tmp_path / "f32" / "model.safetensors").stat().st_size
    size16 = (tmp_path / "f16" / "model.safetensors").stat().st_size
    assert size16 < 0.6 * size32
    loaded, _, _ = load_pretrained(tmp_path / "f16")
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    inputs = _inputs(model, tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(loaded(inputs).points, model(inputs).points, atol=1e-2, rtol=0)


def test_tied_weights_round_trip(tmp_path):
    torch.manual_seed(0)
    model, tokenizer, _ = load_pretrained("tiny")
    model.language.output.weight = model.language.word_embed.weight  # tie
    save_pretrained(model, tokenizer, tmp_path)
    _, aliases = ckpt._read_weights(tmp_path / "model.safetensors")
    assert aliases == {"language.output.weight": "language.word_embed.weight"}  # stored once
    loaded, _, _ = load_pretrained(tmp_path)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_missing_file_names_it(random_tiny, tmp_path):
    model, tokenizer, _ = random_tiny
    save_pretrained(model, tokenizer, tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="missing tokenizer.json.*config.json, model.safetensors"):
        load_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_pretrained(tmp_path)


def test_unknown_preset_and_missing_default(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match="synth-small, tiny"):
        load_pretrained("no-such-model")
    monkeypatch.setattr(ckpt, "DEFAULT_MODEL_DIR", tmp_path / "absent")
    with pytest.raises(CheckpointError, match="--model.*'tiny'"):
        load_pretrained()
    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        load_pretrained(tmp_path / "file.bin")


def test_mismatched_config_and_corrupt_weights(random_tiny, tmp_path):
    model, tokenizer, _ = random_tiny
    save_pretrained(model, tokenizer, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["prompt"]["num_queries"] = 5
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="do not match.*prompt_adapter"):
        load_pretrained(tmp_path)
    save_pretrained(model, tokenizer, tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x80\x04garbage")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_pretrained(tmp_path)


def test_load_never_unpickles(random_tiny, tmp_path, monkeypatch):
    model, tokenizer, _ = random_tiny
    version = save_pretrained(model, tokenizer, tmp_path)

    def refuse(*args, **kwargs):
        raise AssertionError("unpickling is not allowed")

    for target, name in [(torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")]:
        monkeypatch.setattr(target, name, refuse)
    loaded, _, loaded_version = load_pretrained(str(tmp_path), dtype=torch.float32)
    assert loaded.model_version == loaded_version == version


def test_grow_adds_zero_started_point_modules_and_refuses_what_would_drop_weights(tmp_path):
    torch.manual_seed(0)
    model, tokenizer, _ = load_pretrained("tiny")
    model.config.heads.point_mode = "grid"  # the grid head is the one that grows
    grid = PixelLLM(model.config, tokenizer.vocab_size).eval()
    save_pretrained(grid, tokenizer, tmp_path / "src")
    version = ckpt.grow_pretrained(tmp_path / "src", tmp_path / "grown",
                                   {"heads.point_context_layers": 1, "heads.point_refine": True,
                                    "heads.point_coords": True})
    grown, _, loaded_version = load_pretrained(tmp_path / "grown")
    assert loaded_version == version and grown.config.heads.point_context_layers == 1
    assert None not in (grown.point_head.context, grown.point_head.refine, grown.point_head.coords)
    meta = json.loads((tmp_path / "grown" / "meta.json").read_text())
    assert meta["grown_with"] == {"heads.point_context_layers": 1, "heads.point_refine": True,
                                  "heads.point_coords": True}
    with torch.no_grad():
        want, got = grid(_inputs(grid, tokenizer)), grown(_inputs(grown, tokenizer))
    torch.testing.assert_close(got.points, want.points)
    torch.testing.assert_close(got.logits, want.logits)
    # the fine map grows the same way: new branch and zero projection, same answers
    model.config.vision.patch_size, model.config.prompt.map_tokens = 16, 2
    mapped = PixelLLM(model.config, tokenizer.vocab_size).eval()
    save_pretrained(mapped, tokenizer, tmp_path / "mapped")
    ckpt.grow_pretrained(tmp_path / "mapped", tmp_path / "fine", {"vision.fine_channels": 4, "prompt.fine_grid": 2})
    fine, _, _ = load_pretrained(tmp_path / "fine")
    assert fine.vision.fine is not None and fine.fine_token_proj is not None
    with torch.no_grad():
        want, got = mapped(_inputs(mapped, tokenizer)), fine(_inputs(fine, tokenizer))
    torch.testing.assert_close(got.points, want.points)
    torch.testing.assert_close(got.logits, want.logits)
    # and the box extent: a zero-started MLP over each prompt box's place in its image, same answers
    model.config.vision.fine_channels, model.config.prompt.fine_grid = 4, 2
    plain = PixelLLM(model.config, tokenizer.vocab_size).eval()
    save_pretrained(plain, tokenizer, tmp_path / "plain")
    ckpt.grow_pretrained(tmp_path / "plain", tmp_path / "extent", {"prompt.box_extent": True})
    extent, _, _ = load_pretrained(tmp_path / "extent")
    assert extent.box_extent is not None
    with torch.no_grad():
        want, got = plain(_inputs(plain, tokenizer)), extent(_inputs(extent, tokenizer))
    torch.testing.assert_close(got.points, want.points)
    torch.testing.assert_close(got.logits, want.logits)
    with pytest.raises(CheckpointError, match="drop or reshape"):
        ckpt.grow_pretrained(tmp_path / "src", tmp_path / "bad", {"language.hidden_size": 48})
    with pytest.raises(CheckpointError, match="section.field"):
        ckpt.grow_pretrained(tmp_path / "src", tmp_path / "bad", {"heads.no_such_field": 1})
    assert not (tmp_path / "bad").exists()


def test_grown_zoom_changes_no_answer_until_trained(tmp_path):
    torch.manual_seed(0)
    model, tokenizer, _ = load_pretrained("tiny")
    model.config.vision.patch_size, model.config.prompt.map_tokens = 16, 2
    mapped = PixelLLM(model.config, tokenizer.vocab_size).eval()
    save_pretrained(mapped, tokenizer, tmp_path / "mapped")
    ckpt.grow_pretrained(tmp_path / "mapped", tmp_path / "zoom", {"prompt.zoom": 16})
    zoomed, _, _ = load_pretrained(tmp_path / "zoom")
    assert zoomed.zoom is not None and zoomed.config.prompt.zoom == 16
    with torch.no_grad():
        want, got = mapped(_inputs(mapped, tokenizer)), zoomed(_inputs(zoomed, tokenizer))
    torch.testing.assert_close(got.logits, want.logits)
    torch.testing.assert_close(got.points, want.points)
    # once its projection has weights, the region's tokens (and so the words) depend on the pixels
    torch.nn.init.normal_(zoomed.zoom.proj.weight, std=0.5)
    with torch.no_grad():
        moved = zoomed(_inputs(zoomed, tokenizer))
    assert not torch.allclose(moved.logits, want.logits)


def test_grown_candidate_zoom_changes_no_point_until_trained(tmp_path):
    torch.manual_seed(0)
    model, tokenizer, _ = load_pretrained("tiny")
    model.config.heads.point_mode, model.config.heads.relation_layers = "grid", 1
    grid = PixelLLM(model.config, tokenizer.vocab_size).eval()
    save_pretrained(grid, tokenizer, tmp_path / "grid")
    ckpt.grow_pretrained(tmp_path / "grid", tmp_path / "zoom", {"heads.candidate_zoom": 16})
    zoomed, _, _ = load_pretrained(tmp_path / "zoom")
    assert zoomed.point_head.relations.zoom is not None
    inputs = _inputs(grid, tokenizer)
    with torch.no_grad():
        want, got = grid(inputs), zoomed(inputs)
    torch.testing.assert_close(got.points, want.points)
    torch.testing.assert_close(got.logits, want.logits)
    # trained, the candidates' pixels reach the pointing: the token's scores over candidates move
    torch.nn.init.normal_(zoomed.point_head.relations.zoom.proj.weight, std=0.5)
    torch.nn.init.normal_(zoomed.point_head.relations.out[1].weight, std=0.5)
    embedding = zoomed.embed_images(inputs.pixel_values)
    assert "pixels" in embedding.maps
    with torch.no_grad():
        moved = zoomed(inputs)
    assert not torch.allclose(moved.points, want.points)


def test_retired_options_load_when_off_and_are_unknown_otherwise():
    data = get_preset("tiny").to_dict()
    data["vision"]["stem_blocks"], data["heads"]["candidate_fine_grid"] = 0, 0
    data["heads"]["relation_candidates"] = 8  # the shipped config.json still says so
    assert PixelLLMConfig.from_dict(data).to_dict() == get_preset("tiny").to_dict()
    for key, value in (("candidate_fine_grid", 2), ("relation_candidates", 3)):
        changed = json.loads(json.dumps(data))
        changed["heads"][key] = value
        with pytest.raises(CheckpointError, match="unknown keys"):
            PixelLLMConfig.from_dict(changed)


def test_shipped_checkpoint_holds_exactly_the_weights_of_a_fresh_synth_small_model():
    folder = ckpt.DEFAULT_MODEL_DIR
    tensors, aliases = ckpt._read_weights(folder / ckpt.WEIGHTS_FILE)
    shipped = PixelLLMConfig.load(folder / "config.json")
    fresh = PixelLLM(get_preset("synth-small"), shipped.language.vocab_size)
    expected = fresh.state_dict()
    assert sorted(set(tensors) | set(aliases)) == sorted(expected)
    state = {k: tensors[aliases.get(k, k)] for k in expected}
    assert {k: tuple(v.shape) for k, v in state.items()} == {k: tuple(v.shape) for k, v in expected.items()}
    result = fresh.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
