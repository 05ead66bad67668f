"""The local model-zoo source: the hooks FiftyOne's zoo calls, and ``install_zoo_source`` which writes it.

The manifest is ``zoo_manifest.json`` next to this file.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import fiftyone as fo

from .model import OPERATIONS, PixelLLMModel

ZOO_MANIFEST_PATH = Path(__file__).with_name("zoo_manifest.json")
ZOO_SOURCE_NAME = "pixelllm"


def download_model(model_name: str, model_path: str) -> None:
    """Zoo hook: the weights ship inside the ``pixelllm-plugins`` package, so only a marker is written."""
    os.makedirs(model_path, exist_ok=True)
    with open(os.path.join(model_path, "README.md"), "w") as f:
        f.write(f"# {model_name}\n\nPixelLLM weights are embedded in the pixelllm-plugins package; this folder "
                "only marks the zoo model as downloaded.\n")


def load_model(model_name: str, model_path: str, **kwargs) -> PixelLLMModel:
    """Zoo hook: ``foz.load_zoo_model("pixelllm", operation=..., prompt=..., model=...)``."""
    kwargs.setdefault("operation", "refer")
    return PixelLLMModel(**kwargs)


def resolve_input(model_name: str, ctx):
    """Zoo hook: the extra form shown by ``@voxel51/zoo/apply_zoo_model``."""
    import fiftyone.operators.types as types

    inputs = types.Object()
    inputs.enum("operation", list(OPERATIONS), default="refer", label="Task",
                view=types.DropdownView())
    inputs.str("prompt", default="", label="Referring expression (refer, segment)")
    inputs.enum("output", ["instance_masks", "polylines"], default="instance_masks", label="Masks as (segment)",
                view=types.DropdownView())
    return types.Property(inputs)


def parse_parameters(model_name: str, ctx, params: dict) -> None:
    """Zoo hook: drop an empty prompt so a prompt_field can be used instead."""
    if not params.get("prompt"):
        params.pop("prompt", None)


_ZOO_SHIM = '''"""PixelLLM model-zoo source (written by pixelllm_plugins.integrations.fiftyone.install_zoo_source)."""
from pixelllm_plugins.integrations.fiftyone import (  # noqa: F401
    download_model, load_model, parse_parameters, resolve_input,
)
'''


def install_zoo_source(zoo_dir: str | os.PathLike | None = None) -> Path:
    """Make the model listable/loadable from the zoo: writes ``<zoo_dir>/pixelllm/{manifest.json,__init__.py}``.

    ``zoo_dir`` defaults to ``fo.config.model_zoo_dir`` (``FIFTYONE_MODEL_ZOO_DIR``). Afterwards
    ``foz.list_zoo_models()`` includes ``pixelllm`` and ``foz.load_zoo_model("pixelllm", ...)`` works.
    """
    root = Path(zoo_dir or fo.config.model_zoo_dir) / ZOO_SOURCE_NAME
    root.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(ZOO_MANIFEST_PATH, root / "manifest.json")
    (root / "__init__.py").write_text(_ZOO_SHIM)
    try:  # fiftyone memoises the manifest in some configurations
        import fiftyone.zoo.models as fozm

        fozm._invalidate_zoo_models_manifest()
    except (ImportError, AttributeError):  # pragma: no cover
        pass
    return root
