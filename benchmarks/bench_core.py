"""Core inference benchmark: per preset, vision ms, refer ms (cold and cached image), caption ms per
token, images/s at several batch sizes, peak memory. Optionally a Florence-2-base-shaped baseline
(random weights, built from transformers.Florence2Config) in the same run on the same device.

    python benchmarks/bench_core.py --presets tiny synth-small base --batches 1 16 64 [--florence]

Prints a markdown table (paste into docs/benchmarks.md) and writes JSON with --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import time

import numpy as np
import torch
from PIL import Image


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeat=5, warmup=1) -> float:
    """Median wall time in ms."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def images(n: int, size: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def bench_preset(preset: str, device: torch.device, batches: list[int], repeat: int) -> dict:
    from pixelllm_plugins.inference.predictor import Predictor

    torch.manual_seed(0)
    pred = Predictor(preset, device=device, batch_size=max(batches))
    S = pred.config.vision.image_size
    one = images(1, S)
    pixels = torch.randn(1, 3, S, S, device=device, dtype=pred.dtype)
    row = {"preset": preset, "params_M": round(sum(p.numel() for p in pred.model.parameters()) / 1e6, 2)}
    with torch.inference_mode():
        row["vision_ms"] = round(timed(lambda: pred.model.encode_images(pixels), device, repeat), 2)

    def cold():
        pred.clear_cache()
        pred.refer(one, [["the red circle left of the blue star"]])

    row["refer_cold_ms"] = round(timed(cold, device, repeat), 2)
    pred.set_image(one[0])
    row["refer_cached_ms"] = round(timed(lambda: pred.refer(one, [["the small green square"]]), device,
                                         repeat), 2)
    n_tokens = 16
    from pixelllm_plugins.inference import decoding

    real_generate = decoding.generate

    def fixed_length(*args, **kwargs):  # force n_tokens new tokens so ms/token is comparable
        kwargs["max_new_tokens"] = n_tokens
        kwargs["min_new_tokens"] = n_tokens
        return real_generate(*args, **kwargs)

    decoding.generate = fixed_length
    try:
        cap_ms = timed(lambda: pred.caption_regions(one, [[(10, 10, S // 2, S // 2)]]), device, repeat)
    finally:
        decoding.generate = real_generate
    row["caption_ms_per_token"] = round(cap_ms / n_tokens, 2)
    for b in batches:
        batch = images(b, S, seed=b)

        def run(batch=batch):
            pred.clear_cache()
            pred.refer(batch, [["the red circle"]] * len(batch))

        ms = timed(run, device, repeat=max(1, repeat // 2))
        row[f"refer_img_per_s_b{b}"] = round(1000 * b / ms, 1)
    row["peak_mem_MB"] = round(peak_memory_mb(device), 0)
    return row


def bench_florence(device: torch.device, dtype: torch.dtype, batches: list[int], repeat: int) -> dict:
    """Florence-2-base-shaped grounding: 577 image tokens + 12 prompt tokens, 8 forced new tokens."""
    from transformers import Florence2Config, Florence2ForConditionalGeneration

    cfg = Florence2Config()
    cfg.vision_config.projection_dim = 768
    tc = cfg.text_config
    tc.d_model, tc.encoder_layers, tc.decoder_layers = 768, 6, 6
    tc.encoder_attention_heads = tc.decoder_attention_heads = 12
    tc.encoder_ffn_dim = tc.decoder_ffn_dim = 3072
    tc.vocab_size = 51290
    torch.manual_seed(0)
    model = Florence2ForConditionalGeneration(cfg).to(device, dtype).eval()
    row = {"preset": "florence-2-base-shaped", "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 1)}

    def run(b, beams):
        pixel_values = torch.randn(b, 3, 768, 768, device=device, dtype=dtype)
        ids = torch.randint(4, 1000, (b, 12), device=device)
        with torch.inference_mode():
            model.generate(input_ids=ids, pixel_values=pixel_values, max_new_tokens=8, min_new_tokens=8,
                           num_beams=beams, do_sample=False)

    row["refer_cold_ms"] = round(timed(lambda: run(1, 1), device, repeat), 1)
    row["refer_beam3_ms"] = round(timed(lambda: run(1, 3), device, repeat), 1)
    for b in batches:
        ms = timed(lambda b=b: run(b, 1), device, repeat=max(1, repeat // 2))
        row[f"refer_img_per_s_b{b}"] = round(1000 * b / ms, 1)
    row["peak_mem_MB"] = round(peak_memory_mb(device), 0)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "synth-small"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--florence", action="store_true", help="also run the Florence-2-base-shaped baseline")
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", default=None, help="write results JSON here")
    args = parser.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rows = [bench_preset(p, device, args.batches, args.repeat) for p in args.presets]
    if args.florence:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        rows.append(bench_florence(device, dtype, args.batches, args.repeat))
    name = device_name(device)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    print(f"device: {name}, torch {torch.__version__}\n")
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(str(r.get(k, "")) for k in keys) + " |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": name, "torch": torch.__version__, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
