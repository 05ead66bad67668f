"""Shared fixtures: small generated images and one tiny random model per test session."""

from __future__ import annotations

import os

import pytest
from scenes import make_scene

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A saved random `tiny` checkpoint folder (seeded), shared by the session."""
    import torch

    from pixelllm_plugins.checkpoint import load_pretrained, save_pretrained

    torch.manual_seed(0)
    model, tokenizer, _ = load_pretrained("tiny")
    path = tmp_path_factory.mktemp("tiny-ckpt")
    save_pretrained(model, tokenizer, path)
    return path


@pytest.fixture(scope="session")
def tiny_predictor(tiny_checkpoint):
    from pixelllm_plugins.inference.predictor import Predictor

    return Predictor(tiny_checkpoint, device="cpu")


@pytest.fixture()
def scene_files(tmp_path):
    paths = []
    for i, size in enumerate([(160, 120), (90, 200), (64, 64)]):
        p = tmp_path / f"scene{i}.png"
        make_scene(p, size, seed=i)
        paths.append(p)
    return paths
