"""A tiny synthetic dataset shared by the training tests (written once per session)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    from pixelllm_plugins.data.formats import write_synthetic_dataset

    root = tmp_path_factory.mktemp("traindata")
    write_synthetic_dataset(root, "train", 8, seed=1)
    write_synthetic_dataset(root, "val", 3, seed=1)
    return root


@pytest.fixture(scope="session")
def tiny_base(tiny_checkpoint):
    """A saved random `tiny` checkpoint (the base model for fine-tuning): the session's shared one."""
    return tiny_checkpoint
