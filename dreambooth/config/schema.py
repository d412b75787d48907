"""The one settings schema.

Every setting is a dataclass field whose metadata carries its label, help text, group, range and
choices. The tab's controls, the JSON files and the CLI flags are all generated from these fields,
so a setting exists in exactly one place.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError

SCHEMA_VERSION = 2


def setting(default: Any, label: str, help: str, group: str, *, min: float | None = None,
            max: float | None = None, choices: tuple[str, ...] | None = None,
            ui_only: str | None = None, multiline: bool = False) -> Any:
    """A dataclass field with the metadata the UI, JSON and CLI are generated from.

    `ui_only` holds the reason a setting does not change what training does (for the honesty
    matrix); leave it None for every setting that acts on training.
    """
    meta = {"label": label, "help": help, "group": group, "min": min, "max": max,
            "choices": choices, "ui_only": ui_only, "multiline": multiline}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


# Groups, in the order the tab shows them.
GROUPS = ("Model", "Method", "Steps", "Learning rate", "Optimizer", "Prior preservation", "LoRA",
          "Data", "Captions", "Augmentation", "Masked training", "Validation", "Loss and noise",
          "Precision and memory", "Text encoder", "EMA", "Saving", "Samples", "Logging", "Faults")

SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
              "polynomial", "rex")
OPTIMIZERS = ("adamw", "adamw_8bit", "lion", "lion_8bit", "prodigy", "adafactor", "adamw_schedulefree")
FAMILIES = ("sd1", "sd2", "sd2v", "sdxl")


@dataclass
class Concept:
    """One subject or style to train, with its own images, prompts and class images."""

    instance_data_dir: str = setting("", "Instance images folder", "Folder with the images of your subject. "
                                     "Captions are read from same-named .txt or .caption files beside each image.",
                                     "Concept")
    instance_prompt: str = setting("", "Instance prompt", "Prompt for the instance images, e.g. 'photo of sks dog'. "
                                   "'[filewords]' is replaced by the image's caption file; the instance and class "
                                   "tokens are inserted into captions that lack them.", "Concept")
    instance_token: str = setting("", "Instance token", "The rare word that names your subject, e.g. 'sks'. "
                                  "Used to build prompts from [filewords] captions.", "Concept")
    class_token: str = setting("", "Class token", "The word for the subject's class, e.g. 'dog'.", "Concept")
    class_data_dir: str = setting("", "Class images folder", "Folder for prior-preservation images of the class. "
                                  "Empty: the model's class folder is used and missing images are generated.",
                                  "Concept")
    class_prompt: str = setting("", "Class prompt", "Prompt describing the class, e.g. 'photo of a dog'. Used to "
                                "generate class images and as their caption.", "Concept")
    class_negative_prompt: str = setting("", "Class negative prompt", "Negative prompt used when generating "
                                         "class images.", "Concept")
    num_class_images: int = setting(0, "Class images", "How many class images this concept trains with. "
                                    "Typical: 100-200 per instance image (the wizard computes it). Missing ones "
                                    "are generated before training.", "Concept", min=0, max=100000)
    class_guidance_scale: float = setting(7.5, "Class CFG scale", "Guidance scale for generating class images.",
                                          "Concept", min=1.0, max=30.0)
    class_infer_steps: int = setting(20, "Class steps", "Sampling steps for generating class images.", "Concept",
                                     min=1, max=150)
    repeats: int = setting(1, "Repeats", "How often each instance image is seen per epoch (kohya's N_ folder "
                           "prefix). Raise it to balance a concept with few images against others.", "Concept",
                           min=1, max=10000)
    sample_prompt: str = setting("", "Sample prompt", "Prompt for this concept's preview images during training. "
                                 "Empty: the instance prompt.", "Concept")
    sample_negative_prompt: str = setting("", "Sample negative prompt", "Negative prompt for previews.", "Concept")
    n_samples: int = setting(1, "Samples", "Preview images per sampling for this concept.", "Concept", min=0, max=16)
    sample_seed: int = setting(-1, "Sample seed", "Seed of the preview images (-1: the run's seed), fixed so "
                               "previews are comparable across steps.", "Concept", min=-1)
    sample_guidance_scale: float = setting(7.5, "Sample CFG scale", "Guidance scale of the previews.", "Concept",
                                           min=1.0, max=30.0)
    sample_steps: int = setting(20, "Sample steps", "Sampling steps of the previews.", "Concept", min=1, max=150)


@dataclass
class TrainingConfig:
    """The training config of one model; saved as db_config.json in the model's folder."""

    # --- Model -----------------------------------------------------------------------------------
    model_name: str = setting("", "Model name", "Name of the model folder under models/dreambooth.", "Model",
                              ui_only="names the folder; training reads the weights from it")
    base_checkpoint: str = setting("", "Base checkpoint", "The checkpoint this model was created from "
                                   "(recorded in exported metadata).", "Model",
                                   ui_only="provenance; the weights are already in the model's working folder")
    model_family: str = setting("sd1", "Model family", "Architecture: SD 1.x, SD 2.x (512, epsilon), SD 2.x 768 "
                                "v-prediction, or SDXL. Detected when the model is created.", "Model",
                                choices=FAMILIES)
    prediction_type: str = setting("epsilon", "Prediction type", "What the UNet predicts. v_prediction for SD 2.x "
                                   "768-v models; detected on creation.", "Model",
                                   choices=("epsilon", "v_prediction"))
    # --- Method ----------------------------------------------------------------------------------
    method: str = setting("dreambooth", "Method", "dreambooth: full weights with instance + class images. "
                          "lora: small adapter saved to the LoRA folder. finetune: full weights on captions.",
                          "Method", choices=("dreambooth", "lora", "finetune"))
    train_unet: bool = setting(True, "Train UNet", "Train the UNet (or its LoRA).", "Method")
    train_text_encoder: bool = setting(True, "Train text encoder", "Also train the text encoder(s). Halves the "
                                       "steps needed per image but uses more memory.", "Method")
    stop_text_encoder: float = setting(1.0, "Stop text encoder at", "Fraction of the run after which the text "
                                       "encoder is frozen (1.0: train it throughout; 0.75 is common).", "Method",
                                       min=0.0, max=1.0)
    # --- Steps -----------------------------------------------------------------------------------
    max_train_steps: int = setting(0, "Max steps", "Optimizer steps to train. 0: use epochs instead.", "Steps",
                                   min=0)
    num_train_epochs: int = setting(100, "Epochs", "Passes over the dataset when max steps is 0.", "Steps", min=0)
    train_batch_size: int = setting(1, "Batch size", "Images per forward pass. A batch never mixes bucket sizes.",
                                    "Steps", min=1, max=256)
    gradient_accumulation_steps: int = setting(1, "Gradient accumulation", "Forward passes summed per optimizer "
                                               "step; effective batch = batch size x this.", "Steps", min=1, max=1024)
    seed: int = setting(1234, "Seed", "Seed for noise, shuffling and augmentation; each epoch shuffles with "
                        "seed + epoch. -1: a random seed each run.", "Steps", min=-1)
    # --- Learning rate ---------------------------------------------------------------------------
    learning_rate: float = setting(2e-6, "UNet learning rate", "Learning rate of the UNet. Typical: 1e-6 to 5e-6 "
                                   "for DreamBooth, 1e-4 for LoRA. Steps needed scale inversely with it.",
                                   "Learning rate", min=0.0, max=1.0)
    text_encoder_lr: float = setting(1e-6, "Text encoder learning rate", "Learning rate of the (first) text "
                                     "encoder. Usually half the UNet's or less.", "Learning rate", min=0.0, max=1.0)
    text_encoder_2_lr: float = setting(1e-6, "Text encoder 2 learning rate", "Learning rate of SDXL's second text "
                                       "encoder (OpenCLIP bigG).", "Learning rate", min=0.0, max=1.0)
    lr_scheduler: str = setting("constant_with_warmup", "LR scheduler", "How the LR changes over the run. cosine "
                                "decays smoothly; rex decays slowly then fast; constant keeps it fixed.",
                                "Learning rate", choices=SCHEDULERS)
    lr_warmup_steps: int = setting(0, "Warmup steps", "Steps over which the LR ramps up from 0. -1: 2% of the run "
                                   "(EveryDream2's default).", "Learning rate", min=-1)
    lr_cycles: int = setting(1, "Scheduler cycles", "Restarts for cosine_with_restarts.", "Learning rate", min=1,
                             max=100)
    lr_power: float = setting(1.0, "Polynomial power", "Power of the polynomial decay (1.0 is linear).",
                              "Learning rate", min=0.01, max=10.0)
    lr_decay_past_end: float = setting(1.0, "Decay length factor", "The decaying schedules end at this multiple of "
                                       "the run (EveryDream2 decays a little past the end: 1.25 keeps the LR off 0).",
                                       "Learning rate", min=1.0, max=10.0)
    scale_lr: str = setting("none", "Scale LR", "Scale learning rates by the effective batch: linear (x batch x "
                            "accumulation) or sqrt (EveryDream2's (batch x accumulation)^0.55).", "Learning rate",
                            choices=("none", "linear", "sqrt"))
    # --- Optimizer -------------------------------------------------------------------------------
    optimizer: str = setting("adamw", "Optimizer", "adamw is the reference; the 8-bit ones save memory; prodigy "
                             "finds its own LR (set LR 1.0); adafactor and schedule-free need no scheduler tuning.",
                             "Optimizer", choices=OPTIMIZERS)
    weight_decay: float = setting(1e-2, "UNet weight decay", "Decoupled weight decay of the UNet parameters.",
                                  "Optimizer", min=0.0, max=1.0)
    text_encoder_weight_decay: float = setting(1e-2, "Text encoder weight decay", "Weight decay of the text "
                                               "encoder parameters.", "Optimizer", min=0.0, max=1.0)
    adam_beta1: float = setting(0.9, "Beta 1", "First moment decay of Adam-type optimizers.", "Optimizer",
                                min=0.0, max=0.9999)
    adam_beta2: float = setting(0.999, "Beta 2", "Second moment decay of Adam-type optimizers.", "Optimizer",
                                min=0.0, max=0.99999)
    adam_epsilon: float = setting(1e-8, "Epsilon", "Numerical floor of Adam's denominator.", "Optimizer",
                                  min=0.0, max=1.0)
    max_grad_norm: float = setting(1.0, "Clip grad norm", "Clip the gradient norm to this value (0: no clipping).",
                                   "Optimizer", min=0.0)
    # --- Prior preservation ----------------------------------------------------------------------
    with_prior_preservation: bool = setting(True, "Prior preservation", "Train on class images too so the model "
                                            "keeps what the class looks like (DreamBooth's prior loss).",
                                            "Prior preservation")
    prior_loss_weight: float = setting(1.0, "Prior loss weight", "Weight of each class image's loss relative to an "
                                       "instance image's. Lower it (0.3-0.75) if the subject does not stick.",
                                       "Prior preservation", min=0.0, max=10.0)
    # --- LoRA ------------------------------------------------------------------------------------
    lora_rank: int = setting(16, "LoRA rank", "Rank of the LoRA matrices. 4-32 for a subject, higher for styles.",
                             "LoRA", min=1, max=1024)
    lora_alpha: float = setting(16.0, "LoRA alpha", "Scales the LoRA by alpha/rank. Equal to rank: scale 1.",
                                "LoRA", min=0.0, max=2048.0)
    lora_dropout: float = setting(0.0, "LoRA dropout", "Dropout on the LoRA's input during training.", "LoRA",
                                  min=0.0, max=1.0)
    lora_conv_rank: int = setting(0, "Conv rank (LoCon)", "Also adapt the 3x3 convolutions with this rank "
                                  "(0: attention and linear layers only).", "LoRA", min=0, max=1024)
    lora_conv_alpha: float = setting(1.0, "Conv alpha", "Alpha of the convolution LoRA.", "LoRA", min=0.0,
                                     max=2048.0)
    use_dora: bool = setting(False, "DoRA", "Weight-decomposed LoRA (peft's use_dora): learns magnitude and "
                             "direction separately.", "LoRA")
    # --- Data ------------------------------------------------------------------------------------
    resolution: int = setting(512, "Resolution", "Training resolution in pixels (512 for SD1/SD2-base, 768 for "
                              "SD2-v, 1024 for SDXL). A multiple of 8; of 64 with buckets.", "Data", min=64,
                              max=4096)
    extra_resolutions: str = setting("", "Extra resolutions", "Comma-separated further resolutions for "
                                     "multi-resolution training, e.g. '384,768'. Each image is seen at each.",
                                     "Data")
    enable_bucketing: bool = setting(True, "Aspect-ratio buckets", "Train images at their aspect ratio instead of "
                                     "a centre crop.", "Data")
    bucket_min_resolution: int = setting(256, "Bucket min side", "Smallest bucket side in pixels.", "Data",
                                         min=64, max=4096)
    bucket_max_resolution: int = setting(1024, "Bucket max side", "Largest bucket side in pixels.", "Data",
                                         min=64, max=8192)
    bucket_step: int = setting(64, "Bucket step", "Bucket sides are multiples of this.", "Data", min=8, max=256)
    bucket_no_upscale: bool = setting(False, "No upscaling", "Never enlarge an image to fill a bucket; small "
                                      "images get a smaller bucket.", "Data")
    # --- Captions --------------------------------------------------------------------------------
    caption_extension: str = setting(".txt", "Caption extension", "Sidecar caption extension (.txt or .caption).",
                                     "Captions", choices=(".txt", ".caption"))
    shuffle_tags: bool = setting(False, "Shuffle tags", "Shuffle comma-separated caption tags each time an image "
                                 "is seen.", "Captions")
    keep_tokens: int = setting(1, "Keep first tags", "Tags at the start of the caption that stay in place when "
                               "shuffling.", "Captions", min=0, max=100)
    caption_dropout: float = setting(0.0, "Caption dropout", "Probability that an image is trained with an empty "
                                     "caption (EveryDream2's cond_dropout; 0.04-0.1 helps CFG).", "Captions",
                                     min=0.0, max=1.0)
    max_token_length: int = setting(75, "Max tokens", "Caption length in tokens: 75 is one CLIP chunk; 150 or 225 "
                                    "encode longer captions in chunks as the web UI does.", "Captions",
                                    choices=None, min=75, max=225)
    pad_tokens: bool = setting(True, "Pad tokens", "Pad captions to the full chunk length (as the web UI does at "
                               "inference) rather than to the longest caption of the batch.", "Captions")
    clip_skip: int = setting(1, "Clip skip", "Use the output of the N-th last text-encoder layer (2 for "
                             "anime-style SD1 models).", "Captions", min=1, max=12)
    # --- Augmentation ----------------------------------------------------------------------------
    hflip: bool = setting(False, "Horizontal flip", "Randomly mirror images. Avoid for asymmetric subjects.",
                          "Augmentation")
    random_crop: bool = setting(False, "Random crop", "Crop at a random position instead of the centre.",
                                "Augmentation")
    # --- Masked training -------------------------------------------------------------------------
    masked_training: bool = setting(False, "Masked training", "Weight the loss by '<image>-masklabel.png' masks "
                                    "(white: train, black: ignore).", "Masked training")
    unmasked_probability: float = setting(0.1, "Unmasked probability", "Fraction of steps trained without the mask.",
                                          "Masked training", min=0.0, max=1.0)
    unmasked_weight: float = setting(0.1, "Unmasked weight", "Loss weight of the area outside the mask.",
                                     "Masked training", min=0.0, max=1.0)
    normalize_masked_area_loss: bool = setting(False, "Normalise by mask area", "Divide the loss by the masked "
                                               "area so small masks train as strongly as large ones.",
                                               "Masked training")
    # --- Validation ------------------------------------------------------------------------------
    validation_split: float = setting(0.0, "Validation split", "Fraction of instance images held out to compute a "
                                      "validation loss.", "Validation", min=0.0, max=0.5)
    validation_every_n_steps: int = setting(0, "Validate every N steps", "How often the validation loss is "
                                            "computed (0: at the end of each epoch).", "Validation", min=0)
    # --- Loss and noise --------------------------------------------------------------------------
    loss_type: str = setting("l2", "Loss", "l2 (MSE), huber or smooth_l1: the latter two are robust to outliers.",
                             "Loss and noise", choices=("l2", "huber", "smooth_l1"))
    huber_c: float = setting(0.1, "Huber delta", "Threshold of the huber and smooth-L1 losses.", "Loss and noise",
                             min=0.0001, max=10.0)
    min_snr_gamma: float = setting(0.0, "Min-SNR gamma", "Min-SNR loss weighting (5.0 is typical; 0: off). "
                                   "Speeds up convergence.", "Loss and noise", min=0.0, max=100.0)
    offset_noise: float = setting(0.0, "Offset noise", "Zero-frequency noise strength (0.02-0.1) so the model can "
                                  "make very dark or bright images.", "Loss and noise", min=0.0, max=1.0)
    pyramid_noise_iterations: int = setting(0, "Pyramid noise iterations", "Multi-resolution noise levels "
                                            "(6-10 typical; 0: off).", "Loss and noise", min=0, max=16)
    pyramid_noise_discount: float = setting(0.3, "Pyramid noise discount", "Strength falloff per pyramid level.",
                                            "Loss and noise", min=0.0, max=1.0)
    zero_terminal_snr: bool = setting(False, "Zero terminal SNR", "Rescale the noise schedule so the last step is "
                                      "pure noise (use with v-prediction).", "Loss and noise")
    input_perturbation: float = setting(0.0, "Input perturbation", "Extra noise on the noisy input only (0.1 "
                                        "typical; 0: off).", "Loss and noise", min=0.0, max=1.0)
    # --- Precision and memory --------------------------------------------------------------------
    mixed_precision: str = setting("bf16", "Mixed precision", "Compute precision. Master weights stay fp32. bf16 is "
                                   "fast on recent GPUs and CPUs; fp16 needs CUDA.", "Precision and memory",
                                   choices=("no", "fp16", "bf16"))
    allow_tf32: bool = setting(True, "TF32", "Allow TF32 matmuls on Ampere and newer GPUs.", "Precision and memory")
    gradient_checkpointing: bool = setting(False, "Gradient checkpointing", "Recompute activations in backward: "
                                           "much less memory, about 20% slower.", "Precision and memory")
    cache_latents: str = setting("memory", "Cache latents", "Encode each image once with the VAE instead of every "
                                 "step: in memory or on disk (reused across runs).", "Precision and memory",
                                 choices=("off", "memory", "disk"))
    cache_text_encoder_outputs: bool = setting(False, "Cache text encoder outputs", "Encode captions once. Only when "
                                               "the text encoder is frozen and captions are fixed.",
                                               "Precision and memory")
    attention: str = setting("sdpa", "Attention", "sdpa (PyTorch's fused attention) or xformers (CUDA only; falls "
                             "back to sdpa with a message).", "Precision and memory", choices=("sdpa", "xformers"))
    # --- EMA -------------------------------------------------------------------------------------
    use_ema: bool = setting(False, "EMA", "Keep an exponential moving average of the trained weights.", "EMA")
    ema_decay: float = setting(0.999, "EMA decay", "Decay of the moving average.", "EMA", min=0.0, max=1.0)
    ema_update_every: int = setting(1, "EMA every N steps", "Update the average every N optimizer steps.", "EMA",
                                    min=1)
    ema_for_output: bool = setting(True, "Use EMA for saves and samples", "Save and sample the averaged weights.",
                                   "EMA")
    # --- Saving ----------------------------------------------------------------------------------
    save_every_n_steps: int = setting(0, "Save every N steps", "Write a checkpoint/LoRA every N steps (0: off).",
                                      "Saving", min=0)
    save_every_n_epochs: int = setting(0, "Save every N epochs", "Write a checkpoint/LoRA every N epochs (0: off).",
                                       "Saving", min=0)
    save_keep_last: int = setting(0, "Keep last N saves", "Delete older intermediate saves (0: keep all).",
                                  "Saving", min=0)
    snapshot_every_n_steps: int = setting(0, "Snapshot every N steps", "Save the full training state (optimizer, "
                                          "RNG, data order) to resume from (0: only at stop).", "Saving", min=0)
    save_precision: str = setting("fp16", "Save precision", "Precision of exported checkpoints and LoRAs. fp16 can "
                                  "drop small updates: fp32 keeps everything.", "Saving",
                                  choices=("fp32", "fp16", "bf16"))
    save_on_end: bool = setting(True, "Save at end", "Export the checkpoint or LoRA to the web UI's folders when "
                                "training ends.", "Saving")
    # --- Samples ---------------------------------------------------------------------------------
    sample_every_n_steps: int = setting(0, "Sample every N steps", "Render preview images every N steps (0: off).",
                                        "Samples", min=0)
    sample_prompts: str = setting("", "Sample prompt lines", "Extra preview prompts, one per line, in sd-scripts "
                                  "syntax: 'prompt --n negative --w 512 --h 512 --d seed --l cfg --s steps'.",
                                  "Samples", multiline=True)
    sample_scheduler: str = setting("ddim", "Sample scheduler", "Sampler of the previews.", "Samples",
                                    choices=("ddim", "euler", "euler_a", "dpmpp_2m"))
    # --- Logging ---------------------------------------------------------------------------------
    log_every_n_steps: int = setting(1, "Log every N steps", "How often loss and LR are logged (the loss is "
                                     "averaged over the interval).", "Logging", min=1)
    # --- Faults ----------------------------------------------------------------------------------
    nan_policy: str = setting("stop", "On NaN loss", "stop: stop and keep the last good save. skip: skip the step, "
                              "up to the limit below.", "Faults", choices=("stop", "skip"))
    max_nan_skips: int = setting(10, "NaN skip limit", "Non-finite steps skipped before stopping.", "Faults",
                                 min=0)

    concepts: list[Concept] = field(default_factory=list, metadata={"group": "Concepts", "label": "Concepts",
                                                                     "help": "The concepts to train."})


def settings(cls: type = TrainingConfig) -> list[dataclasses.Field]:
    """The schema's scalar settings of `cls`, in declaration order."""
    return [f for f in dataclasses.fields(cls) if f.name != "concepts"]


def field_type(cls: type, name: str) -> type:
    hints = typing.get_type_hints(cls)
    return hints[name]


def parse_value(cls: type, name: str, raw: Any) -> Any:
    """Convert `raw` (a JSON value or a CLI string) to the field's type, or raise naming the field."""
    kind = field_type(cls, name)
    try:
        if kind is bool:
            return _parse_bool(raw)
        if kind is int:
            if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                raise ValueError
            return int(raw)
        if kind is float:
            if isinstance(raw, bool):
                raise ValueError
            return float(raw)
        if kind is str:
            if not isinstance(raw, (str, int, float)) or isinstance(raw, bool):
                raise ValueError
            return str(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"Setting '{name}': {raw!r} is not a valid {kind.__name__}.") from None
    raise ConfigError(f"Setting '{name}' cannot be set from a single value.")


def _parse_bool(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(raw)


def check_value(cls: type, f: dataclasses.Field, value: Any) -> None:
    """Raise ConfigError naming the field, the value and what is allowed, if `value` is out of bounds."""
    meta = f.metadata
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"Setting '{f.name}': {value!r} is not a finite number.")
    choices = meta.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"Setting '{f.name}': {value!r} is not allowed; choose one of {', '.join(choices)}.")
    low, high = meta.get("min"), meta.get("max")
    if low is not None and value < low:
        raise ConfigError(f"Setting '{f.name}': {value!r} is below the minimum {low}.")
    if high is not None and value > high:
        raise ConfigError(f"Setting '{f.name}': {value!r} is above the maximum {high}.")


def validate(config: TrainingConfig) -> TrainingConfig:
    """Check every setting of the config and its concepts; raise ConfigError on the first bad one."""
    for f in settings(TrainingConfig):
        value = parse_value(TrainingConfig, f.name, getattr(config, f.name))
        setattr(config, f.name, value)
        check_value(TrainingConfig, f, value)
    for index, concept in enumerate(config.concepts):
        for f in settings(Concept):
            try:
                value = parse_value(Concept, f.name, getattr(concept, f.name))
                check_value(Concept, f, value)
            except ConfigError as error:
                raise ConfigError(f"Concept {index + 1}: {error}") from None
            setattr(concept, f.name, value)
    _check_resolutions(config)
    return config


def _check_resolutions(config: TrainingConfig) -> None:
    for resolution in training_resolutions(config):
        if not 64 <= resolution <= 4096:
            raise ConfigError(f"Setting 'resolution'/'extra_resolutions': {resolution} is outside 64-4096 pixels.")
        if resolution % 8:
            raise ConfigError(f"Setting 'resolution'/'extra_resolutions': {resolution} is not a multiple of 8; "
                              "use e.g. 512, 768 or 1024.")


def training_resolutions(config: TrainingConfig) -> list[int]:
    """The base resolution followed by the extra ones of multi-resolution training."""
    extra = []
    for part in config.extra_resolutions.replace(";", ",").split(","):
        part = part.strip()
        if not part:
            continue
        if not (part.isascii() and part.isdigit()):
            raise ConfigError(f"Setting 'extra_resolutions': {part!r} is not a whole number of pixels; "
                              "write e.g. '384,768'.")
        extra.append(int(part))
    return [config.resolution] + [r for r in extra if r != config.resolution]
