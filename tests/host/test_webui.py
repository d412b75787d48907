"""The web UI adapter against fake `modules` packages (A1111 1.10 names, Forge and SD.Next variants)."""

from __future__ import annotations

import importlib
import threading
import time
import types
from pathlib import Path

import pytest
import torch
from tests_host_support import HERE, purge_fakes

from dreambooth import heap
from dreambooth.host.base import GenerationRequest, Host
from dreambooth.host.webui import (
    A1111,
    A1111_T5_CACHE,
    CLASSIC,
    FORGE,
    FORGE_T5_TOKENIZERS,
    SDNEXT,
    HostError,
    WebuiHost,
    call_tolerant,
    detect_flavour,
    host_t5_tokenizer_dirs,
    torch_swaps,
)
from dreambooth.service import TrainingService
from dreambooth.store import ModelStore
from dreambooth.train.events import LossRecord


@pytest.fixture
def webui(tmp_path: Path, monkeypatch):
    """The fake A1111 on sys.path with a models folder holding one checkpoint; yields its modules."""
    purge_fakes()
    monkeypatch.syspath_prepend(str(HERE / "fake_webui"))
    models = tmp_path / "models"
    (models / "Stable-diffusion").mkdir(parents=True)
    (models / "Stable-diffusion" / "base.safetensors").write_bytes(b"x")
    shared = importlib.import_module("modules.shared")
    shared.models_path = str(models)
    importlib.import_module("modules.paths").models_path = str(models)
    fakes = types.SimpleNamespace(shared=shared, models=models, tmp=tmp_path,
                                  sd_models=importlib.import_module("modules.sd_models"),
                                  processing=importlib.import_module("modules.processing"),
                                  call_queue=importlib.import_module("modules.call_queue"),
                                  networks=importlib.import_module("networks"))
    yield fakes
    purge_fakes()


@pytest.fixture
def forge(webui, monkeypatch):
    monkeypatch.syspath_prepend(str(HERE / "fake_forge"))
    webui.main_entry = importlib.import_module("modules_forge.main_entry")
    webui.memory = importlib.import_module("backend.memory_management")
    return webui


def names(calls) -> list[str]:
    return [call[0] for call in calls]


def test_detects_a1111_and_builds_the_layout(webui):
    host = WebuiHost()
    assert host.flavour == A1111 and isinstance(host, Host)
    assert host.name.startswith("AUTOMATIC1111")
    assert host.layout.checkpoints_dir == webui.models / "Stable-diffusion"
    assert host.layout.lora_dir == webui.models / "Lora"
    assert host.layout.dreambooth_dir == webui.models / "dreambooth"


def test_honours_ckpt_dir_lora_dir_and_our_flags(webui):
    options = webui.shared.cmd_opts
    options.ckpt_dir, options.lora_dir = str(webui.tmp / "ckpts"), str(webui.tmp / "loras")
    options.dreambooth_models_path = str(webui.tmp / "db")
    options.dreambooth_data_roots = f"{webui.tmp / 'a'}:{webui.tmp / 'b'}"
    (webui.tmp / "ckpts").mkdir()
    (webui.tmp / "ckpts" / "other.ckpt").write_bytes(b"x")
    host = WebuiHost()
    assert host.layout.checkpoints_dir == webui.tmp / "ckpts"
    assert host.layout.lora_dir == webui.tmp / "loras" and host.layout.dreambooth_dir == webui.tmp / "db"
    assert host.data_roots() == [webui.tmp / "a", webui.tmp / "b"]
    assert sorted(p.name for p in host.list_checkpoints()) == ["base.safetensors", "other.ckpt"]


def test_refresh_calls_list_models_and_lora_networks(webui):
    host = WebuiHost()
    new = webui.models / "Stable-diffusion" / "trained.safetensors"
    new.write_bytes(b"x")
    assert new in host.list_checkpoints()
    host.refresh_loras()
    assert "list_models" in names(webui.sd_models.calls) and webui.networks.refreshed == [True]


def test_refresh_keeps_the_selected_checkpoint(webui, monkeypatch):
    """A1111's list_models selects the --ckpt file again; our refresh after a run must not switch the user's
    model (found in a real A1111 1.10.1 started with --ckpt: the render after an SD3 run came from that SD1.5)."""
    start = webui.models / "Stable-diffusion" / "base.safetensors"
    monkeypatch.setattr(webui.shared.cmd_opts, "ckpt", str(start), raising=False)
    monkeypatch.setattr(webui.shared.opts, "sd_model_checkpoint", "other.ckpt [abc]")
    WebuiHost().refresh_checkpoints()
    assert webui.shared.opts.sd_model_checkpoint == "other.ckpt [abc]"
    assert "list_models" in names(webui.sd_models.calls)


def test_api_credentials_from_api_auth(webui):
    webui.shared.cmd_opts.api_auth = "u:p"
    assert WebuiHost().api_credentials() == {"u": "p"}


def test_generate_builds_txt2img_with_the_measured_arguments(webui):
    host = WebuiHost()
    checkpoint = webui.models / "Stable-diffusion" / "base.safetensors"
    images = host.generate(GenerationRequest("a dog", "blurry", seed=10, steps=12, cfg_scale=6.5, width=64,
                                             height=48, count=5, batch_size=2, checkpoint=checkpoint))
    assert [image.getpixel((0, 0))[0] for image in images] == [10, 11, 12, 13, 14]  # grid left out
    created = webui.processing.created
    assert [p.kwargs["batch_size"] for p in created] == [2, 2, 1]
    assert [p.kwargs["seed"] for p in created] == [10, 12, 14]
    first = created[0].kwargs
    assert first["prompt"] == "a dog" and first["negative_prompt"] == "blurry" and first["n_iter"] == 1
    assert (first["steps"], first["cfg_scale"], first["width"], first["height"]) == (12, 6.5, 64, 48)
    assert first["do_not_save_samples"] is True and first["do_not_save_grid"] is True
    assert first["sampler_name"] and "sd_model" in first
    assert first["override_settings"] == {"sd_model_checkpoint": "base.safetensors [abc]"}
    assert first["override_settings_restore_afterwards"] is True
    assert all(p.closed for p in created)


def test_generate_stops_when_the_host_is_interrupted(webui):
    webui.shared.state.interrupted = True
    assert WebuiHost().generate(GenerationRequest("x", count=3)) == []


def test_unknown_checkpoint_is_a_clear_error(webui):
    with pytest.raises(Exception, match="not in AUTOMATIC1111"):
        WebuiHost().generate(GenerationRequest("x", checkpoint=webui.tmp / "elsewhere.safetensors"))


def test_release_trashes_every_model_trims_the_heap_and_restore_reloads_it(webui, monkeypatch):
    sd_models = webui.sd_models
    info = sd_models.CheckpointInfo(str(webui.models / "Stable-diffusion" / "base.safetensors"))
    model, other = sd_models.FakeModel(info), sd_models.FakeModel(info)
    sd_models.model_data.sd_model, sd_models.model_data.loaded_sd_models = model, [model, other]
    sd_models.checkpoints_loaded["x"] = {"weights": 1}
    host = WebuiHost()
    trims: list[bool] = []  # whether the host's model was already gone when the heap was trimmed

    class Libc:
        def malloc_trim(self, pad: int) -> int:
            trims.append(sd_models.model_data.sd_model is None)
            return 1

    monkeypatch.setattr(heap, "glibc", Libc)
    host.release_model()
    assert trims == [True]  # glibc would otherwise keep the freed weights in the process
    assert model.device == other.device == "meta"
    assert sd_models.model_data.sd_model is None and sd_models.model_data.loaded_sd_models == []
    assert sd_models.checkpoints_loaded == {} and "unload_model_weights" not in names(sd_models.calls)
    host.restore_model()
    assert sd_models.calls[-1] == ("load_model", info) and webui.shared.sd_model.sd_checkpoint_info is info


def test_gpu_lock_takes_queue_lock_once_per_thread(webui):
    host = WebuiHost()
    lock = webui.call_queue.queue_lock
    with host.gpu_lock():
        with host.gpu_lock():  # nested use (service + trainer) must not take it again
            assert lock.owner == threading.get_ident()
        host.generate(GenerationRequest("x", count=1))  # generate never takes the lock itself
    assert lock.acquisitions == 1 and lock.owner is None


def test_training_through_the_service_never_takes_queue_lock_twice(webui):
    host = WebuiHost()
    info = webui.sd_models.CheckpointInfo(str(webui.models / "Stable-diffusion" / "base.safetensors"))
    webui.sd_models.load_model(info)

    class SamplingTrainer:
        def __init__(self, config, host_arg, callbacks, commands):
            self.host, self.callbacks = host_arg, callbacks

        def run(self):
            with self.host.gpu_lock():
                self.host.generate(GenerationRequest("sample", count=1))
            self.host.progress(0.5, "half way")
            self.callbacks.on_loss(LossRecord(1, 0.1, {"unet": 1e-6}))

    from dreambooth.config.schema import TrainingConfig

    store = ModelStore(host.layout.ensure())
    store.model("m").save_config(TrainingConfig())
    service = TrainingService(host, store, trainer_factory=SamplingTrainer)
    service.start("m")
    status = service.wait(60)  # returns as soon as the run ends; 60 s only for a loaded CI machine
    assert status.state == "finished", status.error
    assert webui.call_queue.queue_lock.acquisitions == 1
    assert webui.shared.state.textinfo and webui.shared.sd_model is not None  # restored after the run
    assert names(webui.sd_models.calls).count("load_model") == 2
    assert webui.networks.refreshed  # the new LoRA/checkpoint lists were refreshed


def test_progress_and_interrupt_use_shared_state(webui):
    host = WebuiHost()
    host.progress(0.25, "step 25/100")
    state = webui.shared.state
    assert state.sampling_step / state.sampling_steps == 0.25 and state.textinfo == "step 25/100"
    assert state.job_count >= 1 and not host.interrupted()
    state.interrupted = True
    assert host.interrupted()


def test_forge_selects_checkpoints_through_main_entry_and_releases_lazily(forge):
    host = WebuiHost()
    assert host.flavour == FORGE and host.name == "Forge 2.0.1v1.10.1"
    assert type(forge.shared.sd_model).__name__ == "FakeInitialModel"  # nothing loaded before a generation
    checkpoint = forge.models / "Stable-diffusion" / "base.safetensors"
    host.generate(GenerationRequest("x", count=1, checkpoint=checkpoint))
    created = forge.processing.created[0]
    assert created.kwargs["override_settings"] == {} and created.kwargs["scheduler"] == "Automatic"
    assert created.checkpoint_during_processing == "base.safetensors [abc]"
    assert forge.main_entry.changes[0] == ("base.safetensors [abc]", False, True)
    assert forge.shared.opts.sd_model_checkpoint == "base.safetensors [abc]"  # the previous one, restored
    forge.sd_models.model_data.sd_model = object()
    forge.sd_models.model_data.forge_hash = "loaded"
    host.release_model()
    assert forge.sd_models.model_data.sd_model is None and forge.sd_models.model_data.forge_hash is None
    assert not hasattr(forge.sd_models.model_data, "loaded_sd_models")  # A1111's list; Forge has none
    assert forge.memory.calls == ["unload_all_models", "soft_empty_cache"]
    host.restore_model()
    assert forge.main_entry.refreshes and "load_model" not in names(forge.sd_models.calls)


@pytest.fixture
def neo(webui, monkeypatch):
    monkeypatch.syspath_prepend(str(HERE / "fake_forge"))
    monkeypatch.syspath_prepend(str(HERE / "fake_neo"))
    webui.main_entry = importlib.import_module("modules_forge.main_entry")
    webui.memory = importlib.import_module("backend.memory_management")
    return webui


def test_forge_neo_gets_the_preset_its_checkpoint_change_requires(neo):
    host = WebuiHost()
    assert host.flavour == FORGE and host.name == "Forge neo"
    checkpoint = neo.models / "Stable-diffusion" / "base.safetensors"
    host.generate(GenerationRequest("x", count=1, checkpoint=checkpoint))
    assert neo.main_entry.changes == [("base.safetensors [abc]", None, False, True),
                                      ("base.safetensors [abc]", None, False, True)]  # chosen, then chosen back
    assert neo.processing.created[0].checkpoint_during_processing == "base.safetensors [abc]"
    neo.sd_models.model_data.sd_model = object()
    host.release_model()  # Neo has no send_model_to_trash or state-dict cache
    host.restore_model()
    assert neo.sd_models.model_data.sd_model is None and neo.memory.calls == ["unload_all_models", "soft_empty_cache"]
    assert neo.main_entry.refreshes == [True]


def test_detect_flavour_markers(monkeypatch):
    import importlib.util as util

    real = util.find_spec
    for markers, expected in ((("modules_forge",), FORGE), (("modules_forge", "ldm_patched"), CLASSIC),
                              (("modules.modeldata",), SDNEXT), ((), A1111)):
        monkeypatch.setattr(util, "find_spec", lambda name, *a, m=markers: object() if name in m else None)
        assert detect_flavour() == expected
    monkeypatch.setattr(util, "find_spec", real)


def test_missing_host_parts_name_the_host(webui, monkeypatch):
    host = WebuiHost()
    monkeypatch.delattr(webui.sd_models, "send_model_to_trash")
    with pytest.raises(HostError, match=r"AUTOMATIC1111 .*send_model_to_trash"):
        host.release_model()
    with pytest.raises(HostError, match="modules.nonexistent"):
        host.module("nonexistent")


def test_call_tolerant_drops_unknown_keywords():
    def old(name, save=True):
        return (name, save)

    assert call_tolerant(old, "x", save=False, refresh=True, preset=None) == ("x", False)
    assert call_tolerant(lambda name, **kw: kw, "x", a=1) == {"a": 1}


def test_scheduler_is_passed_only_where_the_host_has_the_field():
    class WithoutScheduler:
        def __init__(self, prompt="", seed=-1):
            pass

    class WithScheduler(WithoutScheduler):
        def __init__(self, prompt="", seed=-1, scheduler=None):
            pass

    assert WebuiHost._scheduler_option(WithoutScheduler) == {}
    assert WebuiHost._scheduler_option(WithScheduler) == {"scheduler": "Automatic"}


class WeightlessLinear(torch.nn.Module):
    """What Forge's using_forge_operations puts in torch.nn.Linear's place while it loads a model."""

    def __init__(self, *args, **kwargs):
        super().__init__()
        self.weight = None


def test_gpu_lock_waits_while_the_host_has_torch_layers_swapped(webui, monkeypatch):
    host = WebuiHost()
    monkeypatch.setattr(torch.nn, "Linear", WeightlessLinear)
    assert torch_swaps() == ["torch.nn.Linear"]
    restored = threading.Timer(0.3, lambda: setattr(torch.nn, "Linear", torch.nn.modules.linear.Linear))
    restored.start()
    with host.gpu_lock():
        layer = torch.nn.Linear(2, 2)  # what our model building would get inside the lock
    restored.join()
    assert layer.weight is not None and torch_swaps() == []


def test_gpu_lock_gives_up_with_a_clear_error_when_torch_stays_swapped(webui, monkeypatch):
    host = WebuiHost()
    host.host_load_wait_s = 0.3

    def load_state_dict(module, state_dict, strict=True):  # A1111's window lacks `assign`
        return None

    monkeypatch.setattr(torch.nn.Module, "load_state_dict", load_state_dict)
    with pytest.raises(HostError, match=r"replaced torch\.nn\.Module\.load_state_dict"), host.gpu_lock():
        pass
    assert webui.call_queue.queue_lock.owner is None  # the host's queue is free again



def test_host_t5_tokenizer_folders_are_registered(webui, monkeypatch):
    """Forge's bundled SD3/Flux tokenizer folders and A1111's hub-cache copy are searched for T5's tokenizer."""
    import huggingface_hub.constants

    from dreambooth.models import tokenizer as tokenizers

    root = webui.tmp / "forge"
    (root / "modules_forge").mkdir(parents=True)
    (root / "modules_forge" / "__init__.py").write_text("")
    bundled = [root / relative for relative in FORGE_T5_TOKENIZERS]
    for folder in bundled:
        folder.mkdir(parents=True)
    snapshot = webui.tmp / "hub" / A1111_T5_CACHE / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(webui.tmp / "hub"))
    monkeypatch.syspath_prepend(str(root))
    assert host_t5_tokenizer_dirs(FORGE) == [*bundled, snapshot]
    assert host_t5_tokenizer_dirs(A1111) == [snapshot]
    try:
        WebuiHost(A1111)
        assert tokenizers.t5_search_dirs(None, "tokenizer_3") == [snapshot]
    finally:
        tokenizers.register_t5_tokenizer_dirs([])
def test_gpu_lock_waits_while_accelerate_builds_a_model_on_the_meta_device(webui):
    """diffusers' loaders (SD.Next's, or any host's pipeline) build under accelerate's init_empty_weights, which
    swaps Module.register_parameter for all threads: a model we built then would have meta weights."""
    accelerate = pytest.importorskip("accelerate")
    inside, leave = threading.Event(), threading.Event()

    def host_loader():
        with accelerate.init_empty_weights():
            inside.set()
            leave.wait(5)

    loader = threading.Thread(target=host_loader)
    loader.start()
    inside.wait(5)
    assert torch_swaps() == ["torch.nn.Module.register_parameter"]
    threading.Timer(0.3, leave.set).start()
    with WebuiHost().gpu_lock():
        layer = torch.nn.Linear(2, 2)
    loader.join()
    assert not layer.weight.is_meta and torch_swaps() == []


def test_gpu_lock_waits_for_a_first_model_load_in_progress_without_keeping_the_lock(webui):
    """A1111 and Forge Classic load their first model under model_data.lock from a start-up thread; a model we
    loaded meanwhile swapped Module.register_parameter under it (Forge Classic's load then failed with meta
    weights). gpu_lock waits for such a load, then lets the lock go (A1111 blocks shared.sd_model readers on it)."""
    lock, order = threading.Lock(), []
    webui.sd_models.model_data.lock = lock

    def host_startup_load():
        with lock:
            time.sleep(0.3)
            order.append("host loaded")

    loader = threading.Thread(target=host_startup_load)
    loader.start()
    time.sleep(0.05)
    with WebuiHost().gpu_lock():
        order.append("we build")
        assert not lock.locked()
    loader.join()
    assert order == ["host loaded", "we build"]


@pytest.fixture
def classic(tmp_path, monkeypatch):
    """The fake Forge Classic (A1111's loading over ldm_patched) with one checkpoint loaded at start-up."""
    purge_fakes()
    monkeypatch.syspath_prepend(str(HERE / "fake_webui"))
    monkeypatch.syspath_prepend(str(HERE / "fake_classic"))
    models = tmp_path / "models"
    (models / "Stable-diffusion").mkdir(parents=True)
    (models / "Stable-diffusion" / "base.safetensors").write_bytes(b"x")
    shared = importlib.import_module("modules.shared")
    shared.models_path = str(models)
    sd_models = importlib.import_module("modules.sd_models")
    info = sd_models.CheckpointInfo(str(models / "Stable-diffusion" / "base.safetensors"))
    sd_models.load_model(info)
    yield types.SimpleNamespace(shared=shared, sd_models=sd_models, info=info, models=models,
                                processing=importlib.import_module("modules.processing"),
                                memory=importlib.import_module("ldm_patched.modules.model_management"))
    purge_fakes()


def test_forge_classic_releases_through_ldm_patched_and_loads_its_model_back(classic):
    host = WebuiHost()
    assert host.flavour == CLASSIC and host.name == "Forge classic"
    host.release_model()
    assert classic.sd_models.model_data.sd_model is None and classic.sd_models.model_data.loaded_sd_models == []
    assert classic.memory.calls == ["unload_all_models", "soft_empty_cache"]
    host.generate(GenerationRequest("x", count=1, checkpoint=classic.info.filename))  # class images after release
    created = classic.processing.created[0].kwargs
    assert "scheduler" not in created and created["override_settings"] == {"sd_model_checkpoint": classic.info.title}
    assert ("reload_model_weights",) in classic.sd_models.calls  # loaded again first: Classic would not
    host.release_model()
    host.restore_model()
    name, loaded = classic.sd_models.calls[-1]
    assert name == "load_model" and loaded.filename == classic.info.filename


def test_forge_classic_release_lets_go_of_models_its_main_thread_kept(classic):
    """Classic's main thread keeps each task's result: the start-up load's task stays on finished_list and the
    loop keeps the last task it ran. Released, the model must be free (on CPU an SDXL stayed beside a new one)."""
    import gc
    import weakref

    main_thread = importlib.import_module("modules_forge.main_thread")
    start_up = main_thread.Task(1, lambda: classic.sd_models.model_data.sd_model, (), {})
    start_up.work()
    main_thread.finished_list.append(start_up)  # queued by async_run at start-up: nobody takes it off
    last_run = main_thread.Task(2, lambda: classic.sd_models.model_data.sd_model, (), {})
    last_run.work()  # taken off finished_list by its waiter, still held by the loop
    unrelated = main_thread.Task(3, lambda: "an image", (), {})
    unrelated.work()
    main_thread.finished_list.append(unrelated)
    model = weakref.ref(classic.sd_models.model_data.sd_model)
    WebuiHost().release_model()
    gc.collect()
    assert model() is None
    assert start_up.result is None and last_run.result is None and unrelated.result == "an image"
    main_thread.finished_list.clear()


def test_torch_swaps_sees_a1111_initialize_on_meta(monkeypatch):
    """A1111's InitializeOnMeta replaces layer constructors and Module.to rather than whole classes."""
    original_init = torch.nn.Linear.__init__
    monkeypatch.setattr(torch.nn.Linear, "__init__", lambda *args, **kwargs: original_init(*args, **kwargs))
    monkeypatch.setattr(torch.nn.Module, "to", lambda *args, **kwargs: None)
    assert torch_swaps() == ["torch.nn.Module.to", "torch.nn.Linear.__init__"]


def test_forge_renders_flow_models_with_the_simple_schedule(forge, tmp_path, monkeypatch):
    """Forge's 'Automatic' schedule makes every SD3 render NaN (a 0 -> 0 last step); 'Simple' is asked there."""
    from dreambooth.host import webui as webui_module

    monkeypatch.setattr(webui_module, "is_flow_checkpoint", lambda path: path is not None)
    checkpoint = forge.models / "Stable-diffusion" / "base.safetensors"
    WebuiHost().generate(GenerationRequest("x", count=1, checkpoint=checkpoint))
    assert forge.processing.created[-1].kwargs["scheduler"] == "Simple"
    WebuiHost().generate(GenerationRequest("x", count=1))  # the host's own model: nothing known, its default
    assert forge.processing.created[-1].kwargs["scheduler"] == "Automatic"


def test_a1111_keeps_the_automatic_schedule_for_flow_models(webui, monkeypatch):
    from dreambooth.host import webui as webui_module

    monkeypatch.setattr(webui_module, "is_flow_checkpoint", lambda path: True)
    assert WebuiHost()._scheduler(Path("sd3.safetensors")) == "Automatic"


def _header_only_file(path: Path, family: str) -> Path:
    """A single file with one tiny tensor under each prefix a checkpoint of `family` has (UNet/VAE, encoders)."""
    from safetensors.torch import save_file

    from dreambooth.families import get_family
    from dreambooth.families.tables import UNET_PREFIX

    prefixes = [UNET_PREFIX, "first_stage_model.", *(spec.ldm_prefix for spec in get_family(family).text_encoders
                                                        if not spec.optional)]
    if family == "sd3":
        prefixes.append(f"{UNET_PREFIX}joint_blocks.0.")  # SD3's MMDiT is told from SDXL by its joint blocks
    save_file({f"{prefix}x.weight": torch.zeros(1) for prefix in prefixes}, str(path))
    return path


def test_flow_checkpoints_are_told_from_their_header(tmp_path):
    from dreambooth.host.webui import is_flow_checkpoint

    sd3 = _header_only_file(tmp_path / "sd3.safetensors", "sd3")
    sd1 = _header_only_file(tmp_path / "sd1.safetensors", "sd1")
    (tmp_path / "broken.safetensors").write_bytes(b"not a file")
    assert is_flow_checkpoint(sd3) and not is_flow_checkpoint(sd1)
    assert not is_flow_checkpoint(tmp_path / "broken.safetensors") and not is_flow_checkpoint(None)
