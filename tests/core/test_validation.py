"""The shared checks every entry point uses: the bounds table, text validation, the URL parser, and the image
loader's format allow-list and decode cost."""

from __future__ import annotations

import argparse
import io
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from pixelllm_plugins.bounds import BOUNDS, argtype, check
from pixelllm_plugins.errors import (
    ImageFetchError,
    InvalidImageError,
    InvalidParameterError,
    InvalidPromptError,
)
from pixelllm_plugins.io import IMAGE_FORMATS, decode_cost, load_image, open_encoded
from pixelllm_plugins.tokenizer import PixelTokenizer, validate_text
from pixelllm_plugins.urls import parse_image_url


@pytest.mark.parametrize("value", [0, -5, 257, 1e9, "nan", "inf", math.nan, True, None, "abc", 2.5, [3], {}])
def test_max_regions_out_of_range_or_not_a_number_is_refused(value):
    with pytest.raises(InvalidParameterError, match=r"max_regions must be an integer from 1 to 256"):
        check("max_regions", value)


@pytest.mark.parametrize("value,expected", [(1, 1), ("20", 20), (" 256 ", 256), (5.0, 5)])
def test_max_regions_in_range_is_an_int(value, expected):
    got = check("max_regions", value)
    assert got == expected and isinstance(got, int)


@pytest.mark.parametrize("value", [-0.1, 1.5, "nan", math.inf, "x"])
def test_min_score_must_be_a_number_in_unit_interval(value):
    with pytest.raises(InvalidParameterError, match=r"min_score must be a number from 0 to 1"):
        check("min_score", value)


def test_label_names_the_knob_as_its_user_set_it():
    with pytest.raises(InvalidParameterError, match=r"^<RectangleLabels> model_max_regions must be"):
        check("max_regions", "1000000000", label="<RectangleLabels> model_max_regions")


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.one_of(st.integers(), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
                 st.booleans(), st.none()))
def test_every_bound_accepts_exactly_its_range(value):
    for name, bound in BOUNDS.items():
        try:
            got = check(name, value)
        except InvalidParameterError as exc:
            assert name in str(exc)
            continue
        assert bound.low <= got <= bound.high
        assert not isinstance(value, bool)


def test_argtype_gives_argparse_a_message():
    parser = argparse.ArgumentParser()
    parser.add_argument("--max-regions", type=argtype("max_regions"))
    assert parser.parse_args(["--max-regions", "12"]).max_regions == 12
    with pytest.raises(argparse.ArgumentTypeError, match="must be an integer from 1 to 256"):
        argtype("max_regions")("-5")


# ---- text ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,match", [
    ("a\ud800b", "lone surrogate"), ("\udcff", "lone surrogate"), ("\x00\x00", "empty"), ("  \n\t ", "empty"),
    ("", "empty"), (12, "must be a string"), (None, "must be a string"), (b"red", "must be a string"),
    ("\u200b\u200b", "empty"), ("\u202e", "empty"), ("\ufeff \u200d", "empty"),  # zero-width, direction, BOM
    ("\u0301\u0308", "nothing to read|anything to read"),  # combining marks with no letter under them
])
def test_validate_text_refuses(text, match):
    with pytest.raises(InvalidPromptError, match=match):
        validate_text(text)


def test_validate_text_cleans_control_characters_and_whitespace():
    assert validate_text(" the\x00red\x07 mug\n ") == "the red mug"
    assert validate_text("la tasse \u2615") == "la tasse \u2615"
    assert validate_text("red\u200bcircle\u202e") == "red circle"  # format characters separate words
    assert validate_text("cafe\u0301 !") == "cafe\u0301 !"  # a combining mark on a letter stays


def test_validate_text_max_chars():
    with pytest.raises(InvalidPromptError, match="more than the limit of 10"):
        validate_text("x" * 11, max_chars=10)


def test_tokenizer_boundary_raises_the_project_error_not_a_type_error():
    tok = PixelTokenizer.default()
    with pytest.raises(InvalidPromptError, match="lone surrogate"):
        tok.encode("a\ud800b")
    with pytest.raises(InvalidPromptError, match="must be a string"):
        tok.encode(5)
    assert tok.encode("the red circle")


# ---- URLs ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("url,match", [
    ("http://h:99999/a.png", "malformed"), ("http://h:abc/a.png", "malformed"), ("http://[::1", "malformed"),
    ("http://h:0/a.png", "port 0"), ("ftp://h/a.png", "scheme"), ("file:///etc/passwd", "scheme"),
    ("http:///a.png", "no host"), ("http://u:p@h/a.png", "credentials"), ("http://h/a b.png", "spaces"),
    ("http://h/a\n.png", "control"), ("http://h/data/upload/../../etc/passwd", r"'\.\.'"),
    ("http://h/data/%2e%2e/etc/passwd", r"'\.\.'"), ("http://h/" + "a" * 5000, "characters long"),
    (None, "non-empty string"), (7, "non-empty string"), ("", "non-empty string"),
])
def test_parse_image_url_refuses(url, match):
    with pytest.raises(ImageFetchError, match=match):
        parse_image_url(url)


def test_parse_image_url_errors_do_not_repeat_the_url():
    with pytest.raises(ImageFetchError) as info:
        parse_image_url("http://secret-host.example:99999/token=abc")
    assert "secret-host" not in str(info.value) and "token=abc" not in str(info.value)


def test_parse_image_url_fills_the_port():
    assert parse_image_url("https://Example.com/a.png").port == 443
    parsed = parse_image_url("http://example.com:8080/a.png")
    assert (parsed.host, parsed.port, parsed.path) == ("example.com", 8080, "/a.png")


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.text(max_size=60))
def test_parse_image_url_raises_only_the_project_error(text):
    for url in (text, "http://" + text, "http://h:" + text):
        try:
            parse_image_url(url)
        except ImageFetchError as exc:
            assert str(exc)


# ---- images ------------------------------------------------------------------------------------------------

def _encoded(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


def test_formats_outside_the_allow_list_are_refused():
    assert "EPS" not in IMAGE_FORMATS
    data = _encoded(Image.new("RGB", (16, 16)), "PPM")  # PIL reads it, we do not
    with pytest.raises(InvalidImageError, match="not a readable image"):
        load_image(data)
    with pytest.raises(InvalidImageError, match="not a readable image"):
        open_encoded(data)
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    with pytest.raises(InvalidImageError):
        load_image(eps)


def test_decode_cost_comes_from_the_header_mode():
    one_bit = open_encoded(_encoded(Image.new("1", (2000, 1000)), "PNG"))
    assert len(one_bit.data) < 2000  # tiny file ...
    assert one_bit.mode == "1" and one_bit.decode_bytes == 2000 * 1000 * (1 + 4)  # ... big decode
    rgba = open_encoded(_encoded(Image.new("RGBA", (100, 50)), "PNG"))
    assert rgba.decode_bytes == 100 * 50 * (4 + 4)  # PIL keeps RGB and RGBA pixels in 4 bytes
    assert decode_cost((10, 10), "RGB") == 400
    assert decode_cost((10, 10), "I;16") == 100 * (2 + 4)


def test_a_folder_is_not_an_image(tmp_path):
    with pytest.raises(InvalidImageError) as info:
        load_image(tmp_path)
    assert "is a folder" in str(info.value) and str(info.value).count(str(tmp_path)) == 1


def test_a_file_the_system_will_not_read_is_an_image_error(tmp_path):
    with pytest.raises(InvalidImageError, match="cannot read the file"):
        load_image(tmp_path / ("a" * 300 + ".png"))  # longer than any file system's name limit
