"""Learning from annotations: webhook -> background queue -> datasets in the project's formats -> adapter ->
new model_version; failures reported by /health; START_TRAINING pulls tasks from the Label Studio API."""

from __future__ import annotations

import json
import threading
import time

from conftest import REFERRING
from ls_helpers import Route, ScriptedServer, wait_for

from pixelllm_plugins.geometry import xyxy_to_ls_percent

PROJECT = {"id": 7, "title": "p", "label_config": REFERRING}


def annotation_event(images_dir, ann_id=11, task_id=1, action="ANNOTATION_CREATED", box=(20, 10, 80, 60),
                     caption="the red square", expression="the red thing", size=(200, 100)):
    geom = xyxy_to_ls_percent(box, *size)
    frame = {"original_width": size[0], "original_height": size[1], "image_rotation": 0}
    result = [{"id": "a1", "from_name": "label", "to_name": "image", "type": "rectanglelabels", **frame,
               "value": {**geom, "rotation": 0, "rectanglelabels": ["object"]}}]
    if caption:
        result.append({"id": "a1", "from_name": "caption", "to_name": "image", "type": "textarea", **frame,
                       "value": {**geom, "rotation": 0, "text": [caption]}})
    return {"action": action, "project": PROJECT,
            "task": {"id": task_id, "data": {"image": str(images_dir / "a.png"), "expression": expression}},
            "annotation": {"id": ann_id, "result": result, "task": task_id, "was_cancelled": False}}


def test_annotation_webhook_returns_at_once_and_training_bumps_the_version(client, images_dir, fake_trainer):
    fake_trainer.gate = threading.Event()  # training blocks until released: the webhook must not wait
    started = time.monotonic()
    r = client.post("/webhook", json=annotation_event(images_dir))
    assert time.monotonic() - started < 1.0, "the webhook waited for training"
    assert r.status_code == 201 and r.json()["status"] == "ok" and r.json()["result"]["queued"] is True
    runtime = client.app.state.runtime
    wait_for(lambda: runtime.training.state("7")["status"] == "running", 10, "the round to start")
    assert client.post("/setup", json={"project": "7.1", "schema": REFERRING}).json()["model_version"] == "fake-1"
    fake_trainer.gate.set()
    assert runtime.training.wait_idle(30)
    version = client.post("/setup", json={"project": "7.1", "schema": REFERRING}).json()["model_version"]
    assert version == "fake-1+ls-p7-ft1"
    assert client.post("/versions", json={"project": "7.1"}).json()["versions"] == ["fake-1", "fake-1+ls-p7-ft1"]
    # other projects keep the base model
    assert client.post("/setup", json={"project": "8.1", "schema": REFERRING}).json()["model_version"] == "fake-1"
    # predictions now name the new version and use the project's adapter
    task = {"id": 1, "data": {"image": str(images_dir / "a.png"), "expression": "x"}}
    pred = client.post("/predict", json={"tasks": [task], "project": "7.1", "label_config": REFERRING}).json()
    assert pred["results"][0]["model_version"] == "fake-1+ls-p7-ft1"
    # the trainer got the project's data in the project's formats
    call = fake_trainer.calls[0]
    assert call["steps"] == 200 and call["out_adapter"].name == "ls-p7-ft1"
    ref, vg = call["refcoco"], call["vg"]
    assert ref["images"][0]["caption"] == "the red square"
    assert ref["annotations"][0]["bbox"] == [20.0, 10.0, 60.0, 50.0]
    assert ref["annotations"][0]["tokens_positive"] == [[0, len("the red square")]]
    assert vg["annotations"][0]["caption"] == "the red square" and vg["annotations"][0]["bbox"] == [20.0, 10.0, 60.0, 50.0]
    image = call["data_dir"] / "images" / "train" / ref["images"][0]["file_name"]
    assert image.is_file() and ref["images"][0]["width"] == 200


def test_box_without_caption_uses_the_task_expression(client, images_dir, fake_trainer):
    client.post("/webhook", json=annotation_event(images_dir, caption=None))
    assert client.app.state.runtime.training.wait_idle(30)
    call = fake_trainer.calls[0]
    assert call["refcoco"]["images"][0]["caption"] == "the red thing" and call["vg"] is None


def test_rounds_are_coalesced_and_updates_replace_annotations(client, images_dir, fake_trainer):
    fake_trainer.gate = threading.Event()
    runtime = client.app.state.runtime
    client.post("/webhook", json=annotation_event(images_dir, ann_id=1))
    wait_for(lambda: runtime.training.state("7")["status"] == "running", 10, "round 1 to start")
    for ann_id, caption in ((2, "first"), (2, "second"), (3, "third")):
        action = "ANNOTATION_UPDATED" if caption == "second" else "ANNOTATION_CREATED"
        client.post("/webhook", json=annotation_event(images_dir, ann_id=ann_id, caption=caption, action=action))
    fake_trainer.gate.set()
    assert runtime.training.wait_idle(30)
    assert len(fake_trainer.calls) == 2  # one round running + one coalesced round for the three events
    captions = sorted(a["caption"] for a in fake_trainer.calls[1]["vg"]["annotations"])
    assert captions == ["second", "the red square", "third"]
    # deletions drop annotations from later rounds
    r = client.post("/webhook", json={"action": "ANNOTATIONS_DELETED", "project": PROJECT,
                                      "annotations": [{"id": 2}, {"id": 3}]})
    assert r.json()["result"] == {"deleted": 2}


def test_training_failure_is_reported_and_never_crashes(client, images_dir, fake_trainer):
    fake_trainer.fail = RuntimeError("CUDA out of memory (simulated)")
    client.post("/webhook", json=annotation_event(images_dir))
    runtime = client.app.state.runtime
    assert runtime.training.wait_idle(30)
    health = client.get("/health").json()
    assert health["status"] == "UP"
    assert "CUDA out of memory" in health["training_errors"]["7"]
    assert client.post("/setup", json={"project": "7.1", "schema": REFERRING}).json()["model_version"] == "fake-1"
    # the next round works again
    fake_trainer.fail = None
    client.post("/webhook", json=annotation_event(images_dir, ann_id=12))
    assert runtime.training.wait_idle(30)
    assert runtime.training.state("7")["status"] == "idle" and "training_errors" not in client.get("/health").json()


def test_unusable_annotations_fail_the_round_with_a_reason(client, images_dir):
    event = annotation_event(images_dir, caption=None, expression="")
    client.post("/webhook", json=event)
    assert client.app.state.runtime.training.wait_idle(30)
    assert "no usable annotations" in client.get("/health").json()["training_errors"]["7"]


def test_broken_adapter_never_becomes_the_version(make_client, images_dir, fake_predictor, fake_trainer):
    def load_adapter(path, name):
        raise RuntimeError("adapter does not fit this model")

    fake_predictor.load_adapter = load_adapter
    client = make_client()
    client.post("/webhook", json=annotation_event(images_dir))
    assert client.app.state.runtime.training.wait_idle(30)
    assert "does not fit" in client.get("/health").json()["training_errors"]["7"]
    assert client.post("/setup", json={"project": "7.1", "schema": REFERRING}).json()["model_version"] == "fake-1"


def test_start_training_pulls_labeled_tasks_from_label_studio(make_client, images_dir, fake_trainer):
    ls = ScriptedServer()
    try:
        event = annotation_event(images_dir, ann_id=21, caption="pulled caption")
        exported = [dict(event["task"], annotations=[event["annotation"]]),
                    dict(event["task"], id=2, annotations=[dict(event["annotation"], id=22, was_cancelled=True)])]
        ls.routes["/api/projects/7/export"] = Route(200, exported)
        client = make_client(label_studio_url=ls.url, label_studio_api_key="tok-123456")
        r = client.post("/webhook", json={"action": "START_TRAINING", "project": PROJECT})
        assert r.status_code == 201 and r.json()["result"] == {"queued": True}
        assert client.app.state.runtime.training.wait_idle(30)
        assert ls.requests[0]["headers"]["authorization"] == "Token tok-123456"
        assert [a["caption"] for a in fake_trainer.calls[0]["vg"]["annotations"]] == ["pulled caption"]
    finally:
        ls.close()


def test_legacy_train_route(client, images_dir, fake_trainer):
    event = annotation_event(images_dir, ann_id=31)
    body = {"project": "7.1", "label_config": REFERRING,
            "annotations": [dict(event["task"], annotations=[event["annotation"]])]}
    r = client.post("/train", json=body)
    assert r.status_code == 201 and r.json()["result"]["stored"] == 1
    assert client.app.state.runtime.training.wait_idle(30) and len(fake_trainer.calls) == 1


def test_state_survives_a_restart(make_client, images_dir, fake_trainer, tmp_path):
    client = make_client()
    client.post("/webhook", json=annotation_event(images_dir))
    assert client.app.state.runtime.training.wait_idle(30)
    again = make_client()  # same MODEL_DIR, new process state
    assert again.post("/setup", json={"project": "7.1", "schema": REFERRING}).json()["model_version"] == \
        "fake-1+ls-p7-ft1"
    state = json.loads((tmp_path / "model_dir" / "projects" / "7" / "state.json").read_text())
    assert state["history"][0]["adapter"] == "ls-p7-ft1"
