"""install.py: no pip call when satisfied, only missing packages, host-owned packages never touched."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"_dreambooth_{name}", ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


install = load("install")

A1111_HOST = {"torch": "2.1.2", "torchvision": "0.16.2", "gradio": "3.41.2", "transformers": "4.30.2",
              "accelerate": "0.21.0", "numpy": "1.26.2", "safetensors": "0.4.2", "xformers": None}
OURS_INSTALLED = {"diffusers": "0.31.0", "peft": "0.13.2", "prodigyopt": "1.1.2", "schedulefree": "1.4",
                  "bitsandbytes": "0.45.0"}


class Recorder:
    def __init__(self, result: int = 0):
        self.calls: list[list[str]] = []
        self.constraints: list[str] = []
        self.result = result

    def __call__(self, args: list[str]) -> int:
        self.calls.append(args)
        self.constraints.append(Path(args[args.index("--constraint") + 1]).read_text())
        return self.result


def requested(recorder: Recorder) -> list[str]:
    return [arg for call in recorder.calls for arg in call[4:]]


def test_no_pip_call_when_everything_is_satisfied(capsys):
    runner = Recorder()
    assert install.main(runner, {**A1111_HOST, **OURS_INSTALLED}, platform="linux") == 0
    assert runner.calls == [] and capsys.readouterr().out == ""


def test_no_pip_call_in_this_environment():
    runner = Recorder()
    install.main(runner, platform="linux")  # both test environments carry every package we need
    assert runner.calls == []


def test_missing_diffusers_on_a_transformers_4_host():
    runner = Recorder()
    versions = {**A1111_HOST, **OURS_INSTALLED, "diffusers": None}
    assert install.main(runner, versions, platform="linux") == 0
    assert requested(runner) == ["diffusers<=0.31.0"]
    text = " ".join(runner.calls[0])
    for owned in ("torch", "gradio", "transformers", "accelerate"):
        assert owned not in text.split("--constraint")[0] and f" {owned}" not in " ".join(runner.calls[0][4:])
    pins = runner.constraints[0].splitlines()
    assert "torch==2.1.2" in pins and "transformers==4.30.2" in pins and "gradio==3.41.2" in pins
    assert not any(pin.startswith("xformers") for pin in pins)  # not installed: nothing to pin


def test_missing_peft_on_a_new_host_is_not_capped():
    runner = Recorder()
    versions = {**A1111_HOST, "transformers": "5.2.0", **OURS_INSTALLED, "peft": None}
    install.main(runner, versions, platform="linux")
    assert requested(runner) == ["peft>=0.13.2"]


def test_optional_packages_install_one_by_one_and_failures_only_warn(capsys):
    runner = Recorder(result=1)
    versions = {**A1111_HOST, **OURS_INSTALLED, "prodigyopt": None, "bitsandbytes": None}
    assert install.main(runner, versions, platform="linux") == 0
    assert [call[4:] for call in runner.calls] == [["prodigyopt>=1.0"], ["bitsandbytes>=0.43.0"]]
    assert "8-bit optimizers will be unavailable" in capsys.readouterr().out


def test_installed_packages_are_never_changed_only_missing_dependencies_added():
    """pip resolves dependencies of installed packages too (under SD.Next it upgraded the setuptools SD.Next pins,
    because torch asks for a newer one): every call is --no-deps, and missing dependencies follow by name."""
    runner = Recorder()
    declared = {"bitsandbytes": ["numpy>=1.17", "packaging>=20.9", "torch<3,>=2.3", "newdep>=2",
                                 "pytest; extra == 'test'", "winonly; sys_platform == 'win32'"],
                "newdep": ["setuptools>=77", "leafdep"]}
    present = {"numpy": "1.26.2", "packaging": "24.0", "setuptools": "69.5.1"}
    versions = {**A1111_HOST, **OURS_INSTALLED, "bitsandbytes": None}
    install.main(runner, versions, platform="linux", requires=lambda name: declared.get(name, []),
                 version_of=present.get)
    assert all(call[:2] == ["install", "--no-deps"] for call in runner.calls)
    assert [call[4:] for call in runner.calls] == [["bitsandbytes>=0.43.0"], ["newdep>=2"], ["leafdep"]]


def test_missing_dependencies_skip_host_owned_and_normalise_names():
    declared = {"x": ["Huggingface_Hub>=0.2", "My.Package>=1", "my-package>=1"]}
    found = install.missing_dependencies(["x"], lambda name: declared.get(name, []), lambda name: None)
    assert found == ["My.Package>=1"]
    assert install.requirement_name("diffusers<=0.31.0") == "diffusers"
    assert install.requirement_name("bitsandbytes>=0.43.0") == "bitsandbytes"


def test_bitsandbytes_is_not_requested_on_macos():
    runner = Recorder()
    install.main(runner, {**A1111_HOST, **OURS_INSTALLED, "bitsandbytes": None}, platform="darwin")
    assert runner.calls == []


def test_forge_keeps_its_own_bitsandbytes_pin():
    """Forge installs bitsandbytes 0.45.3 itself at start-up: we never request it and pin the installed one."""
    runner = Recorder()
    versions = {**A1111_HOST, **OURS_INSTALLED, "bitsandbytes": None, "prodigyopt": None}
    install.main(runner, versions, platform="linux", forge=True)
    assert requested(runner) == ["prodigyopt>=1.0"]
    runner = Recorder()
    install.main(runner, {**versions, "bitsandbytes": "0.45.3"}, platform="linux", forge=True)
    assert "bitsandbytes==0.45.3" in runner.constraints[0].splitlines()


def test_forge_is_detected_from_modules_forge_and_its_backend_on_the_path(tmp_path, monkeypatch):
    for name in ("modules_forge", "backend"):
        monkeypatch.delitem(sys.modules, name, raising=False)  # a fake Forge of another test
    monkeypatch.setattr(sys, "path", [entry for entry in sys.path if "fake_forge" not in entry])
    assert install.host_is_forge() is False
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "modules_forge").mkdir()
    (tmp_path / "modules_forge" / "__init__.py").write_text("")
    assert install.host_is_forge() is False  # Forge Classic: no bitsandbytes pin of its own
    (tmp_path / "backend").mkdir()
    (tmp_path / "backend" / "__init__.py").write_text("")
    assert install.host_is_forge() is True


def test_wrong_installed_version_is_only_reported(capsys):
    runner = Recorder()
    install.main(runner, {**A1111_HOST, **OURS_INSTALLED, "diffusers": "0.27.2"}, platform="linux")
    assert runner.calls == [] and "diffusers 0.27.2 is installed" in capsys.readouterr().out


def test_host_owned_packages_are_never_requested_even_when_missing():
    runner = Recorder()
    versions = {name: None for name in install.HOST_OWNED} | OURS_INSTALLED | {"safetensors": "0.4.2"}
    install.main(runner, versions, platform="linux")
    assert runner.calls == []


@pytest.mark.parametrize("version, specifier, expected", [("0.31.0", ">=0.31.0", True), ("0.30.9", ">=0.31.0", False),
                                                          ("1.0+local", ">=0.5", True), ("weird", ">=1", True)])
def test_satisfies(version, specifier, expected):
    assert install.satisfies(version, specifier) is expected


def test_preload_adds_path_flags():
    preload = load("preload")
    parser = argparse.ArgumentParser()
    preload.preload(parser)
    options = parser.parse_args(["--dreambooth-models-path", "/m", "--dreambooth-data-roots", "/a:/b"])
    assert options.dreambooth_models_path == "/m" and options.dreambooth_data_roots == "/a:/b"
    assert parser.parse_args([]).dreambooth_models_path is None
