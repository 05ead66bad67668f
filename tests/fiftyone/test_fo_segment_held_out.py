"""Issue target on a real MongoDB: the ``segment`` operator labels every sample of held-out varied scenes with
the embedded default model, and its stored masks reach a mean IoU with the ground truth within 0.03 of
``Predictor.segment``'s on the same images (numbers in ``artifacts/fiftyone/held_out_miou.json``)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import fiftyone as fo
import fiftyone.operators as foo
import numpy as np
import pytest
from test_fo_segment import stored_masks

from pixelllm_plugins.data.formats import annotate_scene, render_scene
from pixelllm_plugins.data.synthetic import SceneConfig, scene_seed
from pixelllm_plugins.inference.predictor import Predictor
from pixelllm_plugins.masks import mask_iou, rle_to_mask, segmentation_to_mask

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SCENES = 12


def test_segment_operator_scores_like_segment_on_held_out_scenes(plugin_installed, tmp_path):
    truth, samples = {}, []
    for i in range(SCENES):
        a = annotate_scene(scene_seed(0, "test", i), SceneConfig.preset("varied"))
        expr = a.expressions[0]
        segmentation, _ = a.object_segmentations()[expr.target]
        path = tmp_path / f"held{i}.png"
        render_scene(a.scene).save(path)
        truth[str(path)] = (expr.text, segmentation_to_mask(segmentation, a.scene.height, a.scene.width))
        samples.append(fo.Sample(filepath=str(path), refexp=expr.text))
    dataset = fo.Dataset(f"pixelllm-held-out-{uuid.uuid4().hex[:6]}")
    try:
        dataset.add_samples(samples)
        res = foo.execute_operator("@pixelllm/pixelllm/segment", ctx=dict(dataset=dataset, params={
            "prompt_field": "refexp", "label_field": "masks", "batch_size": 4}))
        assert (res.result["processed"], res.result["failed"]) == (SCENES, 0), res.result
        predictor = Predictor(None, device="cpu")
        stored, direct = [], []
        for sample in dataset:
            text, gt = truth[sample.filepath]
            (got,) = stored_masks(sample, "masks")  # every sample labelled, one mask for its one prompt
            stored.append(mask_iou(got, gt))
            (mask,) = predictor.segment([sample.filepath], texts=[[text]])[0]
            direct.append(mask_iou(rle_to_mask(mask.mask), gt))
    finally:
        dataset.delete()
    numbers = {"scenes": SCENES, "model_version": predictor.model_version,
               "fiftyone_masks_mIoU": float(np.mean(stored)), "segment_mIoU": float(np.mean(direct))}
    (ROOT / "artifacts" / "fiftyone").mkdir(parents=True, exist_ok=True)
    (ROOT / "artifacts" / "fiftyone" / "held_out_miou.json").write_text(json.dumps(numbers, indent=1))
    assert abs(numbers["fiftyone_masks_mIoU"] - numbers["segment_mIoU"]) <= 0.03, numbers
