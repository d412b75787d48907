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
  selects checkpoints with main_entry.checkpoint_change.
* SD.Next (diffusers pipelines) copies its folder settings into cmd_opts, protects its API with the UI's --auth
  users, has unload_model_weights(op) / reload_model_weights(op=...) for its model and refiner slots that
  really free and reload, loads lazily under model_data.lock (outside queue_lock), and returns None from
  process_images when it has no model.
* While a host builds a model it swaps torch entry points (Forge: torch.nn layer classes; A1111:
  Module.load_state_dict), so gpu_lock also waits until torch is as shipped before we build anything.

The names used here, with their parameters at the commit of each host that was run for real, are recorded in
tests/host/facts/<host>.json; tests/host/test_host_facts.py keeps this module and the fakes to those lists.
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
from ..heap import return_freed_memory
from ..models.tokenizer import register_t5_tokenizer_dirs
from ..store import Layout

log = logging.getLogger(__name__)

A1111, FORGE, CLASSIC, SDNEXT = "a1111", "forge", "forge-classic", "sdnext"
# CLASSIC: Forge on its gradio 3 code base (ldm_patched; Forge Classic, and Forge itself before August 2024).
LABELS = {A1111: "AUTOMATIC1111", FORGE: "Forge", CLASSIC: "Forge", SDNEXT: "SD.Next"}
# Where each host keeps the LoRA extension's `networks` module (first importable one wins).
NETWORKS_MODULES = {A1111: ("networks",), FORGE: ("networks", "modules_forge.lora.networks"), CLASSIC: ("networks",),
                    SDNEXT: ("modules.lora.lora_load", "modules.lora.networks", "networks")}
SDNEXT_SLOTS = (("model", "sd_model"), ("refiner", "sd_refiner"))  # unload/reload op, model_data attribute
PROGRESS_RESOLUTION = 1000
SCHEDULER = "Automatic"  # the sampler's own schedule, a choice in A1111 >= 1.9 and Forge
# Forge (dfdcbab) builds the "Automatic" (and "Uniform") schedule of a flow-matching model from t = 999..0 through
# its SD3 predictor, which gives sigma 0 at t = 0 before the closing 0: Euler's last step divides 0 by 0 and every
# SD3 render is NaN, black. "Simple" (Forge's default for Flux) ends at one zero.
FLOW_SCHEDULER = "Simple"
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
# Module.load_state_dict and the torch.nn.init functions, and diffusers' loaders (SD.Next's, and any host's
# diffusers pipeline) replace the torch.nn.init functions (no_init_weights) and, through accelerate's
# init_empty_weights, Module.register_parameter/register_buffer (new weights land on the meta device).
# A model we build in that window is broken.
SWAPPED_LAYERS = ("Linear", "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d",
                  "GroupNorm", "LayerNorm", "Embedding")
SWAPPED_METHODS = ("load_state_dict", "_load_from_state_dict", "register_parameter", "register_buffer", "to")
# A1111's InitializeOnMeta also replaces these layers' constructors (new weights on the meta device).
SWAPPED_CONSTRUCTORS = ("Linear", "Conv2d", "MultiheadAttention")
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
    swapped += [f"torch.nn.{name}.__init__" for name in SWAPPED_CONSTRUCTORS if f"torch.nn.{name}" not in swapped
                and getattr(getattr(torch.nn, name).__init__, "__qualname__", "") != f"{name}.__init__"]
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
    """Which web UI imported us: Forge ships modules_forge (on gradio 3 with ldm_patched: Forge Classic),
    SD.Next modules.modeldata, else A1111."""
    if importlib.util.find_spec("modules_forge") is not None:
        return CLASSIC if importlib.util.find_spec("ldm_patched") is not None else FORGE
    with contextlib.suppress(ImportError, ValueError):
        if importlib.util.find_spec("modules.modeldata") is not None:
            return SDNEXT
    return A1111


def host_version(flavour: str) -> str:
    """The host's version for messages; 'unknown version' when it cannot be found cheaply."""
    readers: dict[str, tuple[tuple[str, str], ...]] = {
        A1111: (("modules.launch_utils", "git_tag"),),
        FORGE: (("modules_forge.forge_version", "version"), ("modules.launch_utils", "git_tag")),
        CLASSIC: (("modules_forge.forge_version", "version"), ("modules.launch_utils", "git_tag")),
        SDNEXT: (("installer", "version"), ("modules.shared", "version")),
    }
    for module_name, attribute in readers.get(flavour, ()):
        with contextlib.suppress(Exception):
            value = getattr(importlib.import_module(module_name), attribute)
            value = value() if callable(value) else value
            if isinstance(value, dict):  # SD.Next: {'app': 'sd.next', 'commit': ..., 'updated': ...}
                value = version_from_dict(value)
            if value:
                return str(value)
    return "unknown version"


def version_from_dict(described: dict[str, Any]) -> str:
    """'058a7f0 (2026-07-23)' from SD.Next's installer.version; its 'app' name when git told it nothing."""
    known = {key: value for key, value in described.items() if value and value != "unknown"}
    if "commit" in known:
        return f"{known['commit']} ({known['updated']})" if "updated" in known else str(known["commit"])
    return str(known.get("version") or known.get("app") or "")


def call_tolerant(function: Callable[..., Any], *args: Any, **options: Any) -> Any:
    """Call `function` with only the keyword options its signature accepts (host APIs differ by version)."""
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):
        return function(*args, **options)
    if any(p.kind == p.VAR_KEYWORD for p in parameters.values()):
        return function(*args, **options)
    return function(*args, **{k: v for k, v in options.items() if k in parameters})


def parse_api_auth(text: str | None, flag: str = "--api-auth") -> dict[str, str] | None:
    """A1111's --api-auth 'user:pass,user2:pass2' as {user: password}; None when auth is off.

    Quotes around names and passwords are dropped, as SD.Next does for its --auth."""
    if not text or not text.strip():
        return None
    credentials = {}
    for pair in filter(None, (part.strip() for part in text.replace("\n", ",").split(","))):
        user, sep, password = pair.partition(":")
        user, password = user.replace('"', "").strip(), password.replace('"', "").strip()
        if not sep or not user:
            raise ConfigError(f"{flag} entry {pair!r} is not 'user:password'.")
        credentials[user] = password
    return credentials


def sdnext_credentials(auth: str | None, auth_file: str | None) -> dict[str, str] | None:
    """SD.Next's API users: --auth 'user:pass,...' plus the lines of --auth-file (its --api-auth is unused)."""
    credentials = parse_api_auth(auth, "--auth") or {}
    if auth_file:
        try:
            text = Path(auth_file).read_text(encoding="utf8")
        except OSError as error:
            raise ConfigError(f"--auth-file {auth_file} cannot be read ({error}).") from None
        credentials.update(parse_api_auth(text, "--auth-file") or {})
    return credentials or None


def is_flow_checkpoint(path: Path | None) -> bool:
    """Whether a checkpoint file is a flow-matching model (SD3, Flux), from its header; False when unreadable."""
    from safetensors import SafetensorError, safe_open

    from ..families import transformer_family_of

    if path is None or path.suffix.lower() != ".safetensors" or not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as handle:
            return transformer_family_of(handle.keys()) is not None
    except (OSError, SafetensorError):
        return False


class WebuiHost:
    """A Host over the running web UI."""

    sampler_name = "Euler a"  # present in every supported host
    host_load_wait_s = HOST_LOAD_WAIT_S

    def __init__(self, flavour: str | None = None, models_path_override: str | None = None):
        self.flavour = flavour or detect_flavour()
        self.version = host_version(self.flavour)
        self.name = f"{LABELS[self.flavour]} {self.version}"
        self._local = threading.local()
        self.keeper: ModelKeeper = KEEPERS[self.flavour](self)
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
        # SD.Next copies its folder settings (opts) into cmd_opts unless a flag gave them; A1111 has flags only.
        checkpoints = (getattr(options, "ckpt_dir", None) or getattr(opts, "ckpt_dir", None)
                       or models_dir / "Stable-diffusion")
        loras = getattr(options, "lora_dir", None) or getattr(opts, "lora_dir", None) or models_dir / "Lora"
        ours = (models_path_override or getattr(options, "dreambooth_models_path", None)
                or getattr(opts, "dreambooth_models_path", None) or models_dir / "dreambooth")
        # Relative folders (SD.Next's default 'models/...') mean the web UI's working directory, as for the host.
        folders = [Path(folder).absolute() for folder in (models_dir, checkpoints, loras, ours)]
        return Layout.under(*folders)

    def data_roots(self) -> list[Path] | None:
        raw = getattr(self.cmd_opts(), "dreambooth_data_roots", None)
        return [Path(part) for part in raw.split(os.pathsep) if part] if raw else None

    def api_credentials(self) -> dict[str, str] | None:
        """The users the host's own API accepts (SD.Next protects its API with the UI's --auth users)."""
        options = self.cmd_opts()
        if self.flavour == SDNEXT:
            return sdnext_credentials(getattr(options, "auth", None), getattr(options, "auth_file", None))
        return parse_api_auth(getattr(options, "api_auth", None))

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
        """The host's checkpoint list read again, its selected checkpoint kept: A1111's list_models selects the
        --ckpt file again, so the next render would silently use another model."""
        opts = getattr(self.module("shared"), "opts", None)
        selected = getattr(opts, "sd_model_checkpoint", None)
        self.need(self.module("sd_models"), "list_models")()
        if selected and getattr(opts, "sd_model_checkpoint", None) != selected:
            opts.sd_model_checkpoint = selected

    def list_checkpoints(self) -> list[Path]:
        sd_models = self.module("sd_models")
        self.refresh_checkpoints()
        infos = self.need(sd_models, "checkpoints_list").values()
        return sorted({Path(info.filename).absolute() for info in infos if Path(info.filename).is_file()})

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
        with lock, self.keeper.load_lock():
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
        self.keeper.release(self.module("sd_models"))
        return_freed_memory()  # else glibc keeps the host's freed weights (SD.Next SDXL on CPU: 7.2 GiB of 13.7)
        self._empty_cuda_cache()

    def restore_model(self) -> None:
        """Load back what release_model freed (Forge loads it lazily at the next generation, as it always does)."""
        self.keeper.restore(self.module("sd_models"))

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

    @staticmethod
    def _scheduler_option(txt2img: Any, scheduler: str = SCHEDULER) -> dict[str, str]:
        """scheduler= where the host has the field (A1111 >= 1.9, Forge): without it Forge logs a
        'Sampler Scheduler autocorrection' warning for every image."""
        try:
            parameters = inspect.signature(txt2img).parameters
        except (TypeError, ValueError):
            return {}
        return {"scheduler": scheduler} if "scheduler" in parameters else {}

    def _scheduler(self, checkpoint: Path | None) -> str:
        """'Simple' for an SD3 or Flux checkpoint in Forge (see FLOW_SCHEDULER), else 'Automatic'."""
        return FLOW_SCHEDULER if self.flavour == FORGE and is_flow_checkpoint(checkpoint) else SCHEDULER

    def generate(self, request: GenerationRequest) -> list[Any]:
        """Render through the host's txt2img; the caller holds gpu_lock (never taken here)."""
        processing = self.module("processing")
        title = self.checkpoint_info(request.checkpoint).title if request.checkpoint is not None else None
        overrides = self.keeper.overrides(title)
        images: list[Any] = []
        batch = max(1, request.batch_size)
        with self.keeper.selected(title):
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
            sd_model=self.keeper.current_model(), prompt=request.prompt, negative_prompt=request.negative_prompt,
            sampler_name=self.sampler_name, batch_size=size, n_iter=1, steps=request.steps,
            cfg_scale=request.cfg_scale, width=request.width, height=request.height, seed=seed,
            do_not_save_samples=True, do_not_save_grid=True, override_settings=dict(overrides),
            override_settings_restore_afterwards=True,
            **self._scheduler_option(txt2img, self._scheduler(request.checkpoint)))
        try:
            processed = self.need(processing, "process_images")(p)
        finally:
            p.close()
        if processed is None:  # SD.Next returns None when it has no model or cannot load the checkpoint
            raise HostError(f"{self.name} rendered nothing (no model loaded, or the checkpoint failed to load); "
                            "its console log says why. Select a model that renders in txt2img and try again.")
        first = getattr(processed, "index_of_first_image", 0)  # a grid may come first
        return list(processed.images[first:first + size])


class ModelKeeper:
    """How a web UI's model is freed for training, loaded back, chosen and locked: AUTOMATIC1111 1.10's way."""

    def __init__(self, host: WebuiHost):
        self.host = host
        self.released_checkpoint: Any = None

    def release(self, sd_models: Any) -> None:
        """unload_model_weights only moves the model to the CPU: trash every loaded model and drop them."""
        model_data = self.host.need(sd_models, "model_data")
        trash = self.host.need(sd_models, "send_model_to_trash")
        current = model_data.sd_model
        if current is not None:  # a second release (after class images) must not forget what to restore
            self.released_checkpoint = getattr(current, "sd_checkpoint_info", None)
        for model in {id(m): m for m in [current, *getattr(model_data, "loaded_sd_models", [])] if m}.values():
            trash(model)
        model_data.sd_model = None
        model_data.loaded_sd_models = []
        clear_state_dict_cache(sd_models)

    def restore(self, sd_models: Any) -> None:
        if self.released_checkpoint is not None:
            self.host.need(sd_models, "load_model")(self.released_checkpoint)
        self.released_checkpoint = None

    def current_model(self) -> Any:
        """The loaded model, loaded again first when we released it: A1111's get_sd_model loads only before the
        first model ever loaded, so after release_model nothing would load it for txt2img."""
        model = self.shared_model()
        if model is None:
            call_tolerant(self.host.need(self.host.module("sd_models"), "reload_model_weights"))
            model = self.shared_model()
        return model

    def shared_model(self) -> Any:
        try:
            return self.host.module("shared").sd_model
        except Exception:  # Forge raises until its lazy load happened
            return None

    def overrides(self, title: str | None) -> dict[str, Any]:
        """txt2img's override_settings choosing the checkpoint (restored by the host after each call)."""
        return {"sd_model_checkpoint": title} if title else {}

    def selected(self, title: str | None) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def load_lock(self) -> Iterator[None]:
        """A1111 and Forge Classic load their first model lazily under model_data.lock, outside queue_lock (at
        start-up, from a thread): wait until a load in progress has finished. A model the host builds while we
        load ours can get meta weights (our loaders, like the host's, build under accelerate's init_empty_weights,
        which swaps Module.register_parameter for every thread). The lock is not kept: until the first model has
        loaded, A1111 blocks every reader of shared.sd_model on it."""
        lock = getattr(self.model_data(), "lock", None)
        if lock is not None:
            self.acquire(lock)
            lock.release()
        yield None

    def model_data(self) -> Any:
        return getattr(self.host.module("sd_models"), "model_data", None)

    def acquire(self, lock: Any) -> None:
        """Take the host's model-load lock, waiting (with a log line) for a load in progress."""
        if lock.acquire(blocking=False):
            return
        log.info("%s is loading a model; waiting for it to finish.", self.host.name)
        wait_s = self.host.host_load_wait_s
        if not lock.acquire(timeout=wait_s):
            raise HostError(f"{self.host.name} has been loading a model for {wait_s:.0f} s; wait until it has "
                            "loaded and try again.")


class ForgeKeeper(ModelKeeper):
    """Forge keeps one lazily loaded model (forge_model_reload at the next generation) and selects checkpoints
    through main_entry.checkpoint_change."""

    def release(self, sd_models: Any) -> None:
        model_data = self.host.need(sd_models, "model_data")
        model_data.sd_model = None  # Forge keeps one model here (no loaded_sd_models list as in A1111)
        if hasattr(model_data, "forge_hash"):
            model_data.forge_hash = None  # forces forge_model_reload at the next generation
        with contextlib.suppress(ImportError):
            memory = importlib.import_module("backend.memory_management")
            for name in ("unload_all_models", "soft_empty_cache"):
                function = getattr(memory, name, None)
                if function is not None:
                    function()
        clear_state_dict_cache(sd_models)

    def restore(self, sd_models: Any) -> None:
        with contextlib.suppress(ImportError):
            main_entry = importlib.import_module("modules_forge.main_entry")
            refresh = getattr(main_entry, "refresh_model_loading_parameters", None)
            if refresh is not None:
                refresh()

    def current_model(self) -> Any:
        return self.shared_model()  # Forge loads lazily inside processing (forge_model_reload)

    def overrides(self, title: str | None) -> dict[str, Any]:
        return {}

    @contextlib.contextmanager
    def selected(self, title: str | None) -> Iterator[None]:
        """Select the checkpoint through main_entry (it loads lazily), then select the old one back."""
        if title is None:
            yield None
            return
        main_entry = importlib.import_module("modules_forge.main_entry")
        change = self.host.need(main_entry, "checkpoint_change")
        previous = getattr(self.host.need(self.host.module("shared"), "opts"), "sd_model_checkpoint", None)
        call_tolerant(change, title, preset=None, save=False, refresh=True)
        try:
            yield None
        finally:
            if previous is not None:
                call_tolerant(change, previous, preset=None, save=False, refresh=True)


class ClassicKeeper(ModelKeeper):
    """Forge on gradio 3 (ldm_patched): A1111's loading (load_model, override_settings) over Forge's memory
    manager. Its get_sd_model never loads again once a model was loaded, so restore must load it."""

    def release(self, sd_models: Any) -> None:
        model_data = self.host.need(sd_models, "model_data")
        if model_data.sd_model is not None:
            self.released_checkpoint = getattr(model_data.sd_model, "sd_checkpoint_info", None)
        forget_task_results([model_data.sd_model, *model_data.loaded_sd_models])
        model_data.sd_model = None
        model_data.loaded_sd_models = []
        with contextlib.suppress(ImportError):  # the weights live in ldm_patched's memory manager
            memory = importlib.import_module("ldm_patched.modules.model_management")
            for name in ("unload_all_models", "soft_empty_cache"):
                function = getattr(memory, name, None)
                if function is not None:
                    function()
        clear_state_dict_cache(sd_models)


def forget_task_results(models: list[Any]) -> None:
    """Forge Classic's main thread keeps what its tasks returned: the start-up load's task (queued without a
    waiter, so never taken off finished_list) and the last task it ran hold a loaded model, which then outlives
    every unload. On CPU an SDXL stayed in RAM and a second one was loaded beside it (killed at 22.6 GiB)."""
    try:
        main_thread = importlib.import_module("modules_forge.main_thread")
    except ImportError:
        return
    task_class = getattr(main_thread, "Task", None)
    if task_class is None:
        return
    tasks = list(getattr(main_thread, "finished_list", []))
    tasks += [ref for model in models if model is not None for ref in gc.get_referrers(model)
              if isinstance(ref, task_class)]
    for task in tasks:
        if isinstance(task, task_class) and hasattr(task.result, "sd_checkpoint_info"):
            task.result = None


class SDNextKeeper(ModelKeeper):
    """SD.Next frees and reloads its model and refiner slots itself, and loads lazily under model_data.lock."""

    def __init__(self, host: WebuiHost):
        super().__init__(host)
        self.released_slots: list[str] = []

    def model_data(self) -> Any:
        return self.host.need(self.host.module("sd_models"), "model_data")

    def release(self, sd_models: Any) -> None:
        """unload_model_weights moves the pipeline to meta, drops it and clears SD.Next's caches."""
        unload, model_data = self.host.need(sd_models, "unload_model_weights"), self.model_data()
        for op, attribute in SDNEXT_SLOTS:
            if getattr(model_data, attribute, None) is not None:
                if op not in self.released_slots:
                    self.released_slots.append(op)
                call_tolerant(unload, op=op)

    def restore(self, sd_models: Any) -> None:
        reload = self.host.need(sd_models, "reload_model_weights")
        for op in self.released_slots:
            call_tolerant(reload, op=op)
        self.released_slots = []

    def current_model(self) -> Any:
        """SD.Next loads its model lazily on first use, but not while gpu_lock holds its load lock: load it here."""
        model_data = self.model_data()
        if model_data.sd_model is None:
            call_tolerant(self.host.need(self.host.module("sd_models"), "reload_model_weights"), op="model")
        return model_data.sd_model

    @contextlib.contextmanager
    def load_lock(self) -> Iterator[None]:
        """SD.Next loads lazily under model_data.lock, outside queue_lock (the start-up autoload, the first use
        after an unload). Holding it waits for a load in progress and keeps SD.Next from starting one while we
        build or train: its get_sd_model does not load (nor block) while the lock is held."""
        lock = getattr(self.model_data(), "lock", None)
        if lock is None:
            yield None
            return
        self.acquire(lock)
        try:
            yield None
        finally:
            lock.release()


KEEPERS: dict[str, type[ModelKeeper]] = {A1111: ModelKeeper, FORGE: ForgeKeeper, CLASSIC: ClassicKeeper,
                                         SDNEXT: SDNextKeeper}


def clear_state_dict_cache(sd_models: Any) -> None:
    """State dicts kept in RAM by A1111's 'checkpoints to cache' setting (Forge keeps the dict, unused)."""
    cache = getattr(sd_models, "checkpoints_loaded", None)
    if cache is not None:
        cache.clear()


def register_callbacks(on_ui_tabs: Callable[[], Any], on_ui_settings: Callable[[], None],
                       on_app_started: Callable[[Any, Any], None]) -> None:
    """Register the extension's callbacks with the web UI (A1111, Forge and SD.Next share this API)."""
    import modules.script_callbacks as script_callbacks

    script_callbacks.on_ui_tabs(on_ui_tabs)
    script_callbacks.on_ui_settings(on_ui_settings)
    script_callbacks.on_app_started(on_app_started)
