"""Does learning from annotations help? N corrections on a new kind of object, through the backend's real path.

Scenes from the project's synthetic generator with a shape the base model never saw as a target
(``pentagon`` by default). For held-out scenes, the backend's ``/predict`` boxes for the pentagon's referring
expression are scored against the ground truth (mean IoU, P@0.5) before and after N annotations of that kind
arrive through ``/webhook`` and the background fine-tune (``pixelllm_plugins.training.finetune``) finishes.

    python tests/label_studio/learning_curve.py --base CHECKPOINT_DIR --n 8 16 32 --steps 100 --eval 24

Without ``--base`` a random ``tiny`` checkpoint is written and used (then the numbers show that the pipeline
learns, not how good a trained model gets). Results are printed as JSON and written to
``artifacts/label_studio/learning_curve.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def scenes_with(shape: str, count: int, first_seed: int, width: int | None = None):
    """(image, expression, box_xyxy) for classic scenes whose referring expression targets ``shape``."""
    from pixelllm_plugins.data.formats import concept_scenes
    from pixelllm_plugins.data.synthetic import render_scene

    return [(render_scene(a.scene), text, box) for a, text, box in concept_scenes(shape, count, first_seed, "classic")]


def _iou(a, b) -> float:
    from pixelllm_plugins.geometry import iou

    return iou(a, b)


def score(client, tasks, gts, project="1.1") -> dict:
    from label_studio_backend import labeling_config
    from pixelllm_plugins.geometry import ls_percent_to_xyxy

    body = {"tasks": tasks, "project": project, "label_config": labeling_config("referring"),
            "params": {"context": None}}
    results = client.post("/predict", json=body).json()["results"]
    ious = []
    for pred, gt in zip(results, gts):
        rect = next((r for r in pred["result"] if r["type"] == "rectanglelabels"), None)
        if rect is None:
            ious.append(0.0)
            continue
        box = ls_percent_to_xyxy(rect["value"], rect["original_width"], rect["original_height"])
        ious.append(_iou(box, gt))
    return {"mean_iou": round(sum(ious) / len(ious), 4), "p_at_0.5": round(sum(i >= 0.5 for i in ious) / len(ious), 4),
            "model_version": results[0]["model_version"]}


def run(base: str, n: int, steps: int, n_eval: int, shape: str = "pentagon", workdir: Path | None = None,
        **settings) -> dict:
    """``settings``: more backend settings (e.g. ``train_replay=0``, ``train_gate=False``)."""
    from fastapi.testclient import TestClient

    from label_studio_backend import labeling_config
    from label_studio_backend.server import create_app
    from pixelllm_plugins.geometry import xyxy_to_ls_percent

    workdir = Path(workdir or tempfile.mkdtemp(prefix="ls-learning-"))
    images = workdir / "images"
    images.mkdir(parents=True, exist_ok=True)
    train = scenes_with(shape, n, first_seed=50_000)
    held_out = scenes_with(shape, n_eval, first_seed=90_000)

    def save(kind, i, image):
        path = images / f"{kind}{i}.png"
        image.save(path)
        return str(path)

    eval_tasks = [{"id": 10_000 + i, "data": {"image": save("eval", i, im), "expression": text}}
                  for i, (im, text, _) in enumerate(held_out)]
    gts = [box for _, _, box in held_out]
    app = create_app(model_dir=workdir / "model_dir", model=base, device="cpu",
                     local_roots=str(images), label_studio_url="", label_studio_api_key="", basic_auth_user="",
                     basic_auth_pass="", train_steps=steps, train_min_annotations=n, **settings)
    out = {"shape": shape, "n_corrections": n, "steps": steps, "n_eval": n_eval, "base": str(base)}
    with TestClient(app) as client:
        started = time.monotonic()
        out["before"] = score(client, eval_tasks, gts)
        out["predict_s"] = round(time.monotonic() - started, 2)  # boxes the held-out tasks (the model loaded at start-up)
        project = {"id": 1, "label_config": labeling_config("referring")}
        started = time.monotonic()
        for i, (im, text, box) in enumerate(train):
            w, h = im.size
            geom = {**xyxy_to_ls_percent(box, w, h), "rotation": 0}
            frame = {"original_width": w, "original_height": h, "image_rotation": 0}
            result = [{"id": "gt", "from_name": "label", "to_name": "image", "type": "rectanglelabels", **frame,
                       "value": {**geom, "rectanglelabels": ["object"]}},
                      {"id": "gt", "from_name": "caption", "to_name": "image", "type": "textarea", **frame,
                       "value": {**geom, "text": [text]}}]
            r = client.post("/webhook", json={"action": "ANNOTATION_CREATED", "project": project,
                                              "task": {"id": i + 1, "data": {"image": save("train", i, im),
                                                                             "expression": text}},
                                              "annotation": {"id": i + 1, "result": result}})
            assert r.status_code == 201, r.text
        runtime = app.state.runtime
        assert runtime.training.wait_idle(3600), "fine-tune did not finish"
        out["train_s"] = round(time.monotonic() - started, 1)
        state = runtime.training.state("1")
        if state.get("status") != "idle":
            raise RuntimeError(f"training failed: {state.get('last_error')}")
        out["round_s"] = state["history"][-1]["seconds"]  # the round alone (train_s also renders the replay)
        out["after"] = score(client, eval_tasks, gts)
    from pixelllm_plugins.predictors import release_predictors

    release_predictors()  # the next run's backend starts from the base model again
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default=None, help="checkpoint folder (default: a random tiny one)")
    parser.add_argument("--n", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--eval", type=int, default=24)
    parser.add_argument("--shape", default="pentagon")
    parser.add_argument("--out", default=str(ROOT / "artifacts" / "label_studio" / "learning_curve.json"))
    args = parser.parse_args(argv)
    base = args.base
    if base is None:
        import torch

        from pixelllm_plugins.checkpoint import load_pretrained, save_pretrained

        torch.manual_seed(0)
        model, tokenizer, _ = load_pretrained("tiny")
        base = tempfile.mkdtemp(prefix="tiny-base-")
        save_pretrained(model, tokenizer, base)
    rows = [run(base, n, args.steps, args.eval, args.shape) for n in args.n]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))
    json.dump(rows, sys.stdout, indent=1)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    raise SystemExit(main())
