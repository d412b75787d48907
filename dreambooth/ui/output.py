"""What the Output panel shows for a training status: progress bar, status lines, errors, loss/LR plot.

Pure functions of a status snapshot (the service's TrainStatus or anything with the same attributes);
the plot is drawn with PIL so it looks the same under every gradio version.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from typing import Any

from PIL import Image, ImageDraw, ImageFont

PLOT_SIZE = (640, 260)
_MARGIN_LEFT, _MARGIN_RIGHT, _MARGIN_TOP, _MARGIN_BOTTOM = 58, 66, 14, 28
_LOSS_COLOUR, _LR_COLOUR, _AXIS_COLOUR, _GRID_COLOUR = (37, 99, 235), (234, 88, 12), (90, 90, 90), (225, 225, 225)


def format_duration(seconds: float | None) -> str:
    """'1:02:03', '4:05' or '-' for unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "-"
    whole = int(round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _get(status: Any, name: str, default: Any = None) -> Any:
    if isinstance(status, dict):
        return status.get(name, default)
    return getattr(status, name, default)


def fraction_of(status: Any) -> float:
    step, total = _get(status, "step", 0) or 0, _get(status, "total_steps", 0) or 0
    return min(1.0, step / total) if total > 0 else 0.0


def progress_html(status: Any) -> str:
    """The progress bar with step, epoch, it/s and ETA; data-* attributes let the script read the state."""
    state = _get(status, "state", "idle")
    percent = 100.0 * fraction_of(status)
    step, total = _get(status, "step", 0), _get(status, "total_steps", 0)
    epoch, epochs = _get(status, "epoch", 0), _get(status, "total_epochs", 0)
    speed = _get(status, "it_per_s", 0.0) or 0.0
    job = (_get(status, "job", "") or "train").replace("_", " ")
    # The trainer counts epochs from 0 (the one in progress); people count from 1.
    shown_epoch = min(epoch + 1, epochs) if epochs else epoch
    facts = [f"{job}: {html.escape(state)}", f"step {step}/{total}", f"epoch {shown_epoch}/{epochs}",
             f"{speed:.2f} it/s", f"ETA {format_duration(_get(status, 'eta_s'))}"]
    loss = _get(status, "last_loss")
    if loss is not None:
        facts.append(f"loss {loss:.4f}")
    return (f'<div class="db-progress" data-state="{html.escape(state)}" data-step="{step}" '
            f'data-total="{total}" data-percent="{percent:.1f}">'
            f'<div class="db-progress-track"><div class="db-progress-fill" style="width:{percent:.1f}%"></div></div>'
            f'<div class="db-progress-text">{" · ".join(facts)}</div></div>')


def status_markdown(status: Any) -> str:
    """The message, the model, saved files and warnings as Markdown lines."""
    lines = []
    model = _get(status, "model", "")
    message = _get(status, "message", "") or ("Idle." if not model else "")
    lines.append(f"**{_md(model)}** {_md(message)}" if model else _md(message))
    for kind, path in _saved_pairs(_get(status, "saved", []) or [])[-5:]:
        lines.append(f"- saved {_md(kind)}: `{path}`")
    for warning in (_get(status, "warnings", []) or [])[-5:]:
        lines.append(f"- ⚠ {_md(warning)}")
    return "\n".join(lines)


def _saved_pairs(saved: Sequence[Any]) -> list[tuple[str, str]]:
    pairs = []
    for item in saved:
        if isinstance(item, dict):
            pairs.append((str(item.get("kind", "")), str(item.get("path", ""))))
        else:
            pairs.append((str(item[0]), str(item[1])))
    return pairs


def _md(text: str) -> str:
    # Keep user text literal inside Markdown.
    return html.escape(str(text)).replace("*", "\\*").replace("_", "\\_")


def error_html(message: str | None) -> str:
    """A visible error box; empty when there is no error. Our errors already say what to do."""
    if not message:
        return ""
    return f'<div class="db-error" role="alert"><b>Error:</b> {html.escape(message)}</div>'


def notice_html(message: str | None) -> str:
    if not message:
        return ""
    return f'<div class="db-notice">{html.escape(message)}</div>'


def status_signature(status: Any) -> tuple[Any, ...]:
    """Changes whenever something in the plot or the gallery would change."""
    losses = _get(status, "losses", []) or []
    return (_get(status, "started_at"), len(losses), tuple(_get(status, "samples", []) or []))


# --- loss and learning-rate plot --------------------------------------------------------------------

def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default()


def _scale(values: Sequence[float]) -> tuple[float, float]:
    low, high = min(values), max(values)
    if math.isclose(low, high):
        pad = abs(low) * 0.1 or 1.0
        return low - pad, high + pad
    return low, high


def _label(value: float) -> str:
    return f"{value:.3g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.1e}"


def _polyline(points: Sequence[tuple[float, float]], x_range: tuple[float, float], y_range: tuple[float, float],
              box: tuple[int, int, int, int]) -> list[tuple[float, float]]:
    left, top, right, bottom = box
    (x0, x1), (y0, y1) = x_range, y_range
    span_x = (x1 - x0) or 1.0
    return [(left + (x - x0) / span_x * (right - left), bottom - (y - y0) / (y1 - y0) * (bottom - top))
            for x, y in points]


def render_loss_plot(losses: Sequence[Sequence[float]], size: tuple[int, int] = PLOT_SIZE) -> Image.Image:
    """Loss (left axis, blue) and learning rate (right axis, orange) over steps, from (step, loss, lr)."""
    width, height = size
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    box = (_MARGIN_LEFT, _MARGIN_TOP, width - _MARGIN_RIGHT, height - _MARGIN_BOTTOM)
    points = [(float(p[0]), float(p[1]), float(p[2]) if len(p) > 2 else 0.0) for p in losses
              if all(math.isfinite(float(v)) for v in p)]
    draw.rectangle(box, outline=_AXIS_COLOUR)
    if not points:
        draw.text((box[0] + 10, (box[1] + box[3]) // 2), "No loss yet: start training.", fill=_AXIS_COLOUR,
                  font=_font())
        return image
    x_range = (points[0][0], points[-1][0])
    loss_range, lr_range = _scale([p[1] for p in points]), _scale([p[2] for p in points])
    _grid_and_labels(draw, box, x_range, loss_range, lr_range)
    for series, colour, y_range in ((2, _LR_COLOUR, lr_range), (1, _LOSS_COLOUR, loss_range)):
        line = _polyline([(p[0], p[series]) for p in points], x_range, y_range, box)
        if len(line) == 1:
            x, y = line[0]
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour)
        else:
            draw.line(line, fill=colour, width=2)
    draw.text((box[0] + 6, box[1] + 2), "loss", fill=_LOSS_COLOUR, font=_font())
    draw.text((box[2] - 24, box[1] + 2), "LR", fill=_LR_COLOUR, font=_font())
    return image


def _grid_and_labels(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], x_range: tuple[float, float],
                     loss_range: tuple[float, float], lr_range: tuple[float, float]) -> None:
    left, top, right, bottom = box
    font = _font()
    for tick in range(5):
        t = tick / 4
        y = bottom - t * (bottom - top)
        draw.line((left + 1, y, right - 1, y), fill=_GRID_COLOUR)
        loss_value = loss_range[0] + t * (loss_range[1] - loss_range[0])
        lr_value = lr_range[0] + t * (lr_range[1] - lr_range[0])
        draw.text((4, y - 6), _label(loss_value), fill=_LOSS_COLOUR, font=font)
        draw.text((right + 4, y - 6), _label(lr_value), fill=_LR_COLOUR, font=font)
        x = left + t * (right - left)
        step = x_range[0] + t * (x_range[1] - x_range[0])
        draw.text((x - 8, bottom + 6), str(int(round(step))), fill=_AXIS_COLOUR, font=font)
