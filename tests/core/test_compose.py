"""Whole-image captions composed from region captions (inference.compose, Predictor.caption(from_regions=))."""

from __future__ import annotations

import pytest

from pixelllm_plugins.inference.compose import align_words, compose_caption
from pixelllm_plugins.inference.results import RegionCaption


def test_objects_left_to_right_with_articles():
    c = compose_caption(["large red circle", "an orange star", "small blue square"], order=[50.0, 90.0, 10.0])
    assert c.text == "in this image there are a small blue square, a large red circle and an orange star."
    owners = [k for w, k in c.words if w in ("square", "circle", "star")]
    assert owners == [2, 0, 1]


def test_one_object_an_before_a_vowel_and_nothing_found():
    assert compose_caption(["orange cross"]).text == "in this image there is an orange cross."
    assert compose_caption([]).text == "" and compose_caption(["  ", "."]).words == []


def test_align_words_follows_the_composed_words_and_skips_strangers():
    c = compose_caption(["red circle", "blue square"], order=[0, 1])
    traced = [w for w, _ in c.words]
    assert align_words(traced, c.words) == [k for _, k in c.words]
    owners = align_words(["in", "this", "zebra", "red", "circle", "and", "a", "blue"], c.words)
    assert owners[2] is None and owners[3:5] == [0, 0] and owners[-1] == 1


@pytest.fixture()
def found_regions(monkeypatch, tiny_predictor):
    boxes = {"small blue square": (100.0, 60.0, 150.0, 110.0), "large red circle": (10.0, 20.0, 70.0, 80.0)}

    def dense(images, **kw):
        return [[RegionCaption(b, t, 0.5) for t, b in boxes.items()] for _ in images]

    monkeypatch.setattr(tiny_predictor, "dense_caption", dense)
    return boxes


def test_a_composed_caption_points_each_object_word_at_its_box(tiny_predictor, scene_files, found_regions):
    (cap,) = tiny_predictor.caption([scene_files[0]], trace=True)
    assert cap.text == "in this image there are a large red circle and a small blue square."
    assert cap.score == 0.5
    assert "".join(w.text for w in cap.words) == cap.text.replace(" ", "")
    by_word = {w.text: w.box_xyxy for w in cap.words}
    assert by_word["circle"] == found_regions["large red circle"]
    assert by_word["square"] == found_regions["small blue square"]
    for w in cap.words:  # filler words keep the model's own pointer, inside the image
        x1, y1, x2, y2 = w.box_xyxy
        assert 0 <= x1 <= x2 <= 160 and 0 <= y1 <= y2 <= 120 and len(w.points) == 2
    (plain,) = tiny_predictor.caption([scene_files[0]], trace=False)
    assert plain.text == cap.text and plain.words == []


def test_free_caption_and_the_fallback_when_nothing_is_found(tiny_predictor, scene_files, monkeypatch):
    free = tiny_predictor.caption(scene_files[:2], trace=False, max_new_tokens=8, from_regions=False)
    monkeypatch.setattr(tiny_predictor, "dense_caption", lambda images, **kw: [[] for _ in images])
    fallback = tiny_predictor.caption(scene_files[:2], trace=False, max_new_tokens=8)
    assert [c.text for c in fallback] == [c.text for c in free]


def test_a_list_longer_than_the_text_length_keeps_every_word(tiny_predictor, scene_files, monkeypatch):
    names = [f"{s} {c} {shape}" for s, c, shape in
             [("small", "red", "circle"), ("large", "blue", "square"), ("small", "green", "star"),
              ("large", "white", "cross"), ("small", "black", "ring"), ("large", "orange", "hexagon"),
              ("small", "purple", "diamond"), ("large", "yellow", "triangle")]]
    regions = [RegionCaption((4.0 + 18 * k, 10.0, 16.0 + 18 * k, 30.0), t, 0.4) for k, t in enumerate(names)]
    monkeypatch.setattr(tiny_predictor, "dense_caption", lambda images, **kw: [regions for _ in images])
    (cap,) = tiny_predictor.caption([scene_files[0]], trace=True)
    assert len(cap.text.split()) > tiny_predictor.config.language.max_text_tokens
    assert "".join(w.text for w in cap.words) == cap.text.replace(" ", "")
    last = [w for w in cap.words if w.text in ("yellow", "triangle")]
    assert [w.box_xyxy for w in last] == [regions[-1].box_xyxy] * 2
