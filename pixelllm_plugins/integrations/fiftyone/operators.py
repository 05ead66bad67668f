"""The parameters of the ``@pixelllm/pixelllm`` plugin's operators, and ``operator_kwargs`` which checks them."""

from __future__ import annotations

from collections.abc import Mapping

from ...bounds import DEFAULT_MAX_REGIONS, DEFAULT_MIN_SCORE
from ...errors import InvalidParameterError
from .params import _check_common, _model_name, _shown
from .tasks import _CaptionRegionsTask, _DenseTask, _ReferTask, _SegmentTask, _TraceTask

# the parameters of each operator of the ``@pixelllm/pixelllm`` plugin (besides the common ones)
OPERATOR_PARAMETERS: dict[str, tuple[str, ...]] = {
    "refer": ("prompt", "prompt_field", "label_field"),
    "caption_regions": ("boxes_field", "caption_attribute", "points_field"),
    "dense_caption": ("label_field", "max_regions", "min_score"),
    "caption_with_trace": ("caption_field", "trace_field"),
    "segment": ("prompt", "prompt_field", "boxes_field", "points_field", "label_field", "output"),
}
COMMON_PARAMETERS = ("model", "adapter", "batch_size", "overwrite")
_OPERATOR_DEFAULTS = {"max_regions": DEFAULT_MAX_REGIONS, "min_score": DEFAULT_MIN_SCORE}


def operator_kwargs(operation: str, params: Mapping | None) -> dict:
    """The keyword arguments of ``RUNNERS[operation]`` for an operator's ``ctx.params``, every one checked
    without touching a dataset or a model: the plugin's form and its ``execute`` both call this.

    A missing, ``None`` or ``""`` parameter takes its default; parameters the operator does not have are
    ignored. Raises ``FieldError`` (a field name), ``InvalidPromptError`` (a prompt) or
    ``InvalidParameterError`` (a number, a flag, the model), each a ``PixelLLMError`` whose ``param``
    attribute names the parameter.
    """
    if operation not in OPERATOR_PARAMETERS:
        raise InvalidParameterError(f"unknown operation {_shown(operation)}; one of "
                                    f"{', '.join(OPERATOR_PARAMETERS)}")
    if params is None:
        params = {}
    if not isinstance(params, Mapping):
        raise InvalidParameterError(f"the parameters must be a dict, got {type(params).__name__}")

    def get(name):
        value = params.get(name)
        if value is None or (isinstance(value, str) and value == ""):
            return _OPERATOR_DEFAULTS.get(name)
        return value

    kwargs = {name: get(name) for name in OPERATOR_PARAMETERS[operation]}
    if operation == "refer":
        _ReferTask(kwargs["prompt"], kwargs["prompt_field"], kwargs["label_field"])
    elif operation == "caption_regions":
        _CaptionRegionsTask(kwargs["boxes_field"], kwargs["caption_attribute"], None, 20, 1,
                            kwargs["points_field"])
    elif operation == "dense_caption":
        _DenseTask(kwargs["label_field"], kwargs["max_regions"], kwargs["min_score"])
    elif operation == "segment":
        _SegmentTask(kwargs["prompt"], kwargs["prompt_field"], kwargs["boxes_field"], kwargs["points_field"],
                     kwargs["label_field"], kwargs["output"])
    else:
        _TraceTask(kwargs["caption_field"], kwargs["trace_field"], 40, 1)
    batch_size, overwrite, model = _check_common(get("batch_size"), get("overwrite"), get("model"))
    kwargs.update(batch_size=batch_size, overwrite=overwrite, model=model,
                  adapter=_model_name(get("adapter"), "adapter"))
    return kwargs
