"""``OnModelThread``: one thread does all of a predictor's model work, whoever calls; ``get_predictor`` gives
plugins such a predictor."""

from __future__ import annotations

import threading

import pytest

from pixelllm_plugins.errors import InvalidPromptError
from pixelllm_plugins.inference.model_thread import OnModelThread


class Recorder:
    """Stands in for a Predictor: notes the thread of every call."""

    model_version = "fake-1"

    def __init__(self):
        self.threads = {"__init__": threading.current_thread()}

    def refer(self, images, texts):
        self.threads["refer"] = threading.current_thread()
        if texts == [[""]]:
            raise InvalidPromptError("empty text")
        return [[["box"]]]

    def prepare(self, image):
        self.threads["prepare"] = threading.current_thread()
        return image


def _on_a_thread(fn):
    out = []
    thread = threading.Thread(target=lambda: out.append(fn()))
    thread.start()
    thread.join()
    return out[0]


def test_loading_and_every_call_run_on_the_model_thread_whoever_calls():
    p = OnModelThread(Recorder)
    model_thread = p.wrapped.threads["__init__"]
    assert model_thread is not threading.current_thread() and model_thread.name.startswith("pixelllm-model")
    assert p.refer(["img"], [["a"]]) == [[["box"]]] and p.wrapped.threads["refer"] is model_thread
    p.wrapped.threads.pop("refer")
    assert _on_a_thread(lambda: p.refer(["img"], [["a"]])) == [[["box"]]]
    assert p.wrapped.threads["refer"] is model_thread
    assert p.model_version == "fake-1"  # attributes read through, callable objects too (a torch model)
    p.wrapped.model = Recorder
    assert p.model is Recorder
    p.close()


def test_prepare_stays_on_the_callers_thread_and_errors_come_back_as_raised():
    p = OnModelThread(Recorder)
    assert p.prepare("img") == "img" and p.wrapped.threads["prepare"] is threading.current_thread()
    with pytest.raises(InvalidPromptError, match="empty text"):
        p.refer(["img"], [[""]])
    assert p.run(lambda: p.refer(["img"], [["a"]])) == [[["box"]]]  # a call from the model thread runs there
    p.close()


def test_get_predictor_gives_plugins_a_predictor_on_its_own_thread(tiny_checkpoint, scene_files):
    from pixelllm_plugins.inference.predictor import Predictor
    from pixelllm_plugins.predictors import get_predictor, release_predictors

    release_predictors()
    try:
        shared = get_predictor(str(tiny_checkpoint), device="cpu")
        plain = get_predictor(str(tiny_checkpoint), device="cpu", own_thread=False)
        assert isinstance(shared, OnModelThread) and isinstance(shared.wrapped, Predictor)
        assert isinstance(plain, Predictor) and get_predictor(str(tiny_checkpoint), device="cpu") is shared
        image = str(scene_files[0])
        a = _on_a_thread(lambda: shared.refer([image], [["the red circle"]])[0][0][0])
        b = plain.refer([image], [["the red circle"]])[0][0][0]
        assert a.box_xyxy == b.box_xyxy and a.score == b.score and a.model_version == b.model_version
    finally:
        assert release_predictors() == 2
