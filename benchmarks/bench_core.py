"""Core inference benchmark: per preset, vision ms, refer ms (cold and cached image), caption ms per
token, images/s at several batch sizes, peak memory. Optionally a Florence-2-base-shaped baseline
(random weights, built from transformers.Florence2Config) in the same run on the same device.

    python benchmarks/bench_core.py --presets tiny synth-small base --batches 1 16 64 [--florence]
    python benchmarks/bench_core.py --presets base --batches 1 16 --batches-for base=1,4 florence=1,4

Prints a markdown table (paste into docs/benchmarks.md) and writes JSON with --out. Each row runs in its own
child process (unless --no-isolate) so that the CPU peak-memory column (max RSS) belongs to that row alone.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import numpy as np
import torch
from PIL import Image


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu} ({os.cpu_count()} cores), {torch.get_num_threads()} torch threads"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


STAT = "median"  # or "min" (--stat): the minimum is the steadier estimate on a shared, loaded CPU
CLOCK = time.perf_counter  # --clock cpu: time.process_time (CPU seconds of this process, all threads)


def timed(fn, device, repeat=5, warmup=1) -> float:
    """Median (or, with --stat min, minimum) wall time in ms over ``repeat`` calls after ``warmup``."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        sync(device)
        t = CLOCK()
        fn()
        sync(device)
        times.append((CLOCK() - t) * 1000)
    return min(times) if STAT == "min" else statistics.median(times)


def per_s(n: int, ms: float) -> float:
    """n items in ms milliseconds -> items per second, 3 significant digits (slow CPU rows stay readable)."""
    return float(f"{1000 * n / ms:.3g}")


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
        row["vision_ms"] = round(timed(lambda: pred.model.embed_images(pixels), device, repeat), 2)

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
        row[f"refer_img_per_s_b{b}"] = per_s(b, ms)
    row["peak_mem_MB"] = round(peak_memory_mb(device), 0)
    return row


FLORENCE_IMAGE_SIZE = 768
FLORENCE_PROMPT_TOKENS = 12
FLORENCE_NEW_TOKENS = 8


def florence_base_model(device: torch.device, dtype: torch.dtype):
    """Florence-2-base-shaped, random weights: DaViT vision tower (transformers defaults) with
    projection_dim=768; BART d_model 768, 6+6 layers, 12 heads, ffn 3072, vocab 51290."""
    from transformers import (
        BartConfig,
        Florence2Config,
        Florence2ForConditionalGeneration,
        Florence2VisionConfig,
    )

    text = BartConfig(vocab_size=51290, d_model=768, encoder_layers=6, decoder_layers=6,
                      encoder_attention_heads=12, decoder_attention_heads=12, encoder_ffn_dim=3072,
                      decoder_ffn_dim=3072)
    cfg = Florence2Config(vision_config=Florence2VisionConfig(projection_dim=768), text_config=text)
    torch.manual_seed(0)
    return Florence2ForConditionalGeneration(cfg).to(device, dtype).eval()


def bench_florence(device: torch.device, dtype: torch.dtype, batches: list[int], repeat: int) -> dict:
    """Florence-2-base-shaped grounding: 577 image tokens + 12 prompt tokens, 8 forced new tokens."""
    model = florence_base_model(device, dtype)
    row = {"preset": "florence-2-base-shaped", "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 2)}
    image_token_id = model.config.image_token_id
    with torch.inference_mode():  # the vision tower decides how many image placeholders input_ids needs
        probe = torch.zeros(1, 3, FLORENCE_IMAGE_SIZE, FLORENCE_IMAGE_SIZE, device=device, dtype=dtype)
        n_image = model.model.get_image_features(probe).pooler_output.shape[1]
    if n_image != 577:  # 24x24 spatial tokens (stride 32 at 768 px) + 1 temporal token
        raise RuntimeError(f"Florence-2 baseline gives {n_image} image tokens at {FLORENCE_IMAGE_SIZE} px, not 577")
    row["image_tokens"] = n_image
    gen = torch.Generator().manual_seed(0)

    def inputs(b):
        pixel_values = torch.randn(b, 3, FLORENCE_IMAGE_SIZE, FLORENCE_IMAGE_SIZE, generator=gen).to(device, dtype)
        prompt = torch.randint(4, 50000, (b, FLORENCE_PROMPT_TOKENS), generator=gen)
        ids = torch.cat([torch.full((b, n_image), image_token_id), prompt], dim=1).to(device)
        return ids, pixel_values

    def run(b, beams):
        ids, pixel_values = inputs(b)
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixel_values,
                                 max_new_tokens=FLORENCE_NEW_TOKENS, min_new_tokens=FLORENCE_NEW_TOKENS,
                                 num_beams=beams, do_sample=False, forced_eos_token_id=None,
                                 forced_bos_token_id=None, no_repeat_ngram_size=0, early_stopping=False)
        # decoder start token + exactly 8 new tokens
        assert out.shape[1] == 1 + FLORENCE_NEW_TOKENS, out.shape

    row["refer_cold_ms"] = round(timed(lambda: run(1, 1), device, repeat), 2)
    row["refer_beam3_ms"] = round(timed(lambda: run(1, 3), device, repeat), 2)
    for b in batches:
        ms = timed(lambda b=b: run(b, 1), device, repeat=max(1, repeat // 2))
        row[f"refer_img_per_s_b{b}"] = per_s(b, ms)
    row["peak_mem_MB"] = round(peak_memory_mb(device), 0)
    return row


def run_row(name: str, device: torch.device, batches: list[int], repeat: int) -> dict:
    if name == "florence":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        return bench_florence(device, dtype, batches, repeat)
    return bench_preset(name, device, batches, repeat)


def parse_batches_for(items: list[str]) -> dict[str, list[int]]:
    out = {}
    for item in items:
        name, _, sizes = item.partition("=")
        out[name] = [int(x) for x in sizes.split(",") if x]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "synth-small"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--batches-for", nargs="*", default=[], metavar="ROW=B1,B2",
                        help="override the batch sizes of one row, e.g. base=1,4 florence=1,4")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--florence", action="store_true", help="also run the Florence-2-base-shaped baseline")
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: as torch)")
    parser.add_argument("--stat", choices=["median", "min"], default="median",
                        help="statistic over the repeats (min is steadier on a shared CPU)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="cpu: CPU time of the process (all threads) instead of wall time; with "
                             "--threads 1 it is nearly immune to other load on a shared CPU (CPU device only)")
    parser.add_argument("--no-isolate", action="store_true", help="run every row in this process")
    parser.add_argument("--out", default=None, help="write results JSON here")
    parser.add_argument("--_row", default=None, help=argparse.SUPPRESS)  # child-process mode
    args = parser.parse_args()
    global STAT, CLOCK
    STAT = args.stat
    if args.clock == "cpu":
        CLOCK = time.process_time
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    overrides = parse_batches_for(args.batches_for)
    if args._row:  # child: one row, JSON on the last stdout line
        row = run_row(args._row, device, overrides.get(args._row, args.batches), args.repeat)
        print(json.dumps(row))
        return
    names = list(args.presets) + (["florence"] if args.florence else [])
    rows = []
    for n in names:
        batches = overrides.get(n, args.batches)
        t = time.perf_counter()
        load_before = os.getloadavg()[0]
        if args.no_isolate:
            row = run_row(n, device, batches, args.repeat)
        else:
            cmd = [sys.executable, __file__, "--_row", n, "--repeat", str(args.repeat), "--device", str(device),
                   "--stat", args.stat, "--clock", args.clock, "--batches", *map(str, batches)]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            done = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
            row = json.loads(done.stdout.strip().splitlines()[-1])
        row["row_wall_s"] = round(time.perf_counter() - t, 1)
        row["load_avg"] = round((load_before + os.getloadavg()[0]) / 2, 1)  # 1-min load, start/end mean
        print(f"{n}: {row}", file=sys.stderr, flush=True)
        rows.append(row)
    name = device_name(device)
    first = ["preset", "params_M", "vision_ms", "refer_cold_ms", "refer_beam3_ms", "refer_cached_ms",
             "caption_ms_per_token"]
    seen = list(dict.fromkeys(k for r in rows for k in r))
    img_s = sorted((k for k in seen if k.startswith("refer_img_per_s_b")), key=lambda k: int(k.rsplit("b", 1)[1]))
    keys = [k for k in first if k in seen] + img_s + [k for k in seen if k not in first and k not in img_s]
    print(f"device: {name}, torch {torch.__version__}, timing: {args.stat} {args.clock} time\n")
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(str(r.get(k, "")) for k in keys) + " |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": name, "torch": torch.__version__, "threads": torch.get_num_threads(),
                       "stat": args.stat, "clock": args.clock, "cpu_count": os.cpu_count(),
                       "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
