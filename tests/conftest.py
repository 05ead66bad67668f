"""Shared fixtures: small generated images and one tiny random model per test session."""

from __future__ import annotations

import os

import pytest
from PIL import Image, ImageDraw

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def make_scene(path=None, size=(160, 120), seed=0) -> Image.Image:
    """A red circle and a blue square on grey: enough for shape/size checks without the generator."""
    image = Image.new("RGB", size, (128, 128, 128))
    draw = ImageDraw.Draw(image)
    w, h = size
    draw.ellipse((0.1 * w, 0.2 * h, 0.4 * w, 0.6 * h), fill=(220, 30, 30))
    draw.rectangle((0.55 * w, 0.3 * h, 0.9 * w, 0.8 * h), fill=(30, 30, 220 - seed % 50))
    if path is not None:
        image.save(path)
    return image


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
