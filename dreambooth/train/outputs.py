"""What a save writes: full models to working/ and the host's checkpoint folder, LoRAs to its LoRA folder."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..config.schema import base_checkpoint_name
from ..families.base import DENOISER_PART
from ..store import unused_path
from .runtime import TEXT_GROUPS

if TYPE_CHECKING:
    from .session import Session


def output_components(session: Session) -> Any:
    """The model to save, all in fp32: trained modules as they are, frozen ones re-read from working/.

    Frozen weights train in the compute dtype (bf16), which would lose precision if saved from memory.
    """
    from ..models.components import Components, load_components

    live = session.components
    if session.compute_dtype == torch.float32:
        return live
    base = load_components(session.model_dir.working, torch.float32)
    trained = session.trained_parts
    encoders = [live_encoder if name in trained else base_encoder for name, live_encoder, base_encoder
                in zip(TEXT_GROUPS, live.text_encoders, base.text_encoders, strict=False)]
    denoiser = live.denoiser if DENOISER_PART in trained else base.denoiser
    return Components(family=live.family, denoiser=denoiser, vae=base.vae,
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


def run_metadata(session: Session, step: int) -> dict[str, str]:
    config = session.config
    return {"dreambooth_model": config.model_name, "dreambooth_step": str(step),
            "dreambooth_method": config.method, "dreambooth_base_checkpoint": base_checkpoint_name(config),
            "dreambooth_seed": str(session.seed)}


def save_lora(session: Session, step: int) -> Path:
    from .lora import export_lora

    config, plan = session.config, session.plan
    out = unused_path(session.host.layout.lora_dir, f"{config.model_name}_{step}")
    metadata = {**run_metadata(session, step), "ss_steps": str(step), "ss_output_name": out.stem,
                "ss_training_finished_at": str(int(time.time())),
                "ss_num_train_images": str(len(plan.instance)),
                "ss_num_reg_images": str(len(plan.class_images)),
                "ss_tag_frequency": json.dumps(tag_frequency(plan))}
    path = export_lora(session.components, config, out, metadata)
    session.host.refresh_loras()
    return path


def save_checkpoint(session: Session, step: int, working: bool, export: bool) -> list[Path]:
    """The full model to working/ (`working`) and as one file to the host's checkpoint folder (`export`)."""
    from ..models.components import save_components
    from ..models.export import export_checkpoint

    config = session.config
    components = output_components(session)
    paths = []
    if working:
        paths.append(save_components(components, session.model_dir.working))
    if export:
        out = unused_path(session.host.layout.checkpoints_dir, f"{config.model_name}_{step}")
        paths.append(export_checkpoint(components, out, config.save_precision, run_metadata(session, step),
                                       warn=session.warn))
        session.host.refresh_checkpoints()
    return paths


def save_outputs(session: Session, step: int, final: bool, export: bool = True) -> list[Path]:
    """Files written by one save. working/ is replaced only by the final save of a full-model run (whatever
    `export` says: it always holds the latest trained weights); a LoRA run leaves its base weights there."""
    if session.config.method == "lora":
        return [save_lora(session, step)] if export else []
    if not (final or export):
        return []
    return save_checkpoint(session, step, working=final, export=export)
