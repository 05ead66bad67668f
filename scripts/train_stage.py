"""One stage of the paper's training chain on public data (trace, ref or densecap).

The chain (PixelLLM, arXiv 2312.09237): a starting checkpoint is trained on Localized Narratives and COCO
captions (``trace``); the result is then trained once for referring localization (``ref``) and, separately,
for dense captioning on Visual Genome (``densecap``). Both start from ``RUNS/trace/final``.

    python scripts/train_stage.py trace --data data/public --runs runs/public      # one process
    python scripts/train_stage.py ref --data data/public --runs runs/public
    torchrun --standalone --nproc_per_node=8 scripts/train_stage.py densecap --data data/public

The global batch stays the paper's whatever the number of processes: ``grad_accum = global batch /
(micro-batch x processes)``. ``--scale 0.0002 --micro 8 --workers 0`` runs the whole chain in minutes on a
small synthetic folder (a dry run before renting GPUs). Re-running a command resumes from
``RUNS/STAGE/checkpoint-last``; the result is ``RUNS/STAGE/final``.
"""

from __future__ import annotations

import argparse
import os
import sys

# The paper's hyper-parameters per stage; ``global_batch`` is split into ``micro`` x processes x grad_accum.
STAGES = {
    "trace": dict(sources={"trace": 2.0, "caption": 1.0}, max_prompts={"trace": 1, "caption": 1},
                  steps=10_000, global_batch=256, micro=32, lr=5e-5, warmup_steps=250, weight_decay=0.0),
    "ref": dict(sources={"refer": 1.0}, max_prompts={"refer": 16},
                steps=120_000, global_batch=64, micro=16, lr=5e-5, warmup_steps=1_000, weight_decay=0.0,
                eval_every=2_500, eval_split="refcoco-val", eval_tasks=("refer",), eval_limit=None),
    # the paper's VG augmentation: resize the longer side to 0.1-2.0 x the canvas (built-in default 0.5-1.5)
    "densecap": dict(sources={"region": 1.0}, max_prompts={"region": 100}, augment_scale={"region": [0.1, 2.0]},
                     steps=40_000, global_batch=64, micro=4, lr=1e-4, warmup_steps=1_000, weight_decay=0.05),
}


def stage_config(stage: str, *, data: str, runs: str, init: str | None = None, scale: float = 1.0,
                 micro: int | None = None, workers: int = 8, world: int = 1):
    """The ``TrainConfig`` of one stage; ``scale`` shortens the step counts (a dry run)."""
    from pixelllm_plugins.training.trainer import TrainConfig

    values = dict(STAGES[stage])
    values["init"] = (init or f"{runs}/init") if stage == "trace" else (init or f"{runs}/trace/final")
    global_batch, default_micro = values.pop("global_batch"), values.pop("micro")
    micro = min(default_micro, micro or default_micro)
    for key in ("steps", "warmup_steps", "eval_every"):
        if key in values:
            values[key] = max(1, int(values[key] * scale))
    if global_batch % (micro * world):
        raise ValueError(f"global batch {global_batch} is not a multiple of micro-batch {micro} x {world} "
                         "processes; choose another --micro")
    return TrainConfig(recipe=f"public-{stage}", data_dir=data, split="train", out_dir=f"{runs}/{stage}",
                       batch_size=micro, grad_accum=global_batch // (micro * world), min_lr_ratio=0.0,
                       grad_clip=0.0, seed=0, checkpoint_every=1_000, num_workers=workers, **values)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=sorted(STAGES), help="which stage to train")
    p.add_argument("--data", default="data/public", help="data folder (default: %(default)s)")
    p.add_argument("--runs", default="runs/public",
                   help="output root; the stage writes RUNS/STAGE (default: %(default)s)")
    p.add_argument("--init", default=None,
                   help="starting checkpoint (default: RUNS/init for trace, RUNS/trace/final for ref and densecap)")
    p.add_argument("--scale", type=float, default=1.0,
                   help="multiply the step counts by this (e.g. 0.0002 for a dry run; default 1)")
    p.add_argument("--micro", type=int, default=None,
                   help="images per micro-batch per process, at most the stage's default (trace 32, ref 16, "
                        "densecap 4); lower it when a step runs out of memory")
    p.add_argument("--workers", type=int, default=8, help="data-loader processes per process (default: 8)")
    p.add_argument("--dry-run", action="store_true", help="print the training config and stop")
    args = p.parse_args(argv)
    if args.scale <= 0:
        p.error("--scale must be above 0")
    if args.micro is not None and args.micro < 1:
        p.error("--micro must be at least 1")
    world = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun
    try:
        config = stage_config(args.stage, data=args.data, runs=args.runs, init=args.init, scale=args.scale,
                              micro=args.micro, workers=args.workers, world=world)
    except ValueError as exc:
        p.error(str(exc))
    if args.dry_run:
        print(config)
        return 0
    from pixelllm_plugins.errors import PixelLLMError
    from pixelllm_plugins.training.trainer import train

    try:
        train(config)
    except PixelLLMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
