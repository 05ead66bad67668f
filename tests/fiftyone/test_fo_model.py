"""``PixelLLMModel`` with ``dataset.apply_model`` (batching, needs_fields) and the local model-zoo source."""

from __future__ import annotations

import fiftyone as fo
import fiftyone.zoo as foz
import pytest

from pixelllm_plugins.errors import InvalidParameterError
from pixelllm_plugins.integrations import fiftyone as pxfo


def test_apply_model_refer_with_prompt_field_batches(dataset, oracle):
    model = pxfo.PixelLLMModel("refer")
    dataset.apply_model(model, label_field="ref", batch_size=4, prompt_field="refexp")
    assert oracle.calls == [("refer", 4), ("refer", 2)]
    for sample in dataset:
        (det,) = sample.ref.detections
        gt = next(d for d in sample.ground_truth.detections if f"the {d.label}" == sample.refexp)
        assert det.bounding_box == pytest.approx(gt.bounding_box, abs=1e-9)
        assert det.prompt == sample.refexp and det.model_version == "oracle-1"


def test_apply_model_refer_fixed_prompt(dataset, fake):
    dataset.apply_model(pxfo.PixelLLMModel("refer", prompt="the red circle"), label_field="ref", batch_size=2)
    assert fake.calls == [("refer", 2)] * 3
    assert dataset.distinct("ref.detections.prompt") == ["the red circle"]


def test_apply_model_caption_regions_returns_captioned_copy(dataset, oracle):
    ids = dataset.values("ground_truth.detections.id")
    dataset.apply_model(pxfo.PixelLLMModel("caption_regions"), label_field="captioned", batch_size=3,
                        boxes_field="ground_truth")
    assert dataset.values("captioned.detections.id") == ids
    for sample in dataset:
        assert [d.caption for d in sample.captioned.detections] == [f"a {d.label}" for d in
                                                                     sample.ground_truth.detections]


def test_apply_model_dense_and_trace(dataset, oracle):
    dataset.apply_model(pxfo.PixelLLMModel("dense_caption", max_regions=1), label_field="dense", batch_size=4)
    assert dataset.count("dense.detections") == 6
    dataset.apply_model(pxfo.PixelLLMModel("caption_with_trace"), label_field="story", batch_size=4)
    sample = dataset.first()
    assert sample.story_caption.label.startswith("a ")
    assert len(sample.story_trace.keypoints) == len(sample.story_caption.label.split())
    assert sample.story_path.polylines[0].closed is False


def test_apply_model_records_per_sample_errors(dataset, fake):
    s = dataset.first()
    s.refexp = ""
    s.save()
    dataset.apply_model(pxfo.PixelLLMModel("refer"), label_field="ref", batch_size=3, prompt_field="refexp")
    assert "empty prompt" in dataset.first().ref.pixelllm_error
    assert dataset.count("ref.detections") == 5


def test_model_rejects_unknown_operation():
    with pytest.raises(InvalidParameterError, match="operation must be one of"):
        pxfo.PixelLLMModel("segmentation")
    with pytest.raises(InvalidParameterError, match="operation must be one of .* got 5"):
        pxfo.PixelLLMModel(5)
    with pytest.raises(InvalidParameterError, match="predictor must be a Predictor .* got str; .* pass model="):
        pxfo.PixelLLMModel("refer", predictor="synth-small")


def test_zoo_source_lists_and_loads(dataset, fake, tmp_root):
    root = pxfo.install_zoo_source()
    assert root == tmp_root / "zoo" / "pixelllm" and (root / "manifest.json").is_file()
    assert "pixelllm" in foz.list_zoo_models()
    model = foz.load_zoo_model("pixelllm", operation="refer", prompt="the blue square")
    assert isinstance(model, pxfo.PixelLLMModel) and model.prompt == "the blue square"
    dataset.apply_model(model, label_field="zoo", batch_size=8)
    assert dataset.count("zoo.detections") == 6 and fake.calls == [("refer", 6)]
    assert (root / "pixelllm" / "README.md").is_file()  # download_model ran (no network needed)
    model = foz.load_zoo_model("pixelllm", operation="caption_with_trace")
    assert model.operation == "caption_with_trace"


def test_install_plugin_links_the_package(tmp_path):
    target = pxfo.install_plugin(tmp_path)
    assert target.is_symlink() and (target / "fiftyone.yml").is_file()
    copied = pxfo.install_plugin(tmp_path, copy=True)
    assert not copied.is_symlink() and (copied / "__init__.py").is_file()
    assert pxfo.main(["install-plugin", "--dir", str(tmp_path / "other")]) == 0


def test_label_types_declared_in_schema(dataset, fake):
    pxfo.run_caption_with_trace(dataset)
    schema = dataset.get_field_schema()
    assert schema["pixelllm_caption"].document_type is fo.Classification
    assert schema["pixelllm_trace"].document_type is fo.Keypoints
    assert schema["pixelllm_trace_path"].document_type is fo.Polylines
    # dynamic attributes are declared, so the App sidebar can filter on them
    assert dataset.get_field("pixelllm_caption.model_version") is not None


def test_apply_model_sends_a_worker_the_file_and_keeps_pixels_for_a_local_model(dataset, monkeypatch, tmp_path):
    from pathlib import Path

    from fakes import FakePredictor
    from PIL import Image

    from pixelllm_plugins.io import EncodedImage

    class Recording(FakePredictor):  # no prepare(): stands for RemotePredictor
        def __init__(self):
            super().__init__()
            self.images = []

        def refer(self, images, texts, **kw):
            self.images.extend(images)
            return super().refer(images, texts, **kw)

    class Local(Recording):
        def prepare(self, image, limits=None):  # what an in-process Predictor has
            raise AssertionError("not called by the wrapper")

    samples = list(dataset)
    rotated = tmp_path / "rotated.jpg"  # EXIF orientation 6: a reader that honours it turns the picture
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.open(samples[1].filepath).convert("RGB").save(rotated, exif=exif.tobytes())
    samples[1].filepath = str(rotated)
    samples[1].save()
    view = dataset.select([samples[0].id, samples[1].id], ordered=True)
    remote = Recording()
    monkeypatch.setattr(pxfo.predictors, "get_predictor", lambda model=None, **kw: remote)
    view.apply_model(pxfo.PixelLLMModel("refer", prompt="the red circle"), label_field="ref", batch_size=2)
    first, second = remote.images
    assert isinstance(first, EncodedImage) and first.data == Path(samples[0].filepath).read_bytes()
    assert isinstance(second, Image.Image)  # an EXIF-rotated file: the pixels FiftyOne read
    local = Local()
    monkeypatch.setattr(pxfo.predictors, "get_predictor", lambda model=None, **kw: local)
    view.apply_model(pxfo.PixelLLMModel("refer", prompt="the red circle"), label_field="ref2", batch_size=2)
    assert all(isinstance(im, Image.Image) for im in local.images)  # FiftyOne's decoded copy, not decoded twice
    assert view.count("ref.detections") == view.count("ref2.detections") == 2
