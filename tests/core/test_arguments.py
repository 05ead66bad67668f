"""Predictor calls with arguments of the wrong type or length: the project's error saying what to pass, the
same in-process and through ``RemotePredictor`` (whose checks run before any request), never a bare
``TypeError`` from deep inside."""

from __future__ import annotations

import pytest
from PIL import Image

from pixelllm_plugins.errors import InvalidParameterError, InvalidPromptError, PixelLLMError
from pixelllm_plugins.inference.predictor import Predictor
from pixelllm_plugins.serving.client import RemotePredictor

IMAGE = Image.new("RGB", (64, 48), (100, 120, 140))
BOX = [[[2, 3, 30, 40]]]


@pytest.fixture(scope="module")
def local():
    return Predictor("tiny")


@pytest.fixture(scope="module")
def remote():
    with RemotePredictor("http://127.0.0.1:9", token="t") as client:  # nothing listens: checks come first
        yield client


CALLS = [
    ("refer a lone image", lambda p: p.refer(IMAGE, [["x"]]), "takes a list of images, got Image"),
    ("refer a path", lambda p: p.refer("scene.png", [["x"]]), r"wrap one image in a list: refer\(\[image\]"),
    ("refer no images", lambda p: p.refer(None, [["x"]]), "takes a list of images, got NoneType"),
    ("refer no texts", lambda p: p.refer([IMAGE], None), "text lists must be a list with one entry per image"),
    ("refer too many text lists", lambda p: p.refer([IMAGE], [["x"], ["y"]]), "got 1 images but 2 text lists"),
    ("refer texts of None", lambda p: p.refer([IMAGE], [None]), "image 0: .*texts.*None"),
    ("refer texts a number", lambda p: p.refer([IMAGE], [5]), "image 0: texts must be a list, got int"),
    ("caption a path", lambda p: p.caption("scene.png"), "caption takes a list of images, got str"),
    ("caption float beams", lambda p: p.caption([IMAGE], num_beams=1.5), "num_beams"),
    ("regions boxes a number", lambda p: p.caption_regions([IMAGE], 5), "box lists .*one entry per image, got int"),
    ("regions tokens a word", lambda p: p.caption_regions([IMAGE], BOX, max_new_tokens="many"), "max_new_tokens"),
    ("dense NaN score", lambda p: p.dense_caption([IMAGE], min_score=float("nan")), "min_score"),
    ("dense no images", lambda p: p.dense_caption(None), "takes a list of images"),
    ("segment no images", lambda p: p.segment(None, boxes=BOX), "segment takes a list of images"),
    ("segment flat labels", lambda p: p.segment([IMAGE], points=[[[10, 20]]], point_labels=[1]),
     r"point_labels must be a list with one label per point .*e\.g\. \[\[1, 0\]\]"),
]


@pytest.mark.parametrize("name,call,match", CALLS, ids=[c[0] for c in CALLS])
@pytest.mark.parametrize("which", ["local", "remote"])
def test_a_wrong_argument_is_the_projects_error(which, name, call, match, request):
    predictor = request.getfixturevalue(which)
    if which == "local" and name == "segment flat labels":
        predictor = request.getfixturevalue("segmenting")
    with pytest.raises(PixelLLMError, match=match):
        call(predictor)


@pytest.fixture(scope="module")
def segmenting():
    return Predictor(None)  # the embedded model: it has a mask decoder and reads points


def test_numbers_given_as_float_or_text_are_used_as_ints(local):
    """A checked 5.0 or "5" is 5 when it reaches the decoder (it was checked, then passed on unconverted)."""
    (by_float,) = local.caption_regions([IMAGE], BOX, max_new_tokens=5.0, num_beams=2.0)
    (by_text,) = local.caption_regions([IMAGE], BOX, max_new_tokens="5", num_beams="2")
    (by_int,) = local.caption_regions([IMAGE], BOX, max_new_tokens=5, num_beams=2)
    assert [c.text for c in by_float] == [c.text for c in by_text] == [c.text for c in by_int]
    assert local.dense_caption([IMAGE], max_new_tokens="4") == local.dense_caption([IMAGE], max_new_tokens=4)


def test_no_images_is_no_answers(local):
    assert local.refer([], []) == [] and local.caption([]) == [] and local.dense_caption([]) == []
    assert local.caption_regions([], []) == [] and local.trace_points([], []) == []


@pytest.mark.parametrize("adapter,match", [(5, "got int"), (["a"], "got list"), ("", "is empty"), ("  ", "is empty")])
def test_an_adapter_must_be_a_name_or_folder(local, adapter, match):
    with pytest.raises(InvalidPromptError, match=f"adapter.*{match}"):
        local.refer([IMAGE], [["x"]], adapter=adapter)
    with pytest.raises(InvalidPromptError, match="load_adapter's path"):
        local.load_adapter(None)


@pytest.mark.parametrize("device,match", [("gpu7", "unknown device 'gpu7'"), ("cuda:3", "devices here: cpu")])
def test_an_unknown_or_absent_device_is_named(device, match):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(InvalidParameterError, match=match):
        Predictor("tiny", device=device)


def test_a_prompt_of_invisible_characters_is_empty(local):
    with pytest.raises(InvalidPromptError, match="image 0 text 0: text is empty"):
        local.refer([IMAGE], [["\u200b\u200b"]])
