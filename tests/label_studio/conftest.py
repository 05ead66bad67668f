"""Fixtures of the Label Studio backend tests.

Unit tests drive the app through an HTTP test client with ``FakePredictor`` (tests/fakes.py). The end-to-end
fixtures (real Label Studio 1.23.2 from a cached virtualenv) live in ``ls_server.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/fakes.py
sys.path.insert(0, str(HERE))  # ls_helpers.py, ls_server.py

from fakes import FakePredictor  # noqa: E402
from ls_helpers import FakeTrainer, png_bytes  # noqa: E402
from ls_server import label_studio, ls_venv  # noqa: E402,F401  (session fixtures of the e2e tests)

from label_studio_backend import labeling_config  # noqa: E402

REFERRING = labeling_config("referring")


@pytest.fixture()
def images_dir(tmp_path) -> Path:
    d = tmp_path / "imgs"
    d.mkdir()
    (d / "a.png").write_bytes(png_bytes((200, 100), box=(20, 10, 80, 60)))
    (d / "b.png").write_bytes(png_bytes((64, 96)))
    (d / "c.png").write_bytes(png_bytes((120, 120), color=(30, 30, 200), box=(60, 60, 110, 110)))
    return d


@pytest.fixture()
def fake_predictor() -> FakePredictor:
    return FakePredictor()


@pytest.fixture()
def fake_trainer() -> FakeTrainer:
    return FakeTrainer()


@pytest.fixture()
def make_client(tmp_path, images_dir, fake_predictor, fake_trainer):
    """``make_client(**overrides)`` -> a started ``TestClient`` (closed at teardown)."""
    from fastapi.testclient import TestClient

    from label_studio_backend.server import create_app

    clients = []

    def make(**overrides):
        opts = dict(model_dir=tmp_path / "model_dir", predictor=fake_predictor, trainer=fake_trainer,
                    local_roots=str(images_dir), label_studio_url="", label_studio_api_key="",
                    basic_auth_user="", basic_auth_pass="")
        opts.update(overrides)
        client = TestClient(create_app(**opts))
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for c in clients:
        c.__exit__(None, None, None)


@pytest.fixture()
def client(make_client):
    return make_client()


def predict_body(tasks, label_config=REFERRING, context=None, project="7.1700000000"):
    return {"tasks": tasks, "project": project, "label_config": label_config,
            "params": {"login": None, "password": None, "context": context}}
