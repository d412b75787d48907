"""TrainingService with a fake host and an injected fake trainer (no torch needed)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from dreambooth.config.schema import Concept, TrainingConfig
from dreambooth.errors import ConfigError, TrainingError
from dreambooth.service import (
    FAILED,
    FINISHED,
    IDLE,
    LOSS_HISTORY_LIMIT,
    RunInProgress,
    TrainingService,
    main_learning_rate,
    thin_history,
)
from dreambooth.store import Layout, ModelStore
from dreambooth.train.events import LossRecord, Progress

from fake_host import FakeHost


class ScriptedTrainer:
    """Reports `steps` steps, honouring stop/save/sample commands; can block on an event or fail."""

    instances: list[ScriptedTrainer] = []

    def __init__(self, config, host, callbacks, commands, steps=5, gate=None, fail=None, report_error=None):
        self.config, self.host, self.callbacks, self.commands = config, host, callbacks, commands
        self.steps, self.gate, self.fail, self.report_error = steps, gate, fail, report_error
        self.saves: list[str] = []
        self.samples = 0
        self.host_released_during_run = None
        ScriptedTrainer.instances.append(self)

    def run(self) -> None:
        self.host_released_during_run = self.host.released
        self.callbacks.on_status("training")
        for step in range(1, self.steps + 1):
            if self.gate is not None:
                self.gate.wait(5)
            if self.commands.stop_requested:
                if self.commands.save_on_stop:
                    self.saves.append("final")
                    self.callbacks.on_saved("checkpoint", Path(f"/out/{self.config.model_name}_{step}.safetensors"))
                return
            if self.commands.take_save():
                self.saves.append(f"step{step}")
            if self.commands.take_sample():
                self.samples += 1
                self.callbacks.on_sample(step, [Path(f"/s/{step}.png")], ["a photo"])
            self.callbacks.on_loss(LossRecord(step, 1.0 / step, {"unet": 1e-6 * step, "text_encoder": 5e-7}))
            self.callbacks.on_progress(Progress(step, self.steps, 1, 1, 2.0, (self.steps - step) / 2.0))
            if self.fail is not None and step == 2:
                raise self.fail
        if self.report_error:
            self.callbacks.on_error(self.report_error)


def factory(**options):
    def make(config, host, callbacks, commands):
        return ScriptedTrainer(config, host, callbacks, commands, **options)
    return make


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    store = ModelStore(Layout.under(tmp_path / "models").ensure())
    config = TrainingConfig(concepts=[Concept(instance_data_dir=str(tmp_path / "imgs"), instance_prompt="sks dog",
                                              class_prompt="photo of a dog", num_class_images=3)])
    store.model("dog").save_config(config)
    return store


def make_service(store: ModelStore, **options) -> tuple[TrainingService, FakeHost]:
    host = FakeHost(store.layout)
    return TrainingService(host, store, trainer_factory=factory(**options)), host


def test_run_collects_progress_losses_and_restores_host(store):
    service, host = make_service(store)
    assert service.status().state == IDLE
    service.start("dog")
    status = service.wait(5)
    assert status.state == FINISHED and status.model == "dog"
    assert (status.step, status.total_steps, status.it_per_s) == (5, 5, 2.0)
    assert status.last_loss == pytest.approx(0.2)
    assert [point[0] for point in status.losses] == [1, 2, 3, 4, 5]
    assert status.losses[2] == (3, pytest.approx(1 / 3), pytest.approx(3e-6))
    trainer = ScriptedTrainer.instances[-1]
    assert trainer.host_released_during_run is True and host.released is False
    names = host.call_names()
    assert names.index("release_model") < names.index("restore_model") < names.index("refresh_checkpoints")
    assert "refresh_loras" in names and host.progress_reports[-1][0] == pytest.approx(1.0)


def test_overrides_apply_to_the_run_only(store):
    service, _ = make_service(store)
    service.start("dog", {"learning_rate": "3e-6", "max_train_steps": 7})
    service.wait(5)
    run_config = ScriptedTrainer.instances[-1].config
    assert run_config.learning_rate == pytest.approx(3e-6) and run_config.max_train_steps == 7
    assert store.existing("dog").load_config().max_train_steps == 0


@pytest.mark.parametrize("overrides", [{"no_such_setting": 1}, {"learning_rate": "fast"},
                                       {"optimizer": "sgd"}, {"model_name": "other"}])
def test_bad_overrides_fail_before_the_thread_starts(store, overrides):
    service, _ = make_service(store)
    with pytest.raises(ConfigError):
        service.start("dog", overrides)
    assert service.status().state == IDLE and not service.is_busy()


def test_unknown_or_hostile_model_name_is_refused(store):
    service, _ = make_service(store)
    for name in ("missing", "../dog", "/etc/passwd", "dog/../../x"):
        with pytest.raises(ConfigError):
            service.start(name)


def test_second_start_while_running_raises_run_in_progress(store):
    gate = threading.Event()
    service, _ = make_service(store, gate=gate)
    service.start("dog")
    with pytest.raises(RunInProgress, match="dog"):
        service.start("dog")
    gate.set()
    assert service.wait(5).state == FINISHED
    service.start("dog")  # the slot is free again once the run ended
    assert service.wait(5).state == FINISHED


def test_two_simultaneous_starts_leave_exactly_one_run(store):
    gate = threading.Event()
    service, _ = make_service(store, gate=gate)
    before = len(ScriptedTrainer.instances)
    barrier = threading.Barrier(8)
    outcomes: list[str] = []

    def attempt() -> None:
        barrier.wait()
        try:
            service.start("dog")
            outcomes.append("started")
        except RunInProgress:
            outcomes.append("refused")

    threads = [threading.Thread(target=attempt) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(5)
    gate.set()
    service.wait(5)
    assert sorted(outcomes) == ["refused"] * 7 + ["started"]
    assert len(ScriptedTrainer.instances) - before == 1


def test_cancel_with_and_without_save(store):
    for save in (True, False):
        gate = threading.Event()
        service, _ = make_service(store, gate=gate)
        service.start("dog")
        stopping = service.cancel(save=save)
        assert stopping.state == "stopping"
        gate.set()
        status = service.wait(5)
        trainer = ScriptedTrainer.instances[-1]
        assert status.state == FINISHED and status.message == "Stopped."
        assert trainer.saves == (["final"] if save else [])
        assert bool(status.saved) is save


def test_save_now_and_sample_now_reach_the_trainer(store):
    gate = threading.Event()
    service, _ = make_service(store, gate=gate)
    service.start("dog")
    service.save_now()
    service.sample_now()
    gate.set()
    status = service.wait(5)
    trainer = ScriptedTrainer.instances[-1]
    assert trainer.saves == ["step1"] and trainer.samples == 1
    assert status.samples == ["/s/1.png"] and status.sample_prompts == ["a photo"]


def test_user_error_is_shown_verbatim_and_host_restored(store):
    service, host = make_service(store, fail=TrainingError("Loss became NaN at step 2; lower the LR."))
    service.start("dog")
    status = service.wait(5)
    assert status.state == FAILED and status.error == "Loss became NaN at step 2; lower the LR."
    assert host.released is False and status.step == 2
    assert not service.is_busy()


def test_unexpected_errors_and_oom_get_advice(store):
    service, _ = make_service(store, fail=RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"))
    service.start("dog")
    assert "batch size" in service.wait(5).error
    service, _ = make_service(store, fail=KeyError("boom"))
    service.start("dog")
    error = service.wait(5).error
    assert error.startswith("KeyError") and "console" in error


def test_error_reported_through_callback_marks_run_failed(store):
    service, _ = make_service(store, report_error="Dataset folder /x is empty; add images.")
    service.start("dog")
    status = service.wait(5)
    assert status.state == FAILED and status.error == "Dataset folder /x is empty; add images."


def test_status_is_a_snapshot(store):
    service, _ = make_service(store)
    service.start("dog")
    service.wait(5)
    snapshot = service.status()
    snapshot.losses.clear()
    assert len(service.status().losses) == 5
    data = service.status().to_dict()
    assert data["state"] == "finished" and data["fraction"] == 1.0 and data["losses"][0][0] == 1


def test_loss_history_is_thinned_but_keeps_recent_points():
    points = list(range(LOSS_HISTORY_LIMIT + 1))
    thinned = thin_history(points, LOSS_HISTORY_LIMIT)
    assert len(thinned) < len(points) and thinned[-1] == points[-1] and thinned[0] == 0
    assert thinned[-100:] == points[-100:]
    assert thin_history([1, 2], 10) == [1, 2]


def test_main_learning_rate_prefers_unet():
    assert main_learning_rate({"text_encoder": 1.0, "unet": 2.0}) == 2.0
    assert main_learning_rate({"group0": 3.0}) == 3.0
    assert main_learning_rate({}) == 0.0


def test_class_images_job_generates_through_host_under_lock(store):
    service, host = make_service(store)
    written = service.generate_class_images("dog")
    images = sorted(store.model("dog").class_images.rglob("*.png"))
    assert written == 3 and len(images) == 3
    assert host.call_names()[0] == "gpu_lock" and len(host.requests) >= 1
    status = service.status()
    assert status.state == FINISHED and status.job == "class_images"


def test_jobs_refused_while_training(store):
    gate = threading.Event()
    service, _ = make_service(store, gate=gate)
    service.start("dog")
    with pytest.raises(RunInProgress):
        service.generate_class_images("dog")
    gate.set()
    service.wait(5)


def test_failed_job_frees_the_slot(store):
    service, _ = make_service(store)

    def explode(model):
        raise TrainingError("disk full while writing x; free space")

    with pytest.raises(TrainingError):
        service.run_job("dog", "export", explode)
    status = service.status()
    assert status.state == FAILED and "disk full" in status.error and not service.is_busy()
    assert service.run_job("dog", "export", lambda model: model.name) == "dog"


def test_wait_without_run_returns_idle(store):
    service, _ = make_service(store)
    start = time.monotonic()
    assert service.wait(1).state == IDLE and time.monotonic() - start < 1


def test_checkpoint_must_resolve_inside_the_checkpoints_folder(store, tmp_path):
    from dreambooth.service import checkpoint_inside

    folder = store.layout.checkpoints_dir
    (folder / "sub").mkdir()
    (folder / "sub" / "base.safetensors").write_bytes(b"x")
    outside = tmp_path / "secret.safetensors"
    outside.write_bytes(b"x")
    (folder / "link.safetensors").symlink_to(outside)
    assert checkpoint_inside(folder, "sub/base.safetensors") == (folder / "sub" / "base.safetensors").resolve()
    assert checkpoint_inside(folder, folder / "sub" / "base.safetensors").name == "base.safetensors"
    for hostile in ("../../secret.safetensors", str(outside), "link.safetensors", "sub/../../x.safetensors",
                    "", "sub", "missing.safetensors", "/etc/passwd"):
        with pytest.raises(ConfigError):
            checkpoint_inside(folder, hostile)


def test_create_model_uses_the_models_creator(store, monkeypatch):
    import types

    calls = []

    def create_model(store_arg, name, source, family=None, prediction_type=None):
        calls.append((name, source, family, prediction_type))
        store_arg.model(name).save_config(TrainingConfig(base_checkpoint=Path(source).name))

    monkeypatch.setitem(__import__("sys").modules, "dreambooth.models.loading",
                        types.SimpleNamespace(create_model=create_model))
    service, _ = make_service(store)
    (store.layout.checkpoints_dir / "base.safetensors").write_bytes(b"x")
    model = service.create_model("new", Path("base.safetensors"), family="sd1")
    assert model.exists() and calls[0][0] == "new" and calls[0][2] == "sd1"
    with pytest.raises(ConfigError, match="already exists"):
        service.create_model("new", Path("base.safetensors"))
    assert service.status().state == FINISHED and not service.is_busy()


def test_export_writes_new_files_into_the_checkpoints_folder(store):
    pytest.importorskip("diffusers")
    from dreambooth.models.components import save_components
    from dreambooth.models.tiny import tiny_components

    service, host = make_service(store)
    save_components(tiny_components("sd1"), store.existing("dog").working)
    first = service.export("dog", "fp16")
    second = service.export("dog")
    assert first == store.layout.checkpoints_dir / "dog.safetensors" and first.is_file()
    assert second.name == "dog_2.safetensors" and second.is_file()
    assert host.call_names().count("refresh_checkpoints") == 2
    assert ("checkpoint", str(second)) in service.status().saved


def test_create_from_a_real_checkpoint_applies_host_defaults(store):
    from dreambooth.models.demo import write_demo_checkpoint

    service, host = make_service(store)
    host.config_defaults = lambda: {"save_precision": "fp32"}
    exported = write_demo_checkpoint("sd1", store.layout.checkpoints_dir / "tiny.safetensors")
    model = service.create_model("copy", Path(exported.name))
    config = model.load_config()
    assert (model.working / "model_index.json").is_file() and config.model_family == "sd1"
    assert config.save_precision == "fp32" and Path(config.base_checkpoint).name == exported.name


def test_a_finished_job_hands_freed_memory_back(store, monkeypatch):
    """Freed tensors stay in glibc's heap; the service trims it when a job starts (a model the web UI unloaded:
    7.2 GiB of SD.Next's SDXL) and when it ends (a create from an SDXL checkpoint left 8.7 GiB)."""
    from dreambooth import heap
    from dreambooth.models.demo import write_demo_checkpoint

    busy_at_trim: list[bool] = []  # whether this service's job still held the slot at each trim

    class Libc:
        def malloc_trim(self, pad: int) -> int:
            busy_at_trim.append(pad == 0 and service.is_busy())
            return 1

    monkeypatch.setattr(heap, "glibc", Libc)
    service, _ = make_service(store)
    exported = write_demo_checkpoint("sd1", store.layout.checkpoints_dir / "tiny.safetensors")
    service.create_model("copy", Path(exported.name))
    assert busy_at_trim == [True, True]  # before the job loads models, and after they are gone (slot still held)
    service.export("copy")
    assert busy_at_trim.count(True) == 4
