"""Pretrain a model's zoom CNN (``prompt.zoom``) on the region captions of a data folder, before the model trains.

A zoom grown onto a trained model starts at zero and learns only as fast as the whole model does (a few
hundred region captions a step at the model's learning rate). Here its CNN and its word head learn alone, at
a high rate, to name the words of each region's caption from the zoomed-in box (the box-words loss,
``losses.box_words_loss``), on crops cut once from the training images (the exact box and jittered copies,
each side moved by up to ``--jitter`` of the box's size, and their mirror images). The zero-started layer
that adds the zoom to the map tokens stays zero, so the model still answers exactly as before; the CNN
(also copied into ``heads.candidate_zoom``'s, when the model has one) is then ready when the model trains.

    python scripts/pretrain_zoom.py g21 DV8 g21z --steps 3000

``--words-only`` trains the word head alone on a trained model (its CNN, and so every answer but the zoom's
votes, ``prompt.zoom_words`` and ``heads.candidate_words``, stays as it was), e.g. on scenes of both looks so
the votes also read the classic drawing:

    python scripts/pretrain_zoom.py MODEL TRAIN_VARIED TRAIN_CLASSIC OUT --words-only --steps 1500 --vote 1.0 --views 8
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from pixelllm_plugins.checkpoint import load_pretrained, save_pretrained
from pixelllm_plugins.inference.predictor import prepare_input
from pixelllm_plugins.modeling.losses import box_words_loss


def cut_crops(model, tokenizer, data: Path, split: str, copies: int, jitter: float, seed: int, progress: bool,
              max_images: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(crops [R,3,z,z] float16, text ids [R,T], text mask [R,T]) of every region of ``split``."""
    records = json.loads((data / f"vg_{split}.json").read_text())
    by_image: dict[int, list[dict]] = {}
    for ann in records["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    rng = random.Random(seed)
    canvas = model.canvas_size
    crops, texts = [], []
    images = records["images"][:max_images] if max_images else records["images"]
    for image in tqdm(images, desc="cutting crops", disable=not progress):
        anns = by_image.get(image["id"], [])
        if not anns:
            continue
        with Image.open(data / "images" / split / image["file_name"]) as im:
            prepared = prepare_input(im.convert("RGB"), model.config.vision).prepared
        scale = canvas / max(image["width"], image["height"])
        boxes = []
        for ann in anns:
            x, y, w, h = ann["bbox"]
            for k in range(copies):
                dx = [0.0] * 4 if k == 0 else [rng.uniform(-jitter, jitter) for _ in range(4)]
                boxes.append([x + dx[0] * w, y + dx[1] * h, x + w + dx[2] * w, y + h + dx[3] * h])
                texts.append(ann["caption"])
        boxes01 = (torch.tensor(boxes) * scale / canvas).clamp(0, 1)
        pixels = prepared.pixel_values[None].float()
        crops.append(model.zoom.crops(pixels, boxes01, torch.zeros(len(boxes), dtype=torch.long)).half())
    encoded = [tokenizer.encode(t, add_bos=True, add_eos=True, max_len=16) for t in texts]
    width = max(map(len, encoded))
    ids = torch.tensor([e + [tokenizer.pad_id] * (width - len(e)) for e in encoded])
    return torch.cat(crops), ids, ids != tokenizer.pad_id


def word_recall(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> float:
    """Share of the caption words (BOS and EOS left out) that are among the row's top-k logits, k = its words."""
    hits = total = 0
    for lg, t, m in zip(logits, ids, mask):
        words = set(t[m][1:-1].tolist())
        top = set(lg.topk(len(words)).indices.tolist())
        hits, total = hits + len(words & top), total + len(words)
    return hits / max(1, total)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a checkpoint folder whose config has prompt.zoom and heads.box_words")
    p.add_argument("data", type=Path, nargs="+", help="data folder(s) with vg_<split>.json and images/<split>/")
    p.add_argument("out", type=Path, help="where to write the checkpoint with the pretrained zoom")
    p.add_argument("--split", default="train")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--copies", type=int, default=3, help="crops per region: the exact box and jittered ones")
    p.add_argument("--jitter", type=float, default=0.15)
    p.add_argument("--holdout", type=float, default=0.05, help="share of the crops kept out to report on")
    p.add_argument("--max-images", type=int, default=0, help="use the first N images only (0: all)")
    p.add_argument("--words-only", action="store_true",
                   help="train only the word head (the CNN stays as it is; the model's answers other than the "
                        "zoom's vote do not change)")
    p.add_argument("--vote", type=float, default=None,
                   help="also set the head's votes in the saved model's config: prompt.zoom_words (region "
                        "captions) and, with the grid point head, heads.candidate_words (which object a text "
                        "names); refit the score calibration afterwards (scripts/calibrate_scores.py)")
    p.add_argument("--views", type=int, choices=(1, 2, 4, 8), default=None,
                   help="also set prompt.zoom_views (how many views of a region's crop the caption vote averages)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    progress = sys.stderr.isatty()
    torch.manual_seed(args.seed)
    model, tokenizer, version = load_pretrained(args.model)
    if model.zoom is None or model.zoom.words is None:
        p.error(f"{args.model} has no zoom with a word head: grow it with prompt.zoom=32 (heads.box_words on)")
    parts_of_data = [cut_crops(model, tokenizer, data, args.split, args.copies, args.jitter, args.seed, progress,
                               args.max_images) for data in args.data]
    zoom = model.zoom.float().train()
    if args.words_only:  # the CNN is frozen: read each crop once, then train the head on its features
        zoom.cnn.eval().requires_grad_(False)
        with torch.no_grad():
            parts_of_data = [(torch.cat([zoom.cnn(c.float()).flatten(1) for c in crops.split(1024)]), ids, mask)
                             for crops, ids, mask in parts_of_data]
    width = max(ids.shape[1] for _, ids, _ in parts_of_data)
    crops = torch.cat([c for c, _, _ in parts_of_data])
    ids = torch.cat([F.pad(i, (0, width - i.shape[1]), value=tokenizer.pad_id) for _, i, _ in parts_of_data])
    mask = ids != tokenizer.pad_id
    order = torch.randperm(len(crops) // args.copies, generator=torch.Generator().manual_seed(args.seed))
    order = (order[:, None] * args.copies + torch.arange(args.copies)).flatten()  # a region's copies together
    crops, ids, mask = crops[order], ids[order], mask[order]
    n_hold = int(len(crops) * args.holdout) // args.copies * args.copies  # whole regions at the end
    train, held = slice(0, len(crops) - n_hold), slice(len(crops) - n_hold, len(crops))
    print(f"{len(crops)} crops of {len(crops) // args.copies} regions ({n_hold} held out)")

    def head_logits(batch: torch.Tensor) -> torch.Tensor:
        return zoom.words(batch if args.words_only else zoom.cnn(batch).flatten(1))

    parts = list(zoom.words.parameters()) + ([] if args.words_only else list(zoom.cnn.parameters()))
    optimizer = torch.optim.AdamW(parts, lr=args.lr, weight_decay=0.01)
    n_train, start = train.stop, time.time()
    for step in tqdm(range(args.steps), desc="pretraining the zoom", disable=not progress):
        lr = args.lr * 0.5 * (1 + math.cos(math.pi * step / args.steps)) * min(1.0, (step + 1) / 100)
        for group in optimizer.param_groups:
            group["lr"] = lr
        rows = torch.randint(0, n_train, (args.batch_size,))
        batch = crops[rows].float()
        if not args.words_only:  # (features of mirrored crops would need the CNN again)
            flip = torch.rand(len(rows)) < 0.5
            batch[flip] = batch[flip].flip(-1)
        loss = box_words_loss(head_logits(batch), ids[rows], mask[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % max(1, args.steps // 5) == 0 or step + 1 == args.steps:
            with torch.no_grad():
                zoom.eval()
                logits = torch.cat([head_logits(c.float()) for c in crops[held].split(1024)])
                zoom.train()
            print(f"step {step + 1}: loss {loss.item():.3f}, held-out word recall "
                  f"{word_recall(logits, ids[held], mask[held]):.3f} ({time.time() - start:.0f} s)", flush=True)
    relations = getattr(model.point_head, "relations", None)
    if relations is not None and relations.zoom is not None and not args.words_only:
        relations.zoom.cnn.load_state_dict(zoom.cnn.state_dict())
    model.eval()
    if args.vote is not None:
        model.config.prompt.zoom_words = args.vote
        if model.config.heads.point_mode == "grid":
            model.config.heads.candidate_words = args.vote
    if args.views is not None:
        model.config.prompt.zoom_views = args.views
    model.config.validate()
    new_version = save_pretrained(model, tokenizer, args.out, extra_meta={"zoom_pretrained_from": version})
    print(f"{new_version} in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
