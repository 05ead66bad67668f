"""The zoom extension (``prompt.zoom``): square crops around the prompt box, a no-op when grown, and trainable."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pixelllm_plugins.config import get_preset
from pixelllm_plugins.errors import PixelLLMError
from pixelllm_plugins.modeling.extensions.zoom import MARGIN, ZoomEncoder, square_crops


def test_square_crop_is_centred_on_the_box_and_keeps_its_proportions():
    boxes01 = torch.tensor([[0.25, 0.25, 0.75, 0.5], [0.0, 0.0, 1.0, 1.0]])
    grid = (square_crops(boxes01, 8) + 1) / 2  # back to 0..1 of the canvas
    # the first box is 0.5 wide and 0.25 tall: a square of side 0.6 around its centre (0.5, 0.375)
    for row, centre, side in ((0, (0.5, 0.375), 0.5 * MARGIN), (1, (0.5, 0.5), MARGIN)):
        xs, ys = grid[row, ..., 0], grid[row, ..., 1]
        assert xs.mean().item() == pytest.approx(centre[0]) and ys.mean().item() == pytest.approx(centre[1])
        assert (xs.max() - xs.min()).item() == pytest.approx(side * 7 / 8)  # sample centres, 1/8 apart
        assert (ys.max() - ys.min()).item() == pytest.approx(side * 7 / 8)
        assert torch.all(xs[:, 1:] > xs[:, :-1]) and torch.all(ys[1:] > ys[:-1])


def test_crop_reads_the_pixels_under_the_box():
    canvas = torch.zeros(1, 3, 64, 64)
    canvas[:, 0, 16:32, 40:56] = 1.0  # a red square in one corner
    crop = F.grid_sample(canvas, square_crops(torch.tensor([[40 / 64, 16 / 64, 56 / 64, 32 / 64]]), 16),
                         align_corners=False)
    assert crop[0, 0, 4:12, 4:12].min() > 0.99  # the middle of the crop is the square
    assert crop[0, 0, 0, 0] < 0.5 and crop[0, 1:].abs().max() == 0


def test_zero_started_and_gradients_reach_the_cnn():
    zoom = ZoomEncoder(16, num_tokens=4, output_dim=8)
    pixels = torch.randn(2, 3, 32, 32)
    boxes01, index = torch.tensor([[0.1, 0.1, 0.4, 0.6], [0.5, 0.2, 0.9, 0.3]]), torch.tensor([1, 0])
    visual = torch.randn(2, 6, 8)
    assert torch.equal(zoom.add_to(visual, pixels, boxes01, index), visual)
    torch.nn.init.normal_(zoom.proj.weight)
    out = zoom.add_to(visual, pixels, boxes01, index)
    assert torch.equal(out[:, :2], visual[:, :2]) and not torch.equal(out[:, 2:], visual[:, 2:])
    out.sum().backward()
    assert zoom.cnn[0].weight.grad is not None and zoom.cnn[0].weight.grad.abs().sum() > 0


def test_needs_map_tokens_and_a_multiple_of_eight():
    for prompt in ({"map_tokens": 0, "zoom": 32}, {"map_tokens": 2, "zoom": 12}):
        config = get_preset("tiny")
        config.vision.patch_size = 16
        for key, value in prompt.items():
            setattr(config.prompt, key, value)
        with pytest.raises(PixelLLMError, match="prompt.zoom"):
            config.validate()


def test_candidate_zoom_needs_the_relation_layers_and_a_multiple_of_eight():
    for heads in ({"point_mode": "mlp", "candidate_zoom": 32}, {"point_mode": "grid", "relation_layers": 0,
                  "candidate_zoom": 32}, {"point_mode": "grid", "relation_layers": 1, "candidate_zoom": 20}):
        config = get_preset("tiny")
        for key, value in heads.items():
            setattr(config.heads, key, value)
        with pytest.raises(PixelLLMError, match="heads.candidate_zoom"):
            config.validate()
    config = get_preset("tiny")
    config.heads.point_mode, config.heads.relation_layers, config.heads.candidate_zoom = "grid", 1, 16
    config.validate()
