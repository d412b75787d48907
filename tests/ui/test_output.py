"""The Output panel's pure parts: progress bar, status lines, errors, the growing loss plot."""

from __future__ import annotations

from dreambooth.service import TrainStatus
from dreambooth.ui import output


def test_progress_bar_shows_step_epoch_speed_and_eta() -> None:
    # The trainer counts epochs from 0: epoch 2 is the third one.
    status = TrainStatus(state="running", step=25, total_steps=100, epoch=2, total_epochs=8, it_per_s=1.5,
                         eta_s=3725, last_loss=0.1234)
    text = output.progress_html(status)
    assert 'data-state="running"' in text and 'data-percent="25.0"' in text and "width:25.0%" in text
    for part in ("step 25/100", "epoch 3/8", "1.50 it/s", "ETA 1:02:05", "loss 0.1234"):
        assert part in text


def test_duration_and_fraction_edge_cases() -> None:
    assert output.format_duration(65) == "1:05"
    assert output.format_duration(None) == "-" and output.format_duration(float("inf")) == "-"
    assert output.fraction_of(TrainStatus(step=5, total_steps=0)) == 0.0
    assert output.fraction_of({"step": 150, "total_steps": 100}) == 1.0


def test_status_lists_saves_and_warnings_escaped() -> None:
    status = TrainStatus(model="dog", message="Training <now>", saved=[("lora", "/x/dog.safetensors")],
                         warnings=["it/s collapsed"])
    text = output.status_markdown(status)
    assert "&lt;now&gt;" in text and "/x/dog.safetensors" in text and "it/s collapsed" in text


def test_error_box_only_when_there_is_an_error() -> None:
    assert output.error_html(None) == ""
    assert "Lower the batch size" in output.error_html("Out of memory. Lower the batch size")


def test_loss_plot_grows_with_the_history() -> None:
    empty = output.render_loss_plot([])
    short = output.render_loss_plot([(1, 0.5, 1e-4), (2, 0.4, 1e-4)])
    longer = output.render_loss_plot([(s, 1.0 / s, 1e-4 * s) for s in range(1, 50)])
    assert empty.size == short.size == output.PLOT_SIZE
    assert empty.tobytes() != short.tobytes() != longer.tobytes()
    # The loss line is drawn in its colour somewhere inside the plot box.
    assert output._LOSS_COLOUR in {pixel for _, pixel in longer.getcolors(maxcolors=100000)}


def test_signature_changes_with_new_losses_or_samples() -> None:
    first = TrainStatus(started_at=1.0, losses=[(1, 0.5, 1e-4)])
    assert output.status_signature(first) != output.status_signature(
        TrainStatus(started_at=1.0, losses=[(1, 0.5, 1e-4), (2, 0.4, 1e-4)]))
    assert output.status_signature(first) != output.status_signature(
        TrainStatus(started_at=1.0, losses=[(1, 0.5, 1e-4)], samples=["a.png"]))
