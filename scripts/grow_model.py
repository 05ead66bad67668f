"""Copy a checkpoint into a model with more modules: config changes given as SECTION.FIELD=VALUE (JSON).

Weights that exist in both keep their values; new modules keep their initialisation. The grid point
head's additions (``heads.point_context_layers``, ``heads.point_refine``, ``heads.point_coords``), the fine
map's projection (``prompt.fine_grid``), the zooms (``prompt.zoom``, ``heads.candidate_zoom``) and the box
extent (``prompt.box_extent``) start at zero, so the grown model answers exactly as the source until it is
trained (``pixelllm train --init DST``).
The mask decoder (``heads.mask_decoder=K``) and point prompts (``prompt.points``) are built apart from every
other part and read only by masks and point prompts, so boxes, captions and traces stay the same too;
training the grown model then trains the decoder on the data's masks (``--point-prompt-prob P`` adds points).

    python scripts/grow_model.py SRC DST heads.point_context_layers=1 heads.point_refine=true
    python scripts/grow_model.py SRC DST vision.fine_channels=16 prompt.fine_grid=4
    python scripts/grow_model.py SRC DST prompt.box_extent=true
    python scripts/grow_model.py SRC DST prompt.zoom=32 heads.candidate_zoom=32
    python scripts/grow_model.py SRC DST heads.mask_decoder=3 prompt.points=true

SRC may also be a preset name (``synth-small``): a random model with the changed config.
"""

from __future__ import annotations

import json
import sys

from pixelllm_plugins.checkpoint import grow_pretrained


def main(argv: list[str]) -> int:
    if len(argv) < 3 or any("=" not in a for a in argv[2:]):
        print(__doc__, file=sys.stderr)
        return 2
    changes = {key: json.loads(value) for key, _, value in (a.partition("=") for a in argv[2:])}
    print(f"{grow_pretrained(argv[0], argv[1], changes)} in {argv[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
