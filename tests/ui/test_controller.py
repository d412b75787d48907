"""The tab's actions with a fake host and a scripted trainer (no browser, no gradio)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from PIL import Image

from dreambooth.config.schema import Concept, TrainingConfig
from dreambooth.errors import ConfigError, DreamboothError
from dreambooth.store import ModelStore
from dreambooth.ui import forms
from dreambooth.ui.controller import TabController, parse_counts
from dreambooth.ui.tab import DreamboothTab, guarded


def _wait(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _is_no_change(value: object) -> bool:
    """gr.update() without arguments: a dict in every gradio version this tab supports."""
    return isinstance(value, dict) and value.get("__type__") in ("update", "generic_update") and len(value) == 1


def test_select_edit_save_round_trips_through_the_store(host, service, store: ModelStore, model: str) -> None:
    ctl = TabController(host, service, store)
    values = forms.form_values(ctl.load_config(model))
    values[[s.name for s in forms.config_specs()].index("learning_rate")] = 3e-6
    ctl.save_config(model, values)
    assert store.existing(model).load_config().learning_rate == 3e-6
    with pytest.raises(ConfigError, match="No model selected"):
        ctl.save_config(None, values)


def test_train_shows_progress_losses_samples_and_refuses_a_second_run(host, service, store, model, hold) -> None:
    tab = DreamboothTab(host, service, store)
    hold.set()
    assert "started" in tab.ctl.train(model, forms.form_values(tab.ctl.load_config(model)))
    _wait(lambda: service.status().samples)
    progress, status, error, plot, gallery, signature = tab.run.poll(None)
    assert 'data-state="running"' in progress and "step 5/5" in progress and error == ""
    assert plot.size == (640, 260) and gallery[0][1] == "a red square"
    # Unchanged status: the plot and gallery are not sent again.
    unchanged = tab.run.poll(signature)
    assert _is_no_change(unchanged[3]) and _is_no_change(unchanged[4])
    with pytest.raises(DreamboothError, match="still running"):
        tab.ctl.train(model, forms.form_values(tab.ctl.load_config(model)))
    assert "Stopping" in tab.ctl.cancel(save=False)
    _wait(lambda: not service.status().active)
    assert service.status().message == "Stopped."


def test_delete_is_refused_while_the_model_trains(host, service, store, model, hold) -> None:
    ctl = TabController(host, service, store)
    hold.set()
    service.start(model)
    _wait(lambda: service.status().step > 0)
    with pytest.raises(ConfigError, match="cancel the run"):
        ctl.delete_model(model)
    service.cancel(save=False)
    _wait(lambda: not service.status().active)
    ctl.delete_model(model)
    assert ctl.model_names() == []


def test_errors_show_in_the_message_box_and_leave_other_outputs(host, service, store) -> None:
    tab = DreamboothTab(host, service, store)
    result = guarded(tab.run.on_train, 2)(None, *forms.form_values(TrainingConfig()))
    assert _is_no_change(result[0])
    assert "No model selected" in result[1] and "db-error" in result[1]
    single = guarded(tab.run.on_train, 1)(None, *forms.form_values(TrainingConfig()))
    assert isinstance(single, str) and "No model selected" in single


def test_concepts_import_from_file_and_paste(host, service, store, tmp_path: Path) -> None:
    ctl = TabController(host, service, store)
    path = tmp_path / "concepts.json"
    path.write_text(json.dumps([{"instance_data_dir": "/a", "instance_prompt": "sks"}]), encoding="utf-8")
    assert ctl.import_concepts(None, path)[0][0].instance_data_dir == "/a"
    assert ctl.import_concepts('{"instance_data_dir": "/b"}', None)[0][0].instance_data_dir == "/b"
    with pytest.raises(ConfigError, match="Paste"):
        ctl.import_concepts("  ", None)


def test_add_and_remove_panels_clear_the_removed_one(host, service, store) -> None:
    tab = DreamboothTab(host, service, store)
    added = tab.concepts.on_add(1)
    assert added[0] == 2 and added[1]["visible"] and added[2]["visible"] and not added[3]["visible"]
    config = TrainingConfig(concepts=[Concept(instance_data_dir="/a"), Concept(instance_data_dir="/b")])
    removed = tab.concepts.on_remove(2, *forms.form_values(config))
    values = removed[:len(forms.form_values(config))]
    assert [c.instance_data_dir for c in forms.form_to_config(values).concepts] == ["/a"]


def test_preview_reports_images_captions_and_buckets(host, service, store, model, tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for index in range(3):
        Image.new("RGB", (96, 64), (index * 80, 0, 0)).save(folder / f"{index}.png")
    (folder / "0.txt").write_text("a red thing", encoding="utf-8")
    config = TrainingConfig(resolution=64, bucket_min_resolution=64, bucket_max_resolution=128,
                            concepts=[Concept(instance_data_dir=str(folder), instance_prompt="[filewords]")])
    items, summary = TabController(host, service, store).preview_concept(model, forms.form_values(config), 0)
    assert len(items) == 3
    assert "3 images" in summary and "buckets at 64px" in summary
    with pytest.raises(ConfigError, match="Concept 2"):
        TabController(host, service, store).preview_concept(model, forms.form_values(config), 1)


def test_wizard_plan_and_apply_fill_the_config(host, service, store) -> None:
    ctl = TabController(host, service, store)
    result = ctl.wizard_plan("10", False, "strength", "medium", None, 1, 1, 512, 512, "constant")
    assert result.max_train_steps > 0 and result.lines
    config = TrainingConfig(concepts=[Concept(instance_data_dir="/a")])
    applied = ctl.wizard_apply(result, forms.form_values(config))
    assert applied.max_train_steps == result.max_train_steps
    assert applied.concepts[0].num_class_images == result.class_images[0]
    assert parse_counts("12, 8") == [12, 8]
    with pytest.raises(ConfigError, match="Images per concept"):
        parse_counts("ten")


def test_preset_and_memory_estimate(host, service, store) -> None:
    ctl = TabController(host, service, store)
    config, _notes = ctl.apply_preset("CPU", forms.form_values(TrainingConfig()))
    assert config.method == "lora"
    text = ctl.memory_estimate("6 GB", forms.form_values(TrainingConfig(model_family="sdxl", resolution=1024)))
    assert "total" in text and "exceeds" in text


def test_tab_builds_every_setting_and_concept_panel(host, service, store) -> None:
    tab = DreamboothTab(host, service, store)
    tab.build()
    assert set(tab.settings) == {spec.name for spec in forms.config_specs()}
    assert len(tab.panels) == forms.MAX_CONCEPTS and len(tab.form) == len(forms.form_values(TrainingConfig()))


def test_tab_import_reads_old_concept_keys_and_refuses_nothing(host, service, store) -> None:
    ctl = TabController(host, service, store)
    old = [{"instance_data_dir": "/a", "n_save_sample": 3, "save_sample_prompt": "sks on the moon"}]
    concepts, _ = ctl.import_concepts(json.dumps(old), None)
    assert (concepts[0].n_samples, concepts[0].sample_prompt) == (3, "sks on the moon")
    for empty in ("[]", '{"concepts": []}', '{"learning_rate": 1e-6, "concepts_list": []}'):
        with pytest.raises(ConfigError, match="nothing"):
            ctl.import_concepts(empty, None)
