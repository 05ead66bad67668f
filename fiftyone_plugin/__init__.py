"""``@pixelllm/pixelllm``: PixelLLM operators for the FiftyOne App and SDK.

Operators: ``refer``, ``caption_regions`` (boxes or keypoints), ``dense_caption``, ``caption_with_trace``,
``segment`` (instance masks or polylines), ``finetune`` (a named LoRA adapter from a labelled Detections
field, gated on a held-out slice; the others take ``adapter``) and ``free_model``.
This module only adapts FiftyOne forms and contexts: inference, batching, label conversion and the model
cache live in ``pixelllm_plugins.integrations.fiftyone`` (FiftyOne re-imports this file on every run).

SDK use (parameter names are stable)::

    import fiftyone.operators as foo
    foo.execute_operator("@pixelllm/pixelllm/refer", ctx=dict(dataset=ds, params={"prompt": "the red circle"}))

Bad parameters never reach the dataset: ``pxfo.operator_kwargs`` checks every one (numbers against
``pixelllm_plugins.bounds``, prompts with ``validate_text``, field names) when the form is resolved, so the
App marks the input with the message and FiftyOne refuses to run or queue the operation, and again in
``execute`` (a ``PixelLLMError`` with the same message).
"""

from __future__ import annotations

import contextlib
import os

import bson
import fiftyone.operators as foo
import fiftyone.operators.types as types

from pixelllm_plugins.bounds import BOUNDS, DEFAULT_MIN_SCORE
from pixelllm_plugins.integrations import fiftyone as pxfo

PLUGIN = "@pixelllm/pixelllm"


def _range(name: str) -> dict:
    """``min``/``max`` of a number input, from the shared bounds table."""
    bound = BOUNDS[name]
    cast = int if bound.integer else float
    return {"min": cast(bound.low), "max": cast(bound.high)}


# ---- shared form pieces ------------------------------------------------------------------------------


def _field_choices(ctx, kinds: tuple[str, ...]) -> list[str]:
    """Names of the dataset's fields whose type name (or label document type) is in ``kinds``."""
    if ctx.dataset is None:
        return []
    names = []
    for name, f in ctx.dataset.get_field_schema().items():
        doc = getattr(f, "document_type", None)
        kind = doc.__name__ if doc is not None else type(f).__name__
        if kind == "ListField":
            sub = getattr(f, "field", None)
            kind = f"ListField[{type(sub).__name__}]" if sub is not None else kind
        if kind in kinds:
            names.append(name)
    return names


def _autocomplete(choices: list[str]):
    return types.AutocompleteView(choices=[types.Choice(c, label=c) for c in choices])


def _target(ctx) -> None:
    # resolving the target during resolve_input adds FiftyOne's dataset / view / selection chooser
    with contextlib.suppress(Exception):  # no dataset yet (e.g. listing operators)
        ctx.target_view(require_flat=True)


def _common_inputs(ctx, inputs) -> None:
    inputs.str("model", default="", required=False, label="Model",
               description="Checkpoint folder or preset name; empty = the embedded default model")
    inputs.str("adapter", default="", required=False, label="Adapter",
               description="An adapter trained with the finetune operator (its name) or an adapter folder; "
                           "empty = none")
    inputs.int("batch_size", default=pxfo.DEFAULT_BATCH_SIZE, required=False, label="Batch size",
               description="Images per inference call; results are saved after every batch",
               **_range("batch_size"))
    inputs.bool("overwrite", default=False, required=False, label="Overwrite",
                description="Recompute samples already labeled by this model version")
    worker = os.environ.get("PIXELLLM_WORKER_URL", "")
    where = f"the GPU worker at {worker}" if worker else "this process (set PIXELLLM_WORKER_URL for a GPU worker)"
    inputs.view("pixelllm_mode", types.Notice(label=f"Inference runs on {where}."))
    inputs.bool("delegate", default=False, required=False, label="Delegate execution?",
                description="Queue the run for `fiftyone delegated launch` (recommended beyond a few hundred "
                            "samples: immediate runs time out after 10 minutes)")
    if ctx.params.get("delegate", False):
        inputs.view("pixelllm_delegate_notice", types.Notice(
            label="Start a worker with `fiftyone delegated launch` so that queued runs execute."))


def _unstorable(params: dict) -> str | None:
    """The first parameter MongoDB cannot store (a scheduled run's parameters are saved with it), if any."""
    for key, value in params.items():
        try:
            bson.encode({"params": {key: value}})
        except Exception:  # noqa: BLE001 - InvalidDocument, UnicodeEncodeError, OverflowError, ...
            return key
    return None


def _check_form(ctx, inputs, operation: str) -> None:
    """Mark the input a bad value was typed into (the App shows the message there; FiftyOne refuses to
    execute or queue an operation whose form is invalid, without a traceback)."""
    try:
        pxfo.operator_kwargs(operation, ctx.params)
        if ctx.requesting_delegated_execution or ctx.params.get("delegate") is True:
            key = _unstorable(ctx.params)
            if key is not None:
                error = pxfo.FieldError(f"parameter {ascii(key)[:40]} cannot be saved with a scheduled run; "
                                        "give text, numbers, booleans or lists of them, or leave it out")
                error.param = key
                raise error
    except pxfo.PixelLLMError as exc:
        prop = inputs.properties.get(getattr(exc, "param", None))
        if prop is None:  # not one of the form's inputs: show it at the top
            prop = inputs.view("pixelllm_invalid", types.Notice(label=str(exc)))
        prop.invalid = True
        prop.error_message = str(exc)


def _target_view(ctx):
    if ctx.dataset is None:
        raise pxfo.FieldError("no dataset: open a dataset in the App, or pass dataset= or view= in the "
                              "context")
    return ctx.target_view(require_flat=True)


def _progress(ctx):
    def report(done: int, total: int, summary) -> None:
        label = f"{done}/{total} samples" + (f", {summary.failed} failed" if summary.failed else "")
        ctx.set_progress(progress=(done / total) if total else 1.0, label=label)

    return report


def _finish(ctx, summary) -> dict:
    if not ctx.delegated and (summary.processed or summary.failed):
        ctx.trigger("reload_dataset")
    return summary.to_dict()


def _summary_output(ctx):
    outputs = types.Object()
    outputs.int("processed", label="Samples labeled")
    outputs.int("skipped", label="Skipped (already labeled by this model version)")
    outputs.int("failed", label="Failed (see the pixelllm_error field)")
    outputs.str("message", label="Message")
    return types.Property(outputs, view=types.View(label="PixelLLM"))


class _PixelLLMOperator(foo.Operator):
    name = ""
    label = ""
    description = ""

    @property
    def config(self):
        return foo.OperatorConfig(
            name=self.name,
            label=self.label,
            description=self.description,
            dynamic=True,
            allow_immediate_execution=True,
            allow_delegated_execution=True,
            default_choice_to_delegated=False,
        )

    def resolve_delegation(self, ctx):
        return True if ctx.params.get("delegate", False) else None

    def resolve_output(self, ctx):
        return _summary_output(ctx)

    def execute(self, ctx):
        # the same checks as the form: SDK calls and disabled form validation get the same clear message
        kwargs = pxfo.operator_kwargs(self.name, ctx.params)
        if self.name == "caption_regions":
            kwargs["selected_labels"] = ctx.selected_labels or None
        summary = pxfo.RUNNERS[self.name](_target_view(ctx), progress=_progress(ctx), **kwargs)
        return _finish(ctx, summary)


# ---- operators -------------------------------------------------------------------------------------------


class Refer(_PixelLLMOperator):
    name = "refer"
    label = "PixelLLM: find a referring expression"
    description = "Text -> box: the box a referring expression names, on every sample"

    def resolve_input(self, ctx):
        inputs = types.Object()
        _target(ctx)
        inputs.str("prompt", default="", required=False, allow_empty=True, label="Referring expression",
                   description="e.g. 'the person holding an umbrella'; leave empty to read prompt_field")
        inputs.str("prompt_field", default="", required=False, allow_empty=True, label="Prompt field",
                   description="A text field holding each sample's expression (used when prompt is empty)",
                   view=_autocomplete(_field_choices(
                       ctx, ("StringField", "ListField[StringField]", "Classification", "Classifications"))))
        inputs.str("label_field", default=pxfo.DEFAULT_REFER_FIELD, required=False, label="Output field")
        _common_inputs(ctx, inputs)
        _check_form(ctx, inputs, self.name)
        return types.Property(inputs, view=types.View(label=self.label))


class CaptionRegions(_PixelLLMOperator):
    name = "caption_regions"
    label = "PixelLLM: caption boxes"
    description = "Box -> text: a caption attribute on each selected box, or every box of a field"

    def resolve_input(self, ctx):
        inputs = types.Object()
        _target(ctx)
        selected = ctx.selected_labels or []
        choices = _field_choices(ctx, ("Detections",))
        if selected:
            inputs.view("pixelllm_selected", types.Notice(
                label=f"Captioning the {len(selected)} selected label(s)."))
        inputs.str("boxes_field", default=choices[0] if choices else "", required=False, allow_empty=True,
                   label="Boxes field", description="The Detections field whose boxes get captions",
                   view=_autocomplete(choices))
        inputs.str("points_field", default="", required=False, allow_empty=True, label="Points field",
                   description="Caption points instead: every point of this Keypoints field gets a caption "
                               "(boxes_field is then ignored)",
                   view=_autocomplete(_field_choices(ctx, ("Keypoints",))))
        inputs.str("caption_attribute", default=pxfo.DEFAULT_CAPTION_ATTRIBUTE, required=False,
                   label="Caption attribute", description="Attribute set on each box or keypoint (ids are kept)")
        _common_inputs(ctx, inputs)
        _check_form(ctx, inputs, self.name)
        return types.Property(inputs, view=types.View(label=self.label))


class DenseCaption(_PixelLLMOperator):
    name = "dense_caption"
    label = "PixelLLM: dense captioning"
    description = "Propose regions and caption each: boxes with a short label and a full caption"

    def resolve_input(self, ctx):
        inputs = types.Object()
        _target(ctx)
        inputs.str("label_field", default=pxfo.DEFAULT_DENSE_FIELD, required=False, label="Output field")
        inputs.int("max_regions", default=20, required=False, label="Max regions per image",
                   **_range("max_regions"))
        inputs.float("min_score", default=DEFAULT_MIN_SCORE, required=False, label="Min proposal score",
                     **_range("min_score"))
        _common_inputs(ctx, inputs)
        _check_form(ctx, inputs, self.name)
        return types.Property(inputs, view=types.View(label=self.label))


class CaptionWithTrace(_PixelLLMOperator):
    name = "caption_with_trace"
    label = "PixelLLM: caption with word trace"
    description = "A whole-image caption; every word points somewhere (Keypoints + a Polyline path)"

    def resolve_input(self, ctx):
        inputs = types.Object()
        _target(ctx)
        inputs.str("caption_field", default=pxfo.DEFAULT_CAPTION_FIELD, required=False, label="Caption field")
        inputs.str("trace_field", default=pxfo.DEFAULT_TRACE_FIELD, required=False, label="Trace field",
                   description="One Keypoint per word; the path goes to <trace_field>_path")
        _common_inputs(ctx, inputs)
        _check_form(ctx, inputs, self.name)
        return types.Property(inputs, view=types.View(label=self.label))


class Segment(_PixelLLMOperator):
    name = "segment"
    label = "PixelLLM: segment"
    description = "Text, box or point -> mask: instance masks (Detections) or filled polylines"

    def resolve_input(self, ctx):
        inputs = types.Object()
        _target(ctx)
        inputs.str("prompt", default="", required=False, allow_empty=True, label="Referring expression",
                   description="e.g. 'the red circle': one mask per sample; or leave empty and name one field "
                               "below")
        inputs.str("prompt_field", default="", required=False, allow_empty=True, label="Prompt field",
                   description="A text field holding each sample's expression(s)",
                   view=_autocomplete(_field_choices(
                       ctx, ("StringField", "ListField[StringField]", "Classification", "Classifications"))))
        inputs.str("boxes_field", default="", required=False, allow_empty=True, label="Boxes field",
                   description="A Detections field: one mask per box",
                   view=_autocomplete(_field_choices(ctx, ("Detections",))))
        inputs.str("points_field", default="", required=False, allow_empty=True, label="Points field",
                   description="A Keypoints field: one mask per point",
                   view=_autocomplete(_field_choices(ctx, ("Keypoints",))))
        inputs.str("label_field", default=pxfo.DEFAULT_MASK_FIELD, required=False, label="Output field")
        inputs.enum("output", list(pxfo.MASK_OUTPUTS), default=pxfo.MASK_OUTPUTS[0], required=False,
                    label="Output", description="instance_masks: Detections with a mask in each box; "
                                                "polylines: filled Polylines (holes as inner shapes)",
                    view=types.RadioView())
        _common_inputs(ctx, inputs)
        _check_form(ctx, inputs, self.name)
        return types.Property(inputs, view=types.View(label=self.label))


class Finetune(foo.Operator):
    """Train a named LoRA adapter from a labelled view (``pxfo.run_finetune``)."""

    @property
    def config(self):
        return foo.OperatorConfig(
            name="finetune", label="PixelLLM: learn from labels",
            description="Train a LoRA adapter from a Detections field whose labels are referring expressions; "
                        "kept only if it is not worse on a held-out slice",
            dynamic=True, allow_immediate_execution=True, allow_delegated_execution=True,
            default_choice_to_delegated=True)

    def resolve_delegation(self, ctx):
        return True if ctx.params.get("delegate", True) else None

    def resolve_input(self, ctx):
        inputs = types.Object()
        _target(ctx)
        choices = _field_choices(ctx, ("Detections",))
        inputs.str("label_field", default=choices[0] if choices else "", required=True, label="Labels field",
                   description="A Detections field: each box's label is its referring expression",
                   view=_autocomplete(choices))
        inputs.str("name", default=pxfo.DEFAULT_ADAPTER_NAME, required=False, label="Adapter name",
                   description="The other operators use it as adapter=<name>; training again makes a new "
                               "version if it is not worse")
        inputs.str("caption_attribute", default="", required=False, allow_empty=True, label="Caption attribute",
                   description="A detection attribute holding a region caption (default: the label)")
        inputs.str("model", default="", required=False, label="Base model",
                   description="Checkpoint folder; empty = the embedded default model")
        inputs.int("steps", default=0, required=False, label="Steps",
                   description="0 = chosen from the number of labelled images", min=0, max=100_000)
        inputs.float("holdout_fraction", default=0.25, required=False, label="Held-out fraction",
                     description="Images kept out of training to compare the new adapter with the current "
                                 "version (none below 4 images)", min=0.0, max=0.9)
        inputs.float("replay", default=0.5, required=False, label="Replay",
                     description="Share of synthetic base scenes among the training images, so the model keeps "
                                 "what it knew", min=0.0, max=0.9)
        inputs.int("seed", default=0, required=False, label="Seed", min=0)
        inputs.bool("delegate", default=True, required=False, label="Delegate execution?",
                    description="Queue the run for `fiftyone delegated launch` (training takes minutes)")
        try:
            pxfo.finetune_kwargs(ctx.params)
        except pxfo.PixelLLMError as exc:
            prop = inputs.properties.get(getattr(exc, "param", None))
            if prop is None:
                prop = inputs.view("pixelllm_invalid", types.Notice(label=str(exc)))
            prop.invalid = True
            prop.error_message = str(exc)
        return types.Property(inputs, view=types.View(label="PixelLLM: learn from labels"))

    def resolve_output(self, ctx):
        outputs = types.Object()
        outputs.bool("accepted", label="Kept")
        outputs.str("adapter", label="Current version")
        outputs.str("gate", label="Gate")
        outputs.float("new_score", label="Held-out P@0.5, new")
        outputs.float("current_score", label="Held-out P@0.5, current")
        outputs.str("message", label="Message")
        return types.Property(outputs, view=types.View(label="PixelLLM"))

    def execute(self, ctx):
        kwargs = pxfo.finetune_kwargs(ctx.params)

        def report(fraction: float, label: str) -> None:
            ctx.set_progress(progress=fraction, label=label)

        return pxfo.run_finetune(_target_view(ctx), progress=report, **kwargs).to_dict()


class FreeModel(foo.Operator):
    @property
    def config(self):
        return foo.OperatorConfig(name="free_model", label="PixelLLM: free model memory",
                                  description="Release the models this process holds (frees GPU memory)",
                                  allow_immediate_execution=True, allow_delegated_execution=True,
                                  view_target=False)

    def resolve_input(self, ctx):
        inputs = types.Object()
        inputs.view("pixelllm_free", types.Notice(
            label="Releases the PixelLLM models cached by the process that runs this operator; the next "
                  "run loads them again."))
        return types.Property(inputs, view=types.View(label="PixelLLM: free model memory"))

    def execute(self, ctx):
        return {"released": pxfo.free_model()}


OPERATORS = (Refer, CaptionRegions, DenseCaption, CaptionWithTrace, Segment, Finetune, FreeModel)


def register(p):
    for op in OPERATORS:
        p.register(op)
