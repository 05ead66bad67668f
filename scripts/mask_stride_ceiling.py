"""The best mean IoU a mask decoder can reach at a given output stride on a dataset's instance masks.

Each ground-truth mask is drawn on the model's canvas (longer side ``--canvas`` pixels, as the Predictor
resizes), area-pooled to one value per cell of the stride, turned back into the image's pixels by the
function ``Predictor.segment`` uses (bilinear over the canvas's extent, padding cropped, threshold at one
half) and compared with itself. No model runs: the figure is the ceiling that the stride alone sets, so a decoder
scoring near it is limited by its resolution, not by what it learned.

    python scripts/mask_stride_ceiling.py --data DV --split test test_shift --strides 4 2 1
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pixelllm_plugins.inference.predictor import _to_original
from pixelllm_plugins.inference.preprocess import PreparedImage
from pixelllm_plugins.masks import rle_to_mask, segmentation_to_rle


def ceiling(masks: list[np.ndarray], canvas: int, stride: int) -> float:
    """Mean IoU of each bool mask [H, W] with itself after a round trip through a stride-``stride`` grid."""
    ious = []
    for mask in masks:
        h, w = mask.shape
        scale = canvas / max(w, h)
        resized = (max(1, round(w * scale)), max(1, round(h * scale)))  # as preprocess.resize_longer_side
        cells = canvas // stride
        cw, ch = max(1, round(resized[0] / stride)), max(1, round(resized[1] / stride))
        pooled = F.interpolate(torch.from_numpy(mask).float()[None, None], size=(ch, cw), mode="area")
        grid = torch.zeros(cells, cells)
        grid[:ch, :cw] = pooled[0, 0, :cells, :cells]
        pred = _to_original(grid - 0.5, PreparedImage(torch.empty(0), (w, h), resized, scale), canvas, F)
        union = (pred | mask).sum()
        ious.append(float((pred & mask).sum() / union) if union else 1.0)
    return float(np.mean(ious)) if ious else float("nan")


def load_masks(data: Path, split: str, progress: bool) -> list[np.ndarray]:
    coco = json.loads((data / f"instances_{split}.json").read_text())
    sizes = {im["id"]: (im["height"], im["width"]) for im in coco["images"]}
    annotations = [a for a in coco["annotations"] if a.get("segmentation")]
    return [rle_to_mask(segmentation_to_rle(a["segmentation"], *sizes[a["image_id"]])).astype(bool)
            for a in tqdm(annotations, desc=f"masks ({split})", disable=not progress)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="dataset folder with instances_<split>.json")
    p.add_argument("--split", nargs="+", default=["test"])
    p.add_argument("--canvas", type=int, default=192, help="the model's canvas side (vision.image_size)")
    p.add_argument("--strides", type=int, nargs="+", default=[4, 2, 1])
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    out = {}
    for split in args.split:
        masks = load_masks(Path(args.data), split, not args.no_progress)
        out[split] = {"masks": len(masks), **{f"stride_{s}": round(ceiling(masks, args.canvas, s), 4)
                                             for s in args.strides}}
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
