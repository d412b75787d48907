"""Crash safety: SIGKILL a training run at 20+ points, check what is on disk, resume, compare final weights.

Each run is a child forked from a zygote (faultkit.py) and kills itself with SIGKILL at a chosen event: an
optimizer step (after backward, before the update), a file write (cut to half its size first, as a crash
mid-write leaves it) or a rename (just before it). The events are numbered by an uninterrupted reference
run of the same workspace, and the kill points are drawn from them (seeded) across every kind of write:
steps, config, class images, latent cache, snapshots, exports, LoRA files and the final working/ swap.

After each kill: every file that is not an interrupted temp file loads, the config is exactly the last one
whose write completed, nothing temporary is listed as a checkpoint, snapshot or model, working/ loads.
Then the run is started again; it resumes from the last snapshot and must end with weights bit-identical
to the reference run (CPU, fp32, one thread: every random draw is derived from seed, step and item).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from queue import Queue
from typing import Any

import faultkit
import pytest
import torch
from safetensors.torch import load_file

KILLS = {"dreambooth": 16, "lora": 5}  # 21 kills in all
SEED = 20240607
CONFIG_UPDATE = {"log_every_n_steps": 2}  # written before every run, as the tab saves settings on Train
CATEGORIES = ("step", "config", "class image", "cache", "snapshot", "export", "working")


def category(label: str) -> str:
    """The kind of moment an event is, from its label (kind:path relative to the workspace)."""
    kind, _, where = label.partition(":")
    rules = [(kind == "step", "step"), ("db_config" in where, "config"), (kind == "image", "class image"),
             ("/cache/" in where, "cache"), ("/snapshots/" in where, "snapshot"),
             ("Stable-diffusion/" in where or "Lora/" in where, "export"), ("working" in where, "working")]
    return next((name for matched, name in rules if matched), "other")


def choose_kills(events: list[str], count: int, seed: int) -> list[int]:
    """`count` event numbers (1-based), drawn round-robin over the categories so every kind is hit."""
    rng = random.Random(seed)
    by_category: dict[str, list[int]] = {}
    for number, label in enumerate(events, start=1):
        by_category.setdefault(category(label), []).append(number)
    for numbers in by_category.values():
        rng.shuffle(numbers)
    chosen: list[int] = []
    while len(chosen) < min(count, len(events)):
        for numbers in by_category.values():
            if numbers and len(chosen) < count:
                chosen.append(numbers.pop())
    return sorted(chosen)


@dataclass
class Scenario:
    kill_at: int
    label: str
    root: Path
    codes: list[int] = field(default_factory=list)

    @property
    def killed(self) -> bool:
        return bool(self.codes) and self.codes[0] == faultkit.KILLED

    def read(self, name: str) -> Any:
        path = self.root / name
        return json.loads(path.read_text()) if path.is_file() else None

    def error(self, name: str) -> str:
        path = (self.root / name).with_suffix(".error")
        return path.read_text().strip().splitlines()[-1] if path.is_file() else ""


@dataclass
class Variant:
    name: str
    events: list[str]
    reference: dict[str, torch.Tensor]
    scenarios: list[Scenario]


def final_tensors(root: Path, result: dict[str, Any]) -> dict[str, torch.Tensor]:
    """What a finished run leaves: working/'s UNet and text encoder, and the last export it wrote."""
    working = faultkit.model_of(root).working
    tensors = {f"unet.{k}": v for k, v in load_file(str(working / "unet/diffusion_pytorch_model.safetensors")).items()}
    tensors.update({f"te.{k}": v for k, v in load_file(str(working / "text_encoder/model.safetensors")).items()})
    exports = [Path(p) for p in result["saved"] if p.endswith(".safetensors")]
    tensors.update({f"export.{k}": v for k, v in load_file(str(exports[-1])).items()})
    return tensors


def config_dicts(root: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The config as created, and as it reads back after the run's settings update was saved."""
    from dreambooth.config.io import load, save, to_dict

    old = load(faultkit.model_of(root).config_path)
    new = load(faultkit.model_of(root).config_path)
    for name, value in CONFIG_UPDATE.items():
        setattr(new, name, value)
    scratch = root / "expected_config.json"
    save(new, scratch)
    expected = to_dict(load(scratch))
    scratch.unlink()
    return to_dict(old), expected


def train(root: Path, result: str, kill_at: int | None = None, log: str | None = None) -> dict[str, Any]:
    spec = {"kind": "train", "root": str(root), "result": str(root / result), "config_update": CONFIG_UPDATE,
            "expect": faultkit.KILLED if kill_at else 0}
    return {**spec, "kill_at": kill_at, "log": str(root / log) if log else None}


def run_variant(name: str, zygotes: list[Any], base_working: Path, tmp: Path) -> Variant:
    reference_root = faultkit.make_workspace(tmp / f"{name}-reference", base_working, name)
    codes = zygotes[0].run([train(reference_root, "result.json", log="events.log")])
    assert codes == [0], (reference_root / "result.error").read_text()
    events = (reference_root / "events.log").read_text().splitlines()
    reference = final_tensors(reference_root, json.loads((reference_root / "result.json").read_text()))
    old, new = config_dicts(tmp / f"{name}-pristine")
    config_written = next(n for n, label in enumerate(events, 1) if label.startswith("replace:") and
                          category(label) == "config")
    scenarios = []
    for kill_at in choose_kills(events, KILLS[name], SEED):
        root = tmp / f"{name}-kill-{kill_at:03d}"
        shutil.copytree(reference_root.parent / f"{name}-pristine", root, copy_function=faultkit._link_or_copy)
        allowed = [old] if kill_at <= config_written else [new]
        check = {"kind": "check", "root": str(root), "result": str(root / "check.json"),
                 "configs": {"allowed": allowed}}
        scenarios.append(Scenario(kill_at, events[kill_at - 1], root,
                                  [train(root, "killed.json", kill_at), check, train(root, "resumed.json")])
                         )  # codes hold the phases until run
    _run_all(zygotes, scenarios)
    return Variant(name, events, reference, scenarios)


def _run_all(zygotes: list[Any], scenarios: list[Scenario]) -> None:
    free: Queue[Any] = Queue()
    for zygote in zygotes:
        free.put(zygote)

    def run(scenario: Scenario) -> None:
        zygote = free.get()
        try:
            scenario.codes = zygote.run(scenario.codes)  # type: ignore[arg-type]
        finally:
            free.put(zygote)

    with ThreadPoolExecutor(len(zygotes)) as pool:
        list(pool.map(run, scenarios))


@pytest.fixture(scope="module")
def variants(zygotes: list[Any], base_working: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Variant]:
    tmp = tmp_path_factory.mktemp("crash")
    found = []
    for name in KILLS:
        # A pristine copy made before the reference run, for every kill scenario to start from.
        faultkit.make_workspace(tmp / f"{name}-pristine", base_working, name)
        found.append(run_variant(name, zygotes, base_working, tmp))
    return found


def all_scenarios(variants: list[Variant]) -> list[Scenario]:
    return [scenario for variant in variants for scenario in variant.scenarios]


def test_kills_cover_every_kind_of_write(variants: list[Variant]) -> None:
    scenarios = all_scenarios(variants)
    assert len(scenarios) >= 20
    assert {category(s.label) for s in scenarios} >= set(CATEGORIES)
    partial_writes = [s for s in scenarios if s.label.split(":")[0] in ("safetensors", "torch.save", "write", "image")]
    assert len(partial_writes) >= 8


def test_every_run_dies_at_its_kill_point(variants: list[Variant]) -> None:
    failed = [f"{s.label} (#{s.kill_at}): exit {s.codes[:1]} {s.error('killed.json')}"
              for s in all_scenarios(variants) if not s.killed]
    assert not failed, "\n".join(failed)


def test_files_load_and_config_is_the_last_good_one_after_every_kill(variants: list[Variant]) -> None:
    problems = []
    for s in all_scenarios(variants):
        if not s.killed:
            continue
        found = s.read("check.json")
        if found is None:
            problems.append(f"after {s.label}: check failed to run: {s.error('check.json')}")
        else:
            problems += [f"after {s.label}: {problem}" for problem in found]
    assert not problems, "\n".join(problems)


def test_resume_after_every_kill_reaches_the_same_weights(variants: list[Variant]) -> None:
    mismatches = []
    for variant in variants:
        for s in variant.scenarios:
            if not s.killed:
                continue
            result = s.read("resumed.json")
            if result is None or not result["completed"]:
                mismatches.append(f"after {s.label}: resumed run did not finish: {s.error('resumed.json')}")
                continue
            final = final_tensors(s.root, result)
            different = [k for k in variant.reference if not torch.equal(variant.reference[k], final.get(k))]
            if different or final.keys() != variant.reference.keys():
                mismatches.append(f"after {s.label}: {len(different)} tensors differ, e.g. {different[:3]}")
    assert not mismatches, "\n".join(mismatches)


def test_no_temporary_files_are_left_after_the_resumed_run(variants: list[Variant]) -> None:
    """Each crash mid-save leaves a temp file or folder; the next run must clear them (they can be GBs)."""
    leftovers = []
    for s in all_scenarios(variants):
        if s.killed and s.read("resumed.json"):
            temps = [p for p in s.root.rglob("*") if faultkit.is_temporary(p, s.root)
                     and not faultkit.is_temporary(p.parent, s.root)]
            leftovers += [f"after {s.label}: {p.relative_to(s.root)}" for p in temps]
    assert not leftovers, "\n".join(leftovers)


def test_resume_after_the_text_encoder_stopped_keeps_its_training(workspace: Any) -> None:
    """'stop_text_encoder' freezes the text encoder part-way; a snapshot taken later must still hold its
    trained weights, or a resume silently restarts it from the base model. (A stop without saving leaves
    the disk as a crash at that step would.)"""
    from dreambooth.train.events import Progress, TrainCallbacks, TrainCommands
    from dreambooth.train.trainer import Trainer

    from fake_host import FakeHost

    settings = {"with_prior_preservation": False, "cache_latents": "memory", "max_train_steps": 6,
                "snapshot_every_n_steps": 2, "stop_text_encoder": 0.5, "save_every_n_steps": 0}

    def run(root: Path, commands: TrainCommands | None = None, callbacks: Any = None) -> Any:
        config = faultkit.model_of(root).load_config()
        for name, value in settings.items():
            setattr(config, name, value)
        return Trainer(config, FakeHost(faultkit.layout_of(root)), callbacks, commands).run()

    class StopAt5(TrainCallbacks):
        def __init__(self, commands: TrainCommands):
            self.commands = commands

        def on_progress(self, progress: Progress) -> None:
            if progress.step == 5:
                self.commands.stop(save=False)

    straight, crashed = workspace("dreambooth"), workspace("dreambooth")
    run(straight)
    commands = TrainCommands()
    assert run(crashed, commands, StopAt5(commands)).stopped
    assert run(crashed).completed
    te = "text_encoder/model.safetensors"
    expected = load_file(str(faultkit.model_of(straight).working / te))
    resumed = load_file(str(faultkit.model_of(crashed).working / te))
    different = [k for k in expected if not torch.equal(expected[k], resumed[k])]
    assert not different, f"{len(different)} text-encoder tensors lost their training on resume"


def test_cli_train_while_another_process_trains_is_refused_and_the_first_run_is_untouched(
        workspace: Any, base_working: Path) -> None:
    """Two writers would leave whichever working/ finished last: a CLI `train` of a model that this process
    is training must stop before touching the folder; the first run then ends exactly as if alone."""
    import subprocess
    import sys
    import threading

    from dreambooth.train.events import Progress, TrainCallbacks
    from dreambooth.train.trainer import Trainer

    from fake_host import FakeHost

    class PauseAt2(TrainCallbacks):
        def __init__(self) -> None:
            self.paused, self.resume = threading.Event(), threading.Event()

        def on_progress(self, progress: Progress) -> None:
            if progress.step == 2:
                self.paused.set()
                self.resume.wait(600)

    def run(root: Path, callbacks: Any = None) -> Any:
        return Trainer(faultkit.model_of(root).load_config(), FakeHost(faultkit.layout_of(root)), callbacks).run()

    alone, shared = (workspace("dreambooth", with_prior_preservation=False) for _ in range(2))
    run(alone)
    pause = PauseAt2()
    results: list[Any] = []
    first = threading.Thread(target=lambda: results.append(run(shared, pause)))
    first.start()
    try:
        assert pause.paused.wait(600), "the first run never reached step 2"
        second = subprocess.run([sys.executable, "-m", "dreambooth", "--data-dir", str(shared), "train",
                                 "--name", faultkit.MODEL], capture_output=True, text=True, timeout=600,
                                cwd=str(Path(faultkit.__file__).resolve().parents[2]))
    finally:
        pause.resume.set()
        first.join(600)
    assert second.returncode == 1, second.stdout + second.stderr
    assert (f"Model '{faultkit.MODEL}' is already training in process {os.getpid()}"
            in second.stdout + second.stderr)
    assert results and results[0].completed
    working = {name: faultkit.model_of(root).working for name, root in (("alone", alone), ("shared", shared))}
    for part in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        expected, got = load_file(str(working["alone"] / part)), load_file(str(working["shared"] / part))
        assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected), part
    untrained = load_file(str(base_working / "unet/diffusion_pytorch_model.safetensors"))
    trained = load_file(str(working["shared"] / "unet/diffusion_pytorch_model.safetensors"))
    assert any(not torch.equal(untrained[k], trained[k]) for k in untrained)  # the comparison is of trained weights


def test_a_second_run_killed_mid_way_resumes_its_own_snapshot(zygotes: list[Any], workspace: Any) -> None:
    """After a finished 30-step run, a 20-step run of the same model is a new run: killed at step 12 it must
    resume from its own step-12 snapshot (not the old run's step 30) and end bit-identical to the same
    20-step run left alone."""
    from dreambooth.train import snapshots

    length = {"snapshot_every_n_steps": 4, "save_every_n_steps": 0}
    first = workspace("dreambooth", max_train_steps=30, **length)
    assert zygotes[0].run([{**train(first, "first.json"), "config_update": {}}]) == [0]
    old_run = snapshots.read_meta(snapshots.list_snapshots(faultkit.model_of(first).snapshots)[-1])["run_id"]
    killed = first.parent / "second-run-killed"
    shutil.copytree(first, killed, copy_function=faultkit._link_or_copy)
    second = {"max_train_steps": 20}
    straight = {**train(first, "straight.json"), "config_update": second}
    dying = {**train(killed, "killed.json", kill_at=None), "config_update": second, "kill_at_step": 13,
             "expect": faultkit.KILLED}
    with ThreadPoolExecutor(2) as pool:
        codes = list(pool.map(lambda z, spec: z.run([spec]), zygotes, [straight, dying]))
    assert codes == [[0], [faultkit.KILLED]], (first / "straight.error", killed / "killed.error")
    left = [snapshots.read_meta(p) for p in snapshots.list_snapshots(faultkit.model_of(killed).snapshots)]
    assert [(m["step"], m["run_id"] != old_run, m["finished"]) for m in left] == [(12, True, False)]
    assert zygotes[0].run([{**train(killed, "resumed.json"), "config_update": second}]) == [0]
    expected = final_tensors(first, json.loads((first / "straight.json").read_text()))
    resumed_result = json.loads((killed / "resumed.json").read_text())
    assert resumed_result["completed"] and resumed_result["step"] == 20
    resumed = final_tensors(killed, resumed_result)
    different = [k for k in expected if not torch.equal(expected[k], resumed.get(k))]
    assert not different and expected.keys() == resumed.keys(), f"{len(different)} tensors differ: {different[:3]}"
