"""scripts/mask_stride_ceiling.py: the IoU a stride alone allows, on masks whose answer is known."""

from __future__ import annotations

import json

import numpy as np
from script_loader import load_script

from pixelllm_plugins.masks import mask_to_rle


def _script():
    return load_script("mask_stride_ceiling")


def test_blocks_survive_every_stride_and_thin_lines_do_not():
    ceiling = _script().ceiling
    block = np.zeros((64, 64), bool)
    block[8:24, 16:40] = True  # on the 4-pixel grid of a 64-pixel canvas
    line = np.zeros((64, 64), bool)
    line[30, 5:60] = True  # one pixel thick
    assert ceiling([block], 64, 4) > 0.98 and ceiling([block], 64, 1) == 1.0  # (bilinear shaves a corner)
    assert ceiling([line], 64, 1) == 1.0
    assert ceiling([line], 64, 4) < 0.5  # a quarter of a cell: pooled below one half, lost
    # a larger image on the same canvas: stride 1 of the canvas is 2 image pixels, a 1-pixel line is lost
    big_line = np.zeros((128, 128), bool)
    big_line[61, 10:120] = True
    assert ceiling([big_line], 64, 1) < ceiling([np.kron(line, np.ones((2, 2), bool))], 64, 1) == 1.0


def test_the_cli_reads_coco_instances_and_reports_each_stride(tmp_path, capsys):
    mask = np.zeros((40, 60), bool)
    mask[10:30, 12:52] = True
    rle = mask_to_rle(mask)
    coco = {"images": [{"id": 1, "height": 40, "width": 60}],
            "annotations": [{"id": 1, "image_id": 1, "segmentation": rle},
                            {"id": 2, "image_id": 1, "segmentation": [[12, 10, 52, 10, 52, 30, 12, 30]]}]}
    (tmp_path / "instances_test.json").write_text(json.dumps(coco))
    assert _script().main(["--data", str(tmp_path), "--canvas", "60", "--strides", "4", "1", "--no-progress"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["test"]["masks"] == 2 and out["test"]["stride_1"] == 1.0
    assert 0.8 < out["test"]["stride_4"] < 1.0
