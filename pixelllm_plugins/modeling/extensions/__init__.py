"""The model's parts beyond the paper (PixelLLM, Xu et al. CVPR 2024), one concept per file.

Each is a config option, off in the ``base`` and ``hf:*`` presets (the paper's design) and on in
``synth-small`` (a small model trained from scratch needs help the paper's pretrained models did not);
``heads.confidence`` is on in every preset. ``PixelLLM`` reaches them through named hooks, each None when
its option is off, under the names checkpoints have always used:

- ``conv_stem.py``: ``vision.conv_stem`` -> ``vision.stem``
- ``detail_tokens.py``: ``vision.detail_channels`` -> ``vision.detail``
- ``fine_map.py``: ``vision.fine_channels`` -> ``vision.fine``
- ``map_tokens.py``: ``prompt.map_tokens``, ``prompt.fine_grid`` -> ``map_tokens`` (its layers:
  ``map_token_proj``, ``map_token_pe``, ``fine_token_proj``)
- ``box_extent.py``: ``prompt.box_extent`` -> ``box_extent``
- ``grid_pointing.py``: ``heads.point_mode = "grid"`` with ``relation_layers``, ``point_context_layers``,
  ``point_refine``, ``point_coords`` -> ``point_head``
- ``box_words.py``: ``heads.box_words`` -> ``word_head``
- ``confidence.py``: ``heads.confidence`` -> ``confidence_head``

``prompt.roi_grid`` (RoI samples among the prompt adapter's tokens) lives inside ``prompt_adapter.py``.
"""

from .box_extent import BoxExtentEncoder
from .box_words import BOX_WORD_TASKS, BoxWordHead
from .confidence import ConfidenceHead
from .conv_stem import ConvStem
from .detail_tokens import DetailBranch
from .fine_map import FineBranch
from .grid_pointing import CandidateRelations, GridPointHead, PointContext
from .map_tokens import MapTokens

__all__ = ["BOX_WORD_TASKS", "BoxExtentEncoder", "BoxWordHead", "CandidateRelations", "ConfidenceHead",
           "ConvStem", "DetailBranch", "FineBranch", "GridPointHead", "MapTokens", "PointContext"]
