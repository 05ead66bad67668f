"""The evaluation driver over a tiny written dataset, with fakes whose answers are known."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fakes import FakePredictor  # noqa: E402

from pixelllm_plugins.evaluation.evaluate import (  # noqa: E402
    evaluate,
    load_task_samples,
    trace_l1_from_model,
    write_report,
)
from pixelllm_plugins.evaluation.metrics import EvaluationError  # noqa: E402
from pixelllm_plugins.inference.results import Detection, RegionCaption  # noqa: E402
from pixelllm_plugins.modeling.inputs import ModelOutput  # noqa: E402


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from pixelllm_plugins.data.formats import write_synthetic_dataset

    root = tmp_path_factory.mktemp("evaldata")
    write_synthetic_dataset(root, "val", 5, seed=3)
    return root


class OraclePredictor(FakePredictor):
    """Answers refer / caption_regions / dense_caption with the ground truth (refer: every other one
    shifted far away), so the expected scores are known exactly."""

    def __init__(self, data_dir):
        super().__init__()
        self.refer_gt = {(str(s.image), p.text): p.target_box
                         for s in load_task_samples(data_dir, "val", "refer") for p in s.prompts}
        self.regions = {str(s.image): s.prompts for s in load_task_samples(data_dir, "val", "dense")}
        self.k = 0

    def refer(self, images, texts, *, adapter=None):
        self.calls.append(("refer", len(images)))
        out = []
        for image, image_texts in zip(images, texts):
            per_text = []
            for t in image_texts:
                x1, y1, x2, y2 = self.refer_gt[(str(image), t)]
                if self.k % 2:  # a miss: moved by its own width
                    x1, x2 = x1 + (x2 - x1) * 1.01, x2 + (x2 - x1) * 1.01
                self.k += 1
                per_text.append([Detection((x1, y1, x2, y2), 0.9, t)])
            out.append(per_text)
        return out

    def caption_regions(self, images, boxes, *, adapter=None, max_new_tokens=20, num_beams=1):
        self.calls.append(("caption_regions", len(images)))
        return [[RegionCaption(tuple(p.box), p.text, 1.0) for p in self.regions[str(image)]] for image in images]

    def dense_caption(self, images, *, max_regions=20, min_score=0.3, adapter=None):
        self.calls.append(("dense_caption", len(images)))
        return [[RegionCaption(tuple(p.box), p.text, 1.0 - 0.01 * i) for i, p in enumerate(self.regions[str(im)])]
                for im in images]


def test_evaluate_with_oracle(data_dir):
    pred = OraclePredictor(data_dir)
    r = evaluate(pred, data_dir, "val", tasks=("refer", "region", "dense", "trace"), batch_size=2, meteor=False,
                 progress=False)
    refer = r["tasks"]["refer"]
    n = refer["count"]
    assert n == len(pred.refer_gt)
    assert refer["P@0.5"] == pytest.approx(((n + 1) // 2) / n)  # every other expression is a miss
    region = r["tasks"]["region"]
    assert region["ROUGE-L"] == pytest.approx(1.0)
    assert region["attribute_accuracy"] == pytest.approx(1.0)
    assert region["METEOR"] is None
    dense = r["tasks"]["dense"]
    assert dense["mAP_detection"] == pytest.approx(1.0)  # every GT found first, no false positive
    assert dense["num_gt_after_merge"] == dense["num_detections"]
    assert r["tasks"]["trace"]["point_l1"] is None and r["tasks"]["trace"]["notices"]
    assert [c for c in pred.calls if c[0] == "refer"] == [("refer", 2), ("refer", 2), ("refer", 1)]


class TightBoxPredictor(OraclePredictor):
    """Names each region right only from its exact GT box: a model that reads shape from the box's extent."""

    def caption_regions(self, images, boxes, *, adapter=None, max_new_tokens=20, num_beams=1):
        self.calls.append(("caption_regions", len(images)))
        out = []
        for image, image_boxes in zip(images, boxes):
            gt = {tuple(round(v, 3) for v in p.box): p.text for p in self.regions[str(image)]}
            out.append([RegionCaption(tuple(b), gt.get(tuple(round(float(v), 3) for v in b), "region"), 1.0)
                        for b in image_boxes])
        return out


def test_region_loose_boxes_score_what_people_draw(data_dir):
    from pixelllm_plugins.evaluation.evaluate import LOOSE_BOX_GROWTH, eval_region, loose_box

    assert loose_box((10, 20, 30, 60), (100, 100), 0.1) == [8.0, 16.0, 32.0, 64.0]
    assert loose_box((0, 0, 100, 50), (100, 60), 0.1) == [0.0, 0.0, 100.0, 55.0]  # clipped to the image
    samples = load_task_samples(data_dir, "val", "region")
    region = eval_region(TightBoxPredictor(data_dir), samples, batch_size=2, meteor=False)
    assert region["attribute_accuracy"] == pytest.approx(1.0)
    assert region["loose_box_attribute_accuracy"] == pytest.approx(0.0)
    assert region["loose_box_growth"] == LOOSE_BOX_GROWTH
    oracle = OraclePredictor(data_dir)
    both = eval_region(oracle, samples, batch_size=2, meteor=False)
    assert both["loose_box_attribute_accuracy"] == pytest.approx(1.0)  # box-blind: the same either way
    calls = len(oracle.calls)
    skipped = eval_region(oracle, samples, batch_size=2, meteor=False, loose_growth=0)
    assert "loose_box_attribute_accuracy" not in skipped and len(oracle.calls) - calls == calls / 2


def test_fake_predictor_scores_and_report(data_dir, tmp_path):
    r = evaluate(FakePredictor(), data_dir, "val", tasks=("refer", "region"), limit=2, meteor=False,
                 progress=False)
    assert r["model_version"] == "fake-1"
    assert r["tasks"]["refer"]["images"] == 2
    assert 0.0 <= r["tasks"]["refer"]["P@0.5"] <= 1.0
    assert r["tasks"]["region"]["attribute_accuracy"] == 0.0  # "region 0" never names an attribute
    assert r["tasks"]["region"]["loose_box_attribute_accuracy"] == 0.0
    md = write_report(r, tmp_path / "report").read_text()
    assert "| refer | P@0.5 |" in md
    saved = json.loads((tmp_path / "report" / "results.json").read_text())
    assert saved["tasks"]["refer"]["count"] == r["tasks"]["refer"]["count"]


def test_missing_split_is_skipped_and_unknown_task_raises(data_dir):
    r = evaluate(FakePredictor(), data_dir, "test", tasks=("refer",), progress=False)
    assert "skipped" in r["tasks"]["refer"] and "pixelllm synth" in r["tasks"]["refer"]["skipped"]
    with pytest.raises(EvaluationError):
        evaluate(FakePredictor(), data_dir, "val", tasks=("bogus",), progress=False)


class _ShiftModel(torch.nn.Module):
    """Returns the GT corners of each batch moved 0.02 outwards in x (handed over in advance)."""

    def __init__(self, config, targets):
        super().__init__()
        self.config, self.targets = config, list(targets)
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, inputs):
        assert inputs.target_points is None  # the GT is not shown to the model
        t = self.targets.pop(0).clone()
        t[..., 0] -= 0.02  # x0 left, x1 right: the other GT corner can never be closer
        t[..., 2] += 0.02
        return ModelOutput(points=t)


def test_trace_l1_from_model_hand_value(data_dir):
    from pixelllm_plugins.config import get_preset
    from pixelllm_plugins.data.mixture import iterate_eval_batches
    from pixelllm_plugins.tokenizer import PixelTokenizer

    tok, cfg = PixelTokenizer.default(), get_preset("tiny")
    samples = load_task_samples(data_dir, "val", "trace")
    targets = [b.target_points for b in iterate_eval_batches(samples, tok, cfg, 2, task="trace")]
    out = trace_l1_from_model(_ShiftModel(cfg, targets), tok, samples, batch_size=2)
    # each predicted corner is 0.02 from its own GT corner in x: L1 (mean over x, y) = 0.01
    assert out["point_l1"] == pytest.approx(0.01, abs=1e-6)
    targets = [b.target_points * 0 for b in iterate_eval_batches(samples, tok, cfg, 2, task="trace")]
    # all predictions at the origin: L1 = mean over valid tokens of the closer corner, so > 0.01
    assert trace_l1_from_model(_ShiftModel(cfg, targets), tok, samples, batch_size=2)["point_l1"] > 0.05
    assert out["images_with_points"] == len(samples)


def test_trace_with_tiny_predictor(data_dir):
    from pixelllm_plugins.checkpoint import load_pretrained
    from pixelllm_plugins.inference.predictor import Predictor

    torch.manual_seed(0)
    model, tok, _ = load_pretrained("tiny")
    r = evaluate(Predictor(model, tokenizer=tok, device="cpu", dtype=torch.float32), data_dir, "val",
                 tasks=("trace",), limit=2, progress=False)
    l1 = r["tasks"]["trace"]["point_l1"]
    assert np.isfinite(l1) and 0.0 <= l1 < 2.0
