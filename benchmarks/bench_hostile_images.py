"""Hostile-image benchmark: /health latency and the worker's resident memory while tiny PNGs of huge
canvases decode.

Starts one worker (``python -m pixelllm_plugins.serving``) as a subprocess on 127.0.0.1, warms it with a
few normal requests, then sends groups of hostile images all at once: 16-bit RGBA 8000x8000 PNGs (about
500 KB, 488 MiB to decode) and 1-bit 8000x8000 PNGs (8 KB, 305 MiB to decode). While a group decodes, one
client polls ``/health`` back to back and this process samples the worker's VmRSS. Per group it prints the
answers' statuses, the group's wall time, /health latency (max, p99, p50) against the idle worker's, and
the worker's RSS warm / peak / after the group.

    python benchmarks/bench_hostile_images.py                              # tiny preset, the worker's defaults
    python benchmarks/bench_hostile_images.py --images 8 --budget 512MiB --json out.json
    python benchmarks/bench_hostile_images.py --inline-decode-pixels 1000000000   # decide by file size only
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
MIB = 1024 * 1024

sys.path.insert(0, str(ROOT / "tests"))  # the hostile images the tests send
from bench_worker import machine  # noqa: E402  (this folder is on sys.path when run as a script)
from hostile_images import noise_png, png_1bit, png_16bit_rgba, rss_bytes  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_bytes(text: str) -> int:
    units = {"kib": 1024, "mib": MIB, "gib": 1024 * MIB, "kb": 1000, "mb": 10**6, "gb": 10**9, "b": 1}
    low = text.strip().lower()
    for unit, factor in units.items():
        if low.endswith(unit):
            return int(float(low[: -len(unit)]) * factor)
    return int(low)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


class Worker:
    def __init__(self, args, env: dict):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "pixelllm_plugins.serving", "--host", "127.0.0.1", "--port", str(self.port),
               "--model", args.model, "--device", args.device, "--torch-threads", "1", "--log-level", "warning"]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **env, "TOKENIZERS_PARALLELISM": "false"})
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"worker exited with {self.proc.returncode}")
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise SystemExit("worker not ready after 180 s")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def health_latencies(url: str, stop: threading.Event, out: list[float], pid: int, peak: list[int],
                     n: int | None = None) -> None:
    with httpx.Client(base_url=url, timeout=120) as probe:
        while not stop.is_set() and (n is None or len(out) < n):
            t = time.perf_counter()
            probe.get("/health").raise_for_status()
            out.append(time.perf_counter() - t)
            peak[0] = max(peak[0], rss_bytes(pid))


def send_all(url: str, images: list[bytes]) -> list[int]:
    def one(data: bytes) -> int:
        r = httpx.post(url + "/v1/refer", json={"image": {"b64": base64.b64encode(data).decode()},
                                                "text": "the red circle"}, timeout=600)
        return r.status_code

    with concurrent.futures.ThreadPoolExecutor(len(images)) as pool:
        return list(pool.map(one, images))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--images", type=int, default=8, help="hostile images per group (sent at once)")
    p.add_argument("--size", type=int, default=8000, help="canvas side of the hostile PNGs")
    p.add_argument("--budget", default=None, help="PIXELLLM_WORKER_DECODE_BUDGET_BYTES (e.g. 512MiB)")
    p.add_argument("--inline-decode-pixels", type=int, default=None,
                   help="PIXELLLM_WORKER_INLINE_DECODE_PIXELS (a huge value: decide by file size only)")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)

    env = {"PIXELLLM_WORKER_TIMEOUT_S": "600"}
    if args.budget:
        env["PIXELLLM_WORKER_DECODE_BUDGET_BYTES"] = str(parse_bytes(args.budget))
    if args.inline_decode_pixels is not None:
        env["PIXELLLM_WORKER_INLINE_DECODE_PIXELS"] = str(args.inline_decode_pixels)
    groups = {
        f"16-bit RGBA {args.size}x{args.size}": png_16bit_rgba(args.size, args.size),
        f"1-bit {args.size}x{args.size}": png_1bit(args.size, args.size),
    }
    normal = [noise_png(320, 240, seed) for seed in range(4)]
    print(f"machine: {machine()}; settings: {env}")
    worker = Worker(args, env)
    results: dict = {"machine": machine(), "settings": env, "groups": {}}
    try:
        for _ in range(3):
            send_all(worker.url, normal)
        idle: list[float] = []
        health_latencies(worker.url, threading.Event(), idle, worker.proc.pid, [0], n=200)
        results["health_idle_ms"] = {"p50": 1000 * statistics.median(idle), "p99": 1000 * pct(idle, 0.99),
                                     "max": 1000 * max(idle)}
        for name, data in groups.items():
            warm = rss_bytes(worker.proc.pid)
            stop, lat, peak = threading.Event(), [], [warm]
            poller = threading.Thread(target=health_latencies, args=(worker.url, stop, lat, worker.proc.pid, peak))
            poller.start()
            t = time.perf_counter()
            statuses = send_all(worker.url, [data] * args.images)
            wall = time.perf_counter() - t
            stop.set()
            poller.join()
            after = rss_bytes(worker.proc.pid)
            row = {"file_bytes": len(data), "statuses": statuses, "wall_s": wall,
                   "health_ms": {"n": len(lat), "p50": 1000 * statistics.median(lat), "p99": 1000 * pct(lat, 0.99),
                                 "max": 1000 * max(lat)},
                   "rss_mib": {"warm": warm / MIB, "peak": peak[0] / MIB, "after": after / MIB}}
            results["groups"][name] = row
            send_all(worker.url, normal)  # the worker still serves
    finally:
        worker.stop()

    idle_ms = results["health_idle_ms"]
    print(f"/health idle: p50 {idle_ms['p50']:.1f} ms, p99 {idle_ms['p99']:.1f} ms, max {idle_ms['max']:.1f} ms")
    print("| group | images | file | statuses | wall s | /health n | p50 ms | p99 ms | max ms | RSS warm / peak / "
          "after MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, row in results["groups"].items():
        h, m = row["health_ms"], row["rss_mib"]
        codes = ", ".join(f"{c}×{row['statuses'].count(c)}" for c in sorted(set(row["statuses"])))
        print(f"| {name} | {args.images} | {row['file_bytes'] / 1024:,.1f} KB | {codes} | {row['wall_s']:.1f} | "
              f"{h['n']} | {h['p50']:.1f} | {h['p99']:.1f} | {h['max']:.1f} | "
              f"{m['warm']:.0f} / {m['peak']:.0f} / {m['after']:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
