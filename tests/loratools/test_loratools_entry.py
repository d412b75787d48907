"""The LoRA tools through the CLI and the REST API, on a tiny demo checkpoint in a temporary host layout."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from lora_helpers import add_known_changes

from dreambooth import cli
from dreambooth.loratools.read import load_lora
from dreambooth.models.components import load_components, save_components
from dreambooth.models.loading import load_checkpoint
from dreambooth.service import TrainingService
from dreambooth.store import Layout, ModelStore
from dreambooth.train import lora

from fake_host import FakeHost


def build_world(root: Path, family: str) -> Any:
    """demo-FAMILY.safetensors in the checkpoints folder and model 'dog' whose working weights carry a known
    rank-2 change (LoCon convs included) on top of it."""
    assert cli.main(["--data-dir", str(root), "demo-model", "--family", family]) == 0
    assert cli.main(["--data-dir", str(root), "create", "--name", "dog", "--from", f"demo-{family}.safetensors"]) == 0
    layout = Layout.under(root / "models")
    model = ModelStore(layout).existing("dog")
    components = load_components(model.working)
    changes = add_known_changes(components, rank=2, with_conv=True)
    save_components(components, model.working)
    return SimpleNamespace(root=root, layout=layout, changes=changes, trained=components, family=family)


@pytest.fixture(scope="module")
def trained_world(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return build_world(tmp_path_factory.mktemp("lora-tools"), "sd1")


@pytest.fixture(scope="module", params=["sd1", "sd2v", "sdxl"])
def family_world(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    return build_world(tmp_path_factory.mktemp(f"lora-tools-{request.param}"), request.param)


def run(world: Any, *args: str) -> int:
    return cli.main(["--data-dir", str(world.root), *args])


def test_cli_extract_resize_merge(family_world: Any, capsys: pytest.CaptureFixture[str]) -> None:
    world = family_world
    assert run(world, "lora-extract", "--from", "model:dog", "--rank", "2", "--conv-rank", "2", "--out", "dog-x") == 0
    assert "retained 100.00%" in capsys.readouterr().out
    extracted = load_lora(world.layout.lora_dir / "dog-x.safetensors")
    assert extracted.modules.keys() == world.changes.keys()
    for key, change in world.changes.items():
        torch.testing.assert_close(extracted.modules[key].delta(), change, rtol=1e-4, atol=1e-5)
    assert extracted.metadata["dreambooth_tool"] == "extract" and extracted.metadata["ss_network_dim"] == "2"

    assert run(world, "lora-resize", "--lora", "dog-x.safetensors", "--dynamic", "energy:0.5") == 0
    resized = load_lora(world.layout.lora_dir / "dog-x-resized.safetensors")
    assert max(module.rank for module in resized.modules.values()) == 1

    assert run(world, "lora-merge", "--lora", "dog-x.safetensors", "--into", f"demo-{world.family}.safetensors",
               "--precision", "fp32", "--out", "dog-merged") == 0
    merged = load_checkpoint(world.layout.checkpoints_dir / "dog-merged.safetensors")
    for part, model in lora.model_parts(world.trained).items():
        for name, value in model.state_dict().items():
            got = lora.model_parts(merged)[part].state_dict()[name]
            torch.testing.assert_close(got, value, rtol=1e-4, atol=1e-5, msg=f"{part}.{name}")

    assert run(world, "lora-merge", "--lora", "dog-x.safetensors:0.5", "dog-x-resized.safetensors:0.5") == 0
    assert (world.layout.lora_dir / "dog-x-dog-x-resized-merged.safetensors").is_file()


def test_cli_errors_are_one_line(trained_world: Any, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(trained_world, "lora-resize", "--lora", "missing.safetensors") == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "missing.safetensors" in error[0]
    assert run(trained_world, "lora-resize", "--lora", "x", "--dynamic", "energy") == 2
    assert run(trained_world, "lora-extract", "--from", "model:dog", "--dynamic", "energy:3") == 1


def test_api_routes(trained_world: Any) -> None:
    fastapi = pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from dreambooth.ui.api import register_api

    layout = trained_world.layout
    store = ModelStore(layout)
    host = FakeHost(layout)
    service = TrainingService(host, store)
    app = fastapi.FastAPI()
    register_api(app, service, store)
    client = TestClient(app)
    answer = client.post("/dreambooth/lora/extract", json={"source": "model:dog", "rank_mode": "energy",
                                                          "rank_value": 0.999, "max_rank": 4, "out": "api-x"})
    assert answer.status_code == 201, answer.text
    assert answer.json()["report"]["total"] > 0.99 and Path(answer.json()["path"]).parent == layout.lora_dir
    resized = client.post("/dreambooth/lora/resize", json={"lora": "api-x.safetensors", "rank": 1})
    assert resized.status_code == 201 and 0 < resized.json()["report"]["total"] < 1
    merged = client.post("/dreambooth/lora/merge", json={"loras": [{"name": "api-x.safetensors", "weight": 0.3}],
                                                        "into": "demo-sd1.safetensors", "out": "api-merged"})
    assert merged.status_code == 201 and (layout.checkpoints_dir / "api-merged.safetensors").is_file()
    outside = client.post("/dreambooth/lora/resize", json={"lora": "../Stable-diffusion/demo-sd1.safetensors"})
    assert outside.status_code == 400 and "not inside" in outside.json()["detail"]
    assert client.post("/dreambooth/lora/merge", json={"loras": []}).status_code == 400
    assert service.status().state in ("finished", "failed") and not service.is_busy()


def test_tool_waits_for_the_gpu_slot(trained_world: Any) -> None:
    """A LoRA tool is refused (RunInProgress) while another GPU job holds the service."""
    from dreambooth.service import RunInProgress

    service = TrainingService(FakeHost(trained_world.layout), ModelStore(trained_world.layout))
    started, release = threading.Event(), threading.Event()

    def hold() -> None:
        started.set()
        release.wait(5)

    worker = threading.Thread(target=service.run_tool, args=("lora_merge", hold))
    worker.start()
    started.wait(5)
    with pytest.raises(RunInProgress):
        service.run_tool("lora_resize", lambda: None)
    release.set()
    worker.join(5)
    assert not service.is_busy()


def test_half_precision_merge_equals_the_fp32_merge_rounded(trained_world: Any,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint stored in fp16 merges into fp16 in its own precision (half the RAM: an SDXL merge beside a
    web UI's loaded SDXL on a 24 GiB machine) and gives the fp32 merge's weights, rounded once."""
    from safetensors.torch import load_file, save_file

    from dreambooth.loratools import jobs
    from dreambooth.models import loading

    world = trained_world
    demo = world.layout.checkpoints_dir / "demo-sd1.safetensors"
    tensors, metadata = loading.read_checkpoint(demo)
    save_file({key: value.half() if value.is_floating_point() else value for key, value in tensors.items()},
              str(world.layout.checkpoints_dir / "half.safetensors"), metadata=metadata)
    assert run(world, "lora-extract", "--from", "model:dog", "--rank", "2", "--conv-rank", "2", "--out", "h") == 0
    loaded: list[torch.dtype] = []

    def spy(*args: Any, **options: Any) -> Any:
        components = real_load_source(*args, **options)
        loaded.append(next(components.denoiser.parameters()).dtype)
        return components

    real_load_source = loading.load_source
    monkeypatch.setattr(loading, "load_source", spy)
    for precision in ("fp16", "fp32"):
        jobs.merge_to_checkpoint(world.layout, "half.safetensors", [("h.safetensors", 1.0)], f"m-{precision}",
                                 precision)
    assert loaded == [torch.float16, torch.float32]
    half = load_file(str(world.layout.checkpoints_dir / "m-fp16.safetensors"))
    wide = load_file(str(world.layout.checkpoints_dir / "m-fp32.safetensors"))
    assert half.keys() == wide.keys()
    changed = 0
    for key, value in wide.items():
        expected = value.half() if value.is_floating_point() else value
        assert torch.equal(half[key], expected), key
        changed += int(value.is_floating_point() and not torch.equal(half[key], tensors[key].half()))
    assert changed > 0  # the LoRA did change weights
