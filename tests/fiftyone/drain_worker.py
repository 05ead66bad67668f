"""Subprocess for the resume test: drain a dataset's queued delegated runs (as `fiftyone delegated launch`
does) with a predictor that hangs once it has served ``stall_after`` batches, like a stuck GPU job.

Usage: python drain_worker.py DATASET_NAME STALL_AFTER FLAG_FILE
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

from fiftyone.operators.delegated import DelegatedOperationService
from fo_scenes import SegmentingFake

import pixelllm_plugins.integrations.fiftyone as pxfo

dataset_name, stall_after, flag = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])


class Stalling(SegmentingFake):
    def _maybe_stall(self):
        if len(self.calls) >= stall_after:
            flag.write_text(f"stalled after {len(self.calls)} batches")
            threading.Event().wait()  # hang until the test kills this process

    def refer(self, images, texts, **kw):
        self._maybe_stall()
        return super().refer(images, texts, **kw)

    def segment(self, images, *args, **kw):
        self._maybe_stall()
        return super().segment(images, *args, **kw)


predictor = Stalling()
pxfo.predictors.get_predictor = lambda model=None, **kw: predictor
DelegatedOperationService().execute_queued_operations(dataset_name=dataset_name)
