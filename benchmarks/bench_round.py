"""Wall time of one gated correction round (``run_correction_round``), as Label Studio and FiftyOne run it.

    python benchmarks/bench_round.py --n 32 --threads 2                 # the round as shipped
    python benchmarks/bench_round.py --n 32 --threads 2 --plain         # without the round's speed settings

N synthetic scenes of a shape the embedded model never saw ("pentagon") are the corrections; the replay
scenes are rendered into ``--work`` before the clock starts (a server renders them once); the round then
trains, scales the adapter, settles its new words and runs the gate. ``--plain`` turns off what makes the round fast (fixed scale and
reused image embeddings, images decoded once, at most 3 texts per image, 7.5 steps per correction) to
measure what they save; the frozen mask decoder's loss is skipped either way. Prints one JSON line:
total seconds, training seconds (from the run's metrics) and the gate's verdict.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLAIN = {"augment_scale": {}, "cache_image_embeddings": False, "max_prompts": {}, "preload_images": False}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=32, help="corrections")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--plain", action="store_true", help="without the round's speed settings")
    p.add_argument("--shape", default="pentagon")
    p.add_argument("--work", type=Path, default=ROOT / "artifacts" / "bench_round")
    args = p.parse_args(argv)

    import torch

    sys.path.insert(0, str(ROOT / "scripts"))
    from learning_curve import write_concept

    from pixelllm_plugins.checkpoint import DEFAULT_MODEL_DIR
    from pixelllm_plugins.data.formats import concept_scenes
    from pixelllm_plugins.training.corrections import (
        DEFAULT_REPLAY_IMAGES,
        DEFAULT_REPLAY_LOOK,
        RETENTION_IMAGES,
        replay_cache,
        run_correction_round,
        split_holdout,
    )

    torch.set_num_threads(args.threads)
    corrections = write_concept(concept_scenes(args.shape, args.n, 500_000, "varied")[:args.n],
                                args.work / f"corrections-{args.n}", "train", with_vg=True)
    extra = dict(PLAIN) if args.plain else {}
    if args.plain:  # the former plan: 10 steps per correction
        train_names = split_holdout([f"{i:06d}.png" for i in range(1, args.n + 1)])[0]
        extra["steps"] = int(min(400, max(60, 10 * len(train_names))))
    replay_cache(args.work / "replay", DEFAULT_REPLAY_IMAGES + RETENTION_IMAGES, DEFAULT_REPLAY_LOOK)
    run = args.work / ("plain" if args.plain else "round")
    shutil.rmtree(run, ignore_errors=True)
    started = time.time()
    result = run_correction_round(DEFAULT_MODEL_DIR, corrections, run / "adapter", replay_dir=args.work / "replay",
                                  work_dir=run / "work", progress=False, **extra)
    seconds = time.time() - started
    metrics = [json.loads(line) for line in (run / "work" / "run" / "metrics.jsonl").read_text().splitlines()]
    training = max(m.get("elapsed_s", 0.0) for m in metrics)
    print(json.dumps({"n": args.n, "plain": args.plain, "threads": torch.get_num_threads(),
                      "steps": result.plan.steps,
                      "seconds": round(seconds, 1), "training_s": round(training, 1), "gate": result.summary()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
