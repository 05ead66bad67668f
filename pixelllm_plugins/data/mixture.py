"""Per-batch source mixtures (spec 5.3): each batch comes from one source drawn with probability ∝ weight.

Batch ``k`` is a pure function of ``(seed, k)``: the source, the images and every augmentation are drawn
from generators seeded by ``(seed, k)``. So the stream is the same for any worker count, and a restarted
trainer continues it exactly by passing ``start_step`` = the number of batches already consumed.

Masks and point prompts (issue 17): for a model with a mask decoder (``heads.mask_decoder > 0``) batches
carry each row's target mask (:func:`collate_for_model`); with ``point_prompt_prob > 0`` (and
``prompt.points``) some region and mask prompts get points, drawn from a third generator seeded by
``(seed, k, 1)``. A model with neither gets exactly the batches it got before, and so does a model whose
mask decoder does not learn (``masks=False``: the trainer's choice when it is frozen).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..config import PixelLLMConfig
from ..modeling.inputs import ModelInputs
from ..tokenizer import PixelTokenizer
from .collate import REGION_BOX_JITTER, collate, collate_for_model, jitter_region_boxes
from .formats import SyntheticDataset
from .loaders import load_coco_captions, load_localized_narratives, load_refcoco, load_vg
from .transforms import AugmentConfig
from .types import GroundedSample

DEFAULT_SYNTHETIC_WEIGHTS: dict[str, float] = {"refer": 4.0, "region": 3.0, "trace": 2.0, "caption": 1.0}


@dataclass
class Source:
    name: str
    samples: Sequence[GroundedSample]
    weight: float = 1.0
    max_prompts: int = 8  # prompts per image (spec 5.3: LN and COCO-cap 1, refs 16, VG 16 in multitask)
    augment: AugmentConfig | None = None  # None: by task (transforms.TASK_AUGMENT)
    batch_size: int | None = None  # None: the mixture's batch size


class MixtureDataset(IterableDataset):
    """Yields :class:`ModelInputs` batches forever (or ``num_steps`` of them) from weighted sources."""

    def __init__(self, sources: Sequence[Source], tokenizer: PixelTokenizer, config: PixelLLMConfig,
                 batch_size: int, *, seed: int = 0, start_step: int = 0, num_steps: int | None = None,
                 train: bool = True, point_prompt_prob: float = 0.0, region_box_jitter: float = 0.0,
                 region_box_jitter_scale: float = REGION_BOX_JITTER, masks: bool = True):
        sources = [s for s in sources if s.weight > 0]
        if not sources:
            raise ValueError("a mixture needs at least one source with a positive weight")
        for s in sources:
            if len(s.samples) == 0:
                raise ValueError(f"source {s.name!r} has no samples; check its annotation files")
        self.sources = list(sources)
        self.tokenizer, self.config = tokenizer, config
        self.batch_size = batch_size
        self.seed, self.step, self.num_steps = int(seed), int(start_step), num_steps
        self.train = train
        self.point_prompt_prob = float(point_prompt_prob)
        self.region_box_jitter = float(region_box_jitter)
        self.region_box_jitter_scale = float(region_box_jitter_scale)
        self.masks = masks and config.heads.mask_decoder > 0  # whether batches carry target masks
        w = np.asarray([s.weight for s in self.sources], dtype=np.float64)
        self.probs = w / w.sum()

    # ---- state -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"seed": self.seed, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.step = int(state["seed"]), int(state["step"])

    # ---- batches -----------------------------------------------------------------------------------------
    def source_for(self, step: int) -> Source:
        rng = np.random.default_rng([self.seed, step])
        return self.sources[int(rng.choice(len(self.sources), p=self.probs))]

    def batch(self, step: int) -> ModelInputs:
        """Batch number ``step`` of the stream (region boxes jittered when ``region_box_jitter`` > 0)."""
        inputs = self._batch(step)
        if self.train and self.region_box_jitter > 0:
            inputs = jitter_region_boxes(inputs, self.region_box_jitter, np.random.default_rng([self.seed, step, 2]),
                                         self.region_box_jitter_scale)
        return inputs

    def _batch(self, step: int) -> ModelInputs:
        rng = np.random.default_rng([self.seed, step])
        source = self.sources[int(rng.choice(len(self.sources), p=self.probs))]
        n = len(source.samples)
        bs = source.batch_size or self.batch_size
        idx = rng.choice(n, size=bs, replace=n < bs)
        generator = torch.Generator().manual_seed(int(rng.integers(0, 2**62)))
        samples = [source.samples[int(i)] for i in idx]
        if not self.masks and not self._points:
            return collate(samples, self.tokenizer, self.config, train=self.train, generator=generator,
                           max_prompts=source.max_prompts, augment=source.augment, task=source.name)
        point_rng = np.random.default_rng([self.seed, step, 1]) if self._points else None
        return collate_for_model(samples, self.tokenizer, self.config, train=self.train, generator=generator,
                                 max_prompts=source.max_prompts, augment=source.augment, task=source.name,
                                 point_prompt_prob=self.point_prompt_prob if self._points else 0.0,
                                 point_rng=point_rng, masks=self.masks)

    @property
    def _points(self) -> bool:
        return self.train and self.point_prompt_prob > 0 and self.config.prompt.points

    def __iter__(self) -> Iterator[ModelInputs]:
        info = get_worker_info()
        wid, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        step = self.step + wid
        end = None if self.num_steps is None else self.step + self.num_steps
        while end is None or step < end:
            batch = self.batch(step)
            if info is None:
                self.step = step + 1  # in-process iteration keeps the resumable state current
            yield batch
            step += workers


def _identity(x):
    return x


def make_dataloader(sources: Sequence[Source], tokenizer: PixelTokenizer, config: PixelLLMConfig,
                    batch_size: int, *, seed: int = 0, start_step: int = 0, num_steps: int | None = None,
                    num_workers: int = 0, train: bool = True, pin_memory: bool = False,
                    prefetch_factor: int | None = None, point_prompt_prob: float = 0.0) -> DataLoader:
    """A DataLoader over a :class:`MixtureDataset`; batches arrive in step order for any ``num_workers``.

    Resume: pass ``start_step`` = batches already consumed (the trainer's step count).
    """
    dataset = MixtureDataset(sources, tokenizer, config, batch_size, seed=seed, start_step=start_step,
                             num_steps=num_steps, train=train, point_prompt_prob=point_prompt_prob)
    kwargs = {"prefetch_factor": prefetch_factor} if num_workers > 0 and prefetch_factor else {}
    return DataLoader(dataset, batch_size=None, num_workers=num_workers, collate_fn=_identity,
                      pin_memory=pin_memory, persistent_workers=False, **kwargs)


def iterate_eval_batches(samples: Sequence[GroundedSample], tokenizer: PixelTokenizer, config: PixelLLMConfig,
                         batch_size: int, *, max_prompts: int = 64, task: str | None = None) -> Iterator[ModelInputs]:
    """Deterministic, in-order batches with the eval transform (resize + pad), for evaluation loops."""
    for k in range(0, len(samples), batch_size):
        yield collate(list(samples[k:k + batch_size]), tokenizer, config, train=False, max_prompts=max_prompts,
                      task=task)


def synthetic_sources(data_dir: str | Path, split: str = "train", weights: dict[str, float] | None = None,
                      *, max_prompts: dict[str, int] | None = None, masks: bool = False) -> list[Source]:
    """The default training mixture over a directory written by ``write_synthetic_dataset``.

    Sources ``refer`` (RefCOCO json), ``region`` (VG json), ``trace`` (LN jsonl), ``caption`` (COCO
    captions), weighted by ``weights`` (default :data:`DEFAULT_SYNTHETIC_WEIGHTS`). ``masks``: region
    prompts also take the masks of ``instances_<split>.json`` (when the folder has it; refer prompts always
    carry the RefCOCO json's masks), for a model with a mask decoder or point prompts.
    """
    ds = SyntheticDataset.at(data_dir, split)
    weights = {**DEFAULT_SYNTHETIC_WEIGHTS, **(weights or {})}
    caps = {"refer": 8, "region": 8, "trace": 1, "caption": 1, **(max_prompts or {})}
    loaders = {
        "refer": lambda: load_refcoco(ds.refcoco, ds.image_dir, source="refer"),
        "region": lambda: load_vg(ds.vg, ds.image_dir, source="region",
                                  instances=ds.instances if masks and ds.instances and ds.instances.is_file() else None),
        "trace": lambda: load_localized_narratives(ds.ln, ds.image_dir, source="trace"),
        "caption": lambda: load_coco_captions(ds.coco_captions, ds.image_dir, source="caption"),
    }
    return [Source(name, loaders[name](), weights[name], caps[name]) for name in loaders if weights.get(name, 0) > 0]
