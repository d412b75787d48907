from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dreambooth.models import components as components_module
from dreambooth.models.components import build_pipeline, load_components, save_components
from dreambooth.models.tiny import tiny_components

FAMILIES = ("sd1", "sd2", "sd2v", "sdxl")


def _modules(components: components_module.Components) -> list[torch.nn.Module]:
    return [components.denoiser, components.vae, *components.text_encoders]


def _assert_same_weights(first: components_module.Components, second: components_module.Components) -> None:
    for left, right in zip(_modules(first), _modules(second), strict=True):
        left_state, right_state = left.state_dict(), right.state_dict()
        assert left_state.keys() == right_state.keys()
        for key in left_state:
            assert torch.equal(left_state[key], right_state[key]), key


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_weights_are_not_degenerate(family: str) -> None:
    components = tiny_components(family)
    for module in _modules(components):
        for name, parameter in module.named_parameters():
            flat = parameter.detach().reshape(-1)
            assert not bool((flat == flat[0]).all()), f"{family}: {name} is constant"


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_structure(family: str) -> None:
    components = tiny_components(family)
    assert components.family == family
    assert len(components.text_encoders) == len(components.tokenizers) == (2 if family == "sdxl" else 1)
    expected = "v_prediction" if family == "sd2v" else "epsilon"
    assert components.prediction_type == components.noise_scheduler.config.prediction_type == expected
    if family == "sdxl":
        assert components.denoiser.config.addition_embed_type == "text_time"
        assert components.tokenizers[1].pad_token == "!"
    with torch.no_grad():
        latents = components.vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
    assert latents.shape == (1, 4, 8, 8)


def test_tiny_is_deterministic_per_seed() -> None:
    _assert_same_weights(tiny_components("sd1", seed=3), tiny_components("sd1", seed=3))
    other = tiny_components("sd1", seed=4)
    assert not torch.equal(tiny_components("sd1", seed=3).denoiser.conv_in.weight, other.denoiser.conv_in.weight)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_save_load_round_trip(family: str, tmp_path: Path) -> None:
    original = tiny_components(family)
    working = save_components(original, tmp_path / "working")
    loaded = load_components(working)
    _assert_same_weights(original, loaded)
    assert loaded.family == family and loaded.prediction_type == original.prediction_type
    assert loaded.extras.keys() == original.extras.keys()
    assert [t.pad_token for t in loaded.tokenizers] == [t.pad_token for t in original.tokenizers]
    assert (working / "model_index.json").is_file()


def test_save_is_atomic_when_writing_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = tiny_components("sd1", seed=1)
    save_components(first, tmp_path / "working")

    def crash(components: object, folder: Path) -> None:
        folder.mkdir()
        (folder / "half-written").write_text("x")
        raise OSError("disk full")

    monkeypatch.setattr(components_module, "write_components", crash)
    with pytest.raises(OSError):
        save_components(tiny_components("sd1", seed=2), tmp_path / "working")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["working"]
    _assert_same_weights(first, load_components(tmp_path / "working"))


def test_interrupted_swap_is_recovered(tmp_path: Path) -> None:
    first = tiny_components("sd1", seed=1)
    save_components(first, tmp_path / "working")
    # A crash between the two renames leaves only the old folder under its temporary name.
    (tmp_path / "working").rename(tmp_path / ".working.old")
    _assert_same_weights(first, load_components(tmp_path / "working"))


def test_replacing_working_folder(tmp_path: Path) -> None:
    save_components(tiny_components("sd1", seed=1), tmp_path / "working")
    second = tiny_components("sd1", seed=2)
    save_components(second, tmp_path / "working")
    _assert_same_weights(second, load_components(tmp_path / "working"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["working"]


@pytest.mark.parametrize("family,scheduler", [("sd1", "ddim"), ("sd1", "euler"), ("sd2v", "euler_a"),
                                              ("sdxl", "dpmpp_2m")])
def test_pipeline_samples(family: str, scheduler: str) -> None:
    components = tiny_components(family)
    pipeline = build_pipeline(components, scheduler)
    pipeline.set_progress_bar_config(disable=True)
    assert pipeline.scheduler.config.prediction_type == components.prediction_type
    images = pipeline("a photo of sks dog", num_inference_steps=2, height=64, width=64, output_type="np",
                      generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 64, 64, 3)
    assert float(images.std()) > 0


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "euler_a", "dpmpp_2m"])
def test_zero_terminal_snr_models_sample_from_the_last_timestep_with_rescaled_guidance(scheduler: str) -> None:
    """Lin et al. 2023: a zero-terminal-SNR model samples with v-prediction, from the last timestep (trailing
    spacing), with classifier-free guidance rescaled (phi 0.7); every sampler gives finite images."""
    from dreambooth.models.components import call_options

    components = tiny_components("sdxlv")
    pipeline = build_pipeline(components, scheduler)
    pipeline.set_progress_bar_config(disable=True)
    config = pipeline.scheduler.config
    assert (config.prediction_type, config.rescale_betas_zero_snr, config.timestep_spacing) == (
        "v_prediction", True, "trailing")
    assert call_options(pipeline) == {"guidance_rescale": 0.7}
    images = pipeline("a photo of sks dog", num_inference_steps=3, height=64, width=64, output_type="np",
                      generator=torch.Generator().manual_seed(0), **call_options(pipeline)).images
    assert int(pipeline.scheduler.timesteps[0]) == 999
    assert np.isfinite(images).all() and float(images.std()) > 0
    plain = build_pipeline(tiny_components("sdxl"), scheduler)
    assert plain.scheduler.config.timestep_spacing == "leading" and call_options(plain) == {}


def test_unknown_sampler_is_refused() -> None:
    from dreambooth.errors import ConfigError

    with pytest.raises(ConfigError, match="'sample_scheduler': 'plms2'"):
        build_pipeline(tiny_components("sd1"), "plms2")
