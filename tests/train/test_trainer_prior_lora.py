"""Prior preservation acts in LoRA runs too, and exported metadata never carries local folder names."""

from __future__ import annotations

import json
from typing import Any

from safetensors import safe_open

from dreambooth.train.events import LossRecord, TrainCallbacks


class Losses(TrainCallbacks):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_loss(self, record: LossRecord) -> None:
        self.losses.append(record.loss)


def lora_losses(env: Any, prior: bool) -> list[float]:
    env.fresh()
    recorder = Losses()
    env.trainer(recorder, resume=False, method="lora", learning_rate=1e-3, train_batch_size=2, max_train_steps=2,
                with_prior_preservation=prior, base_checkpoint="/home/someone/private/base.safetensors").run()
    return recorder.losses


def test_prior_preservation_changes_a_lora_run(env: Any) -> None:
    assert lora_losses(env, prior=True) != lora_losses(env, prior=False)


def test_lora_metadata_names_the_base_file_not_its_folder(env: Any) -> None:
    lora_losses(env, prior=False)
    [exported] = sorted(env.layout.lora_dir.glob("*.safetensors"))
    with safe_open(str(exported), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["ss_sd_model_name"] == "base.safetensors"
    assert "/home/someone" not in json.dumps(metadata)
