"""Errors of the Label Studio backend. Messages say what to do; they end up in per-task error fields."""

from __future__ import annotations

from pixelllm_plugins.errors import PixelLLMError


class BackendError(PixelLLMError):
    """Base class of the backend's own errors."""


class TaskError(BackendError):
    """One task cannot be predicted (its data, image or prompt is unusable)."""


def printable(value: object, limit: int = 80) -> str:
    """A short, safe rendering of a user's value for an error message: text with lone surrogates and
    control characters escaped (so the message is valid UTF-8 JSON), anything else by its type only (a
    deeply nested list is never ``repr``-ed)."""
    if not isinstance(value, str):
        return f"<{type(value).__name__}>"
    text = value if len(value) <= limit else value[:limit] + "..."
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


class InvalidRegionError(TaskError):
    """A region from Label Studio (a polygon, a brush mask, a click, a rectangle) is malformed: too few
    points, a brush RLE that does not decode, a click outside the image, a value of the wrong type."""
