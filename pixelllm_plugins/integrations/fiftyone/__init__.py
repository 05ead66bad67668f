"""FiftyOne adapter: label conversions, batched runs over a collection, and a ``fiftyone`` Model wrapper.

Everything the ``@pixelllm/pixelllm`` plugin does lives here, so that SDK users, the model zoo and the
App operators share one code path and the model stays cached in this (importable) package:

- ``params``: request checks (field names, prompts, numbers, flags, the model) and the default fields;
- ``labels``: PixelLLM results <-> FiftyOne labels (``Detections``, word-trace ``Keypoints``/``Polylines``,
  captions, masks as instance-mask ``Detections`` or filled ``Polylines``, keypoints as point prompts);
- ``tasks``: the five operations, each reading, checking, inferring and writing a batch;
- ``runs``: ``run_refer`` / ``run_caption_regions`` / ``run_dense_caption`` / ``run_caption_with_trace`` /
  ``run_segment``,
  batched inference over a sample collection: results written in bulk after every batch (an interrupted
  run keeps what it wrote), samples already labeled by the same model version for the same request skipped
  unless ``overwrite``, per-sample errors recorded in the ``pixelllm_error`` field and the run summary;
- ``operators``: the plugin operators' parameters and ``operator_kwargs``;
- ``finetune``: ``run_finetune`` (a named LoRA adapter from a labelled view, through the core's gated
  correction round), ``finetune_kwargs``, and ``resolve_adapter`` / ``with_adapter`` for the ``adapter``
  parameter of every run;
- ``predictors``: the predictor a run or a model uses, and ``free_model``;
- ``model``: ``PixelLLMModel``, a ``fiftyone.core.models.Model`` + ``SamplesMixin`` for
  ``dataset.apply_model``;
- ``zoo``: ``download_model`` / ``load_model`` / ``resolve_input`` and ``install_zoo_source``, a local
  model-zoo source (manifest in ``zoo_manifest.json`` in this package);
- ``install``: ``install_plugin`` (links the installed ``fiftyone_plugin`` package into
  ``fo.config.plugins_dir``) and the command line ``python -m pixelllm_plugins.integrations.fiftyone``.

Every public name is importable from this package.
"""

from __future__ import annotations

# the names of ``__all__`` are imported plainly; ``name as name`` re-exports the others (importable
# from here, left out of ``import *``)
from ...errors import InvalidBoxError as InvalidBoxError
from ...errors import InvalidParameterError as InvalidParameterError
from ...errors import InvalidPromptError as InvalidPromptError
from ...errors import PixelLLMError as PixelLLMError
from ...errors import RemoteError as RemoteError
from .finetune import DEFAULT_ADAPTER_NAME as DEFAULT_ADAPTER_NAME
from .finetune import FINETUNE_PARAMETERS as FINETUNE_PARAMETERS
from .finetune import (
    FinetuneSummary,
    adapters_dir,
    export_corrections,
    finetune_kwargs,
    resolve_adapter,
    run_finetune,
    with_adapter,
)
from .install import install_plugin
from .install import main as main
from .install import plugin_source_dir as plugin_source_dir
from .labels import MASK_OUTPUTS as MASK_OUTPUTS
from .labels import (
    dense_to_detections,
    masks_to_labels,
    path_field_for,
    refer_to_detections,
    short_label,
    trace_to_labels,
)
from .model import OPERATIONS as OPERATIONS
from .model import PixelLLMModel
from .operators import COMMON_PARAMETERS, OPERATOR_PARAMETERS, operator_kwargs
from .params import DEFAULT_BATCH_SIZE as DEFAULT_BATCH_SIZE
from .params import DEFAULT_CAPTION_ATTRIBUTE as DEFAULT_CAPTION_ATTRIBUTE
from .params import (
    DEFAULT_CAPTION_FIELD,
    DEFAULT_DENSE_FIELD,
    DEFAULT_MASK_FIELD,
    DEFAULT_REFER_FIELD,
    DEFAULT_TRACE_FIELD,
    ERROR_FIELD,
    FieldError,
)
from .params import MAX_FIELD_NAME_CHARS as MAX_FIELD_NAME_CHARS
from .params import MAX_MODEL_CHARS as MAX_MODEL_CHARS
from .params import MAX_PROMPT_CHARS as MAX_PROMPT_CHARS
from .params import MAX_PROMPTS as MAX_PROMPTS
from .params import _texts_from as _texts_from
from .predictors import free_model
from .runs import MAX_REPORTED_ERRORS as MAX_REPORTED_ERRORS
from .runs import (
    RUNNERS,
    RunSummary,
    run_caption_regions,
    run_caption_with_trace,
    run_dense_caption,
    run_refer,
    run_segment,
)
from .runs import ProgressCallback as ProgressCallback
from .zoo import ZOO_MANIFEST_PATH, download_model, install_zoo_source, load_model, resolve_input
from .zoo import ZOO_SOURCE_NAME as ZOO_SOURCE_NAME
from .zoo import parse_parameters as parse_parameters

__all__ = [
    "DEFAULT_REFER_FIELD", "DEFAULT_DENSE_FIELD", "DEFAULT_CAPTION_FIELD", "DEFAULT_TRACE_FIELD",
    "DEFAULT_MASK_FIELD", "run_segment", "masks_to_labels",
    "ERROR_FIELD", "FieldError", "RunSummary", "OPERATOR_PARAMETERS", "COMMON_PARAMETERS", "operator_kwargs",
    "RUNNERS", "PixelLLMModel", "run_refer", "run_caption_regions",
    "run_dense_caption", "run_caption_with_trace", "free_model", "refer_to_detections",
    "dense_to_detections", "trace_to_labels", "short_label", "path_field_for", "download_model",
    "load_model", "resolve_input", "install_zoo_source", "install_plugin", "ZOO_MANIFEST_PATH",
    "run_finetune", "FinetuneSummary", "finetune_kwargs", "export_corrections", "adapters_dir", "resolve_adapter",
    "with_adapter",
]
