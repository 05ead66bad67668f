"""One table of bounds for every numeric knob a user can turn.

CLI flags, worker request fields, Label Studio config attributes and FiftyOne operator parameters all
check their values here, so a knob has the same range wherever it is set, and no entry point can ask for
a million proposals or a thousand beams.
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass

from .errors import InvalidParameterError


@dataclass(frozen=True)
class Bound:
    """The accepted range of one knob (both ends included) and what it means, for the error message."""

    low: float
    high: float
    integer: bool
    meaning: str

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a number"
        return f"{kind} from {_fmt(self.low)} to {_fmt(self.high)} ({self.meaning})"


# Dense captioning's defaults everywhere (CLI, worker, Label Studio, FiftyOne, Python). The proposal head's
# scores are heatmap peaks: on the embedded model every object scores about 0.15 to 0.25 and the rest
# under 0.02, so 0.1 keeps every object (12 test scenes: 46 of 46, no false region) where 0.3 kept none.
DEFAULT_MAX_REGIONS = 20
DEFAULT_MIN_SCORE = 0.1

BOUNDS: dict[str, Bound] = {
    "max_regions": Bound(1, 256, True, "regions kept per image by dense captioning"),
    "min_score": Bound(0.0, 1.0, False, "the lowest score a region or box is kept with"),
    "score_threshold": Bound(0.0, 1.0, False, "the lowest score a suggestion is kept with"),
    "num_beams": Bound(1, 8, True, "beam size for generated text; 1 is greedy"),
    "max_new_tokens": Bound(1, 128, True, "tokens generated per caption"),
    "max_boxes": Bound(1, 128, True, "boxes per image"),
    "max_texts": Bound(1, 32, True, "referring expressions per image"),
    "max_text_chars": Bound(1, 2000, True, "characters of one referring expression"),
    "batch_size": Bound(1, 256, True, "images per model call"),
    # the Label Studio backend's environment (label_studio_backend/settings.py)
    "fetch_timeout_s": Bound(0.1, 600, False, "seconds to download one image"),
    "predict_budget_s": Bound(1, 3600, False, "seconds one /predict call may take"),
    "fetch_workers": Bound(1, 64, True, "parallel image downloads"),
    "train_steps": Bound(0, 100_000, True, "fine-tune steps per round; 0 picks them from the annotations"),
    "train_replay": Bound(0.0, 0.9, False, "share of synthetic base scenes among a round's training images"),
    "train_min_annotations": Bound(1, 1_000_000, True, "new annotations before a round starts"),
    "max_request_bytes": Bound(1024, 2 ** 31, True, "bytes of one request body"),
    "max_prompt_chars": Bound(1, 100_000, True, "characters of one prompt"),
    "decode_budget_bytes": Bound(64 * 1024 ** 2, 64 * 1024 ** 3, True,
                                 "bytes that images being decoded at once may take"),
    # image and batch-file limits (PIXELLLM_MAX_PIXELS, PIXELLLM_MAX_IMAGE_BYTES, PIXELLLM_MAX_BATCH_BYTES)
    "max_pixels": Bound(1, 10 ** 10, True, "pixels of one image"),
    "max_image_bytes": Bound(1, 2 ** 34, True, "bytes of one image file"),
    "max_batch_bytes": Bound(1, 2 ** 38, True, "bytes of one --batch file"),
}


def _fmt(x: float) -> str:
    return f"{int(x):,}" if float(x).is_integer() else f"{x:g}"


def check(name: str, value: object, *, label: str | None = None) -> int | float:
    """``value`` as a number within ``BOUNDS[name]``; else ``InvalidParameterError`` naming the range.

    ``label`` names the knob as its user set it (``--max-regions``, ``<RectangleLabels> model_max_regions``).
    Accepts numbers and numeric strings (config attributes and form fields arrive as text); refuses
    booleans, NaN and infinities.
    """
    bound = BOUNDS[name]
    label = label or name
    number: float
    if isinstance(value, bool) or value is None:
        number = math.nan
    elif isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            number = math.nan
    else:
        number = math.nan
    ok = math.isfinite(number) and bound.low <= number <= bound.high
    if ok and bound.integer and number != int(number):
        ok = False
    if not ok:
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        raise InvalidParameterError(f"{label} must be {bound.describe()}, got {shown}")
    return int(number) if bound.integer else number


def argtype(name: str):
    """An argparse ``type=`` that checks the flag against the table (argparse then says which flag)."""

    def parse(text: str):
        try:
            return check(name, text)
        except InvalidParameterError as exc:
            raise argparse.ArgumentTypeError(str(exc).replace(f"{name} must be", "must be")) from None

    parse.__name__ = name  # argparse names the type in its message
    return parse


def from_env(variable: str, knob: str, default: float) -> int | float:
    """Environment variable ``variable`` checked against ``BOUNDS[knob]``; ``default`` when it is unset or
    empty. A bad value raises ``InvalidParameterError`` naming the variable, its range and the default."""
    raw = os.environ.get(variable, "").strip()
    if not raw:
        return default
    try:
        return check(knob, raw, label=variable)
    except InvalidParameterError as exc:
        raise InvalidParameterError(f"{exc}; fix it or unset it for the default {_fmt(default)}") from None
