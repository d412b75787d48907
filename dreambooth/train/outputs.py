"""What a save writes: full models to working/ and the host's checkpoint folder, LoRAs to its LoRA folder."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from ..config.schema import base_checkpoint_name
from ..store import unused_path


def output_components(trainer: Any) -> Any:
    """The model to save, all in fp32: trained modules as they are, frozen ones re-read from working/.

    Frozen weights train in the compute dtype (bf16), which would lose precision if saved from memory.
    """
    from ..models.components import Components, load_components

    live = trainer.components
    frozen_low = trainer.compute_dtype != torch.float32
    if not frozen_low:
        return live
    base = load_components(trainer.model_dir.working, torch.float32)
    trained = trainer.trained_parts
    encoders = [live_encoder if name in trained else base_encoder for name, live_encoder, base_encoder
                in zip(("text_encoder", "text_encoder_2"), live.text_encoders, base.text_encoders, strict=False)]
    return Components(family=live.family, unet=live.unet if "unet" in trained else base.unet, vae=base.vae,
                      text_encoders=encoders, tokenizers=live.tokenizers, noise_scheduler=live.noise_scheduler,
                      prediction_type=live.prediction_type, extras=live.extras)


def tag_frequency(plan: Any) -> dict[str, dict[str, int]]:
    """kohya's ss_tag_frequency: per concept folder, how often each caption tag occurs."""
    frequency: dict[str, Counter[str]] = {}
    for record in plan.instance:
        folder = Path(record.path).parent.name
        tags = (tag.strip() for tag in record.caption.split(","))
        frequency.setdefault(folder, Counter()).update(tag for tag in tags if tag)
    return {folder: dict(counter) for folder, counter in frequency.items()}


def run_metadata(trainer: Any, step: int) -> dict[str, str]:
    config = trainer.cfg
    return {"dreambooth_model": config.model_name, "dreambooth_step": str(step),
            "dreambooth_method": config.method, "dreambooth_base_checkpoint": base_checkpoint_name(config),
            "dreambooth_seed": str(trainer.seed)}


def save_lora(trainer: Any, step: int) -> Path:
    from .lora import export_lora

    config = trainer.cfg
    out = unused_path(trainer.host.layout.lora_dir, f"{config.model_name}_{step}")
    metadata = {**run_metadata(trainer, step), "ss_steps": str(step), "ss_output_name": out.stem,
                "ss_training_finished_at": str(int(time.time())),
                "ss_num_train_images": str(len(trainer.plan.instance)),
                "ss_num_reg_images": str(len(trainer.plan.class_images)),
                "ss_tag_frequency": json.dumps(tag_frequency(trainer.plan))}
    path = export_lora(trainer.components, config, out, metadata)
    trainer.host.refresh_loras()
    return path


def save_checkpoint(trainer: Any, step: int, final: bool) -> list[Path]:
    from ..models.components import save_components
    from ..models.export import export_checkpoint

    config = trainer.cfg
    components = output_components(trainer)
    paths = []
    if final:
        paths.append(save_components(components, trainer.model_dir.working))
    out = unused_path(trainer.host.layout.checkpoints_dir, f"{config.model_name}_{step}")
    paths.append(export_checkpoint(components, out, config.save_precision, run_metadata(trainer, step),
                                   warn=trainer.warn))
    trainer.host.refresh_checkpoints()
    return paths


def save_outputs(trainer: Any, step: int, final: bool) -> list[Path]:
    """Files written by one save; working/ is only replaced by the final save of a run."""
    if trainer.cfg.method == "lora":
        return [save_lora(trainer, step)]
    exported = save_checkpoint(trainer, step, final)
    return [p for p in exported if p.suffix == ".safetensors"] if not final else exported
