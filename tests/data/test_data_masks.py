"""Masks in the data: generator masks sit on the rendered pixels, the written json carries them (polygons,
RLE for the ring), the RefCOCO loader reads them back, and transforms keep them on the pixels."""

from __future__ import annotations

import dataclasses
import json
import math
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from pixelllm_plugins.config import VisionConfig
from pixelllm_plugins.data.collate import collate, collate_with_masks
from pixelllm_plugins.data.formats import SyntheticDataset, annotate_scene
from pixelllm_plugins.data.loaders import load_refcoco
from pixelllm_plugins.data.synthetic import (
    COLORS,
    Background,
    Scene,
    SceneConfig,
    SceneObject,
    _background,
    generate_scene,
    object_mask,
    render_scene,
    scene_masks,
    scene_seed,
)
from pixelllm_plugins.data.transforms import AugmentConfig, eval_transform, train_transform
from pixelllm_plugins.data.types import AnnotationWarning, GroundedSample, PromptRecord
from pixelllm_plugins.masks import (
    mask_iou,
    mask_to_rle,
    rle_area,
    rle_to_box,
    rle_to_mask,
    segmentation_to_mask,
    segmentation_to_rle,
)

SEED = 3  # as in conftest.synth_dir
VISION = VisionConfig(image_size=96)


# ---- generator masks on the rendered pixels -----------------------------------------------------------

def _grid_scene(shapes, kind, seed=0, size=(240, 200)) -> Scene:
    """Objects on a grid (no overlap), one per shape, distinct colours."""
    w, h = size
    objects = []
    for k, shape in enumerate(shapes):
        x, y = 12 + (k % 3) * 76, 12 + (k // 3) * 90
        side = 30 + 14 * (k % 3)  # small and large
        color = list(COLORS)[k % len(COLORS)]
        box = (x + 0.3, y + 0.6, x + side + 0.7, y + side * 1.1)
        objects.append(SceneObject(k, shape, color, "small", box, COLORS[color]))
    bg = Background(kind, ((90, 95, 100), (120, 110, 100)), 0.4, 17.0, seed)
    return Scene(seed, w, h, bg, tuple(objects))


def _no_occlusion(scene: Scene) -> bool:
    boxes = [o.box for o in scene.objects]
    return all(min(a[2], b[2]) <= max(a[0], b[0]) or min(a[3], b[3]) <= max(a[1], b[1])
               for i, a in enumerate(boxes) for b in boxes[i + 1:])


def _scenes() -> list[Scene]:
    cfg = SceneConfig(max_side=256)
    generated = [s for s in (generate_scene(scene_seed(1, "train", i), cfg) for i in range(40))
                 if _no_occlusion(s)]
    return [_grid_scene(("circle", "square", "triangle", "star", "hexagon", "diamond"), "noise"),
            _grid_scene(("cross", "ring", "pentagon", "ring"), "stripes", seed=5), *generated[:4]]


def test_generator_masks_sit_on_the_object_pixels():
    scenes = _scenes()
    assert len(scenes) == 6
    seen = set()
    for scene in scenes:
        image = np.asarray(render_scene(scene), np.float32)
        background = np.asarray(_background(scene), np.float32)
        masks = scene_masks(scene)
        for obj, mask in zip(scene.objects, masks):
            seen.add(obj.shape)
            assert mask.shape == (scene.height, scene.width) and mask.dtype == bool
            assert np.array_equal(mask, object_mask(scene, obj.index))
            # how much of the object's colour a pixel shows over the background under it (0..1); exactly
            # half-covered pixels are a tie either way, so "object-coloured" leaves a small margin around 1/2
            rgb = np.asarray(obj.rgb, np.float32)
            alpha = ((image - background) * (rgb - background)).sum(-1) / np.maximum(
                ((rgb - background) ** 2).sum(-1), 1.0)
            x1, y1, x2, y2 = obj.box
            inside = np.zeros_like(mask)
            inside[math.floor(y1):math.ceil(y2), math.floor(x1):math.ceil(x2)] = True
            coloured = inside & (alpha > 0.55)
            assert (mask & (alpha > 0.45)).sum() >= 0.95 * mask.sum(), obj
            assert (mask & coloured).sum() >= 0.95 * coloured.sum(), obj
            assert not (mask & ~inside).any()  # the mask stays in the object's box
            if obj.shape == "ring":  # the hole shows the background
                cy, cx = int((y1 + y2) / 2), int((x1 + x2) / 2)
                assert not mask[cy, cx] and alpha[cy, cx] < 0.05
    assert seen >= {"circle", "square", "triangle", "star", "hexagon", "diamond", "cross", "ring", "pentagon"}


def test_visible_masks_remove_what_later_objects_cover():
    for i in range(40):
        scene = generate_scene(scene_seed(2, "train", i), SceneConfig(max_side=200))
        if not _no_occlusion(scene):
            break
    amodal, visible = scene_masks(scene), scene_masks(scene, visible=True)
    assert any((a & ~v).any() for a, v in zip(amodal, visible))
    for k, v in enumerate(visible):
        assert np.array_equal(v, object_mask(scene, k, visible=True))
        assert not (v & np.logical_or.reduce(amodal[k + 1:] or [np.zeros_like(v)])).any()
        assert np.array_equal(v | amodal[k], amodal[k])


# ---- written json and the loader ----------------------------------------------------------------------

def _truth(n=12):
    return {i + 1: annotate_scene(scene_seed(SEED, "train", i), image_id=i + 1) for i in range(n)}


def test_written_json_carries_segmentations(synth_dir):
    ds = SyntheticDataset.at(synth_dir, "train")
    truth = _truth()
    ref = json.loads(ds.refcoco.read_text())
    images = {r["id"]: r for r in ref["images"]}
    kinds = set()
    for ann in ref["annotations"]:
        img = images[ann["image_id"]]
        a = truth[img["original_img_id"]]
        obj = a.scene.objects[ann["original_id"] % 100]
        seg = ann["segmentation"]
        kinds.add(type(seg))
        assert isinstance(seg, dict) == (obj.shape == "ring")  # RLE only where a hole needs it
        mask = segmentation_to_mask(seg, img["height"], img["width"])
        assert mask_iou(mask, object_mask(a.scene, obj.index)) >= 0.98
        assert ann["area"] == pytest.approx(rle_area(segmentation_to_rle(seg, img["height"], img["width"])))
    assert kinds == {list, dict}
    vg = json.loads(ds.vg.read_text())
    assert not any("segmentation" in ann for ann in vg["annotations"])  # as in the real GRiT VG files
    inst = json.loads(ds.instances.read_text())
    assert len(inst["annotations"]) == sum(len(a.scene.objects) for a in truth.values())
    for ann in inst["annotations"]:
        a = truth[ann["image_id"]]
        obj = a.scene.objects[ann["id"] % 100]
        assert inst["categories"][ann["category_id"] - 1]["name"] == obj.shape
        assert mask_iou(segmentation_to_mask(ann["segmentation"], a.scene.height, a.scene.width),
                        object_mask(a.scene, obj.index)) >= 0.98
    manifest = json.loads((synth_dir / "manifest_train.json").read_text())
    assert manifest["files"]["instances"] == ds.instances.name


def test_refcoco_loader_reads_masks(synth_dir, tmp_path):
    ds = SyntheticDataset.at(synth_dir, "train")
    truth = _truth()
    samples = load_refcoco(ds.refcoco, ds.image_dir)
    shapes = set()
    for s in samples:
        a = truth[int(s.image_id)]
        for p, r in zip(s.prompts, a.expressions):
            assert p.target_mask["size"] == [a.scene.height, a.scene.width]
            assert isinstance(p.target_mask["counts"], str)
            assert mask_iou(rle_to_mask(p.target_mask), object_mask(a.scene, r.target)) >= 0.98
            shapes.add(a.scene.objects[r.target].shape)
    assert "ring" in shapes and len(shapes) > 2  # both RLE and polygon annotations went through
    region = load_refcoco(ds.refcoco, ds.image_dir, task="region")
    assert all(p.target_mask is not None for s in region for p in s.prompts)

    # without 'segmentation' the file loads exactly as before (no mask)
    data = json.loads(ds.refcoco.read_text())
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({**data, "annotations": [{k: v for k, v in a.items() if k != "segmentation"}
                                                         for a in data["annotations"]]}))
    bare = load_refcoco(plain, ds.image_dir)
    assert [dataclasses.replace(s, prompts=[dataclasses.replace(p, target_mask=None) for p in s.prompts])
            for s in samples] == bare
    assert all(p.target_mask is None for s in bare for p in s.prompts)

    # uncompressed RLE reads the same; a malformed segmentation loses its mask (warned), not its box
    anns = [dict(a) for a in data["annotations"]]
    first = anns[0]
    img = next(r for r in data["images"] if r["id"] == first["image_id"])
    m = segmentation_to_mask(first["segmentation"], img["height"], img["width"])
    flat = m.ravel(order="F").astype(np.int8)
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    first["segmentation"] = {"size": [img["height"], img["width"]],
                             "counts": ([0] if flat[0] else []) + np.diff(bounds).tolist()}
    anns[1]["segmentation"] = {"size": [3, 3], "counts": "x"}
    odd = tmp_path / "odd.json"
    odd.write_text(json.dumps({**data, "annotations": anns}))
    with pytest.warns(AnnotationWarning, match="segmentation"):
        loaded = load_refcoco(odd, ds.image_dir)
    prompts = {p.ref_id: p for s in loaded for p in s.prompts}
    assert np.array_equal(rle_to_mask(prompts[str(first["image_id"])].target_mask), m)
    broken = prompts[str(anns[1]["image_id"])]
    assert broken.target_mask is None and broken.target_box is not None


# ---- transforms and collate -----------------------------------------------------------------------------

def _mask_sample(flip_text="the ring", annotation_scale=1):
    """An image that *is* the mask (white object on black): the transformed image shows where the
    transformed mask must be."""
    yy, xx = np.mgrid[:150, :230]
    r2 = (xx + 0.5 - 150.3) ** 2 / 1.3 + (yy + 0.5 - 70.2) ** 2
    mask = (r2 < 45 ** 2) & ~(r2 < 18 ** 2)
    mask[100:140, 20:60] |= (xx[100:140, 20:60] - 20) < (yy[100:140, 20:60] - 100)  # a triangle: part 2
    image = Image.fromarray(np.repeat(mask[..., None] * np.uint8(255), 3, axis=2), "RGB")
    ann = np.kron(mask, np.ones((annotation_scale, annotation_scale), bool)) if annotation_scale > 1 else mask
    box = rle_to_box(mask_to_rle(ann))
    rle = mask_to_rle(ann)
    prompts = [PromptRecord("refer", flip_text, target_box=box, target_mask=rle, ref_id="1"),
               PromptRecord("region", "a shape", box=box, target_box=box, target_mask=rle, ref_id="2"),
               PromptRecord("caption", "shapes")]
    return GroundedSample(image, prompts, [box], 230 * annotation_scale, 150 * annotation_scale, "m"), mask


def _image_mask(ts) -> np.ndarray:
    mean = torch.tensor(VISION.pixel_mean).view(3, 1, 1)
    std = torch.tensor(VISION.pixel_std).view(3, 1, 1)
    px = ((ts.pixel_values * std + mean) * 255)[0].numpy()
    w, h = (int(v) for v in ts.image_size)
    return px[:h, :w] >= 127.5


def _check(ts, min_iou=0.99):
    shown = _image_mask(ts)
    masked = [p for p in ts.prompts if p.target_mask is not None]
    assert masked
    for p in masked:
        m = rle_to_mask(p.target_mask)
        assert m.shape == shown.shape
        assert mask_iou(m, shown) >= min_iou, (ts.flipped, ts.scale, ts.offset)


def test_masks_follow_resize_crop_and_flip():
    sample, _ = _mask_sample()
    _check(eval_transform(sample, VISION))
    flipped = 0
    for seed in range(8):
        aug = AugmentConfig(scale=(0.6, 2.2), hflip=0.5, min_visible=0.05)
        ts = train_transform(sample, VISION, aug, np.random.default_rng(seed))
        flipped += ts.flipped
        _check(ts)
        assert ts.offset != (0.0, 0.0) or ts.scale[0] * 230 <= 96.5  # crops happen
    assert 0 < flipped < 8
    # a sample whose text names a side is never flipped; its mask is not either
    side, _ = _mask_sample("the ring on the left")
    ts = train_transform(side, VISION, AugmentConfig(hflip=1.0), np.random.default_rng(0))
    assert not ts.flipped
    _check(ts)


def test_masks_of_another_annotation_size_are_rescaled():
    sample, _ = _mask_sample(annotation_scale=2)  # annotation at 2x the actual image
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AnnotationWarning)
        _check(eval_transform(sample, VISION), min_iou=0.97)
        _check(train_transform(sample, VISION, AugmentConfig(scale=(1.2, 1.6)), np.random.default_rng(1)),
               min_iou=0.97)


def test_a_broken_mask_is_dropped_with_a_warning():
    sample, _ = _mask_sample()
    short = {"size": [150, 230], "counts": "0"}
    sample.prompts[0] = dataclasses.replace(sample.prompts[0], target_mask=short)
    with pytest.warns(AnnotationWarning, match="target_mask"):
        ts = eval_transform(sample, VISION)
    assert ts.prompts[0].target_mask is None and ts.prompts[0].target_box is not None
    assert ts.prompts[1].target_mask is not None
    # a mask stated far larger than the image is refused before it is decoded
    huge = segmentation_to_rle({"size": [20000, 20000], "counts": [20000 * 20000]}, 20000, 20000)
    sample.prompts[0] = dataclasses.replace(sample.prompts[0], target_mask=huge)
    with pytest.warns(AnnotationWarning, match="far larger"):
        assert eval_transform(sample, VISION).prompts[0].target_mask is None
    # batches that do not use masks drop them instead of mapping them
    assert all(p.target_mask is None for p in eval_transform(_mask_sample()[0], VISION, masks=False).prompts)


def test_collate_with_masks_keeps_the_batch_and_aligns_rows(synth_dir, tokenizer, config):
    ds = SyntheticDataset.at(synth_dir, "train")
    samples = load_refcoco(ds.refcoco, ds.image_dir)[:3]
    plain = collate(samples, tokenizer, config, train=True, generator=torch.Generator().manual_seed(7),
                    max_prompts=3)
    inputs, targets = collate_with_masks(samples, tokenizer, config, train=True, max_prompts=3, mask_stride=4,
                                         generator=torch.Generator().manual_seed(7))
    for f in dataclasses.fields(plain):
        if f.name in ("target_masks", "mask_valid", "mask_boxes"):  # the mask targets collate adds
            continue
        a, b = getattr(plain, f.name), getattr(inputs, f.name)
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b, f.name
    S = config.vision.image_size
    assert targets.masks.shape == (*inputs.prompt_mask.shape, S // 4, S // 4) and targets.stride == 4
    assert torch.equal(targets.mask_valid, inputs.prompt_mask)  # every refcoco prompt has a mask
    for b, n in zip(*np.nonzero(targets.mask_valid.numpy())):
        m = targets.masks[b, n].numpy()
        ys, xs = np.nonzero(m)
        w, h = inputs.image_sizes[b].tolist()
        # the refer target (the box corners) sits where the mask is (amodal box vs the mask's cells)
        t = inputs.target_points[b, n][inputs.point_mask[b, n]][0].numpy() * [w, h, w, h] / 4
        cells = np.asarray([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        assert np.abs(cells - t).max() < 1.5
    _, full = collate_with_masks(samples[:1], tokenizer, config, max_prompts=2)
    assert full.masks.shape[-1] == S and full.masks.dtype == torch.bool
    with pytest.raises(ValueError):
        collate_with_masks(samples[:1], tokenizer, config, mask_stride=7)
