"""The real GPU worker on a free loopback port, for FiftyOne's remote-mode tests."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_worker(checkpoint: Path, log_dir: Path, env: dict, poll) -> Iterator[str]:
    """``python -m pixelllm_plugins.serving`` with ``checkpoint`` on CPU; yields its URL once ``/ready``."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = log_dir / "worker.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "pixelllm_plugins.serving", "--host", "127.0.0.1",
                                 "--port", str(port), "--model", str(checkpoint), "--device", "cpu"],
                                env=env, stdout=log, stderr=subprocess.STDOUT)

    def ready():
        if proc.poll() is not None:
            raise AssertionError(f"worker exited: {log_path.read_text()[-3000:]}")
        try:
            return httpx.get(f"{url}/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        poll(ready, 180, "the worker to be ready")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
