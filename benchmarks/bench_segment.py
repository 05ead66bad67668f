"""Segmentation cost on CPU: ``Predictor.segment`` through the model's own mask decoder against ``refer``.

The model is the embedded synth-small checkpoint (which has a trained mask decoder; a checkpoint without one
is grown in memory with ``heads.mask_decoder=3`` and ``prompt.points``, its decoder random and seeded), or
with ``--random`` the synth-small preset with random weights. Per
image, ``--prompts`` texts (refer, and segment by text: refer + the decoder), boxes and points (segment only).

Each row: CPU ms per image (``time.process_time``: this process, all threads; median over ``--repeat``
rounds), with the image embedding cached (the annotation-tool case: several prompts on one image) and cold
(cache cleared before each call: the vision pass included). The calls take turns within each round, so a
shared machine's drift (tens of percent within minutes) reaches all of them alike; the ratio rows are the
median over rounds of segment / refer measured in the same round (the quartiles show the spread). The
target is segment (texts) <= 1.5x refer. Masks are upsampled to, and encoded (COCO RLE, polygons) at, the
image's own size (``--size``).

A random decoder's masks are speckled (its transposed convolutions give each 2x2 block its own sign: a
mask has a hundred holes), and tracing them as polygons costs far more than the model. The "blob masks"
rows run the same decoder but replace its logits by an ellipse in the prompt's box (around the point for a
point prompt): the shape a trained decoder gives, so those rows show what segment will cost once trained.

    python benchmarks/bench_segment.py
    python benchmarks/bench_segment.py --size 640x480 --prompts 4 --repeat 20 --threads 2
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from pixelllm_plugins.checkpoint import load_pretrained
from pixelllm_plugins.config import get_preset
from pixelllm_plugins.inference.predictor import Predictor
from pixelllm_plugins.masks import mask_to_polygons, mask_to_rle
from pixelllm_plugins.modeling.pixel_llm import PixelLLM
from pixelllm_plugins.tokenizer import PixelTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_worker import machine  # noqa: E402 - a sibling script, not a package

TEXTS = ["the red circle", "the blue square", "the green triangle on the left", "the small yellow star",
         "the large purple ellipse", "the orange square at the bottom", "the circle above the square",
         "the blue triangle"]


def scene(w: int, h: int, seed: int) -> Image.Image:
    image = Image.new("RGB", (w, h), (120 + seed % 40, 125, 130))
    draw = ImageDraw.Draw(image)
    draw.ellipse((0.1 * w, 0.2 * h, 0.4 * w, 0.6 * h), fill=(220, 30, 30))
    draw.rectangle((0.55 * w, 0.3 * h, 0.9 * w, 0.8 * h), fill=(30, 30, 220))
    draw.polygon([(0.1 * w, 0.95 * h), (0.3 * w, 0.65 * h), (0.45 * w, 0.95 * h)], fill=(30, 180, 40))
    return image


def model_with_decoder(random: bool) -> tuple[Predictor, str]:
    """(a Predictor whose model has a mask decoder and point prompts, how it was made)."""
    if not random:
        try:
            base, tokenizer, version = load_pretrained(None)
        except Exception as exc:  # noqa: BLE001 - no embedded model: random weights instead
            print(f"(no embedded model: {exc}; using random weights)")
        else:
            if base.config.heads.mask_decoder > 0:
                return Predictor(base, tokenizer=tokenizer, model_version=version, device="cpu"), version
            config = dataclasses.replace(base.config,
                                         heads=dataclasses.replace(base.config.heads, mask_decoder=3),
                                         prompt=dataclasses.replace(base.config.prompt, points=True))
            torch.manual_seed(0)
            grown = PixelLLM(config, tokenizer.vocab_size)
            missing = grown.load_state_dict(base.state_dict(), strict=False).missing_keys
            assert all(k.startswith(("mask_decoder.", "prompt_encoder.point_embed",
                                     "prompt_encoder.not_a_point_embed")) for k in missing), missing[:4]
            how = f"{version} + a random mask decoder (K=3) and point embeddings"
            return Predictor(grown.eval(), tokenizer=tokenizer, model_version=how, device="cpu"), how
    config = get_preset("synth-small")
    config.heads.mask_decoder, config.prompt.points = 3, True
    tokenizer = PixelTokenizer.default()
    torch.manual_seed(0)
    model = PixelLLM(config, tokenizer.vocab_size).eval()
    how = "synth-small preset, random weights, heads.mask_decoder=3, prompt.points"
    return Predictor(model, tokenizer=tokenizer, model_version=how, device="cpu"), how


def blob_masks(predictor: Predictor):
    """Wrap the model's ``prompt_masks``: the decoder runs, then its logits become an ellipse in each
    prompt's box (radius S/8 around a point prompt) -- a trained decoder's kind of mask."""
    original = predictor.model.prompt_masks
    size = predictor.config.vision.image_size

    def smooth(embedding, boxes, image_index, image_sizes=None, points=None, point_labels=None):
        logits, iou = original(embedding, boxes, image_index, image_sizes, points, point_labels)
        side = logits.shape[-1]
        centre = (torch.arange(side, dtype=torch.float32) + 0.5) * size / side  # cell centres, canvas px
        b = boxes.float()
        if points is not None:
            p = points[:, 0].float()
            b = torch.cat([p - size / 8, p + size / 8], 1)
        cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
        rx, ry = ((b[:, 2] - b[:, 0]) / 2).clamp(min=1), ((b[:, 3] - b[:, 1]) / 2).clamp(min=1)
        d = (((centre[None, None, :] - cx[:, None, None]) / rx[:, None, None]) ** 2
             + ((centre[None, :, None] - cy[:, None, None]) / ry[:, None, None]) ** 2)
        return (4 * (1 - d))[:, None].expand_as(logits).to(logits.dtype), iou

    return smooth


def cpu_s(fn, before=None) -> float:
    if before is not None:
        before()
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


def interleaved(calls: dict, repeat: int, before=None) -> dict[str, list[float]]:
    """CPU seconds of each call in each of ``repeat`` rounds, the calls taking turns (after one warm-up)."""
    for fn in calls.values():
        fn()  # warm-up (and the first embedding)
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeat):
        for name, fn in calls.items():
            times[name].append(cpu_s(fn, before))
    return times


def quartiles(values: list[float]) -> tuple[float, float, float]:
    q1, q2, q3 = statistics.quantiles(values, n=4) if len(values) > 1 else (values[0],) * 3
    return q1, q2, q3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="320x240", help="image size WxH (masks are encoded at this size)")
    p.add_argument("--images", type=int, default=2, help="images per call")
    p.add_argument("--prompts", type=int, default=2, help="prompts per image (texts, boxes, points)")
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--random", action="store_true", help="the synth-small preset with random weights")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    w, h = (int(v) for v in args.size.lower().split("x"))
    predictor, how = model_with_decoder(args.random)
    images = [scene(w, h, i) for i in range(args.images)]
    k = args.prompts
    texts = [[TEXTS[(i + j) % len(TEXTS)] for j in range(k)] for i in range(len(images))]
    boxes = [[[0.1 * w + 5 * j, 0.2 * h, 0.4 * w + 5 * j, 0.6 * h] for j in range(k)] for _ in images]
    points = [[[0.25 * w + 5 * j, 0.4 * h] for j in range(k)] for _ in images]
    calls = {
        "refer (texts)": lambda: predictor.refer(images, texts),
        "segment (texts)": lambda: predictor.segment(images, texts=texts),
        "segment (boxes)": lambda: predictor.segment(images, boxes=boxes),
        "segment (points)": lambda: predictor.segment(images, points=points),
    }
    n = len(images)
    print(f"Machine: {machine()}; {args.threads} torch thread(s)")
    print(f"Model: {how} (mask source: {predictor.mask_source})")
    print(f"{n} images of {w}x{h} per call, {k} prompts each; CPU ms per image, median of {args.repeat} "
          "interleaved rounds\n")

    def measure(calls: dict) -> dict[str, tuple[list[float], list[float]]]:
        warm = interleaved(calls, args.repeat)
        cold = interleaved(calls, args.repeat, before=predictor.clear_cache)
        return {name: (warm[name], cold[name]) for name in calls}

    def encoding() -> tuple[float, float]:
        masks = [m.to_mask() for per in predictor.segment(images, boxes=boxes) for m in per]
        holes = sum(len(poly["holes"]) for m in masks for poly in mask_to_polygons(m)) / len(masks)
        times = interleaved({"encode": lambda: [(mask_to_rle(m), mask_to_polygons(m)) for m in masks]}, args.repeat)
        return 1000 * statistics.median(times["encode"]) / n, holes

    times = measure(calls)
    model_encoding = encoding()
    predictor.model.prompt_masks = blob_masks(predictor)
    times |= {f"{name}, blob masks": t for name, t in measure({k: v for k, v in calls.items()
                                                               if k.startswith("segment")}).items()}
    blob_encoding = encoding()
    del predictor.model.prompt_masks
    print("| call | cached embedding | cold (vision included) |")
    print("|---|---|---|")
    for name, (warm, cold) in times.items():
        print(f"| {name} | {1000 * statistics.median(warm) / n:.1f} | {1000 * statistics.median(cold) / n:.1f} |")
        if name == "segment (points)":
            print(f"| the model's masks: of which RLE + polygons ({model_encoding[1]:.0f} holes a mask) | "
                  f"{model_encoding[0]:.1f} | {model_encoding[0]:.1f} |")
    print(f"| blob masks: of which RLE + polygons ({blob_encoding[1]:.0f} holes a mask) | {blob_encoding[0]:.1f} | "
          f"{blob_encoding[0]:.1f} |")
    refer_warm, refer_cold = times["refer (texts)"]
    print("\n| ratio to refer (texts), median over rounds [quartiles] | cached embedding | cold |")
    print("|---|---|---|")
    for name, (warm, cold) in times.items():
        if name.startswith("segment"):
            cells = []
            for mine, refer in ((warm, refer_warm), (cold, refer_cold)):
                if name.endswith("blob masks"):  # measured in other rounds than refer: ratio of medians
                    cells.append(f"{statistics.median(mine) / statistics.median(refer):.2f}x")
                else:
                    q1, q2, q3 = quartiles([a / b for a, b in zip(mine, refer)])
                    cells.append(f"**{q2:.2f}x** [{q1:.2f}, {q3:.2f}]")
            print(f"| {name} | {cells[0]} | {cells[1]} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
