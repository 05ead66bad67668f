"""New words: an adapter gives words the base spells in pieces their own token, and only those rows learn."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from pixelllm_plugins.errors import InvalidPromptError, TrainingError
from pixelllm_plugins.modeling.losses import box_words_loss
from pixelllm_plugins.modeling.new_words import NEW_WORDS_FILE, find_new_words, with_new_words
from pixelllm_plugins.tokenizer import PixelTokenizer


def test_find_new_words_lists_spelled_words_by_frequency():
    tok = PixelTokenizer.default()
    texts = ["the pentagon left of the Pentagon", "a red circle", "an octagon, 123 xy", "the octagon and pentagon"]
    assert find_new_words(tok, texts) == ["pentagon", "octagon"]  # 3 and 2 times; known words, numbers out
    assert find_new_words(tok, texts, max_words=1) == ["pentagon"]
    assert find_new_words(tok, ["an octagon", "a pentagon"]) == ["octagon", "pentagon"]  # ties: alphabetical


def test_grown_tokenizer_writes_a_new_word_as_one_token():
    tok = PixelTokenizer.default()
    grown = with_new_words(tok, ["pentagon"])
    new_id = tok.vocab_size
    assert grown.vocab_size == tok.vocab_size + 1
    assert grown.encode("the Pentagon, left", add_eos=False)[1] == new_id
    assert new_id not in grown.encode("pentagons", add_eos=False)  # whole words only
    assert len(tok.encode("pentagon", add_eos=False)) > 1  # the base tokenizer is unchanged
    assert grown.decode(grown.encode("a large pentagon", add_eos=False)) == "a large pentagon"
    assert [w for w, _ in grown.words(grown.encode("a large pentagon", add_eos=False))] == ["a", "large", "pentagon"]
    with pytest.raises(TrainingError, match="new"):
        with_new_words(tok, ["circle"])  # a word the tokenizer already has


def test_box_words_loss_ignores_ids_beyond_its_vocabulary():
    logits = torch.zeros(1, 10, requires_grad=True)
    ids = torch.tensor([[2, 5, 12, 3]])  # BOS, a known word, a new word (id 12 >= 10), EOS
    mask = torch.ones_like(ids, dtype=torch.bool)
    loss = box_words_loss(logits, ids, mask)
    loss.backward()
    assert torch.isfinite(loss)
    assert logits.grad[0, 5] < 0 and (logits.grad[0, [0, 1, 2, 3, 4, 6, 7, 8, 9]] > 0).all()


def _with_pentagon_texts(tiny_data, tmp_path):
    """The tiny train split with every referring expression and region caption about a 'pentagon'."""
    out = tmp_path / "data"
    shutil.copytree(tiny_data, out)
    for name in ("refcoco_train.json", "vg_train.json"):
        path = out / name
        data = json.loads(path.read_text())
        for rec in data["images"] + data["annotations"]:
            if "caption" in rec:
                rec["caption"] = "the red pentagon"
        path.write_text(json.dumps(data))
    return out


def test_finetune_learns_only_the_new_rows_and_the_adapter_brings_its_tokenizer(tiny_base, tiny_data, tmp_path):
    from pixelllm_plugins.checkpoint import load_pretrained
    from pixelllm_plugins.inference.predictor import Predictor
    from pixelllm_plugins.modeling.lora import scale_adapter
    from pixelllm_plugins.training.finetune import finetune

    data = _with_pentagon_texts(tiny_data, tmp_path)
    out = finetune(tiny_base, data, tmp_path / "penta", steps=3, batch_size=2, lr=5e-2, progress=False,
                   new_words=["pentagon"], new_word_anchors=["circle", "square"])
    assert json.loads((out / NEW_WORDS_FILE).read_text())["words"] == ["pentagon"]
    base_model, base_tok, _ = load_pretrained(tiny_base)
    base = base_model.state_dict()
    old = base_tok.vocab_size
    tensors = load_file(str(out / "adapter_model.safetensors"))
    for table in ("language.word_embed.weight", "language.output.weight", "language.output.bias"):
        copy = tensors["base_model.model." + table].float()
        assert copy.shape[0] == old + 1
        assert torch.equal(copy[:old], base[table].float())  # every row of the base as it was
    anchors = [base_tok.encode(w, add_eos=False)[0] for w in ("circle", "square")]
    start = base["language.word_embed.weight"][anchors].mean(0)
    assert not torch.allclose(tensors["base_model.model.language.word_embed.weight"][old], start)  # it learned

    # keeping part of the update leaves the new rows whole
    kept = tmp_path / "kept"
    shutil.copytree(out, kept)
    scale_adapter(kept, base, 0.5)
    halved = load_file(str(kept / "adapter_model.safetensors"))
    assert torch.equal(halved["base_model.model.language.output.weight"][old],
                       tensors["base_model.model.language.output.weight"][old])

    predictor = Predictor(tiny_base, device="cpu", dtype=torch.float32)
    name = predictor.load_adapter(out)
    assert len(predictor.tokenizer.encode("pentagon", add_eos=False)) > 1  # the base spells it
    image = str(tiny_data / "images" / "val" / "000000000001.jpg")
    plain = predictor.refer([image], [["the red pentagon"]])[0][0][0]
    adapted = predictor.refer([image], [["the red pentagon"]], adapter=name)[0][0][0]
    assert predictor.tokenizer.encode("pentagon", add_eos=False) == [old]  # the adapter's tokenizer in use
    # the prompt cache keeps the base's and the adapter's token ids apart (the same text, read twice)
    assert old in predictor._encode("the red pentagon", 40, add_bos=True, what="text")
    assert adapted.box_xyxy != plain.box_xyxy or adapted.score != plain.score
    caption = predictor.caption_regions([image], boxes=[[[4, 4, 40, 40]]], adapter=name)[0][0]
    assert isinstance(caption.text, str)
    assert predictor.info()["new_words"] == {name: ["pentagon"]}
    (tokens, logits), = predictor.region_text_logits(image, [[4, 4, 40, 40]], ["a red pentagon"], adapter=name)
    assert tokens[0] == predictor.tokenizer.bos_id and old in tokens and logits.shape == (len(tokens), old + 1)
    with pytest.raises(InvalidPromptError, match="2 boxes but 1 texts"):
        predictor.region_text_logits(image, [[4, 4, 40, 40], [0, 0, 9, 9]], ["a red pentagon"])
    with pytest.raises(InvalidPromptError, match="empty"):
        predictor.region_text_logits(image, [[4, 4, 40, 40]], ["   "])
    predictor.unload_adapter(name)
    assert len(predictor.tokenizer.encode("pentagon", add_eos=False)) > 1
    assert predictor.info()["new_words"] == {}


def test_new_words_need_an_adapter(tiny_base, tiny_data, tmp_path):
    from pixelllm_plugins.training.recipes import recipe_config
    from pixelllm_plugins.training.trainer import build_model

    cfg = recipe_config("finetune", init=str(tiny_base), data_dir=str(tiny_data), out_dir=str(tmp_path),
                        lora_new_words=["pentagon"], lora_r=0)
    with pytest.raises(TrainingError, match="lora_r"):
        build_model(cfg)


def test_cli_finetune_finds_the_new_words_of_the_data(tiny_base, tiny_data, tmp_path, capsys):
    from pixelllm_plugins.cli import main

    data = _with_pentagon_texts(tiny_data, tmp_path)
    out = tmp_path / "cli-adapter"
    assert main(["finetune", "--model", str(tiny_base), "--data", str(data), "--out", str(out), "--steps", "1",
                 "--batch-size", "2", "--new-words", "--no-progress"]) == 0
    assert "new words: pentagon" in capsys.readouterr().err
    assert json.loads((out / NEW_WORDS_FILE).read_text())["words"] == ["pentagon"]
    assert PixelTokenizer.load(out).encode("pentagon", add_eos=False) == [PixelTokenizer.load(tiny_base).vocab_size]


def test_settling_lowers_a_new_word_that_outranks_the_right_words(tiny_base, tiny_data, tmp_path):
    from pixelllm_plugins.evaluation.evaluate import load_task_samples
    from pixelllm_plugins.inference.predictor import Predictor
    from pixelllm_plugins.modeling.lora import ADAPTER_WEIGHTS
    from pixelllm_plugins.modeling.new_words import lower_output_bias
    from pixelllm_plugins.training.corrections import NEW_WORD_MARGIN, settle_new_words
    from pixelllm_plugins.training.finetune import finetune

    out = finetune(tiny_base, _with_pentagon_texts(tiny_data, tmp_path), tmp_path / "penta", steps=1, batch_size=2,
                   progress=False, new_words=["pentagon"])
    new_id = PixelTokenizer.load(tiny_base).vocab_size
    predictor = Predictor(tiny_base, device="cpu", dtype=torch.float32)
    lower_output_bias(out, predictor.model, {new_id: -50.0})  # now "pentagon" beats every right word
    before = load_file(str(out / ADAPTER_WEIGHTS))["base_model.model.language.output.bias"][new_id]

    lowered = settle_new_words(str(tiny_base), out, tiny_data, "val", rate=0.0)
    after = load_file(str(out / ADAPTER_WEIGHTS))["base_model.model.language.output.bias"][new_id]
    assert lowered["pentagon"] > 40 and float(before - after) == pytest.approx(lowered["pentagon"], abs=1e-3)
    predictor.load_adapter(out, "settled")
    for sample in load_task_samples(tiny_data, "val", "region"):
        for tokens, logits in predictor.region_text_logits(sample.load_image(), [p.box for p in sample.prompts],
                                                           [p.text for p in sample.prompts], adapter="settled"):
            right = logits[torch.arange(len(tokens) - 1), torch.tensor(tokens[1:])]
            assert (logits[:len(tokens) - 1, new_id] - right).max() <= -NEW_WORD_MARGIN + 1e-3


def test_texts_with_an_adapters_new_words_keep_the_raw_score(tiny_base, tiny_data, tmp_path):
    from pixelllm_plugins.inference.calibration import ScoreCalibration
    from pixelllm_plugins.inference.predictor import Predictor
    from pixelllm_plugins.training.finetune import finetune

    out = finetune(tiny_base, _with_pentagon_texts(tiny_data, tmp_path), tmp_path / "penta", steps=1, batch_size=2,
                   progress=False, new_words=["pentagon"])
    predictor = Predictor(tiny_base, device="cpu", dtype=torch.float32)
    name = predictor.load_adapter(out)
    image = str(tiny_data / "images" / "val" / "000000000001.jpg")
    texts = ["the red pentagon", "the red circle"]
    predictor.calibrated = False
    raw = [d[0].score for d in predictor.refer([image], [texts], adapter=name)[0]]
    predictor.calibrated = True
    predictor.model.score_calibration = ScoreCalibration((0.0, 1.0), (0.0, 0.0))  # every score -> 0
    adapted = [d[0].score for d in predictor.refer([image], [texts], adapter=name)[0]]
    assert adapted == [raw[0], 0.0]  # the new word's text keeps its score; the other goes through the map
    assert [d[0].score for d in predictor.refer([image], [texts])[0]] == [0.0, 0.0]  # the base: both mapped
