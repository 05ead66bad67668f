"""Evaluate a checkpoint on the public evaluation splits and write one report per split.

Splits and tasks (each skipped with a notice when its files are missing from the data folder):

    refcoco-val       refer            RefCOCO val, box P@0.5
    refcocoplus-val   refer            RefCOCO+ val
    refcocog-val      refer, region    RefCOCOg val; region = location-conditioned captioning
    vg-test           dense, region    Visual Genome dense captioning mAP and location-conditioned captions

RefCOCOg location-conditioned captioning reads MDETR's ``refcoco_refcocog-val.json`` as a region file:
the script writes ``vg_refcocog-val.json`` from it once (one region per expression, the expression as its
single reference caption).

    python scripts/eval_public.py runs/public/ref/final eval/ref --data data/public --splits refcoco-val
    python scripts/eval_public.py runs/public/densecap/final eval/dense --data data/public

Each split writes ``OUT_DIR/<split>/results.json`` and ``report.md``. METEOR needs Java; without it
METEOR is skipped with a notice.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SPLITS = {"refcoco-val": ("refer",), "refcocoplus-val": ("refer",), "refcocog-val": ("refer", "region"),
          "vg-test": ("dense", "region")}


def refcocog_regions(data: Path) -> Path | None:
    """Write ``vg_refcocog-val.json`` (GRiT region format) from MDETR's RefCOCOg val file, once."""
    src, dst = data / "refcoco_refcocog-val.json", data / "vg_refcocog-val.json"
    if dst.is_file() or not src.is_file():
        return dst if dst.is_file() else None
    d = json.loads(src.read_text())
    caption = {im["id"]: im["caption"] for im in d["images"]}
    d["annotations"] = [{"id": a["id"], "image_id": a["image_id"], "bbox": a["bbox"],
                         "caption": caption[a["image_id"]]}
                        for a in d["annotations"] if a["image_id"] in caption]
    dst.write_text(json.dumps(d))
    return dst


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="checkpoint folder (e.g. runs/public/ref/final)")
    p.add_argument("out_dir", help="folder for the reports, one sub-folder per split")
    p.add_argument("--data", default="data/public", help="data folder (default: %(default)s)")
    p.add_argument("--splits", nargs="+", choices=sorted(SPLITS), default=list(SPLITS),
                   help="which splits to evaluate (default: all)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if present)")
    p.add_argument("--limit", type=int, default=None, help="at most this many images per task")
    p.add_argument("--no-meteor", action="store_true", help="skip METEOR (Java) even when available")
    args = p.parse_args(argv)

    from pixelllm_plugins.errors import PixelLLMError
    from pixelllm_plugins.evaluation.evaluate import evaluate, write_report
    from pixelllm_plugins.inference.predictor import Predictor

    data = Path(args.data)
    try:
        if "refcocog-val" in args.splits:
            refcocog_regions(data)
        predictor = Predictor(args.checkpoint, device=args.device)
        for split in args.splits:
            results = evaluate(predictor, data, split, tasks=SPLITS[split], limit=args.limit,
                               meteor=not args.no_meteor)
            print(split, json.dumps(results["tasks"]))
            write_report(results, Path(args.out_dir) / split)
    except (PixelLLMError, OSError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
