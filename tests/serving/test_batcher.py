"""Dynamic batching, backpressure (503 + Retry-After), per-request timeouts (504), adapters per batch."""

from __future__ import annotations

import concurrent.futures

import httpx
import pytest
from fakes import FakePredictor
from PIL import Image
from serving_helpers import AdapterFake, GateFake, ThreadedServer, image_field, wait_until

from pixelllm_plugins.errors import InvalidBoxError
from pixelllm_plugins.serving.adapters import AdapterLRU, AdapterNotFoundError
from pixelllm_plugins.serving.app import create_app
from pixelllm_plugins.serving.batcher import DynamicBatcher, Job, ShuttingDown, group_jobs, run_jobs
from pixelllm_plugins.serving.settings import WorkerSettings


def _img(w=32, h=24):
    return Image.new("RGB", (w, h), (100, 100, 100))


@pytest.fixture()
def gated():
    fake = GateFake()
    batcher = DynamicBatcher(lambda: fake, max_batch_size=4, max_wait_ms=0)
    batcher.start()
    assert batcher.wait_ready(10)
    yield fake, batcher
    fake.gate.set()
    batcher.stop()


def test_waiting_jobs_with_the_same_key_share_one_call_up_to_max_batch(gated):
    fake, batcher = gated
    first = batcher.submit_threadsafe(Job("refer", _img(), ["first"]))
    assert fake.entered.wait(10)  # the inference thread is busy with `first`
    futures = [batcher.submit_threadsafe(Job("refer", _img(), [f"t{i}"])) for i in range(6)]
    other = batcher.submit_threadsafe(Job("caption", _img(), None, options=(("trace", True),)))
    adapted = batcher.submit_threadsafe(Job("refer", _img(), ["with adapter"], adapter="a"))
    wait_until(lambda: batcher.queue_depth() == 8, what="8 waiting jobs")
    fake.gate.set()
    results = [f.result(10) for f in [first, *futures, other, adapted]]
    # one call for `first`, then refer x4 (max batch), refer x2, caption x1, refer(adapter a) x1
    assert fake.batches == [("refer", 1, None), ("refer", 4, None), ("refer", 2, None), ("caption", 1, None),
                            ("refer", 1, "a")]
    # every job got its own result back, in order
    assert [r[0][0].text for r in results[1:7]] == [f"t{i}" for i in range(6)]
    assert results[7].text == "a shape" and results[8][0][0].text == "with adapter"


def test_options_must_match_to_share_a_batch():
    jobs = [Job("caption", None, None, options=(("trace", True),)),
            Job("caption", None, None, options=(("trace", False),)),
            Job("caption", None, None, options=(("trace", True),)),
            Job("refer", None, ["x"])]
    assert group_jobs(jobs) == [[0, 2], [1], [3]]


def test_a_failing_batch_is_retried_job_by_job():
    fake = FakePredictor()
    good = Job("caption_regions", _img(64, 48), [[0, 0, 10, 10]], options=(("max_new_tokens", 20),))
    bad = Job("caption_regions", _img(64, 48), [[100, 100, 200, 200]], options=(("max_new_tokens", 20),))
    outcomes = run_jobs(fake, [good, bad, good])
    assert isinstance(outcomes[1], InvalidBoxError)
    assert outcomes[0][0].text == "region 0" and outcomes[2][0].text == "region 0"
    assert fake.calls == [("caption_regions", 3), ("caption_regions", 1), ("caption_regions", 1),
                          ("caption_regions", 1)]


def test_max_wait_lets_a_lone_job_go_and_cancelled_jobs_are_dropped(gated):
    fake, batcher = gated
    fake.gate.set()
    assert batcher.submit_threadsafe(Job("refer", _img(), ["solo"])).result(10)[0][0].text == "solo"
    fake.gate.clear()
    fake.entered.clear()
    blocker = batcher.submit_threadsafe(Job("caption", _img(), None))
    assert fake.entered.wait(10)
    doomed = batcher.submit_threadsafe(Job("refer", _img(), ["never"]))
    assert doomed.cancel()
    fake.gate.set()
    blocker.result(10)
    assert batcher.submit_threadsafe(Job("refer", _img(), ["after"])).result(10)[0][0].text == "after"
    assert ("refer", 1, None) in fake.batches and all("never" not in str(b) for b in fake.batches)


def test_stop_fails_waiting_jobs_cleanly(gated):
    fake, batcher = gated
    running = batcher.submit_threadsafe(Job("refer", _img(), ["running"]))
    assert fake.entered.wait(10)
    waiting = batcher.submit_threadsafe(Job("refer", _img(), ["waiting"]))
    fake.gate.set()
    batcher.stop()
    assert running.result(10)
    if waiting.exception(10) is not None:  # either it ran before stop, or it was refused cleanly
        assert isinstance(waiting.exception(), ShuttingDown)
    with pytest.raises(ShuttingDown):
        batcher.submit_threadsafe(Job("refer", _img(), ["late"]))


def test_http_concurrent_requests_are_batched_and_overload_gets_503_with_retry_after():
    fake = GateFake()
    app = create_app(fake, WorkerSettings(max_batch_size=8, max_wait_ms=0, max_queue=5, retry_after_s=3))
    with ThreadedServer(app) as srv, concurrent.futures.ThreadPoolExecutor(8) as pool:
        post = lambda text: httpx.post(srv.url + "/v1/refer", json={"image": image_field(), "text": text},  # noqa: E731
                                       timeout=30)
        futures = [pool.submit(post, "first")]
        assert fake.entered.wait(10)
        futures += [pool.submit(post, f"t{i}") for i in range(4)]  # 5 in flight = max_queue
        wait_until(lambda: httpx.get(srv.url + "/ready").json()["in_flight"] == 5, what="5 in flight")
        r = post("one too many")
        assert r.status_code == 503 and r.headers["retry-after"] == "3"
        assert "at capacity" in r.json()["error"] and r.json()["type"] == "Busy"
        fake.gate.set()
        assert all(f.result(30).status_code == 200 for f in futures)
        assert fake.batches[0] == ("refer", 1, None) and fake.batches[1] == ("refer", 4, None)
        metrics = httpx.get(srv.url + "/metrics").text
        assert 'pixelllm_rejected_total{reason="queue_full"} 1.0' in metrics
        assert post("back to normal").status_code == 200


def test_per_request_timeout_gives_504_and_the_worker_keeps_serving():
    fake = GateFake()
    app = create_app(fake, WorkerSettings(max_wait_ms=0, request_timeout_s=30))
    with ThreadedServer(app) as srv, concurrent.futures.ThreadPoolExecutor(2) as pool:
        blocker = pool.submit(httpx.post, srv.url + "/v1/caption", json={"image": image_field()}, timeout=30)
        assert fake.entered.wait(10)
        r = httpx.post(srv.url + "/v1/refer", json={"image": image_field(), "text": "late", "timeout_s": 0.2},
                       timeout=30)
        assert r.status_code == 504 and "no answer within 0.2 s" in r.json()["error"]
        fake.gate.set()
        assert blocker.result(30).status_code == 200
        ok = httpx.post(srv.url + "/v1/refer", json={"image": image_field(), "text": "x"}, timeout=30)
        assert ok.status_code == 200
        assert all(b[0] != "refer" or b[1] == 1 for b in fake.batches)
        assert len([b for b in fake.batches if b[0] == "refer"]) == 1  # the timed-out job never ran


# ---- adapters ------------------------------------------------------------------------------------------

def _adapter_dir(tmp_path, names):
    for n in names:
        (tmp_path / n).mkdir()
        (tmp_path / n / "adapter_config.json").write_text("{}")
    return tmp_path


def test_adapter_lru_loads_on_demand_and_evicts_least_recently_used(tmp_path):
    fake = AdapterFake()
    lru = AdapterLRU(fake, [_adapter_dir(tmp_path, ["a", "b", "c"])], max_loaded=2)
    for name in ["a", "b", "a", "c", None, "a"]:
        lru.activate(name)
    assert fake.adapter_log == [("load", "a"), ("load", "b"), ("unload", "b"), ("load", "c")]
    assert lru.loaded == ["a", "c"] and lru.evictions == 1
    with pytest.raises(AdapterNotFoundError, match="unknown adapter 'zzz'"):
        lru.activate("zzz")
    with pytest.raises(AdapterNotFoundError, match="not valid"):
        lru.activate("../a")


def test_adapters_over_http_batched_per_adapter(tmp_path, make_client):
    fake = AdapterFake()
    c = make_client(fake, adapter_dir=str(_adapter_dir(tmp_path, ["proj-1", "proj-2"])), max_adapters=1)
    for adapter in ["proj-1", "proj-2", "proj-1", None]:
        body = {"image": image_field(), "text": "x"} | ({"adapter": adapter} if adapter else {})
        r = c.post("/v1/refer", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["model_version"] == "fake-1"
    assert ("adapter", "proj-2") in fake.calls
    assert fake.adapter_log == [("load", "proj-1"), ("unload", "proj-1"), ("load", "proj-2"),
                                ("unload", "proj-2"), ("load", "proj-1")]
    r = c.post("/v1/refer", json={"image": image_field(), "text": "x", "adapter": "nope"})
    assert r.status_code == 404 and "unknown adapter 'nope'" in r.json()["error"]


def test_batcher_can_refuse_when_stopping():
    batcher = DynamicBatcher(FakePredictor, max_batch_size=2)
    batcher.stop()
    with pytest.raises(ShuttingDown):
        batcher.submit_threadsafe(Job("refer", _img(), ["x"]))


def test_a_lone_request_goes_at_once_but_waits_for_announced_company():
    fake = FakePredictor()
    batcher = DynamicBatcher(lambda: fake, max_batch_size=2, max_wait_ms=60_000)
    batcher.start()
    try:
        assert batcher.wait_ready(10)
        # nobody else coming: no 60 s wait
        assert batcher.submit_threadsafe(Job("refer", _img(), ["alone"])).result(20)[0][0].text == "alone"
        # another request is admitted and still decoding: the first one waits for it and they share a call
        batcher.expect()
        first = batcher.submit_threadsafe(Job("refer", _img(), ["a"]))
        second = batcher.submit_threadsafe(Job("refer", _img(), ["b"]), announced=True)
        assert first.result(20) and second.result(20)
        assert fake.calls == [("refer", 1), ("refer", 2)]
        # an announced request that fails while decoding releases the wait
        batcher.expect()
        third = batcher.submit_threadsafe(Job("refer", _img(), ["c"]))
        batcher.unexpect()
        assert third.result(20)[0][0].text == "c" and fake.calls[-1] == ("refer", 1)
    finally:
        batcher.stop()


def test_warmup_sizes_cover_every_power_of_two_and_the_maximum():
    from pixelllm_plugins.serving.batcher import warmup_sizes

    assert warmup_sizes(1) == [1]
    assert warmup_sizes(8) == [1, 2, 4, 8]
    assert warmup_sizes(12) == [1, 2, 4, 8, 12]


def test_warmup_auto_only_on_cuda():
    import torch

    from pixelllm_plugins.serving.batcher import wants_warmup

    class OnDevice(FakePredictor):
        def __init__(self, device):
            super().__init__()
            self.device = torch.device(device)

    assert wants_warmup("auto", OnDevice("cuda")) and not wants_warmup("auto", OnDevice("cpu"))
    assert not wants_warmup("auto", FakePredictor())  # remote or fake predictors have no device
    assert wants_warmup("on", FakePredictor()) and not wants_warmup("off", OnDevice("cuda"))
    with pytest.raises(ValueError, match="warmup"):
        WorkerSettings(warmup="sometimes")
    assert WorkerSettings.from_env({"PIXELLLM_WORKER_WARMUP": "off"}).warmup == "off"


def test_warmup_runs_each_batch_size_on_distinct_images_before_ready():
    class Recording(GateFake):
        def __init__(self):
            super().__init__()
            self.gate.set()
            self.distinct: list[int] = []
            self.cleared = 0

        def refer(self, images, texts, *, adapter=None):
            self.distinct.append(len({im.tobytes() for im in images}))
            return super().refer(images, texts, adapter=adapter)

        def clear_cache(self):
            self.cleared += 1

    fake = Recording()
    batcher = DynamicBatcher(lambda: fake, max_batch_size=6, max_wait_ms=0, warmup="on")
    batcher.start()
    try:
        assert batcher.wait_ready(10)
        # ready only after the warm-up: every size ran once, each image different, the cache dropped
        assert fake.batches == [("refer", n, None) for n in (1, 2, 4, 6)]
        assert fake.distinct == [1, 2, 4, 6] and fake.cleared == 1
        assert batcher.batches == 0  # warm-up calls are not counted as served batches
    finally:
        batcher.stop()


def test_a_failing_warmup_still_leaves_the_worker_serving():
    class Failing(FakePredictor):
        calls = 0

        def refer(self, images, texts, *, adapter=None):
            Failing.calls += 1
            if Failing.calls == 1:
                raise RuntimeError("out of memory")
            return super().refer(images, texts, adapter=adapter)

    batcher = DynamicBatcher(Failing, max_batch_size=4, max_wait_ms=0, warmup="on")
    batcher.start()
    try:
        assert batcher.wait_ready(10) and batcher.error is None
        result = batcher.submit_threadsafe(Job("refer", _img(), ["x"])).result(10)
        assert result[0][0].text == "x"
    finally:
        batcher.stop()
