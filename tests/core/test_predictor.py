import warnings

import pytest

from pixelllm_plugins.errors import InvalidBoxError, InvalidImageError, InvalidPromptError
from pixelllm_plugins.inference import PredictorProtocol
from pixelllm_plugins.inference.results import Detection, RegionCaption, TracedCaption


def test_implements_protocol(tiny_predictor):
    assert isinstance(tiny_predictor, PredictorProtocol)
    assert tiny_predictor.model_version.startswith("tiny-")


def test_refer_shapes_and_ranges(tiny_predictor, scene_files):
    out = tiny_predictor.refer([scene_files[0], scene_files[1]], [["the red circle", "the blue square"], ["x"]])
    assert [len(per_image) for per_image in out] == [2, 1]
    for path, per_image in zip(scene_files, out):
        from PIL import Image

        w, h = Image.open(path).size
        for dets in per_image:
            assert len(dets) == 1 and isinstance(dets[0], Detection)
            x1, y1, x2, y2 = dets[0].box_xyxy
            assert 0 <= x1 <= x2 <= w and 0 <= y1 <= y2 <= h
            assert 0.0 <= dets[0].score <= 1.0
    assert out[0][0][0].text == "the red circle"


def test_second_prompt_skips_vision_encoder(tiny_predictor, scene_files):
    tiny_predictor.clear_cache()
    before = tiny_predictor.stats["vision_calls"]
    first = tiny_predictor.refer([scene_files[0]], [["the red circle"]])
    second = tiny_predictor.refer([scene_files[0]], [["the red circle"]])
    assert tiny_predictor.stats["vision_calls"] == before + 1
    assert first[0][0][0].box_xyxy == second[0][0][0].box_xyxy


def test_cached_equals_uncached(tiny_predictor, scene_files):
    tiny_predictor.set_image(scene_files[1])
    cached = tiny_predictor.refer([scene_files[1]], [["a shape"]])[0][0][0]
    tiny_predictor.clear_cache()
    uncached = tiny_predictor.refer([scene_files[1]], [["a shape"]])[0][0][0]
    assert cached.box_xyxy == pytest.approx(uncached.box_xyxy, abs=1e-3)
    assert cached.score == pytest.approx(uncached.score, abs=1e-4)


def test_batched_equals_one_by_one(tiny_predictor, scene_files):
    texts = [["the red circle"], ["the blue square", "a long expression about the thing on the left"], ["x"]]
    batched = tiny_predictor.refer(scene_files, texts)
    tiny_predictor.clear_cache()
    for path, t, b in zip(scene_files, texts, batched):
        single = tiny_predictor.refer([path], [t])[0]
        for s, bb in zip(single, b):
            assert s[0].box_xyxy == pytest.approx(bb[0].box_xyxy, abs=1e-2)


def test_caption_regions_one_per_box_and_clips(tiny_predictor, scene_files):
    out = tiny_predictor.caption_regions([scene_files[0]], [[(10, 10, 50, 50), (-20, 100, 500, 400)]])
    assert len(out[0]) == 2 and all(isinstance(c, RegionCaption) for c in out[0])
    assert out[0][1].box_xyxy == (0.0, 100.0, 160.0, 120.0)
    assert all(isinstance(c.text, str) and 0 <= c.score <= 1 for c in out[0])


def test_degenerate_box_is_an_error(tiny_predictor, scene_files):
    with pytest.raises(InvalidBoxError, match="no area"):
        tiny_predictor.caption_regions([scene_files[0]], [[(500, 500, 600, 600)]])


def test_caption_with_trace_gives_word_boxes(tiny_predictor, scene_files):
    (cap,) = tiny_predictor.caption([scene_files[0]], trace=True, max_new_tokens=8)
    assert isinstance(cap, TracedCaption)
    assert "".join(w.text for w in cap.words) == cap.text.replace(" ", "")
    for word in cap.words:
        x1, y1, x2, y2 = word.box_xyxy
        assert 0 <= x1 <= x2 <= 160 and 0 <= y1 <= y2 <= 120 and len(word.points) == 2
    (plain,) = tiny_predictor.caption([scene_files[0]], trace=False, max_new_tokens=8)
    assert plain.words == [] and plain.text == cap.text


def test_beam_search_runs(tiny_predictor, scene_files):
    out = tiny_predictor.caption_regions([scene_files[0]], [[(10, 10, 80, 80)]], num_beams=3, max_new_tokens=6)
    assert len(out[0]) == 1


def test_dense_caption_sorted_and_bounded(tiny_predictor, scene_files):
    (regions,) = tiny_predictor.dense_caption([scene_files[0]], max_regions=5, min_score=0.0)
    assert len(regions) <= 5
    assert [r.score for r in regions] == sorted((r.score for r in regions), reverse=True)


def test_trace_points_for_given_caption(tiny_predictor, scene_files):
    (words,) = tiny_predictor.trace_points([scene_files[0]], ["a red circle"])
    assert [w.text for w in words] == ["a", "red", "circle"]


def test_bad_inputs(tiny_predictor, scene_files, tmp_path):
    with pytest.raises(InvalidPromptError, match="empty"):
        tiny_predictor.refer([scene_files[0]], [["   "]])
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(InvalidImageError, match="image 1"):
        tiny_predictor.refer([scene_files[0], bad], [["a"], ["b"]])
    with pytest.raises(InvalidPromptError, match="text lists"):
        tiny_predictor.refer([scene_files[0]], [])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = tiny_predictor.refer([scene_files[0]], [["red " * 300]])
    assert out[0][0] and any("truncated" in str(w.message) for w in caught)


def test_inference_mode_no_grad(tiny_predictor, scene_files):
    tiny_predictor.clear_cache()
    tiny_predictor.set_image(scene_files[0])
    assert tiny_predictor._cache and all(not e.tokens.requires_grad for e in tiny_predictor._cache.values())


@pytest.fixture(scope="module")
def grid_predictor():
    """A random ``tiny`` with the synth-small heads: grid points with relations, point context, box refinement
    and x/y preference, map tokens, detail tokens, the fine map in the map tokens, and the box extent."""
    import torch

    from pixelllm_plugins.config import get_preset
    from pixelllm_plugins.inference.predictor import Predictor
    from pixelllm_plugins.modeling.pixel_llm import PixelLLM
    from pixelllm_plugins.tokenizer import PixelTokenizer

    cfg = get_preset("tiny")
    cfg.vision.patch_size, cfg.vision.detail_channels, cfg.vision.fine_channels = 16, 4, 4
    cfg.heads.point_mode, cfg.heads.relation_layers, cfg.prompt.map_tokens = "grid", 1, 2
    cfg.prompt.fine_grid, cfg.prompt.box_extent = 2, True
    cfg.heads.point_context_layers, cfg.heads.point_refine, cfg.heads.point_coords = 1, True, True
    tokenizer = PixelTokenizer.default()
    torch.manual_seed(0)
    model = PixelLLM(cfg, tokenizer.vocab_size)
    head = model.point_head  # make the zero-started parts count
    for layer in (head.relations.out[-1], head.context.out[-1], head.refine, head.coords, model.fine_token_proj,
                  model.box_extent.mlp[-1]):
        torch.nn.init.normal_(layer.weight, std=0.5)
    return Predictor(model, tokenizer=tokenizer, device="cpu", dtype=torch.float32)


def test_proposal_maps_are_cached_with_the_image_tokens(grid_predictor, scene_files):
    calls = []
    hook = grid_predictor.model.proposal_head.register_forward_hook(lambda *_: calls.append(1))
    try:
        grid_predictor.clear_cache()
        first = grid_predictor.refer([scene_files[0]], [["the red circle"]])[0][0][0]
        grid_predictor.caption_regions([scene_files[0]], [[(10, 10, 50, 50)]])
        grid_predictor.dense_caption([scene_files[0]], max_regions=2, min_score=0.0)
        again = grid_predictor.refer([scene_files[0]], [["the red circle"]])[0][0][0]
        assert len(calls) == 1  # one image, one proposal pass, whatever is asked of it afterwards
        grid_predictor.clear_cache()
        fresh = grid_predictor.refer([scene_files[0]], [["the red circle"]])[0][0][0]
        assert len(calls) == 2
    finally:
        hook.remove()
    assert first.box_xyxy == again.box_xyxy
    assert fresh.box_xyxy == pytest.approx(first.box_xyxy, abs=1e-3) and fresh.score == pytest.approx(first.score)


def test_grid_model_batched_equals_one_by_one(grid_predictor, scene_files):
    texts = [["the red circle"], ["the blue square", "a long expression about the thing on the left"]]
    batched = grid_predictor.refer(scene_files[:2], texts)
    grid_predictor.clear_cache()
    for path, t, b in zip(scene_files, texts, batched):
        for s, bb in zip(grid_predictor.refer([path], [t])[0], b):
            assert s[0].box_xyxy == pytest.approx(bb[0].box_xyxy, abs=1e-2)
            assert s[0].score == pytest.approx(bb[0].score, abs=1e-3)


def test_grid_model_word_boxes_do_not_depend_on_the_batch(grid_predictor, scene_files):
    captions = ["a red circle", "in this image there is a small blue square and a large red circle"]
    batched = grid_predictor.trace_points(scene_files[:2], captions)
    for path, caption, words in zip(scene_files, captions, batched):
        alone = grid_predictor.trace_points([path], [caption])[0]
        assert [w.text for w in alone] == [w.text for w in words] and len(words) == len(caption.split())
        for a, b in zip(alone, words):
            assert a.box_xyxy == pytest.approx(b.box_xyxy, abs=1e-2)


def test_adapter_load_use_unload(tiny_checkpoint, scene_files, tmp_path):
    from pixelllm_plugins.checkpoint import load_pretrained
    from pixelllm_plugins.errors import PixelLLMError
    from pixelllm_plugins.inference.predictor import Predictor
    from pixelllm_plugins.modeling import lora

    model, _, _ = load_pretrained(str(tiny_checkpoint))
    lora.add_lora(model, "proj", r=2)
    for p in lora.trainable_parameters(model).values():
        p.data.add_(0.5)  # make the adapter change the output
    lora.save_adapter(model, tmp_path / "proj", "proj")
    pred = Predictor(tiny_checkpoint, device="cpu")
    base = pred.refer([scene_files[0]], [["the red circle"]])[0][0][0]
    name = pred.load_adapter(tmp_path / "proj")
    adapted = pred.refer([scene_files[0]], [["the red circle"]], adapter=name)[0][0][0]
    assert adapted.model_version.endswith("+proj") and adapted.box_xyxy != base.box_xyxy
    pred.unload_adapter(name)
    again = pred.refer([scene_files[0]], [["the red circle"]])[0][0][0]
    assert again.box_xyxy == pytest.approx(base.box_xyxy, abs=1e-3)
    with pytest.raises(PixelLLMError, match="unknown adapter"):
        pred.refer([scene_files[0]], [["x"]], adapter="proj")
    # an adapter folder can be passed by path on every call (pixelllm eval --adapter does): loaded once
    by_path = [pred.refer([scene_files[0]], [["the red circle"]], adapter=str(tmp_path / "proj"))[0][0][0]
               for _ in range(2)]
    assert by_path[0].box_xyxy == by_path[1].box_xyxy == pytest.approx(adapted.box_xyxy, abs=1e-4)


def test_adapters_share_the_base_image_embedding_unless_they_change_the_image_side(tiny_checkpoint, scene_files,
                                                                                    tmp_path):
    import torch

    from pixelllm_plugins.checkpoint import load_pretrained
    from pixelllm_plugins.inference.predictor import Predictor
    from pixelllm_plugins.modeling import lora

    torch.manual_seed(0)
    for name, vision in (("words", False), ("eyes", True)):
        model, _, _ = load_pretrained(str(tiny_checkpoint))
        lora.add_lora(model, name, r=2, adapt_vision=vision)
        for p in lora.trainable_parameters(model).values():
            p.data.add_(torch.randn_like(p) * 0.1)
        lora.save_adapter(model, tmp_path / name, name)
    text = [["the red circle"]]
    pred = Predictor(tiny_checkpoint, device="cpu")
    base = pred.refer([scene_files[0]], text)[0][0][0]
    calls = pred.stats["vision_calls"]
    words = pred.refer([scene_files[0]], text, adapter=str(tmp_path / "words"))[0][0][0]
    assert pred.stats["vision_calls"] == calls  # the language-side adapter reads the cached embedding
    eyes = pred.refer([scene_files[0]], text, adapter=str(tmp_path / "eyes"))[0][0][0]
    assert pred.stats["vision_calls"] == calls + 1  # the vision adapter embeds the image its own way
    assert pred.refer([scene_files[0]], text)[0][0][0].box_xyxy == pytest.approx(base.box_xyxy, abs=1e-4)
    assert pred.stats["vision_calls"] == calls + 1  # and the base's embedding is still the base's
    for name, answer in (("words", words), ("eyes", eyes)):  # the same answers as a predictor that never switched
        fresh = Predictor(tiny_checkpoint, device="cpu")
        fresh.load_adapter(tmp_path / name)
        assert fresh.refer([scene_files[0]], text, adapter=name)[0][0][0].box_xyxy == pytest.approx(
            answer.box_xyxy, abs=1e-4)
    assert eyes.box_xyxy != pytest.approx(words.box_xyxy, abs=1e-3)


def test_a_scaled_adapter_keeps_that_fraction_of_its_update(tiny_checkpoint, scene_files, tmp_path):
    import shutil

    import torch
    from safetensors.torch import load_file

    from pixelllm_plugins.checkpoint import load_pretrained
    from pixelllm_plugins.errors import TrainingError
    from pixelllm_plugins.inference.predictor import Predictor
    from pixelllm_plugins.modeling import lora

    model, _, _ = load_pretrained(str(tiny_checkpoint))
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    lora.add_lora(model, "full", r=2)  # LoRA on the attention and full copies of the point/confidence heads
    torch.manual_seed(0)
    for p in lora.trainable_parameters(model).values():
        p.data.add_(torch.randn_like(p) * 0.1)
    lora.save_adapter(model, tmp_path / "full", "full")
    for keep in (0.0, 0.5, 1.0):
        shutil.copytree(tmp_path / "full", tmp_path / f"keep{int(keep * 10)}")
        lora.scale_adapter(tmp_path / f"keep{int(keep * 10)}", base_state, keep)
    full = load_file(str(tmp_path / "full" / lora.ADAPTER_WEIGHTS))
    half = load_file(str(tmp_path / "keep5" / lora.ADAPTER_WEIGHTS))
    for key, value in full.items():
        if ".lora_B." in key:
            assert torch.allclose(half[key], value * 0.5)
        elif ".lora_A." in key:
            assert torch.equal(half[key], value)
        else:  # a head copy: halfway back to the base
            base = base_state[key.removeprefix("base_model.model.")]
            assert torch.allclose(half[key], (base + value) / 2, atol=1e-6)
    assert all(torch.equal(v, full[k]) for k, v in load_file(str(tmp_path / "keep10" / lora.ADAPTER_WEIGHTS)).items())
    pred = Predictor(tiny_checkpoint, device="cpu")
    text = [["the red circle"]]
    base = pred.refer([scene_files[0]], text)[0][0][0]
    answers = {k: pred.refer([scene_files[0]], text, adapter=str(tmp_path / k))[0][0][0] for k in ("keep0", "keep5", "full")}
    assert answers["keep0"].box_xyxy == pytest.approx(base.box_xyxy, abs=1e-3)  # nothing kept: the base's answer
    assert answers["keep5"].box_xyxy != pytest.approx(base.box_xyxy, abs=1e-3)
    assert answers["keep5"].box_xyxy != pytest.approx(answers["full"].box_xyxy, abs=1e-3)
    with pytest.raises(TrainingError, match="fraction of the update"):
        lora.scale_adapter(tmp_path / "full", base_state, 1.5)


def test_a_repeated_prompt_is_tokenized_once(tiny_predictor, scene_files, monkeypatch):
    calls = []
    encode = tiny_predictor.tokenizer.encode
    monkeypatch.setattr(tiny_predictor.tokenizer, "encode", lambda *a, **k: calls.append(a) or encode(*a, **k))
    text = "the prompt no other test sends"
    first = tiny_predictor.refer([scene_files[0]], [[text]])
    n = len(calls)
    assert n >= 1
    second = tiny_predictor.refer([scene_files[0]], [[text]])
    assert len(calls) == n  # served from the prompt cache
    assert first[0][0][0].text == second[0][0][0].text == text
    assert first[0][0][0].box_xyxy == second[0][0][0].box_xyxy


def test_prepared_images_pickle_as_numpy_and_keep_their_key(tiny_predictor, scene_files):
    import pickle

    from PIL import Image

    prepared = tiny_predictor.prepare(scene_files[0])
    back = pickle.loads(pickle.dumps(prepared))
    assert back.digest == prepared.digest
    assert (back.prepared.pixel_values == prepared.prepared.pixel_values).all()
    assert (back.prepared.original_size, back.prepared.resized_size, back.prepared.scale) == (
        prepared.prepared.original_size, prepared.prepared.resized_size, prepared.prepared.scale)
    assert tiny_predictor.refer([back], [["a shape"]]) == tiny_predictor.refer([prepared], [["a shape"]])
    # the key is of what the model sees: same pixels -> same key; changed pixels -> another key
    image = Image.open(scene_files[0]).convert("RGB")
    assert tiny_predictor.prepare(image.copy()).digest == prepared.digest
    image.paste((255, 0, 255), (0, 0, image.width // 2, image.height // 2))
    assert tiny_predictor.prepare(image).digest != prepared.digest


def test_encoded_images_and_prepared_inputs_answer_as_the_file_does(tiny_predictor, scene_files):
    from PIL import Image

    from pixelllm_plugins.io import open_encoded

    path = scene_files[0]
    encoded = open_encoded(path)
    prepared = tiny_predictor.prepare(encoded)
    assert prepared.size == encoded.size == Image.open(path).size  # what plugins scale results by
    assert prepared.digest == tiny_predictor.prepare(path).digest
    texts = [["the red circle", "a shape"]]
    expected = tiny_predictor.refer([path], texts)
    assert tiny_predictor.refer([encoded], texts) == expected
    assert tiny_predictor.refer([prepared], texts) == expected
    cut = open_encoded(path.read_bytes()[:200])  # the header is whole, the body cut short
    assert cut.size == encoded.size
    with pytest.raises(InvalidImageError, match="image 1: .*truncated or corrupt"):  # clear, at decode time
        tiny_predictor.refer([path, cut], [["x"], ["x"]])
