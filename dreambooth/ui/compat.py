"""The few places where gradio 3.41 (A1111), 4.x (Forge) and 5 differ, feature-detected, never by version."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import gradio as gr

from .forms import ControlSpec

POLL_SECONDS = 1.5


@cache
def _parameters(factory: Callable[..., Any]) -> frozenset[str]:
    target = factory.__init__ if inspect.isclass(factory) else factory
    return frozenset(inspect.signature(target).parameters)


def supported(factory: Callable[..., Any], **kwargs: Any) -> dict[str, Any]:
    """`kwargs` without the arguments this gradio's `factory` does not name (it would warn or fail)."""
    names = _parameters(factory)
    return {key: value for key, value in kwargs.items() if key in names}


def private() -> dict[str, Any]:
    """Keep an event off the API page: api_visibility="private" where gradio has it, else api_name=False."""
    if "api_visibility" in _parameters(gr.Blocks.load):
        return {"api_visibility": "private"}
    return {"api_name": False}


def has_timer() -> bool:
    """gradio >= 4.40 has gr.Timer; 3.41 polls with `every=` on a load event instead."""
    return hasattr(gr, "Timer")


def js_argument(code: str) -> dict[str, str]:
    """An event's client-side function: `js=` in gradio 4/5, `_js=` in 3.x."""
    key = "js" if "js" in _parameters(gr.Blocks.load) else "_js"
    return {key: code}


def control(spec: ControlSpec, value: Any, elem_id: str) -> Any:
    """The gradio component of one setting; its help text goes to the tooltip script, not under the label."""
    common = {"label": spec.label, "value": value, "elem_id": elem_id}
    if spec.kind == "checkbox":
        return gr.Checkbox(**common)
    if spec.kind == "dropdown":
        return gr.Dropdown(choices=list(spec.choices or ()), **common)
    if spec.kind == "slider":
        return gr.Slider(minimum=spec.minimum, maximum=spec.maximum, step=spec.step, **common)
    if spec.kind == "number":
        extra = supported(gr.Number, precision=spec.precision, minimum=spec.minimum, maximum=spec.maximum)
        if spec.precision is None:
            # A float box: without this gradio 5 steps (and browser-validates) in whole units.
            extra.update(supported(gr.Number, step=1e-9))
        return gr.Number(**common, **extra)
    max_lines = 1 if spec.lines == 1 else 20  # single-line settings get a plain input, no scrollbar
    return gr.Textbox(lines=spec.lines, max_lines=max_lines, interactive=not spec.read_only, **common)


def button(label: str, elem_id: str, variant: str = "secondary", small: bool = False) -> Any:
    return gr.Button(label, variant=variant, elem_id=elem_id, **supported(gr.Button, size="sm" if small else None))


def gallery(label: str, elem_id: str, columns: int = 4) -> Any:
    return gr.Gallery(label=label, elem_id=elem_id, **supported(gr.Gallery, columns=columns, height="auto",
                                                                   object_fit="contain"))


def uploaded_path(value: Any) -> Path | None:
    """The path of an uploaded file: a string in gradio 4/5, a tempfile wrapper with .name in 3.x."""
    if value is None:
        return None
    if isinstance(value, list):
        value = value[0] if value else None
        return uploaded_path(value)
    if isinstance(value, (str, Path)):
        return Path(value)
    name = getattr(value, "name", None) or getattr(value, "path", None)
    return Path(name) if name else None


def poll(blocks: Any, fn: Callable[..., Any], inputs: list[Any], outputs: list[Any]) -> Any:
    """Call `fn` every POLL_SECONDS for each open page: a gr.Timer (4.40+), else a load event with every=.

    Both restart on every page load, so a reload during training resumes showing the run.
    """
    if has_timer():
        timer = gr.Timer(POLL_SECONDS)
        timer.tick(fn, inputs, outputs, show_progress="hidden", **private())
        return timer
    return blocks.load(fn, inputs, outputs, every=POLL_SECONDS, show_progress="hidden", **private())


def head_argument(head_html: str) -> dict[str, str]:
    """Blocks(head=...) where gradio has it (4.x+); empty for 3.x (see inject_script)."""
    return supported(gr.Blocks, head=head_html)


def update(**kwargs: Any) -> Any:
    return gr.update(**kwargs)
