"""Learning from annotations makes the suggestions better: N corrections on a new kind of object, through
``/webhook`` and the real background fine-tune, raise the IoU of the held-out suggestions for it
(small and CPU-sized here; ``learning_curve.py`` measures the curve for docs/label-studio.md)."""

from __future__ import annotations

import json

import pytest
from learning_curve import run
from ls_server import ARTIFACTS

pytestmark = pytest.mark.slow


def test_corrections_improve_suggestions_for_a_new_kind_of_object(tiny_checkpoint, tmp_path):
    pytest.importorskip("pixelllm_plugins.training.finetune")
    # ungated (every round trains on all corrections at the recipe's rate): a *random* tiny base only learns a
    # box prior, which the gated round's small, slow plan for 6 corrections does not reach in 100 steps; the
    # gated round is tested in test_ls_gate.py and tests/training/test_corrections.py
    result = run(str(tiny_checkpoint), n=6, steps=100, n_eval=6, workdir=tmp_path, train_gate=False)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "learning_ci.json").write_text(json.dumps(result, indent=1))
    assert result["after"]["model_version"] != result["before"]["model_version"]
    assert result["after"]["mean_iou"] > result["before"]["mean_iou"] + 0.01, result


def test_a_gated_round_runs_whole_in_a_child_process(tiny_checkpoint, tmp_path, monkeypatch):
    """The backend's gated round (training, settling, gate) runs in ``python -m
    pixelllm_plugins.training.isolated``: this process's ``run_correction_round`` is never called."""
    import pixelllm_plugins.training.corrections as corrections

    def not_here(*args, **kwargs):
        raise AssertionError("the round ran in the backend's process")

    monkeypatch.setattr(corrections, "run_correction_round", not_here)
    result = run(str(tiny_checkpoint), n=4, steps=3, n_eval=2, workdir=tmp_path)
    state = json.loads((tmp_path / "model_dir" / "projects" / "1" / "state.json").read_text())
    last = state["last_round"]
    assert state["status"] == "idle" and last["gate"] in ("passed", "rejected"), state
    assert last["plan"]["steps"] == 3 and last["replay_images"] == 96 and last["train"]["images"] == 3 + 96
    assert last["holdout"]["refer"] == 1 and last["new_score"] is not None and last["seconds"] > 0
    assert result["round_s"] > 0
