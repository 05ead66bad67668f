"""Map tokens (ours; ``prompt.map_tokens``, ``prompt.fine_grid``): samples inside the prompt box as extra
visual tokens.

g x g bilinear samples of the proposal feature map (``maps["features"]``) inside each prompt box, projected
and given the projected Fourier PE of where they were taken, join the language model's visual tokens after
the prompt adapter's Q tokens: one hop from the box's pixels to the words. With ``prompt.fine_grid = f``,
f x f samples of the fine map (``maps["fine"]``, ``vision.fine_channels``) pass through a zero-initialised
layer and are added to those tokens, so growing it onto a trained model changes no answer.

Checkpoints (and ``--lr-multiplier`` prefixes) have always named the layers at the model's top level:
``map_token_proj``, ``map_token_pe``, ``fine_token_proj``. They stay there: :class:`MapTokens` makes them
(``layers``) and runs them (``__call__``), and holds no weights itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ...config import PromptConfig
from ...errors import PixelLLMError
from ..common import sample_lattice, zero_linear


@dataclass(frozen=True)
class MapTokens:
    grid: int  # g: g*g map tokens per prompt
    fine_grid: int = 0  # f: f*f fine-map samples added to them (0 = none)

    @classmethod
    def from_config(cls, config: PromptConfig) -> MapTokens | None:
        return cls(config.map_tokens, config.fine_grid) if config.map_tokens > 0 else None

    @property
    def num_tokens(self) -> int:
        return self.grid * self.grid

    def layers(self, feature_dim: int, fine_dim: int, pe_dim: int, output_dim: int
               ) -> tuple[nn.Linear, nn.Linear, nn.Linear | None]:
        """(``map_token_proj``, ``map_token_pe``, ``fine_token_proj``) for the model to hold, made in this
        order (a seeded model's weights depend on it)."""
        proj, pe = nn.Linear(feature_dim, output_dim), nn.Linear(pe_dim, output_dim)
        fine = (zero_linear(self.fine_grid ** 2 * fine_dim, self.num_tokens * output_dim)
                if self.fine_grid > 0 else None)
        return proj, pe, fine

    def __call__(self, model: nn.Module, visual: Tensor, maps: dict[str, Tensor], boxes01: Tensor,
                 image_index: Tensor) -> Tensor:
        """``model``'s visual tokens [M,Q,D] of boxes01 [M,4] (normalised to the canvas) on the images
        ``image_index`` [M] of ``maps`` -> [M,Q+g*g,D]. ``model`` holds the layers and the prompt encoder."""
        features = maps["features"]
        sampled, points = sample_lattice(features, boxes01.to(features.dtype), image_index, self.grid)
        pe = model.prompt_encoder.pe.encode(points).to(sampled.dtype)
        extra = model.map_token_proj(sampled) + model.map_token_pe(pe)
        if self.fine_grid > 0:
            if "fine" not in maps:
                raise PixelLLMError("this model's prompt.fine_grid reads the fine map: embed the images with "
                                    "PixelLLM.embed_images")
            fine_map = maps["fine"]
            fine, _ = sample_lattice(fine_map, boxes01.to(fine_map.dtype), image_index, self.fine_grid)
            extra = extra + model.fine_token_proj(fine.flatten(1).to(extra.dtype)).view(extra.shape)
        return torch.cat([visual, extra.to(visual.dtype)], dim=1)
