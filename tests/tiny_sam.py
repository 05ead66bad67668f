"""A tiny random SAM checkpoint for the segmentation tests: nothing is downloaded."""

from __future__ import annotations

import torch


def save_tiny_sam(path, seed: int = 0, *, preprocessor: bool = False):
    """A tiny random SAM (64 px input, one vision layer) saved as safetensors in ``path``."""
    from transformers import SamConfig, SamModel

    torch.manual_seed(seed)
    config = SamConfig(
        vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=64,
                           patch_size=16, output_channels=32, window_size=2, global_attn_indexes=[0],
                           num_pos_feats=16, mlp_dim=64, initializer_range=0.02),
        prompt_encoder_config=dict(hidden_size=32, image_size=64, patch_size=16, mask_input_channels=8),
        mask_decoder_config=dict(hidden_size=32, mlp_dim=64, num_hidden_layers=1, num_attention_heads=2,
                                 iou_head_hidden_dim=32))
    SamModel(config).save_pretrained(path)
    if preprocessor:
        from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

        SamImageProcessorPil(size={"longest_edge": 64}, pad_size={"height": 64, "width": 64}).save_pretrained(path)
    return path
