"""Fit a checkpoint's box-score calibration on a held-out split and store it in its ``meta.json``.

    python scripts/calibrate_scores.py --model runs/x/final --data DATA --fit-split val \
        --check-split test test_shift --write

Every referring expression of ``--fit-split`` is boxed with the raw confidence head; an isotonic map from
the raw score to "the box is right" (IoU >= 0.5) is fitted (``inference/calibration.py``) and, with
``--write``, stored as ``score_calibration`` in the folder's ``meta.json``. The expected calibration error
(ECE, 10 bins) before and after is printed for the fit split and for each ``--check-split``, which the map
never saw. The weights and the model_version do not change; the order of the scores does not change.

Texts with a word the fit split never used get a second map, fitted on expressions that name shapes the
model never learned (``--unknown-shapes``, drawn by the generator: ``data.synthetic.EXTRA_SHAPES``), and
checked on another such shape (``--check-unknown-shape``, default pentagon), which the map never saw.
``--unknown-shapes`` with no shape leaves it out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from pixelllm_plugins.data.types import GroundedSample, PromptRecord
from pixelllm_plugins.evaluation.evaluate import load_task_samples, refer_outcomes
from pixelllm_plugins.evaluation.metrics import expected_calibration_error
from pixelllm_plugins.inference.calibration import fit_calibration, words
from pixelllm_plugins.inference.predictor import Predictor

UNKNOWN_SEED = 700_000  # scenes for the unknown-word map (far from the splits' seeds)
CHECK_UNKNOWN_SEED = 900_000


def concept_samples(shapes: list[str], per_shape: int, first_seed: int, look: str) -> list[GroundedSample]:
    """Rendered scenes in which one expression names each of ``shapes`` (``per_shape`` each)."""
    from pixelllm_plugins.data.formats import concept_scenes, renderer_for

    render = renderer_for("test").render
    return [GroundedSample(render(a.scene), [PromptRecord("refer", text, target_box=box)], image_id=f"{shape}-{k}")
            for shape in shapes for k, (a, text, box) in enumerate(concept_scenes(shape, per_shape, first_seed, look))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint folder (its meta.json gets the calibration)")
    parser.add_argument("--data", required=True, help="a dataset folder as `pixelllm synth` writes it")
    parser.add_argument("--fit-split", default="val", help="the split the map is fitted on (default: val)")
    parser.add_argument("--check-split", nargs="*", default=[], help="splits to report ECE on, never fitted")
    parser.add_argument("--limit", type=int, default=None, help="first N images of each split")
    parser.add_argument("--unknown-shapes", nargs="*", default=["octagon", "trapezoid", "arrow"],
                        help="shapes the model never learned: the unknown-word map is fitted on expressions naming them")
    parser.add_argument("--check-unknown-shape", default="pentagon", help="another such shape, to check that map on")
    parser.add_argument("--unknown-scenes", type=int, default=80, help="scenes per unknown shape")
    parser.add_argument("--look", default="varied", choices=("varied", "classic"), help="look of those scenes")
    parser.add_argument("--write", action="store_true", help="store the fitted map in MODEL/meta.json")
    args = parser.parse_args(argv)

    meta_path = Path(args.model) / "meta.json"
    if not meta_path.is_file():
        parser.error(f"{args.model} is not a checkpoint folder with a meta.json")
    predictor = Predictor(args.model)
    predictor.calibrated = False  # fit and compare on the head's raw scores
    raw = {}
    for split in [args.fit_split, *args.check_split]:
        samples = load_task_samples(args.data, split, "refer", args.limit)
        raw[split] = refer_outcomes(predictor, samples, progress=True)
    fit = raw[args.fit_split]
    calibration = fit_calibration(fit.scores, fit.right, fitted_on=f"{Path(args.data).name}/{args.fit_split}")
    known = {w for s in load_task_samples(args.data, args.fit_split, "refer", args.limit) for p in s.prompts
             for w in words(p.text)}
    unknown = None
    if args.unknown_shapes:
        fit_name = f"unknown: {', '.join(args.unknown_shapes)} (fit)"
        check_name = f"unknown: {args.check_unknown_shape}"
        raw[fit_name] = refer_outcomes(predictor, concept_samples(args.unknown_shapes, args.unknown_scenes,
                                                                  UNKNOWN_SEED, args.look), progress=True)
        raw[check_name] = refer_outcomes(predictor, concept_samples([args.check_unknown_shape], args.unknown_scenes,
                                                                    CHECK_UNKNOWN_SEED, args.look), progress=True)
        unknown = fit_calibration(raw[fit_name].scores, raw[fit_name].right, method="platt",
                                  fitted_on=f"{args.look} scenes naming {', '.join(args.unknown_shapes)}")
    calibration = dataclasses.replace(calibration, known_words=frozenset(known), unknown=unknown)
    report = {}
    for split, o in raw.items():
        fitted = unknown if split.startswith("unknown") else calibration
        report[split] = {"expressions": len(o.scores), "P@0.5": sum(o.right) / max(1, len(o.right)),
                         "ECE_raw": expected_calibration_error(o.scores, o.right),
                         "ECE_calibrated": expected_calibration_error(fitted(o.scores), o.right)}
        if split.startswith("unknown"):
            report[split]["ECE_with_the_known_word_map"] = expected_calibration_error(calibration(o.scores), o.right)
        print(f"{split:20s} n={len(o.scores):5d}  P@0.5 {report[split]['P@0.5']:.3f}  "
              f"ECE raw {report[split]['ECE_raw']:.3f} -> calibrated {report[split]['ECE_calibrated']:.3f}"
              + (f" (known-word map: {report[split]['ECE_with_the_known_word_map']:.3f})"
                 if split.startswith("unknown") else ""))
    if args.write:
        meta = json.loads(meta_path.read_text())
        meta["score_calibration"] = {**calibration.to_dict(), "report": report}
        meta_path.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        print(f"wrote score_calibration ({len(calibration.x)} knots) to {meta_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
