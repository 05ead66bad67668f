"""A whole-image caption put together from the model's own region captions.

The language model writing a long caption from the whole image sees the image only through a handful of
prompt tokens, and a small model then names objects it half-saw (or the same one twice). The dense-caption
path looks at each proposal through its own box, so its captions are far more often right. A caption
composed from them ("in this image there are a large red circle, a small blue square and ...") names the
objects the model found, left to right, and every object's words point at that object's box.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

ARTICLES = ("a", "an", "the")


@dataclass(frozen=True)
class ComposedCaption:
    text: str
    words: list[tuple[str, int | None]]  # lower-case words and punctuation, each with its region (or None)


def _phrase(caption: str) -> list[str]:
    words = caption.strip().rstrip(".").split()
    if not words:
        return []
    if words[0].lower() not in ARTICLES:
        words = ["an" if words[0][:1].lower() in "aeiou" else "a"] + words
    return words


def compose_caption(region_captions: Sequence[str], order: Sequence[float] | None = None) -> ComposedCaption:
    """One sentence naming every region caption, in the order of ``order`` (e.g. the boxes' centre x;
    default: as given). Each phrase gets an article unless it has one. No region: an empty text."""
    indices = list(range(len(region_captions)))
    if order is not None:
        indices.sort(key=lambda k: order[k])
    phrases = [(k, _phrase(region_captions[k])) for k in indices]
    phrases = [(k, p) for k, p in phrases if p]
    if not phrases:
        return ComposedCaption("", [])
    intro = "in this image there is" if len(phrases) == 1 else "in this image there are"
    words: list[tuple[str, int | None]] = [(w, None) for w in intro.split()]
    for n, (k, phrase) in enumerate(phrases):
        if n > 0:
            words.append(("and", None) if n == len(phrases) - 1 else (",", None))
        words += [(w, k) for w in phrase]
    words.append((".", None))
    words = [(w.lower(), k) for w, k in words]
    text = " ".join(w for w, _ in words).replace(" ,", ",").replace(" .", ".")
    return ComposedCaption(text, words)  # lower case, as the language model writes


def align_words(traced: Sequence[str], composed: Sequence[tuple[str, int | None]]) -> list[int | None]:
    """For each traced word (the tokenizer's grouping of the composed text), the region it belongs to:
    matched in order against the composed words; a word that does not match belongs to no region."""
    out: list[int | None] = []
    j = 0
    for word in traced:
        w = word.lower()
        k = j
        while k < len(composed) and composed[k][0] != w:
            k += 1
        if k < len(composed):
            out.append(composed[k][1])
            j = k + 1
        else:
            out.append(None)
    return out
