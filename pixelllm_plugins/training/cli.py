"""``pixelllm train`` / ``eval`` / ``finetune``: argument parsers and handlers for the main CLI.

``pixelllm_plugins.cli`` calls :func:`add_training_parsers` on its sub-parsers; each handler returns an
exit code. Data parallel: ``torchrun --nproc_per_node=N -m pixelllm_plugins.cli train ...``.
"""

from __future__ import annotations

import json
import math
import os
import sys

from ..errors import TrainingError

# eval tasks whose metrics (BLEU, CIDEr, METEOR) come from pycocoevalcap: the extra 'eval'
CAPTION_METRIC_TASKS = ("region", "caption")


def add_training_parsers(sub) -> None:
    from ..argtypes import device_arg, float_arg, int_arg
    from ..bounds import argtype as bound_arg

    positive, non_negative = int_arg(1), int_arg(0)
    p = sub.add_parser("train", help="train a model with a named recipe (resumes OUT/checkpoint-last)",
                       description="Train with a recipe (synth-small, tiny-smoke, finetune); any recipe "
                                   "value can be overridden. Re-running the same command resumes exactly.")
    p.add_argument("--recipe", default="synth-small", help="tiny-smoke | synth-small | finetune")
    p.add_argument("--data", required=True, help="data folder (pixelllm synth output or the same formats)")
    p.add_argument("--out", default=None, help="output folder (default: the recipe's runs/<recipe>)")
    p.add_argument("--init", default=None, help="preset name or checkpoint folder to start from")
    p.add_argument("--split", default=None)
    for flag, kind in (("--steps", positive), ("--batch-size", bound_arg("batch_size")),
                       ("--grad-accum", positive), ("--lr", float_arg(0)), ("--warmup-steps", non_negative),
                       ("--weight-decay", float_arg(0)), ("--seed", int_arg()),
                       ("--checkpoint-every", non_negative), ("--eval-every", non_negative),
                       ("--num-threads", non_negative), ("--num-workers", non_negative)):
        p.add_argument(flag, type=kind, default=None)
    p.add_argument("--sources", nargs="+", default=None, metavar="NAME=WEIGHT",
                   help="source weights of the mixture, e.g. refer=4 region=3 trace=4 caption=0.5 (replaces "
                        "the recipe's; a source left out is not used)")
    p.add_argument("--lr-multiplier", nargs="+", default=None, metavar="PREFIX=FACTOR",
                   help="learning-rate factor by parameter-name prefix (first match wins), e.g. "
                        "point_head.context.=5 for modules just added with scripts/grow_model.py")
    p.add_argument("--augment-scale", nargs="+", default=None, metavar="SOURCE=LO,HI",
                   help="random resize range of the longer side (x canvas) per source, e.g. region=0.6,1.0; "
                        "above 1 the image is cropped, which makes words relative to the whole image "
                        "(small, large) untrue for the crop")
    p.add_argument("--point-prompt-prob", type=float_arg(0), default=None, metavar="P",
                   help="for a model with prompt.points: the fraction (0-1) of region and mask prompts that take "
                        "a point on the object (sometimes plus one off it), half of them instead of the box "
                        "(default: the recipe's, 0)")
    p.add_argument("--region-box-jitter", type=float_arg(0), default=None, metavar="P",
                   help="the fraction (0-1) of region prompts whose box is moved (each side by up to "
                        "--region-box-jitter-scale of the box's size), so captions and masks hold for loosely "
                        "drawn boxes (default: the recipe's, 0)")
    p.add_argument("--region-box-jitter-scale", type=float_arg(0), default=None, metavar="S",
                   help="how far each side of a jittered region box may move, as a fraction of the box's width or "
                        "height (default: the recipe's, 0.1)")
    p.add_argument("--device", default=None, type=device_arg(allow_auto=True), help="auto | cpu | cuda")
    p.add_argument("--no-resume", action="store_true", help="start over even if OUT/checkpoint-last exists")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(handler=_train)

    p = sub.add_parser("eval", help="evaluate a model on a data folder (P@0.5, CIDEr/METEOR, mAP, trace L1, "
                                    "mask IoU)",
                       description="Evaluate through the PredictorProtocol (in-process, or the worker when "
                                   "PIXELLLM_WORKER_URL is set); writes results.json and report.md. Several "
                                   "--split values are evaluated in turn and shown side by side.")
    p.add_argument("--model", default=None, help="checkpoint folder or preset; default: the embedded model")
    p.add_argument("--device", default=None, type=device_arg())
    p.add_argument("--adapter", default=None, help="LoRA adapter folder")
    p.add_argument("--data", required=True)
    p.add_argument("--split", nargs="+", default=["val"], metavar="SPLIT",
                   help="split(s) of the data folder, e.g. test test_shift: one column (and one JSON entry "
                        "under 'splits') each when more than one")
    p.add_argument("--tasks", nargs="+", default=None,
                   choices=["refer", "region", "dense", "trace", "caption", "segment"],
                   help="default: refer region dense trace, and segment when the model can segment (its own "
                        "mask decoder, or a mask engine)")
    p.add_argument("--mask-engine", default=None, metavar="sam:PATH",
                   help="mask engine for the segment task: sam:PATH, a local SAM checkpoint folder; default: "
                        "the model's own mask decoder, else env PIXELLLM_MASK_ENGINE")
    p.add_argument("--segment-prompts", nargs="+", default=["text", "box", "point"],
                   choices=["text", "box", "point"], help="the segment task's prompts (default: all three)")
    p.add_argument("--limit", type=positive, default=None, help="at most this many images per task")
    p.add_argument("--batch-size", type=bound_arg("batch_size"), default=16)
    p.add_argument("--out", default=None, help="folder for results.json and report.md")
    p.add_argument("--no-meteor", action="store_true", help="skip METEOR (Java) even when available")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(handler=_eval)

    p = sub.add_parser("finetune", help="train a LoRA adapter over a checkpoint on your annotations",
                       description="LoRA fine-tuning; writes a peft adapter folder usable with --adapter.")
    p.add_argument("--model", "--from", dest="model", required=True, help="base checkpoint folder")
    p.add_argument("--data", required=True, help="annotations in the training formats")
    p.add_argument("--out", required=True, help="adapter folder to write")
    p.add_argument("--split", default="train")
    p.add_argument("--steps", type=positive, default=200)
    p.add_argument("--batch-size", type=bound_arg("batch_size"), default=None)
    p.add_argument("--lr", type=float_arg(0), default=None)
    p.add_argument("--rank", type=int_arg(1, 1024), default=None, help="LoRA rank (alpha = 2 x rank)")
    p.add_argument("--seed", type=int_arg(), default=0)
    p.add_argument("--train-embeddings", action="store_true",
                   help="also train the word embeddings (adapter copies): for words the base never saw")
    p.add_argument("--adapt-vision", action="store_true",
                   help="also put LoRA on the vision encoder: for objects the base never had to tell apart")
    p.add_argument("--modules-to-save", nargs="+", default=None, metavar="MODULE",
                   help="more modules trained as full adapter copies (peft's modules_to_save), by full "
                        "dotted name, e.g. vision.stem vision.detail: the layers that see a shape's "
                        "corners at full resolution")
    p.add_argument("--new-words", nargs="*", default=None, metavar="WORD",
                   help="give these words their own token in the adapter (only their embedding and output rows "
                        "learn, so texts without them read as before); with no WORD, every word of the data's "
                        "texts that the base spells in pieces (built-in language model only)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(handler=_finetune)


def _train(args) -> int:
    from .recipes import recipe_config
    from .trainer import train

    overrides = {"data_dir": args.data, "out_dir": args.out, "init": args.init, "split": args.split,
                 "steps": args.steps, "batch_size": args.batch_size, "grad_accum": args.grad_accum,
                 "lr": args.lr, "warmup_steps": args.warmup_steps, "weight_decay": args.weight_decay,
                 "seed": args.seed,
                 "checkpoint_every": args.checkpoint_every, "eval_every": args.eval_every,
                 "num_threads": args.num_threads, "num_workers": args.num_workers, "device": args.device,
                 "point_prompt_prob": args.point_prompt_prob, "region_box_jitter": args.region_box_jitter,
                 "region_box_jitter_scale": args.region_box_jitter_scale}
    if args.sources:
        overrides["sources"] = _weights(args.sources, "--sources", "refer=4")
    if args.lr_multiplier:
        overrides["lr_multipliers"] = _weights(args.lr_multiplier, "--lr-multiplier", "point_head.context.=5")
    if args.augment_scale:
        overrides["augment_scale"] = _ranges(args.augment_scale, "--augment-scale", "region=0.6,1.0")
    if args.no_resume:
        overrides["resume"] = False
    if args.no_progress:
        overrides["progress"] = False
    print(train(recipe_config(args.recipe, **overrides)))
    return 0


def _weights(items: list[str], flag: str, example: str) -> dict[str, float]:
    """["refer=4", "trace=1.5"] -> {"refer": 4.0, "trace": 1.5}, with a usable error for anything else."""
    out: dict[str, float] = {}
    for item in items:
        name, sep, value = item.rpartition("=")
        try:
            if not sep or not name:
                raise ValueError
            out[name] = float(value)
            if not math.isfinite(out[name]) or out[name] < 0:
                raise ValueError
        except ValueError:
            raise TrainingError(f"{flag} takes NAME=NUMBER items like {example}; got {item!r} "
                                "(a finite number >= 0)") from None
    return out


def _ranges(items: list[str], flag: str, example: str) -> dict[str, list[float]]:
    """["region=0.6,1.0"] -> {"region": [0.6, 1.0]}, with a usable error for anything else."""
    out: dict[str, list[float]] = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            lo, hi = (float(v) for v in value.split(","))
            if not sep or not name or not (math.isfinite(lo) and math.isfinite(hi)):
                raise ValueError
        except ValueError:
            raise TrainingError(f"{flag} takes NAME=LO,HI items like {example}; got {item!r}") from None
        out[name] = [lo, hi]
    return out


def _eval(args) -> int:
    from ..errors import EvaluationError
    from ..evaluation.evaluate import DEFAULT_TASKS
    from ..extras import require_extra

    remote = bool(os.environ.get("PIXELLLM_WORKER_URL"))
    tasks = list(args.tasks) if args.tasks else list(DEFAULT_TASKS)
    if set(tasks) & set(CAPTION_METRIC_TASKS):
        require_extra("eval", "pycocoevalcap",
                      feature="pixelllm eval (the caption metrics of tasks region and caption)")
    if remote:
        require_extra("serve", "httpx", feature="pixelllm eval with PIXELLLM_WORKER_URL")
        if args.mask_engine:
            raise EvaluationError("--mask-engine is for in-process evaluation; with PIXELLLM_WORKER_URL the "
                                  "worker segments with its own (pixelllm serve --mask-engine sam:PATH)")
    from ..evaluation.evaluate import evaluate_splits, markdown_table, segment_unavailable, write_report

    if args.mask_engine:
        from ..inference.predictor import Predictor

        predictor = Predictor(args.model, device=args.device, mask_engine=args.mask_engine)
    else:
        from ..predictors import get_predictor

        predictor = get_predictor(args.model, device=args.device, own_thread=False)
    if (args.tasks is None and "segment" not in tasks and hasattr(predictor, "mask_engine")
            and segment_unavailable(predictor) is None):
        tasks.append("segment")  # the model can segment: report its masks too
    results = evaluate_splits(predictor, args.data, args.split, tasks=tasks, limit=args.limit,
                              batch_size=args.batch_size, progress=sys.stderr.isatty(), adapter=args.adapter,
                              meteor=not args.no_meteor, segment_prompts=args.segment_prompts)
    if args.out:
        print(f"report: {write_report(results, args.out)}", file=sys.stderr)
    print(json.dumps(results, indent=2, default=float) if args.json else markdown_table(results))
    return 0


def _finetune(args) -> int:
    from .finetune import finetune

    words = anchors = None
    if args.new_words is not None:
        from .corrections import data_texts, round_new_words

        texts = data_texts(args.data, args.split)
        found, anchors = round_new_words(args.model, texts, texts)
        words = [w.lower() for w in args.new_words] or found
        print(f"new words: {', '.join(words) or 'none'}", file=sys.stderr)
    print(finetune(args.model, args.data, args.out, args.steps, split=args.split, batch_size=args.batch_size,
                   lr=args.lr, r=args.rank, seed=args.seed, progress=not args.no_progress,
                   train_embeddings=args.train_embeddings, adapt_vision=args.adapt_vision,
                   modules_to_save=args.modules_to_save, new_words=words or None, new_word_anchors=anchors or None))
    return 0
