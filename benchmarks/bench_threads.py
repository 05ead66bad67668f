"""`refer` latency by calling thread: one model thread against the caller's own threads.

    python benchmarks/bench_threads.py --images 14

On CPU, torch runs its kernels on GNU OpenMP thread pools, one per thread that calls them, and idle pool
threads sleep instead of spinning once a process holds more of them than cores. A server that runs the
model on whichever request thread it is given pays for that on every kernel. This times `refer` on one
image at a time (distinct images, so no embedding is reused) from the main thread and then from three other
threads, once with the predictor ``get_predictor`` gives the plugins (its model on one thread of its own,
``inference/model_thread.py``) and once with a plain ``Predictor`` called on each caller's thread. Each
variant runs in its own process. Prints one JSON line per variant: the median ms per call for each caller.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time


def measure(own_thread: bool, images: int, model: str | None) -> dict:
    from pixelllm_plugins.data.synthetic import SceneConfig, generate_scene, render_scene
    from pixelllm_plugins.predictors import get_predictor

    sets = [[render_scene(generate_scene(1000 * s + k, SceneConfig.preset("varied"))) for k in range(images)]
            for s in range(4)]
    predictor = get_predictor(model, device="cpu", own_thread=own_thread)
    out: dict = {"own_thread": own_thread, "median_ms": {}}

    def timed(name: str, batch: list) -> None:
        times = []
        for image in batch:
            started = time.perf_counter()
            predictor.refer([image], [["the red circle"]])
            times.append(time.perf_counter() - started)
        out["median_ms"][name] = round(1000 * statistics.median(times[2:]), 1)  # the first two warm up

    timed("main thread", sets[0])
    for k in range(3):
        thread = threading.Thread(target=timed, args=(f"thread {k + 1}", sets[k + 1]))
        thread.start()
        thread.join()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=14, help="images per caller (distinct scenes)")
    p.add_argument("--model", default=None, help="checkpoint folder (default: the embedded model)")
    p.add_argument("--variant", choices=("own", "plain"), default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.variant:
        print(json.dumps(measure(args.variant == "own", args.images, args.model)), flush=True)
        return 0
    for variant in ("own", "plain"):  # each in a fresh process: the pools of one must not slow the other
        cmd = [sys.executable, __file__, "--variant", variant, "--images", str(args.images)]
        subprocess.run(cmd + (["--model", args.model] if args.model else []), check=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
