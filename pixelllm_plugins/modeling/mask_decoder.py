"""Mask decoder (``heads.mask_decoder = K``): SAM's mask decoder (Kirillov et al. 2023,
``segment_anything/modeling/mask_decoder.py``) on PixelLLM's image tokens, for referring segmentation.

An IoU token and K mask tokens, with the prompt's tokens (the box's corners and fillers, and any point
prompts, from the shared ``PromptEncoder``), go through a two-way transformer with the image tokens. The
updated image tokens are upscaled to stride 4 on the canvas (transposed convs, as SAM; with the ViT's fine
map, ``vision.fine_channels``, a 1x1 projection of it is added there, as SAM-HQ adds early ViT features);
each mask token's hypernetwork MLP gives the weights of a dot product with that map: mask logits
``[M,K,S/4,S/4]``. The IoU token's MLP predicts each mask's IoU with the target. With ``refine`` channels
(``heads.mask_refine``), ``mask_refiner.MaskRefiner`` sharpens those logits on the canvas pixels to
``[M,K,S,S]``.

The decoder has its own depth-2 two-way transformer (SAM's ``TwoWayTransformer``, the class the prompt
adapter uses) rather than adding its tokens to the prompt adapter's: the upscaling reads the transformer's
*updated image tokens*, which the adapter does not return, and mask tokens in the adapter's sequence would
change the language model's visual tokens. Kept apart, the decoder can be added to a trained model without
changing one caption.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .mask_refiner import MaskRefiner
from .prompt_adapter import TwoWayTransformer

DEPTH = 2  # SAM's decoder transformer


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of each pixel of a [B,C,H,W] map (SAM's)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


def mlp(in_dim: int, hidden: int, out_dim: int, layers: int) -> nn.Sequential:
    """SAM's MLP: ``layers`` Linear layers with ReLU between."""
    dims = [in_dim] + [hidden] * (layers - 1) + [out_dim]
    parts: list[nn.Module] = []
    for i in range(layers):
        parts.append(nn.Linear(dims[i], dims[i + 1]))
        if i < layers - 1:
            parts.append(nn.ReLU())
    return nn.Sequential(*parts)


def upscaling(dim: int, out_channels: int, grid: int, size: int) -> tuple[nn.Sequential, int]:
    """Transposed 2x2 convs (stride 2) from a ``grid``-cell map until it has at least ``size`` cells
    (SAM: dim -> dim/4, LayerNorm2d, GELU -> dim/8, GELU) -> (the layers, the map's side after them)."""
    steps = 0
    while grid * 2**steps < size:
        steps += 1
    if steps == 0:
        return nn.Sequential(nn.Conv2d(dim, out_channels, 1), nn.GELU()), grid
    layers: list[nn.Module] = []
    c_in = dim
    for i in range(steps):
        last = i == steps - 1
        c_out = out_channels if last else max(out_channels, dim // 4)
        layers.append(nn.ConvTranspose2d(c_in, c_out, kernel_size=2, stride=2))
        layers += [nn.GELU()] if last else [LayerNorm2d(c_out), nn.GELU()]
        c_in = c_out
    return nn.Sequential(*layers), grid * 2**steps


def two_way(transformer: TwoWayTransformer, image: Tensor, image_pe: Tensor, tokens: Tensor
            ) -> tuple[Tensor, Tensor]:
    """``TwoWayTransformer.forward`` that also returns the updated image tokens (SAM's returns both):
    image [M,L,C], image_pe [1,L,C], tokens [M,P,C] -> (tokens [M,P,C], image [M,L,C])."""
    queries, keys = tokens, image
    for layer in transformer.layers:
        queries, keys = layer(queries, keys, tokens, image_pe)
    out = transformer.final_attn_token_to_image(queries + tokens, keys + image_pe, keys)
    return transformer.norm_final_attn(queries + out), keys


class MaskDecoder(nn.Module):
    """K mask tokens + an IoU token, with the prompt's tokens, read the image tokens in a two-way
    transformer -> mask logits [M,K,S/4,S/4] on the canvas (``[M,K,S,S]`` with a refiner) and their predicted
    IoU [M,K].

    ``dim``, ``num_heads``, ``mlp_dim``, ``downsample``: the transformer's (the prompt adapter's settings);
    ``embed_dim``: the prompt encoder's width; ``grid``: the image-token grid's side; ``canvas_size``: S;
    ``fine_dim``: channels of the ViT's stride-4 fine map (0: none); ``refine``: the stride-1 refiner's
    channels (0: none; it reads the canvas pixels).
    """

    def __init__(self, num_masks: int, *, vision_dim: int, embed_dim: int, dim: int, num_heads: int,
                 mlp_dim: int, downsample: int, grid: int, canvas_size: int, fine_dim: int = 0,
                 refine: int = 0):
        super().__init__()
        if num_masks < 1:
            raise ValueError(f"a mask decoder needs at least one mask output, got {num_masks}")
        self.num_masks = num_masks
        self.mask_size = canvas_size // 4
        channels = max(8, dim // 8)
        self.image_proj = nn.Linear(vision_dim, dim)
        self.dense_proj = nn.Linear(embed_dim, dim)  # the "no mask" dense prompt
        self.pe_proj = nn.Linear(embed_dim, dim)
        self.prompt_proj = nn.Linear(embed_dim, dim)
        self.iou_token = nn.Parameter(torch.randn(1, dim))
        self.mask_tokens = nn.Parameter(torch.randn(num_masks, dim))
        self.transformer = TwoWayTransformer(DEPTH, dim, num_heads, mlp_dim, downsample)
        self.upscale, self.upscaled_size = upscaling(dim, channels, grid, self.mask_size)
        self.fine_proj = nn.Conv2d(fine_dim, channels, 1) if fine_dim > 0 else None
        self.hypernetworks = nn.ModuleList(mlp(dim, dim, channels, 3) for _ in range(num_masks))
        self.iou_head = mlp(dim, dim, num_masks, 3)
        self.refiner = MaskRefiner(refine, num_masks) if refine > 0 else None

    def forward(self, image_tokens: Tensor, grid_size: tuple[int, int], image_pe: Tensor, dense_embedding: Tensor,
                prompt_tokens: Tensor, image_index: Tensor, fine: Tensor | None = None,
                pixels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """image_tokens [B,L,Cv] (L = gh*gw), image_pe [L,E], dense_embedding [1,E], prompt_tokens [M,P,E],
        image_index [M] (the image of each prompt), fine [B,Cf,S/4,S/4] (when built with ``fine_dim``),
        pixels [B,3,S,S] (the normalised canvas; when built with ``refine``)
        -> (mask logits [M,K,s,s] on the padded canvas, s = S/4, or S with a refiner; predicted IoU [M,K])."""
        m = prompt_tokens.shape[0]
        src = self.image_proj(image_tokens) + self.dense_proj(dense_embedding)  # projected once per image
        src = src.index_select(0, image_index)
        pe = self.pe_proj(image_pe).unsqueeze(0)
        output_tokens = torch.cat([self.iou_token, self.mask_tokens], 0).unsqueeze(0).expand(m, -1, -1)
        tokens = torch.cat([output_tokens.to(src.dtype), self.prompt_proj(prompt_tokens)], 1)
        hs, keys = two_way(self.transformer, src, pe, tokens)
        iou_out, mask_out = hs[:, 0], hs[:, 1 : 1 + self.num_masks]
        gh, gw = grid_size
        up = self.upscale(keys.transpose(1, 2).reshape(m, -1, gh, gw))
        size = (self.mask_size, self.mask_size)
        if up.shape[-2:] != size:
            up = F.interpolate(up, size=size, mode="bilinear", align_corners=False)
        if self.fine_proj is not None:
            if fine is None:
                raise ValueError("this mask decoder reads the fine map: pass the embedding's maps['fine']")
            f = self.fine_proj(fine.to(up.dtype))
            if f.shape[-2:] != size:
                f = F.interpolate(f, size=size, mode="bilinear", align_corners=False)
            up = up + f.index_select(0, image_index)
        hyper = torch.stack([net(mask_out[:, k]) for k, net in enumerate(self.hypernetworks)], 1)  # [M,K,C]
        masks = (hyper @ up.flatten(2)).view(m, self.num_masks, *size)
        if self.refiner is not None:
            if pixels is None:
                raise ValueError("this mask decoder refines on the canvas pixels: pass the embedding's maps['pixels']")
            masks = self.refiner(masks, pixels, image_index)
        return masks, self.iou_head(iou_out)
