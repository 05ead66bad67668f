"""LoRA fine-tuning writes a peft adapter folder that loads on top of the base model by path."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from pixelllm_plugins.errors import TrainingError
from pixelllm_plugins.training.finetune import finetune


def test_finetune_adapter_loads_on_base(tiny_base, tiny_data, tmp_path):
    out = finetune(tiny_base, tiny_data, tmp_path / "my-adapter", steps=2, batch_size=2, lr=5e-3,
                   progress=False, checkpoint_every=1)
    assert out == tmp_path / "my-adapter"
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 16  # the paper's scale 2
    tensors = load_file(str(out / "adapter_model.safetensors"))
    lora_b = [v for k, v in tensors.items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b)  # B starts at zero: it trained
    assert (tmp_path / "my-adapter.train" / "metrics.jsonl").is_file()

    from pixelllm_plugins.checkpoint import load_pretrained
    from pixelllm_plugins.inference.predictor import Predictor

    base_before = load_file(str(tiny_base / "model.safetensors"))
    predictor = Predictor(tiny_base, device="cpu", dtype=torch.float32)
    name = predictor.load_adapter(out)
    assert name == "my-adapter"
    image = str(tiny_data / "images" / "val" / "000000000001.jpg")
    plain = predictor.refer([image], [["the red circle"]])[0][0][0]
    adapted = predictor.refer([image], [["the red circle"]], adapter=name)[0][0][0]
    assert adapted.model_version.endswith("+my-adapter")
    assert adapted.box_xyxy != plain.box_xyxy or adapted.score != plain.score
    # the base checkpoint is untouched
    model, _, _ = load_pretrained(tiny_base)
    assert all(torch.equal(base_before[k], v) for k, v in model.state_dict().items() if k in base_before)


def test_finetune_can_carry_its_own_word_embeddings(tiny_base, tiny_data, tmp_path):
    from pixelllm_plugins.checkpoint import load_pretrained
    from pixelllm_plugins.modeling.lora import word_embedding_modules

    model, _, _ = load_pretrained(tiny_base)
    (embed_name,) = word_embedding_modules(model)
    assert embed_name.endswith("word_embed")
    out = finetune(tiny_base, tiny_data, tmp_path / "words", steps=2, batch_size=2, lr=5e-2, progress=False,
                   train_embeddings=True)
    tensors = load_file(str(out / "adapter_model.safetensors"))
    copies = [k for k in tensors if embed_name in k]
    assert copies, sorted(tensors)[:10]
    base_table = load_file(str(tiny_base / "model.safetensors"))[f"{embed_name}.weight"]
    assert not torch.equal(tensors[copies[0]].float(), base_table.float())  # the copy trained

    _assert_adapter_acts_only_when_named(tiny_base, tiny_data, out)


def test_finetune_can_adapt_the_vision_encoder(tiny_base, tiny_data, tmp_path):
    out = finetune(tiny_base, tiny_data, tmp_path / "eyes", steps=2, batch_size=2, lr=5e-2, progress=False,
                   adapt_vision=True)
    tensors = load_file(str(out / "adapter_model.safetensors"))
    vision_b = {k: v for k, v in tensors.items() if ".vision." in k and "lora_B" in k}
    assert vision_b and any(v.abs().sum() > 0 for v in vision_b.values())  # B starts at zero: it trained

    _assert_adapter_acts_only_when_named(tiny_base, tiny_data, out)


def test_finetune_can_retrain_named_modules_as_adapter_copies(tiny_base, tiny_data, tmp_path):
    out = finetune(tiny_base, tiny_data, tmp_path / "stem", steps=2, batch_size=2, lr=5e-2, progress=False,
                   modules_to_save=["vision.stem"])
    tensors = load_file(str(out / "adapter_model.safetensors"))
    copies = {k: v for k, v in tensors.items() if "vision.stem" in k}
    assert copies, sorted(tensors)[:10]
    base = load_file(str(tiny_base / "model.safetensors"))
    stem = {k: v for k, v in base.items() if k.startswith("vision.stem.")}
    assert len(copies) == len(stem)  # one copy per stem tensor
    trained = [k for k, v in copies.items() if not any(torch.equal(v.float(), b.float()) for b in stem.values())]
    assert trained  # the copies moved away from the base's stem
    _assert_adapter_acts_only_when_named(tiny_base, tiny_data, out)


def test_finetune_refuses_a_module_name_that_is_not_in_the_model(tiny_base, tiny_data, tmp_path):
    with pytest.raises(TrainingError, match=r"no module named 'vision\.stemm'.*vision\.stem"):
        finetune(tiny_base, tiny_data, tmp_path / "typo", steps=1, batch_size=2, progress=False,
                 modules_to_save=["vision.stemm"])


def _assert_adapter_acts_only_when_named(base, data, adapter_dir) -> None:
    """The adapter changes the answer when a request names it; without it the base answers exactly as before
    the adapter was loaded (its embedding copies and vision features are cached per adapter)."""
    from pixelllm_plugins.inference.predictor import Predictor

    image = str(data / "images" / "val" / "000000000001.jpg")
    predictor = Predictor(base, device="cpu", dtype=torch.float32)
    plain = predictor.refer([image], [["the red circle"]])[0][0][0]
    name = predictor.load_adapter(adapter_dir)
    adapted = predictor.refer([image], [["the red circle"]], adapter=name)[0][0][0]
    again = predictor.refer([image], [["the red circle"]])[0][0][0]
    assert adapted.box_xyxy != plain.box_xyxy or adapted.score != plain.score
    assert (again.box_xyxy, again.score) == (plain.box_xyxy, plain.score)
