"""Helpers for the Label Studio backend tests: generated images, a loopback HTTP server with scripted
routes, a fake trainer, and polling with deadlines (no sleeps as synchronisation)."""

from __future__ import annotations

import io
import json
import struct
import threading
import time
import zlib
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from PIL import Image, ImageDraw


def png_bytes(size=(64, 48), color=(200, 30, 30), box=None) -> bytes:
    image = Image.new("RGB", size, (128, 128, 128))
    if box is not None:
        ImageDraw.Draw(image).rectangle(box, fill=color)
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def huge_png_header(width=30000, height=30000) -> bytes:
    """A valid PNG signature + IHDR claiming ``width x height`` pixels, with a tiny (bogus) IDAT."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + \
        chunk(b"IEND", b"")


def wait_for(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.05):
    """Poll ``predicate`` until it returns a truthy value or the deadline passes."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)  # polling interval, not synchronisation: the deadline bounds the wait
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what} (last: {last!r})")


class Route:
    def __init__(self, status=200, body: bytes | dict | list = b"", headers=None, chunks=None, delay_s=0.0):
        self.status, self.body, self.headers, self.chunks, self.delay_s = status, body, headers or {}, chunks, delay_s


class ScriptedServer:
    """A loopback HTTP server: ``routes[path] = Route(...)`` or a callable(handler) -> Route.
    Records every request (method, path, headers, body)."""

    def __init__(self):
        self.routes: dict[str, Route | Callable] = {}
        self.requests: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _serve(self):
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                server.requests.append({"method": self.command, "path": self.path,
                                        "headers": {k.lower(): v for k, v in self.headers.items()}, "body": body})
                route = server.routes.get(self.path) or server.routes.get(self.path.split("?")[0])
                if callable(route):
                    route = route(self, body)
                if route is None:
                    route = Route(404, b"not found")
                payload = route.body
                if isinstance(payload, (dict, list)):
                    payload = json.dumps(payload).encode()
                    route.headers.setdefault("Content-Type", "application/json")
                self.send_response(route.status)
                for k, v in route.headers.items():
                    self.send_header(k, v)
                if route.chunks is None:
                    self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                try:
                    if route.chunks is not None:
                        for c in route.chunks:
                            if route.delay_s:
                                time.sleep(route.delay_s)  # simulates a slow peer
                            self.wfile.write(c)
                            self.wfile.flush()
                    else:
                        self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            do_GET = do_POST = do_PATCH = _serve

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


class FakeTrainer:
    """Stands in for ``finetune``: records calls, writes a peft-looking adapter folder, can fail or block."""

    def __init__(self, fail: Exception | None = None):
        self.calls: list[dict] = []
        self.fail = fail
        self.gate: threading.Event | None = None

    def __call__(self, *, from_model, data_dir, out_adapter, steps, **kwargs):
        data_dir, out_adapter = Path(data_dir), Path(out_adapter)
        def read(name):
            path = data_dir / name
            return json.loads(path.read_text()) if path.is_file() else None

        self.calls.append({"from_model": from_model, "data_dir": data_dir, "out_adapter": out_adapter,
                           "steps": steps, "refcoco": read("refcoco_train.json"), "vg": read("vg_train.json"),
                           **kwargs})
        if self.gate is not None:
            assert self.gate.wait(30), "test never opened the trainer gate"
        if self.fail is not None:
            raise self.fail
        out_adapter.mkdir(parents=True, exist_ok=True)
        (out_adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))


class LoraStandInTrainer(FakeTrainer):
    """Writes a real (untrained) LoRA adapter for ``from_model`` so a real ``Predictor`` can load it: used
    by the end-to-end test while ``pixelllm_plugins.training.finetune`` does not exist."""

    def __call__(self, *, from_model, data_dir, out_adapter, steps, **kwargs):
        super().__call__(from_model=from_model, data_dir=data_dir, out_adapter=out_adapter, steps=steps, **kwargs)
        from pixelllm_plugins.checkpoint import load_pretrained
        from pixelllm_plugins.modeling import lora

        model, _tokenizer, _version = load_pretrained(str(from_model))
        name = kwargs.get("adapter_name") or Path(out_adapter).name
        lora.add_lora(model, name)
        lora.save_adapter(model, out_adapter, name)
