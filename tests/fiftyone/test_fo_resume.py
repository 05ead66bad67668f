"""A delegated run whose worker dies mid-way is resumed: nothing written is lost, nothing is duplicated."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import fiftyone.operators as foo
import pytest
from fiftyone.operators.delegated import DelegatedOperationService

HERE = Path(__file__).resolve().parent
REFER = "@pixelllm/pixelllm/refer"


def _op_id(result):
    return result.result["id"] if isinstance(result.result, dict) else result.result.id


@pytest.mark.integration
def test_killed_delegated_run_resumes_without_loss_or_duplicates(plugin_installed, dataset, fake, tmp_path,
                                                                  fo_subprocess_env, poll):
    svc = DelegatedOperationService()
    queued = foo.execute_operator(REFER, ctx=dict(dataset=dataset, request_delegation=True,
                                                  params={"prompt_field": "refexp", "batch_size": 2}))
    op_id = _op_id(queued)
    flag = tmp_path / "stalled"
    worker = subprocess.Popen([sys.executable, str(HERE / "drain_worker.py"), dataset.name, "2", str(flag)],
                              env=fo_subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        poll(lambda: flag.exists() or worker.poll() is not None, 180, "the delegated worker to stall")
        assert flag.exists(), worker.communicate()[0].decode()[-3000:]
        # two batches of 2 were written before the hang; the run is still marked running
        doc = svc.get(op_id)
        assert doc.run_state == "running"
        assert doc.status.progress == pytest.approx(4 / 6) and doc.status.label == "4/6 samples"
    finally:
        worker.kill()  # the worker dies mid-run (SIGKILL: no cleanup, no state change)
        worker.wait(timeout=60)
    dataset.reload()
    written = {s.id: [d.id for d in s.pixelllm.detections] for s in dataset if s.pixelllm is not None}
    assert len(written) == 4

    # resume: mark the dead run failed (`fiftyone delegated fail ID`) and rerun it (`fiftyone delegated rerun`)
    svc.set_failed(op_id)
    rerun = svc.rerun_operation(op_id)
    (result,) = svc.execute_queued_operations(dataset_name=dataset.name)
    assert result.result["processed"] == 2 and result.result["skipped"] == 4 and result.result["failed"] == 0
    assert fake.calls == [("refer", 2)]  # only the samples the dead worker had not done
    assert svc.get(rerun.id).run_state == "completed" and svc.get(rerun.id).status.progress == 1.0

    dataset.reload()
    for sample in dataset:
        (det,) = sample.pixelllm.detections  # exactly one box per sample: nothing lost, nothing duplicated
        assert det.prompt == sample.refexp
        if sample.id in written:
            assert [det.id] == written[sample.id]  # labels written before the crash are kept as they were
