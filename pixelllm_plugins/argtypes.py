"""argparse ``type=`` functions shared by ``pixelllm``'s subcommands: a bad value is a usage error (exit 2)
whose message says what is accepted. Numeric knobs with a project-wide range use ``bounds.argtype``."""

from __future__ import annotations

import argparse
import math
import reprlib

from .errors import InvalidParameterError


def short_repr(value, limit: int = 60) -> str:
    """A repr of a user's value for a message: never long, surrogates and control characters escaped."""
    shown = reprlib.Repr()
    shown.maxstring = shown.maxother = limit
    return shown.repr(value)


def int_arg(low: int | None = None, high: int | None = None):
    """An argparse ``type=`` for an integer within [low, high] (either end open when None)."""

    def parse(text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            value = None
        if value is None or (low is not None and value < low) or (high is not None and value > high):
            if high is None:
                wanted = f"an integer >= {low}" if low is not None else "an integer"
            else:
                wanted = f"an integer from {low} to {high}"
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {short_repr(text)}")
        return value

    parse.__name__ = "integer"
    return parse


def float_arg(low: float | None = None):
    """An argparse ``type=`` for a finite number >= low."""

    def parse(text: str) -> float:
        try:
            value = float(text.strip())
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or (low is not None and value < low):
            wanted = f"a number >= {low:g}" if low is not None else "a finite number"
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {short_repr(text)}")
        return value

    parse.__name__ = "number"
    return parse


def available_devices() -> list[str]:
    """The devices this machine has: cpu, then cuda:0 ... and mps when present."""
    import torch

    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        devices.append("mps")
    return devices


def check_device(text: str, *, allow_auto: bool = False) -> str:
    """``text`` if it names a device this machine has (``cuda`` stands for ``cuda:0``), else
    ``InvalidParameterError`` saying which devices exist."""
    import torch

    if allow_auto and text == "auto":
        return text
    here = available_devices()
    listed = ", ".join(here + (["cuda"] if len(here) > 1 and here[1].startswith("cuda") else []))
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        raise InvalidParameterError(f"unknown device {short_repr(text)}; devices here: {listed}") from None
    if device.type == "cpu":
        return text
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise InvalidParameterError(f"{short_repr(text)}: CUDA is not available on this machine; "
                                        f"devices here: {listed}")
        if device.index is not None and device.index >= count:
            raise InvalidParameterError(f"{short_repr(text)}: this machine has {count} CUDA device(s); "
                                        f"devices here: {listed}")
        return text
    if device.type == "mps" and "mps" in here:
        return text
    raise InvalidParameterError(f"device {short_repr(text)} is not available here; devices here: {listed}")


def device_arg(allow_auto: bool = False):
    """An argparse ``type=`` running :func:`check_device`."""

    def parse(text: str) -> str:
        try:
            return check_device(text, allow_auto=allow_auto)
        except InvalidParameterError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = "device"
    return parse


