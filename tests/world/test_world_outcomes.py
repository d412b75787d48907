"""Training on the shapes world learns the subject and keeps the class: the outcomes (a)-(e) with bounds.

Each run is the project's own trainer on the shipped world model (demo settings unless the row says
otherwise), measured over fixed seeds by the evaluator; `python -m dreambooth.world.outcomes` prints the
same measures as a table. The runs are shared by the tests of this module (each trained once, on first use).
The bounds are `outcomes.BOUNDS`; README "Proof that training learns" gives the measured numbers.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from dreambooth.world.outcomes import (
    BOUNDS,
    WIZARD_LR,
    Outcomes,
    Sampling,
    World,
    lora_reaches_dreambooth,
    wizard_scores_as_well,
)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Outcomes]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest, and a busy machine does not slow it further
    try:
        yield Outcomes(World(Path(tmp_path_factory.mktemp("world")), Sampling()))
    finally:
        torch.set_num_threads(threads)


def test_a_dreambooth_learns_the_subject(outcomes: Outcomes) -> None:
    assert outcomes.base_subject_rate() <= BOUNDS.base_subject  # the base model does not draw it by itself
    assert outcomes.subject_rate("dreambooth") >= BOUNDS.subject


def test_b_prior_preservation_keeps_the_class_and_its_absence_drifts(outcomes: Outcomes) -> None:
    base, without, with_prior = (outcomes.class_subject_rate(), outcomes.class_subject_rate("dreambooth"),
                                 outcomes.class_subject_rate("prior"))
    assert without >= BOUNDS.drifted, "without prior preservation 'a circle' should become the subject"
    assert with_prior <= base + BOUNDS.kept
    assert outcomes.drift("prior") < outcomes.drift("dreambooth")


def test_c_lora_learns_the_subject(outcomes: Outcomes) -> None:
    assert lora_reaches_dreambooth(outcomes.subject_rate("lora"), outcomes.subject_rate("dreambooth"))


def test_c_a_fine_tune_on_captions_learns_a_new_colour_word(outcomes: Outcomes) -> None:
    assert outcomes.base_colour() <= BOUNDS.base_subject  # the base model has no word for pink
    assert outcomes.finetune_colour() >= BOUNDS.new_colour


def test_d_exported_files_render_as_the_trainer_sampled(outcomes: Outcomes) -> None:
    assert abs(outcomes.exported_checkpoint_rate() - outcomes.subject_rate("dreambooth")) <= BOUNDS.export
    assert abs(outcomes.exported_lora_rate() - outcomes.subject_rate("lora")) <= BOUNDS.export


def test_e_the_wizard_plan_scores_as_well_as_the_demo_settings(outcomes: Outcomes) -> None:
    planned = outcomes.makers["wizard"]()
    demo = outcomes.makers["dreambooth"]()
    assert planned.learning_rate == pytest.approx(demo.learning_rate * WIZARD_LR)
    assert planned.max_train_steps == round(demo.max_train_steps / WIZARD_LR)  # the same dose, LR x steps
    assert wizard_scores_as_well(outcomes.subject_rate("wizard"), outcomes.subject_rate("dreambooth"))
