"""The stride-1 mask refiner (``heads.mask_refine``): shapes, an exact no-op when grown into a trained model,
gradients, training targets at stride 1, and the config checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_mask_decoder import BOXES, INDEX, LABELS, POINTS, S, _scene, build, pixels, tiny_config

from pixelllm_plugins.checkpoint import grow_pretrained, load_pretrained, save_pretrained
from pixelllm_plugins.config import PixelLLMConfig
from pixelllm_plugins.data.collate import MASK_STRIDE, collate_for_model, mask_stride
from pixelllm_plugins.errors import PixelLLMError
from pixelllm_plugins.modeling import losses as L
from pixelllm_plugins.modeling.inputs import ImageEmbedding
from pixelllm_plugins.modeling.mask_refiner import MaskRefiner
from pixelllm_plugins.tokenizer import PixelTokenizer


def refined_config(channels: int = 4, fine: int = 0) -> PixelLLMConfig:
    cfg = tiny_config(3, points=True, fine=fine)
    cfg.heads.mask_refine = channels
    return cfg


def test_refined_masks_cover_every_canvas_pixel():
    model = build(refined_config()).eval()
    emb = model.embed_images(pixels())
    assert emb.maps is not None and emb.maps["pixels"].shape == (2, 3, S, S)
    with torch.no_grad():
        logits, iou = model.prompt_masks(emb, BOXES, INDEX)
        assert logits.shape == (3, 3, S, S) and iou.shape == (3, 3)
        with_points = model.prompt_masks(emb, BOXES, INDEX, points=POINTS, point_labels=LABELS)[0]
        assert with_points.shape == (3, 3, S, S)
        alone = model.prompt_masks(emb, BOXES[2:], INDEX[2:])[0]  # no leak between rows or images
    assert torch.allclose(alone, logits[2:], atol=1e-5)
    plain = build(tiny_config(3, points=True)).eval()
    assert plain.embed_images(pixels()).maps is None  # only a refining decoder keeps the pixels


def test_a_fresh_refiner_returns_the_upsampled_coarse_logits():
    """The residual starts at zero, so growing a trained model with a refiner changes no mask until trained."""
    refiner = MaskRefiner(4, 3)
    coarse = torch.randn(3, 3, S // 4, S // 4)
    out = refiner(coarse, pixels(), INDEX)
    expected = F.interpolate(coarse, size=(S, S), mode="bilinear", align_corners=False)
    assert torch.equal(out, expected)


def test_growing_a_checkpoint_with_a_refiner_keeps_its_answers(tmp_path):
    tok = PixelTokenizer.default()
    source = build(tiny_config(3, points=True), vocab=tok.vocab_size).eval()
    save_pretrained(source, tok, tmp_path / "src")
    grow_pretrained(tmp_path / "src", tmp_path / "grown", {"heads.mask_refine": 4})
    grown = load_pretrained(tmp_path / "grown", dtype=torch.float32)[0].eval()
    assert grown.config.heads.mask_refine == 4 and grown.mask_decoder.refiner is not None
    with torch.no_grad():
        before, iou_before = source.prompt_masks(source.embed_images(pixels()), BOXES, INDEX)
        after, iou_after = grown.prompt_masks(grown.embed_images(pixels()), BOXES, INDEX)
    assert torch.allclose(after, F.interpolate(before, size=(S, S), mode="bilinear", align_corners=False), atol=1e-5)
    assert torch.allclose(iou_before, iou_after, atol=1e-6)


def test_gradients_reach_the_refiner_and_through_it_the_decoder():
    model = build(refined_config()).train()
    target = torch.zeros(3, S, S, dtype=torch.bool)
    target[:, 9:30, 7:33] = True

    def step():
        model.zero_grad(set_to_none=True)
        logits, iou = model.prompt_masks(model.embed_images(pixels()), BOXES, INDEX)
        terms = L.mask_losses(logits, iou, target)
        (terms["mask_focal"] * 20 + terms["mask_dice"]).backward()

    def moved(p):
        return p.grad is not None and p.grad.abs().sum() > 0

    step()
    refiner = model.mask_decoder.refiner
    assert moved(refiner.residual.weight) and moved(refiner.residual.bias)
    assert moved(model.mask_decoder.mask_tokens)  # the coarse path learns through the residual sum
    with torch.no_grad():  # once the residual is not zero, the stem and body learn too
        refiner.residual.weight.normal_(0, 0.1)
    step()
    assert moved(refiner.stem[0].weight) and moved(refiner.body[1].weight) and moved(refiner.mask_in.weight)


def test_training_batches_carry_stride_1_targets_for_a_refiner():
    tok = PixelTokenizer.default()
    plain, refined = tiny_config(3), refined_config()
    assert (mask_stride(plain), mask_stride(refined)) == (MASK_STRIDE, 1)
    coarse = collate_for_model([_scene()], tok, plain)
    fine = collate_for_model([_scene()], tok, refined)
    assert coarse.target_masks.shape[-1] == S // MASK_STRIDE and fine.target_masks.shape[-1] == S
    # the same objects: the stride-4 target is the stride-1 one pooled (a cell is in when half its pixels are)
    pooled = F.avg_pool2d(fine.target_masks.float(), MASK_STRIDE) >= 0.5
    assert torch.equal(pooled, coarse.target_masks)


def test_a_refiner_learns_to_sharpen_coarse_masks_on_the_pixels():
    """Honest learning check of what the refiner is for: given one scene's masks at stride 4 (area-pooled,
    as the decoder sees them) and the scene's pixels, it learns edges the coarse masks cannot draw: its
    full-resolution error (1 - IoU with the objects) falls well below the upsampled coarse masks' (0.029 ->
    0.015 here)."""
    tok = PixelTokenizer.default()
    inputs = collate_for_model([_scene()], tok, refined_config())
    target = inputs.target_masks[0].float()[:, None]  # [3,1,S,S]
    pooled = F.avg_pool2d(target, MASK_STRIDE).clamp(0.02, 0.98)
    coarse = torch.log(pooled / (1 - pooled))  # the best stride-4 logits: each cell's share of the object
    index = torch.zeros(3, dtype=torch.long)
    torch.manual_seed(0)
    refiner = MaskRefiner(8, 1)
    iou_before = L.mask_iou_values(refiner(coarse, inputs.pixel_values, index), target).mean()
    opt = torch.optim.Adam(refiner.parameters(), lr=1e-2)
    for _ in range(150):
        logits = refiner(coarse, inputs.pixel_values, index)
        loss = 20 * L.sigmoid_focal_loss(logits, target).mean() + L.dice_loss(logits, target).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        iou_after = L.mask_iou_values(refiner(coarse, inputs.pixel_values, index), target).mean()
    assert iou_before < 0.98 and 1 - iou_after < 0.7 * (1 - iou_before), (float(iou_before), float(iou_after))


def test_an_embedding_without_the_pixels_is_refused():
    model = build(refined_config()).eval()
    emb = model.embed_images(pixels())
    with pytest.raises(PixelLLMError, match="canvas pixels"):
        model.prompt_masks(ImageEmbedding(emb.tokens), BOXES, INDEX)


def test_embeddings_with_different_maps_stack_on_the_shared_ones():
    tokens = torch.zeros(4, 2)
    a = ImageEmbedding(tokens, {"pixels": torch.zeros(3, 2, 2), "heatmap": torch.zeros(1, 2, 2)})
    b = ImageEmbedding(tokens, {"pixels": torch.ones(3, 2, 2)})
    both = ImageEmbedding.stack([a, b])
    assert set(both.maps) == {"pixels"} and both.maps["pixels"].shape == (2, 3, 2, 2)
    assert ImageEmbedding.stack([a, ImageEmbedding(tokens, {"heatmap": torch.zeros(1, 2, 2)})]).maps.keys() == {
        "heatmap"}
    assert ImageEmbedding.stack([ImageEmbedding(tokens, {"x": tokens}), ImageEmbedding(tokens, {"y": tokens})]).maps is None


def test_validate_mask_refine():
    cfg = tiny_config(0)
    cfg.heads.mask_refine = 4
    with pytest.raises(PixelLLMError, match="mask_refine"):
        cfg.validate()
    cfg = refined_config(-1)
    with pytest.raises(PixelLLMError, match="mask_refine"):
        cfg.validate()
    with pytest.raises(ValueError):
        MaskRefiner(0, 3)
    data = refined_config().to_dict()  # a config written before the option loads with it off
    del data["heads"]["mask_refine"]
    assert PixelLLMConfig.from_dict(data).heads.mask_refine == 0
    assert PixelLLMConfig.from_dict(refined_config().to_dict()) == refined_config()


def test_windowed_refinement_is_exact_where_the_coarse_mask_is_unsure():
    """Inference refines each prompt in a window around its unsure pixels: there the logits equal the
    full canvas's, and elsewhere they are the upsampled coarse logits."""
    from pixelllm_plugins.modeling import mask_refiner

    torch.manual_seed(0)
    refiner = MaskRefiner(4, 3)
    with torch.no_grad():
        refiner.residual.weight.normal_(0, 0.5)
    yy, xx = torch.meshgrid(torch.arange(S // 4), torch.arange(S // 4), indexing="ij")
    blob = 8.0 - ((yy - 5.0) ** 2 + (xx - 9.0) ** 2).float()  # an object near the top, the rest sure background
    coarse = torch.stack([blob, blob - 2, torch.full_like(blob, -20.0)])[None].repeat(3, 1, 1, 1)
    coarse[1] = coarse[1].flip(-1)  # another place
    coarse[2] = -20.0  # nothing at all: no window
    image = pixels()
    with torch.no_grad():
        full = refiner(coarse, image, INDEX, windowed=False)
        windowed = refiner(coarse, image, INDEX)  # no gradient: windowed by default
    up = F.interpolate(coarse, size=(S, S), mode="bilinear", align_corners=False)
    unsure = up.amax(1, keepdim=True).expand_as(up) > -mask_refiner.SURE_BACKGROUND
    assert unsure[:2].any() and not unsure[2].any() and not unsure[0].all()
    assert torch.allclose(windowed[unsure], full[unsure], atol=1e-5)
    assert torch.equal(windowed[2], up[2])
    far = torch.zeros_like(unsure)
    far[0, :, -8:, :] = True  # the bottom rows, far from the object: outside its window
    assert torch.equal(windowed[far], up[far]) and not torch.equal(full[far], up[far])
