"""Image loading cost: decode + resize + normalise + hash (``prepare_input``), full decode vs reduced JPEG decode.

For each photo size and model input size, the CPU milliseconds (one thread, minimum over repeats) of
turning the file's bytes into the model's input: PNG, JPEG decoded in full (what the worker did before), and
JPEG decoded at a reduced DCT scale (``io.load_image_scaled``, what the worker and the Predictor do now).
Then, per photo, what a plugin spends to hand a JPEG to a worker: decode + PNG re-encode (before) against
a header check and the file's bytes as they are (``io.open_encoded``, now). Prints Markdown tables with the
machine named.

    python benchmarks/bench_decode.py
    python benchmarks/bench_decode.py --sizes 640x480 4000x3000 --inputs 192 384 --repeat 20
"""

from __future__ import annotations

import argparse
import base64
import io
import sys
import time
from pathlib import Path

from PIL import Image, ImageDraw

from pixelllm_plugins.config import VisionConfig
from pixelllm_plugins.inference.preprocess import prepare_image_keyed
from pixelllm_plugins.io import ImageLimits, load_image, load_image_scaled, open_encoded
from pixelllm_plugins.serving.client import encode_image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_worker import machine  # noqa: E402 - a sibling script, not a package


def photo(w: int, h: int) -> Image.Image:
    """Shapes over a gradient: compresses like a simple photo, not like a flat test card."""
    image = Image.linear_gradient("L").resize((w, h)).convert("RGB")
    draw = ImageDraw.Draw(image)
    for k in range(12):
        x, y = (k * 0.37 % 1) * w, (k * 0.61 % 1) * h
        draw.ellipse((x, y, x + w / 8, y + h / 6), fill=(40 * k % 256, 90, 200 - 10 * k))
    return image


def encode(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def cpu_ms(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.process_time()
        fn()
        best = min(best, time.process_time() - t0)
    return 1000 * best


def prepare(data: bytes, vision: VisionConfig, reduced: bool, limits: ImageLimits):
    image, original = load_image_scaled(data, limits, vision.image_size if reduced else None)
    return prepare_image_keyed(image, vision, original_size=original)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["256x192", "640x480", "1600x1200", "4000x3000"])
    p.add_argument("--inputs", nargs="+", type=int, default=[64, 192, 384],
                   help="model input sizes (tiny 64, synth-small 192, base 384)")
    p.add_argument("--repeat", type=int, default=10)
    args = p.parse_args(argv)
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:  # pragma: no cover
        pass
    limits = ImageLimits(max_pixels=100_000_000, max_bytes=200 * 2**20)
    print(f"Machine: {machine()}; CPU ms per image (1 thread, min of {args.repeat})\n")
    print("| photo | model input | PNG | JPEG full decode | JPEG reduced decode | saving |")
    print("|---|---|---|---|---|---|")
    for size in args.sizes:
        w, h = (int(v) for v in size.lower().split("x"))
        image = photo(w, h)
        png, jpeg = encode(image, "PNG"), encode(image, "JPEG")
        for side in args.inputs:
            vision = VisionConfig(image_size=side)
            reduced = prepare(jpeg, vision, True, limits)[0]
            full = prepare(jpeg, vision, False, limits)[0]
            assert reduced.original_size == full.original_size == (w, h)
            assert reduced.resized_size == full.resized_size
            t_png = cpu_ms(lambda d=png, v=vision: prepare(d, v, False, limits), args.repeat)
            t_full = cpu_ms(lambda d=jpeg, v=vision: prepare(d, v, False, limits), args.repeat)
            t_red = cpu_ms(lambda d=jpeg, v=vision: prepare(d, v, True, limits), args.repeat)
            print(f"| {w}x{h} | {side} | {t_png:.2f} | {t_full:.2f} | {t_red:.2f} | {t_full / t_red:.1f}x |",
                  flush=True)
    print("\nWhat a plugin (Label Studio backend, FiftyOne) spends to hand a JPEG to a worker: before, it decoded\n"
          "the file and RemotePredictor re-encoded the pixels as PNG; now it checks the header\n"
          "(`io.open_encoded`) and sends the file's bytes.\n")
    print("| photo | JPEG bytes | decode + PNG re-encode: CPU ms | bytes sent | open_encoded + send as is: CPU ms "
          "| bytes sent |")
    print("|---|---|---|---|---|---|")
    for size in args.sizes:
        w, h = (int(v) for v in size.lower().split("x"))
        jpeg = encode(photo(w, h), "JPEG")
        before = encode_image(load_image(jpeg, limits), limits)
        after = encode_image(open_encoded(jpeg, limits), limits)
        t_before = cpu_ms(lambda d=jpeg: encode_image(load_image(d, limits), limits), args.repeat)
        t_after = cpu_ms(lambda d=jpeg: encode_image(open_encoded(d, limits), limits), args.repeat)
        sent_before, sent_after = (len(base64.b64decode(x["b64"])) for x in (before, after))
        print(f"| {w}x{h} | {len(jpeg):,} | {t_before:.1f} | {sent_before:,} | {t_after:.2f} | {sent_after:,} |",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
