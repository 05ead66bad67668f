"""Label Studio ML backend for PixelLLM: batch and interactive pre-annotation, learning from annotations.

It speaks the Label Studio ML backend protocol itself (``label-studio-ml`` on PyPI is unusable), keeping
the upstream class shape: ``PixelLLMBackend.predict(tasks, context, **kwargs)``, ``fit(event, data,
**kwargs)``, ``setup()``. Start it with ``pixelllm ls-backend`` or ``python -m label_studio_backend``.
"""

from __future__ import annotations

from pathlib import Path

CONFIGS_DIR = Path(__file__).parent / "configs"

__all__ = ["CONFIGS_DIR", "create_app", "run", "PixelLLMBackend", "labeling_config"]


def labeling_config(name: str) -> str:
    """The XML of a shipped labeling config: ``referring``, ``region_captioning``, ``dense_captioning``,
    ``word_traces``, ``referring_segmentation``, ``interactive_segmentation``."""
    path = CONFIGS_DIR / f"{name}.xml"
    if not path.is_file():
        names = sorted(p.stem for p in CONFIGS_DIR.glob("*.xml"))
        raise ValueError(f"unknown labeling config {name!r}; shipped: {names}")
    return path.read_text()


def __getattr__(name: str):  # lazy: importing the package must not pull in FastAPI or torch
    if name in ("create_app", "run"):
        from . import server

        return getattr(server, name)
    if name == "PixelLLMBackend":
        from .model import PixelLLMBackend

        return PixelLLMBackend
    raise AttributeError(name)
