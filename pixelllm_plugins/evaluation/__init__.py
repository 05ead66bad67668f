"""Evaluation: pure metrics (``metrics``) and the driver over a data folder (``evaluate``).

``from pixelllm_plugins.evaluation import evaluate, write_report`` imports lazily, so the pure metrics
stay importable without loading the model stack.
"""

from __future__ import annotations

_EXPORTS = {
    "evaluate": "evaluate", "write_report": "evaluate", "markdown_table": "evaluate",
    "trace_l1_from_model": "evaluate", "EvaluationError": "metrics", "box_precision": "metrics",
    "mask_scores": "metrics", "caption_scores": "metrics", "densecap_map": "metrics",
    "trace_point_l1_image": "metrics", "attribute_accuracy": "metrics", "evaluate_splits": "evaluate",
    "mask_scores_from_counts": "metrics", "caption_object_f1": "metrics", "caption_objects": "metrics",
    "interior_point": "metrics", "has_holes": "metrics",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
