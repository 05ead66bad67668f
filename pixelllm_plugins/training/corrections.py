"""Learning from a few corrections: one gated fine-tune round.

Both plugins turn the annotations people submit into a data folder in the training formats
(``refcoco_<split>.json``, ``vg_<split>.json``, ``images/<split>/``) and call :func:`run_correction_round`:

1. :func:`plan_round` picks the LoRA rank, steps and learning rate from the number of corrections;
2. :func:`split_holdout` holds out a seeded slice of the corrected *images* (all expressions and regions of
   an image stay on one side); with fewer than :data:`MIN_FOR_GATE` images everything trains and the gate
   is skipped;
3. the training folder mixes the corrections with **replay** of base data: synthetic scenes of the
   project's own generator (``data/synthetic.py``), rendered once into a cache folder
   (:func:`replay_cache`), so a handful of corrections cannot pull the model away from what it knew. The
   whole replay pool trains (measured: a LoRA round on 12 base scenes alone lost 0.054 refer P@0.5 on
   base data, on 96 it lost 0.006), and the corrections are repeated so that they are ``1 - replay`` of
   the training images;
4. the adapter is trained with ``finetune`` (injectable: ``trainer=``), the point and confidence heads at
   a tenth of the learning rate, and keeps half of its update (:data:`DEFAULT_KEEP`): both trade some of
   the new concept for what the base knew;
5. the **gate**: the new adapter and the current version (the base, or ``current_adapter``) are scored on
   the held-out slice (refer P@0.5, ``evaluation.evaluate.eval_refer``; injectable: ``evaluator=``), and on
   a **retention** slice of replay scenes that never train (what the base knew). The round is rejected when
   it gets at least :data:`HELDOUT_MARGIN` fewer held-out expressions right than the current version, or
   its retention score is more than :data:`RETENTION_TOLERANCE` lower; otherwise it is accepted (a tie or
   a smaller loss: the held-out slice of a few corrections cannot tell it apart from chance, and the round
   trained on more corrections). A skipped gate accepts.

Words the base tokenizer can only spell in pieces ("pentagon") get their own token in the adapter
(``modeling.new_words``): only their embedding and output rows learn, at :data:`NEW_WORD_LR`, starting from
the mean of the object names the replay captions end with, so texts without them read exactly as before.

Hard negatives are not added: the refer loss regresses the box of each expression and has no "not this
object" term. The other annotated objects of an image already take part: every expression of an image is
trained on that image, and all its referred boxes are the proposal head's targets of that image.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..data.formats import write_refer_and_regions
from ..errors import PixelLLMError, TrainingError

log = logging.getLogger(__name__)

MIN_FOR_GATE = 4  # corrected images needed before some are held out for the gate
RETENTION_IMAGES = 32  # replay scenes kept out of training to check that the base's skills stay
RETENTION_TOLERANCE = 0.02  # P@0.5 the retention slice may lose (a few expressions of noise)
# Held-out expressions the new round must lose (net) before the gate rejects it. Two equally good versions
# differ by 3 or more expressions one way with probability at most 1/8 (a sign test on the expressions
# where they disagree). Measured on "pentagon" (150 held-out expressions): a round of 8 that raised P@0.5
# from 0.440 to 0.613 lost 1 of its 2 held-out expressions, a round of 16 that raised it from 0.487 to
# 0.620 lost 2 of 4; rejecting on any loss threw both away.
HELDOUT_MARGIN = 3
RETENTION_SPLIT = "retention"
DEFAULT_HOLDOUT_FRACTION = 0.25
DEFAULT_REPLAY = 0.5  # share of the training images that are replay scenes
REPLAY_SPLIT = "replay"
REPLAY_SEED = 20_020  # the replay scenes are the same on every machine
DEFAULT_REPLAY_IMAGES = 96  # replay scenes that train: many, so the base's side never overfits
DEFAULT_REPLAY_LOOK = "varied"  # the embedded model's training scenes (SceneConfig.preset)
HOLDOUT_SPLIT = "holdout"
TRAIN_SPLIT = "train"

Trainer = Callable[..., object]
# evaluator(base, adapter or None, data_dir, split) -> refer P@0.5 on that split
Evaluator = Callable[[str, "str | None", Path, str], float]


# ---- the plan ---------------------------------------------------------------------------------------------

# The point and confidence heads train as full per-adapter copies (``modeling.lora``): at the round's
# learning rate they are what forgets (measured on "pentagon", 32 corrections: regular refer P@0.5 0.843 ->
# 0.801 at 1x, 0.843 at 0.1x, while the new concept still rose 0.55 -> 0.60).
HEAD_MODULES = ("point_head.", "confidence_head.")
DEFAULT_HEAD_LR_SCALE = 0.1
# A round keeps half of its update (LoRA scaled, head copies halfway back to the base; modeling.lora.
# scale_adapter). Measured on "pentagon" with 150 new-concept and 595 regular expressions: after 8 / 16 / 32
# corrections the whole update gave 0.507 / 0.573 / 0.580 and cost 1.5 / 1.3 / 1.8 points on the regular
# split; half of it gives 0.500 / 0.533 / 0.533 and costs 0.5 / 0.7 / 0.3 points (base 0.487 / 0.845).
DEFAULT_KEEP = 0.5
# The new words' rows: nothing else reads them, so they can move fast. Measured on "pentagon" (150 held-out
# new-concept expressions, 2-core CPU): docs/label-studio.md.
NEW_WORD_LR = 5e-3
NEW_WORD_FALSE_RATE = 0.01  # share of regions without a new word whose caption may still prefer it
NEW_WORD_MARGIN = 0.5  # logits below the right word that a settled new word is kept, at that share
MAX_ANCHORS = 16
STEPS_PER_CORRECTION = 7.5
# A round's images keep their scale (region rows may still flip), so each has at most two canvases and
# its image embedding is computed once and reused (training.embedding_cache) while the image side is frozen;
# the images are decoded once; a training row takes at most 3 of an image's texts (replay scenes have
# about 6). Measured on "pentagon" (docs/label-studio.md): the same new-concept and regular scores, a round
# of 32 in about half the time.
ROUND_AUGMENT_SCALE = {"refer": [1.0, 1.0], "region": [1.0, 1.0]}
ROUND_MAX_PROMPTS = {"refer": 3, "region": 3}


@dataclass(frozen=True)
class RoundPlan:
    """LoRA rank (alpha = 2 x rank, the paper's scale), optimizer steps and learning rate of one round, and
    the learning-rate scale of the fully trained heads."""

    rank: int
    steps: int
    lr: float
    head_lr_scale: float = DEFAULT_HEAD_LR_SCALE
    keep: float = DEFAULT_KEEP  # the fraction of the trained update the adapter keeps

    @property
    def lr_multipliers(self) -> dict[str, float]:
        """``TrainConfig.lr_multipliers`` of the round (by parameter-name prefix)."""
        return {prefix: self.head_lr_scale for prefix in HEAD_MODULES} if self.head_lr_scale != 1.0 else {}

    @property
    def alpha(self) -> int:
        return 2 * self.rank


def plan_round(n_examples: int) -> RoundPlan:
    """The round's size from the number of corrected images ``n_examples``.

    Few corrections overfit a large, long, fast update (measured: 8 corrections, rank 8, 100 steps at 1e-3
    lost P@0.5). So: rank 4 below 16 corrections, 8 below 64, else 16; 7.5 steps per correction (10 gave
    the same new-concept P@0.5 on "pentagon" after 32 corrections, with a worse-calibrated score),
    within 60 to 400; learning rate 5e-4 below 16 corrections, else 1e-3 (2e-3 costs the base's shapes,
    docs/training.md)."""
    if n_examples < 1:
        raise TrainingError("a correction round needs at least one corrected image")
    rank = 4 if n_examples < 16 else 8 if n_examples < 64 else 16
    steps = int(min(400, max(60, round(STEPS_PER_CORRECTION * n_examples))))
    lr = 5e-4 if n_examples < 16 else 1e-3
    return RoundPlan(rank=rank, steps=steps, lr=lr)


# ---- the held-out slice -------------------------------------------------------------------------------------

def split_holdout(keys: list[str], fraction: float = DEFAULT_HOLDOUT_FRACTION, seed: int = 0
                  ) -> tuple[list[str], list[str]]:
    """(train, holdout) of the distinct ``keys`` (image file names), deterministic for a seed and
    independent of the input order. Below :data:`MIN_FOR_GATE` keys (or ``fraction`` 0) nothing is held
    out; otherwise at least one key is, and at least one trains."""
    if not 0.0 <= fraction < 1.0:
        raise TrainingError(f"holdout_fraction must be in [0, 1), got {fraction}")
    keys = sorted(set(keys))
    if len(keys) < MIN_FOR_GATE or fraction == 0.0:
        return keys, []
    shuffled = list(keys)
    random.Random(seed).shuffle(shuffled)
    n_hold = min(len(keys) - 1, max(1, round(fraction * len(keys))))
    holdout = set(shuffled[:n_hold])
    return [k for k in keys if k not in holdout], [k for k in keys if k in holdout]


# ---- data folders -------------------------------------------------------------------------------------------

@dataclass
class _Records:
    """The refer and region records of a folder, by image file name."""

    refer_images: list[dict] = field(default_factory=list)
    refer_anns: list[dict] = field(default_factory=list)
    vg_images: list[dict] = field(default_factory=list)
    vg_anns: list[dict] = field(default_factory=list)
    categories: list[dict] = field(default_factory=list)
    image_dir: Path = Path()

    @property
    def file_names(self) -> list[str]:
        return sorted({r["file_name"] for r in self.refer_images + self.vg_images})


def _read_records(data_dir: Path, split: str) -> _Records:
    out = _Records(image_dir=data_dir / "images" / split)
    for kind in ("refcoco", "vg"):
        path = data_dir / f"{kind}_{split}.json"
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text())
            images, anns = list(data["images"]), list(data["annotations"])
        except (ValueError, KeyError, TypeError) as exc:
            raise TrainingError(f"{path} is not a {kind} json with 'images' and 'annotations': {exc}") from exc
        out.categories = data.get("categories") or out.categories
        if kind == "refcoco":
            out.refer_images, out.refer_anns = images, anns
        else:
            out.vg_images, out.vg_anns = images, anns
    return out


def _renumbered(images: list[dict], anns: list[dict], offset: int, rename: Callable[[str], str],
                keep: set[str] | None, refcoco: bool) -> tuple[list[dict], list[dict]]:
    """The records of the images in ``keep`` (all when None), ids shifted by ``offset``, files renamed."""
    def shift(value):
        return value + offset if isinstance(value, int) and not isinstance(value, bool) else f"{offset}:{value}"

    kept = {r["id"]: r for r in images if keep is None or r["file_name"] in keep}
    new_images = []
    for r in kept.values():
        rec = dict(r, id=shift(r["id"]), file_name=rename(r["file_name"]))
        if refcoco and "original_img_id" in rec:
            rec["original_img_id"] = f"{offset}:{rec['original_img_id']}"
        new_images.append(rec)
    new_anns = [dict(a, id=shift(a["id"]), image_id=shift(a["image_id"]))
                for a in anns if a.get("image_id") in kept]
    return new_images, new_anns


def _place(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _write_folder(out_dir: Path, split: str, parts: list[tuple[_Records, set[str] | None, str]],
                  copies: dict[int, int] | None = None) -> dict[str, int]:
    """A data folder of ``split`` from (records, kept file names, file prefix) parts; returns counts.
    ``copies``: part index -> how many times its records appear (as distinct images of the same file)."""
    if out_dir.exists():
        shutil.rmtree(out_dir)
    (out_dir / "images" / split).mkdir(parents=True)
    ref_images, ref_anns, vg_images, vg_anns, categories = [], [], [], [], []
    files: set[str] = set()
    for k, (rec, keep, prefix) in enumerate(parts):
        def rename(name: str, prefix=prefix) -> str:
            return prefix + name.replace("/", "_")
        for c in range((copies or {}).get(k, 1)):
            offset = (k * 1000 + c + 1) * 10_000_000
            ri, ra = _renumbered(rec.refer_images, rec.refer_anns, offset, rename, keep, refcoco=True)
            vi, va = _renumbered(rec.vg_images, rec.vg_anns, offset, rename, keep, refcoco=False)
            ref_images += ri
            ref_anns += ra
            vg_images += vi
            vg_anns += va
        categories = categories or rec.categories
        for name in {r["file_name"] for r in rec.refer_images + rec.vg_images}:
            if keep is None or name in keep:
                _place(rec.image_dir / name, out_dir / "images" / split / rename(name))
                files.add(rename(name))
    categories = categories or [{"id": 1, "name": "object", "supercategory": "object"}]
    write_refer_and_regions(out_dir, split, (ref_images, ref_anns), (vg_images, vg_anns), categories)
    return {"images": len(files), "refer": len(ref_anns), "regions": len(vg_anns)}


def default_replay_dir() -> Path:
    """``PIXELLLM_REPLAY_DIR``, else ``~/.cache/pixelllm/replay``."""
    env = os.environ.get("PIXELLLM_REPLAY_DIR", "").strip()
    return Path(env) if env else Path.home() / ".cache" / "pixelllm" / "replay"


def replay_cache(cache_dir: str | Path | None = None, num_images: int = DEFAULT_REPLAY_IMAGES,
                 look: str = DEFAULT_REPLAY_LOOK) -> Path:
    """A folder of ``num_images`` synthetic base scenes of ``look`` (split ``replay``, in ``<cache_dir>/<look>``),
    rendered once by the project's generator (nothing is downloaded) and reused while it has at least that
    many."""
    from ..data.formats import write_synthetic_dataset

    cache_dir = (Path(cache_dir) if cache_dir is not None else default_replay_dir()) / look
    manifest = cache_dir / f"manifest_{REPLAY_SPLIT}.json"
    try:
        if json.loads(manifest.read_text())["num_images"] >= num_images:
            return cache_dir
    except (OSError, ValueError, KeyError, TypeError):
        pass
    tmp = cache_dir.with_name(f"{cache_dir.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        write_synthetic_dataset(tmp, REPLAY_SPLIT, num_images, seed=REPLAY_SEED, look=look)
    except ValueError as exc:  # an unknown look
        raise TrainingError(f"cannot render replay scenes: {exc}") from exc
    if cache_dir.exists():
        shutil.rmtree(cache_dir)
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, cache_dir)
    log.info("replay: rendered %d synthetic base scenes (%s) into %s", num_images, look, cache_dir)
    return cache_dir


def prepare_replay(replay_dir: str | Path | None = None) -> Path:
    """Render the replay and retention scenes a default round reads (:func:`replay_cache`), ahead of the
    first round: a server calls it when the first correction arrives, so that round starts training at once
    (rendering the 128 scenes takes about 5 s of a 2-core CPU, more while the server is busy)."""
    return replay_cache(replay_dir, DEFAULT_REPLAY_IMAGES + RETENTION_IMAGES, DEFAULT_REPLAY_LOOK)


# ---- evaluation ---------------------------------------------------------------------------------------------

class _RoundPredictor:
    """One in-process Predictor of ``base`` for everything a round scores after training (settling new words,
    both sides of the gate), made on first use: the base loads once, and an image is embedded once for
    every adapter that leaves the image side alone. Adapters load under names of their own, by folder."""

    def __init__(self, base: str):
        self.base = base
        self._predictor = None
        self._names: dict[str, str] = {}

    @property
    def predictor(self):
        if self._predictor is None:
            import torch

            from ..inference.predictor import Predictor

            self._predictor = Predictor(self.base, device="cpu", dtype=torch.float32, cache_size=64)
        return self._predictor

    def adapter(self, path: str | None) -> str | None:
        """The loaded name of the adapter folder ``path`` (None: the base), loading it the first time."""
        if path is None:
            return None
        path = str(path)
        if path not in self._names:
            self._names[path] = self.predictor.load_adapter(path, f"round-{len(self._names)}")
        return self._names[path]


_ROUND: contextvars.ContextVar[_RoundPredictor | None] = contextvars.ContextVar("correction_round", default=None)


def _round_predictor(base: str) -> _RoundPredictor:
    """The running round's shared predictor when it is of ``base``, else a new one."""
    shared = _ROUND.get()
    return shared if shared is not None and shared.base == str(base) else _RoundPredictor(str(base))


def _one_predictor_per_round(round_fn):
    """Run a round with one shared predictor of its base (made only if something scores)."""
    @functools.wraps(round_fn)
    def run(base, *args, **kwargs):
        token = _ROUND.set(_RoundPredictor(str(base)))
        try:
            return round_fn(base, *args, **kwargs)
        finally:
            _ROUND.reset(token)

    return run


def refer_p50(base: str, adapter: str | None, data_dir: Path, split: str) -> float:
    """Refer P@0.5 of ``base`` (+ ``adapter``) on the ``refcoco_<split>.json`` of ``data_dir``, in-process."""
    from ..evaluation.evaluate import eval_refer, load_task_samples

    shared = _round_predictor(base)
    name = shared.adapter(adapter)
    samples = load_task_samples(data_dir, split, "refer")
    return float(eval_refer(shared.predictor, samples, batch_size=8, adapter=name)["P@0.5"])


def _texts(records: _Records, names: set[str] | None = None) -> list[str]:
    """The referring expressions and region captions of the images in ``names`` (all when None)."""
    def ids(images):
        return {r["id"] for r in images if names is None or r["file_name"] in names}

    refer, vg = ids(records.refer_images), ids(records.vg_images)
    # MDETR-style refcoco: the expression is the image record's caption
    texts = [str(r.get("caption") or "") for r in records.refer_images if r["id"] in refer]
    texts += [str(a.get("caption") or a.get("phrase") or "") for a in records.vg_anns if a.get("image_id") in vg]
    return [t for t in texts if t]


def data_texts(data_dir: str | Path, split: str) -> list[str]:
    """The referring expressions and region captions of a data folder's ``split``."""
    return _texts(_read_records(Path(data_dir), split))


def round_new_words(base: str, texts: list[str], anchor_texts: list[str]) -> tuple[list[str], list[str]]:
    """(new words, anchors) of a round: the words of ``texts`` that the base's tokenizer spells in pieces,
    and the one-token words that ``anchor_texts`` (the replay captions) end with most often. Neither for a
    base whose language model or tokenizer cannot take new words."""
    from ..config import PixelLLMConfig
    from ..modeling.new_words import find_new_words
    from ..tokenizer import PixelTokenizer

    try:
        tokenizer = PixelTokenizer.load(base)
        language = PixelLLMConfig.load(Path(base) / "config.json").language.kind
    except PixelLLMError:  # not a checkpoint folder (a stand-in trainer's base): the round still runs
        return [], []
    if tokenizer.kind == "hf" or language != "git":
        return [], []
    words = find_new_words(tokenizer, texts)
    ends: dict[str, int] = {}
    for text in anchor_texts:
        last = text.lower().split()[-1:] or [""]
        if last[0].isalpha() and len(tokenizer.encode(last[0], add_eos=False)) == 1:
            ends[last[0]] = ends.get(last[0], 0) + 1
    anchors = [w for w, _ in sorted(ends.items(), key=lambda kv: (-kv[1], kv[0]))[:MAX_ANCHORS]]
    return words, anchors


def settle_new_words(base: str, adapter: str | Path, negatives: Path, split: str,
                     rate: float = NEW_WORD_FALSE_RATE, max_regions: int = 400) -> dict[str, float]:
    """Lower the output bias of the adapter's new words until, teacher-forced on the region captions of
    ``negatives`` (scenes without the new concepts: the retention slice), each outranks the right next
    word in at most ``rate`` of the regions. A round's corrections are half of its training images, so a
    new word learns to be written far more often than it is right (measured on "pentagon" after 32
    corrections: 8 of 108 regular regions, 6 of them hexagons, captioned "pentagon"; settled, none).
    Returns word -> the logit subtracted (0: none needed)."""
    from ..evaluation.evaluate import load_task_samples
    from ..modeling.new_words import read_words

    info = read_words(adapter)
    samples = load_task_samples(negatives, split, "region") if (negatives / f"vg_{split}.json").is_file() else []
    if info is None or not samples:
        return {}
    predictor = _round_predictor(base).predictor
    name = predictor.load_adapter(adapter, "settle")
    try:
        return _settle(predictor, name, info, adapter, samples, rate, max_regions)
    finally:
        predictor.unload_adapter(name)  # its output bias changes on disk: the gate loads it again


def _settle(predictor, name: str, info: dict, adapter: str | Path, samples: list, rate: float,
            max_regions: int) -> dict[str, float]:
    import torch

    from ..modeling.new_words import lower_output_bias

    first = info["base_vocab_size"]
    ids = list(range(first, first + len(info["words"])))
    margins: list[list[float]] = []  # per region, per new word: its best lead over the right next token
    for sample in samples:
        if len(margins) >= max_regions:
            break
        prompts = sample.prompts[:max_regions - len(margins)]
        image = sample.load_image()
        for tokens, logits in predictor.region_text_logits(image, [p.box for p in prompts], [p.text for p in prompts],
                                                           adapter=name):
            right = logits[torch.arange(len(tokens) - 1), torch.tensor(tokens[1:])]
            margins.append((logits[:len(tokens) - 1, ids] - right[:, None]).max(0).values.tolist())
    table = torch.tensor(margins)
    quantile = torch.quantile(table, 1.0 - rate, dim=0) if len(margins) > 1 else table.max(0).values
    lowered = {token: max(0.0, float(q) + NEW_WORD_MARGIN) for token, q in zip(ids, quantile)}
    if any(lowered.values()):
        lower_output_bias(adapter, predictor.model, {t: v for t, v in lowered.items() if v > 0})
    out = {word: round(lowered[token], 4) for word, token in zip(info["words"], ids)}
    log.info("new words: output bias lowered by %s (on %d regions without them)", out, len(margins))
    return out


def heldout_loss(current: float, new: float, expressions: int) -> float:
    """How many more of ``expressions`` held-out expressions the current version gets right than the new
    one, from their P@0.5 scores (0 when the new one is as good or better)."""
    return round(max(0.0, (current - new) * max(1, expressions)), 2)


def _default_trainer(*, from_model, data_dir, out_adapter, steps, **kwargs):
    from .isolated import finetune_isolated

    return finetune_isolated(from_model, data_dir, out_adapter, steps=steps, **kwargs)


# ---- the round ----------------------------------------------------------------------------------------------

@dataclass
class RoundResult:
    """What a round did. ``accepted``: the new adapter should become the version."""

    adapter: str
    accepted: bool
    gate: str  # "passed", "rejected", or "skipped: <why>"
    plan: RoundPlan
    train: dict[str, int]  # images / refer / regions that trained, replay included
    holdout: dict[str, int]
    replay_images: int
    correction_copies: int = 1  # how many times each correction appears in the training folder
    new_words: list[str] = field(default_factory=list)  # words that got their own token in the adapter
    new_word_offsets: dict[str, float] = field(default_factory=dict)  # how far each one's output bias was lowered
    new_score: float | None = None  # refer P@0.5 on the held-out slice
    current_score: float | None = None
    heldout_lost: float = 0.0  # held-out expressions the current version gets right and the new one does not (net)
    new_retention: float | None = None  # refer P@0.5 on the retention slice of replay scenes
    current_retention: float | None = None
    reason: str = ""  # why a round was rejected
    seconds: float = 0.0

    def to_dict(self) -> dict:
        out = asdict(self)
        out["plan"] = {**asdict(self.plan), "alpha": self.plan.alpha}
        return out

    @classmethod
    def from_dict(cls, data: dict) -> RoundResult:
        """The result :meth:`to_dict` wrote (a round run in another process)."""
        plan = {k: v for k, v in data["plan"].items() if k != "alpha"}
        return cls(**{**data, "plan": RoundPlan(**plan)})

    def summary(self) -> str:
        words = f"; new words: {', '.join(self.new_words)}" if self.new_words else ""
        if self.new_score is None:
            return f"gate {self.gate}{words}"
        text = (f"gate {self.gate}{': ' + self.reason if self.reason else ''}: held-out P@0.5 new "
                f"{self.new_score:.3f} vs current {self.current_score:.3f} on {self.holdout.get('refer', 0)} "
                "expressions")
        if self.heldout_lost and self.accepted:
            text += f" ({self.heldout_lost:g} fewer right: within chance)"
        elif self.heldout_lost:
            text += f" ({self.heldout_lost:g} fewer right)"
        if self.new_retention is not None:
            text += f"; retention P@0.5 new {self.new_retention:.3f} vs current {self.current_retention:.3f}"
        return text + words


@_one_predictor_per_round
def run_correction_round(base: str | Path, examples_dir: str | Path, out_adapter: str | Path, *,
                         current_adapter: str | Path | None = None,
                         holdout_fraction: float = DEFAULT_HOLDOUT_FRACTION, replay: float = DEFAULT_REPLAY,
                         seed: int = 0, split: str = TRAIN_SPLIT, replay_dir: str | Path | None = None,
                         replay_pool: int = DEFAULT_REPLAY_IMAGES, replay_look: str = DEFAULT_REPLAY_LOOK,
                         retention_images: int = RETENTION_IMAGES, plan: RoundPlan | None = None,
                         steps: int | None = None, work_dir: str | Path | None = None,
                         trainer: Trainer | None = None, evaluator: Evaluator | None = None,
                         progress: bool = False, new_words: bool = True, words_only: bool = False,
                         heldout_margin: int | None = None, **train_kwargs) -> RoundResult:
    """Train an adapter on the corrections in ``examples_dir`` (split ``split``) and gate it.

    ``current_adapter``: the adapter in use now (None: the base is). ``replay``: the share of replay
    scenes among the training images (0: none): ``replay_pool`` synthetic scenes of ``replay_look`` (the
    look of the base's training scenes: ``"varied"`` for the embedded model, ``"classic"`` for older ones),
    cached in ``replay_dir`` (default :func:`default_replay_dir`), all of them train and the corrections
    are repeated to make up the rest. ``retention_images`` more replay scenes never train and make the
    gate's retention slice (0: none). ``plan``: override :func:`plan_round` (``steps``: only its steps).
    ``work_dir`` (default ``<examples_dir>/round``) holds the round's train, held-out and retention folders
    and the training run.
    ``trainer(from_model=, data_dir=, out_adapter=, steps=, r=, alpha=, lr=, seed=, split=, work_dir=,
    progress=, lr_multipliers=)`` defaults to ``finetune`` (``lr_multipliers``: the plan's head scale unless
    ``train_kwargs`` give their own); ``evaluator(base, adapter, data_dir, split) -> P@0.5`` to
    :func:`refer_p50`. ``new_words``: words of the corrections that the base spells in pieces get their own
    token (:func:`round_new_words`; the trainer gets ``new_words=`` and ``new_word_anchors=``); with
    ``words_only`` a round that has new words trains nothing else (the adapter then answers exactly as the
    base on every text without them). ``heldout_margin`` (default :data:`HELDOUT_MARGIN`): net held-out
    expressions lost that reject the round (1: any loss).
    The adapter is written even when rejected: the caller decides what to keep.
    """
    started = time.time()
    base, examples_dir, out_adapter = str(base), Path(examples_dir), Path(out_adapter)
    if not 0.0 <= replay < 1.0 or not math.isfinite(replay):
        raise TrainingError(f"replay is the share of replay scenes among the training images, in [0, 1); "
                            f"got {replay}")
    records = _read_records(examples_dir, split)
    names = records.file_names
    if not names:
        raise TrainingError(f"no corrections in {examples_dir}: expected refcoco_{split}.json or vg_{split}.json "
                            "with at least one annotated image")
    train_names, held = split_holdout(names, holdout_fraction, seed)
    refer_names = {r["file_name"] for r in records.refer_images}
    if held and not refer_names & set(held):
        train_names, held = names, []  # nothing to score refer on: train on everything
    plan = plan or plan_round(len(train_names))
    if steps:
        plan = dataclasses.replace(plan, steps=int(steps))
    work = Path(work_dir) if work_dir is not None else examples_dir / "round"
    parts: list[tuple[_Records, set[str] | None, str]] = [(records, set(train_names), "c_")]
    n_replay = max(0, int(replay_pool)) if replay > 0 else 0
    n_keep = max(0, int(retention_images)) if held else 0  # the retention slice: only when the gate runs
    kept: list[str] = []
    pool: list[str] = []
    replay_records: _Records | None = None
    copies = 1
    if n_replay or n_keep:
        cache = replay_cache(replay_dir, n_replay + n_keep, replay_look)
        replay_records = _read_records(cache, REPLAY_SPLIT)
        pool = replay_records.file_names[:n_replay + n_keep]
        kept, pool = pool[len(pool) - n_keep:] if n_keep else [], pool[:len(pool) - n_keep]
        if n_replay:
            parts.append((replay_records, set(pool), "r_"))
            copies = max(1, round(n_replay * (1 - replay) / (replay * len(train_names))))
        if kept:
            _write_folder(work / RETENTION_SPLIT, RETENTION_SPLIT, [(replay_records, set(kept), "r_")])
    train_counts = _write_folder(work / "train", TRAIN_SPLIT, parts, copies={0: copies})
    holdout_counts = (_write_folder(work / HOLDOUT_SPLIT, HOLDOUT_SPLIT, [(records, set(held), "c_")])
                      if held else {"images": 0, "refer": 0, "regions": 0})
    log.info("correction round: %d corrected images train (+%d replay), %d held out; plan %s",
             len(train_names), n_replay, len(held), plan)
    if out_adapter.exists():
        shutil.rmtree(out_adapter)
    words: list[str] = []
    if new_words and "new_words" not in train_kwargs:
        replay_texts = _texts(replay_records, set(pool)) if replay_records is not None and n_replay else []
        words, anchors = round_new_words(base, _texts(records, set(train_names)), replay_texts)
        if words:
            train_kwargs |= {"new_words": words, "new_word_anchors": anchors}
    if "lr_multipliers" not in train_kwargs and (plan.lr_multipliers or words):
        fast = {f"language.{table}.modules_to_save.": NEW_WORD_LR / plan.lr for table in ("word_embed", "output")}
        rest = {"": 0.0} if words and words_only else plan.lr_multipliers
        train_kwargs["lr_multipliers"] = (fast if words else {}) | rest
    sources = train_kwargs.get("sources") or {name: 1.0 for name in ROUND_AUGMENT_SCALE}
    train_kwargs.setdefault("augment_scale", {k: v for k, v in ROUND_AUGMENT_SCALE.items() if sources.get(k, 0) > 0})
    adapts_image_side = train_kwargs.get("adapt_vision") or any(
        m.startswith(("vision", "proposal_head")) for m in train_kwargs.get("modules_to_save") or ())
    train_kwargs.setdefault("cache_image_embeddings", not adapts_image_side)
    train_kwargs.setdefault("max_prompts", dict(ROUND_MAX_PROMPTS))
    train_kwargs.setdefault("preload_images", True)
    (trainer or _default_trainer)(
        from_model=base, data_dir=work / "train", out_adapter=out_adapter, steps=plan.steps, r=plan.rank,
        alpha=plan.alpha, lr=plan.lr, seed=seed, split=TRAIN_SPLIT, work_dir=work / "run", progress=progress,
        **train_kwargs)
    if not out_adapter.is_dir():
        raise TrainingError(f"the trainer finished but wrote no adapter at {out_adapter}")
    from ..modeling.lora import ADAPTER_WEIGHTS, scale_adapter

    if plan.keep < 1.0 and (out_adapter / ADAPTER_WEIGHTS).is_file():  # (a stub trainer writes none)
        # the round's shared predictor, no adapter loaded into it yet: the base's own weights
        scale_adapter(out_adapter, _round_predictor(base).predictor.model.state_dict(), plan.keep)
    offsets: dict[str, float] = {}
    if words and (out_adapter / ADAPTER_WEIGHTS).is_file() and replay_records is not None:
        negatives = work / RETENTION_SPLIT
        if not kept:  # no retention slice (no gate): the first replay scenes stand in
            _write_folder(negatives, RETENTION_SPLIT, [(replay_records, set(pool[:RETENTION_IMAGES]), "r_")])
        offsets = settle_new_words(base, out_adapter, negatives, RETENTION_SPLIT)
    result = RoundResult(adapter=str(out_adapter), accepted=True, gate="passed", plan=plan, train=train_counts,
                         holdout=holdout_counts, replay_images=n_replay, correction_copies=copies,
                         new_words=words, new_word_offsets=offsets)
    if not held:
        result.gate = (f"skipped: {len(names)} corrected image(s), fewer than {MIN_FOR_GATE}" if len(names) < MIN_FOR_GATE
                       else "skipped: no referring expression to hold out" if not refer_names
                       else "skipped: holdout_fraction is 0")
    else:
        evaluate = evaluator or refer_p50
        current = str(current_adapter) if current_adapter else None
        result.current_score = float(evaluate(base, current, work / HOLDOUT_SPLIT, HOLDOUT_SPLIT))
        result.new_score = float(evaluate(base, str(out_adapter), work / HOLDOUT_SPLIT, HOLDOUT_SPLIT))
        if kept:
            retention = work / RETENTION_SPLIT
            result.current_retention = float(evaluate(base, current, retention, RETENTION_SPLIT))
            result.new_retention = float(evaluate(base, str(out_adapter), retention, RETENTION_SPLIT))
        margin = HELDOUT_MARGIN if heldout_margin is None else max(1, int(heldout_margin))
        result.heldout_lost = heldout_loss(result.current_score, result.new_score, holdout_counts["refer"])
        if result.heldout_lost > margin - 1:  # margin 1: any loss
            result.reason = "worse on the held-out corrections"
        elif kept and result.new_retention < result.current_retention - RETENTION_TOLERANCE:
            result.reason = "forgets what the base knew (retention slice)"
        result.accepted = not result.reason
        result.gate = "passed" if result.accepted else "rejected"
    result.seconds = round(time.time() - started, 2)
    log.info("correction round: %s", result.summary())
    return result
