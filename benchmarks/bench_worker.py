"""Worker benchmark: throughput and p50/p99 latency at 1/4/16/32 concurrent clients, batching on vs off.

Starts one worker (``python -m pixelllm_plugins.serving``) per mode as subprocesses on 127.0.0.1, warms them
up, then drives them from this process with asyncio clients in a closed loop (each client sends its next
request when the previous one is answered), alternating the modes round by round so that background load
affects both alike. Each level starts with an unmeasured run at its concurrency (first batches of a new
size load GPU kernels). Images are distinct (the Predictor's embedding cache does not
help), PNG-encoded once up front. Prints a Markdown table with the machine named.

    python benchmarks/bench_worker.py                       # tiny preset, refer, CPU
    python benchmarks/bench_worker.py --model CKPT --task caption --clients 1,8,32 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    desc = f"{cpu}, {os.cpu_count()} cores"
    try:
        import torch

        desc += f", torch {torch.__version__}"
        if torch.cuda.is_available():
            desc = f"{torch.cuda.get_device_name(0)} ({desc})"
    except ImportError:
        pass
    return desc


def make_images(n: int, size: tuple[int, int], seed: int = 0, fmt: str = "png") -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        w, h = size
        image = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
        draw = ImageDraw.Draw(image)
        for _ in range(3):
            x, y = rng.randrange(w - 20), rng.randrange(h - 20)
            box = (x, y, x + rng.randrange(10, w - x), y + rng.randrange(10, h - y))
            color = tuple(rng.randrange(256) for _ in range(3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=color)
        buf = io.BytesIO()
        image.save(buf, format="PNG") if fmt == "png" else image.save(buf, format="JPEG", quality=90)
        out.append(base64.b64encode(buf.getvalue()).decode("ascii"))
    return out


def body_for(task: str, image_b64: str, i: int, size) -> bytes:
    body: dict = {"image": {"b64": image_b64}}
    if task == "refer":
        body["text"] = ["the red circle", "the blue square", "the large shape on the left"][i % 3]
    elif task == "caption_regions":
        w, h = size
        body["boxes"] = [[w * 0.1, h * 0.1, w * 0.6, h * 0.7]]
    elif task == "caption":
        body["trace"] = True
    return json.dumps(body).encode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Worker:
    def __init__(self, args, batch_size: int):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "pixelllm_plugins.serving", "--host", "127.0.0.1", "--port", str(self.port),
               "--max-batch-size", str(batch_size), "--max-wait-ms", str(args.max_wait_ms),
               "--max-queue", "1024", "--timeout-s", "600"]
        cmd += ["--factory", args.factory] if args.factory else (["--model", args.model] if args.model else [])
        if args.device:
            cmd += ["--device", args.device]
        if args.torch_threads:
            cmd += ["--torch-threads", str(args.torch_threads)]
        if args.engine:
            cmd += ["--engine", args.engine]
        if args.fronts:
            cmd += ["--fronts", str(args.fronts)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
                   [str(ROOT), str(ROOT / "tests"), *filter(None, [os.environ.get("PYTHONPATH")])]),
               "PIXELLLM_WORKER_TOKEN": ""}
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 300
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"worker exited: {self.proc.stderr.read().decode()[-2000:]}")
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("worker did not become ready in 300 s")
            time.sleep(0.1)

    def batches(self, task: str) -> tuple[float, float]:
        """(model calls, images) so far for a task, from /metrics."""
        calls = images = 0.0
        for line in httpx.get(self.url + "/metrics", timeout=10).text.splitlines():
            if line.startswith(f'pixelllm_batch_size_count{{task="{task}"}}'):
                calls = float(line.rsplit(" ", 1)[1])
            elif line.startswith(f'pixelllm_batch_size_sum{{task="{task}"}}'):
                images = float(line.rsplit(" ", 1)[1])
        return calls, images

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class RawConnection:
    """A minimal keep-alive HTTP/1.1 client for loopback: it costs the load generator (which shares the
    machine's cores with the worker) far less CPU than a full HTTP client library."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        head = (f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        self.writer.write(head + body)
        header = await self.reader.readuntil(b"\r\n\r\n")
        lines = header.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        length = next(int(v) for k, _, v in (ln.partition(":") for ln in lines[1:])
                      if k.lower() == "content-length")
        payload = await self.reader.readexactly(length)
        if any(ln.lower().startswith("connection: close") for ln in lines):
            await self.close()
        return status, payload

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


async def drive(url: str, path: str, bodies: list[bytes], clients: int, total: int) -> dict:
    latencies: list[float] = []
    failures = 0
    counter = iter(range(total))
    host, port = url.removeprefix("http://").split(":")

    async def client():
        nonlocal failures
        conn = RawConnection(host, int(port))
        try:
            for i in counter:
                t0 = time.perf_counter()
                status, _ = await conn.post(path, bodies[i % len(bodies)])
                if status == 200:
                    latencies.append(time.perf_counter() - t0)
                else:
                    failures += 1
        finally:
            await conn.close()

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    wall = time.perf_counter() - start
    latencies.sort()
    q = statistics.quantiles(latencies, n=100, method="inclusive") if len(latencies) > 1 else latencies * 99
    return {"clients": clients, "requests": len(latencies), "failures": failures, "seconds": wall,
            "throughput": len(latencies) / wall, "p50_ms": 1000 * q[49], "p99_ms": 1000 * q[98],
            "latencies": latencies}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="checkpoint folder or preset (default: tiny)")
    p.add_argument("--factory", default=None, help="module:callable predictor instead of --model")
    p.add_argument("--device", default=None)
    p.add_argument("--task", default="refer", choices=["refer", "caption_regions", "caption", "dense_caption"])
    p.add_argument("--clients", default="1,4,16,32")
    p.add_argument("--rounds", type=int, default=3,
                   help="rounds per level; each round runs every mode once, alternating their order")
    p.add_argument("--requests", type=int, default=0,
                   help="requests per round (default: max(100, 8 x clients))")
    p.add_argument("--max-batch-size", type=int, default=32, help="batch size when batching is on")
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--modes", default="on,off", help="on = dynamic batching, off = max batch size 1")
    p.add_argument("--image-size", default="256x192")
    p.add_argument("--format", choices=["png", "jpeg"], default="png",
                   help="how the images are encoded (JPEG: quality 90, decoded at a reduced scale when larger "
                        "than twice the model's input)")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="torch CPU threads in the worker (default: one per core; 1 on a busy shared machine)")
    p.add_argument("--engine", choices=["process", "thread"], default=None,
                   help="where the worker runs its model (default: the worker's default, a child process)")
    p.add_argument("--fronts", type=int, default=None,
                   help="HTTP front processes over the one model process (default: the worker's, 1)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    size = tuple(int(v) for v in args.image_size.lower().split("x"))
    levels = [int(c) for c in args.clients.split(",")]
    modes = args.modes.split(",")
    images = make_images(256, size, fmt=args.format)
    bodies = [body_for(args.task, im, i, size) for i, im in enumerate(images)]
    path = f"/v1/{args.task}"
    # both workers stay up (an idle one costs nothing); modes alternate within each round so that changes
    # in background load hit both alike
    workers = {}
    try:
        for mode in modes:
            workers[mode] = Worker(args, args.max_batch_size if mode == "on" else 1)
            asyncio.run(drive(workers[mode].url, path, bodies[-16:], 4, 16))  # warm-up
        rows = []
        for clients in levels:
            n = args.requests or max(100, 8 * clients)
            acc = {m: {"latencies": [], "seconds": 0.0, "requests": 0, "failures": 0, "calls": 0.0,
                       "images": 0.0, "loads": []} for m in modes}
            for mode in modes:  # unmeasured: this concurrency's batch sizes run once before timing
                asyncio.run(drive(workers[mode].url, path, bodies, clients, 2 * clients))
            for r in range(args.rounds):
                for mode in (modes if r % 2 == 0 else modes[::-1]):
                    worker, a = workers[mode], acc[mode]
                    before = worker.batches(args.task)
                    out = asyncio.run(drive(worker.url, path, bodies, clients, n))
                    after = worker.batches(args.task)
                    a["latencies"] += out["latencies"]
                    a["seconds"] += out["seconds"]
                    a["requests"] += out["requests"]
                    a["failures"] += out["failures"]
                    a["calls"] += after[0] - before[0]
                    a["images"] += after[1] - before[1]
                    a["loads"].append(os.getloadavg()[0])
            for mode in modes:
                a = acc[mode]
                lat = sorted(a["latencies"])
                q = statistics.quantiles(lat, n=100, method="inclusive")
                row = {"clients": clients, "mode": mode, "requests": a["requests"], "failures": a["failures"],
                       "throughput": a["requests"] / a["seconds"], "p50_ms": 1000 * q[49], "p99_ms": 1000 * q[98],
                       "mean_batch": a["images"] / a["calls"] if a["calls"] else 0.0,
                       "load_avg": statistics.mean(a["loads"])}
                rows.append(row)
                print(f"batching {mode:3} clients {clients:3}: {row['throughput']:7.1f} req/s  "
                      f"p50 {row['p50_ms']:7.1f} ms  p99 {row['p99_ms']:7.1f} ms  "
                      f"mean batch {row['mean_batch']:.1f}  ({row['requests']} ok, {row['failures']} failed, "
                      f"load avg {row['load_avg']:.1f})", flush=True)
    finally:
        for worker in workers.values():
            worker.stop()
    desc = machine()
    model = args.factory or args.model
    loads = [r["load_avg"] for r in rows]
    print(f"\nWorker benchmark: task {args.task}, model {model}, images {args.image_size} {args.format.upper()}, "
          f"max batch {args.max_batch_size}, max wait {args.max_wait_ms:g} ms, "
          f"torch threads {args.torch_threads or 'default'}, engine {args.engine or 'default (process)'}, fronts {args.fronts or 1}, {args.rounds} alternating rounds per level; "
          f"machine: {desc}; 1-min load average during the run {min(loads):.1f}-{max(loads):.1f}\n")
    print("| clients | batching | req/s | p50 ms | p99 ms | p99/p50 | mean batch | throughput vs off |")
    print("|---|---|---|---|---|---|---|---|")
    off = {r["clients"]: r["throughput"] for r in rows if r["mode"] == "off"}
    for r in sorted(rows, key=lambda r: (r["clients"], r["mode"] != "on")):
        speed = f"{r['throughput'] / off[r['clients']]:.1f}x" if r["mode"] == "on" and off.get(r["clients"]) else ""
        print(f"| {r['clients']} | {r['mode']} | {r['throughput']:.1f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | "
              f"{r['p99_ms'] / r['p50_ms']:.1f} | {r['mean_batch']:.1f} | {speed} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": desc, "task": args.task, "model": model,
                                               "args": vars(args), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
