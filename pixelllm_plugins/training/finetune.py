"""LoRA fine-tuning of a trained checkpoint on a folder of annotations.

``finetune(base, data_dir, out_adapter)`` trains a LoRA adapter (``modeling/lora.py``: q/v of the language
model and prompt adapter, plus per-adapter copies of the point and confidence heads) with the base weights
frozen, and writes a peft adapter folder that loads on top of the base by path::

    predictor = Predictor(base); predictor.load_adapter(out_adapter)
    # or: pixelllm refer IMAGE TEXT --model BASE --adapter OUT_ADAPTER

The data folder uses the same formats as training (``refcoco_<split>.json``, ``vg_<split>.json``, ...);
sources whose file is missing are skipped. The run's checkpoints and metrics go to ``work_dir``
(default: ``<out_adapter>.train`` next to the adapter), so an interrupted fine-tune resumes.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ..errors import TrainingError
from .recipes import recipe_config
from .trainer import train


def finetune(from_model: str | Path, data_dir: str | Path, out_adapter: str | Path, steps: int = 200, *,
             split: str = "train", sources: dict[str, float] | None = None, batch_size: int | None = None,
             lr: float | None = None, r: int | None = None, alpha: int | None = None, seed: int = 0,
             work_dir: str | Path | None = None, progress: bool = True, train_embeddings: bool = False,
             adapt_vision: bool = False, modules_to_save: list[str] | None = None,
             new_words: list[str] | None = None, new_word_anchors: list[str] | None = None, **overrides) -> Path:
    """Train a LoRA adapter over ``from_model`` and write it to ``out_adapter``; returns that folder.

    ``train_embeddings``: the adapter also carries its own copy of the word embeddings, for data with
    words the base never saw; ``adapt_vision``: LoRA on the vision encoder too, for things the base never
    had to see; ``modules_to_save``: more modules trained as full per-adapter copies, on top of the point
    and confidence heads (peft's term), e.g. ``["vision.stem", "vision.detail"]`` (all measured on
    "pentagon": docs/training.md); ``new_words``: words that get their own token in the adapter, only
    their rows learning (``modeling.new_words``; ``new_word_anchors``: known words whose mean starts them)."""
    if not from_model or not Path(from_model).is_dir():
        raise TrainingError(f"fine-tuning needs a trained checkpoint folder, got {str(from_model)!r}; pass the "
                            "folder of `pixelllm train` output (OUT/final) or a downloaded checkpoint")
    out_adapter = Path(out_adapter)
    work = Path(work_dir) if work_dir is not None else out_adapter.with_name(out_adapter.name + ".train")
    cfg = recipe_config("finetune", init=str(from_model), data_dir=str(data_dir), split=split, out_dir=str(work),
                        steps=steps, sources=sources, batch_size=batch_size, lr=lr, lora_r=r, lora_alpha=alpha,
                        seed=seed, progress=progress, lora_train_embeddings=train_embeddings or None,
                        lora_adapt_vision=adapt_vision or None,
                        lora_extra_modules_to_save=list(modules_to_save) if modules_to_save else None,
                        lora_new_words=list(new_words) if new_words else None,
                        lora_new_word_anchors=list(new_word_anchors) if new_word_anchors else None, **overrides)
    trained = train(cfg)
    if cfg.stop_after is not None and cfg.stop_after < cfg.steps:
        return trained  # interrupted on purpose (tests): the checkpoint folder
    out_adapter.mkdir(parents=True, exist_ok=True)
    for item in trained.iterdir():
        if item.is_file():
            shutil.copy2(item, out_adapter / item.name)
    readme = trained.parent / "README.md"
    if readme.is_file():
        shutil.copy2(readme, out_adapter / "README.md")
    return out_adapter
