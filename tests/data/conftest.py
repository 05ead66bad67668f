"""Shared fixtures for the data tests: a small synthetic dataset written once per session."""

from __future__ import annotations

import pytest

from pixelllm_plugins.config import get_preset
from pixelllm_plugins.data.formats import write_synthetic_dataset
from pixelllm_plugins.tokenizer import PixelTokenizer


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    write_synthetic_dataset(root, "train", 12, seed=3)
    return root


@pytest.fixture(scope="session")
def tokenizer():
    return PixelTokenizer.default()


@pytest.fixture()
def config():
    return get_preset("synth-small")


@pytest.fixture()
def tiny_config():
    return get_preset("tiny")
