"""SDXL v-prediction with zero terminal SNR (NoobAI-XL style): detected as hosts detect it, exported so hosts
load it back as such, and SDXL-derived epsilon checkpoints (Pony, Illustrious, NoobAI epsilon) kept as SDXL.

The host rules replayed here are read from their sources: AUTOMATIC1111 1.10 builds an SDXL model from the
yaml beside the checkpoint and samples it as v-prediction when `model.params.denoiser_config.params.
scaling_config.target` is VScaling (modules/sd_models_xl.py, extend_sdxl); Forge (dfdcbab, backend/loader.py)
takes v from that yaml field or `parameterization: v`, else from the `v_pred` key (huggingface_guess), and
samples with the zero-terminal-SNR sigmas when the `ztsnr` key is there; reForge (3b56b26,
ldm_patched/modules/supported_models.py) and SD.Next (modules/sd_models.py) read the same two keys.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from dreambooth.errors import ModelError
from dreambooth.families import detect_family, get_family, read_markers, yaml_prediction
from dreambooth.families.base import CONFIG_DIR
from dreambooth.loratools.files import lora_metadata
from dreambooth.loratools.read import LoraFile
from dreambooth.models.components import Components, save_components, uses_zero_terminal_snr
from dreambooth.models.export import checkpoint_state_dict, export_checkpoint
from dreambooth.models.loading import (
    CONFIGS_METADATA_KEY,
    create_model,
    load_checkpoint,
    load_diffusers_folder,
)
from dreambooth.models.tiny import tiny_components, tiny_configs
from dreambooth.store import Layout, ModelStore


@functools.cache
def sdxl_state() -> dict[str, torch.Tensor]:
    """The tiny SDXL model's single file without any marker: what an SDXL fine-tune looks like."""
    return checkpoint_state_dict(tiny_components("sdxl", seed=0))


def write_file(path: Path, keys: tuple[str, ...] = (), metadata: dict[str, str] | None = None,
               yaml_text: str | None = None) -> Path:
    """A host-style SDXL file: the weights, the given empty marker keys, typical metadata, a yaml beside."""
    state = {**sdxl_state(), **{key: torch.tensor([]) for key in keys}}
    save_file(state, str(path), metadata={CONFIGS_METADATA_KEY: json.dumps(tiny_configs("sdxl")),
                                          **(metadata or {})})
    if yaml_text is not None:
        path.with_suffix(".yaml").write_text(yaml_text, encoding="utf-8")
    return path


# --- what each host reads, replayed --------------------------------------------------------------------

def a1111_parameterization(yaml_text: str | None) -> str:
    """AUTOMATIC1111 1.10.1: SDXL is v only through the yaml beside the file (its denoiser's scaling)."""
    if yaml_text is None:
        return "eps"
    scaling = yaml.safe_load(yaml_text)["model"]["params"]["denoiser_config"]["params"]["scaling_config"]
    return "v" if scaling["target"].endswith(".VScaling") else "eps"


def forge_reading(keys: set[str], yaml_text: str | None) -> tuple[str, bool]:
    """Forge: (prediction type, zero-terminal-SNR sampling)."""
    prediction = "v_prediction" if "v_pred" in keys else "epsilon"
    if yaml_text is not None:
        params = yaml.safe_load(yaml_text).get("model", {}).get("params", {})
        target = params.get("denoiser_config", {}).get("params", {}).get("scaling_config", {}).get("target", "")
        if params.get("parameterization") == "v" or target.endswith(".VScaling"):
            prediction = "v_prediction"
    return prediction, "ztsnr" in keys


def sdnext_scheduler(keys: set[str]) -> dict[str, object]:
    """SD.Next: the scheduler overrides it applies to an SDXL safetensors file with the NoobAI keys."""
    if "v_pred" not in keys:
        return {}
    return {"prediction_type": "v_prediction", **({"rescale_betas_zero_snr": True} if "ztsnr" in keys else {})}


# --- detection -----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("keys", "metadata", "yaml_name", "expected"), [
    (("v_pred", "ztsnr"), {}, None, ("sdxlv", "v_prediction", True)),           # NoobAI-XL V-Pred 1.0
    (("v_pred",), {}, None, ("sdxlv", "v_prediction", False)),                  # v without the ztsnr key
    ((), {}, "sdxl/sd_xl_v.yaml", ("sdxlv", "v_prediction", True)),              # A1111: yaml beside
    ((), {"modelspec.prediction_type": "v"}, None, ("sdxlv", "v_prediction", True)),
    (("v_pred", "ztsnr"), {"dreambooth_prediction_type": "v_prediction", "dreambooth_zero_terminal_snr": "False"},
     None, ("sdxlv", "v_prediction", False)),                                   # our record wins
    ((), {}, None, ("sdxl", "epsilon", False)),
], ids=["keys", "v_pred-only", "yaml", "modelspec", "our-metadata", "none"])
def test_each_marker_is_detected(tmp_path: Path, keys: tuple[str, ...], metadata: dict[str, str],
                                 yaml_name: str | None, expected: tuple[str, str, bool]) -> None:
    yaml_text = (CONFIG_DIR / yaml_name).read_text() if yaml_name else None
    path = write_file(tmp_path / "model.safetensors", keys, metadata, yaml_text)
    loaded = load_checkpoint(path)
    assert (loaded.family, loaded.prediction_type, uses_zero_terminal_snr(loaded)) == expected
    assert loaded.noise_scheduler.config.prediction_type == expected[1]
    assert (loaded.noise_scheduler.alphas_cumprod[-1] == 0) == expected[2]


@pytest.mark.parametrize(("name", "metadata"), [
    ("pony", {"modelspec.title": "Pony Diffusion V6 XL", "modelspec.architecture": "stable-diffusion-xl-v1-base",
              "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
              "modelspec.sai_model_spec": "1.0.0"}),
    ("illustrious", {"modelspec.title": "Illustrious-XL-v0.1", "modelspec.architecture":
                     "stable-diffusion-xl-v1-base", "modelspec.prediction_type": "epsilon"}),
    ("noobai-eps", {"ss_base_model_version": "sdxl_base_v1-0", "ss_v_parameterization": "False",
                    "ss_network_module": "", "modelspec.title": "NoobAI-XL 1.1 (epsilon)"}),
])
def test_sdxl_derived_checkpoints_import_as_sdxl(tmp_path: Path, name: str, metadata: dict[str, str]) -> None:
    path = write_file(tmp_path / f"{name}.safetensors", metadata=metadata)
    store = ModelStore(Layout.under(tmp_path / "models").ensure())
    config = create_model(store, name, path).load_config()
    assert (config.model_family, config.prediction_type, config.zero_terminal_snr) == ("sdxl", "epsilon", False)
    assert config.resolution == 1024


def test_creating_from_a_noobai_vpred_file_sets_the_model_up_for_v_and_the_rescaled_schedule(tmp_path: Path) -> None:
    store = ModelStore(Layout.under(tmp_path / "models").ensure())
    noob = write_file(tmp_path / "noob.safetensors", ("v_pred", "ztsnr"))
    plain_v = write_file(tmp_path / "v.safetensors", ("v_pred",))
    config = create_model(store, "noob", noob).load_config()
    assert (config.model_family, config.prediction_type, config.zero_terminal_snr) == ("sdxlv", "v_prediction", True)
    assert create_model(store, "v", plain_v).load_config().zero_terminal_snr is False


def test_a_diffusers_folder_tells_v_and_zero_terminal_snr_by_its_scheduler(tmp_path: Path) -> None:
    """NoobAI's diffusers release: scheduler prediction_type v_prediction and rescale_betas_zero_snr."""
    components = tiny_components("sdxl")
    components.noise_scheduler = get_family("sdxl").make_noise_scheduler("v_prediction", zero_terminal_snr=True)
    folder = save_components(components, tmp_path / "noob")
    (folder / "family.json").unlink()
    loaded = load_diffusers_folder(folder)
    assert (loaded.family, loaded.prediction_type, uses_zero_terminal_snr(loaded)) == ("sdxlv", "v_prediction", True)


def test_yaml_prediction_reads_both_layouts_and_refuses_broken_yaml() -> None:
    assert yaml_prediction((CONFIG_DIR / "sdxl" / "sd_xl_v.yaml").read_text()) == "v_prediction"
    assert yaml_prediction((CONFIG_DIR / "sd2v" / "v2-inference-v.yaml").read_text()) == "v_prediction"
    eps = (CONFIG_DIR / "sdxl" / "sd_xl_v.yaml").read_text().replace("VScaling", "EpsScaling")
    assert yaml_prediction(eps) == "epsilon"
    assert detect_family(list(sdxl_state()), yaml_text=eps).name == "sdxl"
    with pytest.raises(ModelError, match="beside the checkpoint is not valid YAML"):
        yaml_prediction("model: [unclosed")


def test_markers_follow_the_hosts_pairing_of_the_keys() -> None:
    assert read_markers({"v_pred", "ztsnr"}).zero_terminal_snr is True
    assert read_markers({"v_pred"}).zero_terminal_snr is False  # the pair without ztsnr: hosts do not rescale
    assert read_markers({"ztsnr"}).zero_terminal_snr is True     # Forge rescales any model with the key
    assert read_markers(set()).zero_terminal_snr is None


# --- export: what hosts load -------------------------------------------------------------------------


def test_export_carries_every_marker_hosts_read_and_reloads_as_vpred(tmp_path: Path) -> None:
    model = tiny_components("sdxlv")
    assert (model.prediction_type, uses_zero_terminal_snr(model)) == ("v_prediction", True)
    path = export_checkpoint(model, tmp_path / "out.safetensors",
                             metadata={CONFIGS_METADATA_KEY: json.dumps(tiny_configs("sdxlv"))})
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        keys = set(handle.keys())
        assert handle.get_tensor("v_pred").numel() == 0 and handle.get_tensor("ztsnr").numel() == 0
    yaml_text = path.with_suffix(".yaml").read_text()
    assert a1111_parameterization(yaml_text) == "v"
    assert forge_reading(keys, yaml_text) == ("v_prediction", True)
    assert forge_reading(keys, None) == ("v_prediction", True)  # reForge and ComfyUI: the keys alone
    assert sdnext_scheduler(keys) == {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True}
    # A1111 builds the model from the yaml: it must be the SDXL base config but for the v denoiser.
    config = yaml.safe_load(yaml_text)["model"]
    assert config["target"] == "sgm.models.diffusion.DiffusionEngine"
    assert config["params"]["denoiser_config"]["params"]["weighting_config"]["target"].endswith(".VWeighting")
    assert config["params"]["network_config"]["params"]["context_dim"] == 2048
    path.with_suffix(".yaml").unlink()
    loaded = load_checkpoint(path)
    assert (loaded.family, loaded.prediction_type, uses_zero_terminal_snr(loaded)) == ("sdxlv", "v_prediction", True)


def test_export_markers_are_what_the_model_is_now_not_what_its_base_file_was(tmp_path: Path) -> None:
    """A NoobAI file's keys travel as extras; a model trained without the rescaled schedule, or turned
    epsilon, must not keep claiming it."""
    noob = load_checkpoint(write_file(tmp_path / "noob.safetensors", ("v_pred", "ztsnr")))
    assert {"v_pred", "ztsnr"} <= set(noob.extras)
    plain = dataclasses.replace(noob, noise_scheduler=get_family("sdxlv").make_noise_scheduler(zero_terminal_snr=False))
    keys = set(checkpoint_state_dict(plain))
    assert "v_pred" in keys and "ztsnr" not in keys and forge_reading(keys, None) == ("v_prediction", False)
    eps = dataclasses.replace(plain, prediction_type="epsilon")
    assert not {"v_pred", "ztsnr"} & set(checkpoint_state_dict(eps))
    assert get_family("sdxlv").side_files("epsilon") == {}


# --- LoRA metadata ---------------------------------------------------------------------------------------

def test_lora_metadata_says_v_and_the_rescaled_schedule() -> None:
    markers = get_family("sdxlv").lora_markers()
    assert markers == {"ss_base_model_version": "sdxl_base_v1-0", "ss_v2": "False", "ss_v_parameterization": "True",
                       "ss_zero_terminal_snr": "True", "modelspec.prediction_type": "v"}
    assert get_family("sdxl").lora_markers()["modelspec.prediction_type"] == "epsilon"
    assert get_family("sdxlv").lora_markers("v_prediction", False)["ss_zero_terminal_snr"] == "False"
    # Forge's and SD.Next's LoRA loaders take an SDXL LoRA by this prefix.
    assert markers["ss_base_model_version"].startswith("sdxl_")
    made = lora_metadata(LoraFile(modules={}, metadata={}), "sdxlv", {})
    assert made["ss_v_parameterization"] == "True" and made["modelspec.prediction_type"] == "v"


def test_components_without_markers_are_plain_sdxl() -> None:
    model: Components = tiny_components("sdxl")
    keys = set(checkpoint_state_dict(model))
    assert not {"v_pred", "ztsnr"} & keys and forge_reading(keys, None) == ("epsilon", False)
