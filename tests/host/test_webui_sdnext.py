"""The web UI adapter against a fake SD.Next (tests/host/fake_sdnext, shaped as tests/host/facts/sdnext.json)."""

from __future__ import annotations

import importlib
import threading
import time
import types
from pathlib import Path

import pytest
from tests_host_support import HERE, purge_fakes

from dreambooth.host.base import GenerationRequest, Host
from dreambooth.host.webui import SDNEXT, HostError, WebuiHost


@pytest.fixture
def sdnext(tmp_path: Path, monkeypatch):
    """The fake SD.Next on sys.path, run from tmp_path (its folders are relative to its working directory)."""
    purge_fakes()
    monkeypatch.syspath_prepend(str(HERE / "fake_sdnext"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "Stable-diffusion").mkdir(parents=True)
    (tmp_path / "models" / "Stable-diffusion" / "base.safetensors").write_bytes(b"x")
    fakes = types.SimpleNamespace(tmp=tmp_path, **{name.split(".")[-1]: importlib.import_module(f"modules.{name}")
                                                   for name in ("shared", "sd_models", "modeldata", "processing",
                                                                "call_queue", "lora.lora_load")})
    yield fakes
    purge_fakes()


def test_detects_sdnext_with_its_commit_and_folders_from_cmd_opts(sdnext):
    host = WebuiHost()
    assert host.flavour == SDNEXT and isinstance(host, Host)
    assert host.name == "SD.Next 058a7f0 (2026-07-23)"  # not its app name 'sd.next'
    models = sdnext.tmp / "models"
    assert host.layout.checkpoints_dir == models / "Stable-diffusion" and host.layout.lora_dir == models / "Lora"
    assert host.layout.dreambooth_dir == models / "dreambooth"  # relative folders made absolute
    assert host.list_checkpoints() == [models / "Stable-diffusion" / "base.safetensors"]


def test_a_folder_flag_wins_over_the_setting(sdnext):
    sdnext.shared.cmd_opts.lora_dir = str(sdnext.tmp / "flag-loras")  # --lora-dir; opts keeps models/Lora
    assert WebuiHost().layout.lora_dir == sdnext.tmp / "flag-loras"


def test_api_users_are_sdnext_auth_users_not_api_auth(sdnext):
    options = sdnext.shared.cmd_opts
    options.api_auth = "ignored:by-sdnext"
    assert WebuiHost().api_credentials() is None  # SD.Next's API is open without --auth
    options.auth = '"admin":"secret", viewer:pw'
    (sdnext.tmp / "users.txt").write_text("fileuser:filepw\n\n")
    options.auth_file = str(sdnext.tmp / "users.txt")
    assert WebuiHost().api_credentials() == {"admin": "secret", "viewer": "pw", "fileuser": "filepw"}


def test_refresh_loras_uses_lora_load(sdnext):
    WebuiHost().refresh_loras()
    assert sdnext.lora_load.refreshed == [True]


def test_release_unloads_loaded_slots_and_restore_reloads_only_those(sdnext):
    host, model_data = WebuiHost(), sdnext.modeldata.model_data
    sdnext.sd_models.reload_model_weights(op="model")
    pipeline = model_data.sd_model
    host.release_model()
    assert model_data.sd_model is None and pipeline.device == "meta"
    assert ("unload_model_weights", "refiner") not in sdnext.sd_models.calls  # no refiner was loaded
    sdnext.sd_models.reload_model_weights(op="model")  # class images loaded it again
    host.release_model()
    host.restore_model()
    assert sdnext.sd_models.calls[-1] == ("reload_model_weights", "model") and model_data.sd_model is not None
    calls = len(sdnext.sd_models.calls)
    host.restore_model()  # the service restores a second time: nothing left to reload
    assert len(sdnext.sd_models.calls) == calls


def test_refiner_is_released_and_restored_too(sdnext):
    sdnext.shared.opts.sd_model_refiner = "refiner [def]"
    for op in ("model", "refiner"):
        sdnext.sd_models.reload_model_weights(op=op)
    host = WebuiHost()
    host.release_model()
    assert sdnext.modeldata.model_data.sd_refiner is None
    host.restore_model()
    assert sdnext.sd_models.calls[-2:] == [("reload_model_weights", "model"), ("reload_model_weights", "refiner")]


def test_gpu_lock_keeps_sdnext_from_loading_lazily_while_generate_loads_explicitly(sdnext):
    host, model_data = WebuiHost(), sdnext.modeldata.model_data
    with host.gpu_lock():
        assert sdnext.shared.sd_model is None and model_data.lazy_loads == 0  # a UI poll cannot load it now
        images = host.generate(GenerationRequest("a dog", seed=7, width=8, height=8, count=2, batch_size=2))
    assert [image.getpixel((0, 0))[0] for image in images] == [7, 8]
    assert sdnext.sd_models.calls.count(("reload_model_weights", "model")) == 1 and model_data.lazy_loads == 0
    assert not model_data.lock.locked() and sdnext.call_queue.queue_lock.owner is None
    txt2img = sdnext.processing.created[0].kwargs
    assert "scheduler" not in txt2img  # SD.Next's txt2img has no scheduler field


def test_generate_selects_the_checkpoint_by_override(sdnext):
    host = WebuiHost()
    checkpoint = sdnext.tmp / "models" / "Stable-diffusion" / "base.safetensors"
    with host.gpu_lock():
        host.generate(GenerationRequest("x", count=1, checkpoint=checkpoint))
    created = sdnext.processing.created[0]
    assert created.kwargs["override_settings"] == {"sd_model_checkpoint": "base [abc]"} and created.closed
    assert created.kwargs["override_settings_restore_afterwards"] is True


def test_nothing_rendered_is_a_clear_error(sdnext):
    sdnext.shared.opts.sd_model_checkpoint = "None"  # SD.Next has no model to load: process_images gives None
    host = WebuiHost()
    with pytest.raises(HostError, match="rendered nothing"), host.gpu_lock():
        host.generate(GenerationRequest("x", count=1))


def test_gpu_lock_waits_for_a_lazy_load_in_progress(sdnext):
    lock, order = sdnext.modeldata.model_data.lock, []

    def sdnext_autoload():
        with lock:
            time.sleep(0.3)
            order.append("host loaded")

    loader = threading.Thread(target=sdnext_autoload)
    loader.start()
    time.sleep(0.05)
    with WebuiHost().gpu_lock():
        order.append("we build")
    loader.join()
    assert order == ["host loaded", "we build"]


def test_gpu_lock_gives_up_on_a_load_that_never_ends(sdnext):
    host = WebuiHost()
    host.host_load_wait_s = 0.2
    lock = sdnext.modeldata.model_data.lock
    lock.acquire()
    try:
        with pytest.raises(HostError, match="loading a model"), host.gpu_lock():
            pass
    finally:
        lock.release()
    assert sdnext.call_queue.queue_lock.owner is None
