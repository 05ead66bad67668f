"""Learning from annotations: a background fine-tune queue with per-project LoRA adapters.

``fit()`` only records annotations and enqueues; one worker thread does the slow part:

1. (``START_TRAINING``) pull the project's labeled tasks through the Label Studio API;
2. convert every stored annotation into the project's data formats, in
   ``MODEL_DIR/projects/<id>/datasets/<adapter>/``:
   ``refcoco_train.json`` (MDETR-style RefCOCO: text -> box) and ``vg_train.json`` (GRiT / Visual Genome:
   box -> caption), images under ``images/train/`` (the layout ``pixelllm_plugins`` trains from);
3. run a gated correction round (``pixelllm_plugins.training.corrections.run_correction_round``): a
   seeded slice of the annotated images is held out, the rest plus replay of synthetic base scenes (cached
   in ``MODEL_DIR/replay/``) train a LoRA adapter in ``MODEL_DIR/adapters/ls-p<id>-ft<N>/`` (a flat folder,
   so a GPU worker can share it as ``PIXELLLM_WORKER_ADAPTER_DIR``; rank, steps and learning rate from the
   number of annotations), and the new adapter and the current version are scored on the held-out slice;
4. an accepted round is recorded in ``projects/<id>/state.json``: the project's ``model_version`` becomes
   ``<base>+ls-p<id>-ft<N>`` and Label Studio re-predicts. A rejected round (its held-out refer P@0.5 is
   below the current version's, or it lost more than the tolerance on the retention slice of base scenes) is
   deleted and the version stays; ``last_round`` in ``/health`` has the scores.

With an injected ``trainer`` (tests) the round is ungated by default (``gate=None``): the trainer gets the
annotations' folder as before and its adapter becomes the version.

Failures are logged and kept in the state (``/health`` shows them); they never reach the server.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import os
import queue
import shutil
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from pixelllm_plugins.tokenizer import is_valid_unicode

from .convert import masks_from_results, regions_from_results, texts_from_results
from .label_config import LabelConfigError, parse_label_config

log = logging.getLogger(__name__)

Trainer = Callable[..., object]
SPLIT = "train"  # datasets/<adapter>/{refcoco,vg}_train.json + images/train/, the trainer's layout
ImageLoader = Callable[..., Image.Image]

_ANN_EVENTS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_CREATED")
_DEL_EVENTS = ("ANNOTATION_DELETED", "ANNOTATIONS_DELETED")
_REPLAY_JOB = "<replay>"  # the queue item that renders the gated round's replay scenes (never a project id)


def default_trainer(*, from_model, data_dir, out_adapter, steps, **kwargs):
    """The project's LoRA fine-tune, ``pixelllm_plugins.training.finetune.finetune`` (imported lazily:
    training code is heavy), in a fresh process when called from the training thread (``finetune_isolated``).
    ``from_model=None`` means the embedded default checkpoint."""
    from pixelllm_plugins.training.finetune import finetune
    from pixelllm_plugins.training.isolated import finetune_isolated

    if from_model is None:
        from pixelllm_plugins.checkpoint import DEFAULT_MODEL_DIR

        from_model = DEFAULT_MODEL_DIR
    from pixelllm_plugins.training.trainer import TrainConfig

    # finetune's own arguments and the TrainConfig fields it passes on (the round's lr_multipliers, its
    # image-embedding cache, ...); others (adapter_name) are the backend's
    accepted = set(inspect.signature(finetune).parameters) | {f.name for f in dataclasses.fields(TrainConfig)}
    # the run folder (checkpoints, metrics) stays with the dataset, not among the adapters a worker scans
    defaults = {"progress": False, "split": SPLIT, "work_dir": Path(data_dir) / "run"}
    extra = {k: v for k, v in {**defaults, **kwargs}.items() if k in accepted}
    return finetune_isolated(from_model, data_dir, out_adapter, steps=steps, **extra)


def adapter_name(project_id: str, round_: int) -> str:
    return f"ls-p{project_id}-ft{round_}"


@dataclass
class Example:
    """One image with boxes and texts, from one annotation."""

    file_name: str
    width: int
    height: int
    refer: list[tuple[str, tuple[float, float, float, float]]]  # (expression, box xyxy)
    captions: list[tuple[str, tuple[float, float, float, float]]]  # (caption, box xyxy)
    # (expression, box xyxy of the mask, COCO RLE of the mask at width x height): polygons and brush masks
    segments: list[tuple[str, tuple[float, float, float, float], dict]] = dataclasses.field(default_factory=list)


def write_datasets(examples: list[Example], data_dir: Path) -> dict[str, int]:
    """MDETR-style RefCOCO json (one image record per expression) and GRiT/VG json, as
    ``refcoco_train.json`` / ``vg_train.json`` next to ``images/train/`` (files with no annotation are not
    written: the trainer skips missing sources)."""
    # imported here: the data package loads torch, which a backend serving through a worker never needs
    from pixelllm_plugins.data.formats import (
        OBJECT_CATEGORIES,
        refcoco_entry,
        vg_region,
        write_refer_and_regions,
    )
    from pixelllm_plugins.masks import rle_area

    ref_images, ref_anns, vg_images, vg_anns = [], [], [], []
    for i, ex in enumerate(examples, start=1):
        entry = {"file_name": ex.file_name, "width": ex.width, "height": ex.height}
        for k, (text, box) in enumerate(ex.refer):
            record, annotation = refcoco_entry(entry, i * 1000 + k, text, box, original_img_id=i, sentence_id=k,
                                               dataset_name="label_studio")
            ref_images.append(record)
            ref_anns.append(annotation)
        for k, (text, box, rle) in enumerate(ex.segments, start=len(ex.refer)):
            record, annotation = refcoco_entry(entry, i * 1000 + k, text, box, original_img_id=i, sentence_id=k,
                                               dataset_name="label_studio", segmentation=rle, area=rle_area(rle))
            ref_images.append(record)
            ref_anns.append(annotation)
        if ex.captions:
            vg_images.append(entry | {"id": i})
            vg_anns += [vg_region(i * 1000 + k, i, box, text) for k, (text, box) in enumerate(ex.captions)]
    categories = OBJECT_CATEGORIES
    write_refer_and_regions(data_dir, SPLIT, (ref_images, ref_anns), (vg_images, vg_anns), categories)
    return {"refer": len(ref_anns), "captions": len(vg_anns), "images": len(examples),
            "masks": sum(len(ex.segments) for ex in examples)}


def examples_from_annotation(record: dict) -> tuple[dict, list[tuple[str, list]], list[tuple[str, list]]]:
    """(task, refer pairs, caption pairs) of one stored annotation, boxes in pixels of the image as
    Label Studio saw it (``original_width/height``). The referring text of a box is its per-region
    caption, else the task's ``<Text>`` expression / the typed prompt when the annotation has one box.
    Masks (polygons, brush): :func:`mask_examples_from_annotation`."""
    task = record.get("task") or {}
    annotation = record.get("annotation") or {}
    results = annotation.get("result") or []
    regions = regions_from_results(results)
    expression_texts: list[str] = []
    try:
        cfg = parse_label_config(record.get("label_config"))
    except LabelConfigError:
        cfg = None
    if cfg is not None:
        obj = cfg.expression_object
        data = task.get("data") if isinstance(task.get("data"), dict) else {}
        if obj is not None and isinstance(data.get(obj.value), str) and data[obj.value].strip():
            expression_texts.append(data[obj.value].strip())
        prompt = cfg.prompt_control
        if prompt is not None:
            expression_texts += texts_from_results(results, [prompt.name])
    refer, captions = [], []
    for r in regions:
        if r.caption:
            captions.append((r.caption, r.box_xyxy))
            refer.append((r.caption, r.box_xyxy))
        elif expression_texts and len(regions) == 1:
            refer.append((expression_texts[-1], r.box_xyxy))
    return task, refer, captions


def _expression_texts(record: dict, results: list) -> list[str]:
    task = record.get("task") if isinstance(record.get("task"), dict) else {}
    try:
        cfg = parse_label_config(record.get("label_config"))
    except LabelConfigError:
        return []
    texts: list[str] = []
    obj = cfg.expression_object
    data = task.get("data") if isinstance(task.get("data"), dict) else {}
    if obj is not None and isinstance(data.get(obj.value), str) and data[obj.value].strip():
        texts += [line.strip() for line in data[obj.value].splitlines() if line.strip()]
    prompt = cfg.prompt_control
    if prompt is not None:
        texts += texts_from_results(results, [prompt.name])
    return texts


def mask_examples_from_annotation(record: dict, errors: list[str] | None = None
                                  ) -> list[tuple[str, tuple[float, float, float, float], dict]]:
    """(text, box xyxy, COCO RLE) per mask of one stored annotation, at the size Label Studio saw the image
    (``original_width/height``). A polygon or brush region with its own per-region caption is that caption's
    mask; the regions without one are, together, the mask of the task's referring expression (several parts
    of one object are several polygons), when the task has exactly one expression (or typed prompt).
    Malformed regions are skipped, their messages appended to ``errors``."""
    from pixelllm_plugins.masks import mask_to_rle

    annotation = record.get("annotation") if isinstance(record.get("annotation"), dict) else {}
    results = annotation.get("result")
    masks = masks_from_results(results, errors=errors)
    out = []
    loose = []
    for m in masks:
        if m.caption:
            out.append((m.caption, m.box_xyxy, mask_to_rle(m.mask)))
        else:
            loose.append(m)
    if loose:
        texts = list(dict.fromkeys(_expression_texts(record, results if isinstance(results, list) else [])))
        sizes = {(m.width, m.height) for m in loose}
        if len(texts) != 1:
            if errors is not None:
                errors.append(f"{len(loose)} mask region(s) without a caption, and the task has {len(texts)} "
                              "referring expressions (needs exactly one): not used")
        elif len(sizes) != 1:
            if errors is not None:
                errors.append("mask regions of one annotation give different image sizes: not used")
        else:
            import numpy as np

            union = np.logical_or.reduce([m.mask for m in loose])
            from pixelllm_plugins.masks import mask_to_box

            out.append((texts[0], mask_to_box(union), mask_to_rle(union)))
    return out


class TrainingManager:
    """Per-project annotation store, training queue and adapter versions (thread-safe)."""

    def __init__(self, model_dir: str | Path, *, trainer: Trainer | None = None, base_model: str | None = None,
                 steps: int = 0, min_annotations: int = 1, image_loader: ImageLoader | None = None,
                 client_factory: Callable[[], object] | None = None, on_new_adapter: Callable | None = None,
                 validate_adapter: Callable[[str, str], object] | None = None, gate: bool | None = None,
                 evaluator: Callable | None = None, holdout_fraction: float = 0.25, replay: float = 0.5,
                 replay_dir: str | Path | None = None):
        """``steps`` 0: chosen per round (``corrections.plan_round``; 200 ungated). ``gate``: run gated
        correction rounds (default: only with the default trainer); ``evaluator``, ``holdout_fraction``,
        ``replay``, ``replay_dir`` (default ``MODEL_DIR/replay``): passed to ``run_correction_round``."""
        self.root = Path(model_dir)
        self.adapters_dir = self.root / "adapters"
        self.trainer = trainer or default_trainer
        self.base_model = base_model
        self.steps = steps
        self.min_annotations = min_annotations
        self.image_loader = image_loader
        self.client_factory = client_factory
        self.on_new_adapter = on_new_adapter
        self.validate_adapter = validate_adapter
        self.gate = trainer is None if gate is None else bool(gate)
        self.evaluator = evaluator
        self.holdout_fraction = holdout_fraction
        self.replay = replay
        self.replay_dir = Path(replay_dir) if replay_dir is not None else self.root / "replay"
        self._lock = threading.RLock()
        self._idle = threading.Condition(self._lock)
        self._queue: queue.Queue[tuple[str, bool] | None] = queue.Queue()
        self._queued: dict[str, bool] = {}  # project -> pull requested
        self._running: str | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        self._replay_ready = False

    # ------------------------------------------------------------------ state
    def _pdir(self, pid: str) -> Path:
        return self.root / "projects" / pid

    def state(self, pid: str) -> dict:
        path = self._pdir(pid) / "state.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return {"round": 0, "adapter": None, "status": "idle", "last_error": None, "pending": 0,
                    "history": []}

    def _save_state(self, pid: str, state: dict) -> None:
        path = self._pdir(pid) / "state.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, path)

    def _update(self, pid: str, **changes) -> dict:
        with self._lock:
            state = self.state(pid)
            state.update(changes)
            self._save_state(pid, state)
            return state

    def adapter(self, pid: str | None) -> tuple[str, str] | None:
        """(name, path) of the project's current adapter, or None for the base model."""
        if not pid:
            return None
        state = self.state(pid)
        name = state.get("adapter")
        if not name:
            return None
        path = self.adapters_dir / name
        return (name, str(path)) if path.is_dir() else None

    def versions(self, pid: str | None) -> list[str]:
        return [h["adapter"] for h in self.state(pid).get("history", []) if h.get("adapter")] if pid else []

    def status(self) -> dict:
        """Per-project training status for ``/health``."""
        out = {}
        projects = self.root / "projects"
        if projects.is_dir():
            for p in sorted(projects.iterdir()):
                if (p / "state.json").is_file():
                    s = self.state(p.name)
                    out[p.name] = {k: s.get(k) for k in ("status", "round", "adapter", "last_error", "pending",
                                                         "examples", "last_round")}
        return out

    # ------------------------------------------------------------------ annotations
    def record(self, pid: str, task: dict, annotation: dict, label_config: str | None) -> bool:
        """Store (or replace) one annotation; cancelled/empty ones are removed. True if stored."""
        if not isinstance(annotation, dict) or not isinstance(task, dict):
            return False
        ann_id = annotation.get("id", "")
        ann_id = str(ann_id) if isinstance(ann_id, (int, str)) and not isinstance(ann_id, bool) else ""
        if not ann_id.isdigit() or not ann_id.isascii():
            return False
        path = self._pdir(pid) / "annotations" / f"{ann_id}.json"
        if annotation.get("was_cancelled") or not annotation.get("result"):
            path.unlink(missing_ok=True)
            return False
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {"task": {"id": task.get("id"), "data": task.get("data")},
                  "annotation": {"id": annotation.get("id"), "result": annotation.get("result"),
                                 "updated_at": annotation.get("updated_at")},
                  "label_config": label_config}
        with self._lock:
            path.write_text(json.dumps(record))
            state = self.state(pid)
            state["pending"] = int(state.get("pending", 0)) + 1
            self._save_state(pid, state)
        return True

    def delete(self, pid: str, annotation_ids) -> int:
        n = 0
        for a in annotation_ids if isinstance(annotation_ids, list) else []:
            ann_id = a.get("id") if isinstance(a, dict) else a
            ann_id = str(ann_id) if isinstance(ann_id, (int, str)) and not isinstance(ann_id, bool) else ""
            if ann_id.isdigit() and ann_id.isascii():
                path = self._pdir(pid) / "annotations" / f"{ann_id}.json"
                if path.is_file():
                    path.unlink()
                    n += 1
        return n

    def label_config(self, pid: str) -> str | None:
        try:
            return (self._pdir(pid) / "label_config.xml").read_text()
        except OSError:
            return None

    def handle_event(self, pid: str, event: str, data: dict, label_config: str | None) -> dict:
        """Apply one webhook event; enqueue training when there is enough new data. Returns at once."""
        if not isinstance(label_config, str) or not is_valid_unicode(label_config):
            label_config = None  # not text, or not valid Unicode (a lone surrogate): not stored
        if label_config and label_config.strip() and label_config != self.label_config(pid):
            self._pdir(pid).mkdir(parents=True, exist_ok=True)
            (self._pdir(pid) / "label_config.xml").write_text(label_config)
        label_config = label_config or self.label_config(pid)
        if event in _ANN_EVENTS:
            anns = data.get("annotation")
            tasks = data.get("task")
            pairs = list(zip(anns, tasks)) if isinstance(anns, list) and isinstance(tasks, list) else [(anns, tasks)]
            stored = sum(self.record(pid, t, a, label_config) for a, t in pairs)
            if stored:
                self._prepare_replay()
            pending = int(self.state(pid).get("pending", 0))
            queued = stored > 0 and pending >= self.min_annotations and self.request(pid)
            return {"stored": stored, "pending": pending, "queued": bool(queued)}
        if event in _DEL_EVENTS:
            return {"deleted": self.delete(pid, data.get("annotations") or [data.get("annotation")])}
        if event == "START_TRAINING":
            return {"queued": self.request(pid, pull=True)}
        return {"ignored": event}

    # ------------------------------------------------------------------ queue
    def request(self, pid: str, *, pull: bool = False) -> bool:
        """Enqueue a fine-tune of the project (coalesced: one queued round per project)."""
        with self._lock:
            if self._closed:
                return False
            self._ensure_thread()
            if pid in self._queued:
                self._queued[pid] = self._queued[pid] or pull
                return True
            self._queued[pid] = pull
            state = self.state(pid)
            if state.get("status") != "running":
                state["status"] = "queued"
                self._save_state(pid, state)
        self._queue.put((pid, pull))
        return True

    def _prepare_replay(self) -> None:
        """Queue the rendering of the gated rounds' replay scenes once, at the first stored annotation: a
        labeller takes minutes to correct enough tasks for a round, so the round need not render them."""
        if not self.gate or self.replay <= 0:
            return
        with self._lock:
            if self._replay_ready or self._closed or _REPLAY_JOB in self._queued:
                return
            self._ensure_thread()
            self._queued[_REPLAY_JOB] = False
        self._queue.put((_REPLAY_JOB, False))

    def _render_replay(self) -> None:
        from pixelllm_plugins.training.corrections import prepare_replay

        try:
            prepare_replay(self.replay_dir)
            self._replay_ready = True
        except Exception as exc:  # noqa: BLE001 - the round renders them itself and reports what fails
            log.warning("could not render the replay scenes ahead of the first round: %s", exc)

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, name="pixelllm-ls-fit", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            pid, _ = item
            with self._lock:
                pull = self._queued.pop(pid, False)
                self._running = pid
            try:
                if pid == _REPLAY_JOB:
                    self._render_replay()
                else:
                    self._train(pid, pull)
            except BaseException:  # noqa: BLE001 - the server must survive any training failure
                log.error("training of project %s crashed:\n%s", pid, traceback.format_exc())
            finally:
                with self._lock:
                    self._running = None
                    self._idle.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Block until nothing is queued or running (tests, shutdown); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._queued or self._running is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(min(left, 0.5))
        return True

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self._queue.put(None)

    # ------------------------------------------------------------------ one training round
    def _train(self, pid: str, pull: bool) -> None:
        started = time.time()
        state = self._update(pid, status="running", last_error=None, started_at=started)
        round_ = int(state.get("round", 0)) + 1
        name = adapter_name(pid, round_)
        data_dir = self._pdir(pid) / "datasets" / name
        out_dir = self.adapters_dir / name
        try:
            if pull:
                self._pull(pid)
            examples = self._build_examples(pid, data_dir)
            if not examples:
                raise ValueError("no usable annotations: annotate boxes or masks (polygons, brush) with a caption, or "
                                 "on tasks with a referring expression, then train again")
            counts = write_datasets(examples, data_dir)
            pending_before = int(self.state(pid).get("pending", 0))
            if out_dir.exists():
                shutil.rmtree(out_dir)
            out_dir.parent.mkdir(parents=True, exist_ok=True)
            log.info("project %s: fine-tuning %s on %s", pid, name, counts)
            last_round = None
            if self.gate:
                result = self._gated_round(pid, name, data_dir, out_dir, round_)
                last_round = {"round": round_, "candidate": name, **result.to_dict()}
                last_round.pop("adapter", None)
                if not result.accepted:
                    shutil.rmtree(out_dir, ignore_errors=True)  # never served, never listed as a version
            else:
                self.trainer(from_model=self.base_model, data_dir=data_dir, out_adapter=out_dir,
                             steps=self.steps or 200, adapter_name=name)
            accepted = last_round is None or last_round["accepted"]
            if accepted and not out_dir.is_dir():
                raise RuntimeError(f"the trainer finished but wrote no adapter at {out_dir}")
            if accepted and self.validate_adapter is not None:  # load it now: a broken one never becomes the version
                self.validate_adapter(name, str(out_dir))
        except Exception as exc:  # noqa: BLE001
            log.error("project %s: training round %d failed: %s\n%s", pid, round_, exc, traceback.format_exc())
            self._update(pid, status="failed", last_error=f"{type(exc).__name__}: {exc}", finished_at=time.time())
            return
        with self._lock:
            state = self.state(pid)
            entry = {"round": round_, "adapter": name if accepted else None, "examples": counts,
                     "seconds": round(time.time() - started, 2)}
            if last_round is not None:
                entry.update(gate=last_round["gate"], new_score=last_round["new_score"],
                             current_score=last_round["current_score"])
            changes = dict(status="idle", last_error=None, history=list(state.get("history", [])) + [entry],
                           examples=counts, finished_at=time.time(), last_round=last_round,
                           pending=max(0, int(state.get("pending", 0)) - pending_before))
            if accepted:
                changes.update(round=round_, adapter=name)
            state.update(changes)
            self._save_state(pid, state)
        if not accepted:
            log.warning("project %s: round %d rejected (%s), the version stays %s: held-out refer P@0.5 new %.3f vs "
                        "current %.3f on %d expressions, retention new %s vs current %s", pid, round_,
                        last_round["reason"], state.get("adapter") or "the base", last_round["new_score"],
                        last_round["current_score"], last_round["holdout"]["refer"], last_round["new_retention"],
                        last_round["current_retention"])
            return
        log.info("project %s: adapter %s ready (%.1f s)", pid, name, time.time() - started)
        if self.on_new_adapter is not None:
            try:
                self.on_new_adapter(pid, name, str(out_dir))
            except Exception:  # noqa: BLE001
                log.exception("project %s: new-adapter callback failed", pid)

    def _gated_round(self, pid: str, name: str, data_dir: Path, out_dir: Path, round_: int):
        """One ``run_correction_round`` against the project's current version (the core's gate); with the
        default trainer and evaluator, the whole round runs in a child process (``training.isolated``), so
        no torch work of training happens on the server's threads."""
        from pixelllm_plugins.training.isolated import correction_round_isolated

        base = self.base_model
        if base is None:
            from pixelllm_plugins.checkpoint import DEFAULT_MODEL_DIR

            base = DEFAULT_MODEL_DIR
        current = self.adapter(pid)
        settings = dict(current_adapter=current[1] if current else None, holdout_fraction=self.holdout_fraction,
                        replay=self.replay, seed=round_, split=SPLIT, replay_dir=self.replay_dir,
                        steps=self.steps or None, work_dir=data_dir / "round")
        trainer = None
        if self.trainer is not default_trainer:
            def trainer(**kwargs):
                return self.trainer(adapter_name=name, **kwargs)

        result = correction_round_isolated(base, data_dir, out_dir, trainer=trainer, evaluator=self.evaluator,
                                           **settings)
        log.info("project %s: round %d %s", pid, round_, result.summary())
        return result

    def _pull(self, pid: str) -> None:
        if self.client_factory is None:
            return
        client = self.client_factory()
        if client is None:
            log.warning("project %s: START_TRAINING without LABEL_STUDIO_URL/LABEL_STUDIO_API_KEY: training on "
                        "the annotations received through webhooks only", pid)
            return
        tasks = client.labeled_tasks(pid)
        label_config = self.label_config(pid)
        for task in tasks:
            anns = [a for a in task.get("annotations", []) if isinstance(a, dict) and not a.get("was_cancelled")]
            if anns:
                latest = max(anns, key=lambda a: str(a.get("updated_at") or a.get("created_at") or ""))
                self.record(pid, task, latest, label_config)

    def _build_examples(self, pid: str, data_dir: Path) -> list[Example]:
        if data_dir.exists():
            shutil.rmtree(data_dir)
        (data_dir / "images" / SPLIT).mkdir(parents=True)
        examples = []
        for f in sorted((self._pdir(pid) / "annotations").glob("*.json")):
            try:
                record = json.loads(f.read_text())
                task, refer, captions = examples_from_annotation(record)
                problems: list[str] = []
                segments = mask_examples_from_annotation(record, problems)
                for problem in problems:
                    log.warning("project %s: annotation %s: %s", pid, f.stem, problem)
                if not refer and not captions and not segments:
                    continue
                image = self._load_image(record, task)
            except Exception as exc:  # noqa: BLE001 - one bad annotation must not stop the round
                log.warning("project %s: skipping annotation %s: %s", pid, f.stem, exc)
                continue
            file_name = f"{f.stem}.png"
            image.save(data_dir / "images" / SPLIT / file_name)
            w, h = image.size
            scale = self._scale(record, w, h)
            examples.append(Example(file_name, w, h, [(t, _scaled(b, scale)) for t, b in refer],
                                    [(t, _scaled(b, scale)) for t, b in captions],
                                    [(t, _scaled(b, scale), _resized_rle(rle, w, h)) for t, b, rle in segments]))
        return examples

    def _load_image(self, record: dict, task: dict) -> Image.Image:
        if self.image_loader is None:
            raise RuntimeError("no image loader configured")
        cfg = parse_label_config(record.get("label_config"))
        data = task.get("data") or {}
        ref = data.get(cfg.image.value) if cfg.image is not None else None
        return self.image_loader(ref, task_id=task.get("id"))

    @staticmethod
    def _scale(record: dict, w: int, h: int) -> tuple[float, float]:
        """Boxes were read at ``original_width/height``; rescale if the fetched image differs."""
        for r in (record.get("annotation") or {}).get("result") or []:
            if isinstance(r, dict) and r.get("original_width") and r.get("original_height"):
                try:
                    return w / float(r["original_width"]), h / float(r["original_height"])
                except (TypeError, ValueError, ZeroDivisionError):
                    break
        return 1.0, 1.0


def _scaled(box, scale) -> tuple[float, float, float, float]:
    sx, sy = scale
    return (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)


def _resized_rle(rle: dict, w: int, h: int) -> dict:
    """A COCO RLE at the fetched image's size (nearest), when Label Studio saw the image at another size."""
    from pixelllm_plugins.masks import mask_to_rle, rle_to_mask

    if list(rle["size"]) == [h, w]:
        return rle
    import numpy as np

    mask = rle_to_mask(rle)
    resized = Image.fromarray(mask.astype(np.uint8) * 255).resize((w, h), Image.NEAREST)
    return mask_to_rle(np.asarray(resized) >= 128)
