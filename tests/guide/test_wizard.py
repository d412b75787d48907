"""The wizard reproduces every worked example of the community parameter study, sd_dreambooth_extension
discussion #547 (https://github.com/d8ahazard/sd_dreambooth_extension/discussions/547).

Each test quotes the sentence of the parameter study it reproduces.
"""

from __future__ import annotations

import argparse
import math

import pytest

from dreambooth.config.schema import Concept, TrainingConfig
from dreambooth.errors import ConfigError
from dreambooth.guide import wizard
from dreambooth.guide.wizard import WizardInput, apply, plan


# "For 1e-5, this is 200 steps, if you use Text Encoder, then 100 ... for 1e-6 it is 2000."
def test_steps_per_frame_at_reference_and_inverse_lr() -> None:
    assert wizard.steps_per_frame(1e-5, te=False) == pytest.approx(200)
    assert wizard.steps_per_frame(1e-5, te=True) == pytest.approx(100)
    assert wizard.steps_per_frame(1e-6, te=False) == pytest.approx(2000)
    assert wizard.steps_per_frame(1e-6, te=True) == pytest.approx(1000)


# "To train on the 768: SPF = 450 without TE, SPF = 225 s TE" and "RC=(RES / RES_B) ^ 2 ... SPF = SPF_B * RC"
def test_resolution_factor_768() -> None:
    assert wizard.resolution_factor(768, 512) == pytest.approx(2.25)
    assert wizard.steps_per_frame(1e-5, False, 768, 512) == pytest.approx(450)
    assert wizard.steps_per_frame(1e-5, True, 768, 512) == pytest.approx(225)


# "Example: LR=1e-6  medium = 10  hard = 20" (frames for a strength at an LR)
def test_frames_for_strength_example() -> None:
    assert wizard.frames_for_strength("medium", 1e-6) == pytest.approx(10)
    assert wizard.frames_for_strength("hard", 1e-6) == pytest.approx(20)
    # "very_soft = (1e-5 / LR) * 0.33 ... soft = (1e-5 / LR) * 0.5 ... very_hard = (1e-5/LR) * 3"
    assert wizard.frames_for_strength("very_soft", 1e-6) == pytest.approx(3.3)
    assert wizard.frames_for_strength("soft", 1e-6) == pytest.approx(5)
    assert wizard.frames_for_strength("very hard", 1e-6) == pytest.approx(30)


# "List of F: low_end 0.20 ultra_soft 0.25 very_soft 0.33 soft 0.50 medium 1.00 hard 2.00 very hard 3.00
#  ultra_hard 4.00 high_end 5.00"
def test_strength_table() -> None:
    expected = [("low_end", 0.2), ("ultra_soft", 0.25), ("very_soft", 0.33), ("soft", 0.5), ("medium", 1.0),
                ("hard", 2.0), ("very hard", 3.0), ("ultra_hard", 4.0), ("high_end", 5.0)]
    for name, value in expected:
        assert wizard.strength_value(name) == value
    with pytest.raises(ConfigError, match="strength"):
        wizard.strength_value("extreme")


# "Example: FN = 125  F = 1  LR = 8e-8" (LR = 1e-5 / (FN / F))
def test_lr_from_frames_example() -> None:
    assert wizard.lr_for_frames(125, "medium") == pytest.approx(8e-8)
    result = plan(WizardInput(images=125, strength="medium"))
    assert result.learning_rate == pytest.approx(8e-8)
    # "max_train_steps = FN * 200": the advanced formula keeps SPF at its 1e-5 value.
    assert result.max_train_steps == 125 * 200


# "Without TE: SPF_A = SPF / 1.5. Example, for SPF=200, SPF_A=134."  "For TE: SPF_A = SPF"
def test_incremental_steps_per_frame() -> None:
    assert wizard.incremental_steps_per_frame(200, te=False) == 134
    assert wizard.incremental_steps_per_frame(100, te=True) == 100


# "For example, 10 frames training with TE. With BS=1, max_train_steps=1000 ... BS=2, 778 ... BS=5, 626 ...
#  BS=10, 601"
@pytest.mark.parametrize(("batch", "steps"), [(1, 1000), (2, 778), (5, 626), (10, 601)])
def test_batch_table_ten_frames(batch: int, steps: int) -> None:
    result = plan(WizardInput(images=10, te=True, batch=batch))
    assert result.max_train_steps == steps


# "Now let's look at 100 frames. With BS=1, max_train_steps=10000 ... BS=2, 7142 ... BS=4, 5150 ... BS=5, 4651
#  ... BS=10, 3447"
@pytest.mark.parametrize(("batch", "steps"), [(1, 10000), (2, 7142), (4, 5150), (5, 4651), (10, 3447)])
def test_batch_table_hundred_frames(batch: int, steps: int) -> None:
    result = plan(WizardInput(images=100, te=True, batch=batch))
    assert result.max_train_steps == steps


# "max_train_steps = FN * SPF * √GA" and "(FN * SPF + ADS) / √BS * √GA"
def test_accumulation_factor() -> None:
    alone = plan(WizardInput(images=10, te=True, accumulation=4))
    assert alone.max_train_steps == wizard.round_steps(10 * 100 * math.sqrt(4))
    both = plan(WizardInput(images=10, te=True, batch=2, accumulation=4))
    assert both.max_train_steps == wizard.round_steps((10 * 100 + 100) / math.sqrt(2) * math.sqrt(4))
    # The narrative "with gradient_accumulation_steps=10 ... 1900 steps ... 190 training steps" is not a
    # formula and contradicts the stated one (10 x 100 x sqrt(10) = 3162); the stated formula is implemented.
    assert plan(WizardInput(images=10, te=True, accumulation=10)).max_train_steps == 3162


# "lr_scheduler step multipliers: constant - 1, linear/cosine/cosine_with_restarts-2, polynomial - ~2"
# and "max_train_steps = s * m"
def test_scheduler_multipliers() -> None:
    constant = plan(WizardInput(images=5, scheduler="constant")).max_train_steps
    for scheduler, multiplier in (("linear", 2), ("cosine", 2), ("cosine_with_restarts", 2), ("polynomial", 2),
                                  ("constant_with_warmup", 1)):
        assert plan(WizardInput(images=5, scheduler=scheduler)).max_train_steps == constant * multiplier
    # rex is not in the parameter study: between constant and linear, from its mean LR factor.
    assert 1 < wizard.scheduler_multiplier("rex") < 2


# "num_class_images = FN * 200  For Text Encoder: num_class_images = FN * 100"
def test_class_images() -> None:
    assert plan(WizardInput(images=[5, 8])).class_images == [1000, 1600]
    assert plan(WizardInput(images=[5, 8], te=True)).class_images == [500, 800]


# "I have two concepts ... 5 frames in the first one, and 5 in the second ... (5 + 5) * 200 = 2000 steps.
#  But lr for training is calculated based on the number of frames in one concept, that is ... for 5 frames."
def test_two_concepts() -> None:
    result = plan(WizardInput(images=[5, 5], strength="medium"))
    assert result.max_train_steps == 2000
    assert result.learning_rate == pytest.approx(wizard.lr_for_frames(5, "medium"))


# "10 frames at 512 resolution and 20 at 768 resolution (10 x 2 copies) ... 40 in 1024 (10 x 4 copies)"
# and "for 512 and 768 it will be: (1000 + 2250) / 2 = 1625"
def test_dynamic_resolution() -> None:
    result = plan(WizardInput(images=10, te=True, resolution=512, extra_resolutions=(768,)))
    assert result.max_train_steps == 1625


# "SPF = 200 * (1e-5 / LR)" with a fixed LR: every frame gets a full pass; the standard formula's
# "limit no more than 5" frames is reported.
def test_fixed_lr_full_pass_and_frame_limit() -> None:
    result = plan(WizardInput(images=3, lr=1e-6))
    assert result.max_train_steps == 3 * 2000
    assert result.learning_rate == 1e-6
    assert not result.notes
    many = plan(WizardInput(images=12, lr=1e-5))
    assert any("up to 5" in note for note in many.notes)


# scale_lr of the parameter study: "learning_rate * gradient_accumulation_steps * train_batch_size * num_processes";
# EveryDream2 (seed 000): "(batch_size times grad_accum)^0.55".
def test_scale_lr_rules() -> None:
    assert wizard.scale_lr_factor("linear", 2, 3, processes=2) == 12
    assert wizard.scale_lr_factor("sqrt", 2, 2) == pytest.approx(2.1435, rel=1e-4)
    assert wizard.scale_lr_factor("none", 8, 8) == 1
    result = plan(WizardInput(images=5, batch=2, accumulation=2, scale_lr="sqrt"))
    assert result.learning_rate_setting * 4 ** 0.55 == pytest.approx(result.learning_rate)


def test_every_result_has_a_substituted_formula() -> None:
    result = plan(WizardInput(images=10, te=True, batch=2))
    by_name = {line.name: line for line in result.lines}
    assert "(10 x 100 + 100) / sqrt(2)" in by_name["max steps"].formula
    assert "1e-5 / (10 / 1)" in by_name["learning rate"].formula
    assert "10 x 100 = 1000" in by_name["class images"].formula
    assert "ceil(778 / 5)" in by_name["epochs"].formula
    assert result.num_train_epochs == math.ceil(778 / 5)


def test_apply_fills_config() -> None:
    config = TrainingConfig(concepts=[Concept(), Concept()], train_text_encoder=False, lr_scheduler="constant")
    result = plan(WizardInput(images=[4, 6], te=True, scheduler="cosine"))
    updated = apply(result, config)
    assert updated.max_train_steps == result.max_train_steps == 2000
    assert updated.num_train_epochs == result.num_train_epochs
    assert updated.learning_rate == pytest.approx(wizard.lr_for_frames(6, "medium"))
    assert updated.text_encoder_lr == updated.learning_rate
    assert updated.train_text_encoder and updated.lr_scheduler == "cosine"
    assert [c.num_class_images for c in updated.concepts] == [400, 600]
    assert config.max_train_steps == 0  # the input config is untouched
    with pytest.raises(ConfigError, match="one image count per concept"):
        apply(plan(WizardInput(images=4)), config)


def test_bad_inputs_raise() -> None:
    with pytest.raises(ConfigError):
        plan(WizardInput(images=[5, 0]))
    with pytest.raises(ConfigError):
        plan(WizardInput(images=5, lr=1e-6, strength="hard"))
    with pytest.raises(ConfigError):
        plan(WizardInput(images=5, scheduler="sawtooth"))


def test_cli_prints_formulas(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    wizard.add_arguments(parser)
    args = parser.parse_args(["--images", "10", "--te", "--batch", "5", "--strength", "medium"])
    assert wizard.run_cli(args) == 0
    out = capsys.readouterr().out
    assert "626" in out and "(10 x 100 + 400) / sqrt(5)" in out
    with pytest.raises(SystemExit):
        parser.parse_args(["--images", "3", "--lr", "1e-6", "--strength", "hard"])




@pytest.mark.parametrize(("family", "native"), [("sd1", 512), ("sd2v", 768), ("sdxl", 1024), ("sdxlv", 1024)])
def test_reference_resolution_is_the_family_native_one(family: str, native: int) -> None:
    """At its native resolution every family gets the parameter study's steps per image; at another one the
    steps scale with the pixel count relative to the native one."""
    result = plan(WizardInput(images=10, family=family))
    assert result.steps_per_frame == wizard.SPF_WITHOUT_TE
    assert f"({native} / {native})^2" in result.text()
    doubled = plan(WizardInput(images=10, family=family, resolution=2 * native))
    assert doubled.steps_per_frame == 4 * wizard.SPF_WITHOUT_TE
    kept = plan(WizardInput(images=10, family=family, resolution=640, base_resolution=512))
    assert kept.steps_per_frame == wizard.SPF_WITHOUT_TE * (640 / 512) ** 2


def test_cli_takes_the_family(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    wizard.add_arguments(parser)
    assert wizard.run_cli(parser.parse_args(["--images", "10", "--family", "sdxl", "--resolution", "768"])) == 0
    assert "(768 / 1024)^2" in capsys.readouterr().out


def test_a_models_reference_spf_scales_the_steps_and_nothing_else() -> None:
    study = plan(WizardInput(images=6, te=True, lr=4e-4, resolution=64, base_resolution=64))
    own = plan(WizardInput(images=6, te=True, lr=4e-4, resolution=64, base_resolution=64, reference_spf=20000))
    assert own.steps_per_frame == pytest.approx(study.steps_per_frame * 100)
    assert own.max_train_steps == wizard.round_steps(6 * 20000 / 2 * (1e-5 / 4e-4))
    assert (own.learning_rate, own.class_images) == (study.learning_rate, study.class_images)
    assert "SPF = 10000 x (1e-5 / 0.0004)" in own.text()


def test_cli_and_tab_pass_the_models_reference_spf(capsys: pytest.CaptureFixture[str]) -> None:
    from dreambooth.ui.controller import TabController

    parser = argparse.ArgumentParser()
    wizard.add_arguments(parser)
    assert wizard.run_cli(parser.parse_args(["--images", "5", "--lr", "1e-5", "--reference-spf", "400"])) == 0
    assert "SPF = 400 x (1e-5 / 1e-05)" in capsys.readouterr().out
    tab = TabController.__new__(TabController)  # the wizard needs no service
    planned = tab.wizard_plan("5", False, "learning rate", "medium", 1e-5, 1, 1, 0, 0, "constant", "sd1", 400)
    assert planned.max_train_steps == 5 * 400
    with pytest.raises(ConfigError, match="steps per image"):
        plan(WizardInput(images=5, reference_spf=0))
