from __future__ import annotations

import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dreambooth.errors import ModelError
from dreambooth.models.components import load_components
from dreambooth.models.export import export_checkpoint
from dreambooth.models.loading import (
    create_model,
    detect_family,
    load_checkpoint,
    load_source,
    read_checkpoint,
)
from dreambooth.store import Layout, ModelStore


def test_detect_family(demo_files: dict[str, Path]) -> None:
    detected = {family: detect_family(read_checkpoint(path)[0]) for family, path in demo_files.items()}
    assert detected == {"sd1": "sd1", "sd2": "sd2", "sd2v": "sd2", "sdxl": "sdxl"}


def test_not_stable_diffusion_is_refused(tmp_path: Path) -> None:
    save_file({"lora_unet_down.weight": torch.ones(2)}, str(tmp_path / "lora.safetensors"))
    with pytest.raises(ModelError, match="not a Stable Diffusion checkpoint"):
        load_checkpoint(tmp_path / "lora.safetensors")


def test_truncated_safetensors_is_refused(demo_files: dict[str, Path], tmp_path: Path) -> None:
    data = demo_files["sd1"].read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="cut.safetensors"):
        load_checkpoint(tmp_path / "cut.safetensors")
    (tmp_path / "noise.safetensors").write_bytes(b"\x00\x01garbage")
    with pytest.raises(ModelError, match="noise.safetensors"):
        load_checkpoint(tmp_path / "noise.safetensors")
    with pytest.raises(ModelError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.safetensors")


class _Exploit:
    """Unpickling this object would create a marker file, proving code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def test_malicious_ckpt_is_refused_without_running(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    with open(tmp_path / "evil.ckpt", "wb") as handle:
        pickle.dump({"state_dict": {"x": _Exploit(marker)}}, handle)
    torch.save({"state_dict": {"w": torch.ones(1)}, "payload": _Exploit(marker)}, tmp_path / "evil2.ckpt")
    for name in ("evil.ckpt", "evil2.ckpt"):
        with pytest.raises(ModelError, match="never run"):
            load_checkpoint(tmp_path / name)
    assert not marker.exists()


def test_ckpt_loads_like_safetensors(demo_files: dict[str, Path], tmp_path: Path) -> None:
    tensors, _ = read_checkpoint(demo_files["sd1"])
    torch.save({"state_dict": tensors, "global_step": 470000}, tmp_path / "model.ckpt")
    assert read_checkpoint(tmp_path / "model.ckpt")[0].keys() == tensors.keys()
    # A .ckpt has no metadata, so the tiny demo needs its configs; the file still gets read safely.
    with pytest.raises(ModelError, match="UNet"):
        load_checkpoint(tmp_path / "model.ckpt")


def _strip_metadata(source: Path, target: Path) -> Path:
    tensors, metadata = read_checkpoint(source)
    keep = {"dreambooth_configs": metadata["dreambooth_configs"]}
    save_file(tensors, str(target), metadata=keep)
    return target


def test_v_prediction_from_yaml_metadata_or_caller(demo_files: dict[str, Path], tmp_path: Path) -> None:
    assert load_checkpoint(demo_files["sd2v"]).prediction_type == "v_prediction"  # metadata
    plain = _strip_metadata(demo_files["sd2v"], tmp_path / "plain.safetensors")
    assert load_checkpoint(plain).family == "sd2"  # nothing tells: epsilon, as A1111 defaults
    assert load_checkpoint(plain, prediction_type="v_prediction").family == "sd2v"  # the caller's choice
    assert load_checkpoint(plain, family="sd2v").prediction_type == "v_prediction"
    shutil.copy(demo_files["sd2v"].with_suffix(".yaml"), plain.with_suffix(".yaml"))
    assert load_checkpoint(plain).family == "sd2v"  # the yaml beside it


def test_family_mismatch_is_refused(demo_files: dict[str, Path]) -> None:
    with pytest.raises(ModelError, match="sdxl"):
        load_checkpoint(demo_files["sd1"], family="sdxl")


@pytest.mark.parametrize("family", ["sd1", "sd2v", "sdxl"])
def test_demo_create_export_round_trip(family: str, demo_files: dict[str, Path], tmp_path: Path) -> None:
    store = ModelStore(Layout.under(tmp_path / "models").ensure())
    model = create_model(store, "my-model", demo_files[family])
    config = model.load_config()
    assert (config.model_family, config.resolution) == (family, {"sd1": 512, "sd2v": 768, "sdxl": 1024}[family])
    assert config.prediction_type == ("v_prediction" if family == "sd2v" else "epsilon")
    assert config.base_checkpoint == str(demo_files[family])
    out = export_checkpoint(load_components(model.working), tmp_path / "exported.safetensors")
    original, _ = read_checkpoint(demo_files[family])
    exported, _ = read_checkpoint(out)
    assert exported.keys() == original.keys()
    for key, value in original.items():
        assert value.dtype == exported[key].dtype and torch.equal(value, exported[key]), key
    assert out.with_suffix(".yaml").exists() == (family == "sd2v")
    with pytest.raises(ModelError, match="already exists"):
        create_model(store, "my-model", demo_files[family])


def test_create_from_diffusers_folder(demo_files: dict[str, Path], tmp_path: Path) -> None:
    store = ModelStore(Layout.under(tmp_path / "models").ensure())
    first = create_model(store, "first", demo_files["sdxl"])
    plain = tmp_path / "plain-diffusers"
    shutil.copytree(first.working, plain)
    (plain / "family.json").unlink()  # any diffusers folder, not only ours
    (plain / "extras.safetensors").unlink()
    components = load_source(plain)
    assert components.family == "sdxl" and len(components.text_encoders) == 2
    second = create_model(store, "second", plain)
    assert second.load_config().model_family == "sdxl"
    with pytest.raises(ModelError, match="model_index.json"):
        load_source(tmp_path)


def test_failed_create_leaves_no_model(tmp_path: Path) -> None:
    store = ModelStore(Layout.under(tmp_path / "models").ensure())
    with pytest.raises(ModelError, match="does not exist"):
        create_model(store, "ghost", tmp_path / "missing.safetensors")
    assert store.names() == [] and not (store.layout.dreambooth_dir / "ghost").exists()


def test_architecture_mismatch_names_the_users_file_and_the_family(demo_files: dict[str, Path],
                                                                    tmp_path: Path) -> None:
    """Without its embedded configs the tiny demo file meets the real SD1 architecture: the error names the file
    and the family, not a temporary config folder, and ends on a whole word."""
    tensors, _ = read_checkpoint(demo_files["sd1"])
    save_file(tensors, str(tmp_path / "my-model.safetensors"))
    with pytest.raises(ModelError) as refused:
        load_checkpoint(tmp_path / "my-model.safetensors")
    message = str(refused.value)
    assert str(tmp_path / "my-model.safetensors") in message and "sd1 architecture" in message
    assert "dreambooth-configs-" not in message and "tmp" not in message.replace(str(tmp_path), "")
    assert re.search(r"weight [\w.]+ has shape \[[\d, ]+\] in the file, \[[\d, ]+\] in the model", message), message
    assert len(message) < 600


def test_a_checkpoint_with_only_ema_unet_weights_loads_them(demo_files: dict[str, Path], tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    from dreambooth.models.loading import ema_key

    tensors, metadata = read_checkpoint(demo_files["sd1"])
    unet_keys = [key for key in tensors if key.startswith("model.diffusion_model.")]
    ema_only = {key: value for key, value in tensors.items() if key not in unet_keys}
    ema_only.update({ema_key(key): tensors[key] for key in unet_keys})
    ema_only.update({"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(10)})
    save_file(ema_only, str(tmp_path / "ema.safetensors"), metadata=metadata)
    with caplog.at_level("WARNING"):
        loaded = load_checkpoint(tmp_path / "ema.safetensors")
    assert "only the EMA weights" in caplog.text
    reference = load_checkpoint(demo_files["sd1"])
    expected, got = reference.denoiser.state_dict(), loaded.denoiser.state_dict()
    assert all(torch.equal(expected[key], got[key]) for key in expected)
    del ema_only[ema_key(unet_keys[0])]
    save_file(ema_only, str(tmp_path / "cut.safetensors"), metadata=metadata)
    with pytest.raises(ModelError, match="only EMA UNet weights.*1 of them are missing"):
        load_checkpoint(tmp_path / "cut.safetensors")


@pytest.mark.parametrize("text", [
    "Error(s) in loading state_dict for UNet:\n\tsize mismatch for conv_in.weight: copying a param with shape "
    "torch.Size([32, 4, 3, 3]) from checkpoint, the shape in current model is torch.Size([320, 4, 3, 3]).\n\t" + "x" * 5000,
    "Cannot load because conv_in.weight expected shape tensor(..., device='meta', size=(320, 4, 3, 3)), but got "
    "torch.Size([32, 4, 3, 3]). If you want to instead overwrite randomly initialized weights, please ...",
    "Cannot load because conv_in.weight expected shape torch.Size([320, 4, 3, 3]), but got torch.Size([32, 4, 3, 3]).",
])
def test_mismatch_summary_reads_torch_and_both_diffusers_formats(text: str) -> None:
    from dreambooth.models.loading import mismatch_summary

    assert mismatch_summary(RuntimeError(text)) == ("weight conv_in.weight has shape [32, 4, 3, 3] in the file, "
                                                    "[320, 4, 3, 3] in the model")


def _cast_floats(source: Path, target: Path, dtype: torch.dtype, keep_fp32: str | None = None) -> Path:
    """`source` with every floating tensor cast to `dtype` (but `keep_fp32`), its metadata kept."""
    tensors, metadata = read_checkpoint(source)
    cast = {key: value.to(dtype) if value.is_floating_point() and key != keep_fp32 else value
            for key, value in tensors.items()}
    save_file(cast, str(target), metadata=metadata)
    return target


def _floating_dtypes(working: Path) -> set[torch.dtype]:
    """The precisions of the model parts' weights in a working folder."""
    from safetensors.torch import load_file

    parts = [path for path in working.rglob("*.safetensors") if path.name != "extras.safetensors"]  # kept as read
    return {value.dtype for path in parts for value in load_file(str(path)).values() if value.is_floating_point()}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_create_keeps_a_half_precision_file_in_its_precision(dtype: torch.dtype, demo_files: dict[str, Path],
                                                             tmp_path: Path) -> None:
    half = _cast_floats(demo_files["sdxl"], tmp_path / "half.safetensors", dtype)
    store = ModelStore(Layout.under(tmp_path / "models").ensure())
    model = create_model(store, "half", half)
    assert _floating_dtypes(model.working) == {dtype}  # half the memory and disk of float32, nothing lost
    created = load_components(model.working, torch.float32)
    wide = load_checkpoint(half, dtype=torch.float32)
    assert next(created.denoiser.parameters()).dtype == torch.float32  # training still gets float32
    for part, wanted in ((created.denoiser, wide.denoiser), (created.text_encoders[1], wide.text_encoders[1])):
        for (name, value), expected in zip(part.state_dict().items(), wanted.state_dict().values(), strict=True):
            assert torch.equal(value, expected), name


def test_create_keeps_float32_when_a_file_mixes_precisions(demo_files: dict[str, Path], tmp_path: Path) -> None:
    tensors, _ = read_checkpoint(demo_files["sdxl"])
    first_float = next(key for key, value in tensors.items() if value.is_floating_point())
    mixed = _cast_floats(demo_files["sdxl"], tmp_path / "mixed.safetensors", torch.float16, keep_fp32=first_float)
    store = ModelStore(Layout.under(tmp_path / "models").ensure())
    model = create_model(store, "mixed", mixed)
    assert _floating_dtypes(model.working) == {torch.float32}
