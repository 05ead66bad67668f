"""Data parallel on CPU: 2 processes (gloo) through torchrun, compared with 1 process accumulating 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import torch
from safetensors.torch import load_file

from pixelllm_plugins.training.recipes import recipe_config
from pixelllm_plugins.training.trainer import read_metrics, train

SCRIPT = """
import json, sys
from pixelllm_plugins.training.recipes import recipe_config
from pixelllm_plugins.training.trainer import train
train(recipe_config("tiny-smoke", **json.loads(sys.argv[1])))
"""


def test_ddp_two_processes_match_gradient_accumulation(tiny_data, tmp_path):
    common = {"data_dir": str(tiny_data), "steps": 3, "batch_size": 2, "checkpoint_every": 2, "warmup_steps": 1,
              "lr": 2e-3, "progress": False, "num_threads": 1}
    script = tmp_path / "run_train.py"
    script.write_text(SCRIPT)
    ddp_out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), json.dumps({**common, "out_dir": str(ddp_out)})],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    # rank 0 alone wrote: one log line per step, one checkpoint, no leftovers
    records = read_metrics(ddp_out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    assert sorted(p.name for p in ddp_out.iterdir()) == ["checkpoint-last", "final", "metrics.jsonl"]
    state = json.loads((ddp_out / "checkpoint-last" / "training_state.json").read_text())
    assert state["meta"]["world_size"] == 2 and len(state["rng"]) == 2

    # rank r takes global batches r, r + 2, ...: the same data as one process accumulating 2 batches
    single = tmp_path / "single"
    train(recipe_config("tiny-smoke", **{**common, "out_dir": str(single), "grad_accum": 2}))
    single_losses = [r["loss"] for r in read_metrics(single / "metrics.jsonl")]
    assert np.allclose([r["loss"] for r in records], single_losses, rtol=1e-4, atol=1e-5)
    a, b = load_file(str(ddp_out / "final" / "model.safetensors")), load_file(str(single / "final" / "model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)
