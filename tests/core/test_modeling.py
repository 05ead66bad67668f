"""The built-in PixelLLM modules: shapes, gradients, masks, KV-cache decoding, heads and losses."""

from __future__ import annotations

import pytest
import torch

from pixelllm_plugins.config import (
    HeadsConfig,
    LanguageConfig,
    LossConfig,
    PromptConfig,
    VisionConfig,
    get_preset,
)
from pixelllm_plugins.errors import CheckpointError, PixelLLMError
from pixelllm_plugins.modeling import losses as L
from pixelllm_plugins.modeling.build import build_vision_encoder
from pixelllm_plugins.modeling.extensions.confidence import ConfidenceHead
from pixelllm_plugins.modeling.extensions.grid_pointing import GridPointHead
from pixelllm_plugins.modeling.heads import PointHead, ProposalHead
from pixelllm_plugins.modeling.inputs import ImageEmbedding, ModelInputs
from pixelllm_plugins.modeling.language_git import GitDecoder
from pixelllm_plugins.modeling.pixel_llm import PixelLLM
from pixelllm_plugins.modeling.prompt_adapter import PromptAdapter
from pixelllm_plugins.modeling.prompt_encoder import PromptEncoder

V = 40  # vocabulary size for the hand-built batches


def grid_tokens(model, embedding, prompt_boxes, sizes=None):
    """``prompt_tokens`` over prompt boxes laid out [B,N,4] -> visual tokens [B,N,Q,D]."""
    b, n = prompt_boxes.shape[:2]
    index = torch.arange(b).repeat_interleave(n)
    flat = model.prompt_tokens(embedding, prompt_boxes.reshape(b * n, 4), index, sizes)
    return flat.view(b, n, *flat.shape[1:])


def make_inputs(config, b=2, n=2, *, targets=True, seed=0) -> ModelInputs:
    g = torch.Generator().manual_seed(seed)
    s = config.vision.image_size
    tc, t = 6, 7
    sizes = torch.tensor([[s, 0.75 * s], [0.5 * s, s]])[torch.arange(b) % 2]
    boxes = torch.zeros(b, n, 4)
    boxes[:, :, 2:] = sizes[:, None]  # global box first
    boxes[:, 1:] = torch.tensor([0.1, 0.2, 0.5, 0.6]) * s
    context_mask = torch.ones(b, n, tc, dtype=torch.bool)
    context_mask[:, -1, 4:] = False
    text_mask = torch.ones(b, n, t, dtype=torch.bool)
    text_mask[:, 0, 5:] = False
    inputs = ModelInputs(
        pixel_values=torch.randn(b, 3, s, s, generator=g), image_sizes=sizes, prompt_boxes=boxes,
        prompt_mask=torch.ones(b, n, dtype=torch.bool),
        context_ids=torch.randint(4, V, (b, n, tc), generator=g) * context_mask, context_mask=context_mask,
        text_ids=torch.randint(4, V, (b, n, t), generator=g) * text_mask, text_mask=text_mask)
    if targets:
        pts = torch.rand(b, n, t, 2, 2, generator=g).sort(dim=-2).values
        inputs.target_points = pts.transpose(-1, -2).reshape(b, n, t, 4)  # x0<x1, y0<y1
        inputs.point_mask = text_mask.clone()
        inputs.text_loss_mask = torch.ones(b, n, dtype=torch.bool)
        inputs.gt_boxes = torch.tensor([[0.1, 0.1, 0.4, 0.5], [0.5, 0.4, 0.9, 0.9], [0, 0, 0, 0]]).repeat(b, 1, 1)
        inputs.gt_boxes_mask = torch.tensor([True, True, False]).repeat(b, 1)
    return inputs


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return PixelLLM(get_preset("tiny"), V)


# ---- vision ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("conv_stem", [True, False])
def test_vit_shapes_and_grad(conv_stem):
    cfg = VisionConfig(image_size=64, patch_size=16, hidden_size=32, num_layers=2, num_heads=2,
                       conv_stem=conv_stem, drop_path=0.1)
    vit = build_vision_encoder(cfg)
    assert vit.grid_size == (4, 4) and vit.out_dim == 32
    out = vit(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 16, 32)
    out.square().mean().backward()
    assert all(p.grad is not None for p in vit.parameters())


def test_detail_channels_travel_in_the_tokens_and_unpack_in_the_proposal_features():
    cfg = VisionConfig(image_size=64, patch_size=16, hidden_size=32, num_layers=1, num_heads=2, conv_stem=True,
                       detail_channels=4)
    vit = build_vision_encoder(cfg)
    x = torch.randn(2, 3, 64, 64)
    tokens = vit(x)
    assert vit.detail_dim == 16 and vit.out_dim == 48 and tokens.shape == (2, 16, 48)
    head = ProposalHead(vit.out_dim, 8, vit.grid_size, detail_dim=vit.detail_dim)
    features = head(tokens)["features"]
    assert features.shape == (2, head.feature_dim, 8, 8) and head.feature_dim == 8 + 32 + 4
    # the last channels are the detail branch's own stride-8 map, cell for cell (no interpolation)
    detail_map = vit.detail.body(vit.stem(x))
    torch.testing.assert_close(features[:, -4:], detail_map, atol=1e-5, rtol=0)
    tokens.square().mean().backward()
    assert all(p.grad is not None for p in vit.detail.parameters())
    with pytest.raises(CheckpointError, match="detail_channels needs vision.conv_stem"):
        build_vision_encoder(VisionConfig(image_size=64, patch_size=16, hidden_size=32, num_layers=1,
                                          num_heads=2, detail_channels=4))


def _fine_config(fine_grid: int = 2):
    cfg = get_preset("tiny")
    cfg.vision.patch_size, cfg.vision.detail_channels, cfg.vision.fine_channels = 16, 4, 4
    cfg.heads.point_mode, cfg.prompt.map_tokens, cfg.prompt.fine_grid = "grid", 2, fine_grid
    return cfg


def test_fine_map_reaches_only_the_map_tokens_and_starts_as_a_no_op():
    torch.manual_seed(0)
    model = PixelLLM(_fine_config(), V).eval()
    plain_cfg = _fine_config(0)
    plain_cfg.vision.fine_channels = 0
    plain = PixelLLM(plain_cfg, V).eval()
    missing = plain.load_state_dict(model.state_dict(), strict=False)
    assert not missing.missing_keys  # the fine branch and its projection are the only additions
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        embedding = model.embed_images(x)
        assert embedding.maps["fine"].shape == (2, 4, 16, 16)  # the stem's stride-4 map of a 64 px canvas
        plain_embedding = plain.embed_images(x)
        torch.testing.assert_close(embedding.tokens, plain_embedding.tokens)  # the image tokens are untouched
        boxes, index = torch.tensor([[4.0, 8.0, 20.0, 24.0], [30.0, 2.0, 60.0, 40.0]]), torch.tensor([0, 1])
        before = model.prompt_tokens(embedding, boxes, index)
        torch.testing.assert_close(before, plain.prompt_tokens(plain_embedding, boxes, index))
        torch.nn.init.normal_(model.fine_token_proj.weight, std=0.5)
        after = model.prompt_tokens(embedding, boxes, index)
    m = model.config.prompt.map_tokens ** 2
    assert not torch.allclose(after[:, -m:], before[:, -m:])  # the map tokens now carry the fine samples
    torch.testing.assert_close(after[:, :-m], before[:, :-m])  # and nothing else changed
    with pytest.raises(PixelLLMError, match="fine map"):
        no_fine = {k: v for k, v in embedding.maps.items() if k != "fine"}
        model.prompt_tokens(ImageEmbedding(embedding.tokens, no_fine), boxes, index)
    out = model.train()(make_inputs(model.config))  # trains end to end through the fine branch
    out.loss.backward()
    assert model.vision.fine.body[0].weight.grad.abs().sum() > 0


def test_box_extent_starts_as_a_no_op_and_tells_the_images_size():
    torch.manual_seed(0)
    cfg = get_preset("tiny")
    cfg.prompt.box_extent = True
    model = PixelLLM(cfg, V).eval()
    plain = PixelLLM(get_preset("tiny"), V).eval()
    loaded = plain.load_state_dict(model.state_dict(), strict=False)
    assert loaded.unexpected_keys and all(k.startswith("box_extent.") for k in loaded.unexpected_keys)
    s = cfg.vision.image_size
    # one image's tokens twice, the same canvas box in each, but a wide and a tall image around it
    tokens = model.embed_images(torch.randn(1, 3, s, s)).tokens.expand(2, -1, -1)
    embedding = ImageEmbedding(tokens)
    boxes = torch.tensor([[[4.0, 4.0, 20.0, 20.0]]]).expand(2, -1, -1)
    sizes = torch.tensor([[s, s / 2], [s / 2, s]])
    with torch.no_grad():
        before = grid_tokens(model, embedding, boxes, sizes)
        torch.testing.assert_close(before, grid_tokens(plain, embedding, boxes))
        torch.testing.assert_close(before[0], before[1])
        torch.nn.init.normal_(model.box_extent.mlp[-1].weight, std=0.5)
        after = grid_tokens(model, embedding, boxes, sizes)
    assert not torch.allclose(after[0], after[1])  # the same box, told apart by its image's shape
    features = model.box_extent.features(torch.tensor([[8.0, 0.0, 24.0, 8.0]]), torch.tensor([[32.0, 16.0]]))
    torch.testing.assert_close(features, torch.tensor([[0.25, 0.0, 0.75, 0.5, 1.0, 0.5, 32 / s, 16 / s]]))
    with pytest.raises(PixelLLMError, match="image_sizes"):
        grid_tokens(model, embedding, boxes)
    out = model.train()(make_inputs(cfg))  # forward passes the inputs' image sizes; trains end to end
    out.loss.backward()
    assert model.box_extent.mlp[-1].weight.grad.abs().sum() > 0


def test_fine_map_needs_its_parts():
    cfg = _fine_config()
    cfg.prompt.map_tokens = 0
    with pytest.raises(PixelLLMError, match="map_tokens > 0"):
        PixelLLM(cfg, V)
    cfg = _fine_config()
    cfg.vision.fine_channels = 0
    with pytest.raises(PixelLLMError, match="fine_channels > 0"):
        PixelLLM(cfg, V)
    with pytest.raises(CheckpointError, match="fine_channels needs vision.conv_stem"):
        build_vision_encoder(VisionConfig(image_size=64, patch_size=8, hidden_size=32, num_layers=1,
                                          num_heads=2, fine_channels=4))


def test_unknown_vision_kind():
    with pytest.raises(CheckpointError, match="vit"):
        build_vision_encoder(VisionConfig(kind="nope"))


# ---- prompt encoder / adapter -------------------------------------------------------------------------

def test_prompt_encoder_frames_match_dense_pe():
    enc = PromptEncoder(16, canvas_size=64)
    g = 8
    dense = enc.dense_pe((g, g))
    assert dense.shape == (64, 16)
    # a corner at the centre of cell (row 2, col 5) encodes exactly like that grid cell
    cx, cy = (5 + 0.5) * 64 / g - 0.5, (2 + 0.5) * 64 / g - 0.5
    tokens = enc.embed_boxes(torch.tensor([[cx, cy, 63.0, 63.0]]))
    assert tokens.shape == (1, 5, 16)
    torch.testing.assert_close(tokens[0, 0] - enc.corner_embed[0], dense[2 * g + 5])
    assert torch.equal(tokens[0, 2], enc.no_mask_embed[0])
    assert not any(p.requires_grad for p in enc.pe.parameters())


def test_prompt_adapter_per_prompt_tokens():
    cfg = PromptConfig(embed_dim=16, hidden_size=32, depth=2, num_heads=2, mlp_dim=32, attention_downsample=2,
                       num_queries=3, output_dim=24)
    adapter, enc = PromptAdapter(cfg, vision_dim=20), PromptEncoder(16, 64)
    image = torch.randn(2, 16, 20)
    boxes = torch.tensor([[0, 0, 64, 64], [10, 10, 30, 30], [10, 10, 30, 30]], dtype=torch.float)
    out = adapter(image, enc.dense_pe((4, 4)), enc.dense_embedding(), enc.embed_boxes(boxes),
                  torch.tensor([0, 0, 1]))
    assert out.shape == (3, 3, 24)
    assert not torch.allclose(out[0], out[1])  # the box matters
    assert not torch.allclose(out[1], out[2])  # the image matters
    out.sum().backward()
    assert all(p.grad is not None for p in adapter.parameters())


# ---- GIT decoder ---------------------------------------------------------------------------------------

def _git(dropout=0.0):
    torch.manual_seed(0)
    cfg = LanguageConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, max_positions=32,
                         dropout=dropout)
    return GitDecoder(cfg, visual_dim=24, vocab_size=V).eval()


def _lm_batch(m=3, q=4, tc=5, t=6):
    g = torch.Generator().manual_seed(1)
    ctx_mask = torch.ones(m, tc, dtype=torch.bool)
    ctx_mask[1, 3:] = False
    return (torch.randn(m, q, 24, generator=g), torch.randint(4, V, (m, tc), generator=g), ctx_mask,
            torch.randint(4, V, (m, t), generator=g))


def test_git_decode_step_matches_forward():
    lm = _git()
    visual, ctx, ctx_mask, text = _lm_batch()
    with torch.no_grad():
        logits, hidden = lm(visual, ctx, ctx_mask, text, torch.ones_like(text, dtype=torch.bool))
        state = lm.start_decoding(visual, ctx, ctx_mask)
        for i in range(text.shape[1]):
            step_logits, step_hidden, state = lm.decode_step(state, text[:, i])
            torch.testing.assert_close(step_logits, logits[:, i], atol=1e-4, rtol=0)
            torch.testing.assert_close(step_hidden, hidden[:, i], atol=1e-4, rtol=0)


def test_git_masks():
    lm = _git()
    visual, ctx, ctx_mask, text = _lm_batch()
    ones = torch.ones_like(text, dtype=torch.bool)
    with torch.no_grad():
        _, hidden = lm(visual, ctx, ctx_mask, text, ones)
        later = text.clone()
        later[:, 3:] = 5  # causal: positions < 3 cannot see tokens >= 3
        _, h2 = lm(visual, ctx, ctx_mask, later, ones)
        torch.testing.assert_close(h2[:, :3], hidden[:, :3])
        assert not torch.allclose(h2[:, 3:], hidden[:, 3:])
        padded = ctx.clone()
        padded[1, 3:] = 7  # padded context tokens are invisible
        _, h3 = lm(visual, padded, ctx_mask, text, ones)
        torch.testing.assert_close(h3, hidden)
        other_ctx = ctx.clone()
        other_ctx[0, 0] = 9  # a real context token is visible
        _, h4 = lm(visual, other_ctx, ctx_mask, text, ones)
        assert not torch.allclose(h4[0], hidden[0])


def test_git_reorder_state():
    lm = _git()
    visual, ctx, ctx_mask, text = _lm_batch()
    with torch.no_grad():
        state = lm.start_decoding(visual, ctx, ctx_mask)
        _, _, state = lm.decode_step(state, text[:, 0])
        index = torch.tensor([2, 2, 0])
        a, _, _ = lm.decode_step(lm.reorder_state(state, index), text[index, 1])
        b, _, _ = lm.decode_step(state, text[:, 1])
        torch.testing.assert_close(a, b[index])


def test_git_too_long_raises():
    lm = _git()
    visual, ctx, ctx_mask, _ = _lm_batch()
    text = torch.randint(4, V, (3, 40))
    with pytest.raises(PixelLLMError, match="max_positions"):
        lm(visual, ctx, ctx_mask, text, torch.ones_like(text, dtype=torch.bool))


# ---- heads -----------------------------------------------------------------------------------------------

def test_point_head_starts_near_centre():
    head = PointHead(32, 16, 3, num_points=2)
    pts = head(torch.randn(5, 7, 32))
    assert pts.shape == (5, 7, 4)
    assert (pts - 0.5).abs().max() < 0.1
    assert ConfidenceHead(32, 16)(torch.randn(5, 7, 32)).shape == (5, 7)


def _perfect_maps(head_map_size, gt, mask, sizes, canvas):
    t = ProposalHead.encode_targets(gt, mask, sizes, canvas, head_map_size)
    b = gt.shape[0]
    h, w = head_map_size
    heat = torch.full((b, 1, h, w), -20.0)
    heat.view(b, -1).scatter_(1, t["index"], torch.where(t["valid"], 20.0, -20.0))
    size, offset = torch.zeros(b, 2, h * w), torch.zeros(b, 2, h * w)
    for i in range(b):
        for j in range(gt.shape[1]):
            if t["valid"][i, j]:
                size[i, :, t["index"][i, j]] = t["size"][i, j]
                offset[i, :, t["index"][i, j]] = t["offset"][i, j]
    return {"heatmap": heat, "size": size.view(b, 2, h, w), "offset": offset.view(b, 2, h, w)}, t


def test_proposal_planted_peak_decodes_to_box():
    canvas = 64
    head = ProposalHead(16, 8, (4, 4))
    assert head(torch.randn(2, 16, 16))["heatmap"].shape == (2, 1, 8, 8)
    sizes = torch.tensor([[64.0, 48.0], [32.0, 64.0]])
    gt = torch.tensor([[[0.1, 0.2, 0.5, 0.7], [0.6, 0.1, 0.9, 0.4]], [[0.2, 0.2, 0.8, 0.5], [0, 0, 0, 0]]])
    mask = torch.tensor([[True, True], [True, False]])
    maps, _ = _perfect_maps((8, 8), gt, mask, sizes, canvas)
    boxes, scores = head.decode(maps, sizes, canvas, k=5, min_score=0.5)
    assert boxes.shape == (2, 5, 4) and scores.shape == (2, 5)
    assert (scores[0, :2] > 0.99).all() and (scores[0, 2:] == 0).all()
    assert (scores[1, :1] > 0.99).all() and (scores[1, 1:] == 0).all()
    got = sorted(boxes[0, :2].tolist())
    torch.testing.assert_close(torch.tensor(got), gt[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(boxes[1, 0], gt[1, 0], atol=1e-5, rtol=0)
    assert (boxes[0, 2:] == 0).all()
    # more slots than map cells: padded
    boxes, scores = head.decode(maps, sizes, canvas, k=100)
    assert boxes.shape == (2, 100, 4) and (scores[:, 64:] == 0).all()
    # the perfect maps also give (near) zero size/offset loss and a low heatmap loss
    det = L.detection_loss(maps, gt, mask, sizes, canvas)
    assert det["det_size"] < 1e-6 and det["det_offset"] < 1e-6
    random = L.detection_loss(head(torch.randn(2, 16, 16)), gt, mask, sizes, canvas)
    assert det["det_heatmap"] < random["det_heatmap"]


def grid_head(canvas, max_positions=128, **options):
    """A grid point head on 16-d hidden states and an 8x8 map of 8-d features (query width 12)."""
    return GridPointHead(HeadsConfig(point_hidden=12, point_mode="grid", **options), 16, 8, (8, 8), canvas,
                         max_positions)


def test_grid_point_head_picks_the_proposed_box_of_the_detected_object():
    canvas = 64
    sizes = torch.tensor([[64.0, 48.0], [32.0, 64.0]])
    gt = torch.tensor([[[0.1, 0.2, 0.5, 0.7], [0.6, 0.1, 0.9, 0.4]], [[0.2, 0.2, 0.8, 0.5], [0, 0, 0, 0]]])
    mask = torch.tensor([[True, True], [True, False]])
    maps, t = _perfect_maps((8, 8), gt, mask, sizes, canvas)
    maps["features"] = torch.zeros(2, 8, 8, 8)
    head = grid_head(canvas)
    # image 1 has one detected object: whatever the query, the detection prior picks its box
    points = head(torch.randn(3, 5, 16), maps, torch.tensor([1, 1, 0]), sizes)
    assert points.shape == (3, 5, 4)
    torch.testing.assert_close(points[:2], gt[1, 0].expand(2, 5, 4), atol=1e-4, rtol=0)
    # image 0 has two: the query decides. Mark object 1's cell in the features; a query on that feature
    # direction picks object 1's box, a query against it picks object 0's box
    maps["features"].view(2, 8, 64)[0, 0, t["index"][0, 1]] = 1.0
    with torch.no_grad():
        head.key_position.zero_()
        head.key[0].weight.fill_(1.0)
    for sign, want in ((1.0, gt[0, 1]), (-1.0, gt[0, 0])):
        keys = head.key(maps["features"].flatten(2).transpose(1, 2))[0]
        key_dir = keys[t["index"][0, 1]] - keys[t["index"][0, 0]]
        with torch.no_grad():  # steer the query's last layer so that q . (k1 - k0) is large with the sign
            last = head.query[-1]
            last.weight.zero_()
            last.bias.copy_(sign * 50 * key_dir / key_dir.norm() ** 2)
        points = head(torch.randn(1, 1, 16), maps, torch.tensor([0]), sizes)
        torch.testing.assert_close(points[0, 0], want, atol=1e-3, rtol=0)
    # a weak preference: training blends the candidates' boxes, inference returns the preferred box itself
    with torch.no_grad():
        head.query[-1].bias.mul_(0.002)
    blended = head.train()(torch.randn(1, 1, 16), maps, torch.tensor([0]), sizes)[0, 0]
    picked = head.eval()(torch.randn(1, 1, 16), maps, torch.tensor([0]), sizes)[0, 0]
    assert (blended - gt[0, 0]).abs().max() > 0.01
    torch.testing.assert_close(picked, gt[0, 0], atol=1e-4, rtol=0)


def _two_image_scene():
    """(canvas, image sizes, proposal maps) of two images with 2 and 1 objects and random features."""
    canvas = 64
    sizes = torch.tensor([[64.0, 48.0], [32.0, 64.0]])
    gt = torch.tensor([[[0.1, 0.2, 0.5, 0.7], [0.6, 0.1, 0.9, 0.4]], [[0.2, 0.2, 0.8, 0.5], [0, 0, 0, 0]]])
    maps, _ = _perfect_maps((8, 8), gt, torch.tensor([[True, True], [True, False]]), sizes, canvas)
    maps["features"] = torch.randn(2, 8, 8, 8)
    torch.manual_seed(0)
    return canvas, sizes, maps


def test_relation_layers_start_as_the_plain_grid_head_and_ignore_padding():
    canvas, sizes, maps = _two_image_scene()
    plain = grid_head(canvas).eval()
    related = grid_head(canvas, relation_layers=1).eval()
    related.relation_candidates = 3  # fewer than the scene's candidate cells
    related.load_state_dict(plain.state_dict(), strict=False)
    hidden, index = torch.randn(3, 5, 16), torch.tensor([0, 1, 0])
    _, want, _ = plain(hidden, maps, index, sizes, with_choices=True)
    _, got, _ = related(hidden, maps, index, sizes, with_choices=True)
    torch.testing.assert_close(got, want)  # zero-initialised output: the same scores at the start
    torch.nn.init.normal_(related.relations.out[-1].weight, std=1.0)
    _, moved, _ = related(hidden, maps, index, sizes, with_choices=True)
    changed = (moved != want) & torch.isfinite(want)
    assert changed.any() and torch.equal(torch.isfinite(moved), torch.isfinite(want))
    # padding tokens marked in text_mask do not change the real tokens' scores
    padded = torch.cat([hidden, torch.randn(3, 2, 16)], 1)
    mask = torch.tensor([True] * 5 + [False] * 2).expand(3, -1)
    _, again, _ = related(padded, maps, index, sizes, text_mask=mask, with_choices=True)
    torch.testing.assert_close(again[:, :5], moved, atol=1e-5, rtol=0)


def test_point_context_lets_a_word_point_where_later_words_say_and_starts_as_the_causal_head():
    canvas, sizes, maps = _two_image_scene()
    plain = grid_head(canvas).train()
    grown = grid_head(canvas, max_positions=10, point_context_layers=1, point_refine=True).train()
    missing = grown.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing and all(k.startswith(("context.", "refine.")) for k in missing)
    hidden, index = torch.randn(3, 5, 16), torch.tensor([0, 1, 0])
    want, want_logits, _ = plain(hidden, maps, index, sizes, with_choices=True)
    got, got_logits, _ = grown(hidden, maps, index, sizes, with_choices=True)
    torch.testing.assert_close(got_logits, want_logits)  # zero-initialised additions: the causal head
    torch.testing.assert_close(got, want)
    # with weights, an early token's choice depends on a later token (the causal head's cannot)
    torch.nn.init.normal_(grown.context.out[-1].weight, std=1.0)
    later = hidden.clone()
    later[:, 4] = torch.randn(3, 16)
    _, plain_later, _ = plain(later, maps, index, sizes, with_choices=True)
    _, base, _ = grown(hidden, maps, index, sizes, with_choices=True)
    _, moved, _ = grown(later, maps, index, sizes, with_choices=True)
    finite = torch.isfinite(base[:, 0])
    torch.testing.assert_close(plain_later[:, 0], want_logits[:, 0])
    assert not torch.allclose(moved[:, 0][finite], base[:, 0][finite])
    # padding marked in text_mask changes nothing for the real tokens
    padded = torch.cat([hidden, torch.randn(3, 2, 16)], 1)
    mask = torch.tensor([True] * 5 + [False] * 2).expand(3, -1)
    _, again, _ = grown(padded, maps, index, sizes, text_mask=mask, with_choices=True)
    _, unpadded, _ = grown(hidden, maps, index, sizes, text_mask=mask[:, :5], with_choices=True)
    torch.testing.assert_close(again[:, :5], unpadded, atol=1e-5, rtol=0)
    # the refinement moves the picked box by a fraction of its size, never more than its size
    grown.eval()
    picked = grown(hidden, maps, index, sizes)
    torch.nn.init.normal_(grown.refine.weight, std=1.0)
    refined = grown(hidden, maps, index, sizes)
    size = (picked[..., 2:] - picked[..., :2]).repeat(1, 1, 2)
    assert not torch.allclose(refined, picked)
    assert ((refined - picked).abs() <= size + 1e-6).all()
    with pytest.raises(ValueError, match="exceed the point context"):
        grown(torch.randn(1, 11, 16), maps, torch.tensor([0]), sizes)


def test_point_coords_prefer_candidates_along_x_and_y():
    canvas = 64
    sizes = torch.tensor([[64.0, 64.0]])
    gt = torch.tensor([[[0.1, 0.6, 0.3, 0.9], [0.6, 0.1, 0.9, 0.4]]])  # bottom-left and top-right
    maps, _ = _perfect_maps((8, 8), gt, torch.tensor([[True, True]]), sizes, canvas)
    maps["features"] = torch.zeros(1, 8, 8, 8)  # content cannot tell them apart
    torch.manual_seed(0)
    plain = grid_head(canvas).eval()
    head = grid_head(canvas, point_coords=True).eval()
    head.load_state_dict(plain.state_dict(), strict=False)
    hidden, index = torch.randn(1, 1, 16), torch.tensor([0])
    torch.testing.assert_close(head(hidden, maps, index, sizes), plain(hidden, maps, index, sizes))
    picks = {}
    for name, bias in {"rightmost": (3.0, 0.0), "leftmost": (-3.0, 0.0), "topmost": (0.0, -3.0),
                       "bottom-most": (0.0, 3.0)}.items():
        with torch.no_grad():
            head.coords.bias.copy_(torch.tensor(bias))
        picks[name] = head(hidden, maps, index, sizes)[0, 0]
    torch.testing.assert_close(picks["rightmost"], gt[0, 1], atol=1e-4, rtol=0)
    torch.testing.assert_close(picks["topmost"], gt[0, 1], atol=1e-4, rtol=0)
    torch.testing.assert_close(picks["leftmost"], gt[0, 0], atol=1e-4, rtol=0)
    torch.testing.assert_close(picks["bottom-most"], gt[0, 0], atol=1e-4, rtol=0)


def test_config_checks_run_before_anything_is_built():
    for name in ("tiny", "synth-small", "base", "hf:vision+t5"):
        get_preset(name).validate()
    cfg = get_preset("synth-small")
    cfg.heads.proposals = False  # map tokens, box words and the grid head all read the proposal features
    with pytest.raises(PixelLLMError, match="map_tokens samples the proposal head"):
        cfg.validate()
    cfg.heads.proposals = True
    cfg.prompt.map_tokens = cfg.prompt.fine_grid = 0
    with pytest.raises(PixelLLMError, match="prompt.zoom adds the zoomed-in box to the map tokens"):
        cfg.validate()
    cfg.heads.proposals, cfg.prompt.zoom, cfg.prompt.zoom_words, cfg.heads.candidate_words = False, 0, 0.0, 0.0
    with pytest.raises(PixelLLMError, match="box_words reads the proposal head"):
        cfg.validate()
    cfg.vision.kind = "hf"  # the check fails before a Hugging Face tower would be fetched
    with pytest.raises(PixelLLMError, match="fine_channels needs the built-in ViT"):
        PixelLLM(cfg, V)


def test_extension_hooks_are_none_in_a_paper_model(tiny):
    assert tiny.map_tokens is None and tiny.box_extent is None and tiny.word_head is None and tiny.zoom is None
    assert type(tiny.point_head) is PointHead and tiny.map_token_proj is None and tiny.fine_token_proj is None
    assert not any(k.startswith(("map_token", "fine_token", "box_extent", "word_head")) for k in tiny.state_dict())


def test_point_context_belongs_to_the_grid_head():
    cfg = get_preset("tiny")
    cfg.heads.point_context_layers = 1
    with pytest.raises(PixelLLMError, match="point_mode 'grid'"):
        PixelLLM(cfg, V)


def test_grid_point_mode_model_needs_maps_and_proposals(tiny):
    cfg = get_preset("tiny")
    cfg.heads.point_mode = "grid"
    model = PixelLLM(cfg, V)
    inputs = make_inputs(cfg)
    out = model(inputs)
    assert out.points.shape == (2, 2, 7, 4) and torch.isfinite(out.loss)
    out.loss.backward()
    assert "pointer" in out.losses
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.eval()
    with torch.no_grad():  # no targets: maps are still computed for the points
        inputs = make_inputs(cfg, targets=False)
        assert model(inputs).points.shape == (2, 2, 7, 4)
    with pytest.raises(PixelLLMError, match="read the proposal maps"):
        one = make_inputs(cfg, b=1, n=1, targets=False)
        model.prompt_pass(ImageEmbedding(model.embed_images(one.pixel_values).tokens), one.prompt_boxes[0],
                          torch.tensor([0]), one.image_sizes, one.context_ids[0], one.context_mask[0],
                          one.text_ids[0], one.text_mask[0])
    cfg.heads.proposals = False
    with pytest.raises(PixelLLMError, match="needs heads.proposals"):
        PixelLLM(cfg, V)
    cfg.heads.point_mode = "nope"
    with pytest.raises(PixelLLMError, match="unknown heads.point_mode"):
        PixelLLM(cfg, V)


def test_map_tokens_join_the_visual_tokens_and_depend_on_the_box():
    cfg = get_preset("tiny")
    cfg.prompt.map_tokens = 2
    torch.manual_seed(0)
    model = PixelLLM(cfg, V).eval()
    inputs = make_inputs(cfg, targets=False)
    with torch.no_grad():
        embedding = model.embed_images(inputs.pixel_values)
        vis = grid_tokens(model, embedding, inputs.prompt_boxes)
        assert vis.shape == (2, 2, cfg.prompt.num_queries + 4, cfg.prompt.output_dim)
        moved = inputs.prompt_boxes.clone()
        moved[:, 1] = torch.tensor([0.5, 0.5, 0.9, 0.9]) * cfg.vision.image_size
        vis2 = grid_tokens(model, embedding, moved)
        assert not torch.allclose(vis[:, 1, -4:], vis2[:, 1, -4:]) and torch.allclose(vis[:, 0], vis2[:, 0])
        assert model(inputs).logits.shape[:3] == (2, 2, 7)
    cfg.heads.proposals = False
    with pytest.raises(PixelLLMError, match="map_tokens"):
        PixelLLM(cfg, V)


# ---- losses ------------------------------------------------------------------------------------------

def test_box_words_loss_spreads_over_the_words_between_bos_and_eos():
    ids = torch.tensor([[1, 5, 6, 5, 2, 0], [1, 2, 0, 0, 0, 0]])  # BOS w w w EOS PAD; BOS EOS (no words)
    mask = ids != 0
    logits = torch.zeros(2, 8)
    logits[0, 5] = logits[0, 6] = 10.0
    low = L.box_words_loss(logits, ids, mask)
    torch.testing.assert_close(low, torch.log(torch.tensor(2.0)), atol=1e-3, rtol=0)  # the best is ln(#words)
    high = L.box_words_loss(torch.zeros(2, 8), ids, mask)
    torch.testing.assert_close(high, torch.log(torch.tensor(8.0)))


def test_box_words_head_trains_on_region_batches_only():
    cfg = get_preset("tiny")
    cfg.heads.box_words = True
    torch.manual_seed(0)
    model = PixelLLM(cfg, V)
    inputs = make_inputs(cfg)
    inputs.task = "region"
    out = model(inputs)
    assert out.losses["box_words"] > 0
    out.loss.backward()
    assert model.word_head[1].weight.grad.abs().sum() > 0
    model.zero_grad()
    inputs.task = "trace"
    out = model(inputs)
    assert "box_words" not in out.losses
    out.loss.backward()  # the head still joins the graph (DDP), with a zero gradient
    assert model.word_head[1].weight.grad is not None and model.word_head[1].weight.grad.abs().sum() == 0


def test_the_zooms_word_head_shares_the_box_words_loss_and_trains_its_cnn_from_the_first_step():
    cfg = get_preset("tiny")
    cfg.heads.box_words, cfg.vision.patch_size, cfg.prompt.map_tokens, cfg.prompt.zoom = True, 16, 2, 16
    torch.manual_seed(0)
    model = PixelLLM(cfg, V)
    assert model.zoom.words is not None and not model.zoom.proj.weight.any()  # the addition starts at zero
    inputs = make_inputs(cfg)
    inputs.task = "region"
    out = model(inputs)
    assert out.losses["box_words"] > 0
    out.loss.backward()
    assert model.zoom.cnn[0].weight.grad.abs().sum() > 0  # through the word head, not the zero layer
    assert model.zoom.words[1].weight.grad.abs().sum() > 0
    model.zero_grad()
    inputs.task = "trace"
    model(inputs).loss.backward()  # no box words: the heads join the graph with a zero gradient
    assert model.zoom.words[1].weight.grad is not None and model.zoom.words[1].weight.grad.abs().sum() == 0


def test_pointer_loss_targets_the_best_matching_candidate():
    boxes = torch.tensor([[[0.0, 0.0, 0.2, 0.2], [0.5, 0.5, 0.9, 0.9], [0.1, 0.1, 0.3, 0.3]]])  # [1,3,4]
    target = torch.tensor([[[0.5, 0.5, 0.9, 0.8], [0.0, 0.0, 0.2, 0.2], [0.6, 0.0, 0.7, 0.1]]])  # [1,3,4]
    mask = torch.tensor([[True, True, True]])
    logits = torch.zeros(1, 3, 3, requires_grad=True)
    with torch.no_grad():
        logits[0, 1, 2] = float("-inf")  # cell 2 is not a candidate for token 1
    loss = L.pointer_loss(logits, boxes, target, mask)
    # token 0 -> cell 1; token 1 -> cell 0 (of two candidates); token 2 matches nothing (IoU < 0.3): skipped
    expected = (torch.log(torch.tensor(3.0)) + torch.log(torch.tensor(2.0))) / 2
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert logits.grad[0, 0, 1] < 0 and logits.grad[0, 1, 0] < 0 and (logits.grad[0, 2] == 0).all()
    assert L.pointer_loss(logits, boxes, target, torch.zeros(1, 3, dtype=torch.bool)) == 0


def test_text_loss_matches_smoothed_ce_and_ignores_bos_and_pad():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 6)
    ids = torch.tensor([[2, 4, 5, 3], [2, 3, 0, 0]])
    mask = ids != 0
    loss = L.text_loss(logits, ids, mask, smoothing=0.1)
    q = torch.full((6,), 0.1 / 5)
    manual = []
    for m, i in [(0, 0), (0, 1), (0, 2), (1, 0)]:  # positions predicting a real, non-BOS token
        target = q.clone()
        target[ids[m, i + 1]] = 0.9
        manual.append(-(target * logits[m, i].log_softmax(-1)).sum())
    torch.testing.assert_close(loss, torch.stack(manual).mean())
    changed = logits.clone()
    changed[:, -1] = 100.0  # the last position predicts nothing
    changed[1, 1:] = -5.0  # predicting pad: ignored
    torch.testing.assert_close(L.text_loss(changed, ids, mask, 0.1), loss)
    perfect = torch.full((2, 4, 6), -30.0)
    perfect[0, torch.arange(3), ids[0, 1:]] = 30.0
    perfect[1, 0, 3] = 30.0
    assert L.text_loss(perfect, ids, mask, 0.0) < 1e-6


def test_point_and_confidence_losses():
    target = torch.tensor([[0.1, 0.2, 0.5, 0.6], [0.3, 0.3, 0.9, 0.8]])
    mask = torch.tensor([True, True])
    assert L.point_loss(target.clone(), target, mask) == 0
    shifted = target + 0.1
    torch.testing.assert_close(L.point_loss(shifted, target, mask), torch.tensor(0.1))
    assert L.point_loss(shifted, target, torch.tensor([False, False])) == 0
    # confidence: IoU 1 for perfect points, so a large logit is (near) perfect and a low one is not
    assert L.confidence_loss(torch.tensor([20.0, 20.0]), target, target, mask) < 1e-6
    assert L.confidence_loss(torch.tensor([-5.0, -5.0]), target, target, mask) > 4
    far = torch.tensor([[0.0, 0.0, 0.05, 0.05], [0.0, 0.0, 0.05, 0.05]])  # IoU 0
    assert L.confidence_loss(torch.tensor([-20.0, -20.0]), far, target, mask) < 1e-6
    # corners given in either order give the same box
    swapped = target[:, [2, 3, 0, 1]]
    torch.testing.assert_close(L.box_iou(L.points_to_boxes(swapped), target), torch.ones(2))


# ---- full model ----------------------------------------------------------------------------------------

def test_tiny_forward_backward_every_parameter_gets_gradient(tiny):
    tiny.train()
    tiny.zero_grad()
    inputs = make_inputs(tiny.config)
    out = tiny(inputs)
    b, n, t = inputs.text_ids.shape
    assert out.logits.shape == (b, n, t, V)
    assert out.hidden.shape == (b, n, t, tiny.language.hidden_size)
    assert out.points.shape == (b, n, t, 4) and out.confidence.shape == (b, n, t)
    assert set(out.losses) == {"text", "points", "confidence", "det_heatmap", "det_size", "det_offset", "total"}
    assert torch.isfinite(out.loss)
    out.loss.backward()
    no_grad = [name for name, p in tiny.named_parameters()
               if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert no_grad == []


def test_tiny_without_targets_has_no_loss_and_masks_prompts(tiny):
    tiny.eval()
    inputs = make_inputs(tiny.config, targets=False)
    with torch.no_grad():
        full = tiny(inputs)
        assert full.loss is None and full.losses == {}
        inputs.prompt_mask[1, 0] = False
        part = tiny(inputs)
    assert (part.logits[1, 0] == 0).all() and (part.points[1, 0] == 0).all()
    keep = inputs.prompt_mask
    torch.testing.assert_close(part.logits[keep], full.logits[keep], atol=1e-5, rtol=0)
    torch.testing.assert_close(part.points[keep], full.points[keep], atol=1e-5, rtol=0)


def test_visual_tokens_and_cached_image_tokens(tiny):
    tiny.eval()
    inputs = make_inputs(tiny.config, targets=False)
    with torch.no_grad():
        embedding = tiny.embed_images(inputs.pixel_values)
        vis = grid_tokens(tiny, embedding, inputs.prompt_boxes, inputs.image_sizes)
        assert vis.shape == (2, 2, tiny.config.prompt.num_queries, tiny.config.prompt.output_dim)
        a, b = tiny(inputs), tiny(inputs, embedding)
    torch.testing.assert_close(a.logits, b.logits)


def test_loss_terms_skip_when_targets_absent(tiny):
    tiny.train()
    inputs = make_inputs(tiny.config)
    inputs.gt_boxes = inputs.gt_boxes_mask = None
    inputs.text_loss_mask[:] = False  # referring-style batch: points only
    out = tiny(inputs)
    assert "det_heatmap" not in out.losses and out.losses["text"] == 0
    tiny.zero_grad()
    out.loss.backward()  # unused outputs still join the graph (zero gradient, DDP-friendly)
    assert all(p.grad is not None for p in tiny.parameters() if p.requires_grad)


def test_propose(tiny):
    inputs = make_inputs(tiny.config, targets=False)
    with torch.no_grad():
        boxes, scores = tiny.propose(tiny.embed_images(inputs.pixel_values), inputs.image_sizes, 7)
    assert boxes.shape == (2, 7, 4) and scores.shape == (2, 7)
    assert ((scores >= 0) & (scores <= 1)).all() and ((boxes >= 0) & (boxes <= 1)).all()
    cfg = get_preset("tiny")
    cfg.heads.proposals = cfg.heads.confidence = False
    bare = PixelLLM(cfg, V)
    assert bare.proposal_head is None and bare.confidence_head is None
    with pytest.raises(PixelLLMError, match="proposal head"):
        bare.propose(ImageEmbedding(torch.zeros(1, 64, 32)), inputs.image_sizes[:1])
    one = make_inputs(cfg, b=1, n=1, targets=False)
    with torch.no_grad():
        out = bare.prompt_pass(bare.embed_images(one.pixel_values), one.prompt_boxes[0], torch.tensor([0]),
                               one.image_sizes, one.context_ids[0], one.context_mask[0], one.text_ids[0],
                               one.text_mask[0])
    assert (out.confidence == 0).all()


def test_loss_config_weights_apply(tiny):
    tiny.train()
    inputs = make_inputs(tiny.config)
    torch.manual_seed(0)
    base = tiny(inputs).losses
    tiny.config.loss = LossConfig(point_weight=10.0, text_weight=0.0)
    try:
        weighted = tiny(inputs).losses
    finally:
        tiny.config.loss = LossConfig()
    assert weighted["text"] == 0
    assert weighted["points"] == pytest.approx(base["points"] * 2, rel=1e-5)
