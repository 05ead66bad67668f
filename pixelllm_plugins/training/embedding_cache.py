"""Image embeddings reused across training steps when the image side of the model does not learn.

A correction round trains a LoRA adapter on the language side over a few hundred images that come back
again and again (each correction is repeated, every replay scene is seen several times). When neither the
vision encoder nor the proposal head has a trainable parameter, the embedding of the same pixels is the
same at every step, so :class:`ImageEmbeddingCache` computes it once, without autograd, and hands it back
whenever the same pixels come again (keyed by a hash of the canvas tensor, so any augmentation that
redraws the pixels is simply a new entry). With augmentation that rescales or crops every time, nearly
nothing repeats and the cache only costs the hashing; with a fixed scale (``TrainConfig.augment_scale``
``[1, 1]``) an image has at most two canvases (flipped or not).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch
from torch import Tensor

from ..errors import TrainingError
from ..modeling.inputs import ImageEmbedding

DEFAULT_MAX_BYTES = 1 << 30  # the embedded model's embedding of one canvas is 1.1 MB: about 1,000 images


def image_side_trains(model: torch.nn.Module) -> list[str]:
    """Names of the trainable parameters that an image embedding depends on (vision encoder, proposal head)."""
    from ..modeling.lora import IMAGE_SIDE

    parts = [(prefix, getattr(model, prefix, None)) for prefix in IMAGE_SIDE]
    return [f"{prefix}.{name}" for prefix, module in parts if module is not None
            for name, p in module.named_parameters() if p.requires_grad]


class ImageEmbeddingCache:
    """``cache(pixel_values) -> ImageEmbedding`` of ``model`` (a ``PixelLLM``, LoRA injected or not), each
    distinct canvas embedded once; at most ``max_bytes`` of embeddings kept (least recently used dropped)."""

    def __init__(self, model: torch.nn.Module, max_bytes: int = DEFAULT_MAX_BYTES):
        training = image_side_trains(model)
        if training:
            raise TrainingError(f"image embeddings can only be reused when the image side is frozen, but "
                                f"{len(training)} of its parameters train (e.g. {training[0]}); turn "
                                "cache_image_embeddings off, or do not adapt the vision encoder")
        self.model = model
        self.max_bytes = int(max_bytes)
        self.bytes = 0
        self.maps = getattr(model, "proposal_head", None) is not None  # what training's forward computes
        self.computed = 0
        self.reused = 0
        self._store: OrderedDict[bytes, ImageEmbedding] = OrderedDict()

    def __len__(self) -> int:
        return len(self._store)

    def __call__(self, pixel_values: Tensor) -> ImageEmbedding:
        keys = [_key(p) for p in pixel_values]
        fresh: dict[bytes, int] = {}
        for i, k in enumerate(keys):
            if k in self._store:
                self._store.move_to_end(k)
            elif k not in fresh:
                fresh[k] = i
        self.computed += len(fresh)
        self.reused += len(keys) - len(fresh)
        found = {k: self._store[k] for k in keys if k in self._store}
        if fresh:
            with torch.no_grad():
                batch = self.model.embed_images(pixel_values[list(fresh.values())], maps=self.maps)
            for k, part in zip(fresh, batch.split()):
                found[k] = _detached_copy(part)
                self._store[k] = found[k]
                self.bytes += _nbytes(found[k])
            while self.bytes > self.max_bytes and len(self._store) > 1:
                self.bytes -= _nbytes(self._store.popitem(last=False)[1])
        return ImageEmbedding.stack([found[k] for k in keys])


def _key(pixels: Tensor) -> bytes:
    data = pixels.detach().contiguous().cpu()
    digest = hashlib.blake2b(data.numpy().tobytes(), digest_size=16)
    digest.update(repr((tuple(data.shape), str(data.dtype))).encode())
    return digest.digest()


def _nbytes(part: ImageEmbedding) -> int:
    return part.tokens.nbytes + sum(v.nbytes for v in (part.maps or {}).values())


def _detached_copy(part: ImageEmbedding) -> ImageEmbedding:
    """A copy that owns its memory (a view would keep the whole batch's tensors alive)."""
    maps = None if part.maps is None else {k: v.detach().clone() for k, v in part.maps.items()}
    return ImageEmbedding(part.tokens.detach().clone(), maps)
