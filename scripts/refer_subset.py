"""Write a referring split that keeps only the expressions containing a word.

Reads ``DATA/refcoco_<split>.json`` (MDETR RefCOCO format, as ``pixelllm synth`` writes it) and writes
``DATA/refcoco_<name>.json`` with the expressions that contain ``--word`` as a whole word, plus
``DATA/images/<name>`` as a symlink to ``images/<split>``. ``pixelllm eval --split <name> --tasks refer``
then scores only those expressions: e.g. how well a fine-tuned adapter finds a new shape.

    pixelllm synth --out PENTA --split test --num-images 150 --extra-shapes pentagon --seed 7
    python scripts/refer_subset.py PENTA --split test --word pentagon --name pentatest
    pixelllm eval --data PENTA --split pentatest --tasks refer
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path


def subset(data: dict, word: str) -> dict:
    """The MDETR RefCOCO dict with only the expressions (image records) whose caption contains ``word``."""
    pattern = re.compile(rf"\b{re.escape(word)}\b", re.IGNORECASE)
    images = [im for im in data.get("images", []) if pattern.search(str(im.get("caption", "")))]
    keep = {im["id"] for im in images}
    annotations = [a for a in data.get("annotations", []) if a.get("image_id") in keep]
    return {**data, "images": images, "annotations": annotations}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", type=Path, help="data folder (pixelllm synth output or the same layout)")
    p.add_argument("--split", default="test", help="split to read (default: %(default)s)")
    p.add_argument("--word", required=True, help="keep the expressions that contain this word")
    p.add_argument("--name", required=True, help="name of the split to write, e.g. pentatest")
    args = p.parse_args(argv)
    if args.name == args.split or not re.fullmatch(r"[A-Za-z0-9_.-]+", args.name):
        p.error("--name must differ from --split and use only letters, digits, '_', '.' and '-'")

    src = args.data / f"refcoco_{args.split}.json"
    try:
        data = json.loads(src.read_text())
    except (OSError, ValueError) as exc:
        print(f"error: cannot read {src}: {exc}", file=sys.stderr)
        return 2
    out = subset(data, args.word)
    n_images = len({im.get("original_img_id", im["id"]) for im in out["images"]})
    if not out["images"]:
        print(f"error: no expression in {src} contains {args.word!r}", file=sys.stderr)
        return 1
    (args.data / f"refcoco_{args.name}.json").write_text(json.dumps(out))
    link = args.data / "images" / args.name
    if link.is_symlink():
        link.unlink()
    if not link.exists():
        link.symlink_to(args.split)
    print(f"{len(out['images'])} expressions on {n_images} images -> refcoco_{args.name}.json, images/{args.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
