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
