"""Training wizard: steps, epochs, learning rate and class images from the community parameter study.

The formulas are those of the community parameter study, sd_dreambooth_extension discussion #547
(https://github.com/d8ahazard/sd_dreambooth_extension/discussions/547); a "frame" is one training image:

* Steps per frame (SPF): 200 at LR 1e-5 without text-encoder training, 100 with it; inversely
  proportional to the LR; multiplied by RC = (resolution / base resolution)^2.  The 200 is what SD 1.5
  needed in the parameter study (the model's reference SPF); a model of another scale gives its own (the shapes world's
  tiny model, trained from scratch in minutes, needs about 170x more), and the rest of the formulas hold.
* Strength F (low_end 0.20 ... high_end 5.00): the number of frames one concept can absorb at LR 1e-5.
  Frames for a strength at an LR: (1e-5 / LR) x F.  LR for frames and a strength: 1e-5 / (FN / F).
* Class images: FN x 200, or FN x 100 with text-encoder training.
* Batch: SPF_A = SPF (with TE) or SPF / 1.5 rounded up (without), ADS = SPF_A x (BS - 1),
  steps = (FN x SPF + ADS) / sqrt(BS).  Accumulation: x sqrt(GA).  Scheduler: x its step multiplier.

Two ways to pick the LR:

* by strength (the parameter study's "advanced formula", the default): the LR is scaled to the frames of one
  concept and the SPF stays at its LR-1e-5 value, so steps = FN x SPF(1e-5);
* by LR (the parameter study's "full pass" formula): every frame gets a full pass at that LR,
  SPF = SPF(1e-5) x 1e-5 / LR, steps = FN x SPF.  The parameter study caps this at 5 frames per concept.

With several concepts the steps use the frames of all concepts together and the LR the frames of one
concept (the largest, so none is oversaturated).  Everything here is plain arithmetic: no torch.
"""

from __future__ import annotations

import argparse
import copy
import math
from dataclasses import dataclass, field

from ..config.schema import FAMILIES, PARAMETER_STUDY, SCHEDULERS, TrainingConfig
from ..errors import ConfigError
from ..families import get_family

REFERENCE_LR = 1e-5
SPF_WITHOUT_TE = 200
SPF_WITH_TE = 100
# Frames one concept holds at LR 1e-5 in the parameter study's standard formula; above it the token oversaturates.
STANDARD_FRAME_LIMIT = 5
CLASS_IMAGES_PER_FRAME = {False: 200, True: 100}

STRENGTHS: dict[str, float] = {
    "low_end": 0.20, "ultra_soft": 0.25, "very_soft": 0.33, "soft": 0.50, "medium": 1.00,
    "hard": 2.00, "very_hard": 3.00, "ultra_hard": 4.00, "high_end": 5.00,
}

# Steps of a decaying schedule relative to constant (parameter study: linear/cosine/restarts 2, polynomial ~2).
# rex is not in the parameter study: 1 / (mean LR factor of REX) = 1 / (2 - 2 ln 2), the rule that gives 2 for linear.
SCHEDULER_STEP_MULTIPLIERS: dict[str, float] = {
    "constant": 1.0, "constant_with_warmup": 1.0, "linear": 2.0, "cosine": 2.0,
    "cosine_with_restarts": 2.0, "polynomial": 2.0, "rex": 1.0 / (2.0 - 2.0 * math.log(2.0)),
}
# EveryDream2's --scale_lr exponent (seed 000), derived from SD's 1e-4 at batch 4096 vs DreamBooth's 1e-6.
EVERYDREAM_SCALE_EXPONENT = 0.55


# --- the formulas, one small function each ---------------------------------------------------------

def resolution_factor(resolution: int, base_resolution: int) -> float:
    """RC = (RES / RES_B)^2."""
    return (resolution / base_resolution) ** 2


def reference_steps(reference_spf: float, te: bool) -> float:
    """Steps per frame at LR 1e-5: the model's reference SPF, halved with the text encoder (200 -> 100)."""
    return reference_spf * SPF_WITH_TE / SPF_WITHOUT_TE if te else reference_spf


def steps_per_frame(lr: float = REFERENCE_LR, te: bool = False, resolution: int = 512,
                    base_resolution: int = 512, reference_spf: float = SPF_WITHOUT_TE) -> float:
    """SPF = (200 | 100 with TE) x (1e-5 / LR) x RC, for a model whose reference SPF is 200 (SD 1.5)."""
    return reference_steps(reference_spf, te) * (REFERENCE_LR / lr) * resolution_factor(resolution, base_resolution)


def incremental_steps_per_frame(spf: float, te: bool) -> int | float:
    """SPF_A: SPF with TE, SPF / 1.5 rounded up without (parameter study: SPF 200 gives SPF_A 134)."""
    return spf if te else math.ceil(spf / 1.5 - 1e-9)


def strength_value(strength: str | float) -> float:
    """F for a strength name (low_end ... high_end) or a number."""
    if isinstance(strength, (int, float)):
        return float(strength)
    key = strength.strip().lower().replace(" ", "_").replace("-", "_")
    if key not in STRENGTHS:
        raise ConfigError(f"Wizard strength '{strength}' is unknown; choose one of {', '.join(STRENGTHS)}.")
    return STRENGTHS[key]


def frames_for_strength(strength: str | float, lr: float) -> float:
    """Frames a concept needs for strength F at an LR: (1e-5 / LR) x F."""
    return (REFERENCE_LR / lr) * strength_value(strength)


def lr_for_frames(frames: int, strength: str | float) -> float:
    """LR = 1e-5 / (FN / F)."""
    return REFERENCE_LR / (frames / strength_value(strength))


def strength_of(frames: int, lr: float) -> float:
    """The F that FN frames at an LR amount to: FN / (1e-5 / LR)."""
    return frames / (REFERENCE_LR / lr)


def class_images_for(frames: int, te: bool) -> int:
    """num_class_images = FN x 200, or FN x 100 with text-encoder training."""
    return frames * CLASS_IMAGES_PER_FRAME[te]


def batch_steps(frames: int, spf: float, te: bool, batch_size: int) -> float:
    """max_train_steps = (FN x SPF + ADS) / sqrt(BS), ADS = SPF_A x (BS - 1)."""
    ads = incremental_steps_per_frame(spf, te) * (batch_size - 1)
    return (frames * spf + ads) / math.sqrt(batch_size)


def accumulation_factor(accumulation: int) -> float:
    """Steps grow with sqrt(GA)."""
    return math.sqrt(accumulation)


def scheduler_multiplier(scheduler: str) -> float:
    if scheduler not in SCHEDULER_STEP_MULTIPLIERS:
        raise ConfigError(f"Wizard scheduler '{scheduler}' is unknown; choose one of {', '.join(SCHEDULERS)}.")
    return SCHEDULER_STEP_MULTIPLIERS[scheduler]


def scale_lr_factor(mode: str, batch_size: int, accumulation: int, processes: int = 1) -> float:
    """What the trainer's scale_lr multiplies the LR by: linear (x BS x GA x GPUs) or EveryDream2's ^0.55."""
    total = batch_size * accumulation * processes
    factors = {"none": 1.0, "linear": float(total), "sqrt": total ** EVERYDREAM_SCALE_EXPONENT}
    if mode not in factors:
        raise ConfigError(f"Setting 'scale_lr': {mode!r} is unknown; choose none, linear or sqrt.")
    return factors[mode]


def round_steps(value: float) -> int:
    """Round half up (the parameter study's tables: 777.8 -> 778, 600.8 -> 601)."""
    return int(math.floor(value + 0.5))


def dynamic_resolution_steps(frames: int, resolutions: list[int], spf_at: dict[int, float]) -> float:
    """Steps for training at several resolutions: the mean of FN x SPF over them."""
    return sum(frames * spf_at[res] for res in resolutions) / len(resolutions)


# --- the wizard ------------------------------------------------------------------------------------

def reference_resolution(family: str) -> int:
    """The resolution the parameter study's steps per image refer to for a family: its native one."""
    return get_family(family).resolution


@dataclass
class WizardInput:
    """What the wizard needs.  Give `lr` or `strength` (neither: strength 'medium').

    `resolution` and `base_resolution` default (0) to the model family's native resolution.
    """

    images: list[int] | int
    te: bool = False
    lr: float | None = None
    strength: str | float | None = None
    batch: int = 1
    accumulation: int = 1
    resolution: int = 0
    base_resolution: int = 0
    scheduler: str = "constant"
    extra_resolutions: tuple[int, ...] = ()
    scale_lr: str = "none"
    family: str = "sd1"
    reference_spf: float = SPF_WITHOUT_TE  # the model's steps per image at LR 1e-5 without the text encoder

    def __post_init__(self) -> None:
        self.resolution = self.resolution or reference_resolution(self.family)
        self.base_resolution = self.base_resolution or reference_resolution(self.family)

    def image_counts(self) -> list[int]:
        return [self.images] if isinstance(self.images, int) else list(self.images)


@dataclass
class Line:
    """One result with the formula and the numbers substituted, for the tab and the CLI."""

    name: str
    value: float | int | str
    formula: str

    def __str__(self) -> str:
        return f"{self.name:<22} {_fmt(self.value):>12}   {self.formula}"


@dataclass
class WizardResult:
    max_train_steps: int
    num_train_epochs: int
    learning_rate: float
    learning_rate_setting: float
    class_images: list[int]
    train_text_encoder: bool
    lr_scheduler: str
    strength: float
    steps_per_frame: float
    lines: list[Line] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def text(self) -> str:
        body = [str(line) for line in self.lines] + [f"note: {note}" for note in self.notes]
        return "\n".join(body)


def _fmt(value: float | int | str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, int) or float(value).is_integer() and abs(value) >= 1:
        return str(int(value))
    if abs(value) < 1e-3:
        return f"{value:.3g}"
    return f"{value:.4g}"


def _check_input(inp: WizardInput) -> list[int]:
    counts = inp.image_counts()
    if not counts or any(count < 1 for count in counts):
        raise ConfigError("Wizard: every concept needs at least one image (--images N, or one count per concept).")
    if inp.lr is not None and inp.strength is not None:
        raise ConfigError("Wizard: give either a learning rate or a strength, not both.")
    if inp.lr is not None and inp.lr <= 0:
        raise ConfigError("Wizard: the learning rate must be above 0, e.g. 1e-6.")
    if not inp.reference_spf > 0:
        raise ConfigError(f"Wizard: the model's steps per image at LR 1e-5 must be above 0 ({SPF_WITHOUT_TE} for "
                          "SD 1.5, from the parameter study).")
    for name, value in (("batch", inp.batch), ("accumulation", inp.accumulation),
                        ("resolution", inp.resolution), ("base resolution", inp.base_resolution)):
        if value < 1:
            raise ConfigError(f"Wizard: {name} must be at least 1.")
    scheduler_multiplier(inp.scheduler)
    return counts


def plan(inp: WizardInput) -> WizardResult:
    """Max steps, epochs, LR and class images per concept, each with its formula."""
    counts = _check_input(inp)
    total, largest = sum(counts), max(counts)
    lines: list[Line] = []
    notes: list[str] = []
    lr, strength, spf_lr = _learning_rate(inp, largest, lines, notes)
    spf = _steps_per_frame_line(inp, spf_lr, lines)
    steps = _steps(inp, total, spf, lines)
    epochs = _epochs(inp, total, steps, lines)
    lr_setting = _scaled_lr_line(inp, lr, lines)
    class_images = [class_images_for(count, inp.te) for count in counts]
    per_te = CLASS_IMAGES_PER_FRAME[inp.te]
    lines.append(Line("class images", ", ".join(map(str, class_images)),
                      " ; ".join(f"{count} x {per_te} = {n}" for count, n in zip(counts, class_images, strict=True))))
    _general_notes(inp, counts, notes)
    return WizardResult(max_train_steps=steps, num_train_epochs=epochs, learning_rate=lr,
                        learning_rate_setting=lr_setting, class_images=class_images, train_text_encoder=inp.te,
                        lr_scheduler=inp.scheduler, strength=strength, steps_per_frame=spf, lines=lines,
                        notes=notes)


def _learning_rate(inp: WizardInput, frames: int, lines: list[Line], notes: list[str]
                   ) -> tuple[float, float, float]:
    """The LR, the strength F and the LR the SPF is taken at (1e-5 by strength, the LR itself by LR)."""
    if inp.lr is None:
        strength = strength_value(inp.strength if inp.strength is not None else "medium")
        lr = lr_for_frames(frames, strength)
        lines.append(Line("learning rate", lr, f"LR = 1e-5 / (FN / F) = 1e-5 / ({frames} / {strength:g})"))
        return lr, strength, REFERENCE_LR
    lr = inp.lr
    medium_frames = frames_for_strength("medium", lr)
    lines.append(Line("learning rate", lr, "given (full pass: every image gets SPF steps at this LR)"))
    lines.append(Line("images for 'medium'", medium_frames,
                      f"(1e-5 / LR) x F = (1e-5 / {lr:g}) x 1.00 (the advanced formula's count at this LR)"))
    if frames > STANDARD_FRAME_LIMIT:
        notes.append(f"{frames} images per concept with a fixed LR: the full-pass formula of {PARAMETER_STUDY} "
                     f"holds up to {STANDARD_FRAME_LIMIT} (more oversaturate the token and blur); use a strength instead so "
                     "the LR scales to the images.")
    strength = strength_of(frames, lr)
    return lr, strength, lr


def _steps_per_frame_line(inp: WizardInput, spf_lr: float, lines: list[Line]) -> float:
    spf = steps_per_frame(spf_lr, inp.te, inp.resolution, inp.base_resolution, inp.reference_spf)
    base = reference_steps(inp.reference_spf, inp.te)
    lines.append(Line("steps per frame", spf, f"SPF = {_fmt(base)} x (1e-5 / {spf_lr:g}) x ({inp.resolution} / "
                      f"{inp.base_resolution})^2" + (" (with text encoder)" if inp.te else "")))
    return spf


def _steps(inp: WizardInput, frames: int, spf: float, lines: list[Line]) -> int:
    resolutions = [inp.resolution, *[r for r in inp.extra_resolutions if r != inp.resolution]]
    if len(resolutions) > 1:
        base_spf = spf / resolution_factor(inp.resolution, inp.base_resolution)
        spf_at = {res: base_spf * resolution_factor(res, inp.base_resolution) for res in resolutions}
        work = dynamic_resolution_steps(frames, resolutions, spf_at)
        lines.append(Line("frames x SPF", work, "mean over resolutions of FN x SPF = ("
                          + " + ".join(f"{frames} x {_fmt(spf_at[r])}" for r in resolutions)
                          + f") / {len(resolutions)}"))
        spf = work / frames
    ads = incremental_steps_per_frame(spf, inp.te) * (inp.batch - 1)
    raw = batch_steps(frames, spf, inp.te, inp.batch)
    raw *= accumulation_factor(inp.accumulation) * scheduler_multiplier(inp.scheduler)
    steps = round_steps(raw)
    lines.append(Line("max steps", steps,
                      f"(FN x SPF + ADS) / sqrt(BS) x sqrt(GA) x m = ({frames} x {_fmt(spf)} + {_fmt(ads)}) / "
                      f"sqrt({inp.batch}) x sqrt({inp.accumulation}) x {_fmt(scheduler_multiplier(inp.scheduler))}"
                      f" ({inp.scheduler}); ADS = SPF_A x (BS - 1)"))
    return steps


def _epochs(inp: WizardInput, frames: int, steps: int, lines: list[Line]) -> int:
    from ..train.data.runlength import counted_batches, run_length

    length = run_length(counted_batches([frames], inp.batch), inp.accumulation, steps, 0)
    epochs = max(1, length.total_epochs)
    lines.append(Line("epochs", epochs, f"ceil(steps / ceil(ceil(FN / BS) / GA)) = ceil({steps} / "
                      f"{length.steps_per_epoch})"))
    return epochs


def _scaled_lr_line(inp: WizardInput, lr: float, lines: list[Line]) -> float:
    """The LR to enter so that, after the trainer's scale_lr, training runs at the formula's LR."""
    factor = scale_lr_factor(inp.scale_lr, inp.batch, inp.accumulation)
    if inp.scale_lr == "none":
        return lr
    rule = "BS x GA" if inp.scale_lr == "linear" else f"(BS x GA)^{EVERYDREAM_SCALE_EXPONENT}"
    setting_lr = lr / factor
    lines.append(Line("LR setting", setting_lr, f"LR / {rule} = {lr:.3g} / {factor:.4g} "
                      f"(scale_lr={inp.scale_lr} multiplies it back)"))
    return setting_lr


def _general_notes(inp: WizardInput, counts: list[int], notes: list[str]) -> None:
    if len(set(counts)) > 1:
        notes.append(f"Concepts have different image counts: {PARAMETER_STUDY} found they bleed into each "
                     "other less with equal counts; the LR uses the largest concept.")
    if inp.batch > min(counts):
        notes.append(f"Batch {inp.batch} is larger than a concept's {min(counts)} images; {PARAMETER_STUDY} keeps "
                     "batch <= images and images divisible by the batch.")
    if inp.accumulation > 1:
        notes.append(f"According to {PARAMETER_STUDY}, accumulation comes close to, but does not equal, a larger "
                     "batch; it advises 1.")


# --- apply to a config -----------------------------------------------------------------------------

def apply(result: WizardResult, config: TrainingConfig) -> TrainingConfig:
    """A copy of `config` with the wizard's steps, epochs, LR, TE switch, scheduler and class images."""
    updated = copy.deepcopy(config)
    updated.max_train_steps = result.max_train_steps
    updated.num_train_epochs = result.num_train_epochs
    updated.learning_rate = result.learning_rate_setting
    updated.train_text_encoder = result.train_text_encoder
    updated.lr_scheduler = result.lr_scheduler
    if result.train_text_encoder:
        # The parameter study trained the text encoder at the UNet's LR.
        updated.text_encoder_lr = result.learning_rate_setting
        updated.text_encoder_2_lr = result.learning_rate_setting
    if updated.concepts and len(updated.concepts) != len(result.class_images):
        raise ConfigError(f"Wizard: planned {len(result.class_images)} concept(s) but the config has "
                          f"{len(updated.concepts)}; give one image count per concept.")
    for concept, count in zip(updated.concepts, result.class_images, strict=False):
        concept.num_class_images = count
    return updated


# --- CLI -------------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `python -m dreambooth wizard`."""
    parser.add_argument("--images", type=int, nargs="+", required=True, metavar="N",
                        help="Training images per concept, e.g. '--images 10' or '--images 5 5' for two concepts.")
    parser.add_argument("--te", action="store_true",
                        help="Also train the text encoder (halves the steps per image and the class images).")
    choice = parser.add_mutually_exclusive_group()
    choice.add_argument("--lr", type=float, default=None,
                        help="Learning rate you want to train at, e.g. 1e-6; steps per image scale with 1e-5/LR.")
    choice.add_argument("--strength", default=None, choices=list(STRENGTHS),
                        help="Training strength (default: medium); the LR is scaled to the images per concept.")
    parser.add_argument("--batch", type=int, default=1, help="Batch size (default 1).")
    parser.add_argument("--accum", type=int, default=1, help="Gradient accumulation steps (default 1).")
    parser.add_argument("--family", default="sd1", choices=list(FAMILIES),
                        help="Model family: its native resolution is the default resolution and base resolution.")
    parser.add_argument("--resolution", type=int, default=0,
                        help="Training resolution in pixels (default: the family's native one).")
    parser.add_argument("--base-resolution", type=int, default=0,
                        help=f"Resolution the steps of {PARAMETER_STUDY} refer to (default: the family's native "
                        "one, e.g. 512 for SD 1.x, 1024 for SDXL).")
    parser.add_argument("--reference-spf", type=float, default=SPF_WITHOUT_TE,
                        help=f"The model's steps per image at LR 1e-5 without the text encoder (default "
                        f"{SPF_WITHOUT_TE}: SD 1.5's in {PARAMETER_STUDY}); the shapes world's demo model needs "
                        "its own, see README.")
    parser.add_argument("--scheduler", default="constant", choices=list(SCHEDULERS),
                        help="LR scheduler; decaying ones need about 2x the steps of constant.")
    parser.add_argument("--scale-lr", default="none", choices=("none", "linear", "sqrt"),
                        help="The scale_lr setting you train with; the printed LR setting undoes it.")


def run_cli(args: argparse.Namespace) -> int:
    """Print the wizard's plan for parsed `add_arguments` flags; 0 on success."""
    images = args.images if len(args.images) > 1 else args.images[0]
    inp = WizardInput(images=images, te=args.te, lr=args.lr, strength=args.strength, batch=args.batch,
                      accumulation=args.accum, resolution=args.resolution, base_resolution=args.base_resolution,
                      scheduler=args.scheduler, scale_lr=args.scale_lr, family=args.family,
                      reference_spf=args.reference_spf)
    print(plan(inp).text())
    return 0
