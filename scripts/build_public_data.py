"""Lay out the public datasets as the data folder that ``pixelllm train`` / ``pixelllm eval`` read.

Each dataset is optional: give the folders you have. Annotation files are copied (``--link`` symlinks
them instead); images are always symlinked, never copied.

    python scripts/build_public_data.py --out data/public --coco /datasets/coco \\
        --ln /datasets/localized_narratives --mdetr /datasets/mdetr_annotations \\
        --grit /datasets/grit_vg --vg /datasets/visual_genome

What goes where (OUT is ``--out``):

    --coco   train2017/*.jpg, val2017/*.jpg       -> OUT/images/train/ (both as 000000xxxxxx.jpg and as
                                                     COCO_train2014_000000xxxxxx.jpg), OUT/images/val/
             annotations/captions_{train,val}2017.json -> OUT/coco_captions_{train,val}.json
    --ln     coco_train_localized_narratives-0000{0..3}-of-00004.jsonl (concatenated) -> OUT/ln_train.jsonl
             coco_val_localized_narratives.jsonl                               -> OUT/ln_val.jsonl
    --mdetr  merge_coco_img_safe_train.json       -> OUT/refcoco_train.json
             refcoco_unc_{val,testA,testB}.json    -> OUT/refcoco_refcoco-{val,testA,testB}.json
             refcocoplus_unc_{val,testA,testB}.json -> OUT/refcoco_refcocoplus-{val,testA,testB}.json
             refcocog_umd_{val,test}.json          -> OUT/refcoco_refcocog-{val,test}.json
    --grit   train.json, test.json                 -> OUT/vg_train.json, OUT/vg_vg-test.json
    --vg     VG_100K/*.jpg, VG_100K_2/*.jpg        -> OUT/images/train/ (under the file_name GRiT's json gives)

Every evaluation split's image folder (``OUT/images/refcoco-val`` ...) is a symlink to ``images/train``:
RefCOCO's images are COCO train2014, a subset of train2017, and GRiT's VG test images sit with the train
ones. ``--dry-run`` prints what would be done.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

REFCOCO_EVAL = {
    "refcoco_unc_val.json": "refcoco-val", "refcoco_unc_testA.json": "refcoco-testA",
    "refcoco_unc_testB.json": "refcoco-testB", "refcocoplus_unc_val.json": "refcocoplus-val",
    "refcocoplus_unc_testA.json": "refcocoplus-testA", "refcocoplus_unc_testB.json": "refcocoplus-testB",
    "refcocog_umd_val.json": "refcocog-val", "refcocog_umd_test.json": "refcocog-test",
}
LN_TRAIN = [f"coco_train_localized_narratives-0000{i}-of-00004.jsonl" for i in range(4)]


class Builder:
    def __init__(self, out: Path, *, link: bool, dry_run: bool):
        self.out, self.link, self.dry_run = out, link, dry_run
        self.counts: dict[str, int] = {}
        self.missing: list[str] = []

    def _count(self, what: str, n: int = 1) -> None:
        self.counts[what] = self.counts.get(what, 0) + n

    def annotation(self, src: Path, name: str) -> None:
        if not src.is_file():
            self.missing.append(str(src))
            return
        dst = self.out / name
        print(f"{'link' if self.link else 'copy'} {src} -> {dst}")
        if not self.dry_run:
            dst.unlink(missing_ok=True)
            if self.link:
                dst.symlink_to(src.resolve())
            else:
                shutil.copyfile(src, dst)
        self._count("annotation files")

    def concatenate(self, sources: list[Path], name: str) -> None:
        present = [s for s in sources if s.is_file()]
        self.missing += [str(s) for s in sources if not s.is_file()]
        if not present:
            return
        dst = self.out / name
        print(f"concatenate {len(present)} files -> {dst}")
        if not self.dry_run:
            with open(dst, "wb") as out:
                for s in present:
                    with open(s, "rb") as f:
                        shutil.copyfileobj(f, out)
        self._count("annotation files")

    def images(self, folder: Path, split: str, *, prefix: str = "", subdir: str = "") -> None:
        """Symlink every .jpg of ``folder`` into images/<split>/<subdir>/<prefix><name>."""
        if not folder.is_dir():
            self.missing.append(str(folder))
            return
        target = self.out / "images" / split / subdir
        n = 0
        if not self.dry_run:
            target.mkdir(parents=True, exist_ok=True)
        for entry in os.scandir(folder):
            if not entry.name.lower().endswith((".jpg", ".jpeg", ".png")):
                continue
            n += 1
            if self.dry_run:
                continue
            dst = target / f"{prefix}{entry.name}"
            if not dst.is_symlink() and not dst.exists():
                dst.symlink_to(Path(entry.path).resolve())
        print(f"link {n} images of {folder} -> {target}/{prefix}*")
        self._count("image links", n)

    def alias(self, split: str) -> None:
        """images/<split> -> train (evaluation splits whose images are among the train images)."""
        dst = self.out / "images" / split
        if self.dry_run:
            print(f"link {dst} -> train")
            return
        if dst.is_symlink():
            dst.unlink()
        if not dst.exists():
            dst.symlink_to("train")


def grit_subfolders(grit_train: Path) -> bool:
    """Whether GRiT's file_name values carry the VG folder (``VG_100K/1.jpg``) or only the file name."""
    if not grit_train.is_file():
        return False
    images = json.loads(grit_train.read_text()).get("images") or [{}]
    return "/" in str(images[0].get("file_name", ""))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="data folder to write (e.g. data/public)")
    p.add_argument("--coco", type=Path, help="COCO 2017: train2017/, val2017/, annotations/")
    p.add_argument("--ln", type=Path, help="Localized Narratives, COCO part (the .jsonl files)")
    p.add_argument("--mdetr", type=Path, help="MDETR's pre-processed RefCOCO/+/g annotations")
    p.add_argument("--grit", type=Path, help="GRiT's pre-processed Visual Genome json (train.json, test.json)")
    p.add_argument("--vg", type=Path, help="Visual Genome v1.2 images: VG_100K/, VG_100K_2/")
    p.add_argument("--link", action="store_true", help="symlink the annotation files instead of copying")
    p.add_argument("--dry-run", action="store_true", help="print what would be done, write nothing")
    args = p.parse_args(argv)
    if not any((args.coco, args.ln, args.mdetr, args.grit, args.vg)):
        p.error("give at least one of --coco, --ln, --mdetr, --grit, --vg")

    out = Path(args.out)
    if not args.dry_run:
        (out / "images").mkdir(parents=True, exist_ok=True)
    b = Builder(out, link=args.link, dry_run=args.dry_run)
    if args.coco:
        # train2014 is a subset of train2017: one folder serves LN and COCO captions (000000xxxxxx.jpg)
        # and MDETR's RefCOCO (COCO_train2014_000000xxxxxx.jpg)
        b.images(args.coco / "train2017", "train")
        b.images(args.coco / "train2017", "train", prefix="COCO_train2014_")
        b.images(args.coco / "val2017", "val")
        b.annotation(args.coco / "annotations" / "captions_train2017.json", "coco_captions_train.json")
        b.annotation(args.coco / "annotations" / "captions_val2017.json", "coco_captions_val.json")
    if args.ln:
        b.concatenate([args.ln / name for name in LN_TRAIN], "ln_train.jsonl")
        b.annotation(args.ln / "coco_val_localized_narratives.jsonl", "ln_val.jsonl")
    if args.mdetr:
        b.annotation(args.mdetr / "merge_coco_img_safe_train.json", "refcoco_train.json")
        for name, split in REFCOCO_EVAL.items():
            if (args.mdetr / name).is_file():
                b.annotation(args.mdetr / name, f"refcoco_{split}.json")
                b.alias(split)
    if args.grit:
        b.annotation(args.grit / "train.json", "vg_train.json")
        b.annotation(args.grit / "test.json", "vg_vg-test.json")
        b.alias("vg-test")
    if args.vg:
        nested = grit_subfolders(args.grit / "train.json") if args.grit else False
        for sub in ("VG_100K", "VG_100K_2"):
            b.images(args.vg / sub, "train", subdir=sub if nested else "")
    for path in b.missing:
        print(f"warning: {path} not found; skipped", file=sys.stderr)
    summary = ", ".join(f"{n} {what}" for what, n in b.counts.items()) or "nothing"
    print(f"{'would write' if args.dry_run else 'wrote'} {summary} in {out}")
    return 0 if b.counts else 1


if __name__ == "__main__":
    sys.exit(main())
