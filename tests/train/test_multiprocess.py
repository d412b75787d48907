"""Data-parallel training: `accelerate launch --num_processes 2 -m dreambooth train` on CPU (gloo).

Two ranks with batch 1 must train what one process trains with batch 2 (the same global batch): the same
items, noise and timesteps per item, gradients averaged over the ranks at every step. Lockstep follows from
that: a rank that skipped, repeated or reordered a step would block the other's all-reduce or mix gradients of
different batches, and the weights would not match. Only rank 0 writes files and prints.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from dreambooth.cli_train import run_training
from dreambooth.store import Layout, ModelStore
from dreambooth.train.logs import read_jsonl

REPO = Path(__file__).resolve().parents[2]
STEPS = 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _model(env: Any, name: str, batch: int) -> Path:
    model = ModelStore(env.layout).model(name)
    shutil.copytree(env.base_working, model.working)
    # A larger Adam epsilon keeps float noise in gradients that are analytically zero (biases before a
    # GroupNorm) from being blown up to full-size updates, so the comparison can be tight.
    model.save_config(env.configured(train_batch_size=batch, max_train_steps=STEPS, save_on_end=True,
                                     adam_epsilon=1e-5))
    return model.root


def _launch(root: Path, name: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()),
               "-m", "dreambooth", "train", "--data-dir", str(root), "--name", name]
    return subprocess.run(command, env=env, cwd=root, capture_output=True, text=True, timeout=300)


def _weights(model_root: Path) -> dict[str, torch.Tensor]:
    working = model_root / "working"
    return {**load_file(str(working / "unet" / "diffusion_pytorch_model.safetensors")),
            **{f"te.{k}": v for k, v in load_file(str(working / "text_encoder" / "model.safetensors")).items()}}


def _written(model_root: Path, layout: Layout) -> list[str]:
    files = [p.relative_to(model_root).as_posix() for p in model_root.rglob("*") if p.is_file()]
    files += [p.name for p in layout.checkpoints_dir.iterdir()]
    # TensorBoard names its event file by time, host and process id
    return sorted("TENSORBOARD_EVENTS" if "tfevents" in f else f.replace(model_root.name, "NAME") for f in files)


def test_two_ranks_train_like_one_process_with_the_global_batch(env: Any) -> None:
    layout = env.layout
    ddp = _model(env, "ddp", batch=1)
    single = _model(env, "single", batch=2)
    base = _weights(ddp)

    launched = _launch(env.root, "ddp")
    assert launched.returncode == 0, launched.stdout[-3000:] + launched.stderr[-3000:]
    assert run_training(layout, "single") == 0

    # rank 0 alone reports: each step once, one export, one log row per step
    lines = launched.stdout.splitlines()
    assert [sum(line.startswith(f"step {s}/{STEPS}") for line in lines) for s in range(1, STEPS + 1)] == [1, 1]
    assert sum("saved checkpoint" in line for line in lines) == 1
    assert [row["step"] for row in read_jsonl(ddp / "logging")] == list(range(1, STEPS + 1))
    single_files = [f for f in _written(single, layout) if not f.startswith("ddp")]
    assert [f for f in _written(ddp, layout) if not f.startswith("single")] == single_files

    # the same training: logged global-batch losses and the final weights
    losses = [row["loss"] for row in read_jsonl(ddp / "logging")]
    expected = [row["loss"] for row in read_jsonl(single / "logging")]
    assert torch.allclose(torch.tensor(losses), torch.tensor(expected), rtol=1e-4)
    trained, reference = _weights(ddp), _weights(single)
    change = max(float((reference[k] - base[k]).abs().max()) for k in base)
    assert change > 1e-3  # training moved the weights far beyond the tolerance below
    assert all(torch.allclose(trained[k], reference[k], atol=2e-5) for k in reference)
