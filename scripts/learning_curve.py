"""Learning curve of the gated correction round: N corrections of a concept the base never saw.

For each N (default 8, 16, 32), N synthetic scenes whose referring expression targets ``--shape`` (default
``pentagon``, outside the base model's vocabulary) are the corrections; ``run_correction_round`` trains an
adapter on them (held-out slice, replay of synthetic base scenes, plan from N) and gates it. Then the base
and the new adapter are scored (refer P@0.5) on held-out scenes of the new concept and on a regular
synthetic split (what the base knew), and their region captions: the share of the held-out new-concept
objects whose caption names the concept, and attribute accuracy on the regular split's regions.
``--ungated`` also trains the old way (all N, fixed steps, recipe learning rate and rank, no replay) for
comparison.

    OMP_NUM_THREADS=1 python scripts/learning_curve.py --base /work/runs/v2/final --n 8 16 32 \\
        --out artifacts/learning_curve

Writes ``OUT/learning_curve.json`` and ``OUT/learning_curve.png``. All data is generated offline.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def write_concept(scenes: list, out_dir: Path, split: str, *, with_vg: bool) -> Path:
    """The scenes in the training formats: one expression per image (refcoco) and, for corrections, the same
    text as the box's region caption (what a Label Studio correction gives)."""
    from pixelllm_plugins.data.formats import OBJECT_CATEGORIES, refcoco_entry, renderer_for, vg_region

    render = renderer_for("train").render

    (out_dir / "images" / split).mkdir(parents=True, exist_ok=True)
    ref_images, ref_anns, vg_images, vg_anns = [], [], [], []
    for i, (a, text, box) in enumerate(scenes, start=1):
        name = f"{i:06d}.png"
        render(a.scene).save(out_dir / "images" / split / name)
        entry = {"file_name": name, "width": a.scene.width, "height": a.scene.height}
        record, ann = refcoco_entry(entry, i, text, box, original_img_id=i, sentence_id=0)
        ref_images.append(record)
        ref_anns.append(ann)
        vg_images.append(entry | {"id": i})
        vg_anns.append(vg_region(i, i, box, text))
    (out_dir / f"refcoco_{split}.json").write_text(json.dumps(
        {"images": ref_images, "annotations": ref_anns, "categories": OBJECT_CATEGORIES}))
    if with_vg:
        (out_dir / f"vg_{split}.json").write_text(json.dumps(
            {"images": vg_images, "annotations": vg_anns, "categories": OBJECT_CATEGORIES}))
    return out_dir


def score(predictor, samples: dict, adapter: str | None, word: str | None = None) -> dict:
    """Refer P@0.5, mean IoU and score ECE (with the ECE a calibrated score would read on as many
    expressions, ``metrics.ece_floor``) per split; with ``word``, also the share of the new-concept
    targets whose region caption contains it (``named``) and the regular regions' attribute accuracy."""
    from pixelllm_plugins.evaluation.evaluate import eval_refer, eval_region

    out = {}
    for key in ("new", "regular"):
        r = eval_refer(predictor, samples[key], batch_size=8, progress=True, adapter=adapter)
        out[key] = {"P@0.5": round(r["P@0.5"], 4), "mean_IoU": round(r["mean_IoU"], 4),
                    "score_ECE": round(r["score_ECE"], 4), "score_ECE_floor": round(r["score_ECE_floor"], 4),
                    "count": r["count"]}
    if word is not None:
        new = samples["new"]
        caps = [predictor.caption_regions([s.image], [[s.prompts[0].target_box]], adapter=adapter)[0][0].text
                for s in new]
        out["new"]["named"] = round(sum(word in c.split() for c in caps) / max(1, len(caps)), 4)
        region = eval_region(predictor, samples["regions"], adapter=adapter, meteor=False)
        out["regular"]["region_attribute_accuracy"] = round(region["attribute_accuracy"], 4)
    return out


def plot(rows: list[dict], base: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [r["n"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for key, colour, label in (("new", "tab:red", "new concept"), ("regular", "tab:blue", "regular split")):
        ax.axhline(base[key]["P@0.5"], color=colour, ls=":", lw=1, label=f"base, {label}")
        ax.plot(ns, [r["served"][key]["P@0.5"] for r in rows], "o-", color=colour, label=f"gated (served), {label}")
        ax.plot(ns, [r["adapter"][key]["P@0.5"] for r in rows], "s:", color=colour, alpha=0.6, ms=4,
                label=f"round's adapter, {label}")
        if all("ungated" in r for r in rows):
            ax.plot(ns, [r["ungated"][key]["P@0.5"] for r in rows], "x--", color=colour, alpha=0.6,
                    label=f"ungated, {label}")
    if all("named" in r["served"]["new"] for r in rows):
        ax.axhline(base["new"].get("named", 0.0), color="tab:green", ls=":", lw=1, label="base, captions name it")
        ax.plot(ns, [r["served"]["new"]["named"] for r in rows], "^-", color="tab:green",
                label="gated (served), captions name it")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.set_xlabel("corrections N")
    ax.set_ylabel("held-out refer P@0.5 / share named")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default=None, help="checkpoint folder (default: the embedded model)")
    p.add_argument("--n", type=int, nargs="+", default=[8, 16, 32], help="numbers of corrections")
    p.add_argument("--shape", default="pentagon", help="the new concept (an extra shape of the generator)")
    p.add_argument("--eval-new", type=int, default=40, help="held-out scenes of the new concept")
    p.add_argument("--eval-regular", type=int, default=30, help="images of the regular held-out split")
    p.add_argument("--eval-regions", type=int, default=30, help="images of the regular split whose regions are captioned")
    p.add_argument("--steps", type=int, default=0, help="fine-tune steps (0: corrections.plan_round)")
    p.add_argument("--replay", type=float, default=0.5, help="share of replay scenes among the training images")
    p.add_argument("--holdout", type=float, default=0.25, help="held-out fraction of the corrections")
    p.add_argument("--ungated", action="store_true", help="also train the old way, for comparison")
    p.add_argument("--words-only", action="store_true",
                   help="a round with new words trains only their rows (nothing the base reads changes)")
    p.add_argument("--no-new-words", action="store_true",
                   help="rounds without new-word tokens (the concept stays spelled in word pieces), for comparison")
    p.add_argument("--ungated-steps", type=int, default=100, help="steps of the ungated rounds")
    p.add_argument("--look", default="varied", choices=("varied", "classic"),
                   help="scene look of the corrections, the held-out sets and the replay (the base's training look)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default: OUT/work)")
    p.add_argument("--out", type=Path, default=ROOT / "artifacts" / "learning_curve")
    args = p.parse_args(argv)

    import torch
    from tqdm.auto import tqdm

    from pixelllm_plugins.checkpoint import DEFAULT_MODEL_DIR
    from pixelllm_plugins.data.formats import concept_scenes, write_synthetic_dataset
    from pixelllm_plugins.evaluation.evaluate import load_task_samples
    from pixelllm_plugins.inference.predictor import Predictor
    from pixelllm_plugins.training.corrections import run_correction_round
    from pixelllm_plugins.training.finetune import finetune

    base = str(args.base or DEFAULT_MODEL_DIR)
    work = args.work or args.out / "work"
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    # held-out data: the new concept (seeds far from the corrections') and the regular classic split
    write_concept(concept_scenes(args.shape, args.eval_new, 900_000, args.look), work / "eval", "newconcept", with_vg=False)
    write_synthetic_dataset(work / "eval", "test", args.eval_regular, seed=7, look=args.look)
    samples = {"new": load_task_samples(work / "eval", "newconcept", "refer"),
               "regular": load_task_samples(work / "eval", "test", "refer"),
               "regions": load_task_samples(work / "eval", "test", "region", limit=args.eval_regions)}
    predictor = Predictor(base, device="cpu", dtype=torch.float32)
    base_scores = score(predictor, samples, None, args.shape)
    tqdm.write(f"base: {json.dumps(base_scores)}")
    pool = concept_scenes(args.shape, max(args.n), 500_000, args.look)  # N corrections: the first N of one pool
    rows = []
    for n in tqdm(args.n, desc="rounds"):
        corr = write_concept(pool[:n], work / f"corrections-{n}", "train", with_vg=True)
        t0 = time.time()
        result = run_correction_round(base, corr, work / f"adapter-{n}", holdout_fraction=args.holdout,
                                      replay=args.replay, seed=args.seed, steps=args.steps or None,
                                      replay_dir=work / "replay", replay_look=args.look, work_dir=work / f"round-{n}",
                                      progress=True, new_words=not args.no_new_words, words_only=args.words_only)
        row = {"n": n, "round": result.to_dict(), "train_s": round(time.time() - t0, 1)}
        row["adapter"] = score(predictor, samples, str(work / f"adapter-{n}"), args.shape)
        row["served"] = row["adapter"] if result.accepted else base_scores
        if args.ungated:
            t0 = time.time()
            finetune(base, corr, work / f"ungated-{n}", steps=args.ungated_steps, progress=True,
                     work_dir=work / f"ungated-run-{n}", seed=args.seed)
            row["ungated_train_s"] = round(time.time() - t0, 1)
            row["ungated"] = score(predictor, samples, str(work / f"ungated-{n}"), args.shape)
        rows.append(row)
        tqdm.write(f"N={n}: {result.summary()}; adapter {json.dumps(row['adapter'])}")
    report = {"base": base, "shape": args.shape, "threads": torch.get_num_threads(), "base_scores": base_scores,
              "rows": rows, "seconds": round(time.time() - started, 1), "settings": vars(args) | {
                  "out": str(args.out), "work": str(work)}}
    (args.out / "learning_curve.json").write_text(json.dumps(report, indent=1, default=str))
    plot(rows, base_scores, args.out / "learning_curve.png")
    print(json.dumps({"base": base_scores, "rows": [{k: r[k] for k in r if k != "round"} | {
        "gate": r["round"]["gate"], "new_score": r["round"]["new_score"],
        "current_score": r["round"]["current_score"]} for r in rows]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
