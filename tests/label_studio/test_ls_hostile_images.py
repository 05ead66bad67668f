"""Hostile images through the Label Studio backend process: tiny PNG files of 8000x8000 canvases, several in
one "Retrieve predictions" batch. Every task is answered (a prediction or a clear error), /health keeps
answering, decoding stays within the backend's memory budget and its resident memory returns to its warm
level afterwards."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
from conftest import REFERRING, predict_body
from hostile_images import png_1bit, png_16bit_rgba, rss_bytes
from ls_helpers import Route, ScriptedServer, png_bytes
from polling import wait_until

MIB = 1024 * 1024
BUDGET = 640 * MIB  # one 16-bit RGBA canvas (488 MiB) or two 1-bit ones (305 MiB each) at a time


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.integration
def test_hostile_images_in_one_batch_keep_the_backend_serving_and_its_memory(tmp_path):
    ls = ScriptedServer()
    for i in range(4):
        ls.routes[f"/data/upload/1/normal{i}.png"] = Route(200, png_bytes((320, 240), box=(40, 30, 120, 90)))
    hostile = {"rgba16.png": png_16bit_rgba(), "bits.png": png_1bit()}
    for name, data in hostile.items():
        ls.routes[f"/data/upload/1/{name}"] = Route(200, data)
    port = _free_port()
    env = os.environ | {"LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": "hostile-test-key",
                        "MODEL_DIR": str(tmp_path / "model_dir"), "PIXELLLM_LS_DECODE_BUDGET_BYTES": str(BUDGET),
                        "PIXELLLM_LS_FETCH_WORKERS": "4"}
    log = open(tmp_path / "backend.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "pixelllm_plugins.cli", "ls-backend", "--host", "127.0.0.1",
                             "--port", str(port), "--model", "tiny"], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, timeout=300) as http:
            def up():
                try:
                    return http.get("/health").status_code == 200
                except httpx.HTTPError:
                    assert proc.poll() is None, (tmp_path / "backend.log").read_text()
                    return False

            wait_until(up, 120, what="the backend to answer /health")

            def predict(names: list[str]) -> list[dict]:
                tasks = [{"id": k + 1, "data": {"image": f"/data/upload/1/{n}", "expression": "the red square"}}
                         for k, n in enumerate(names)]
                r = http.post("/predict", json=predict_body(tasks, REFERRING))
                assert r.status_code == 200, r.text
                return r.json()["results"]

            normal = [f"normal{i}.png" for i in range(4)]
            for _ in range(2):  # warm: the model, the download threads, the allocator
                assert all(p["result"] for p in predict(normal))
            warm = rss_bytes(proc.pid)

            done, health, peak = threading.Event(), [], [warm]

            def watch() -> None:
                with httpx.Client(base_url=url, timeout=60) as probe:
                    while not done.is_set():
                        try:
                            health.append(probe.get("/health").status_code)
                        except httpx.HTTPError:
                            health.append(-1)
                        peak[0] = max(peak[0], rss_bytes(proc.pid))
                        time.sleep(0.02)

            watcher = threading.Thread(target=watch)
            watcher.start()
            try:
                batch = ["rgba16.png", "bits.png", "normal0.png", "rgba16.png", "bits.png", "normal1.png"]
                answers = predict(batch)
            finally:
                done.set()
                watcher.join(120)
            after = rss_bytes(proc.pid)
            report = (f"warm {warm / MIB:.0f} MiB, peak {peak[0] / MIB:.0f} MiB, after {after / MIB:.0f} MiB; "
                      f"/health answers {len(health)}")
            print(report)

            assert len(answers) == len(batch)
            for name, answer in zip(batch, answers):
                if name.startswith("normal"):
                    assert answer["result"] and not answer.get("error"), answer  # good tasks still answered
                else:
                    assert answer["result"] or answer.get("error"), answer
            assert health and all(s == 200 for s in health), health
            assert peak[0] - warm > 200 * MIB, report  # the canvases were really decoded here ...
            assert peak[0] - warm < BUDGET + 256 * MIB, report  # ... within the budget
            assert after <= warm * 1.2, report
            assert all(p["result"] for p in predict(normal))  # and it still serves
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        ls.close()
