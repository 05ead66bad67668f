"""The gated correction round (``training/corrections.py``): plan, held-out split, replay, gate; mocked
trainer and evaluator for our own logic, and one real tiny round end to end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from pixelllm_plugins.errors import TrainingError
from pixelllm_plugins.training.corrections import (
    HELDOUT_MARGIN,
    MIN_FOR_GATE,
    RoundPlan,
    heldout_loss,
    plan_round,
    run_correction_round,
    split_holdout,
)

# ---- plan ---------------------------------------------------------------------------------------------------

def test_plan_grows_with_the_number_of_corrections():
    plans = [plan_round(n) for n in (1, 8, 15, 16, 32, 63, 64, 1000)]
    assert [p.rank for p in plans] == [4, 4, 4, 8, 8, 8, 16, 16]
    assert [p.steps for p in plans] == [60, 60, 112, 120, 240, 400, 400, 400]
    assert [p.lr for p in plans] == [5e-4, 5e-4, 5e-4, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3]
    assert plans[0].alpha == 8
    with pytest.raises(TrainingError, match="at least one"):
        plan_round(0)


# ---- held-out split -----------------------------------------------------------------------------------------

def test_holdout_is_seeded_order_free_and_never_empties_a_side():
    keys = [f"{i}.png" for i in range(20)]
    train, held = split_holdout(keys, 0.25, seed=3)
    assert len(held) == 5 and sorted(train + held) == sorted(keys) and not set(train) & set(held)
    assert split_holdout(list(reversed(keys)), 0.25, seed=3) == (train, held)  # order of the input: no effect
    others = {tuple(split_holdout(keys, 0.25, seed=s)[1]) for s in range(6)}
    assert len(others) > 1  # the seed moves the slice
    assert split_holdout(keys[:MIN_FOR_GATE], 0.9, seed=0)[0]  # at least one image trains
    assert split_holdout(keys[:MIN_FOR_GATE], 0.01, seed=0)[1]  # at least one is held out
    assert split_holdout(keys[:MIN_FOR_GATE - 1], 0.5, seed=0) == (sorted(keys[:MIN_FOR_GATE - 1]), [])
    with pytest.raises(TrainingError):
        split_holdout(keys, 1.0)


# ---- the round with a mocked trainer and evaluator ------------------------------------------------------------

class Trainer:
    def __init__(self):
        self.calls = []

    def __call__(self, *, from_model, data_dir, out_adapter, steps, **kwargs):
        data = json.loads((Path(data_dir) / "refcoco_train.json").read_text())
        self.calls.append({"data_dir": Path(data_dir), "steps": steps, "files":
                           sorted({r["file_name"] for r in data["images"]}),
                           "texts": [r["caption"] for r in data["images"]],
                           "n_corrected_texts": len({(r["file_name"], r["caption"]) for r in data["images"]
                                                     if r["file_name"].startswith("c_")}),
                           "n_replay_texts": sum(r["file_name"].startswith("r_") for r in data["images"]), **kwargs})
        Path(out_adapter).mkdir(parents=True)
        (Path(out_adapter) / "adapter_config.json").write_text("{}")


class Evaluator:
    """P@0.5 by adapter and split: ``current`` / ``new`` on the held-out corrections, ``retention`` (current,
    new) on the retention slice."""

    def __init__(self, current: float, new: float, retention: tuple[float, float] = (0.8, 0.8)):
        self.current, self.new, self.retention, self.calls = current, new, retention, []

    def __call__(self, base, adapter, data_dir, split):
        data = json.loads((Path(data_dir) / f"refcoco_{split}.json").read_text())
        self.calls.append({"adapter": adapter, "split": split,
                           "files": sorted({r["file_name"] for r in data["images"]})})
        is_current = adapter is None or "current" in str(adapter)
        if split == "retention":
            return self.retention[0 if is_current else 1]
        return self.current if is_current else self.new


def _examples(tiny_data, tmp_path, n):
    """The first ``n`` images of the synthetic train split, as a corrections folder."""
    src = json.loads((tiny_data / "refcoco_train.json").read_text())
    names = sorted({r["file_name"] for r in src["images"]})[:n]
    images = [r for r in src["images"] if r["file_name"] in names]
    ids = {r["id"] for r in images}
    out = tmp_path / "examples"
    (out / "images" / "train").mkdir(parents=True)
    (out / "refcoco_train.json").write_text(json.dumps({"images": images, "categories": src["categories"],
                                                        "annotations": [a for a in src["annotations"]
                                                                        if a["image_id"] in ids]}))
    for name in names:
        shutil.copy(tiny_data / "images" / "train" / name, out / "images" / "train" / name)
    return out, names


@pytest.mark.parametrize(("current", "new", "accepted"), [(0.5, 0.75, True), (0.5, 0.5, True), (0.5, 0.25, False)])
def test_gate_accepts_only_a_round_that_is_not_worse(tiny_data, tmp_path, current, new, accepted):
    examples, names = _examples(tiny_data, tmp_path, 8)
    trainer, evaluator = Trainer(), Evaluator(current, new)
    result = run_correction_round("BASE", examples, tmp_path / "new", current_adapter=tmp_path / "current",
                                  trainer=trainer, evaluator=evaluator, replay=0.5, seed=1,
                                  replay_dir=tmp_path / "replay", replay_pool=18, heldout_margin=1)
    assert result.accepted is accepted and result.gate == ("passed" if accepted else "rejected")
    assert (result.current_score, result.new_score) == (current, new)
    held = evaluator.calls[0]["files"]
    assert len(held) == 2 and evaluator.calls[1]["files"] == held  # both versions on the same slice
    assert [c["adapter"] for c in evaluator.calls] == [str(tmp_path / "current"), str(tmp_path / "new")] * 2
    retention = evaluator.calls[2]["files"]
    assert [c["split"] for c in evaluator.calls] == ["holdout", "holdout", "retention", "retention"]
    assert len(retention) == 32 and evaluator.calls[3]["files"] == retention
    (call,) = trainer.calls
    corrected = [f for f in call["files"] if f.startswith("c_")]
    replayed = [f for f in call["files"] if f.startswith("r_")]
    assert len(corrected) == 6 and len(replayed) == 18 == result.replay_images  # the whole pool trains
    assert result.correction_copies == 3 and len(call["texts"]) == 3 * call["n_corrected_texts"] + call["n_replay_texts"]
    assert not {f"c_{h[2:]}" for h in held} & set(corrected)  # held-out images never train
    assert not set(retention) & set(replayed)  # nor do the retention scenes
    assert {h[2:] for h in held} | {c[2:] for c in corrected} == set(names)
    assert all((call["data_dir"] / "images" / "train" / f).is_file() for f in call["files"])
    assert call["steps"] == plan_round(6).steps and call["r"] == 4 and call["lr"] == 5e-4
    assert call["lr_multipliers"] == {"point_head.": 0.1, "confidence_head.": 0.1}  # the heads learn slowly
    assert result.to_dict()["plan"]["alpha"] == 8 and result.to_dict()["plan"]["head_lr_scale"] == 0.1
    assert result.to_dict()["plan"]["keep"] == 0.5  # half of the update is kept (the stub wrote no weights)


def test_heldout_loss_counts_expressions():
    assert heldout_loss(0.5, 0.0, 2) == 1 and heldout_loss(0.75, 0.25, 4) == 2
    assert heldout_loss(0.5, 0.75, 4) == 0 and heldout_loss(0.5, 0.5, 0) == 0 and heldout_loss(0.5, 0.25, 1) == 0.25


def test_gate_rejects_only_a_loss_beyond_chance(tiny_data, tmp_path):
    """By default a round is rejected when it loses HELDOUT_MARGIN or more held-out expressions (net); a
    smaller loss on a slice of a few corrections is accepted, and the summary says so."""
    examples, _ = _examples(tiny_data, tmp_path, 8)

    def gate(current, new, **kwargs):
        return run_correction_round("BASE", examples, tmp_path / "new", trainer=Trainer(),
                                    evaluator=Evaluator(current, new), replay=0, retention_images=0, **kwargs)

    n = gate(1.0, 1.0).holdout["refer"]
    assert n >= HELDOUT_MARGIN  # the slice can tell
    within = gate(1.0, 1.0 - (HELDOUT_MARGIN - 1) / n)
    assert within.accepted and within.heldout_lost == HELDOUT_MARGIN - 1 and "within chance" in within.summary()
    beyond = gate(1.0, 1.0 - HELDOUT_MARGIN / n)
    assert not beyond.accepted and beyond.heldout_lost == HELDOUT_MARGIN and "worse" in beyond.reason
    strict = gate(1.0, 1.0 - 1 / n, heldout_margin=1)  # any loss rejects
    assert not strict.accepted and strict.to_dict()["heldout_lost"] == 1


@pytest.mark.parametrize(("retention", "accepted"), [((0.8, 0.79), True), ((0.8, 0.75), False)])
def test_gate_rejects_a_round_that_forgets_the_base(tiny_data, tmp_path, retention, accepted):
    examples, _ = _examples(tiny_data, tmp_path, 8)
    evaluator = Evaluator(0.5, 1.0, retention)  # better on the corrections in both cases
    result = run_correction_round("BASE", examples, tmp_path / "new", trainer=Trainer(), evaluator=evaluator,
                                  replay=0, replay_dir=tmp_path / "replay", replay_pool=8, retention_images=8)
    assert result.accepted is accepted and (result.current_retention, result.new_retention) == retention
    assert ("forgets" in result.reason) is (not accepted) and ("retention" in result.summary())
    assert len(evaluator.calls[2]["files"]) == 8


def test_few_corrections_train_on_all_and_skip_the_gate(tiny_data, tmp_path):
    examples, names = _examples(tiny_data, tmp_path, MIN_FOR_GATE - 1)
    trainer, evaluator = Trainer(), Evaluator(0.9, 0.0)
    result = run_correction_round("BASE", examples, tmp_path / "new", trainer=trainer, evaluator=evaluator,
                                  replay=0, plan=RoundPlan(rank=2, steps=3, lr=1e-3))
    assert result.accepted and result.gate.startswith("skipped") and "fewer than" in result.gate
    assert evaluator.calls == [] and result.new_score is None
    assert trainer.calls[0]["files"] == [f"c_{n}" for n in names] and trainer.calls[0]["steps"] == 3


def test_split_is_deterministic_by_seed(tiny_data, tmp_path):
    examples, _ = _examples(tiny_data, tmp_path, 8)
    held = []
    for seed in (5, 5):
        evaluator = Evaluator(0.5, 0.5)
        run_correction_round("BASE", examples, tmp_path / "new", trainer=Trainer(), evaluator=evaluator,
                             replay=0, seed=seed, retention_images=0)
        held.append(evaluator.calls[0]["files"])
    assert held[0] == held[1]


def test_empty_folder_is_a_training_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(TrainingError, match="no corrections"):
        run_correction_round("BASE", tmp_path / "empty", tmp_path / "new", trainer=Trainer())


# ---- one real round ---------------------------------------------------------------------------------------------

def test_real_tiny_round_end_to_end(tiny_base, tiny_data, tmp_path):
    from safetensors.torch import load_file

    examples, _ = _examples(tiny_data, tmp_path, 6)
    result = run_correction_round(tiny_base, examples, tmp_path / "adapter", replay=0.5, seed=0,
                                  replay_dir=tmp_path / "replay", replay_pool=8, retention_images=4,
                                  plan=RoundPlan(rank=2, steps=2, lr=1e-3), batch_size=2,
                                  work_dir=tmp_path / "round")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    kept = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    trained = load_file(str(tmp_path / "round" / "run" / "final" / "adapter" / "adapter_model.safetensors"))
    lora_b = [k for k in trained if ".lora_B." in k]
    assert lora_b and all(torch.allclose(kept[k], trained[k] * 0.5) for k in lora_b)  # half the update kept
    assert result.holdout["images"] == 2 and result.train["images"] == 4 + 8
    assert 0.0 <= result.new_score <= 1.0 and 0.0 <= result.current_score <= 1.0
    assert 0.0 <= result.new_retention <= 1.0 and 0.0 <= result.current_retention <= 1.0
    assert result.accepted == (result.new_score >= result.current_score
                               and result.new_retention >= result.current_retention - 0.02)
    assert (tmp_path / "replay" / "varied" / "manifest_replay.json").is_file()  # the replay cache, rendered once


def test_words_the_base_spells_get_their_own_tokens(tiny_base, tiny_data, tmp_path):
    from pixelllm_plugins.training.corrections import NEW_WORD_LR

    examples, _ = _examples(tiny_data, tmp_path, MIN_FOR_GATE - 1)
    path = examples / "refcoco_train.json"
    data = json.loads(path.read_text())
    for record in data["images"]:
        record["caption"] = "the pentagon left of the red circle"
    path.write_text(json.dumps(data))
    plan = RoundPlan(rank=2, steps=3, lr=1e-3)
    trainer = Trainer()
    result = run_correction_round(tiny_base, examples, tmp_path / "new", trainer=trainer, replay=0.5,
                                  replay_dir=tmp_path / "replay", replay_pool=4, plan=plan)
    call = trainer.calls[0]
    assert result.new_words == call["new_words"] == ["pentagon"]
    assert call["new_word_anchors"] and all(len(w) >= 3 for w in call["new_word_anchors"])  # replay captions' nouns
    assert call["lr_multipliers"]["language.word_embed.modules_to_save."] == pytest.approx(NEW_WORD_LR / plan.lr)
    assert call["lr_multipliers"]["point_head."] == plan.head_lr_scale  # the plan's own multipliers stay

    trainer = Trainer()
    run_correction_round(tiny_base, examples, tmp_path / "new", trainer=trainer, replay=0.5,
                         replay_dir=tmp_path / "replay", replay_pool=4, plan=plan, words_only=True)
    multipliers = trainer.calls[0]["lr_multipliers"]
    assert multipliers[""] == 0.0 and list(multipliers)[-1] == ""  # everything else stands still
    assert multipliers["language.output.modules_to_save."] == pytest.approx(NEW_WORD_LR / plan.lr)

    trainer = Trainer()
    result = run_correction_round(tiny_base, examples, tmp_path / "new", trainer=trainer, replay=0.5,
                                  replay_dir=tmp_path / "replay", replay_pool=4, plan=plan, new_words=False)
    assert result.new_words == [] and "new_words" not in trainer.calls[0]


def test_round_images_keep_their_scale_and_reuse_embeddings_unless_the_image_side_trains(tiny_data, tmp_path):
    from pixelllm_plugins.training.corrections import ROUND_AUGMENT_SCALE

    examples, _ = _examples(tiny_data, tmp_path, MIN_FOR_GATE - 1)
    plan = RoundPlan(rank=2, steps=3, lr=1e-3)
    calls = []
    for kwargs in ({}, {"adapt_vision": True}, {"modules_to_save": ["vision.stem"]},
                   {"sources": {"refer": 1.0, "region": 0.0}}):
        trainer = Trainer()
        run_correction_round("BASE", examples, tmp_path / "new", trainer=trainer, replay=0, plan=plan,
                             new_words=False, **kwargs)
        calls.append(trainer.calls[0])
    assert calls[0]["augment_scale"] == ROUND_AUGMENT_SCALE and calls[0]["cache_image_embeddings"] is True
    assert calls[1]["cache_image_embeddings"] is False and calls[2]["cache_image_embeddings"] is False
    assert calls[3]["augment_scale"] == {"refer": [1.0, 1.0]}  # only the sources that train
