"""Any Hugging Face vision tower as the PixelLLM image encoder (``VisionConfig.kind == "hf"``).

The tower is loaded with ``AutoModel`` by local path or hub id (CLIP / SigLIP vision models, ViT, DINOv2,
and the vision half of dual CLIP/SigLIP-style models, which is taken from ``.vision_model``). The
encoder maps a normalised canvas ``[B,3,S,S]`` to image tokens ``[B, gh*gw, out_dim]``:

- prefix tokens (CLS, DINOv2 registers) are dropped: they are the leading ``L - gh*gw`` tokens;
- for canvases other than the tower's native size, the position embeddings are interpolated by the tower
  itself (``interpolate_pos_encoding=True`` where the forward takes it; DINOv2 always interpolates);
- convolutional towers whose ``last_hidden_state`` is a ``[B,C,h,w]`` map are flattened row-major;
- ``config.freeze`` freezes the tower and keeps it in eval mode; otherwise tower parameters that never reach
  the tokens (SigLIP's pooling head, ViT's pooler) are frozen after one small backward pass at build time
  (listed in ``unused_parameters``), so optimizers and DDP only see parameters that get gradients.

Pixel normalisation happens in the data pipeline (``VisionConfig.pixel_mean/std``);
``hf_pixel_stats(name_or_path)`` reads the tower's own mean/std from its preprocessor config when present.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch
from torch import Tensor, nn

from ..config import VisionConfig
from ..errors import CheckpointError

# Attributes under which composite (vision + text / vision + LM) models keep their vision tower.
_TOWER_ATTRS = ("vision_model", "vision_tower", "visual", "image_encoder")
# Towers that interpolate their position embeddings on every call without a flag.
_ALWAYS_INTERPOLATE = {"dinov2", "dinov2_with_registers", "dinov3_vit"}


def load_hf_vision_tower(name_or_path: str) -> tuple[nn.Module, object]:
    """Load a vision tower and its (vision) config. Dual models give their ``.vision_model``."""
    from transformers import AutoConfig, AutoModel

    try:
        hf_config = AutoConfig.from_pretrained(name_or_path)
        model = AutoModel.from_pretrained(name_or_path, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(
            f"cannot load the Hugging Face vision tower {name_or_path!r}: {exc}. Pass a local folder written by "
            "save_pretrained (config.json + weights) or a hub id (needs network access)."
        ) from exc
    tower: nn.Module = model
    vision_config = getattr(hf_config, "vision_config", None)
    if vision_config is not None:
        for attr in _TOWER_ATTRS:
            sub = getattr(model, attr, None)
            if isinstance(sub, nn.Module):
                tower = sub
                break
        else:
            raise CheckpointError(
                f"{name_or_path!r} ({type(model).__name__}) has a vision_config but no vision tower under "
                f"{_TOWER_ATTRS}; save the vision model alone (e.g. CLIPVisionModel) and pass that folder."
            )
    cfg = getattr(tower, "config", None)
    if cfg is None:
        cfg = vision_config if vision_config is not None else hf_config
    if getattr(cfg, "vision_config", None) is not None:
        cfg = cfg.vision_config
    return tower, cfg


def hf_pixel_stats(name_or_path: str) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """(mean, std) from a local ``preprocessor_config.json``, or None when there is none."""
    path = Path(name_or_path) / "preprocessor_config.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        return tuple(float(v) for v in data["image_mean"]), tuple(float(v) for v in data["image_std"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _as_int(v) -> int:
    if isinstance(v, (list, tuple)):
        return int(v[0])
    return int(v)


class HFVisionEncoder(nn.Module):
    """A Hugging Face vision tower producing image tokens ``[B, gh*gw, out_dim]`` (no CLS/registers)."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        if not config.hf_name_or_path:
            raise CheckpointError("VisionConfig.kind='hf' needs vision.hf_name_or_path (a local folder or hub id)")
        self.config = config
        self.tower, self.tower_config = load_hf_vision_tower(config.hf_name_or_path)
        cfg = self.tower_config
        self.model_type: str = str(getattr(cfg, "model_type", ""))
        size = int(config.image_size)
        native = getattr(cfg, "image_size", None)
        self.native_size: int | None = _as_int(native) if native is not None else None
        params = inspect.signature(self.tower.forward).parameters
        self._interpolate_kw = "interpolate_pos_encoding" in params
        self._needs_interpolation = self.native_size is not None and size != self.native_size
        if (self._needs_interpolation and not self._interpolate_kw
                and self.model_type not in _ALWAYS_INTERPOLATE):
            raise CheckpointError(
                f"the vision tower {config.hf_name_or_path!r} ({self.model_type}) is trained at "
                f"{self.native_size} px and cannot interpolate its position embeddings; set "
                f"vision.image_size={self.native_size}"
            )
        patch = getattr(cfg, "patch_size", None)
        hidden = getattr(cfg, "hidden_size", None)
        if patch is not None and hidden is not None:
            p = _as_int(patch)
            self.grid_size: tuple[int, int] = (size // p, size // p)
            self.out_dim: int = int(hidden)
        else:  # e.g. convolutional towers: ask the tower once
            with torch.no_grad():
                was_training = self.tower.training
                self.tower.eval()
                out = self._run(torch.zeros(1, 3, size, size))
                self.tower.train(was_training)
            if out.ndim != 4:
                raise CheckpointError(
                    f"cannot infer the token grid of {config.hf_name_or_path!r}: its config has no patch_size "
                    "and its output is not a [B,C,h,w] feature map"
                )
            self.grid_size = (int(out.shape[2]), int(out.shape[3]))
            self.out_dim = int(out.shape[1])
        self.unused_parameters: list[str] = []
        if config.freeze:
            self.tower.requires_grad_(False)
            self.tower.eval()
        else:
            self.unused_parameters = self._freeze_unused()

    def _freeze_unused(self) -> list[str]:
        """Freeze tower parameters that never reach the image tokens (pooling heads such as SigLIP's MAP
        head or ViT's pooler), found with one small backward pass; keeps DDP and optimizers tidy."""
        size = int(self.config.image_size)
        was_training = self.tower.training
        self.tower.eval()
        try:
            with torch.enable_grad():
                tokens = self.forward(torch.zeros(1, 3, size, size))
                params = [p for p in self.tower.parameters() if p.requires_grad]
                grads = torch.autograd.grad(tokens.float().sum(), params, allow_unused=True)
        finally:
            self.tower.train(was_training)
        unused_ids = {id(p) for p, g in zip(params, grads) if g is None}
        unused = []
        for n, p in self.tower.named_parameters():
            if id(p) in unused_ids:
                p.requires_grad_(False)
                unused.append(n)
        return unused

    def train(self, mode: bool = True) -> HFVisionEncoder:
        super().train(mode)
        if self.config.freeze:  # a frozen tower stays deterministic (no dropout / drop-path)
            self.tower.eval()
        return self

    def _run(self, pixel_values: Tensor) -> Tensor:
        kwargs = {}
        if self._interpolate_kw and pixel_values.shape[-1] != self.native_size:
            kwargs["interpolate_pos_encoding"] = True
        out = self.tower(pixel_values=pixel_values, **kwargs)
        hidden = getattr(out, "last_hidden_state", None)
        if hidden is None:
            hidden = out[0]
        return hidden

    def forward(self, pixel_values: Tensor) -> Tensor:
        """pixel_values [B,3,S,S] -> image tokens [B, gh*gw, out_dim]."""
        dtype = next(self.tower.parameters()).dtype
        hidden = self._run(pixel_values.to(dtype))
        gh, gw = self.grid_size
        if hidden.ndim == 4:  # [B,C,h,w]
            if tuple(hidden.shape[2:]) != (gh, gw):
                raise CheckpointError(
                    f"vision tower produced a {tuple(hidden.shape[2:])} map, expected {(gh, gw)}; feed "
                    f"{self.config.image_size} px canvases"
                )
            return hidden.flatten(2).transpose(1, 2)
        n = gh * gw
        prefix = hidden.shape[1] - n
        if prefix < 0:
            raise CheckpointError(
                f"vision tower produced {hidden.shape[1]} tokens, fewer than the {gh}x{gw} grid; feed "
                f"{self.config.image_size} px canvases"
            )
        return hidden[:, prefix:]
