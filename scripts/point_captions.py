"""Region-caption attribute accuracy from a click against from a box, on the same objects.

Each object of ``--scenes`` held-out scenes (test-split seeds, the varied look unless ``--look classic``) is
captioned three times with ``Predictor.caption_regions``: from its ground-truth box, from that box drawn loosely
(each side moved out by 5 % of the box's size, ``evaluation.evaluate.loose_box``), and from one point inside
its mask (the pixel farthest from the border, ``evaluation.metrics.interior_point``). A caption is right when
it has the object's size, colour and shape words.

    python scripts/point_captions.py --scenes 100 --out point_captions.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tqdm import tqdm

from pixelllm_plugins.data.expressions import region_caption
from pixelllm_plugins.data.formats import annotate_scene
from pixelllm_plugins.data.synthetic import SceneConfig, object_mask, render_scene, scene_seed
from pixelllm_plugins.evaluation.evaluate import loose_box
from pixelllm_plugins.evaluation.metrics import attribute_words, interior_point
from pixelllm_plugins.inference.predictor import Predictor


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint folder; default: the embedded model")
    parser.add_argument("--scenes", type=int, default=100, help="held-out scenes (test-split seeds)")
    parser.add_argument("--look", choices=["varied", "classic"], default="varied")
    parser.add_argument("--out", type=Path, default=None, help="write the numbers as JSON here")
    args = parser.parse_args(argv)

    predictor = Predictor(args.model)
    right = {"box": 0, "loose_box": 0, "point": 0}
    objects = 0
    for i in tqdm(range(args.scenes), desc="scenes"):
        scene = annotate_scene(scene_seed(0, "test", i), SceneConfig.preset(args.look)).scene
        image = render_scene(scene)
        boxes = [list(o.box) for o in scene.objects]
        points = [list(interior_point(object_mask(scene, k, visible=True))) for k in range(len(scene.objects))]
        (by_box,) = predictor.caption_regions([image], [boxes])
        (by_loose,) = predictor.caption_regions([image], [[loose_box(b, image.size) for b in boxes]])
        (by_point,) = predictor.caption_regions([image], points=[points])
        for obj, *captions in zip(scene.objects, by_box, by_loose, by_point):
            want = attribute_words(region_caption(obj))
            for key, caption in zip(right, captions):
                right[key] += want <= attribute_words(caption.text)
            objects += 1
    result = {"model_version": predictor.model_version, "look": args.look, "scenes": args.scenes,
              "objects": objects, **{f"{k}_attribute_accuracy": v / max(1, objects) for k, v in right.items()}}
    result["gap"] = result["box_attribute_accuracy"] - result["point_attribute_accuracy"]
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
