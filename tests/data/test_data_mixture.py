"""Mixture: one source per batch by weight, deterministic by (seed, step), resumable, worker-count free."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from pixelllm_plugins.data.mixture import (
    DEFAULT_SYNTHETIC_WEIGHTS,
    MixtureDataset,
    Source,
    iterate_eval_batches,
    make_dataloader,
    synthetic_sources,
)

FIELDS = ("pixel_values", "prompt_boxes", "context_ids", "text_ids", "target_points", "point_mask", "gt_boxes")


def _same(a, b) -> bool:
    return a.task == b.task and all(torch.equal(getattr(a, f), getattr(b, f)) for f in FIELDS)


@pytest.fixture(scope="module")
def sources(synth_dir):
    return synthetic_sources(synth_dir, "train")


def test_synthetic_sources(sources):
    assert [s.name for s in sources] == ["refer", "region", "trace", "caption"]
    assert {s.name: s.weight for s in sources} == DEFAULT_SYNTHETIC_WEIGHTS
    assert all(len(s.samples) >= 11 for s in sources)
    assert {s.name: {p.task for x in s.samples for p in x.prompts} for s in sources} == {
        "refer": {"refer"}, "region": {"region"}, "trace": {"trace"}, "caption": {"caption"}}


def test_sources_are_drawn_by_weight(sources, tokenizer, tiny_config):
    ds = MixtureDataset(sources, tokenizer, tiny_config, 2, seed=0)
    counts = Counter(ds.source_for(k).name for k in range(4000))
    total = sum(DEFAULT_SYNTHETIC_WEIGHTS.values())
    for name, w in DEFAULT_SYNTHETIC_WEIGHTS.items():
        assert abs(counts[name] / 4000 - w / total) < 0.03, counts
    only = MixtureDataset([Source("a", sources[0].samples, 1.0), Source("b", sources[1].samples, 0.0)],
                          tokenizer, tiny_config, 2)
    assert {only.source_for(k).name for k in range(50)} == {"a"}


def test_stream_is_deterministic_and_seeded(sources, tokenizer, tiny_config):
    a = list(MixtureDataset(sources, tokenizer, tiny_config, 3, seed=5, num_steps=6))
    b = list(MixtureDataset(sources, tokenizer, tiny_config, 3, seed=5, num_steps=6))
    assert len(a) == 6 and all(_same(x, y) for x, y in zip(a, b))
    assert all(x.task == s.name for x, s in zip(a, [MixtureDataset(sources, tokenizer, tiny_config, 3, seed=5)
                                                    .source_for(k) for k in range(6)]))
    c = list(MixtureDataset(sources, tokenizer, tiny_config, 3, seed=6, num_steps=6))
    assert not all(_same(x, y) for x, y in zip(a, c))


def test_resume_continues_the_same_stream(sources, tokenizer, tiny_config):
    full = list(MixtureDataset(sources, tokenizer, tiny_config, 2, seed=1, num_steps=7))
    first = MixtureDataset(sources, tokenizer, tiny_config, 2, seed=1)
    it = iter(first)
    head = [next(it) for _ in range(4)]
    state = first.state_dict()
    assert state == {"seed": 1, "step": 4}
    resumed = MixtureDataset(sources, tokenizer, tiny_config, 2, seed=99)
    resumed.load_state_dict(state)
    resumed.num_steps = 3
    tail = list(resumed)
    assert all(_same(x, y) for x, y in zip(head + tail, full))
    via_loader = list(make_dataloader(sources, tokenizer, tiny_config, 2, seed=1, start_step=4, num_steps=3))
    assert all(_same(x, y) for x, y in zip(via_loader, full[4:]))


def test_dataloader_order_does_not_depend_on_workers(sources, tokenizer, tiny_config):
    plain = list(make_dataloader(sources, tokenizer, tiny_config, 2, seed=3, num_steps=4))
    workers = list(make_dataloader(sources, tokenizer, tiny_config, 2, seed=3, num_steps=4, num_workers=2))
    assert len(plain) == len(workers) == 4
    assert all(_same(x, y) for x, y in zip(plain, workers))


def test_eval_batches_are_in_order(sources, tokenizer, tiny_config):
    refer = sources[0].samples
    batches = list(iterate_eval_batches(refer, tokenizer, tiny_config, 5))
    assert [b.batch_size for b in batches] == [5, 5, len(refer) - 10]
    again = list(iterate_eval_batches(refer, tokenizer, tiny_config, 5))
    assert all(_same(x, y) for x, y in zip(batches, again))


def test_empty_sources_are_refused(tokenizer, tiny_config):
    with pytest.raises(ValueError, match="no samples"):
        MixtureDataset([Source("x", [], 1.0)], tokenizer, tiny_config, 2)
    with pytest.raises(ValueError, match="positive weight"):
        MixtureDataset([], tokenizer, tiny_config, 2)
