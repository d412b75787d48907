"""The web UI host: AUTOMATIC1111 1.10, Forge and SD.Next.

This is the only module of the package that imports the host's `modules.*`, always lazily inside
functions, so the package imports anywhere. Facts this adapter relies on (checked against A1111 v1.10.1):

* txt2img: StableDiffusionProcessingTxt2Img(...) + process_images(p) + p.close(); image i of a call gets
  seed + i, a checkpoint is chosen with override_settings={'sd_model_checkpoint': title}.
* `call_queue.queue_lock` is a FIFO lock that is NOT re-entrant: we take it once per thread (a per-thread
  depth counter) and never from a handler wrapped in wrap_gradio_gpu_call (that handler already holds it).
* `unload_model_weights()` only moves the model to the CPU; freeing memory needs send_model_to_trash and
  dropping every reference (model_data.sd_model, loaded_sd_models, the state-dict cache).
* Forge loads the model lazily inside processing (forge_model_reload, keyed by forge_loading_parameters) and
  selects checkpoints with main_entry.checkpoint_change; SD.Next keeps folders in opts and has
  unload_model_weights(op=...) / reload_model_weights(op=...) that really free and reload.
* While a host builds a model it swaps torch entry points (Forge: torch.nn layer classes; A1111:
  Module.load_state_dict), so gpu_lock also waits until torch is as shipped before we build anything.

The Forge names used here, with their parameters at the Forge commit that was run for real, are recorded in
tests/host/facts/forge.json; tests/host/test_forge_facts.py keeps this module and the fake Forge to that list.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import importlib.util
import inspect
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DreamboothError, ModelError
from ..generation import GenerationRequest
from ..models.tokenizer import register_t5_tokenizer_dirs
from ..store import Layout

log = logging.getLogger(__name__)

A1111, FORGE, SDNEXT = "a1111", "forge", "sdnext"
LABELS = {A1111: "AUTOMATIC1111", FORGE: "Forge", SDNEXT: "SD.Next"}
# Where each host keeps the LoRA extension's `networks` module (first importable one wins).
NETWORKS_MODULES = {A1111: ("networks",), FORGE: ("networks", "modules_forge.lora.networks"),
                    SDNEXT: ("modules.lora.networks", "networks")}
PROGRESS_RESOLUTION = 1000
SCHEDULER = "Automatic"  # the sampler's own schedule, a choice in A1111 >= 1.9 and Forge
SETTINGS_SECTION = ("dreambooth", "DreamBooth training")
# Host-wide defaults shown in the web UI's Settings: (key, default, label, choices or None).
SETTINGS: tuple[tuple[str, str, str, tuple[str, ...] | None], ...] = (
    ("dreambooth_save_precision", "fp16", "Default save precision of new models (fp16 halves file size; "
     "fp32 keeps every small update)", ("fp16", "bf16", "fp32")),
    ("dreambooth_mixed_precision", "bf16", "Default compute precision of new models (fp16 needs CUDA)",
     ("bf16", "fp16", "no")),
    ("dreambooth_models_path", "", "Folder for DreamBooth models (empty: <models>/dreambooth; "
     "--dreambooth-models-path wins; needs a restart)", None),
)
# Settings that become TrainingConfig defaults of newly created models: setting key -> config field.
CONFIG_DEFAULTS = {"dreambooth_save_precision": "save_precision", "dreambooth_mixed_precision": "mixed_precision"}  # progress is reported to the host as sampling_step / 1000


# torch entry points web UIs swap for their own while they build a model: Forge's backend (using_forge_operations)
# replaces these torch.nn layer classes with weightless ones, A1111 (sd_disable_initialization) replaces
# Module.load_state_dict and the torch.nn.init functions. A model we build in that window is broken.
SWAPPED_LAYERS = ("Linear", "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d",
                  "GroupNorm", "LayerNorm", "Embedding")
SWAPPED_METHODS = ("load_state_dict", "_load_from_state_dict")
SWAPPED_INITS = ("kaiming_uniform_", "uniform_", "normal_")
HOST_LOAD_WAIT_S = 300.0  # how long we wait for the host to finish loading its model
HOST_LOAD_POLL_S = 0.2


class HostError(DreamboothError):
    """The web UI lacks something this adapter needs; the message names the host and its version."""


def torch_swaps() -> list[str]:
    """The torch entry points the host has currently replaced (empty when torch is as shipped)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return []
    swapped = [f"torch.nn.{name}" for name in SWAPPED_LAYERS
               if not getattr(getattr(torch.nn, name, None), "__module__", "torch.").startswith("torch.")]
    swapped += [f"torch.nn.Module.{name}" for name in SWAPPED_METHODS
                if getattr(getattr(torch.nn.Module, name), "__qualname__", "") != f"Module.{name}"]
    swapped += [f"torch.nn.init.{name}" for name in SWAPPED_INITS
                if getattr(getattr(torch.nn.init, name), "__module__", "") != "torch.nn.init"]
    return swapped


def wait_for_torch_as_shipped(host_name: str, timeout_s: float = HOST_LOAD_WAIT_S,
                              poll_s: float = HOST_LOAD_POLL_S) -> None:
    """Wait while the host is inside a model load that swaps torch entry points; a HostError after timeout_s."""
    deadline = time.monotonic() + timeout_s
    swapped = torch_swaps()
    if swapped:
        log.info("%s is loading a model (%s replaced); waiting for it to finish.", host_name, ", ".join(swapped))
    while swapped:
        if time.monotonic() >= deadline:
            raise HostError(f"{host_name} has replaced {', '.join(swapped)} for {timeout_s:.0f} s (a model load "
                            "that did not finish, or another extension); models built now would be broken. "
                            "Wait until the web UI's model has loaded and try again.")
        time.sleep(poll_s)
        swapped = torch_swaps()


# Where web UIs keep T5's tokenizer files (SD3's third text encoder, Flux's second), read and never fetched:
# Forge ships them under backend/huggingface/ (checked at dfdcbab); A1111 1.10 (modules/models/sd3/sd3_cond.py)
# loads google/t5-v1_1-xxl's through the Hugging Face cache, so it is there once the host has rendered SD3.
FORGE_T5_TOKENIZERS = ("backend/huggingface/stabilityai/stable-diffusion-3-medium-diffusers/tokenizer_3",
                       "backend/huggingface/black-forest-labs/FLUX.1-dev/tokenizer_2")
A1111_T5_CACHE = "models--google--t5-v1_1-xxl"


def host_t5_tokenizer_dirs(flavour: str) -> list[Path]:
    """The folders this web UI keeps T5 tokenizer files in (existing ones only)."""
    found: list[Path] = []
    spec = importlib.util.find_spec("modules_forge") if flavour == FORGE else None
    if spec is not None and spec.submodule_search_locations:
        root = Path(next(iter(spec.submodule_search_locations))).parent
        found += [root / relative for relative in FORGE_T5_TOKENIZERS]
    try:
        from huggingface_hub.constants import HF_HUB_CACHE
    except ImportError:  # diffusers depends on huggingface_hub; without it there is no cache to read
        HF_HUB_CACHE = None
    if HF_HUB_CACHE:
        found += sorted((Path(HF_HUB_CACHE) / A1111_T5_CACHE / "snapshots").glob("*"))
    return [folder for folder in found if folder.is_dir()]


def detect_flavour() -> str:
    """Which web UI imported us: Forge ships modules_forge, SD.Next modules.modeldata, else A1111."""
    if importlib.util.find_spec("modules_forge") is not None:
        return FORGE
    with contextlib.suppress(ImportError, ValueError):
        if importlib.util.find_spec("modules.modeldata") is not None:
            return SDNEXT
    return A1111


def host_version(flavour: str) -> str:
    """The host's version for messages; 'unknown version' when it cannot be found cheaply."""
    readers: dict[str, tuple[tuple[str, str], ...]] = {
        A1111: (("modules.launch_utils", "git_tag"),),
        FORGE: (("modules_forge.forge_version", "version"), ("modules.launch_utils", "git_tag")),
        SDNEXT: (("installer", "version"), ("modules.shared", "version")),
    }
    for module_name, attribute in readers.get(flavour, ()):
        with contextlib.suppress(Exception):
            value = getattr(importlib.import_module(module_name), attribute)
            value = value() if callable(value) else value
            if isinstance(value, dict):
                value = value.get("app") or value.get("version") or value.get("commit")
            if value:
                return str(value)
    return "unknown version"


def call_tolerant(function: Callable[..., Any], *args: Any, **options: Any) -> Any:
    """Call `function` with only the keyword options its signature accepts (host APIs differ by version)."""
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):
        return function(*args, **options)
    if any(p.kind == p.VAR_KEYWORD for p in parameters.values()):
        return function(*args, **options)
    return function(*args, **{k: v for k, v in options.items() if k in parameters})


def parse_api_auth(text: str | None) -> dict[str, str] | None:
    """A1111's --api-auth 'user:pass,user2:pass2' as {user: password}; None when auth is off."""
    if not text:
        return None
    credentials = {}
    for pair in text.split(","):
        user, sep, password = pair.strip().partition(":")
        if not sep or not user:
            raise ConfigError(f"--api-auth entry {pair.strip()!r} is not 'user:password'.")
        credentials[user] = password
    return credentials


class WebuiHost:
    """A Host over the running web UI."""

    sampler_name = "Euler a"  # present in every supported host
    host_load_wait_s = HOST_LOAD_WAIT_S

    def __init__(self, flavour: str | None = None, models_path_override: str | None = None):
        self.flavour = flavour or detect_flavour()
        self.version = host_version(self.flavour)
        self.name = f"{LABELS[self.flavour]} {self.version}"
        self._local = threading.local()
        self._released_checkpoint: Any = None
        self.layout = self._layout(models_path_override)
        register_t5_tokenizer_dirs(host_t5_tokenizer_dirs(self.flavour))

    # --- access to the host ----------------------------------------------------------------------
    def module(self, name: str) -> Any:
        """`modules.<name>`, or a HostError naming the host and version."""
        try:
            return importlib.import_module(f"modules.{name}")
        except ImportError as error:
            raise HostError(f"{self.name} has no modules.{name} ({error}); this extension supports "
                            "AUTOMATIC1111 1.10, Forge and SD.Next.") from None

    def need(self, owner: Any, attribute: str) -> Any:
        value = getattr(owner, attribute, None)
        if value is None:
            where = getattr(owner, "__name__", type(owner).__name__)
            raise HostError(f"{self.name}: {where}.{attribute} is missing; this version of the web UI is not "
                            "supported, update it or the extension.")
        return value

    def cmd_opts(self) -> Any:
        return self.need(self.module("shared"), "cmd_opts")

    # --- folders ----------------------------------------------------------------------------------
    def _layout(self, models_path_override: str | None) -> Layout:
        shared, options = self.module("shared"), self.cmd_opts()
        models_dir = Path(getattr(shared, "models_path", None) or self.module("paths").models_path)
        opts = getattr(shared, "opts", None)
        from_opts = self.flavour == SDNEXT  # SD.Next keeps folder settings in opts, not on the command line
        source = opts if from_opts else options
        checkpoints = getattr(source, "ckpt_dir", None) or models_dir / "Stable-diffusion"
        loras = getattr(source, "lora_dir", None) or getattr(options, "lora_dir", None) or models_dir / "Lora"
        ours = (models_path_override or getattr(options, "dreambooth_models_path", None)
                or getattr(opts, "dreambooth_models_path", None) or models_dir / "dreambooth")
        return Layout.under(models_dir, Path(checkpoints), Path(loras), Path(ours))

    def data_roots(self) -> list[Path] | None:
        raw = getattr(self.cmd_opts(), "dreambooth_data_roots", None)
        return [Path(part) for part in raw.split(os.pathsep) if part] if raw else None

    def api_credentials(self) -> dict[str, str] | None:
        return parse_api_auth(getattr(self.cmd_opts(), "api_auth", None))

    # --- settings ---------------------------------------------------------------------------------
    def register_settings(self) -> None:
        """Add our section to the web UI's Settings tab (called from on_ui_settings)."""
        shared = self.module("shared")
        option_info, opts = self.need(shared, "OptionInfo"), self.need(shared, "opts")
        for key, default, label, choices in SETTINGS:
            if choices is None:
                info = option_info(default, label, section=SETTINGS_SECTION)
            else:
                import gradio as gr

                info = option_info(default, label, gr.Radio, {"choices": list(choices)}, section=SETTINGS_SECTION)
            self.need(opts, "add_option")(key, info)

    def config_defaults(self) -> dict[str, str]:
        """TrainingConfig values for new models from the Settings tab (empty when not set)."""
        opts = getattr(self.module("shared"), "opts", None)
        values = {field: getattr(opts, key, None) for key, field in CONFIG_DEFAULTS.items()}
        return {field: value for field, value in values.items() if value}

    # --- lists ------------------------------------------------------------------------------------
    def refresh_checkpoints(self) -> None:
        self.need(self.module("sd_models"), "list_models")()

    def list_checkpoints(self) -> list[Path]:
        sd_models = self.module("sd_models")
        self.refresh_checkpoints()
        infos = self.need(sd_models, "checkpoints_list").values()
        return sorted({Path(info.filename) for info in infos if Path(info.filename).is_file()})

    def refresh_loras(self) -> None:
        for name in NETWORKS_MODULES[self.flavour]:
            module = sys.modules.get(name)
            if module is None:
                with contextlib.suppress(ImportError):
                    module = importlib.import_module(name)
            refresh = getattr(module, "list_available_networks", None)
            if refresh is not None:
                refresh()
                return
        log.info("%s: no LoRA networks module loaded; new LoRAs appear after the LoRA tab's refresh.", self.name)

    # --- queue, interrupt, progress -----------------------------------------------------------------
    @contextlib.contextmanager
    def gpu_lock(self) -> Iterator[None]:
        """The host's queue_lock, taken at most once per thread (it is not re-entrant)."""
        if getattr(self._local, "depth", 0):
            self._local.depth += 1
            try:
                yield None
            finally:
                self._local.depth -= 1
            return
        lock = self.need(self.module("call_queue"), "queue_lock")
        with lock:
            self._local.depth = 1
            try:
                # A1111 loads its start-up model outside queue_lock: wait until torch is its own again.
                wait_for_torch_as_shipped(self.name, self.host_load_wait_s)
                yield None
            finally:
                self._local.depth = 0

    def state(self) -> Any:
        return self.need(self.module("shared"), "state")

    def interrupted(self) -> bool:
        state = self.state()
        return bool(getattr(state, "interrupted", False) or getattr(state, "stopping_generation", False))

    def progress(self, fraction: float, text: str) -> None:
        state = self.state()
        if getattr(state, "job_count", 0) <= 0:
            state.job_count = 1
        state.sampling_steps = PROGRESS_RESOLUTION
        state.sampling_step = int(max(0.0, min(1.0, fraction)) * PROGRESS_RESOLUTION)
        state.textinfo = text

    # --- model lifecycle -------------------------------------------------------------------------------
    def release_model(self) -> None:
        """Free the host's model(s) from GPU and RAM for training."""
        sd_models = self.module("sd_models")
        releasers = {A1111: self._release_a1111, FORGE: self._release_forge, SDNEXT: self._release_sdnext}
        releasers[self.flavour](sd_models)
        gc.collect()
        self._empty_cuda_cache()

    def restore_model(self) -> None:
        """Load the model back (Forge loads it lazily at the next generation, as it always does)."""
        sd_models = self.module("sd_models")
        if self.flavour == A1111:
            if self._released_checkpoint is not None:
                self.need(sd_models, "load_model")(self._released_checkpoint)
        elif self.flavour == FORGE:
            self._forge_refresh_parameters()
        else:
            call_tolerant(self.need(sd_models, "reload_model_weights"), op="model")
        self._released_checkpoint = None

    def _release_a1111(self, sd_models: Any) -> None:
        model_data = self.need(sd_models, "model_data")
        trash = self.need(sd_models, "send_model_to_trash")
        current = model_data.sd_model
        self._released_checkpoint = getattr(current, "sd_checkpoint_info", None)
        for model in {id(m): m for m in [current, *getattr(model_data, "loaded_sd_models", [])] if m}.values():
            trash(model)
        model_data.sd_model = None
        model_data.loaded_sd_models = []
        cache = getattr(sd_models, "checkpoints_loaded", None)
        if cache is not None:
            cache.clear()  # state dicts kept in RAM by the 'checkpoints to cache' setting

    def _release_forge(self, sd_models: Any) -> None:
        model_data = self.need(sd_models, "model_data")
        model_data.sd_model = None  # Forge keeps one model here (no loaded_sd_models list as in A1111)
        if hasattr(model_data, "forge_hash"):
            model_data.forge_hash = None  # forces forge_model_reload at the next generation
        with contextlib.suppress(ImportError):
            memory = importlib.import_module("backend.memory_management")
            for name in ("unload_all_models", "soft_empty_cache"):
                function = getattr(memory, name, None)
                if function is not None:
                    function()
        cache = getattr(sd_models, "checkpoints_loaded", None)
        if cache is not None:
            cache.clear()

    def _release_sdnext(self, sd_models: Any) -> None:
        call_tolerant(self.need(sd_models, "unload_model_weights"), op="model")

    def _forge_refresh_parameters(self) -> None:
        with contextlib.suppress(ImportError):
            main_entry = importlib.import_module("modules_forge.main_entry")
            refresh = getattr(main_entry, "refresh_model_loading_parameters", None)
            if refresh is not None:
                refresh()

    @staticmethod
    def _empty_cuda_cache() -> None:
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()

    # --- drawing -----------------------------------------------------------------------------------------
    def checkpoint_info(self, path: Path) -> Any:
        """The host's CheckpointInfo for a file, refreshing the list once if it is new."""
        sd_models = self.module("sd_models")
        wanted = Path(path).resolve()
        for attempt in range(2):
            for info in self.need(sd_models, "checkpoints_list").values():
                if Path(info.filename).resolve() == wanted:
                    return info
            if attempt == 0:
                self.refresh_checkpoints()
        raise ModelError(f"Checkpoint {path} is not in {self.name}'s checkpoint list; put it in "
                         f"{self.layout.checkpoints_dir} and press the refresh button.")

    @contextlib.contextmanager
    def _forge_checkpoint(self, title: str | None) -> Iterator[None]:
        """Forge: select the checkpoint through main_entry (it loads lazily), then select the old one back."""
        if title is None:
            yield None
            return
        main_entry = importlib.import_module("modules_forge.main_entry")
        change = self.need(main_entry, "checkpoint_change")
        previous = getattr(self.need(self.module("shared"), "opts"), "sd_model_checkpoint", None)
        call_tolerant(change, title, preset=None, save=False, refresh=True)
        try:
            yield None
        finally:
            if previous is not None:
                call_tolerant(change, previous, preset=None, save=False, refresh=True)

    def _current_model(self) -> Any:
        try:
            return self.module("shared").sd_model
        except Exception:  # Forge raises until its lazy load happened
            return None

    @staticmethod
    def _scheduler_option(txt2img: Any) -> dict[str, str]:
        """scheduler='Automatic' where the host has the field (A1111 >= 1.9, Forge): without it Forge logs a
        'Sampler Scheduler autocorrection' warning for every image."""
        try:
            parameters = inspect.signature(txt2img).parameters
        except (TypeError, ValueError):
            return {}
        return {"scheduler": SCHEDULER} if "scheduler" in parameters else {}

    def generate(self, request: GenerationRequest) -> list[Any]:
        """Render through the host's txt2img; the caller holds gpu_lock (never taken here)."""
        processing = self.module("processing")
        title = self.checkpoint_info(request.checkpoint).title if request.checkpoint is not None else None
        overrides = {"sd_model_checkpoint": title} if title and self.flavour != FORGE else {}
        images: list[Any] = []
        batch = max(1, request.batch_size)
        with self._forge_checkpoint(title if self.flavour == FORGE else None):
            for start in range(0, request.count, batch):
                if self.interrupted():
                    break
                size = min(batch, request.count - start)
                images.extend(self._txt2img(processing, request, request.seed + start, size, overrides))
        return images

    def _txt2img(self, processing: Any, request: GenerationRequest, seed: int, size: int,
                 overrides: dict[str, Any]) -> list[Any]:
        txt2img = self.need(processing, "StableDiffusionProcessingTxt2Img")
        p = txt2img(
            sd_model=self._current_model(), prompt=request.prompt, negative_prompt=request.negative_prompt,
            sampler_name=self.sampler_name, batch_size=size, n_iter=1, steps=request.steps,
            cfg_scale=request.cfg_scale, width=request.width, height=request.height, seed=seed,
            do_not_save_samples=True, do_not_save_grid=True, override_settings=dict(overrides),
            override_settings_restore_afterwards=True, **self._scheduler_option(txt2img))
        try:
            processed = self.need(processing, "process_images")(p)
        finally:
            p.close()
        first = getattr(processed, "index_of_first_image", 0)  # a grid may come first
        return list(processed.images[first:first + size])


def register_callbacks(on_ui_tabs: Callable[[], Any], on_ui_settings: Callable[[], None],
                       on_app_started: Callable[[Any, Any], None]) -> None:
    """Register the extension's callbacks with the web UI (A1111, Forge and SD.Next share this API)."""
    import modules.script_callbacks as script_callbacks

    script_callbacks.on_ui_tabs(on_ui_tabs)
    script_callbacks.on_ui_settings(on_ui_settings)
    script_callbacks.on_app_started(on_app_started)
