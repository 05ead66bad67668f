"""Data: synthetic grounded scenes, loaders of the public formats, transforms, collate, mixtures.

Flow: ``write_synthetic_dataset`` (or the real LN / RefCOCO / VG / COCO files) -> ``load_*`` ->
``GroundedSample`` -> ``collate`` (transforms + target construction) -> ``ModelInputs``;
``make_dataloader`` draws one source per batch by weight.
"""

from .collate import MaskTargets, collate, collate_with_masks, encode_prompt, utterance_assignment
from .formats import SyntheticDataset, annotate_scene, write_synthetic_dataset
from .loaders import load_coco_captions, load_localized_narratives, load_refcoco, load_vg
from .mixture import (
    DEFAULT_SYNTHETIC_WEIGHTS,
    MixtureDataset,
    Source,
    iterate_eval_batches,
    make_dataloader,
    synthetic_sources,
)
from .synthetic import (
    EXTRA_SHAPES,
    SHAPES,
    Scene,
    SceneConfig,
    generate_scene,
    object_mask,
    render_scene,
    scene_masks,
    scene_seed,
)
from .transforms import TASK_AUGMENT, AugmentConfig, TransformedSample, eval_transform, train_transform
from .types import AnnotationError, AnnotationWarning, GroundedSample, PromptRecord

__all__ = [
    "DEFAULT_SYNTHETIC_WEIGHTS", "EXTRA_SHAPES", "SHAPES", "TASK_AUGMENT", "AnnotationError",
    "AnnotationWarning", "AugmentConfig", "GroundedSample", "MaskTargets", "MixtureDataset", "PromptRecord",
    "Scene", "SceneConfig", "Source", "SyntheticDataset", "TransformedSample", "annotate_scene", "collate",
    "collate_with_masks", "encode_prompt", "eval_transform", "generate_scene", "iterate_eval_batches",
    "load_coco_captions", "load_localized_narratives", "load_refcoco", "load_vg", "make_dataloader",
    "object_mask", "render_scene", "scene_masks", "scene_seed", "synthetic_sources", "train_transform",
    "utterance_assignment", "write_synthetic_dataset",
]
