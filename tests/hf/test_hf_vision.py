"""HFVisionEncoder on tiny random CLIP / SigLIP / ViT / DINOv2 towers loaded by path."""

from __future__ import annotations

import pytest
import torch

from pixelllm_plugins.config import VisionConfig
from pixelllm_plugins.errors import CheckpointError
from pixelllm_plugins.modeling.build import build_vision_encoder
from pixelllm_plugins.modeling.vision_hf import HFVisionEncoder

from .conftest import VISION_PREFIX


@pytest.mark.parametrize("name", sorted(VISION_PREFIX))
def test_tokens_drop_prefix_and_interpolate(vision_tower, name):
    path, prefix = vision_tower(name)
    enc = HFVisionEncoder(VisionConfig(kind="hf", hf_name_or_path=path, image_size=32)).eval()
    assert enc.out_dim == 32 and enc.grid_size == (4, 4)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = enc(x)
        reference = enc.tower(pixel_values=x).last_hidden_state
    assert tokens.shape == (2, 16, 32)
    assert reference.shape[1] == 16 + prefix
    torch.testing.assert_close(tokens, reference[:, prefix:])

    # a canvas larger than the tower's native 32 px: position embeddings are interpolated
    big = HFVisionEncoder(VisionConfig(kind="hf", hf_name_or_path=path, image_size=48)).eval()
    assert big.grid_size == (6, 6)
    with torch.no_grad():
        out = big(torch.randn(1, 3, 48, 48))
    assert out.shape == (1, 36, 32) and torch.isfinite(out).all()


def test_dual_model_uses_vision_tower_only(vision_tower):
    path, _ = vision_tower("clip_dual")
    enc = HFVisionEncoder(VisionConfig(kind="hf", hf_name_or_path=path, image_size=32))
    assert not any("text" in n for n, _ in enc.named_parameters())


def test_freeze_and_factory(vision_tower):
    path, _ = vision_tower("siglip_vision")
    cfg = VisionConfig(kind="hf", hf_name_or_path=path, image_size=32, freeze=True)
    enc = build_vision_encoder(cfg)
    assert isinstance(enc, HFVisionEncoder)
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.tower.training  # a frozen tower stays in eval mode

    trainable = HFVisionEncoder(VisionConfig(kind="hf", hf_name_or_path=path, image_size=32))
    trainable.train()
    x = torch.randn(1, 3, 32, 32)
    trainable(x).sum().backward()
    assert all(p.grad is not None for p in trainable.parameters() if p.requires_grad)


def test_errors_are_actionable(tmp_path):
    with pytest.raises(CheckpointError, match="hf_name_or_path"):
        HFVisionEncoder(VisionConfig(kind="hf"))
    with pytest.raises(CheckpointError, match="save_pretrained"):
        HFVisionEncoder(VisionConfig(kind="hf", hf_name_or_path=str(tmp_path / "missing")))
