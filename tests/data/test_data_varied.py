"""The varied look of the generator (domain randomisation): poses, proportions, outlines, image effects."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pixelllm_plugins.data.formats import write_synthetic_dataset
from pixelllm_plugins.data.synthetic import (
    SHAPES,
    Pose,
    SceneConfig,
    generate_scene,
    object_mask,
    posed_mask,
    render_scene,
    scene_seed,
    shape_polygons,
)

VARIED = SceneConfig.preset("varied")


def _scenes(n: int = 12):
    return [generate_scene(scene_seed(5, "train", i), VARIED) for i in range(n)]


def test_classic_preset_is_the_default_config_and_draws_no_pose():
    assert SceneConfig.preset("classic") == SceneConfig()
    scene = generate_scene(scene_seed(0, "test", 7))
    assert scene.look is None and all(o.pose is None for o in scene.objects)
    with pytest.raises(ValueError, match="unknown look"):
        SceneConfig.preset("sketchy")


def test_varied_scenes_are_deterministic():
    a, b = _scenes(3), _scenes(3)
    assert a == b
    assert np.array_equal(np.asarray(render_scene(a[0])), np.asarray(render_scene(b[0])))


def test_varied_scenes_turn_outline_and_shade_objects():
    objects = [o for s in _scenes(40) for o in s.objects]
    assert all(o.pose is not None for o in objects)
    turned = [o for o in objects if o.pose.rotation != 0.0]
    assert 0.5 < len(turned) / len(objects) < 0.9
    assert any(o.pose.outline > 0 for o in objects)
    assert not any(o.pose.outline > 0 for o in objects if o.shape == "circle")  # an outlined disc is a ring
    stars = {o.pose.points for o in objects if o.shape == "star"}
    assert stars <= {5, 6}


def test_boxes_are_the_tight_bounds_of_the_masks():
    # within 3 px: the thin tip of a star point or a triangle is less than half a pixel wide
    for scene in _scenes(8):
        for k, obj in enumerate(scene.objects):
            mask = object_mask(scene, k)
            ys, xs = np.nonzero(mask)
            assert xs.size > 0
            x1, y1, x2, y2 = obj.box
            assert abs(xs.min() - x1) <= 3 and abs(xs.max() + 1 - x2) <= 3
            assert abs(ys.min() - y1) <= 3 and abs(ys.max() + 1 - y2) <= 3


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rotation", [0.0, 30.0, 45.0, 90.0])
def test_every_shape_draws_in_every_pose(shape, rotation):
    pose = Pose((40.0, 40.0), (40.0, 40.0) if shape != "diamond" else (26.0, 42.0), rotation, 0.22, 5)
    mask, _, _ = posed_mask(shape, pose)
    filled = np.asarray(mask) > 128
    area = filled.sum()
    assert 300 < area < 40 * 42 * 1.01
    if shape == "ring":  # the hole stays a hole in every pose
        h, w = filled.shape
        assert not filled[h // 2, w // 2]


def test_a_turned_square_keeps_right_angles_and_a_diamond_is_taller_than_wide():
    square = shape_polygons("square", Pose((0.0, 0.0), (10.0, 10.0), 45.0))[0][0]
    sides = [np.hypot(square[i][0] - square[i - 1][0], square[i][1] - square[i - 1][1]) for i in range(4)]
    assert np.allclose(sides, 10.0)
    diamonds = [o for s in _scenes(60) for o in s.objects if o.shape == "diamond"]
    assert diamonds and all(o.pose.extent[0] / o.pose.extent[1] <= 0.73 for o in diamonds)


def test_outlined_objects_keep_the_whole_shape_as_their_mask():
    pose = Pose((30.0, 30.0), (40.0, 40.0), 20.0, 0.0, 5, outline=0.15)
    stroke, _, _ = posed_mask("square", pose, outline=True)
    whole, _, _ = posed_mask("square", pose)
    stroke_px, whole_px = (np.asarray(stroke) > 128).sum(), (np.asarray(whole) > 128).sum()
    assert 0.2 * whole_px < stroke_px < 0.8 * whole_px


def test_the_writer_records_the_look(tmp_path):
    write_synthetic_dataset(tmp_path, "train", 3, look="varied")
    manifest = json.loads((tmp_path / "manifest_train.json").read_text())
    assert manifest["look"] == "varied" and manifest["renderer"] == "default"
    refcoco = json.loads((tmp_path / "refcoco_train.json").read_text())
    assert all("segmentation" in a for a in refcoco["annotations"])
