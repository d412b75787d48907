"""scripts/dreambooth_extension.py inside a fake web UI: callbacks, settings, API with auth, renamed folder."""

from __future__ import annotations

import base64
import importlib.util
import shutil
import sys
import types
from pathlib import Path

import pytest
from tests_host_support import HERE, purge_fakes

ROOT = Path(__file__).resolve().parents[2]
GLUE = ROOT / "scripts" / "dreambooth_extension.py"


def load_glue(path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("dreambooth_extension_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def webui(tmp_path, monkeypatch):
    purge_fakes()
    monkeypatch.syspath_prepend(str(HERE / "fake_webui"))
    import modules.paths
    import modules.shared

    models = tmp_path / "models"
    modules.shared.models_path = modules.paths.models_path = str(models)
    yield modules
    purge_fakes()


def test_registers_callbacks_tab_settings_and_api(webui, monkeypatch, tmp_path):
    fastapi = pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    tabs = []
    monkeypatch.setitem(sys.modules, "dreambooth.ui.tab", types.SimpleNamespace(
        create_tab=lambda host, service: tabs.append((host, service)) or "BLOCKS"))
    webui.shared.cmd_opts.api_auth = "admin:secret"
    glue = load_glue(GLUE)
    callbacks = importlib.import_module("modules.script_callbacks").registered
    assert [len(callbacks[k]) for k in ("ui_tabs", "ui_settings", "app_started")] == [1, 1, 1]

    assert callbacks["ui_tabs"][0]() == [("BLOCKS", glue.TAB_TITLE, glue.TAB_ID)]
    host, service = tabs[0]
    assert host.layout.dreambooth_dir == tmp_path / "models" / "dreambooth" and service.host is host

    callbacks["ui_settings"][0]()
    added = webui.shared.added
    assert set(added) >= {"dreambooth_save_precision", "dreambooth_mixed_precision", "dreambooth_models_path"}
    assert all(info.section[0] == "dreambooth" for info in added.values())
    assert host.config_defaults() == {"save_precision": "fp16", "mixed_precision": "bf16"}

    app = fastapi.FastAPI()
    callbacks["app_started"][0](None, app)
    client = TestClient(app)
    assert client.get("/dreambooth/status").status_code == 401
    token = base64.b64encode(b"admin:secret").decode()
    answer = client.get("/dreambooth/status", headers={"Authorization": f"Basic {token}"})
    assert answer.status_code == 200 and answer.json()["state"] == "idle"


def test_extension_root_comes_from_the_files_path(webui, tmp_path):
    renamed = tmp_path / "My Renamed Extension" / "scripts"
    renamed.mkdir(parents=True)
    shutil.copy(GLUE, renamed / "dreambooth_extension.py")
    glue = load_glue(renamed / "dreambooth_extension.py")
    assert glue.EXTENSION_ROOT == renamed.parent.resolve()
    assert str(renamed.parent.resolve()) in sys.path
    sys.path.remove(str(renamed.parent.resolve()))


def test_sdnext_api_needs_its_auth_users(tmp_path, monkeypatch):
    """SD.Next protects its API with --auth (its --api-auth is unused): ours takes the same users."""
    fastapi = pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    purge_fakes()
    monkeypatch.syspath_prepend(str(HERE / "fake_sdnext"))
    monkeypatch.chdir(tmp_path)
    try:
        import modules.shared

        modules.shared.cmd_opts.auth = "admin:secret"
        load_glue(GLUE)
        app = fastapi.FastAPI()
        importlib.import_module("modules.script_callbacks").registered["app_started"][0](None, app)
        client = TestClient(app)
        assert client.get("/dreambooth/status").status_code == 401
        token = base64.b64encode(b"admin:secret").decode()
        assert client.get("/dreambooth/status", headers={"Authorization": f"Basic {token}"}).status_code == 200
    finally:
        purge_fakes()
