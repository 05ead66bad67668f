"""Fuzzing the ``pixelllm`` command in-process (issue 23): hostile ``--batch`` files and flag values.

Properties: no exception escapes ``cli.main`` (argparse's SystemExit has code 2); stdout has exactly one
JSON line per non-blank request line, in order, each without ``error`` for a good request (every good
request is answered) and with a non-empty ``error`` string for a bad one; stderr never holds a traceback.
One tiny random model serves every run (``cli._load_predictor`` is replaced), with a small batch size so
the chunking and its one-by-one retry are exercised. Seeds are fixed (``derandomize=True``).
"""

from __future__ import annotations

import functools
import json
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from pixelllm_plugins import cli

COMMANDS = ("refer", "caption-regions", "caption", "dense-caption")
SIZES = [(160, 120), (64, 64)]
TEXTS = ["the red circle", "the blue square", "a small shape", "x", "circle left of the square",
         "caf\u00e9 ok"]


@pytest.fixture(scope="module")
def env(tiny_predictor, tmp_path_factory):
    """Scene images, a folder and a text file to point requests at, and the one shared predictor."""
    root = tmp_path_factory.mktemp("cli-fuzz")
    scenes = []
    for i, size in enumerate(SIZES):
        path = root / f"scene{i}.png"
        Image.new("RGB", size, (40 * i, 128, 200)).save(path)
        scenes.append((str(path), size))
    (root / "folder").mkdir()
    (root / "notes.txt").write_text("not an image\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cli, "_load_predictor", lambda model, device: tiny_predictor)
        mp.setattr(tiny_predictor, "batch_size", 3)  # chunks of 3: a batch spans several model calls
        for name in ("caption", "caption_regions", "dense_caption"):  # the real model, 2 tokens per caption
            short = functools.partial(getattr(tiny_predictor, name), max_new_tokens=2)
            mp.setattr(tiny_predictor, name, short)
        yield {"root": root, "scenes": scenes}


def run_main(capsys, argv):
    """(exit code, stdout, stderr) of ``cli.main(argv)``; argparse's exit must be code 2."""
    capsys.readouterr()
    try:
        code = cli.main(argv)
    except SystemExit as exc:
        code = ("argparse", exc.code)
    out = capsys.readouterr()
    assert "Traceback" not in out.err, out.err
    return code, out.out, out.err


# ---- request lines ----------------------------------------------------------------------------------

def good_request(draw, env, command: str) -> dict:
    image, (w, h) = draw(st.sampled_from(env["scenes"]))
    request: dict = {"image": image}
    if command == "refer":
        words = st.text(alphabet="abcdefghijklmnopqrstuvwxyz ", min_size=1, max_size=20).filter(str.strip)
        if draw(st.booleans()):
            request["text"] = draw(st.one_of(st.sampled_from(TEXTS), words))
        else:
            request["texts"] = draw(st.lists(st.sampled_from(TEXTS), min_size=1, max_size=3))
    if command == "caption-regions":
        boxes = []
        for _ in range(draw(st.integers(1, 3))):
            x1, y1 = draw(st.integers(0, w - 8)), draw(st.integers(0, h - 8))
            x2, y2 = draw(st.integers(x1 + 4, w)), draw(st.integers(y1 + 4, h))
            boxes.append([x1, y1, x2, y2] if draw(st.booleans()) else [x1 + 0.5, y1 + 0.25, x2 - 0.5, y2])
        request["boxes"] = boxes
    if draw(st.booleans()):  # fields nobody reads are ignored
        key = draw(st.sampled_from(["id", "note", "meta"]))
        request[key] = draw(st.one_of(st.integers(), st.text(max_size=8)))
    return request


def dumps(request: dict) -> bytes:
    return json.dumps(request).encode("utf-8", "surrogatepass")  # keeps "\ud800" as the JSON escape


def with_raw_field(request: dict, raw: str) -> bytes:
    """The request with one more field written as raw JSON text (NaN, 1e999, a 5000-digit number)."""
    return dumps(request)[:-1] + b', "poison": ' + raw.encode() + b"}"


BAD_IMAGES = ["", "   ", 7, 3.5, True, None, ["a.png"], {"path": "a.png"}]
BAD_TEXTS = [5, 2.5, None, True, {}, [], [1, 2], ["ok", 3], ["ok", None], "", "   ", "\x00\x01\x02", "\t\n",
             "\ud800 circle", ["fine", "\udfff"], ["x"] * 33, "y" * 2001]
BAD_BOXES = [5, "10,10,50,50", [], {}, None, True, [[1, 2, 3]], [["a", 1, 2, 3]], [[True, 1, 20, 20]],
             [None], [[1, 2, 3, 4, 5]], [[0, 0, 10 ** 400, 10]], [[5, 5, 5, 5]], [[1000, 1000, 2000, 2000]],
             [[0, 0, 10, 10]] * 129, [[10, 10, 40, 40], "x"], [[10, 10, 40, 40], [float("nan"), 0, 1, 1]]]


@st.composite
def bad_line(draw, env, command: str) -> bytes:
    """A request line that must fail for ``command`` (one poison over a good request)."""
    request = good_request(draw, env, command)
    kinds = ["not json", "json not object", "nan", "huge number", "deep", "no image", "image type",
             "folder image", "missing image", "not an image", "nul image", "surrogate image", "binary",
             "latin-1"]
    if command == "refer":
        kinds += ["text"] * 4
    if command == "caption-regions":
        kinds += ["boxes"] * 4
    kind = draw(st.sampled_from(kinds))
    root = env["root"]
    if kind == "not json":
        chars = st.characters(blacklist_characters="\n", blacklist_categories=("Cs",))
        junk = draw(st.text(chars, max_size=30))
        return ("not json " + junk).encode()
    if kind == "json not object":
        value = draw(st.one_of(st.integers(), st.floats(allow_nan=False, allow_infinity=False), st.none(),
                               st.booleans(), st.text(max_size=10), st.lists(st.integers(), max_size=3)))
        return json.dumps(value).encode()
    if kind == "nan":
        return with_raw_field(request, draw(st.sampled_from(["NaN", "Infinity", "-Infinity"])))
    if kind == "huge number":
        return with_raw_field(request, draw(st.sampled_from(["1e999", "-1e400", "9" * 5000])))
    if kind == "deep":
        depth = draw(st.integers(65, 3000))
        return with_raw_field(request, "[" * depth + "]" * depth)
    if kind == "no image":
        del request["image"]
    elif kind == "image type":
        request["image"] = draw(st.sampled_from(BAD_IMAGES))
    elif kind == "folder image":
        request["image"] = str(root / "folder")
    elif kind == "missing image":
        request["image"] = str(root / f"missing-{draw(st.integers(0, 99))}.png")
    elif kind == "not an image":
        request["image"] = str(root / "notes.txt")
    elif kind == "nul image":
        request["image"] += "\x00.png"
    elif kind == "surrogate image":
        request["image"] += "\udce9.png"
    elif kind == "binary":
        data = draw(st.binary(min_size=1, max_size=40)).replace(b"\n", b"").replace(b"\x00", b"")
        return b"\xff" + data  # 0xff never occurs in UTF-8
    elif kind == "latin-1":
        request["note"] = "caf" + draw(st.sampled_from("\u00e9\u00fc\u00f1\u00df\u00f8\u00b0")) + " x"
        return json.dumps(request, ensure_ascii=False).encode("latin-1", "replace")
    elif kind == "text":
        request.pop("texts", None)
        request.pop("text", None)  # a null "texts" falls back to "text": leave none to fall back to
        request[draw(st.sampled_from(["text", "texts"]))] = draw(st.sampled_from(BAD_TEXTS))
    elif kind == "boxes":
        request["boxes"] = draw(st.sampled_from(BAD_BOXES))
    return dumps(request)  # a NaN among BAD_BOXES is written as NaN: refused as not JSON


@st.composite
def batch_case(draw, env):
    command = draw(st.sampled_from(COMMANDS))
    lines: list[tuple[str, bytes]] = []  # ("good" | "bad" | "blank", line)
    kinds = ["good"] * draw(st.integers(0, 2)) + ["bad"] * draw(st.integers(2, 8)) + ["blank"] * draw(
        st.integers(0, 2))
    for kind in draw(st.permutations(kinds)):
        if kind == "good":
            line = dumps(good_request(draw, env, command))
            lines.append(("good", line + b"\r" if draw(st.booleans()) else line))
        elif kind == "bad":
            lines.append(("bad", draw(bad_line(env, command))))
        else:
            lines.append(("blank", draw(st.sampled_from([b"", b"  ", b"\t", b" \r"]))))
    flags = []
    if command == "caption" and draw(st.booleans()):
        flags.append("--trace")
    if command == "dense-caption":
        flags += ["--max-regions", str(draw(st.integers(1, 3))),
                  "--min-score", draw(st.sampled_from(["0", "0.5", "0.9"]))]
    return command, lines, flags


def test_batch_fuzz_answers_every_line_in_order(env, capsys):
    counts: Counter = Counter()
    batch = env["root"] / "batch.jsonl"

    @settings(derandomize=True, database=None, max_examples=80, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(batch_case(env))
    def check(case):
        command, lines, flags = case
        data = b"\n".join(line for _, line in lines) + b"\n"
        batch.write_bytes(data)
        code, out, err = run_main(capsys, [command, "--batch", str(batch), *flags])
        requests = [kind for kind, _ in lines if kind != "blank"]
        counts["bad"] += requests.count("bad")
        counts["good"] += requests.count("good")
        decodable = [kind for kind, line in lines if kind != "blank" and _utf8(line)]
        if not requests or not decodable or b"\x00" in data[:8192]:  # the file as a whole is refused
            assert code == cli.EXIT_USAGE and out == "" and err.startswith("error: "), (code, out, err)
            counts["refused files"] += 1
            return
        assert code == cli.EXIT_OK, (code, err)
        results = [json.loads(line) for line in out.splitlines()]
        assert len(results) == len(requests), (out, lines)
        for kind, result, (_, line) in zip(requests, results, [x for x in lines if x[0] != "blank"]):
            if kind == "good":
                assert "error" not in result, (result, line)
                assert "image_size" in result and result["model_version"]
            else:
                assert isinstance(result.get("error"), str) and result["error"].strip(), (result, line)
                assert not result["error"].startswith("internal error"), (result, line)

    check()
    print("batch fuzz:", dict(counts))
    assert counts["bad"] >= 300, counts
    assert counts["good"] >= 40, counts


def _utf8(line: bytes) -> bool:
    try:
        line.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


# ---- flag values ------------------------------------------------------------------------------------

NUMBERISH = st.one_of(st.integers(-1000, 1000).map(str),
                      st.floats(allow_nan=True, allow_infinity=True).map(repr),
                      st.sampled_from(["nan", "inf", "-inf", "1e3", "1e999", "abc", "", " 5", "5.0", "0x10",
                                       "１", "2\udce9", "-0", "0.5"]),
                      st.text(max_size=6))
DEVICES = st.one_of(st.sampled_from(["cpu", "cuda", "cuda:0", "cuda:7", "gpu9", "cuda:abc", "cuda:-1", "meta",
                                     "mps", "xla", "", "cpu:0", "CPU", "c\udce9u"]), st.text(max_size=6))
DRAW_EXTENSIONS = [".png", ".jpg", ".jpeg", ".PNG", ".webp", ".tif", ".gif", ".bmp", ".xyz", "", ".pdf",
                   ".eps", "."]


@st.composite
def flag_case(draw, env):
    """(argv, whether some value in it is one a user should not give)."""
    command = draw(st.sampled_from(COMMANDS))
    root = env["root"]
    good_image = env["scenes"][0][0]
    image = draw(st.sampled_from([good_image, str(root / "folder"), str(root / "missing.png"),
                                  str(root / "notes.txt"), "", "sc\udce8ne.png", "a\x00b.png"]))
    options, positionals, hostile = ["--json"], [image], image != good_image
    if command == "refer":
        texts = draw(st.lists(st.one_of(st.sampled_from(TEXTS), st.text(max_size=12),
                                        st.sampled_from(["", "  ", "\x01", "caf\udce9", "-x"])), max_size=3))
        positionals += texts
        hostile |= not texts or any(t not in TEXTS for t in texts)
    if command == "caption-regions":
        for _ in range(draw(st.integers(0, 2))):
            box = draw(st.one_of(st.sampled_from(["10,10,50,50", "1,2,3", "a,b,c,d", "5,5,5,5", "1e999,0,1,1",
                                                  "0,0,5000,5000", ""]), st.text(max_size=12)))
            options += ["--box", box]
            hostile |= box != "10,10,50,50"
        hostile |= "--box" not in options
    if command == "dense-caption":
        for flag in ("--max-regions", "--min-score"):
            if draw(st.booleans()):
                options += [flag, draw(NUMBERISH)]
                hostile = True
    if command in ("caption", "caption-regions") and draw(st.booleans()):
        options += ["--beams", draw(NUMBERISH)]
        hostile = True
    if draw(st.booleans()):
        device = draw(DEVICES)
        options += ["--device", device]
        hostile |= device != "cpu"
    if draw(st.booleans()):
        name = draw(st.sampled_from(["out", "d/out", "folder", "notes.txt/x"]))
        options += ["--draw", str(root / name) + draw(st.sampled_from(DRAW_EXTENSIONS))]
        hostile = True
    return [command, *options, "--", *positionals], hostile


def test_flag_fuzz_never_crashes(env, capsys):
    counts: Counter = Counter()

    @settings(derandomize=True, database=None, max_examples=120, deadline=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(flag_case(env))
    def check(case):
        argv, hostile = case
        code, out, err = run_main(capsys, argv)
        counts["hostile"] += hostile
        if isinstance(code, tuple):  # argparse refused it
            assert code == ("argparse", 2) and out == "", (argv, code)
            counts["refused by argparse"] += 1
            return
        assert code in (cli.EXIT_OK, cli.EXIT_FAILED, cli.EXIT_USAGE), (argv, code, err)
        if code == cli.EXIT_USAGE:
            errors = [line for line in err.splitlines() if line.startswith("error: ")]
            assert out == "" and len(errors) == 1, (argv, err)
            counts["refused"] += 1
            return
        (result,) = [json.loads(line) for line in out.splitlines()]
        counts[f"exit {code}"] += 1
        if code == cli.EXIT_OK:
            assert "error" not in result and "drawing_error" not in result, (argv, result)
        else:
            problem = result.get("error") or result.get("drawing_error")
            assert isinstance(problem, str) and problem.strip() and not problem.startswith("internal error")
            counts["failed requests"] += 1

    check()
    print("flag fuzz:", dict(counts))
    assert counts["hostile"] >= 80 and counts["refused by argparse"] and counts["refused"], counts
