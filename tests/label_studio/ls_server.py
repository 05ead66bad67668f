"""Session fixtures for the end-to-end tests: a real Label Studio 1.23.2 on 127.0.0.1 (from the virtualenv
that ``scripts/ensure_label_studio.sh`` builds once per CI run and reuses) and the backend under test
served by uvicorn in a thread on 127.0.0.1.

Development shortcut: ``PIXELLLM_TEST_LS_URL`` / ``PIXELLLM_TEST_LS_TOKEN`` / ``PIXELLLM_TEST_LS_FILES`` reuse
an already running Label Studio (started with the same environment as below).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
ENSURE = ROOT / "scripts" / "ensure_label_studio.sh"
TOKEN = "0123456789abcdef0123456789abcdef01234567"
USER, PASSWORD = "admin@example.com", "e2e-password-123"
ARTIFACTS = ROOT / "artifacts" / "label_studio"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def poll(predicate, timeout: float, what: str, interval: float = 0.25):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except Exception as exc:  # noqa: BLE001 - keep polling until the deadline
            last = exc
        if last and not isinstance(last, Exception):
            return last
        time.sleep(interval)  # polling interval; the deadline bounds the wait
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what} (last: {last!r})")


@dataclass
class LabelStudio:
    url: str
    token: str
    files_root: Path
    venv: Path | None
    log_path: Path | None
    startup_s: float = 0.0
    user: str = USER
    password: str = PASSWORD

    @property
    def python(self) -> str:
        return str(self.venv / "bin" / "python") if self.venv else sys.executable

    def api(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Token {self.token}"}, timeout=60)


TIMINGS: dict[str, float] = {}


@pytest.fixture(scope="session")
def ls_venv() -> Path:
    """The Label Studio virtualenv (built once, reused). Skips only if it cannot be built."""
    if os.environ.get("PIXELLLM_TEST_LS_URL"):
        return Path(os.environ.get("LS_VENV", ROOT / ".ci-cache" / "ls-venv"))
    started = time.monotonic()
    try:
        out = subprocess.run(["bash", str(ENSURE)], capture_output=True, text=True, timeout=1500, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot build the Label Studio 1.23.2 virtualenv ({exc}); run scripts/ensure_label_studio.sh")
    if out.returncode != 0:
        tail = "\n".join(line for line in out.stderr.splitlines() if "is ignored" not in line)[-1500:]
        pytest.skip(f"cannot build the Label Studio 1.23.2 virtualenv with scripts/ensure_label_studio.sh "
                    f"(exit {out.returncode}):\n{tail}")
    TIMINGS["ls_venv_s"] = round(time.monotonic() - started, 1)
    return Path(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def label_studio(ls_venv, tmp_path_factory) -> LabelStudio:
    """A fresh Label Studio 1.23.2 on 127.0.0.1 for this test session (legacy token, loopback ML backends
    and webhooks allowed, local-files serving on)."""
    if os.environ.get("PIXELLLM_TEST_LS_URL"):
        yield LabelStudio(os.environ["PIXELLLM_TEST_LS_URL"], os.environ.get("PIXELLLM_TEST_LS_TOKEN", TOKEN),
                          Path(os.environ["PIXELLLM_TEST_LS_FILES"]), ls_venv, None,
                          user=os.environ.get("PIXELLLM_TEST_LS_USER", USER),
                          password=os.environ.get("PIXELLLM_TEST_LS_PASSWORD", PASSWORD))
        return
    base = tmp_path_factory.mktemp("label-studio")
    files_root = base / "files"
    (files_root / "imgs").mkdir(parents=True)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO_", "DJANGO_"))}
    env.update({
        "LABEL_STUDIO_BASE_DATA_DIR": str(base / "data"), "LABEL_STUDIO_USERNAME": USER,
        "LABEL_STUDIO_PASSWORD": PASSWORD, "LABEL_STUDIO_USER_TOKEN": TOKEN,
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true", "SECRET_KEY": "pixelllm-e2e-secret",
        "ML_BLOCK_LOCAL_IP": "false", "SSRF_PROTECTION_ENABLED": "false",
        "LOCAL_FILES_SERVING_ENABLED": "true", "LOCAL_FILES_DOCUMENT_ROOT": str(files_root),
        "LATEST_VERSION_CHECK": "false", "COLLECT_ANALYTICS": "false", "SENTRY_DSN": "", "FRONTEND_SENTRY_DSN": "",
        "ML_TIMEOUT_PREDICT": "100", "PYTHONUNBUFFERED": "1",
    })
    log_path = base / "label-studio.log"
    started = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([str(ls_venv / "bin" / "label-studio"), "start", "--no-browser", "--internal-host",
                                 "127.0.0.1", "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, env=env,
                                cwd=base, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def up():
            if proc.poll() is not None:
                raise RuntimeError(f"label-studio exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            return httpx.get(f"{url}/health", timeout=2).status_code == 200

        deadline = time.monotonic() + 300
        while True:
            try:
                if up():
                    break
            except RuntimeError:
                raise
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"Label Studio did not answer /health within 300 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)  # polling interval; the deadline bounds the wait
        ls = LabelStudio(url, TOKEN, files_root, ls_venv, log_path, startup_s=round(time.monotonic() - started, 1))
        TIMINGS["ls_startup_s"] = ls.startup_s
        # the admin user and its legacy token are created at startup; wait until the API accepts the token
        poll(lambda: ls.api().get("/api/projects").status_code == 200, 60, "the API token to work")
        yield ls
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        if os.environ.get("PIXELLLM_KEEP_LS_LOG") and log_path.exists():
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            shutil.copy(log_path, ARTIFACTS / "label-studio.log")


class BackendServer:
    """The backend app served by uvicorn in a thread on 127.0.0.1."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        poll(lambda: self.server.started, 120, "the backend to start")

    def close(self):
        self.server.should_exit = True
        self.thread.join(30)
