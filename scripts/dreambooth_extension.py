"""Web UI entry point (A1111, Forge, SD.Next): the tab, the settings section and the REST API.

Thin glue only: everything else lives in the `dreambooth` package, and host specifics in
dreambooth/host/webui.py. The extension folder is found from this file's own path, so renaming
the folder (as users do) changes nothing.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

EXTENSION_ROOT = Path(__file__).resolve().parent.parent
if str(EXTENSION_ROOT) not in sys.path:
    sys.path.insert(0, str(EXTENSION_ROOT))

from dreambooth.host.webui import WebuiHost, register_callbacks  # noqa: E402
from dreambooth.service import TrainingService  # noqa: E402

TAB_TITLE, TAB_ID = "DreamBooth", "dreambooth_interface"
_objects: dict[str, Any] = {}


def host_and_service() -> tuple[WebuiHost, TrainingService]:
    """One host adapter and one training service per web UI process (created on first use)."""
    if not _objects:
        host = WebuiHost()
        _objects.update(host=host, service=TrainingService(host))
    return _objects["host"], _objects["service"]


def on_ui_tabs() -> list[tuple[Any, str, str]]:
    from dreambooth.ui.tab import create_tab

    host, service = host_and_service()
    return [(create_tab(host, service), TAB_TITLE, TAB_ID)]


def on_ui_settings() -> None:
    host_and_service()[0].register_settings()


def on_app_started(demo: Any, app: Any) -> None:
    from dreambooth.ui.api import register_api

    host, service = host_and_service()
    register_api(app, service, service.store, auth=host.api_credentials(), data_roots=host.data_roots())


register_callbacks(on_ui_tabs, on_ui_settings, on_app_started)
