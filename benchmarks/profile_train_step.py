"""Profile training steps of a recipe: where a step's time goes, and how many kernels it launches.

    python benchmarks/profile_train_step.py --data DATA                          # synth-small-gpu, auto device
    python benchmarks/profile_train_step.py --data DATA --batch-size 192 --device cuda --out profile.txt

Builds the recipe's model and data stream as ``pixelllm train`` does (random weights: speed does not
depend on them), runs warm-up steps, then profiles ``--steps`` full steps (forward, backward, optimizer)
and prints the wall time per step and the top operators by self time.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from pixelllm_plugins.data.mixture import MixtureDataset
from pixelllm_plugins.training.recipes import recipe_config
from pixelllm_plugins.training.trainer import build_model, build_sources, make_optimizer


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="synth-small-gpu")
    p.add_argument("--data", required=True)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when present)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=5, help="profiled steps (at least 1)")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--out", default=None, help="also write the report here")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error("--steps must be at least 1")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg = recipe_config(args.recipe, data_dir=args.data, batch_size=args.batch_size)
    model, tokenizer, _ = build_model(cfg)
    model.to(device).train()
    optimizer, _ = make_optimizer(model, cfg)
    stream = iter(MixtureDataset(build_sources(cfg.data_dir, cfg.split, cfg.sources, cfg.max_prompts),
                                 tokenizer, model.config, cfg.batch_size, seed=cfg.seed))
    batches = [next(stream) for _ in range(args.warmup + args.steps)]
    bf16 = device.type == "cuda" and cfg.bf16

    def step(batch) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(batch.to(device)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for batch in batches[: args.warmup]:
        step(batch)
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        for batch in batches[args.warmup:]:
            step(batch)
        sync()
    per_step = (time.perf_counter() - start) / args.steps
    events = prof.key_averages()
    aten = sum(e.count for e in events if e.key.startswith("aten::")) / args.steps
    kernels = sum(e.count for e in events if getattr(e, "device_type", None) is not None
                  and "CUDA" in str(e.device_type)) / args.steps
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    report = (f"recipe {cfg.recipe}, batch {cfg.batch_size}, device {device} "
              f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), torch {torch.__version__}\n"
              f"{per_step * 1000:.1f} ms per step under the profiler (tasks: "
              f"{', '.join(b.task for b in batches[args.warmup:])}); {aten:.0f} aten calls per step"
              + (f"; {kernels:.0f} GPU kernels per step" if device.type == "cuda" else "") + "\n\n"
              + events.table(sort_by=sort, row_limit=args.top))
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
