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


def test_word_vote_is_relative_to_the_favourite_word_and_floored():
    from pixelllm_plugins.modeling.extensions.zoom import VOTE_FLOOR

    zoom = ZoomEncoder(16, num_tokens=2, output_dim=8, vocab_size=6)
    with torch.no_grad():
        zoom.words[1].weight.zero_()
        zoom.words[1].bias.copy_(torch.tensor([0.0, 1.0, 5.0, -20.0, 0.0, 0.0]))
    vote = zoom.word_vote(torch.randn(1, 3, 32, 32), torch.tensor([[0.1, 0.1, 0.5, 0.5]]), torch.tensor([0]), 2.0)
    assert vote.shape == (1, 6) and vote[0, 2] == 0 and torch.all(vote <= 0)
    assert vote[0, 1].item() == pytest.approx(2.0 * -4.0)  # 4 below the favourite: the floor
    assert vote[0, 3].item() == pytest.approx(2.0 * VOTE_FLOOR)
    assert VOTE_FLOOR == -4.0


def test_zoom_words_needs_the_zoom_word_head():
    config = get_preset("synth-small")
    config.prompt.zoom_words = 1.0
    config.validate()
    for change in ({"zoom_words": -1.0}, {"zoom_words": float("nan")}, {"zoom": 0}):
        config = get_preset("synth-small")
        config.prompt.zoom_words = 1.0
        for key, value in change.items():
            setattr(config.prompt, key, value)
        with pytest.raises(PixelLLMError, match="prompt.zoom_words"):
            config.validate()
    config = get_preset("synth-small")
    config.prompt.zoom_words, config.heads.box_words = 1.0, False
    with pytest.raises(PixelLLMError, match="prompt.zoom_words"):
        config.validate()


def test_the_vote_steers_region_captions_and_not_whole_image_captions(tmp_path):
    """``prompt.zoom_words``: the zoom word head's favourite word wins every step of a region caption that does
    not end (weight 8, the floor -4: every other word is 32 below it; the end is not voted on), and the vote is in the teacher-forced logits too; a
    whole-image caption (no object in its box) is the same with and without the vote."""
    from PIL import Image

    from pixelllm_plugins.checkpoint import load_pretrained, save_pretrained
    from pixelllm_plugins.inference.predictor import Predictor

    torch.manual_seed(0)
    model, tokenizer, _ = load_pretrained("synth-small")
    word = tokenizer.encode("hexagon", add_eos=False)
    assert len(word) == 1
    with torch.no_grad():
        model.zoom.words[1].weight.zero_()
        model.zoom.words[1].bias.fill_(0.0)
        model.zoom.words[1].bias[word[0]] = 10.0
    model.config.prompt.zoom_words = 0.0
    save_pretrained(model, tokenizer, tmp_path / "plain")
    model.config.prompt.zoom_words = 8.0
    save_pretrained(model, tokenizer, tmp_path / "voting")
    plain, voting = Predictor(tmp_path / "plain"), Predictor(tmp_path / "voting")
    image = Image.new("RGB", (96, 80), (200, 30, 30))
    box = [[10.0, 12.0, 50.0, 60.0]]
    caption = voting.caption_regions([image], [box], max_new_tokens=3)[0][0].text
    assert caption and set(caption.split()) == {"hexagon"}
    assert plain.caption_regions([image], [box], max_new_tokens=3)[0][0].text != caption
    (ids, voted), = voting.region_text_logits(image, box, ["large red circle"])
    (_, raw), = plain.region_text_logits(image, box, ["large red circle"])
    diff = voted - raw
    assert torch.allclose(diff[:, word[0]], torch.zeros(len(ids)), atol=1e-4)  # the favourite: no change
    assert torch.allclose(diff[:, tokenizer.eos_id], torch.zeros(len(ids)), atol=1e-4)  # nor the end
    assert diff.min().item() == pytest.approx(-32.0, abs=1e-3)
    whole = [p.caption([image], from_regions=False, trace=False, max_new_tokens=5)[0].text for p in (plain, voting)]
    assert whole[0] == whole[1]
