"""The one reader of JSON-lines request files (``pixelllm ... --batch FILE.jsonl``).

A file that cannot be a request file at all (missing, a folder, binary, UTF-16, not UTF-8 anywhere, no
request in it) is refused as a whole with ``BatchFileError``. Otherwise every non-blank line becomes one
``BatchLine``, in order: its JSON object, or the error that says why the line is not one (not UTF-8, not
JSON, NaN or an infinite number, nested too deep, too long, not an object). The caller answers the good
lines and reports the bad ones in place, so the output has one result per request line.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from .bounds import from_env
from .errors import PixelLLMError

MAX_FILE_BYTES = 512 * 1024 * 1024  # unless PIXELLLM_MAX_BATCH_BYTES says otherwise
MAX_LINE_BYTES = 1024 * 1024
MAX_DEPTH = 64  # a request is a few levels deep; deeper nesting is refused before json recurses into it

_EXAMPLE = '{"image": "a.png", ...}'


class BatchFileError(PixelLLMError):
    """The ``--batch`` file cannot be read as JSON lines at all."""


@dataclass(frozen=True)
class BatchLine:
    """One non-blank line of a request file: ``request`` when it is a JSON object, else ``error``."""

    number: int  # 1-based line number in the file
    request: dict | None
    error: str | None = None


def read_batch(path: str | os.PathLike) -> list[BatchLine]:
    """The non-blank lines of a request file, each parsed or with its error; ``BatchFileError`` for a file
    that is no request file."""
    path = Path(path)
    name = str(path)
    if "\x00" in name:
        raise BatchFileError(f"{name!r}: a file name cannot contain a NUL character")
    try:
        if path.is_dir():
            raise BatchFileError(f"{name} is a folder, not a batch file (one JSON request per line)")
        size = path.stat().st_size
        limit = int(from_env("PIXELLLM_MAX_BATCH_BYTES", "max_batch_bytes", MAX_FILE_BYTES))
        if size > limit:
            raise BatchFileError(f"{name}: {size:,} bytes is more than the limit of {limit:,} "
                                 "(PIXELLLM_MAX_BATCH_BYTES); split it into smaller files")
        data = path.read_bytes()
    except FileNotFoundError:
        raise BatchFileError(f"{name}: batch file not found; check the path") from None
    except OSError as exc:
        raise BatchFileError(f"{name}: cannot read the batch file ({exc.strerror or exc})") from None
    return parse_batch(data, name)


def parse_batch(data: bytes, name: str = "batch file") -> list[BatchLine]:
    """``read_batch`` on bytes already read."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise BatchFileError(f"{name} is UTF-16 text; save it as UTF-8 (one JSON request per line)")
    if b"\x00" in data[:8192]:
        raise BatchFileError(f"{name} is a binary file, not JSON lines (one {_EXAMPLE} per line)")
    if data.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte order mark
        data = data[3:]
    lines: list[BatchLine] = []
    undecodable = 0
    first_bad: UnicodeDecodeError | None = None
    for number, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        bad = _decode_error(raw)
        if bad is not None:
            undecodable += 1
            first_bad = first_bad or bad
        lines.append(parse_line(raw, number))
    if not lines:
        raise BatchFileError(f"{name} has no requests; write one JSON object per line, e.g. {_EXAMPLE}")
    if undecodable == len(lines):
        where = f" (byte 0x{first_bad.object[first_bad.start]:02x})" if first_bad else ""
        raise BatchFileError(f"{name} is not UTF-8 text{where}; it may be Latin-1 or Windows-1252: "
                             "save it as UTF-8")
    return lines


def parse_line(raw: bytes, number: int) -> BatchLine:
    """One line of a request file (without its newline) as a ``BatchLine``."""
    if raw.endswith(b"\r"):
        raw = raw[:-1]
    if len(raw) > MAX_LINE_BYTES:
        return _bad(number, f"{len(raw):,} bytes is more than the limit of {MAX_LINE_BYTES:,} bytes for "
                            "one request")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return _bad(number, f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at byte {exc.start + 1}); "
                            "save the file as UTF-8")
    try:
        value = loads_strict(text)
    except ValueError as exc:
        return _bad(number, f"not a JSON object ({exc}); write one JSON object per line, e.g. {_EXAMPLE}")
    if not isinstance(value, dict):
        return _bad(number, f"not a JSON object but {_json_kind(value)}; a request is one object like "
                            f"{_EXAMPLE}")
    return BatchLine(number, value)


def loads_strict(text: str):
    """``json.loads`` of standard JSON only: NaN, Infinity and numbers too large for a float are refused,
    and so is nesting deeper than ``MAX_DEPTH`` (ValueError for all)."""
    if _depth(text) > MAX_DEPTH:
        raise ValueError(f"nested more than {MAX_DEPTH} levels deep")
    try:
        return json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except RecursionError:
        raise ValueError("nested too deep") from None


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:20]}{'...' if len(text) > 20 else ''} is too large")
    return value


def _depth(text: str) -> int:
    """The deepest bracket nesting outside strings (an upper bound is enough: it only guards recursion)."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > MAX_DEPTH:
                    break
        elif ch in "]}":
            depth -= 1
    return deepest


def _json_kind(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    kinds = {list: "a list", str: "a string", int: "a number", float: "a number"}
    return kinds.get(type(value), "something else")


def _decode_error(raw: bytes) -> UnicodeDecodeError | None:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return exc
    return None


def _bad(number: int, message: str) -> BatchLine:
    return BatchLine(number, None, f"line {number}: {message}")
