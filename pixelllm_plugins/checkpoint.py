"""Checkpoint folders: ``config.json``, ``model.safetensors``, tokenizer files, ``README.md``, ``meta.json``.

Weights are safetensors only: nothing here ever unpickles a file. Tensors that share storage (tied
weights) are stored once and re-linked on load via the ``aliases`` entry of the safetensors metadata.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .config import PRESETS, PixelLLMConfig, get_preset
from .errors import CheckpointError
from .modeling.pixel_llm import PixelLLM
from .tokenizer import PixelTokenizer

logger = logging.getLogger(__name__)

DEFAULT_MODEL_DIR = Path(__file__).parent / "weights" / "synth-small"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1
_CONTENTS = ("a checkpoint folder contains config.json, model.safetensors, tokenizer.json (or tokenizer_hf/ "
             "with tokenizer_meta.json), README.md and meta.json, as written by save_pretrained")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _tensors_for_saving(model: PixelLLM, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """State dict with parameters cast to ``dtype``; exact duplicates (tied weights) become aliases."""
    param_names = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    storages: set[int] = set()
    for name, t in model.state_dict(keep_vars=False).items():
        t = t.detach()
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and ident in seen:
            aliases[name] = seen[ident]
            continue
        seen[ident] = name
        if t.is_floating_point() and name in param_names:
            t = t.to(dtype)
        t = t.to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in storages:  # overlapping views of one storage: store a copy
            t = t.clone()
        storages.add(t.untyped_storage().data_ptr())
        tensors[name] = t
    return tensors, aliases


def _canonicalise_header(path: Path) -> None:
    """Rewrite the safetensors JSON header with sorted keys, in place.

    safetensors writes its ``__metadata__`` map in hash order, so identical weights could give different
    files (and model versions). Sorting only reorders the header, so its length and the data stay put.
    """
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        canonical = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        if len(canonical) <= n:
            f.seek(8)
            f.write(canonical + b" " * (n - len(canonical)))


def default_model_card(model: PixelLLM, model_version: str) -> str:
    c = model.config
    return f"""# PixelLLM `{c.preset}`

- model_version: `{model_version}`
- parameters: {model.num_parameters():,}
- vision: {c.vision.kind} (image size {c.vision.image_size}, patch {c.vision.patch_size}, \
width {c.vision.hidden_size}, {c.vision.num_layers} layers)
- language model: {c.language.kind} (width {c.language.hidden_size}, {c.language.num_layers} layers)
- visual tokens per prompt: {c.prompt.num_queries}

Training recipe, data, seed, steps, hardware and evaluation: not recorded (this checkpoint was saved
without a model card).

Load with `pixelllm_plugins.checkpoint.load_pretrained(PATH)` or `pixelllm ... --model PATH`.
"""


def save_pretrained(model: PixelLLM, tokenizer: PixelTokenizer, directory: str | Path, *,
                    model_card: str | None = None, extra_meta: dict | None = None,
                    dtype: torch.dtype = torch.float32) -> str:
    """Write a checkpoint folder and return its ``model_version`` (``<preset>-<sha256[:8] of weights>``).

    ``dtype=torch.float16`` halves the file; loading upcasts to the requested dtype.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save(directory / "config.json")
    tensors, aliases = _tensors_for_saving(model, dtype)
    weights = directory / WEIGHTS_FILE
    tmp = directory / (WEIGHTS_FILE + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt", "aliases": json.dumps(aliases, sort_keys=True)})
    _canonicalise_header(tmp)
    os.replace(tmp, weights)  # a reader never sees a half-written weights file
    version = f"{model.config.preset}-{_sha256(weights)[:8]}"
    tokenizer.save(directory)
    (directory / "README.md").write_text(model_card if model_card is not None
                                         else default_model_card(model, version))
    meta = {"preset": model.config.preset, "format_version": FORMAT_VERSION,
            "dtype": str(dtype).removeprefix("torch."), "num_parameters": model.num_parameters()}
    meta |= dict(extra_meta or {})
    meta["model_version"] = version
    (directory / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    model.model_version = version
    return version


def _missing_files(directory: Path) -> list[str]:
    missing = [f for f in ("config.json", WEIGHTS_FILE) if not (directory / f).is_file()]
    meta = directory / "tokenizer_meta.json"
    hf = meta.is_file() and json.loads(meta.read_text()).get("kind") == "hf"
    if hf and not (directory / "tokenizer_hf").is_dir():
        missing.append("tokenizer_hf/")
    elif not hf and not (directory / "tokenizer.json").is_file():
        missing.append("tokenizer.json")
    return missing


def _read_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read weights {path}: {exc}; the file is corrupt or not safetensors "
                              "(re-save it with save_pretrained)") from exc
    return tensors, json.loads(metadata.get("aliases", "{}"))


def _check_keys(model: PixelLLM, state: dict[str, torch.Tensor], path: Path) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:5]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:5]})")
        if shapes:
            parts.append(f"{len(shapes)} with a different shape (e.g. {shapes[:3]})")
        raise CheckpointError(f"weights in {path} do not match the model described by its config.json: "
                              + "; ".join(parts) + ". Was config.json edited, or the folder mixed from two "
                              "checkpoints?")


def _load_folder(directory: Path, device, dtype: torch.dtype) -> tuple[PixelLLM, PixelTokenizer, str]:
    missing = _missing_files(directory)
    if missing:
        raise CheckpointError(f"{directory} is missing {', '.join(missing)}; {_CONTENTS}")
    config = PixelLLMConfig.load(directory / "config.json")
    tokenizer = PixelTokenizer.load(directory)
    vocab_size = config.language.vocab_size or tokenizer.vocab_size
    if tokenizer.vocab_size > vocab_size and config.language.kind == "git":
        raise CheckpointError(f"tokenizer in {directory} has {tokenizer.vocab_size} tokens but the model only "
                              f"{vocab_size}; the tokenizer files do not belong to this checkpoint")
    model = PixelLLM(config, vocab_size)
    state, aliases = _read_weights(directory / WEIGHTS_FILE)
    for name, source in aliases.items():
        if source in state:
            state[name] = state[source]
    _check_keys(model, state, directory / WEIGHTS_FILE)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, strict=True)
    meta_path = directory / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    version = meta.get("model_version") or f"{config.preset}-{_sha256(directory / WEIGHTS_FILE)[:8]}"
    model.model_version = version
    if "score_calibration" in meta:
        from .inference.calibration import ScoreCalibration

        try:
            model.score_calibration = ScoreCalibration.from_dict(meta["score_calibration"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{meta_path}: score_calibration is malformed ({exc}); remove it or refit it "
                                  "with scripts/calibrate_scores.py") from exc
    return model.to(device=device, dtype=dtype).eval(), tokenizer, version


def _random_init(preset: str, device, dtype: torch.dtype) -> tuple[PixelLLM, PixelTokenizer, str]:
    config = get_preset(preset)
    if preset.startswith("hf:"):
        tokenizer = PixelTokenizer.from_hf(config.language.hf_name_or_path)
    else:
        tokenizer = PixelTokenizer.default()
    logger.warning("preset %r: the PixelLLM parts have random weights (untrained); outputs are meaningless "
                   "until it is trained. Pass a checkpoint folder for a trained model.", preset)
    model = PixelLLM(config, tokenizer.vocab_size)
    version = f"{preset}-random"
    model.model_version = version
    return model.to(device=device, dtype=dtype).eval(), tokenizer, version


def load_pretrained(name_or_path: str | Path | None = None, *, device: torch.device | str | None = None,
                    dtype: torch.dtype | None = None) -> tuple[PixelLLM, PixelTokenizer, str]:
    """-> (model in eval mode, tokenizer, model_version).

    ``None``: the embedded default (``pixelllm_plugins/weights/synth-small``); an existing folder: load it;
    a preset name (``tiny``, ``synth-small``, ``base``, ``hf:VISION+LM``): random init ("<preset>-random").
    """
    dtype = dtype or torch.float32
    if name_or_path is None:
        if not (DEFAULT_MODEL_DIR / WEIGHTS_FILE).is_file():
            raise CheckpointError(
                f"the embedded default model is not installed ({DEFAULT_MODEL_DIR} has no {WEIGHTS_FILE}); "
                "pass --model PATH to a checkpoint folder, or a preset name such as 'tiny' for random weights")
        return _load_folder(DEFAULT_MODEL_DIR, device, dtype)
    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.is_dir():
        return _load_folder(path, device, dtype)
    if name in PRESETS or name.startswith("hf:"):
        return _random_init(name, device, dtype)
    if path.exists():
        raise CheckpointError(f"{path} is a file, not a checkpoint folder; pass the folder that holds it "
                              f"({_CONTENTS})")
    raise CheckpointError(f"{name!r} is neither a checkpoint folder nor a preset name. Presets: "
                          f"{', '.join(sorted(PRESETS))} or 'hf:VISION+LM' (random weights); {_CONTENTS}")


def grow_pretrained(name_or_path: str | Path, directory: str | Path, changes: dict[str, object]) -> str:
    """Copy a checkpoint into a model with a changed config and return the new ``model_version``.

    ``changes`` maps ``"section.field"`` (e.g. ``"heads.point_context_layers"``) to a value. Weights present
    in both models keep their values and new modules keep their initialisation; a change that would drop
    or reshape existing weights is refused. The grid point head's additions start at zero, so the grown
    model answers as the source until it is trained (``pixelllm train --init DIRECTORY``).
    """
    model, tokenizer, version = load_pretrained(name_or_path, dtype=torch.float32)
    config = model.config
    for key, value in changes.items():
        section, _, name = key.partition(".")
        part = getattr(config, section, None)
        if not name or not dataclasses.is_dataclass(part) or name not in {f.name for f in dataclasses.fields(part)}:
            raise CheckpointError(f"cannot change {key!r}: name a config field as section.field, e.g. "
                                  "heads.point_context_layers")
        config = dataclasses.replace(config, **{section: dataclasses.replace(part, **{name: value})})
    torch.manual_seed(0)
    grown = PixelLLM(config, vocab_size=tokenizer.vocab_size)
    source = model.state_dict()
    target = grown.state_dict()
    dropped = sorted(set(source) - set(target))
    reshaped = [k for k in source if k in target and source[k].shape != target[k].shape]
    if dropped or reshaped:
        raise CheckpointError(f"the changed config would drop or reshape weights of {name_or_path} "
                              f"(e.g. {(dropped + reshaped)[:4]}); only changes that add modules can grow a model")
    grown.load_state_dict(source, strict=False)
    return save_pretrained(grown, tokenizer, directory,
                           extra_meta={"grown_from": version, "grown_with": dict(changes)})
