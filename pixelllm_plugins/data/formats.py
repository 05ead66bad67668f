"""Writers of the public annotation formats, and the synthetic dataset writer.

Formats (field names as the real releases, see docs of the loaders):
- Localized Narratives JSONL: ``dataset_id, image_id, annotator_id, caption, timed_caption
  [{utterance, start_time, end_time}], traces [[{x, y, t}]], voice_recording``.
- MDETR RefCOCO json: one image record per expression (``caption, file_name, width, height,
  original_img_id``) and one annotation each (``bbox`` xywh, ``tokens_positive`` char spans,
  ``segmentation``).
- COCO instances json: ``images`` + ``annotations`` (``bbox`` xywh, ``category_id``, ``segmentation``,
  ``area``).
- GRiT / Visual Genome json: COCO-style images and annotations with ``bbox`` xywh and ``caption`` (no masks,
  as in the real data).
- COCO captions json: ``images`` + ``annotations`` with ``image_id, caption``.

``segmentation`` is COCO's: polygons (flat ``[x1, y1, ...]`` lists, pixel corners) for shapes without holes,
compressed RLE (``{"size": [h, w], "counts": str}``) for a shape with a hole (the ring), since COCO polygons
cannot carry holes. Masks are amodal like the boxes (:func:`..synthetic.object_mask`); ``area`` is then the
segmentation's pixel count as COCO rasterises it, while ``bbox`` stays the object's amodal box.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..masks import (
    mask_to_polygons,
    mask_to_rle,
    offset_polygons,
    polygons_to_segmentation,
    rle_area,
    segmentation_to_rle,
)
from .expressions import ReferringExpression, referring_expressions, region_caption, short_captions
from .narrative import Narrative, narrate
from .synthetic import (
    SHAPES,
    Scene,
    SceneConfig,
    SceneObject,
    generate_scene,
    object_patch_mask,
    place_patch,
    render_scene,
    scene_seed,
)

DATASET_ID = "synthetic_scenes"


@dataclass(frozen=True)
class Renderer:
    """How a split's scenes are drawn: ``restyle`` (the scene as this renderer draws it: tight boxes),
    ``render`` (pixels) and ``patch_mask`` (an object's mask on a patch, with where it goes)."""

    name: str
    restyle: Callable[[Scene], Scene]
    render: Callable[[Scene], Image.Image]
    patch_mask: Callable[[SceneObject], tuple[np.ndarray, int, int]]


DEFAULT_RENDERER = Renderer("default", lambda scene: scene, render_scene, object_patch_mask)
SHIFT_SUFFIX = "_shift"  # a split named like "test_shift" is drawn by the second renderer (style shift)


def renderer_for(split: str) -> Renderer:
    """The renderer of ``split``: the second one (``data/style_shift.py``, styles never used in training,
    over varied geometry) for splits ending in ``_shift``, the training renderer otherwise."""
    if not split.endswith(SHIFT_SUFFIX):
        return DEFAULT_RENDERER
    from . import style_shift

    return Renderer("shift", style_shift.restyle, style_shift.render_scene, style_shift.object_patch_mask)


@dataclass(frozen=True)
class AnnotatedScene:
    """A scene with everything written about it."""

    image_id: int
    file_name: str
    scene: Scene
    expressions: tuple[ReferringExpression, ...]
    region_captions: tuple[str, ...]  # one per object, in object order
    captions: tuple[str, ...]
    narrative: Narrative
    # per object: (COCO segmentation, area); filled by the dataset writer, computed on demand when empty
    segmentations: tuple[tuple[list | dict, float], ...] = ()

    def object_segmentations(self) -> tuple[tuple[list | dict, float], ...]:
        return self.segmentations or scene_segmentations(self.scene)


def annotate_scene(seed: int, config: SceneConfig | None = None, image_id: int = 1,
                   renderer: Renderer = DEFAULT_RENDERER) -> AnnotatedScene:
    scene = renderer.restyle(generate_scene(seed, config))
    rng = random.Random(seed ^ 0x5EED)
    return AnnotatedScene(image_id, f"{image_id:012d}.jpg", scene, tuple(referring_expressions(scene, rng)),
                          tuple(region_caption(o) for o in scene.objects), tuple(short_captions(scene, rng)),
                          narrate(scene, rng))


def concept_scenes(shape: str, count: int, first_seed: int, look: str = "varied"
                   ) -> list[tuple[AnnotatedScene, str, tuple[float, float, float, float]]]:
    """``count`` scenes of ``look`` (consecutive seeds from ``first_seed``) in which a referring expression
    targets a ``shape`` object, usually one of ``EXTRA_SHAPES`` (a concept the default vocabulary lacks):
    (annotated scene, that expression, the object's box) each."""
    cfg = SceneConfig.preset(look, extra_shapes=(shape,))
    out, seed = [], first_seed
    while len(out) < count:
        a = annotate_scene(seed, cfg, 1)
        seed += 1
        for ref in a.expressions:
            obj = a.scene.objects[ref.target]
            if obj.shape == shape:
                out.append((a, ref.text, tuple(obj.box)))
                break
    return out


def demo_scene(index: int = 7, seed: int = 0):
    """Scene ``index`` of the test split, rendered, with its referring expressions (README demo)."""
    a = annotate_scene(scene_seed(seed, "test", index))
    return render_scene(a.scene), [e.text for e in a.expressions]


def object_segmentation(scene: Scene, index: int, *, min_iou: float = 0.98,
                        renderer: Renderer = DEFAULT_RENDERER) -> tuple[list | dict, float]:
    """COCO ``segmentation`` of object ``index`` (its amodal instance mask) and its ``area`` (pixels of the
    segmentation as COCO rasterises it): polygons when the shape has no hole, compressed RLE otherwise."""
    patch, left, top = renderer.patch_mask(scene.objects[index])
    polygons = mask_to_polygons(patch, min_iou=min_iou)  # on the patch: cheap; then moved to the image
    if polygons and not any(p["holes"] for p in polygons):
        segmentation: list | dict = polygons_to_segmentation(offset_polygons(polygons, left, top))
    else:
        segmentation = mask_to_rle(place_patch(patch, left, top, scene.width, scene.height))
    return segmentation, float(rle_area(segmentation_to_rle(segmentation, scene.height, scene.width)))


def scene_segmentations(scene: Scene, renderer: Renderer = DEFAULT_RENDERER) -> tuple[tuple[list | dict, float], ...]:
    """``(segmentation, area)`` of every object, in object order."""
    return tuple(object_segmentation(scene, i, renderer=renderer) for i in range(len(scene.objects)))


def _xywh(box) -> list[float]:
    return [round(box[0], 2), round(box[1], 2), round(box[2] - box[0], 2), round(box[3] - box[1], 2)]


OBJECT_CATEGORIES = [{"id": 1, "name": "object", "supercategory": "object"}]


def refcoco_entry(image: dict, ref_id: int, text: str, box, *, original_img_id: int, sentence_id: int,
                  dataset_name: str = "refcoco", category_id: int = 1, original_id: int | None = None,
                  span: tuple[int, int] | None = None, segmentation: list | dict | None = None,
                  area: float | None = None, **extra) -> tuple[dict, dict]:
    """One referring expression in MDETR's RefCOCO format: its image record (MDETR writes one per expression,
    carrying the text) and its box annotation; ``image`` holds ``file_name``, ``width``, ``height``, ``box``
    is x1,y1,x2,y2 pixels, ``span`` the characters of the referred object's words (default: all of them),
    ``segmentation`` the object's COCO mask (polygons or RLE; omitted when None) and ``area`` its area
    (default: the box's)."""
    x, y, w, h = _xywh(box)
    record = image | {"id": ref_id, "caption": text, "original_img_id": original_img_id,
                      "dataset_name": dataset_name, "sentence_id": sentence_id, "tokens_negative": [], **extra}
    annotation = {"id": ref_id, "image_id": ref_id, "bbox": [x, y, w, h], "area": round(w * h, 2), "iscrowd": 0,
                  "category_id": category_id, "original_id": ref_id if original_id is None else original_id,
                  "tokens_positive": [list(span or (0, len(text)))]}
    if segmentation is not None:
        annotation["segmentation"] = segmentation
    if area is not None:
        annotation["area"] = round(float(area), 2)
    return record, annotation


def vg_region(ann_id: int, image_id: int, box, caption: str) -> dict:
    """One region caption in GRiT's Visual Genome format (``box`` x1,y1,x2,y2 pixels)."""
    x, y, w, h = _xywh(box)
    return {"id": ann_id, "image_id": image_id, "bbox": [x, y, w, h], "area": round(w * h, 2), "caption": caption,
            "category_id": 1, "iscrowd": 0}


def _image_entry(a: AnnotatedScene) -> dict:
    return {"id": a.image_id, "file_name": a.file_name, "width": a.scene.width, "height": a.scene.height}


def ln_record(a: AnnotatedScene, dataset_id: str = DATASET_ID) -> dict:
    n = a.narrative
    return {
        "dataset_id": dataset_id, "image_id": str(a.image_id), "annotator_id": 0, "caption": n.caption,
        "timed_caption": [{"utterance": u.text, "start_time": u.start_time, "end_time": u.end_time}
                          for u in n.utterances],
        "traces": [[{"x": x, "y": y, "t": t} for x, y, t in seg] for seg in n.traces],
        "voice_recording": "",
    }


def _categories(shapes) -> list[dict]:
    return [{"id": i + 1, "name": s, "supercategory": "shape"} for i, s in enumerate(shapes)]


def mdetr_refcoco_json(scenes: list[AnnotatedScene], shapes=SHAPES) -> dict:
    images, annotations = [], []
    category = {s: i + 1 for i, s in enumerate(shapes)}
    for a in scenes:
        segmentations = a.object_segmentations() if a.expressions else ()
        for k, ref in enumerate(a.expressions):
            rid = a.image_id * 100 + k
            obj = a.scene.objects[ref.target]
            e = ref.expression
            start = (4 if e.article else 0) + (len(e.ordinal) + 1 if e.ordinal else 0)
            image = {k: v for k, v in _image_entry(a).items() if k != "id"}
            record, annotation = refcoco_entry(
                image, rid, ref.text, obj.box, original_img_id=a.image_id, sentence_id=k,
                category_id=category.get(obj.shape, 0), original_id=a.image_id * 100 + obj.index,
                span=(start, start + len(e.target.text())), segmentation=segmentations[ref.target][0],
                area=segmentations[ref.target][1], expression_kind=e.kind)
            images.append(record)
            annotations.append(annotation)
    return {"images": images, "annotations": annotations, "categories": _categories(shapes)}


def coco_instances_json(scenes: list[AnnotatedScene], shapes=SHAPES) -> dict:
    """COCO instances: one annotation per object with its ``segmentation`` (category = shape)."""
    images, annotations = [], []
    category = {s: i + 1 for i, s in enumerate(shapes)}
    for a in scenes:
        images.append(_image_entry(a))
        for obj, (segmentation, area) in zip(a.scene.objects, a.object_segmentations()):
            annotations.append({"id": a.image_id * 100 + obj.index, "image_id": a.image_id,
                                "category_id": category.get(obj.shape, 0), "bbox": _xywh(obj.box),
                                "area": round(area, 2), "iscrowd": 0, "segmentation": segmentation})
    return {"info": {"description": "pixelllm synthetic scenes"}, "licenses": [], "images": images,
            "annotations": annotations, "categories": _categories(shapes)}


def grit_vg_json(scenes: list[AnnotatedScene]) -> dict:
    images, annotations = [], []
    for a in scenes:
        images.append(_image_entry(a))
        for obj, cap in zip(a.scene.objects, a.region_captions):
            annotations.append(vg_region(a.image_id * 100 + obj.index, a.image_id, obj.box, cap))
    return {"images": images, "annotations": annotations, "categories": OBJECT_CATEGORIES}


def coco_captions_json(scenes: list[AnnotatedScene]) -> dict:
    images, annotations = [], []
    for a in scenes:
        images.append(_image_entry(a))
        for k, cap in enumerate(a.captions):
            annotations.append({"id": a.image_id * 100 + k, "image_id": a.image_id, "caption": cap})
    return {"info": {"description": "pixelllm synthetic scenes"}, "licenses": [], "images": images,
            "annotations": annotations}


def write_json(path: str | Path, data: dict) -> None:
    Path(path).write_text(json.dumps(data, separators=(",", ":")))


def write_refer_and_regions(out_dir: str | Path, split: str, refer: tuple[list[dict], list[dict]],
                            regions: tuple[list[dict], list[dict]], categories: list[dict]) -> None:
    """``refcoco_<split>.json`` and ``vg_<split>.json`` from ``(images, annotations)`` pairs; a file whose
    annotations are empty is not written (a loader then skips that source)."""
    for name, (images, anns) in (("refcoco", refer), ("vg", regions)):
        if anns:
            (Path(out_dir) / f"{name}_{split}.json").write_text(json.dumps(
                {"images": images, "annotations": anns, "categories": categories}))


def write_jsonl(path: str | Path, records: list[dict]) -> None:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r, separators=(",", ":")) + "\n")


# ---- the synthetic dataset ---------------------------------------------------------------------------

@dataclass(frozen=True)
class SyntheticDataset:
    """Paths of one written split."""

    root: Path
    split: str
    image_dir: Path
    ln: Path
    refcoco: Path
    vg: Path
    coco_captions: Path
    num_images: int
    instances: Path | None = None  # COCO instances json (object masks)

    def __str__(self) -> str:
        return str(self.root)

    @classmethod
    def at(cls, root: str | Path, split: str, num_images: int = 0) -> SyntheticDataset:
        root = Path(root)
        return cls(root, split, root / "images" / split, root / f"ln_{split}.jsonl", root / f"refcoco_{split}.json",
                   root / f"vg_{split}.json", root / f"coco_captions_{split}.json", num_images,
                   root / f"instances_{split}.json")


def _render_chunk(args) -> list[AnnotatedScene]:
    seeds_ids, config, image_dir, quality, split = args
    renderer = renderer_for(split)
    out = []
    for seed, image_id in seeds_ids:
        a = annotate_scene(seed, config, image_id, renderer)
        renderer.render(a.scene).save(Path(image_dir) / a.file_name, quality=quality)
        out.append(dataclasses.replace(a, segmentations=scene_segmentations(a.scene, renderer)))  # in the workers
    return out


def write_synthetic_dataset(out_dir: str | Path, split: str, num_images: int, seed: int = 0,
                            extra_shapes: tuple[str, ...] = (), *, config: SceneConfig | None = None,
                            num_workers: int = 0, jpeg_quality: int = 92, look: str | None = None) -> SyntheticDataset:
    """Render ``num_images`` scenes of ``split`` and write them in the public formats.

    ``look`` (``"classic"`` or ``"varied"``, see :meth:`SceneConfig.preset`) picks the scene config when
    ``config`` is not given; a ``*_shift`` split is always varied geometry drawn by the second renderer.

    Layout: ``images/<split>/%012d.jpg``, ``ln_<split>.jsonl``, ``refcoco_<split>.json`` (MDETR, with masks),
    ``instances_<split>.json`` (COCO instances, masks), ``vg_<split>.json`` (GRiT),
    ``coco_captions_<split>.json``. Scene ``i`` of a split is seeded by ``scene_seed(seed, split, i)``, so
    splits never share scenes and output is identical run to run (also with ``num_workers``).
    """
    if split.endswith(SHIFT_SUFFIX) and config is None:
        look = "varied"
    cfg = config or SceneConfig.preset(look or "classic", extra_shapes=tuple(extra_shapes))
    if extra_shapes and config is not None:
        cfg = dataclasses.replace(cfg, extra_shapes=tuple(extra_shapes))
    ds = SyntheticDataset.at(out_dir, split, num_images)
    ds.image_dir.mkdir(parents=True, exist_ok=True)
    items = [(scene_seed(seed, split, i), i + 1) for i in range(num_images)]
    chunk = max(1, min(256, num_images // max(1, 4 * num_workers) or 1))
    jobs = [(items[k:k + chunk], cfg, str(ds.image_dir), jpeg_quality, split) for k in range(0, num_images, chunk)]
    if num_workers > 0:
        with ProcessPoolExecutor(num_workers) as pool:
            scenes = [a for part in pool.map(_render_chunk, jobs) for a in part]
    else:
        scenes = [a for job in jobs for a in _render_chunk(job)]
    shapes = cfg.shape_pool
    write_jsonl(ds.ln, [ln_record(a) for a in scenes])
    write_json(ds.refcoco, mdetr_refcoco_json(scenes, shapes))
    write_json(ds.vg, grit_vg_json(scenes))
    write_json(ds.coco_captions, coco_captions_json(scenes))
    write_json(ds.instances, coco_instances_json(scenes, shapes))
    write_json(ds.root / f"manifest_{split}.json",
               {"split": split, "num_images": num_images, "seed": seed, "shapes": list(shapes),
                "look": "varied" if cfg.varied else "classic", "renderer": renderer_for(split).name,
                "files": {"images": f"images/{split}", "ln": ds.ln.name, "refcoco": ds.refcoco.name,
                          "vg": ds.vg.name, "coco_captions": ds.coco_captions.name,
                          "instances": ds.instances.name}})
    return ds
