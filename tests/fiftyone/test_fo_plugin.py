"""The ``@pixelllm/pixelllm`` plugin: loads cleanly, registers every operator, runs immediate and delegated."""

from __future__ import annotations

import fiftyone.operators as foo
import fiftyone.plugins as fop
import pytest
import yaml
from fiftyone.operators.delegated import DelegatedOperationService
from fiftyone.operators.executor import ExecutionContext, Executor
from fiftyone.plugins.context import build_plugin_contexts

from pixelllm_plugins.integrations import fiftyone as pxfo

PLUGIN = "@pixelllm/pixelllm"
OPERATORS = ["refer", "caption_regions", "dense_caption", "caption_with_trace", "segment", "finetune",
             "free_model"]


def uri(name: str) -> str:
    return f"{PLUGIN}/{name}"


def drain(ds) -> list:
    """Run the dataset's queued delegated operations in this process (what `fiftyone delegated launch` does)."""
    return DelegatedOperationService().execute_queued_operations(dataset_name=ds.name)


def delegated_doc(result):
    svc = DelegatedOperationService()
    return svc.get(result.result["id"]) if isinstance(result.result, dict) else svc.get(result.result.id)


def test_plugin_loads_without_errors_and_registers_every_operator(plugin_installed):
    manifest = yaml.safe_load((plugin_installed / "fiftyone.yml").read_text())
    assert manifest["name"] == PLUGIN and manifest["operators"] == OPERATORS
    assert PLUGIN in [p.name for p in fop.list_plugins()]
    contexts = [c for c in build_plugin_contexts() if c.name == PLUGIN]
    assert len(contexts) == 1 and contexts[0].errors == []
    registered = {o.uri for o in foo.list_operators(builtin=False)}
    assert {uri(n) for n in OPERATORS} <= registered


@pytest.mark.parametrize("name,expected", [
    ("refer", {"prompt", "prompt_field", "label_field"}),
    ("caption_regions", {"boxes_field", "caption_attribute"}),
    ("dense_caption", {"label_field", "max_regions", "min_score"}),
    ("caption_with_trace", {"caption_field", "trace_field"}),
])
def test_forms_use_the_stable_parameter_names_with_defaults(plugin_installed, dataset, name, expected):
    op = foo.get_operator(uri(name))
    ctx = ExecutionContext(operator_uri=uri(name), request_params={"dataset_name": dataset.name, "params": {}},
                           executor=Executor())
    props = op.resolve_type(ctx, "inputs").type.properties
    common = {"model", "overwrite", "batch_size", "delegate", "view_target"}
    assert expected | common <= set(props)
    for key in expected | {"model", "overwrite", "batch_size"}:
        assert not props[key].required, key  # SDK calls pass validation without them
    if name == "caption_regions":
        assert props["boxes_field"].default == "ground_truth"


def test_refer_immediate_and_delegated(plugin_installed, dataset, oracle):
    dataset.compute_metadata()
    res = foo.execute_operator(uri("refer"), ctx=dict(dataset=dataset, params={"prompt_field": "refexp",
                                                                               "batch_size": 4}))
    assert res.result["processed"] == 6 and res.result["failed"] == 0
    assert res.result["fields"] == ["pixelllm"] and dataset.count("pixelllm.detections") == 6
    # delegated: queued, then drained in-process; the same request is skipped, a new one computed
    queued = foo.execute_operator(uri("refer"), ctx=dict(dataset=dataset, request_delegation=True,
                                                         params={"prompt": "the red circle",
                                                                 "label_field": "red"}))
    assert queued.delegated
    assert not dataset.has_field("red")  # nothing ran yet
    (done,) = drain(dataset)
    assert done.result["processed"] == 6
    doc = delegated_doc(queued)
    assert doc.run_state == "completed" and doc.status.progress == 1.0 and doc.status.label == "6/6 samples"
    for sample in dataset:
        boxes = {d.label: d.bounding_box for d in sample.ground_truth.detections}
        (det,) = sample.red.detections
        if "red circle" in boxes:
            assert det.bounding_box == pytest.approx(boxes["red circle"], abs=1e-9)


def test_delegate_parameter_queues_the_run(plugin_installed, dataset, fake):
    res = foo.execute_operator(uri("dense_caption"), ctx=dict(dataset=dataset, params={"delegate": True}))
    assert res.delegated and not dataset.has_field("pixelllm_regions")
    (done,) = drain(dataset)
    assert done.result["processed"] == 6 and dataset.count("pixelllm_regions.detections") == 12


def test_caption_regions_immediate_selected_labels_and_delegated(plugin_installed, dataset, oracle):
    sample = dataset.first()
    target = sample.ground_truth.detections[0]
    res = foo.execute_operator(uri("caption_regions"), ctx=dict(
        dataset=dataset, params={}, selected_labels=[{"label_id": target.id, "sample_id": sample.id,
                                                      "field": "ground_truth"}]))
    assert res.result["labels"] == 1 and dataset.count("ground_truth.detections.caption") == 1
    assert dataset.first().ground_truth.detections[0].caption == f"a {target.label}"
    queued = foo.execute_operator(uri("caption_regions"), ctx=dict(
        dataset=dataset, request_delegation=True, params={"boxes_field": "ground_truth", "batch_size": 2}))
    (done,) = drain(dataset)
    assert done.result["labels"] == 11  # the selected box was already captioned by this model version
    assert delegated_doc(queued).run_state == "completed"
    assert dataset.count("ground_truth.detections.caption") == 12
    assert dataset.distinct("ground_truth.detections.caption_model_version") == ["oracle-1"]


def test_dense_caption_and_caption_with_trace_immediate_and_delegated(plugin_installed, dataset, oracle):
    res = foo.execute_operator(uri("dense_caption"), ctx=dict(dataset=dataset, params={"max_regions": 1}))
    assert res.result["labels"] == 6
    res = foo.execute_operator(uri("caption_with_trace"), ctx=dict(view=dataset.limit(2), params={}))
    assert res.result["processed"] == 2 and dataset.count("pixelllm_caption") == 2
    foo.execute_operator(uri("caption_with_trace"), ctx=dict(dataset=dataset, request_delegation=True,
                                                             params={"batch_size": 3}))
    foo.execute_operator(uri("dense_caption"), ctx=dict(dataset=dataset, request_delegation=True,
                                                        params={"label_field": "dense2"}))
    results = drain(dataset)
    by_op = {r.result["operation"]: (r.result["processed"], r.result["skipped"]) for r in results}
    assert by_op == {"caption_with_trace": (4, 2), "dense_caption": (6, 0)}
    assert dataset.count("pixelllm_trace.keypoints") == 6 * 7 and dataset.count("pixelllm_trace_path") == 6
    assert dataset.count("dense2.detections") == 12


def test_view_target_and_errors_in_the_output(plugin_installed, dataset, fake):
    broken = dataset.first()
    broken.filepath = "/nonexistent/image.png"
    broken.save()
    view = dataset.skip(1)
    res = foo.execute_operator(uri("refer"), ctx=dict(view=view, params={"prompt": "the red circle"}))
    assert res.result["total"] == 5 and res.result["failed"] == 0  # the current view only
    res = foo.execute_operator(uri("refer"), ctx=dict(dataset=dataset, params={"prompt": "the red circle"}))
    assert (res.result["processed"], res.result["skipped"], res.result["failed"]) == (0, 5, 1)
    assert "file not found" in res.result["errors"][0]["error"]
    empty = foo.execute_operator(uri("refer"), ctx=dict(view=dataset.limit(0), params={"prompt": "x"}))
    assert empty.result["total"] == 0 and "no samples" in empty.result["message"]


def test_request_errors_surface_as_execution_errors(plugin_installed, dataset, fake):
    with pytest.raises(Exception, match="give a prompt"):
        foo.execute_operator(uri("refer"), ctx=dict(dataset=dataset, params={}))
    queued = foo.execute_operator(uri("refer"), ctx=dict(dataset=dataset, request_delegation=True,
                                                         params={"prompt_field": "nope"}))
    (failed,) = drain(dataset)
    assert "no field 'nope'" in failed.error
    assert delegated_doc(queued).run_state == "failed"


def test_free_model_operator(plugin_installed, dataset):
    from pixelllm_plugins import predictors

    predictors._predictors[("local", "x", None)] = object()
    res = foo.execute_operator(uri("free_model"), ctx=dict(dataset=dataset, params={}))
    assert res.result["released"] >= 1 and predictors._predictors == {}


def test_model_is_loaded_once_across_operator_runs(plugin_installed, dataset, monkeypatch):
    """The plugin module is re-imported per run; the predictor cache lives in pixelllm_plugins."""
    from fakes import FakePredictor

    from pixelllm_plugins import predictors

    built = []

    class Counting(FakePredictor):
        def __init__(self, *a, **k):
            super().__init__()
            built.append(self)

    monkeypatch.setattr("pixelllm_plugins.inference.predictor.Predictor", Counting)
    predictors.release_predictors()
    try:
        for field in ("a", "b", "c"):
            foo.execute_operator(uri("refer"), ctx=dict(dataset=dataset, params={"prompt": "x", "label_field": field,
                                                                                 "model": "some-model"}))
        assert len(built) == 1 and dataset.count("c") == 6
    finally:
        predictors.release_predictors()


def test_zoo_resolve_input_form():
    import fiftyone.operators.types as types

    prop = pxfo.resolve_input("pixelllm", None)
    assert isinstance(prop, types.Property) and {"operation", "prompt"} <= set(prop.type.properties)
