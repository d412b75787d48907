"""The training loop: DreamBooth (prior preservation), fine-tune and LoRA on SD1/SD2/SDXL.

`Trainer(config, host, callbacks, commands).run()` trains one model of the store and returns a TrainResult.
The loop is the same for the tab (worker thread), the CLI and `accelerate launch` (data parallel: every
rank steps in lockstep, only rank 0 writes files). Commands (stop, save, sample) are polled once per
optimizer step. Every random choice is derived from (seed, epoch, item, step), so a resumed run continues
bit-identically.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import logging
import math
import os
import random
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import atomic
from ..config.schema import (
    TrainingConfig,
    caches_text_outputs,
    run_settings,
    text_cache_blockers,
    training_resolutions,
    validate,
)
from ..errors import ConfigError, DataError, DreamboothError, TrainingError
from ..guide.memory import ItSlowdownMonitor
from ..store import ModelDir, ModelStore
from . import data as data_api
from . import loss as losses
from . import noise as noises
from . import runtime, snapshots
from .data.class_images import base_checkpoint_path
from .data.concepts import prior_active
from .ema import EMA
from .events import LossRecord, Progress, TrainCallbacks, TrainCommands
from .logs import TrainLog
from .optim import build_optimizer, param_groups, set_training_mode
from .sampling import render_samples, sample_prompts
from .schedulers import build_scheduler
from .text import encode_captions

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """How a run ended: the last optimizer step, whether it completed or was stopped, what it wrote."""

    step: int
    total_steps: int
    epoch: int
    completed: bool
    stopped: bool
    saved: list[Path] = field(default_factory=list)
    snapshot: Path | None = None
    loss: float | None = None


@dataclass
class _State:
    """Where the loop is: the next step to run, its epoch and the batch group within the epoch."""

    step: int = 0
    epoch: int = 0
    group: int = 0
    nan_skips: int = 0


class _Warnings:
    """Each distinct warning once per run, to the callback and the log."""

    def __init__(self, callbacks: TrainCallbacks):
        self.callbacks = callbacks
        self.seen: set[str] = set()

    def __call__(self, text: str) -> None:
        if text not in self.seen:
            self.seen.add(text)
            log.warning(text)
            self.callbacks.on_warning(text)


def seed_everything(seed: int) -> None:
    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_seed(seed: int) -> int:
    return random.SystemRandom().randrange(0, 2**31 - 1) if seed < 0 else seed


class Trainer:
    def __init__(self, config: TrainingConfig, host: Any, callbacks: TrainCallbacks | None = None,
                 commands: TrainCommands | None = None, resume: bool = True):
        self.config = config
        self.host = host
        self.callbacks = callbacks or TrainCallbacks()
        self.commands = commands or TrainCommands()
        self.resume = resume
        self.warn = _Warnings(self.callbacks)
        self.heap_reuse = False

    # --- entry point ---------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        try:
            config = validate(copy.deepcopy(self.config))
            self.model_dir = ModelStore(self.host.layout).existing(config.model_name)
            self._remove_crash_leftovers(config)
            self._preflight(config)
            self._ensure_class_images(config)
            self.host.release_model()
            try:
                with self.host.gpu_lock():
                    return self._train_within_memory(config)
            finally:
                self.host.restore_model()
        except DreamboothError as error:
            self.callbacks.on_error(str(error))
            raise

    def _train_within_memory(self, config: TrainingConfig) -> TrainResult:
        try:
            return self._train(config)
        except (torch.cuda.OutOfMemoryError, RuntimeError) as error:
            if not is_out_of_memory(error):
                raise
            message = out_of_memory_message(config, self._device_gb())
        # Outside the except block: the exception (and its frames holding tensors) is gone now.
        self._free_memory()
        raise TrainingError(message)

    def _device_gb(self) -> float | None:
        if getattr(self, "device", torch.device("cpu")).type != "cuda":
            return None
        return torch.cuda.get_device_properties(0).total_memory / 2**30

    def _free_memory(self) -> None:
        """Drop every model and optimizer reference so the web UI gets its memory back."""
        for name in ("components", "optimizer", "lr_scheduler", "ema", "trainable", "latent_cache", "accelerator"):
            if hasattr(self, name):
                setattr(self, name, None)
        import gc

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _remove_crash_leftovers(self, config: TrainingConfig) -> None:
        """Temporary files of writes a crash interrupted; only this model's run writes these names."""
        atomic.remove_stale_temps(self.model_dir.root, recursive=True)
        for folder in (self.host.layout.checkpoints_dir, self.host.layout.lora_dir):
            atomic.remove_stale_temps(folder, prefix=f"{config.model_name}_")

    def _preflight(self, config: TrainingConfig) -> None:
        try:
            checks = importlib.import_module("dreambooth.guide.preflight")
        except ImportError:
            return
        device = "cuda" if torch.cuda.is_available() else "cpu"
        findings = checks.preflight(config, device=device)
        for finding in findings:
            if finding.level != "error":
                self.warn(finding.message)
        checks.raise_on_errors(findings)
        self._check_memory(config, device)

    def _check_memory(self, config: TrainingConfig, device: str) -> None:
        """Show the memory estimate before training and warn when it exceeds the device."""
        from ..guide.memory import estimate_memory, warn_if_exceeds

        estimate = estimate_memory(config)
        self.callbacks.on_status(f"Estimated memory for this run: {estimate.total / 2**30:.1f} GiB")
        warning = warn_if_exceeds(estimate, device_memory_bytes(device))
        if warning:
            self.warn(warning)

    def _ensure_class_images(self, config: TrainingConfig) -> None:
        if not prior_active(config):
            return
        missing = sum(job.missing for job in data_api.plan_class_images(config, self.model_dir.class_images))
        if missing <= 0:
            return
        self.callbacks.on_status(f"Generating {missing} class images")

        def report(done: int, total: int) -> None:
            self.callbacks.on_status(f"Generating class images: {done}/{total}")
            self.host.progress(done / max(1, total), f"Class images {done}/{total}")

        # Class images come from the base model the run starts from, not from whatever the host has loaded.
        checkpoint = base_checkpoint_path(config.base_checkpoint, self.host.layout.checkpoints_dir)
        data_api.generate_class_images(config, self.model_dir.class_images, self.host, on_progress=report,
                                       checkpoint=checkpoint, model_dir=self.model_dir.working)

    # --- setup ---------------------------------------------------------------------------------------

    def _train(self, config: TrainingConfig) -> TrainResult:
        with runtime.reuse_freed_memory(enabled=not torch.cuda.is_available()) as self.heap_reuse:
            state = self._setup(config)
            return self._loop(config, state)

    def setup(self) -> _State:
        """Validate and load everything a run needs, without training (tests and benchmarks use it)."""
        config = validate(copy.deepcopy(self.config))
        self.model_dir = ModelStore(self.host.layout).existing(config.model_name)
        return self._setup(config)

    def _setup(self, config: TrainingConfig) -> _State:
        from accelerate import Accelerator

        self.accelerator = Accelerator(cpu=not torch.cuda.is_available())
        self.device = self.accelerator.device
        self.is_main = self.accelerator.is_main_process
        runtime.check_precision(config, self.device)
        runtime.set_tf32(config.allow_tf32)
        self.cfg = config
        self.run_settings = run_settings(config)
        decision = (snapshots.resumable_snapshot(self.model_dir.snapshots, self.run_settings) if self.resume
                    else snapshots.fresh_run("Not resuming (asked to start fresh). "))
        self.run_id, resume_from, meta = decision.run_id, decision.path, decision.meta
        self.seed = int(meta.get("seed", resolve_seed(config.seed)))
        # LoRA initialisation and dropout draw from the global generators: seed them from the run's seed.
        seed_everything(self.seed)
        self._load_model(config)
        self._load_data(config)
        self._build_optimizer(config)
        self._reset_meters(config)
        state = self._restore(resume_from) if resume_from is not None else _State()
        (self.warn if decision.settings_changed else self.callbacks.on_status)(decision.message)
        return state

    def _load_model(self, config: TrainingConfig) -> None:
        from ..models.components import load_components

        self.callbacks.on_status("Loading model")
        components = load_components(self.model_dir.working, torch.float32, runtime.load_dtypes(config))
        if components.family != config.model_family:
            raise ConfigError(f"Setting 'model_family' is {config.model_family} but the weights in "
                              f"{self.model_dir.working} are {components.family}; set it to {components.family}.")
        # The setting wins, so a model can be trained as v-prediction; samples and exports follow it.
        components.prediction_type = config.prediction_type
        self.components = components
        self.sdxl = components.family == "sdxl"
        self.prediction_type = components.prediction_type
        self.noise_scheduler = noises.training_scheduler(components.noise_scheduler, config.zero_terminal_snr)
        self.alphas_cumprod = self.noise_scheduler.alphas_cumprod.to(self.device)
        self.trainable = runtime.trainable_parameters(components, config)
        self.trained_parts = set(self.trainable)
        # Kept when 'stop_text_encoder' freezes a part: snapshots must still hold what it trained.
        self.trained_ids = {id(p) for params in self.trainable.values() for p in params}
        self.compute_dtype = runtime.compute_dtype(config)
        runtime.cast_frozen(components, self.trainable, self.compute_dtype, self.device)
        self.channels_last = runtime.use_channels_last(self.device)
        runtime.set_memory_format(components, self.channels_last)
        runtime.own_memory(components)
        runtime.setup_attention(components.unet, config, self.device, self.warn)
        if config.gradient_checkpointing:
            self._enable_checkpointing()
        runtime.set_train_mode(components, self.trainable)
        self._wrap_for_ranks()

    def _enable_checkpointing(self) -> None:
        if "unet" in self.trainable:
            self.components.unet.enable_gradient_checkpointing()
        for name, encoder in zip(runtime.TEXT_GROUPS, self.components.text_encoders, strict=False):
            if name in self.trainable:
                _checkpoint_text_encoder(encoder)

    def _wrap_for_ranks(self) -> None:
        """The modules the loop calls; DDP-wrapped when they train on several ranks."""
        c = self.components
        self.unet = self._prepare(c.unet) if "unet" in self.trainable else c.unet
        self.text_encoders = [self._prepare(e) if n in self.trainable else e
                              for n, e in zip(runtime.TEXT_GROUPS, c.text_encoders, strict=False)]

    def _prepare(self, module: torch.nn.Module) -> Any:
        if self.accelerator.num_processes == 1:
            return module
        return self.accelerator.prepare_model(module, device_placement=False)

    def _load_data(self, config: TrainingConfig) -> None:
        self.plan = data_api.scan_dataset(config, self.model_dir.class_images, self.warn)
        self.world_size = self.accelerator.num_processes
        self.rank = self.accelerator.process_index
        batches = len(self._epoch_batches(0))
        self.steps_per_epoch = max(1, math.ceil(batches / config.gradient_accumulation_steps))
        if config.max_train_steps > 0:
            self.total_steps = config.max_train_steps
        else:
            self.total_steps = config.num_train_epochs * self.steps_per_epoch
        if self.total_steps <= 0:
            raise TrainingError("Nothing to train: set 'max_train_steps' or 'num_train_epochs' above 0.")
        self.total_epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        namespace = f"{self.components.family}-{next(self.components.vae.parameters()).dtype}"
        self.latent_cache = data_api.LatentCache(config.cache_latents, self.model_dir.cache, namespace)
        self.text_cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] | None = None
        self._check_text_cache(config)
        if caches_text_outputs(config):
            self.text_cache = {}
        self.te_stop_step = (self.total_steps if config.stop_text_encoder >= 1.0
                             else round(config.stop_text_encoder * self.total_steps))

    def _check_text_cache(self, config: TrainingConfig) -> None:
        blockers = text_cache_blockers(config)
        if config.cache_text_encoder_outputs == "on" and blockers:
            raise TrainingError("Setting 'cache_text_encoder_outputs' cannot be used because "
                                + " and ".join(f"{why} ('{name}')" for name, why in blockers)
                                + "; set it to auto or off, or change those settings.")

    def _epoch_batches(self, epoch: int) -> list[list[Any]]:
        return data_api.epoch_batches(self.plan, self.cfg, epoch, self.seed, self.world_size, self.rank)

    def _build_optimizer(self, config: TrainingConfig) -> None:
        groups = param_groups(config, self.trainable, self.accelerator.num_processes)
        self.group_names = [group["name"] for group in groups]
        self.optimizer = build_optimizer(config, groups)
        self.lr_scheduler = build_scheduler(self.optimizer, config, self.total_steps)
        self.params = [p for params in self.trainable.values() for p in params]
        self.ema = EMA(self.params, config.ema_decay, config.ema_update_every) if config.use_ema else None
        self.scaler = torch.amp.GradScaler("cuda") if config.mixed_precision == "fp16" else None
        self.train_log = TrainLog(self.model_dir.logging, self.group_names, len(config.concepts), self.is_main)

    def _reset_meters(self, config: TrainingConfig) -> None:
        self.saved: list[Path] = []
        self.intermediate: list[Path] = []
        self.last_loss: float | None = None
        self._meter = _Meter(0)
        self._slowdown = ItSlowdownMonitor() if watches_speed(self.device) else None
        self._loss_sum = torch.zeros((), device=self.device)
        self._loss_count = 0
        self._concept_sums = torch.zeros((2, max(1, len(config.concepts))), device=self.device)

    # --- snapshots -----------------------------------------------------------------------------------

    def _trained_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {}
        named = {"unet": self.components.unet, **dict(zip(runtime.TEXT_GROUPS, self.components.text_encoders, strict=False))}
        for group, module in named.items():
            for name, param in module.named_parameters():
                if param.requires_grad or id(param) in self.trained_ids:
                    tensors[f"{group}.{name}"] = param.detach()
        return tensors

    def _snapshot(self, state: _State, finished: bool = False) -> Path | None:
        if not self.is_main:
            return None
        objects = {"optimizer": self.optimizer.state_dict(), "scheduler": self.lr_scheduler.state_dict(),
                   "ema": self.ema.state_dict() if self.ema else None, "rng": snapshots.rng_state(),
                   "scaler": self.scaler.state_dict() if self.scaler else None}
        meta = {"run_id": self.run_id, "settings": self.run_settings, "epoch": state.epoch, "group": state.group,
                "seed": self.seed, "nan_skips": state.nan_skips, "total_steps": self.total_steps,
                "finished": finished}
        with atomic.disk_full_guard(self.model_dir.snapshots):
            path = snapshots.write_snapshot(self.model_dir.snapshots, state.step, self._trained_tensors(), objects,
                                            meta)
        self.callbacks.on_saved("snapshot", path)
        return path

    def _mark_finished(self, state: _State) -> Path | None:
        """Mark the run's last snapshot finished; rewriting it would leave a moment with no snapshot at all."""
        marked = snapshots.mark_run_finished(self.model_dir.snapshots, state.step, self.run_id) if self.is_main else None
        return marked or self._snapshot(state, finished=True)

    def _restore(self, path: Path) -> _State:
        tensors, objects, meta = snapshots.read_snapshot(path)
        named = {"unet": self.components.unet, **dict(zip(runtime.TEXT_GROUPS, self.components.text_encoders, strict=False))}
        with torch.no_grad():
            for group, module in named.items():
                for name, param in module.named_parameters():
                    key = f"{group}.{name}"
                    if key in tensors:
                        param.copy_(tensors[key].to(param.dtype))
        self.optimizer.load_state_dict(objects["optimizer"])
        self.lr_scheduler.load_state_dict(objects["scheduler"])
        if self.ema is not None and objects.get("ema"):
            self.ema.load_state_dict(objects["ema"])
        if self.scaler is not None and objects.get("scaler"):
            self.scaler.load_state_dict(objects["scaler"])
        snapshots.set_rng_state(objects["rng"])
        state = _State(meta["step"], meta["epoch"], meta["group"], meta.get("nan_skips", 0))
        if state.step >= self.te_stop_step:
            self._stop_text_encoder()
        return state

    # --- the loop ------------------------------------------------------------------------------------

    def _loop(self, config: TrainingConfig, state: _State) -> TrainResult:
        stopped = False
        self.callbacks.on_status("Training")
        try:
            stopped = self._run_epochs(config, state)
        finally:
            self.train_log.close()
        return self._finish(config, state, stopped)

    def _run_epochs(self, config: TrainingConfig, state: _State) -> bool:
        while state.step < self.total_steps:
            groups = _chunks(self._epoch_batches(state.epoch), config.gradient_accumulation_steps)
            while state.group < len(groups) and state.step < self.total_steps:
                if self._train_step(groups[state.group], state):
                    return True
            if state.group >= len(groups):
                epoch_done = state.epoch
                state.epoch, state.group = state.epoch + 1, 0
                self._after_epoch(config, state, epoch_done)
        return False

    def _train_step(self, group: list[list[Any]], state: _State) -> bool:
        """One optimizer step over a group of micro-batches; True when training must stop."""
        if state.step == self.te_stop_step:
            self._stop_text_encoder()
        set_training_mode(self.optimizer, True)
        loss = self._accumulate(group, state.step)
        if self._finite(loss):
            self._optimizer_step()
        else:
            self._on_nonfinite(state)
        state.step += 1
        state.group += 1
        return self._after_step(state)

    def _accumulate(self, group: list[list[Any]], step: int) -> torch.Tensor:
        total = torch.zeros((), device=self.device)
        for index, batch in enumerate(group):
            last = index == len(group) - 1
            with self._no_sync(not last):
                loss = self._forward(batch, step) / len(group)
                self._backward(loss)
            total = total + loss.detach()
        return total

    @contextlib.contextmanager
    def _no_sync(self, skip_sync: bool) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            if skip_sync and self.world_size > 1:
                for module in (self.unet, *self.text_encoders):
                    if hasattr(module, "no_sync"):
                        stack.enter_context(module.no_sync())
            yield

    def _backward(self, loss: torch.Tensor) -> None:
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    def _optimizer_step(self) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_([p for p in self.params if p.grad is not None], self.cfg.max_grad_norm,
                                           foreach=True)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.lr_scheduler.step()
        self._clear_gradients()

    def _clear_gradients(self) -> None:
        # Freed gradients cost nothing to re-allocate on a GPU, or on CPU while freed memory stays in the
        # heap (reuse_freed_memory); elsewhere keeping the buffers is faster, for 1.2 GiB more (SD1.5, full).
        self.optimizer.zero_grad(set_to_none=self.device.type == "cuda" or self.heap_reuse)

    def _on_nonfinite(self, state: _State) -> None:
        self._clear_gradients()
        with warnings.catch_warnings():  # the skipped step still advances the schedule, on purpose
            warnings.simplefilter("ignore", UserWarning)
            self.lr_scheduler.step()
        state.nan_skips += 1
        advice = ("Likely causes: a learning rate that is too high, fp16 mixed precision (try bf16 or no), or an "
                  "fp16 VAE. The last good save and snapshot are kept.")
        if self.cfg.nan_policy == "skip" and state.nan_skips <= self.cfg.max_nan_skips:
            self.warn(f"Loss was not finite at step {state.step + 1}; the step was skipped "
                      f"({state.nan_skips} of at most {self.cfg.max_nan_skips}, 'max_nan_skips'). {advice}")
            return
        raise TrainingError(f"Training stopped at step {state.step + 1}: the loss became NaN or infinite "
                            f"('nan_policy' {self.cfg.nan_policy}). {advice}")

    def _sum_over_ranks(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` summed over the ranks (one small all-reduce), so logs show the global batch's losses."""
        if self.world_size == 1:
            return tensor
        total = tensor.detach().clone()
        torch.distributed.all_reduce(total)
        return total

    def _any_rank(self, values: list[bool]) -> list[bool]:
        """Element-wise OR over ranks (one small all-reduce), so every rank takes the same decision."""
        if self.world_size == 1:
            return values
        flags = torch.tensor([float(v) for v in values], device=self.device)
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        return [bool(v) for v in flags.cpu().tolist()]

    def _finite(self, loss: torch.Tensor) -> bool:
        """Whether every rank's loss is finite; finite losses are summed on the device for the log."""
        (bad,) = self._any_rank([not bool(torch.isfinite(loss))])
        if not bad:
            self._loss_sum += loss
            self._loss_count += 1
        return not bad

    def _poll_commands(self) -> dict[str, bool]:
        """Stop, save now, sample now: read on rank 0 (the UI's thread writes them), agreed by all ranks."""
        interrupted = self.is_main and self.host.interrupted()
        stop_save = self.is_main and (self.commands.save_on_stop or (interrupted and not self.commands.stop_requested))
        values = [self.is_main and (self.commands.stop_requested or interrupted), stop_save,
                  self.is_main and self.commands.take_save(), self.is_main and self.commands.take_sample()]
        stop, save_on_stop, save, sample = self._any_rank(values)
        return {"stop": stop, "save_on_stop": save_on_stop, "save": save, "sample": sample}

    # --- one forward pass ----------------------------------------------------------------------------

    def _forward(self, batch: list[Any], step: int) -> torch.Tensor:
        batch, latent_list = self._readable(batch)
        if not batch:
            # Every image of this batch vanished from disk: nothing to learn, the run goes on.
            return torch.zeros((), device=self.device, requires_grad=True)
        per_sample = self._batch_losses(batch, latent_list, step, perturb_input=True)
        weights = torch.tensor([self.cfg.prior_loss_weight if item.record.is_class else 1.0 for item in batch],
                               device=self.device)
        self._track_concepts(batch, per_sample.detach())
        return losses.batch_loss(per_sample, weights)

    def _batch_losses(self, batch: list[Any], latent_list: list[torch.Tensor], step: int,
                      perturb_input: bool) -> torch.Tensor:
        """Per-sample losses of one batch; validation measures without input perturbation, at fixed noise."""
        latents, pixel_weights = self._latents_and_masks(batch, latent_list)
        seeds = [item.seed for item in batch]
        noise, input_noise, timesteps = noises.batch_noise(tuple(latents.shape[1:]), seeds, step, self.cfg,
                                                          self.noise_scheduler.config.num_train_timesteps)
        noise, timesteps = noise.to(self.device), timesteps.to(self.device)
        input_noise = input_noise.to(self.device) if perturb_input else noise
        noisy = losses.add_noise(self.noise_scheduler, latents, input_noise, timesteps)
        wanted = losses.target(self.noise_scheduler, latents, noise, timesteps, self.prediction_type)
        with runtime.autocast(self.cfg, self.device):
            hidden, added = self._conditioning(batch)
            prediction = self.unet(noisy, timesteps, encoder_hidden_states=hidden,
                                   added_cond_kwargs=added).sample
        return self._per_sample_loss(prediction, wanted, timesteps, pixel_weights)

    def _per_sample_loss(self, prediction: torch.Tensor, wanted: torch.Tensor, timesteps: torch.Tensor,
                         pixel_weights: torch.Tensor | None) -> torch.Tensor:
        elements = losses.elementwise_loss(prediction, wanted, self.cfg.loss_type, self.cfg.huber_c)
        per_sample = losses.per_sample_loss(elements, pixel_weights, self.cfg.normalize_masked_area_loss)
        if self.cfg.min_snr_gamma > 0:
            snr = losses.compute_snr(self.alphas_cumprod, timesteps)
            per_sample = per_sample * losses.min_snr_weights(snr, self.cfg.min_snr_gamma, self.prediction_type)
        return per_sample

    def _track_concepts(self, batch: list[Any], per_sample: torch.Tensor) -> None:
        index = torch.tensor([item.record.concept_index for item in batch], device=self.device)
        self._concept_sums[0].index_add_(0, index, per_sample.float())
        self._concept_sums[1].index_add_(0, index, torch.ones_like(per_sample, dtype=torch.float32))

    def _readable(self, batch: list[Any]) -> tuple[list[Any], list[torch.Tensor]]:
        """The batch and its latents, without images deleted or changed on disk since the scan (warned).

        Users tidy their folders while a run goes on; one vanished image must not end hours of training.
        """
        kept, latents = [], []
        for item in batch:
            try:
                latents.append(self.latent_cache.get(item, self.cfg, self._encode_pixels))
            except DataError as error:
                self.warn(f"Skipped during training: {error}")
                continue
            kept.append(item)
        return kept, latents

    def _latents_and_masks(self, batch: list[Any], latents: list[torch.Tensor]
                           ) -> tuple[torch.Tensor, torch.Tensor | None]:
        masks = [data_api.load_mask(item, self.cfg) for item in batch]
        stacked = torch.stack(latents).to(self.device, torch.float32)
        if all(mask is None for mask in masks):
            return stacked, None
        full = [m if m is not None else torch.ones((1, *lat.shape[1:])) for m, lat in zip(masks, latents, strict=True)]
        return stacked, torch.stack(full).to(self.device, torch.float32)

    @torch.no_grad()
    def _encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        vae = self.components.vae
        pixels = pixels.to(self.device, next(vae.parameters()).dtype)
        # The distribution's mean: deterministic, so cached and uncached runs train the same latents.
        latent = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
        return latent.float()

    def _conditioning(self, batch: list[Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        captions = [data_api.build_caption(item, self.cfg) for item in batch]
        hidden, pooled = self._encode_text(captions)
        if not self.sdxl:
            return hidden, None
        time_ids = torch.tensor([_time_ids(item) for item in batch], device=self.device, dtype=hidden.dtype)
        return hidden, {"text_embeds": pooled, "time_ids": time_ids}

    def _encode_text(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.text_cache is not None:
            return self._cached_text(captions)
        training = any(name in self.trainable for name in runtime.TEXT_GROUPS)
        with torch.set_grad_enabled(training and torch.is_grad_enabled()):
            encoded = encode_captions(self.text_encoders, self.components.tokenizers, captions, self.cfg,
                                      self.sdxl, self.device, self.warn)
        return encoded.hidden, encoded.pooled

    def _cached_text(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        assert self.text_cache is not None
        for caption in captions:
            if caption not in self.text_cache:
                with torch.no_grad():
                    encoded = encode_captions(self.text_encoders, self.components.tokenizers, [caption], self.cfg,
                                              self.sdxl, self.device, self.warn)
                self.text_cache[caption] = (encoded.hidden[0], None if encoded.pooled is None else encoded.pooled[0])
        rows = [self.text_cache[c] for c in captions]
        hidden = torch.stack([r[0] for r in rows])
        pooled = torch.stack([r[1] for r in rows]) if rows[0][1] is not None else None
        return hidden, pooled

    def _stop_text_encoder(self) -> None:
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

    # --- after each step -----------------------------------------------------------------------------

    def _after_step(self, state: _State) -> bool:
        config = self.cfg
        if self.ema is not None:
            self.ema.step(state.step)
        self._meter.tick(state.step)
        self._report_progress(state)
        flags = self._poll_commands()
        if state.step % config.log_every_n_steps == 0 or state.step == self.total_steps:
            self._log(state)
        if config.validation_every_n_steps and state.step % config.validation_every_n_steps == 0:
            self._validate(state)
        if flags.get("stop"):
            if flags.get("save_on_stop"):
                self._save_outputs(state, final=True)
                self._snapshot(state)
            return True
        if config.save_every_n_steps and state.step % config.save_every_n_steps == 0 and state.step < self.total_steps:
            self._save_outputs(state, final=False)
        elif flags.get("save"):
            self._save_outputs(state, final=False)
        if config.snapshot_every_n_steps and state.step % config.snapshot_every_n_steps == 0:
            self._snapshot(state)
        if flags.get("sample") or (config.sample_every_n_steps and state.step % config.sample_every_n_steps == 0):
            self._sample(state.step)
        return False

    def _after_epoch(self, config: TrainingConfig, state: _State, epoch_done: int) -> None:
        if not config.validation_every_n_steps:
            self._validate(state)
        finished_epochs = epoch_done + 1
        if (config.save_every_n_epochs and finished_epochs % config.save_every_n_epochs == 0
                and state.step < self.total_steps):
            self._save_outputs(state, final=False)

    def _report_progress(self, state: _State) -> None:
        rate = self._meter.rate()
        remaining = (self.total_steps - state.step) / rate if rate > 0 else 0.0
        progress = Progress(state.step, self.total_steps, state.epoch, self.total_epochs, rate, remaining)
        self.callbacks.on_progress(progress)
        slowdown = self._slowdown.feed(self._meter.step_rate()) if self._slowdown else None
        if slowdown:
            self.warn(slowdown)
        if self.is_main:
            self.host.progress(state.step / self.total_steps, f"Step {state.step}/{self.total_steps}")

    def _log(self, state: _State) -> None:
        if self._loss_count == 0:
            return
        # The only host sync of the interval: losses were summed on the device.
        loss = float(self._sum_over_ranks(self._loss_sum)) / (self._loss_count * self.world_size)
        sums, counts = self._sum_over_ranks(self._concept_sums).tolist()
        per_concept = {i: s / n for i, (s, n) in enumerate(zip(sums, counts, strict=False)) if n > 0}
        lrs = {group["name"]: float(group["lr"]) for group in self.optimizer.param_groups}
        record = LossRecord(state.step, loss, lrs, per_concept)
        self._loss_sum.zero_()
        self._loss_count = 0
        self._concept_sums.zero_()
        self.last_loss = loss
        self.callbacks.on_loss(record)
        self.train_log.write(record, self._meter.rate())

    # --- validation ----------------------------------------------------------------------------------

    @torch.no_grad()
    def _validate(self, state: _State) -> float | None:
        items = _validation_batches(self.plan, self.cfg, self.seed, self.rank, self.world_size)
        if not self.plan.validation:  # the same on every rank: all of them take part in the sum below
            return None
        total, count = torch.zeros((), device=self.device), 0
        for batch, latent_list in map(self._readable, items):
            if not batch:
                continue
            total += self._batch_losses(batch, latent_list, 0, perturb_input=False).sum()
            count += len(batch)
        total, count = self._sum_over_ranks(torch.stack([total, torch.tensor(float(count), device=self.device)]))
        if count == 0:
            return None
        value = float(total) / float(count)
        lrs = {group["name"]: float(group["lr"]) for group in self.optimizer.param_groups}
        record = LossRecord(state.step, self.last_loss if self.last_loss is not None else float("nan"), lrs,
                            validation_loss=value)
        self.callbacks.on_loss(record)
        self.train_log.write(record, self._meter.rate())
        return value

    # --- samples and saves ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def _output_weights(self) -> Iterator[None]:
        """The weights to sample or save: EMA's when configured, schedule-free's averaged sequence."""
        set_training_mode(self.optimizer, False)
        runtime_eval = [(m, m.training) for m in (self.components.unet, *self.components.text_encoders)]
        for module, _ in runtime_eval:
            module.eval()
        use_ema = self.ema is not None and self.cfg.ema_for_output
        try:
            with self.ema.applied() if use_ema else contextlib.nullcontext():  # type: ignore[union-attr]
                runtime.set_memory_format(self.components, False)
                try:
                    yield
                finally:
                    runtime.set_memory_format(self.components, self.channels_last)
        finally:
            for module, was_training in runtime_eval:
                module.train(was_training)
            set_training_mode(self.optimizer, True)

    def _sample(self, step: int) -> None:
        if not self.is_main:
            self.accelerator.wait_for_everyone()
            return
        prompts = sample_prompts(self.cfg, self.seed, training_resolutions(self.cfg)[0])
        if prompts:
            from ..models.components import build_pipeline

            self.callbacks.on_status(f"Sampling at step {step}")
            with self._output_weights(), torch.no_grad(), runtime.autocast(self.cfg, self.device):
                pipeline = build_pipeline(self.components, self.cfg.sample_scheduler)
                paths = render_samples(pipeline, prompts, self.model_dir.samples, step, self.device)
            self.callbacks.on_sample(step, paths, [p.prompt for p in prompts])
        if self.world_size > 1:
            self.accelerator.wait_for_everyone()

    def _save_outputs(self, state: _State, final: bool) -> list[Path]:
        paths: list[Path] = []
        if self.is_main:
            from .outputs import save_outputs

            with self._output_weights(), atomic.disk_full_guard(self.model_dir.root):
                paths = save_outputs(self, state.step, final)
            for path in paths:
                self.callbacks.on_saved(_saved_kind(self.cfg, path), path)
            self.saved += paths
            if not final:
                self.intermediate = snapshots.prune_outputs(self.intermediate + paths, self.cfg.save_keep_last)
        if self.world_size > 1:
            self.accelerator.wait_for_everyone()
        return paths

    def _finish(self, config: TrainingConfig, state: _State, stopped: bool) -> TrainResult:
        snapshot = None
        if not stopped:
            if config.save_on_end:
                self._save_outputs(state, final=True)
            snapshot = self._mark_finished(state)
        elif self.commands.save_on_stop or not self.commands.stop_requested:
            snapshot = snapshots.latest_of_run(self.model_dir.snapshots, self.run_id)
        self.callbacks.on_status("Training finished" if not stopped else f"Training stopped at step {state.step}")
        return TrainResult(state.step, self.total_steps, state.epoch, not stopped, stopped, list(self.saved),
                           snapshot, self.last_loss)


class _Meter:
    """Steps per second over the run so far (excluding the first step, which includes warm-up)."""

    def __init__(self, start_step: int):
        self.start_step = start_step
        self.first: tuple[int, float] | None = None
        self.last: tuple[int, float] | None = None
        self.previous: tuple[int, float] | None = None

    def tick(self, step: int) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first = (step, now)
        self.previous, self.last = self.last, (step, now)

    def step_rate(self) -> float:
        """Steps per second over the latest interval (the slowdown monitor needs the current speed)."""
        if self.previous is None or self.last is None or self.last[0] == self.previous[0]:
            return 0.0
        return (self.last[0] - self.previous[0]) / max(1e-9, self.last[1] - self.previous[1])

    def rate(self) -> float:
        if self.first is None or self.last is None or self.last[0] == self.first[0]:
            return 0.0
        return (self.last[0] - self.first[0]) / max(1e-9, self.last[1] - self.first[1])


def watches_speed(device: torch.device) -> bool:
    # The collapse warning is for VRAM spilling into shared memory; a CPU run has no such cliff, and its
    # sampling pauses would only raise false alarms.
    return device.type == "cuda"


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


def out_of_memory_message(config: TrainingConfig, device_gb: float | None) -> str:
    """Name the memory preset to try and the settings it changes."""
    from ..guide.presets import memory_class, preset_for

    preset = preset_for(config.model_family, device_gb)
    changes = ", ".join(f"{key}={value}" for key, value in preset.items() if getattr(config, key, value) != value)
    size = memory_class(device_gb)
    label = f"the {size} GB preset" if size else "the CPU preset"
    return (f"Out of memory while training. Try {label} (Presets & memory tab, or set {changes or 'a lower batch size'})"
            ", or lower 'resolution' / 'train_batch_size'; the last saved files are intact.")


def device_memory_bytes(device: str) -> int | None:
    """Total memory of the training device: the GPU's, or the machine's RAM on CPU."""
    if device == "cuda":
        return int(torch.cuda.get_device_properties(0).total_memory)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None  # Windows has no sysconf; no warning rather than a wrong one


def _checkpoint_text_encoder(encoder: Any) -> None:
    """Gradient checkpointing that keeps every gradient. transformers before 4.35 only checkpoints reentrantly,
    which gives layers whose input does not require grad (a frozen embedding under LoRA) no gradient at all:
    there the embedding output is made to require grad."""
    try:
        encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    except TypeError:
        encoder.gradient_checkpointing_enable()
        encoder.enable_input_require_grads()


def _chunks(batches: list[list[Any]], size: int) -> list[list[list[Any]]]:
    return [batches[i:i + size] for i in range(0, len(batches), size)]


def _time_ids(item: Any) -> list[float]:
    """SDXL's size conditioning: original size, crop top-left, target size (all height first)."""
    width, height = item.bucket
    original_w, original_h = item.record.size
    crop_x, crop_y = getattr(item, "crop", (0, 0)) or (0, 0)
    return [float(original_h), float(original_w), float(crop_y), float(crop_x), float(height), float(width)]


def _saved_kind(config: TrainingConfig, path: Path) -> str:
    if path.is_dir():
        return "working"
    return "lora" if config.method == "lora" else "checkpoint"


def _validation_batches(plan: Any, config: TrainingConfig, seed: int, rank: int,
                        world_size: int) -> list[list[Any]]:
    """Held-out images at the base resolution, centre-cropped, unflipped, with fixed seeds (this rank's share)."""
    from .data.buckets import bucket_for, bucket_spec, crop_offset

    spec = bucket_spec(config, training_resolutions(config)[0])
    items = []
    for index, record in enumerate(plan.validation):
        bucket = bucket_for(record.size, spec)
        if bucket is not None:
            crop = crop_offset(record.size, bucket, None)
            items.append(data_api.BatchItem(record, bucket, False, crop, seed * 7919 + index))
    mine = items[rank::world_size]
    by_bucket: dict[tuple[int, int], list[Any]] = {}
    for item in mine:
        by_bucket.setdefault(item.bucket, []).append(item)
    size = config.train_batch_size
    return [group[i:i + size] for group in by_bucket.values() for i in range(0, len(group), size)]


__all__ = ["ModelDir", "TrainResult", "Trainer", "resolve_seed"]


# --- command line ------------------------------------------------------------------------------------

class _PrintCallbacks(TrainCallbacks):
    """Plain progress lines for the CLI (rank 0 only)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.last_loss: float | None = None

    def _say(self, text: str) -> None:
        if self.enabled:
            print(text, flush=True)

    def on_status(self, text: str) -> None:
        self._say(text)

    def on_loss(self, record: LossRecord) -> None:
        self.last_loss = record.loss
        if record.validation_loss is not None:
            self._say(f"step {record.step}: validation loss {record.validation_loss:.5f}")

    def on_progress(self, progress: Progress) -> None:
        loss = f" loss {self.last_loss:.5f}" if self.last_loss is not None else ""
        self._say(f"step {progress.step}/{progress.total_steps} epoch {progress.epoch + 1}/{progress.total_epochs}"
                  f"{loss} {progress.it_per_s:.2f} it/s ETA {progress.eta_s:.0f} s")

    def on_saved(self, kind: str, path: Path) -> None:
        self._say(f"saved {kind}: {path}")

    def on_sample(self, step: int, paths: list[Path], prompts: list[str]) -> None:
        self._say(f"samples at step {step}: " + ", ".join(str(p) for p in paths))

    def on_warning(self, text: str) -> None:
        self._say(f"warning: {text}")

    def on_error(self, text: str) -> None:
        self._say(f"error: {text}")


def apply_overrides(config: TrainingConfig, overrides: dict[str, Any]) -> TrainingConfig:
    """Set `field` or `concepts.N.field` values (strings from the CLI or typed values), then validate."""
    from ..config.schema import Concept, parse_value

    for name, raw in overrides.items():
        if name.startswith("concepts."):
            _, index, field_name = name.split(".", 2)
            setattr(config.concepts[int(index)], field_name, parse_value(Concept, field_name, raw))
        else:
            setattr(config, name, parse_value(TrainingConfig, name, raw))
    return validate(config)


def _cli_host(layout: Any) -> Any:
    try:
        from ..host.embedded import EmbeddedHost
    except ImportError:
        return _NullHost(layout)
    return EmbeddedHost(layout)


class _NullHost:
    """A host without generation, for headless runs where the embedded host is not available."""

    name = "null"

    def __init__(self, layout: Any):
        from ..host.base import NullHostMixin

        self.layout = layout
        self._mixin = NullHostMixin()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._mixin, name)

    def list_checkpoints(self) -> list[Path]:
        return []

    def generate(self, request: Any) -> list[Any]:
        raise TrainingError("This run has no image generator for class images; generate them in the web UI "
                            "or put them into the concept's 'class_data_dir'.")


def run_training(layout: Any, name: str, overrides: dict[str, Any] | None = None) -> int:
    """Train model `name` of `layout` in the foreground; 0 when finished, 130 when stopped, 1 on an error.

    Ctrl-C asks the loop to stop after the current step with a final save (a second Ctrl-C aborts).
    """
    import os
    import signal
    import threading

    config = apply_overrides(ModelStore(layout).existing(name).load_config(), overrides or {})
    main_rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0
    callbacks = _PrintCallbacks(main_rank)
    commands = TrainCommands()
    previous = None
    if threading.current_thread() is threading.main_thread():
        def on_interrupt(signum: int, frame: Any) -> None:
            signal.signal(signal.SIGINT, previous or signal.default_int_handler)
            callbacks.on_status("Stopping after this step (Ctrl-C again to abort)")
            commands.stop(save=True)

        previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        result = Trainer(config, _cli_host(layout), callbacks, commands).run()
    except DreamboothError:
        return 1  # already printed through callbacks.on_error
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    return 0 if result.completed else 130
