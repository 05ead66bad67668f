"""Named training recipes: a recipe is a set of ``TrainConfig`` values; anything can be overridden.

- ``tiny-smoke``: a few steps of the ``tiny`` preset (tests, CI, "does my install train").
- ``synth-small``: the embedded default model. The ``synth-small`` preset from scratch on the synthetic
  mixture; 78 minutes on 2 CPU cores (measured: whole-val refer P@0.5 0.884, past 0.85 at 62 minutes;
  also fine on one GPU, in minutes).
  Data: ``pixelllm synth --out DATA --split train val --num-images 4000``.
- ``synth-small-gpu``: the same model and data mixture, trained longer on one GPU in a prepared run of at
  most 8 minutes (``scripts/gpu_train.sh``: 16,000 scenes, batch 48); from scratch, or ``--init`` the
  embedded CPU-trained default to continue it.
- ``finetune``: a LoRA adapter (rank 8, alpha 16: the paper's scale 2) over a trained checkpoint, e.g. on
  annotations exported from Label Studio / FiftyOne in the same formats (see ``finetune.py``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..errors import TrainingError
from .trainer import TrainConfig


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    values: dict = field(default_factory=dict)  # TrainConfig fields

    def config(self, **overrides) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(TrainConfig)}
        unknown = set(overrides) - names
        if unknown:
            raise TrainingError(f"unknown training options {sorted(unknown)} for recipe {self.name!r}; "
                                f"known: {sorted(names)}")
        values = {**self.values, **{k: v for k, v in overrides.items() if v is not None}}
        return TrainConfig(recipe=self.name, **values)


RECIPES: dict[str, Recipe] = {
    "tiny-smoke": Recipe(
        "tiny-smoke", "a few steps of the tiny preset: checks that training runs end to end",
        {"init": "tiny", "steps": 4, "batch_size": 2, "grad_accum": 1, "lr": 1e-3, "warmup_steps": 1,
         "checkpoint_every": 2, "eval_every": 0, "num_threads": 2, "out_dir": "runs/tiny-smoke"},
    ),
    "synth-small": Recipe(
        "synth-small", "the default model: synth-small preset from scratch on synthetic scenes "
                       "(target: RefCOCO-style P@0.5 >= 0.85 on the synthetic val split)",
        {"init": "synth-small", "sources": {"refer": 4.0, "region": 4.0, "trace": 1.5, "caption": 0.5},
         "steps": 5200, "batch_size": 12, "grad_accum": 1, "lr": 8e-4, "min_lr_ratio": 0.05,
         "warmup_steps": 100, "weight_decay": 0.05, "checkpoint_every": 200, "eval_every": 0,
         "eval_tasks": ("refer",), "eval_limit": 100, "num_threads": 2, "out_dir": "runs/synth-small"},
    ),
    "synth-small-gpu": Recipe(
        "synth-small-gpu", "the default model trained longer on one GPU (a prepared run of at most 8 minutes, "
                           "scripts/gpu_train.sh): batch 48, bf16 autocast, data-loader processes",
        {"init": "synth-small", "sources": {"refer": 4.0, "region": 4.0, "trace": 1.5, "caption": 0.5},
         "steps": 6000, "batch_size": 48, "grad_accum": 1, "lr": 1.6e-3, "min_lr_ratio": 0.05,
         "warmup_steps": 300, "weight_decay": 0.05, "grad_clip": 1.0, "checkpoint_every": 1000, "eval_every": 0,
         "eval_tasks": ("refer",), "eval_limit": 100, "num_threads": 2, "num_workers": 5,
         "out_dir": "runs/synth-small-gpu"},
    ),
    "finetune": Recipe(
        "finetune", "LoRA adapter (r 8, alpha 16) plus point/confidence heads over a trained checkpoint",
        {"init": "", "sources": {"refer": 1.0, "region": 1.0, "trace": 0.0, "caption": 0.0},
         "steps": 200, "batch_size": 8, "lr": 1e-3, "warmup_steps": 20, "min_lr_ratio": 0.1,
         "weight_decay": 0.0, "checkpoint_every": 50, "eval_every": 0, "lora_r": 8, "lora_name": "finetune"},
    ),
}


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise TrainingError(f"unknown recipe {name!r}; choose one of {sorted(RECIPES)}") from None


def recipe_config(name: str, **overrides) -> TrainConfig:
    """``TrainConfig`` of recipe ``name`` with ``overrides`` (None values are ignored)."""
    return get_recipe(name).config(**overrides)
