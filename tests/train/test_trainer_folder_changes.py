"""A concept folder that changes during training does not crash the run (issue 7, item 5)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image

from dreambooth.train.events import Progress, TrainCallbacks


class EditsFolderAfterFirstStep(TrainCallbacks):
    """Deletes one instance image and rewrites another once training has started, as a user tidying up would."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.warnings: list[str] = []
        self.steps: list[int] = []

    def on_progress(self, progress: Progress) -> None:
        self.steps.append(progress.step)
        if progress.step == 1:
            images = sorted(self.folder.glob("*.png"))
            images[0].unlink()
            Image.new("RGB", (64, 64), (255, 0, 0)).save(images[1])

    def on_warning(self, text: str) -> None:
        self.warnings.append(text)


def test_deleted_and_rewritten_images_are_skipped_and_the_run_finishes(env: Any) -> None:
    folder = Path(env.config.concepts[0].instance_data_dir)
    callbacks = EditsFolderAfterFirstStep(folder)
    result = env.trainer(callbacks, max_train_steps=4, cache_latents="off", with_prior_preservation=False).run()
    assert result.completed and result.step == 4
    assert callbacks.steps == [1, 2, 3, 4]
    skipped = [w for w in callbacks.warnings if w.startswith("Skipped during training")]
    assert skipped and any("img0.png" in w for w in skipped) and any("img1.png" in w for w in skipped)
