"""Predictors for the process engine's tests; they run in the engine's child process.

``ProcessFake`` answers like ``FakePredictor``, plus, by referring text: ``crash`` exits the process (as an
out-of-memory kill would), ``bad`` raises a project error, ``odd`` raises an exception that cannot be
pickled. While the file named by ``PIXELLLM_TEST_GATE`` exists, calls wait (a gate across processes); each
call first creates ``<gate>.entered``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from fakes import FakePredictor

from pixelllm_plugins.errors import InvalidPromptError


class Unpicklable(Exception):
    def __init__(self, a, b):  # two required arguments: pickle cannot rebuild it from its args
        super().__init__(f"{a} and {b}")


class ProcessFake(FakePredictor):
    def __init__(self):
        super().__init__()
        self.model_version = f"fake-pid-{os.getpid()}"

    def refer(self, images, texts, *, adapter=None):
        gate = os.environ.get("PIXELLLM_TEST_GATE")
        if gate:
            Path(gate + ".entered").touch()
            deadline = time.monotonic() + 60
            while Path(gate).exists() and time.monotonic() < deadline:
                time.sleep(0.01)
        flat = [t for ts in texts for t in ts]
        if "crash" in flat:
            os._exit(3)
        if "bad" in flat:
            raise InvalidPromptError("bad prompt: describe the object")
        if "odd" in flat:
            raise Unpicklable("this", "that")
        return super().refer(images, texts, adapter=adapter)


class BrokenModel:
    def __init__(self):
        raise FileNotFoundError("no weights at /nowhere")
