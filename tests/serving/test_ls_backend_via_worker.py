"""The Label Studio backend, unchanged, against a running worker (issue #6): one environment variable.

A real worker subprocess (``python -m pixelllm_plugins.serving``, i.e. ``pixelllm serve``) serves a random
``tiny`` checkpoint on 127.0.0.1 behind a bearer token. Two real backend subprocesses
(``python -m label_studio_backend``) run with no model setting at all, only ``PIXELLLM_WORKER_URL`` and
``PIXELLLM_WORKER_TOKEN`` (plus ``MODEL_DIR`` for their state): one with the right token, one with a wrong
one. The backends are started before the worker runs (as ``docker compose`` starts them) and must come up
anyway. The test then speaks the Label Studio ML protocol to them over HTTP and checks that:

- ``/health``, ``/setup`` and every prediction carry the worker's ``model_version`` (its ``/ready``);
- batch predictions come back in Label Studio format, boxes inside the image, equal to what the worker
  answers directly for the same image and text;
- the worker's ``/metrics`` counted exactly one ``/v1/refer`` (or ``/v1/caption_regions``) request per
  image, and the backend process never loaded torch: inference went over HTTP;
- the interactive (context) calls (typed prompt -> box, drawn box -> caption) go through the worker too;
- with a wrong token each task gets an error prediction naming the 401 (``-failed`` version, so Label Studio
  asks again), the worker sees one refused request per image (no retries), and the backend keeps serving.
"""

from __future__ import annotations

import base64
import contextlib
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from serving_helpers import (
    ROOT,
    WorkerProcess,
    free_port,
    png_bytes,
    stop_process,
    tiny_available,
    wait_until,
)

from label_studio_backend import labeling_config
from pixelllm_plugins.geometry import ls_percent_to_xyxy

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not tiny_available(), reason="the core Predictor/checkpoint modules are missing")]

TOKEN = "ls-via-worker-token-5e1f0c"
WORKER_AUTH = {"Authorization": f"Bearer {TOKEN}"}
REFERRING = labeling_config("referring")
PROJECT = "3.1700000000"  # as Label Studio sends it: "<id>.<created timestamp>"
SCENES = [(png_bytes(160, 120, seed=1), (160, 120), ["the red circle", "the blue square"]),
          (png_bytes(90, 140, seed=2), (90, 140), ["the blue square"])]
# variables that would make the backend do something else than "the defaults + the worker"
FOREIGN_ENV = ("PIXELLLM_", "LABEL_STUDIO_", "BASIC_AUTH_", "LOCAL_FILES_", "MODEL_DIR")


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _task(i: int) -> dict:
    png, _size, texts = SCENES[i]
    return {"id": 100 + i, "data": {"image": _data_uri(png), "expression": "\n".join(texts)}}


def _predict_body(tasks: list[dict], context: dict | None = None) -> dict:
    return {"tasks": tasks, "project": PROJECT, "label_config": REFERRING,
            "params": {"login": None, "password": None, "context": context}}


class BackendProcess:
    """``python -m label_studio_backend`` on 127.0.0.1, configured only through its environment."""

    def __init__(self, worker_url: str, token: str, model_dir: Path, log_path: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(FOREIGN_ENV)}
        self.env.update(PIXELLLM_WORKER_URL=worker_url, PIXELLLM_WORKER_TOKEN=token, MODEL_DIR=str(model_dir))
        self.proc: subprocess.Popen | None = None

    def start(self) -> BackendProcess:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "label_studio_backend", "--host", "127.0.0.1",
                                          "--port", str(self.port), "--log-level", "WARNING"],
                                         env=self.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        return self

    def wait_serving(self, route: str = "/health", timeout: float = 60.0) -> None:
        """Until ``route`` answers 200 (uvicorn answers only once the app's startup has finished)."""
        def up():
            if self.proc.poll() is not None:
                raise AssertionError(f"backend exited with {self.proc.returncode}:\n"
                                     f"{self.log_path.read_text()[-3000:]}")
            try:
                return httpx.get(self.url + route, timeout=10).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(up, timeout, f"the Label Studio backend subprocess to answer {route}")

    def post(self, path: str, body: dict) -> httpx.Response:
        return httpx.post(self.url + path, json=body, timeout=60)

    def stop(self) -> None:
        stop_process(self.proc)


@pytest.fixture(scope="module")
def stack(tiny_checkpoint, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ls-via-worker")
    worker = WorkerProcess("--model", str(tiny_checkpoint), "--device", "cpu", "--torch-threads", "1",
                           env={"PIXELLLM_WORKER_TOKEN": TOKEN}, log_path=tmp / "worker.log")
    good = BackendProcess(worker.url, TOKEN, tmp / "model-dir-good", tmp / "backend-good.log")
    bad = BackendProcess(worker.url, "not-the-worker-token", tmp / "model-dir-bad", tmp / "backend-bad.log")
    with contextlib.ExitStack() as stop:
        for proc in (worker, good, bad):
            stop.callback(proc.stop)
        # the backends come up before the worker even runs (docker compose starts them together): their
        # startup must not need the worker. /metrics is the one route that does not ask the worker anything.
        good.start()
        bad.start()
        good.wait_serving("/metrics")
        bad.wait_serving("/metrics")
        # /health answers while the worker is down (one quick probe, no retries), without a version
        down = httpx.get(good.url + "/health", timeout=30)
        assert down.status_code == 200, down.text
        assert down.json()["status"] == "UP" and "model_version" not in down.json()
        assert down.json().get("worker_reachable", False) is False
        worker.start()
        good.wait_serving()
        bad.wait_serving()
        version = httpx.get(worker.url + "/ready", timeout=10).json()["model_version"]
        assert version, "the worker reports no model_version on /ready"
        yield {"worker": worker, "good": good, "bad": bad, "version": version}


def _served(worker_url: str, route: str, status: str = "200") -> float:
    """``pixelllm_requests_total{route, status}`` from the worker's /metrics (needs the token)."""
    r = httpx.get(worker_url + "/metrics", headers=WORKER_AUTH, timeout=10)
    assert r.status_code == 200, r.text
    return sum(s.value for fam in text_string_to_metric_families(r.text) for s in fam.samples
               if s.name == "pixelllm_requests_total" and s.labels == {"route": route, "status": status})


def _check_inside(result: dict, size: tuple[int, int]) -> tuple[float, float, float, float]:
    """A rectangle result in Label Studio format, inside its image; returns its box in pixels."""
    assert (result["original_width"], result["original_height"]) == size
    v = result["value"]
    assert v["width"] > 0 and v["height"] > 0, v
    assert v["x"] >= 0 and v["y"] >= 0, v
    assert v["x"] + v["width"] <= 100 + 1e-6 and v["y"] + v["height"] <= 100 + 1e-6, v
    return ls_percent_to_xyxy(v, *size)


def _torch_loaded(pid: int) -> bool:
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


def test_health_and_setup_report_the_workers_model_version(stack):
    good, version = stack["good"], stack["version"]
    health = httpx.get(good.url + "/health", timeout=30).json()
    assert health["status"] == "UP" and health["model_loaded"] is True
    assert health["model_version"] == version and health["worker_reachable"] is True
    r = good.post("/setup", {"project": PROJECT, "schema": REFERRING, "hostname": "http://ls.invalid",
                             "access_token": "ls-token-not-for-the-worker"})
    assert r.status_code == 200 and r.json() == {"model_version": version}
    assert good.post("/versions", {"project": PROJECT}).json()["versions"] == [version]


def test_batch_predictions_come_from_the_worker(stack):
    worker, good, version = stack["worker"], stack["good"], stack["version"]
    before = _served(worker.url, "/v1/refer")
    r = good.post("/predict", _predict_body([_task(0), _task(1)]))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_version"] == version
    assert len(body["results"]) == 2
    # one HTTP request per task image reached the worker and was answered 200
    assert _served(worker.url, "/v1/refer") - before == 2
    for i, pred in enumerate(body["results"]):
        png, size, texts = SCENES[i]
        assert "error" not in pred, pred.get("error")
        assert pred["model_version"] == version and 0 <= pred["score"] <= 1
        rects = [x for x in pred["result"] if x["type"] == "rectanglelabels"]
        caps = [x for x in pred["result"] if x["type"] == "textarea"]
        assert len(rects) == len(texts)  # model_max_boxes="1": one box per referring text
        assert [c["id"] for c in caps] == [x["id"] for x in rects]  # each box with its per-region caption
        assert [c["value"]["text"] for c in caps] == [[t] for t in texts]
        assert all(x["from_name"] == "label" and x["to_name"] == "image" for x in rects)
        assert all(x["value"]["rectanglelabels"] == ["object"] for x in rects)
        # the same boxes and scores as the worker answers for this image and text
        direct = httpx.post(worker.url + "/v1/refer", headers=WORKER_AUTH, timeout=60,
                            json={"image": {"b64": base64.b64encode(png).decode()}, "texts": texts}).json()
        assert direct["model_version"] == version and direct["image_size"] == list(size)
        for rect, dets in zip(rects, direct["per_text"]):
            assert _check_inside(rect, size) == pytest.approx(dets[0]["box_xyxy"], abs=0.02)
            assert rect["score"] == pytest.approx(dets[0]["score"], abs=1e-4)
    # the backend ran no model of its own: torch was never even loaded into its process
    if Path("/proc").is_dir():
        assert not _torch_loaded(good.proc.pid), "the backend loaded torch: it should only call the worker"


def test_interactive_prompt_and_drawn_box_go_through_the_worker(stack):
    worker, good, version = stack["worker"], stack["good"], stack["version"]
    size = SCENES[0][1]
    refer0, regions0 = _served(worker.url, "/v1/refer"), _served(worker.url, "/v1/caption_regions")
    ctx = {"result": [{"from_name": "prompt", "to_name": "image", "type": "textarea",
                       "value": {"text": ["the red circle"]}}]}
    r = good.post("/predict", _predict_body([_task(0)], context=ctx))
    assert r.status_code == 200, r.text
    pred = r.json()["results"][0]
    assert "error" not in pred, pred.get("error")
    assert pred["model_version"] == version
    assert [x["type"] for x in pred["result"]] == ["rectanglelabels", "textarea"]
    assert pred["result"][1]["value"]["text"] == ["the red circle"]
    _check_inside(pred["result"][0], size)

    drawn = {"id": "r1", "from_name": "label", "to_name": "image", "type": "rectanglelabels", "origin": "manual",
             "original_width": size[0], "original_height": size[1],
             "value": {"x": 10, "y": 20, "width": 30, "height": 40, "rectanglelabels": ["object"]}}
    r = good.post("/predict", _predict_body([_task(0)], context={"result": [drawn]}))
    assert r.status_code == 200, r.text
    pred = r.json()["results"][0]
    assert "error" not in pred, pred.get("error")
    assert pred["model_version"] == version
    assert [(x["type"], x["id"]) for x in pred["result"]] == [("rectanglelabels", "r1"), ("textarea", "r1")]
    caption = pred["result"][1]["value"]
    assert isinstance(caption["text"][0], str)
    assert {k: caption[k] for k in ("x", "y", "width", "height")} == {"x": 10, "y": 20, "width": 30, "height": 40}
    assert _served(worker.url, "/v1/refer") - refer0 == 1
    assert _served(worker.url, "/v1/caption_regions") - regions0 == 1


def test_wrong_worker_token_gives_a_clear_per_task_error(stack):
    worker, bad, version = stack["worker"], stack["bad"], stack["version"]
    refused0, served0 = _served(worker.url, "/v1/refer", "401"), _served(worker.url, "/v1/refer")
    # /ready needs no token, so the backend still knows the worker's model version
    assert httpx.get(bad.url + "/health", timeout=30).json()["model_version"] == version

    r = bad.post("/predict", _predict_body([_task(1)]))
    assert r.status_code == 200, r.text  # Label Studio gets an answer for the task, not a 500
    pred = r.json()["results"][0]
    assert pred["result"] == [] and pred["score"] == 0.0
    assert pred["model_version"] == f"{version}-failed"  # Label Studio asks again next time
    assert "401" in pred["error"] and "bearer token" in pred["error"] and worker.url in pred["error"]

    ctx = {"result": [{"from_name": "prompt", "to_name": "image", "type": "textarea",
                       "value": {"text": ["the red circle"]}}]}
    pred = bad.post("/predict", _predict_body([_task(1)], context=ctx)).json()["results"][0]
    assert pred["result"] == [] and pred["model_version"] == f"{version}-failed"
    assert "401" in pred["error"] and "bearer token" in pred["error"]

    # each image was refused once (a 401 is not retried) and nothing was served
    assert _served(worker.url, "/v1/refer", "401") - refused0 == 2
    assert _served(worker.url, "/v1/refer") == served0
    # the backend keeps running and counted the failures
    assert bad.proc.poll() is None
    counters = httpx.get(bad.url + "/metrics", timeout=10).json()["counters"]
    assert counters["task_errors"] >= 2 and counters.get("tasks_predicted", 0) == 0
