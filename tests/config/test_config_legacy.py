"""Import of the old DreamBooth extension's db_config.json / concepts_list.json and of our own JSON."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from dreambooth.config import io
from dreambooth.config.legacy import ImportResult, import_data, import_file, import_text
from dreambooth.config.schema import Concept, TrainingConfig
from dreambooth.errors import ConfigError


def write_json(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))
    return path


def make_images(folder: Path, count: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        (folder / f"{index}.png").write_bytes(b"png")
    (folder / "0.txt").write_text("a caption, not an image")
    return folder


def old_concept(**overrides: Any) -> dict[str, Any]:
    concept = {"instance_data_dir": "images/dog", "instance_prompt": "photo of sks dog", "instance_token": "sks",
               "class_token": "dog", "class_data_dir": "classes/dog", "class_prompt": "photo of a dog",
               "class_negative_prompt": "blurry", "num_class_images_per": 10, "class_guidance_scale": 6.0,
               "class_infer_steps": 30, "save_sample_prompt": "sks dog on a beach",
               "save_sample_negative_prompt": "ugly", "save_sample_template": "", "n_save_sample": 2,
               "sample_seed": 42, "save_guidance_scale": 8.0, "save_infer_steps": 25}
    concept.update(overrides)
    return concept


def model_base() -> TrainingConfig:
    return TrainingConfig(model_name="mine", model_family="sdxl", base_checkpoint="sdxl_base.safetensors",
                          prediction_type="epsilon", resolution=1024)


def messages_about(result: ImportResult, word: str) -> list[str]:
    return [m for m in result.messages if word in m]


def test_concepts_list_maps_every_concept_key(tmp_path: Path) -> None:
    make_images(tmp_path / "set" / "images" / "dog", 3)
    result = import_file(write_json(tmp_path / "set" / "concepts_list.json", [old_concept()]))
    concept = result.config.concepts[0]
    assert concept.instance_data_dir == str(tmp_path / "set" / "images" / "dog")
    assert concept.class_data_dir == str(tmp_path / "set" / "classes" / "dog")
    assert (concept.instance_prompt, concept.instance_token, concept.class_token) == ("photo of sks dog", "sks", "dog")
    assert (concept.class_prompt, concept.class_negative_prompt) == ("photo of a dog", "blurry")
    assert concept.num_class_images == 30  # 10 per instance image x 3 images
    assert (concept.class_guidance_scale, concept.class_infer_steps) == (6.0, 30)
    assert (concept.sample_prompt, concept.sample_negative_prompt) == ("sks dog on a beach", "ugly")
    assert (concept.n_samples, concept.sample_seed, concept.sample_guidance_scale, concept.sample_steps) == \
        (2, 42, 8.0, 25)
    assert result.config.with_prior_preservation


def test_concepts_list_keeps_the_models_identity_and_settings(tmp_path: Path) -> None:
    make_images(tmp_path / "images" / "dog", 1)
    base = model_base()
    base.learning_rate = 4e-6
    base.concepts = [Concept(instance_data_dir="/old")]
    result = import_file(write_json(tmp_path / "c.json", [old_concept(), old_concept(instance_prompt="x")]), base)
    assert [c.instance_prompt for c in result.config.concepts] == ["photo of sks dog", "x"]
    assert result.config.learning_rate == 4e-6 and result.config.model_family == "sdxl"
    assert base.concepts[0].instance_data_dir == "/old"  # the caller's config is not modified


def test_unknown_concept_key_is_reported_by_name(tmp_path: Path) -> None:
    make_images(tmp_path / "images" / "dog", 1)
    result = import_file(write_json(tmp_path / "c.json", [old_concept(sparkle=3)]))
    assert messages_about(result, "concepts[0].sparkle")
    assert messages_about(result, "save_sample_template")  # empty: listed as unset


def test_older_concept_keys(tmp_path: Path) -> None:
    make_images(tmp_path / "imgs", 2)
    concept = {"instance_data_dir": "imgs", "class_data_dir": "", "num_class_images": 50, "max_steps": 900,
               "file_prompt_contents": "Instance Token + Description"}
    result = import_file(write_json(tmp_path / "old.json", [concept]))
    imported = result.config.concepts[0]
    assert imported.num_class_images == 50 and imported.class_data_dir == ""
    assert imported.instance_prompt == "[filewords]"
    assert result.config.max_train_steps == 900
    assert messages_about(result, "concepts[0].max_steps")


def test_max_steps_of_a_second_concept_is_reported(tmp_path: Path) -> None:
    make_images(tmp_path / "a", 1)
    result = import_file(write_json(tmp_path / "c.json", [{"instance_data_dir": "a", "max_steps": -1},
                                                          {"instance_data_dir": "a", "max_steps": 300}]))
    assert result.config.max_train_steps == 0
    assert messages_about(result, "ignored: concepts[1].max_steps")


def test_no_class_images_turns_prior_preservation_off(tmp_path: Path) -> None:
    make_images(tmp_path / "a", 2)
    result = import_file(write_json(tmp_path / "c.json", [old_concept(instance_data_dir="a",
                                                                      num_class_images_per=0)]))
    assert not result.config.with_prior_preservation
    assert messages_about(result, "with_prior_preservation")


def db_config(**overrides: Any) -> dict[str, Any]:
    data = {"model_name": "theirs", "model_path": "/x/theirs", "src": "v1-5.ckpt", "v2": False, "revision": 1200,
            "epoch": 12, "learning_rate": 3e-6, "txt_learning_rate": 1e-6, "lr_scheduler": "cosine_with_restarts",
            "lr_warmup_steps": 100, "lr_cycles": 3, "train_batch_size": 2, "gradient_accumulation_steps": 4,
            "num_train_epochs": 150, "prior_loss_weight": 0.5, "resolution": 768, "mixed_precision": "fp16",
            "use_ema": True, "train_unet": True, "stop_text_encoder": 0.75, "seed": 99, "hflip": True,
            "use_lora": False, "lora_unet_rank": 8, "lora_txt_rank": 8, "lora_alpha": 4,
            "lora_learning_rate": 1e-4, "optimizer": "8bit AdamW", "attention": "xformers", "cache_latents": False,
            "half_model": True, "save_embedding_every": 25, "save_preview_every": 5, "save_safetensors": True,
            "save_ckpt_after": False, "tf32_enable": False, "gradient_checkpointing": True, "clip_skip": 2,
            "pad_tokens": False, "shuffle_tags": True, "offset_noise": 0.05, "max_token_length": 150,
            "adamw_weight_decay": 0.02, "train_imagic": False, "deterministic": True,
            "concepts_list": [old_concept()]}
    data.update(overrides)
    return data


def test_db_config_maps_settings(tmp_path: Path) -> None:
    make_images(tmp_path / "images" / "dog", 4)
    result = import_file(write_json(tmp_path / "db_config.json", db_config()), model_base())
    config = result.config
    expected = {"learning_rate": 3e-6, "text_encoder_lr": 1e-6, "lr_scheduler": "cosine_with_restarts",
                "lr_warmup_steps": 100, "lr_cycles": 3, "train_batch_size": 2, "gradient_accumulation_steps": 4,
                "num_train_epochs": 150, "prior_loss_weight": 0.5, "resolution": 768, "mixed_precision": "fp16",
                "use_ema": True, "train_unet": True, "train_text_encoder": True, "stop_text_encoder": 0.75,
                "seed": 99, "hflip": True, "method": "dreambooth", "lora_rank": 8, "lora_alpha": 4.0,
                "optimizer": "adamw_8bit", "attention": "xformers", "cache_latents": "off",
                "save_precision": "fp16", "save_every_n_epochs": 25, "save_on_end": False, "allow_tf32": False,
                "gradient_checkpointing": True, "clip_skip": 2, "pad_tokens": False, "shuffle_tags": True,
                "offset_noise": 0.05, "max_token_length": 150, "weight_decay": 0.02}
    assert {name: getattr(config, name) for name in expected} == expected
    assert config.concepts[0].num_class_images == 40


def test_db_config_keeps_identity_and_reports_the_rest_by_name(tmp_path: Path) -> None:
    make_images(tmp_path / "images" / "dog", 1)
    result = import_file(write_json(tmp_path / "db_config.json", db_config()), model_base())
    config = result.config
    assert (config.model_name, config.model_family, config.base_checkpoint) == \
        ("mine", "sdxl", "sdxl_base.safetensors")
    for key in ("model_name", "model_path", "src", "revision", "epoch", "save_preview_every",
                "save_safetensors", "deterministic", "lora_learning_rate"):
        assert any(m.startswith("ignored") and key in m for m in result.messages), key
    unset = messages_about(result, "unset or off")
    assert unset and "train_imagic" in unset[0] and "v2" in unset[0]


def test_db_config_lora(tmp_path: Path) -> None:
    make_images(tmp_path / "images" / "dog", 1)
    data = db_config(use_lora=True, lora_unet_rank=32, lora_txt_rank=4, lora_alpha=32, use_lora_extended=True,
                     lora_learning_rate=2e-4, lora_txt_learning_rate=5e-5, save_lora_after=True, stop_text_encoder=0)
    config = import_file(write_json(tmp_path / "db.json", data)).config
    assert (config.method, config.lora_rank, config.lora_alpha, config.lora_conv_rank) == ("lora", 32, 32.0, 32)
    assert (config.learning_rate, config.text_encoder_lr) == (2e-4, 5e-5)
    assert config.save_on_end and not config.train_text_encoder
    result = import_file(write_json(tmp_path / "db.json", data))
    assert messages_about(result, "ignored: lora_txt_rank")


@pytest.mark.parametrize(("key", "value", "field", "kept"), [
    ("lr_scheduler", "bananas", "lr_scheduler", "constant_with_warmup"),
    ("optimizer", "SGD Nesterov", "optimizer", "adamw"),
    ("attention", "sub_quad", "attention", "sdpa"),
])
def test_values_without_equivalent_are_reported(tmp_path: Path, key: str, value: str, field: str,
                                                kept: str) -> None:
    result = import_file(write_json(tmp_path / "db.json", {key: value}))
    assert getattr(result.config, field) == kept
    assert any(key in m and value in m for m in result.messages)


def test_old_8bit_flag_and_concepts_path(tmp_path: Path) -> None:
    make_images(tmp_path / "sets" / "images" / "dog", 2)
    write_json(tmp_path / "sets" / "concepts.json", [old_concept()])
    data = {"use_8bit_adam": True, "use_concepts": True, "concepts_path": "sets/concepts.json",
            "max_train_steps": 500}
    config = import_file(write_json(tmp_path / "db.json", data)).config
    assert config.optimizer == "adamw_8bit" and config.max_train_steps == 500
    # The concepts list's own relative paths resolve against the folder of the importing file.
    assert config.concepts[0].instance_data_dir == str(tmp_path / "images" / "dog")


def test_windows_paths_are_kept_and_reported(tmp_path: Path) -> None:
    concept = {"instance_data_dir": "D:\\train\\dog", "class_data_dir": "\\\\nas\\classes"}
    result = import_file(write_json(tmp_path / "c.json", [concept]))
    imported = result.config.concepts[0]
    assert imported.instance_data_dir == "D:\\train\\dog"
    assert imported.class_data_dir == "\\\\nas\\classes"
    warnings = messages_about(result, "Windows path")
    if os.name == "nt":
        assert warnings == []
    else:
        assert any("concept 1" in w and "D:\\train\\dog" in w and "fix the path" in w for w in warnings)


def test_relative_windows_separators_resolve(tmp_path: Path) -> None:
    make_images(tmp_path / "images" / "dog", 1)
    concept = import_file(write_json(tmp_path / "c.json", [{"instance_data_dir": "images\\dog"}])).config.concepts[0]
    assert Path(concept.instance_data_dir) == tmp_path / "images" / "dog"


def test_missing_instance_folder_is_reported(tmp_path: Path) -> None:
    result = import_file(write_json(tmp_path / "c.json", [{"instance_data_dir": "nowhere"}]))
    assert any("nowhere" in m and "does not exist" in m for m in result.messages)


def test_our_own_json_keeps_identity(tmp_path: Path) -> None:
    theirs = TrainingConfig(model_name="other", model_family="sd1", learning_rate=5e-6, method="lora",
                            concepts=[Concept(instance_data_dir="rel", instance_prompt="p")])
    result = import_file(write_json(tmp_path / "ours.json", io.to_dict(theirs)), model_base())
    config = result.config
    assert (config.model_name, config.model_family, config.learning_rate, config.method) == \
        ("mine", "sdxl", 5e-6, "lora")
    assert config.concepts[0].instance_data_dir == str(tmp_path / "rel")


def test_our_json_without_base_takes_everything(tmp_path: Path) -> None:
    theirs = TrainingConfig(model_name="other", model_family="sd2v", prediction_type="v_prediction")
    config = import_file(write_json(tmp_path / "ours.json", io.to_dict(theirs))).config
    assert (config.model_name, config.model_family, config.prediction_type) == ("other", "sd2v", "v_prediction")


def test_our_json_unknown_keys_reported(tmp_path: Path) -> None:
    data = {**io.to_dict(TrainingConfig()), "wobble": 1}
    assert any("'wobble'" in m for m in import_file(write_json(tmp_path / "x.json", data)).messages)


def test_bare_concept_list_in_our_format(tmp_path: Path) -> None:
    make_images(tmp_path / "a", 1)
    data = [{"instance_data_dir": str(tmp_path / "a"), "repeats": 4, "sample_prompt": "s", "n_samples": 3}]
    result = import_file(write_json(tmp_path / "list.json", data), model_base())
    concept = result.config.concepts[0]
    assert (concept.repeats, concept.sample_prompt, concept.n_samples) == (4, "s", 3)
    assert result.messages == []


def test_single_concept_object(tmp_path: Path) -> None:
    make_images(tmp_path / "a", 1)
    result = import_text(json.dumps({"instance_data_dir": "a", "instance_prompt": "x"}), "paste", tmp_path)
    assert result.config.concepts[0].instance_data_dir == str(tmp_path / "a")


def test_import_text_without_folder_keeps_relative_paths() -> None:
    result = import_text(json.dumps([{"instance_data_dir": "rel/dir"}]), "pasted JSON")
    assert result.config.concepts[0].instance_data_dir == "rel/dir"
    assert any("relative path" in m for m in result.messages)


def test_syntax_error_names_file_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "concepts_list.json"
    path.write_text('[\n  {"instance_prompt": "x",}\n]\n')
    with pytest.raises(ConfigError) as caught:
        import_file(path)
    message = str(caught.value)
    assert str(path) in message and "line 2" in message and "column" in message


@pytest.mark.parametrize(("data", "fragment"), [
    ([{"instance_prompt": "ok"}, "not an object"], "concept 2 must be a JSON object"),
    ({"concepts_list": {"a": 1}}, "concepts_list must be a list"),
    ({"learning_rate": "fast"}, "'learning_rate'"),
    ({"use_lora": "perhaps"}, "'use_lora'"),
    ({"cache_latents": "perhaps"}, "'cache_latents'"),
    ([{"n_save_sample": "many"}], "concept 1 'n_save_sample'"),
    ([{"num_class_images_per": "lots"}], "num_class_images_per"),
    ({"train_batch_size": 0}, "train_batch_size"),
    ({"stop_text_encoder": "late"}, "stop_text_encoder"),
    (42, "expected a JSON object"),
])
def test_malformed_content_names_file_and_key(tmp_path: Path, data: Any, fragment: str) -> None:
    path = write_json(tmp_path / "bad.json", data)
    with pytest.raises(ConfigError) as caught:
        import_file(path)
    assert str(path) in str(caught.value) and fragment in str(caught.value)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        import_file(tmp_path / "nope.json")


def test_nulls_and_empty_strings_count_as_unset() -> None:
    result = import_data({"learning_rate": None, "seed": "", "pretrained_vae_name_or_path": None,
                          "concepts_list": [{"instance_prompt": "p", "sample_seed": "", "class_data_dir": None}]},
                         "db.json", None, model_base())
    assert result.config.learning_rate == TrainingConfig().learning_rate
    assert result.config.concepts[0].sample_seed == Concept().sample_seed


def test_utf8_bom_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"learning_rate": 1e-6}).encode())
    assert import_file(path).config.learning_rate == 1e-6


# --- one merge rule; concepts never replaced by nothing silently ---------------------------------

def test_concepts_path_wins_over_an_empty_inline_list(tmp_path: Path) -> None:
    make_images(tmp_path / "model" / "images" / "dog", 2)
    write_json(tmp_path / "model" / "concepts_list.json", [old_concept(num_class_images_per=3)])
    data = {**db_config(concepts_list=[]), "use_concepts": True, "concepts_path": "concepts_list.json"}
    config = import_file(write_json(tmp_path / "model" / "db_config.json", data), model_base()).config
    assert [c.instance_prompt for c in config.concepts] == ["photo of sks dog"]
    assert config.concepts[0].num_class_images == 6


def test_an_absolute_concepts_path_is_followed(tmp_path: Path) -> None:
    listing = write_json(tmp_path / "elsewhere" / "c.json", [old_concept(instance_data_dir=str(tmp_path))])
    data = {"use_concepts": True, "concepts_path": str(listing), "concepts_list": []}
    config = import_file(write_json(tmp_path / "model" / "db.json", data)).config
    assert config.concepts[0].instance_data_dir == str(tmp_path)


def test_empty_concepts_keep_the_models_own(tmp_path: Path) -> None:
    base = model_base()
    base.concepts = [Concept(instance_prompt="mine")]
    for data in ({"learning_rate": 1e-6, "concepts_list": []}, {"version": 3, "concepts": []},
                 {"use_concepts": True, "concepts_path": "missing.json", "concepts_list": []}):
        result = import_file(write_json(tmp_path / "x.json", data), base)
        assert [c.instance_prompt for c in result.config.concepts] == ["mine"], data
        assert any("concept" in m for m in result.messages), data
    with pytest.raises(ConfigError, match="empty"):
        import_file(write_json(tmp_path / "list.json", []), base)


def test_our_partial_file_merges_with_or_without_version(tmp_path: Path) -> None:
    base = model_base()
    base.seed, base.concepts = 77, [Concept(instance_prompt="mine")]
    for data in ({"version": 3, "learning_rate": 1e-5}, {"learning_rate": 1e-5}, {"version": 1, "max_steps": 9}):
        config = import_file(write_json(tmp_path / "p.json", data), base).config
        assert (config.seed, config.resolution, len(config.concepts)) == (77, 1024, 1), data
    replaced = import_file(write_json(tmp_path / "p.json", {"version": 3, "learning_rate": 1e-5}), base,
                           replace=True)
    assert (replaced.config.seed, replaced.config.resolution) == (TrainingConfig().seed, TrainingConfig().resolution)
    assert replaced.config.model_family == "sdxl" and replaced.config.concepts == []
    assert any("removed the model's 1 concept" in m for m in replaced.messages)


def test_identity_in_our_file_is_kept_and_reported(tmp_path: Path) -> None:
    data = {"version": 3, "prediction_type": "v_prediction", "model_family": "sd2v", "learning_rate": 1e-6}
    result = import_file(write_json(tmp_path / "ours.json", data), model_base())
    assert (result.config.model_family, result.config.prediction_type) == ("sdxl", "epsilon")
    assert messages_about(result, "ignored: prediction_type") and messages_about(result, "ignored: model_family")


# --- each era of the old extension's files, read with its own meaning ------------------------------

NOV_2022 = {  # one concept at the top level; intervals in steps; one weight decay for everything
    "model_dir": "/sd/models/dreambooth/dog", "pretrained_model_name_or_path": "/sd/models/dreambooth/dog/working",
    "use_concepts": False, "pretrained_vae_name_or_path": "", "instance_data_dir": "images/dog",
    "class_data_dir": "classes/dog", "instance_prompt": "photo of sks dog", "class_prompt": "photo of a dog",
    "save_sample_prompt": "sks dog on the moon", "save_sample_negative_prompt": "blurry", "n_save_sample": 2,
    "seed": 4242, "save_guidance_scale": 7.0, "save_infer_steps": 40, "with_prior_preservation": True,
    "num_class_images": 150, "output_dir": "/sd/models/dreambooth/dog", "resolution": 512, "center_crop": False,
    "train_text_encoder": True, "train_batch_size": 1, "sample_batch_size": 4, "num_train_epochs": 1,
    "max_train_steps": 1200, "gradient_accumulation_steps": 1, "gradient_checkpointing": True,
    "learning_rate": 5e-6, "scale_lr": False, "lr_scheduler": "constant", "lr_warmup_steps": 0,
    "use_8bit_adam": True, "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_weight_decay": 0.03,
    "adam_epsilon": 1e-8, "max_grad_norm": 1.0, "save_preview_every": 300, "save_embedding_every": 400,
    "mixed_precision": "fp16", "not_cache_latents": True, "concepts_list": None, "use_cpu": False,
    "pad_tokens": True, "max_token_length": 75, "hflip": False, "use_ema": False, "prior_loss_weight": 1,
    "class_negative_prompt": "", "class_guidance_scale": 7.5, "class_infer_steps": 60, "scheduler": "ddim",
    "total_steps": 0, "revision": 0}


def test_november_2022_top_level_concept_and_step_intervals(tmp_path: Path) -> None:
    make_images(tmp_path / "images" / "dog", 3)
    result = import_file(write_json(tmp_path / "db_config.json", NOV_2022), model_base())
    config = result.config
    concept = config.concepts[0]
    assert (concept.instance_data_dir, concept.instance_prompt) == (str(tmp_path / "images" / "dog"),
                                                                    "photo of sks dog")
    assert (concept.class_prompt, concept.num_class_images, concept.sample_prompt) == \
        ("photo of a dog", 150, "sks dog on the moon")
    assert (concept.n_samples, concept.sample_steps, concept.sample_guidance_scale) == (2, 40, 7.0)
    assert (config.save_every_n_steps, config.save_every_n_epochs, config.sample_every_n_steps) == (400, 0, 300)
    assert (config.weight_decay, config.text_encoder_weight_decay) == (0.03, 0.03)
    assert (config.cache_latents, config.random_crop, config.optimizer) == ("off", True, "adamw_8bit")
    assert (config.seed, config.max_train_steps, config.with_prior_preservation) == (4242, 1200, True)
    assert not messages_about(result, "ignored: instance_data_dir")


DEC_2022 = {  # stop_text_encoder in epochs, intervals in epochs, no weight-decay key
    "model_name": "dog", "attention": "default", "cache_latents": True, "center_crop": True, "clip_skip": 1,
    "concepts_path": "", "custom_model_name": "", "epoch": 0, "epoch_pause_frequency": 0, "epoch_pause_time": 0,
    "gradient_accumulation_steps": 1, "gradient_checkpointing": True, "gradient_set_to_none": True,
    "half_model": False, "has_ema": False, "hflip": False, "learning_rate": 2e-6, "learning_rate_min": 1e-6,
    "lora_learning_rate": 1e-4, "lora_txt_learning_rate": 5e-5, "lora_txt_weight": 1.0, "lora_weight": 1.0,
    "lr_cycles": 1, "lr_factor": 0.5, "lr_power": 1.0, "lr_scale_pos": 0.5, "lr_scheduler": "constant",
    "lr_warmup_steps": 0, "max_token_length": 75, "mixed_precision": "fp16", "model_path": "",
    "num_train_epochs": 100, "pad_tokens": True, "prior_loss_weight": 1.0, "resolution": 512, "revision": 0,
    "sample_batch_size": 1, "sanity_prompt": "", "sanity_seed": 420420, "save_ckpt_after": True,
    "save_ckpt_cancel": True, "save_ckpt_during": False, "save_embedding_every": 25, "save_lora_after": True,
    "save_lora_cancel": True, "save_lora_during": True, "save_preview_every": 5, "save_state_after": False,
    "save_state_cancel": False, "save_state_during": False, "scheduler": "EulerAncestralDiscrete", "src": "x.ckpt",
    "shuffle_tags": False, "train_batch_size": 1, "stop_text_encoder": 50, "use_8bit_adam": True,
    "use_concepts": False, "use_ema": False, "use_lora": False, "v2": False,
    "concepts_list": [{"max_steps": -1, "instance_data_dir": "images/dog", "instance_prompt": "sks dog",
                       "class_prompt": "dog", "num_class_images": 100, "save_sample_prompt": "",
                       "save_sample_template": "", "instance_token": "sks", "class_token": "dog",
                       "class_negative_prompt": "", "class_guidance_scale": 7.5, "class_infer_steps": 60,
                       "save_sample_negative_prompt": "", "n_save_sample": 1, "sample_seed": -1,
                       "save_guidance_scale": 7.5, "save_infer_steps": 60}]}


def test_december_2022_epochs_for_the_text_encoder_and_no_saves_during(tmp_path: Path) -> None:
    make_images(tmp_path / "images" / "dog", 2)
    base = model_base()
    base.save_every_n_epochs = 10
    result = import_file(write_json(tmp_path / "db_config.json", DEC_2022), base)
    config = result.config
    assert (config.stop_text_encoder, config.train_text_encoder) == (0.5, True)
    assert messages_about(result, "stop_text_encoder=50")
    assert (config.save_every_n_epochs, config.save_every_n_steps) == (0, 0)  # save_ckpt_during: false
    assert config.sample_scheduler == "euler_a" and config.concepts[0].num_class_images == 100
    for key in ("lora_weight", "save_preview_every", "lr_factor", "save_ckpt_cancel"):
        assert messages_about(result, f"ignored: {key}"), key
    always = import_file(write_json(tmp_path / "a.json", {**DEC_2022, "stop_text_encoder": -1})).config
    assert (always.stop_text_encoder, always.train_text_encoder) == (1.0, True)
    one_epoch = import_file(write_json(tmp_path / "b.json", {**DEC_2022, "stop_text_encoder": 1})).config
    assert one_epoch.stop_text_encoder == pytest.approx(0.01)
    unknown = {key: value for key, value in DEC_2022.items() if key != "num_train_epochs"}
    unconverted = import_file(write_json(tmp_path / "c.json", unknown), base)
    assert unconverted.config.stop_text_encoder == base.stop_text_encoder
    assert messages_about(unconverted, "ignored: stop_text_encoder")
    during = import_file(write_json(tmp_path / "d.json", {**DEC_2022, "save_ckpt_during": True})).config
    assert during.save_every_n_epochs == 25


def test_2023_class_images_per_image_beat_a_stale_total(tmp_path: Path) -> None:
    make_images(tmp_path / "images" / "dog", 5)
    data = db_config(concepts_list=[old_concept(instance_data_dir="images/dog", num_class_images_per=4,
                                                num_class_images=0)])
    config = import_file(write_json(tmp_path / "db_config.json", data), model_base()).config
    assert config.concepts[0].num_class_images == 20 and config.with_prior_preservation


HEAD_ERA = {  # the pydantic-era file: tenc weight decay, sampler names, paged optimizers, LoRA without alpha
    "weight_decay": 0.02, "tenc_weight_decay": 0.05, "tenc_grad_clip_norm": 1.0, "attention": "xformers",
    "cache_latents": True, "clip_skip": 1, "concepts_list": [], "concepts_path": "", "use_concepts": False,
    "lr_scheduler": "linear_with_warmup", "lr_warmup_steps": 50, "optimizer": "Paged 8bit AdamW",
    "scheduler": "DPMSolverMultistep", "use_lora": True, "lora_unet_rank": 8, "lora_txt_rank": 8,
    "lora_weight": 0.8, "lora_learning_rate": 1e-4, "lora_txt_learning_rate": 5e-5, "stop_text_encoder": 0.75,
    "num_train_epochs": 100, "save_embedding_every": 25, "save_lora_during": True, "input_pertubation": True,
    "model_type": "v1x", "model_name": "dog", "noise_scheduler": "DDPM", "snapshot": "", "use_dream": False}


def test_pydantic_era_fields_map_with_their_meaning(tmp_path: Path) -> None:
    base = model_base()
    base.concepts = [Concept(instance_prompt="mine")]
    result = import_file(write_json(tmp_path / "db_config.json", HEAD_ERA), base)
    config = result.config
    assert (config.weight_decay, config.text_encoder_weight_decay) == (0.02, 0.05)
    assert (config.lr_scheduler, config.optimizer, config.sample_scheduler) == ("linear", "adamw_8bit", "dpmpp_2m")
    assert (config.method, config.lora_rank, config.lora_alpha) == ("lora", 8, 8.0)  # scale 1, as it trained
    assert (config.stop_text_encoder, config.save_every_n_epochs, config.cache_latents) == (0.75, 25, "memory")
    for key in ("lora_weight", "input_pertubation", "tenc_grad_clip_norm", "noise_scheduler"):
        assert messages_about(result, f"ignored: {key}"), key
    assert not messages_about(result, "ignored: tenc_weight_decay")
    assert not messages_about(result, "ignored: scheduler")
    assert messages_about(result, "kept the model's 1 concept")  # the empty concepts_list


@pytest.mark.parametrize(("name", "hint"), [("AdamW Dadaptation", "prodigy"), ("Tiger", "lion"),
                                            ("SGD Dadaptation", "prodigy")])
def test_optimizers_without_equivalent_say_what_to_use(tmp_path: Path, name: str, hint: str) -> None:
    result = import_file(write_json(tmp_path / "db.json", {"optimizer": name}))
    assert result.config.optimizer == "adamw"
    assert any(name in m and hint in m for m in messages_about(result, "ignored: optimizer"))


def test_the_doc_lists_every_field_the_importer_knows() -> None:
    from dreambooth.config.legacy import known_incumbent_keys

    doc = (Path(__file__).resolve().parents[2] / "docs" / "INCUMBENT_FIELDS.md").read_text(encoding="utf-8")
    missing = sorted(key for key in known_incumbent_keys() if f"`{key}`" not in doc)
    assert missing == [], f"docs/INCUMBENT_FIELDS.md lacks {missing}"
