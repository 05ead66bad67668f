import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from pixelllm_plugins.errors import ImageTooLargeError, InvalidImageError
from pixelllm_plugins.io import ImageLimits, image_digest, load_image, load_image_scaled, open_encoded


def _png_bytes(w=16, h=12, color=(200, 10, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, "PNG")
    return buf.getvalue()


def _png_header_only(w: int, h: int) -> bytes:
    """A PNG whose header claims w x h pixels (a decompression-bomb shape) with one tiny IDAT."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00")) + chunk(b"IEND", b"")


def test_loads_path_bytes_pil_and_array(tmp_path):
    data = _png_bytes()
    path = tmp_path / "a.png"
    path.write_bytes(data)
    arr = np.zeros((12, 16, 3), np.uint8)
    for source in (str(path), path, data, Image.open(io.BytesIO(data)), arr, arr[..., 0]):
        image = load_image(source)
        assert image.mode == "RGB" and image.size == (16, 12)


def test_missing_file(tmp_path):
    with pytest.raises(InvalidImageError, match="not found"):
        load_image(tmp_path / "nope.png")


def test_not_an_image(tmp_path):
    p = tmp_path / "x.png"
    p.write_text("hello, I am text")
    with pytest.raises(InvalidImageError, match="not a readable image"):
        load_image(p)


def test_truncated_png():
    data = _png_bytes(64, 64)
    with pytest.raises(InvalidImageError, match="truncated|corrupt|readable"):
        load_image(data[: len(data) // 2])


def test_empty_bytes(tmp_path):
    p = tmp_path / "e.png"
    p.write_bytes(b"")
    with pytest.raises(InvalidImageError, match="empty"):
        load_image(p)


def test_pixel_bomb_refused_before_decoding():
    with pytest.raises(ImageTooLargeError, match="PIXELLLM_MAX_PIXELS"):
        load_image(_png_header_only(30000, 30000))


def test_byte_limit():
    with pytest.raises(ImageTooLargeError):
        load_image(_png_bytes(), ImageLimits(max_bytes=10))


def test_bad_array_shape():
    with pytest.raises(InvalidImageError, match="shape"):
        load_image(np.zeros((2, 3, 4, 5)))


def test_digest_depends_on_pixels_only():
    a = load_image(_png_bytes(color=(1, 2, 3)))
    b = load_image(_png_bytes(color=(1, 2, 3)))
    c = load_image(_png_bytes(color=(1, 2, 4)))
    assert image_digest(a) == image_digest(b) != image_digest(c)


def _jpeg_bytes(w: int, h: int) -> bytes:
    image = Image.new("RGB", (w, h), (30, 90, 200))
    image.paste((220, 40, 40), (w // 4, h // 4, w // 2, h // 2))
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=92)
    return buf.getvalue()


def test_scaled_load_decodes_large_jpegs_at_a_reduced_scale(tmp_path):
    data = _jpeg_bytes(1024, 768)
    path = tmp_path / "photo.jpg"
    path.write_bytes(data)
    for source in (data, path):
        image, original = load_image_scaled(source, min_side=128)
        assert original == (1024, 768) and image.mode == "RGB"
        assert image.size == (128, 96)  # 1/8 scale still gives the 128 px asked for
    image, original = load_image_scaled(data, min_side=200)  # 1/8 would be too small: 1/4
    assert (image.size, original) == ((256, 192), (1024, 768))
    # the reduced decode is a faithful downscale: the red square is where it was
    arr = np.asarray(image).astype(int)
    assert arr[72, 96, 0] > 180 and arr[24, 24, 2] > 160
    assert load_image_scaled(data)[0].size == (1024, 768)  # no size asked: full decode
    assert load_image_scaled(data, min_side=600)[0].size == (1024, 768)  # nothing to save
    png = _png_bytes(1024, 768)
    assert load_image_scaled(png, min_side=128)[0].size == (1024, 768)  # only JPEG has DCT scaling
    with pytest.raises(ImageTooLargeError, match="pixels"):  # limits still come from the header
        load_image_scaled(data, ImageLimits(max_pixels=1000), min_side=128)


def test_bytes_errors_name_the_image_size():
    with pytest.raises(InvalidImageError, match="image of 16 bytes: not a readable image"):
        load_image(b"hello, not image")


def test_encoded_image_is_sized_from_the_header_and_decoded_later(tmp_path):
    data = _jpeg_bytes(1024, 768)
    path = tmp_path / "photo.jpg"
    path.write_bytes(data)
    for source in (data, path, str(path)):
        encoded = open_encoded(source)
        assert (encoded.size, encoded.width, encoded.height, encoded.format) == ((1024, 768), 1024, 768, "JPEG")
        assert encoded.data == data
        assert "bytes" in repr(encoded) and len(repr(encoded)) < 120  # never dumps the bytes
    encoded = open_encoded(data)
    assert np.array_equal(np.asarray(load_image(encoded)), np.asarray(load_image(data)))
    image, original = load_image_scaled(encoded, min_side=128)  # the reduced JPEG decode still applies
    assert (image.size, original) == ((128, 96), (1024, 768))
    assert encoded.orientation == 1
    exif = Image.Exif()
    exif[0x0112] = 6  # stored on its side: a viewer that honours EXIF turns it
    buf = io.BytesIO()
    Image.open(io.BytesIO(data)).save(buf, "JPEG", exif=exif.tobytes())
    assert open_encoded(buf.getvalue()).orientation == 6


def test_encoded_image_errors():
    data = _jpeg_bytes(640, 480)
    with pytest.raises(InvalidImageError, match="not a readable image"):
        open_encoded(b"hello, not image")
    with pytest.raises(InvalidImageError, match="empty"):
        open_encoded(b"")
    with pytest.raises(ImageTooLargeError, match="pixels"):
        open_encoded(_png_header_only(50_000, 50_000), ImageLimits(max_pixels=1_000_000))
    with pytest.raises(ImageTooLargeError, match="bytes"):
        open_encoded(data, ImageLimits(max_bytes=100))
    # a body cut short passes the header check; decoding it is the clear error
    cut = open_encoded(data[: len(data) // 2])
    assert cut.size == (640, 480)
    with pytest.raises(InvalidImageError, match="truncated or corrupt"):
        load_image(cut)


@pytest.mark.parametrize(("variable", "field"), [("PIXELLLM_MAX_PIXELS", "max_pixels"),
                                                  ("PIXELLLM_MAX_IMAGE_BYTES", "max_bytes")])
def test_limits_come_from_the_environment_checked(monkeypatch, variable, field):
    from pixelllm_plugins.errors import InvalidParameterError

    monkeypatch.setenv(variable, "1234")
    assert getattr(ImageLimits(), field) == 1234  # read when a limit is made, not when the module loads
    monkeypatch.setenv(variable, "")
    assert getattr(ImageLimits(), field) > 1234  # the default
    for bad in ("abc", "0", "-5", "1.5", "nan", "1e30"):
        monkeypatch.setenv(variable, bad)
        with pytest.raises(InvalidParameterError, match=rf"{variable} must be an integer from 1 to .* got '{bad}'; "
                                                        "fix it or unset it for the default"):
            ImageLimits()


def test_a_bad_limit_variable_is_one_line_from_the_cli(tmp_path):
    import os
    import subprocess
    import sys

    for variable, args in (("PIXELLLM_MAX_PIXELS", ["refer", "x.png", "the circle"]),
                           ("PIXELLLM_MAX_BATCH_BYTES", ["refer", "--batch", str(tmp_path / "b.jsonl")])):
        (tmp_path / "b.jsonl").write_text('{"image": "x.png", "text": "a"}\n')
        done = subprocess.run([sys.executable, "-m", "pixelllm_plugins.cli", *args, "--model", "tiny"],
                              env=os.environ | {variable: "lots"}, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and "Traceback" not in done.stderr and "internal error" not in done.stderr
        assert done.stderr.strip().splitlines()[-1].startswith(f"error: {variable} must be an integer from 1 to ")


def test_a_path_that_is_there_but_no_file_says_so(tmp_path):
    """A device, a pipe or a link that leads nowhere is named for what it is, not "not found"."""
    import os

    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    loop = tmp_path / "loop.png"
    loop.symlink_to(tmp_path / "loop2.png")
    (tmp_path / "loop2.png").symlink_to(loop)
    dangling = tmp_path / "gone.png"
    dangling.symlink_to(tmp_path / "nothing.png")
    for path in (fifo, loop, dangling, "/dev/zero"):
        with pytest.raises(InvalidImageError, match="is not a regular file"):
            load_image(path)
    with pytest.raises(InvalidImageError, match="file not found; check the path"):
        load_image(tmp_path / "absent.png")
