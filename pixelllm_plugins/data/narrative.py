"""Localized-Narratives-style narration of a synthetic scene: a caption, per-word timing, mouse traces.

While the words of an object's phrase ("a large red circle") are spoken the mouse circles over that
object (one loop takes about one word), between phrases it travels to the next object, with jitter and
an occasional lifted mouse (a second trace segment). Utterances are single words, as in LN.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np

from .expressions import region_caption
from .synthetic import Scene

INTROS = ("in this image there is", "in this picture there is", "there is", "here is", "in this image there are")


@dataclass(frozen=True)
class Utterance:
    text: str
    start_time: float
    end_time: float
    object_index: int | None  # the object this word describes (None: filler words)


@dataclass(frozen=True)
class Narrative:
    caption: str
    utterances: tuple[Utterance, ...]
    traces: tuple[tuple[tuple[float, float, float], ...], ...]  # segments of (x, y, t); x, y in [0, 1]


def _caption_words(scene: Scene, rng: random.Random) -> list[tuple[str, int | None]]:
    """Words (punctuation as separate items) with the object each belongs to."""
    axis = 0 if rng.random() < 0.75 else 1
    objs = sorted(scene.objects, key=lambda o: o.center[axis])
    words: list[tuple[str, int | None]] = [(w, None) for w in rng.choice(INTROS).split()]
    for k, obj in enumerate(objs):
        if k > 0:
            words.append(("and", None) if k == len(objs) - 1 else (",", None))
        words += [("a", obj.index)] + [(w, obj.index) for w in region_caption(obj).split()]
    return words


def narrate(scene: Scene, rng: random.Random) -> Narrative:
    words = _caption_words(scene, rng)
    text = " ".join(w for w, _ in words).replace(" ,", ",") + "."
    caption = text[:1].upper() + text[1:]
    # ---- timing: one utterance per spoken word ----
    utterances: list[Utterance] = []
    t = rng.uniform(0.3, 1.5)
    prev_obj: int | None = -1
    for k, (w, obj) in enumerate(words):
        if w == ",":
            continue
        t += rng.uniform(0.15, 0.45) if obj != prev_obj else rng.uniform(0.02, 0.12)
        dur = (0.12 + 0.055 * len(w)) * rng.uniform(0.8, 1.25)
        spoken = w.capitalize() if k == 0 else w
        utterances.append(Utterance(spoken, round(t, 3), round(t + dur, 3), obj))
        t += dur
        prev_obj = obj
    traces = _traces(scene, utterances, rng)
    return Narrative(caption, tuple(utterances), traces)


def _object_spans(utterances: list[Utterance]) -> list[tuple[int, float, float]]:
    spans: list[tuple[int, float, float]] = []
    for u in utterances:
        if u.object_index is None:
            continue
        if spans and spans[-1][0] == u.object_index:
            spans[-1] = (u.object_index, spans[-1][1], u.end_time)
        else:
            spans.append((u.object_index, u.start_time, u.end_time))
    return spans


def _traces(scene: Scene, utterances: list[Utterance], rng: random.Random):
    w, h = scene.width, scene.height
    dt = rng.uniform(0.03, 0.05)
    t0 = max(0.0, utterances[0].start_time - rng.uniform(0.1, 0.6))
    t1 = utterances[-1].end_time + rng.uniform(0.1, 0.5)
    ts = np.arange(t0, t1, dt)
    pos = np.zeros((len(ts), 2))
    spans = _object_spans(utterances)
    # keyframes between loops: (time, point); each loop contributes its start and end
    start = np.array([w * rng.uniform(0.3, 0.7), h * rng.uniform(0.3, 0.7)])
    keys: list[tuple[float, np.ndarray]] = [(t0, start)]
    for obj_index, s, e in spans:
        obj = scene.objects[obj_index]
        c = np.array(obj.center)
        r = np.array([(obj.box[2] - obj.box[0]), (obj.box[3] - obj.box[1])]) * rng.uniform(0.36, 0.44)
        period = rng.uniform(0.3, 0.45)
        phase = rng.uniform(0, 2 * math.pi)
        direction = rng.choice((-1.0, 1.0))
        sel = (ts >= s) & (ts <= e)
        theta = phase + direction * 2 * math.pi * (ts[sel] - s) / period
        pos[sel] = c + r * np.stack([np.cos(theta), np.sin(theta)], axis=1)
        keys.append((s, c + r * np.array([math.cos(phase), math.sin(phase)])))
        th_end = phase + direction * 2 * math.pi * (e - s) / period
        keys.append((e, c + r * np.array([math.cos(th_end), math.sin(th_end)])))
    keys.append((t1 + dt, keys[-1][1] + np.array([rng.uniform(-0.05, 0.05) * w, rng.uniform(-0.05, 0.05) * h])))
    # transitions: smooth-stepped straight moves between consecutive keyframes outside the loops
    for (ta, pa), (tb, pb) in zip(keys[0::2], keys[1::2]):
        sel = (ts >= ta) & (ts < tb)
        if not sel.any():
            continue
        u = (ts[sel] - ta) / max(tb - ta, 1e-6)
        u = u * u * (3 - 2 * u)
        pos[sel] = pa + u[:, None] * (pb - pa)
    jitter = np.random.default_rng(rng.getrandbits(32)).normal(0.0, 0.004, size=pos.shape)
    xs = np.clip(pos[:, 0] / w + jitter[:, 0], 0.0, 1.0).round(4).tolist()
    ys = np.clip(pos[:, 1] / h + jitter[:, 1], 0.0, 1.0).round(4).tolist()
    points = list(zip(xs, ys, ts.round(3).tolist()))
    # an occasional lifted mouse during one transition: two segments
    if len(spans) >= 2 and rng.random() < 0.35:
        k = rng.randrange(1, len(spans))
        gap_a, gap_b = spans[k - 1][2], spans[k][1]
        lo, hi = gap_a + 0.25 * (gap_b - gap_a), gap_a + 0.75 * (gap_b - gap_a)
        first = tuple(p for p in points if p[2] < lo)
        second = tuple(p for p in points if p[2] > hi)
        if len(first) > 1 and len(second) > 1:
            return (first, second)
    return (tuple(points),)
