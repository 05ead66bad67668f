"""Learning from labels through FiftyOne: the ``finetune`` operator's round on N labelled pentagon scenes.

Not part of the suite (the file name keeps it out of collection); it uses the suite's real MongoDB
set-up. Run it by path::

    python -m pytest tests/fiftyone/fo_learning_curve.py -q -s

For each N (``PIXELLLM_FO_CURVE_N``, default "8 32"), a dataset of N synthetic scenes whose referring
expression targets a pentagon (the shape the embedded model never saw), one detection each (the
pentagon's box, labelled with the expression), goes through ``run_finetune`` (what the operator runs) over
the embedded model. The version it then serves (the new adapter if the gate kept it, else the base) and
the base are scored on held-out pentagon scenes (``PIXELLLM_FO_CURVE_EVAL``, default 150; the same seeds
as ``scripts/learning_curve.py``). Prints JSON and writes ``PIXELLLM_FO_CURVE_OUT`` when set.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_fo_learning_curve(tmp_path, monkeypatch):
    import fiftyone as fo
    import torch

    sys.path.insert(0, str(ROOT / "scripts"))
    from learning_curve import write_concept

    from pixelllm_plugins.checkpoint import DEFAULT_MODEL_DIR
    from pixelllm_plugins.data.formats import concept_scenes, renderer_for
    from pixelllm_plugins.evaluation.evaluate import eval_refer, load_task_samples
    from pixelllm_plugins.inference.predictor import Predictor
    from pixelllm_plugins.integrations import fiftyone as pxfo
    from pixelllm_plugins.integrations.fiftyone.finetune import adapters_dir

    monkeypatch.setenv("PIXELLLM_FO_ADAPTER_DIR", str(tmp_path / "adapters"))
    monkeypatch.setenv("PIXELLLM_REPLAY_DIR", str(tmp_path / "replay"))
    ns = [int(n) for n in os.environ.get("PIXELLLM_FO_CURVE_N", "8 32").split()]
    n_eval = int(os.environ.get("PIXELLLM_FO_CURVE_EVAL", "150"))
    write_concept(concept_scenes("pentagon", n_eval, 900_000, "varied"), tmp_path / "eval", "newconcept", with_vg=False)
    held_out = load_task_samples(tmp_path / "eval", "newconcept", "refer")
    predictor = Predictor(str(DEFAULT_MODEL_DIR), device="cpu", dtype=torch.float32)
    base = eval_refer(predictor, held_out, batch_size=8)
    report = {"base": {"P@0.5": round(base["P@0.5"], 4), "score_ECE": round(base["score_ECE"], 4)},
              "held_out": len(held_out), "rows": []}
    render = renderer_for("train").render
    pool = concept_scenes("pentagon", max(ns), 500_000, "varied")
    for n in ns:
        images = tmp_path / f"labels-{n}"
        images.mkdir()
        samples = []
        for i, (a, text, (x0, y0, x1, y1)) in enumerate(pool[:n]):
            path = images / f"{i:04d}.png"
            render(a.scene).save(path)
            w, h = a.scene.width, a.scene.height
            box = [x0 / w, y0 / h, (x1 - x0) / w, (y1 - y0) / h]
            samples.append(fo.Sample(filepath=str(path), ground_truth=fo.Detections(
                detections=[fo.Detection(label=text, bounding_box=box)])))
        dataset = fo.Dataset(f"pixelllm-curve-{n}-{uuid.uuid4().hex[:6]}")
        dataset.add_samples(samples)
        started = time.time()
        summary = pxfo.run_finetune(dataset, label_field="ground_truth", name=f"penta{n}",
                                    model=str(DEFAULT_MODEL_DIR))
        seconds = round(time.time() - started, 1)
        served = str(adapters_dir() / summary.adapter) if summary.accepted and summary.adapter else None
        after = eval_refer(predictor, held_out, batch_size=8, adapter=served) if served else base
        report["rows"].append({"n": n, "accepted": summary.accepted, "gate": summary.gate,
                               "new_words": summary.round.get("new_words"), "seconds": seconds,
                               "P@0.5": round(after["P@0.5"], 4), "score_ECE": round(after["score_ECE"], 4)})
        dataset.delete()
    print(json.dumps(report, indent=1))
    if os.environ.get("PIXELLLM_FO_CURVE_OUT"):
        Path(os.environ["PIXELLLM_FO_CURVE_OUT"]).write_text(json.dumps(report, indent=1) + "\n")
    assert all(row["P@0.5"] >= report["base"]["P@0.5"] for row in report["rows"])
