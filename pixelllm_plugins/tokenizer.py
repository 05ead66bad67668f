"""Tokenizer wrapper: one interface over our WordPiece tokenizer and Hugging Face tokenizers.

The built-in tokenizer is a lower-case WordPiece trained in-process (deterministic) on a word list,
with single characters always in the vocabulary so any word can be spelled, including words the
default model never saw (fine-tuning a new word needs no new vocabulary).
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Iterable, Sequence
from pathlib import Path

from .errors import CheckpointError, InvalidPromptError

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
_ALPHABET = list("abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'\"-()/&+%")

# Words every default tokenizer knows whole, beyond the training corpus (keeps user prompts short).
COMMON_WORDS = """a an the of in on at to with and or is are was be this that there here it its
where which what who left right above below top bottom middle center centre leftmost rightmost topmost
bottom-most first second third last next near far behind front between small large big little tiny
huge object objects shape shapes image picture photo photograph caption long short describe description
detail details scene background foreground color colour red green blue yellow purple orange white black
gray grey brown pink circle square triangle star hexagon diamond cross ring rectangle oval line
person man woman people dog cat car tree house sky road table chair cup mug bottle book phone one two
three four five six several many some other another side part area region corner edge most
we can see there's has have also over under partly hidden behind textured striped gradient noisy plain
dark light bright pale scattered around across into onto from by as for than then while next beside
upper lower far closest smallest largest biggest shaped colored coloured nothing empty only each both
""".split()


# Control (Cc) and format (Cf: zero-width space, direction overrides, byte-order mark) characters: not text
_INVISIBLE = ("Cc", "Cf")
_READABLE = "LNPS"  # a text needs a letter, number, punctuation mark or symbol


def validate_text(text: object, what: str = "text", *, max_chars: int | None = None) -> str:
    """The one check of a user's text before it reaches a tokenizer; returns it with whitespace collapsed.

    Refuses what is not a string, text that is not valid Unicode (a lone surrogate, as a JSON ``\\ud800``
    escape or an undecodable command-line byte gives), text with nothing to read (only whitespace, control
    and format characters such as a zero-width space or a direction override, or combining marks) and, when
    ``max_chars`` is given, text longer than that. Control and format characters become spaces.
    """
    if not isinstance(text, str):
        raise InvalidPromptError(f"{what} must be a string, got {type(text).__name__}")
    bad = lone_surrogate_at(text)
    if bad is not None:
        raise InvalidPromptError(f"{what} is not valid Unicode (a lone surrogate at character {bad}); "
                                 "send UTF-8 text")
    if any(unicodedata.category(c) in _INVISIBLE for c in text):
        text = "".join(" " if unicodedata.category(c) in _INVISIBLE else c for c in text)
    text = " ".join(text.split())
    if not any(unicodedata.category(c)[0] in _READABLE for c in text):
        raise InvalidPromptError(f"{what} is empty{' of anything to read' if text else ''}; describe the object, "
                                 "e.g. 'the red circle'")
    if max_chars is not None and len(text) > max_chars:
        raise InvalidPromptError(f"{what} has {len(text):,} characters, more than the limit of {max_chars:,}; "
                                 "shorten it")
    return text


_SUFFIXES = ["s", "es", "ed", "ing", "er", "est", "ly", "ion", "tion", "al", "ness", "ment", "able", "ish",
             "en", "on", "an", "in", "or", "ar", "le", "re", "ic", "th", "ty", "ve", "ge", "nd", "st", "nt"]


def lone_surrogate_at(text: str) -> int | None:
    """Where ``text`` stops being writable as UTF-8 (a lone surrogate, as a JSON ``\\ud800`` escape or an
    undecodable command-line byte gives), or None when it is valid."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return exc.start
    return None


def is_valid_unicode(text: str) -> bool:
    """Whether ``text`` can be written as UTF-8: what a tokenizer, JSON file or database can take."""
    return lone_surrogate_at(text) is None


class PixelTokenizer:
    """Encode/decode text and group token positions into words (for per-word traces)."""

    def __init__(self, backend, *, pad_id: int, bos_id: int, eos_id: int, unk_id: int | None,
                 continuation_prefix: str | None = "##", kind: str = "wordpiece",
                 hf_name_or_path: str | None = None):
        self.backend = backend  # tokenizers.Tokenizer or transformers tokenizer
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = pad_id, bos_id, eos_id, unk_id
        self.continuation_prefix = continuation_prefix
        self.kind = kind
        self.hf_name_or_path = hf_name_or_path

    # ---- construction ------------------------------------------------------------------------------
    @classmethod
    def train_wordpiece(cls, corpus: Iterable[str], vocab_size: int = 1024) -> PixelTokenizer:
        from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

        tok = Tokenizer(models.WordPiece(unk_token="[UNK]", max_input_chars_per_word=100))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True, clean_text=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece(prefix="##")
        alphabet = _ALPHABET + ["##" + c for c in _ALPHABET]
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                            initial_alphabet=_ALPHABET, show_progress=False,
                                            continuing_subword_prefix="##")
        lines = list(corpus) + [" ".join(COMMON_WORDS)] * 4
        tok.train_from_iterator(lines, trainer=trainer)
        # every single character as a word start and as a continuation, inside the WordPiece vocab
        vocab = tok.get_vocab()
        for piece in alphabet:
            if piece not in vocab:
                vocab[piece] = len(vocab)
        tok.model = models.WordPiece(vocab=vocab, unk_token="[UNK]", max_input_chars_per_word=100)
        return cls._from_backend(tok)

    @classmethod
    def default(cls) -> PixelTokenizer:
        """The built-in tokenizer: a fixed vocabulary (no training, so identical on every machine).

        Whole words from ``COMMON_WORDS``, common suffixes, and every single character both as a word
        start and as a continuation, so unseen words are spelled out instead of becoming [UNK].
        """
        from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

        pieces = SPECIAL_TOKENS + _ALPHABET + ["##" + c for c in _ALPHABET]
        pieces += [w for w in dict.fromkeys(COMMON_WORDS) if w not in pieces]
        pieces += ["##" + s for s in _SUFFIXES if "##" + s not in pieces]
        vocab = {p: i for i, p in enumerate(pieces)}
        tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]", max_input_chars_per_word=100))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True, clean_text=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece(prefix="##")
        return cls._from_backend(tok)

    @classmethod
    def _from_backend(cls, tok) -> PixelTokenizer:
        ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
        return cls(tok, pad_id=ids["[PAD]"], bos_id=ids["[BOS]"], eos_id=ids["[EOS]"], unk_id=ids["[UNK]"])

    @classmethod
    def from_hf(cls, name_or_path: str) -> PixelTokenizer:
        """Wrap a Hugging Face tokenizer (for ``hf-causal`` / ``hf-seq2seq`` language models)."""
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(name_or_path)
        eos = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
        pad = tok.pad_token_id if tok.pad_token_id is not None else eos
        bos = tok.bos_token_id if tok.bos_token_id is not None else (tok.cls_token_id or pad)
        if eos is None:
            raise CheckpointError(f"tokenizer of {name_or_path} has no EOS token; set one before use")
        prefix = "##" if any(str(t).startswith("##") for t in list(tok.get_vocab())[:2000]) else None
        return cls(tok, pad_id=pad, bos_id=bos, eos_id=eos, unk_id=tok.unk_token_id,
                   continuation_prefix=prefix, kind="hf", hf_name_or_path=str(name_or_path))

    # ---- persistence -------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        if self.kind == "hf":
            self.backend.save_pretrained(directory / "tokenizer_hf")
            meta = {"kind": "hf", "hf_name_or_path": self.hf_name_or_path}
        else:
            self.backend.save(str(directory / "tokenizer.json"))
            meta = {"kind": self.kind}
        meta |= {"pad_id": self.pad_id, "bos_id": self.bos_id, "eos_id": self.eos_id, "unk_id": self.unk_id}
        (directory / "tokenizer_meta.json").write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> PixelTokenizer:
        directory = Path(directory)
        meta_path = directory / "tokenizer_meta.json"
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {"kind": "wordpiece"}
        if meta["kind"] == "hf":
            return cls.from_hf(str(directory / "tokenizer_hf"))
        path = directory / "tokenizer.json"
        if not path.exists():
            raise CheckpointError(f"{directory} has no tokenizer.json; is it a pixelllm checkpoint folder?")
        from tokenizers import Tokenizer

        return cls._from_backend(Tokenizer.from_file(str(path)))

    # ---- use ------------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        if self.kind == "hf":
            return len(self.backend)
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, max_len: int | None = None, add_bos: bool = False,
               add_eos: bool = True) -> list[int]:
        """Token ids of ``text``; truncated so that with BOS/EOS it fits ``max_len``."""
        if not isinstance(text, str) or not is_valid_unicode(text):
            validate_text(text)  # raises InvalidPromptError instead of the backend's TypeError
        if self.kind == "hf":
            ids = list(self.backend.encode(text, add_special_tokens=False))
        else:
            ids = list(self.backend.encode(text, add_special_tokens=False).ids)
        room = None if max_len is None else max_len - int(add_bos) - int(add_eos)
        if room is not None:
            ids = ids[: max(room, 0)]
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def count(self, text: str) -> int:
        return len(self.encode(text, add_eos=False))

    def id_to_token(self, i: int) -> str:
        if self.kind == "hf":
            return self.backend.convert_ids_to_tokens(int(i))
        return self.backend.id_to_token(int(i)) or "[UNK]"

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids if int(i) not in (self.pad_id, self.bos_id, self.eos_id)]
        if self.kind == "hf":
            return self.backend.decode(ids, skip_special_tokens=True).strip()
        return self.backend.decode(ids).strip()

    def words(self, ids: Sequence[int]) -> list[tuple[str, list[int]]]:
        """Group token positions into words: ``[(word, [positions...]), ...]``.

        Positions index into ``ids``; special tokens are skipped.
        """
        groups: list[tuple[str, list[int]]] = []
        specials = {self.pad_id, self.bos_id, self.eos_id}
        for pos, i in enumerate(ids):
            if int(i) in specials:
                continue
            piece = self.id_to_token(int(i))
            if self.kind == "hf":
                starts_word = piece.startswith(("Ġ", "▁")) or not groups
                if self.continuation_prefix and piece.startswith(self.continuation_prefix):
                    starts_word = False
                elif self.continuation_prefix:
                    starts_word = True
            else:
                starts_word = not (self.continuation_prefix and piece.startswith(self.continuation_prefix))
            if starts_word or not groups:
                groups.append(("", [pos]))
            else:
                groups[-1][1].append(pos)
        return [(self.decode([ids[p] for p in positions]), positions) for _, positions in groups]
