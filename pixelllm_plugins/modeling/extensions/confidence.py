"""Confidence head (ours; ``heads.confidence``, on in every preset): the predicted IoU of each token's box.

The paper reads a box from the tokens' points but gives it no score. This head predicts, from each
token's hidden state, the IoU between the token's box and its target (``losses.confidence_loss``); the
sigmoid of it at the last token is a refer result's score. The model holds it as ``confidence_head``.
"""

from __future__ import annotations

from torch import Tensor, nn


class ConfidenceHead(nn.Module):
    """Per-token logit of the IoU between the token's predicted box and its target box."""

    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.LayerNorm(in_dim, eps=1e-6), nn.Linear(in_dim, hidden), nn.GELU(),
                                 nn.Linear(hidden, 1))
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, hidden: Tensor) -> Tensor:
        """hidden [...,H] -> logits [...]."""
        return self.mlp(hidden).squeeze(-1)
