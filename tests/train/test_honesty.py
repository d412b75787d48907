"""The honesty matrix: every setting changes what training does, or the schema says why it cannot.

Each case changes ONE setting from a baseline run (the shared default one, or a minimal variant where the
setting only acts in a special setup, e.g. the huber delta under the huber loss) and asserts that a named
observable of the real Trainer run differs: final trained weights, per-step losses, the LR per step, the batches
(images, buckets, flips, crops and the captions actually encoded), files written, host generation requests,
sample images, validation losses, callbacks, warnings or the outcome. Every baseline is first shown to be
reproducible, so a difference can only come from the setting. `honesty_matrix()` prints field -> observable;
a test fails when a field has neither a case nor a `ui_only` reason in the schema.

Runs are kept fast: the tiny SD1 model (built once, deep-copied per run instead of re-read from disk), 64 px
images, 2 optimizer steps, batch 2, one run per distinct baseline.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib.util
import json
import shutil
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

from dreambooth.config.schema import Concept, TrainingConfig, settings
from dreambooth.errors import DreamboothError
from dreambooth.store import Layout, ModelStore
from dreambooth.train import loss as loss_module
from dreambooth.train.events import LossRecord, TrainCallbacks, TrainObserver
from dreambooth.train.trainer import Trainer

from fake_host import FakeHost

# --- observations of one run ---------------------------------------------------------------------------------


@dataclass
class Observation:
    """Everything a run did that a setting could change."""

    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    lrs: list[dict[str, float]] = field(default_factory=list)
    validation: list[tuple[int, float]] = field(default_factory=list)
    batches: list[list[tuple[Any, ...]]] = field(default_factory=list)
    captions: list[list[str]] = field(default_factory=list)
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    saved: list[tuple[str, str]] = field(default_factory=list)
    requests: list[tuple[Any, ...]] = field(default_factory=list)
    samples: list[tuple[int, tuple[str, ...]]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    runtime: dict[str, Any] = field(default_factory=dict)
    outcome: str = ""


def _same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)


def differs(observable: str, a: Observation, b: Observation) -> bool:
    if observable == "weights":
        return not _same_weights(a.weights, b.weights)
    return getattr(a, observable) != getattr(b, observable)


OBSERVABLES = tuple(f.name for f in dataclasses.fields(Observation))


class _Recorder(TrainCallbacks):
    def __init__(self, observation: Observation, root: Path):
        self.observation, self.root = observation, root

    def on_progress(self, progress: Any) -> None:
        self.observation.steps.append(progress.step)

    def on_loss(self, record: LossRecord) -> None:
        if record.validation_loss is not None:
            self.observation.validation.append((record.step, record.validation_loss))
        else:
            self.observation.losses.append(record.loss)
            self.observation.lrs.append(dict(record.lr))

    def on_saved(self, kind: str, path: Path) -> None:
        self.observation.saved.append((kind, _relative(path, self.root)))

    def on_sample(self, step: int, paths: list[Path], prompts: list[str]) -> None:
        self.observation.samples.append((step, tuple(prompts)))

    def on_warning(self, text: str) -> None:
        self.observation.warnings.append(text.replace(str(self.root), "<root>"))


class _Watcher(TrainObserver):
    """Through the trainer's public observer hooks: each training batch, the captions it encodes, the runtime
    the session set up, and (after the run) the trained tensors and caches."""

    def __init__(self, observation: Observation, data_root: Path, run_root: Path):
        self.observation, self.data_root, self.run_root = observation, data_root, run_root
        self.session: Any = None

    def on_session(self, session: Any) -> None:
        self.session = session
        self.observation.runtime.update(_runtime_facts(session))

    def on_batch(self, step: int, items: list[Any]) -> None:
        self.observation.batches.append([(self._where(item.record.path), item.record.is_class,
                                          item.bucket, item.flip, item.crop) for item in items])

    def on_captions(self, step: int, captions: list[str]) -> None:
        self.observation.captions.append(list(captions))

    def _where(self, path: Path) -> str:
        """The image's path relative to the shared data or to the run's models folder (generated images)."""
        relative = _relative(path, self.data_root)
        return relative if relative != str(path) else _relative(path, self.run_root)


def _runtime_facts(session: Any) -> dict[str, Any]:
    unet = session.components.denoiser
    return {"tf32": torch.backends.cuda.matmul.allow_tf32,
            "checkpointing": bool(getattr(unet, "is_gradient_checkpointing", False)),
            "frozen_dtype": str(next(session.components.vae.parameters()).dtype),
            "optimizer": type(session.optimizer).__name__}


def _relative(path: Path | str, root: Path) -> str:
    path = Path(path)
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _digest(path: Path) -> str:
    """Content digest: tensors of safetensors (not their metadata, which holds times), pixels of PNGs."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        hasher = hashlib.sha1()
        with safe_open(str(path), "pt") as handle:
            for key in sorted(handle.keys()):
                tensor = handle.get_tensor(key)
                hasher.update(f"{key}{tensor.dtype}{tuple(tensor.shape)}".encode())
                hasher.update(tensor.float().numpy().tobytes())
        return hasher.hexdigest()
    if path.suffix == ".png":
        return hashlib.sha1(np.asarray(Image.open(path)).tobytes()).hexdigest()
    if path.name == "state.json":  # the run id is drawn at random for every new run
        state = {k: v for k, v in json.loads(path.read_text(encoding="utf-8")).items() if k != "run_id"}
        return hashlib.sha1(json.dumps(state, sort_keys=True).encode()).hexdigest()
    return "file"  # pickles and logs hold timings; their presence is what counts


def written_files(root: Path) -> dict[str, str]:
    """Every file the run wrote under the models folder (not the config the test wrote, not the logs)."""
    files = {}
    for path in sorted(root.rglob("*")):
        relative = _relative(path, root)
        if path.is_file() and path.name != "db_config.json" and "/logging/" not in f"/{relative}":
            files[relative] = _digest(path)
    return files


# --- the data and the runs -----------------------------------------------------------------------------------


def _image(path: Path, size: tuple[int, int], seed: int) -> None:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def _images(folder: Path, count: int, seed: int, size: tuple[int, int] = (64, 64),
            captions: list[str] | None = None, suffix: str = ".txt") -> None:
    for index in range(count):
        _image(folder / f"img{index}.png", size, seed * 100 + index)
        if captions:
            (folder / f"img{index}{suffix}").write_text(captions[index % len(captions)])


LONG_CAPTION = ", ".join(f"tag{index} word{index}" for index in range(40))


def make_data(root: Path) -> Path:
    """The read-only image folders every run shares."""
    _images(root / "inst", 2, 1, captions=["a dog on grass", "a dog in snow"])
    _images(root / "inst2", 2, 3)
    _images(root / "cls", 2, 2)
    _images(root / "cls2", 2, 4)
    _images(root / "wide", 1, 5, size=(180, 90))
    _images(root / "tags", 2, 6, captions=["sks, red, blue, green, yellow, purple, orange"])
    _images(root / "long", 2, 7, captions=[LONG_CAPTION])
    _images(root / "twocaps", 2, 8, captions=["a dog from txt"])
    for index in range(2):
        (root / "twocaps" / f"img{index}.caption").write_text("a dog from caption file")
    _write_start_lora(root / "start.safetensors")
    _images(root / "masked", 2, 9)
    for index in range(2):
        mask = np.zeros((64, 64), dtype=np.uint8)
        mask[16:40, 8:32 + 16 * index] = 255
        Image.fromarray(mask).save(root / "masked" / f"img{index}-masklabel.png")
    return root


def _write_start_lora(path: Path) -> None:
    """A LoRA of the tiny SD1 model (rank 4, as the 'lora' baseline) with non-zero adapters, for 'lora_init_file'."""
    from dreambooth.models.tiny import tiny_components
    from dreambooth.train import lora

    config = TrainingConfig(method="lora", lora_rank=4, lora_alpha=4.0, save_precision="fp32")
    components = tiny_components("sd1", seed=0)
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for param in (p for group in lora.add_lora(components, config).values() for p in group):
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    lora.export_lora(components, config, path, {})


def baseline_config(data: Path) -> TrainingConfig:
    concept = Concept(instance_data_dir=str(data / "inst"), instance_prompt="photo of sks dog",
                      instance_token="sks", class_token="dog", class_prompt="photo of a dog",
                      class_data_dir=str(data / "cls"), num_class_images=2, n_samples=0, sample_steps=2,
                      class_infer_steps=2)
    return TrainingConfig(model_name="tiny", resolution=64, enable_bucketing=False, bucket_min_resolution=64,
                          max_train_steps=2, train_batch_size=2, learning_rate=1e-3, text_encoder_lr=1e-3,
                          text_encoder_2_lr=1e-3, lr_scheduler="constant", mixed_precision="no",
                          cache_latents="memory", save_precision="fp32", save_on_end=False, seed=7,
                          concepts=[concept])


def apply(config: TrainingConfig, changes: dict[str, Any], data: Path) -> TrainingConfig:
    """Set `field` / `concepts.N.field` values; '{data}' in strings is the shared data folder."""
    config = copy.deepcopy(config)
    for name, value in changes.items():
        if isinstance(value, str):
            value = value.replace("{data}", str(data))
        target, attribute = config, name
        if name.startswith("concepts."):
            _, index, attribute = name.split(".", 2)
            target = config.concepts[int(index)]
        setattr(target, attribute, value)
    return config


class Runner:
    """Runs the Trainer in a fresh models folder per run, on deep copies of tiny models built once."""

    def __init__(self, workdir: Path, data: Path):
        self.workdir, self.data = workdir, data
        self.models: dict[str, Any] = {}
        self.family_of: dict[Path, str] = {}
        self.count = 0

    def _components(self, family: str) -> Any:
        if family not in self.models:
            from dreambooth.models.tiny import tiny_components

            self.models[family] = tiny_components(family, seed=0)
        return self.models[family]

    def _load(self, working: Path, dtype: torch.dtype = torch.float32,
              part_dtypes: dict[str, torch.dtype] | None = None) -> Any:
        pristine = self._components(self.family_of[Path(working).resolve()])
        # Tokenizers are read-only and slow to copy: share them.
        components = copy.deepcopy(pristine, memo={id(t): t for t in pristine.tokenizers})
        parts = {"unet": components.denoiser, "vae": components.vae,
                 **dict(zip(("text_encoder", "text_encoder_2"), components.text_encoders, strict=False))}
        for name, module in parts.items():
            module.to((part_dtypes or {}).get(name, dtype))
        return components

    def _layout(self, config: TrainingConfig, weights: str) -> tuple[Path, Layout]:
        self.count += 1
        root = self.workdir / f"run{self.count}"
        layout = Layout.under(root).ensure()
        model = ModelStore(layout).model("tiny")
        model.working.mkdir(parents=True)
        self.family_of[model.working.resolve()] = weights
        model.save_config(config)
        (layout.checkpoints_dir / "base.ckpt").write_bytes(b"base model stand-in")
        return root, layout

    def run(self, config: TrainingConfig, weights: str = "sd1", nan_steps: frozenset[int] = frozenset()) -> Observation:
        """Train `config` on the tiny model of family `weights`; NaN losses at forward passes `nan_steps`."""
        root, layout = self._layout(config, weights)
        observation = Observation()
        host = FakeHost(layout)
        watcher = _Watcher(observation, self.data, root)
        trainer = Trainer(config, host, _Recorder(observation, root), resume=False, observers=[watcher])
        with ExitStack() as stack:
            stack.enter_context(mock.patch("dreambooth.models.components.load_components", self._load))
            if nan_steps:
                stack.enter_context(_nan_losses(nan_steps))
            try:
                result = trainer.run()
                observation.outcome = f"completed={result.completed} step={result.step}"
            except DreamboothError as error:
                observation.outcome = f"{type(error).__name__}: {str(error).replace(str(root), '<root>')}"
        if watcher.session is not None:
            observation.weights = {k: v.clone() for k, v in watcher.session.trained_tensors().items()}
            observation.runtime.update(_cache_facts(watcher.session))
        observation.files = written_files(root)
        observation.requests = [_request(r, root) for r in host.requests]
        shutil.rmtree(root, ignore_errors=True)
        return observation


def _cache_facts(session: Any) -> dict[str, Any]:
    cache = session.latent_cache
    text = session.text_cache
    return {"latent_cache": (cache.mode, cache.hits, cache.misses),
            "text_cache": None if text is None else sorted(text)}


def _request(request: Any, root: Path) -> tuple[Any, ...]:
    values = dataclasses.astuple(request) if dataclasses.is_dataclass(request) else tuple(vars(request).values())
    return tuple(_relative(v, root) if isinstance(v, Path) else v for v in values)


def _nan_losses(steps: frozenset[int]) -> Any:
    """Make the loss of the given forward passes (1-based) NaN."""
    real = loss_module.batch_loss
    calls = {"n": 0}

    def maybe_nan(per_sample: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        value = real(per_sample, weights)
        return value * float("nan") if calls["n"] in steps else value

    return mock.patch.object(loss_module, "batch_loss", maybe_nan)


# --- the baselines and the cases -----------------------------------------------------------------------------

SD3_BASE: dict[str, Any] = {"model_family": "sd3", "prediction_type": "flow_matching", "sample_scheduler": "euler",
                            "train_text_encoder": False, "_weights": "sd3"}
# Minimal variants of the default baseline for settings that only act in a special setup.
BASES: dict[str, dict[str, Any]] = {
    "default": {},
    "lora": {"method": "lora", "lora_rank": 4, "lora_alpha": 4.0},
    "locon": {"method": "lora", "lora_rank": 4, "lora_alpha": 4.0, "lora_conv_rank": 2},
    "sdxl": {"model_family": "sdxl", "_weights": "sdxl"},
    # An SDXL v-prediction model with the zero-terminal-SNR schedule, set up as creating it does.
    "sdxlv": {"model_family": "sdxlv", "prediction_type": "v_prediction", "zero_terminal_snr": True,
              "_weights": "sdxlv"},
    "flux": {"model_family": "flux-dev", "_weights": "flux-dev", "prediction_type": "flow_matching", "method": "lora",
             "lora_rank": 4, "lora_alpha": 4.0, "flow_resolution_shift": True, "sample_scheduler": "euler"},
    "flux_fixed_shift": {"model_family": "flux-dev", "_weights": "flux-dev", "prediction_type": "flow_matching",
                         "method": "lora", "lora_rank": 4, "lora_alpha": 4.0, "sample_scheduler": "euler"},
    "flux_mode": {"model_family": "flux-dev", "_weights": "flux-dev", "prediction_type": "flow_matching",
                  "method": "lora", "lora_rank": 4, "lora_alpha": 4.0, "flow_resolution_shift": True,
                  "sample_scheduler": "euler", "flow_timestep_sampling": "mode"},
    "forced": {"force_prediction_type": True},
    "forced_v": {"prediction_type": "v_prediction", "force_prediction_type": True},
    "export": {"save_on_end": True},
    "steps3": {"max_train_steps": 3},
    "epochs": {"max_train_steps": 0, "num_train_epochs": 1},
    "warmup": {"lr_scheduler": "constant_with_warmup", "max_train_steps": 3, "train_text_encoder": False},
    "restarts": {"lr_scheduler": "cosine_with_restarts", "max_train_steps": 4, "train_text_encoder": False},
    "poly": {"lr_scheduler": "polynomial", "max_train_steps": 3, "train_text_encoder": False},
    "linear": {"lr_scheduler": "linear", "max_train_steps": 3, "train_text_encoder": False},
    "frozen_te": {"train_text_encoder": False},
    # resolution 128, buckets of 64 px steps: the 180x90 image trains at 192x64
    "buckets": {"concepts.0.instance_data_dir": "{data}/wide", "enable_bucketing": True, "resolution": 128},
    "wide": {"concepts.0.instance_data_dir": "{data}/wide"},
    "twocaps": {"concepts.0.instance_data_dir": "{data}/twocaps", "concepts.0.instance_prompt": "[filewords]"},
    "filewords": {"concepts.0.instance_prompt": "[filewords]"},
    "tags": {"concepts.0.instance_data_dir": "{data}/tags", "concepts.0.instance_prompt": "[filewords]",
             "with_prior_preservation": False},
    "shuffled": {"concepts.0.instance_data_dir": "{data}/tags", "concepts.0.instance_prompt": "[filewords]",
                 "with_prior_preservation": False, "shuffle_tags": True},
    "long": {"concepts.0.instance_data_dir": "{data}/long", "concepts.0.instance_prompt": "[filewords]",
             "with_prior_preservation": False},
    "masks_off": {"concepts.0.instance_data_dir": "{data}/masked", "with_prior_preservation": False},
    "masks_on": {"concepts.0.instance_data_dir": "{data}/masked", "with_prior_preservation": False,
                 "masked_training": True, "unmasked_probability": 0.0},
    "validation": {"validation_split": 0.5, "max_train_steps": 3},
    "huber": {"loss_type": "huber"},
    "pyramid": {"pyramid_noise_iterations": 2},
    "ema": {"use_ema": True, "ema_decay": 0.5, "save_on_end": True},
    "saves": {"save_every_n_steps": 1, "max_train_steps": 3},
    "no_samples": {"concepts.0.n_samples": 1},
    "samples": {"concepts.0.n_samples": 1, "sample_every_n_steps": 2},
    "generate": {"concepts.0.class_data_dir": "", "concepts.0.num_class_images": 1, "max_train_steps": 1},
    "nan": {"nan_policy": "skip", "max_nan_skips": 1, "_nan": frozenset({1})},
    # SD3 (flow matching, tiny model with T5), text encoders frozen so captions are encoded once
    "sd3": SD3_BASE,
    "sd3_mode": {**SD3_BASE, "flow_timestep_sampling": "mode"},
    "sd3_lora": {**SD3_BASE, "method": "lora", "lora_rank": 4, "lora_alpha": 4.0, "save_on_end": True},
}


@dataclass(frozen=True)
class Case:
    field: str          # 'name' of TrainingConfig or 'concepts.name' of Concept
    change: Any         # the new value (dict for several values of one field, e.g. a scheduler and its LR)
    observable: str
    base: str = "default"

    @property
    def id(self) -> str:
        return f"{self.field}->{self.observable}"


CASES = [
    # Model
    Case("model_family", "sdxl", "outcome"),
    Case("prediction_type", "v_prediction", "outcome"),
    Case("prediction_type", "v_prediction", "losses", "forced"),
    Case("force_prediction_type", False, "outcome", "forced_v"),
    Case("base_checkpoint", "base.ckpt", "requests", "generate"),
    # Method
    Case("method", "finetune", "batches"),
    Case("method", "lora", "weights"),
    Case("train_unet", False, "weights"),
    Case("train_text_encoder", False, "weights"),
    Case("stop_text_encoder", 0.5, "weights"),
    # Steps
    Case("max_train_steps", 3, "steps"),
    Case("num_train_epochs", 2, "steps", "epochs"),
    Case("train_batch_size", 1, "batches"),
    Case("gradient_accumulation_steps", 2, "batches"),
    Case("seed", 8, "losses"),
    # Learning rate
    Case("learning_rate", 2e-3, "lrs"),
    Case("learning_rate", 2e-3, "weights"),
    Case("text_encoder_lr", 2e-3, "lrs"),
    Case("text_encoder_lr", 2e-3, "weights"),
    Case("text_encoder_2_lr", 0.0, "lrs", "sdxl"),
    Case("text_encoder_2_lr", 0.0, "weights", "sdxl"),
    Case("lr_scheduler", "linear", "lrs"),
    Case("lr_warmup_steps", 2, "lrs", "warmup"),
    Case("lr_cycles", 2, "lrs", "restarts"),
    Case("lr_power", 3.0, "lrs", "poly"),
    Case("lr_decay_past_end", 2.0, "lrs", "linear"),
    Case("scale_lr", "linear", "lrs"),
    # Optimizer
    Case("optimizer", "adafactor", "weights"),
    Case("weight_decay", 0.5, "weights"),
    Case("text_encoder_weight_decay", 0.5, "weights"),
    Case("adam_beta1", 0.5, "weights"),
    Case("adam_beta2", 0.5, "weights"),
    Case("adam_epsilon", 1e-2, "weights"),
    Case("max_grad_norm", 1e-4, "weights"),
    # Prior preservation
    Case("with_prior_preservation", False, "batches"),
    Case("prior_loss_weight", 0.25, "losses"),
    # LoRA
    Case("lora_rank", 2, "weights", "lora"),
    Case("lora_alpha", 16.0, "weights", "lora"),
    Case("lora_dropout", 0.5, "weights", "lora"),
    Case("lora_conv_rank", 2, "weights", "lora"),
    Case("lora_conv_alpha", 8.0, "weights", "locon"),
    Case("use_dora", True, "weights", "lora"),
    Case("lora_key_format", "diffusers", "files", "sd3_lora"),
    Case("lora_init_file", "{data}/start.safetensors", "weights", "lora"),
    # Data
    Case("resolution", 128, "batches"),
    Case("extra_resolutions", "128", "batches"),
    Case("enable_bucketing", False, "batches", "buckets"),
    Case("bucket_min_resolution", 128, "batches", "buckets"),
    Case("bucket_max_resolution", 128, "batches", "buckets"),
    Case("bucket_step", 32, "batches", "buckets"),
    Case("bucket_no_upscale", True, "batches", "buckets"),
    # Captions
    Case("caption_extension", ".caption", "captions", "twocaps"),
    Case("shuffle_tags", True, "captions", "tags"),
    Case("keep_tokens", 3, "captions", "shuffled"),
    Case("caption_dropout", 1.0, "captions"),
    Case("max_token_length", 150, "losses", "long"),
    Case("pad_tokens", False, "losses"),
    Case("clip_skip", 2, "losses"),
    # Augmentation
    Case("hflip", True, "batches"),
    Case("random_crop", True, "batches", "wide"),
    # Masked training
    Case("masked_training", True, "losses", "masks_off"),
    Case("unmasked_probability", 1.0, "losses", "masks_on"),
    Case("unmasked_weight", 0.5, "losses", "masks_on"),
    Case("normalize_masked_area_loss", True, "losses", "masks_on"),
    # Validation
    Case("validation_split", 0.5, "validation"),
    Case("validation_every_n_steps", 2, "validation", "validation"),
    # Loss and noise
    Case("loss_type", "huber", "losses"),
    Case("huber_c", 1.0, "losses", "huber"),
    Case("min_snr_gamma", 1.0, "losses"),
    Case("offset_noise", 0.1, "losses"),
    Case("pyramid_noise_iterations", 2, "losses"),
    Case("pyramid_noise_discount", 0.8, "losses", "pyramid"),
    Case("zero_terminal_snr", True, "losses"),
    Case("zero_terminal_snr", False, "losses", "sdxlv"),
    Case("input_perturbation", 0.1, "losses"),
    # Flow matching (SD3)
    Case("flow_timestep_sampling", "uniform", "losses", "sd3"),
    Case("flow_logit_mean", 1.0, "losses", "sd3"),
    Case("flow_logit_std", 0.5, "losses", "sd3"),
    Case("flow_mode_scale", 0.5, "losses", "sd3_mode"),
    Case("flow_shift", 1.0, "losses", "sd3"),
    Case("flow_loss_weighting", "cosmap", "losses", "sd3"),
    # Precision and memory
    Case("mixed_precision", "bf16", "losses"),
    Case("allow_tf32", False, "runtime"),
    Case("gradient_checkpointing", True, "runtime"),
    Case("base_quantization", "nf4", "losses", "lora"),
    Case("flow_resolution_shift", False, "losses", "flux"),
    # The flow-matching settings, on the tiny Flux dev model.
    Case("flow_timestep_sampling", "uniform", "losses", "flux"),
    Case("flow_logit_mean", 1.0, "losses", "flux"),
    Case("flow_logit_std", 0.5, "losses", "flux"),
    Case("flow_mode_scale", 0.5, "losses", "flux_mode"),
    Case("flow_shift", 1.5, "losses", "flux_fixed_shift"),
    Case("flow_loss_weighting", "cosmap", "losses", "flux"),
    # fp8 storage needs diffusers' layerwise casting (0.32+); older diffusers refuse the setting with a message.
    Case("base_quantization", "fp8", "losses" if importlib.util.find_spec("diffusers.hooks") else "outcome", "lora"),
    Case("cache_latents", "off", "runtime"),
    Case("cache_latents", "disk", "files"),
    Case("cache_text_encoder_outputs", "off", "runtime", "frozen_te"),
    Case("cache_text_encoder_outputs", "on", "outcome"),
    Case("attention", "xformers", "warnings"),
    # EMA
    Case("use_ema", True, "files", "export"),
    Case("ema_decay", 0.9, "files", "ema"),
    Case("ema_update_every", 2, "files", "ema"),
    Case("ema_for_output", False, "files", "ema"),
    # Saving
    Case("save_every_n_steps", 1, "files"),
    Case("save_every_n_epochs", 1, "files", "steps3"),
    Case("save_keep_last", 1, "files", "saves"),
    Case("snapshot_every_n_steps", 1, "saved"),
    Case("save_precision", "fp16", "files", "export"),
    Case("save_on_end", True, "files"),
    # Samples
    Case("sample_every_n_steps", 2, "samples", "no_samples"),
    Case("sample_prompts", "a red cat --s 1 --d 3", "samples", "samples"),
    Case("sample_scheduler", "euler", "files", "samples"),
    # Logging
    Case("log_every_n_steps", 2, "losses"),
    # Faults
    Case("nan_policy", "stop", "outcome", "nan"),
    Case("max_nan_skips", 0, "outcome", "nan"),
    # Concepts
    Case("concepts.instance_data_dir", "{data}/inst2", "batches"),
    Case("concepts.instance_prompt", "a photo of sks dog", "captions"),
    Case("concepts.instance_token", "ohwx", "captions", "filewords"),
    Case("concepts.class_token", "puppy", "captions", "filewords"),
    Case("concepts.class_data_dir", "{data}/cls2", "batches"),
    Case("concepts.class_prompt", "photo of a cat", "captions"),
    Case("concepts.class_prompt", "photo of a cat", "requests", "generate"),
    Case("concepts.class_negative_prompt", "blurry", "requests", "generate"),
    Case("concepts.num_class_images", 2, "requests", "generate"),
    Case("concepts.class_guidance_scale", 5.0, "requests", "generate"),
    Case("concepts.class_infer_steps", 3, "requests", "generate"),
    Case("concepts.repeats", 2, "batches"),
    Case("concepts.sample_prompt", "sks dog on the moon", "samples", "samples"),
    Case("concepts.sample_negative_prompt", "blurry", "files", "samples"),
    Case("concepts.n_samples", 2, "samples", "samples"),
    Case("concepts.sample_seed", 3, "files", "samples"),
    Case("concepts.sample_guidance_scale", 3.0, "files", "samples"),
    Case("concepts.sample_steps", 3, "files", "samples"),
]


def all_fields() -> list[str]:
    return ([f.name for f in settings(TrainingConfig)] + [f"concepts.{f.name}" for f in settings(Concept)])


def ui_only_fields() -> dict[str, str]:
    reasons = {f.name: f.metadata.get("ui_only") for f in settings(TrainingConfig)}
    reasons.update({f"concepts.{f.name}": f.metadata.get("ui_only") for f in settings(Concept)})
    return {name: reason for name, reason in reasons.items() if reason}


def honesty_matrix() -> list[tuple[str, str]]:
    """(field, what changes when it changes): the observables of its cases, or 'ui_only: <reason>'."""
    observed: dict[str, list[str]] = {}
    for case in CASES:
        base = f" (setup: {case.base})" if case.base != "default" else ""
        observed.setdefault(case.field, []).append(case.observable + base)
    ui_only = ui_only_fields()
    rows = []
    for name in all_fields():
        if name in observed:
            rows.append((name, ", ".join(observed[name])))
        elif name in ui_only:
            rows.append((name, f"ui_only: {ui_only[name]}"))
        else:
            rows.append((name, "MISSING"))
    return rows


def format_matrix(rows: list[tuple[str, str]]) -> str:
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {what}" for name, what in rows)


# --- fixtures and tests --------------------------------------------------------------------------------------


class Runs:
    """Observations of the baselines (each run twice: the second proves it is reproducible) and the cases."""

    def __init__(self, runner: Runner, data: Path):
        self.runner, self.data = runner, data
        self.bases: dict[str, tuple[Observation, Observation]] = {}
        self.cases: dict[str, Observation] = {}

    def _observe(self, changes: dict[str, Any]) -> Observation:
        changes = dict(changes)
        nan_steps = changes.pop("_nan", frozenset())
        weights = changes.pop("_weights", "sd1")
        return self.runner.run(apply(baseline_config(self.data), changes, self.data), weights, nan_steps)

    def base(self, name: str) -> tuple[Observation, Observation]:
        if name not in self.bases:
            self.bases[name] = (self._observe(BASES[name]), self._observe(BASES[name]))
        return self.bases[name]

    def case(self, case: Case) -> Observation:
        return self.changed(case.base, {case.field.replace("concepts.", "concepts.0.", 1): case.change})

    def changed(self, base: str, changes: dict[str, Any]) -> Observation:
        key = repr((base, sorted(changes.items())))
        if key not in self.cases:
            self.cases[key] = self._observe({**BASES[base], **changes})
        return self.cases[key]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    data = make_data(tmp_path_factory.mktemp("honesty-data"))
    return Runs(Runner(tmp_path_factory.mktemp("honesty-runs"), data), data)


def test_every_setting_is_covered_or_ui_only() -> None:
    rows = honesty_matrix()
    print("\nHonesty matrix (setting -> what changes):\n" + format_matrix(rows))
    missing = [name for name, what in rows if what == "MISSING"]
    assert not missing, f"settings with neither an honesty case nor a ui_only reason: {missing}"
    unknown = {case.field for case in CASES} - set(all_fields())
    assert not unknown, f"cases for settings the schema does not have: {unknown}"
    assert all(case.observable in OBSERVABLES for case in CASES)
    assert set(BASES) == {case.base for case in CASES} | {"default"}


def test_ui_only_settings_really_do_not_act(runs: Runs) -> None:
    """A ui_only setting changed must leave every observable of the run as it was."""
    first, _ = runs.base("default")
    for name in ui_only_fields():
        if name == "model_name":  # the run needs the folder; its name is the folder's, checked by the store
            continue
        other = runs._observe({name.replace("concepts.", "concepts.0.", 1): "something else"})
        changed = [o for o in OBSERVABLES if differs(o, first, other)]
        assert not changed, f"{name} is marked ui_only but changes {changed}"


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_setting_changes_training(runs: Runs, case: Case) -> None:
    first, again = runs.base(case.base)
    unstable = [o for o in OBSERVABLES if differs(o, first, again)]
    assert not unstable, f"baseline {case.base!r} is not reproducible in {unstable}"
    assert first.outcome.startswith("completed=True"), first.outcome
    changed = runs.case(case)
    assert differs(case.observable, first, changed), (
        f"changing {case.field} to {case.change!r} (setup {case.base}) left '{case.observable}' unchanged: "
        f"{getattr(first, case.observable) if case.observable != 'weights' else 'same tensors'}")


def test_matrix_helper_reports_missing_fields() -> None:
    rows = dict(honesty_matrix())
    assert rows["model_name"].startswith("ui_only")
    assert "lrs" in rows["learning_rate"] and "sdxl" in rows["text_encoder_2_lr"]


# Settings that trade memory or time must not change what is learnt (within float noise).
SAME_RESULT = [("default", {"gradient_checkpointing": True}), ("lora", {"gradient_checkpointing": True}),
               ("default", {"cache_latents": "off"}), ("default", {"cache_latents": "disk"}),
               ("frozen_te", {"cache_text_encoder_outputs": "off"}), ("default", {"attention": "xformers"})]


@pytest.mark.parametrize(("base", "changes"), SAME_RESULT, ids=[f"{b}-{next(iter(c))}" for b, c in SAME_RESULT])
def test_memory_and_speed_settings_keep_the_result(runs: Runs, base: str, changes: dict[str, Any]) -> None:
    reference, _ = runs.base(base)
    changed = runs.changed(base, changes)
    assert changed.losses == pytest.approx(reference.losses, rel=1e-5)
    assert reference.weights.keys() == changed.weights.keys()
    assert all(torch.allclose(reference.weights[k], changed.weights[k], atol=1e-6) for k in reference.weights)
