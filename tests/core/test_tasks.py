"""The task registry (``inference.tasks``): one spec per Predictor method, and ``run_isolated``."""

from __future__ import annotations

import pytest
from fakes import FakePredictor
from PIL import Image

from pixelllm_plugins.errors import InvalidBoxError, PixelLLMError
from pixelllm_plugins.inference.protocol import PredictorProtocol
from pixelllm_plugins.inference.tasks import TASKS, ResultCountError, run_isolated, task_spec


def _img(w=64, h=48):
    return Image.new("RGB", (w, h), (90, 90, 90))


def test_one_spec_per_predictor_method_and_route():
    assert list(TASKS) == ["refer", "caption_regions", "caption", "dense_caption", "segment"]
    for name, spec in TASKS.items():
        assert spec.name == name and spec.route == f"/v1/{name}"
        assert callable(getattr(PredictorProtocol, name))
    with pytest.raises(ValueError, match="unknown task 'caption_trace'"):
        task_spec("caption_trace")


def test_spec_call_passes_per_image_arguments_and_options():
    fake = FakePredictor()
    refer = TASKS["refer"].call(fake, [_img(), _img()], [["a"], ["b", "c"]], adapter=None)
    assert [len(r) for r in refer] == [1, 2] and refer[1][1][0].text == "c"
    caption = TASKS["caption"].call(fake, [_img()], trace=False, num_beams=1)
    assert caption[0].words == []
    regions = TASKS["caption_regions"].call(fake, [_img()], [[[0, 0, 10, 10]]], max_new_tokens=5)
    assert regions[0][0].text == "region 0"
    assert len(TASKS["dense_caption"].call(fake, [_img()], min_score=0.7)[0]) == 1
    assert fake.calls == [("refer", 2), ("caption", 1), ("caption_regions", 1), ("dense_caption", 1)]
    with pytest.raises(TypeError, match="not trace"):
        TASKS["refer"].call(fake, [_img()], [["a"]], trace=True)
    with pytest.raises(TypeError, match="needs the boxes"):
        TASKS["caption_regions"].call(fake, [_img()])


def test_run_isolated_runs_a_failing_batch_item_by_item():
    calls = []

    def call(chunk):
        calls.append(list(chunk))
        if "bad" in chunk:
            raise InvalidBoxError("a bad box")
        return [x.upper() for x in chunk]

    retried = []
    out = run_isolated(call, ["a", "bad", "c"], on_retry=lambda n, exc: retried.append((n, str(exc))))
    assert out[0] == "A" and out[2] == "C" and isinstance(out[1], InvalidBoxError)
    assert calls == [["a", "bad", "c"], ["a"], ["bad"], ["c"]]
    assert retried == [(3, "a bad box")]
    assert run_isolated(call, ["x", "y"]) == ["X", "Y"] and run_isolated(call, []) == []
    (alone,) = run_isolated(call, ["bad"])  # a single item is not run twice
    assert isinstance(alone, InvalidBoxError) and calls[-1] == ["bad"]


def test_run_isolated_reraises_what_it_does_not_isolate_and_checks_the_count():
    def crash(chunk):
        raise ZeroDivisionError("a bug")

    with pytest.raises(ZeroDivisionError):
        run_isolated(crash, [1, 2], isolate=PixelLLMError)
    with pytest.raises(KeyboardInterrupt):
        run_isolated(lambda chunk: (_ for _ in ()).throw(KeyboardInterrupt()), [1])

    def short(chunk):  # one result too few for a batch, right for one item alone
        return chunk[:-1] if len(chunk) > 1 else chunk

    assert run_isolated(short, [1, 2, 3], isolate=PixelLLMError) == [1, 2, 3]
    (wrong,) = run_isolated(lambda chunk: [], [1], isolate=PixelLLMError)
    assert isinstance(wrong, ResultCountError) and "0 results for 1" in str(wrong)
