"""Growing a trained checkpoint with the mask decoder and point prompts (scripts/grow_model.py): every
existing output (refer boxes, caption logits, traces) stays the same."""

from __future__ import annotations

import json

import torch
from script_loader import load_script

from pixelllm_plugins.checkpoint import load_pretrained
from pixelllm_plugins.data.collate import collate
from pixelllm_plugins.data.mixture import synthetic_sources


def _script():
    return load_script("grow_model")


def test_grow_adds_decoder_and_points_keeping_boxes_and_captions(tiny_checkpoint, tiny_data, tmp_path, capsys):
    dst = tmp_path / "grown"
    assert _script().main([str(tiny_checkpoint), str(dst), "heads.mask_decoder=3", "prompt.points=true"]) == 0
    assert str(dst) in capsys.readouterr().out
    source, tokenizer, _ = load_pretrained(tiny_checkpoint)
    grown, _, _ = load_pretrained(dst)
    assert source.mask_decoder is None and grown.mask_decoder is not None
    assert grown.mask_decoder.num_masks == 3 and grown.config.prompt.points
    assert grown.prompt_encoder.point_embed is not None
    meta = json.loads((dst / "meta.json").read_text())
    assert meta["grown_with"] == {"heads.mask_decoder": 3, "prompt.points": True}
    kept, new = source.state_dict(), grown.state_dict()
    assert all(torch.equal(new[k], v) for k, v in kept.items())
    sources = {s.name: s for s in synthetic_sources(tiny_data, "train")}
    for name in ("refer", "region", "trace", "caption"):
        batch = collate(sources[name].samples[:3], tokenizer, source.config)
        with torch.no_grad():
            want, got = source(batch), grown(batch)
        assert torch.equal(got.points, want.points)  # refer boxes (and region/trace points)
        assert torch.equal(got.logits, want.logits)  # captions
        assert torch.equal(got.confidence, want.confidence)
    # the refer answer: the box at the token before EOS
    with torch.no_grad():
        batch = collate(sources["refer"].samples[:2], tokenizer, source.config)
        a, b = source(batch), grown(batch)
        last = batch.text_mask.sum(-1) - 2
        pick = last.clamp(min=0)[..., None, None].expand(-1, -1, 1, 4)
        assert torch.equal(a.points.gather(2, pick), b.points.gather(2, pick))
    # the new parts answer masks, with and without points
    with torch.no_grad():
        emb = grown.embed_images(batch.pixel_values)
        boxes = torch.tensor([[4.0, 4.0, 40.0, 40.0]])
        logits, iou = grown.prompt_masks(emb, boxes, torch.tensor([0]))
        with_point = grown.prompt_masks(emb, boxes, torch.tensor([0]), points=torch.tensor([[[20.0, 20.0]]]),
                                        point_labels=torch.tensor([[1]]))[0]
    assert logits.shape == with_point.shape == (1, 3, 16, 16) and iou.shape == (1, 3)


def test_grow_from_a_preset_name(tmp_path):
    assert _script().main(["tiny", str(tmp_path / "seg"), "heads.mask_decoder=2"]) == 0
    model, _, _ = load_pretrained(tmp_path / "seg")
    assert model.mask_decoder is not None and model.mask_decoder.num_masks == 2
