"""Errors of the Label Studio backend. Messages say what to do; they end up in per-task error fields."""

from __future__ import annotations

from pixelllm_plugins.errors import PixelLLMError


class BackendError(PixelLLMError):
    """Base class of the backend's own errors."""


class TaskError(BackendError):
    """One task cannot be predicted (its data, image or prompt is unusable)."""
