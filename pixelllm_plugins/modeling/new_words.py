"""New words for an adapter: a whole-word token for each word the base tokenizer can only spell in pieces.

A correction round that meets a word the base never learned ("pentagon", spelled ``p ##en ##t ##a ##g
##on`` by the embedded tokenizer) gives the word its own token, with its own row in the language model's
word embedding (what the word means when a user types it) and in its output layer (so that region captions
can write it). Only those rows train; every row of the base stays as it was, so texts without the new word
are read and written exactly as before (by construction, not by tuning). The rows live in the adapter's
per-adapter copies of the two tables (peft ``modules_to_save``), so the base and other adapters never see
the token, and the adapter folder carries its tokenizer (``tokenizer.json``) and ``new_words.json``.

A new row starts at the mean of the rows of ``anchors``: words of the same kind the base knows (a
correction round passes the nouns its replay captions end with, the base's object names), so the new word
starts as "some object" rather than as noise.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError, TrainingError
from ..tokenizer import PixelTokenizer

NEW_WORDS_FILE = "new_words.json"
MAX_NEW_WORDS = 16  # a round's corrections rarely hold more; each costs two rows of the hidden size
_WORD = re.compile(r"[^\W\d_]{3,}")  # letters only, three or more (no numbers, no stray pieces)


def find_new_words(tokenizer: PixelTokenizer, texts: Iterable[str], max_words: int = MAX_NEW_WORDS) -> list[str]:
    """The words of ``texts`` that ``tokenizer`` cannot write as one token, most frequent first (ties in
    alphabetical order), at most ``max_words``. Lower case; letters only, three or more."""
    counts: Counter[str] = Counter()
    for text in texts:
        for word in _WORD.findall(str(text).lower()):
            if len(tokenizer.encode(word, add_eos=False)) > 1:
                counts[word] += 1
    return [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:max_words]]


def with_new_words(tokenizer: PixelTokenizer, words: Sequence[str]) -> PixelTokenizer:
    """A copy of ``tokenizer`` that writes each of ``words`` as one token, numbered from its vocabulary size
    in order. A word matches whole only ("pentagons" is still spelled)."""
    if tokenizer.kind == "hf":
        raise TrainingError("new words need the built-in tokenizer; a Hugging Face language model learns new "
                            "words through its own vocabulary (pass new_words=None)")
    from tokenizers import AddedToken, Tokenizer

    backend = Tokenizer.from_str(tokenizer.backend.to_str())
    backend.add_tokens([AddedToken(w, single_word=True, normalized=True) for w in words])
    grown = PixelTokenizer._from_backend(backend)
    if grown.vocab_size != tokenizer.vocab_size + len(words):
        raise TrainingError(f"the tokenizer already knows some of {list(words)}; new words must be new")
    return grown


def word_table_modules(model: nn.Module) -> tuple[str, str]:
    """Full names of the built-in language model's word embedding and output layer."""
    from .language_git import GitDecoder

    for name, module in model.named_modules():
        if isinstance(module, GitDecoder):
            return f"{name}.word_embed", f"{name}.output"
    raise TrainingError(f"{type(model).__name__} has no built-in (git) language model; new words need one")


def _copy_of(model: nn.Module, module_name: str, adapter: str) -> tuple[nn.Module, nn.Module]:
    """(the base module, adapter's per-adapter copy) of ``module_name``."""
    wrapper = model.get_submodule(module_name)
    copies = getattr(wrapper, "modules_to_save", None)
    if copies is None or adapter not in copies:
        raise CheckpointError(f"adapter {adapter!r} has no copy of {module_name}; add it to modules_to_save")
    return wrapper.original_module, copies[adapter]


def _zero_old_rows(old: int):
    def hook(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        grad[:old] = 0
        return grad
    return hook


def grow_tables(model: nn.Module, adapter: str, count: int, anchor_ids: Sequence[int] = (), *,
                trainable: bool = False) -> int:
    """Give ``adapter``'s copies of the word embedding and output layer ``count`` more rows (the mean of the
    ``anchor_ids`` rows of the base, or of all rows when none); returns the base vocabulary size. With
    ``trainable`` only the new rows' weights learn (their output bias stays at the anchors' mean: a
    correction round sets it when it settles the word): the old rows get no gradient and no weight decay
    (the optimizer skips decay on parameters marked ``_pixelllm_no_decay``). Nothing happens to copies
    already grown."""
    embed_name, output_name = word_table_modules(model)
    for module_name in (embed_name, output_name):
        base, copy = _copy_of(model, module_name, adapter)
        old = base.weight.shape[0]
        have = copy.weight.shape[0]
        if have == old + count:
            continue
        if have != old:
            raise CheckpointError(f"{module_name} of adapter {adapter!r} has {have} rows; expected {old} or "
                                  f"{old + count}")
        ids = torch.tensor(list(anchor_ids) or range(old), dtype=torch.long, device=base.weight.device)
        params = [("weight", base.weight)] + ([("bias", base.bias)] if getattr(base, "bias", None) is not None else [])
        for attr, value in params:
            start = value.detach()[ids].mean(0, keepdim=True).expand(count, *value.shape[1:])
            learns = trainable and attr == "weight"
            grown = nn.Parameter(torch.cat([value.detach(), start]).clone(), requires_grad=learns)
            if learns:
                grown.register_hook(_zero_old_rows(old))
                grown._pixelllm_no_decay = True
            setattr(copy, attr, grown)
        if isinstance(copy, nn.Embedding):
            copy.num_embeddings = old + count
        else:
            copy.out_features = old + count
    return old


def restore_old_rows(model: nn.Module, adapter: str) -> None:
    """Set the old rows of ``adapter``'s grown copies back to the base's (exact, whatever the optimizer did)."""
    for module_name in word_table_modules(model):
        base, copy = _copy_of(model, module_name, adapter)
        old = base.weight.shape[0]
        with torch.no_grad():
            for attr in ("weight", "bias"):
                value = getattr(base, attr, None)
                if value is not None:
                    getattr(copy, attr)[:old] = value


def lower_output_bias(directory: str | Path, model: nn.Module, offsets: dict[int, float]) -> None:
    """Subtract ``offsets`` (token id -> logit) from the output bias rows of an adapter folder's new words."""
    from safetensors.torch import load_file, save_file

    from .lora import ADAPTER_WEIGHTS, PEFT_PREFIX

    path = Path(directory) / ADAPTER_WEIGHTS
    tensors = load_file(str(path))
    key = f"{PEFT_PREFIX}{word_table_modules(model)[1]}.bias"
    if key not in tensors:
        raise CheckpointError(f"{path} has no {key}; is it an adapter with new words?")
    bias = tensors[key].clone()
    for token, offset in offsets.items():
        bias[token] -= offset
    tensors[key] = bias
    save_file(tensors, str(path), metadata={"format": "pt"})


def save_words(directory: str | Path, tokenizer: PixelTokenizer, words: Sequence[str], base_vocab_size: int) -> None:
    """Write an adapter folder's ``new_words.json`` and its tokenizer."""
    directory = Path(directory)
    tokenizer.save(directory)
    (directory / NEW_WORDS_FILE).write_text(json.dumps(
        {"words": list(words), "base_vocab_size": int(base_vocab_size)}, indent=2) + "\n")


def read_words(directory: str | Path) -> dict | None:
    """``new_words.json`` of an adapter folder (``words``, ``base_vocab_size``), or None when it has none."""
    path = Path(directory) / NEW_WORDS_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        words, size = [str(w) for w in data["words"]], int(data["base_vocab_size"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path} is not a new-words file ({exc}); re-run the round that wrote it") from exc
    return {"words": words, "base_vocab_size": size}

