"""The worker on Ray Serve: a 2-replica CPU deployment on a local Ray instance (ray.init(num_cpus=2),
0.5 CPU per replica), served over HTTP on 127.0.0.1 with the same app, auth and batching."""

from __future__ import annotations

import concurrent.futures
import os

import httpx
import pytest
from serving_helpers import ROOT, free_port, png_bytes, wait_until

from pixelllm_plugins.serving.client import RemotePredictor

ray = pytest.importorskip("ray", reason="the `ray` extra is not installed (pip install 'pixelllm-plugins[ray]')")
serve = pytest.importorskip("ray.serve")

TOKEN = "ray-test-token"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_worker():
    if (os.cpu_count() or 1) < 2:
        pytest.skip("a 2-replica local Ray deployment needs at least 2 CPU cores")
    from pixelllm_plugins.serving.ray_app import run

    pythonpath = os.pathsep.join([str(ROOT / "tests" / "serving"), str(ROOT / "tests"), str(ROOT)])
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
                 runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})
    except Exception as exc:  # pragma: no cover - depends on the machine
        pytest.skip(f"a local Ray instance does not start on this machine: {exc}")
    port = free_port()
    try:
        # what `pixelllm serve --ray --replicas 2` runs (Ray is already initialised with 2 CPUs here)
        run("127.0.0.1", port, factory="fakes:FakePredictor", replicas=2, num_cpus=0.5, blocking=False,
            token=TOKEN, max_batch_size=8, max_wait_ms=5)
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: _status(url + "/ready") == 200, 90, "the Ray Serve deployment", interval=0.2)
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()


def _status(url):
    try:
        return httpx.get(url, timeout=5).status_code
    except httpx.HTTPError:
        return None


def test_two_replicas_serve_the_same_app_with_batching(ray_worker):
    url = ray_worker
    replicas = set()

    def replica():
        replicas.add(httpx.get(url + "/ready", timeout=10).json()["info"]["replica"])
        return len(replicas) == 2

    wait_until(replica, 60, "both replicas to answer /ready")
    with RemotePredictor(url, token=TOKEN, concurrency=16) as remote:
        images = [png_bytes(64, 48, seed=i) for i in range(48)]
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            chunks = [pool.submit(remote.refer, images[i::4], [[f"t{j}"] for j in range(i, 48, 4)])
                      for i in range(4)]
            results = [f.result(120) for f in chunks]
        for i, res in enumerate(results):
            assert [r[0][0].text for r in res] == [f"t{j}" for j in range(i, 48, 4)]
        assert remote.caption([images[0]])[0].text == "a shape"
        assert remote.model_version == "fake-1"
    # the shared app's auth and error handling hold on Ray too
    body = {"image": {"b64": "@@@"}, "text": "x"}
    assert httpx.post(url + "/v1/refer", json=body, timeout=10).status_code == 401
    r = httpx.post(url + "/v1/refer", json=body, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
    assert r.status_code == 400 and "not valid base64" in r.json()["error"]
    metrics = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10).text
    assert "pixelllm_batch_size_bucket" in metrics


def test_serve_config_builder_maps_args_to_deployment_options():
    from pixelllm_plugins.serving.ray_app import app_builder

    app = app_builder({"model": "/models/ckpt", "replicas": 3, "num_gpus": 1, "max_batch_size": 16})
    d = app._bound_deployment
    assert d.num_replicas == 3 and d.ray_actor_options["num_gpus"] == 1
    assert d.init_args[0] == "/models/ckpt" and d.init_args[1]["max_batch_size"] == 16
    assert d.max_ongoing_requests >= d.init_args[1]["max_queue"]  # the app, not Ray, answers 503
    scaled = app_builder({"num_cpus": 1, "autoscaling_config": {"min_replicas": 1, "max_replicas": 4,
                                                                "target_ongoing_requests": 16}})
    config = scaled._bound_deployment._deployment_config.autoscaling_config
    assert (config.min_replicas, config.max_replicas, config.target_ongoing_requests) == (1, 4, 16)
