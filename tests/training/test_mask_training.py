"""Training the mask decoder and point prompts (issue 17): batches carry masks for a model with a decoder
(refer: the RefCOCO json's, region: instances_<split>.json's), point prompts are drawn deterministically,
and a model with neither gets exactly the batches it got before."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import fields

import numpy as np
import pytest
import torch

from pixelllm_plugins.checkpoint import grow_pretrained, load_pretrained
from pixelllm_plugins.config import get_preset
from pixelllm_plugins.data.collate import MASK_STRIDE, POINT_SLOTS, _draw_points, collate, collate_for_model
from pixelllm_plugins.data.mixture import MixtureDataset, synthetic_sources
from pixelllm_plugins.data.transforms import _Rng
from pixelllm_plugins.errors import TrainingError
from pixelllm_plugins.modeling.pixel_llm import PixelLLM
from pixelllm_plugins.tokenizer import PixelTokenizer
from pixelllm_plugins.training.recipes import recipe_config
from pixelllm_plugins.training.trainer import build_sources, read_metrics, train

MASK_LOSSES = ("mask_focal", "mask_dice", "mask_iou")
TWO = {"refer": 1.0, "region": 1.0, "trace": 0.0, "caption": 0.0}  # the sources with masks


def _config(masks: int = 0, points: bool = False):
    cfg = get_preset("tiny")
    cfg.heads.mask_decoder, cfg.prompt.points = masks, points
    return cfg


def _equal(a, b) -> bool:
    for f in fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.dtype == y.dtype
                    and torch.equal(x, y)):
                return False
        elif x != y:
            return False
    return True


@pytest.fixture(scope="module")
def seg_checkpoint(tmp_path_factory):
    """A random tiny model grown with a 3-mask decoder and point prompts."""
    path = tmp_path_factory.mktemp("seg-ckpt")
    torch.manual_seed(0)
    grow_pretrained("tiny", path, {"heads.mask_decoder": 3, "prompt.points": True})
    return path


def test_region_prompts_take_the_instances_masks(tiny_data):
    plain = {s.name: s for s in synthetic_sources(tiny_data, "train", TWO)}
    masked = {s.name: s for s in synthetic_sources(tiny_data, "train", TWO, masks=True)}
    assert all(p.target_mask is None for s in plain["region"].samples for p in s.prompts)  # as before
    regions = [p for s in masked["region"].samples for p in s.prompts]
    assert regions and all(p.target_mask is not None for p in regions)  # every synthetic region is an object
    assert all(p.target_mask is not None for s in masked["refer"].samples for p in s.prompts)
    from pixelllm_plugins.masks import mask_to_box, rle_to_mask

    for p in regions[:5]:  # the mask is the region's object: its box is the region's
        x1, y1, x2, y2 = mask_to_box(rle_to_mask(p.target_mask))
        assert max(abs(x1 - p.box[0]), abs(y1 - p.box[1]), abs(x2 - p.box[2]), abs(y2 - p.box[3])) <= 2.0
    # build_sources loads them when asked (the trainer asks for a model with a decoder or points)
    sources = {s.name: s for s in build_sources(tiny_data, "train", {"region": 1}, {}, masks=True)}
    assert all(p.target_mask is not None for s in sources["region"].samples for p in s.prompts)


def test_model_without_decoder_gets_the_same_batches(tiny_data):
    tokenizer = PixelTokenizer.default()
    sources = synthetic_sources(tiny_data, "train", masks=True)
    before = synthetic_sources(tiny_data, "train")
    plain = _config()
    for points in (0.0, 0.5):  # point_prompt_prob without prompt.points changes nothing either
        new = MixtureDataset(sources, tokenizer, plain, 2, seed=3, point_prompt_prob=points)
        old = MixtureDataset(before, tokenizer, plain, 2, seed=3)
        for step in range(6):
            a, b = new.batch(step), old.batch(step)
            assert a.target_masks is None and a.prompt_points is None and _equal(a, b)
    samples = before[0].samples[:2]
    for train_ in (True, False):
        a = collate_for_model(samples, tokenizer, plain, train_, torch.Generator().manual_seed(1),
                                point_prompt_prob=1.0)
        b = collate(samples, tokenizer, plain, train_, torch.Generator().manual_seed(1))
        assert _equal(a, b)


def test_decoder_batches_carry_masks_with_the_same_draws(tiny_data):
    tokenizer = PixelTokenizer.default()
    sources = synthetic_sources(tiny_data, "train", TWO, masks=True)
    config = _config(3)
    mix, plain = MixtureDataset(sources, tokenizer, config, 2, seed=0), MixtureDataset(sources, tokenizer, _config(), 2, seed=0)
    for step in range(4):
        batch, base = mix.batch(step), plain.batch(step)
        assert batch.target_masks.shape[-1] == config.vision.image_size // MASK_STRIDE
        # every refer and region row has its mask, unless the object vanishes at the decoder's stride
        assert batch.mask_valid.equal(batch.prompt_mask & batch.target_masks.flatten(2).any(-1))
        assert batch.mask_valid.sum() >= batch.prompt_mask.sum() - 1
        assert batch.prompt_points is None  # no points asked for
        # the rest of the batch is the plain model's
        assert _equal(dataclasses.replace(batch, target_masks=None, mask_valid=None, mask_boxes=None), base)


def test_point_prompts_are_deterministic_and_on_the_object(tiny_data):
    tokenizer = PixelTokenizer.default()
    sources = synthetic_sources(tiny_data, "train", TWO, masks=True)
    config = _config(3, points=True)
    mix = MixtureDataset(sources, tokenizer, config, 2, seed=0, point_prompt_prob=0.5)
    again = MixtureDataset(sources, tokenizer, config, 2, seed=0, point_prompt_prob=0.5, start_step=5)
    boxless = MixtureDataset(sources, tokenizer, config, 2, seed=0)
    tasks, pointed, negatives, dropped = set(), 0, 0, 0
    for step in range(8):
        batch = mix.batch(step)
        assert _equal(batch, again.batch(step))  # a pure function of (seed, step): resumes exactly
        base = boxless.batch(step)  # the same batch without points
        assert _equal(dataclasses.replace(batch, prompt_points=None, prompt_point_labels=None, mask_points=None,
                                          mask_point_labels=None, prompt_boxes=base.prompt_boxes,
                                          mask_boxes=base.mask_boxes), base)
        labels, points = batch.mask_point_labels, batch.mask_points
        assert labels.shape[-1] == POINT_SLOTS and points.shape[:-1] == labels.shape
        rows = (labels >= 0).any(-1)
        assert not (rows & ~batch.prompt_mask).any()
        for b, n in rows.nonzero().tolist():
            pointed += 1
            tasks.add(batch.task)
            assert labels[b, n, 0] == 1  # a positive point first
            x1, y1, x2, y2 = base.mask_boxes[b, n].tolist()  # the object's box
            x, y = points[b, n, 0].tolist()
            assert x1 - 1 <= x <= x2 and y1 - 1 <= y <= y2
            cell = batch.target_masks[b, n]
            if not batch.mask_valid[b, n]:  # too small for a mask target at stride 4 (still a region prompt)
                continue
            s = MASK_STRIDE
            assert cell[max(0, int(y) // s - 1): int(y) // s + 2, max(0, int(x) // s - 1): int(x) // s + 2].any()
            negatives += int(labels[b, n, 1] == 0)
            w, h = batch.image_sizes[b].tolist()
            if batch.mask_boxes[b, n].tolist() == [0.0, 0.0, w, h]:
                dropped += 1
            if batch.task == "region":  # the language model's prompt is the same point (and box)
                assert torch.equal(batch.prompt_points[b, n], points[b, n])
                assert torch.equal(batch.prompt_boxes[b, n], batch.mask_boxes[b, n])
            else:  # refer: the language prompt stays the whole image, with no point on the answer
                assert (batch.prompt_point_labels[b, n] == -1).all()
                assert torch.equal(batch.prompt_boxes[b, n], base.prompt_boxes[b, n])
    assert tasks == {"refer", "region"} and pointed >= 6 and 0 < negatives < pointed and 0 < dropped < pointed
    assert not _equal(mix.batch(0), MixtureDataset(sources, tokenizer, config, 2, seed=1,
                                                   point_prompt_prob=0.5).batch(0))


def test_draw_points_positive_inside_negative_outside():
    mask = np.zeros((40, 60), bool)
    mask[10:20, 20:35] = True
    box = (20.0, 10.0, 35.0, 20.0)
    rng = _Rng(np.random.default_rng(0))
    seen_negative = False
    for _ in range(200):
        points, labels = _draw_points(rng, box, mask, 60, 40)
        assert labels[0] == 1 and mask[int(points[0][1]), int(points[0][0])]
        if len(points) > 1:
            seen_negative = True
            x, y = points[1]
            assert labels[1] == 0 and not mask[int(y), int(x)]
            assert 20 - 8 <= x <= 35 + 8 and 10 - 5 <= y <= 20 + 5  # near the object
    assert seen_negative
    # no mask: near the box centre; the negative point is outside the box
    for _ in range(50):
        points, labels = _draw_points(rng, box, None, 60, 40)
        assert abs(points[0][0] - 27.5) <= 2.5 and abs(points[0][1] - 15) <= 2
        if len(points) > 1:
            x, y = points[1]
            assert not (20 <= x + 0.5 <= 35 and 10 <= y + 0.5 <= 20)


def test_mixed_point_and_box_rows_answer_as_alone():
    """A row with only padding labels is a box-only prompt: mixing it with pointed rows changes nothing."""
    torch.manual_seed(0)
    model = PixelLLM(_config(3, points=True), 40).eval()
    emb = model.embed_images(torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)))
    boxes = torch.tensor([[4.0, 6.0, 30.0, 28.0], [20.0, 10.0, 60.0, 50.0], [0.0, 0.0, 64.0, 48.0]])
    index = torch.tensor([0, 0, 1])
    points = torch.tensor([[[10.0, 12.0], [0.0, 0.0]], [[40.0, 30.0], [2.0, 2.0]], [[5.0, 5.0], [50.0, 40.0]]])
    labels = torch.tensor([[-1, -1], [1, 0], [1, -1]])
    with torch.no_grad():
        mixed = model.prompt_tokens(emb, boxes, index, points=points, point_labels=labels)
        plain = model.prompt_tokens(emb, boxes[:1], index[:1])
        pointed = model.prompt_tokens(emb, boxes[1:], index[1:], points=points[1:], point_labels=labels[1:])
        torch.testing.assert_close(mixed[:1], plain)
        torch.testing.assert_close(mixed[1:], pointed)
        masks, iou = model.prompt_masks(emb, boxes, index, points=points, point_labels=labels)
        torch.testing.assert_close(masks[:1], model.prompt_masks(emb, boxes[:1], index[:1])[0])
        torch.testing.assert_close(iou[1:], model.prompt_masks(emb, boxes[1:], index[1:], points=points[1:],
                                                               point_labels=labels[1:])[1])


def test_tiny_decoder_overfits_one_batch_from_the_folder(tiny_data):
    tokenizer = PixelTokenizer.default()
    sources = synthetic_sources(tiny_data, "train", TWO, masks=True)
    config = _config(3, points=True)
    torch.manual_seed(0)
    model = PixelLLM(config, tokenizer.vocab_size).train()
    mix = MixtureDataset(sources, tokenizer, config, 2, seed=0, point_prompt_prob=0.5)
    batch = next(mix.batch(k) for k in range(20) if mix.batch(k).task == "region"
                 and (mix.batch(k).prompt_point_labels >= 0).any())
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    history = []
    for _ in range(25):
        out = model(batch)
        assert all(math.isfinite(out.losses[k]) for k in MASK_LOSSES)
        history.append(out.losses["mask_dice"] + out.losses["mask_focal"])
        optimizer.zero_grad()
        out.loss.backward()
        assert model.prompt_encoder.point_embed.grad.abs().sum() > 0  # the points are trained
        optimizer.step()
    assert history[-1] < 0.6 * history[0]


def test_train_with_decoder_and_points_logs_mask_losses_and_resumes_exactly(tiny_data, seg_checkpoint, tmp_path):
    values = {"data_dir": str(tiny_data), "init": str(seg_checkpoint), "steps": 4, "batch_size": 2,
              "checkpoint_every": 2, "warmup_steps": 1, "lr": 2e-3, "progress": False,
              "sources": {"refer": 1.0, "region": 1.0}, "point_prompt_prob": 0.5}
    full = train(recipe_config("tiny-smoke", out_dir=str(tmp_path / "full"), **values))
    records = read_metrics(tmp_path / "full" / "metrics.jsonl")
    assert all(set(MASK_LOSSES) <= set(r["losses"]) for r in records)
    assert all(math.isfinite(r["losses"][k]) for r in records for k in MASK_LOSSES)
    grown, _, _ = load_pretrained(full)
    assert grown.mask_decoder is not None and grown.config.prompt.points
    # killed after step 3 and started again: the same losses (the same point prompts) and weights
    cut = recipe_config("tiny-smoke", out_dir=str(tmp_path / "cut"), stop_after=3, **values)
    train(cut)
    resumed = train(dataclasses.replace(cut, stop_after=None))
    losses = [[r["loss"] for r in read_metrics(p / "metrics.jsonl")] for p in (tmp_path / "full", tmp_path / "cut")]
    assert losses[0] == losses[1]
    a, b = load_pretrained(full)[0].state_dict(), load_pretrained(resumed)[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_point_prompt_prob_flag_and_checks(tiny_data, tiny_checkpoint, seg_checkpoint, tmp_path, capsys):
    from pixelllm_plugins.cli import main

    out = tmp_path / "cli"
    rc = main(["train", "--recipe", "tiny-smoke", "--data", str(tiny_data), "--out", str(out), "--steps", "1",
               "--init", str(seg_checkpoint), "--sources", "region=1", "--point-prompt-prob", "0.25",
               "--no-progress"])
    assert rc == 0
    import json

    assert json.loads((out / "final" / "meta.json").read_text())["train_config"]["point_prompt_prob"] == 0.25
    assert recipe_config("tiny-smoke").point_prompt_prob == 0.0  # old recipes are unchanged
    with pytest.raises(TrainingError, match="point_prompt_prob"):
        recipe_config("tiny-smoke", data_dir=str(tiny_data), point_prompt_prob=1.5).validate()
    with pytest.raises(TrainingError, match="prompt.points"):  # a model that reads no points
        train(recipe_config("tiny-smoke", data_dir=str(tiny_data), init=str(tiny_checkpoint), steps=1,
                            out_dir=str(tmp_path / "np"), point_prompt_prob=0.5, progress=False))


# ---- region box jitter ---------------------------------------------------------------------------------------

def test_region_box_jitter_moves_region_boxes_within_bounds_and_only_those(tiny_data):
    from pixelllm_plugins.data.collate import REGION_BOX_JITTER, jitter_region_boxes

    tokenizer, config = PixelTokenizer.default(), _config(masks=2, points=True)
    sources = {s.name: s for s in synthetic_sources(tiny_data, "train", TWO, masks=True)}
    region = collate_for_model(sources["region"].samples[:4], tokenizer, config, train=True,
                               generator=torch.Generator().manual_seed(0), task="region")
    whole = region.prompt_boxes.clone()
    whole[0, 0] = torch.cat([torch.zeros(2), region.image_sizes[0]])  # a point-prompt row: the whole image
    region = dataclasses.replace(region, prompt_boxes=whole, mask_boxes=whole.clone())
    moved = jitter_region_boxes(region, 1.0, np.random.default_rng(3))
    real = region.prompt_mask.clone()
    real[0, 0] = False
    before, after = region.prompt_boxes[real], moved.prompt_boxes[real]
    assert not torch.equal(before, after) and torch.equal(moved.prompt_boxes[0, 0], whole[0, 0])
    size = torch.cat([before[:, 2:] - before[:, :2]] * 2, 1)
    assert torch.all((after - before).abs() <= REGION_BOX_JITTER * size + 1e-4)
    assert torch.all(after[:, 2:] - after[:, :2] >= 1) and torch.all(after >= 0)
    assert torch.equal(moved.mask_boxes, moved.prompt_boxes)  # the decoder reads the same loose box
    assert _equal(jitter_region_boxes(region, 1.0, np.random.default_rng(3)), moved)  # seeded
    assert jitter_region_boxes(region, 0.0, np.random.default_rng(3)) is region
    refer = collate_for_model(sources["refer"].samples[:4], tokenizer, config, train=True,
                              generator=torch.Generator().manual_seed(0), task="refer")
    assert jitter_region_boxes(refer, 1.0, np.random.default_rng(3)) is refer  # refer rows keep the global box


def test_region_box_jitter_in_the_mixture_flag_and_checks(tiny_data, seg_checkpoint, tmp_path):
    from pixelllm_plugins.cli import main

    tokenizer, config = PixelTokenizer.default(), _config(masks=2, points=True)
    sources = synthetic_sources(tiny_data, "train", {"refer": 0.0, "region": 1.0, "trace": 0.0, "caption": 0.0},
                                masks=True)
    plain = MixtureDataset(sources, tokenizer, config, 3, seed=1).batch(0)
    jittered = MixtureDataset(sources, tokenizer, config, 3, seed=1, region_box_jitter=1.0).batch(0)
    assert torch.equal(plain.pixel_values, jittered.pixel_values) and torch.equal(plain.text_ids, jittered.text_ids)
    assert not torch.equal(plain.prompt_boxes, jittered.prompt_boxes)
    wide = MixtureDataset(sources, tokenizer, config, 3, seed=1, region_box_jitter=1.0,
                          region_box_jitter_scale=0.3).batch(0)  # the same draws, three times as far
    real = plain.prompt_mask
    far, near = (wide.prompt_boxes - plain.prompt_boxes)[real], (jittered.prompt_boxes - plain.prompt_boxes)[real]
    assert far.abs().max() > near.abs().max()
    evaluation = MixtureDataset(sources, tokenizer, config, 3, seed=1, region_box_jitter=1.0, train=False).batch(0)
    assert torch.equal(evaluation.prompt_boxes, MixtureDataset(sources, tokenizer, config, 3, seed=1,
                                                               train=False).batch(0).prompt_boxes)
    out = tmp_path / "cli"
    assert main(["train", "--recipe", "tiny-smoke", "--data", str(tiny_data), "--out", str(out), "--steps", "1",
                 "--init", str(seg_checkpoint), "--sources", "region=1", "--region-box-jitter", "0.5",
                 "--region-box-jitter-scale", "0.2", "--no-progress"]) == 0
    import json

    saved = json.loads((out / "final" / "meta.json").read_text())["train_config"]
    assert saved["region_box_jitter"] == 0.5 and saved["region_box_jitter_scale"] == 0.2
    with pytest.raises(TrainingError, match="region_box_jitter"):
        recipe_config("tiny-smoke", data_dir=str(tiny_data), region_box_jitter=2.0).validate()
    for scale in (0.0, 0.6):
        with pytest.raises(TrainingError, match="region_box_jitter_scale"):
            recipe_config("tiny-smoke", data_dir=str(tiny_data), region_box_jitter_scale=scale).validate()


def test_a_decoder_that_does_not_learn_gets_no_masks_and_the_same_draws(tiny_data):
    tokenizer = PixelTokenizer.default()
    sources = synthetic_sources(tiny_data, "train", TWO, masks=True)
    config = _config(3)
    off = MixtureDataset(sources, tokenizer, config, 2, seed=0, masks=False)
    on = MixtureDataset(sources, tokenizer, config, 2, seed=0)
    for step in range(4):
        a, b = off.batch(step), on.batch(step)
        assert a.target_masks is None and a.mask_valid is None and b.target_masks is not None
        assert _equal(a, dataclasses.replace(b, target_masks=None, mask_valid=None, mask_boxes=None))


def test_a_lora_round_over_a_decoder_model_computes_no_mask_loss(tiny_data, seg_checkpoint, tmp_path):
    """The LoRA adapter leaves the mask decoder frozen: its loss would move nothing, so it is not computed."""
    from pixelllm_plugins.training.finetune import finetune

    finetune(seg_checkpoint, tiny_data, tmp_path / "adapter", steps=2, batch_size=2, progress=False,
             work_dir=tmp_path / "run")
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert records and not any(set(MASK_LOSSES) & set(r["losses"]) for r in records)
    assert all(math.isfinite(r["loss"]) for r in records)
