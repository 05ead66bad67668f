"""Project exceptions. Every message says what went wrong and what the user can do about it."""

from __future__ import annotations


class PixelLLMError(Exception):
    """Base class of every error this project raises on purpose."""


class InvalidImageError(PixelLLMError):
    """The image could not be read: missing, truncated, not an image, or refused by a limit."""


class ImageTooLargeError(InvalidImageError):
    """The image exceeds the pixel or byte limit (protects against decompression bombs)."""


class InvalidPromptError(PixelLLMError):
    """A text prompt is empty or otherwise unusable."""


class InvalidBoxError(PixelLLMError):
    """A box is malformed or degenerate (zero area after clipping to the image)."""


class CheckpointError(PixelLLMError):
    """A checkpoint folder is missing files, or a preset name is unknown."""


class ImageFetchError(InvalidImageError):
    """An image URL or path was refused (host/folder not allowed) or could not be fetched."""


class RemoteError(PixelLLMError):
    """The GPU worker answered with an error or could not be reached."""


class TrainingError(PixelLLMError):
    """Training could not start or continue (bad data, bad recipe, interrupted)."""


class EvaluationError(PixelLLMError):
    """Evaluation could not run: missing optional dependency, bad data, mismatched inputs."""


class InvalidParameterError(PixelLLMError):
    """A numeric option (a CLI flag, a request field, a config attribute) is not a number or out of range."""


class InvalidSettingError(InvalidParameterError, ValueError):
    """A service setting (an environment variable or a keyword of a settings class) is malformed or out of
    range. Also a ``ValueError``, as the settings classes raised before."""
