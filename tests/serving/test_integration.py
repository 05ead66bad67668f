"""The worker with the real ``Predictor("tiny")`` (random tiny model): four tasks over HTTP through
``RemotePredictor``, batched results equal to direct calls, LoRA adapters loaded on demand by name."""

from __future__ import annotations

import concurrent.futures

import pytest
from serving_helpers import ThreadedServer, png_bytes, tiny_available

from pixelllm_plugins.serving.app import create_app
from pixelllm_plugins.serving.client import RemotePredictor
from pixelllm_plugins.serving.settings import WorkerSettings

pytestmark = pytest.mark.skipif(not tiny_available(), reason="the core Predictor/checkpoint modules are not there yet")


@pytest.fixture(scope="module")
def predictor():
    from pixelllm_plugins.inference.predictor import Predictor

    return Predictor("tiny", device="cpu")


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, predictor):
    from pixelllm_plugins.modeling import lora

    root = tmp_path_factory.mktemp("adapters")
    for name in ("proj-a", "proj-b"):
        lora.add_lora(predictor.model, name, r=4)
        lora.save_adapter(predictor.model, root / name, name)
        lora.delete_adapter(predictor.model, name)
    return root


@pytest.fixture(scope="module")
def worker(predictor, adapter_dir):
    settings = WorkerSettings(max_batch_size=8, max_wait_ms=20, adapter_dir=str(adapter_dir), max_adapters=2)
    with ThreadedServer(create_app(predictor, settings)) as srv:
        yield srv


def test_four_tasks_over_http_match_direct_calls(worker, predictor):
    images = [png_bytes(96, 72, seed=i) for i in range(6)]
    texts = [["the red circle", "the blue square"]] * len(images)
    with RemotePredictor(worker.url, concurrency=6) as remote:
        assert remote.model_version == predictor.model_version
        got = remote.refer(images, texts)  # 6 concurrent requests: batched by the worker
        want = predictor.refer(images, texts)
        for g_img, w_img in zip(got, want):
            for g, w in zip(g_img, w_img):
                assert [d.text for d in g] == [d.text for d in w]
                assert g[0].box_xyxy == pytest.approx(w[0].box_xyxy, abs=1e-2)
                assert g[0].score == pytest.approx(w[0].score, abs=1e-3)
        regions = remote.caption_regions(images[:2], [[[5, 5, 60, 50]], [[10, 10, 90, 70], [0, 0, 30, 30]]],
                                         max_new_tokens=5)
        assert [len(r) for r in regions] == [1, 2] and all(c.text for r in regions for c in r)
        caps = remote.caption(images[:2], max_new_tokens=6)
        assert all(len(c.words) >= 1 and all(len(w.box_xyxy) == 4 for w in c.words) for c in caps)
        dense = remote.dense_caption(images[:1], max_regions=3, min_score=0.0)
        assert len(dense[0]) <= 3 and all(0.0 <= r.score <= 1.0 for r in dense[0])
        assert predictor.stats["vision_calls"] >= 1


def test_adapters_load_on_demand_by_name_and_batch_per_adapter(worker, predictor):
    image = png_bytes(80, 60, seed=3)
    with RemotePredictor(worker.url, concurrency=8) as remote, concurrent.futures.ThreadPoolExecutor(3) as pool:
        jobs = {a: pool.submit(remote.refer, [image] * 4, [["the red circle"]] * 4, adapter=a)
                for a in ("proj-a", "proj-b", None)}
        versions = {a: {d.model_version for r in f.result(120) for per in r for d in per} for a, f in jobs.items()}
    base = predictor.base_version
    assert versions == {"proj-a": {f"{base}+proj-a"}, "proj-b": {f"{base}+proj-b"}, None: {base}}
    assert {"proj-a", "proj-b"} <= set(predictor.info()["adapters"])
