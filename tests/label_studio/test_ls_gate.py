"""Gated correction rounds in the backend: a round whose held-out refer P@0.5 is below the current version's
never becomes the version, and ``/health`` shows both scores (trainer and evaluator are stand-ins, whose
held-out slice is one expression: any loss rejects here, ``HELDOUT_MARGIN`` 1)."""

from __future__ import annotations

import functools
import logging

import pytest
from conftest import REFERRING
from test_ls_training import annotation_event

import pixelllm_plugins.training.corrections as corrections
from pixelllm_plugins.training.corrections import plan_round


@pytest.fixture(autouse=True)
def any_loss_rejects(monkeypatch):
    monkeypatch.setattr(corrections, "HELDOUT_MARGIN", 1)


class Evaluator:
    """Held-out P@0.5: ``current`` for the base / current adapter, ``new`` for the round's adapter."""

    def __init__(self, current: float, new: float):
        self.current, self.new, self.calls = current, new, []

    def __call__(self, base, adapter, data_dir, split):
        self.calls.append(adapter)
        return self.new if adapter is not None and adapter == self.candidate else self.current

    candidate = ""


def _gated(client, evaluator, tmp_path):
    training = client.app.state.runtime.training
    training.gate, training.evaluator, training.replay = True, evaluator, 0.5
    training.replay_dir = tmp_path / "replay"
    training.min_annotations = 4
    return training


def _annotate(client, images_dir, ids):
    for i in ids:
        r = client.post("/webhook", json=annotation_event(images_dir, ann_id=i, task_id=i, caption=f"thing {i}"))
        assert r.status_code == 201


def _version(client):
    return client.post("/setup", json={"project": "7.1", "schema": REFERRING}).json()["model_version"]


def test_rejected_round_keeps_the_version_and_health_shows_both_scores(client, images_dir, fake_trainer, tmp_path,
                                                                        caplog):
    evaluator = Evaluator(current=0.5, new=0.25)
    training = _gated(client, evaluator, tmp_path)
    evaluator.candidate = str(training.adapters_dir / "ls-p7-ft1")
    with caplog.at_level(logging.INFO, logger="label_studio_backend.training"):
        _annotate(client, images_dir, [11, 12, 13, 14])
        assert training.wait_idle(60)
    assert _version(client) == "fake-1"
    health = client.get("/health").json()
    last = health["training"]["7"]["last_round"]
    assert last["accepted"] is False and last["gate"] == "rejected"
    assert (last["new_score"], last["current_score"]) == (0.25, 0.5)
    assert last["holdout"]["images"] == 1 and last["train"]["images"] == 3 + 96  # 3 corrections + the replay pool
    assert last["replay_images"] == 96 and last["correction_copies"] == 32  # half the training images each
    assert "training_errors" not in health and health["training"]["7"]["status"] == "idle"
    assert not (training.adapters_dir / "ls-p7-ft1").exists()  # never served
    assert client.post("/versions", json={"project": "7.1"}).json()["versions"] == ["fake-1"]
    assert evaluator.calls == [None, evaluator.candidate] * 2  # the base, then the new adapter (held out, retention)
    assert any("rejected" in r.getMessage() and "0.250" in r.getMessage() for r in caplog.records)
    # the trainer got corrections plus replay, and the plan for 3 training images
    call = fake_trainer.calls[-1]
    files = sorted({r["file_name"] for r in call["refcoco"]["images"]})
    assert sum(f.startswith("c_") for f in files) == 3 and sum(f.startswith("r_") for f in files) == 96
    assert len(call["refcoco"]["images"]) == 3 * 32 + sum(r["file_name"].startswith("r_")
                                                          for r in call["refcoco"]["images"])
    assert call["steps"] == plan_round(3).steps and call["r"] == 4 and call["adapter_name"] == "ls-p7-ft1"


def test_accepted_round_becomes_the_version_and_the_next_is_gated_against_it(client, images_dir, fake_trainer,
                                                                             tmp_path):
    evaluator = Evaluator(current=0.5, new=0.5)  # a tie is accepted
    training = _gated(client, evaluator, tmp_path)
    evaluator.candidate = str(training.adapters_dir / "ls-p7-ft1")
    _annotate(client, images_dir, [11, 12, 13, 14])
    assert training.wait_idle(60)
    assert _version(client) == "fake-1+ls-p7-ft1"
    assert client.get("/health").json()["training"]["7"]["last_round"]["gate"] == "passed"
    # next round: the current version is the first adapter, and a worse candidate is rejected
    evaluator.current, evaluator.new = 0.5, 0.0
    evaluator.candidate = str(training.adapters_dir / "ls-p7-ft2")
    evaluator.calls.clear()
    _annotate(client, images_dir, [15, 16, 17, 18])
    assert training.wait_idle(60)
    assert evaluator.calls == [str(training.adapters_dir / "ls-p7-ft1"), evaluator.candidate] * 2
    assert _version(client) == "fake-1+ls-p7-ft1"
    assert (training.adapters_dir / "ls-p7-ft1").is_dir() and not (training.adapters_dir / "ls-p7-ft2").exists()
    history = training.state("7")["history"]
    assert [h["adapter"] for h in history] == ["ls-p7-ft1", None] and history[-1]["gate"] == "rejected"


def test_few_annotations_skip_the_gate(client, images_dir, fake_trainer, tmp_path):
    evaluator = Evaluator(current=1.0, new=0.0)
    training = _gated(client, evaluator, tmp_path)
    training.min_annotations = 1
    _annotate(client, images_dir, [11])
    assert training.wait_idle(60)
    assert _version(client) == "fake-1+ls-p7-ft1" and evaluator.calls == []
    assert client.get("/health").json()["training"]["7"]["last_round"]["gate"].startswith("skipped")


def test_the_first_annotation_renders_the_replay_before_any_round(client, images_dir, fake_trainer, tmp_path):
    """Gated rounds read 128 synthetic replay scenes; the first stored annotation renders them in the training
    thread, so the round a labeller waits for does not. Once: later annotations queue nothing more."""
    from pixelllm_plugins.training.corrections import DEFAULT_REPLAY_LOOK, replay_cache

    training = _gated(client, Evaluator(current=0.5, new=0.5), tmp_path)
    training.min_annotations = 100  # no round yet
    manifest = tmp_path / "replay" / DEFAULT_REPLAY_LOOK / "manifest_replay.json"
    _annotate(client, images_dir, [11])
    assert training.wait_idle(60)
    assert manifest.is_file() and fake_trainer.calls == []
    stamp = manifest.stat().st_mtime_ns
    assert replay_cache(tmp_path / "replay", 128, DEFAULT_REPLAY_LOOK) == manifest.parent  # what a round asks for
    _annotate(client, images_dir, [12])
    assert training.wait_idle(60)
    assert manifest.stat().st_mtime_ns == stamp and training.state("7")["status"] == "idle"


def test_ungated_backends_render_no_replay(client, images_dir, fake_trainer, tmp_path):
    training = client.app.state.runtime.training
    training.replay_dir, training.min_annotations = tmp_path / "replay", 100
    assert training.gate is False  # a stand-in trainer: ungated unless asked
    _annotate(client, images_dir, [11])
    assert training.wait_idle(60)
    assert not (tmp_path / "replay").exists()


def test_the_backend_trainer_passes_the_round_settings_on_to_finetune(monkeypatch, tmp_path):
    """The round's learning-rate multipliers (new words at 5e-3, heads at a tenth) and its speed settings are
    TrainConfig fields that finetune passes on; the backend's own keywords stay with the backend."""
    import pixelllm_plugins.training.finetune as finetune_module
    from label_studio_backend.training import default_trainer

    calls = []
    real = finetune_module.finetune
    monkeypatch.setattr(finetune_module, "finetune", functools.wraps(real)(lambda *a, **k: calls.append((a, k)) or a[2]))
    default_trainer(from_model="BASE", data_dir=tmp_path, out_adapter=tmp_path / "adapter", steps=5,
                    adapter_name="ls-p1-ft1", lr_multipliers={"point_head.": 0.1}, cache_image_embeddings=True,
                    max_prompts={"refer": 3}, new_words=["pentagon"], r=4)
    (args, kwargs), = calls
    assert args == ("BASE", tmp_path, tmp_path / "adapter") and kwargs["steps"] == 5
    assert kwargs["lr_multipliers"] == {"point_head.": 0.1} and kwargs["cache_image_embeddings"] is True
    assert kwargs["max_prompts"] == {"refer": 3} and kwargs["new_words"] == ["pentagon"] and kwargs["r"] == 4
    assert "adapter_name" not in kwargs and kwargs["progress"] is False
