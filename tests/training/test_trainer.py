"""Trainer: exact resume, seeded determinism, frozen parameters, schedule, state storage."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pixelllm_plugins.errors import TrainingError
from pixelllm_plugins.training.recipes import get_recipe, recipe_config
from pixelllm_plugins.training.state import TrainingState, load_tree, save_tree
from pixelllm_plugins.training.trainer import TrainConfig, lr_at, make_optimizer, read_metrics, train


def _cfg(data, out, **kw) -> TrainConfig:
    values = {"data_dir": str(data), "out_dir": str(out), "steps": 4, "batch_size": 2, "checkpoint_every": 2,
              "warmup_steps": 2, "lr": 2e-3, "progress": False}
    return recipe_config("tiny-smoke", **{**values, **kw})


def _losses(out) -> list[float]:
    return [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]


def _weights(path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


@pytest.fixture(scope="module")
def full_run(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    final = train(_cfg(tiny_data, out))
    return out, final


def test_full_run_writes_checkpoints_and_log(full_run):
    out, final = full_run
    assert final == out / "final" and (final / "model.safetensors").is_file()
    assert TrainingState.exists(out / "checkpoint-last")
    assert TrainingState.load(out / "checkpoint-last").step == 4
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) for r in records)
    card = (final / "README.md").read_text()
    assert "tiny-smoke" in card and "seed: 0" in card
    meta = json.loads((final / "meta.json").read_text())
    assert meta["train_config"]["steps"] == 4


def test_resume_after_interruption_is_exact(full_run, tiny_data, tmp_path):
    out, final = full_run
    cfg = _cfg(tiny_data, tmp_path, stop_after=3)  # checkpoint at step 2, "killed" after step 3
    train(cfg)
    assert TrainingState.load(tmp_path / "checkpoint-last").step == 2
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    assert _losses(tmp_path) == _losses(out)[:3]  # same seed, same losses (a fresh process state)
    resumed = train(dataclasses.replace(cfg, stop_after=None))
    assert _losses(tmp_path) == _losses(out)  # bit-identical, step 3 re-done once
    a, b = _weights(final), _weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_other_seed_gives_other_losses(full_run, tiny_data, tmp_path):
    out, _ = full_run
    train(_cfg(tiny_data, tmp_path, seed=1, steps=2))
    assert _losses(tmp_path) != _losses(out)[:2]


def test_only_trainable_parameters_change(tiny_data, tmp_path):
    from pixelllm_plugins.checkpoint import load_pretrained, save_pretrained

    torch.manual_seed(0)
    model, tok, _ = load_pretrained("tiny")
    model.config.vision.freeze = True
    save_pretrained(model, tok, tmp_path / "base")
    reloaded, _, _ = load_pretrained(tmp_path / "base")
    _, names = make_optimizer(reloaded, TrainConfig(weight_decay=0.1))
    assert names and not any(n.startswith("vision.") for n in names)

    final = train(_cfg(tiny_data, tmp_path / "run", init=str(tmp_path / "base"), steps=2, weight_decay=0.1))
    before, after = _weights(tmp_path / "base"), _weights(final)
    frozen = [k for k in before if k.startswith("vision.")]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("language."))


def test_optimizer_groups_skip_decay_on_norms_and_biases():
    from pixelllm_plugins.checkpoint import load_pretrained

    model, _, _ = load_pretrained("tiny")
    opt, names = make_optimizer(model, TrainConfig(weight_decay=0.05))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim < 2 for p in no_decay["params"])
    assert len(names) == sum(1 for p in model.parameters() if p.requires_grad)


def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig(lr=1.0, steps=10, warmup_steps=2, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.5)  # (0 + 1) / 2
    assert lr_at(1, cfg) == pytest.approx(1.0)
    assert lr_at(6, cfg) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the cosine
    assert lr_at(10, cfg) == pytest.approx(0.1)


def test_state_tree_round_trip_without_pickle(tmp_path):
    tree = {"opt": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.arange(4.0)}},
                    "param_groups": [{"betas": (0.9, 0.999), "params": [0], "foreach": None}]},
            "np": np.random.RandomState(5).get_state(), "py": (3, tuple(range(5)), None), "s": "x"}
    save_tree(tmp_path, tree)
    text = (tmp_path / "training_state.json").read_text()
    assert "__tensor__" in text and "__ndarray__" in text
    back = load_tree(tmp_path)
    assert torch.equal(back["opt"]["state"][0]["exp_avg"], torch.arange(4.0))
    assert back["opt"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert back["py"] == (3, (0, 1, 2, 3, 4), None)
    assert back["np"][0] == "MT19937" and back["np"][1].dtype == np.uint32
    assert np.array_equal(back["np"][1], tree["np"][1])


def test_actionable_errors(tmp_path):
    with pytest.raises(TrainingError, match="pixelllm synth"):
        train(TrainConfig(data_dir=str(tmp_path / "nothing")))
    with pytest.raises(TrainingError, match="unknown recipe"):
        get_recipe("nope")
    with pytest.raises(TrainingError, match="unknown training options"):
        recipe_config("tiny-smoke", stepz=3)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TrainingError, match="no training data"):
        train(recipe_config("tiny-smoke", data_dir=str(empty), out_dir=str(tmp_path / "o"), progress=False))


def test_train_command_takes_source_weights_and_lr_multipliers(tiny_data, tmp_path, capsys):
    from pixelllm_plugins.cli import main

    out = tmp_path / "cli"
    rc = main(["train", "--recipe", "tiny-smoke", "--data", str(tiny_data), "--out", str(out), "--steps", "1",
               "--sources", "refer=2", "trace=0.5", "--lr-multiplier", "point_head.=5", "vision.=0",
               "--augment-scale", "refer=0.6,1.0", "--no-progress"])
    assert rc == 0
    saved = json.loads((out / "final" / "meta.json").read_text())["train_config"]
    assert saved["sources"] == {"refer": 2.0, "trace": 0.5}
    assert saved["lr_multipliers"] == {"point_head.": 5.0, "vision.": 0.0}
    assert saved["augment_scale"] == {"refer": [0.6, 1.0]}
    for bad, message in ((["--sources", "refer"], "NAME=NUMBER items like refer=4; got 'refer'"),
                         (["--augment-scale", "region=1.2"], "NAME=LO,HI items like region=0.6,1.0; got 'region=1.2'"),
                         (["--augment-scale", "region=1.2,0.8"], "must be [lo, hi] with 0 < lo <= hi"),
                         (["--augment-scale", "regoin=0.5,1"], "augment_scale names ['regoin'], which are not sources")):
        capsys.readouterr()
        rc = main(["train", "--recipe", "tiny-smoke", "--data", str(tiny_data), "--out", str(tmp_path / "x"),
                   *bad, "--no-progress"])
        assert rc != 0 and message in capsys.readouterr().err
        assert not (tmp_path / "x").exists()


def test_augment_scale_replaces_only_the_named_sources_resize_range(tiny_data):
    from pixelllm_plugins.data.transforms import TASK_AUGMENT
    from pixelllm_plugins.training.trainer import build_sources

    sources = {s.name: s for s in build_sources(tiny_data, "train", {"refer": 1, "region": 1}, {},
                                                {"region": [0.6, 1.0]})}
    assert sources["region"].augment.scale == (0.6, 1.0)
    assert sources["region"].augment.hflip == TASK_AUGMENT["region"].hflip  # the rest of the task's augment stays
    assert sources["refer"].augment is None  # by task, as before


def test_preloaded_images_train_exactly_as_files(tiny_data, tmp_path):
    from PIL import Image

    from pixelllm_plugins.training.trainer import build_sources

    sources = build_sources(tiny_data, "train", {"refer": 1.0, "region": 1.0}, {}, preload_images=True)
    images = [s.image for src in sources for s in src.samples]
    assert all(isinstance(im, Image.Image) and im.mode == "RGB" for im in images)
    assert len({id(im) for im in images}) == len({s.image_id for src in sources for s in src.samples})  # once each
    values = {"data_dir": str(tiny_data), "steps": 3, "batch_size": 2, "progress": False, "checkpoint_every": 3,
              "sources": {"refer": 1.0, "region": 1.0}}
    losses = []
    for preload in (False, True):
        train(recipe_config("tiny-smoke", out_dir=str(tmp_path / str(preload)), preload_images=preload, **values))
        losses.append([r["loss"] for r in read_metrics(tmp_path / str(preload) / "metrics.jsonl")])
    assert len(losses[0]) == 3 and losses[0] == losses[1]


def test_preloading_stops_at_its_memory_budget(tiny_data):
    from PIL import Image

    from pixelllm_plugins.training.trainer import _preload, build_sources

    sources = build_sources(tiny_data, "train", {"refer": 1.0}, {})
    first = sources[0].samples[0]
    with Image.open(first.image) as im:
        one = im.width * im.height * 3
    _preload(sources, max_bytes=one)  # room for the first image only
    kinds = [isinstance(s.image, Image.Image) for s in sources[0].samples]
    assert kinds[0] and not any(kinds[1:])
