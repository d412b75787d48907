"""The tab's sections, one class each: model, concepts, guidance (wizard and presets) and run (actions and output).

Each section lays out its components in `build*()`, wires its events in `wire()` through the tab's event
helper (errors land in the tab's message box) and holds its handlers, which return one value per output with
the message box last. The settings form that several sections read and update lives in FormFields.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gradio as gr

from ..config.schema import FAMILIES, SCHEDULERS, TrainingConfig
from . import compat, forms, output
from .controller import AUTO, MEMORY_CHOICES, TabController, load_images
from .lora_tools import LoraToolsSection

STRENGTH_NAMES = ("low_end", "ultra_soft", "very_soft", "soft", "medium", "hard", "very_hard", "ultra_hard",
                  "high_end")
# The tab's event helper: (trigger, handler, inputs, outputs, api_name=None) -> the event.
EventWirer = Callable[..., Any]


class FormFields:
    """The settings' components, the concept count and each concept panel's fields, in forms.form_values order."""

    def __init__(self) -> None:
        self.settings: dict[str, Any] = {}
        self.in_use: Any = None
        self.panels: list[Any] = []
        self.panel_fields: list[dict[str, Any]] = []

    def add_controls(self, specs: list[forms.ControlSpec], config: TrainingConfig) -> None:
        for spec in specs:
            self.settings[spec.name] = compat.control(spec, getattr(config, spec.name),
                                                      forms.config_elem_id(spec.name))

    @property
    def components(self) -> list[Any]:
        """Components in forms.form_values order."""
        concept_components = [fields[spec.name] for fields in self.panel_fields for spec in forms.concept_specs()]
        return [self.settings[spec.name] for spec in forms.config_specs()] + [self.in_use] + concept_components

    @property
    def outputs(self) -> list[Any]:
        """What updates() fills: the form's components, then the concept panels."""
        return self.components + self.panels

    def updates(self, config: TrainingConfig) -> list[Any]:
        """Values for the components followed by the panels' visibility."""
        values = forms.form_values(config)
        in_use = values[len(forms.config_specs())]
        return values + [compat.update(visible=index < in_use) for index in range(forms.MAX_CONCEPTS)]


class ModelPanel:
    """Choosing, creating, deleting and saving a model; the model group's settings."""

    def __init__(self, ctl: TabController, fields: FormFields):
        self.ctl = ctl
        self.fields = fields

    def build(self) -> None:
        with gr.Group(elem_id="db_model_section"):
            with gr.Row():
                names = self.ctl.model_names()
                self.model = gr.Dropdown(choices=names, value=names[0] if names else None, label="Model",
                                         elem_id="db_model", scale=3)
                self.refresh_models = compat.button("Refresh", "db_refresh_models", small=True)
                self.save_button = compat.button("Save config", "db_save_config", small=True)
                self.delete_button = compat.button("Delete model", "db_delete_model", variant="stop", small=True)
            with gr.Accordion("Create a model", open=not names, elem_id="db_create_section"):
                self._create_rows()
            with gr.Row():
                self.fields.add_controls(forms.grouped_specs(forms.config_specs()).get(forms.MODEL_GROUP, []),
                                         TrainingConfig())

    def _create_rows(self) -> None:
        sources = list(self.ctl.checkpoint_choices())
        with gr.Row():
            self.new_name = gr.Textbox(label="New model name", elem_id="db_new_name", placeholder="e.g. my-dog")
            self.source = gr.Dropdown(choices=sources, value=sources[0] if sources else None,
                                      label="From checkpoint", elem_id="db_source",
                                      **compat.supported(gr.Dropdown, allow_custom_value=True))
            self.refresh_sources = compat.button("Refresh", "db_refresh_sources", small=True)
        with gr.Row():
            self.new_family = gr.Dropdown(choices=[AUTO, *FAMILIES], value=AUTO, label="Family",
                                          elem_id="db_new_family")
            self.new_prediction = gr.Dropdown(choices=[AUTO, "epsilon", "v_prediction"], value=AUTO,
                                              label="Prediction type", elem_id="db_new_prediction")
            self.create_button = compat.button("Create model", "db_create_model", variant="primary")

    def wire(self, event: EventWirer, message: Any) -> None:
        form = self.fields.components
        event(self.model.change, self.on_select, [self.model], self.fields.outputs + [message])
        event(self.refresh_models.click, self.on_refresh_models, [self.model], [self.model, message],
              "db_refresh_models")
        event(self.refresh_sources.click, self.on_refresh_sources, [self.source], [self.source, message])
        event(self.create_button.click, self.on_create, [self.new_name, self.source, self.new_family,
                                                         self.new_prediction],
              [self.model, self.new_name, message], "db_create_model")
        event(self.delete_button.click, self.on_delete, [self.model], [self.model, message])
        event(self.save_button.click, self.on_save, [self.model, *form], [message])

    def on_select(self, name: str | None) -> list[Any]:
        # The message box is left alone: a create or delete notice that led here stays visible.
        return self.fields.updates(self.ctl.load_config(name)) + [compat.update()]

    def on_refresh_models(self, current: str | None) -> list[Any]:
        names = self.ctl.model_names()
        value = current if current in names else (names[0] if names else None)
        return [compat.update(choices=names, value=value), ""]

    def on_refresh_sources(self, current: str | None) -> list[Any]:
        choices = list(self.ctl.checkpoint_choices())
        value = current if current in choices else (choices[0] if choices else None)
        note = "" if choices else output.notice_html(
            f"No checkpoints in {self.ctl.host.layout.checkpoints_dir}; copy a .safetensors file there.")
        return [compat.update(choices=choices, value=value), note]

    def on_create(self, name: str, source: str, family: str, prediction: str) -> list[Any]:
        created = self.ctl.create_model(name or "", source or "", family, prediction)
        names = self.ctl.model_names()
        return [compat.update(choices=names, value=created), "", output.notice_html(f"Model {created} created.")]

    def on_delete(self, name: str | None) -> list[Any]:
        self.ctl.delete_model(name)
        names = self.ctl.model_names()
        return [compat.update(choices=names, value=names[0] if names else None),
                output.notice_html(f"Model {name} deleted.")]

    def on_save(self, name: str | None, *values: Any) -> list[Any]:
        self.ctl.save_config(name, list(values))
        return [output.notice_html(f"Saved the config of {name}.")]


class ConceptsPanel:
    """The concept panels (shown up to the count in use), their dataset previews and the JSON import."""

    def __init__(self, ctl: TabController, fields: FormFields):
        self.ctl = ctl
        self.fields = fields
        self.previews: list[tuple[Any, Any, Any]] = []

    def build(self) -> None:
        with gr.Row():
            self.add_concept = compat.button("Add concept", "db_add_concept", small=True)
            self.remove_concept = compat.button("Remove last concept", "db_remove_concept", small=True)
        self.fields.in_use = gr.State(1)
        for index in range(forms.MAX_CONCEPTS):
            self._concept_panel(index)
        with gr.Accordion("Import concepts JSON", open=False, elem_id="db_import_section"):
            self.concepts_file = gr.File(label="Upload concepts .json", elem_id="db_concepts_file",
                                         file_types=[".json"])
            self.concepts_text = gr.Textbox(label="...or paste the JSON list", lines=4, elem_id="db_concepts_text")
            self.import_button = compat.button("Import pasted JSON", "db_import_concepts")

    def _concept_panel(self, index: int) -> None:
        fields: dict[str, Any] = {}
        blank = forms.Concept()
        with gr.Column(visible=index == 0, elem_id=f"db_concept_{index}") as panel:
            gr.Markdown(f"#### Concept {index + 1}")
            specs = forms.concept_specs()
            for start in range(0, len(specs), 3):
                with gr.Row():
                    for spec in specs[start:start + 3]:
                        fields[spec.name] = compat.control(spec, getattr(blank, spec.name),
                                                           forms.concept_elem_id(index, spec.name))
            button = compat.button("Preview dataset", f"db_preview_{index}", small=True)
            gallery = compat.gallery("Images found", f"db_preview_gallery_{index}", columns=6)
            summary = gr.Markdown("", elem_id=f"db_preview_summary_{index}")
        self.fields.panels.append(panel)
        self.fields.panel_fields.append(fields)
        self.previews.append((button, gallery, summary))

    def wire(self, event: EventWirer, message: Any, model: Any) -> None:
        form, form_out = self.fields.components, self.fields.outputs + [message]
        event(self.add_concept.click, self.on_add, [self.fields.in_use], [self.fields.in_use, *self.fields.panels,
                                                                           message])
        event(self.remove_concept.click, self.on_remove, [self.fields.in_use, *form], form_out)
        event(self.import_button.click, self.on_import_text, [self.concepts_text, *form], form_out)
        event(self.concepts_file.change, self.on_import_file, [self.concepts_file, *form], form_out)
        for index, (button, gallery, summary) in enumerate(self.previews):
            event(button.click, self._preview_handler(index), [model, *form], [gallery, summary, message])

    def on_add(self, in_use: int) -> list[Any]:
        count = min(int(in_use or 1) + 1, forms.MAX_CONCEPTS)
        note = "" if count > int(in_use or 1) else output.notice_html(
            f"The tab shows at most {forms.MAX_CONCEPTS} concepts.")
        return [count] + [compat.update(visible=index < count) for index in range(forms.MAX_CONCEPTS)] + [note]

    def on_remove(self, in_use: int, *values: Any) -> list[Any]:
        """Hide the last panel and clear it (so a later Add starts blank)."""
        values_list = list(values)
        offset, width = len(forms.config_specs()) + 1, len(forms.concept_specs())
        count = max(1, int(in_use or 1) - 1)
        blank = forms.concept_to_values(forms.Concept())
        for index in range(count, forms.MAX_CONCEPTS):
            values_list[offset + index * width:offset + (index + 1) * width] = blank
        values_list[offset - 1] = count
        return values_list + [compat.update(visible=i < count) for i in range(forms.MAX_CONCEPTS)] + [""]

    def _with_concepts(self, values: list[Any], concepts: list[Any], warnings: list[str]) -> list[Any]:
        config = forms.form_to_config(values)
        config.concepts = concepts
        note = f"Imported {len(concepts)} concept(s)." + "".join(f" {w}" for w in warnings)
        return self.fields.updates(config) + [output.notice_html(note)]

    def on_import_text(self, text: str, *values: Any) -> list[Any]:
        concepts, warnings = self.ctl.import_concepts(text, None)
        return self._with_concepts(list(values), concepts, warnings)

    def on_import_file(self, upload: Any, *values: Any) -> list[Any]:
        path = compat.uploaded_path(upload)
        if path is None:  # the upload was cleared
            return [compat.update() for _ in range(len(self.fields.outputs))] + [""]
        concepts, warnings = self.ctl.import_concepts(None, path)
        return self._with_concepts(list(values), concepts, warnings)

    def _preview_handler(self, index: int) -> Callable[..., list[Any]]:
        def on_preview(name: str | None, *values: Any) -> list[Any]:
            items, summary = self.ctl.preview_concept(name, list(values), index)
            return [items, summary, ""]
        return on_preview


class GuidancePanel:
    """The wizard (steps, epochs, learning rate and class images) and the memory presets and estimate."""

    def __init__(self, ctl: TabController, fields: FormFields):
        self.ctl = ctl
        self.fields = fields

    def build_wizard(self) -> None:
        gr.Markdown("Steps, epochs, learning rate and class images from the community parameter study, "
                    "[sd_dreambooth_extension discussion #547]"
                    "(https://github.com/d8ahazard/sd_dreambooth_extension/discussions/547). "
                    "'Apply' writes them into the settings (save or train to keep them).")
        with gr.Row():
            self.wiz_images = gr.Textbox(value="10", label="Images per concept (comma-separated)",
                                         elem_id="db_wiz_images")
            self.wiz_te = gr.Checkbox(value=False, label="Train text encoder", elem_id="db_wiz_te")
            self.wiz_mode = gr.Radio(choices=["strength", "learning rate"], value="strength", label="Choose by",
                                     elem_id="db_wiz_mode")
        with gr.Row():
            self.wiz_strength = gr.Dropdown(choices=list(STRENGTH_NAMES), value="medium", label="Strength",
                                            elem_id="db_wiz_strength")
            self.wiz_lr = gr.Number(value=1e-6, label="Learning rate", elem_id="db_wiz_lr")
            self.wiz_scheduler = gr.Dropdown(choices=list(SCHEDULERS), value="constant", label="Scheduler",
                                             elem_id="db_wiz_scheduler")
        with gr.Row():
            self.wiz_batch = gr.Number(value=1, precision=0, label="Batch size", elem_id="db_wiz_batch")
            self.wiz_accum = gr.Number(value=1, precision=0, label="Accumulation", elem_id="db_wiz_accum")
            self.wiz_resolution = gr.Number(value=0, precision=0, label="Resolution (0: the model family's)",
                                            elem_id="db_wiz_res")
            self.wiz_base = gr.Number(value=0, precision=0, label="Base resolution (0: the model family's)",
                                      elem_id="db_wiz_base")
            self.wiz_reference = gr.Number(value=200, label="Model's steps per image at LR 1e-5 (200: SD 1.5's)",
                                           elem_id="db_wiz_reference")
        with gr.Row():
            self.wiz_plan_button = compat.button("Plan", "db_wizard_plan")
            self.wiz_apply_button = compat.button("Apply to settings", "db_wizard_apply", variant="primary")
        self.wiz_result = gr.Markdown("", elem_id="db_wizard_result")

    def build_presets(self) -> None:
        with gr.Row():
            self.memory = gr.Dropdown(choices=list(MEMORY_CHOICES), value="CPU", label="Memory of your device",
                                      elem_id="db_memory")
            self.preset_button = compat.button("Apply preset", "db_apply_preset", variant="primary")
            self.estimate_button = compat.button("Estimate memory", "db_estimate")
        self.estimate_text = gr.Markdown("", elem_id="db_memory_estimate")

    def wire(self, event: EventWirer, message: Any) -> None:
        wizard_inputs = [self.wiz_images, self.wiz_te, self.wiz_mode, self.wiz_strength, self.wiz_lr,
                         self.wiz_batch, self.wiz_accum, self.wiz_resolution, self.wiz_base, self.wiz_scheduler,
                         self.fields.settings["model_family"], self.wiz_reference]
        self.wizard_inputs = wizard_inputs
        form, form_out = self.fields.components, self.fields.outputs + [message]
        event(self.wiz_plan_button.click, self.on_wizard_plan, wizard_inputs, [self.wiz_result, message],
              "db_wizard_plan")
        event(self.wiz_apply_button.click, self.on_wizard_apply, [*wizard_inputs, *form],
              [self.wiz_result, *form_out])
        event(self.preset_button.click, self.on_preset, [self.memory, *form], [self.estimate_text, *form_out])
        event(self.estimate_button.click, self.on_estimate, [self.memory, *form], [self.estimate_text, message])

    def on_wizard_plan(self, *inputs: Any) -> list[Any]:
        return [wizard_markdown(self.ctl.wizard_plan(*inputs)), ""]

    def on_wizard_apply(self, *inputs_and_values: Any) -> list[Any]:
        count = len(self.wizard_inputs)
        result = self.ctl.wizard_plan(*inputs_and_values[:count])
        config = self.ctl.wizard_apply(result, list(inputs_and_values[count:]))
        return [wizard_markdown(result)] + self.fields.updates(config) + [
            output.notice_html("Wizard values applied; press Save config or Train to keep them.")]

    def on_preset(self, memory: str, *values: Any) -> list[Any]:
        config, notes = self.ctl.apply_preset(memory, list(values))
        estimate = self.ctl.memory_estimate(memory, forms.form_values(config))
        text = _code_block(estimate) + "".join(f"\n- {note}" for note in notes)
        return [text] + self.fields.updates(config) + [output.notice_html(f"Preset for {memory} applied.")]

    def on_estimate(self, memory: str, *values: Any) -> list[Any]:
        return [_code_block(self.ctl.memory_estimate(memory, list(values))), ""]


class RunPanel:
    """Training and its controls, the progress output, and the actions between runs (class images, samples,
    exports, LoRA tools)."""

    def __init__(self, ctl: TabController, fields: FormFields):
        self.ctl = ctl
        self.fields = fields

    def build_generate(self) -> None:
        gr.Markdown("Run these now, between or during training (samples and saves act at the next step).")
        with gr.Row():
            self.class_button = compat.button("Generate class images", "db_generate_class")
            self.sample_button = compat.button("Generate samples now", "db_sample_now")
        with gr.Row():
            self.export_precision = gr.Dropdown(choices=["fp16", "fp32", "bf16"], value="fp16",
                                                label="Export precision", elem_id="db_export_precision")
            self.export_ckpt_button = compat.button("Export checkpoint", "db_export_checkpoint")
            self.export_lora_button = compat.button("Export LoRA", "db_export_lora")
        self.lora_tools = LoraToolsSection(self.ctl).build()

    def build_output(self) -> None:
        with gr.Row():
            self.train_button = compat.button("Train", "db_train", variant="primary")
            self.cancel_button = compat.button("Cancel", "db_cancel", variant="stop")
            self.save_now_button = compat.button("Save now", "db_save_now")
        self.cancel_saves = gr.Checkbox(value=True, label="Save when cancelling", elem_id="db_cancel_saves")
        self.progress = gr.HTML(output.progress_html({}), elem_id="db_progress")
        self.status = gr.Markdown("Idle.", elem_id="db_status")
        self.run_error = gr.HTML("", elem_id="db_run_error")
        # No image while the page is built: the first poll (on load) draws the plot. An initial image is saved
        # into the host's temp folder at build time, which Forge Neo has not created yet on a fresh install.
        self.plot = gr.Image(value=None, label="Loss and learning rate", type="pil", interactive=False,
                             elem_id="db_loss_plot")
        self.gallery = compat.gallery("Latest samples", "db_samples", columns=3)
        self.signature = gr.State(None)

    def wire(self, event: EventWirer, message: Any, model: Any) -> None:
        form = self.fields.components
        event(self.train_button.click, self.on_train, [model, *form], [message])
        event(self.cancel_button.click, self.on_cancel, [self.cancel_saves], [message], "db_cancel")
        event(self.save_now_button.click, self.on_save_now, [], [message])
        event(self.sample_button.click, self.on_sample_now, [], [message])
        event(self.class_button.click, self.on_class_images, [model, *form], [message])
        event(self.export_ckpt_button.click, self.on_export_checkpoint, [model, self.export_precision], [message])
        event(self.export_lora_button.click, self.on_export_lora, [model, self.export_precision], [message])

    def wire_polling(self, blocks: gr.Blocks) -> None:
        outputs = [self.progress, self.status, self.run_error, self.plot, self.gallery, self.signature]
        compat.poll(blocks, self.poll, [self.signature], outputs)
        blocks.load(self.poll, [self.signature], outputs, show_progress="hidden", api_name="db_status")

    def on_train(self, name: str | None, *values: Any) -> list[Any]:
        return [output.notice_html(self.ctl.train(name, list(values)))]

    def on_cancel(self, save: bool) -> list[Any]:
        return [output.notice_html(self.ctl.cancel(bool(save)))]

    def on_save_now(self) -> list[Any]:
        self.ctl.service.save_now()
        return [output.notice_html("A save will be written after the current step.")]

    def on_sample_now(self) -> list[Any]:
        self.ctl.service.sample_now()
        return [output.notice_html("Samples will be rendered after the current step (during training).")]

    def on_class_images(self, name: str | None, *values: Any) -> list[Any]:
        return [output.notice_html(self.ctl.generate_class_images(name, list(values)))]

    def on_export_checkpoint(self, name: str | None, precision: str) -> list[Any]:
        return [output.notice_html(self.ctl.export(name, "checkpoint", precision))]

    def on_export_lora(self, name: str | None, precision: str) -> list[Any]:
        return [output.notice_html(self.ctl.export(name, "lora", precision))]

    def poll(self, signature: Any) -> list[Any]:
        """Progress, status, error, and (only when they changed) the plot and the gallery."""
        status = self.ctl.service.status()
        new_signature = list(output.status_signature(status))
        changed = new_signature != signature
        plot = output.render_loss_plot(status.losses) if changed else compat.update()
        samples = load_images(list(status.samples), list(status.sample_prompts)) if changed else compat.update()
        return [output.progress_html(status), output.status_markdown(status), output.error_html(status.error),
                plot, samples, new_signature]


def _code_block(text: str) -> str:
    return "```\n" + text + "\n```"


def wizard_markdown(result: Any) -> str:
    """The wizard's results as a table with each formula and its numbers, then its notes."""
    rows = ["| result | value | formula |", "|---|---|---|"]
    for line in getattr(result, "lines", []):
        rows.append(f"| {line.name} | {_format_value(line.value)} | `{line.formula}` |")
    notes = [f"- {note}" for note in getattr(result, "notes", [])]
    summary = (f"**Max steps {result.max_train_steps}, epochs {result.num_train_epochs}, learning rate "
               f"{result.learning_rate_setting:.3g}, class images {', '.join(map(str, result.class_images))}**")
    return "\n".join([summary, "", *rows, "", *notes])


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
