"""Referring expressions, region captions and short captions for synthetic scenes.

Expressions follow a tiny grammar that :func:`parse_expression` reads back, and :func:`resolve` evaluates
against a scene, so uniqueness is *verified*, not assumed:

    expr := ["the"] ordinal NP | ["the"] NP [relation ["the"] NP]
    NP   := [size] [color] (shape | "object")

An expression is unique for its target when the strict reading selects the target and the lenient
reading (objects in the ambiguous band between "clearly left of" and "not left of" also count) selects
nothing else. Attribute-only expressions are used whenever some attribute set is unique.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .synthetic import COLORS, DRAWABLE, ORDINALS, RELATIONS, SIZES, Scene, SceneObject

ORDINAL_MARGIN = 0.06  # fraction of the image side separating the extreme object from the runner-up
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


@dataclass(frozen=True)
class NounPhrase:
    shape: str | None = None  # None reads "object" (matches any shape)
    color: str | None = None
    size: str | None = None

    def matches(self, obj: SceneObject) -> bool:
        return ((self.shape is None or obj.shape == self.shape) and (self.color is None or obj.color == self.color)
                and (self.size is None or obj.size == self.size))

    @property
    def num_attributes(self) -> int:
        return sum(v is not None for v in (self.shape, self.color, self.size))

    def text(self) -> str:
        return " ".join(w for w in (self.size, self.color, self.shape or "object") if w)


@dataclass(frozen=True)
class Expression:
    target: NounPhrase
    ordinal: str | None = None
    relation: str | None = None
    anchor: NounPhrase | None = None
    article: bool = True

    @property
    def kind(self) -> str:
        return "ordinal" if self.ordinal else "relation" if self.relation else "attribute"

    def text(self) -> str:
        the = "the " if self.article else ""
        if self.ordinal:
            return f"{the}{self.ordinal} {self.target.text()}"
        out = f"{the}{self.target.text()}"
        if self.relation and self.anchor is not None:
            out += f" {self.relation} {the}{self.anchor.text()}"
        return out


@dataclass(frozen=True)
class ReferringExpression:
    target: int  # object index in the scene
    expression: Expression

    @property
    def text(self) -> str:
        return self.expression.text()


# ---- parsing and evaluation ------------------------------------------------------------------------

def _parse_np(words: list[str], i: int, text: str) -> tuple[NounPhrase, int]:
    size = color = None
    if i < len(words) and words[i] in SIZES:
        size, i = words[i], i + 1
    if i < len(words) and words[i] in COLORS:
        color, i = words[i], i + 1
    if i >= len(words) or (words[i] not in DRAWABLE and words[i] != "object"):
        raise ValueError(f"cannot parse {text!r}: expected a shape at word {i}")
    shape = None if words[i] == "object" else words[i]
    return NounPhrase(shape, color, size), i + 1


def parse_expression(text: str) -> Expression:
    """Read an expression of the grammar above back into an :class:`Expression`."""
    words = text.lower().replace("left of", "left_of").replace("right of", "right_of").split()
    words = [w.replace("_", " ") for w in words]
    i, article = 0, bool(words) and words[0] == "the"
    i += int(article)
    if i < len(words) and words[i] in ORDINALS:
        np_, j = _parse_np(words, i + 1, text)
        if j != len(words):
            raise ValueError(f"cannot parse {text!r}: trailing words after the ordinal phrase")
        return Expression(np_, ordinal=words[i], article=article)
    np_, i = _parse_np(words, i, text)
    if i == len(words):
        return Expression(np_, article=article)
    if words[i] not in RELATIONS:
        raise ValueError(f"cannot parse {text!r}: expected a relation, got {words[i]!r}")
    relation, i = words[i], i + 1
    if i < len(words) and words[i] == "the":
        i += 1
    anchor, i = _parse_np(words, i, text)
    if i != len(words):
        raise ValueError(f"cannot parse {text!r}: trailing words")
    return Expression(np_, relation=relation, anchor=anchor, article=article)


def _ordinal_key(obj: SceneObject, ordinal: str) -> float:
    cx, cy = obj.center
    return {"leftmost": cx, "rightmost": -cx, "topmost": cy, "bottom-most": -cy}[ordinal]


def _relation_holds(obj: SceneObject, relation: str, anchor: SceneObject, lenient: bool) -> bool:
    """Strict: the object's centre is beyond the anchor's edge. Lenient: beyond the anchor's centre."""
    cx, cy = obj.center
    ax, ay = anchor.center
    x1, y1, x2, y2 = anchor.box
    if relation == "left of":
        return cx < (ax if lenient else x1)
    if relation == "right of":
        return cx > (ax if lenient else x2)
    if relation == "above":
        return cy < (ay if lenient else y1)
    if relation == "below":
        return cy > (ay if lenient else y2)
    raise ValueError(f"unknown relation {relation!r}")


def _ordinal_select(matches: list[SceneObject], ordinal: str, margin: float) -> list[int]:
    if not matches:
        return []
    keys = [_ordinal_key(o, ordinal) for o in matches]
    best = min(keys)
    return [o.index for o, k in zip(matches, keys) if k <= best + margin]


def _relation_select(matches: list[SceneObject], relation: str, anchor: SceneObject, lenient: bool) -> list[int]:
    return [o.index for o in matches if o.index != anchor.index and _relation_holds(o, relation, anchor, lenient)]


def _margin(scene: Scene, ordinal: str, lenient: bool) -> float:
    if not lenient:
        return 1e-9
    return ORDINAL_MARGIN * (scene.width if ordinal in ("leftmost", "rightmost") else scene.height)


def resolve(scene: Scene, expr: Expression, *, lenient: bool = False) -> list[int]:
    """Indices of the objects the expression describes (lenient: also the borderline ones)."""
    matches = [o for o in scene.objects if expr.target.matches(o)]
    if expr.ordinal:
        return _ordinal_select(matches, expr.ordinal, _margin(scene, expr.ordinal, lenient))
    if expr.relation and expr.anchor is not None:
        anchors = [o for o in scene.objects if expr.anchor.matches(o)]
        if len(anchors) != 1:
            return []
        return _relation_select(matches, expr.relation, anchors[0], lenient)
    return [o.index for o in matches]


def is_unique(scene: Scene, expr: Expression, target: int) -> bool:
    return target in resolve(scene, expr) and resolve(scene, expr, lenient=True) == [target]


# ---- generation ------------------------------------------------------------------------------------

def _noun_phrases(obj: SceneObject, with_object: bool) -> list[NounPhrase]:
    nps = [NounPhrase(obj.shape), NounPhrase(obj.shape, obj.color), NounPhrase(obj.shape, size=obj.size),
           NounPhrase(obj.shape, obj.color, obj.size)]
    if with_object:
        nps += [NounPhrase(), NounPhrase(color=obj.color), NounPhrase(size=obj.size)]
    return nps


def candidate_expressions(scene: Scene, target: int,
                          kinds: tuple[str, ...] = ("attribute", "ordinal", "relation")) -> dict[str, list[Expression]]:
    """Every unique expression for ``target`` of the given kinds, fewest attributes first.

    Same rules as :func:`is_unique`, computed with each noun phrase's matches found once (fast path).
    """
    obj = scene.objects[target]
    out: dict[str, list[Expression]] = {k: [] for k in kinds}

    def matching(np_: NounPhrase) -> list[SceneObject]:
        return [o for o in scene.objects if np_.matches(o)]

    if "attribute" in kinds:
        out["attribute"] = [Expression(n) for n in _noun_phrases(obj, with_object=False)
                            if len(matching(n)) == 1]
    if "ordinal" in kinds:
        for np_ in _noun_phrases(obj, with_object=True):
            matches = matching(np_)
            if len(matches) < 2:
                continue
            for ordinal in ORDINALS:
                if (target in _ordinal_select(matches, ordinal, _margin(scene, ordinal, False))
                        and _ordinal_select(matches, ordinal, _margin(scene, ordinal, True)) == [target]):
                    out["ordinal"].append(Expression(np_, ordinal=ordinal))
    if "relation" in kinds:
        anchors: list[tuple[SceneObject, NounPhrase]] = []
        for a in scene.objects:
            if a.index == target:
                continue
            unique = [n for n in _noun_phrases(a, with_object=False) if len(matching(n)) == 1]
            if unique:
                anchors.append((a, min(unique, key=lambda n: n.num_attributes)))
        for np_ in _noun_phrases(obj, with_object=False):
            matches = matching(np_)
            for a, anchor_np in anchors:
                for relation in RELATIONS:
                    if (target in _relation_select(matches, relation, a, False)
                            and _relation_select(matches, relation, a, True) == [target]):
                        out["relation"].append(Expression(np_, relation=relation, anchor=anchor_np))
    for kind in out:
        out[kind].sort(key=lambda e: e.target.num_attributes)
    return out


def _pick(rng: random.Random, exprs: list[Expression]) -> Expression:
    fewest = exprs[0].target.num_attributes
    minimal = [e for e in exprs if e.target.num_attributes == fewest]
    return rng.choice(minimal if rng.random() < 0.8 else exprs)


def referring_expressions(scene: Scene, rng: random.Random, *, max_per_object: int = 2,
                          second_prob: float = 0.5) -> list[ReferringExpression]:
    """Up to ``max_per_object`` unique expressions per object; objects with none are skipped.

    The first expression is attribute-only when some attribute set is unique, else an ordinal or a
    relation; a second one (with ``second_prob``) may use any other unique form, for variety.
    """
    out: list[ReferringExpression] = []
    for obj in scene.objects:
        second = max_per_object > 1 and rng.random() < second_prob
        cands = candidate_expressions(scene, obj.index, ("attribute",))
        if not cands["attribute"] or second:
            cands |= candidate_expressions(scene, obj.index, ("ordinal", "relation"))
        if cands["attribute"]:
            first = _pick(rng, cands["attribute"])
        else:
            kinds = [k for k in ("ordinal", "relation") if cands[k]]
            if not kinds:
                continue
            first = _pick(rng, cands[rng.choice(kinds)])
        chosen = [first]
        if second:
            others = [e for k in cands.values() for e in k if e.text() != first.text()]
            if others:
                chosen.append(rng.choice(others))
        for e in chosen[:max_per_object]:
            out.append(ReferringExpression(obj.index, Expression(e.target, e.ordinal, e.relation, e.anchor,
                                                                 article=rng.random() < 0.8)))
    return out


def region_caption(obj: SceneObject) -> str:
    """Short region caption, e.g. ``"large red circle"``."""
    return f"{obj.size} {obj.color} {obj.shape}"


def _number(n: int) -> str:
    return NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else str(n)


def short_captions(scene: Scene, rng: random.Random, count: int = 5) -> list[str]:
    """COCO-style short captions of the whole scene (distinct strings, up to ``count``)."""
    objs = sorted(scene.objects, key=lambda o: o.center[0])
    n = len(objs)
    if n == 0:
        return ["an empty background"]
    biggest = max(objs, key=lambda o: (o.box[2] - o.box[0]) * (o.box[3] - o.box[1]))
    listed = [f"a {region_caption(o)}" for o in objs[:3]]
    listing = listed[0] if len(listed) == 1 else ", ".join(listed[:-1]) + " and " + listed[-1]
    if n > 3:
        listing += " and other shapes"
    shapes = "shape" if n == 1 else "shapes"
    picked = rng.choice(objs)
    others = n - 1
    pool = [f"{_number(n)} {shapes}", listing, f"{_number(n)} {shapes} on a background",
            f"a {region_caption(biggest)} and {_number(others)} other {'shape' if others == 1 else 'shapes'}"
            if others else f"a {region_caption(biggest)}",
            f"a picture of {_number(n)} {shapes}",
            f"a {picked.color} {picked.shape} and other objects" if n > 1 else f"a {picked.color} {picked.shape}"]
    seen: list[str] = []
    for c in pool:
        if c not in seen:
            seen.append(c)
    rng.shuffle(seen)
    return seen[:count]
