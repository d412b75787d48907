"""The standalone app: the training tab and the REST API on one local server over the embedded host.

`serve(layout)` is what `python -m dreambooth serve` runs. On first start it creates the demo: the shapes
world's pretrained model (dreambooth/world) and six pictures of one subject in that world, configured so that
pressing Train shows the model learning the subject within two to three minutes on a small CPU.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import webbrowser
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DreamboothError
from ..store import Layout, ModelStore

log = logging.getLogger(__name__)

DEMO_MODEL = "demo"
DEMO_CHECKPOINT = "demo-world.safetensors"
DEMO_DATA_FOLDER = "demo-data"


# --- demo content -----------------------------------------------------------------------------------

def demo_data_folder(layout: Layout) -> Path:
    return layout.models_dir / DEMO_DATA_FOLDER / "sks-circle"


def ensure_demo(layout: Layout, store: ModelStore) -> str | None:
    """On first run (no models yet) create the demo model (the shapes world's pretrained base model) and its
    dataset (pictures of the world's subject); returns the model name or None."""
    if store.names():
        return None
    from ..config.overrides import apply_overrides
    from ..config.schema import Concept
    from ..models.loading import create_model
    from ..world.demo import DEMO_CONCEPT, DEMO_SETTINGS, write_subject_dataset
    from ..world.model import write_world_checkpoint

    checkpoint = layout.checkpoints_dir / DEMO_CHECKPOINT
    if not checkpoint.is_file():
        write_world_checkpoint(checkpoint)
    model = create_model(store, DEMO_MODEL, checkpoint, family="sd1")
    config = apply_overrides(model.load_config(), DEMO_SETTINGS)
    folder = write_subject_dataset(demo_data_folder(layout))
    config.concepts = [Concept(instance_data_dir=str(folder), **DEMO_CONCEPT)]
    model.save_config(config)
    log.info("Created the demo model %r and its dataset in %s", DEMO_MODEL, folder)
    return DEMO_MODEL


# --- the app ------------------------------------------------------------------------------------------

def extension_root() -> Path:
    return Path(__file__).resolve().parents[2]


def read_static(name: str) -> str:
    path = extension_root() / name
    try:
        return path.read_text(encoding="utf-8")
    except OSError:
        log.warning("%s is missing; the tab works without it but has no tooltips or styles.", path)
        return ""


def build_blocks(web_host: Any, service: Any, store: ModelStore) -> Any:
    """The root Blocks: the tab plus our script and styles (A1111 loads those itself; here we inject them)."""
    import gradio as gr

    from . import compat
    from .tab import create_tab

    script, css = read_static("javascript/dreambooth.js"), read_static("style.css")
    head = compat.head_argument(f"<script>{script}</script>")
    # Built outside the page's context: a Blocks created inside another is rendered there already.
    tab = create_tab(web_host, service, store)
    with gr.Blocks(title="Dreambooth trainer", css=css, analytics_enabled=False, **head) as blocks:
        tab.render()
        if not head and script:
            # gradio 3.x has no head=: run the script once the page has loaded.
            blocks.load(None, None, None, **compat.js_argument("() => {\n" + script + "\n}"))
    return blocks


def build_app(layout: Layout, web_host: Any = None, service: Any = None, demo: bool = True) -> tuple[Any, Any, Any]:
    """(FastAPI app with the API and the tab mounted at /, the Blocks, the service)."""
    import gradio as gr
    from fastapi import FastAPI

    from ..service import TrainingService

    layout.ensure()
    store = ModelStore(layout)
    if web_host is None:
        from ..host.embedded import EmbeddedHost

        web_host = EmbeddedHost(layout)
    service = service or TrainingService(web_host, store)
    if demo:
        try:
            ensure_demo(layout, store)
        except (DreamboothError, OSError) as error:
            log.warning("Could not create the demo model: %s", error)
    app = FastAPI()
    from .api import register_api

    register_api(app, service, store)
    blocks = build_blocks(web_host, service, store)
    blocks.queue()
    app = gr.mount_gradio_app(app, blocks, path="")
    return app, blocks, service


def free_port(address: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((address, 0))
        return int(sock.getsockname()[1])


@dataclass
class RunningApp:
    url: str
    server: Any
    thread: threading.Thread
    service: Any

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def _server(app: Any, address: str, port: int) -> Any:
    import uvicorn

    return uvicorn.Server(uvicorn.Config(app, host=address, port=port, log_level="warning"))


def start(layout: Layout, port: int = 0, address: str = "127.0.0.1", web_host: Any = None, service: Any = None,
          demo: bool = True, timeout: float = 60.0) -> RunningApp:
    """Start the app on a background thread (port 0: a free port); returns once it accepts connections."""
    app, _blocks, service = build_app(layout, web_host, service, demo)
    port = port or free_port(address)
    server = _server(app, address, port)
    thread = threading.Thread(target=server.run, name="dreambooth-app", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise DreamboothError(f"The app did not start on {address}:{port}; is the port in use?")
        time.sleep(0.05)
    return RunningApp(f"http://{address}:{port}/", server, thread, service)


def serve(layout: Layout, host: str | None = None, port: int = 7860, open_browser: bool = False) -> int:
    """Run the standalone app until interrupted (host: the address to listen on, default 127.0.0.1)."""
    address = host or "127.0.0.1"
    app, _blocks, _service = build_app(layout)
    url = f"http://{address}:{port}/"
    print(f"Dreambooth trainer on {url} (models in {layout.models_dir}); press Ctrl+C to stop.", flush=True)
    if open_browser:
        threading.Timer(2.0, webbrowser.open, args=(url,)).start()
    _server(app, address, port).run()
    return 0
