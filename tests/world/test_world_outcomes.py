"""Training on the shapes world learns the subject and keeps the class: the outcomes (a)-(e) with bounds.

Each run is the project's own trainer on the shipped world model (demo settings unless the row says
otherwise), measured over fixed seeds by the evaluator; `python -m dreambooth.world.outcomes` prints the
same measures as a table. The runs are shared by the tests of this module (trained on first use).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from dreambooth.world.outcomes import Outcomes, Sampling, World


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Outcomes]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest, and a busy machine does not slow it further
    try:
        yield Outcomes(World(Path(tmp_path_factory.mktemp("world")), Sampling()))
    finally:
        torch.set_num_threads(threads)


def test_a_dreambooth_learns_the_subject(outcomes: Outcomes) -> None:
    assert outcomes.base_subject_rate() <= 0.1  # the base model does not draw it by itself
    assert outcomes.subject_rate("dreambooth") >= 0.9


def test_b_prior_preservation_keeps_the_class_and_its_absence_drifts(outcomes: Outcomes) -> None:
    without, with_prior = outcomes.drift("dreambooth"), outcomes.drift("prior")
    assert without >= 0.5, "without prior preservation 'a circle' should drift toward the subject"
    assert with_prior <= 0.3 and with_prior < without
    assert outcomes.subject_rate("prior") >= 0.9


def test_c_lora_learns_the_subject(outcomes: Outcomes) -> None:
    assert outcomes.subject_rate("lora") >= 0.9


def test_c_a_fine_tune_on_captions_learns_a_new_colour_word(outcomes: Outcomes) -> None:
    assert outcomes.base_colour() <= 0.1
    assert outcomes.finetune_colour() >= 0.7


def test_d_exported_files_render_as_the_trainer_sampled(outcomes: Outcomes) -> None:
    assert abs(outcomes.exported_checkpoint_rate() - outcomes.subject_rate("dreambooth")) <= 0.1
    assert abs(outcomes.exported_lora_rate() - outcomes.subject_rate("lora")) <= 0.1


def test_e_the_wizard_plan_scores_as_well_as_the_demo_settings(outcomes: Outcomes) -> None:
    assert outcomes.subject_rate("wizard") >= outcomes.subject_rate("dreambooth")
