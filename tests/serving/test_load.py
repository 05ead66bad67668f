"""Load and fault tests against a worker subprocess on 127.0.0.1 (bounded in count and time).

- 2,000 requests from 32 concurrent clients: every one answered with its own result, none lost; the small
  queue makes the worker answer 503 + Retry-After and the clients retry until they succeed.
- malformed requests sent during the load get a clear 4xx and the worker keeps serving.
- the worker killed (SIGKILL) mid-load and restarted on the same port: the clients recover.

Uses the real ``Predictor("tiny")`` (random tiny model) when the core package provides it, else FakePredictor.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from serving_helpers import WorkerProcess, b64, free_port, png_bytes, tiny_available, wait_until

from pixelllm_plugins.serving.client import RemotePredictor

pytestmark = pytest.mark.slow

# one torch thread: this checks the HTTP path, and on a shared 2-core box OpenMP spinning only slows it
MODEL_ARGS = ["--model", "tiny", "--torch-threads", "1"] if tiny_available() else ["--factory", "fakes:FakePredictor"]
TOKEN = "load-test-token"
ENV = {"PIXELLLM_WORKER_TOKEN": TOKEN, "PIXELLLM_MAX_PIXELS": "1000000", "PIXELLLM_WORKER_RETRY_AFTER_S": "1"}
IMAGES = [png_bytes(64, 48, seed=i) for i in range(16)]


def _remote(url: str) -> RemotePredictor:
    # Retry-After (1 s) is honoured up to max_backoff_s: a short cap keeps the test quick
    return RemotePredictor(url, token=TOKEN, concurrency=1, max_retries=100_000, retry_deadline_s=150,
                           backoff_s=0.02, max_backoff_s=0.1, timeout=60, max_connections=64)


def _run_clients(remote: RemotePredictor, n_requests: int, n_clients: int, done: list, errors: list):
    def client(k: int):
        for i in range(k, n_requests, n_clients):
            try:
                out = remote.refer([IMAGES[i % len(IMAGES)]], [[f"request {i}"]])
                assert out[0][0][0].text == f"request {i}", out  # each answer is its own request's
                done.append(i)
            except Exception as exc:  # noqa: BLE001 - collected and reported by the test
                errors.append((i, repr(exc)))

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(n_clients)]
    for t in threads:
        t.start()
    return threads


def _join(threads, timeout: float):
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), f"clients still running after {timeout:g} s"


def _metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


MALFORMED = [
    ({"image": {"b64": "***"}, "text": "x"}, TOKEN, 400, "not valid base64"),
    ({"image": {"b64": b64(png_bytes(1200, 1000))}, "text": "x"}, TOKEN, 413, "exceeds the limit"),
    ({"image": {"b64": b64(IMAGES[0])}}, TOKEN, 422, "exactly one of 'text'"),
    ({"text": "x"}, TOKEN, 422, "image: is required"),
    ({"image": {"b64": b64(IMAGES[0])}, "text": "x"}, "not-the-token", 401, "bearer token"),
]


def _send_malformed(url: str, rounds: int, failures: list):
    with httpx.Client(timeout=30) as http:
        for _ in range(rounds):
            for body, token, status, words in MALFORMED:
                for _attempt in range(1000):  # a 503 (queue full) is retried like any client would
                    r = http.post(url + "/v1/refer", json=body, headers={"Authorization": f"Bearer {token}"})
                    if r.status_code != 503:
                        break
                if r.status_code != status or words not in r.json().get("error", ""):
                    failures.append((status, r.status_code, r.text[:200]))


def test_2000_requests_from_32_clients_none_lost_and_malformed_requests_refused(tmp_path):
    args = [*MODEL_ARGS, "--max-batch-size", "16", "--max-wait-ms", "5", "--max-queue", "24"]
    with WorkerProcess(*args, env=ENV, log_path=tmp_path / "worker.log") as worker:
        remote = _remote(worker.url)
        done, errors, bad = [], [], []
        start = time.monotonic()
        threads = _run_clients(remote, 2000, 32, done, errors)
        malformed = threading.Thread(target=_send_malformed, args=(worker.url, 4, bad), daemon=True)
        malformed.start()
        _join([*threads, malformed], 240)
        elapsed = time.monotonic() - start
        assert errors == [], errors[:5]
        assert sorted(done) == list(range(2000))  # every request answered exactly once, none lost
        assert bad == [], bad[:5]
        answered = _metric(worker.url, 'pixelllm_requests_total{route="/v1/refer",status="200"}')
        rejected = _metric(worker.url, 'pixelllm_rejected_total{reason="queue_full"}')
        batches = _metric(worker.url, 'pixelllm_batch_size_count{task="refer"}')
        assert answered == 2000
        assert rejected > 0 and remote.stats["retries"] > 0  # backpressure happened and was retried
        assert batches < 2000  # concurrent requests were batched
        print(f"\n2000 requests / 32 clients: {elapsed:.1f} s ({2000 / elapsed:.0f} req/s), "
              f"{int(rejected)} answered 503 and retried, {int(batches)} model calls ({MODEL_ARGS[1]})")
        assert worker.proc.poll() is None
        remote.close()


def test_worker_killed_mid_load_and_restarted_clients_recover(tmp_path):
    port = free_port()
    args = [*MODEL_ARGS, "--max-batch-size", "16", "--max-wait-ms", "5", "--max-queue", "64"]
    log = tmp_path / "worker.log"
    first = WorkerProcess(*args, port=port, env=ENV, log_path=log).start()
    second = WorkerProcess(*args, port=port, env=ENV, log_path=log)
    try:
        remote = _remote(first.url)
        done, errors = [], []
        threads = _run_clients(remote, 600, 32, done, errors)
        wait_until(lambda: len(done) >= 150, 120, "150 answers before the kill", interval=0.01)
        first.kill()
        at_kill = len(done)
        assert at_kill < 600, "the load finished before the kill; raise the request count"
        second.start()  # same port: clients reconnect on their own
        _join(threads, 240)
        assert errors == [], errors[:5]
        assert sorted(done) == list(range(600))
        assert remote.stats["retries"] > 0
        print(f"\nkilled after {at_kill}/600 answers; all 600 answered after the restart "
              f"({remote.stats['retries']} retries)")
        remote.close()
    finally:
        first.kill()
        second.stop()
