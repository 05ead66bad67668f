"""Referring segmentation: the SAM mask engine (a tiny random SAM saved and loaded by path), the Predictor's
``segment`` over texts / boxes / points, its errors, and the CLI's ``segment``.

A random SAM gives arbitrary masks: the tests check shapes, sizes, types, order and errors, not quality.
The SAM is seeded, and its masks for these prompts are far from empty (a quarter to four fifths of the
image); the empty-mask branch is tested with a stub engine.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from PIL import Image
from tiny_sam import save_tiny_sam

from pixelllm_plugins import cli
from pixelllm_plugins.cli import main
from pixelllm_plugins.errors import CheckpointError, InvalidBoxError, InvalidPromptError, PixelLLMError
from pixelllm_plugins.inference.mask_engine import SamMaskEngine, parse_mask_engine
from pixelllm_plugins.inference.predictor import Predictor
from pixelllm_plugins.inference.results import MaskResult
from pixelllm_plugins.inference.tasks import TASKS
from pixelllm_plugins.masks import mask_iou, mask_to_box, polygons_to_mask, rle_to_mask

W, H = 160, 120


@pytest.fixture(scope="module")
def sam_dir(tmp_path_factory):
    return save_tiny_sam(tmp_path_factory.mktemp("tiny-sam"))


@pytest.fixture(scope="module")
def engine(sam_dir):
    return SamMaskEngine.from_pretrained(sam_dir, device="cpu")


@pytest.fixture(scope="module")
def seg(tiny_predictor, engine):
    """The session's tiny PixelLLM (same weights) with the tiny SAM as its mask engine."""
    return Predictor(tiny_predictor.model, tokenizer=tiny_predictor.tokenizer,
                     model_version=tiny_predictor.base_version, device="cpu", mask_engine=engine)


@pytest.fixture()
def scene(scene_files):
    with Image.open(scene_files[0]) as im:  # the session's 160x120 scene
        return im.convert("RGB")


def _check_mask_result(r: MaskResult, size=(W, H)):
    w, h = size
    assert isinstance(r, MaskResult)
    assert r.mask["size"] == [h, w] and isinstance(r.mask["counts"], str)
    decoded = rle_to_mask(r.mask)
    assert decoded.shape == (h, w) and decoded.dtype == bool and decoded.any()
    from pycocotools import mask as coco  # the RLE is pycocotools' own

    with warnings.catch_warnings():  # pycocotools' NumPy 2 __array__ deprecation
        warnings.simplefilter("ignore", DeprecationWarning)
        raw = coco.decode({"size": r.mask["size"], "counts": r.mask["counts"].encode("ascii")})
    assert np.array_equal(raw.astype(bool), decoded)
    assert r.polygons and all(len(p["exterior"]) >= 3 and "holes" in p for p in r.polygons)
    assert mask_iou(polygons_to_mask(r.polygons, w, h), decoded) >= 0.9
    assert len(r.box_xyxy) == 4 and all(isinstance(v, float) for v in r.box_xyxy)
    assert isinstance(r.score, float) and isinstance(r.mask_score, float)
    assert r.model_version
    assert MaskResult.from_dict(json.loads(json.dumps(r.to_dict()))) == r
    return decoded


# ---- the engine ----------------------------------------------------------------------------------------

def test_engine_masks_are_in_original_pixels_and_the_embedding_is_cached(engine, scene):
    engine.clear_cache()
    key = engine.set_image(scene)
    assert isinstance(key, str) and engine.stats["vision_calls"] >= 1
    calls = engine.stats["vision_calls"]
    by_box = engine.predict(scene, boxes=[[10, 10, 70, 80], [80, 30, 150, 100]])
    by_point = engine.predict(scene, points=[[40, 40], [100, 60], [5, 5]], point_labels=[1, 0, 1])
    assert engine.stats["vision_calls"] == calls  # set_image's embedding served both
    assert len(by_box) == 2 and len(by_point) == 3
    for mask, score in by_box + by_point:
        assert mask.shape == (H, W) and mask.dtype == bool and mask.any()
        assert isinstance(score, float)
    with pytest.raises(InvalidPromptError, match="either boxes or points"):
        engine.predict(scene)


def test_engine_reads_a_preprocessor_config_and_is_deterministic(tmp_path, engine, scene):
    with_config = SamMaskEngine.from_pretrained(save_tiny_sam(tmp_path / "sam", preprocessor=True))
    a = with_config.predict(scene, boxes=[[10, 10, 70, 80]])
    b = engine.predict(scene, boxes=[[10, 10, 70, 80]])  # same seed, processor from the model's config
    assert np.array_equal(a[0][0], b[0][0]) and a[0][1] == pytest.approx(b[0][1])


def test_mask_engine_specs_and_checkpoint_errors(tmp_path, sam_dir, tiny_checkpoint):
    assert parse_mask_engine(f"sam:{sam_dir}").name == f"sam:{sam_dir}"
    (tmp_path / "file").write_text("x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "no-weights").mkdir()
    (tmp_path / "no-weights" / "config.json").write_text((sam_dir / "config.json").read_text())
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "config.json").write_text((sam_dir / "config.json").read_text())
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"not loaded")
    cases = [
        (f"sam:{tmp_path / 'missing'}", "does not exist"),
        (f"sam:{tmp_path / 'file'}", "is a file, not a folder"),
        (f"sam:{tmp_path / 'empty'}", "not a SAM checkpoint \\(no config.json\\)"),
        (f"sam:{tiny_checkpoint}", "not a SAM checkpoint"),
        (f"sam:{tmp_path / 'no-weights'}", "no model.safetensors"),
        (f"sam:{tmp_path / 'pickled'}", "never from pickled"),
        (f"medsam:{sam_dir}", "unknown mask engine"),
        (str(sam_dir), "unknown mask engine"),
        ("sam:", "give the SAM checkpoint folder"),
        ("", "give sam:PATH"),
    ]
    for spec, message in cases:
        with pytest.raises(CheckpointError, match=message):
            parse_mask_engine(spec)
    with pytest.raises(CheckpointError, match="does not exist"):  # the constructor loads it at once
        Predictor("tiny", device="cpu", mask_engine=f"sam:{tmp_path / 'missing'}")


# ---- Predictor.segment -----------------------------------------------------------------------------------

def test_segment_boxes_clips_and_keeps_order(seg, scene):
    (results,) = seg.segment([scene], boxes=[[[10, 10, 70, 80], [-20, 30, 150, 500]]])
    assert len(results) == 2
    for r in results:
        _check_mask_result(r)
        assert r.text is None and r.score == r.mask_score
    assert results[0].box_xyxy == (10.0, 10.0, 70.0, 80.0)
    assert results[1].box_xyxy == (0.0, 30.0, 150.0, float(H))  # the given box, clipped


def test_segment_points_gives_the_masks_box(seg, scene):
    (results,) = seg.segment([scene], points=[[[40, 40], [100, 60]]], point_labels=[[1, 0]])
    assert len(results) == 2
    for r in results:
        mask = _check_mask_result(r)
        assert r.box_xyxy == mask_to_box(mask) and r.text is None
    (defaults,) = seg.segment([scene], points=[[(40, 40)]])  # labels default to 1
    assert len(defaults) == 1


def test_segment_texts_uses_the_referred_box_and_its_score(seg, tiny_predictor, scene):
    texts = ["the red circle", "the blue square"]
    (results,) = seg.segment([scene], texts=[texts])
    (referred,) = tiny_predictor.refer([scene], [texts])
    assert [r.text for r in results] == [dets[0].text for dets in referred]
    for r, dets in zip(results, referred):
        _check_mask_result(r)
        assert r.box_xyxy == pytest.approx(dets[0].box_xyxy) and r.score == pytest.approx(dets[0].score)


def test_segment_batches_mixed_prompts_through_the_task_registry(seg, scene, scene_files):
    images = [scene, str(scene_files[1]), scene_files[2].read_bytes()]
    prompts = [{"texts": ["the red circle"]}, {"boxes": [[5, 5, 60, 100], [0, 0, 40, 40]]},
               {"points": [[10, 10], [30, 40], [50, 20]], "point_labels": [1, 1, 0]}]
    out = TASKS["segment"].call(seg, images, prompts, adapter=None)
    assert [len(r) for r in out] == [1, 2, 3]
    assert out[0][0].text is not None and out[1][0].text is None
    for r in out[1]:
        _check_mask_result(r, (90, 200))
    for r in out[2]:
        _check_mask_result(r, (64, 64))
    assert seg.segment([scene], texts=[[]]) == [[]]


@pytest.mark.parametrize("kwargs, error, message", [
    ({"points": [[[500, 10]]]}, InvalidPromptError, "point 0: \\(500, 10\\) lies outside the 160x120 image"),
    ({"points": [[[-1, 10]]]}, InvalidPromptError, "lies outside"),
    ({"points": [[[float("nan"), 10]]]}, InvalidPromptError, "finite numbers"),
    ({"boxes": [[[200, 200, 300, 300]]]}, InvalidBoxError, "box 0: .*no area inside the 160x120 image"),
    ({"boxes": [[[10, 10, 10, 50]]]}, InvalidBoxError, "no area"),
    ({"texts": [[""]]}, InvalidPromptError, "empty"),
    ({"texts": [["a"]], "points": [[[1, 1]]]}, InvalidPromptError, "only one of texts, boxes or points"),
    ({}, InvalidPromptError, "needs texts, boxes or points"),
    ({"boxes": [[[0, 0, 9, 9]]], "point_labels": [[1]]}, InvalidPromptError, "point_labels go with points"),
    ({"points": [[[1, 1]]], "point_labels": [[2]]}, InvalidPromptError, "must be 1 .* or 0"),
    ({"points": [[[1, 1]]], "point_labels": [[1, 0]]}, InvalidPromptError, "1 points but 2 point_labels"),
    ({"boxes": [[[0, 0, 9, 9]], [[0, 0, 9, 9]]]}, InvalidPromptError, "1 images but 2 entries of boxes"),
])
def test_segment_refuses_bad_input(seg, scene, kwargs, error, message):
    with pytest.raises(error, match=message):
        seg.segment([scene], **kwargs)


class StubEngine:
    """A mask engine answering fixed masks: the empty-mask and wrong-answer branches."""

    name = "stub"

    def __init__(self, masks):
        self.masks = masks

    def predict(self, image, boxes=None, points=None, point_labels=None):
        return [(m, 0.5) for m in self.masks]


def test_an_empty_predicted_mask_is_an_error_that_says_so(tiny_predictor, scene):
    def stub(masks):
        return Predictor(tiny_predictor.model, tokenizer=tiny_predictor.tokenizer, device="cpu",
                         mask_engine=StubEngine(masks))

    with pytest.raises(PixelLLMError, match="image 0 box 0: the mask engine predicted an empty mask"):
        stub([np.zeros((H, W), bool)]).segment([scene], boxes=[[[10, 10, 50, 50]]])
    full = np.zeros((H, W), bool)
    full[20:40, 30:60] = True
    (ok,) = stub([full]).segment([scene], points=[[[40, 30]]])
    assert ok[0].box_xyxy == (30.0, 20.0, 60.0, 40.0) and ok[0].mask_score == 0.5
    with pytest.raises(PixelLLMError, match="answered 2 masks for 1 prompts"):
        stub([full, full]).segment([scene], boxes=[[[10, 10, 50, 50]]])
    with pytest.raises(PixelLLMError, match="answered a 10x10 mask"):
        stub([np.ones((10, 10), bool)]).segment([scene], boxes=[[[10, 10, 50, 50]]])


def test_without_a_mask_engine_segment_says_how_to_get_one(tiny_predictor, sam_dir, scene, monkeypatch):
    monkeypatch.delenv("PIXELLLM_MASK_ENGINE", raising=False)
    with pytest.raises(PixelLLMError, match="this model has no mask decoder yet; pass --mask-engine sam:PATH"):
        tiny_predictor.segment([scene], boxes=[[[10, 10, 50, 50]]])
    fresh = Predictor(tiny_predictor.model, tokenizer=tiny_predictor.tokenizer, device="cpu")
    monkeypatch.setenv("PIXELLLM_MASK_ENGINE", "sam:/no/such/folder")
    with pytest.raises(CheckpointError, match="does not exist"):
        fresh.segment([scene], boxes=[[[10, 10, 50, 50]]])
    monkeypatch.setenv("PIXELLLM_MASK_ENGINE", f"sam:{sam_dir}")
    (results,) = fresh.segment([scene], boxes=[[[10, 10, 50, 50]]])
    assert len(results) == 1 and fresh.mask_engine.name == f"sam:{sam_dir}"


# ---- the CLI -------------------------------------------------------------------------------------------

def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_segment_json_and_drawing(capsys, tiny_checkpoint, sam_dir, scene_files, tmp_path, monkeypatch):
    monkeypatch.delenv("PIXELLLM_MASK_ENGINE", raising=False)
    drawing = tmp_path / "masks.png"
    code, out, err = run(capsys, "segment", scene_files[0], "the red circle", "--model", tiny_checkpoint,
                         "--mask-engine", f"sam:{sam_dir}", "--json", "--draw", drawing)
    assert code == 0, err
    result = json.loads(out)
    assert set(result) >= {"image", "texts", "image_size", "detections", "model_version", "drawing"}
    assert result["image_size"] == [160, 120]
    (det,) = result["detections"]
    assert set(det) == {"text", "box_xyxy", "score", "mask", "polygons", "mask_score", "model_version"}
    assert det["mask"]["size"] == [120, 160] and rle_to_mask(det["mask"]).shape == (120, 160)
    with Image.open(drawing) as im:
        assert im.size == (160, 120)
    code, out, _ = run(capsys, "segment", scene_files[0], "--box", "10,10,60,60", "--point", "30,30",
                       "--model", tiny_checkpoint, "--mask-engine", f"sam:{sam_dir}", "--json")
    assert code == 1 and "only one kind of prompt" in out
    code, out, _ = run(capsys, "segment", scene_files[0], "--point", "30,30", "--point", "100,50,0",
                       "--model", tiny_checkpoint, "--mask-engine", f"sam:{sam_dir}", "--json")
    result = json.loads(out)
    assert code == 0 and result["point_labels"] == [1, 0] and len(result["detections"]) == 2
    assert all("text" not in d for d in result["detections"])
    code, out, _ = run(capsys, "segment", scene_files[0], "--box", "10,10,60,60", "--model", tiny_checkpoint,
                       "--mask-engine", f"sam:{sam_dir}")
    assert code == 0 and "mask score" in out and "(160x120)" in out


def test_cli_segment_needs_a_mask_engine(capsys, tiny_checkpoint, scene_files, tmp_path, monkeypatch):
    monkeypatch.delenv("PIXELLLM_MASK_ENGINE", raising=False)
    code, _, err = run(capsys, "segment", scene_files[0], "x", "--model", tiny_checkpoint)
    assert code == 2 and "no mask decoder yet; pass --mask-engine sam:PATH" in err
    code, _, err = run(capsys, "segment", scene_files[0], "x", "--model", tiny_checkpoint, "--mask-engine",
                       f"sam:{tmp_path}")
    assert code == 2 and "not a SAM checkpoint" in err
    code, _, err = run(capsys, "segment", scene_files[0], "--point", "1,2,7")
    assert code == 2 and "--point 1,2,7" in err
    code, _, err = run(capsys, "segment", scene_files[0], "--model", tiny_checkpoint)
    assert code == 2 and "give a referring TEXT, --box" in err


def test_cli_segment_batch_isolates_bad_lines(capsys, tiny_checkpoint, sam_dir, scene_files, tmp_path,
                                              monkeypatch):
    monkeypatch.setenv("PIXELLLM_MASK_ENGINE", f"sam:{sam_dir}")  # the environment's engine
    img = str(scene_files[0])
    lines = [
        {"image": img, "text": "the red circle"},
        {"image": img, "texts": ["a", "b"], "points": [[1, 1]]},
        {"image": img, "boxes": [[10, 10, 60, 60], [0, 0, 30, 30]]},
        {"image": img, "points": [[500, 5]]},
        {"image": img, "text": ""},
        {"image": img, "points": [[20, 20], [100, 60]], "point_labels": [1, 0]},
        {"image": img, "boxes": [[300, 300, 400, 400]]},
        {"image": img},
        {"image": str(tmp_path / "missing.png"), "boxes": [[0, 0, 5, 5]]},
    ]
    batch = tmp_path / "seg.jsonl"
    batch.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    code, out, _ = run(capsys, "segment", "--batch", batch, "--model", tiny_checkpoint)
    results = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and len(results) == len(lines)
    assert all(r["image"] == line["image"] for r, line in zip(results, lines))
    assert len(results[0]["detections"]) == 1 and results[0]["detections"][0]["text"]
    assert "only one kind of prompt" in results[1]["error"]
    assert [d["box_xyxy"] for d in results[2]["detections"]] == [[10, 10, 60, 60], [0, 0, 30, 30]]
    assert "lies outside the 160x120 image" in results[3]["error"]
    assert "empty" in results[4]["error"]
    assert len(results[5]["detections"]) == 2 and results[5]["image_size"] == [160, 120]
    assert "no area" in results[6]["error"]
    assert "needs one of 'text'/'texts', 'boxes' or 'points'" in results[7]["error"]
    assert "not found" in results[8]["error"]
    for r in (results[0], results[2], results[5]):
        for d in r["detections"]:
            assert rle_to_mask(d["mask"]).shape == (120, 160) and d["polygons"]


def test_cli_segment_uses_load_predictor_with_the_engine(capsys, monkeypatch, seg, scene_files):
    seen = {}

    def load(model, device, **options):
        seen.update(options)
        return seg

    monkeypatch.setattr(cli, "_load_predictor", load)
    code, out, _ = run(capsys, "segment", scene_files[0], "--box", "5,5,50,50", "--mask-engine", "sam:X", "--json")
    assert code == 0 and seen == {"mask_engine": "sam:X"} and len(json.loads(out)["detections"]) == 1
