"""Bad input never becomes a crash, a traceback, a 500 or a lost batch (issue 23): the worker's HTTP surface
fuzzed with hypothesis, and a group of hostile images sent to a worker process.

The fuzz tests generate JSON bodies for every route: valid-ish ones and hostile ones (wrong types, huge
numbers, NaN and Infinity as raw JSON, lone surrogates as JSON escapes, nested junk, bad base64, truncated
and corrupted PNGs, malformed URLs, unknown fields) plus raw bodies that are not JSON at all. Every answer
must be a 2xx or a 4xx whose JSON body carries a non-empty ``error`` and ``type`` and does not repeat the
request's strings; never a 5xx. The seed is fixed (``derandomize``), so every run sends the same inputs.
After the examples, a good request is still answered 200.
"""

from __future__ import annotations

import concurrent.futures
import io
import json
import math
import re
import threading
import time

import httpx
import pytest
from fakes import FakePredictor
from fastapi.testclient import TestClient
from hostile_images import noise_png, png_1bit, png_16bit_rgba, rss_bytes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from serving_helpers import WorkerProcess, b64, png_bytes, tiny_available, wait_until
from serving_helpers import image_host as serve_image_host

from pixelllm_plugins.serving.app import create_app
from pixelllm_plugins.serving.settings import WorkerSettings

ROUTES = ("/v1/refer", "/v1/caption_regions", "/v1/caption", "/v1/dense_caption")
EXAMPLES = 110  # per route; plus the raw-body test: about 550 requests, 5-15 s on 2 cores
FUZZ = settings(derandomize=True, max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
MIN_BAD = 300  # 4xx answers to generated bad input per run (checked by the last fuzz test)
SEEN = {"bad": 0, "ok": 0, "short_deadline": 0}

PNG = png_bytes(32, 24)
GOOD = {"b64": b64(PNG)}


def _encoded(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(PNG)).save(buf, fmt)
    return buf.getvalue()


FILES = [PNG] + [_encoded(fmt) for fmt in ("JPEG", "WEBP", "BMP", "TIFF", "GIF")]  # io.IMAGE_FORMATS


# ---- a loopback image host for URL images --------------------------------------------------------------

IMAGE_HOST_ROUTES = {"/ok.png": (200, PNG), "/redirect": (302, "/ok.png"), "/away": (302, "http://elsewhere.test/ok.png"),
                     "/loop": (302, "/loop"), "/junk": (200, b"not an image at all")}


@pytest.fixture(scope="module")
def image_host():
    with serve_image_host(IMAGE_HOST_ROUTES) as host:
        yield host


@pytest.fixture(scope="module")
def client(image_host):
    # port 1 is allowed too: nothing listens there, so a fetch from it is refused at once
    app = create_app(FakePredictor(), WorkerSettings(allowed_hosts=(image_host, "127.0.0.1:1"), url_timeout_s=5,
                                                     max_wait_ms=0, max_pixels=4_000_000))
    with TestClient(app, raise_server_exceptions=False) as c:
        wait_until(lambda: c.get("/ready").status_code == 200, 10, what="ready")
        yield c


# ---- strategies ----------------------------------------------------------------------------------------

SPECIALS = ["\ud800", "\udfff", "\udc80", "\x00", "\x07", "\u202e", "\ufeff", "\n", "\t", " ", "../", "%00",
            "\\", '"', "'", "{", "}", "\u00e9", "\U0001f600", "\u0301"]
strings = st.one_of(
    st.text(max_size=24),
    st.lists(st.one_of(st.sampled_from(SPECIALS), st.text(max_size=4)), max_size=8).map("".join),
    st.sampled_from(["", " ", "\x00\x00", "\ud800", "a\ud800b", "x" * 3000, "the red circle", "0", "1e309",
                     "NaN", "true", "null", "[]", "{}"]),
)
numbers = st.one_of(
    st.integers(-10, 300),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, -1, 1, 2**31, 2**63, -(2**63) - 1, 10**30, 10**300, 1e308, -0.0, 5e-324, 0.5]),
)
scalars = st.one_of(st.none(), st.booleans(), numbers, strings)
junk = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                     st.dictionaries(strings, inner, max_size=4)),
                    max_leaves=10)


def _corrupt(data: bytes, at: int, value: int) -> bytes:
    at %= len(data)
    return data[:at] + bytes([value]) + data[at + 1:]


def _urls(host: str):
    """URL strings: the loopback image host's good, redirecting and missing paths, and malformed URLs."""
    hosts = st.sampled_from([host, host, host.upper(), "127.0.0.1:1", "127.0.0.1:99999", "127.0.0.1:abc", "[::1",
                             "[::1]", "", "user:pw@" + host, "elsewhere.test", "xn--", "xn--zz-" + "a" * 70,
                             "a" * 300, "127.0.0.1:0", "127.0.0.1:-1", host + "\x00", "\ud800.test",
                             "[fe80::1%25eth0]", "127.0.0.1:" + "9" * 50])
    schemes = st.sampled_from(["http", "http", "http", "https", "HTTP", "ftp", "file", "javascript", "", "http:"])
    paths = st.one_of(st.sampled_from(["/ok.png", "/ok.png", "/redirect", "/away", "/loop", "/junk", "/missing",
                                       "/../ok.png", "/%2e%2e/ok.png", "/ok.png?x=\ud800", "/ok.png#f", ""]),
                      strings)
    return st.one_of(st.builds(lambda s, h, p: f"{s}://{h}{p}", schemes, hosts, paths), strings)


def _images(host: str):
    """``image`` objects of the right shape whose content is good or hostile."""
    return st.one_of(
        st.just(GOOD),
        st.builds(lambda s: {"b64": s}, strings),  # not base64
        st.builds(lambda b: {"b64": b64(b)}, st.binary(max_size=64)),  # base64, not an image
        st.builds(lambda n: {"b64": b64(PNG[:n])}, st.integers(0, len(PNG) - 1)),  # truncated
        st.builds(lambda f, at, v: {"b64": b64(_corrupt(f, at, v))}, st.sampled_from(FILES), st.integers(0, 10**6),
                  st.integers(0, 255)),  # a byte changed, in any of the formats the loader opens
        st.sampled_from([{"b64": "data:image/png;base64," + GOOD["b64"]}, {"b64": "data:image/png," + GOOD["b64"]},
                         {"b64": "data:,"}, {}, {"b64": GOOD["b64"], "url": f"http://{host}/ok.png"},
                         {"b64": None}, {"url": None}, {"b64": GOOD["b64"], "extra": 1},
                         {"b64": GOOD["b64"].replace("+", "-").replace("/", "_")}, {"b64": b64(png_bytes(2500, 2))},
                         {"b64": "\n".join(GOOD["b64"][i:i + 76] for i in range(0, len(GOOD["b64"]), 76))}]),
        st.builds(lambda u: {"url": u}, _urls(host)),
        st.builds(lambda u: {"url": u}, _urls(host)),
    )


texts = st.one_of(st.text(min_size=1, max_size=30), strings)
boxes = st.lists(st.one_of(
    st.tuples(*[st.floats(-50, 100)] * 4).map(list),  # in, across or outside the 32x24 image
    st.lists(numbers, max_size=6),
), max_size=6)
in_range = {"max_new_tokens": st.one_of(st.integers(1, 12), st.integers(-2, 140)),
            "num_beams": st.one_of(st.integers(1, 3), st.integers(-1, 10)),
            "max_regions": st.one_of(st.integers(1, 30), st.integers(-1, 300)),
            "min_score": st.one_of(st.floats(0, 1), st.floats(-0.5, 1.5))}
FIELDS = {
    "/v1/refer": {"texts": st.lists(texts, max_size=40)},  # and "text", one of the two
    "/v1/caption_regions": {"boxes": boxes, "max_new_tokens": in_range["max_new_tokens"],
                            "num_beams": in_range["num_beams"]},
    "/v1/caption": {"trace": st.booleans(), "max_new_tokens": in_range["max_new_tokens"],
                    "num_beams": in_range["num_beams"]},
    "/v1/dense_caption": {"max_regions": in_range["max_regions"], "min_score": in_range["min_score"]},
}
COMMON = {"adapter": st.sampled_from(["proj-a", "a" * 64, "a" * 65, "../etc", ".hidden", "x y"]),
          "timeout_s": st.one_of(st.floats(5, 120), numbers)}
MUTATIONS = ["none"] * 6 + ["junk_value", "junk_value", "extra_field", "no_image", "not_an_object"]


def draw_body(data, route: str, host: str):
    """A body of the route's shape with hostile content, then perhaps one structural mutation."""
    body: dict = {"image": data.draw(_images(host), label="image")}
    if route == "/v1/refer":
        which = data.draw(st.sampled_from(["text", "text", "texts", "texts", "both", "neither"]), label="text field")
        if which in ("text", "both"):
            body["text"] = data.draw(texts, label="text")
        if which in ("texts", "both"):
            body["texts"] = data.draw(FIELDS[route]["texts"], label="texts")
    optional = {k: v for k, v in {**FIELDS[route], **COMMON}.items() if k not in ("texts",)}
    for name in data.draw(st.lists(st.sampled_from(sorted(optional)), max_size=3, unique=True), label="fields"):
        body[name] = data.draw(optional[name], label=name)
    mutation = data.draw(st.sampled_from(MUTATIONS), label="mutation")
    if mutation == "junk_value":
        name = data.draw(st.sampled_from(sorted({"image", *FIELDS[route], *COMMON, "text"})), label="junk field")
        body[name] = data.draw(junk, label="junk")
    elif mutation == "extra_field":
        body.update(data.draw(st.dictionaries(strings, junk, min_size=1, max_size=2), label="extra"))
    elif mutation == "no_image":
        body.pop("image")
    elif mutation == "not_an_object":
        return data.draw(junk, label="body")
    return body


# ---- the property --------------------------------------------------------------------------------------

IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")


def _leaves(value, out: list[str]) -> list[str]:
    """Every string in a body, keys too unless they are plausible field names (named when unknown)."""
    if isinstance(value, str):
        out.append(value)
    elif isinstance(value, dict):
        for k, v in value.items():
            if not IDENTIFIER.fullmatch(k):
                _leaves(k, out)
            _leaves(v, out)
    elif isinstance(value, list):
        for v in value:
            _leaves(v, out)
    return out


def _short_deadline(body) -> bool:
    """The request itself asked for a deadline short enough that a 504 is the right answer."""
    if not isinstance(body, dict) or "timeout_s" not in body:
        return False
    t = body["timeout_s"]
    try:
        t = float(t)
    except (TypeError, ValueError, OverflowError):
        return False
    return not math.isnan(t) and t < 5


def _check(response: httpx.Response, body=None) -> None:
    status = response.status_code
    assert status < 500 or (status == 504 and _short_deadline(body)), (status, response.text[:500])
    if 200 <= status < 300:
        SEEN["ok"] += 1
        return
    assert 400 <= status < 500 or status == 504, (status, response.text[:500])
    answer = response.json()
    assert isinstance(answer, dict) and isinstance(answer.get("error"), str) and answer["error"].strip(), answer
    assert isinstance(answer.get("type"), str) and answer["type"], answer
    # no echo: a message names the field, never repeats the text, URL or image data that was sent (an
    # adapter's name, a pattern-checked identifier, is the one value an error names)
    said = response.text
    named = body.get("adapter") if isinstance(body, dict) else None  # an identifier: named when unknown
    for leaf in _leaves(body, []):
        if leaf == named:
            continue
        if len(leaf) >= 12 and leaf not in ("the red circle",) and not leaf.isdigit():
            shown = json.dumps(leaf)[1:-1]
            assert leaf not in said and shown not in said, (leaf[:80], said[:500])
    SEEN["bad" if status < 500 else "short_deadline"] += 1


def _post(client, route: str, body) -> httpx.Response:
    raw = json.dumps(body)  # ensure_ascii: lone surrogates become \ud800 escapes; NaN and Infinity raw
    return client.post(route, content=raw.encode("ascii"), headers={"content-type": "application/json"})


def _still_serves(client) -> None:
    r = client.post("/v1/refer", json={"image": GOOD, "text": "the red circle"})
    assert r.status_code == 200, r.text
    assert client.get("/health").json()["status"] == "ok"


def _fuzz_route(route: str):
    @FUZZ
    @given(data=st.data())
    def run(client, image_host, data):
        body = draw_body(data, route, image_host)
        _check(_post(client, route, body), body)

    return run


@pytest.mark.parametrize("route", ROUTES)
def test_generated_bodies_get_a_2xx_or_a_clear_4xx(client, image_host, route):
    _fuzz_route(route)(client, image_host)
    _still_serves(client)


RAW = st.one_of(
    st.binary(max_size=200),
    st.text(max_size=100).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.integers(1, 60).map(lambda n: json.dumps({"image": GOOD, "text": "x"}).encode()[:n]),  # cut short
    st.integers(1, 50_000).map(lambda n: b"[" * n),  # nested too deep for the parser
    st.integers(1, 3_000).map(lambda n: b'{"image":' * n),
    st.sampled_from([b"", b"null", b"[]", b"1e999", b'"text"', b"NaN", b"-Infinity", b"\xef\xbb\xbf{}",
                     b'{"image": {"b64": "AAAA"}, "max_regions": ' + b"9" * 5000 + b"}",
                     b'{"image": {"b64": "AAAA"}, "image": {"url": 1}, "text": "dup"}',
                     b'{"image": {"b64": "\xff\xfe"}, "text": "x"}', b'{"text": "\\ud800\\udc00\\ud800"}',
                     b'{"\\ud800": 1}', b'{"image": 1e400}', b"{" + b" " * 10_000 + b"}"]),
)
CONTENT_TYPES = st.sampled_from(["application/json", "text/plain", "application/json; charset=latin-1",
                                 "multipart/form-data; boundary=x", "", "application/x-www-form-urlencoded"])


@FUZZ
@given(route=st.sampled_from(ROUTES), raw=RAW, content_type=CONTENT_TYPES,
       method=st.sampled_from(["POST", "POST", "POST", "PUT", "GET", "DELETE"]))
def test_raw_bodies_that_are_not_json_objects_get_a_clear_4xx(client, route, raw, content_type, method):
    headers = {"content-type": content_type} if content_type else {}
    r = client.request(method, route, content=raw, headers=headers)
    _check(r)


def test_zz_the_fuzz_run_sent_enough_bad_input():
    """Runs after the fuzz tests above (file order): they answered at least MIN_BAD bad inputs with a 4xx."""
    if SEEN["bad"] + SEEN["ok"] == 0:
        pytest.skip("the fuzz tests did not run in this session")
    assert SEEN["bad"] >= MIN_BAD, SEEN


# ---- hostile images: tiny files of huge canvases, sent together to a worker process -------------------

MODEL_ARGS = ["--model", "tiny", "--torch-threads", "1"] if tiny_available() else ["--factory", "fakes:FakePredictor"]
BUDGET = 640 * 1024 * 1024  # one 16-bit RGBA canvas (488 MiB) or two 1-bit ones (305 MiB each) at a time
MIB = 1024 * 1024


@pytest.mark.slow
def test_hostile_images_together_neither_stall_the_worker_nor_keep_its_memory(tmp_path):
    """Four tiny PNGs of 8000x8000 canvases (two 16-bit RGBA, two 1-bit) at once to a worker process:
    every answer a 2xx or a clear 4xx, /health answering throughout, the decoding held to the memory
    budget, and the worker's resident memory back within 20 % of its warm level afterwards."""
    maker = concurrent.futures.ThreadPoolExecutor(1)
    rgba = maker.submit(png_16bit_rgba)  # 2 s of zlib, while the worker starts
    normal = [noise_png(320, 240, seed) for seed in range(4)]
    env = {"PIXELLLM_WORKER_DECODE_BUDGET_BYTES": str(BUDGET), "PIXELLLM_WORKER_TIMEOUT_S": "300"}
    with WorkerProcess(*MODEL_ARGS, env=env, log_path=tmp_path / "worker.log") as worker, \
            httpx.Client(base_url=worker.url, timeout=300) as http:
        hostile = [rgba.result(60), png_1bit()]
        maker.shutdown()
        def refer(data: bytes, text: str = "the red circle") -> httpx.Response:
            return http.post("/v1/refer", json={"image": {"b64": b64(data)}, "text": text})

        def together(images: list[bytes]) -> list[httpx.Response]:
            answers: list = [None] * len(images)

            def send(i: int) -> None:
                answers[i] = refer(images[i], f"image {i}")

            threads = [threading.Thread(target=send, args=(i,)) for i in range(len(images))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(300)
            return answers

        for _ in range(2):  # warm: the decode threads, the model, the allocator
            assert all(r.status_code == 200 for r in together(normal))
        warm = rss_bytes(worker.proc.pid)

        group_done = threading.Event()
        health: list[int] = []
        peak = [warm]

        def watch() -> None:  # /health and the resident memory while the group decodes
            with httpx.Client(base_url=worker.url, timeout=60) as probe:
                while not group_done.is_set():
                    try:
                        health.append(probe.get("/health").status_code)
                    except httpx.HTTPError as exc:
                        health.append(-1)
                        print("health:", repr(exc))
                    peak[0] = max(peak[0], rss_bytes(worker.proc.pid))
                    time.sleep(0.02)

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            answers = together(hostile * 2)
        finally:
            group_done.set()
            watcher.join(120)
        after = rss_bytes(worker.proc.pid)
        report = (f"warm {warm / MIB:.0f} MiB, peak {peak[0] / MIB:.0f} MiB, after {after / MIB:.0f} MiB; "
                  f"/health answers {len(health)}")
        print(report)

        for r in answers:
            assert r is not None and (200 <= r.status_code < 300 or 400 <= r.status_code < 500), r
            if r.status_code >= 400:
                assert r.json()["error"] and r.json()["type"], r.text
        assert health and all(s == 200 for s in health), health
        # the group was really decoded in this process, within the budget (plus the process's own churn)
        assert peak[0] - warm > 200 * MIB, report
        assert peak[0] - warm < BUDGET + 256 * MIB, report
        assert after <= warm * 1.2, report
        assert refer(normal[0]).status_code == 200  # and it still serves
