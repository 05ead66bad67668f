"""``--fronts N``: several HTTP processes on one port over one model process (real subprocesses, loopback).

Checks that every request is answered with its own result, that all fronts share one model process (its
batches mix requests from every front), that /metrics on any front counts the requests of all of them, that
auth holds on every front, and that stopping the worker leaves no model process behind.
"""

from __future__ import annotations

import os
import threading

import httpx
import pytest
from serving_helpers import WorkerProcess, b64, png_bytes, tiny_available, wait_until

from pixelllm_plugins.serving.process_engine import Links
from pixelllm_plugins.serving.settings import WorkerSettings

MODEL_ARGS = ["--model", "tiny", "--torch-threads", "1"] if tiny_available() else ["--factory", "fakes:FakePredictor"]
TOKEN = "fronts-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _metric(text: str, line_start: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_start))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
def test_two_fronts_share_one_model_process_and_their_metrics(tmp_path):
    worker = WorkerProcess(*MODEL_ARGS, "--fronts", "2", "--max-batch-size", "16",
                           env={"PIXELLLM_WORKER_TOKEN": TOKEN}, log_path=tmp_path / "worker.log")
    with worker:
        fronts, models = set(), set()

        def look() -> bool:  # a fresh connection each time: the kernel hands it to either front
            info = httpx.get(worker.url + "/ready", timeout=10).json()["info"]
            fronts.add(info["front_pid"])
            models.add(info["model_pid"])
            return len(fronts) == 2

        wait_until(look, 60, "both fronts to answer")
        assert len(models) == 1, models
        (model_pid,) = models
        assert model_pid not in fronts and worker.proc.pid not in fronts

        n, answers, errors = 48, {}, []
        image = b64(png_bytes(64, 48))

        def client(k: int) -> None:
            for i in range(k, n, 8):
                try:
                    with httpx.Client(timeout=60) as c:  # new connections spread over the fronts
                        r = c.post(worker.url + "/v1/refer", headers=AUTH,
                                   json={"image": {"b64": image}, "text": f"request {i}"})
                    answers[i] = (r.status_code, r.json())
                except Exception as exc:  # noqa: BLE001 - reported below
                    errors.append((i, repr(exc)))

        threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors and len(answers) == n, errors
        for i, (status, body) in answers.items():
            assert status == 200 and body["per_text"][0][0]["text"] == f"request {i}"

        # any front's /metrics adds up the requests of both fronts and the batches of the one model
        text = httpx.get(worker.url + "/metrics", headers=AUTH, timeout=10).text
        assert _metric(text, 'pixelllm_requests_total{route="/v1/refer",status="200"}') == n
        assert _metric(text, 'pixelllm_batch_size_sum{task="refer"}') == n
        assert httpx.post(worker.url + "/v1/refer", json={"image": {"b64": image}, "text": "x"}).status_code == 401
        worker.stop()
        assert worker.proc.returncode is not None
        wait_until(lambda: not _alive(model_pid), 30, "the model process to exit with the worker")


def test_links_add_up_incoming_requests_over_fronts_and_report_batches_once():
    links, sent = Links(), {0: [], 1: []}
    a = links.add(sent[0].append)
    b = links.add(sent[1].append)
    assert links.incoming(a, 3) == 3
    assert links.incoming(b, 2) == 5
    assert links.incoming(a, -1) == 2  # a front's count never goes below zero
    links.send_one(("batch", "refer", 4, 0.01))
    assert len(sent[0]) + len(sent[1]) == 1  # the fronts share metrics: one report per batch
    links.send_all(("info", {}))
    assert sent[0][-1] == sent[1][-1] == ("info", {})
    links.remove(a)
    assert links.incoming(b, 1) == 1


def test_fronts_setting():
    assert WorkerSettings.from_env({"PIXELLLM_WORKER_FRONTS": "4"}).fronts == 4
    assert WorkerSettings().fronts == 1
    with pytest.raises(ValueError, match="fronts > 1 needs engine process"):
        WorkerSettings(fronts=2, engine="thread")
    with pytest.raises(ValueError, match="fronts=0"):
        WorkerSettings(fronts=0)
