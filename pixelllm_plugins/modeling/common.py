"""Layers more than one part of the model uses."""

from __future__ import annotations

from torch import nn


def zero_linear(in_dim: int, out_dim: int) -> nn.Linear:
    """A linear layer that outputs zero until trained: an addition that starts as a no-op, so it can be grown
    onto a trained checkpoint without changing a single answer."""
    layer = nn.Linear(in_dim, out_dim)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer
