"""The process engine: the batcher and model in a child process, joined to the HTTP front by a pipe.

The child is real (spawned); its predictor is ``engine_fakes.ProcessFake`` or the real ``tiny`` model.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import httpx
import pytest
from fakes import FakePredictor
from PIL import Image
from serving_helpers import WorkerProcess, image_field, png_bytes, tiny_available, wait_until

from pixelllm_plugins.errors import InvalidPromptError
from pixelllm_plugins.serving.batcher import DynamicBatcher, Job, ShuttingDown
from pixelllm_plugins.serving.client import RemotePredictor
from pixelllm_plugins.serving.engines import build_engine
from pixelllm_plugins.serving.process_engine import ModelProcessError, ProcessEngine
from pixelllm_plugins.serving.settings import WorkerSettings


class Batches:
    """The front's metrics as the engine reports them: (task, size) per model call."""

    def __init__(self):
        self.seen: list[tuple[str, int]] = []

    def observe_batch(self, task, size, seconds):
        assert seconds >= 0
        self.seen.append((task, size))


def _img(seed=0):
    return Image.new("RGB", (40, 30), (seed * 40 % 256, 90, 120))


@pytest.fixture()
def gate(tmp_path, monkeypatch):
    """A closed gate file: the child's predictor waits while it exists (see engine_fakes)."""
    path = tmp_path / "gate"
    path.touch()
    monkeypatch.setenv("PIXELLLM_TEST_GATE", str(path))
    return path


def _engine(**kw) -> tuple[ProcessEngine, Batches]:
    batches = Batches()
    engine = ProcessEngine(factory="engine_fakes:ProcessFake", metrics=batches, **kw)
    engine.start()
    assert engine.wait_ready(60), engine.error
    return engine, batches


def test_jobs_run_in_the_child_and_batch_there(gate):
    # a long max wait: the second batch closes when no announced request is still on its way
    engine, batches = _engine(max_batch_size=8, max_wait_ms=30_000)
    try:
        assert engine.model_version == f"fake-pid-{engine.info()['model_pid']}"
        assert engine.info()["model_pid"] != os.getpid() and engine.info()["engine"] == "process"
        first = engine.submit_threadsafe(Job("refer", _img(), ["first"]))
        wait_until(Path(str(gate) + ".entered").exists, 20, what="the child to start the first call")
        for _ in range(5):
            engine.expect()  # as the app does while a request decodes its image
        rest = [engine.submit_threadsafe(Job("refer", _img(i), [f"text {i}"]), announced=True) for i in range(5)]
        wait_until(lambda: engine.queue_depth() == 6, 10, what="six jobs in flight")
        gate.unlink()
        assert first.result(20)[0][0].text == "first"
        for i, fut in enumerate(rest):
            assert fut.result(20)[0][0].text == f"text {i}"  # each job gets its own answer
        wait_until(lambda: len(batches.seen) == 2, 10, what="two batch reports")
        assert batches.seen == [("refer", 1), ("refer", 5)]  # the five went together, told of each other
        assert engine.queue_depth() == 0
    finally:
        engine.stop()
    assert engine._proc.exitcode == 0


def test_errors_keep_their_type_and_the_child_keeps_serving():
    engine, _ = _engine(max_batch_size=4, max_wait_ms=0)
    try:
        with pytest.raises(InvalidPromptError, match="describe the object"):
            engine.submit_threadsafe(Job("refer", _img(), ["bad"])).result(20)
        with pytest.raises(RuntimeError, match="Unpicklable: this and that"):
            engine.submit_threadsafe(Job("refer", _img(), ["odd"])).result(20)
        assert engine.submit_threadsafe(Job("refer", _img(), ["fine"])).result(20)[0][0].text == "fine"
    finally:
        engine.stop()


def test_cancelled_jobs_never_run_and_stop_fails_the_queued_ones(gate):
    engine, batches = _engine(max_batch_size=1, max_wait_ms=0)
    running = engine.submit_threadsafe(Job("refer", _img(), ["running"]))
    wait_until(Path(str(gate) + ".entered").exists, 20, what="the child to start the first call")
    dropped = engine.submit_threadsafe(Job("refer", _img(), ["dropped"]))
    queued = engine.submit_threadsafe(Job("refer", _img(), ["queued"]))
    assert dropped.cancel()
    stopper = threading.Thread(target=engine.stop)
    stopper.start()
    with pytest.raises(ShuttingDown):
        queued.result(20)
    gate.unlink()  # the running call finishes and is still answered
    assert running.result(20)[0][0].text == "running"
    stopper.join(30)
    assert not stopper.is_alive() and engine._proc.exitcode == 0
    assert batches.seen == [("refer", 1)]  # neither the cancelled nor the queued job ran


def test_a_dead_model_process_fails_its_requests_and_the_worker_is_not_ready():
    engine, _ = _engine(max_batch_size=2, max_wait_ms=0)
    try:
        with pytest.raises(ModelProcessError, match=r"exited \(code 3\)"):
            engine.submit_threadsafe(Job("refer", _img(), ["crash"])).result(20)
        assert not engine.ready and "restart the worker" in engine.error
        with pytest.raises(ModelProcessError):
            engine.submit_threadsafe(Job("refer", _img(), ["after"]))
    finally:
        engine.stop()


def test_a_model_that_fails_to_load_reports_why():
    engine = ProcessEngine(factory="engine_fakes:BrokenModel")
    engine.start()
    try:
        wait_until(lambda: engine.error, 60, what="the load error")
        assert "FileNotFoundError: no weights at /nowhere" in engine.error and not engine.ready
    finally:
        engine.stop()


def test_build_engine_runs_named_models_in_a_child_and_instances_on_a_thread():
    settings = WorkerSettings()
    assert isinstance(build_engine("tiny", settings), ProcessEngine)
    assert isinstance(build_engine(None, settings), ProcessEngine)
    assert isinstance(build_engine(None, settings, factory="fakes:FakePredictor"), ProcessEngine)
    assert isinstance(build_engine(FakePredictor(), settings), DynamicBatcher)
    assert isinstance(build_engine("tiny", settings.replace(engine="thread")), DynamicBatcher)
    with pytest.raises(ValueError, match="engine process|thread"):
        WorkerSettings(engine="fork")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "State:\tZ" not in state


@pytest.mark.slow
@pytest.mark.skipif(not tiny_available(), reason="needs the core Predictor")
def test_worker_over_http_with_the_tiny_model_and_no_orphan_after_a_kill(tmp_path):
    with WorkerProcess("--model", "tiny", "--torch-threads", "1", log_path=tmp_path / "worker.log") as worker:
        info = httpx.get(worker.url + "/ready", timeout=10).json()["info"]
        assert info["engine"] == "process" and info["model_pid"] != worker.proc.pid
        r = httpx.post(worker.url + "/v1/refer", json={"image": image_field(64, 48), "text": "the red circle"},
                       timeout=60)
        assert r.status_code == 200, r.text
        (x0, y0, x1, y1) = r.json()["detections"][0]["box_xyxy"]
        assert 0 <= x0 <= x1 <= 64 and 0 <= y0 <= y1 <= 48
        bad = httpx.post(worker.url + "/v1/refer", json={"image": image_field(), "text": " "}, timeout=60)
        assert bad.status_code == 400
        worker.proc.send_signal(signal.SIGKILL)
        worker.proc.wait(15)
        wait_until(lambda: not _alive(info["model_pid"]), 30, what="the model process to exit with its worker")


@pytest.mark.slow
@pytest.mark.skipif(not tiny_available(), reason="needs the core Predictor")
def test_results_through_the_model_process_equal_direct_calls_with_and_without_an_adapter(tiny_checkpoint,
                                                                                          tmp_path):
    from pixelllm_plugins.inference.predictor import Predictor
    from pixelllm_plugins.modeling import lora

    direct = Predictor(tiny_checkpoint, device="cpu")
    lora.add_lora(direct.model, "proj-a", r=4)
    lora.save_adapter(direct.model, tmp_path / "adapters" / "proj-a", "proj-a")
    lora.delete_adapter(direct.model, "proj-a")
    images = [png_bytes(96, 72, seed=i) for i in range(4)]
    texts = [["the red circle", "the blue square"]] * len(images)
    env = {"PIXELLLM_WORKER_ADAPTER_DIR": str(tmp_path / "adapters")}
    with WorkerProcess("--model", str(tiny_checkpoint), "--torch-threads", "1", "--max-batch-size", "8",
                       env=env, log_path=tmp_path / "worker.log") as worker, \
            RemotePredictor(worker.url, concurrency=4) as remote:
        assert remote.model_version == direct.model_version
        for adapter in (None, "proj-a"):
            if adapter:
                direct.load_adapter(tmp_path / "adapters" / adapter, adapter)
            got, want = remote.refer(images, texts, adapter=adapter), direct.refer(images, texts, adapter=adapter)
            for g_img, w_img in zip(got, want):
                for g, w in zip(g_img, w_img):
                    assert g[0].text == w[0].text
                    assert g[0].box_xyxy == pytest.approx(w[0].box_xyxy, abs=1e-3)
                    assert g[0].score == pytest.approx(w[0].score, abs=1e-4)
        assert got[0][0][0].model_version.endswith("+proj-a")  # the child loaded and used the adapter
        regions = remote.caption_regions(images[:1], [[[5, 5, 60, 50]]], max_new_tokens=5)
        assert regions[0][0].text == direct.caption_regions(images[:1], [[[5, 5, 60, 50]]], max_new_tokens=5)[0][0].text
        missing = httpx.post(worker.url + "/v1/refer", json={"image": image_field(), "text": "x",
                                                            "adapter": "nope"}, timeout=60)
        assert missing.status_code == 404 and missing.json()["type"] == "AdapterNotFoundError"
