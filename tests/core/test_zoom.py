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


def _config(preset: str, changes: dict):
    """``preset``'s config with ``{"section.field": value}`` changes."""
    config = get_preset(preset)
    for name, value in changes.items():
        section, key = name.split(".")
        setattr(getattr(config, section), key, value)
    return config


TINY16 = {"vision.patch_size": 16}
NO_VOTES = {"prompt.zoom_words": 0.0, "heads.candidate_words": 0.0}


@pytest.mark.parametrize("preset, changes, match", [
    ("tiny", TINY16 | {"prompt.map_tokens": 0, "prompt.zoom": 32}, "prompt.zoom"),
    ("tiny", TINY16 | {"prompt.map_tokens": 2, "prompt.zoom": 12}, "prompt.zoom"),  # not a multiple of 8
    ("tiny", {"heads.point_mode": "mlp", "heads.candidate_zoom": 32}, "heads.candidate_zoom"),
    ("tiny", {"heads.point_mode": "grid", "heads.relation_layers": 0, "heads.candidate_zoom": 32},
     "heads.candidate_zoom"),
    ("tiny", {"heads.point_mode": "grid", "heads.relation_layers": 1, "heads.candidate_zoom": 20},
     "heads.candidate_zoom"),
    ("synth-small", {"prompt.zoom_words": -1.0}, "prompt.zoom_words"),
    ("synth-small", {"prompt.zoom_words": float("nan")}, "prompt.zoom_words"),
    ("synth-small", {"heads.candidate_words": 0.0, "prompt.zoom": 0}, "prompt.zoom_words"),
    ("synth-small", {"heads.candidate_words": 0.0, "heads.box_words": False}, "prompt.zoom_words"),
    ("synth-small", {"heads.candidate_words": -1.0}, "heads.candidate_words"),
    ("synth-small", {"prompt.zoom_views": 3}, "prompt.zoom_views"),
    ("synth-small", NO_VOTES | {"heads.candidate_words": 1.0, "heads.box_words": False}, "heads.candidate_words"),
    ("synth-small", NO_VOTES | {"heads.candidate_words": 1.0, "prompt.zoom": 0}, "heads.candidate_words"),
])
def test_zoom_options_check_what_they_need(preset, changes, match):
    """The zoom needs map tokens, the candidate zoom the relation layers (crops a multiple of 8); both votes
    need the zoom's word head (box_words), the candidates' vote the grid head; weights finite and >= 0."""
    with pytest.raises(PixelLLMError, match=match):
        _config(preset, changes).validate()


def test_zoom_options_pass_their_checks_when_they_have_what_they_need():
    _config("tiny", {"heads.point_mode": "grid", "heads.relation_layers": 1, "heads.candidate_zoom": 16}).validate()
    _config("synth-small", {"prompt.zoom_words": 2.0, "heads.candidate_words": 0.5}).validate()


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


def test_word_log_probs_over_quarter_turns_do_not_depend_on_how_the_image_is_turned():
    torch.manual_seed(0)
    zoom = ZoomEncoder(16, num_tokens=2, output_dim=8, vocab_size=6)
    pixels = torch.randn(1, 3, 32, 32)
    whole, index = torch.tensor([[0.0, 0.0, 1.0, 1.0]]), torch.tensor([0])
    turned = torch.rot90(pixels, 1, dims=(2, 3))
    with torch.no_grad():
        for views in (4, 8):
            torch.testing.assert_close(zoom.word_log_probs(turned, whole, index, views),
                                       zoom.word_log_probs(pixels, whole, index, views), atol=1e-5, rtol=0)
        one = zoom.word_log_probs(pixels, whole, index, 1)
        assert not torch.allclose(zoom.word_log_probs(turned, whole, index, 1), one, atol=1e-5)
        torch.testing.assert_close(one, torch.log_softmax(zoom.word_logits(pixels, whole, index), -1))
        mirrored = zoom.word_log_probs(pixels.flip(-1), whole, index, 2)
        torch.testing.assert_close(mirrored, zoom.word_log_probs(pixels, whole, index, 2), atol=1e-5, rtol=0)


def test_candidate_vote_favours_candidates_showing_the_text_words(monkeypatch):
    from pixelllm_plugins.modeling.extensions.zoom import SEEN, VOTE_FLOOR

    zoom = ZoomEncoder(16, num_tokens=2, output_dim=8, vocab_size=6)
    # two candidates: the head reads word 2 on the first (and a little of word 3), word 3 on the second
    logits = torch.tensor([[0.0, 0.0, 9.0, 7.0, 0.0, 0.0], [0.0, 0.0, 0.0, 9.0, 0.0, 0.0]])
    monkeypatch.setattr(zoom, "word_log_probs", lambda pixels, boxes01, index: torch.log_softmax(logits, -1))
    boxes = torch.tensor([[[0.0, 0.0, 0.4, 1.0], [0.6, 0.0, 1.0, 1.0]]])  # one image, two candidates
    ids = torch.tensor([[2, 0], [3, 0], [5, 0], [2, 7], [2, 3]])  # 2; 3; a word nobody shows; 2 + a new word; both
    mask = torch.tensor([[True, False], [True, False], [True, False], [True, True], [True, True]])
    vote = zoom.candidate_vote(torch.zeros(1, 3, 32, 32), boxes, torch.zeros(5, dtype=torch.long), ids, mask, 2.0)
    logp = torch.log_softmax(logits, -1)
    assert vote.shape == (5, 2)
    assert vote[0, 0] == 0 and vote[0, 1].item() == pytest.approx(2.0 * VOTE_FLOOR)  # 9 below: floored
    assert vote[1, 1] == 0 and vote[1, 0].item() == pytest.approx(2.0 * (logp[0, 3] - logp[1, 3]).item())
    assert logp[:, 5].max() < SEEN and torch.equal(vote[2], torch.zeros(2))  # nobody shows it: no vote
    torch.testing.assert_close(vote[3], vote[0])  # a word outside the head's vocabulary never counts
    torch.testing.assert_close(vote[4], (vote[0] + vote[1]) / 2)  # the mean over the words


def test_refer_takes_the_candidate_the_vote_favours_and_captions_do_not_see_it(tmp_path, monkeypatch):
    """With heads.candidate_words, refer adds the vote to the grid head's cell scores: a vote for the image's
    second candidate (every other cell at the floor) makes it the answer. Region captions are as before."""
    from PIL import Image

    from pixelllm_plugins.checkpoint import load_pretrained, save_pretrained
    from pixelllm_plugins.inference.predictor import Predictor
    from pixelllm_plugins.modeling.extensions.zoom import VOTE_FLOOR
    from pixelllm_plugins.modeling.heads import ProposalHead

    torch.manual_seed(0)
    model, tokenizer, _ = load_pretrained("synth-small")
    model.config.prompt.zoom_words, model.config.heads.candidate_words = 0.0, 0.0
    save_pretrained(model, tokenizer, tmp_path / "plain")
    model.config.heads.candidate_words = 100.0
    save_pretrained(model, tokenizer, tmp_path / "voting")
    plain, voting = Predictor(tmp_path / "plain"), Predictor(tmp_path / "voting")
    image = Image.new("RGB", (192, 192), (255, 255, 255))
    assert plain.model.refer_word_vote(*([None] * 5)) is None  # off: nothing to compute
    calls = []
    loaded = voting._load([image])
    embedding, sizes = voting._embed(loaded), voting._sizes(loaded)
    head = voting.model.point_head
    _, cells = head.top_candidates(head.candidates(embedding.maps, sizes))
    cell_boxes = ProposalHead.cell_boxes(embedding.maps, voting.model.canvas_size)[0] * 192 / voting.model.canvas_size
    for k in (1, 2):
        def favour(pixels, boxes01, image_index, word_ids, word_mask, weight, k=k):
            calls.append(word_ids.tolist())
            vote = torch.full((len(image_index), boxes01.shape[1]), weight * VOTE_FLOOR)
            vote[:, k] = 0.0
            return vote

        monkeypatch.setattr(voting.model.zoom, "candidate_vote", favour)
        got = voting.refer([image], [["the hexagon"]])[0][0][0].box_xyxy
        # (the head's per-token refinement moves the picked box a little at most)
        assert got == pytest.approx(cell_boxes[cells[0, k]].tolist(), abs=1.5)
    assert cell_boxes[cells[0, 1]].sub(cell_boxes[cells[0, 2]]).abs().max() > 3  # two different answers
    assert calls == [[tokenizer.encode("the hexagon", add_eos=False)]] * 2  # the words, without BOS and EOS
    box = [[20.0, 20.0, 90.0, 90.0]]
    assert (voting.caption_regions([image], [box], max_new_tokens=4)[0][0].text
            == plain.caption_regions([image], [box], max_new_tokens=4)[0][0].text)
    assert len(calls) == 2
