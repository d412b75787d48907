"""Read LoRA files of every common trainer into one form: our host keys -> LoraModule.

Spellings understood (the part before the tensor suffix names the layer):

* kohya / A1111 / OneTrainer: `lora_unet_<diffusers or ldm name>`, `lora_te_`, `lora_te1_`, `lora_te2_`
  with `.lora_down.weight`, `.lora_up.weight`, `.alpha`, LoCon 3x3 downs, DoRA `.dora_scale`, LyCORIS
  full `.diff`;
* diffusers / peft: `unet.<module>.lora_A.weight` / `.lora_B.weight`, `text_encoder.` / `text_encoder_2.`,
  the older attention-processor spelling (`….processor.to_q_lora.down.weight`) and `.lora.down.weight`;
* ComfyUI: `diffusion_model.<ldm name>`, `text_encoders.clip_l.transformer.<HF name>` (clip_g, clip_h).

Keys already in the kohya form need no model to be read; every other spelling (and the choice between
the diffusers- and ldm-style kohya names of one layer) is resolved with a KeyTable built from the
model's module names, so a key that names no layer is an error, never silently dropped.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from ..errors import ModelError
from ..families import get_family, tables, variant
from ..train import lora_keys

# Tensor suffix -> the field of LoraModule it fills (longest suffixes first when matching).
SUFFIX_FIELDS = {
    ".lora_down.weight": "down", ".lora_up.weight": "up", ".lora_A.weight": "down", ".lora_B.weight": "up",
    ".lora.down.weight": "down", ".lora.up.weight": "up", "_lora.down.weight": "down", "_lora.up.weight": "up",
    ".lora_linear_layer.down.weight": "down", ".lora_linear_layer.up.weight": "up",
    ".alpha": "alpha", ".dora_scale": "dora_scale", ".diff": "diff",
}
# Module kinds of LyCORIS and peft this reader does not turn into a LoRA (named in the error).
UNSUPPORTED_PARTS = ("hada_", "lokr_", "lora_mid", "oft_", "lora_magnitude_vector", ".a1.weight", ".w_norm")
KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
COMFY_TE_NAMES = {0: ("clip_l", "clip_h"), 1: ("clip_g",)}
# SD3's transformer keys in the original (kohya) and diffusers spellings.
SD3_KEY_PREFIXES = ("lora_unet_joint_blocks_", "transformer.transformer_blocks.")
FLUX_KEY_PREFIXES = ("lora_unet_double_blocks_", "lora_unet_single_blocks_", "transformer.single_transformer_blocks.")


@dataclass
class LoraModule:
    """One layer's change: a low-rank pair (scaled by alpha/rank), or a full difference, plus DoRA magnitudes."""

    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    alpha: float | None = None
    diff: torch.Tensor | None = None
    dora_scale: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0]) if self.down is not None else 0

    @property
    def scale(self) -> float:
        """The factor the hosts apply to up@down: alpha / rank (no alpha: 1, as A1111 and ComfyUI do)."""
        if self.down is None or self.alpha is None:
            return 1.0
        return self.alpha / self.rank

    def delta(self) -> torch.Tensor:
        """The weight change at strength 1 (before any DoRA renormalisation), in the layer's weight shape."""
        if self.diff is not None:
            return self.diff.float()
        if self.up is None or self.down is None:
            raise ModelError("A LoRA layer has only one of lora_up/lora_down; the file is incomplete.")
        up, down = self.up.float(), self.down.float()
        product = up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)
        return (product * self.scale).reshape(up.shape[0], *down.shape[1:])


@dataclass
class LoraFile:
    """A LoRA in our key space: kohya keys as our exporter writes them -> LoraModule."""

    modules: dict[str, LoraModule]
    metadata: dict[str, str] = field(default_factory=dict)
    name: str = ""

    @property
    def has_dora(self) -> bool:
        return any(module.dora_scale is not None for module in self.modules.values())


@dataclass(frozen=True)
class Target:
    """The layer a key names: part ('unet', 'text_encoder', 'text_encoder_2') and its module name."""

    part: str
    module: str


@dataclass
class KeyTable:
    """Every accepted spelling of a layer -> our key, and our key -> the layer."""

    family: str
    aliases: dict[str, str]
    targets: dict[str, Target]

    def resolve(self, base: str) -> str | None:
        return self.aliases.get(base)


# --- key table ------------------------------------------------------------------------------------------

def _is_adaptable(module: Any) -> bool:
    return isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))


def _unet_aliases(family: str, unet: Any) -> tuple[dict[str, str], dict[str, Target]]:
    aliases: dict[str, str] = {}
    targets: dict[str, Target] = {}
    modules = dict(unet.named_modules())
    for name, ldm in lora_keys.unet_ldm_names(unet).items():
        if not _is_adaptable(modules[name]):
            continue
        ours = lora_keys.unet_key(family, name, ldm)
        targets[ours] = Target("unet", name)
        processor = name.replace(".to_", ".processor.to_").removesuffix(".0") if ".to_" in name else name
        for alias in (f"lora_unet_{lora_keys.underscored(name)}", f"lora_unet_{lora_keys.underscored(ldm)}",
                      f"unet.{name}", name, f"unet.{processor}", processor, f"diffusion_model.{ldm}",
                      f"lycoris_{lora_keys.underscored(name)}", f"base_model.model.{name}"):
            aliases.setdefault(alias, ours)
    return aliases, targets


def _te_spellings(family: str, index: int, hf_name: str) -> list[str]:
    flat = hf_name.removeprefix("text_model.")
    prefixes = lora_keys.TE_PREFIXES[family]
    # A one-encoder family's LoRAs are also written with the first of two encoders' prefix.
    kohya = [prefixes[index], *(["lora_te1"] if len(prefixes) == 1 else []), *(["lora_te"] if index == 0 else [])]
    spellings = [f"{prefix}_{lora_keys.underscored(name)}" for prefix in kohya for name in (hf_name, flat)]
    diffusers_part = ("text_encoder", "text_encoder_2")[index]
    spellings += [f"{diffusers_part}.{hf_name}", f"{diffusers_part}.{flat}"]
    spellings += [f"text_encoders.{clip}.transformer.{hf_name}" for clip in COMFY_TE_NAMES[index]]
    return spellings


def _te_aliases(family: str, encoders: list[Any]) -> tuple[dict[str, str], dict[str, Target]]:
    aliases: dict[str, str] = {}
    targets: dict[str, Target] = {}
    for index, encoder in enumerate(encoders):
        part = ("text_encoder", "text_encoder_2")[index]
        for raw_name, module in encoder.named_modules():
            hf_name = lora_keys.hf_text_name(raw_name)
            if not _is_adaptable(module) or not hf_name.startswith(tables.HF_LAYER_PREFIX):
                continue
            ours = lora_keys.te_key(family, index, raw_name)
            targets[ours] = Target(part, raw_name)
            for alias in _te_spellings(family, index, hf_name):
                aliases.setdefault(alias, ours)
    return aliases, targets


def check_table_family(family: str) -> None:
    """Key tables are built for UNet families; SD3's and Flux's LoRAs are read in the kohya spelling only."""
    unit = get_family(family)
    if unit.denoiser_folder != "unet":
        raise ModelError(f"{unit.label} LoRAs are read in the kohya spelling only (lora_unet_…, lora_te1_…): they "
                         f"can be resized, merged with each other and merged into a checkpoint; starting training "
                         f"from one and reading the diffusers/peft spelling are not supported for them yet.")


def key_table(family: str, unet: Any, text_encoders: list[Any]) -> KeyTable:
    """The table of a model's layers (plain diffusers/transformers modules; meta tensors are fine)."""
    check_table_family(family)
    unet_aliases, unet_targets = _unet_aliases(family, unet)
    te_aliases, te_targets = _te_aliases(family, list(text_encoders))
    aliases = {**unet_aliases, **te_aliases}
    # A layer's own key always resolves to itself, whatever alias of another layer is spelled the same.
    aliases.update({key: key for key in (*unet_targets, *te_targets)})
    return KeyTable(family, aliases, {**unet_targets, **te_targets})


def components_key_table(components: Any) -> KeyTable:
    return key_table(components.family, components.denoiser, list(components.text_encoders))


@functools.cache
def full_size_components(family: str) -> SimpleNamespace:
    """The full-size UNet and text encoders of `family` on the meta device (shipped configs: no weights), as
    .family, .denoiser and .text_encoders."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from ..models.loading import shipped_configs

    configs = shipped_configs(family)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(configs["unet"])
        encoders = [CLIPTextModel(CLIPTextConfig.from_dict(configs["text_encoder"]))]
        if "text_encoder_2" in configs:
            encoders.append(CLIPTextModelWithProjection(CLIPTextConfig.from_dict(configs["text_encoder_2"])))
    return SimpleNamespace(family=family, denoiser=unet, text_encoders=encoders)


@functools.cache
def family_key_table(family: str) -> KeyTable:
    """The table of the full-size model of `family`, built on the meta device from the shipped configs."""
    check_table_family(family)
    return components_key_table(full_size_components(family))


# --- reading --------------------------------------------------------------------------------------------

def split_key(key: str) -> tuple[str, str]:
    """(layer spelling, LoraModule field) of a tensor key; ModelError for module kinds we cannot read."""
    for suffix in sorted(SUFFIX_FIELDS, key=len, reverse=True):
        if key.endswith(suffix):
            return key[: -len(suffix)], SUFFIX_FIELDS[suffix]
    for marker in (".lora_A.", ".lora_B."):  # peft's in-model names: '.lora_A.<adapter>.weight'
        if marker in key and key.endswith(".weight"):
            return key.split(marker)[0], "down" if marker == ".lora_A." else "up"
    kind = next((part for part in UNSUPPORTED_PARTS if part in key), None)
    if kind is not None:
        raise ModelError(f"LoRA key {key!r} is a {kind.strip('._')} module (LoHa/LoKr/Tucker/OFT/peft DoRA); "
                         "only LoRA, LoCon, DoRA (dora_scale) and full-difference modules can be read.")
    raise ModelError(f"LoRA key {key!r} is not a LoRA tensor (no lora_down/lora_up/lora_A/lora_B/alpha/diff "
                     "suffix); the file is not a LoRA this tool reads.")


def _our_key(base: str, table: KeyTable | None, file_name: str) -> str:
    if table is not None:
        resolved = table.resolve(base)
        if resolved is not None:
            return resolved
        raise ModelError(f"{file_name}: LoRA key {base!r} names no layer of the {table.family} model; the LoRA "
                         "was made for another model family or architecture.")
    if base.startswith(KOHYA_PREFIXES):
        return base
    raise ModelError(f"{file_name}: LoRA key {base!r} is in the diffusers/peft/ComfyUI spelling, which needs the "
                     "model family to be read; give the family (or a checkpoint) with it.")


def _set_field(module: LoraModule, name: str, value: torch.Tensor) -> None:
    if name == "alpha":
        module.alpha = float(value.float().reshape(-1)[0])
    else:
        setattr(module, name, value)


def read_lora(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
              table: KeyTable | None = None, name: str = "LoRA") -> LoraFile:
    """Group a LoRA state dict into LoraModules under our keys (see the module docstring for spellings)."""
    modules: dict[str, LoraModule] = {}
    for key, value in tensors.items():
        base, field_name = split_key(key)
        ours = _our_key(base, table, name)
        _set_field(modules.setdefault(ours, LoraModule()), field_name, value)
    for key, module in modules.items():
        if module.diff is None and (module.up is None or module.down is None):
            raise ModelError(f"{name}: layer {key} has only one of lora_up/lora_down; the file is incomplete.")
    return LoraFile(modules, dict(metadata or {}), name)


def needs_table(tensors: dict[str, torch.Tensor]) -> bool:
    """Whether some key is not in the kohya spelling (so reading it needs the model's key table)."""
    return any(not key.startswith(KOHYA_PREFIXES) for key in tensors)


def guess_family(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str | None:
    """The family a LoRA was made for, from its metadata or its keys; None when nothing tells."""
    version = metadata.get("ss_base_model_version", "") + metadata.get("modelspec.architecture", "")
    # Before SDXL's test: SD3 LoRAs name a second CLIP too (lora_te2_). Flux's before SD3's keys: diffusers names
    # Flux's double blocks `transformer_blocks` as well.
    if version.lower().startswith(("sd3", "stable-diffusion-3")):
        return "sd3"
    if "flux" in version.lower() or any(k.startswith(FLUX_KEY_PREFIXES) for k in tensors):
        return "flux-schnell" if "schnell" in version.lower() else "flux-dev"
    if any(k.startswith(SD3_KEY_PREFIXES) for k in tensors):
        return "sd3"
    says_v = metadata.get("ss_v_parameterization") == "True" or metadata.get("modelspec.prediction_type") == "v"
    prediction = "v_prediction" if says_v else "epsilon"
    if "xl" in version.lower() or any(k.startswith(("lora_te2_", "text_encoder_2.")) for k in tensors):
        return variant(get_family("sdxl"), prediction).name
    if metadata.get("ss_v2") == "True" or "v2" in version.lower():
        return variant(get_family("sd2"), prediction).name
    if "v1" in version.lower():
        return "sd1"
    return None


def load_lora(path: str | Path, table: KeyTable | None = None, family: str | None = None) -> LoraFile:
    """Read a LoRA .safetensors file; the family's full-size key table is used when its keys need one."""
    from ..models.loading import read_safetensors

    path = Path(path)
    if path.suffix.lower() != ".safetensors" or not path.is_file():
        raise ModelError(f"LoRA {path} is not a .safetensors file; choose one from the LoRA folder.")
    tensors, metadata = read_safetensors(path)
    if table is None and needs_table(tensors):
        family = family or guess_family(tensors, metadata)
        if family is None:
            raise ModelError(f"{path.name}: its keys do not say which model family it is for; give the family.")
        table = family_key_table(family)
    return read_lora(tensors, metadata, table, path.name)
