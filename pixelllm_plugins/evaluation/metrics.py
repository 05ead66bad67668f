"""Evaluation metrics as pure functions (no model), following the reference protocols.

- Referring localization: box P@0.5 (IoU strictly > 0.5), mask cIoU / gIoU / AP (spec 6.1); for masks
  also from per-mask pixel counts (``mask_scores_from_counts``: cIoU, mIoU, P@0.5), ``mask_holes`` /
  ``has_holes`` (rings) and ``interior_point`` (the point prompt of an object), with scipy / OpenCV when
  installed and pure numpy otherwise.
- Location-conditioned captioning: BLEU-4, METEOR, ROUGE-L, CIDEr with PTB tokenisation (spec 6.3).
- Dense captioning: the Visual Genome / Johnson et al. protocol, mAP and mAP_detection (spec 6.2).
- Trace: point L1 on normalised coordinates against the closest GT point (spec 6.5).
- Attribute accuracy for region captions (ours): every attribute word of the GT is in the prediction.
- Caption object F1 (ours): the ``(size, colour, shape)`` objects a whole-image caption names against the
  scene's objects, as multisets (``caption_objects``, ``object_prf``, ``caption_object_f1``).

Boxes are ``x1, y1, x2, y2`` everywhere. BLEU / ROUGE-L / CIDEr are pure Python (pycocoevalcap);
METEOR and the reference PTB tokenizer need Java: without it METEOR is skipped with a notice and a
pure-Python PTB-style tokenizer is used.
"""

from __future__ import annotations

import atexit
import functools
import math
import re
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import EvaluationError

# ------------------------------------------------------------------------------------------------
# boxes and masks
# ------------------------------------------------------------------------------------------------

def box_iou_matrix(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]]) -> np.ndarray:
    """IoU of every xyxy box in ``a`` with every box in ``b`` -> ``[len(a), len(b)]`` (0 for empty)."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def box_precision(pred_boxes: Sequence[Sequence[float]], gt_boxes: Sequence[Sequence[float]],
                  threshold: float = 0.5) -> float:
    """Fraction of expressions whose predicted box has IoU with its GT **strictly greater** than
    ``threshold`` (RefCOCO P@0.5, k = 1). A missing prediction (``None``) counts as a miss."""
    if len(pred_boxes) != len(gt_boxes):
        raise EvaluationError(f"{len(pred_boxes)} predicted boxes for {len(gt_boxes)} GT boxes; "
                              "pass exactly one prediction (or None) per expression")
    if not gt_boxes:
        return float("nan")
    hits = 0
    for pred, gt in zip(pred_boxes, gt_boxes):
        if pred is not None and box_iou_matrix([pred], [gt])[0, 0] > threshold:
            hits += 1
    return hits / len(gt_boxes)


@dataclass
class MaskScores:
    ciou: float  # sum of intersections / sum of unions over all expressions
    giou: float  # mean per-expression IoU
    ap50: float  # fraction of masks with IoU > 0.5


def mask_intersection_union(pred: np.ndarray | None, gt: np.ndarray) -> tuple[int, int]:
    """Pixel counts ``(intersection, union)`` of a predicted and a GT mask of the same shape; a missing
    prediction (``None``) is an empty mask."""
    gt = np.asarray(gt, dtype=bool)
    if pred is None:
        return 0, int(np.count_nonzero(gt))
    pred = np.asarray(pred, dtype=bool)
    if pred.shape != gt.shape:
        raise EvaluationError(f"mask shapes differ: predicted {pred.shape}, GT {gt.shape}; resize the "
                              "prediction to the original image first")
    return int(np.count_nonzero(pred & gt)), int(np.count_nonzero(pred | gt))


def mask_scores_from_counts(intersections: Sequence[int], unions: Sequence[int],
                            threshold: float = 0.5) -> dict:
    """cIoU (sum of intersections / sum of unions: large objects weigh more), mIoU (mean per-mask IoU:
    every expression counts the same) and P@``threshold`` (fraction of masks with IoU **strictly greater**
    than it) from per-mask pixel counts; a mask whose union is empty has IoU 0. NaN when there are none."""
    if len(intersections) != len(unions):
        raise EvaluationError(f"{len(intersections)} intersections for {len(unions)} unions")
    key = f"P@{threshold:g}"
    if not unions:
        return {"cIoU": math.nan, "mIoU": math.nan, key: math.nan, "count": 0}
    inter = np.asarray(intersections, dtype=np.float64)
    union = np.asarray(unions, dtype=np.float64)
    ious = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    total = float(union.sum())
    return {"cIoU": float(inter.sum()) / total if total else 0.0, "mIoU": float(ious.mean()),
            key: float((ious > threshold).mean()), "count": len(unions)}


def mask_scores(pred_masks: Sequence[np.ndarray], gt_masks: Sequence[np.ndarray]) -> MaskScores:
    """Referring-segmentation scores on full-resolution binary masks (spec 6.1)."""
    if len(pred_masks) != len(gt_masks):
        raise EvaluationError(f"{len(pred_masks)} predicted masks for {len(gt_masks)} GT masks")
    if not gt_masks:
        return MaskScores(float("nan"), float("nan"), float("nan"))
    counts = [mask_intersection_union(pred, gt) for pred, gt in zip(pred_masks, gt_masks)]
    s = mask_scores_from_counts([c[0] for c in counts], [c[1] for c in counts])
    return MaskScores(ciou=s["cIoU"], giou=s["mIoU"], ap50=s["P@0.5"])


def _crop(mask: np.ndarray) -> tuple[np.ndarray, int, int]:
    """The mask's tight box crop with one background pixel around it, and the crop's offset (x0, y0)."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    return np.pad(mask[y0:y1, x0:x1], 1), int(x0) - 1, int(y0) - 1


def _shift_or(a: np.ndarray) -> np.ndarray:
    """``a`` or its 4-neighbours (zeros outside)."""
    out = a.copy()
    out[1:] |= a[:-1]
    out[:-1] |= a[1:]
    out[:, 1:] |= a[:, :-1]
    out[:, :-1] |= a[:, 1:]
    return out


def mask_holes(mask: np.ndarray) -> np.ndarray:
    """The holes of a mask: background pixels not 4-connected to the image border (``bool [H, W]``).

    ``scipy.ndimage.binary_fill_holes`` when scipy is installed, else a numpy flood fill from the border of
    the mask's box (the same answer)."""
    m = np.asarray(mask, dtype=bool)
    if not m.any():
        return np.zeros_like(m)
    try:
        from scipy import ndimage
    except ImportError:
        ndimage = None
    if ndimage is not None:
        return ndimage.binary_fill_holes(m) & ~m
    crop, x0, y0 = _crop(m)
    background = ~crop
    outside = np.zeros_like(crop)
    outside[0, :] = outside[-1, :] = outside[:, 0] = outside[:, -1] = True  # the padding is background
    while True:
        grown = _shift_or(outside) & background
        if np.array_equal(grown, outside):
            break
        outside = grown
    holes = np.zeros_like(m)
    h, w = crop.shape
    holes[y0 + 1:y0 + h - 1, x0 + 1:x0 + w - 1] = (background & ~outside)[1:-1, 1:-1]
    return holes


def has_holes(mask: np.ndarray) -> bool:
    """True when the mask encloses background (a ring: its hole is not part of the object)."""
    return bool(mask_holes(mask).any())


def _depth(crop: np.ndarray) -> np.ndarray:
    """Distance of each mask pixel of ``crop`` (padded with background) to the nearest background pixel:
    Euclidean with scipy or OpenCV, else the number of 4-neighbour erosions that keep it (city block)."""
    try:
        from scipy import ndimage

        return ndimage.distance_transform_edt(crop)
    except ImportError:
        pass
    try:
        import cv2

        return cv2.distanceTransform(crop.astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE).astype(np.float64)
    except ImportError:
        pass
    depth = np.zeros(crop.shape, np.float64)
    current = crop.copy()
    k = 0
    while current.any():
        k += 1
        depth[current] = k
        current = ~_shift_or(~current)  # erosion: a pixel stays when all its 4-neighbours are in the mask
    return depth


def interior_point(mask: np.ndarray) -> tuple[float, float]:
    """One positive point prompt inside a non-empty mask, deterministically: the centre ``(x + 0.5, y + 0.5)``
    of the pixel farthest from the mask's border (holes are border too, so on a ring it lies in the band);
    ties go to the pixel nearest the mask's centroid, then the first in row-major order."""
    m = np.asarray(mask, dtype=bool)
    if m.ndim != 2 or not m.any():
        raise EvaluationError("interior_point needs a non-empty 2-D mask")
    crop, x0, y0 = _crop(m)
    depth = _depth(crop)
    ys, xs = np.nonzero(depth >= depth.max() - 1e-6)
    my, mx = np.nonzero(crop)
    cy, cx = my.mean(), mx.mean()
    k = int(np.lexsort((xs, ys, (ys - cy) ** 2 + (xs - cx) ** 2))[0])
    return float(xs[k] + x0) + 0.5, float(ys[k] + y0) + 0.5


# ------------------------------------------------------------------------------------------------
# tokenisation and Java
# ------------------------------------------------------------------------------------------------

# punctuation tokens that pycocoevalcap's PTBTokenizer removes after tokenising (case-sensitive: with
# ``-lowerCase`` brackets come out as ``-lrb-`` etc. and are kept, exactly as in the toolkit)
PTB_PUNCTUATIONS = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":",
                    "-", "--", "...", ";"}
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_CLITICS = ("n't", "'s", "'re", "'ve", "'ll", "'d", "'m")
_CONTRACTIONS = re.compile(r"(?i)\b(\w+)(n't|'s|'re|'ve|'ll|'d|'m)\b")
_PUNCT = re.compile(r"(\.\.\.|--|(?<!\d)[.,]|[.,](?!\d)|[;:!?()\[\]{}\"`]|'')")  # keep 3.5 and 1,000


def simple_ptb_tokenize(text: str) -> str:
    """Pure-Python approximation of Stanford PTBTokenizer (``-lowerCase``) followed by the
    pycocoevalcap punctuation removal: lower-case, split punctuation and clitics, drop punctuation."""
    text = text.replace("\n", " ").lower()
    text = _CONTRACTIONS.sub(r"\1 \2", text)
    text = _PUNCT.sub(r" \1 ", text)
    tokens = []
    for tok in text.split():
        if tok in _BRACKETS:
            tokens.append(_BRACKETS[tok])
            continue
        if tok not in _CLITICS:
            tok = tok.strip("'")
        if tok and tok not in PTB_PUNCTUATIONS and tok != '"':
            tokens.append(tok)
    return " ".join(tokens)


@functools.lru_cache(maxsize=1)
def java_available() -> bool:
    """True when a working ``java`` is on PATH (METEOR and the PTB tokenizer need it)."""
    if shutil.which("java") is None:
        return False
    try:
        return subprocess.run(["java", "-version"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _pycocoevalcap_dir() -> Path:
    try:
        import pycocoevalcap
    except ImportError as exc:
        raise EvaluationError("caption metrics need pycocoevalcap: pip install 'pixelllm-plugins[eval]' "
                              "(or pip install pycocoevalcap==1.2)") from exc
    return Path(list(pycocoevalcap.__path__)[0])


def ptb_tokenize(captions: dict[object, list[str]], *, use_java: bool | None = None) -> dict[object, list[str]]:
    """Tokenise ``{key: [caption, ...]}`` like the COCO caption toolkit (Stanford PTBTokenizer when
    Java is available and ``use_java`` is not False, else :func:`simple_ptb_tokenize`)."""
    if use_java is None:
        use_java = java_available()
    if use_java:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        _pycocoevalcap_dir()
        flat = {k: [{"caption": c} for c in v] for k, v in captions.items()}
        try:
            return PTBTokenizer().tokenize(flat)
        except OSError:  # e.g. read-only site-packages (the tokenizer writes a temp file there)
            pass
    return {k: [simple_ptb_tokenize(c) for c in v] for k, v in captions.items()}


class Meteor:
    """METEOR 1.5 through the jar bundled with pycocoevalcap (Java). Use as a context manager.

    ``score_pairs([(hypothesis, [references...]), ...])`` returns one score per pair and the
    corpus-level score (what ``pycocoevalcap.meteor.Meteor.compute_score`` returns).
    """

    def __init__(self):
        if not java_available():
            raise EvaluationError("METEOR needs Java (install a JRE, e.g. openjdk-17-jre-headless)")
        jar_dir = _pycocoevalcap_dir() / "meteor"
        self._proc = subprocess.Popen(
            ["java", "-jar", "-Xmx2G", "meteor-1.5.jar", "-", "-", "-stdio", "-l", "en", "-norm"],
            cwd=jar_dir, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self._lock = threading.Lock()

    @staticmethod
    def _clean(text: str) -> str:
        return " ".join(text.replace("|||", " ").split())

    def _ask(self, line: str) -> str:
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write((line + "\n").encode())
        self._proc.stdin.flush()
        answer = self._proc.stdout.readline().decode().strip()
        if not answer:
            raise EvaluationError("the METEOR jar stopped answering (out of memory? try fewer captions)")
        return answer

    def score_pairs(self, pairs: Sequence[tuple[str, Sequence[str]]]) -> tuple[float, list[float]]:
        if not pairs:
            return float("nan"), []
        with self._lock:
            stats = []
            for hyp, refs in pairs:
                refs = [self._clean(r) for r in refs] or [""]
                stats.append(self._ask(" ||| ".join(["SCORE", *refs, self._clean(hyp)])))
            assert self._proc.stdin is not None and self._proc.stdout is not None
            self._proc.stdin.write(("EVAL ||| " + " ||| ".join(stats) + "\n").encode())
            self._proc.stdin.flush()
            scores = [float(self._proc.stdout.readline().strip()) for _ in stats]
            total = float(self._proc.stdout.readline().strip())
        return total, scores

    def close(self) -> None:
        if self._proc.poll() is None:
            if self._proc.stdin is not None:
                self._proc.stdin.close()
            self._proc.kill()
            self._proc.wait()

    def __enter__(self) -> Meteor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_SHARED_METEOR: Meteor | None = None


def shared_meteor() -> Meteor:
    """One METEOR process per Python process (starting the jar takes 10-30 s on 2 cores)."""
    global _SHARED_METEOR
    if _SHARED_METEOR is None or _SHARED_METEOR._proc.poll() is not None:
        _SHARED_METEOR = Meteor()
        atexit.register(_SHARED_METEOR.close)
    return _SHARED_METEOR


# ------------------------------------------------------------------------------------------------
# location-conditioned captioning (and image captioning)
# ------------------------------------------------------------------------------------------------

@dataclass
class CaptionScores:
    bleu4: float
    meteor: float | None  # None when Java is absent
    rouge_l: float
    cider: float
    count: int
    notices: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"BLEU-4": self.bleu4, "METEOR": self.meteor, "ROUGE-L": self.rouge_l, "CIDEr": self.cider,
                "count": self.count, "notices": list(self.notices)}


def caption_scores(predictions: Sequence[str], references: Sequence[Sequence[str]], *,
                   meteor: bool = True, use_java: bool | None = None) -> CaptionScores:
    """BLEU-4 / METEOR / ROUGE-L / CIDEr of one prediction per item against its references, with the
    COCO caption toolkit (spec 6.3: one generated caption per GT box vs that box's caption)."""
    if len(predictions) != len(references):
        raise EvaluationError(f"{len(predictions)} predictions for {len(references)} reference lists")
    if not predictions:
        return CaptionScores(float("nan"), None, float("nan"), float("nan"), 0, ["no captions to score"])
    _pycocoevalcap_dir()
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    java = java_available() if use_java is None else (use_java and java_available())
    notices = []
    if not java:
        why = "Java not found" if use_java is None or use_java else "Java disabled (use_java=False)"
        notices.append(f"{why}: PTB tokenisation used the pure-Python fallback"
                       + (", METEOR skipped" if meteor else ""))
    if not meteor:
        notices.append("METEOR not computed (meteor=False)")
    for i, refs in enumerate(references):
        if not refs:
            raise EvaluationError(f"item {i} has no reference caption")
    res = ptb_tokenize({i: [p] for i, p in enumerate(predictions)}, use_java=java)
    gts = ptb_tokenize({i: list(r) for i, r in enumerate(references)}, use_java=java)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    meteor_score = None
    if meteor and java:
        meteor_score, _ = shared_meteor().score_pairs([(res[i][0], gts[i]) for i in range(len(predictions))])
    return CaptionScores(bleu4=float(bleu[3]), meteor=meteor_score, rouge_l=float(rouge), cider=float(cider),
                         count=len(predictions), notices=notices)


# ------------------------------------------------------------------------------------------------
# attribute accuracy (region captions of synthetic scenes)
# ------------------------------------------------------------------------------------------------

ATTRIBUTE_WORDS: dict[str, frozenset[str]] = {
    "color": frozenset("red green blue yellow purple orange white black gray grey brown pink cyan magenta".split()),
    "size": frozenset("small large big little tiny huge medium".split()),
    "shape": frozenset("circle square triangle star hexagon diamond cross ring pentagon octagon trapezoid arrow "
                       "rectangle oval".split()),
}


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def attribute_words(text: str, vocabulary: dict[str, Iterable[str]] | None = None) -> set[str]:
    """The attribute words (colour, size, shape by default) that occur in ``text``."""
    vocab = set().union(*(set(v) for v in (vocabulary or ATTRIBUTE_WORDS).values()))
    return {w for w in _words(text) if w in vocab}


def attribute_accuracy(predictions: Sequence[str], references: Sequence[str],
                       vocabulary: dict[str, Iterable[str]] | None = None) -> float:
    """Fraction of region captions whose prediction contains every attribute word of the GT caption.
    GT captions without any attribute word are skipped (NaN when none is left)."""
    if len(predictions) != len(references):
        raise EvaluationError(f"{len(predictions)} predictions for {len(references)} references")
    hits = total = 0
    for pred, ref in zip(predictions, references):
        wanted = attribute_words(ref, vocabulary)
        if not wanted:
            continue
        total += 1
        hits += wanted <= set(_words(pred))
    return hits / total if total else float("nan")


# ------------------------------------------------------------------------------------------------
# caption object F1 (whole-image captions of synthetic scenes)
# ------------------------------------------------------------------------------------------------

ObjectTriple = tuple[str, str, str]  # (size, colour, shape)


@functools.lru_cache(maxsize=1)
def scene_vocabulary() -> tuple[frozenset[str], frozenset[str], frozenset[str]]:
    """(sizes, colours, shapes) of the synthetic scenes (``data.synthetic``; the drawable extra shapes
    included, so a caption naming one is parsed, and counts as a wrong object when the scene has none)."""
    from ..data.synthetic import COLORS, EXTRA_SHAPES, SHAPES, SIZES

    return frozenset(SIZES), frozenset(COLORS), frozenset(SHAPES) | frozenset(EXTRA_SHAPES)


def caption_objects(text: str, vocabulary: tuple[Iterable[str], Iterable[str], Iterable[str]] | None = None
                    ) -> list[ObjectTriple]:
    """The ``(size, colour, shape)`` objects a caption names, in order, duplicates kept.

    An object is a size word directly followed by a colour word and a shape word ("a large red circle",
    "an orange star" has no size and is not one). Case, punctuation, articles and "and" between objects do
    not matter; words outside the vocabulary (:func:`scene_vocabulary` by default) only separate objects,
    and plurals are not recognised (the synthetic captions name each object once, in the singular)."""
    sizes, colours, shapes = (frozenset(v) for v in (vocabulary or scene_vocabulary()))
    words = re.findall(r"[a-z]+", str(text).lower())
    found, k = [], 0
    while k + 2 < len(words):
        if words[k] in sizes and words[k + 1] in colours and words[k + 2] in shapes:
            found.append((words[k], words[k + 1], words[k + 2]))
            k += 3
        else:
            k += 1
    return found


def object_prf(predicted: Iterable[ObjectTriple], ground_truth: Iterable[ObjectTriple]) -> dict:
    """Precision, recall and F1 of named objects against a scene's objects, both multisets of triples
    (a duplicate counts only as often as the scene has that object). An empty denominator gives 1.0 when
    both are empty and 0.0 otherwise (an empty caption of a non-empty scene: precision 0, recall 0)."""
    from collections import Counter

    pred, gt = Counter(predicted), Counter(ground_truth)
    n_pred, n_gt = sum(pred.values()), sum(gt.values())
    tp = sum((pred & gt).values())
    both_empty = 1.0 if n_pred == 0 and n_gt == 0 else 0.0
    return {"precision": tp / n_pred if n_pred else both_empty, "recall": tp / n_gt if n_gt else both_empty,
            "f1": 2 * tp / (n_pred + n_gt) if n_pred + n_gt else 1.0,
            "matched": tp, "predicted": n_pred, "ground_truth": n_gt}


def caption_object_f1(predictions: Sequence[str], scenes: Sequence[Iterable[ObjectTriple]],
                      vocabulary: tuple[Iterable[str], Iterable[str], Iterable[str]] | None = None) -> dict:
    """Object F1 of whole-image captions: the triples each caption names (:func:`caption_objects`) against
    its scene's objects, micro over all images (``precision``, ``recall``, ``f1`` from the summed counts)
    and the mean of the per-image values (``*_per_image``, :func:`object_prf`). NaN with no image."""
    if len(predictions) != len(scenes):
        raise EvaluationError(f"{len(predictions)} captions for {len(scenes)} scenes")
    per_image = [object_prf(caption_objects(p, vocabulary), list(s)) for p, s in zip(predictions, scenes)]
    if not per_image:
        return {k: math.nan for k in ("precision", "recall", "f1", "precision_per_image", "recall_per_image",
                                      "f1_per_image")} | {"matched": 0, "predicted": 0, "ground_truth": 0,
                                                          "images": 0}
    tp, n_pred, n_gt = (sum(r[k] for r in per_image) for k in ("matched", "predicted", "ground_truth"))
    micro = object_prf([], [])  # the empty-denominator convention, then the counts
    if n_pred or n_gt:
        micro = {"precision": tp / n_pred if n_pred else 0.0, "recall": tp / n_gt if n_gt else 0.0,
                 "f1": 2 * tp / (n_pred + n_gt)}
    return {"precision": micro["precision"], "recall": micro["recall"], "f1": micro["f1"],
            "precision_per_image": float(np.mean([r["precision"] for r in per_image])),
            "recall_per_image": float(np.mean([r["recall"] for r in per_image])),
            "f1_per_image": float(np.mean([r["f1"] for r in per_image])),
            "matched": tp, "predicted": n_pred, "ground_truth": n_gt, "images": len(per_image)}


# ------------------------------------------------------------------------------------------------
# dense captioning: Visual Genome protocol (Johnson et al., as in scenic's DensecapEval)
# ------------------------------------------------------------------------------------------------

DENSECAP_IOU_THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)
DENSECAP_METEOR_THRESHOLDS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25)
DENSECAP_MERGE_IOU = 0.7


@dataclass
class DenseGT:
    boxes: list[tuple[float, float, float, float]]  # xyxy
    captions: list[str]


@dataclass
class DenseDetection:
    box: tuple[float, float, float, float]  # xyxy
    caption: str
    score: float


def merge_gt_boxes(boxes: Sequence[Sequence[float]], captions: Sequence[str],
                   iou_threshold: float = DENSECAP_MERGE_IOU) -> list[tuple[tuple[float, ...], list[str]]]:
    """Merge overlapping GT regions of one image: repeatedly take the box with the most boxes at
    IoU >= threshold (itself included, first on ties), average that cluster's boxes and keep all its
    captions as references; remove the cluster and repeat until no box is left."""
    if len(boxes) == 0:
        return []
    gt = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    ious = box_iou_matrix(gt, gt)
    merged = []
    while True:
        can_merge = ious >= iou_threshold
        counts = can_merge.sum(axis=1)
        i = int(np.argmax(counts))
        if counts[i] == 0:
            break
        members = np.nonzero(can_merge[i])[0]
        merged.append((tuple(float(v) for v in gt[members].mean(axis=0)),
                       [captions[j].replace("\n", "") for j in members]))
        ious[members, :] = 0.0
        ious[:, members] = 0.0
    return merged


def interpolated_ap(tp: Sequence[float], fp: Sequence[float], num_positives: int) -> float:
    """100-point interpolated AP of a ranked list: mean over t = 0, 0.01, ..., 0.99 of the best
    precision at recall >= t (0 when nothing reaches t)."""
    tp_c, fp_c = np.cumsum(np.asarray(tp, dtype=np.float64)), np.cumsum(np.asarray(fp, dtype=np.float64))
    if len(tp_c) == 0:
        return 0.0
    rec = tp_c / max(num_positives, 1e-12)
    prec = tp_c / np.maximum(tp_c + fp_c, 1e-12)
    return float(sum((prec * (rec >= t / 100.0)).max() for t in range(100)) / 100.0)


MeteorFn = Callable[[Sequence[tuple[str, Sequence[str]]]], Sequence[float]]


def densecap_map(detections: Sequence[Sequence[DenseDetection]], ground_truth: Sequence[DenseGT], *,
                 meteor_fn: MeteorFn | None = None, merge_iou: float | None = DENSECAP_MERGE_IOU) -> dict:
    """Dense-captioning mAP (spec 6.2), per image lists aligned by index.

    Per image: GT merged at IoU >= 0.7; detections by descending score, each matched to its
    highest-IoU GT (if that IoU > 0 and the GT is still unused). All records are then ranked by
    score; a record is a true positive at (IoU t, METEOR m) when matched, IoU >= t and METEOR > m.
    ``mAP`` averages the 5 x 6 APs; ``mAP_detection`` averages the 5 IoU-only APs.

    ``meteor_fn(pairs) -> scores`` scores (candidate, references) pairs; by default Java METEOR.
    Without Java, ``mAP`` is None and a notice says so.
    """
    if len(detections) != len(ground_truth):
        raise EvaluationError(f"detections for {len(detections)} images, GT for {len(ground_truth)}")
    records = []  # (score, matched, iou, candidate, references)
    num_pos = 0
    for dets, gt in zip(detections, ground_truth):
        if merge_iou is not None:
            merged = merge_gt_boxes(gt.boxes, gt.captions, merge_iou)
        else:
            merged = [(tuple(b), [c]) for b, c in zip(gt.boxes, gt.captions)]
        num_pos += len(merged)
        gt_boxes = [m[0] for m in merged]
        used = [False] * len(merged)
        ordered = sorted(dets, key=lambda d: -d.score)
        ious = box_iou_matrix([d.box for d in ordered], gt_boxes) if gt_boxes else None
        for i, det in enumerate(ordered):
            if merged:
                j = int(np.argmax(ious[i]))
                best, refs = float(ious[i, j]), list(merged[j][1])
            else:
                j, best, refs = -1, -1.0, [""]
            matched = best > 0 and not used[j]
            candidate = det.caption
            if matched:
                used[j] = True
                if "" in refs:  # the reference implementation's ignore_empty_string
                    candidate, refs = "EMPTY", ["EMPTY"]
            records.append((float(det.score), matched, best, candidate, refs))
    records.sort(key=lambda r: -r[0])
    notices = []
    # Unmatched records are false positives whatever their METEOR, so only matched ones are scored.
    to_score = [i for i, r in enumerate(records) if r[1]]
    meteor = np.zeros(len(records))
    have_meteor = True
    if to_score:
        pairs = [(records[i][3], records[i][4]) for i in to_score]
        if meteor_fn is None:
            if java_available():
                scores = shared_meteor().score_pairs(pairs)[1]
            else:
                have_meteor, scores = False, [1.0] * len(pairs)
                notices.append("Java not found: METEOR skipped, only mAP_detection reported")
        else:
            scores = list(meteor_fn(pairs))
        meteor[to_score] = scores

    def ap(iou_t: float, meteor_t: float | None) -> float:
        tp = np.array([r[1] and r[2] >= iou_t and (meteor_t is None or meteor[k] > meteor_t)
                       for k, r in enumerate(records)], dtype=np.float64)
        return interpolated_ap(tp, 1.0 - tp, num_pos)

    out: dict = {"num_detections": len(records), "num_gt_after_merge": num_pos, "notices": notices}
    det_aps = {f"AP_detection_iou{t:.1f}": ap(t, None) for t in DENSECAP_IOU_THRESHOLDS}
    out["mAP_detection"] = float(np.mean(list(det_aps.values())))
    if have_meteor:
        aps = {f"AP_iou{t:.1f}_meteor{m:.2f}": ap(t, m)
               for t in DENSECAP_IOU_THRESHOLDS for m in DENSECAP_METEOR_THRESHOLDS}
        out["mAP"] = float(np.mean(list(aps.values())))
        out["breakdown"] = aps
    else:
        out["mAP"] = None
    out["detection_breakdown"] = det_aps
    return out


# ------------------------------------------------------------------------------------------------
# trace
# ------------------------------------------------------------------------------------------------

def trace_point_l1_image(pred_points: np.ndarray, gt_points: np.ndarray, valid: np.ndarray | None = None) -> float:
    """Point L1 of one image (spec 6.5), coordinates already normalised by the image (W, H).

    ``pred_points [..., T, P, 2]`` and ``gt_points [..., T, G, 2]``; for each predicted point the
    L1 (mean over x, y) to the closest of the token's GT points, averaged over the P predicted
    points, then over the valid tokens (``valid [..., T]`` and a non-zero GT). NaN when no token is valid.
    """
    pred = np.asarray(pred_points, dtype=np.float64)
    gt = np.asarray(gt_points, dtype=np.float64)
    if pred.shape[:-2] != gt.shape[:-2] or pred.shape[-1] != 2 or gt.shape[-1] != 2:
        raise EvaluationError(f"point shapes do not line up: predicted {pred.shape}, GT {gt.shape}; "
                              "expected [..., tokens, points, 2] for both")
    mask = gt.max(axis=(-2, -1)) > 0
    if valid is not None:
        mask = mask & np.asarray(valid, dtype=bool)
    dist = np.abs(pred[..., :, None, :] - gt[..., None, :, :]).mean(axis=-1)  # [..., T, P, G]
    per_token = dist.min(axis=-1).mean(axis=-1)
    n = mask.sum()
    return float((per_token * mask).sum() / n) if n else float("nan")


def trace_point_l1(per_image: Iterable[float]) -> float:
    """Average the per-image point L1 values over images (images without valid tokens skipped)."""
    values = [v for v in per_image if not math.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


__all__ = [
    "ATTRIBUTE_WORDS", "CaptionScores", "DenseDetection", "DenseGT", "EvaluationError", "MaskScores", "Meteor",
    "attribute_accuracy", "attribute_words", "box_iou_matrix", "box_precision", "caption_scores", "densecap_map",
    "interpolated_ap", "java_available", "mask_scores", "merge_gt_boxes", "ptb_tokenize", "simple_ptb_tokenize",
    "trace_point_l1", "trace_point_l1_image",
]


def expected_calibration_error(scores: Sequence[float], right: Sequence[bool], bins: int = 10) -> float:
    """ECE over ``bins`` equal-width score bins: the count-weighted gap between mean score and hit rate."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(right, dtype=np.float64)
    if len(s) == 0:
        return 0.0
    index = np.minimum((s * bins).astype(int), bins - 1)
    counts = np.bincount(index, minlength=bins)
    gap = np.abs(np.bincount(index, s, bins) - np.bincount(index, y, bins))  # per bin: count x |mean gap|
    return float(gap[counts > 0].sum() / len(s))


def ece_floor(scores: Sequence[float], bins: int = 10, draws: int = 200, seed: int = 0) -> float:
    """The ECE that a perfectly calibrated score with these values would show on this many boxes: the mean
    ECE over ``draws`` redraws of the outcomes, each box right with probability its score (consistency
    resampling, Broecker & Smith 2007). A measured ECE near this floor is sampling noise, not
    miscalibration: on 150 boxes the floor is about 0.08, on 600 about 0.04."""
    s = np.clip(np.asarray(scores, dtype=np.float64), 0.0, 1.0)
    if len(s) == 0:
        return 0.0
    rng = np.random.default_rng(seed)
    return float(np.mean([expected_calibration_error(s, rng.random(len(s)) < s, bins) for _ in range(draws)]))
