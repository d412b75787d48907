"""Full-size SD1.5, SD2.1-v and SDXL key layouts, checked on meta tensors (no memory, no weights).

Our export maps each diffusers model to original keys; diffusers' own single-file converters (the
direction A1111-style files are read in) must map those keys back onto exactly the model's keys and
shapes. That makes export(import(ckpt)) reproduce the original key set and shapes.
"""

from __future__ import annotations

import pytest
import torch
from accelerate import init_empty_weights
from diffusers.loaders import single_file_utils

from dreambooth.models.components import Components, make_noise_scheduler
from dreambooth.models.export import extra_tensors, model_to_ldm
from dreambooth.models.loading import shipped_configs
from dreambooth.models.tiny import build_models


def _meta_components(family: str) -> Components:
    with init_empty_weights():
        unet, vae, encoders = build_models(shipped_configs(family))
    return Components(family, unet, vae, encoders, [], make_noise_scheduler(family))


def _shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    # position_ids is a buffer some transformers versions keep; the file's own copy travels in the extras.
    return {key if key.startswith(("text_model.", "text_projection")) else "text_model." + key: tuple(value.shape)
            for key, value in state.items() if not key.endswith("position_ids")}


def _check_unet_and_vae(components: Components, ldm: dict[str, torch.Tensor]) -> None:
    unet = single_file_utils.convert_ldm_unet_checkpoint(ldm, components.denoiser.config)
    vae = single_file_utils.convert_ldm_vae_checkpoint(ldm, components.vae.config)
    assert {k: tuple(v.shape) for k, v in unet.items()} == {k: tuple(v.shape) for k, v in
                                                            components.denoiser.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in vae.items()} == {k: tuple(v.shape) for k, v in
                                                           components.vae.state_dict().items()}


def test_sd15_layout() -> None:
    components = _meta_components("sd1")
    ldm = model_to_ldm(components)
    _check_unet_and_vae(components, ldm)
    text = single_file_utils.convert_ldm_clip_checkpoint(ldm)
    assert _shapes(text) == _shapes(components.text_encoders[0].state_dict())
    # The well-known SD1.5 model key count: 1130 weights + the text encoder's position_ids buffer.
    assert len(ldm) + 1 == 1131
    assert set(extra_tensors(components)) >= {"alphas_cumprod", "betas", "posterior_mean_coef2"}


def test_sd21_v_layout() -> None:
    components = _meta_components("sd2v")
    ldm = model_to_ldm(components)
    _check_unet_and_vae(components, ldm)
    assert ldm["model.diffusion_model.input_blocks.1.1.proj_in.weight"].shape == (320, 320)  # linear projection
    # The file's text projection (kept in the extras) tells diffusers the width for splitting q/k/v.
    with_projection = {**ldm, "cond_stage_model.model.text_projection": torch.empty(1024, 1024, device="meta")}
    text = single_file_utils.convert_open_clip_checkpoint(components.text_encoders[0], with_projection,
                                                          prefix="cond_stage_model.model.")
    assert _shapes(text) == _shapes(components.text_encoders[0].state_dict())
    assert ldm["cond_stage_model.model.transformer.resblocks.22.attn.in_proj_weight"].shape == (3072, 1024)
    assert "cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight" not in ldm  # from the extras


def test_sdxl_layout() -> None:
    components = _meta_components("sdxl")
    ldm = model_to_ldm(components)
    _check_unet_and_vae(components, ldm)
    first = single_file_utils.convert_ldm_clip_checkpoint(ldm)
    assert _shapes(first) == _shapes(components.text_encoders[0].state_dict())
    second = single_file_utils.convert_open_clip_checkpoint(components.text_encoders[1], ldm,
                                                            prefix="conditioner.embedders.1.model.")
    assert _shapes(second) == _shapes(components.text_encoders[1].state_dict())
    assert ldm["conditioner.embedders.1.model.text_projection"].shape == (1280, 1280)
    assert ldm["model.diffusion_model.label_emb.0.0.weight"].shape == (1280, 2816)
    # sd_xl_base_1.0 holds 2515 keys: these plus CLIP-L's position_ids and OpenCLIP's logit_scale.
    assert len(ldm) + 2 == 2515
    assert extra_tensors(components) == {}


@pytest.mark.parametrize("family", ["sd1", "sd2", "sd2v", "sdxl"])
def test_shipped_configs_are_consistent(family: str) -> None:
    components = _meta_components(family)
    text_width = sum(encoder.config.hidden_size for encoder in components.text_encoders)
    assert components.denoiser.config.cross_attention_dim == text_width
