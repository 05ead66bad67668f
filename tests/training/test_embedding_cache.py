"""Image embeddings reused across training steps while the image side of the model is frozen."""

from __future__ import annotations

import json

import pytest
import torch

from pixelllm_plugins.errors import TrainingError
from pixelllm_plugins.training.embedding_cache import ImageEmbeddingCache, image_side_trains


def _lora_model(tiny_base, **kwargs):
    from pixelllm_plugins.checkpoint import load_pretrained
    from pixelllm_plugins.modeling import lora

    model, _, _ = load_pretrained(tiny_base)
    lora.add_lora(model, "round", r=2, **kwargs)
    return model.train()


def test_same_pixels_are_embedded_once_and_match_a_fresh_pass(tiny_base):
    model = _lora_model(tiny_base)
    size = model.config.vision.image_size
    torch.manual_seed(0)
    a, b, c = (torch.randn(3, size, size) for _ in range(3))
    cache = ImageEmbeddingCache(model)
    first = cache(torch.stack([a, b, a]))  # a twice in one batch: embedded once
    assert (cache.computed, cache.reused, len(cache)) == (2, 1, 2)
    second = cache(torch.stack([b, c]))
    assert (cache.computed, cache.reused, len(cache)) == (3, 2, 3)
    with torch.no_grad():
        direct = model.embed_images(torch.stack([a, b, a, c]), maps=cache.maps)
    assert torch.allclose(first.tokens, direct.tokens[:3], atol=1e-5)
    assert torch.allclose(second.tokens[1], direct.tokens[3], atol=1e-5)
    assert set(first.maps) == set(direct.maps)
    for name in direct.maps:
        assert torch.allclose(first.maps[name], direct.maps[name][:3], atol=1e-5)
    assert not first.tokens.requires_grad


def test_least_recently_used_images_are_dropped(tiny_base):
    model = _lora_model(tiny_base)
    size = model.config.vision.image_size
    a, b, c = (torch.full((3, size, size), float(v)) for v in range(3))
    cache = ImageEmbeddingCache(model)
    cache(torch.stack([a]))
    cache.max_bytes = 2 * cache.bytes  # room for two images
    cache(torch.stack([a, b]))
    cache(torch.stack([a]))  # a is now the most recent
    cache(torch.stack([c]))  # b goes
    cache(torch.stack([a, c]))
    assert (cache.computed, cache.reused, len(cache)) == (3, 4, 2)
    cache(torch.stack([b]))
    assert cache.computed == 4


def test_a_trainable_image_side_refuses_the_cache(tiny_base):
    model = _lora_model(tiny_base, adapt_vision=True)
    assert image_side_trains(model) and all(n.startswith("vision.") for n in image_side_trains(model))
    with pytest.raises(TrainingError, match="image side"):
        ImageEmbeddingCache(model)


def test_a_cached_run_trains_like_an_uncached_one(tiny_base, tiny_data, tmp_path):
    """Same data stream at a fixed scale: the same losses step by step and the same adapter."""
    from safetensors.torch import load_file

    from pixelllm_plugins.training.finetune import finetune

    runs = {}
    for cached in (False, True):
        out = finetune(tiny_base, tiny_data, tmp_path / f"adapter-{cached}", steps=6, batch_size=4, lr=1e-2,
                       progress=False, work_dir=tmp_path / f"run-{cached}", augment_scale={"refer": [1, 1],
                       "region": [1, 1]}, cache_image_embeddings=cached, seed=3)
        metrics = [json.loads(line) for line in (tmp_path / f"run-{cached}" / "metrics.jsonl").read_text().splitlines()]
        runs[cached] = ([m["loss"] for m in metrics if "loss" in m], load_file(str(out / "adapter_model.safetensors")))
    (plain_losses, plain), (cached_losses, cached) = runs[False], runs[True]
    assert len(plain_losses) == 6 and plain_losses == pytest.approx(cached_losses, rel=1e-4, abs=1e-5)
    assert plain.keys() == cached.keys()
    assert all(torch.allclose(plain[k], cached[k], atol=1e-4) for k in plain)
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in cached.items() if ".lora_B." in k)  # it trained


def test_finetune_with_a_trainable_image_side_and_the_cache_is_a_clear_error(tiny_base, tiny_data, tmp_path):
    from pixelllm_plugins.training.finetune import finetune

    with pytest.raises(TrainingError, match="cache_image_embeddings"):
        finetune(tiny_base, tiny_data, tmp_path / "adapter", steps=1, batch_size=2, progress=False,
                 adapt_vision=True, cache_image_embeddings=True)
