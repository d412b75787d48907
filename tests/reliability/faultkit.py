"""Fault-injection kit for the reliability tests: workspaces, kill switches, file checks, and a fork server.

Run as a script it is a *zygote*: it imports torch, diffusers, transformers and the trainer once, then forks
one child per training run, so each of the 20+ SIGKILLed runs costs a fork instead of a 5-30 s import.
The zygote never computes anything with torch itself, so forking it is safe (no OpenMP state to inherit).

Protocol, one JSON line each way: a scenario (a list of phases) in on stdin, the list of the phases' exit
statuses out on stdout (negative: killed by that signal). Each phase runs in its own forked child; a
scenario stops at the first phase that does not end as its "expect" says. The children write to stderr.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

# The shared test doubles (tests/fake_host.py) sit one folder up; the zygote runs this file as a script.
TESTS_DIR = str(Path(__file__).resolve().parent.parent)
if TESTS_DIR not in sys.path:
    sys.path.append(TESTS_DIR)

MODEL = "tiny"
KILLED = -signal.SIGKILL
TEMP_MARKERS = (".tmp", ".old")


# --- workspaces -----------------------------------------------------------------------------------------

def write_images(folder: Path, count: int, seed: int, size: int = 64) -> Path:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"img{index}.png")
        (folder / f"img{index}.txt").write_text(f"photo of sks dog, pose {index}")
    return folder


# The settings each variant trains with (on top of the tiny 64 px base below).
VARIANTS: dict[str, dict[str, Any]] = {
    # DreamBooth with generated class images, a disk latent cache, periodic exports and snapshots.
    "dreambooth": {"method": "dreambooth", "with_prior_preservation": True, "cache_latents": "disk",
                   "max_train_steps": 6, "save_every_n_steps": 3, "snapshot_every_n_steps": 2},
    "lora": {"method": "lora", "lora_rank": 4, "lora_alpha": 4.0, "with_prior_preservation": False,
             "max_train_steps": 6, "save_every_n_steps": 3, "snapshot_every_n_steps": 2},
}


def base_config(root: Path, variant: str) -> Any:
    from dreambooth.config.schema import Concept, TrainingConfig

    prior = VARIANTS[variant].get("with_prior_preservation", False)
    concept = Concept(instance_data_dir=str(root / "instance"), instance_prompt="photo of sks dog",
                      instance_token="sks", class_token="dog", class_prompt="photo of a dog",
                      num_class_images=3 if prior else 0, n_samples=0)
    config = TrainingConfig(model_name=MODEL, resolution=64, enable_bucketing=False, bucket_min_resolution=64,
                            train_batch_size=1, learning_rate=1e-3, text_encoder_lr=1e-3, lr_scheduler="constant",
                            mixed_precision="no", cache_latents="memory", save_precision="fp32", seed=7,
                            concepts=[concept])
    for name, value in VARIANTS[variant].items():
        setattr(config, name, value)
    return config


def _link_or_copy(source: str, target: str) -> None:
    # Hard links are safe: every write of the product replaces files (rename), never edits them in place.
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def make_workspace(root: Path, base_working: Path, variant: str, **overrides: Any) -> Path:
    """`root/models` (a Layout) holding model 'tiny' with the tiny weights, its images and its config."""
    from dreambooth.store import Layout, ModelStore

    root.mkdir(parents=True, exist_ok=True)
    write_images(root / "instance", 2, seed=1)
    layout = Layout.under(root / "models").ensure()
    model = ModelStore(layout).model(MODEL)
    shutil.copytree(base_working, model.working, copy_function=_link_or_copy)
    config = base_config(root, variant)
    for name, value in overrides.items():
        setattr(config, name, value)
    model.save_config(config)
    return root


def layout_of(root: Path) -> Any:
    from dreambooth.store import Layout

    return Layout.under(Path(root) / "models")


def model_of(root: Path) -> Any:
    from dreambooth.store import ModelStore

    return ModelStore(layout_of(root)).model(MODEL)


# --- the kill switch ------------------------------------------------------------------------------------

class KillSwitch:
    """Numbers every write and optimizer step of a run; SIGKILLs the process at event `kill_at`.

    Writes are killed half-way: the real write runs, its file is cut to half its size (as a crash
    mid-write leaves it), then the process dies. Renames and steps are killed just before they happen.
    """

    def __init__(self, root: Path, kill_at: int | None, log_path: Path | None, kill_at_step: int | None = None):
        self.root = Path(root).resolve()
        self.kill_at = kill_at
        self.kill_at_step = kill_at_step  # or: die just before this optimizer step of the process
        self.log_path = log_path
        self.count = 0
        self.steps = 0

    def label(self, kind: str, path: Any = None) -> str:
        if path is None:
            return kind
        resolved = Path(os.fspath(path)).resolve()
        where = resolved.relative_to(self.root) if resolved.is_relative_to(self.root) else resolved
        return f"{kind}:{where}"

    def event(self, kind: str, path: Any, action: Callable[[], Any], partial: bool) -> Any:
        self.count += 1
        self.steps += kind == "step"
        if kind == "step" and self.steps == self.kill_at_step:
            os.kill(os.getpid(), signal.SIGKILL)
        if self.log_path is not None:
            with open(self.log_path, "a", encoding="utf-8") as handle:
                handle.write(self.label(kind, path) + "\n")
        if self.count != self.kill_at:
            return action()
        if partial:
            action()
            _truncate_half(Path(os.fspath(path)))
        os.kill(os.getpid(), signal.SIGKILL)
        raise AssertionError("unreachable: SIGKILL was sent")  # pragma: no cover


def _truncate_half(path: Path) -> None:
    if path.is_file():
        size = path.stat().st_size
        with open(path, "r+b") as handle:
            handle.truncate(size // 2)


def install(switch: KillSwitch) -> None:
    """Route the write functions the product uses (directly or through diffusers/transformers/PIL) via `switch`."""
    import pathlib

    import PIL.Image
    import safetensors.torch
    import torch

    from dreambooth.train.loop import TrainLoop

    real_save_file, real_torch_save = safetensors.torch.save_file, torch.save
    real_replace, real_write_bytes = os.replace, pathlib.Path.write_bytes
    real_image_save, real_step = PIL.Image.Image.save, TrainLoop.optimizer_step

    def save_file(tensors: Any, filename: Any, metadata: Any = None) -> Any:
        return switch.event("safetensors", filename, lambda: real_save_file(tensors, filename, metadata=metadata),
                            True)

    def torch_save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> Any:
        is_path = isinstance(f, (str, os.PathLike))
        return switch.event("torch.save", f if is_path else None, lambda: real_torch_save(obj, f, *args, **kwargs),
                            is_path)

    def replace(src: Any, dst: Any, **kwargs: Any) -> Any:
        return switch.event("replace", dst, lambda: real_replace(src, dst, **kwargs), False)

    def write_bytes(self: pathlib.Path, data: bytes) -> int:
        return switch.event("write", self, lambda: real_write_bytes(self, data), True)

    def image_save(self: Any, fp: Any, *args: Any, **kwargs: Any) -> Any:
        is_path = isinstance(fp, (str, os.PathLike))
        return switch.event("image", fp if is_path else None, lambda: real_image_save(self, fp, *args, **kwargs),
                            is_path)

    def optimizer_step(self: Any) -> Any:
        return switch.event("step", None, lambda: real_step(self), False)

    safetensors.torch.save_file, torch.save, os.replace = save_file, torch_save, replace
    pathlib.Path.write_bytes, PIL.Image.Image.save = write_bytes, image_save  # type: ignore[method-assign]
    TrainLoop.optimizer_step = optimizer_step  # type: ignore[method-assign]
    modeling = sys.modules.get("transformers.modeling_utils")
    if modeling is not None and hasattr(modeling, "safe_save_file"):
        modeling.safe_save_file = save_file


# --- phases (each runs in a forked child) ---------------------------------------------------------------

def train_phase(spec: dict[str, Any]) -> None:
    """Save the config (as the tab does before a run), then train; record what the run reports."""
    import torch

    from dreambooth.train.trainer import Trainer

    from fake_host import FakeHost

    torch.set_num_threads(1)
    root = Path(spec["root"])
    install(KillSwitch(root, spec.get("kill_at"), Path(spec["log"]) if spec.get("log") else None,
                       spec.get("kill_at_step")))
    model = model_of(root)
    config = model.load_config()
    for name, value in spec.get("config_update", {}).items():
        setattr(config, name, value)
    model.save_config(config)
    result = Trainer(model.load_config(), FakeHost(layout_of(root))).run()
    report = {"step": result.step, "completed": result.completed, "saved": [str(p) for p in result.saved]}
    Path(spec["result"]).write_text(json.dumps(report))


def check_phase(spec: dict[str, Any]) -> None:
    """Inspect a workspace after a kill; write the list of problems found (empty: all good)."""
    import torch

    torch.set_num_threads(1)
    problems = workspace_problems(Path(spec["root"]), spec.get("configs", {}))
    Path(spec["result"]).write_text(json.dumps(problems))


PHASES: dict[str, Callable[[dict[str, Any]], None]] = {"train": train_phase, "check": check_phase}


# --- what must hold after any crash ---------------------------------------------------------------------

def is_temporary(path: Path, root: Path) -> bool:
    """A leftover of an interrupted atomic write: a dot-named temp file or folder (or something inside one)."""
    parts = path.relative_to(root).parts
    return any(part.startswith(".") and any(m in part for m in TEMP_MARKERS) for part in parts)


def file_problem(path: Path) -> str | None:
    """Why `path` cannot be read as what its name says, or None when it loads."""
    try:
        suffix = path.suffix.lower()
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            load_file(str(path))
        elif suffix == ".json":
            json.loads(path.read_text(encoding="utf-8"))
        elif suffix == ".jsonl":
            for line in path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    json.loads(line)
        elif suffix in (".pt", ".bin"):
            import torch

            torch.load(path, map_location="cpu", weights_only=True)  # never unpickle code, even in tests
        elif suffix == ".png":
            from PIL import Image

            with Image.open(path) as image:
                image.load()
    except Exception as error:  # any failure to load is the finding
        return f"{path}: {type(error).__name__}: {error}"
    return None


def workspace_problems(root: Path, configs: dict[str, Any]) -> list[str]:
    """Every check of a crashed workspace: files load, config is a good one, temp files are not listed."""
    problems: list[str] = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if not is_temporary(path, root) and (problem := file_problem(path)):
            problems.append(problem)
    problems += _config_problems(root, configs)
    problems += _listing_problems(root)
    problems += _model_problems(root)
    return problems


def _config_problems(root: Path, configs: dict[str, Any]) -> list[str]:
    """The config on disk must be exactly one of the configs written so far (old or new, never a mix)."""
    from dreambooth.config.io import to_dict

    try:
        current = to_dict(model_of(root).load_config())
    except Exception as error:
        return [f"config does not load: {error}"]
    allowed = configs.get("allowed", [])
    if allowed and current not in allowed:
        changed = sorted(k for k in current if all(current.get(k) != a.get(k) for a in allowed))
        return [f"config on disk is not the last one written; differing settings: {changed}"]
    return []


def _listing_problems(root: Path) -> list[str]:
    """What the product lists (checkpoints, snapshots, models) must never include a temporary file."""
    from dreambooth.host.embedded import find_checkpoints
    from dreambooth.store import ModelStore
    from dreambooth.train import snapshots

    layout = layout_of(root)
    listed = [*find_checkpoints(layout.checkpoints_dir, layout.lora_dir),
              *snapshots.list_snapshots(model_of(root).snapshots),
              *(layout.dreambooth_dir / name for name in ModelStore(layout).names())]
    return [f"temporary file listed as real: {p}" for p in listed if is_temporary(Path(p), root)]


def _model_problems(root: Path) -> list[str]:
    """The working folder loads; the snapshot a resume would use reads completely."""
    from dreambooth.models.components import load_components
    from dreambooth.train import snapshots

    model = model_of(root)
    problems = []
    try:
        load_components(model.working)
    except Exception as error:
        problems.append(f"working folder does not load: {type(error).__name__}: {error}")
    try:
        from dreambooth.config.schema import run_settings

        resume = snapshots.resumable_snapshot(model.snapshots, run_settings(model.load_config()))
        if resume.path is not None:
            snapshots.read_snapshot(resume.path)
    except Exception as error:
        problems.append(f"resumable snapshot does not load: {type(error).__name__}: {error}")
    return problems


# --- the zygote -----------------------------------------------------------------------------------------

def preload() -> None:
    """Import everything a run needs, without running any torch computation."""
    import accelerate  # noqa: F401
    import diffusers  # noqa: F401
    import safetensors.torch  # noqa: F401
    import transformers  # noqa: F401
    import transformers.modeling_utils  # noqa: F401
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel  # noqa: F401
    from transformers import CLIPTextModel  # noqa: F401

    import dreambooth.guide.preflight  # noqa: F401
    import dreambooth.models.components  # noqa: F401
    import dreambooth.models.export  # noqa: F401
    import dreambooth.train.lora  # noqa: F401
    import dreambooth.train.trainer  # noqa: F401

    import fake_host  # noqa: F401


def run_forked(phase: dict[str, Any]) -> int:
    """Run one phase in a forked child; its exit code, or minus the signal that ended it."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        os.dup2(2, 1)  # stdout is the protocol channel: the child's prints go to stderr
        code = 0
        try:
            PHASES[phase["kind"]](phase)
        except BaseException:
            traceback.print_exc()
            Path(phase["result"]).with_suffix(".error").write_text(traceback.format_exc())
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def run_scenario(scenario: list[dict[str, Any]]) -> list[int]:
    codes: list[int] = []
    for phase in scenario:
        codes.append(run_forked(phase))
        if codes[-1] != phase.get("expect", 0):
            break
    return codes


def main() -> None:
    preload()
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip():
            print(json.dumps(run_scenario(json.loads(line))), flush=True)


if __name__ == "__main__":
    # Quiet children: diffusers/transformers progress bars would fill the test log.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    main()
