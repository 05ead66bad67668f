import json
import re
import sys
from pathlib import Path

import pytest
from PIL import Image

from pixelllm_plugins import cli
from pixelllm_plugins.batch_io import parse_batch
from pixelllm_plugins.cli import main
from pixelllm_plugins.extras import MissingExtraError, missing_extra, require_extra


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
    code, out, _ = run(capsys, "caption-regions", scene_files[0], "--box", "10,10,60,60", "--box",
                       "0,0,30,30", "--model", tiny_checkpoint, "--json")
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
    (["refer", "{img}", "x", "--model", ""], "--model is empty"),
    (["refer", "{img}", "x", "--model", "tiny", "--adapter", ""], "--adapter is empty"),
    (["info", "--model", " "], "--model is empty"),
    (["serve", "--ray", "--fronts", "2"], "scale with --replicas"),
])
def test_errors_are_messages_not_tracebacks(capsys, scene_files, tmp_path, argv, message):
    argv = [a.format(img=scene_files[0], tmp=tmp_path) for a in argv]
    code, out, err = run(capsys, *argv)
    assert code in (1, 2)
    text = out + err
    assert "Traceback" not in text
    assert re.search(message, text), text


def test_every_subcommand_has_help(capsys):
    for cmd in ["refer", "caption", "caption-regions", "dense-caption", "info", "synth", "serve",
                "ls-backend", "train", "eval", "finetune"]:
        with pytest.raises(SystemExit) as exc:
            main([cmd, "--help"])
        assert exc.value.code == 0
        assert "usage: pixelllm " + cmd in capsys.readouterr().out


# ---- bad input is a message and an exit code, never a traceback (issue 23) -------------------------

def one_error_line(err: str) -> str:
    """The stderr of a refused command: one ``error: ...`` line and no traceback."""
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def batch_file(tmp_path, lines: list, name="req.jsonl") -> str:
    path = tmp_path / name
    def encode(line) -> bytes:
        if isinstance(line, bytes):
            return line
        return (line if isinstance(line, str) else json.dumps(line)).encode("utf-8", "surrogatepass")

    path.write_bytes(b"\n".join(encode(line) for line in lines) + b"\n")
    return str(path)


@pytest.mark.parametrize("content, message", [
    (None, "batch file not found"),
    ("folder", "is a folder, not a batch file"),
    (bytes(range(256)) * 8, "binary file"),
    ('{"image": "a.png", "text": "café"}\n'.encode("latin-1") * 3, "not UTF-8 text.*Latin-1"),
    ('{"image": "a.png"}\n'.encode("utf-16"), "UTF-16"),
    (b"\n  \n\t\n", "has no requests"),
])
def test_unusable_batch_files_are_refused_with_one_line(capsys, tiny_checkpoint, tmp_path, content, message):
    path = tmp_path / "req.jsonl"
    if content == "folder":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    code, out, err = run(capsys, "refer", "--batch", path, "--model", tiny_checkpoint)
    assert code == cli.EXIT_USAGE and out == ""
    assert re.search(message, one_error_line(err))


def test_partly_undecodable_batch_answers_the_good_lines(capsys, tiny_checkpoint, scene_files, tmp_path):
    good = json.dumps({"image": str(scene_files[0]), "text": "the red circle"}).encode()
    latin1 = json.dumps({"image": str(scene_files[0]), "text": "café"}, ensure_ascii=False).encode("latin-1")
    path = batch_file(tmp_path, [good, latin1, b"", good + b"\r"])
    code, out, err = run(capsys, "refer", "--batch", path, "--model", tiny_checkpoint)
    results = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and len(results) == 3 and "Traceback" not in err
    assert "detections" in results[0] and "detections" in results[2]
    assert results[1]["error"].startswith("line 2: not UTF-8")


def raw(image: str, rest: str) -> str:
    """A request line written by hand (for what json.dumps does not write)."""
    return '{"image": "%s", %s}' % (image, rest)  # noqa: UP031


def test_malformed_batch_lines_fail_alone(capsys, tiny_checkpoint, scene_files, tmp_path):
    img = str(scene_files[0])
    lines = [
        {"image": img, "text": "the red circle"},  # good
        {"image": img, "text": 5},
        {"image": img, "texts": ["a", 3]},
        {"image": img, "texts": []},
        {"image": img, "texts": ["x"] * 33},
        raw(img, '"text": "\\ud800 circle"'),  # a lone surrogate escape
        {"image": img, "text": "\x00\x01\t"},
        {"image": 7, "text": "a"},
        {"image": str(tmp_path), "text": "a"},
        raw(img + "\\u0000.png", '"text": "a"'),
        {"image": "x" * 5000 + ".png", "text": "a"},
        raw(img, '"text": NaN'),
        raw(img, '"text": "a", "n": 1e999'),
        raw(img, '"text": "a", "n": ' + "9" * 5000),
        "[" * 100_000 + "]" * 100_000,
        "[1, 2]",
        "42",
        {"image": img, "text": "a", "adapter": "mine"},  # flags apply to every line; a per-line one is refused
        {"image": img, "text": "a", "points": [[3, 4]]},
        {"image": img, "text": "\u200b"},  # nothing to read
        {"image": str(scene_files[1]), "texts": ["the blue square", "the red circle"]},  # good
    ]
    code, out, err = run(capsys, "refer", "--batch", batch_file(tmp_path, lines), "--model", tiny_checkpoint)
    results = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and len(results) == len(lines) and "Traceback" not in err
    assert "error" not in results[0] and "error" not in results[-1] and len(results[-1]["detections"]) == 2
    for result in results[1:-1]:
        assert isinstance(result.get("error"), str) and result["error"], result
    assert "must be a string" in results[1]["error"]
    assert "not valid Unicode" in results[5]["error"]
    assert "empty" in results[6]["error"]
    assert "is a folder, not an image file" in results[8]["error"]
    assert "NaN" in results[11]["error"]
    assert "does not read 'adapter'" in results[17]["error"] and "--adapter" in results[17]["error"]
    assert "does not read 'points' on a line; its lines have 'image', 'text', 'texts'" in results[18]["error"]
    assert "empty" in results[19]["error"]


def test_malformed_boxes_fail_alone(capsys, tiny_checkpoint, scene_files, tmp_path):
    img = str(scene_files[0])
    lines = [
        {"image": img, "boxes": [[10, 10, 60, 60]]},  # good
        {"image": img, "boxes": 5},
        {"image": img, "boxes": "10,10,60,60"},
        {"image": img, "boxes": [["a", None, {}, []]]},
        {"image": img, "boxes": [[1, 2, 3]]},
        {"image": img, "boxes": [[True, 2, 30, 40]]},
        {"image": img, "boxes": [[0, 0, 10 ** 400, 10]]},
        {"image": img, "boxes": [[5, 5, 5, 5]]},  # no area
        {"image": img, "boxes": [[1000, 1000, 2000, 2000]]},  # outside the 160x120 image
        {"image": img, "boxes": [[0, 0, 10, 10]] * 129},
        {"image": img, "boxes": [[0, 0, 30, 30], [40, 40, 90, 90]]},  # good
    ]
    code, out, err = run(capsys, "caption-regions", "--batch", batch_file(tmp_path, lines), "--model",
                         tiny_checkpoint)
    results = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and len(results) == len(lines) and "Traceback" not in err
    assert len(results[0]["captions"]) == 1 and len(results[-1]["captions"]) == 2
    assert all(r.get("error") for r in results[1:-1]), results
    assert "got the number 5" in results[1]["error"]
    assert "no area" in results[7]["error"]


def test_unexpected_failure_in_a_chunk_fails_only_its_request(capsys, monkeypatch, tiny_predictor,
                                                              scene_files, tmp_path):
    real_refer = tiny_predictor.refer

    def flaky_refer(images, texts, **kw):
        if any("boom" in t for ts in texts for t in ts):
            raise TypeError("model bug")
        return real_refer(images, texts, **kw)

    monkeypatch.setattr(tiny_predictor, "refer", flaky_refer)
    monkeypatch.setattr(cli, "_load_predictor", lambda model, device: tiny_predictor)
    img = str(scene_files[0])
    lines = [{"image": img, "text": "a"}, {"image": img, "text": "boom"}, {"image": img, "text": "b"}]
    code, out, err = run(capsys, "refer", "--batch", batch_file(tmp_path, lines))
    results = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [("error" in r) for r in results] == [False, True, False]
    assert results[1]["error"].startswith("internal error (TypeError") and "Traceback" not in err
    code, out, err = run(capsys, "refer", img, "boom")
    assert code == cli.EXIT_INTERNAL and "internal error (TypeError" in one_error_line(err)
    code, out, err = run(capsys, "-v", "refer", img, "boom")
    assert code == cli.EXIT_INTERNAL and "Traceback" in err


@pytest.mark.parametrize("draw, message", [
    ("out.xyz", "extension '.xyz'"),
    ("out", "without an extension"),
    ("{tmp}", "is a folder"),
    ("{tmp}/afile/out.png", "is a file, not a folder"),
    ("", "--draw is empty"),
    ("  ", "--draw is empty"),
])
def test_bad_draw_targets_are_refused_up_front(capsys, monkeypatch, scene_files, tmp_path, draw, message):
    (tmp_path / "afile").write_text("x")
    monkeypatch.setattr(cli, "_load_predictor", lambda *a: pytest.fail("loaded a model before checking"))
    code, out, err = run(capsys, "refer", scene_files[0], "x", "--draw", draw.format(tmp=tmp_path))
    assert code == cli.EXIT_USAGE and message in one_error_line(err) and out == ""


def test_a_drawing_that_cannot_be_saved_keeps_the_results(capsys, monkeypatch, tiny_predictor, scene_files,
                                                         tmp_path):
    from PIL import Image as PILImage

    def refuse(self, *a, **kw):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(cli, "_load_predictor", lambda model, device: tiny_predictor)
    monkeypatch.setattr(PILImage.Image, "save", refuse)
    img = str(scene_files[0])
    code, out, err = run(capsys, "refer", img, "x", "--json", "--draw", tmp_path / "out.png")
    result = json.loads(out)
    assert code == cli.EXIT_FAILED and "detections" in result and "error" not in result
    assert "Permission denied" in result["drawing_error"] and "warning: could not save" in err
    lines = [{"image": img, "text": "a"}, {"image": img, "text": "b"}]
    path = batch_file(tmp_path, lines)
    code, out, err = run(capsys, "refer", "--batch", path, "--draw", tmp_path / "d.bmp")
    results = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and len(results) == 2
    assert all("detections" in r and "drawing_error" in r for r in results)


def test_batch_drawings_are_numbered(capsys, tiny_checkpoint, scene_files, tmp_path):
    lines = [{"image": str(p), "text": "x"} for p in scene_files[:2]]
    code, out, _ = run(capsys, "refer", "--batch", batch_file(tmp_path, lines), "--model", tiny_checkpoint,
                       "--draw", tmp_path / "pics" / "d.jpg")
    results = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [r["drawing"] for r in results] == [str(tmp_path / "pics" / f"d_{n:04d}.jpg")
                                                            for n in range(2)]
    assert all(Path(r["drawing"]).is_file() for r in results)


@pytest.mark.parametrize("argv, message", [
    (["refer", "{img}", "x", "--device", "gpu9"], "unknown device 'gpu9'; devices here: cpu"),
    (["refer", "{img}", "x", "--device", "cuda:abc"], "devices here: cpu"),
    (["dense-caption", "{img}", "--max-regions", "-5"], "--max-regions: must be an integer from 1 to 256"),
    (["dense-caption", "{img}", "--min-score", "nan"], "--min-score: must be a number from 0 to 1"),
    (["caption", "{img}", "--beams", "0"], "--beams: must be an integer from 1 to 8"),
    (["refer", "{img}", "x", "--beams", "2"], "unrecognized arguments: --beams"),  # refer writes no text
    (["dense-caption", "{img}", "--beams", "2"], "unrecognized arguments: --beams"),
    (["serve", "--port", "70000"], "--port: must be an integer from 0 to 65535"),
    (["train", "--data", "d", "--steps", "0"], "--steps: must be an integer >= 1"),
    (["train", "--data", "d", "--lr", "inf"], "--lr: must be a number >= 0"),
    (["eval", "--data", "d", "--batch-size", "0"], "--batch-size: must be an integer from 1 to 256"),
])
def test_bad_flag_values_are_usage_errors(capsys, scene_files, argv, message):
    with pytest.raises(SystemExit) as exc:
        main([a.format(img=scene_files[0]) for a in argv])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err and "Traceback" not in err


def test_cuda_without_cuda_says_which_devices_exist(capsys, scene_files, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(SystemExit) as exc:
        main(["refer", str(scene_files[0]), "x", "--device", "cuda"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "CUDA is not available on this machine; devices here: cpu" in err


def test_check_device_with_two_cuda_devices(monkeypatch):
    import torch

    from pixelllm_plugins.argtypes import check_device
    from pixelllm_plugins.errors import InvalidParameterError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for ok in ("cpu", "cuda", "cuda:0", "cuda:1"):
        assert check_device(ok) == ok
    assert check_device("auto", allow_auto=True) == "auto"
    for bad, message in (("cuda:2", "has 2 CUDA device(s); devices here: cpu, cuda:0, cuda:1, cuda"),
                         ("auto", "unknown device 'auto'"), ("gpu9", "unknown device")):
        with pytest.raises(InvalidParameterError) as exc:
            check_device(bad)
        assert message in str(exc.value)


def test_arguments_that_are_not_utf8_are_refused(capsys, scene_files):
    for argv in (["refer", scene_files[0], "caf\udce9"], ["caption", "sc\udce8ne.png"]):
        code, out, err = run(capsys, *argv)
        assert code == cli.EXIT_USAGE and "is not valid UTF-8" in one_error_line(err)


def test_a_folder_as_image_names_the_path_once(capsys, tiny_checkpoint, tmp_path):
    code, out, err = run(capsys, "caption", tmp_path, "--model", tiny_checkpoint)
    line = one_error_line(err)
    assert code == cli.EXIT_FAILED and line == f"error: {tmp_path} is a folder, not an image file"


def test_ls_backend_binds_localhost_by_default():
    args = cli.build_parser().parse_args(["ls-backend"])
    assert args.host == "127.0.0.1" and cli.build_parser().parse_args(["serve"]).host == "127.0.0.1"


def test_internal_errors_are_one_line_and_v_shows_the_traceback(capsys, monkeypatch):
    def broken(args):
        raise ZeroDivisionError("oops")

    monkeypatch.setattr(cli, "_info", broken)
    code, out, err = run(capsys, "info")
    assert code == cli.EXIT_INTERNAL
    assert one_error_line(err) == "error: internal error (ZeroDivisionError); rerun with -v for the traceback"
    for argv in (["-v", "info"], ["info", "-v"]):
        code, out, err = run(capsys, *argv)
        assert code == cli.EXIT_INTERNAL and "Traceback" in err and "ZeroDivisionError: oops" in err

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_info", interrupted)
    assert run(capsys, "info")[0] == 130


# ---- optional extras ------------------------------------------------------------------------------

def _no_servers(monkeypatch):
    """Make sure no test below starts a server even if the extra check let it through."""
    import label_studio_backend.server
    import pixelllm_plugins.serving.run

    for module in (label_studio_backend.server, pixelllm_plugins.serving.run):
        monkeypatch.setattr(module, "run", lambda *a, **kw: pytest.fail("started a server"))
    ray_app = sys.modules.get("pixelllm_plugins.serving.ray_app")
    if ray_app is not None:
        monkeypatch.setattr(ray_app, "run", lambda *a, **kw: pytest.fail("started Ray Serve"))


@pytest.mark.parametrize("argv, module, extra", [
    (["serve"], "fastapi", "serve"),
    (["serve"], "uvicorn", "serve"),
    (["serve"], "httpx", "serve"),
    (["serve"], "prometheus_client", "serve"),
    (["serve", "--ray"], "ray", "ray"),
    (["ls-backend"], "fastapi", "serve"),
    (["ls-backend"], "uvicorn", "serve"),
    (["ls-backend"], "httpx", "serve"),
    (["eval", "--data", "{tmp}"], "pycocoevalcap", "eval"),
    (["eval", "--data", "{tmp}", "--tasks", "caption"], "pycocoevalcap", "eval"),
])
def test_missing_extra_names_the_extra(capsys, monkeypatch, tmp_path, argv, module, extra):
    _no_servers(monkeypatch)
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    code, out, err = run(capsys, *[a.format(tmp=tmp_path) for a in argv])
    line = one_error_line(err)
    assert code == cli.EXIT_MISSING_EXTRA
    assert f"needs the optional extra '{extra}': pip install \"pixelllm-plugins[{extra}]\"" in line
    assert "ModuleNotFoundError" not in err


def test_missing_extra_deeper_in_a_command_is_caught_too(capsys, monkeypatch):
    def deep_import(args):
        import fiftyone  # noqa: F401

    monkeypatch.setattr(cli, "_info", deep_import)
    monkeypatch.setitem(sys.modules, "fiftyone", None)
    code, out, err = run(capsys, "info")
    assert code == cli.EXIT_MISSING_EXTRA and "optional extra 'fiftyone'" in one_error_line(err)


def test_require_extra_and_missing_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "fiftyone", None)
    with pytest.raises(MissingExtraError, match=r"the FiftyOne plugin needs the optional extra 'fiftyone'"):
        require_extra("fiftyone", "fiftyone", feature="the FiftyOne plugin")
    assert missing_extra(ModuleNotFoundError("x", name="ray.serve"), "f").extra == "ray"
    assert missing_extra(ModuleNotFoundError("x", name="pycocoevalcap.cider"), "f").extra == "eval"
    assert missing_extra(ModuleNotFoundError("x", name="numpy"), "f") is None


def test_batch_reader_units():
    lines = parse_batch(b'\xef\xbb\xbf{"image": "a"}\r\n\n  \n[1]\n{"image": Infinity}\n\xe9\n')
    assert [line.number for line in lines] == [1, 4, 5, 6]
    assert lines[0].request == {"image": "a"} and lines[0].error is None
    assert all(line.request is None and line.error.startswith(f"line {line.number}: ") for line in lines[1:])


def test_requests_that_all_fail_their_checks_load_no_model(capsys, monkeypatch, scene_files, tmp_path):
    """Bad text or boxes are answered at once: the model (seconds to load) is loaded only for work."""
    monkeypatch.setattr(cli, "_load_predictor", lambda *a, **k: pytest.fail("loaded a model for nothing"))
    code, out, err = run(capsys, "refer", scene_files[0], "")
    assert code == cli.EXIT_FAILED and "text is empty" in one_error_line(err)
    lines = [{"image": str(scene_files[0]), "text": "\u200b"},
             {"image": str(scene_files[0]), "text": "x", "boxes": [[1, 2]]}]
    code, out, err = run(capsys, "refer", "--batch", batch_file(tmp_path, lines))
    results = [json.loads(line) for line in out.splitlines()]
    assert code == cli.EXIT_OK and [("error" in r) for r in results] == [True, True]
    assert "empty" in results[0]["error"] and "does not read 'boxes'" in results[1]["error"]
