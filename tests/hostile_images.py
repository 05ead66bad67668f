"""Hostile images for the bad-input tests: tiny PNG files of huge canvases, and a process's resident memory."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_16bit_rgba(w: int = 8000, h: int = 8000) -> bytes:
    """An all-zero 16-bit RGBA PNG (PIL cannot write one): about 500 KB that take 488 MiB to decode."""
    row, comp = bytes(1 + w * 8), zlib.compressobj(6)
    idat = b"".join([comp.compress(row) for _ in range(h)] + [comp.flush()])
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 6, 0, 0, 0))
            + _chunk(b"IDAT", idat) + _chunk(b"IEND", b""))


def png_1bit(w: int = 8000, h: int = 8000) -> bytes:
    """An all-black 1-bit PNG: about 8 KB that take 305 MiB to decode (PIL's pixels plus the RGB copy)."""
    buf = io.BytesIO()
    Image.new("1", (w, h)).save(buf, "PNG")
    return buf.getvalue()


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for process {pid}")


def noise_png(w: int, h: int, seed: int) -> bytes:
    """A photo-sized, incompressible PNG (over inline_decode_bytes: decoded on the worker's threads)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, "PNG")
    return buf.getvalue()
