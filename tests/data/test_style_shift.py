"""The second renderer (style-shift test split, issue 18): determinism, names kept, masks and boxes aligned
with its pixels, colours kept in their families."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from pixelllm_plugins.data import style_shift as ss
from pixelllm_plugins.data.synthetic import (
    COLORS,
    SHAPES,
    Pose,
    Scene,
    SceneConfig,
    SceneObject,
    generate_scene,
    place_patch,
    scene_seed,
)

CFG = SceneConfig.preset("varied", extra_shapes=("pentagon",))
ALL_SHAPES = (*SHAPES, "pentagon")
NAMES = list(COLORS)
REF = np.asarray([COLORS[n] for n in NAMES], np.float32)


def _scene(i: int) -> Scene:
    return generate_scene(scene_seed(0, "test_shift", i), CFG)


@pytest.fixture(scope="module")
def scenes():
    """Restyled scenes with their renders (float RGB) and amodal / visible masks."""
    out = []
    for i in range(24):
        scene = ss.restyle(_scene(i))
        image = np.asarray(ss.render_scene(scene), np.float32)
        amodal = [place_patch(*ss.object_patch_mask(o), scene.width, scene.height) for o in scene.objects]
        visible = []
        for k, m in enumerate(amodal):
            v = m.copy()
            for later in amodal[k + 1:]:
                v &= ~later
            visible.append(v)
        out.append((scene, image, amodal, visible))
    return out


def _erode(mask: np.ndarray, n: int) -> np.ndarray:
    for _ in range(n):
        p = np.pad(mask, 1)
        mask = mask & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return mask


def _dilate(mask: np.ndarray, n: int) -> np.ndarray:
    for _ in range(n):
        p = np.pad(mask, 1)
        mask = mask | p[:-2, 1:-1] | p[2:, 1:-1] | p[1:-1, :-2] | p[1:-1, 2:]
    return mask


def _holes(mask: np.ndarray) -> int:
    """Pixels outside the mask that the border cannot reach (4-connected flood fill)."""
    outside = np.pad(~mask, 1, constant_values=True)
    reached = np.zeros_like(outside)
    reached[0, :] = reached[-1, :] = reached[:, 0] = reached[:, -1] = True
    while True:
        grown = _dilate(reached, 1) & outside
        if (grown == reached).all():
            break
        reached = grown
    return int((outside & ~reached).sum())


def _posed(shape: str, rotation: float, side: float = 60.0, color: str = "red", index: int = 0) -> SceneObject:
    extent = (0.62 * side, side) if shape == "diamond" else (side, side)
    detail = {"star": 0.45, "cross": 0.33, "ring": 0.22}.get(shape, 0.0)
    pose = Pose((100.0, 90.0), extent, rotation, detail, 5)
    return SceneObject(index, shape, color, "large", (0.0, 0.0, 1.0, 1.0), COLORS[color], pose)


def test_render_and_restyle_are_deterministic():
    for i in (0, 5, 11):
        a, b = ss.restyle(_scene(i)), ss.restyle(_scene(i))
        assert a == b
        ra, rb = ss.render_scene(a), ss.render_scene(b)
        assert ra.mode == "RGB" and ra.size == (a.width, a.height)
        assert np.array_equal(np.asarray(ra), np.asarray(rb))
        # geometry comes from the poses: the original scene draws the same pixels
        assert np.array_equal(np.asarray(ss.render_scene(_scene(i))), np.asarray(ra))
    assert ss.theme(_scene(1)) != ss.theme(_scene(2))


def test_restyle_keeps_objects_and_order():
    for i in range(10):
        scene = _scene(i)
        shifted = ss.restyle(scene)
        assert (shifted.seed, shifted.width, shifted.height, shifted.background, shifted.look) == \
            (scene.seed, scene.width, scene.height, scene.background, scene.look)
        assert len(shifted.objects) == len(scene.objects)
        for a, b in zip(scene.objects, shifted.objects):
            assert (a.index, a.shape, a.color, a.size, a.rgb, a.pose) == (b.index, b.shape, b.color, b.size, b.rgb, b.pose)
            # the box moves a little at most (squares, circles, rings and crosses are evened out inside it)
            assert max(abs(u - v) for u, v in zip(a.box, b.box)) < 0.12 * max(a.box[2] - a.box[0], a.box[3] - a.box[1]) + 3


def test_boxes_are_the_tight_bounds_of_the_masks(scenes):
    for scene, _, amodal, _ in scenes:
        for obj, mask in zip(scene.objects, amodal):
            rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
            assert len(rows), (scene.seed, obj.index)
            tight = (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
            assert max(abs(u - v) for u, v in zip(obj.box, tight)) <= 1.0
            patch, left, top = ss.object_patch_mask(obj)
            assert patch.dtype == bool and patch.any(1)[[0, -1]].all() and patch.any(0)[[0, -1]].all()


def test_masks_sit_on_the_object_pixels(scenes):
    """Inside an object's visible mask the colour is mostly nearer the object's than just outside it."""
    checked = 0
    for scene, image, amodal, visible in scenes:
        theme = ss.theme(scene)
        everything = np.logical_or.reduce(amodal)
        for obj, vis in zip(scene.objects, visible):
            look = ss.object_look(obj, theme)
            if look.style in ss.SKETCH_STYLES or vis.sum() < 40:
                continue
            ref = np.asarray(look.rgb, np.float32)  # the colour it is drawn in (a variant of its named colour)
            ring = _dilate(vis, 3) & ~everything
            if ring.sum() < 20:
                continue
            inside = np.median(np.linalg.norm(image[vis] - ref, axis=1))  # median: contours are a minority
            outside = np.median(np.linalg.norm(image[ring] - ref, axis=1))
            assert inside < outside, (scene.seed, obj.index, obj.color, inside, outside)
            checked += 1
    assert checked >= 30


def test_colours_stay_in_their_family(scenes):
    """The bulk of each solid object is nearest its own named colour (deep / pastel variants, lighting)."""
    for scene, image, _, visible in scenes:
        theme = ss.theme(scene)
        for obj, vis in zip(scene.objects, visible):
            core = _erode(vis, 2)
            if ss.object_look(obj, theme).style in ss.SKETCH_STYLES or core.sum() < 10:
                continue
            median = np.median(image[core], 0)
            assert NAMES[int(((REF - median) ** 2).sum(1).argmin())] == obj.color, (scene.seed, obj.index, median)


def test_white_objects_stay_white(scenes):
    seen = 0
    for scene, image, _, visible in scenes:
        theme = ss.theme(scene)
        for obj, vis in zip(scene.objects, visible):
            core = _erode(vis, 2)
            if obj.color != "white" or ss.object_look(obj, theme).style in ss.SKETCH_STYLES or core.sum() < 10:
                continue
            px = image[core]
            chroma = px.max(1) - px.min(1)
            assert chroma.max() <= 30, (scene.seed, obj.index, chroma.max())  # no pixel gets a hue
            assert np.median(px.min(1)) >= 190  # the fill stays near-white (contours are thin and achromatic)
            seen += 1
    assert seen >= 3


def test_every_shape_renders_at_every_rotation():
    for shape in ALL_SHAPES:
        for rotation in (0.0, 45.0, 90.0):
            for side in (14.0, 70.0):
                obj = _posed(shape, rotation, side)
                patch, left, top = ss.object_patch_mask(obj)
                assert patch.sum() > 0.15 * side * side, (shape, rotation, side)
                scene = Scene(3, 200, 180, _scene(0).background, (obj,))
                image = np.asarray(ss.render_scene(scene), np.float32)
                mask = place_patch(patch, left, top, 200, 180)
                ref = np.asarray(COLORS["red"], np.float32)
                near = np.linalg.norm(image[_erode(mask, 1) if side > 20 else mask] - ref, axis=1).mean()
                far = np.linalg.norm(image[~_dilate(mask, 6)] - ref, axis=1).mean()
                assert near < far


def test_ring_masks_have_holes_and_circles_do_not():
    for rotation in (0.0, 45.0, 90.0):
        for side in (12.0, 40.0, 120.0):
            ring, _, _ = ss.object_patch_mask(_posed("ring", rotation, side))
            disc, _, _ = ss.object_patch_mask(_posed("circle", rotation, side))
            assert _holes(ring) > 0.1 * side and _holes(disc) == 0
    for scene in (ss.restyle(_scene(i)) for i in range(40)):
        for obj in scene.objects:
            if obj.shape == "ring":
                assert _holes(ss.object_patch_mask(obj)[0]) > 0


def test_names_kept_by_the_geometry():
    """Squares and crosses are even, diamonds taller than wide, circles and rings never sketched."""
    for index in range(12):  # several seeds: wobble, rounding and pixel blocks vary
        sq, _, _ = ss.object_patch_mask(_posed("square", 0.0, 60, index=index))
        assert abs(sq.shape[0] - sq.shape[1]) <= 2
        cross, _, _ = ss.object_patch_mask(_posed("cross", 0.0, 60, index=index))
        assert abs(cross.shape[0] - cross.shape[1]) <= 2 and not cross[0, 0] and not cross[-1, -1]
        dia, _, _ = ss.object_patch_mask(_posed("diamond", 0.0, 60, index=index))
        assert 0.5 <= dia.shape[1] / dia.shape[0] <= 0.75
    for i in range(40):
        scene = _scene(i)
        theme = ss.theme(scene)
        for obj in scene.objects:
            look = ss.object_look(obj, theme)
            if obj.shape in ("circle", "ring"):
                assert look.style not in ss.SKETCH_STYLES
            assert look.style in (*ss.OBJECT_STYLES, "pixel")


def test_styles_and_backgrounds_are_mixed():
    styles, kinds = set(), set()
    for i in range(120):
        scene = _scene(i)
        theme = ss.theme(scene)
        kinds.add(theme.background)
        styles |= {ss.object_look(o, theme).style for o in scene.objects}
        geometries = [ss.geometry(o) for o in scene.objects]
        styles |= {"wobble" for g in geometries if g.wobble} | {"rounded" for g in geometries if g.rounding}
    assert kinds == set(ss.BACKGROUND_KINDS)
    assert styles >= set(ss.OBJECT_STYLES) | {"pixel", "wobble", "rounded"}


def test_shift_split_is_written_by_this_renderer(tmp_path):
    from pixelllm_plugins.data.formats import write_synthetic_dataset

    ds = write_synthetic_dataset(tmp_path, "test_shift", 2, seed=0)
    manifest = json.loads((tmp_path / "manifest_test_shift.json").read_text())
    assert manifest["renderer"] == "shift" and manifest["look"] == "varied"
    instances = json.loads(ds.instances.read_text())
    boxes = [a["bbox"] for a in instances["annotations"]]
    scene = ss.restyle(generate_scene(scene_seed(0, "test_shift", 0), SceneConfig.preset("varied")))
    first = [b for a, b in zip(instances["annotations"], boxes) if a["image_id"] == 1]
    assert len(first) == len(scene.objects)
    for (x, y, w, h), obj in zip(first, scene.objects):
        assert max(abs(x - obj.box[0]), abs(y - obj.box[1]), abs(x + w - obj.box[2]), abs(y + h - obj.box[3])) <= 1.0


def test_pixel_art_masks_are_blocky():
    obj = _posed("hexagon", 30.0, 90)
    for index in range(60):
        g = ss.geometry(dataclasses.replace(obj, index=index))
        if g.block > 1:
            patch, left, top = ss.object_patch_mask(dataclasses.replace(obj, index=index))
            b = g.block
            assert left % b == 0 and top % b == 0 and patch.shape[0] % b == 0 and patch.shape[1] % b == 0
            blocks = patch.reshape(patch.shape[0] // b, b, patch.shape[1] // b, b)
            assert (blocks.all((1, 3)) == blocks.any((1, 3))).all()
            return
    pytest.fail("no pixel-art hexagon among 60 seeds")
