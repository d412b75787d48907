"""Each pre-flight check fires on its bad config and stays quiet on a good one."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from dreambooth.config.schema import Concept, TrainingConfig
from dreambooth.errors import ConfigError
from dreambooth.guide.preflight import Finding, count_images, preflight, raise_on_errors, run_steps


def make_images(folder: Path, count: int) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        (folder / f"img{index}.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (folder / "img0.txt").write_text("a caption")  # captions are not images
    return str(folder)


@pytest.fixture
def good(tmp_path: Path) -> TrainingConfig:
    """A config that passes every check."""
    concept = Concept(instance_data_dir=make_images(tmp_path / "instance", 4), instance_prompt="photo of sks dog",
                      class_prompt="photo of a dog", num_class_images=50)
    return TrainingConfig(concepts=[concept], mixed_precision="bf16", attention="sdpa", max_train_steps=400,
                          save_every_n_steps=100)


def about(findings: list[Finding], setting: str) -> list[Finding]:
    return [finding for finding in findings if setting in finding.settings]


def test_good_config_is_clean(good: TrainingConfig) -> None:
    assert preflight(good, device="cpu") == []
    raise_on_errors(preflight(good))


@pytest.mark.parametrize("cause", [{"train_text_encoder": True}, {"shuffle_tags": True}, {"caption_dropout": 0.1}])
def test_text_encoder_cache_conflicts(good: TrainingConfig, cause: dict) -> None:
    frozen = dataclasses.replace(good, cache_text_encoder_outputs="on", train_text_encoder=False)
    assert not about(preflight(frozen), "cache_text_encoder_outputs")
    automatic = dataclasses.replace(frozen, cache_text_encoder_outputs="auto", **cause)
    assert not about(preflight(automatic), "cache_text_encoder_outputs")  # auto just encodes every step
    findings = about(preflight(dataclasses.replace(frozen, **cause)), "cache_text_encoder_outputs")
    assert len(findings) == 1 and findings[0].level == "error"
    name = next(iter(cause))
    assert name in findings[0].settings and f"'{name}'" in findings[0].message


def test_fp16_and_xformers_on_cpu(good: TrainingConfig) -> None:
    bad = dataclasses.replace(good, mixed_precision="fp16", attention="xformers")
    on_cpu = preflight(bad, device="cpu")
    assert about(on_cpu, "mixed_precision")[0].level == "error"
    assert about(on_cpu, "attention")[0].level == "warning"
    assert not about(preflight(bad, device="cuda"), "mixed_precision")
    assert not about(preflight(bad, device="cuda"), "attention")


def test_latent_cache_with_random_crop(good: TrainingConfig) -> None:
    bad = dataclasses.replace(good, cache_latents="disk", random_crop=True)
    finding = about(preflight(bad), "random_crop")
    assert finding and "cache_latents" in finding[0].settings
    assert not about(preflight(dataclasses.replace(bad, cache_latents="off")), "random_crop")
    # A horizontal flip is no conflict (the cache holds both orientations).
    assert not about(preflight(dataclasses.replace(good, cache_latents="memory", hflip=True)), "cache_latents")


def test_resolution_multiples(good: TrainingConfig) -> None:
    no_buckets = dataclasses.replace(good, enable_bucketing=False, resolution=516)
    assert "516 -> 512" in about(preflight(no_buckets), "resolution")[0].message
    assert not about(preflight(dataclasses.replace(no_buckets, resolution=520)), "resolution")
    buckets = dataclasses.replace(good, enable_bucketing=True, resolution=520)
    assert "multiples of 64" in about(preflight(buckets), "resolution")[0].message
    extra = dataclasses.replace(good, enable_bucketing=True, extra_resolutions="768, 900")
    assert "900" in about(preflight(extra), "resolution")[0].message
    assert not about(preflight(dataclasses.replace(extra, extra_resolutions="768, 896")), "resolution")


def test_empty_missing_and_unreadable_concepts(good: TrainingConfig, tmp_path: Path) -> None:
    def concept_errors(folder: str) -> list[Finding]:
        concept = dataclasses.replace(good.concepts[0], instance_data_dir=folder)
        return about(preflight(dataclasses.replace(good, concepts=[concept])), "instance_data_dir")

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    assert "no images" in concept_errors(str(empty))[0].message
    assert "does not exist" in concept_errors(str(tmp_path / "missing"))[0].message
    assert "empty" in concept_errors("")[0].message
    assert about(preflight(dataclasses.replace(good, concepts=[])), "concepts")
    assert not concept_errors(good.concepts[0].instance_data_dir)
    if os.name == "posix" and os.geteuid() != 0:
        locked = Path(make_images(tmp_path / "locked", 2))
        locked.chmod(0)
        try:
            assert "cannot be read" in concept_errors(str(locked))[0].message
        finally:
            locked.chmod(0o755)


def test_dataset_info_replaces_listing(good: TrainingConfig) -> None:
    folder = good.concepts[0].instance_data_dir
    assert about(preflight(good, dataset_info={folder: 0}), "instance_data_dir")
    assert count_images(folder) == 4


def test_kohya_style_parent_folder_counts(good: TrainingConfig, tmp_path: Path) -> None:
    parent = tmp_path / "kohya"
    make_images(parent / "10_sks dog", 3)
    make_images(parent / "notes", 2)  # not an 'N_' folder: not a concept
    assert count_images(str(parent)) == 3
    concept = dataclasses.replace(good.concepts[0], instance_data_dir=str(parent))
    assert not about(preflight(dataclasses.replace(good, concepts=[concept])), "instance_data_dir")


def test_prior_preservation_needs_class_source(good: TrainingConfig) -> None:
    concept = dataclasses.replace(good.concepts[0], class_prompt="", class_data_dir="")
    bad = dataclasses.replace(good, concepts=[concept])
    finding = about(preflight(bad), "with_prior_preservation")
    assert finding[0].level == "error" and "class_prompt" in finding[0].settings
    assert not about(preflight(dataclasses.replace(bad, with_prior_preservation=False)), "with_prior_preservation")
    assert not about(preflight(dataclasses.replace(bad, method="finetune")), "with_prior_preservation")
    zero = dataclasses.replace(good, concepts=[dataclasses.replace(good.concepts[0], num_class_images=0)])
    assert about(preflight(zero), "num_class_images")[0].level == "warning"


def test_more_class_images_than_can_be_made(good: TrainingConfig, tmp_path: Path) -> None:
    class_dir = make_images(tmp_path / "class", 10)
    concept = dataclasses.replace(good.concepts[0], class_prompt="", class_data_dir=class_dir, num_class_images=50)
    bad = dataclasses.replace(good, concepts=[concept])
    finding = about(preflight(bad), "num_class_images")
    assert finding and "holds 10" in finding[0].message and "to 10" in finding[0].message
    enough = dataclasses.replace(concept, num_class_images=10)
    assert not about(preflight(dataclasses.replace(good, concepts=[enough])), "num_class_images")
    can_generate = dataclasses.replace(concept, class_prompt="photo of a dog")
    assert not about(preflight(dataclasses.replace(good, concepts=[can_generate])), "num_class_images")


def test_steps_and_epochs_both_zero(good: TrainingConfig) -> None:
    bad = dataclasses.replace(good, max_train_steps=0, num_train_epochs=0, save_every_n_steps=0)
    assert about(preflight(bad), "num_train_epochs")[0].level == "error"
    assert not about(preflight(dataclasses.replace(bad, num_train_epochs=10)), "num_train_epochs")


def test_save_interval_longer_than_run(good: TrainingConfig) -> None:
    bad = dataclasses.replace(good, save_every_n_steps=500)
    finding = about(preflight(bad), "save_every_n_steps")
    assert finding[0].level == "warning" and "400" in finding[0].message
    assert about(preflight(dataclasses.replace(bad, save_on_end=False)), "save_every_n_steps")[0].level == "error"
    # Epoch-based runs: 4 images, batch 1 -> 4 steps per epoch, 10 epochs = 40 steps.
    by_epochs = dataclasses.replace(good, max_train_steps=0, num_train_epochs=10, save_every_n_steps=50,
                                    save_every_n_epochs=20)
    assert run_steps(by_epochs, None) == 40
    assert about(preflight(by_epochs), "save_every_n_steps") and about(preflight(by_epochs), "save_every_n_epochs")
    fine = dataclasses.replace(by_epochs, save_every_n_steps=20, save_every_n_epochs=5)
    assert not about(preflight(fine), "save_every_n_steps") and not about(preflight(fine), "save_every_n_epochs")


def test_sample_prompt_flags(good: TrainingConfig) -> None:
    ok = "a sks dog on a beach --n blurry, lowres --w 512 --h 768 --d -1 --l 7.5 --s 20\nplain prompt"
    assert not about(preflight(dataclasses.replace(good, sample_prompts=ok)), "sample_prompts")
    bad = dataclasses.replace(good, sample_prompts="plain\na dog --cfg 7 --w 512")
    finding = about(preflight(bad), "sample_prompts")
    assert len(finding) == 1 and "line 2" in finding[0].message and "--cfg" in finding[0].message
    not_number = dataclasses.replace(good, sample_prompts="a dog --w wide")
    assert "needs a number" in about(preflight(not_number), "sample_prompts")[0].message


def test_raise_on_errors_lists_every_error(good: TrainingConfig) -> None:
    bad = dataclasses.replace(good, max_train_steps=0, num_train_epochs=0, mixed_precision="fp16",
                              attention="xformers", save_every_n_steps=0)
    findings = preflight(bad, device="cpu")
    with pytest.raises(ConfigError) as raised:
        raise_on_errors(findings)
    text = str(raised.value)
    assert "mixed_precision" in text and "num_train_epochs" in text and "xformers" not in text


# --- one list of image types -----------------------------------------------------------------------

def test_preflight_and_scanner_accept_the_same_image_types(tmp_path: Path) -> None:
    """A folder of .tif and .gif images (and one of every listed type) passes pre-flight and trains."""
    from PIL import Image

    from dreambooth.imagefiles import IMAGE_EXTENSIONS, MASK_SUFFIX
    from dreambooth.train.data import scan_dataset

    folder = tmp_path / "odd"
    folder.mkdir()
    for index, extension in enumerate(IMAGE_EXTENSIONS):
        Image.new("RGB", (64, 64), (40 * index, 90, 160)).save(folder / f"image{index}{extension}")
    Image.new("L", (64, 64), 255).save(folder / f"image0{MASK_SUFFIX}")  # a mask is no image of its own
    (folder / "notes.txt").write_text("not an image")
    concept = Concept(instance_data_dir=str(folder), instance_prompt="photo of sks thing")
    config = TrainingConfig(concepts=[concept], resolution=64, bucket_min_resolution=64, cache_latents="off",
                            with_prior_preservation=False)
    scanned = scan_dataset(config).instance
    assert count_images(str(folder)) == len(scanned) == len(IMAGE_EXTENSIONS)
    assert {".tif", ".gif"} <= {record.path.suffix for record in scanned}
    assert not about(preflight(config), "instance_data_dir")


def test_tiny_and_extreme_images_are_counted_before_training(good: TrainingConfig, tmp_path: Path) -> None:
    from PIL import Image

    folder = tmp_path / "sizes"
    folder.mkdir()
    for name, size in {"ok.png": (512, 512), "one.png": (1, 1), "small.png": (16, 16), "wide.png": (10000, 10),
                       "fine-wide.png": (1024, 512)}.items():
        Image.new("RGB", size).save(folder / name)
    config = dataclasses.replace(good, concepts=[dataclasses.replace(good.concepts[0], instance_data_dir=str(folder))],
                                 resolution=512)
    findings = [f for f in preflight(config) if f.level == "warning"]
    small = [f.message for f in findings if "far below the training resolution 512 px" in f.message]
    extreme = [f.message for f in findings if "extreme aspect ratio" in f.message]
    assert len(small) == 1 and small[0].startswith("Concept 1: 3 of 5 image(s)") and "one.png" in small[0]
    assert len(extreme) == 1 and "1 of 5 image(s)" in extreme[0] and "wide.png at 10000x10" in extreme[0]
    assert all("resolution" in f.settings for f in findings if f.message in small + extreme)


def test_epoch_length_counts_the_repeats_of_kohya_folder_names(good: TrainingConfig, tmp_path: Path) -> None:
    """As the scan trains them: a parent of '10_sks dog' (3 images) and '2_ohwx cat' (1) is 32 images an epoch;
    a concept pointed at a '5_zwx dog' folder itself (2 images) is 10."""
    parent = tmp_path / "kohya"
    make_images(parent / "10_sks dog", 3)
    make_images(parent / "2_ohwx cat", 1)
    make_images(tmp_path / "5_zwx dog", 2)
    epochs = dataclasses.replace(good, max_train_steps=0, num_train_epochs=2, train_batch_size=1)
    parent_run = dataclasses.replace(epochs, concepts=[dataclasses.replace(good.concepts[0],
                                                                           instance_data_dir=str(parent))])
    assert run_steps(parent_run, None) == 2 * 32
    own = dataclasses.replace(epochs, concepts=[dataclasses.replace(good.concepts[0],
                                                                    instance_data_dir=str(tmp_path / "5_zwx dog"))])
    assert run_steps(own, None) == 2 * 10


def test_epoch_length_counts_images_not_their_masks(tmp_path: Path) -> None:
    """A masked dataset holds NAME.png beside NAME-masklabel.png; only the images make the epoch."""
    from PIL import Image

    from dreambooth.guide.preflight import images_per_epoch
    from dreambooth.imagefiles import MASK_SUFFIX

    folder = tmp_path / "masked"
    folder.mkdir()
    for index in range(3):
        Image.new("RGB", (64, 64)).save(folder / f"img{index}.PNG")
        Image.new("L", (64, 64), 255).save(folder / f"img{index}{MASK_SUFFIX}")
    concept = Concept(instance_data_dir=str(folder), instance_prompt="photo of sks thing", repeats=2)
    assert images_per_epoch(concept, None) == 6


def test_resolution_limits_and_multiples_come_from_the_family(good: TrainingConfig, monkeypatch) -> None:
    """Pre-flight reads each family's native resolution, range and pixel multiple from its unit."""
    import importlib

    from dreambooth.families import get_family

    preflight_module = importlib.import_module("dreambooth.guide.preflight")  # the package exports the function

    sdxl = dataclasses.replace(good, model_family="sdxl", resolution=384, enable_bucketing=False)
    finding = about(preflight(sdxl), "resolution")
    assert len(finding) == 1 and finding[0].level == "warning"
    assert "SDXL works between 512 and 2048 px (native 1024)" in finding[0].message and "384" in finding[0].message
    assert not about(preflight(dataclasses.replace(sdxl, resolution=1024)), "resolution")
    assert about(preflight(dataclasses.replace(good, resolution=1536)), "resolution")[0].level == "warning"
    # A family whose latents are patched in 2x2 (an MMDiT) needs multiples of 16.
    patched = dataclasses.replace(get_family("sd1"), pixel_multiple=16)
    monkeypatch.setattr(preflight_module, "get_family", lambda name: patched)
    message = about(preflight(dataclasses.replace(good, enable_bucketing=False, resolution=520)), "resolution")
    assert "multiples of 16 for SD 1.x: change 520 -> 512" in message[0].message


def test_a_model_of_its_own_size_is_checked_against_its_own_native_resolution(good: TrainingConfig,
                                                                              tmp_path: Path) -> None:
    """A small model (the demo's, the shapes world's) says its native size in its configs: 64 px is right for
    it, not outside SD 1.x's range; a resolution far from its own size is still warned about."""
    from dreambooth.guide.preflight import model_native_resolution
    from dreambooth.models.components import save_components
    from dreambooth.models.tiny import tiny_components

    working = save_components(tiny_components("sd1", seed=0), tmp_path / "working")
    native = model_native_resolution(working, "sd1")
    unet_size = tiny_components("sd1", seed=0).denoiser.config.sample_size
    assert native is not None and native != 512 and native % unet_size == 0
    small = dataclasses.replace(good, resolution=native, enable_bucketing=False)
    assert about(preflight(small), "resolution")  # against the family's range: warned
    assert not about(preflight(small, native=native), "resolution")
    far = about(preflight(dataclasses.replace(small, resolution=native * 8), native=native), "resolution")
    assert far and f"native {native}" in far[0].message
    assert model_native_resolution(tmp_path / "missing", "sd1") is None
