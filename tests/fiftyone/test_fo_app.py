"""The App on 127.0.0.1: the plugin's operators are served, and a headless Chromium screenshot shows a sample
with boxes, captions and a word trace. Screenshots are kept under ``artifacts/fiftyone/`` (git-ignored).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path

import fiftyone as fo
import httpx
import pytest
from fo_worker import free_port
from PIL import Image

from pixelllm_plugins.integrations import fiftyone as pxfo

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "artifacts" / "fiftyone"
PLUGIN = "@pixelllm/pixelllm"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")

pytestmark = pytest.mark.integration


@contextmanager
def launched_app(dataset, tmp_root, poll):
    """The App for ``dataset`` on a free loopback port (isolated HOME); yields (session, url) once it answers."""
    port = free_port()
    home = os.environ.get("HOME")
    os.environ["HOME"] = str(tmp_root / "home")  # the server processes inherit an isolated HOME
    try:
        session = fo.launch_app(dataset, remote=True, address="127.0.0.1", port=port, auto=False)
    finally:
        if home is not None:
            os.environ["HOME"] = home
    url = f"http://127.0.0.1:{port}"
    try:
        # the server may take longer than the session client's first 10 s connection attempt under load:
        # wait until the server answers and the client is (re)connected before driving the session
        poll(lambda: _answers(f"{url}/fiftyone") and session._client._connected, 180,
             "the App server and the session client")
        yield session, url
    finally:
        session.close()  # always: a killed launcher orphans the server processes


@pytest.fixture()
def app(plugin_installed, dataset, oracle, tmp_root, poll):
    """The App serving a labeled copy of the scenes (refer, captions on the boxes, caption + word trace)."""
    dataset.persistent = True  # the App server is another process
    pxfo.run_refer(dataset, prompt_field="refexp")
    pxfo.run_caption_regions(dataset, boxes_field="ground_truth")
    pxfo.run_caption_with_trace(dataset)
    with launched_app(dataset, tmp_root, poll) as (session, url):
        yield session, url


def _open_modal(session, sample_id: str) -> bool:
    """Open the sample in the modal of every connected App; False while the session client reconnects."""
    try:
        session.sample_id = sample_id
        return True
    except RuntimeError:  # "Client is not connected"
        return False


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def _screenshot(url: str, out: Path, tmp: Path, timeout: float = 180, budget_ms: int = 20000) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    cmd = [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           f"--user-data-dir={tmp / 'chromium-profile'}", "--window-size=1400,900",
           f"--virtual-time-budget={budget_ms}", "--hide-scrollbars", f"--screenshot={out}", url]
    env = dict(os.environ, HOME=str(tmp))
    proc = subprocess.run(cmd, env=env, capture_output=True, timeout=timeout)
    assert out.is_file(), proc.stderr.decode()[-2000:]
    return out


def _rendered_screenshot(url: str, out: Path, tmp: Path, poll) -> Path:
    """Screenshots with a growing virtual-time budget until the App has rendered (a loaded App has
    hundreds of colours; "Pixelating..." on a dark page has a few dozen). Bounded by the deadline."""
    budgets = iter([20000, 40000, 80000])

    def attempt():
        shot = _screenshot(url, out, tmp, budget_ms=next(budgets, 120000))
        return shot if _distinct_colors(shot) > 200 else None

    return poll(attempt, 900, f"the App to render {url}")


def _distinct_colors(path: Path) -> int:
    with Image.open(path) as im:
        small = im.convert("RGB").resize((280, 180))
        return len(set(small.getdata()))


def test_app_serves_the_operators_and_shows_boxes_captions_and_trace(app, dataset, tmp_path, poll):
    session, url = app
    # what a newcomer sees: the plugin and its five operators, with the stable form parameters
    plugins = httpx.get(f"{url}/plugins", timeout=30).json()
    assert PLUGIN in [p["name"] for p in plugins["plugins"]]
    ops = httpx.post(f"{url}/operators", json={"dataset_name": dataset.name}, timeout=60).json()
    uris = {o["uri"] for o in ops["operators"]}
    assert {f"{PLUGIN}/{n}" for n in ("refer", "caption_regions", "dense_caption", "caption_with_trace",
                                      "free_model")} <= uris
    form = httpx.post(f"{url}/operators/resolve-type", timeout=60, json={
        "dataset_name": dataset.name, "operator_uri": f"{PLUGIN}/refer", "params": {}, "target": "inputs"}).json()
    assert {"prompt", "prompt_field", "label_field", "overwrite", "batch_size"} <= set(
        form["type"]["properties"])

    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install chromium): no screenshot")
    # the grid, then one sample in the modal: boxes, the caption, the word keypoints and the trace path
    grid = _rendered_screenshot(f"{url}/datasets/{dataset.name}", ARTIFACTS / "grid.png", tmp_path, poll)
    sample = dataset.first()
    poll(lambda: _open_modal(session, sample.id), 60, "the session to open the sample")
    modal = _rendered_screenshot(f"{url}/datasets/{dataset.name}?id={sample.id}", ARTIFACTS / "modal.png",
                                 tmp_path, poll)
    for shot in (grid, modal):
        with Image.open(shot) as im:
            assert im.size == (1400, 900)
        assert _distinct_colors(shot) > 200  # a rendered App, not a blank or error page


DOCS_IMAGES = ROOT / "docs" / "images"


def test_app_draws_segment_masks_and_polylines(plugin_installed, dataset, tmp_root, tmp_path, poll):
    """The App shows ``segment``'s labels from the embedded default model: instance masks from the text prompts
    and filled polylines from the ground-truth boxes. With ``PIXELLLM_DOCS_IMAGES=1`` the screenshots are
    copied to ``docs/images/fiftyone-segment*.png``."""
    dataset.persistent = True
    assert pxfo.run_segment(dataset, prompt_field="refexp", label_field="masks").failed == 0
    assert pxfo.run_segment(dataset, boxes_field="ground_truth", output="polylines",
                            label_field="polygons").failed == 0
    assert dataset.count("masks.detections.mask") == 6 and dataset.count("polygons.polylines") >= 12
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install chromium): no screenshot")
    with launched_app(dataset, tmp_root, poll) as (session, url):
        grid = _rendered_screenshot(f"{url}/datasets/{dataset.name}", ARTIFACTS / "segment-grid.png",
                                    tmp_path, poll)
        sample = dataset.first()
        poll(lambda: _open_modal(session, sample.id), 60, "the session to open the sample")
        modal = _rendered_screenshot(f"{url}/datasets/{dataset.name}?id={sample.id}",
                                     ARTIFACTS / "segment-modal.png", tmp_path, poll)
    if os.environ.get("PIXELLLM_DOCS_IMAGES") == "1":
        DOCS_IMAGES.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(grid, DOCS_IMAGES / "fiftyone-segment-grid.png")
        shutil.copyfile(modal, DOCS_IMAGES / "fiftyone-segment.png")
    for shot in (grid, modal):
        assert _distinct_colors(shot) > 200
