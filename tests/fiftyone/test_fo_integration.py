"""The plugin with the real model: in-process ``Predictor`` (tiny random checkpoint) and the GPU worker.

Labels written through FiftyOne are checked against the predictor's own output for the same images.
"""

from __future__ import annotations

import os

import fiftyone.operators as foo
import pytest
from fiftyone.operators.delegated import DelegatedOperationService
from fiftyone.operators.executor import ExecutionContext, Executor
from fo_worker import running_worker

from pixelllm_plugins import predictors
from pixelllm_plugins.geometry import fo_relative_to_xyxy, xyxy_to_fo_relative
from pixelllm_plugins.integrations import fiftyone as pxfo

PLUGIN = "@pixelllm/pixelllm"

pytestmark = pytest.mark.integration


@pytest.fixture()
def fresh_predictors():
    predictors.release_predictors()
    yield
    predictors.release_predictors()


def _approx_box(values, abs=1e-4):
    return pytest.approx(list(values), abs=abs)


def test_operators_with_the_real_predictor(plugin_installed, dataset, tiny_checkpoint, tiny_predictor,
                                           fresh_predictors):
    model = str(tiny_checkpoint)
    res = foo.execute_operator(f"{PLUGIN}/refer", ctx=dict(dataset=dataset, params={
        "prompt_field": "refexp", "model": model, "batch_size": 4}))
    assert res.result["processed"] == 6 and res.result["model_version"] == tiny_predictor.model_version
    for sample in dataset:
        (expected,) = tiny_predictor.refer([sample.filepath], [[sample.refexp]])[0][0]
        (det,) = sample.pixelllm.detections
        w, h = _size(sample)
        assert det.bounding_box == _approx_box(xyxy_to_fo_relative(expected.box_xyxy, w, h))
        assert det.confidence == pytest.approx(expected.score, abs=1e-3)
        assert det.model_version == tiny_predictor.model_version

    foo.execute_operator(f"{PLUGIN}/caption_regions", ctx=dict(dataset=dataset, request_delegation=True,
                                                               params={"model": model, "batch_size": 3}))
    foo.execute_operator(f"{PLUGIN}/caption_with_trace", ctx=dict(dataset=dataset, request_delegation=True,
                                                                  params={"model": model}))
    foo.execute_operator(f"{PLUGIN}/dense_caption", ctx=dict(dataset=dataset, request_delegation=True,
                                                             params={"model": model, "min_score": 0.0,
                                                                     "max_regions": 3}))
    results = DelegatedOperationService().execute_queued_operations(dataset_name=dataset.name)
    assert sorted(r.result["operation"] for r in results) == ["caption_regions", "caption_with_trace",
                                                              "dense_caption"]
    assert all(r.result["failed"] == 0 and r.result["processed"] == 6 for r in results)

    for sample in dataset.limit(2):
        w, h = _size(sample)
        boxes = [fo_relative_to_xyxy(d.bounding_box, w, h) for d in sample.ground_truth.detections]
        expected = tiny_predictor.caption_regions([sample.filepath], [boxes])[0]
        assert [d.caption for d in sample.ground_truth.detections] == [r.text for r in expected]
        (traced,) = tiny_predictor.caption([sample.filepath], trace=True)
        assert sample.pixelllm_caption.label == traced.text
        assert [k.label for k in sample.pixelllm_trace.keypoints] == [word.text for word in traced.words]
        regions = tiny_predictor.dense_caption([sample.filepath], max_regions=3, min_score=0.0)[0]
        assert [d.caption for d in sample.pixelllm_regions.detections] == [r.text for r in regions]
    # one model load for all four runs (the cache lives in pixelllm_plugins, not in the plugin module)
    assert len(predictors._predictors) == 1


def test_apply_model_with_the_real_predictor(dataset, tiny_predictor):
    model = pxfo.PixelLLMModel("refer", predictor=tiny_predictor)
    dataset.apply_model(model, label_field="ref", batch_size=4, prompt_field="refexp")
    assert dataset.count("ref.detections") == 6
    assert dataset.distinct("ref.detections.model_version") == [tiny_predictor.model_version]


def _size(sample):
    from PIL import Image

    with Image.open(getattr(sample, "filepath", None) or sample.image) as im:
        return im.size


# ---- remote mode --------------------------------------------------------------------------------------


@pytest.fixture()
def worker(tiny_checkpoint, fo_subprocess_env, poll, tmp_path):
    pytest.importorskip("pixelllm_plugins.serving.app", reason="the GPU worker is not available")
    with running_worker(tiny_checkpoint, tmp_path, fo_subprocess_env(), poll) as url:
        yield url


def test_remote_mode_uses_the_worker(plugin_installed, dataset, worker, tiny_predictor, monkeypatch,
                                     fresh_predictors):
    from pixelllm_plugins.serving.client import RemotePredictor

    monkeypatch.setenv("PIXELLLM_WORKER_URL", worker)
    ctx = ExecutionContext(operator_uri=f"{PLUGIN}/refer", executor=Executor(),
                           request_params={"dataset_name": dataset.name, "params": {}})
    form = foo.get_operator(f"{PLUGIN}/refer").resolve_type(ctx, "inputs").type.properties
    assert worker in form["pixelllm_mode"].view.label
    res = foo.execute_operator(f"{PLUGIN}/refer", ctx=dict(dataset=dataset, params={"prompt_field": "refexp"}))
    assert res.result["processed"] == 6 and res.result["model_version"] == tiny_predictor.model_version
    assert [type(p) for p in predictors._predictors.values()] == [RemotePredictor]
    for sample in dataset.limit(3):
        (expected,) = tiny_predictor.refer([sample.filepath], [[sample.refexp]])[0][0]
        w, h = _size(sample)
        assert sample.pixelllm.detections[0].bounding_box == _approx_box(
            xyxy_to_fo_relative(expected.box_xyxy, w, h), abs=1e-3)
    assert os.environ["PIXELLLM_WORKER_URL"] == worker


# ---- the project's synthetic scenes (RefCOCO format) ------------------------------------------------------


class _RefCocoAnswers:
    """Answers ``refer`` with the target box of the RefCOCO annotation (ground truth) for that image+text."""

    model_version = "refcoco-gt"

    def __init__(self, answers):
        from pixelllm_plugins.io import image_digest, load_image

        self._key = lambda image: image_digest(load_image(image))
        self.answers = {(self._key(path), text): box for (path, text), box in answers.items()}

    def refer(self, images, texts, *, adapter=None):
        from pixelllm_plugins.inference.results import Detection

        return [[[Detection(self.answers[(self._key(im), t)], 1.0, t, self.model_version)] for t in ts]
                for im, ts in zip(images, texts)]


def test_synthetic_scenes_against_refcoco_ground_truth(plugin_installed, tmp_path, monkeypatch, tiny_checkpoint,
                                                       fresh_predictors):
    import fiftyone as fo

    data = pytest.importorskip("pixelllm_plugins.data")
    synth = data.write_synthetic_dataset(tmp_path / "synth", "val", 4, seed=0)
    grounded = data.load_refcoco(synth.refcoco, synth.image_dir)
    ds = fo.Dataset()
    try:
        answers, samples = {}, []
        for gs in grounded:
            w, h = _size(gs)
            prompt = gs.prompts[0]
            answers[(str(gs.image), prompt.text)] = prompt.target_box
            samples.append(fo.Sample(
                filepath=str(gs.image), refexp=prompt.text,
                target=fo.Detection(label="target", bounding_box=xyxy_to_fo_relative(prompt.target_box, w, h)),
                ground_truth=fo.Detections(detections=[
                    fo.Detection(label="object", bounding_box=xyxy_to_fo_relative(b, w, h)) for b in gs.gt_boxes])))
        ds.add_samples(samples)
        oracle = _RefCocoAnswers(answers)
        monkeypatch.setattr(pxfo.predictors, "get_predictor", lambda model=None, **kw: oracle)
        res = foo.execute_operator(f"{PLUGIN}/refer", ctx=dict(dataset=ds, params={"prompt_field": "refexp"}))
        assert res.result["processed"] == len(samples) > 0
        for sample in ds:
            (det,) = sample.pixelllm.detections
            assert det.bounding_box == _approx_box(sample.target.bounding_box, abs=1e-9)
        monkeypatch.undo()
        # the real model captions every ground-truth box of the generated scenes, ids kept
        ids = ds.values("ground_truth.detections.id")
        res = foo.execute_operator(f"{PLUGIN}/caption_regions", ctx=dict(dataset=ds, params={
            "boxes_field": "ground_truth", "model": str(tiny_checkpoint)}))
        assert res.result["failed"] == 0 and res.result["labels"] == ds.count("ground_truth.detections")
        assert ds.values("ground_truth.detections.id") == ids
        assert ds.count("ground_truth.detections.caption") == ds.count("ground_truth.detections")
    finally:
        ds.delete()
