"""Named LoRA adapters over a whole PixelLLM (fine-tuning from user annotations, per-project adapters).

Adapters are injected in place with peft (``LoraConfig`` + ``inject_adapter_in_model``; the point and
confidence heads through peft's ``ModulesToSaveWrapper``) and saved in peft's format: a folder with
``adapter_config.json`` + ``adapter_model.safetensors`` (keys ``base_model.model.<module>.lora_A.weight`` ...,
adapter name removed, exactly what ``PeftModel.save_pretrained`` writes).

What an adapter adapts by default, and why:

- LoRA (rank ``r``, ``alpha = 2r``: the paper's scale 2) on the q and v projections of every attention in
  the language model (a fused qkv projection where the LM has no separate q/v) and of the prompt adapter's
  attentions (token self-attention and both cross-attentions). The LM learns new words and phrasings; the
  prompt adapter learns which image regions the user's labels care about.
- The point head and the confidence head are trained fully, as per-adapter copies (peft
  ``modules_to_save``). They are small (a few hundred thousand parameters at most) and they are what turns
  hidden states into boxes and box scores: a user's box convention (tight / loose, part / whole) and the
  score calibration change there first, and a full copy adapts to a few hundred labelled boxes much faster
  than a low-rank update. Pass ``modules_to_save=[]`` for LoRA-only adapters.

Everything else stays frozen and bit-identical: ``add_lora`` turns ``requires_grad`` off for every parameter
that does not belong to the new adapter. A language model's own LoRA (``language.lora_r > 0``, adapter
``language_hf.BASE_LM_ADAPTER``) is part of the base model: it stays active under every adapter and is
never saved into an adapter folder.

Injection renames the wrapped modules' keys in ``model.state_dict()`` (``q.weight`` -> ``q.base_layer.weight``,
``point_head.*`` -> ``point_head.original_module.*``): save base checkpoints before adding adapters, or
``delete_adapter`` every adapter first (that restores the original modules).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from ..errors import CheckpointError, TrainingError
from . import new_words
from .language import LanguageModel

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # what peft puts before every key it saves
# peft LoRA parameter containers: "<module>.<container>.<adapter>[.weight]"
_LORA_CONTAINERS = {"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector"}
IMAGE_SIDE = ("vision", "proposal_head")  # the modules an image embedding comes from
_LM_QV = ("q", "v", "q_proj", "v_proj", "query", "value")
_LM_FUSED = ("c_attn", "qkv", "query_key_value", "Wqkv", "qkv_proj", "in_proj")
_ADAPTER_QV = ("q_proj", "v_proj")
_HEAD_CLASSES = {"PointHead", "GridPointHead", "ConfidenceHead", "PointPredictor", "ConfidencePredictor"}


# ---- discovery --------------------------------------------------------------------------------------

def _is_tuner_layer(module: nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return isinstance(module, BaseTunerLayer)


def _is_mts_wrapper(module: nn.Module) -> bool:
    from peft.utils import ModulesToSaveWrapper

    return isinstance(module, ModulesToSaveWrapper)


def _adaptable(module: nn.Module) -> bool:
    if _is_tuner_layer(module) or isinstance(module, nn.Linear):
        return True
    try:
        from transformers.pytorch_utils import Conv1D

        return isinstance(module, Conv1D)
    except ImportError:  # pragma: no cover
        return False


def _modules_outside_adapters(root: nn.Module, prefix: str):
    """(full name, module) of ``root``'s modules, not descending into peft layers / wrappers."""
    stack = [(prefix, root)]
    while stack:
        name, module = stack.pop()
        yield name, module
        if _is_tuner_layer(module) or _is_mts_wrapper(module):
            continue
        for child_name, child in module.named_children():
            stack.append((f"{name}.{child_name}" if name else child_name, child))


def _pick(root: nn.Module, prefix: str, leaves: Sequence[str]) -> list[str]:
    return sorted(n for n, m in _modules_outside_adapters(root, prefix)
                  if n and n.rsplit(".", 1)[-1] in leaves and _adaptable(m))


def default_target_modules(model: nn.Module) -> list[str]:
    """Full names of the q/v projections of the language model(s) and the prompt adapter(s)."""
    targets: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, LanguageModel):
            found = _pick(module, name, _LM_QV) or _pick(module, name, _LM_FUSED)
            targets += found
        elif type(module).__name__ == "PromptAdapter":
            targets += _pick(module, name, _ADAPTER_QV)
    if not targets:
        raise TrainingError(
            f"found no attention projections to put LoRA on in {type(model).__name__} (no LanguageModel / "
            "PromptAdapter with q/v projections); pass target_modules=[...] explicitly"
        )
    return sorted(set(targets))


def default_modules_to_save(model: nn.Module) -> list[str]:
    """Full names of the point head and confidence head (trained fully, as per-adapter copies)."""
    found = []
    for name, module in model.named_modules():
        if not name or _is_mts_wrapper(module):
            continue
        leaf = name.rsplit(".", 1)[-1].lower()
        cls = type(module).__name__
        by_class = cls in _HEAD_CLASSES
        by_name = ("point" in leaf or "confidence" in leaf) and "head" in leaf
        if (by_class or by_name) and not any(name.startswith(f + ".") for f in found):
            found.append(name)
    return found


def vision_target_modules(model: nn.Module) -> list[str]:
    """Full names of the linear layers inside the vision encoder's transformer blocks (attention and MLP):
    LoRA there lets an adapter change what the image features encode, e.g. a shape the base never had to
    tell apart from its look-alikes."""
    vision = getattr(model, "vision", None)
    if vision is None:
        raise TrainingError(f"{type(model).__name__} has no vision encoder to adapt")
    found = [f"vision.{name}" for name, m in vision.named_modules()
             if isinstance(m, nn.Linear) and any(part.isdigit() for part in name.split("."))]
    if not found:
        raise TrainingError("found no linear layers in the vision encoder's blocks; pass target_modules=[...]")
    return found


_WORD_EMBEDDINGS = {"word_embed", "embed_tokens", "wte", "word_embeddings", "shared"}


def word_embedding_modules(model: nn.Module) -> list[str]:
    """Full names of the language model's token-embedding tables: trained as per-adapter copies when an
    adapter must learn words the base never saw (a new class name is spelled from word pieces whose
    embeddings were fitted to other words)."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, LanguageModel):
            found += [f"{name}.{sub}" for sub, m in module.named_modules()
                      if isinstance(m, nn.Embedding) and sub.rsplit(".", 1)[-1] in _WORD_EMBEDDINGS]
    if not found:
        raise TrainingError(f"found no word-embedding table in {type(model).__name__}'s language model; pass "
                            "modules_to_save=[...] explicitly")
    return found


def _existing_modules(model: nn.Module, names: Sequence[str]) -> list[str]:
    """``names`` after checking that each is a module of ``model`` (peft would silently ignore a typo)."""
    known = {name for name, _ in model.named_modules() if name}
    missing = [n for n in names if n not in known]
    if missing:
        parent = missing[0].rpartition(".")[0]  # suggest the siblings of the first unknown name
        siblings = sorted(n for n in known if n.rpartition(".")[0] == (parent if parent in known else ""))
        raise TrainingError(f"no module named {', '.join(map(repr, missing))} in {type(model).__name__}; "
                            f"use full dotted names such as {', '.join(siblings[:8])}")
    return list(names)


# ---- bookkeeping ----------------------------------------------------------------------------------

def list_adapters(model: nn.Module) -> list[str]:
    """Names of the adapters added to / loaded into ``model`` (the LM's own LoRA is not one of them)."""
    return sorted(getattr(model, "peft_config", {}) or {})


def get_active_adapter(model: nn.Module) -> str | None:
    return getattr(model, "_pixelllm_active_adapter", None)


def _adapter_of_key(key: str, names: set[str]) -> str | None:
    parts = key.split(".")
    for i in range(len(parts) - 1):
        if (parts[i] in _LORA_CONTAINERS or parts[i] == "modules_to_save") and parts[i + 1] in names:
            return parts[i + 1]
    return None


def _checkpoint_key(key: str, name: str) -> str:
    """Model key of adapter ``name`` -> peft checkpoint key (adapter name removed, no prefix)."""
    parts = key.split(".")
    for i in range(len(parts) - 1):
        if parts[i] == "modules_to_save" and parts[i + 1] == name:
            return ".".join(parts[:i] + parts[i + 2:])
        if parts[i] in _LORA_CONTAINERS and parts[i + 1] == name:
            return ".".join(parts[: i + 1] + parts[i + 2:])
    raise KeyError(key)


def _adapter_keys(model: nn.Module, name: str) -> dict[str, str]:
    """checkpoint key -> model state-dict key, for every tensor of adapter ``name``."""
    return {_checkpoint_key(k, name): k for k in model.state_dict() if _adapter_of_key(k, {name}) == name}


def adapter_changes_image_side(model: nn.Module, name: str) -> bool:
    """Whether adapter ``name`` has weights in the vision encoder or the proposal head, the parts an image
    embedding comes from (``PixelLLM.embed_images``). Only then does an image's embedding depend on it."""
    return any(key.split(".", 1)[0] in IMAGE_SIDE and _adapter_of_key(key, {name}) == name
               for key in model.state_dict())


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters an optimizer should see: name -> parameter, for ``requires_grad`` ones."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _all_adapter_names(model: nn.Module) -> set[str]:
    names: set[str] = set()
    for module in model.modules():
        if _is_tuner_layer(module):
            for attr in ("lora_A", "lora_embedding_A"):
                names.update(getattr(module, attr, {}).keys())
        elif _is_mts_wrapper(module):
            names.update(module.modules_to_save.keys())
    return names


def set_active_adapter(model: nn.Module, name: str | None) -> None:
    """Use adapter ``name`` in forward passes (None: the base model). Does not change ``requires_grad``."""
    registry = set(list_adapters(model))
    if name is not None and name not in registry:
        raise CheckpointError(f"unknown adapter {name!r}; loaded adapters: {sorted(registry) or 'none'}. "
                              "Load it first with load_adapter(model, directory, name)")
    flags = {id(p): p.requires_grad for p in model.parameters()}
    for module in model.modules():
        if _is_tuner_layer(module):
            available = set(getattr(module, "lora_A", {}).keys()) | set(getattr(module, "lora_embedding_A", {}))
            active = sorted(a for a in available if a not in registry)  # the base model's own LoRA
            if name is not None and name in available:
                active.append(name)
            module.set_adapter(active)
        elif _is_mts_wrapper(module):
            module.set_adapter([name] if name is not None and name in module.modules_to_save else [])
    for p in model.parameters():
        p.requires_grad_(flags[id(p)])
    model._pixelllm_active_adapter = name


def _inject(model: nn.Module, name: str, lora_config) -> None:
    """Inject adapter ``name`` (LoRA + modules_to_save copies); leaves requires_grad and activity as before."""
    from peft import inject_adapter_in_model
    from peft.utils import ModulesToSaveWrapper

    existing = _all_adapter_names(model)
    if name in existing or name in list_adapters(model):
        raise TrainingError(f"an adapter named {name!r} already exists on this model; pick another name or "
                            "delete_adapter(model, name) first")
    if "." in name or not name:
        raise TrainingError(f"adapter name {name!r} must be non-empty and contain no '.'")
    active = get_active_adapter(model)
    flags = {id(p): p.requires_grad for p in model.parameters()}
    mts = list(lora_config.modules_to_save or [])
    # peft would also wrap every module whose name merely ends with one of these ("zoom.proj" would take
    # "point_head.relations.zoom.proj" too): it injects the LoRA layers only, the copies are made below by
    # exact name, and the config it keeps (and saves) still lists them
    lora_only = copy.copy(lora_config)
    lora_only.modules_to_save = None
    try:
        with warnings.catch_warnings():  # several adapters on one model are intended here
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            inject_adapter_in_model(lora_only, model, adapter_name=name)
    except (ValueError, TypeError, KeyError) as exc:
        model.__dict__.get("peft_config", {}).pop(name, None)
        raise CheckpointError(f"cannot add LoRA adapter {name!r} on {lora_config.target_modules}: {exc}. "
                              "Was it trained for a different model architecture?") from exc
    model.peft_config[name] = lora_config
    for module_name in mts:
        try:
            module = model.get_submodule(module_name)
        except AttributeError as exc:
            raise CheckpointError(f"adapter {name!r} wants to train module {module_name!r}, which this model "
                                  "does not have") from exc
        if _is_mts_wrapper(module):
            module.update(name)
        else:
            parent_name, _, leaf = module_name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, leaf, ModulesToSaveWrapper(module, name))
    for p in model.parameters():
        p.requires_grad_(flags.get(id(p), False))
    set_active_adapter(model, active)


def _set_adapter_trainable(model: nn.Module, name: str | None) -> None:
    """Only adapter ``name``'s tensors train (None: nothing trains)."""
    for key, p in model.named_parameters():
        p.requires_grad_(name is not None and _adapter_of_key(key, {name}) == name)


# ---- public API --------------------------------------------------------------------------------------

def add_lora(model: nn.Module, name: str = "default", r: int = 8, alpha: int | None = None,
             target_modules: Sequence[str] | None = None, modules_to_save: Sequence[str] | None = None,
             dropout: float = 0.0, *, adapt_vision: bool = False, train_embeddings: bool = False,
             extra_modules_to_save: Sequence[str] = ()):
    """Add a trainable adapter ``name`` and make it the active one; everything else is frozen.

    ``target_modules``: module names for LoRA (full dotted names or name suffixes, as in peft); default
    ``default_target_modules(model)``. ``modules_to_save``: modules trained as full per-adapter copies;
    default ``default_modules_to_save(model)`` (point + confidence heads). ``adapt_vision`` adds
    ``vision_target_modules(model)`` to the targets, ``train_embeddings`` adds ``word_embedding_modules(model)``
    to the copies, and ``extra_modules_to_save`` (module names, e.g. ``vision.stem``) adds to them too.
    Returns the peft ``LoraConfig``.
    """
    from peft import LoraConfig

    if r <= 0:
        raise TrainingError(f"LoRA rank must be positive, got r={r}")
    targets = list(target_modules) if target_modules is not None else default_target_modules(model)
    mts = list(modules_to_save) if modules_to_save is not None else default_modules_to_save(model)
    if adapt_vision:
        targets += vision_target_modules(model)
    if train_embeddings:
        mts += word_embedding_modules(model)
    mts += _existing_modules(model, extra_modules_to_save)
    config = LoraConfig(r=r, lora_alpha=alpha if alpha else 2 * r, lora_dropout=dropout,
                        target_modules=targets, modules_to_save=mts or None, bias="none")
    _inject(model, name, config)
    _set_adapter_trainable(model, name)
    set_active_adapter(model, name)
    return config


def save_adapter(model: nn.Module, directory: str | Path, name: str) -> Path:
    """Write adapter ``name`` as a peft folder (adapter_config.json + adapter_model.safetensors)."""
    from safetensors.torch import save_file

    if name not in list_adapters(model):
        raise CheckpointError(f"no adapter {name!r} on this model; adapters: {list_adapters(model) or 'none'}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    tensors = {PEFT_PREFIX + ck: state[mk].detach().cpu().contiguous()
               for ck, mk in _adapter_keys(model, name).items()}
    save_file(tensors, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    model.peft_config[name].save_pretrained(str(directory))
    return directory


def scale_adapter(directory: str | Path, base_state: dict, keep: float) -> Path:
    """Keep a fraction ``keep`` of an adapter folder's update, in place: the LoRA B matrices times ``keep``
    (so the low-rank update is scaled) and each full per-adapter copy (modules_to_save) moved to
    ``base + keep * (copy - base)``, ``base_state`` being the base model's ``state_dict()``. ``keep`` 1 leaves
    the folder as it is; 0 gives an adapter that answers exactly as the base."""
    from safetensors.torch import load_file, save_file

    if not 0.0 <= keep <= 1.0:
        raise TrainingError(f"keep is the fraction of the update to keep, 0 to 1; got {keep}")
    path = Path(directory) / ADAPTER_WEIGHTS
    if keep == 1.0:
        return Path(directory)
    tensors = load_file(str(path))
    out = {}
    for key, value in tensors.items():
        parts = key.split(".")
        if "lora_B" in parts or "lora_embedding_B" in parts:
            out[key] = value * keep
        elif not set(parts) & _LORA_CONTAINERS:
            base = base_state.get(key.removeprefix(PEFT_PREFIX))
            grown = (base is not None and base.ndim == value.ndim and base.shape[1:] == value.shape[1:]
                     and base.shape[0] < value.shape[0])  # a table with new-word rows (modeling.new_words)
            if base is None or (base.shape != value.shape and not grown):
                raise CheckpointError(f"{path}: {key} has no counterpart of its shape in the base model")
            base = base.to(value.dtype)
            old = base.shape[0]
            out[key] = value.clone()
            out[key][:old] = base + keep * (value[:old] - base)  # new rows are wholly the adapter's: kept
        else:
            out[key] = value
    save_file(out, str(path), metadata={"format": "pt"})
    return Path(directory)


def load_adapter(model: nn.Module, directory: str | Path, name: str | None = None, *, trainable: bool = False,
                 activate: bool = False, overwrite: bool = False) -> str:
    """Load a peft LoRA folder as adapter ``name`` (default: the folder name); returns the name.

    The active adapter does not change unless ``activate``. With ``overwrite`` an existing adapter of the
    same name and shape gets the folder's weights (e.g. after a new fine-tuning round).
    """
    from peft import LoraConfig
    from safetensors.torch import load_file

    directory = Path(directory)
    name = name or directory.name
    if not (directory / ADAPTER_CONFIG).is_file() or not (directory / ADAPTER_WEIGHTS).is_file():
        raise CheckpointError(f"{directory} is not an adapter folder: it needs {ADAPTER_CONFIG} and "
                              f"{ADAPTER_WEIGHTS} (written by save_adapter or PeftModel.save_pretrained)")
    try:
        config = LoraConfig.from_pretrained(str(directory))
    except (OSError, ValueError, TypeError) as exc:
        raise CheckpointError(f"cannot read {directory / ADAPTER_CONFIG}: {exc}") from exc
    if str(getattr(config, "peft_type", "LORA")).split(".")[-1].upper() != "LORA":
        raise CheckpointError(f"{directory} holds a {config.peft_type} adapter; only LoRA adapters are supported")
    config.inference_mode = not trainable
    if name in list_adapters(model):
        if not overwrite:
            raise CheckpointError(f"adapter {name!r} is already loaded; pass overwrite=True to replace its weights "
                                  "or choose another name")
        injected = False
    else:
        _inject(model, name, config)
        injected = True
    words = new_words.read_words(directory)
    if words is not None:
        try:
            base_size = new_words.grow_tables(model, name, len(words["words"]), trainable=trainable)
            if base_size != words["base_vocab_size"]:
                raise CheckpointError(f"adapter {directory} adds words to a vocabulary of {words['base_vocab_size']} "
                                      f"tokens; this model has {base_size}: was it trained for another model?")
        except (CheckpointError, TrainingError):
            if injected:
                delete_adapter(model, name)
            raise
    tensors = load_file(str(directory / ADAPTER_WEIGHTS))
    tensors = {k.removeprefix(PEFT_PREFIX): v for k, v in tensors.items()}
    mapping = _adapter_keys(model, name)
    missing = sorted(set(mapping) - set(tensors))
    unexpected = sorted(set(tensors) - set(mapping))
    if missing or unexpected:
        raise CheckpointError(f"adapter {directory} does not fit this model: missing {missing[:5]}, unexpected "
                              f"{unexpected[:5]} ({len(missing)} / {len(unexpected)} in all); was it trained for "
                              "another model?")
    state = model.state_dict()
    for ck, mk in mapping.items():
        if tuple(state[mk].shape) != tuple(tensors[ck].shape):
            raise CheckpointError(f"adapter tensor {ck} has shape {tuple(tensors[ck].shape)}, the model expects "
                                  f"{tuple(state[mk].shape)}; was it trained for another model?")
    model.load_state_dict({mk: tensors[ck] for ck, mk in mapping.items()}, strict=False)
    for key, p in model.named_parameters():
        if _adapter_of_key(key, {name}) == name:
            p.requires_grad_(trainable)
    if activate:
        set_active_adapter(model, name)
    return name


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name``; modules left without adapters get their original (unwrapped) form back."""
    if name not in list_adapters(model):
        raise CheckpointError(f"no adapter {name!r} on this model; adapters: {list_adapters(model) or 'none'}")
    active = get_active_adapter(model)
    if active == name:
        set_active_adapter(model, None)
        active = None
    replace: list[tuple[str, nn.Module]] = []
    for module_name, module in list(model.named_modules()):
        if _is_tuner_layer(module) and name in _all_adapter_names(module):
            module.delete_adapter(name)
            if not _all_adapter_names(module):
                replace.append((module_name, module.get_base_layer()))
        elif _is_mts_wrapper(module) and name in module.modules_to_save:
            del module.modules_to_save[name]
            getattr(module, "_adapters", set()).discard(name)
            if len(module.modules_to_save) == 0:
                replace.append((module_name, module.original_module))
    for module_name, original in replace:
        parent_name, _, leaf = module_name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, original)
    model.peft_config.pop(name, None)
    if not model.peft_config:
        del model.peft_config
    set_active_adapter(model, active)
