"""Written files follow the public schemas; loaders read them back to the generator's ground truth."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from pixelllm_plugins.data.formats import SyntheticDataset, annotate_scene, write_synthetic_dataset
from pixelllm_plugins.data.loaders import (
    load_coco_captions,
    load_localized_narratives,
    load_refcoco,
    load_vg,
    utterance_boxes,
)
from pixelllm_plugins.data.synthetic import scene_seed
from pixelllm_plugins.data.types import AnnotationError, AnnotationWarning
from pixelllm_plugins.errors import PixelLLMError
from pixelllm_plugins.geometry import iou

SEED = 3  # as in conftest.synth_dir


def _truth(n=12):
    return {i + 1: annotate_scene(scene_seed(SEED, "train", i), image_id=i + 1) for i in range(n)}


def _is_num(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def test_files_follow_the_documented_schemas(synth_dir):
    ds = SyntheticDataset.at(synth_dir, "train")
    assert len(list(ds.image_dir.glob("*.jpg"))) == 12
    lines = ds.ln.read_text().splitlines()
    assert len(lines) == 12
    for line in lines:
        rec = json.loads(line)
        assert {"dataset_id", "image_id", "annotator_id", "caption", "timed_caption", "traces", "voice_recording"} <= set(rec)
        assert isinstance(rec["image_id"], str) and isinstance(rec["caption"], str)
        for u in rec["timed_caption"]:
            assert set(u) == {"utterance", "start_time", "end_time"} and u["start_time"] <= u["end_time"]
        assert isinstance(rec["traces"], list) and all(isinstance(seg, list) for seg in rec["traces"])
        for seg in rec["traces"]:
            for p in seg:
                assert set(p) == {"x", "y", "t"} and all(_is_num(p[k]) for k in "xyt")
    ref = json.loads(ds.refcoco.read_text())
    assert ref["images"] and len(ref["images"]) == len(ref["annotations"])
    for img, ann in zip(ref["images"], ref["annotations"]):
        assert {"id", "caption", "file_name", "width", "height", "original_img_id"} <= set(img)
        assert {"id", "image_id", "bbox", "tokens_positive", "category_id", "area", "iscrowd"} <= set(ann)
        assert ann["image_id"] == img["id"] and len(ann["bbox"]) == 4 and all(map(_is_num, ann["bbox"]))
        (s, e), = ann["tokens_positive"]
        assert 0 <= s < e <= len(img["caption"])
        assert img["caption"][s:e].split()[-1] in {"object"} | {c["name"] for c in ref["categories"]}
    vg = json.loads(ds.vg.read_text())
    for img in vg["images"]:
        assert {"id", "file_name", "width", "height"} <= set(img)
    for ann in vg["annotations"]:
        assert {"id", "image_id", "bbox", "caption"} <= set(ann) and len(ann["bbox"]) == 4
    coco = json.loads(ds.coco_captions.read_text())
    assert {"images", "annotations"} <= set(coco)
    assert all({"id", "image_id", "caption"} <= set(a) for a in coco["annotations"])
    manifest = json.loads((synth_dir / "manifest_train.json").read_text())
    assert manifest["num_images"] == 12 and "pentagon" not in manifest["shapes"]


def test_writer_is_deterministic(tmp_path):
    a = write_synthetic_dataset(tmp_path / "a", "val", 3, seed=5)
    b = write_synthetic_dataset(tmp_path / "b", "val", 3, seed=5)
    for name in ("ln", "refcoco", "vg", "coco_captions"):
        assert getattr(a, name).read_bytes() == getattr(b, name).read_bytes()
    for f in a.image_dir.iterdir():
        assert f.read_bytes() == (b.image_dir / f.name).read_bytes()
    c = write_synthetic_dataset(tmp_path / "c", "test", 3, seed=5)
    assert c.refcoco.read_bytes() != a.refcoco.read_bytes()


def test_refcoco_round_trip(synth_dir):
    ds = SyntheticDataset.at(synth_dir, "train")
    truth = _truth()
    samples = load_refcoco(ds.refcoco, ds.image_dir)
    assert len(samples) == sum(1 for a in truth.values() if a.expressions)
    for s in samples:
        a = truth[int(s.image_id)]
        assert s.image == ds.image_dir / a.file_name and (s.width, s.height) == (a.scene.width, a.scene.height)
        assert [p.text for p in s.prompts] == [r.text for r in a.expressions]
        for p, r in zip(s.prompts, a.expressions):
            assert p.task == "refer" and p.box is None
            assert np.allclose(p.target_box, a.scene.objects[r.target].box, atol=0.02)
        assert len(s.gt_boxes) == len({r.target for r in a.expressions})
    region = load_refcoco(ds.refcoco, ds.image_dir, task="region")
    assert all(p.task == "region" and p.box == p.target_box for s in region for p in s.prompts)


def test_vg_and_coco_round_trip(synth_dir):
    ds = SyntheticDataset.at(synth_dir, "train")
    truth = _truth()
    vg = load_vg(ds.vg, ds.image_dir)
    assert len(vg) == 12
    for s in vg:
        a = truth[int(s.image_id)]
        assert [p.text for p in s.prompts] == list(a.region_captions)
        for p, o in zip(s.prompts, a.scene.objects):
            assert p.task == "region" and np.allclose(p.box, o.box, atol=0.02) and p.box == p.target_box
        assert np.allclose(s.gt_boxes, [o.box for o in a.scene.objects], atol=0.02)
    coco = load_coco_captions(ds.coco_captions, ds.image_dir)
    for s in coco:
        assert [p.text for p in s.prompts] == list(truth[int(s.image_id)].captions)
        assert all(p.task == "caption" and p.box is None for p in s.prompts) and s.gt_boxes == []


def test_ln_round_trip_traces_cover_spoken_objects(synth_dir):
    ds = SyntheticDataset.at(synth_dir, "train")
    truth = _truth()
    samples = load_localized_narratives(ds.ln, ds.image_dir)
    assert len(samples) == 12
    ious = []
    for s in samples:
        a = truth[int(s.image_id)]
        assert s.image == ds.image_dir / a.file_name and s.width is None
        (p,) = s.prompts
        assert p.task == "trace" and p.text == a.narrative.caption
        assert list(p.utterances) == [u.text for u in a.narrative.utterances]
        assert all(p.utterance_valid)
        W, H = a.scene.width, a.scene.height
        for u, rel in zip(a.narrative.utterances, p.utterance_boxes_rel):
            if u.object_index is None:
                continue
            box = (rel[0] * W, rel[1] * H, rel[2] * W, rel[3] * H)
            obj = a.scene.objects[u.object_index].box
            ious.append(iou(box, obj))
            # the mouse circles inside the object while its words are spoken (jitter aside)
            c = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
            assert obj[0] - 0.03 * W <= c[0] <= obj[2] + 0.03 * W and obj[1] - 0.03 * H <= c[1] <= obj[3] + 0.03 * H
    assert np.median(ious) > 0.4


def test_ln_utterance_boxes_follow_spec_4_1():
    # the mouse moves along x from 0.1 to 0.5 during t in [0, 4]; y constant 0.5
    traces = [[{"x": 0.1 + 0.1 * t, "y": 0.5, "t": float(t)} for t in range(3)],
              [{"x": 0.1 + 0.1 * t, "y": 0.5, "t": float(t)} for t in range(3, 5)]]
    timed = [{"utterance": "a", "start_time": 1.0, "end_time": 2.0},
             {"utterance": " ", "start_time": 2.0, "end_time": 3.0},  # empty text: invalid
             {"utterance": "far", "start_time": 5.0, "end_time": 6.0},  # extrapolated beyond the last point
             {"utterance": "b", "start_time": 3.0, "end_time": 3.0}]  # zero duration: plain mean
    boxes, valid = utterance_boxes(timed, traces)
    assert valid == [True, False, True, True]
    assert np.allclose(boxes[0], (0.2, 0.5, 0.3, 0.5))
    assert boxes[1] is None
    assert np.allclose(boxes[2], (0.6, 0.5, 0.7, 0.5))  # linear extrapolation
    assert np.allclose(boxes[3], (0.4, 0.5, 0.4, 0.5))
    zero = [[{"x": 0.0, "y": 0.0, "t": 0.0}, {"x": 0.0, "y": 0.3, "t": 1.0}]]
    _, valid = utterance_boxes([{"utterance": "x", "start_time": 0.0, "end_time": 1.0}], zero)
    assert valid == [False]  # centre x is 0: not > 1e-5


def test_bad_records_are_skipped_with_a_warning(tmp_path):
    images = [{"id": i, "file_name": f"{i}.jpg", "width": 100, "height": 80} for i in (1, 2, 3)]
    anns = [{"id": 1, "image_id": 1, "bbox": [10, 10, 20, 20], "caption": "small red circle"},
            {"id": 2, "image_id": 2, "bbox": [10, 10, 20], "caption": "bad box"},
            {"id": 3, "image_id": 3, "caption": "no box"},
            {"id": 4, "image_id": 99, "bbox": [1, 1, 5, 5], "caption": "unknown image"},
            {"id": 5, "image_id": 3, "bbox": [0, 0, 50, 40], "caption": "large blue star"}]
    path = tmp_path / "vg.json"
    path.write_text(json.dumps({"images": images, "annotations": anns}))
    with pytest.warns(AnnotationWarning) as record:
        samples = load_vg(path, tmp_path)
    messages = " | ".join(str(w.message) for w in record)
    assert "vg.json" in messages and "'bbox'" in messages and "image_id 99" in messages
    assert sorted(p.text for s in samples for p in s.prompts) == ["large blue star", "small red circle"]

    ln = tmp_path / "ln.jsonl"
    good = {"image_id": "7", "caption": "a dog", "timed_caption": [{"utterance": "a", "start_time": 0, "end_time": 1}],
            "traces": [[{"x": 0.2, "y": 0.2, "t": 0}, {"x": 0.3, "y": 0.3, "t": 1}]]}
    bad = dict(good, traces=[[{"x": 0.2, "t": 0}, {"x": 0.3, "y": 0.3, "t": 1}]])
    ln.write_text("\n".join([json.dumps(good), "{not json", json.dumps(bad), json.dumps(dict(good, image_id="8"))]))
    with pytest.warns(AnnotationWarning) as record:
        samples = load_localized_narratives(ln, tmp_path)
    messages = " | ".join(str(w.message) for w in record)
    assert "line 2 skipped: not JSON" in messages and "line 3 skipped" in messages
    assert [s.image_id for s in samples] == ["7", "8"]
    assert samples[0].image == tmp_path / "000000000007.jpg"


def test_unusable_files_raise_clear_errors(tmp_path):
    bad = tmp_path / "refcoco_val.json"
    bad.write_text("{oops")
    with pytest.raises(AnnotationError, match="refcoco_val.json"):
        load_refcoco(bad, tmp_path)
    bad.write_text(json.dumps({"images": []}))
    with pytest.raises(AnnotationError, match="'annotations'"):
        load_refcoco(bad, tmp_path)
    with pytest.raises(PixelLLMError, match="not found"):
        load_localized_narratives(tmp_path / "missing.jsonl", tmp_path)
    with pytest.raises(AnnotationError, match="missing.json"):
        load_coco_captions(tmp_path / "missing.json", tmp_path)
