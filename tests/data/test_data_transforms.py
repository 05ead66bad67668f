"""Transforms keep every box on the pixels it described; crops drop whole prompts, never desync them."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from pixelllm_plugins.config import VisionConfig
from pixelllm_plugins.data.collate import collate
from pixelllm_plugins.data.transforms import AugmentConfig, eval_transform, train_transform
from pixelllm_plugins.data.types import AnnotationWarning, GroundedSample, PromptRecord

RED, GREEN, BG = (250, 10, 10), (10, 250, 10), (50, 50, 50)
A = (60.0, 40.0, 140.0, 120.0)
B = (200.0, 100.0, 280.0, 180.0)
VISION = VisionConfig(image_size=96)


def _image() -> Image.Image:
    img = Image.new("RGB", (300, 200), BG)
    d = ImageDraw.Draw(img)
    d.rectangle((A[0], A[1], A[2] - 1, A[3] - 1), fill=RED)
    d.rectangle((B[0], B[1], B[2] - 1, B[3] - 1), fill=GREEN)
    return img


def _sample(image=None) -> GroundedSample:
    rel_b = (B[0] / 300, B[1] / 200, B[2] / 300, B[3] / 200)
    prompts = [PromptRecord("refer", "the red square", target_box=A),
               PromptRecord("refer", "the green square", target_box=B),
               PromptRecord("region", "red square", box=A, target_box=A),
               PromptRecord("trace", "green", utterances=("green",), utterance_valid=(True,),
                            utterance_boxes_rel=(rel_b,))]
    return GroundedSample(image if image is not None else _image(), prompts, [A, B], 300, 200, "x")


def _pixels(ts) -> np.ndarray:
    mean = torch.tensor(VISION.pixel_mean).view(3, 1, 1)
    std = torch.tensor(VISION.pixel_std).view(3, 1, 1)
    return ((ts.pixel_values * std + mean) * 255).permute(1, 2, 0).numpy()


def _check_box(px: np.ndarray, box, color, w: float, h: float):
    x1, y1, x2, y2 = box
    inner = px[math.ceil(y1) + 1: math.floor(y2) - 1, math.ceil(x1) + 1: math.floor(x2) - 1]
    assert inner.size, box
    assert np.abs(inner - color).max() < 12, (box, inner.reshape(-1, 3)[:3])
    # just outside the box (where that is still inside the image) the colour is gone
    for x, y in (((x1 + x2) / 2, y1 - 3), ((x1 + x2) / 2, y2 + 2), (x1 - 3, (y1 + y2) / 2), (x2 + 2, (y1 + y2) / 2)):
        if 0 <= x < w - 1 and 0 <= y < h - 1:
            assert np.abs(px[int(y), int(x)] - color).max() > 60, (box, x, y)


def _color_of(text: str):
    return RED if "red" in text else GREEN


@pytest.mark.parametrize("seed", range(12))
def test_train_transform_keeps_boxes_on_their_pixels(seed):
    ts = train_transform(_sample(), VISION, AugmentConfig(scale=(0.5, 2.0), hflip=0.5, min_visible=0.3),
                         torch.Generator().manual_seed(seed))
    w, h = ts.image_size
    px = _pixels(ts)
    assert ts.pixel_values.shape == (3, 96, 96) and ts.pixel_values.dtype == torch.float32
    assert w <= 96 and h <= 96
    assert torch.all(ts.pixel_values[:, int(h):, :] == 0) and torch.all(ts.pixel_values[:, :, int(w):] == 0)
    assert ts.prompts, "a crop that drops every prompt is re-drawn"
    for p in ts.prompts:
        if p.task in ("refer", "region"):
            _check_box(px, p.target_box, _color_of(p.text), w, h)
            if p.task == "region":
                assert p.box == p.target_box
            else:
                assert p.box is None
        elif p.task == "trace":
            rel = p.utterance_boxes_rel[0]
            if rel is not None:
                _check_box(px, (rel[0] * w, rel[1] * h, rel[2] * w, rel[3] * h), GREEN, w, h)
    for box in ts.gt_boxes:
        x1, y1, x2, y2 = box
        center = px[int((y1 + y2) / 2), int((x1 + x2) / 2)]
        assert min(np.abs(center - RED).max(), np.abs(center - GREEN).max()) < 12


def test_crops_drop_whole_prompts_and_contexts_follow(tokenizer, tiny_config):
    tiny_config.vision = VISION
    dropped = 0
    for seed in range(20):
        ts = train_transform(_sample(), VISION, AugmentConfig(scale=(2.0, 2.0), min_visible=0.5),
                             torch.Generator().manual_seed(seed))
        refer = [p for p in ts.prompts if p.task == "refer"]
        dropped += len(refer) < 2
        batch = collate([ts], tokenizer, tiny_config)
        px = _pixels(ts)
        w, h = ts.image_size
        for n, p in enumerate(ts.prompts):
            ctx = tokenizer.decode(batch.context_ids[0, n][batch.context_mask[0, n]].tolist())
            if p.task == "refer":
                assert ctx == f"where is {p.text}"
                pos = int(batch.point_mask[0, n].nonzero()[0, 0])
                box = (batch.target_points[0, n, pos] * torch.tensor([w, h, w, h])).tolist()
                _check_box(px, box, _color_of(ctx), w, h)
    assert dropped > 0  # the crops did drop prompts, and each surviving context still matches its box


def test_transforms_are_deterministic_given_a_generator():
    aug = AugmentConfig(scale=(0.5, 2.0), hflip=0.5)
    for make in (lambda: torch.Generator().manual_seed(4), lambda: np.random.default_rng(4)):
        a = train_transform(_sample(), VISION, aug, make())
        b = train_transform(_sample(), VISION, aug, make())
        assert torch.equal(a.pixel_values, b.pixel_values) and a.prompts == b.prompts and a.gt_boxes == b.gt_boxes
    outs = {train_transform(_sample(), VISION, aug, torch.Generator().manual_seed(s)).offset for s in range(8)}
    assert len(outs) > 1


def test_eval_transform_resizes_longer_side_and_maps_back():
    ts = eval_transform(_sample(), VISION)
    assert ts.image_size == (96.0, 64.0) and ts.offset == (0.0, 0.0)
    assert len(ts.prompts) == 4 and len(ts.gt_boxes) == 2
    assert np.allclose(ts.prompts[0].target_box, [v * 0.32 for v in A])
    assert np.allclose(ts.to_original(ts.prompts[1].target_box), B)
    _check_box(_pixels(ts), ts.prompts[1].target_box, GREEN, 96, 64)


def test_flipped_sample_maps_back_to_original():
    for seed in range(10):
        ts = train_transform(_sample(), VISION, AugmentConfig(scale=(0.5, 0.5), hflip=1.0),
                             torch.Generator().manual_seed(seed))
        assert ts.flipped
        refer = {p.text: p.target_box for p in ts.prompts if p.task == "refer"}
        assert np.allclose(ts.to_original(refer["the red square"]), A, atol=1e-4)


def test_stated_size_differing_from_the_image_rescales_boxes():
    big = _sample()
    big.width, big.height = 600, 400
    big.prompts = [PromptRecord("refer", "the red square", target_box=tuple(2 * v for v in A))]
    big.gt_boxes = [tuple(2 * v for v in A)]
    with pytest.warns(AnnotationWarning, match="differs"):
        ts = eval_transform(big, VISION, image=big.load_image())
    assert np.allclose(ts.prompts[0].target_box, [v * 0.32 for v in A])


def test_text_with_sides_is_never_flipped():
    sample = _sample()
    sample.prompts = [PromptRecord("region", "red square left of the green one", box=A, target_box=A)]
    for seed in range(6):
        ts = train_transform(sample, VISION, AugmentConfig(hflip=1.0), torch.Generator().manual_seed(seed))
        assert not ts.flipped
