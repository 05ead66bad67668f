"""Write the starting checkpoint for training on public data.

The built-in tokenizer is a small vocabulary made for the synthetic scenes: real captions would be
spelled almost letter by letter. This script writes a randomly initialised model of a preset (``base`` by
default: ViT-B/16 at 384 px, 6-layer prompt adapter, 6-layer 768-d decoder) with a Hugging Face
tokenizer (default: bert-base-uncased, the paper's vocabulary) and, optionally, a pretrained Hugging Face
vision tower in place of the built-in ViT. Pass a pretrained tower if you can: a random ViT would have to
learn vision from the COCO images alone.

    python scripts/make_init.py runs/public/init --vision /models/vit-base-patch16-384
    python scripts/make_init.py /tmp/pub-runs/init --preset tiny --tokenizer /models/tiny-bert   # dry run

The tokenizer and the vision tower are read with ``transformers``: a hub id is downloaded once into the
Hugging Face cache, a local folder is read as it is. The output folder loads with ``pixelllm train --init``
and ``scripts/train_stage.py --init``.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="checkpoint folder to write")
    p.add_argument("--vision", default=None, metavar="TOWER",
                   help="a Hugging Face vision tower (local folder or hub id), e.g. a local snapshot of "
                        "google/vit-base-patch16-384; default: the preset's built-in ViT, random")
    p.add_argument("--preset", default="base", help="architecture preset (default: base; tiny for a dry run)")
    p.add_argument("--tokenizer", default="google-bert/bert-base-uncased",
                   help="Hugging Face tokenizer, hub id or local folder (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random initialisation (default: 0)")
    args = p.parse_args(argv)

    import torch

    from pixelllm_plugins.checkpoint import save_pretrained
    from pixelllm_plugins.config import VisionConfig, get_preset
    from pixelllm_plugins.errors import PixelLLMError
    from pixelllm_plugins.modeling.pixel_llm import PixelLLM
    from pixelllm_plugins.modeling.vision_hf import hf_pixel_stats
    from pixelllm_plugins.tokenizer import PixelTokenizer

    try:
        torch.manual_seed(args.seed)
        config = get_preset(args.preset)
        if args.vision:
            stats = hf_pixel_stats(args.vision)  # the tower's own mean/std (local folders)
            extra = {"pixel_mean": stats[0], "pixel_std": stats[1]} if stats else {}
            config.vision = VisionConfig(kind="hf", hf_name_or_path=args.vision,
                                         image_size=config.vision.image_size, **extra)
        tokenizer = PixelTokenizer.from_hf(args.tokenizer)
        version = save_pretrained(PixelLLM(config, tokenizer.vocab_size), tokenizer, args.out)
    except (PixelLLMError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{version} in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
