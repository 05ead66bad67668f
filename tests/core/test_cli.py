import json

import pytest
from PIL import Image

from pixelllm_plugins.cli import main


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_refer_json_schema_and_drawing(capsys, tiny_checkpoint, scene_files, tmp_path):
    drawing = tmp_path / "out.png"
    code, out, _ = run(capsys, "refer", scene_files[0], "the red circle", "--model", tiny_checkpoint,
                       "--json", "--draw", drawing)
    assert code == 0
    result = json.loads(out)
    assert set(result) >= {"image", "text", "image_size", "detections", "model_version", "drawing"}
    assert result["image_size"] == [160, 120]
    (det,) = result["detections"]
    assert set(det) == {"box_xyxy", "score", "text", "model_version"} and len(det["box_xyxy"]) == 4
    with Image.open(drawing) as im:
        assert im.size == (160, 120)


def test_caption_trace_json(capsys, tiny_checkpoint, scene_files, tmp_path):
    code, out, _ = run(capsys, "caption", scene_files[0], "--trace", "--model", tiny_checkpoint, "--json",
                       "--draw", tmp_path / "t.png")
    result = json.loads(out)
    assert code == 0 and {"caption", "words", "score"} <= set(result)
    assert all(set(w) == {"text", "box_xyxy", "points"} for w in result["words"])
    assert (tmp_path / "t.png").exists()


def test_caption_regions_and_dense(capsys, tiny_checkpoint, scene_files):
    code, out, _ = run(capsys, "caption-regions", scene_files[0], "--box", "10,10,60,60", "--box", "0,0,30,30",
                       "--model", tiny_checkpoint, "--json")
    assert code == 0 and len(json.loads(out)["captions"]) == 2
    code, out, _ = run(capsys, "dense-caption", scene_files[0], "--model", tiny_checkpoint, "--json",
                       "--min-score", "0")
    assert code == 0 and isinstance(json.loads(out)["regions"], list)


def test_batch_keeps_order_and_isolates_errors(capsys, tiny_checkpoint, scene_files, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    lines = [
        {"image": str(scene_files[0]), "text": "the red circle"},
        {"image": str(tmp_path / "missing.png"), "text": "x"},
        "this is not json",
        {"image": str(broken), "text": "x"},
        {"image": str(scene_files[1]), "text": ""},
        {"image": str(scene_files[2]), "texts": ["a", "b"]},
        {"text": "no image"},
    ]
    batch = tmp_path / "req.jsonl"
    batch.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    code, out, _ = run(capsys, "refer", "--batch", batch, "--model", tiny_checkpoint)
    results = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and len(results) == len(lines)
    assert "detections" in results[0] and results[0]["image"] == str(scene_files[0])
    assert "not found" in results[1]["error"]
    assert "not a JSON object" in results[2]["error"]
    assert "error" in results[3]
    assert "empty" in results[4]["error"]
    assert len(results[5]["detections"]) == 2
    assert "no 'image'" in results[6]["error"]


@pytest.mark.parametrize("argv, message", [
    (["refer", "{img}", "x", "--model", "no-such-preset"], "neither a checkpoint folder nor a preset"),
    (["refer", "{img}", "x", "--model", "{tmp}"], "tokenizer.json|config.json|model.safetensors"),
    (["refer", "{tmp}/nope.png", "x", "--model", "tiny"], "not found"),
    (["caption-regions", "{img}", "--box", "1,2,3", "--model", "tiny"], "4 numbers"),
    (["refer", "{img}", "--model", "tiny"], "referring TEXT"),
    (["serve", "--ray", "--fronts", "2"], "scale with --replicas"),
])
def test_errors_are_messages_not_tracebacks(capsys, scene_files, tmp_path, argv, message):
    argv = [a.format(img=scene_files[0], tmp=tmp_path) for a in argv]
    code, out, err = run(capsys, *argv)
    assert code in (1, 2)
    text = out + err
    assert "Traceback" not in text
    import re

    assert re.search(message, text), text


def test_every_subcommand_has_help(capsys):
    for cmd in ["refer", "caption", "caption-regions", "dense-caption", "info", "synth", "serve", "ls-backend"]:
        with pytest.raises(SystemExit) as exc:
            main([cmd, "--help"])
        assert exc.value.code == 0
        assert "usage: pixelllm " + cmd in capsys.readouterr().out
