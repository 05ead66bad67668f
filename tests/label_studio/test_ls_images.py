"""Image fetching: Label Studio paths with the key (and only there), presign redirects, allowed hosts,
local roots, size and time limits, personal access tokens. All servers are on 127.0.0.1."""

from __future__ import annotations

import base64
import json
import time

import pytest
from ls_helpers import Route, ScriptedServer, huge_png_header, png_bytes

from label_studio_backend.images import ImageFetcher
from label_studio_backend.settings import Settings
from pixelllm_plugins.errors import ImageFetchError, ImageTooLargeError, InvalidImageError
from pixelllm_plugins.io import ImageLimits

TOKEN = "legacy-token-0123456789"


@pytest.fixture()
def ls():
    server = ScriptedServer()
    yield server
    server.close()


@pytest.fixture()
def other():
    server = ScriptedServer()
    yield server
    server.close()


def fetcher(ls_url="", key=TOKEN, **kw) -> ImageFetcher:
    opts = {"local_roots": (), "allowed_hosts": (), **kw}
    return ImageFetcher(Settings.from_env(label_studio_url=ls_url, label_studio_api_key=key, **opts))


def _jwt(payload: dict) -> str:
    enc = lambda d: base64.urlsafe_b64encode(json.dumps(d).encode()).decode().rstrip("=")  # noqa: E731
    return f"{enc({'alg': 'HS256', 'typ': 'JWT'})}.{enc(payload)}.c2ln"


def test_upload_and_local_files_go_to_label_studio_with_the_token(ls):
    ls.routes["/data/upload/3/a.png"] = Route(200, png_bytes((40, 30)), {"Content-Type": "image/png"})
    ls.routes["/data/local-files/"] = Route(200, png_bytes((20, 10)))
    f = fetcher(ls.url)
    assert f.load("/data/upload/3/a.png").size == (40, 30)
    assert f.load("/data/local-files/?d=imgs/x.png").size == (20, 10)
    assert f.load(f"{ls.url}/data/upload/3/a.png").size == (40, 30)
    assert all(r["headers"]["authorization"] == f"Token {TOKEN}" for r in ls.requests)


def test_token_is_never_sent_to_other_hosts(ls, other):
    other.routes["/img.png"] = Route(200, png_bytes())
    f = fetcher(ls.url, allowed_hosts="127.0.0.1")
    f.load(f"{other.url}/img.png")
    assert "authorization" not in other.requests[0]["headers"]


def test_hosts_must_be_allowed(ls, other):
    other.routes["/img.png"] = Route(200, png_bytes())
    with pytest.raises(ImageFetchError, match="PIXELLLM_LS_ALLOWED_HOSTS"):
        fetcher(ls.url).load(f"{other.url}/img.png")
    assert not other.requests
    assert fetcher(ls.url, allowed_hosts="*").load(f"{other.url}/img.png").size == (64, 48)
    assert fetcher(ls.url, allowed_hosts="127.0.0.*").load(f"{other.url}/img.png").size == (64, 48)


def test_login_password_params_are_sent_to_allowed_hosts(other):
    other.routes["/img.png"] = Route(200, png_bytes())
    fetcher("", allowed_hosts="127.0.0.1").load(f"{other.url}/img.png", login="bob", password="pw")
    assert other.requests[0]["headers"]["authorization"] == "Basic " + base64.b64encode(b"bob:pw").decode()


def test_cloud_uri_is_presigned_by_label_studio_and_redirect_drops_the_token(ls, other):
    other.routes["/bucket/key.png"] = Route(200, png_bytes((12, 8)))
    ls.routes["/tasks/42/presign/"] = Route(302, b"", {"Location": f"{other.url}/bucket/key.png?X-Sig=secret"})
    f = fetcher(ls.url)  # the redirect target is not in the allowed hosts: Label Studio's redirect is trusted
    assert f.load("s3://bucket/key.png", task_id=42).size == (12, 8)
    query = ls.requests[0]["path"].split("fileuri=")[1]
    assert base64.urlsafe_b64decode(query).decode() == "s3://bucket/key.png"
    assert ls.requests[0]["headers"]["authorization"] == f"Token {TOKEN}"
    assert "authorization" not in other.requests[0]["headers"]
    with pytest.raises(ImageFetchError, match="task id"):
        f.load("gs://bucket/key.png")


def test_redirects_from_other_hosts_follow_the_policy(other, ls):
    other.routes["/r"] = Route(302, b"", {"Location": f"{ls.url}/elsewhere.png"})
    ls.routes["/elsewhere.png"] = Route(200, png_bytes())
    f = fetcher("", allowed_hosts="127.0.0.1")
    assert f.load(f"{other.url}/r").size == (64, 48)  # same host pattern: allowed
    other.routes["/loop"] = Route(302, b"", {"Location": "/loop"})
    with pytest.raises(ImageFetchError, match="too many redirects"):
        f.load(f"{other.url}/loop")


def test_errors_explain_what_to_do(ls):
    ls.routes["/data/upload/1/none.png"] = Route(404, b"nope")
    ls.routes["/data/upload/1/denied.png"] = Route(401, b"no")
    ls.routes["/data/upload/1/text.png"] = Route(200, b"hello, I am text")
    ls.routes["/data/upload/1/trunc.png"] = Route(200, png_bytes((50, 50))[:60])
    f = fetcher(ls.url)
    with pytest.raises(ImageFetchError, match="404"):
        f.load("/data/upload/1/none.png")
    with pytest.raises(ImageFetchError, match="LABEL_STUDIO_API_KEY"):
        f.load("/data/upload/1/denied.png")
    with pytest.raises(InvalidImageError, match="not a readable image"):
        f.load("/data/upload/1/text.png")
    with pytest.raises(InvalidImageError):
        f.load("/data/upload/1/trunc.png")
    with pytest.raises(ImageFetchError, match="unsupported"):
        f.load("ftp://x/y.png")
    with pytest.raises(ImageFetchError, match="non-empty string"):
        f.load(None)


def test_size_and_pixel_limits(ls):
    big = png_bytes((64, 64))
    ls.routes["/data/upload/1/big.png"] = Route(200, big)
    ls.routes["/data/upload/1/chunked.png"] = Route(200, big, chunks=[big[:100], big[100:]])
    ls.routes["/data/upload/1/huge.png"] = Route(200, huge_png_header())
    small = fetcher(ls.url, image_limits=ImageLimits(max_pixels=64_000_000, max_bytes=120))
    with pytest.raises(ImageTooLargeError, match="limit"):
        small.load("/data/upload/1/big.png")  # Content-Length over the limit
    with pytest.raises(ImageTooLargeError, match="limit"):
        small.load("/data/upload/1/chunked.png")  # no Content-Length: counted while streaming
    with pytest.raises(ImageTooLargeError, match="pixels"):
        fetcher(ls.url).load("/data/upload/1/huge.png")  # 30000x30000 header: refused before decoding


def test_slow_downloads_time_out(ls):
    body = png_bytes((64, 64))
    ls.routes["/data/upload/1/slow.png"] = Route(200, body, chunks=[body[i:i + 50] for i in range(0, len(body), 50)],
                                                 delay_s=0.3)
    started = time.monotonic()
    with pytest.raises(ImageFetchError, match="no answer within 0.5 s"):
        fetcher(ls.url, fetch_timeout_s=0.5).load("/data/upload/1/slow.png")
    assert time.monotonic() - started < 5


def test_the_timeout_is_for_the_whole_download_not_per_read(ls):
    """Every read comes in under the timeout, the whole download does not: the caller gets its error at
    the deadline, not one read later (the per-read timeout alone let a trickling host hold a request)."""
    body = png_bytes((64, 64))
    ls.routes["/data/upload/1/trickle.png"] = Route(200, body, chunks=[body[:40], body[40:80], body[80:]],
                                                    delay_s=0.9)
    started = time.monotonic()
    with pytest.raises(ImageFetchError, match="no answer within 1 s"):
        fetcher(ls.url, fetch_timeout_s=1.0).load("/data/upload/1/trickle.png")
    assert time.monotonic() - started < 1.7  # the per-chunk check alone answered after 1.8 s
    # headers that never come: the same deadline
    ls.routes["/data/upload/1/silent.png"] = lambda handler, body: time.sleep(3) or Route(200, b"x")
    started = time.monotonic()
    with pytest.raises(ImageFetchError, match="no answer within 0.5 s"):
        fetcher(ls.url, fetch_timeout_s=0.5).load("/data/upload/1/silent.png")
    assert time.monotonic() - started < 1.5


def test_local_files_only_under_allowed_roots(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "ok.png").write_bytes(png_bytes((10, 10)))
    (tmp_path / "secret.png").write_bytes(png_bytes((11, 11)))
    f = ImageFetcher(Settings.from_env(local_roots=str(root), label_studio_url=""))
    assert f.load(str(root / "sub" / "ok.png")).size == (10, 10)
    assert f.load(f"file://{root}/sub/ok.png").size == (10, 10)
    assert f.load("/data/local-files/?d=sub/ok.png").size == (10, 10)  # from disk: no Label Studio needed
    for bad in (str(tmp_path / "secret.png"), f"{root}/../secret.png", f"file://{root}/sub/../../secret.png"):
        with pytest.raises(ImageFetchError, match="outside the allowed folders"):
            f.load(bad)
    with pytest.raises(ImageFetchError, match="'..' segments"):
        f.load("/data/local-files/?d=../secret.png")  # refused before the disk or Label Studio is asked
    # not on disk, and no Label Studio to ask: the message says what is wrong with the path first
    with pytest.raises(ImageFetchError, match=r"\?d=sub/other.png was not found under the backend's local roots"
                                              r".*LABEL_STUDIO_URL"):
        f.load("/data/local-files/?d=sub/other.png")
    with pytest.raises(ImageFetchError, match="is a folder, not an image file"):
        f.load("/data/local-files/?d=sub")
    with pytest.raises(ImageFetchError, match="disabled"):
        ImageFetcher(Settings.from_env(local_roots=(), label_studio_url="")).load(str(root / "sub" / "ok.png"))


def test_personal_access_token_is_exchanged_and_refreshed(ls):
    refresh = _jwt({"token_type": "refresh", "exp": time.time() + 3600})
    accesses = iter([_jwt({"token_type": "access", "exp": time.time() + 300, "n": i}) for i in range(5)])
    issued = []

    def refresh_route(handler, body):
        assert json.loads(body) == {"refresh": refresh}
        issued.append(next(accesses))
        return Route(200, {"access": issued[-1]})

    def image_route(handler, body):
        ok = handler.headers.get("authorization") == f"Bearer {issued[-1]}" and len(issued) >= 2
        return Route(200, png_bytes((9, 9))) if ok else Route(401, b"expired")

    ls.routes["/api/token/refresh/"] = refresh_route
    ls.routes["/data/upload/1/p.png"] = image_route
    f = fetcher(ls.url, key=refresh)
    assert f.auth.is_pat
    with pytest.raises(ImageFetchError, match="401"):
        f.load("/data/upload/1/p.png")  # first access token is "expired": the fetcher drops it
    assert f.load("/data/upload/1/p.png").size == (9, 9)  # a fresh one is fetched
    assert len(issued) == 2
    assert refresh not in repr(f.auth)


def test_cache_serves_repeated_interactive_calls(ls):
    ls.routes["/data/upload/1/a.png"] = Route(200, png_bytes())
    f = fetcher(ls.url)
    for _ in range(3):
        f.load("/data/upload/1/a.png", task_id=1)
    assert len(ls.requests) == 1


@pytest.mark.parametrize("ref", [
    "/data/upload/../../etc/passwd", "/data/upload/1/../../../api/users", "/data/upload/./1/a.png",
    "/data/upload/1/%2e%2e/%2E%2E/x.png", "/data/upload/1/%2e%2E%2fx.png", "/data/upload/1/..%5c..%5cx.png",
    "/data/local-files/?d=../../etc/passwd", "/data/local-files/?d=imgs/%2e%2e/%2e%2e/etc/passwd",
    "/data/local-files/?d=imgs/%252e%252e/x.png", "/storage-data/../api/projects", "/tasks/../../api/users",
    "{ls}/data/upload/../../api/users", "{ls}/data/upload/1/%2e%2e/x.png", "{ls}/data/local-files/?d=a/../../b",
])
def test_dot_segments_never_reach_label_studio(ls, ref):
    """``..`` would be normalised by the HTTP client into another path on the Label Studio host, with the
    API key: refused before any request, raw or percent-encoded."""
    ls.routes["/etc/passwd"] = Route(200, png_bytes())
    with pytest.raises(ImageFetchError, match=r"'\.\.' (path )?segments"):
        fetcher(ls.url).load(ref.format(ls=ls.url))
    assert ls.requests == []


@pytest.mark.parametrize("url,match", [
    ("http://127.0.0.1:99999/a.png", "malformed"), ("http://127.0.0.1:abc/a.png", "malformed"),
    ("http://[::1/a.png", "malformed"), ("http://127.0.0.1:0/a.png", "port 0"), ("http:///a.png", "no host"),
    ("http://user:pw@127.0.0.1/a.png", "credentials"), ("http://127.0.0.1/a b.png", "spaces"),
    ("http://127.0.0.1/x/../a.png", "'..' path segments"),
])
def test_malformed_urls_are_fetch_errors(other, url, match):
    f = fetcher("", allowed_hosts="*")
    with pytest.raises(ImageFetchError, match=match):
        f.load(url)
    assert other.requests == []


def test_redirect_to_a_malformed_or_dotted_label_studio_url_is_refused(ls):
    ls.routes["/data/upload/1/r.png"] = Route(302, b"", {"Location": "http://127.0.0.1:99999/x.png"})
    with pytest.raises(ImageFetchError, match="redirect target is malformed"):
        fetcher(ls.url).load("/data/upload/1/r.png")
    ls.routes["/data/upload/1/r2.png"] = Route(302, b"", {"Location": f"{ls.url}/data/%2e%2e/x.png"})
    with pytest.raises(ImageFetchError, match="'..'"):
        fetcher(ls.url).load("/data/upload/1/r2.png")
    assert [r["path"] for r in ls.requests] == ["/data/upload/1/r.png", "/data/upload/1/r2.png"]


def _eps() -> bytes:
    return (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"
            b"newpath 0 0 moveto 10 10 lineto stroke showpage\n%%EOF\n")


def _ppm() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (10, 10), (1, 2, 3)).save(buf, "PPM")
    return buf.getvalue()


@pytest.mark.parametrize("name,data", [("eps", _eps()), ("ppm", _ppm())])
def test_formats_outside_the_allow_list_are_refused(ls, name, data):
    """Images are opened by pixelllm_plugins.io with its format allow-list: an EPS (Ghostscript) or a PPM,
    which PIL alone would open, is refused."""
    ls.routes[f"/data/upload/1/x.{name}"] = Route(200, data)
    f = fetcher(ls.url)
    with pytest.raises(InvalidImageError, match="not a readable image"):
        f.open(f"/data/upload/1/x.{name}")
    with pytest.raises(InvalidImageError, match="not a readable image"):
        f.load("data:image/png;base64," + base64.b64encode(data).decode())
