"""The tab's "LoRA tools" accordion: extract, resize and merge LoRAs into the host's folders.

Built inside the tab's layout and wired through the tab's `_event` (errors land in the tab's message
box). Only components common to gradio 3.41, 4.x and 5 are used. Every job runs through the
service's GPU slot (TrainingService.run_tool) and names files inside the host's folders only.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr

from ..errors import ConfigError
from . import compat, output

OWN_BASE = "(the model's own base)"
INTO_LORA = "(into one LoRA)"
RANK_MODES = ["fixed", "ratio", "energy"]


class LoraToolsSection:
    """Components of the accordion, their choices and their handlers."""

    def __init__(self, ctl: Any):
        self.ctl = ctl

    # --- choices ------------------------------------------------------------------------------------------
    def checkpoints(self) -> list[str]:
        return list(self.ctl.checkpoint_choices())

    def sources(self) -> list[str]:
        return [f"model:{name}" for name in self.ctl.model_names()] + self.checkpoints()

    def loras(self) -> list[str]:
        root = Path(self.ctl.host.layout.lora_dir)
        return sorted(str(path.relative_to(root)) for path in root.rglob("*.safetensors")) if root.is_dir() else []

    # --- layout -------------------------------------------------------------------------------------------
    def build(self) -> LoraToolsSection:
        with gr.Accordion("LoRA tools", open=False, elem_id="db_lora_tools"):
            gr.Markdown("Extract a LoRA from a trained model, resize one, or merge LoRAs into a checkpoint or "
                        "one LoRA. Results go to the web UI's LoRA and checkpoint folders.")
            with gr.Row():
                self.rank_mode = gr.Dropdown(choices=RANK_MODES, value="fixed", label="Rank mode",
                                             elem_id="db_lt_rank_mode")
                self.rank_value = gr.Number(value=8, label="Rank / ratio / energy fraction", elem_id="db_lt_rank")
                self.max_rank = gr.Number(value=128, label="Max rank (dynamic)", elem_id="db_lt_max_rank",
                                          **compat.supported(gr.Number, precision=0))
                self.conv_rank = gr.Number(value=0, label="Conv rank (LoCon, extract)", elem_id="db_lt_conv_rank",
                                           **compat.supported(gr.Number, precision=0))
            with gr.Row():
                self.out_name = gr.Textbox(label="Output name (optional)", elem_id="db_lt_out")
                self.precision = gr.Dropdown(choices=["fp32", "fp16", "bf16"], value="fp32", label="Precision",
                                             elem_id="db_lt_precision")
                self.refresh = compat.button("Refresh lists", "db_lt_refresh", small=True)
            self._extract_row()
            self._resize_merge_rows()
            self.report = gr.Textbox(label="Report", lines=6, interactive=False, elem_id="db_lt_report")
        return self

    def _extract_row(self) -> None:
        with gr.Row():
            sources = self.sources()
            self.source = gr.Dropdown(choices=sources, value=sources[0] if sources else None,
                                      label="Trained model or checkpoint", elem_id="db_lt_source")
            self.base = gr.Dropdown(choices=[OWN_BASE, *self.checkpoints()], value=OWN_BASE, label="Base checkpoint",
                                    elem_id="db_lt_base")
            self.extract_button = compat.button("Extract LoRA", "db_lt_extract")

    def _resize_merge_rows(self) -> None:
        loras = self.loras()
        with gr.Row():
            self.lora = gr.Dropdown(choices=loras, value=loras[0] if loras else None, label="LoRA to resize",
                                    elem_id="db_lt_lora")
            self.resize_button = compat.button("Resize LoRA", "db_lt_resize")
        with gr.Row():
            self.merge_loras = gr.Dropdown(choices=loras, value=[], multiselect=True, label="LoRAs to merge",
                                           elem_id="db_lt_merge_loras")
            self.merge_weights = gr.Textbox(label="Weights (comma-separated, default 1)", elem_id="db_lt_weights")
            self.merge_into = gr.Dropdown(choices=[INTO_LORA, *self.checkpoints()], value=INTO_LORA,
                                          label="Merge into", elem_id="db_lt_into")
            self.merge_button = compat.button("Merge", "db_lt_merge")

    # --- wiring -------------------------------------------------------------------------------------------
    def wire(self, event: Callable[..., Any], message: Any) -> None:
        rank = [self.rank_mode, self.rank_value, self.max_rank]
        common = [self.out_name, self.precision]
        event(self.extract_button.click, self.on_extract, [self.source, self.base, *rank, self.conv_rank, *common],
              [self.report, message], "db_lora_extract")
        event(self.resize_button.click, self.on_resize, [self.lora, *rank, *common], [self.report, message],
              "db_lora_resize")
        event(self.merge_button.click, self.on_merge, [self.merge_loras, self.merge_weights, self.merge_into,
                                                       *rank, *common], [self.report, message], "db_lora_merge")
        event(self.refresh.click, self.on_refresh, [], [self.source, self.base, self.lora, self.merge_loras,
                                                         self.merge_into, message])

    # --- handlers (the report, then the tab's message box) ------------------------------------------------
    def _run(self, job: str, work: Callable[[], Any]) -> list[Any]:
        result = self.ctl.service.run_tool(job, work)
        return [result.message, output.notice_html(result.message.splitlines()[0])]

    def on_extract(self, source: str | None, base: str | None, mode: str, value: Any, max_rank: Any,
                   conv_rank: Any, out: str, precision: str) -> list[Any]:
        from ..loratools import jobs

        if not source:
            raise ConfigError("No trained model or checkpoint chosen; pick one, or press Refresh lists.")
        rule = jobs.rule_from(mode, value, max_rank)
        conv = jobs.conv_rule_for(rule, int(conv_rank or 0))
        layout = self.ctl.host.layout
        return self._run("lora_extract", lambda: jobs.extract(layout, source, None if base in (None, OWN_BASE) else base,
                                                              rule, conv, out or None, precision or "fp32"))

    def on_resize(self, lora: str | None, mode: str, value: Any, max_rank: Any, out: str, precision: str) -> list[Any]:
        from ..loratools import jobs

        rule = jobs.rule_from(mode, value, max_rank)
        layout = self.ctl.host.layout
        return self._run("lora_resize", lambda: jobs.resize(layout, lora or "", rule, out or None,
                                                            precision=precision or "fp32"))

    def on_merge(self, loras: list[str] | None, weights: str, into: str | None, mode: str, value: Any,
                 max_rank: Any, out: str, precision: str) -> list[Any]:
        from ..loratools import jobs

        weighted = pair_weights(list(loras or []), weights)
        layout = self.ctl.host.layout
        if into and into != INTO_LORA:
            return self._run("lora_merge", lambda: jobs.merge_to_checkpoint(layout, into, weighted, out or None,
                                                                            precision or "fp16"))
        # Fixed mode merges by concatenating ranks (exact); ratio/energy re-factor the sum by SVD.
        rule = None if mode in (None, "fixed") else jobs.rule_from(mode, value, max_rank)
        return self._run("lora_merge", lambda: jobs.merge_to_lora(layout, weighted, rule, out or None,
                                                                  precision=precision or "fp32"))

    def on_refresh(self) -> list[Any]:
        sources, checkpoints, loras = self.sources(), self.checkpoints(), self.loras()
        return [compat.update(choices=sources), compat.update(choices=[OWN_BASE, *checkpoints]),
                compat.update(choices=loras), compat.update(choices=loras),
                compat.update(choices=[INTO_LORA, *checkpoints]), ""]


def pair_weights(loras: list[str], weights: str) -> list[tuple[str, float]]:
    """The chosen LoRAs with the comma-separated weights in order (missing weights are 1)."""
    if not loras:
        raise ConfigError("No LoRA chosen to merge; pick at least one.")
    texts = [text.strip() for text in (weights or "").split(",") if text.strip()]
    if len(texts) > len(loras):
        raise ConfigError(f"{len(texts)} weights for {len(loras)} LoRAs; give one weight per LoRA.")
    try:
        values = [float(text) for text in texts]
    except ValueError:
        raise ConfigError(f"Weights {weights!r} are not numbers; write e.g. 1, 0.5.") from None
    return [(name, values[index] if index < len(values) else 1.0) for index, name in enumerate(loras)]
