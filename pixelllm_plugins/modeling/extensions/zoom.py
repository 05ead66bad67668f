"""Zoom (ours; ``prompt.zoom``): the prompt box's own pixels, zoomed in, added to the map tokens.

The image tokens are 16 canvas pixels apart and the fine map 4, so a small object (20 pixels across) is one
or two tokens: enough for its colour, not always for its outline (a turned square against a diamond, a
hexagon against a circle). Here a square around the box, a fifth wider than the box's longer side (so a
shape keeps its proportions), is resampled from the canvas pixels to ``zoom x zoom`` and read by a small CNN
(three stride-2 stages); a zero-initialised layer turns its output into one addition per map token, so
growing it onto a trained model changes no answer until it is trained. The model holds it as ``zoom``.

With ``heads.box_words`` the zoom also gets a word head of its own (``words``): the box-words
loss asks it for the words of each target box's text from the CNN's features, which trains the CNN directly
instead of only through the language model (where its zero-started layer first passes no gradient back).
With ``prompt.zoom_words`` that head also votes while region captions are written (:meth:`ZoomEncoder.word_vote`,
``inference.decoding.generate``'s ``word_bias``): on turned shapes the CNN names the outline more often than the
language model reading the map tokens does; with ``heads.candidate_words`` it also reads each candidate a
referring text may name and votes for those that show the text's words (:meth:`ZoomEncoder.candidate_vote`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import PixelLLMError
from ..common import zero_linear

MARGIN = 1.2  # the crop's side over the box's longer side
MIN_SIDE = 4.0 / 192  # the smallest crop, as a fraction of the canvas
VOTE_FLOOR = -4.0  # the lowest vote per unit weight (log-probability below the favourite word's or candidate's)
SEEN = -3.0  # candidate_vote counts a word only where the head gives some candidate at least this log-probability


def canvas_pixels(maps: dict[str, Tensor], option: str) -> Tensor:
    """The normalised canvas pixels kept in an image embedding's maps, or a clear error naming ``option``."""
    pixels = maps.get("pixels")
    if pixels is None:
        raise PixelLLMError(f"this model's {option} reads the canvas pixels: embed the images with "
                            "PixelLLM.embed_images")
    return pixels


def square_crops(boxes01: Tensor, size: int) -> Tensor:
    """Sampling grids [M,size,size,2] (grid_sample's -1..1 frame) of squares around boxes01 [M,4]
    (x1,y1,x2,y2 normalised to the canvas): centred on each box, side ``MARGIN`` times its longer side."""
    centre = (boxes01[:, :2] + boxes01[:, 2:]) / 2
    side = ((boxes01[:, 2:] - boxes01[:, :2]).amax(dim=1) * MARGIN).clamp(min=MIN_SIDE)  # [M]
    steps = (torch.arange(size, device=boxes01.device, dtype=boxes01.dtype) + 0.5) / size - 0.5
    offsets = steps[None, :] * side[:, None]  # [M,size]
    xs = centre[:, 0:1] + offsets
    ys = centre[:, 1:2] + offsets
    grid = torch.stack([xs[:, None, :].expand(-1, size, -1), ys[:, :, None].expand(-1, -1, size)], -1)
    return 2 * grid - 1


class ZoomEncoder(nn.Module):
    """Canvas pixels under each prompt box -> an addition to each of the prompt's ``num_tokens`` map tokens."""

    def __init__(self, size: int, num_tokens: int, output_dim: int, channels: tuple[int, ...] = (32, 48, 64),
                 vocab_size: int = 0):
        super().__init__()
        self.size, self.num_tokens, self.output_dim = size, num_tokens, output_dim
        layers: list[nn.Module] = [nn.Conv2d(3, channels[0], 3, padding=1), nn.GELU()]
        width = channels[0]
        for out in channels:  # each stage halves the side
            layers += [nn.Conv2d(width, out, 3, stride=2, padding=1), nn.GELU()]
            width = out
        self.cnn = nn.Sequential(*layers)
        side = size // 2 ** len(channels)
        self.feature_dim = width * side * side
        self.proj = zero_linear(self.feature_dim, num_tokens * output_dim)
        self.words = (nn.Sequential(nn.LayerNorm(self.feature_dim), nn.Linear(self.feature_dim, vocab_size))
                      if vocab_size else None)

    def crops(self, pixels: Tensor, boxes01: Tensor, image_index: Tensor) -> Tensor:
        """pixels [B,3,S,S] (the normalised canvas), boxes01 [M,4], image_index [M] -> crops [M,3,z,z]."""
        grid = square_crops(boxes01.float(), self.size)
        crops = F.grid_sample(pixels.index_select(0, image_index).float(), grid, mode="bilinear",
                              padding_mode="zeros", align_corners=False)
        return crops.to(self.proj.weight.dtype)

    def features(self, pixels: Tensor, boxes01: Tensor, image_index: Tensor) -> Tensor:
        """pixels [B,3,S,S] (the normalised canvas), boxes01 [M,4], image_index [M] -> CNN features [M,F]."""
        return self.cnn(self.crops(pixels, boxes01, image_index)).flatten(1)

    def forward(self, pixels: Tensor, boxes01: Tensor, image_index: Tensor) -> Tensor:
        """-> [M,num_tokens,D]: the additions to each prompt's map tokens."""
        return self.proj(self.features(pixels, boxes01, image_index)).view(-1, self.num_tokens, self.output_dim)

    def word_logits(self, pixels: Tensor, boxes01: Tensor, image_index: Tensor) -> Tensor:
        """-> [M,V]: the word head's logits (``vocab_size`` > 0 only)."""
        return self.words(self.features(pixels, boxes01, image_index))

    def word_log_probs(self, pixels: Tensor, boxes01: Tensor, image_index: Tensor, views: int = 1) -> Tensor:
        """-> [M,V]: the word head's log-probabilities, averaged over ``views`` of each crop (``prompt.zoom_views``:
        1; 2, the crop and its mirror image; 4, its quarter turns; 8, both). No shape's name changes under
        those, and a view the head reads well can outvote one it reads badly (a hexagon turned 45° is one
        turned 15° once turned a quarter more)."""
        crops = self.crops(pixels, boxes01, image_index)
        turned = [torch.rot90(crops, k, dims=(2, 3)) for k in range(4 if views >= 4 else 1)]
        if views in (2, 8):
            turned += [view.flip(-1) for view in turned]
        logits = self.words(self.cnn(torch.cat(turned)).flatten(1)).float()
        return torch.log_softmax(logits, dim=-1).view(len(turned), len(crops), -1).mean(0)

    def word_vote(self, pixels: Tensor, boxes01: Tensor, image_index: Tensor, weight: float, views: int = 1
                  ) -> Tensor:
        """``prompt.zoom_words``: [M,V] additions to a region caption's next-word log-probabilities, ``weight``
        times the word head's log-probability of each word (``word_log_probs``) minus that of its favourite
        word, at least ``weight * VOTE_FLOOR`` (all <= 0: the vote reorders words, it never pushes a caption on)."""
        logp = self.word_log_probs(pixels, boxes01, image_index, views)
        return weight * (logp - logp.amax(dim=-1, keepdim=True)).clamp(min=VOTE_FLOOR)

    def candidate_vote(self, pixels: Tensor, boxes01: Tensor, image_index: Tensor, word_ids: Tensor,
                       word_mask: Tensor, weight: float) -> Tensor:
        """``heads.candidate_words``: pixels [B,3,S,S], each image's K candidate boxes01 [B,K,4], rows'
        image_index [M] and the ids of their text's words [M,T] (``word_mask`` [M,T]) -> [M,K]: ``weight``
        times the mean, over the words the head sees on at least one candidate (log-probability above
        ``SEEN``; words outside its vocabulary, an adapter's new words, never count), of each candidate's
        log-probability minus the best candidate's, at least ``VOTE_FLOOR``; 0 for a row with no such word.
        One view of each crop: eight views cost a text's pass more than twice the time (64 crops an image)
        for +0.05 to +0.24 points of refer P@0.5."""
        b, k = boxes01.shape[:2]
        per_image = torch.arange(b, device=boxes01.device).repeat_interleave(k)
        logp = self.word_log_probs(pixels, boxes01.reshape(b * k, 4), per_image)
        logp = logp.view(b, k, -1).index_select(0, image_index)  # [M,K,V]
        vocab = logp.shape[-1]
        known = word_mask & (word_ids < vocab)
        words = logp.gather(2, word_ids.clamp(0, vocab - 1)[:, None, :].expand(-1, k, -1))  # [M,K,T]
        best = words.amax(dim=1)  # [M,T]
        counted = (known & (best > SEEN)).float()
        relative = (words - best[:, None, :]).clamp(min=VOTE_FLOOR) * counted[:, None, :]
        return weight * relative.sum(-1) / counted.sum(-1, keepdim=True).clamp(min=1.0)

    def add_to(self, visual: Tensor, pixels: Tensor, boxes01: Tensor, image_index: Tensor) -> Tensor:
        """visual tokens [M,Q+T,D] whose last T are the map tokens -> the same with the zoom added to those."""
        extra = self(pixels, boxes01, image_index).to(visual.dtype)
        return torch.cat([visual[:, : -self.num_tokens], visual[:, -self.num_tokens:] + extra], dim=1)
