"""One writer per model across processes: a second process is refused, a killed holder's lock is cleared."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dreambooth import cli, locks
from dreambooth.config.schema import Concept, TrainingConfig
from dreambooth.locks import LOCK_FILE, ModelBusy, writer_lock
from dreambooth.service import TrainingService
from dreambooth.store import Layout, ModelStore

from fake_host import FakeHost

REPO = Path(__file__).resolve().parents[1]
HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from dreambooth.locks import writer_lock
    with writer_lock(Path(sys.argv[1]), sys.argv[2]):
        print("held", flush=True)
        time.sleep(120)
""")


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    store = ModelStore(Layout.under(tmp_path / "models").ensure())
    store.model("dog").save_config(TrainingConfig(concepts=[Concept(instance_data_dir=str(tmp_path / "imgs"))]))
    return store


def start_holder(root: Path, purpose: str = "train") -> subprocess.Popen:
    """Another process holding the model's lock until killed."""
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(root), purpose], cwd=REPO,
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None and process.stdout.readline().strip() == "held"
    return process


@pytest.fixture
def holder(store: ModelStore) -> Iterator[subprocess.Popen]:
    process = start_holder(store.existing("dog").root)
    yield process
    process.kill()
    process.wait()


def test_a_second_process_is_refused_with_who_holds_it(store, holder):
    root = store.existing("dog").root
    with pytest.raises(ModelBusy) as refused:
        with writer_lock(root, "train"):
            pass
    message = str(refused.value)
    assert f"Model 'dog' is already training in process {holder.pid} (host {socket.gethostname()}) since" in message
    assert (root / LOCK_FILE).is_file()  # the holder's lock is untouched


def test_a_killed_holder_leaves_a_stale_lock_the_next_start_clears(store):
    root = store.existing("dog").root
    process = start_holder(root)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert json.loads((root / LOCK_FILE).read_text())["pid"] == process.pid  # SIGKILL: no clean-up ran
    said: list[str] = []
    with writer_lock(root, "train", warn=said.append) as mine:
        assert json.loads((root / LOCK_FILE).read_text())["pid"] == os.getpid() == mine.pid
    assert len(said) == 1 and "stale lock" in said[0] and f"process {process.pid} is gone" in said[0]
    assert not (root / LOCK_FILE).exists()  # released on exit


def test_a_reused_pid_is_recognised_by_its_start_time(store):
    root = store.existing("dog").root
    # Our own pid, but recorded with a start time an hour before this process began: another program's lock.
    started = locks.process_start_time(os.getpid())
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started_at": time.time() - 3600,
              "process_start": started - 3600, "purpose": "train"}
    (root / LOCK_FILE).write_text(json.dumps(record))
    said: list[str] = []
    with writer_lock(root, "train", warn=said.append):
        pass
    assert "now another program" in said[0]


def test_unreadable_lock_is_cleared_and_another_hosts_lock_is_honoured(store):
    root = store.existing("dog").root
    (root / LOCK_FILE).write_text('{"pid": 12')  # a holder killed mid-write
    said: list[str] = []
    with writer_lock(root, "train", warn=said.append):
        pass
    assert "unreadable" in said[0]
    record = {"pid": 1, "host": "elsewhere", "started_at": time.time(), "process_start": 1.0, "purpose": "train"}
    (root / LOCK_FILE).write_text(json.dumps(record))
    with pytest.raises(ModelBusy, match=r"host elsewhere.*delete .*\.train\.lock"):
        with writer_lock(root, "train"):
            pass


def test_only_rank_zero_takes_the_lock(store, holder, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    with writer_lock(store.existing("dog").root, "train") as mine:
        assert mine is None  # the other ranks never write the model folder
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ModelBusy):
        with writer_lock(store.existing("dog").root, "train"):
            pass


def test_service_start_and_export_are_refused_while_another_process_trains(store, holder):
    service = TrainingService(FakeHost(store.layout), store, trainer_factory=lambda *args: pytest.fail("ran"))
    with pytest.raises(ModelBusy, match=f"already training in process {holder.pid}"):
        service.start("dog")
    with pytest.raises(ModelBusy, match="already training"):
        service.export("dog")
    assert not service.is_busy() and service.status().state == "failed"


def test_api_answers_409_while_another_process_trains(store, holder):
    fastapi = pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from dreambooth.ui.api import register_api

    app = fastapi.FastAPI()
    register_api(app, TrainingService(FakeHost(store.layout), store), store)
    answer = TestClient(app).post("/dreambooth/models/dog/train")
    assert answer.status_code == 409 and f"process {holder.pid}" in answer.json()["detail"]


def test_cli_export_during_a_run_is_refused(store, holder, capsys):
    pytest.importorskip("diffusers")
    from dreambooth.models.components import save_components
    from dreambooth.models.tiny import tiny_components

    save_components(tiny_components("sd1"), store.existing("dog").working)
    data_dir = store.layout.models_dir.parent
    assert cli.main(["--data-dir", str(data_dir), "export", "--name", "dog"]) == cli.EXIT_ERROR
    assert f"already training in process {holder.pid}" in capsys.readouterr().err
    assert not list(store.layout.checkpoints_dir.iterdir())


def test_cli_export_holds_the_lock_so_training_waits(store):
    holder = start_holder(store.existing("dog").root, "export")
    try:
        with pytest.raises(ModelBusy, match="is already being exported"):
            with writer_lock(store.existing("dog").root, "train"):
                pass
    finally:
        holder.kill()
        holder.wait()
