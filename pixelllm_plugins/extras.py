"""Optional extras: a missing optional dependency is a project error that names the extra to install.

``pip install "pixelllm-plugins[serve]"`` and so on (pyproject.toml's ``optional-dependencies``). Entry
points call :func:`require_extra` before importing what needs an extra, and turn any other
``ImportError`` of a known module into the same message with :func:`missing_extra`.
"""

from __future__ import annotations

import importlib

from .errors import PixelLLMError

# top-level module -> the extra that installs it
MODULE_EXTRAS: dict[str, str] = {
    "fastapi": "serve",
    "uvicorn": "serve",
    "starlette": "serve",
    "httpx": "serve",
    "pydantic": "serve",
    "prometheus_client": "serve",
    "ray": "ray",
    "fiftyone": "fiftyone",
    "pycocoevalcap": "eval",
}


class MissingExtraError(PixelLLMError):
    """An optional dependency is not installed; the message names the extra that installs it."""

    def __init__(self, feature: str, extra: str, module: str):
        self.feature, self.extra, self.module = feature, extra, module
        super().__init__(f"{feature} needs the optional extra '{extra}': "
                         f"pip install \"pixelllm-plugins[{extra}]\" (module {module!r} is not installed)")


def require_extra(extra: str, *modules: str, feature: str) -> None:
    """Import ``modules`` (all installed by ``extra``) or raise ``MissingExtraError`` naming ``extra``.

    ``feature`` says what needs them, e.g. ``"pixelllm serve"``.
    """
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError:
            raise MissingExtraError(feature, extra, module) from None


def missing_extra(exc: ImportError, feature: str) -> MissingExtraError | None:
    """The ``MissingExtraError`` an ``ImportError`` of a module from an extra stands for, else None."""
    name = getattr(exc, "name", None) or ""
    top = name.split(".")[0]
    extra = MODULE_EXTRAS.get(top)
    return MissingExtraError(feature, extra, top) if extra else None
