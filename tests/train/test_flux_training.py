"""Tiny Flux.1 models through the real Trainer: a LoRA (with DreamBooth regularisation images) trains, samples,
resumes bit-exactly and exports a kohya-format file that, applied at strength 1 the way Forge and ComfyUI apply it,
reproduces the trained transformer and the image training sampled. T5 leaves the device once captions are cached.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from dreambooth.families import flux_names, get_family
from dreambooth.generation import GenerationRequest
from dreambooth.models.components import build_pipeline, load_components
from dreambooth.store import Layout, ModelStore
from dreambooth.train.events import LossRecord, Progress, TrainCallbacks, TrainCommands
from dreambooth.train.sampling import render

from fake_host import FakeHost

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "loratools"))
import flux_loader_rules as rules  # noqa: E402

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("sentencepiece", reason="the tiny T5 tokenizer is a SentencePiece model built on the fly")
if not hasattr(diffusers, "FluxTransformer2DModel"):
    pytest.skip("this diffusers has no FluxTransformer2DModel (Flux needs diffusers 0.30 or newer)",
                allow_module_level=True)

PROMPT = GenerationRequest("photo of sks dog", seed=3, steps=2, cfg_scale=3.5, width=64, height=64)


class Recorder(TrainCallbacks):
    """What a run reports; stops it (with a save) at `stop_at`."""

    def __init__(self, commands: TrainCommands | None = None, stop_at: int | None = None):
        self.commands, self.stop_at = commands, stop_at
        self.losses: list[LossRecord] = []
        self.saved: list[tuple[str, Path]] = []
        self.samples: list[tuple[int, list[Path]]] = []

    def on_progress(self, progress: Progress) -> None:
        if self.commands is not None and progress.step == self.stop_at:
            self.commands.stop(save=True)

    def on_loss(self, record: LossRecord) -> None:
        self.losses.append(record)

    def on_saved(self, kind: str, path: Path) -> None:
        self.saved.append((kind, path))

    def on_sample(self, step: int, paths: list[Path], prompts: list[str]) -> None:
        self.samples.append((step, paths))


class FluxEnv:
    """A temporary models folder with one tiny Flux model and its own settings (LoRA, flow matching)."""

    def __init__(self, root: Path, working: Path, family: str, base_config: Callable[..., Any]):
        self.layout = Layout.under(root / "models").ensure()
        self.base_working = working
        self.model = ModelStore(self.layout).model("tiny")
        shutil.copytree(working, self.model.working)
        defaults = {**get_family(family).config_defaults(), "resolution": 64, "lora_rank": 4, "lora_alpha": 4.0}
        self.config = base_config("tiny", root, **defaults)
        self.model.save_config(self.config)
        self.host = FakeHost(self.layout)

    def trainer(self, callbacks: Any = None, commands: Any = None, resume: bool = True, **overrides: Any) -> Any:
        import copy

        from dreambooth.train.trainer import Trainer

        config = copy.deepcopy(self.config)
        for key, value in overrides.items():
            setattr(config, key, value)
        return Trainer(config, self.host, callbacks, commands, resume=resume)

    def fresh(self) -> None:
        shutil.rmtree(self.model.working)
        shutil.copytree(self.base_working, self.model.working)
        for folder in (self.model.snapshots, self.model.samples, self.model.logging, self.layout.lora_dir):
            shutil.rmtree(folder, ignore_errors=True)
        self.layout.ensure()


@pytest.fixture
def flux_env(tmp_path: Path, tiny_working: Callable[[str], Path], make_config: Callable[..., Any]) -> FluxEnv:
    torch.manual_seed(0)
    return FluxEnv(tmp_path, tiny_working("flux-dev"), "flux-dev", make_config)


def lora_file(env: FluxEnv) -> Path:
    return sorted(env.layout.lora_dir.glob("*.safetensors"))[-1]


def applied_like_forge(env: FluxEnv, path: Path) -> Any:
    """The base model with the file applied at strength 1 by Forge's rules: onto the original-layout weights,
    then back to diffusers' layout."""
    components = load_components(env.model.working)
    transformer = components.denoiser
    original = flux_names.to_original(transformer.state_dict(), transformer.config)
    weights = {f"diffusion_model.{key}": value.clone() for key, value in original.items()}
    shape = (transformer.config.num_layers, transformer.config.num_single_layers,
             flux_names.inner_dim(transformer.config), bool(transformer.config.guidance_embeds))
    tensors = load_file(str(path))
    unconsumed = rules.apply(weights, tensors, rules.unet_key_map(list(original), *shape))
    assert unconsumed == [], unconsumed[:3]
    patched = flux_names.from_original({key.removeprefix("diffusion_model."): value for key, value in weights.items()},
                                       transformer.config)
    transformer.load_state_dict(patched)
    return components


def test_lora_trains_samples_and_exports_what_forge_applies(flux_env: FluxEnv) -> None:
    commands = TrainCommands()
    recorder = Recorder(commands)
    trainer = flux_env.trainer(recorder, commands, max_train_steps=2, learning_rate=5e-3, train_text_encoder=False,
                               sample_every_n_steps=2)
    trainer.config.concepts[0].n_samples = 1
    trainer.config.concepts[0].sample_steps = 2
    result = trainer.run()
    assert result.completed and "lora" in [kind for kind, _ in recorder.saved]
    assert recorder.samples and recorder.samples[-1][0] == 2  # previews rendered by FluxPipeline
    assert len(recorder.losses) == 2 and all(np.isfinite(record.loss) for record in recorder.losses)
    path = lora_file(flux_env)
    with safe_open(str(path), "pt") as handle:
        keys, metadata = set(handle.keys()), handle.metadata()
    assert "lora_unet_single_blocks_0_linear1.lora_down.weight" in keys
    assert not any(key.startswith("lora_te") for key in keys)
    assert metadata["ss_base_model_version"] == "flux1" and metadata["modelspec.architecture"] == "flux-1-dev/lora"
    session = trainer.session
    with torch.no_grad():
        from dreambooth.train.lora import merge_lora

        trained = render(build_pipeline(session.components, "euler"), PROMPT, torch.device("cpu"))
        merge_lora(session.components)
        merged = session.components.denoiser.state_dict()
        applied = applied_like_forge(flux_env, path)
        worst = max(float((applied.denoiser.state_dict()[key].float() - value.float()).abs().max())
                    for key, value in merged.items())
        from_file = render(build_pipeline(applied, "euler"), PROMPT, torch.device("cpu"))
        base = render(build_pipeline(load_components(flux_env.model.working), "euler"), PROMPT, torch.device("cpu"))
    assert worst < 1e-5
    difference = np.abs(np.asarray(trained, dtype=np.int16) - np.asarray(from_file, dtype=np.int16))
    assert difference.max() <= 1  # the trained image, up to rounding of the merged weights
    assert np.abs(np.asarray(trained, dtype=np.int16) - np.asarray(base, dtype=np.int16)).max() > 0


def _lora_tensors(env: FluxEnv) -> dict[str, torch.Tensor]:
    return load_file(str(lora_file(env)))


def test_resume_is_bit_identical(flux_env: FluxEnv) -> None:
    settings = {"max_train_steps": 4, "lora_dropout": 0.1, "lr_scheduler": "cosine", "hflip": True,
                "train_text_encoder": True}
    flux_env.trainer(resume=False, **settings).run()
    straight = _lora_tensors(flux_env)
    flux_env.fresh()
    commands = TrainCommands()
    first = flux_env.trainer(Recorder(commands, stop_at=2), commands, resume=False, **settings).run()
    assert first.stopped and first.step == 2 and first.snapshot is not None
    resumed = flux_env.trainer(**settings).run()
    assert resumed.completed and resumed.step == 4
    final = _lora_tensors(flux_env)
    assert straight.keys() == final.keys() and any(key.startswith("lora_te1_") for key in final)
    assert all(torch.equal(straight[key], final[key]) for key in straight)
    assert_every_key_matched_by_forge_and_comfy(flux_env, set(final))


def assert_every_key_matched_by_forge_and_comfy(env: FluxEnv, keys: set[str]) -> None:
    """Transformer keys by the UNet map, CLIP-L's by the CLIP map (Forge: UNet first, the rest to CLIP)."""
    from dreambooth.families.tables import hf_text_name

    components = load_components(env.model.working)
    transformer, (clip, t5) = components.denoiser, components.text_encoders
    original = flux_names.to_original(transformer.state_dict(), transformer.config)
    shape = (transformer.config.num_layers, transformer.config.num_single_layers,
             flux_names.inner_dim(transformer.config), bool(transformer.config.guidance_embeds))
    clip_keys = [f"clip_l.transformer.{hf_text_name(name)}.weight" for name, module in clip.named_modules()
                 if getattr(module, "weight", None) is not None]
    t5_keys = [f"t5xxl.transformer.{key}" for key in t5.state_dict() if key.endswith(".weight")]
    for forge in (True, False):
        matched = rules.forge_matches(keys, rules.unet_key_map(list(original), *shape),
                                      rules.clip_key_map(clip_keys, t5_keys, forge=forge))
        assert sorted(keys - set(matched)) == []
        assert all(target.startswith("clip_l.") for key, (target, _) in matched.items() if key.startswith("lora_te1_"))


def test_cached_captions_mean_training_never_runs_t5(flux_env: FluxEnv,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    trainer = flux_env.trainer(max_train_steps=2, train_text_encoder=False, cache_text_encoder_outputs="on")
    session, _ = trainer.setup()
    from dreambooth.train.objectives import encode_text

    t5 = session.components.text_encoders[1]
    calls: list[int] = []
    monkeypatch.setattr(type(t5), "forward", lambda *args, **kwargs: calls.append(1) or (_ for _ in ()).throw(
        AssertionError("T5 ran during training")))
    assert session.text_cache is not None and len(session.text_cache) == 2  # instance and class captions
    encode_text(session, sorted(session.text_cache))  # every caption of the run is cached: T5 never runs again
    assert calls == []


def test_schnell_trains_without_guidance_or_shift(tmp_path: Path, tiny_working: Callable[[str], Path],
                                                  make_config: Callable[..., Any]) -> None:
    env = FluxEnv(tmp_path, tiny_working("flux-schnell"), "flux-schnell", make_config)
    assert env.config.flow_shift == 1.0 and not env.config.flow_resolution_shift
    result = env.trainer(max_train_steps=1, train_text_encoder=False).run()
    assert result.completed
    with safe_open(str(lora_file(env)), "pt") as handle:
        assert handle.metadata()["modelspec.architecture"] == "flux-1-schnell/lora"


def test_regularisation_images_train_through_the_same_loop(flux_env: FluxEnv) -> None:
    """Prior preservation: class images come in the batches and their captions are encoded like the instance's."""
    from dreambooth.train.events import TrainObserver

    class Batches(TrainObserver):
        def __init__(self) -> None:
            self.kinds: list[bool] = []
            self.captions: list[str] = []

        def on_batch(self, step: int, items: list[Any]) -> None:
            self.kinds += [item.record.is_class for item in items]

        def on_captions(self, step: int, captions: list[str]) -> None:
            self.captions += captions

    seen = Batches()
    trainer = flux_env.trainer(max_train_steps=4, train_text_encoder=False, prior_loss_weight=0.5)
    trainer.observers = [seen]
    assert trainer.run().completed
    assert True in seen.kinds and False in seen.kinds
    assert "photo of a dog" in seen.captions and "photo of sks dog" in seen.captions


def test_low_memory_settings_train_the_same_lora(flux_env: FluxEnv) -> None:
    """Gradient checkpointing and an NF4 base (bitsandbytes runs on the CPU too): the same adapters train; only the
    base's rounding changes the numbers, checkpointing changes none."""
    pytest.importorskip("bitsandbytes")
    settings = {"max_train_steps": 2, "train_text_encoder": False}
    flux_env.trainer(resume=False, **settings).run()
    plain = _lora_tensors(flux_env)
    flux_env.fresh()
    flux_env.trainer(resume=False, gradient_checkpointing=True, **settings).run()
    checkpointed = _lora_tensors(flux_env)
    flux_env.fresh()
    result = flux_env.trainer(resume=False, gradient_checkpointing=True, base_quantization="nf4", **settings).run()
    quantized = _lora_tensors(flux_env)
    assert result.completed and plain.keys() == checkpointed.keys() == quantized.keys()
    assert all(torch.allclose(plain[key], checkpointed[key], atol=1e-6) for key in plain)
    assert any(not torch.equal(plain[key], quantized[key]) for key in plain if key.endswith("lora_up.weight"))
