"""Everything a run trains with, built once before the first step: `build_session(...) -> Session`.

A Session holds the ranks, the models (and which of their parameters train), the optimizer, LR scheduler,
gradient scaler and EMA, the data plan, the latent and text caches and the run's length and seed. Every field
is set by `build_session`; nothing is added later. The loop, the objective and the checkpointer read it.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config.schema import TrainingConfig, caches_text_outputs, run_settings, text_cache_blockers
from ..errors import ConfigError, TrainingError
from ..families import ModelFamily, get_family
from ..families.base import DENOISER_PART
from ..quiet import shown
from ..store import ModelDir
from . import data as data_api
from . import noise as noises
from . import runtime
from .checkpointer import resume_point
from .data.runlength import RunLength, plan_run_length
from .ema import EMA
from .events import TrainCallbacks, TrainObserver
from .optim import build_optimizer, param_groups
from .schedulers import build_scheduler
from .snapshots import ResumeDecision

log = logging.getLogger(__name__)

TextCache = dict[str, tuple[torch.Tensor, torch.Tensor | None]]


class Warnings:
    """Each distinct warning once per run, to the callbacks and the log."""

    def __init__(self, callbacks: TrainCallbacks):
        self.callbacks = callbacks
        self.seen: set[str] = set()

    def __call__(self, text: str) -> None:
        if text not in self.seen:
            self.seen.add(text)
            log.warning(text, extra=shown())  # shown: the CLI prints it through the callback, not twice
            self.callbacks.on_warning(text)


class Ranks:
    """The data-parallel processes (one on a single device): where this one trains, and agreement between all."""

    def __init__(self) -> None:
        from accelerate import Accelerator

        self.accelerator = Accelerator(cpu=not torch.cuda.is_available())
        self.device: torch.device = self.accelerator.device
        self.world_size: int = self.accelerator.num_processes
        self.rank: int = self.accelerator.process_index
        self.is_main: bool = self.accelerator.is_main_process

    def prepare(self, module: torch.nn.Module) -> Any:
        """The module DDP-wrapped when it trains on several ranks."""
        if self.world_size == 1:
            return module
        return self.accelerator.prepare_model(module, device_placement=False)

    def wait(self) -> None:
        if self.world_size > 1:
            self.accelerator.wait_for_everyone()

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` summed over the ranks (one small all-reduce), so logs show the global batch's losses."""
        if self.world_size == 1:
            return tensor
        total = tensor.detach().clone()
        torch.distributed.all_reduce(total)
        return total

    def any(self, values: list[bool]) -> list[bool]:
        """Element-wise OR over ranks (one small all-reduce), so every rank takes the same decision."""
        if self.world_size == 1:
            return values
        flags = torch.tensor([float(v) for v in values], device=self.device)
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        return [bool(v) for v in flags.cpu().tolist()]


@dataclass
class Session:
    config: TrainingConfig
    model_dir: ModelDir
    host: Any
    callbacks: TrainCallbacks
    warn: Callable[[str], None]
    observers: list[TrainObserver]
    ranks: Ranks
    seed: int
    resume: ResumeDecision         # which run this is and the snapshot it continues from, if any
    run_settings: dict[str, Any]   # the training settings that make a run (config.schema.run_settings)
    components: Any                # models.components.Components
    denoiser: Any                  # the UNet or transformer the loop calls (DDP-wrapped on several ranks)
    text_encoders: list[Any]       # likewise for the text encoders (None for an absent optional one)
    noise_scheduler: Any
    alphas_cumprod: torch.Tensor | None  # the DDPM schedule's (min-SNR); None for flow matching
    trainable: dict[str, list[torch.nn.Parameter]]  # part -> parameters training now
    trained_parts: set[str]        # parts trained at any time of the run (kept after stop_text_encoder)
    trained_ids: set[int]          # ids of every parameter trained at any time of the run
    compute_dtype: torch.dtype
    channels_last: bool
    heap_reuse: bool               # freed CPU memory stays in the heap (runtime.reuse_freed_memory)
    plan: data_api.DatasetPlan
    run: RunLength
    te_stop_step: int              # the step at which the text encoders freeze ('stop_text_encoder')
    latent_cache: data_api.LatentCache
    text_cache: TextCache | None
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    scaler: torch.amp.GradScaler | None
    ema: EMA | None
    params: list[torch.nn.Parameter] = field(default_factory=list)

    @property
    def device(self) -> torch.device:
        return self.ranks.device

    @property
    def resume_from(self) -> Path | None:
        """The snapshot the run continues from (None: a new run)."""
        return self.resume.path

    @property
    def run_id(self) -> str:
        return self.resume.run_id

    @property
    def prediction_type(self) -> str:
        return str(self.components.prediction_type)

    @property
    def family(self) -> ModelFamily:
        """The model family's unit: text encoding and added conditioning (families/)."""
        return get_family(self.components.family)

    @property
    def trains_text(self) -> bool:
        return any(name in self.trainable for name in runtime.TEXT_GROUPS)

    def epoch_batches(self, epoch: int) -> list[list[data_api.BatchItem]]:
        return data_api.epoch_batches(self.plan, self.config, epoch, self.seed, self.ranks.world_size,
                                      self.ranks.rank)

    def named_modules(self) -> dict[str, torch.nn.Module]:
        return {DENOISER_PART: self.components.denoiser, **dict(runtime.text_parts(self.components))}

    def trained_tensors(self) -> dict[str, torch.Tensor]:
        """'<part>.<parameter>' -> tensor of every parameter the run trains or trained (snapshots hold these)."""
        tensors = {}
        for group, module in self.named_modules().items():
            for name, param in module.named_parameters():
                if param.requires_grad or id(param) in self.trained_ids:
                    tensors[f"{group}.{name}"] = param.detach()
        return tensors

    def stop_text_encoder(self) -> None:
        stopped = False
        for name in runtime.TEXT_GROUPS:
            params = self.trainable.pop(name, None)
            if params:
                runtime.freeze(params)
                stopped = True
        if stopped:
            self.params = [p for params in self.trainable.values() for p in params]
            self.callbacks.on_status("Text encoder frozen ('stop_text_encoder')")
        runtime.set_train_mode(self.components, self.trainable)


def seed_everything(seed: int) -> None:
    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_seed(seed: int) -> int:
    return random.SystemRandom().randrange(0, 2**31 - 1) if seed < 0 else seed


@dataclass
class _Models:
    components: Any
    denoiser: Any
    text_encoders: list[Any]
    noise_scheduler: Any
    trainable: dict[str, list[torch.nn.Parameter]]
    compute_dtype: torch.dtype
    channels_last: bool


def build_session(config: TrainingConfig, model_dir: ModelDir, host: Any, callbacks: TrainCallbacks,
                  resume: bool, *, warn: Callable[[str], None] | None = None,
                  observers: list[TrainObserver] | None = None, heap_reuse: bool = False) -> Session:
    """Load the models, the data plan, the optimizer and the caches of a run of the validated `config`."""
    warn = warn or Warnings(callbacks)
    ranks = Ranks()
    runtime.check_precision(config, ranks.device)
    runtime.set_tf32(config.allow_tf32)
    settings = run_settings(config)
    decision = resume_point(model_dir, settings, resume)
    seed = int(decision.meta.get("seed", resolve_seed(config.seed)))
    # LoRA initialisation and dropout draw from the global generators: seed them from the run's seed.
    seed_everything(seed)
    callbacks.on_status("Loading model")
    models = _load_models(config, model_dir, ranks, warn, host.layout.lora_dir)
    plan = data_api.scan_dataset(config, model_dir.class_images, warn)
    run = plan_run_length(plan, config, ranks.world_size)
    if run.total_steps <= 0:
        raise TrainingError("Nothing to train: set 'max_train_steps' or 'num_train_epochs' above 0.")
    _check_text_cache(config)
    groups = param_groups(config, models.trainable, ranks.world_size)
    optimizer = build_optimizer(config, groups)
    params = [p for group in models.trainable.values() for p in group]
    return Session(
        config=config, model_dir=model_dir, host=host, callbacks=callbacks, warn=warn,
        observers=list(observers or []), ranks=ranks, seed=seed, resume=decision,
        run_settings=settings,
        components=models.components, denoiser=models.denoiser, text_encoders=models.text_encoders,
        noise_scheduler=models.noise_scheduler, alphas_cumprod=_alphas_cumprod(models.noise_scheduler, ranks.device),
        trainable=models.trainable, trained_parts=set(models.trainable),
        trained_ids={id(p) for p in params}, compute_dtype=models.compute_dtype,
        channels_last=models.channels_last, heap_reuse=heap_reuse, plan=plan, run=run,
        te_stop_step=text_encoder_stop_step(config, run.total_steps),
        latent_cache=data_api.LatentCache(config.cache_latents, model_dir.cache, _cache_namespace(models.components)),
        text_cache={} if caches_text_outputs(config) else None, optimizer=optimizer,
        lr_scheduler=build_scheduler(optimizer, config, run.total_steps),
        scaler=torch.amp.GradScaler("cuda") if config.mixed_precision == "fp16" else None,
        ema=EMA(params, config.ema_decay, config.ema_update_every) if config.use_ema else None, params=params)


def _alphas_cumprod(scheduler: Any, device: torch.device) -> torch.Tensor | None:
    alphas = getattr(scheduler, "alphas_cumprod", None)
    return None if alphas is None else alphas.to(device)


def text_encoder_stop_step(config: TrainingConfig, total_steps: int) -> int:
    return total_steps if config.stop_text_encoder >= 1.0 else round(config.stop_text_encoder * total_steps)


def _cache_namespace(components: Any) -> str:
    return f"{components.family}-{next(components.vae.parameters()).dtype}"


def _load_models(config: TrainingConfig, model_dir: ModelDir, ranks: Ranks, warn: Callable[[str], None],
                 lora_dir: Path) -> _Models:
    from ..models.components import load_components
    from .lora_init import apply_start_lora, read_start_lora
    from .quantize import check_quantization, quantize_base

    components = load_components(model_dir.working, torch.float32, runtime.load_dtypes(config))
    check_identity(config, components, model_dir.working)
    start_lora = read_start_lora(config, components, lora_dir, warn)  # keys resolve on the unwrapped layers
    check_quantization(config)
    quantize_base(components.denoiser, config.base_quantization, runtime.compute_dtype(config), ranks.device)
    trainable = runtime.trainable_parameters(components, config)
    if start_lora is not None:
        apply_start_lora(components, start_lora, warn)
    dtype = runtime.compute_dtype(config)
    runtime.cast_frozen(components, trainable, dtype, ranks.device)
    channels_last = runtime.use_channels_last(ranks.device)
    runtime.set_memory_format(components, channels_last)
    runtime.own_memory(components)
    runtime.setup_attention(components.denoiser, config, ranks.device, warn)
    if config.gradient_checkpointing:
        _enable_checkpointing(components, trainable)
    runtime.set_train_mode(components, trainable)
    denoiser = ranks.prepare(components.denoiser) if DENOISER_PART in trainable else components.denoiser
    encoders = [ranks.prepare(e) if n in trainable and e is not None else e
                for n, e in zip(runtime.TEXT_GROUPS, components.text_encoders, strict=False)]
    # The model trains with the run's schedule from now on: samples, working/ and exports follow it.
    components.noise_scheduler = noises.training_scheduler(components.noise_scheduler, config.zero_terminal_snr)
    return _Models(components, denoiser, encoders, noises.training_scheduler(components.noise_scheduler,
                                                                         config.zero_terminal_snr),
                   trainable, dtype, channels_last)


def check_identity(config: TrainingConfig, components: Any, working: Path) -> None:
    """The weights decide the family and the prediction type; a config that says otherwise is refused, except a
    prediction type the user explicitly forces (then samples and exports follow the forced one)."""
    if components.family != config.model_family:
        raise ConfigError(f"Setting 'model_family' is {config.model_family} but the weights in {working} are "
                          f"{components.family}; set it to {components.family}.")
    if components.prediction_type == config.prediction_type:
        return
    if "flow_matching" in (components.prediction_type, config.prediction_type):
        raise ConfigError(f"Setting 'prediction_type' is {config.prediction_type} but the weights in {working} were "
                          f"recorded as {components.prediction_type}; flow matching and the DDPM objectives need "
                          f"different models, so it cannot be forced: set it to {components.prediction_type}.")
    if not config.force_prediction_type:
        raise ConfigError(
            f"Setting 'prediction_type' is {config.prediction_type} but the weights in {working} were recorded as "
            f"{components.prediction_type}; set 'prediction_type' to {components.prediction_type}, or turn on "
            f"'force_prediction_type' to retrain these weights as {config.prediction_type}.")
    components.prediction_type = config.prediction_type


def _enable_checkpointing(components: Any, trainable: dict[str, list[torch.nn.Parameter]]) -> None:
    if DENOISER_PART in trainable:
        components.denoiser.enable_gradient_checkpointing()
    for name, encoder in runtime.text_parts(components):
        if name in trainable:
            _checkpoint_text_encoder(encoder)


def _checkpoint_text_encoder(encoder: Any) -> None:
    """Gradient checkpointing that keeps every gradient. transformers before 4.35 only checkpoints reentrantly,
    which gives layers whose input does not require grad (a frozen embedding under LoRA) no gradient at all:
    there the embedding output is made to require grad."""
    try:
        encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    except TypeError:
        encoder.gradient_checkpointing_enable()
        encoder.enable_input_require_grads()


def _check_text_cache(config: TrainingConfig) -> None:
    blockers = text_cache_blockers(config)
    if config.cache_text_encoder_outputs == "on" and blockers:
        raise TrainingError("Setting 'cache_text_encoder_outputs' cannot be used because "
                            + " and ".join(f"{why} ('{name}')" for name, why in blockers)
                            + "; set it to auto or off, or change those settings.")
