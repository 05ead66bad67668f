"""The ``segment`` task, the caption object F1 and several splits side by side, end to end on a tiny written
dataset: fakes whose answers are known exactly, then the real tiny Predictor with a tiny random SAM (values
arbitrary: only that it runs and reports), then the CLI."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fakes import FakePredictor  # noqa: E402
from tiny_sam import save_tiny_sam  # noqa: E402

from pixelllm_plugins.errors import PixelLLMError  # noqa: E402
from pixelllm_plugins.evaluation.evaluate import (  # noqa: E402
    evaluate,
    evaluate_splits,
    load_task_samples,
    markdown_table,
    write_report,
)
from pixelllm_plugins.evaluation.metrics import interior_point, mask_holes  # noqa: E402
from pixelllm_plugins.inference.results import MaskResult, TracedCaption  # noqa: E402
from pixelllm_plugins.io import load_image  # noqa: E402
from pixelllm_plugins.masks import mask_to_rle, rle_to_mask  # noqa: E402


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from pixelllm_plugins.data.formats import write_synthetic_dataset

    root = tmp_path_factory.mktemp("segdata")
    write_synthetic_dataset(root, "val", 4, seed=3)  # 4 scenes, 3 of their referred objects are rings
    write_synthetic_dataset(root, "test", 2, seed=3)
    return root


def _digest(image) -> str:
    return hashlib.sha1(load_image(image).tobytes()).hexdigest()


class OracleSegmenter(FakePredictor):
    """``segment`` answers each prompt with its GT mask (found by image content and text / box / point);
    ``fill_holes``: with the hole filled instead; ``fail_text``: that text raises as an empty mask would."""

    def __init__(self, data_dir, splits=("val",), *, fill_holes=False, fail_text=None):
        super().__init__()
        self.fill_holes, self.fail_text = fill_holes, fail_text
        self.by = {}
        for s in (s for split in splits for s in load_task_samples(data_dir, split, "segment")):
            key = _digest(s.image)
            for p in s.prompts:
                mask = rle_to_mask(p.target_mask)
                self.by[(key, "text", p.text)] = mask
                self.by[(key, "box", tuple(p.target_box))] = mask
                self.by[(key, "point", interior_point(mask))] = mask
        self.prompts_seen = []

    def segment(self, images, texts=None, boxes=None, points=None, point_labels=None, *, adapter=None):
        self.calls.append(("segment", len(images)))
        out = []
        for i, image in enumerate(images):
            key = _digest(image)
            kind, items = next((k, v[i]) for k, v in (("text", texts), ("box", boxes), ("point", points))
                               if v is not None and v[i] is not None)
            per = []
            for item in items:
                self.prompts_seen.append(kind)
                if kind == "text" and item == self.fail_text:
                    raise PixelLLMError("image 0 text 0: the mask engine predicted an empty mask")
                mask = self.by[(key, kind, item if kind == "text" else tuple(item))]
                if kind == "point":
                    assert mask[int(item[1]), int(item[0])]  # the point prompt lies on its object
                if self.fill_holes:
                    mask = mask | mask_holes(mask)
                per.append(MaskResult((0.0, 0.0, 1.0, 1.0), 1.0, mask_to_rle(mask), [], 1.0, None, "oracle"))
            out.append(per)
        return out


def test_segment_oracle_scores_one_and_batches_per_chunk(data_dir):
    pred = OracleSegmenter(data_dir)
    seg = evaluate(pred, data_dir, "val", tasks=("segment",), batch_size=2, progress=False)["tasks"]["segment"]
    samples = load_task_samples(data_dir, "val", "segment")
    expressions = sum(len(s.prompts) for s in samples)
    objects = sum(len({p.target_mask["counts"] for p in s.prompts}) for s in samples)
    assert seg["count"] == expressions and seg["box_count"] == seg["point_count"] == seg["objects"] == objects
    assert seg["ring_objects"] >= 1 and seg["box_ring_count"] == seg["ring_objects"]
    for prefix in ("", "box_", "point_"):
        assert seg[f"{prefix}cIoU"] == seg[f"{prefix}mIoU"] == seg[f"{prefix}P@0.5"] == 1.0
        assert seg[f"{prefix}ring_mIoU"] == 1.0
    assert seg["images"] == 4 and seg["failed_prompts"] == 0
    # 4 images, 2 per call, each image entered once per prompt kind
    assert pred.calls == [("segment", 6), ("segment", 6)]


def test_segment_filling_the_holes_costs_only_on_rings(data_dir):
    seg = evaluate(OracleSegmenter(data_dir, fill_holes=True), data_dir, "val", tasks=("segment",),
                   progress=False)["tasks"]["segment"]
    for prefix in ("", "box_", "point_"):
        assert seg[f"{prefix}ring_mIoU"] < 0.95
        n, rings = seg[f"{prefix}count"], seg[f"{prefix}ring_count"]
        others = (seg[f"{prefix}mIoU"] * n - seg[f"{prefix}ring_mIoU"] * rings) / (n - rings)
        assert others == pytest.approx(1.0)  # every object without a hole is still exact
        assert seg[f"{prefix}cIoU"] < 1.0


def test_segment_a_failing_prompt_counts_as_empty_and_the_rest_is_kept(data_dir):
    first = load_task_samples(data_dir, "val", "segment")[0].prompts[0].text
    pred = OracleSegmenter(data_dir, fail_text=first)
    seg = evaluate(pred, data_dir, "val", tasks=("segment",), batch_size=4, progress=False)["tasks"]["segment"]
    n = seg["count"]
    assert seg["failed_prompts"] >= 1 and seg["mIoU"] < 1.0
    assert seg["mIoU"] == pytest.approx((n - seg["failed_prompts"]) / n)
    assert seg["box_mIoU"] == seg["point_mIoU"] == 1.0
    assert any("empty mask" in notice for notice in seg["notices"])


def test_segment_a_prompt_kind_that_always_fails_is_not_measured_rather_than_zero(data_dir):
    class NoPoints(OracleSegmenter):
        def segment(self, images, texts=None, boxes=None, points=None, point_labels=None, *, adapter=None):
            if points is not None and any(p is not None for p in points):
                raise PixelLLMError("this mask source takes no point prompts")
            return super().segment(images, texts, boxes, points, point_labels, adapter=adapter)

    seg = evaluate(NoPoints(data_dir), data_dir, "val", tasks=("segment",), progress=False)["tasks"]["segment"]
    assert seg["point_mIoU"] is None and seg["point_ring_mIoU"] is None and seg["point_count"] > 0
    assert seg["mIoU"] == seg["box_mIoU"] == 1.0 and seg["failed_prompts"] == seg["point_count"]
    assert any(n.startswith("point -> mask not measured") for n in seg["notices"])


def test_segment_with_the_models_own_mask_decoder(data_dir):
    from pixelllm_plugins.config import get_preset
    from pixelllm_plugins.inference.predictor import Predictor
    from pixelllm_plugins.modeling.pixel_llm import PixelLLM
    from pixelllm_plugins.tokenizer import PixelTokenizer

    if not hasattr(Predictor, "mask_source"):
        pytest.skip("this Predictor does not segment with a model's own mask decoder")
    cfg = get_preset("tiny")
    cfg.heads.mask_decoder, cfg.prompt.points = 2, False
    tokenizer = PixelTokenizer.default()
    torch.manual_seed(0)
    pred = Predictor(PixelLLM(cfg, tokenizer.vocab_size).eval(), tokenizer=tokenizer, device="cpu",
                     dtype=torch.float32)
    seg = evaluate(pred, data_dir, "val", tasks=("segment",), limit=1, progress=False)["tasks"]["segment"]
    assert seg["mask_source"] == "model" and seg["prompts"] == ["text", "box"]  # no point prompts: skipped
    assert 0.0 <= seg["mIoU"] <= 1.0 and 0.0 <= seg["box_mIoU"] <= 1.0 and "point_mIoU" not in seg
    assert any("takes no point prompts" in n for n in seg["notices"])


def test_segment_prompts_selector(data_dir):
    pred = OracleSegmenter(data_dir)
    seg = evaluate(pred, data_dir, "val", tasks=("segment",), progress=False,
                   segment_prompts=("point",))["tasks"]["segment"]
    assert set(pred.prompts_seen) == {"point"} and seg["point_mIoU"] == 1.0 and "mIoU" not in seg


def test_segment_skipped_with_a_note_when_the_model_cannot_or_the_data_has_no_masks(data_dir, tmp_path):
    r = evaluate(FakePredictor(), data_dir, "val", tasks=("refer", "segment"), progress=False)
    assert "refer" in r["tasks"] and "P@0.5" in r["tasks"]["refer"]  # the other tasks still run
    assert "no segment method" in r["tasks"]["segment"]["skipped"]

    class NoDecoder(FakePredictor):  # e.g. the worker without a mask engine: told on the first call
        def segment(self, *args, **kwargs):
            raise PixelLLMError("this model has no mask decoder yet; pass --mask-engine sam:PATH")

    assert "no mask decoder" in evaluate(NoDecoder(), data_dir, "val", tasks=("segment",),
                                         progress=False)["tasks"]["segment"]["skipped"]
    # the same data without `segmentation`
    bare = tmp_path / "bare"
    (bare / "images").mkdir(parents=True)
    (bare / "images" / "val").symlink_to(data_dir / "images" / "val")
    ref = json.loads((data_dir / "refcoco_val.json").read_text())
    for ann in ref["annotations"]:
        ann.pop("segmentation", None)
    (bare / "refcoco_val.json").write_text(json.dumps(ref))
    skipped = evaluate(OracleSegmenter(data_dir), bare, "val", tasks=("segment",), progress=False)
    assert "segmentation" in skipped["tasks"]["segment"]["skipped"]
    assert "| segment | skipped |" in markdown_table(skipped)


class OracleCaptioner(FakePredictor):
    """Whole-image captions that name every object of the scene (from the VG region captions)."""

    def __init__(self, data_dir, split="val"):
        super().__init__()
        self.regions = {str(s.image): [p.text for p in s.prompts]
                        for s in load_task_samples(data_dir, split, "dense")}

    def caption(self, images, *, trace=True, adapter=None, max_new_tokens=40, num_beams=1, from_regions=None):
        self.calls.append(("caption", len(images)))
        return [TracedCaption(", ".join(f"a {t}" for t in self.regions[str(im)]) + " on a background", [], 1.0,
                              self.model_version) for im in images]


def test_caption_object_f1(data_dir):
    cap = evaluate(OracleCaptioner(data_dir), data_dir, "val", tasks=("caption",), meteor=False,
                   progress=False)["tasks"]["caption"]
    assert cap["caption_object_f1"] == cap["caption_object_precision"] == cap["caption_object_recall"] == 1.0
    assert cap["caption_object_f1_per_image"] == 1.0
    assert cap["caption_objects_named"] == cap["caption_objects_in_scenes"] == cap["caption_objects_matched"] > 0
    assert 0.0 < cap["caption_object_f1_references"] < 1.0  # GT captions name at most three objects
    fake = evaluate(FakePredictor(), data_dir, "val", tasks=("caption",), meteor=False,
                    progress=False)["tasks"]["caption"]  # "a shape": names no object
    assert fake["caption_object_f1"] == 0.0 and fake["caption_objects_named"] == 0
    assert "CIDEr" in fake and fake["images"] == 4


def test_caption_object_f1_without_vg_is_a_notice(data_dir, tmp_path):
    root = tmp_path / "novg"
    (root / "images").mkdir(parents=True)
    (root / "images" / "val").symlink_to(data_dir / "images" / "val")
    (root / "coco_captions_val.json").write_text((data_dir / "coco_captions_val.json").read_text())
    cap = evaluate(FakePredictor(), root, "val", tasks=("caption",), meteor=False, progress=False)["tasks"]["caption"]
    assert "caption_object_f1" not in cap and "CIDEr" in cap
    assert any("caption object F1 skipped" in n for n in cap["notices"])


def test_several_splits_side_by_side(data_dir, tmp_path):
    one = evaluate_splits(FakePredictor(), data_dir, ["val"], tasks=("refer",), progress=False)
    assert one == evaluate(FakePredictor(), data_dir, "val", tasks=("refer",), progress=False) | {
        "timing_s": one["timing_s"]}  # one split: evaluate's own format
    r = evaluate_splits(OracleSegmenter(data_dir, ("val", "test")), data_dir, ["val", "test", "missing"],
                        tasks=("refer", "segment"), progress=False)
    assert list(r["splits"]) == ["val", "test", "missing"] and r["model_version"] == "fake-1"
    assert r["splits"]["val"]["split"] == "val" and r["splits"]["val"]["tasks"]["segment"]["mIoU"] == 1.0
    assert r["splits"]["test"]["tasks"]["segment"]["images"] == 2
    assert "skipped" in r["splits"]["missing"]["tasks"]["refer"]
    table = markdown_table(r)
    assert table.splitlines()[0] == "| task | metric | val | test | missing |"
    assert "| segment | mIoU | 1.0000 |" in table and "| refer | skipped |" in table
    assert any(line.startswith("| segment | n | ") for line in table.splitlines())
    md = write_report(r, tmp_path / "rep").read_text()
    assert "splits `val`, `test`, `missing`" in md
    saved = json.loads((tmp_path / "rep" / "results.json").read_text())
    assert saved["splits"]["test"]["tasks"]["refer"]["count"] == r["splits"]["test"]["tasks"]["refer"]["count"]


# ---- the real Predictor with a tiny SAM, and the CLI ---------------------------------------------------------

@pytest.fixture(scope="module")
def sam_dir(tmp_path_factory):
    return save_tiny_sam(tmp_path_factory.mktemp("tiny-sam"))


def test_tiny_predictor_with_tiny_sam(data_dir, sam_dir, tiny_predictor):
    from pixelllm_plugins.inference.predictor import Predictor

    pred = Predictor(tiny_predictor.model, tokenizer=tiny_predictor.tokenizer, device="cpu",
                     dtype=torch.float32, mask_engine=f"sam:{sam_dir}")
    seg = evaluate(pred, data_dir, "val", tasks=("segment",), limit=2, progress=False)["tasks"]["segment"]
    assert seg["images"] == 2 and seg["count"] > 0 and seg["box_count"] == seg["objects"]
    for key in ("cIoU", "mIoU", "P@0.5", "box_mIoU", "point_mIoU"):
        assert 0.0 <= seg[key] <= 1.0
    assert "skipped" in evaluate(tiny_predictor, data_dir, "val", tasks=("segment",), limit=1,
                                 progress=False)["tasks"]["segment"]  # no mask decoder, no engine


def test_cli_eval_splits_segment_and_caption(data_dir, sam_dir, tiny_checkpoint, capsys, monkeypatch):
    from pixelllm_plugins.cli import main

    monkeypatch.delenv("PIXELLLM_WORKER_URL", raising=False)
    monkeypatch.delenv("PIXELLLM_MASK_ENGINE", raising=False)
    code = main(["eval", "--data", str(data_dir), "--split", "val", "test", "--tasks", "segment", "caption",
                 "--model", str(tiny_checkpoint), "--device", "cpu", "--mask-engine", f"sam:{sam_dir}",
                 "--limit", "1", "--no-meteor", "--json", "--segment-prompts", "box", "point"])
    out = capsys.readouterr().out
    assert code == 0
    r = json.loads(out)
    assert list(r["splits"]) == ["val", "test"]
    for split in ("val", "test"):
        tasks = r["splits"][split]["tasks"]
        assert "box_mIoU" in tasks["segment"] and "mIoU" not in tasks["segment"]
        assert 0.0 <= tasks["caption"]["caption_object_f1"] <= 1.0
    # one split, no mask engine: the usual format, segment skipped with a note (not an error)
    code = main(["eval", "--data", str(data_dir), "--tasks", "segment", "--model", str(tiny_checkpoint),
                 "--device", "cpu", "--limit", "1"])
    out = capsys.readouterr().out
    assert code == 0 and out.startswith("| task | metric | value | n |") and "| segment | skipped |" in out
