"""The training tab, generated from the settings schema; the same tab runs inside the web UIs and standalone.

`create_tab(host, service, store)` returns a gr.Blocks. Controls come from forms.control_spec, actions
from controller.TabController, the sections and their handlers from panels.py; this module composes the
sections and wires their events. Only the gradio API common to 3.41, 4.x and 5 is used (differences live in
compat.py).
"""

from __future__ import annotations

import html
import json
import logging
from collections.abc import Callable
from typing import Any

import gradio as gr

from ..config.schema import TrainingConfig
from ..errors import DreamboothError
from ..host.base import Host
from ..store import ModelStore
from . import compat, forms, output
from .controller import TabController
from .lora_tools import LoraToolsSection
from .panels import ConceptsPanel, FormFields, GuidancePanel, ModelPanel, RunPanel

log = logging.getLogger(__name__)

TAB_ID = "dreambooth_tab"


def _message_for(error: BaseException) -> str:
    if isinstance(error, DreamboothError):
        return str(error)
    log.exception("Dreambooth tab action failed")
    return f"{type(error).__name__}: {error} (unexpected; the console log has the details)."


def guarded(fn: Callable[..., list[Any]], n_outputs: int) -> Callable[..., Any]:
    """Run a handler whose last output is the message box; on error leave the rest unchanged, show the error."""
    def handler(*args: Any) -> Any:
        try:
            values = fn(*args)
        except Exception as error:  # shown in the tab, never as a gradio error popup
            values = [compat.update() for _ in range(n_outputs - 1)] + [output.error_html(_message_for(error))]
        # gradio takes a single output's value as it is, not wrapped in a list.
        return values[0] if n_outputs == 1 else values
    handler.__name__ = getattr(fn, "__name__", "handler")
    return handler


class DreamboothTab:
    """The tab's layout: its sections (panels.py) and the settings form they share, and the wiring between them."""

    def __init__(self, host: Host, service: Any, store: ModelStore):
        self.ctl = TabController(host, service, store)
        self.fields = FormFields()
        self.models = ModelPanel(self.ctl, self.fields)
        self.concepts = ConceptsPanel(self.ctl, self.fields)
        self.guidance = GuidancePanel(self.ctl, self.fields)
        self.run = RunPanel(self.ctl, self.fields)

    # --- layout ---------------------------------------------------------------------------------------
    def build(self) -> gr.Blocks:
        with gr.Blocks(analytics_enabled=False, title="Dreambooth") as blocks:
            with gr.Column(elem_id=TAB_ID):
                self.message = gr.HTML("", elem_id="db_message")
                with gr.Row(equal_height=False):
                    with gr.Column(scale=3, elem_id="db_settings_column"):
                        self.models.build()
                        self._sections()
                    with gr.Column(scale=2, elem_id="db_output_column"):
                        self.run.build_output()
                gr.HTML(self._help_holder(), elem_id="db_help_holder")
            self._wire(blocks)
        return blocks

    def _sections(self) -> None:
        with gr.Tabs(elem_id="db_sections"):
            with gr.Tab("Concepts", elem_id="db_tab_concepts"):
                self.concepts.build()
            with gr.Tab("Parameters", elem_id="db_tab_parameters"):
                self._parameters_section()
            with gr.Tab("Saving", elem_id="db_tab_saving"):
                self._groups_section(forms.SAVING_GROUPS)
            with gr.Tab("Generate", elem_id="db_tab_generate"):
                self.run.build_generate()
            with gr.Tab("Wizard", elem_id="db_tab_wizard"):
                self.guidance.build_wizard()
            with gr.Tab("Presets & memory", elem_id="db_tab_presets"):
                self.guidance.build_presets()

    def _help_holder(self) -> str:
        data = html.escape(json.dumps(forms.help_texts()), quote=True)
        return f'<div id="db_help_data" data-help="{data}"></div>'

    def _parameters_section(self) -> None:
        defaults = TrainingConfig()
        with gr.Tabs(elem_id="db_parameter_groups"):
            for group, specs in forms.parameter_groups().items():
                with gr.Tab(group, elem_id=f"db_group_{_slug(group)}"):
                    self.fields.add_controls(specs, defaults)

    def _groups_section(self, groups: tuple[str, ...]) -> None:
        grouped, defaults = forms.grouped_specs(forms.config_specs()), TrainingConfig()
        for group in groups:
            gr.Markdown(f"#### {group}")
            self.fields.add_controls(grouped.get(group, []), defaults)

    # --- the shared form -------------------------------------------------------------------------------
    @property
    def settings(self) -> dict[str, Any]:
        return self.fields.settings

    @property
    def panels(self) -> list[Any]:
        """The concept panels."""
        return self.fields.panels

    @property
    def form(self) -> list[Any]:
        """Components in forms.form_values order."""
        return self.fields.components

    @property
    def lora_tools(self) -> LoraToolsSection:
        return self.run.lora_tools

    # --- wiring -----------------------------------------------------------------------------------------
    def _wire(self, blocks: gr.Blocks) -> None:
        model = self.models.model
        self.models.wire(self._event, self.message)
        self.concepts.wire(self._event, self.message, model)
        self.run.wire(self._event, self.message, model)
        self.guidance.wire(self._event, self.message)
        self.run.lora_tools.wire(self._event, self.message)
        self.run.wire_polling(blocks)
        # A (re)loaded page shows the current model list and the selected model's saved config.
        form_out = self.fields.outputs + [self.message]
        refreshed = blocks.load(guarded(self.models.on_refresh_models, 2), [model], [model, self.message],
                                show_progress="hidden", **compat.private())
        refreshed.then(guarded(self.models.on_select, len(form_out)), [model], form_out, show_progress="hidden",
                       **compat.private())

    def _event(self, trigger: Any, fn: Callable[..., list[Any]], inputs: list[Any], outputs: list[Any],
               api_name: str | None = None) -> Any:
        # Unnamed events stay out of the API page; named ones are what gradio_client tests call.
        naming = {"api_name": api_name} if api_name else compat.private()
        return trigger(guarded(fn, len(outputs)), inputs, outputs, show_progress="minimal", **naming)


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in text.lower())


def create_tab(host: Host, service: Any, store: ModelStore | None = None) -> gr.Blocks:
    """The training tab over a host, a TrainingService and the model store (default: the host's layout)."""
    return DreamboothTab(host, service, store or ModelStore(host.layout)).build()
