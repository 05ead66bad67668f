"""Helpers for the worker tests: images, gated fakes, an in-thread uvicorn server, a worker subprocess.

No sleeps as synchronisation: everything waits on events or polls a condition against a deadline.
"""

from __future__ import annotations

import base64
import contextlib
import http.server
import importlib.util
import io
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx
from fakes import FakePredictor
from PIL import Image, ImageDraw
from polling import wait_until  # noqa: F401  (re-exported for the serving tests)

ROOT = Path(__file__).resolve().parents[2]


def png_bytes(w: int = 64, h: int = 48, seed: int = 0) -> bytes:
    image = Image.new("RGB", (w, h), (128, 128, 128))
    draw = ImageDraw.Draw(image)
    draw.ellipse((w * 0.1, h * 0.2, w * 0.4, h * 0.6), fill=(200, 30 + seed % 200, 30))
    draw.rectangle((w * 0.55, h * 0.3, w * 0.9, h * 0.8), fill=(30, 30, 220))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def image_field(w: int = 64, h: int = 48, seed: int = 0) -> dict:
    return {"b64": b64(png_bytes(w, h, seed))}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GateFake(FakePredictor):
    """A FakePredictor whose calls block until ``gate`` is set: lets a test pile requests up first."""

    def __init__(self):
        super().__init__()
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.batches: list[tuple[str, int, str | None]] = []  # (task, images, adapter)

    def _wait(self, task, n, adapter):
        self.batches.append((task, n, adapter))
        self.entered.set()
        if not self.gate.wait(30):
            raise RuntimeError("GateFake: gate never opened")

    def refer(self, images, texts, *, adapter=None):
        self._wait("refer", len(images), adapter)
        return super().refer(images, texts, adapter=adapter)

    def caption(self, images, *, trace=True, adapter=None, max_new_tokens=40, num_beams=1, from_regions=None):
        self._wait("caption", len(images), adapter)
        return super().caption(images, trace=trace, adapter=adapter)

    def caption_regions(self, images, boxes, *, adapter=None, max_new_tokens=20, num_beams=1):
        self._wait("caption_regions", len(images), adapter)
        return super().caption_regions(images, boxes, adapter=adapter)


class AdapterFake(FakePredictor):
    """A FakePredictor that loads and unloads named adapters (records every call)."""

    def __init__(self):
        super().__init__()
        self.adapter_log: list[tuple[str, str]] = []
        self.active: set[str] = set()

    def load_adapter(self, path, name=None):
        name = name or Path(path).name
        self.adapter_log.append(("load", name))
        self.active.add(name)
        return name

    def unload_adapter(self, name):
        self.adapter_log.append(("unload", name))
        self.active.discard(name)

    def refer(self, images, texts, *, adapter=None):
        if adapter is not None and adapter not in self.active:
            raise RuntimeError(f"adapter {adapter} used while not loaded")
        self.calls.append(("adapter", adapter))
        return super().refer(images, texts, adapter=adapter)


class ThreadedServer:
    """uvicorn serving an app on 127.0.0.1 in a background thread (real sockets, real concurrency)."""

    def __init__(self, app, port: int | None = None):
        import uvicorn

        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ThreadedServer:
        self.thread.start()
        wait_until(lambda: self.server.started, 20, what="uvicorn to start")
        wait_until(lambda: _ready(self.url), 20, what="the model to be ready")
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(15)


def _ready(url: str) -> bool:
    try:
        return httpx.get(url + "/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def tiny_available() -> bool:
    """The real Predictor('tiny') can be built (the core's predictor and checkpoint modules exist)."""
    return all(importlib.util.find_spec(m) is not None
               for m in ("pixelllm_plugins.inference.predictor", "pixelllm_plugins.checkpoint"))


def stop_process(proc: subprocess.Popen | None, timeout: float = 15) -> None:
    """Terminate a subprocess if it still runs (kill it when it ignores SIGTERM) and reap it."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


class WorkerProcess:
    """``python -m pixelllm_plugins.serving`` as a subprocess on 127.0.0.1 (can be killed and restarted)."""

    def __init__(self, *args: str, port: int | None = None, env: dict | None = None, log_path=None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = list(args)
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests" / "serving"),
                                                                 str(ROOT / "tests"), str(ROOT)]),
                    "TOKENIZERS_PARALLELISM": "false", **(env or {})}
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120.0) -> WorkerProcess:
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pixelllm_plugins.serving", "--host", "127.0.0.1", "--port", str(self.port),
             *self.args], env=self.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)

        def up():
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited with {self.proc.returncode}; log: {self.log_path}")
            return _ready(self.url)

        wait_until(up, timeout, "the worker subprocess to be ready")
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(15)

    def stop(self) -> None:
        stop_process(self.proc)

    def __enter__(self) -> WorkerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# ---- a loopback image host for URL images --------------------------------------------------------------

def _image_host_handler(routes: dict):
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            status, body = routes.get(self.path, (404, b"no"))
            if status in (301, 302, 303, 307, 308):
                self.send_response(status)
                self.send_header("Location", body)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    return Handler


@contextlib.contextmanager
def image_host(routes: dict):
    """Serve ``routes`` (path -> (status, body), or (302, location) for a redirect) on 127.0.0.1; yields
    "127.0.0.1:PORT"."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _image_host_handler(routes))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
