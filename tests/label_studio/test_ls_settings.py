"""The backend's environment: numbers are checked against the one bounds table, and a bad one stops the
backend with a line that names the variable, its range and the default, instead of being replaced in
silence."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from label_studio_backend.settings import Settings
from pixelllm_plugins.errors import InvalidParameterError

NUMBERS = {
    "PIXELLLM_LS_FETCH_TIMEOUT": ("2.5", "fetch_timeout_s", 2.5), "PIXELLLM_LS_PREDICT_BUDGET": ("30", "predict_budget_s", 30),
    "PIXELLLM_LS_BATCH_SIZE": ("4", "batch_size", 4), "PIXELLLM_LS_FETCH_WORKERS": ("2", "fetch_workers", 2),
    "PIXELLLM_LS_TRAIN_STEPS": ("0", "train_steps", 0), "PIXELLLM_LS_TRAIN_REPLAY": ("0.25", "train_replay", 0.25),
    "PIXELLLM_LS_TRAIN_MIN_ANNOTATIONS": ("3", "train_min_annotations", 3),
    "PIXELLLM_LS_MAX_REQUEST_BYTES": ("4096", "max_request_bytes", 4096),
    "PIXELLLM_LS_MAX_PROMPT_CHARS": ("200", "max_prompt_chars", 200),
    "PIXELLLM_LS_DECODE_BUDGET_BYTES": (str(128 * 1024 ** 2), "decode_budget_bytes", 128 * 1024 ** 2),
}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in NUMBERS:
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("variable", sorted(NUMBERS))
def test_good_values_are_read_and_unset_or_empty_gives_the_default(monkeypatch, variable):
    raw, field, value = NUMBERS[variable]
    default = getattr(Settings(), field)
    monkeypatch.setenv(variable, f" {raw} ")
    got = getattr(Settings.from_env(), field)
    assert got == value and type(got) is type(default)
    monkeypatch.setenv(variable, "")
    assert getattr(Settings.from_env(), field) == default


@pytest.mark.parametrize("variable", sorted(NUMBERS))
@pytest.mark.parametrize("bad", ["abc", "nan", "inf", "-1", "1e12", "0x10"])
def test_bad_values_name_the_variable_its_range_and_the_default(monkeypatch, variable, bad):
    field = NUMBERS[variable][1]
    if bad == "-1" and field == "train_steps":
        bad = "-2"
    monkeypatch.setenv(variable, bad)
    with pytest.raises(InvalidParameterError, match=rf"{variable} must be an? (integer|number) from .* got "
                                                    rf"'{bad}'; fix it or unset it for the default"):
        Settings.from_env()


def test_a_fractional_count_is_refused(monkeypatch):
    monkeypatch.setenv("PIXELLLM_LS_BATCH_SIZE", "2.5")
    with pytest.raises(InvalidParameterError, match="PIXELLLM_LS_BATCH_SIZE must be an integer"):
        Settings.from_env()


def test_the_backend_command_stops_with_one_line(tmp_path):
    env = os.environ | {"PIXELLLM_LS_TRAIN_REPLAY": "2", "MODEL_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "pixelllm_plugins.cli", "ls-backend", "--port", "0", "--model",
                           "tiny"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        "error: PIXELLLM_LS_TRAIN_REPLAY must be a number from 0 to 0.9 (share of synthetic base scenes among a "
        "round's training images), got '2'; fix it or unset it for the default 0.5")
