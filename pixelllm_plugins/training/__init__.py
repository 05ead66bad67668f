"""Training: the loop (``trainer``), named recipes, LoRA fine-tuning, gated correction rounds
(``corrections``), resumable state, DDP helpers."""

from __future__ import annotations

_EXPORTS = {
    "TrainConfig": "trainer", "train": "trainer", "read_metrics": "trainer", "RECIPES": "recipes",
    "get_recipe": "recipes", "recipe_config": "recipes", "finetune": "finetune",
    "plan_round": "corrections", "run_correction_round": "corrections", "RoundPlan": "corrections",
    "RoundResult": "corrections",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
