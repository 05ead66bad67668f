from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from serving_helpers import wait_until

from pixelllm_plugins.serving.app import create_app
from pixelllm_plugins.serving.settings import WorkerSettings


@pytest.fixture()
def make_client():
    """``make_client(predictor, **settings)`` -> a started TestClient whose model is ready."""
    opened = []

    def make(predictor, **settings):
        app = create_app(predictor, WorkerSettings(**settings))
        client = TestClient(app, raise_server_exceptions=False)
        client.__enter__()
        opened.append(client)
        wait_until(lambda: client.get("/ready").status_code == 200, 10, what="ready")
        return client

    yield make
    for client in opened:
        client.__exit__(None, None, None)
