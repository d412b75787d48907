"""The standalone app over HTTP: gradio's own client against a launched server with a fake host."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dreambooth.ui import app as standalone


@pytest.fixture
def running(layout, host, service, model) -> Iterator[Any]:
    (layout.checkpoints_dir / "base.safetensors").write_bytes(b"not really weights")
    app = standalone.start(layout, web_host=host, service=service, demo=False)
    try:
        yield app
    finally:
        app.stop()


def _client_speaks_this_websockets() -> bool:
    """gradio_client 0.5 (gradio 3.4x) passes websockets < 12 arguments; SD.Next runs gradio 3.43 with the newest
    websockets, which its server side handles but that old client cannot use."""
    from importlib.metadata import version

    client_major = int(version("gradio_client").split(".")[0])
    return client_major >= 1 or int(version("websockets").split(".")[0]) < 12


def _client(url: str) -> Any:
    if not _client_speaks_this_websockets():
        pytest.skip("gradio_client 0.5 cannot talk to a server with websockets >= 12 (SD.Next's dependency set)")
    from gradio_client import Client

    try:
        return Client(url, verbose=False)
    except TypeError:  # older clients have no verbose flag
        return Client(url)


def test_page_api_and_named_endpoints(running: Any, service: Any, model: str) -> None:
    page = urllib.request.urlopen(running.url, timeout=10).read().decode()
    assert "dreambooth" in page.lower()
    listed = json.loads(urllib.request.urlopen(running.url + "dreambooth/models", timeout=10).read())
    assert model in json.dumps(listed)

    client = _client(running.url)
    progress, status, error, *_ = client.predict(api_name="/db_status")
    assert 'data-state="idle"' in progress and error == ""

    refreshed = client.predict(model, api_name="/db_refresh_models")
    assert model in json.dumps(refreshed)

    plan = client.predict("10", False, "strength", "medium", 1e-6, 1, 1, 0, 0, "constant", "sdxl", 400,
                          api_name="/db_wizard_plan")
    assert "Max steps" in plan[0] and "formula" in plan[0] and "(1024 / 1024)" in plan[0]
    assert "SPF = 400 x" in plan[0]  # the model's own reference steps per image reach the formulas

    service.start(model)
    deadline = time.monotonic() + 10
    while service.status().active and time.monotonic() < deadline:
        time.sleep(0.05)
    progress, status, *_ = client.predict(api_name="/db_status")
    assert 'data-state="finished"' in progress and "step 5/5" in progress

    # Creating a model needs real weights: the tab shows the loader's error instead of failing.
    created = client.predict("new-model", "base.safetensors", "auto", "auto", api_name="/db_create_model")
    assert "db-error" in created[-1]


def test_the_demo_is_the_world_model_and_its_subject(tmp_path) -> None:
    from dreambooth.store import Layout, ModelStore
    from dreambooth.world.demo import SUBJECT_IMAGES, SUBJECT_PROMPT
    from dreambooth.world.evaluator import load_evaluator, rate

    layout = Layout.under(tmp_path).ensure()
    store = ModelStore(layout)
    assert standalone.ensure_demo(layout, store) == standalone.DEMO_MODEL
    config = store.existing(standalone.DEMO_MODEL).load_config()
    [concept] = config.concepts
    assert concept.instance_prompt == SUBJECT_PROMPT and config.resolution == 64
    from PIL import Image

    images = [Image.open(path) for path in sorted(Path(concept.instance_data_dir).glob("*.png"))]
    assert len(images) == SUBJECT_IMAGES and rate(load_evaluator().judge(images)) == 1.0
    assert standalone.ensure_demo(layout, store) is None  # only on a first run
