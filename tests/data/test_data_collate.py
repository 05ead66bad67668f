"""collate -> ModelInputs: shapes, dtypes, masks and the per-task target construction."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pixelllm_plugins.data.collate import CAPTION_SHORT_PROMPT, collate, encode_prompt, utterance_assignment
from pixelllm_plugins.data.types import GroundedSample, PromptRecord
from pixelllm_plugins.modeling.inputs import ModelInputs

IMG = Image.new("RGB", (384, 192), (90, 90, 90))  # synth-small canvas 192: scale 0.5, image (192, 96)


def _refer(text="the red circle", box=(40.0, 20.0, 120.0, 100.0)):
    return PromptRecord("refer", text, target_box=box)


def _region(text="large red circle", box=(40.0, 20.0, 120.0, 100.0)):
    return PromptRecord("region", text, box=box, target_box=box)


def _trace(text="a red circle and a blue star", n_utts=7, invalid=()):
    words = text.split()[:n_utts]
    boxes = tuple(None if k in invalid else (0.1 * k, 0.1, 0.1 * k + 0.05, 0.2) for k in range(len(words)))
    return PromptRecord("trace", text, utterances=tuple(words),
                        utterance_valid=tuple(k not in invalid for k in range(len(words))), utterance_boxes_rel=boxes)


def _decode(tok, ids, mask):
    return [tok.id_to_token(i) for i in ids[mask].tolist()]


def test_shapes_dtypes_and_masks(tokenizer, config):
    samples = [GroundedSample(IMG, [_refer(), _refer("the blue star", (200, 100, 260, 160))], [(40, 20, 120, 100)]),
               GroundedSample(IMG, [_trace()]),
               GroundedSample(IMG, [_region()], [(40, 20, 120, 100), (0, 0, 10, 10), (5, 5, 50, 50)]),
               GroundedSample(IMG, [PromptRecord("caption", "two shapes")])]
    b = collate(samples, tokenizer, config)
    assert isinstance(b, ModelInputs) and b.batch_size == 4
    B, N, S = 4, 2, 192
    Tc, T = b.context_ids.shape[-1], b.text_ids.shape[-1]
    assert b.pixel_values.shape == (B, 3, S, S) and b.pixel_values.dtype == torch.float32
    assert b.image_sizes.tolist() == [[192.0, 96.0]] * 4 and b.image_sizes.dtype == torch.float32
    assert b.prompt_boxes.shape == (B, N, 4) and b.prompt_boxes.dtype == torch.float32
    for name, shape, dtype in [("prompt_mask", (B, N), torch.bool), ("context_ids", (B, N, Tc), torch.long),
                               ("context_mask", (B, N, Tc), torch.bool), ("text_ids", (B, N, T), torch.long),
                               ("text_mask", (B, N, T), torch.bool), ("target_points", (B, N, T, 4), torch.float32),
                               ("point_mask", (B, N, T), torch.bool), ("text_loss_mask", (B, N), torch.bool),
                               ("gt_boxes", (B, 3, 4), torch.float32), ("gt_boxes_mask", (B, 3), torch.bool)]:
        v = getattr(b, name)
        assert tuple(v.shape) == shape and v.dtype == dtype, name
    assert b.prompt_mask.tolist() == [[True, True], [True, False], [True, False], [True, False]]
    assert b.text_loss_mask.tolist() == [[False, False], [True, False], [True, False], [True, False]]
    assert b.gt_boxes_mask.sum(1).tolist() == [1, 0, 3, 0]
    assert torch.allclose(b.gt_boxes[0, 0], torch.tensor([40 / 384, 20 / 192, 120 / 384, 100 / 192]))
    # padded image area is zero; masks are prefixes; pads are the pad id
    assert torch.all(b.pixel_values[:, :, 96:, :] == 0)
    pad = tokenizer.pad_id
    for ids, mask in ((b.context_ids, b.context_mask), (b.text_ids, b.text_mask)):
        assert torch.all(ids[~mask] == pad)
        lengths = mask.sum(-1, keepdim=True)
        assert torch.equal(mask, torch.arange(mask.shape[-1]) < lengths)
    # every real context ends with EOS; every text starts with BOS and ends with EOS
    for bi in range(B):
        for n in range(N):
            ctx = b.context_ids[bi, n][b.context_mask[bi, n]]
            txt = b.text_ids[bi, n][b.text_mask[bi, n]]
            assert ctx[-1] == tokenizer.eos_id and txt[0] == tokenizer.bos_id and txt[-1] == tokenizer.eos_id
    # padding prompt rows carry no loss
    assert not b.point_mask[~b.prompt_mask].any() and not b.text_loss_mask[~b.prompt_mask].any()
    assert b.task == "caption+refer+region+trace"
    assert not b.point_mask[..., 0].any()  # never on BOS


def test_refer_targets(tokenizer, config):
    b = collate([GroundedSample(IMG, [_refer()])], tokenizer, config, task="refer")
    assert b.task == "refer"
    assert _decode(tokenizer, b.context_ids[0, 0], b.context_mask[0, 0]) == ["where", "is", "the", "red", "circle", "[EOS]"]
    text = _decode(tokenizer, b.text_ids[0, 0], b.text_mask[0, 0])
    assert text == ["[BOS]", "the", "red", "circle", "[EOS]"]
    assert b.point_mask[0, 0].nonzero().flatten().tolist() == [3]  # the position whose next token is EOS
    assert torch.allclose(b.target_points[0, 0, 3], torch.tensor([40 / 384, 20 / 192, 120 / 384, 100 / 192]))
    assert b.prompt_boxes[0, 0].tolist() == [0.0, 0.0, 192.0, 96.0]  # global box
    assert not b.text_loss_mask[0, 0]


def test_region_targets(tokenizer, config):
    b = collate([GroundedSample(IMG, [_region()])], tokenizer, config)
    assert tokenizer.decode(b.context_ids[0, 0][b.context_mask[0, 0]].tolist()) == "an object of"
    assert b.prompt_boxes[0, 0].tolist() == [20.0, 10.0, 60.0, 50.0]  # canvas pixels
    assert b.point_mask[0, 0].nonzero().flatten().tolist() == [1, 2, 3]  # every word position
    expected = torch.tensor([40 / 384, 20 / 192, 120 / 384, 100 / 192])
    assert all(torch.allclose(b.target_points[0, 0, t], expected) for t in (1, 2, 3))
    assert b.text_loss_mask[0, 0]


def test_caption_targets(tokenizer, config):
    b = collate([GroundedSample(IMG, [PromptRecord("caption", "two shapes")])], tokenizer, config)
    assert tokenizer.decode(b.context_ids[0, 0][b.context_mask[0, 0]].tolist()) == CAPTION_SHORT_PROMPT.strip()
    assert not b.point_mask.any() and b.text_loss_mask[0, 0]
    assert b.prompt_boxes[0, 0].tolist() == [0.0, 0.0, 192.0, 96.0]


def test_utterance_assignment_is_positional():
    # K = 3 valid utterances at 1/3, 2/3, 1; J = 6 tokens at 1/3 + (j/6)(2/3)
    assign = utterance_assignment(6, [True, True, True])
    q = 1 / 3 + np.arange(1, 7) / 6 * (2 / 3)
    expected = np.argmin((q[:, None] - np.array([1 / 3, 2 / 3, 1])[None]) ** 2, axis=1)
    assert assign.tolist() == expected.tolist() == [0, 1, 1, 1, 2, 2]
    # invalid utterances sit at -1 and are never chosen; the valid ones spread over all tokens
    assign = utterance_assignment(4, [False, True, False, True])
    assert set(assign.tolist()) <= {1, 3} and assign.tolist() == sorted(assign.tolist())
    assert utterance_assignment(3, [False, False]).tolist() == [-1, -1, -1]
    assert utterance_assignment(0, [True]).tolist() == []


def test_trace_targets_follow_the_positional_rule(tokenizer, config):
    rec = _trace("a red circle and a blue star", invalid=(2,))
    b = collate([GroundedSample(IMG, [rec])], tokenizer, config)
    assert tokenizer.decode(b.context_ids[0, 0][b.context_mask[0, 0]].tolist()) == "a long image caption :"
    ids = b.text_ids[0, 0][b.text_mask[0, 0]].tolist()
    word_positions = list(range(1, len(ids) - 1))
    assign = utterance_assignment(len(word_positions), rec.utterance_valid)
    assert 2 not in assign.tolist()
    assert b.point_mask[0, 0].nonzero().flatten().tolist() == word_positions
    for pos, utt in zip(word_positions, assign):
        assert torch.allclose(b.target_points[0, 0, pos], torch.tensor(rec.utterance_boxes_rel[utt]))
    assert b.text_loss_mask[0, 0] and b.prompt_boxes[0, 0].tolist() == [0.0, 0.0, 192.0, 96.0]


def test_trace_assignment_uses_the_untruncated_text(tokenizer, tiny_config):
    words = " ".join(["red"] * 20 + ["blue"] * 20)
    rec = PromptRecord("trace", words, utterances=("red", "blue"), utterance_valid=(True, True),
                       utterance_boxes_rel=((0.0, 0.0, 0.5, 0.5), (0.5, 0.5, 1.0, 1.0)))
    enc = encode_prompt(rec, (64.0, 64.0), tokenizer, tiny_config)
    assert len(enc.text_ids) == tiny_config.language.max_text_tokens == 24
    # assigned over all 40 tokens (20 per utterance), then truncated to the first 22: positions 1..20 keep
    # the first utterance's box (assigning over the 22 kept tokens would have split them 11 / 11)
    assert np.allclose(enc.target_points[1:21], [0.0, 0.0, 0.5, 0.5])
    assert np.allclose(enc.target_points[21:23], [0.5, 0.5, 1.0, 1.0])
    assert enc.point_mask[1:23].all() and not enc.point_mask[[0, 23]].any()


def test_truncation_and_prompt_cap(tokenizer, tiny_config):
    long = " ".join(["red circle"] * 30)
    prompts = [_refer(long)] + [_refer(f"the {c} circle") for c in ("red", "blue", "green", "white", "black")]
    img = Image.new("RGB", (128, 128))
    b = collate([GroundedSample(img, prompts)], tokenizer, tiny_config, max_prompts=3)
    assert b.prompt_mask.shape == (1, 3)
    assert b.context_ids.shape[-1] == tiny_config.language.max_context_tokens == 16
    assert b.text_ids.shape[-1] == tiny_config.language.max_text_tokens == 24
    assert b.context_ids[0, 0, -1] == tokenizer.eos_id and b.text_ids[0, 0, -1] == tokenizer.eos_id
    assert b.point_mask[0, 0].nonzero().flatten().tolist() == [22]
    g = torch.Generator().manual_seed(0)
    b = collate([GroundedSample(img, prompts)], tokenizer, tiny_config, train=True, generator=g, max_prompts=3)
    assert b.prompt_mask.sum() == 3


def test_collate_is_deterministic_in_training(tokenizer, config, synth_dir):
    from pixelllm_plugins.data.mixture import synthetic_sources

    samples = {s.name: s.samples[:4] for s in synthetic_sources(synth_dir)}
    for name, ss in samples.items():
        a = collate(ss, tokenizer, config, train=True, generator=torch.Generator().manual_seed(1))
        b = collate(ss, tokenizer, config, train=True, generator=torch.Generator().manual_seed(1))
        for f in ("pixel_values", "prompt_boxes", "text_ids", "target_points", "point_mask", "gt_boxes"):
            assert torch.equal(getattr(a, f), getattr(b, f)), (name, f)
        assert a.point_mask.any() == (name != "caption")


def test_empty_batch_is_refused(tokenizer, config):
    with pytest.raises(ValueError):
        collate([], tokenizer, config)
