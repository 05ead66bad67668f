"""Fuzzing the operators' parameters (issue 23): bad input never becomes a crash, a traceback or lost work.

Hypothesis (fixed seed: ``derandomize=True``) builds parameter dicts for every operator of
``@pixelllm/pixelllm`` with hostile values: wrong types, huge / negative / NaN / infinite numbers, lone
surrogates, control-only and over-long text, lists and dicts of junk, ``$``/``.``-prefixed and reserved
field names, missing and extra keys. The property, wherever the parameters enter:

- either the run is accepted, or a ``PixelLLMError`` with a short, non-empty, storable message is raised
  (the FiftyOne form marks the offending input with that message); never another exception type;
- a refused request leaves the dataset exactly as it was;
- on a dataset mixing good samples with missing, folder, non-image, empty, truncated and unopenable files
  (and a malformed stored box), every good sample is still labeled and every bad one gets its error.

Most examples check the request logic directly (no database); a bounded number run the operators for real
(through FiftyOne's operator machinery and through ``execute``) on a small MongoDB-backed dataset with the
fake predictor.
"""

from __future__ import annotations

import asyncio
import importlib
import math
import uuid
from collections import Counter
from pathlib import Path

import fiftyone as fo
import fiftyone.operators as foo
import pytest
from fiftyone.operators.delegated import DelegatedOperationService
from fiftyone.operators.executor import (
    ExecutionContext,
    ExecutionError,
    Executor,
    ValidationContext,
    _parse_ctx,
    execute_or_delegate_operator,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pixelllm_plugins.errors import PixelLLMError
from pixelllm_plugins.integrations import fiftyone as pxfo

PLUGIN = "@pixelllm/pixelllm"
OPERATIONS = list(pxfo.OPERATOR_PARAMETERS)  # refer, caption_regions, dense_caption, caption_with_trace, segment
MIN_BAD_INPUTS = 250  # refused inputs per run of this file, all tests together
COUNTS: dict[str, Counter] = {}
FUZZ = dict(derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def uri(name: str) -> str:
    return f"{PLUGIN}/{name}"


# ---- strategies --------------------------------------------------------------------------------------------

SURROGATE_TEXT = st.sampled_from(["\ud800", "the \udc00 circle", "a\udfffb", "\udbff\udfff"])
JUNK = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12), SURROGATE_TEXT,
    st.binary(max_size=6), st.complex_numbers(max_magnitude=1e6),
    st.lists(st.one_of(st.integers(), st.text(max_size=4), st.none(), st.floats()), max_size=4),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2), st.tuples(st.integers()),
    st.just(object()), st.just(Path("/tmp")),
)
BAD_NUMBER = st.one_of(
    st.sampled_from([0, -1, -(2**63), 2**64, 10**30, 257, 1e308, -0.5, 2.5, 1.0000001, math.nan, math.inf,
                     -math.inf, True, False, "abc", "12abc", "nan", "inf", "1e999", "--1", " ", "0x10", [],
                     [3], {"v": 3}, b"3", 3j]),
    st.integers(), st.floats(allow_nan=True, allow_infinity=True), JUNK,
)
BAD_FIELD = st.one_of(
    st.sampled_from(["$where", "$set", ".hidden", "a.", "a..b", ".", "$", "_id", "_rand", "a b", "a-b",
                     "1abc", "name\n", "na\x00me", "ünïcode", "x" * 300, "a.$b", "id", "filepath", "tags",
                     "metadata", "media_type", "created_at", pxfo.ERROR_FIELD, "\ud800", "a\udfffb", "nope",
                     "ground_truth", "refexp", "ground_truth.detections"]),
    st.text(max_size=10), JUNK,
)
BAD_PROMPT = st.one_of(
    SURROGATE_TEXT,
    st.sampled_from(["   ", "\x00\x01\x1f", "\t\n\r", "\x7f", "x" * 2001, ["the red circle", ""],
                     ["a", "\ud800"], ["a"] * 33, [1, 2], [None], {"text": "a"}, 5, 2.5, True, b"the circle",
                     ("the red circle", 3)]),
    st.lists(st.one_of(st.text(max_size=6), st.integers(), SURROGATE_TEXT), max_size=5), JUNK,
)
BAD_FLAG = st.one_of(st.sampled_from(["yes", "true", 2, -1, 0.5, math.nan, [], [True], "False"]), JUNK)
BAD_MODEL = st.one_of(st.sampled_from(["\ud800", "a\x00b", "x" * 5000, "model\n/x"]), JUNK)

GOOD_TEXT = st.sampled_from(["the red circle", "a blue square", " the  green\tcircle ", "the yellow square"])
VALID = {
    "prompt": st.one_of(GOOD_TEXT, st.just(""), st.lists(GOOD_TEXT, min_size=1, max_size=3)),
    "prompt_field": st.sampled_from(["refexp", ""]),
    "label_field": st.sampled_from(["", "out_a", "out_b"]),
    "boxes_field": st.sampled_from(["ground_truth", ""]),
    "points_field": st.sampled_from(["", "", "clicks"]),
    "output": st.sampled_from(["", "instance_masks", "polylines"]),
    "caption_attribute": st.sampled_from(["", "caption", "cap2"]),
    "max_regions": st.one_of(st.integers(1, 256), st.just("5"), st.just(3.0)),
    "min_score": st.one_of(st.floats(0.0, 1.0), st.just("0.5"), st.just(1)),
    "caption_field": st.sampled_from(["", "cap_a"]),
    "trace_field": st.sampled_from(["", "trace_a"]),
    "model": st.sampled_from(["", "some-preset", "/models/pixelllm-small"]),
    "adapter": st.just(""),  # a name must exist to run: test_fo_finetune.py
    "batch_size": st.one_of(st.integers(1, 4), st.just(256), st.just("2")),
    "overwrite": st.booleans(),
}
BAD_OUTPUT = st.one_of(st.sampled_from(["masks", "Polylines", "instance_masks ", "polyline", "\ud800", "$set"]),
                       JUNK.filter(lambda v: v is not None and v != ""))
BAD = {"prompt": BAD_PROMPT, "max_regions": BAD_NUMBER, "min_score": BAD_NUMBER, "batch_size": BAD_NUMBER,
       "overwrite": BAD_FLAG, "model": BAD_MODEL, "adapter": BAD_MODEL, "output": BAD_OUTPUT}
for _name in ("prompt_field", "label_field", "boxes_field", "caption_attribute", "caption_field",
              "trace_field", "points_field"):
    BAD[_name] = BAD_FIELD
FORM_KEYS = {"view_target", "delegate", "delegation_target"}  # FiftyOne's own parameters: not fuzzed here


@st.composite
def operator_params(draw, operation: str, bad_keys=st.integers(1, 3)) -> dict:
    """Some (not all) of the operator's parameters with valid values, ``bad_keys`` of them (or an extra key)
    with hostile ones, and possibly unknown keys."""
    keys = list(pxfo.OPERATOR_PARAMETERS[operation]) + list(pxfo.COMMON_PARAMETERS)
    params = {k: draw(VALID[k]) for k in keys if draw(st.booleans())}
    n = draw(bad_keys)
    for k in draw(st.lists(st.sampled_from(keys + ["extra"]), min_size=n, max_size=n, unique=True)):
        params[k] = draw(BAD.get(k, JUNK))
    extra = draw(st.dictionaries(st.text(max_size=8).filter(lambda k: k not in keys and k not in FORM_KEYS),
                                 JUNK, max_size=2))
    return {**extra, **params}


def op_and_params(bad_keys=st.integers(1, 3)):
    return st.sampled_from(OPERATIONS).flatmap(
        lambda op: st.tuples(st.just(op), operator_params(op, bad_keys)))


def assert_clear(exc: BaseException, max_chars: int = 400) -> str:
    """A project error with a short, non-empty message that MongoDB can store (no lone surrogate echoed)."""
    assert isinstance(exc, PixelLLMError), f"{type(exc).__name__}: {exc}"
    message = str(exc)
    assert message.strip() and len(message) <= max_chars, message
    message.encode("utf-8")
    assert "Traceback" not in message
    return message


def count(test: str, outcome: str) -> None:
    COUNTS.setdefault(test, Counter())[outcome] += 1


# ---- fixtures ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def operators(plugin_installed):
    return {name: foo.get_operator(uri(name)) for name in OPERATIONS}


@pytest.fixture(scope="module")
def fake_model():
    """The fake predictor behind every ``get_predictor`` call, for the whole module (hypothesis runs many
    examples per test, so a function-scoped monkeypatch will not do)."""
    from fo_scenes import SegmentingFake

    predictor = SegmentingFake()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pxfo.predictors, "get_predictor", lambda model=None, **kw: predictor)
        yield predictor


@pytest.fixture(scope="module")
def small_dataset(scenes, fake_model):
    from fo_scenes import build_dataset

    ds = build_dataset(scenes[:3], f"pixelllm-fuzz-{uuid.uuid4().hex[:6]}")
    yield ds
    if not ds.deleted:
        ds.delete()


def snapshot(ds) -> tuple:
    """Every stored sample document and the field schema: what a refused request must leave untouched."""
    docs = list(ds._sample_collection.find({}, sort=[("_id", 1)]))
    for d in docs:
        d.pop("last_modified_at", None)
    return sorted(ds.get_field_schema()), docs


# ---- the request logic (no database) ---------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_operator_params_are_refused_with_a_clear_message_or_accepted(operators):
    """``operator_kwargs`` (what ``execute`` runs first) and the form (``resolve_input`` + FiftyOne's
    validation, what the App and ``execute_operator`` run before anything) agree on every input."""

    @settings(max_examples=320, **FUZZ)
    @given(op_and_params())
    def check(case):
        operation, params = case
        allowed = set(pxfo.OPERATOR_PARAMETERS[operation]) | set(pxfo.COMMON_PARAMETERS)
        try:
            kwargs = pxfo.operator_kwargs(operation, params)
        except Exception as exc:  # noqa: BLE001 - the property is about the exception type
            message = assert_clear(exc)
            assert getattr(exc, "param", None) in allowed, (exc, getattr(exc, "param", None))
            refused = message
            count("params", "refused")
        else:
            assert set(kwargs) == allowed
            assert isinstance(kwargs["batch_size"], int) and 1 <= kwargs["batch_size"] <= 256
            assert isinstance(kwargs["overwrite"], bool)
            refused = None
            count("params", "accepted")
        # the form: resolving it never raises, and it marks exactly our message
        ctx = ExecutionContext(request_params={"params": dict(params)}, operator_uri=uri(operation),
                               executor=Executor())
        inputs = operators[operation].resolve_input(ctx)
        validation = ValidationContext(ctx, inputs, operators[operation])
        ours = [e.reason for e in validation.errors if e.custom]
        if refused is None:
            assert ours == []
        else:
            assert validation.invalid and ours == [refused]

    check()
    assert COUNTS["params"]["refused"] >= 220 and COUNTS["params"]["accepted"] >= 10, COUNTS["params"]


def test_sdk_run_functions_check_every_knob_before_touching_anything():
    """``run_*`` keyword arguments (including ``num_beams`` / ``max_new_tokens``, ``selected_labels`` and
    ``progress``, which the forms do not show) and ``PixelLLMModel``: checked before the collection is
    touched. ``samples=None`` makes an accepted request stop at the collection check."""
    from fakes import FakePredictor

    fake = FakePredictor()
    selected = st.one_of(
        st.none(), st.just([]),
        st.just([{"sample_id": "0" * 24, "label_id": "1" * 24, "field": "ground_truth"}]),
        st.sampled_from([[{"sample_id": "xyz", "label_id": "a", "field": "gt"}], [{"sample_id": "0" * 24}],
                         [{"sample_id": "0" * 24, "label_id": "a", "field": "$bad"}], ["gt"], "gt", 5,
                         [{"sample_id": "0" * 24, "label_id": "", "field": "gt"}]]),
        JUNK)
    def either(key):
        return st.one_of(VALID[key], BAD[key])

    tokens, beams = st.one_of(st.integers(1, 128), BAD_NUMBER), st.one_of(st.integers(1, 8), BAD_NUMBER)
    attribute = st.one_of(st.just("caption"), BAD_FIELD, st.sampled_from(["bounding_box", "label", "mask"]))
    knobs = {
        "refer": {k: either(k) for k in ("prompt", "prompt_field", "label_field")},
        "caption_regions": {"boxes_field": either("boxes_field"), "caption_attribute": attribute,
                            "selected_labels": selected, "max_new_tokens": tokens, "num_beams": beams},
        "dense_caption": {k: either(k) for k in ("label_field", "max_regions", "min_score")},
        "caption_with_trace": {"caption_field": either("caption_field"),
                               "trace_field": st.one_of(either("trace_field"), st.just("cap_a_path")),
                               "max_new_tokens": tokens, "num_beams": beams},
        "segment": {k: either(k) for k in ("prompt", "prompt_field", "boxes_field", "points_field",
                                           "label_field", "output")},
    }
    knobs["caption_regions"]["points_field"] = either("points_field")
    common = {k: either(k) for k in ("batch_size", "overwrite", "model")}
    common["progress"] = st.one_of(st.none(), st.just(lambda *a: None), JUNK)

    @settings(max_examples=160, **FUZZ)
    @given(st.sampled_from(OPERATIONS).flatmap(
        lambda op: st.tuples(st.just(op), st.fixed_dictionaries({}, optional={**knobs[op], **common}))))
    def check(case):
        operation, kwargs = case
        try:
            pxfo.RUNNERS[operation](None, predictor=fake, **kwargs)
        except Exception as exc:  # noqa: BLE001
            message = assert_clear(exc)
            count("sdk", "accepted" if "runs on a FiftyOne dataset or view" in message else "refused")
        else:
            raise AssertionError("samples=None cannot run")
        assert fake.calls == []

    @settings(max_examples=60, **FUZZ)
    @given(st.fixed_dictionaries({"operation": st.sampled_from(pxfo.OPERATIONS)}, optional={
        **{k: either(k) for k in ("prompt", "max_regions", "min_score", "model", "output")}, "num_beams": beams,
        "max_new_tokens": st.one_of(st.none(), tokens), "caption_attribute": attribute}))
    def check_model(kwargs):
        try:
            pxfo.PixelLLMModel(predictor=fake, **kwargs)
        except Exception as exc:  # noqa: BLE001
            assert_clear(exc)
            count("model", "refused")
        else:
            count("model", "accepted")

    check()
    check_model()
    assert COUNTS["sdk"]["refused"] >= 80 and COUNTS["sdk"]["accepted"] >= 5, COUNTS["sdk"]
    assert COUNTS["model"]["refused"] >= 20, COUNTS["model"]


def test_per_sample_prompts_become_prompts_or_a_recorded_error():
    """What a ``prompt_field`` holds for one sample: usable prompts, or a message stored on that sample
    (never an exception that would stop the batch)."""
    value = st.one_of(
        st.none(), st.text(max_size=30), SURROGATE_TEXT, BAD_PROMPT,
        st.lists(st.one_of(st.text(max_size=10), SURROGATE_TEXT, st.integers()), max_size=40),
        st.builds(fo.Classification, label=st.one_of(st.none(), st.text(max_size=10))),
        st.builds(lambda labels: fo.Classifications(
            classifications=[fo.Classification(label=x) for x in labels]),
            st.lists(st.one_of(st.text(max_size=6), st.none()), max_size=3)),
        JUNK)

    @settings(max_examples=120, **FUZZ)
    @given(value)
    def check(v):
        out = pxfo._texts_from(v, "refexp")
        if isinstance(out, str):
            assert out.strip() and len(out) <= 400
            out.encode("utf-8")  # it is written to the sample's pixelllm_error
            count("per_sample", "refused")
        else:
            assert 1 <= len(out) <= pxfo.MAX_PROMPTS
            for text in out:
                assert text.strip() == text and text and len(text) <= pxfo.MAX_PROMPT_CHARS
                text.encode("utf-8")
            count("per_sample", "accepted")

    check()
    assert COUNTS["per_sample"]["refused"] >= 30, COUNTS["per_sample"]


def test_per_sample_keypoints_become_point_prompts_or_named_errors():
    """What a ``points_field`` holds for one sample (NaN, infinite, outside the image, wrong shapes, junk):
    usable relative points, and one short message per point that is skipped; never an exception."""
    coord = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.floats(0, 1), st.integers(-3, 3))
    point = st.lists(coord, min_size=2, max_size=2)  # fo.Keypoint itself refuses other shapes
    keypoint = st.builds(lambda pts: fo.Keypoint(label="k", points=pts), st.lists(point, max_size=4))
    value = st.one_of(st.builds(lambda kps: fo.Keypoints(keypoints=kps), st.lists(keypoint, max_size=3)),
                      keypoint, st.builds(fo.Detections), st.just("clicks"), JUNK)

    @settings(max_examples=150, **FUZZ)
    @given(value)
    def check(v):
        from pixelllm_plugins.integrations.fiftyone.labels import keypoint_prompts

        _, prompts, errors = keypoint_prompts(v, "clicks")
        for _, _, (x, y) in prompts:
            assert 0.0 <= x <= 1.0 and 0.0 <= y <= 1.0
        for message in errors:
            assert message.strip() and len(message) <= 400
            message.encode("utf-8")
        count("keypoints", "refused" if errors else "accepted")

    check()
    assert COUNTS["keypoints"]["refused"] >= 30, COUNTS["keypoints"]


# ---- real executions on a small dataset in MongoDB ---------------------------------------------------------


def _exception_class(traceback_text: str) -> type:
    """The exception class named on the last line of a traceback FiftyOne formatted."""
    last = [line for line in traceback_text.strip().splitlines() if line.strip()][-1]
    dotted = last.split(":", 1)[0].strip()
    module, _, name = dotted.rpartition(".")
    if not module:
        import builtins

        return getattr(builtins, name)
    return getattr(importlib.import_module(module), name)


def run_operator(operation: str, ds, params: dict, **ctx) -> tuple[str, object]:
    """Run an operator as ``foo.execute_operator`` does, keeping the outcome apart: ``("ran", result dict)``,
    ``("form", reason)`` (FiftyOne refused the parameters before running anything) or ``("execute",
    message)`` (``execute`` raised; asserted to be a ``PixelLLMError``)."""
    request = _parse_ctx(ctx=dict(dataset=ds, params=dict(params), **ctx))
    try:
        result = asyncio.run(execute_or_delegate_operator(uri(operation), request, exhaust=True))
    except ExecutionError as exc:  # raised for an invalid form: "Validation error. Path: p. Reason: r"
        message = str(exc)
        assert message.startswith("Validation error") and "Traceback" not in message, message
        reason = message.partition("Reason: ")[2]
        assert reason.strip(), message
        return "form", reason
    if result.error is None:
        return "ran", result.result
    assert issubclass(_exception_class(result.error), PixelLLMError), result.error
    assert result.error_message and result.error_message.strip()
    return "execute", result.error_message


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_operators_on_a_real_dataset_refuse_bad_params_without_writing(operators, small_dataset):
    """Through FiftyOne's operator machinery (form validation, then ``execute``) and through ``execute``
    alone (as with schema validation disabled): a run succeeds, or is refused with a clear message and the
    dataset is unchanged."""
    ds = small_dataset

    @settings(max_examples=36, **FUZZ)
    @given(st.one_of(op_and_params(st.just(0)), op_and_params(st.integers(1, 2))),
           st.sampled_from(["execute_operator", "execute"]))
    def check(case, via):
        operation, params = case
        before = snapshot(ds)
        if via == "execute_operator":
            outcome, detail = run_operator(operation, ds, params)
            if outcome == "ran":
                assert detail["operation"] == operation
                count("db", "ran")
                return
            outcome = f"refused by the {'form' if outcome == 'form' else 'operator'}"
        else:
            ctx = ExecutionContext(request_params={"dataset_name": ds.name, "params": dict(params)},
                                   operator_uri=uri(operation), executor=Executor())
            try:
                summary = operators[operation].execute(ctx)
            except Exception as exc:  # noqa: BLE001
                assert_clear(exc, max_chars=2000)  # "no field ..." lists the dataset's fields
                outcome = "refused by execute"
            else:
                assert summary["operation"] == operation
                count("db", "ran")
                return
        count("db", "refused")
        count("db", outcome)
        assert snapshot(ds) == before, "a refused request changed the dataset"

    check()
    counts = COUNTS["db"]
    assert counts["refused"] >= 12 and counts["ran"] >= 5, counts
    assert counts["refused by the form"] and counts["refused by execute"], counts


def test_bad_params_are_not_queued_for_delegation(operators, small_dataset):
    ds = small_dataset
    before = snapshot(ds)
    for params in ({"max_regions": 10**9, "delegate": True}, {"min_score": math.nan, "delegate": True},
                   {"label_field": "$set", "delegate": True}):
        outcome, reason = run_operator("dense_caption", ds, params)
        assert outcome == "form" and reason.split(" ")[0] in params, (outcome, reason)
        count("delegation", "refused")
    # parameters the operator ignores but a scheduled run would have to store
    for junk, delegation in (("\ud800", {}), (object(), {}), (2**70, {"request_delegation": True}),
                             ({"\udc00": 1}, {})):
        params = {"junk": junk} if delegation else {"junk": junk, "delegate": True}
        outcome, reason = run_operator("dense_caption", ds, params, **delegation)
        assert outcome == "form" and "cannot be saved with a scheduled run" in reason, (outcome, reason)
        count("delegation", "refused")
    assert DelegatedOperationService().list_operations(dataset_name=ds.name) == []
    assert snapshot(ds) == before
    with pytest.raises(Exception, match=r"max_regions must be an integer from 1 to 256"):
        foo.execute_operator(uri("dense_caption"), ctx=dict(dataset=ds, params={"max_regions": 0}))


@pytest.fixture()
def mixed_dataset(scenes, tmp_path, fake_model):
    """Four good images and six bad samples: missing file, folder, text file, empty file, a path the file
    system refuses (name too long) and a truncated PNG; every sample has a box and a prompt."""
    good = [s["filepath"] for s in scenes[:4]]
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "text.png").write_text("not an image")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "cut.png").write_bytes(Path(good[0]).read_bytes()[:100])
    bad = [str(tmp_path / "missing.png"), str(tmp_path / "folder.png"), str(tmp_path / "text.png"),
           str(tmp_path / "empty.png"), str(tmp_path / ("n" * 300 + ".png")), str(tmp_path / "cut.png")]
    ds = fo.Dataset(f"pixelllm-fuzz-mixed-{uuid.uuid4().hex[:6]}")
    samples = []
    for k, path in enumerate(good[:2] + bad[:3] + good[2:] + bad[3:]):  # good and bad share every batch
        box = fo.Detection(label="thing", bounding_box=[0.1, 0.1, 0.5, 0.5])
        samples.append(fo.Sample(filepath=path, ground_truth=fo.Detections(detections=[box]),
                                 refexp="the red circle", good=path in good, k=k))
    ds.add_samples(samples)
    yield ds, good, bad
    ds.delete()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_mixed_dataset_good_samples_are_labeled_and_bad_ones_get_their_error(mixed_dataset):
    ds, good, bad = mixed_dataset
    first_good = ds.match(fo.ViewField("good")).first()
    first_good.ground_truth.detections.append(fo.Detection(label="broken", bounding_box=[0.1, 0.2]))
    first_good.save()
    runs = {"refer": {"prompt_field": "refexp"}, "caption_regions": {"boxes_field": "ground_truth"},
            "dense_caption": {"max_regions": 1}, "caption_with_trace": {},
            "segment": {"boxes_field": "ground_truth", "output": "polylines"}}
    for operation, params in runs.items():
        res = foo.execute_operator(uri(operation), ctx=dict(dataset=ds, params={**params, "batch_size": 3}))
        out = res.result
        assert (out["processed"], out["failed"]) == (len(good), len(bad)), (operation, out)
        errors = dict(zip(ds.values("filepath"), ds.values(pxfo.ERROR_FIELD)))
        for path in bad:
            assert errors[path].startswith(f"{operation}: "), (operation, path, errors[path])
        messages = {e["filepath"]: e["error"] for e in out["errors"]}
        assert "file not found" in messages[bad[0]] and "folder" in messages[bad[1]]
        assert "not a readable image" in messages[bad[2]] and "empty file" in messages[bad[3]]
        assert "cannot read the file" in messages[bad[4]] and "corrupt" in messages[bad[5]]
    ok = ds.match(fo.ViewField("good"))
    assert ok.count("pixelllm.detections") == len(good)
    assert ok.count("pixelllm_regions.detections") == len(good)
    assert ok.count("pixelllm_caption") == len(good) and ok.count("pixelllm_trace") == len(good)
    assert ok.count("ground_truth.detections.caption") == len(good)  # the broken box is skipped, not fatal
    assert ok.count("pixelllm_masks.polylines") == len(good)  # one mask per good box; the broken one skipped
    assert "not 4 finite numbers" in ds[first_good.id][pxfo.ERROR_FIELD]
    bad_view = ds.match(~fo.ViewField("good"))
    assert bad_view.count("pixelllm") == 0 and bad_view.count("ground_truth.detections.caption") == 0
    count("mixed", "refused")


def test_enough_bad_inputs_were_generated():
    """The whole file generated at least MIN_BAD_INPUTS refused inputs (run after the tests above)."""
    needed = {"params", "sdk", "model", "per_sample", "db"}
    if not needed <= set(COUNTS):
        pytest.skip("only part of this file ran")
    refused = sum(c["refused"] for c in COUNTS.values())
    print(f"bad inputs refused: {refused}; " + "; ".join(f"{k}: {dict(v)}" for k, v in COUNTS.items()))
    assert refused >= MIN_BAD_INPUTS, COUNTS
