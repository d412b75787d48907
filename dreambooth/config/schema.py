"""The one settings schema.

Every setting is a dataclass field whose metadata carries its label, help text, group, range and
choices. The tab's controls, the JSON files and the CLI flags are all generated from these fields,
so a setting exists in exactly one place.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from dataclasses import dataclass, field
from pathlib import PureWindowsPath
from typing import Any

from ..errors import ConfigError
from ..families import FAMILY_NAMES, all_families, get_family

SCHEMA_VERSION = 3
PREDICTION_TYPES = ("epsilon", "v_prediction", "flow_matching")
# The source of the flow-matching choices, named in their help texts.
SD3_PAPER = ("'Scaling Rectified Flow Transformers for High-Resolution Image Synthesis' (Esser et al. 2024, "
             "https://arxiv.org/abs/2403.03206)")
# The source of the step, LR and batch advice in help texts and the wizard, named where it is used.
PARAMETER_STUDY = ("the community parameter study (sd_dreambooth_extension discussion #547, "
                   "https://github.com/d8ahazard/sd_dreambooth_extension/discussions/547)")

# Bounds of inputs with no natural limit, so a typo or a hostile request fails early with a clear
# message instead of deep inside training (or after minutes of listing a huge config).
TEXT_MAX_LENGTH = 10_000          # characters of a prompt, token or other one-line text
MULTILINE_MAX_LENGTH = 100_000    # characters of multi-line text (sample prompt lines)
PATH_MAX_LENGTH = 4096            # characters of a folder or file path (PATH_MAX on Linux)
MAX_CONCEPTS = 1000               # concepts in one config
MAX_STEPS = 10_000_000            # optimizer steps, and step intervals
MAX_EPOCHS = 100_000
SEED_MAX = 2**32 - 1              # numpy's seed range; -1 asks for a random seed


def setting(default: Any, label: str, help: str, group: str, *, min: float | None = None,
            max: float | None = None, choices: tuple[str, ...] | None = None,
            ui_only: str | None = None, multiline: bool = False, max_length: int | None = None) -> Any:
    """A dataclass field with the metadata the UI, JSON and CLI are generated from.

    `ui_only` holds the reason a setting does not change what training does (for the honesty
    matrix); leave it None for every setting that acts on training. `max_length` bounds a text
    setting (default: TEXT_MAX_LENGTH, or MULTILINE_MAX_LENGTH for multi-line text).
    """
    if max_length is None and isinstance(default, str) and not choices:
        max_length = MULTILINE_MAX_LENGTH if multiline else TEXT_MAX_LENGTH
    meta = {"label": label, "help": help, "group": group, "min": min, "max": max,
            "choices": choices, "ui_only": ui_only, "multiline": multiline, "max_length": max_length}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


# Groups, in the order the tab shows them.
GROUPS = ("Model", "Method", "Steps", "Learning rate", "Optimizer", "Prior preservation", "LoRA",
          "Data", "Captions", "Augmentation", "Masked training", "Validation", "Loss and noise",
          "Flow matching", "Precision and memory", "Text encoder", "EMA", "Saving", "Samples", "Logging", "Faults")

# Settings a run can change and still be the same run: an interrupted run resumes after they change
# (snapshots.resumable_snapshot). Every other setting, of the config and of each concept, defines the run
# (run_settings); the value says why each of these does not change what the steps compute.
SAME_RUN_SETTINGS: dict[str, str] = {
    "model_name": "names the folder",
    "base_checkpoint": "a record of where the weights came from",
    "ema_for_output": "chooses the weights saved and sampled, not the ones trained",
    "gradient_checkpointing": "memory: the same steps, recomputed",
    "attention": "memory and speed: the same steps, another kernel",
    "allow_tf32": "speed: the same steps, another matmul precision",
    "save_every_n_steps": "saving", "save_every_n_epochs": "saving", "save_keep_last": "saving",
    "snapshot_every_n_steps": "saving", "save_precision": "saving", "save_on_end": "saving",
    "sample_every_n_steps": "previews", "sample_prompts": "previews", "sample_scheduler": "previews",
    "log_every_n_steps": "logging",
    "nan_policy": "what to do after a bad step; e.g. raise the limit to continue a run it stopped",
    "max_nan_skips": "what to do after a bad step; e.g. raise the limit to continue a run it stopped",
}
SAME_RUN_CONCEPT_SETTINGS: dict[str, str] = {
    "sample_prompt": "previews", "sample_negative_prompt": "previews", "n_samples": "previews",
    "sample_seed": "previews", "sample_guidance_scale": "previews", "sample_steps": "previews",
}
# The run's length: an unfinished run continues up to the new length (a finished run is never resumed).
RUN_LENGTH_SETTINGS = ("max_train_steps", "num_train_epochs")

SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
              "polynomial", "rex")
OPTIMIZERS = ("adamw", "adamw_8bit", "lion", "lion_8bit", "prodigy", "adafactor", "adamw_schedulefree")
FAMILIES = FAMILY_NAMES  # the registered model families (dreambooth/families), in registry order
FAMILY_CHOICES_TEXT = ", ".join(f"{family.name} ({family.label})" for family in all_families())


@dataclass
class Concept:
    """One subject or style to train, with its own images, prompts and class images."""

    instance_data_dir: str = setting("", "Instance images folder", "Folder with the images of your subject "
                                     "(png, jpg, webp, bmp); captions are read from same-named .txt or "
                                     ".caption files beside each image. Typical: 5-20 varied photos for a "
                                     "person or object, 20-200 for a style. Change it to train a different "
                                     "subject. A relative path is stored as an absolute one when the settings "
                                     "are saved (relative to the folder you work in); one written into "
                                     "db_config.json by hand is read relative to the model's folder.",
                                     "Concept", max_length=PATH_MAX_LENGTH)
    instance_prompt: str = setting("", "Instance prompt", "Prompt for the instance images, e.g. 'photo of "
                                   "sks dog'. '[filewords]' is replaced by the image's caption file; the "
                                   "instance and class tokens are inserted into captions that lack them. Use "
                                   "[filewords] only when you want to name per-image details at generation "
                                   "time.", "Concept")
    instance_token: str = setting("", "Instance token", "The rare word that names your subject, e.g. 'sks' "
                                  "or 'ohwx': a token the model knows little about. Used to build prompts "
                                  "from [filewords] captions. Change it if the word already means something "
                                  "in the base model.", "Concept")
    class_token: str = setting("", "Class token", "The word for the subject's class, e.g. 'dog', 'woman' or "
                               "'car'; inserted into [filewords] captions that lack it. Use the most "
                               "specific common word the base model already draws well.", "Concept")
    class_data_dir: str = setting("", "Class images folder", "Folder for prior-preservation images of the "
                                  "class. Empty: the model's class folder is used and missing images are "
                                  "generated. Set it to reuse class images across models or to supply real "
                                  "photos of the class, e.g. 'class/dog'. Relative paths are stored as "
                                  "absolute ones, as for the instance folder.",
                                  "Concept", max_length=PATH_MAX_LENGTH)
    class_prompt: str = setting("", "Class prompt", "Prompt describing the class, e.g. 'photo of a dog'. "
                                "Used to generate class images and as their caption. Make it match the "
                                "instance prompt without the instance token; leave empty only when the class "
                                "folder already holds enough images.", "Concept")
    class_negative_prompt: str = setting("", "Class negative prompt", "Negative prompt used when generating "
                                         "class images, e.g. 'blurry, lowres, deformed'. Empty is typical; "
                                         "add terms when generated class images show defects you would not "
                                         "want the model to keep.", "Concept")
    num_class_images: int = setting(0, "Class images", "How many class images this concept trains with. "
                                    "Typical: 200 per instance image, 100 when training the text encoder "
                                    "(the wizard computes it). Missing ones are generated before training. "
                                    "Lower it to save generation time; with 0 this concept has no prior "
                                    "images.", "Concept", min=0, max=100000)
    class_guidance_scale: float = setting(7.5, "Class CFG scale", "Classifier-free guidance (CFG) scale for "
                                          "generating class images. Typical: 7.5; lower (5-7) gives more "
                                          "varied, natural class images, higher follows the class prompt "
                                          "more strictly.",
                                          "Concept", min=1.0, max=30.0)
    class_infer_steps: int = setting(20, "Class steps", "Sampling steps per generated class image. Typical: "
                                     "20-30; raise it if class images look unfinished, lower it to generate "
                                     "many class images faster.", "Concept",
                                     min=1, max=150)
    repeats: int = setting(1, "Repeats", "How often each instance image is seen per epoch (kohya's N_ folder "
                           "prefix). Typical: 1. Raise it to balance a concept with few images against "
                           "others, e.g. 4 for 5 images next to a concept with 20.", "Concept",
                           min=1, max=10000)
    sample_prompt: str = setting("", "Sample prompt", "Prompt for this concept's preview images during "
                                 "training. Empty: the instance prompt. Set it to check editability, e.g. "
                                 "'sks dog wearing a hat on the moon'.", "Concept")
    sample_negative_prompt: str = setting("", "Sample negative prompt", "Negative prompt for this concept's "
                                          "previews, e.g. 'blurry, lowres'. Empty is typical; match what you "
                                          "use when generating with the trained model.", "Concept")
    n_samples: int = setting(1, "Samples", "Preview images rendered per sampling for this concept. Typical: "
                             "1-4; 0 skips this concept's previews. Raise it to see more variety; each image "
                             "costs time at every sampling.", "Concept", min=0, max=16)
    sample_seed: int = setting(-1, "Sample seed", "Seed of the preview images (-1: the run's seed), fixed so "
                               "previews are comparable across steps. Set a value to compare runs with "
                               "different settings on the same noise.", "Concept", min=-1,
                               max=SEED_MAX)
    sample_guidance_scale: float = setting(7.5, "Sample CFG scale", "Classifier-free guidance (CFG) scale of "
                                           "the previews. Typical: 7.5 (5-7 for SDXL); "
                                           f"{PARAMETER_STUDY} saw overtraining first as distortion at high CFG, so preview at the "
                                           "CFG you will use.", "Concept",
                                           min=1.0, max=30.0)
    sample_steps: int = setting(20, "Sample steps", "Sampling steps of the previews. Typical: 20-30; lower "
                                "it to render previews faster, raise it if they look unfinished.", "Concept", min=1, max=150)


@dataclass
class TrainingConfig:
    """The training config of one model; saved as db_config.json in the model's folder."""

    # --- Model -----------------------------------------------------------------------------------
    model_name: str = setting("", "Model name", "Name of the model folder under models/dreambooth, e.g. "
                              "'my-dog-sd15'; letters, digits, spaces and . _ - + ( ) [ ]. Choose a new name "
                              "to keep an earlier model; the exported checkpoint and LoRA are named after "
                              "it.", "Model",
                              ui_only="names the folder; training reads the weights from it")
    base_checkpoint: str = setting("", "Base checkpoint", "The checkpoint this model was created from "
                                   "(recorded in exported metadata), e.g. 'v1-5-pruned-emaonly.safetensors'. "
                                   "Missing class images are generated with it while it is in the checkpoints "
                                   "folder (else with the model's working weights). Set when the model is "
                                   "created; change it only to correct the record.", "Model",
                                   max_length=PATH_MAX_LENGTH)
    model_family: str = setting("sd1", "Model family", f"Architecture: {FAMILY_CHOICES_TEXT}. Detected when "
                                "the model is created; change it only if detection chose wrong, since it decides "
                                "the resolution, text encoders and export format.", "Model",
                                choices=FAMILIES)
    prediction_type: str = setting("epsilon", "Prediction type", "What the model predicts: epsilon (the "
                                   "noise; SD 1.x, SD 2.x-base, SDXL), v_prediction (SD 2.x 768-v and SDXL "
                                   "v-prediction models such as NoobAI-XL V-Pred) or flow_matching (the velocity "
                                   "from image to noise; SD3, SD 3.5, Flux). "
                                   "Recorded with the weights when the model is created; training refuses a "
                                   "different value unless 'force_prediction_type' is on (never between flow "
                                   "matching and the others: the architectures differ).", "Model",
                                   choices=PREDICTION_TYPES)
    force_prediction_type: bool = setting(False, "Force prediction type", "Train the weights with "
                                          "'prediction_type' even where it differs from the type recorded with "
                                          "them, e.g. to turn an epsilon model into a v-prediction one (samples "
                                          "and exports then follow the new type). Off (typical): a mismatch "
                                          "stops the run before it starts, since training a model on the wrong "
                                          "target ruins it.", "Model")
    # --- Method ----------------------------------------------------------------------------------
    method: str = setting("dreambooth", "Method", "dreambooth: full weights with instance + class images "
                          "(best fidelity, needs 12+ GB). lora: small adapter saved to the LoRA folder (fits "
                          "6-8 GB, files of 10-200 MB). finetune: full weights on captions of many images. "
                          "Start with lora on small GPUs.",
                          "Method", choices=("dreambooth", "lora", "finetune"))
    train_unet: bool = setting(True, "Train UNet", "Train the UNet (or its LoRA), the part that draws. On "
                               "(typical). Turn it off only to train the text encoder alone, e.g. to teach a "
                               "word without changing the look.", "Method")
    train_text_encoder: bool = setting(True, "Train text encoder", "Also train the text encoder(s). "
                                       f"According to {PARAMETER_STUDY} it gives better likeness and halves the steps per image "
                                       "(100 instead of 200 at LR 1e-5) and the class images, but it uses "
                                       "more memory and overfits sooner. Turn off on small GPUs or when "
                                       "caching text-encoder outputs.", "Method")
    stop_text_encoder: float = setting(1.0, "Stop text encoder at", "Fraction of the run (0-1) after which "
                                       "the text encoder is frozen. 1.0: train it throughout; 0.5-0.75 is "
                                       "common. Lower it when prompts start ignoring everything but the "
                                       "subject (text-encoder overfitting).", "Method",
                                       min=0.0, max=1.0)
    # --- Steps -----------------------------------------------------------------------------------
    max_train_steps: int = setting(0, "Max steps", "Optimizer steps to train; 0: use epochs instead. "
                                   "Typical: images x 200 at LR 1e-5 (x 100 with text-encoder training), "
                                   "which the wizard computes with batch, accumulation, resolution and "
                                   "scheduler corrections. Raise it if the subject does not appear, lower it "
                                   "if previews overfit.", "Steps",
                                   min=0, max=MAX_STEPS)
    num_train_epochs: int = setting(100, "Epochs", "Passes over the dataset, used when max steps is 0; one "
                                    "epoch = instance images x repeats / batch / accumulation steps. "
                                    "Typical: 100-200 for 5-20 images. Use it instead of max steps when the "
                                    "dataset grows and steps should grow with it.", "Steps", min=0,
                                    max=MAX_EPOCHS)
    train_batch_size: int = setting(1, "Batch size", "Images per forward pass. Typical: 1-4; memory grows "
                                    f"with it. According to {PARAMETER_STUDY}, larger batches learn a concept in fewer but "
                                    "slower steps (steps / sqrt(batch)); keep the image count divisible by "
                                    "it. A batch never mixes bucket sizes.",
                                    "Steps", min=1, max=256)
    gradient_accumulation_steps: int = setting(1, "Gradient accumulation", "Forward passes summed per "
                                               "optimizer step; effective batch = batch size x this. "
                                               f"Typical: 1, as {PARAMETER_STUDY} advises: it only approximates a "
                                               "larger batch. Raise it to emulate a bigger batch when "
                                               "memory is short; steps grow with sqrt(accumulation).", "Steps", min=1, max=1024)
    seed: int = setting(1234, "Seed", "Seed for noise, shuffling and augmentation; each epoch shuffles with "
                        "seed + epoch. Typical: any fixed number such as 1234, so a rerun reproduces the "
                        "result; -1: a random seed each run. Change it to get a different sample of the same "
                        "training.", "Steps", min=-1, max=SEED_MAX)
    # --- Learning rate ---------------------------------------------------------------------------
    learning_rate: float = setting(2e-6, "UNet learning rate", "Learning rate of the UNet (per optimizer "
                                   "step). Typical: 1e-6 to 5e-6 for DreamBooth, 1e-4 for LoRA, 1.0 for "
                                   "prodigy. Steps needed scale inversely with it; lower it (and add images "
                                   "or steps) for finer detail, raise it if the subject never appears.",
                                   "Learning rate", min=0.0, max=1.0)
    text_encoder_lr: float = setting(1e-6, "Text encoder learning rate", "Learning rate of the (first) text "
                                     "encoder, used when it is trained. Typical: the UNet's LR or half of it "
                                     "(5e-5 for LoRA). Lower it when prompts stop responding to anything but "
                                     "the subject.", "Learning rate", min=0.0, max=1.0)
    text_encoder_2_lr: float = setting(1e-6, "Text encoder 2 learning rate", "Learning rate of SDXL's second "
                                       "text encoder (OpenCLIP bigG), used when text encoders are trained; "
                                       "ignored for other families. Typical: equal to the first text "
                                       "encoder's LR or lower; often 0-1e-6 because bigG overfits quickly.", "Learning rate", min=0.0, max=1.0)
    lr_scheduler: str = setting("constant_with_warmup", "LR scheduler", "How the LR changes over the run. "
                                "constant keeps it fixed (the reference); cosine decays smoothly; linear "
                                "and polynomial decay steadily; rex decays slowly then fast. According to "
                                f"{PARAMETER_STUDY}, decaying schedules need about 2x the steps of constant (the "
                                "wizard adds this). Keep constant unless you have few images and want to "
                                "refine detail.",
                                "Learning rate", choices=SCHEDULERS)
    lr_warmup_steps: int = setting(0, "Warmup steps", "Steps over which the LR ramps up from 0 at the start. "
                                   "Typical: 0 for constant, 2-5% of the run otherwise; -1: 2% of the run "
                                   "(EveryDream2's default). Raise it if the first steps produce NaN or wild "
                                   "previews; leave 0 with rex.", "Learning rate", min=-1,
                                   max=MAX_STEPS)
    lr_cycles: int = setting(1, "Scheduler cycles", "Number of cosine restarts for cosine_with_restarts "
                             "(ignored by other schedulers). Typical: 1-4; more cycles revisit a high LR, "
                             "which can shake a run out of a bad minimum at the cost of stability; raise it "
                             "only for long runs.", "Learning rate", min=1,
                             max=100)
    lr_power: float = setting(1.0, "Polynomial power", "Power of the polynomial scheduler's decay (ignored "
                              "by others). 1.0 is linear (typical); raise it above 1 to drop the LR early, "
                              "lower it below 1 to keep the LR high longer.",
                              "Learning rate", min=0.01, max=10.0)
    lr_decay_past_end: float = setting(1.0, "Decay length factor", "The decaying schedules end at this "
                                       "multiple of the run, so the LR never reaches 0 within it. Typical: "
                                       "1.0; EveryDream2 uses about 1.25 to keep the final steps learning. "
                                       "Raise it if the last steps change nothing.",
                                       "Learning rate", min=1.0, max=10.0)
    scale_lr: str = setting("none", "Scale LR", "Scale learning rates by the effective batch: linear (x "
                            "batch x accumulation) or sqrt (EveryDream2's (batch x accumulation)^0.55). "
                            "Typical: none. Use sqrt when you vary batch and accumulation and want a "
                            "comparable LR; the wizard then enters the LR before scaling.", "Learning rate",
                            choices=("none", "linear", "sqrt"))
    # --- Optimizer -------------------------------------------------------------------------------
    optimizer: str = setting("adamw", "Optimizer", "adamw is the reference (8 bytes of state per trained "
                             "parameter); adamw_8bit and lion_8bit save most of that memory with little "
                             "loss; lion needs about 1/3-1/10 of AdamW's LR; prodigy finds its own LR (set "
                             "LR 1.0); adafactor and schedule-free need no scheduler tuning. Choose 8-bit on "
                             "GPUs under 16 GB.",
                             "Optimizer", choices=OPTIMIZERS)
    weight_decay: float = setting(1e-2, "UNet weight decay", "Decoupled weight decay of the UNet parameters "
                                  "(per step, scaled by the LR). Typical: 1e-2 for AdamW, 0.1-1 for lion, 0 "
                                  "to turn it off. Raise it slightly if the model drifts far from the base.",
                                  "Optimizer", min=0.0, max=1.0)
    text_encoder_weight_decay: float = setting(1e-2, "Text encoder weight decay", "Decoupled weight decay of "
                                               "the text-encoder parameters. Typical: 1e-2 (the same as the "
                                               "UNet's). Raise it if the text encoder overfits and prompts "
                                               "lose meaning.", "Optimizer", min=0.0, max=1.0)
    adam_beta1: float = setting(0.9, "Beta 1", "First-moment (momentum) decay of Adam-type optimizers. "
                                "Typical: 0.9 (lion: 0.9-0.95). Rarely changed; lower values react faster "
                                "but are noisier.", "Optimizer",
                                min=0.0, max=0.9999)
    adam_beta2: float = setting(0.999, "Beta 2", "Second-moment decay of Adam-type optimizers. Typical: "
                                "0.999 (lion: 0.99). Lower it to 0.99 if training becomes unstable after LR "
                                "changes.", "Optimizer",
                                min=0.0, max=0.99999)
    adam_epsilon: float = setting(1e-8, "Epsilon", "Numerical floor added to Adam's denominator. Typical: "
                                  "1e-8. Raise it (1e-6) only if fp16 training produces NaN losses.", "Optimizer",
                                  min=0.0, max=1.0)
    max_grad_norm: float = setting(1.0, "Clip grad norm", "Clip the gradient norm to this value before each "
                                   "optimizer step (0: no clipping). Typical: 1.0. Lower it if the loss "
                                   "spikes; set 0 for prodigy or when comparing with unclipped runs.",
                                   "Optimizer", min=0.0, max=1000.0)
    # --- Prior preservation ----------------------------------------------------------------------
    with_prior_preservation: bool = setting(True, "Prior preservation", "Train on class images too so the "
                                            "model keeps what the class looks like (DreamBooth's prior "
                                            "loss): prevents every dog from becoming your dog. On for "
                                            "dreambooth and LoRA subjects (typical); off for styles or when you have no class "
                                            "images. Needs a class prompt or class folder.",
                                            "Prior preservation")
    prior_loss_weight: float = setting(1.0, "Prior loss weight", "Weight of each class image's loss relative "
                                       "to an instance image's. Typical: 1.0. Lower it (0.3-0.75) if the "
                                       "subject does not stick; raise it if the whole class starts looking "
                                       "like the subject.",
                                       "Prior preservation", min=0.0, max=10.0)
    # --- LoRA ------------------------------------------------------------------------------------
    lora_rank: int = setting(16, "LoRA rank", "Rank (dimension) of the LoRA matrices; file size and capacity "
                             "grow with it. Typical: 4-32 for a subject, 32-128 for styles or many concepts. "
                             "Raise it if the LoRA cannot capture detail, lower it for smaller files.",
                             "LoRA", min=1, max=1024)
    lora_alpha: float = setting(16.0, "LoRA alpha", "Scales the LoRA by alpha/rank. Typical: equal to rank "
                                "(scale 1) or rank/2; a lower alpha acts like a lower LR. Change it together "
                                "with the rank to keep the effective strength.",
                                "LoRA", min=0.0, max=2048.0)
    lora_dropout: float = setting(0.0, "LoRA dropout", "Probability (0-1) of dropping each LoRA input "
                                  "feature during training. Typical: 0; try 0.05-0.1 if the LoRA overfits a "
                                  "small dataset.", "LoRA",
                                  min=0.0, max=1.0)
    lora_conv_rank: int = setting(0, "Conv rank (LoCon)", "Also adapt the 3x3 convolutions (LoCon) with this "
                                  "rank; 0: attention and linear layers only (typical). Try 4-16 for styles "
                                  "and textures that attention layers alone do not capture.", "LoRA", min=0, max=1024)
    lora_conv_alpha: float = setting(1.0, "Conv alpha", "Alpha of the convolution LoRA (scale alpha/conv "
                                     "rank). Typical: 1 to the conv rank. Lower it if conv layers make the "
                                     "LoRA too strong.", "LoRA", min=0.0,
                                     max=2048.0)
    use_dora: bool = setting(False, "DoRA", "Weight-decomposed LoRA (peft's use_dora): learns magnitude and "
                             "direction separately, often closer to full fine-tuning at the same rank. Off "
                             "is typical; turn on for hard subjects at low rank; it trains somewhat slower.", "LoRA")
    lora_key_format: str = setting("original", "LoRA key format", "How an SD3 / SD 3.5 or Flux LoRA names its layers. "
                                   "original: the single file's names with q/k/v fused (SD3: the MMDiT's, which "
                                   "A1111 1.10, Forge and ComfyUI load every layer of; Flux: kohya's "
                                   "lora_unet_double_blocks_... keys, which Forge, ComfyUI and diffusers read; "
                                   "typical); diffusers: diffusers' module names (SD.Next and ComfyUI; A1111 1.10 "
                                   "applies only the image attention of SD3's): choose it when you render in "
                                   "SD.Next. SD 1.x/2.x/XL LoRAs always use kohya's keys, which every host reads.",
                                   "LoRA",
                                   choices=("original", "diffusers"))
    lora_init_file: str = setting("", "Start from LoRA", "A LoRA file whose weights the new LoRA starts "
                                  "from instead of a fresh random start, e.g. to continue training it: our "
                                  "own export or another trainer's (kohya/A1111, diffusers/peft, OneTrainer, "
                                  "ComfyUI spellings). A path, or a file name in the host's LoRA folder. Its "
                                  "rank must equal 'LoRA rank' (and 'Conv rank' for LoCon layers); its alpha "
                                  "is converted so the LoRA acts as the file does at weight 1. Empty: fresh "
                                  "start (typical). Not with DoRA.", "LoRA", max_length=PATH_MAX_LENGTH)
    # --- Data ------------------------------------------------------------------------------------
    resolution: int = setting(512, "Resolution", "Training resolution in pixels (512 for SD1/SD2-base, 768 "
                              "for SD2-v, 1024 for SDXL). A multiple of 8; of 64 with buckets. Memory and "
                              f"steps needed grow with its square: 768 needs 2.25x the steps of 512 according to {PARAMETER_STUDY}"
                              "; lower it to fit memory.", "Data", min=64,
                              max=4096)
    extra_resolutions: str = setting("", "Extra resolutions", "Comma-separated further resolutions in pixels "
                                     "for multi-resolution training, e.g. '384,768'; empty: one resolution "
                                     "(typical). Each image is seen at each; add the base resolution's "
                                     "neighbours so the model works at several sizes.",
                                     "Data")
    enable_bucketing: bool = setting(True, "Aspect-ratio buckets", "Train images at their aspect ratio (in "
                                     "buckets of similar size) instead of a centre crop. On is typical; turn "
                                     "off only if all images are square or crops should be identical.", "Data")
    bucket_min_resolution: int = setting(256, "Bucket min side", "Smallest bucket side in pixels. Typical: "
                                         "256 (512 for SDXL). Raise it if narrow images produce too small "
                                         "buckets.", "Data",
                                         min=64, max=4096)
    bucket_max_resolution: int = setting(1024, "Bucket max side", "Largest bucket side in pixels. Typical: "
                                         "1024 (2048 for SDXL). Lower it to stop very wide or tall buckets "
                                         "from exhausting memory.", "Data",
                                         min=64, max=8192)
    bucket_step: int = setting(64, "Bucket step", "Bucket sides are multiples of this many pixels. Typical: "
                               "64; smaller steps (32) fit aspect ratios more closely but make more, smaller "
                               "batches.", "Data", min=8, max=256)
    bucket_no_upscale: bool = setting(False, "No upscaling", "Never enlarge an image to fill a bucket; small "
                                      "images get a smaller bucket. Off is typical; turn on when the dataset "
                                      "mixes small and large images and upscaled images look soft.", "Data")
    # --- Captions --------------------------------------------------------------------------------
    caption_extension: str = setting(".txt", "Caption extension", "Sidecar caption extension: .txt (typical) "
                                     "or .caption, read beside each image with the same name. Change it to "
                                     "match your captioning tool's output.",
                                     "Captions", choices=(".txt", ".caption"))
    shuffle_tags: bool = setting(False, "Shuffle tags", "Shuffle comma-separated caption tags each time an "
                                 "image is seen, so no tag order is learnt. Off is typical; turn on for "
                                 "tag-style captions (booru tags). Raise it if the trained model ignores CFG "
                                 "or the negative prompt. Conflicts with text-encoder output caching.", "Captions")
    keep_tokens: int = setting(1, "Keep first tags", "Tags at the start of the caption that stay in place "
                               "when shuffling. Typical: 1 (the instance token), 2 with a class tag. Raise "
                               "it to keep a fixed prefix.", "Captions", min=0, max=100)
    caption_dropout: float = setting(0.0, "Caption dropout", "Probability (0-1) that an image is trained "
                                     "with an empty caption (EveryDream2's cond_dropout). Typical: 0 for "
                                     "DreamBooth, 0.04-0.1 for fine-tuning so CFG keeps working. Raise it if "
                                     "the trained model ignores CFG or the negative prompt. Conflicts with "
                                     "text-encoder output caching.", "Captions",
                                     min=0.0, max=1.0)
    max_token_length: int = setting(75, "Max tokens", "Caption length in tokens: 75 is one CLIP chunk "
                                    "(typical); 150 or 225 encode longer captions in chunks as the web UI "
                                    "does. Raise it for long descriptive captions that would otherwise be "
                                    "cut.", "Captions",
                                    choices=None, min=75, max=225)
    pad_tokens: bool = setting(True, "Pad tokens", "Pad captions to the full chunk length (as the web UI "
                               "does at inference) rather than to the longest caption of the batch. On is "
                               f"typical; {PARAMETER_STUDY} found it strengthens how closely training images are "
                               "repeated. Turn it off if results copy the training images too literally.", "Captions")
    clip_skip: int = setting(1, "Clip skip", "Use the output of the N-th last text-encoder layer. Typical: "
                             "1; 2 for anime-style SD1 models (NovelAI lineage) trained that way. Match what "
                             "the base model and your generations use.", "Captions", min=1, max=12)
    # --- Augmentation ----------------------------------------------------------------------------
    hflip: bool = setting(False, "Horizontal flip", "Randomly mirror images (probability 0.5) each time they "
                          "are seen, doubling the apparent data. Off is typical; turn on for symmetric "
                          "subjects and styles, avoid for text, logos and asymmetric faces.",
                          "Augmentation")
    random_crop: bool = setting(False, "Random crop", "Crop at a random position instead of the centre each "
                                "time an image is seen. Off is typical; turn on for large images of textures "
                                "or styles. Needs latent caching off.",
                                "Augmentation")
    # --- Masked training -------------------------------------------------------------------------
    masked_training: bool = setting(False, "Masked training", "Weight the loss by '<image>-masklabel.png' "
                                    "masks (white: train, black: ignore). Off is typical; turn on to train "
                                    "only the subject and not its background.", "Masked training")
    unmasked_probability: float = setting(0.1, "Unmasked probability", "Fraction (0-1) of steps trained "
                                          "without the mask. Typical: 0.1; raise it if the background around "
                                          "the subject turns out badly.",
                                          "Masked training", min=0.0, max=1.0)
    unmasked_weight: float = setting(0.1, "Unmasked weight", "Loss weight (0-1) of the area outside the "
                                     "mask. Typical: 0.1; 0 ignores the background entirely, higher values "
                                     "keep more of it.",
                                     "Masked training", min=0.0, max=1.0)
    normalize_masked_area_loss: bool = setting(False, "Normalise by mask area", "Divide the loss by the "
                                               "masked area so small masks train as strongly as large ones. "
                                               "Off is typical; turn on when subjects fill very different "
                                               "parts of the images.",
                                               "Masked training")
    # --- Validation ------------------------------------------------------------------------------
    validation_split: float = setting(0.0, "Validation split", "Fraction (0-0.5) of instance images held out "
                                      "to compute a validation loss. Typical: 0 for DreamBooth (few images), "
                                      "0.05-0.1 for fine-tuning on hundreds; set it when you want a rising "
                                      "validation loss to signal overfitting.", "Validation", min=0.0, max=0.5)
    validation_every_n_steps: int = setting(0, "Validate every N steps", "How often, in optimizer steps, the "
                                            "validation loss is computed (0: at the end of each epoch). "
                                            "Typical: 0 or about 1-5% of the run; lower values cost more "
                                            "time.", "Validation", min=0, max=MAX_STEPS)
    # --- Loss and noise --------------------------------------------------------------------------
    loss_type: str = setting("l2", "Loss", "l2 (MSE, typical), huber or smooth_l1: the latter two are robust "
                             "to outliers and can help with noisy datasets. Change only when l2 gives "
                             "blotchy results on varied data.",
                             "Loss and noise", choices=("l2", "huber", "smooth_l1"))
    huber_c: float = setting(0.1, "Huber delta", "Threshold of the huber and smooth-L1 losses (ignored by "
                             "l2). Typical: 0.1; lower it to behave more like L1 on noisy data.", "Loss and noise",
                             min=0.0001, max=10.0)
    min_snr_gamma: float = setting(0.0, "Min-SNR gamma", "Min-SNR loss weighting gamma (0: off). Typical: "
                                   "5.0; it balances timesteps and speeds up convergence. Turn on for longer "
                                   f"runs; leave off to reproduce the step counts of {PARAMETER_STUDY}.", "Loss and noise", min=0.0, max=100.0)
    offset_noise: float = setting(0.0, "Offset noise", "Zero-frequency noise strength so the model can make "
                                  "very dark or bright images. Typical: 0 (off) or 0.02-0.1; higher values "
                                  "shift overall brightness. Use with care on v-prediction models.", "Loss and noise", min=0.0, max=1.0)
    pyramid_noise_iterations: int = setting(0, "Pyramid noise iterations", "Multi-resolution (pyramid) noise "
                                            "levels; 0: off. Typical: 6-10 when on. Turn on for more "
                                            "contrast and range on small datasets.", "Loss and noise", min=0, max=16)
    pyramid_noise_discount: float = setting(0.3, "Pyramid noise discount", "Strength falloff per "
                                            "pyramid-noise level (0-1). Typical: 0.1-0.3; ignored when "
                                            "pyramid noise iterations is 0.",
                                            "Loss and noise", min=0.0, max=1.0)
    zero_terminal_snr: bool = setting(False, "Zero terminal SNR", "Rescale the noise schedule so the last "
                                      "step is pure noise (use with v-prediction). Set from the model when it "
                                      "is created: on for models that use it (the 'ztsnr' marker; SDXL "
                                      "v-prediction models such as NoobAI-XL), off otherwise, which is typical "
                                      "for epsilon models. The trained "
                                      "model keeps the setting: samples, exports and their markers follow "
                                      "it.", "Loss and noise")
    input_perturbation: float = setting(0.0, "Input perturbation", "Extra noise on the noisy input only, a "
                                        "regulariser against exposure bias. Typical: 0 (off) or 0.1. Turn on "
                                        "for longer fine-tunes that start to look washed out.", "Loss and noise", min=0.0, max=1.0)
    # --- Flow matching (SD3, SD 3.5, Flux) -------------------------------------------------------
    flow_timestep_sampling: str = setting("logit_normal", "Timestep sampling", "How the noise level t of each "
                                          "sample is drawn (flow-matching models only): logit_normal (typical: "
                                          "t = sigmoid(normal(mean, std)), favours the middle), mode (the "
                                          "'mode' density with the scale below) or uniform, as compared in "
                                          f"{SD3_PAPER}. Change it only to reproduce another trainer's recipe.",
                                          "Flow matching", choices=("logit_normal", "mode", "uniform"))
    flow_logit_mean: float = setting(0.0, "Logit mean", "Mean of the logit-normal timestep density (ignored by "
                                     "the other samplings). Typical: 0 (the paper's best, rf/lognorm(0.00, "
                                     "1.00)); positive values train more on noisy steps (composition), negative "
                                     "on detail; raise it when compositions stay weak.", "Flow matching", min=-3.0, max=3.0)
    flow_logit_std: float = setting(1.0, "Logit std", "Spread of the logit-normal timestep density (ignored by "
                                    "the other samplings). Typical: 1.0; lower it to concentrate training on the "
                                    "middle noise levels.", "Flow matching", min=0.1, max=5.0)
    flow_mode_scale: float = setting(1.29, "Mode scale", "Scale s of the 'mode' timestep density (ignored by the "
                                     "other samplings). Typical: 1.29 (the paper's mode(1.29)); 0 is uniform; "
                                     "raise it to favour the middle noise levels more.", "Flow matching",
                                     min=-1.0, max=1.81)
    flow_shift: float = setting(3.0, "Timestep shift", "Shift of the noise levels towards noise, t' = s t / (1 + "
                                "(s - 1) t), the resolution-dependent shift of the paper; SD3 and SD 3.5 sample "
                                "with 3.0. Typical: 3.0 at 1024 px; lower it towards 1.0 (t unchanged) for smaller "
                                "images.",
                                "Flow matching", min=0.1, max=20.0)
    flow_resolution_shift: bool = setting(False, "Resolution-dependent shift", "Shift the noise levels by the "
                                          "image's size as Flux dev samples (FluxPipeline): s = e^mu with mu rising "
                                          "linearly from 0.5 at 256 image tokens (512 px) to 1.15 at 4096 (1024 px), "
                                          "instead of one 'flow_shift' for every bucket. On is typical for Flux dev "
                                          "(its default); turn it off to train with a fixed 'flow_shift' (e.g. "
                                          "3.16, another trainer's recipe). Only for models that sample this way.",
                                          "Flow matching")
    flow_loss_weighting: str = setting("none", "Loss weighting", "Per-sample weight of the velocity loss by "
                                       "noise level: none (typical; the timestep sampling already weights), "
                                       "sigma_sqrt (1/t^2) or cosmap, the weightings compared in "
                                       f"{SD3_PAPER}. Change it only to reproduce another trainer's recipe.", "Flow matching", choices=("none", "sigma_sqrt", "cosmap"))
    # --- Precision and memory --------------------------------------------------------------------
    mixed_precision: str = setting("bf16", "Mixed precision", "Compute precision; master weights stay fp32. "
                                   "bf16 is fast on recent GPUs (Ampere and newer) and CPUs; fp16 needs CUDA "
                                   "and suits older GPUs; no (fp32) is slowest but most exact. Typical: "
                                   "bf16; use fp16 on pre-Ampere GPUs and no only to rule out precision "
                                   "problems.", "Precision and memory",
                                   choices=("no", "fp16", "bf16"))
    allow_tf32: bool = setting(True, "TF32", "Allow TF32 matmuls on Ampere and newer GPUs: about 2x faster "
                               "fp32 maths with 10-bit mantissas. On is typical; turn off only for bit-exact "
                               "comparisons.", "Precision and memory")
    gradient_checkpointing: bool = setting(False, "Gradient checkpointing", "Recompute activations in the "
                                           "backward pass: much less memory (activations fall to about 20%), "
                                           "about 20% slower. Off is typical when memory allows; turn on for "
                                           "large batches, high resolutions or small GPUs.", "Precision and memory")
    base_quantization: str = setting("none", "Quantized base (LoRA)", "Store the frozen denoiser's linear "
                                     "layers in fewer bits while a LoRA trains on top (QLoRA): nf4 (4-bit, "
                                     "bitsandbytes) keeps about a quarter of the bf16 memory, int8 (bitsandbytes) "
                                     "and fp8 (e4m3 storage, diffusers 0.32+) about half. The frozen weights are "
                                     "rounded, so training changes slightly; working/ keeps the full weights. "
                                     "Typical: none where the model fits; choose nf4 when it does not (Flux dev on 12-16 GB).",
                                     "Precision and memory", choices=("none", "nf4", "int8", "fp8"))
    cache_latents: str = setting("memory", "Cache latents", "Encode each image once with the VAE instead of "
                                 "every step: in memory (typical) or on disk (reused across runs); off "
                                 "re-encodes every step. Saves time and VAE memory; turn off for random "
                                 "crop.", "Precision and memory",
                                 choices=("off", "memory", "disk"))
    cache_text_encoder_outputs: str = setting("auto", "Cache text encoder outputs", "Encode each caption "
                                              "once instead of at every step: faster, same result. auto "
                                              "(typical): whenever the text encoder is frozen and captions "
                                              "are fixed (no tag shuffling or caption dropout); on: insist, "
                                              "and stop with the reason where it cannot; off: encode every "
                                              "step. Change it only to compare timings.", "Precision and memory",
                                              choices=("auto", "on", "off"))
    attention: str = setting("sdpa", "Attention", "Attention implementation: sdpa (PyTorch's fused "
                             "attention, typical) or xformers (CUDA only; falls back to sdpa with a "
                             "message). Change only if xformers is faster on your GPU.", "Precision and memory", choices=("sdpa", "xformers"))
    # --- EMA -------------------------------------------------------------------------------------
    use_ema: bool = setting(False, "EMA", "Keep an exponential moving average of the trained weights (an "
                            "extra copy in memory). Off is typical; turn on for bigger datasets with several "
                            "concepts: EMA reduces diversity.", "EMA")
    ema_decay: float = setting(0.999, "EMA decay", "Decay of the moving average per update (0-1). Typical: "
                               "0.999 for small datasets (0.998 even smaller), 0.9999 for hundreds or "
                               "thousands of images. Lower it if the averaged weights lag behind training.", "EMA", min=0.0, max=1.0)
    ema_update_every: int = setting(1, "EMA every N steps", "Update the average every N optimizer steps. "
                                    "Typical: 1; raise it (5-10) to save time on large models, with a "
                                    "slightly lower decay.", "EMA",
                                    min=1, max=MAX_STEPS)
    ema_for_output: bool = setting(True, "Use EMA for saves and samples", "Save and sample the averaged "
                                   "(EMA) weights instead of the raw ones. On is typical when EMA is used; "
                                   "turn off to compare the raw weights.",
                                   "EMA")
    # --- Saving ----------------------------------------------------------------------------------
    save_every_n_steps: int = setting(0, "Save every N steps", "Write a checkpoint or LoRA every N optimizer "
                                      "steps (0: off). Typical: 10-25% of the run, so you can pick the best "
                                      "point; each save costs disk (2-7 GB per checkpoint). Set it when you "
                                      "do not know the right step count yet.",
                                      "Saving", min=0, max=MAX_STEPS)
    save_every_n_epochs: int = setting(0, "Save every N epochs", "Write a checkpoint or LoRA every N epochs "
                                       "(0: off). Typical: 0 when saving by steps; 10-50 for epoch-based "
                                       "runs.",
                                       "Saving", min=0, max=MAX_EPOCHS)
    save_keep_last: int = setting(0, "Keep last N saves", "Delete older intermediate saves, keeping the "
                                  "newest N (0: keep all). Typical: 0 for short runs, 3-5 to bound disk use "
                                  "on long ones.",
                                  "Saving", min=0, max=100_000)
    snapshot_every_n_steps: int = setting(0, "Snapshot every N steps", "Save the full training state "
                                          "(optimizer, RNG, data order) to resume from every N steps (0: "
                                          "only at stop). Typical: 500-2000; snapshots are 2-3x a "
                                          "checkpoint's size. Set it for long or interruptible runs. A start "
                                          "resumes the newest snapshot of an unfinished run whose training "
                                          "settings are unchanged (saving, preview, logging, NaN and memory "
                                          "settings and the run's length may change); a finished run or "
                                          "changed settings start a new run, and the status names them. The "
                                          "old run's snapshots are deleted once the new run writes its first.",
                                          "Saving", min=0,
                                          max=MAX_STEPS)
    save_precision: str = setting("fp16", "Save precision", "Precision of exported checkpoints and LoRAs. "
                                  "fp16 (typical) halves the file; it can drop the small updates of very low "
                                  "LRs, where fp32 keeps everything; bf16 keeps range but less detail. "
                                  "Choose fp32 for LRs below about 1e-6.", "Saving",
                                  choices=("fp32", "fp16", "bf16"))
    save_on_end: bool = setting(True, "Save at end", "Export the checkpoint or LoRA to the web UI's folders "
                                "when training ends. On is typical; turn off when you only want intermediate "
                                "saves or snapshots. Either way the model's working weights (what the next "
                                "run and later exports start from) hold the trained weights of a finished or "
                                "stopped full-model run; a LoRA run keeps its base weights there and its "
                                "adapter in the run's snapshot.", "Saving")
    # --- Samples ---------------------------------------------------------------------------------
    sample_every_n_steps: int = setting(0, "Sample every N steps", "Render preview images every N optimizer "
                                        "steps (0: off). Typical: 10% of the run; each sampling pauses "
                                        "training for a few seconds to minutes. Lower it to watch a new "
                                        "setup closely, set 0 for speed.",
                                        "Samples", min=0, max=MAX_STEPS)
    sample_prompts: str = setting("", "Sample prompt lines", "Extra preview prompts, one per line, in "
                                  "sd-scripts syntax: 'prompt --n negative --w 512 --h 512 --d seed --l cfg "
                                  "--s steps' (unknown flags are refused). Add prompts that test "
                                  "editability, e.g. the subject in a new setting.",
                                  "Samples", multiline=True)
    sample_scheduler: str = setting("ddim", "Sample scheduler", "Sampler of the previews: ddim (typical, "
                                    "deterministic), euler, euler_a or dpmpp_2m. Choose the one you generate "
                                    "with so previews look like your results.", "Samples",
                                    choices=("ddim", "euler", "euler_a", "dpmpp_2m"))
    # --- Logging ---------------------------------------------------------------------------------
    log_every_n_steps: int = setting(1, "Log every N steps", "How often, in optimizer steps, loss and LR are "
                                     "logged (the loss is averaged over the interval). Typical: 1-10; raise "
                                     "it for smoother curves and smaller logs on long runs.", "Logging", min=1,
                                     max=MAX_STEPS)
    # --- Faults ----------------------------------------------------------------------------------
    nan_policy: str = setting("stop", "On NaN loss", "stop: stop and keep the last good save (typical). "
                              "skip: skip the step with a non-finite loss, up to the limit below; use it for "
                              "fp16 runs that hit rare overflows.", "Faults", choices=("stop", "skip"))
    max_nan_skips: int = setting(10, "NaN skip limit", "Non-finite (NaN/inf) steps skipped before stopping "
                                 "when the NaN policy is skip. Typical: 10; repeated NaNs mean the LR is too "
                                 "high or fp16 overflows.", "Faults",
                                 min=0, max=MAX_STEPS)

    concepts: list[Concept] = field(default_factory=list, metadata={"group": "Concepts", "label": "Concepts",
                                                                     "help": "The concepts to train: each "
                                                                             "has its own instance images, "
                                                                             "prompts and class images. "
                                                                             "Typical: one concept per "
                                                                             f"subject; {PARAMETER_STUDY} found "
                                                                             "several concepts bleed into "
                                                                             "each other less when they have "
                                                                             "the same number of images."})


def settings(cls: type = TrainingConfig) -> list[dataclasses.Field]:
    """The schema's scalar settings of `cls`, in declaration order."""
    return [f for f in dataclasses.fields(cls) if f.name != "concepts"]


def run_settings(config: TrainingConfig) -> dict[str, Any]:
    """The settings that define a run (all but SAME_RUN_*), flat: concept settings as 'concept 1 <name>'."""
    found = {f.name: getattr(config, f.name) for f in settings(TrainingConfig) if f.name not in SAME_RUN_SETTINGS}
    found["concepts"] = len(config.concepts)
    for index, concept in enumerate(config.concepts, start=1):
        found.update({f"concept {index} {f.name}": getattr(concept, f.name) for f in settings(Concept)
                      if f.name not in SAME_RUN_CONCEPT_SETTINGS})
    return found


def field_type(cls: type, name: str) -> type:
    return _type_hints(cls)[name]


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    # Evaluating the string annotations is slow; validate() asks for every field of every concept.
    return typing.get_type_hints(cls)


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
        raise ConfigError(f"Setting '{name}': {_short(raw)} is not a valid {kind.__name__}.") from None
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
    longest = meta.get("max_length")
    if isinstance(value, str) and longest is not None and len(value) > longest:
        raise ConfigError(f"Setting '{f.name}': {len(value):,} characters is longer than the maximum "
                          f"{longest:,}; shorten it.")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"Setting '{f.name}': {value!r} is not a finite number.")
    choices = meta.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"Setting '{f.name}': {_short(value)} is not allowed; choose one of {', '.join(choices)}.")
    low, high = meta.get("min"), meta.get("max")
    if low is not None and value < low:
        raise ConfigError(f"Setting '{f.name}': {_short(value)} is below the minimum {low} "
                          f"(allowed: {_range_text(low, high)}).")
    if high is not None and value > high:
        raise ConfigError(f"Setting '{f.name}': {_short(value)} is above the maximum {high} "
                          f"(allowed: {_range_text(low, high)}).")


def _short(value: Any) -> str:
    """The value as the user wrote it, cut when it is too long to read on one line."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:24]}... ({len(text):,} characters)"


def _range_text(low: float | None, high: float | None) -> str:
    if high is None:
        return f"{low} or more"
    if low is None:
        return f"up to {high}"
    return f"{low}..{high}"


def validate(config: TrainingConfig) -> TrainingConfig:
    """Check every setting of the config and its concepts; raise ConfigError on the first bad one."""
    if len(config.concepts) > MAX_CONCEPTS:
        raise ConfigError(f"Setting 'concepts': {len(config.concepts):,} concepts is more than the maximum "
                          f"{MAX_CONCEPTS}; split the data into fewer concepts (a concept can hold many images).")
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
    _check_objective_settings(config)
    get_family(config.model_family).check_config(config)
    _check_family_settings(config)
    return config


# Settings of the DDPM objectives with the value that turns them off, and the flow-matching settings: a
# setting that would do nothing for the model's objective is refused, never silently ignored.
DDPM_ONLY_SETTINGS: dict[str, Any] = {"min_snr_gamma": 0.0, "offset_noise": 0.0, "pyramid_noise_iterations": 0,
                                      "zero_terminal_snr": False}
FLOW_SETTINGS = ("flow_timestep_sampling", "flow_logit_mean", "flow_logit_std", "flow_mode_scale", "flow_shift",
                 "flow_resolution_shift", "flow_loss_weighting")


def _check_family_settings(config: TrainingConfig) -> None:
    if config.lora_key_format != "original" and get_family(config.model_family).denoiser_folder == "unet":
        raise ConfigError(f"Setting 'lora_key_format' applies to SD3 / SD 3.5 and Flux LoRAs; {config.model_family} LoRAs use "
                          "kohya's keys, which every host reads: set it to original.")


def _check_objective_settings(config: TrainingConfig) -> None:
    if config.prediction_type == "flow_matching":
        for name, off in DDPM_ONLY_SETTINGS.items():
            if getattr(config, name) != off:
                raise ConfigError(f"Setting '{name}' does not apply to flow-matching models ({config.model_family}): "
                                  f"it acts on the DDPM noise schedule of SD 1.x, 2.x and XL; set it to {off}.")
        _check_resolution_shift(config)
        return
    defaults = {f.name: f.default for f in dataclasses.fields(TrainingConfig)}
    for name in FLOW_SETTINGS:
        if getattr(config, name) != defaults[name]:
            raise ConfigError(f"Setting '{name}' applies only to flow-matching models (SD3, SD 3.5, Flux); this "
                              f"{config.model_family} model trains with {config.prediction_type}: set it back to "
                              f"{defaults[name]}.")


def _check_resolution_shift(config: TrainingConfig) -> None:
    if not config.flow_resolution_shift:
        return
    family = get_family(config.model_family)
    if not family.scheduler_config().get("use_dynamic_shifting", False):
        raise ConfigError(f"Setting 'flow_resolution_shift' applies to models that sample with a size-dependent "
                          f"shift (Flux dev); {family.label} samples with a fixed one: turn it off and use "
                          "'flow_shift'.")
    default = next(f.default for f in dataclasses.fields(TrainingConfig) if f.name == "flow_shift")
    if config.flow_shift != default:
        raise ConfigError(f"Settings 'flow_shift' ({config.flow_shift}) and 'flow_resolution_shift' both set the "
                          f"shift; set 'flow_shift' back to {default} or turn 'flow_resolution_shift' off.")


def _check_resolutions(config: TrainingConfig) -> None:
    family = get_family(config.model_family)
    multiple = family.pixel_multiple  # 8 (the VAE's downscale); Flux 16 (its 2x2 latent patches)
    for resolution in training_resolutions(config):
        if not 64 <= resolution <= 4096:
            raise ConfigError(f"Setting 'resolution'/'extra_resolutions': {resolution} is outside 64-4096 pixels.")
        if resolution % multiple:
            raise ConfigError(f"Setting 'resolution'/'extra_resolutions': {resolution} is not a multiple of "
                              f"{multiple}{'' if multiple == 8 else ', which ' + family.label + ' needs'}; use e.g. "
                              "512, 768 or 1024.")
    if multiple > 8 and config.enable_bucketing and config.bucket_step % multiple:
        raise ConfigError(f"Setting 'bucket_step': {config.bucket_step} is not a multiple of {multiple}, which "
                          f"{family.label} needs; use e.g. 64.")


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


def uses_prior_preservation(config: TrainingConfig) -> bool:
    """Prior preservation applies to DreamBooth and LoRA runs (as in kohya's trainers); fine-tuning has no class."""
    return config.method in ("dreambooth", "lora") and config.with_prior_preservation


def text_cache_blockers(config: TrainingConfig) -> list[tuple[str, str]]:
    """(setting, why) for each reason a caption's text-encoder output can change during the run."""
    return [(name, why) for name, why, active in (
        ("train_text_encoder", "the text encoder is trained",
         config.train_text_encoder and config.stop_text_encoder > 0),
        ("shuffle_tags", "captions change every step", config.shuffle_tags),
        ("caption_dropout", "captions change every step", config.caption_dropout > 0),
    ) if active]


def caches_text_outputs(config: TrainingConfig) -> bool:
    """Whether the run encodes each caption once ('on' that cannot cache is refused before training)."""
    if config.cache_text_encoder_outputs == "auto":
        return not text_cache_blockers(config)
    return config.cache_text_encoder_outputs == "on"


def base_checkpoint_name(config: TrainingConfig) -> str:
    """The base checkpoint's file name only: exported metadata is shared, local folder names are private."""
    return PureWindowsPath(config.base_checkpoint).name if config.base_checkpoint else ""
