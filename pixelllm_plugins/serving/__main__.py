"""``python -m pixelllm_plugins.serving``: the worker without the CLI (tests, benchmarks, containers).

Same as ``pixelllm serve``, plus the batching knobs and ``--factory module:callable``.
"""

from __future__ import annotations

import argparse
import logging


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m pixelllm_plugins.serving", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model", default=None, help="checkpoint folder or preset (default: the embedded model)")
    p.add_argument("--factory", default=None, help="module:callable returning a predictor (instead of --model)")
    p.add_argument("--device", default=None)
    p.add_argument("--max-batch-size", type=int, default=None, help="1 turns batching off")
    p.add_argument("--max-wait-ms", type=float, default=None)
    p.add_argument("--max-queue", type=int, default=None)
    p.add_argument("--timeout-s", type=float, default=None, dest="request_timeout_s")
    p.add_argument("--torch-threads", type=int, default=None, help="torch CPU threads (default: one per core)")
    p.add_argument("--warmup", choices=["auto", "on", "off"], default=None,
                   help="run each batch size once before ready (auto: on CUDA only)")
    p.add_argument("--engine", choices=["process", "thread"], default=None,
                   help="run the model in a child process (default) or on a thread of this process")
    p.add_argument("--fronts", type=int, default=None,
                   help="HTTP front processes sharing the one model process (default 1)")
    p.add_argument("--log-level", default="warning")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    from .run import run

    run(args.host, args.port, model=args.model, factory=args.factory, log_level=args.log_level,
        device=args.device, max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue, request_timeout_s=args.request_timeout_s,
        torch_threads=args.torch_threads, warmup=args.warmup, engine=args.engine, fronts=args.fronts)


if __name__ == "__main__":
    main()
