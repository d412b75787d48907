"""`python -m dreambooth`: commands end to end on tiny models, generated flags, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from dreambooth import cli
from dreambooth.config.schema import Concept, TrainingConfig, settings
from dreambooth.store import Layout, ModelStore

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("serve", "demo-model", "create", "list", "config", "export", "train", "wizard", "lora-extract",
            "lora-resize", "lora-merge")


def run_cli(tmp_path: Path, *args: str) -> int:
    return cli.main(["--data-dir", str(tmp_path), *args])


def layout_of(tmp_path: Path) -> Layout:
    return Layout.under(tmp_path / "models")


def make_model(tmp_path: Path, name: str = "dog", **values: Any) -> TrainingConfig:
    config = TrainingConfig(model_name=name, concepts=[Concept(instance_prompt="photo of sks dog")], **values)
    ModelStore(layout_of(tmp_path)).model(name).save_config(config)
    return config


def fake_module(monkeypatch: pytest.MonkeyPatch, name: str, **functions: Any) -> None:
    module = types.ModuleType(name)
    module.__dict__.update(functions)
    monkeypatch.setitem(sys.modules, name, module)


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ")
    return lines[0]


# --- help and generated flags ------------------------------------------------------------------

@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main([command, "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert f"dreambooth {command}" in out and "--data-dir" in out


def test_train_flags_are_generated_from_the_schema() -> None:
    train = cli.build_parser()._subparsers._group_actions[0].choices["train"]  # type: ignore[union-attr]
    actions = {action.dest: action for action in train._actions}
    for field in settings(TrainingConfig):
        dest = f"setting_{field.name}"
        if field.name in cli.NOT_OVERRIDABLE:
            assert dest not in actions
            continue
        action = actions[dest]
        assert action.option_strings == [cli.flag_name(field.name)]
        assert field.metadata["help"].replace("%", "%%") in action.help
        if field.metadata.get("choices"):
            assert all(choice in action.metavar for choice in field.metadata["choices"])


def test_train_passes_typed_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_model(tmp_path)
    calls: list[tuple[Layout, str, dict[str, Any]]] = []
    fake_module(monkeypatch, "dreambooth.cli_train",
                run_training=lambda layout, name, overrides: calls.append((layout, name, overrides)) or 0)
    status = run_cli(tmp_path, "train", "--name", "dog", "--learning-rate", "1e-6", "--train-text-encoder",
                     "false", "--lr-scheduler", "cosine", "--set", "max_train_steps=40",
                     "concepts.0.class_prompt=a dog")
    assert status == 0
    layout, name, overrides = calls[0]
    assert layout == layout_of(tmp_path) and name == "dog"
    assert overrides == {"learning_rate": 1e-6, "train_text_encoder": False, "lr_scheduler": "cosine",
                         "max_train_steps": 40, "concepts.0.class_prompt": "a dog"}


def test_train_returns_the_trainers_status(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_model(tmp_path)
    fake_module(monkeypatch, "dreambooth.cli_train", run_training=lambda *args: 3)
    assert run_cli(tmp_path, "train", "--name", "dog") == 3


@pytest.mark.parametrize(("args", "fragment"), [
    (["--learning-rate", "fast"], "'learning_rate': 'fast' is not a valid float"),
    (["--learning-rate", "2"], "above the maximum 1.0"),
    (["--optimizer", "sgd"], "'sgd' is not allowed; choose one of adamw"),
    (["--set", "learnin_rate=1e-6"], "Unknown setting 'learnin_rate'; did you mean learning_rate"),
    (["--set", "concepts.5.instance_prompt=x"], "has 1 concept(s)"),
    (["--set", "concepts.1.instance_prompt=x"], "use index 0-0; add concepts to the model's settings first"),
    (["--set", "concepts.0.colour=x"], "Unknown setting 'colour' in 'concepts.0.colour'"),
    (["--set", "learning_rate"], "write FIELD=VALUE"),
    (["--set", "model_name=x"], "model_name"),
    (["--model-name", "x"], "unrecognized arguments: --model-name"),
])
def test_train_argument_errors_name_the_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str], args: list[str],
                                                fragment: str) -> None:
    make_model(tmp_path)
    fake_module(monkeypatch, "dreambooth.cli_train", run_training=lambda *a: pytest.fail("must not train"))
    assert run_cli(tmp_path, "train", "--name", "dog", *args) != 0
    assert fragment in one_error_line(capsys)


# --- serve, wizard, unavailable helpers --------------------------------------------------------

def test_serve_is_the_default_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[Layout, str, int]] = []
    fake_module(monkeypatch, "dreambooth.ui.app",
                serve=lambda layout, host, port: calls.append((layout, host, port)))
    assert run_cli(tmp_path) == 0
    assert cli.main(["serve", "--port", "7999", "--host", "0.0.0.0", "--data-dir", str(tmp_path / "b")]) == 0
    assert calls == [(layout_of(tmp_path), "127.0.0.1", 7860), (layout_of(tmp_path / "b"), "0.0.0.0", 7999)]
    assert (tmp_path / "models" / "dreambooth").is_dir()


def test_missing_helper_module_is_one_clear_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "dreambooth.ui.app", None)
    assert run_cli(tmp_path, "serve") == 1
    assert "'serve' is not available" in one_error_line(capsys)


def test_wizard_runs_the_guide(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["wizard", "--images", "10"]) == 0
    assert "max steps" in capsys.readouterr().out


# --- locations ---------------------------------------------------------------------------------

def test_layout_flags(tmp_path: Path) -> None:
    args = cli.build_parser().parse_args(["--data-dir", str(tmp_path), "list", "--lora-dir", str(tmp_path / "L")])
    layout = cli.layout_from_args(args)
    assert layout.checkpoints_dir == tmp_path / "models" / "Stable-diffusion"
    assert layout.lora_dir == tmp_path / "L" and layout.dreambooth_dir == tmp_path / "models" / "dreambooth"
    args = cli.build_parser().parse_args(["list", "--ckpt-dir", "C", "--dreambooth-dir", "D"])
    layout = cli.layout_from_args(args)
    assert (layout.checkpoints_dir, layout.dreambooth_dir) == (Path("C"), Path("D"))
    assert layout.models_dir == cli.DEFAULT_DATA_DIR / "models"


def test_list(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(tmp_path, "list") == 0
    assert "No models" in capsys.readouterr().out
    make_model(tmp_path, "cat", method="lora", model_family="sdxl")
    make_model(tmp_path, "dog")
    broken = layout_of(tmp_path).dreambooth_dir / "broken"
    broken.mkdir()
    (broken / "db_config.json").write_text("{oops")
    assert run_cli(tmp_path, "list") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith(f"broken\t(config unreadable: Config file {broken / 'db_config.json'} is not "
                               "valid JSON")
    assert lines[2].split("\t")[:3] == ["cat", "sdxl", "lora"]
    assert lines[3].split("\t")[:3] == ["dog", "sd1", "dreambooth"]


# --- config ------------------------------------------------------------------------------------

def test_config_set_and_show(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_model(tmp_path)
    assert run_cli(tmp_path, "config", "--name", "dog", "--set", "learning_rate=3e-6", "use_ema=true",
                   "concepts.1.instance_data_dir=/imgs/cat", "--show") == 0
    shown = capsys.readouterr().out
    data = json.loads(shown[shown.index("{"):])
    assert data["learning_rate"] == 3e-6 and data["use_ema"] is True
    assert [c["instance_data_dir"] for c in data["concepts"]] == ["", "/imgs/cat"]
    saved = ModelStore(layout_of(tmp_path)).existing("dog").load_config()
    assert saved.learning_rate == 3e-6 and len(saved.concepts) == 2


def test_config_without_changes_shows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_model(tmp_path, seed=77)
    assert run_cli(tmp_path, "config", "--name", "dog") == 0
    assert json.loads(capsys.readouterr().out)["seed"] == 77


def test_config_bad_set_leaves_file_unchanged(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_model(tmp_path)
    path = ModelStore(layout_of(tmp_path)).existing("dog").config_path
    before = path.read_bytes()
    assert run_cli(tmp_path, "config", "--name", "dog", "--set", "seed=5", "train_batch_size=0") == 1
    assert "'train_batch_size': 0 is below the minimum 1" in one_error_line(capsys)
    assert path.read_bytes() == before


def test_config_import_old_db_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_model(tmp_path, model_family="sd2v", prediction_type="v_prediction", resolution=768)
    images = tmp_path / "old" / "dog"
    images.mkdir(parents=True)
    (images / "1.png").write_bytes(b"x")
    old = {"model_name": "other", "learning_rate": 1e-6, "use_lora": True, "lora_unet_rank": 8,
           "frobnicate": 1, "concepts_list": [{"instance_data_dir": "dog", "instance_prompt": "sks",
                                               "num_class_images_per": 5}]}
    (tmp_path / "old" / "db_config.json").write_text(json.dumps(old))
    assert run_cli(tmp_path, "config", "--name", "dog", "--import", str(tmp_path / "old" / "db_config.json")) == 0
    err = capsys.readouterr().err
    assert "note: ignored: frobnicate" in err and "note: ignored: model_name" in err
    saved = ModelStore(layout_of(tmp_path)).existing("dog").load_config()
    assert (saved.model_name, saved.model_family, saved.prediction_type) == ("dog", "sd2v", "v_prediction")
    assert (saved.method, saved.lora_rank, saved.learning_rate) == ("lora", 8, 1e-6)
    assert saved.concepts[0].instance_data_dir == str(images) and saved.concepts[0].num_class_images == 5


def test_config_import_malformed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_model(tmp_path)
    bad = tmp_path / "concepts.json"
    bad.write_text("[{]")
    assert run_cli(tmp_path, "config", "--name", "dog", "--import", str(bad)) == 1
    line = one_error_line(capsys)
    assert str(bad) in line and "line 1" in line


# --- errors ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("args", "status", "fragment"), [
    (["config", "--name", "ghost"], 1, "No model named 'ghost'"),
    (["export", "--name", "ghost"], 1, "No model named 'ghost'"),
    (["create", "--name", "../evil", "--from", "x"], 1, "is not allowed"),
    (["create", "--name", "CON", "--from", "x"], 1, "is not allowed"),
    (["create", "--name", "ok", "--from", "missing.safetensors"], 1, "Checkpoint 'missing.safetensors' not found"),
    (["create", "--from", "x"], 2, "the following arguments are required: --name"),
    (["demo-model", "--family", "sd9"], 2, "invalid choice: 'sd9'"),
    (["export", "--name", "dog", "--precision", "fp8"], 2, "invalid choice: 'fp8'"),
    (["nonsense"], 2, "invalid choice: 'nonsense'"),
])
def test_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], status: int,
                             fragment: str) -> None:
    assert run_cli(tmp_path, *args) == status
    assert fragment in one_error_line(capsys)


def test_create_existing_name_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_model(tmp_path)
    assert run_cli(tmp_path, "create", "--name", "dog", "--from", "x") == 1
    assert "already exists" in one_error_line(capsys)


def test_create_resolves_names_in_checkpoints_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[Any, ...]] = []

    def create_model(store: ModelStore, name: str, source: Path, family: str | None, prediction: str | None) -> None:
        calls.append((name, source, family, prediction))
        store.model(name).save_config(TrainingConfig(model_family=family or "sd1"))

    fake_module(monkeypatch, "dreambooth.models.loading", create_model=create_model)
    checkpoints = layout_of(tmp_path).ensure().checkpoints_dir
    (checkpoints / "base768.safetensors").write_bytes(b"")
    assert run_cli(tmp_path, "create", "--name", "a", "--from", "base768", "--family", "sd2v", "--v-prediction") == 0
    assert run_cli(tmp_path, "create", "--name", "b", "--from", str(checkpoints / "base768.safetensors")) == 0
    assert calls == [("a", checkpoints / "base768.safetensors", "sd2v", "v_prediction"),
                     ("b", checkpoints / "base768.safetensors", None, None)]


def test_subprocess_error_has_no_traceback(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for args, status in ((["config", "--name", "ghost"], 1), (["config"], 2)):
        done = subprocess.run([sys.executable, "-m", "dreambooth", "--data-dir", str(tmp_path), *args],
                              capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
        assert done.returncode == status
        assert "Traceback" not in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and done.stderr.startswith("error: ")


# --- end to end on a tiny model ----------------------------------------------------------------

def test_demo_create_export_list_config_train(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors.torch import load_file

    assert run_cli(tmp_path, "demo-model", "--family", "sd1") == 0
    checkpoints = layout_of(tmp_path).checkpoints_dir
    demo = checkpoints / "demo-sd1.safetensors"
    assert demo.is_file()
    assert run_cli(tmp_path, "create", "--name", "tiny", "--from", demo.name) == 0
    assert run_cli(tmp_path, "export", "--name", "tiny", "--precision", "fp32",
                   "--out", str(tmp_path / "out.safetensors")) == 0
    original, exported = load_file(str(demo)), load_file(str(tmp_path / "out.safetensors"))
    assert set(original) == set(exported)
    assert all(original[key].dtype == exported[key].dtype and original[key].equal(exported[key]) for key in original)
    assert run_cli(tmp_path, "export", "--name", "tiny", "--precision", "fp16") == 0
    assert {t.dtype for t in load_file(str(checkpoints / "tiny.safetensors")).values()} >= {__import__("torch").float16}
    capsys.readouterr()
    assert run_cli(tmp_path, "list") == 0
    assert capsys.readouterr().out.splitlines()[1].split("\t")[:3] == ["tiny", "sd1", "dreambooth"]
    train_one_step(tmp_path, "tiny")


def train_one_step(tmp_path: Path, name: str) -> None:
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    for index in range(2):
        Image.new("RGB", (64, 64), (90 * index, 60, 30)).save(images / f"{index}.png")
    assert run_cli(tmp_path, "config", "--name", name, "--set", "resolution=64", "bucket_min_resolution=64",
                   "with_prior_preservation=false", "mixed_precision=no", f"concepts.0.instance_data_dir={images}",
                   "concepts.0.instance_prompt=photo of sks thing") == 0
    assert run_cli(tmp_path, "train", "--name", name, "--max-train-steps", "1", "--save-on-end", "false",
                   "--set", "concepts.0.instance_prompt=a sks thing") == 0
    saved = ModelStore(layout_of(tmp_path)).existing(name).load_config()
    # Flags apply to that run only.
    assert saved.max_train_steps == 0 and saved.concepts[0].instance_prompt == "photo of sks thing"


def test_repeated_set_flags_all_apply(tmp_path):
    """`--set a=1 --set b=2` keeps both assignments (argparse would otherwise keep only the last flag)."""
    from dreambooth.cli import build_parser

    args = build_parser().parse_args(["config", "--name", "m", "--set", "resolution=64", "--set", "seed=3"])
    assert args.set == ["resolution=64", "seed=3"]


# --- a model's settings across imports and edits -----------------------------------------------

def test_seed_beyond_any_rng_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_model(tmp_path)
    assert run_cli(tmp_path, "config", "--name", "dog", "--set", f"seed={2**64}") == 1
    line = one_error_line(capsys)
    assert "'seed'" in line and str(2**64) in line and "4294967295" in line
    assert run_cli(tmp_path, "train", "--name", "dog", "--seed", str(2**64)) == 2
    assert "'seed'" in one_error_line(capsys)


def test_partial_import_of_our_format_merges(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_model(tmp_path, seed=77, learning_rate=3e-6, model_family="sdxl", resolution=1024)
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"version": 3, "learning_rate": 1e-5, "model_family": "sd1"}))
    assert run_cli(tmp_path, "config", "--name", "dog", "--import", str(partial)) == 0
    saved = ModelStore(layout_of(tmp_path)).existing("dog").load_config()
    assert (saved.learning_rate, saved.seed, saved.resolution, saved.model_family) == (1e-5, 77, 1024, "sdxl")
    assert len(saved.concepts) == 1
    assert "model_family" in capsys.readouterr().err  # the refused identity change is reported
    assert run_cli(tmp_path, "config", "--name", "dog", "--import", str(partial), "--replace") == 0
    replaced = ModelStore(layout_of(tmp_path)).existing("dog").load_config()
    assert (replaced.learning_rate, replaced.seed, replaced.model_family) == (1e-5, TrainingConfig().seed, "sdxl")


def test_import_never_empties_concepts_silently(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_model(tmp_path)
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    assert run_cli(tmp_path, "config", "--name", "dog", "--import", str(empty)) == 1
    assert "empty" in one_error_line(capsys)
    old = tmp_path / "db_config.json"
    old.write_text(json.dumps({"learning_rate": 4e-6, "concepts_list": []}))
    assert run_cli(tmp_path, "config", "--name", "dog", "--import", str(old)) == 0
    assert "kept the model's 1 concept" in capsys.readouterr().err
    saved = ModelStore(layout_of(tmp_path)).existing("dog").load_config()
    assert saved.learning_rate == 4e-6 and saved.concepts[0].instance_prompt == "photo of sks dog"


def test_identity_changes_only_through_set_identity(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_model(tmp_path)
    assert run_cli(tmp_path, "config", "--name", "dog", "--set", "prediction_type=v_prediction") == 1
    assert "--set-identity" in one_error_line(capsys)
    assert run_cli(tmp_path, "train", "--name", "dog", "--set", "model_family=sdxl") == 1
    assert "--set-identity" in one_error_line(capsys)
    assert run_cli(tmp_path, "config", "--name", "dog", "--set-identity", "prediction_type=v_prediction") == 0
    assert ModelStore(layout_of(tmp_path)).existing("dog").load_config().prediction_type == "v_prediction"
    capsys.readouterr()
    assert run_cli(tmp_path, "config", "--name", "dog", "--set-identity", "prediction_type=x_prediction") == 1
    assert "prediction_type" in one_error_line(capsys)
    assert run_cli(tmp_path, "config", "--name", "dog", "--set-identity", "learning_rate=1") == 1
    assert "not an identity field" in one_error_line(capsys)


def test_a_cli_run_prints_each_warning_once_and_no_third_party_noise(tmp_path: Path) -> None:
    """Warnings reach the user through the run's callbacks; the log must not print them a second time, and
    progress bars and notices of the libraries (nothing the user can act on) stay out of the output."""
    from PIL import Image

    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    for name in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS"):
        env.pop(name, None)
    images = tmp_path / "images"
    images.mkdir()
    for index in range(2):
        Image.new("RGB", (64, 64), (90 * index, 60, 30)).save(images / f"{index}.png")
    output = ""
    for args in (["demo-model", "--family", "sd1"], ["create", "--name", "tiny", "--from", "demo-sd1.safetensors"],
                 ["config", "--name", "tiny", "--set", "resolution=64", "bucket_min_resolution=64",
                  "with_prior_preservation=false", f"concepts.0.instance_data_dir={images}", "sample_every_n_steps=0",
                  "concepts.0.instance_prompt=photo of sks thing", "max_train_steps=1", "save_every_n_steps=5"],
                 ["train", "--name", "tiny"]):
        done = subprocess.run([sys.executable, "-m", "dreambooth", "--data-dir", str(tmp_path), *args],
                              capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
        assert done.returncode == 0, done.stderr
        output += done.stdout + done.stderr
    warning = "'save_every_n_steps' is 5 but the run is 1 steps"
    assert output.count(warning) == 1, output
    for noise in ("should be kept in float32", "Loading weights", "Writing model shards", "it/s]"):
        assert noise not in output, output


def test_third_party_quiet_restores_what_it_changed() -> None:
    import logging
    import warnings

    from dreambooth.quiet import NOISY_WARNING_MODULES, third_party_quiet

    pytest.importorskip("diffusers.utils.logging")  # importing a library sets its logger's level: do it first
    pytest.importorskip("transformers.utils.logging")
    levels = {name: logging.getLogger(name).level for name in ("diffusers", "transformers", "bitsandbytes")}
    with third_party_quiet():
        assert logging.getLogger("bitsandbytes").getEffectiveLevel() == logging.ERROR
        with third_party_quiet():  # nested: the outer block stays quiet after the inner one ends
            pass
        assert logging.getLogger("diffusers.models.modeling_utils").getEffectiveLevel() == logging.ERROR
    assert not [f for f in warnings.filters if getattr(f[3], "pattern", None) == NOISY_WARNING_MODULES]
    assert {name: logging.getLogger(name).level for name in levels} == levels
