"""Export a trained checkpoint folder as a shippable model (fp16 safetensors) with its training metadata.

    python scripts/export_model.py runs/synth-small/final pixelllm_plugins/weights/synth-small [CARD.md]
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

from pixelllm_plugins.checkpoint import load_pretrained, save_pretrained


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print(__doc__, file=sys.stderr)
        return 2
    src, dst = Path(argv[0]), Path(argv[1])
    model, tokenizer, version = load_pretrained(str(src))
    meta = json.loads((src / "meta.json").read_text())
    extra = {k: meta[k] for k in ("step", "train_config", "eval", "score_calibration") if k in meta}
    extra.update(status="trained", trained_from=version)
    card_file = Path(argv[2]) if len(argv) == 3 else src / "README.md"
    card = card_file.read_text() if card_file.is_file() else None
    shutil.rmtree(dst, ignore_errors=True)
    new = save_pretrained(model, tokenizer, dst, dtype=torch.float16, extra_meta=extra, model_card=card)
    print(f"{new}: {(dst / 'model.safetensors').stat().st_size / 1e6:.1f} MB in {dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
