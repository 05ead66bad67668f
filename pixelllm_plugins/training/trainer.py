"""The training loop, nanoGPT style: ``_train`` reads top to bottom (its setup, one optimizer step and the
final save are the small functions ``_setup``, ``_step`` and ``_save_final`` beside it).

``train(TrainConfig(...))`` builds (or loads) a model, streams a seeded per-batch source mixture, runs
AdamW with linear warmup + cosine decay and gradient accumulation, and every ``checkpoint_every`` steps
writes ``OUT/checkpoint-last/`` (a normal checkpoint folder plus ``training_state.*``) so a killed run
continues exactly where it stopped (same losses, same weights) when started again with the same config.

Data parallel: launch with ``torchrun --nproc_per_node=N``; rank ``r`` of ``W`` takes global batches
``r, r + W, ...`` of the stream, so W ranks with accumulation A see the batches one process sees with
accumulation A·W. Only rank 0 writes.

Referring segmentation (issue 17): a model with a mask decoder (``heads.mask_decoder > 0``, e.g. grown with
``scripts/grow_model.py SRC DST heads.mask_decoder=3 prompt.points=true``) trains it on every batch whose
rows have masks (refer: the RefCOCO json's, region: ``instances_<split>.json``'s); with ``prompt.points``,
``point_prompt_prob`` of the region and mask prompts take points (``data.collate.collate_for_model``). A
model with neither gets the batches it always got.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import platform
import random
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..data.collate import REGION_BOX_JITTER
from ..errors import PixelLLMError, TrainingError
from . import distributed as D
from .state import TrainingState, capture_rng, restore_rng

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint-last"
FINAL_DIR = "final"
ADAPTER_SUBDIR = "adapter"


@dataclass
class TrainConfig:
    """Everything a run depends on. Saved with every checkpoint (``meta.json`` -> ``train_config``)."""

    recipe: str = "custom"
    init: str = "tiny"  # a preset name (random init) or a checkpoint folder to start from
    data_dir: str = ""  # a folder in the synthetic/public formats (refcoco_<split>.json, vg_..., ln_..., ...)
    split: str = "train"
    sources: dict[str, float] = field(default_factory=lambda: {"refer": 4.0, "region": 3.0, "trace": 2.0,
                                                                "caption": 1.0})
    max_prompts: dict[str, int] = field(default_factory=dict)  # per source; default in data.mixture
    # per source: the random resize range [lo, hi] of the longer side (x canvas); above 1 the image is
    # cropped. Default: data.transforms.TASK_AUGMENT. Words relative to the whole image ("small", "large")
    # stay true only when hi <= 1.
    augment_scale: dict[str, list[float]] = field(default_factory=dict)
    out_dir: str = "runs/train"
    steps: int = 1000  # optimizer steps
    batch_size: int = 8  # images per micro-batch per rank
    grad_accum: int = 1
    lr: float = 3e-4
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.0  # never applied to norms, biases or other 1-d parameters
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 0.0  # 0: none (as the reference)
    seed: int = 0
    checkpoint_every: int = 500
    eval_every: int = 0  # 0: never during training
    eval_split: str = "val"
    eval_tasks: tuple[str, ...] = ("refer",)
    eval_limit: int | None = 200
    log_file: str = "metrics.jsonl"  # relative to out_dir
    log_every: int = 1
    bf16: bool = True  # bf16 autocast; only ever on CUDA
    num_threads: int | None = None  # torch intra-op threads (CPU)
    num_workers: int = 0  # data-loader processes
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    resume: bool = True  # continue from OUT/checkpoint-last when it exists
    progress: bool = True  # tqdm bar (rank 0)
    # LoRA fine-tuning (finetune.py): r > 0 adds adapter `lora_name` and trains only it
    lora_r: int = 0
    lora_alpha: int | None = None
    lora_name: str = "default"
    lora_target_modules: list[str] | None = None
    lora_modules_to_save: list[str] | None = None
    lora_train_embeddings: bool = False  # also train the word embeddings (new words), as adapter copies
    lora_adapt_vision: bool = False  # also put LoRA on the vision encoder's blocks
    lora_extra_modules_to_save: list[str] | None = None  # more full per-adapter copies (e.g. vision.stem)
    # words the base spells in pieces that get their own token in the adapter (modeling.new_words): only
    # their embedding and output rows learn; they start at the mean of the anchors' rows
    lora_new_words: list[str] | None = None
    lora_new_word_anchors: list[str] | None = None
    # learning-rate multipliers by parameter-name prefix (first match wins), e.g. {"vision.": 0.2}
    lr_multipliers: dict[str, float] = field(default_factory=dict)
    # point prompts (a model with prompt.points): this fraction of the region rows (box -> text) and of the
    # mask decoder's rows gets a positive point on the object (maybe plus a negative one), half of them
    # instead of the box (data.collate.sample_point_prompts); 0: box prompts only, as before
    point_prompt_prob: float = 0.0
    # this fraction of the region rows gets its box prompt moved (each side by up to region_box_jitter_scale
    # of the box's size, data.collate.jitter_region_boxes): captions and masks that hold for loosely drawn
    # boxes; 0: exact boxes
    region_box_jitter: float = 0.0
    region_box_jitter_scale: float = REGION_BOX_JITTER
    # embed each distinct image canvas once and reuse it at later steps (training.embedding_cache); only for
    # runs whose vision encoder and proposal head do not train, and worth it only when images repeat with
    # the same canvas (augment_scale [1, 1]): correction rounds
    cache_image_embeddings: bool = False
    # decode every training image once and keep it in memory (small data that repeats: correction rounds)
    preload_images: bool = False
    # testing aid: stop (as if killed) once this many steps are done, without the final save
    stop_after: int | None = None

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"], d["eval_tasks"] = list(self.betas), list(self.eval_tasks)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise TrainingError(f"unknown training options {sorted(unknown)}; known: {sorted(names)}")
        d = dict(d)
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        if "eval_tasks" in d:
            d["eval_tasks"] = tuple(d["eval_tasks"])
        return cls(**d)

    def validate(self) -> None:
        if self.steps <= 0 or self.batch_size <= 0 or self.grad_accum <= 0:
            raise TrainingError(f"steps, batch_size and grad_accum must be positive (got {self.steps}, "
                                f"{self.batch_size}, {self.grad_accum})")
        if self.lr <= 0:
            raise TrainingError(f"lr must be positive, got {self.lr}")
        if not 0.0 <= self.point_prompt_prob <= 1.0:
            raise TrainingError(f"point_prompt_prob is a fraction of the prompts: 0 to 1, got {self.point_prompt_prob}")
        if not 0.0 <= self.region_box_jitter <= 1.0:
            raise TrainingError(f"region_box_jitter is a fraction of the region rows: 0 to 1, got {self.region_box_jitter}")
        if not 0.0 < self.region_box_jitter_scale <= 0.5:
            raise TrainingError("region_box_jitter_scale is how far each side of a jittered box may move, as a "
                                f"fraction of the box's size: above 0, at most 0.5; got {self.region_box_jitter_scale}")
        strays = sorted(set(self.augment_scale) - {k for k, w in self.sources.items() if w > 0})
        if strays:
            raise TrainingError(f"augment_scale names {strays}, which are not sources of this mixture "
                                f"{sorted(k for k, w in self.sources.items() if w > 0)}")
        for name, scale in self.augment_scale.items():
            if len(scale) != 2 or not 0 < scale[0] <= scale[1]:
                raise TrainingError(f"augment_scale[{name!r}] must be [lo, hi] with 0 < lo <= hi, got {scale}")
        if not self.data_dir or not Path(self.data_dir).is_dir():
            raise TrainingError(f"data_dir {self.data_dir!r} is not a folder; write one with "
                                "`pixelllm synth --out DIR --split train val` or point at your own data")


# ---- schedule and optimizer ------------------------------------------------------------------------

def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup over ``warmup_steps`` then cosine decay to ``lr * min_lr_ratio`` at ``steps``."""
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps > 0 else 1.0
    progress = min(1.0, max(0.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)))
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.lr * warm * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> tuple[torch.optim.AdamW, list[str]]:
    """AdamW over the parameters with ``requires_grad`` (frozen parts and the base under LoRA are left
    out); weight decay only on >= 2-d weights. Returns the optimizer and the parameter names in order."""
    buckets: dict[tuple[bool, float], list[tuple[str, torch.nn.Parameter]]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decays = p.ndim >= 2 and not name.endswith(".bias") and not getattr(p, "_pixelllm_no_decay", False)
        scale = next((m for prefix, m in cfg.lr_multipliers.items() if name.startswith(prefix)), 1.0)
        buckets.setdefault((decays, scale), []).append((name, p))
    if not buckets:
        raise TrainingError("the model has no trainable parameters (everything is frozen); unfreeze a part "
                            "or add a LoRA adapter (lora_r > 0)")
    groups, names = [], []
    for (decays, scale), params in sorted(buckets.items(), key=lambda kv: (not kv[0][0], kv[0][1])):
        groups.append({"params": [p for _, p in params], "weight_decay": cfg.weight_decay if decays else 0.0,
                       "lr_scale": scale})
        names += [n for n, _ in params]
    # on CUDA the multi-tensor update: a per-parameter loop would launch ~10 small kernels per tensor, and
    # a small model's GPU step is bound by launches (docs/training.md); on CPU the plain loop, as before
    on_cuda = any(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=1e-8, foreach=on_cuda), names


# ---- data --------------------------------------------------------------------------------------------

def build_sources(data_dir: str | Path, split: str, weights: dict[str, float], max_prompts: dict[str, int],
                  augment_scale: dict[str, list[float]] | None = None, *, masks: bool = False,
                  preload_images: bool = False):
    """Mixture sources for the files present in ``data_dir`` (a source whose file is missing is dropped).
    ``masks``: region prompts also take the masks of ``instances_<split>.json`` when it is there (for a model
    with a mask decoder or point prompts; refer prompts always carry their json's masks). ``preload_images``:
    every image file is decoded once, here, and the samples hold the decoded image."""
    from ..data.formats import SyntheticDataset
    from ..data.mixture import synthetic_sources
    from ..data.transforms import TASK_AUGMENT

    ds = SyntheticDataset.at(data_dir, split)
    files = {"refer": ds.refcoco, "region": ds.vg, "trace": ds.ln, "caption": ds.coco_captions}
    unknown = set(weights) - set(files)
    if unknown:
        raise TrainingError(f"unknown data sources {sorted(unknown)}; choose from {sorted(files)}")
    present = {k: w for k, w in weights.items() if w > 0 and files[k].is_file()}
    if not present:
        wanted = ", ".join(str(files[k]) for k, w in weights.items() if w > 0)
        raise TrainingError(f"no training data found for split {split!r}: none of {wanted} exists. Write data "
                            f"with `pixelllm synth --out {data_dir} --split {split}` or export your annotations "
                            "in these formats")
    zeroed = {k: 0.0 for k in files if k not in present}
    try:
        sources = synthetic_sources(data_dir, split, {**present, **zeroed}, max_prompts=max_prompts or None,
                                    masks=masks)
    except (ValueError, OSError) as exc:
        raise TrainingError(f"cannot load training data from {data_dir}: {exc}") from exc
    for source in sources:
        if source.name in (augment_scale or {}):
            lo, hi = augment_scale[source.name]
            source.augment = dataclasses.replace(TASK_AUGMENT[source.name], scale=(float(lo), float(hi)))
    if preload_images:
        _preload(sources)
    return sources


PRELOAD_MAX_BYTES = 2 << 30  # decoded RGB kept in memory; images past it are read from disk as before


def _preload(sources, max_bytes: int = PRELOAD_MAX_BYTES) -> None:
    """Decode each image file of ``sources`` once (up to ``max_bytes`` of RGB pixels); those samples then
    carry the decoded image."""
    decoded: dict = {}
    used = 0
    for source in sources:
        loaded = []
        for sample in source.samples:
            key = sample.image if isinstance(sample.image, (str, Path)) else None
            if key is not None and key not in decoded and used < max_bytes:
                try:
                    decoded[key] = sample.load_image()
                except PixelLLMError as exc:
                    raise TrainingError(f"cannot load training image {key}: {exc}") from exc
                used += decoded[key].width * decoded[key].height * 3
            loaded.append(dataclasses.replace(sample, image=decoded[key]) if key in decoded else sample)
        source.samples = loaded
    if used >= max_bytes:
        log.info("preloaded %d images (%.1f GB); the rest are read from disk at each step", len(decoded), used / 1e9)


class RankStream(IterableDataset):
    """Per-rank view of the mixture stream: local micro-batch i is global batch ``i * world + rank``."""

    def __init__(self, mixture, start: int, rank: int, world: int):
        self.mixture, self.start, self.rank, self.world = mixture, start, rank, world

    def __iter__(self):
        info = get_worker_info()
        wid, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        i = self.start + wid
        while True:
            yield self.mixture.batch(i * self.world + self.rank)
            i += workers


def _identity(x):
    return x


# ---- logging -------------------------------------------------------------------------------------------

class MetricsLog:
    """Append-only JSONL (rank 0). On resume, records after the resumed step are dropped first."""

    def __init__(self, path: Path | None, resume_step: int):
        self.path = path
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            kept = []
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= resume_step:
                        kept.append(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill
            path.write_text("".join(k + "\n" for k in kept) if resume_step > 0 else "")

    def write(self, record: dict) -> None:
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics JSONL file (training steps have ``loss``; evaluations have ``eval``)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# ---- model ---------------------------------------------------------------------------------------------

def build_model(cfg: TrainConfig):
    """(model, tokenizer, base_version): ``cfg.init`` loaded or randomly initialised from ``cfg.seed``."""
    from ..checkpoint import load_pretrained

    torch.manual_seed(cfg.seed)
    try:
        model, tokenizer, version = load_pretrained(cfg.init)
    except PixelLLMError as exc:
        raise TrainingError(f"cannot start from {cfg.init!r}: {exc}") from exc
    if cfg.lora_new_words and cfg.lora_r <= 0:
        raise TrainingError("new words are learned by an adapter: set lora_r > 0 (pixelllm finetune)")
    if cfg.lora_r > 0:
        from ..modeling import lora, new_words

        extra = list(cfg.lora_extra_modules_to_save or ())
        if cfg.lora_new_words:
            extra += [m for m in new_words.word_table_modules(model)
                      if m not in extra and not (cfg.lora_train_embeddings and m.endswith("word_embed"))]
        lora.add_lora(model, cfg.lora_name, r=cfg.lora_r, alpha=cfg.lora_alpha,
                      target_modules=cfg.lora_target_modules, modules_to_save=cfg.lora_modules_to_save,
                      adapt_vision=cfg.lora_adapt_vision, train_embeddings=cfg.lora_train_embeddings,
                      extra_modules_to_save=extra)
        if cfg.lora_new_words:
            anchors = [ids[0] for ids in (tokenizer.encode(w, add_eos=False) for w in cfg.lora_new_word_anchors or ())
                       if len(ids) == 1]
            tokenizer = new_words.with_new_words(tokenizer, cfg.lora_new_words)
            new_words.grow_tables(model, cfg.lora_name, len(cfg.lora_new_words), anchors, trainable=True)
    return model, tokenizer, version


def _save_adapter(directory: Path, cfg: TrainConfig, model, tokenizer) -> None:
    """The adapter folder, with its new words and tokenizer when it has any."""
    from ..modeling import lora, new_words

    if cfg.lora_new_words:
        new_words.restore_old_rows(model, cfg.lora_name)
    lora.save_adapter(model, directory, cfg.lora_name)
    if cfg.lora_new_words:
        new_words.save_words(directory, tokenizer, cfg.lora_new_words,
                             tokenizer.vocab_size - len(cfg.lora_new_words))


def _seed_process(seed: int, rank: int) -> None:
    s = seed * 1000 + rank + 1
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def _hardware(ctx: D.DistContext) -> str:
    if ctx.device.type == "cuda":
        name = torch.cuda.get_device_name(ctx.device)
    else:
        name = f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    return f"{ctx.world_size} x {name}, torch {torch.__version__}"


def _model_card(cfg: TrainConfig, model, ctx: D.DistContext, step: int, last: dict,
                eval_results: dict | None, base_version: str) -> str:
    rows = ""
    if eval_results:
        from ..evaluation.evaluate import markdown_table

        rows = "\n## Evaluation\n\n" + markdown_table(eval_results) + "\n"
    init = f"`{cfg.init}` ({base_version})"
    return f"""# PixelLLM `{model.config.preset}` trained with recipe `{cfg.recipe}`

- initialised from: {init}
- data: `{cfg.data_dir}` split `{cfg.split}`, sources {json.dumps(cfg.sources)}
- steps: {step} of {cfg.steps}; batch {cfg.batch_size} x accumulation {cfg.grad_accum} x {ctx.world_size} \
process(es); lr {cfg.lr} (warmup {cfg.warmup_steps}, cosine); weight decay {cfg.weight_decay}
- seed: {cfg.seed}
- hardware: {_hardware(ctx)}
- final training loss: {last.get('loss', float('nan')):.4f}
- parameters: {model.num_parameters():,} ({model.num_parameters(trainable_only=True):,} trained)
{rows}
Reproduce: `pixelllm train --recipe {cfg.recipe} --data {cfg.data_dir} --seed {cfg.seed}`.
Load with `pixelllm_plugins.checkpoint.load_pretrained(PATH)` or `pixelllm ... --model PATH`.
"""


# ---- checkpoints -----------------------------------------------------------------------------------------

def _save_checkpoint(directory: Path, cfg: TrainConfig, model, tokenizer, card: str, state: TrainingState) -> None:
    """Write into a temporary folder, then swap it in: a kill never leaves a half-written checkpoint."""
    from ..checkpoint import save_pretrained

    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if cfg.lora_r > 0:
        _save_adapter(tmp / ADAPTER_SUBDIR, cfg, model, tokenizer)
        (tmp / "README.md").write_text(card)
    else:
        save_pretrained(model, tokenizer, tmp, model_card=card,
                        extra_meta={"train_config": cfg.to_dict(), "step": state.step})
    state.save(tmp)
    old = directory.with_name(directory.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if directory.exists():
        os.replace(directory, old)
    os.replace(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)


def _load_weights(directory: Path, cfg: TrainConfig, model) -> None:
    if cfg.lora_r > 0:
        from ..modeling import lora

        lora.load_adapter(model, directory / ADAPTER_SUBDIR, cfg.lora_name, trainable=True, activate=True,
                          overwrite=True)
        return
    from ..checkpoint import load_pretrained

    saved, _, _ = load_pretrained(directory)
    model.load_state_dict(saved.state_dict())


def _resume(directory: Path, cfg: TrainConfig, model, optimizer, names: list[str],
            ctx: D.DistContext) -> tuple[int, int]:
    """Restore weights, optimizer and RNG from ``directory``; -> (step, micro-batches consumed per rank)."""
    state = TrainingState.load(directory)
    if state.param_names != names:
        raise TrainingError(f"{directory} was written for different trainable parameters than this model has; "
                            "resume with the same recipe and model, or use a fresh out_dir")
    _load_weights(directory, cfg, model)
    optimizer.load_state_dict(state.optimizer)
    if len(state.rng) == ctx.world_size:
        restore_rng(state.rng[ctx.rank])
    else:
        log.warning("checkpoint was written by %d processes, this run has %d: random streams are re-seeded, "
                    "so the continuation is not bit-exact", len(state.rng), ctx.world_size)
        _seed_process(cfg.seed + state.step, ctx.rank)
    data = state.data[0] if state.data else {}
    if data.get("seed", cfg.seed) != cfg.seed:
        raise TrainingError(f"{directory} was trained with seed {data.get('seed')}, this run has seed {cfg.seed}; "
                            "use the same seed to resume, or a fresh out_dir")
    return state.step, int(data.get("micro_batches", state.step * cfg.grad_accum))


# ---- the loop ----------------------------------------------------------------------------------------------

def train(cfg: TrainConfig) -> Path:
    """Train and return the final checkpoint folder (``OUT/final``; with LoRA: ``OUT/final/adapter``)."""
    cfg.validate()
    ctx = D.setup(cfg.device)
    try:
        return _train(cfg, ctx)
    finally:
        D.teardown(ctx)


def _train(cfg: TrainConfig, ctx: D.DistContext) -> Path:
    from tqdm.auto import tqdm

    run = _setup(cfg, ctx)
    step, micro_batches = run.step, run.micro_batches
    bar = tqdm(total=cfg.steps, initial=step, disable=not (cfg.progress and ctx.is_main), dynamic_ncols=True,
               desc=cfg.recipe)
    last: dict = {}
    eval_results: dict | None = None
    started = time.time()

    while step < cfg.steps:
        lr = lr_at(step, cfg)
        losses, tasks = _step(run, step, lr)
        step += 1
        micro_batches += cfg.grad_accum

        last = {"step": step, "loss": losses.get("total", float("nan")), "lr": lr, "task": "+".join(tasks),
                "losses": {k: v for k, v in losses.items() if k != "total"},
                "elapsed_s": round(time.time() - started, 3)}
        if step % cfg.log_every == 0 or step == cfg.steps:
            run.metrics.write(last)
        bar.update(1)
        bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{lr:.2e}")

        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
            eval_results = _evaluate(cfg, run.model, run.tokenizer, ctx, step, run.metrics)
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            _checkpoint(run, step, micro_batches, last, eval_results)
        if cfg.stop_after is not None and step >= cfg.stop_after and step < cfg.steps:
            bar.close()
            log.info("stopping at step %d (stop_after)", step)
            return run.ckpt_dir
    bar.close()
    if run.embeddings is not None:
        log.info("image embeddings: %d computed, %d reused", run.embeddings.computed, run.embeddings.reused)

    if cfg.eval_every:
        eval_results = _evaluate(cfg, run.model, run.tokenizer, ctx, step, run.metrics)
    return _save_final(run, step, last, eval_results)


@dataclass
class _Run:
    """What the loop works with, built by ``_setup``; ``step``/``micro_batches``: where it starts (resume)."""

    cfg: TrainConfig
    ctx: D.DistContext
    out: Path
    ckpt_dir: Path
    model: torch.nn.Module
    net: torch.nn.Module  # the model, or its DistributedDataParallel wrapper (forward passes go through it)
    tokenizer: Any
    base_version: str
    optimizer: torch.optim.Optimizer
    names: list[str]  # the trained parameters, in the optimizer's order
    batches: Iterator
    metrics: MetricsLog
    use_bf16: bool
    step: int
    micro_batches: int  # consumed per rank
    embeddings: Any = None  # an ImageEmbeddingCache (cfg.cache_image_embeddings), else None


def _setup(cfg: TrainConfig, ctx: D.DistContext) -> _Run:
    """Model, optimizer, resume from ``OUT/checkpoint-last``, the per-rank data stream, the DDP wrapper and
    the metrics log."""
    from ..data.mixture import MixtureDataset

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    out = Path(cfg.out_dir)
    ckpt_dir = out / CHECKPOINT_DIR
    device = ctx.device
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)

    model, tokenizer, base_version = build_model(cfg)
    if cfg.point_prompt_prob > 0 and not model.config.prompt.points:
        raise TrainingError(f"point_prompt_prob {cfg.point_prompt_prob} needs a model that reads point prompts; "
                            f"{cfg.init!r} has prompt.points false: grow it first with `python scripts/grow_model.py "
                            "SRC DST prompt.points=true`, or set point_prompt_prob 0")
    model.to(device).train()
    optimizer, names = make_optimizer(model, cfg)
    _seed_process(cfg.seed, ctx.rank)

    step = micro_batches = 0
    if cfg.resume and TrainingState.exists(ckpt_dir):
        step, micro_batches = _resume(ckpt_dir, cfg, model, optimizer, names, ctx)
        if ctx.is_main:
            log.info("resumed from %s at step %d", ckpt_dir, step)
    if step >= cfg.steps:
        log.info("%s is already at step %d of %d", ckpt_dir, step, cfg.steps)

    # target masks only when the mask decoder learns (a LoRA round leaves it frozen: its loss would move
    # nothing); point prompts are drawn inside the masks, so they need them loaded either way
    decoder = getattr(model, "mask_decoder", None)
    learns_masks = decoder is not None and any(p.requires_grad for p in decoder.parameters())
    sources = build_sources(cfg.data_dir, cfg.split, cfg.sources, cfg.max_prompts, cfg.augment_scale,
                            masks=learns_masks or cfg.point_prompt_prob > 0, preload_images=cfg.preload_images)
    mixture = MixtureDataset(sources, tokenizer, model.config, cfg.batch_size, seed=cfg.seed,
                             point_prompt_prob=cfg.point_prompt_prob, region_box_jitter=cfg.region_box_jitter,
                             region_box_jitter_scale=cfg.region_box_jitter_scale,
                             masks=learns_masks)
    loader = DataLoader(RankStream(mixture, micro_batches, ctx.rank, ctx.world_size), batch_size=None,
                        num_workers=cfg.num_workers, collate_fn=_identity)
    batches = iter(loader)

    embeddings = None
    if cfg.cache_image_embeddings:
        from .embedding_cache import ImageEmbeddingCache

        embeddings = ImageEmbeddingCache(model)
    net = model
    if ctx.enabled:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    return _Run(cfg=cfg, ctx=ctx, out=out, ckpt_dir=ckpt_dir, model=model, net=net, tokenizer=tokenizer,
                base_version=base_version, optimizer=optimizer, names=names, batches=batches,
                metrics=MetricsLog(out / cfg.log_file if ctx.is_main else None, step),
                use_bf16=cfg.bf16 and device.type == "cuda", step=step, micro_batches=micro_batches,
                embeddings=embeddings)


def _step(run: _Run, step: int, lr: float) -> tuple[dict[str, float], list[str]]:
    """One optimizer step (the ``step + 1``-th) at learning rate ``lr``: ``grad_accum`` micro-batches, each
    forward under autocast and backward (DDP syncs gradients on the last only), then clip and update.
    -> (the loss terms averaged over micro-batches and ranks, the source of each micro-batch)."""
    cfg, ctx, device = run.cfg, run.ctx, run.ctx.device
    for group in run.optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    totals: dict[str, float] = {}
    tasks = []
    for micro in range(cfg.grad_accum):
        batch = next(run.batches).to(device)
        tasks.append(batch.task)
        sync = micro == cfg.grad_accum - 1
        with (contextlib.nullcontext() if sync or not ctx.enabled else run.net.no_sync()), \
                torch.autocast(device.type, dtype=torch.bfloat16, enabled=run.use_bf16):
            embedding = run.embeddings(batch.pixel_values) if run.embeddings is not None else None
            output = run.net(batch, embedding=embedding)
            if output.loss is None:
                raise TrainingError(f"batch from source {batch.task!r} produced no loss; the data has no "
                                    "targets for any head")
            loss = output.loss / cfg.grad_accum
        if not torch.isfinite(loss):
            raise TrainingError(f"loss is {float(loss)} at step {step + 1} (source {batch.task}); lower the "
                                "learning rate or check the data")
        loss.backward()
        for k, v in output.losses.items():
            totals[k] = totals.get(k, 0.0) + v / cfg.grad_accum
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_([p for p in run.model.parameters() if p.requires_grad], cfg.grad_clip)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return D.mean_losses(ctx, totals), tasks


def _save_final(run: _Run, step: int, last: dict, eval_results: dict | None) -> Path:
    """Rank 0 writes ``OUT/final`` (with LoRA: the adapter in ``OUT/final/adapter``); -> that folder."""
    cfg, ctx, model = run.cfg, run.ctx, run.model
    final = run.out / FINAL_DIR
    if ctx.is_main:
        card = _model_card(cfg, model, ctx, step, last, eval_results, run.base_version)
        shutil.rmtree(final, ignore_errors=True)
        if cfg.lora_r > 0:
            _save_adapter(final / ADAPTER_SUBDIR, cfg, model, run.tokenizer)
            (final / "README.md").write_text(card)
        else:
            from ..checkpoint import save_pretrained

            save_pretrained(model, run.tokenizer, final, model_card=card,
                            extra_meta={"train_config": cfg.to_dict(), "step": step, "recipe": cfg.recipe,
                                        "eval": eval_results or {}})
    D.barrier(ctx)
    return final / ADAPTER_SUBDIR if cfg.lora_r > 0 else final


def _checkpoint(run: _Run, step: int, micro_batches: int, last: dict, eval_results: dict | None) -> None:
    """Every rank's RNG state is gathered; rank 0 writes ``OUT/checkpoint-last``; the others wait."""
    cfg, ctx = run.cfg, run.ctx
    rng = D.gather_objects(ctx, capture_rng())  # every rank takes part
    if ctx.is_main:
        state = TrainingState(step=step, optimizer=run.optimizer.state_dict(),
                              data=[{"seed": cfg.seed, "micro_batches": micro_batches}] * ctx.world_size,
                              rng=rng, param_names=run.names,
                              meta={"recipe": cfg.recipe, "world_size": ctx.world_size, "train_config": cfg.to_dict()})
        card = _model_card(cfg, run.model, ctx, step, last, eval_results, run.base_version)
        _save_checkpoint(run.ckpt_dir, cfg, run.model, run.tokenizer, card, state)
    D.barrier(ctx)


def _evaluate(cfg, model, tokenizer, ctx, step, metrics) -> dict | None:
    """Rank 0 evaluates the in-memory model on ``eval_split``; the others wait."""
    results = None
    if ctx.is_main:
        from ..data.formats import SyntheticDataset
        from ..evaluation.evaluate import evaluate
        from ..inference.predictor import Predictor

        if not SyntheticDataset.at(cfg.data_dir, cfg.eval_split).refcoco.exists() and "refer" in cfg.eval_tasks:
            log.warning("no %s split in %s: skipping evaluation", cfg.eval_split, cfg.data_dir)
        else:
            rng = capture_rng()  # evaluation must not shift the training random streams
            predictor = Predictor(model, tokenizer=tokenizer, model_version=f"{cfg.recipe}-step{step}",
                                  device=ctx.device, dtype=torch.float32)
            results = evaluate(predictor, cfg.data_dir, cfg.eval_split, tasks=cfg.eval_tasks, limit=cfg.eval_limit,
                               progress=False)
            restore_rng(rng)
            model.train()
            metrics.write({"step": step, "eval": results})
    D.barrier(ctx)
    return results
