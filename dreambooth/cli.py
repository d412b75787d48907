"""Command line: `python -m dreambooth <command>`.

The `train` flags are generated from the settings schema, so every setting has exactly one
definition. Errors the user can fix print one line to stderr and exit non-zero, without a traceback.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import importlib
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from . import __version__
from .config import io
from .config.legacy import IDENTITY_FIELDS
from .config.overrides import apply_overrides, parse_checked, set_override
from .config.schema import FAMILIES, TrainingConfig, base_checkpoint_name, field_type, settings
from .errors import ConfigError, DreamboothError
from .quiet import DropAlreadyShown, third_party_quiet
from .store import Layout, ModelStore

PROG = "python -m dreambooth"
DEFAULT_DATA_DIR = Path("data")
PRECISIONS = ("fp32", "fp16", "bf16")
EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130
# Settings a training run cannot override: they say which model it is, not how to train it.
NOT_OVERRIDABLE = IDENTITY_FIELDS


class UsageError(DreamboothError):
    """Wrong command-line arguments."""


class Unavailable(DreamboothError):
    """A command whose implementing module is not installed in this build."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (with a pointer to --help) instead of usage + message."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message} (see '{self.prog} --help')")


# --- layout and lazily imported helpers --------------------------------------------------------

def layout_from_args(args: argparse.Namespace) -> Layout:
    """DATA_DIR/models/{Stable-diffusion,Lora,dreambooth}, each overridable on its own."""
    models = Path(args.data_dir) / "models"
    return Layout.under(models, args.ckpt_dir, args.lora_dir, args.dreambooth_dir)


def _helper(module: str, name: str, command: str) -> Callable[..., Any]:
    """Import `module.name` only when its command runs (torch, diffusers and gradio load slowly)."""
    try:
        return getattr(importlib.import_module(module), name)
    except ModuleNotFoundError as error:
        missing = error.name or module
        if missing.split(".")[0] == "dreambooth":
            raise Unavailable(f"'{command}' is not available: {module} is missing from this installation.") from None
        raise Unavailable(f"'{command}' needs the Python package '{missing}'; install the requirements "
                          "(pip install -r requirements.txt).") from None
    except AttributeError:
        raise Unavailable(f"'{command}' is not available: {module} has no {name}() in this version.") from None


# --- FIELD=VALUE assignments -------------------------------------------------------------------

def _split_assignment(item: str) -> tuple[str, str]:
    name, sep, value = item.partition("=")
    if not sep or not name.strip():
        raise ConfigError(f"--set '{item}': write FIELD=VALUE, e.g. learning_rate=1e-6 or "
                          "concepts.0.instance_prompt='photo of sks dog'.")
    return name.strip(), value


def apply_assignments(config: TrainingConfig, items: Sequence[str]) -> TrainingConfig:
    """A validated copy of `config` with every FIELD=VALUE of `items` applied (index = count adds a concept)."""
    return apply_overrides(config, dict(_split_assignment(item) for item in items), add_concepts=True)


# --- schema-generated flags --------------------------------------------------------------------

def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def _schema_type(cls: type, name: str) -> Callable[[str], Any]:
    def convert(raw: str) -> Any:
        try:
            return parse_checked(cls, name, raw)
        except ConfigError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
    convert.__name__ = field_type(cls, name).__name__
    return convert


def _flag_help(field: dataclasses.Field) -> str:
    meta, kind = field.metadata, field_type(TrainingConfig, field.name).__name__
    bounds = [f"min {meta['min']}" if meta.get("min") is not None else "",
              f"max {meta['max']}" if meta.get("max") is not None else ""]
    extra = ", ".join(b for b in bounds if b)
    text = f"{meta['help']} [{kind}{', ' + extra if extra else ''}; default: the model's config, " \
           f"initially {field.default!r}]"
    return text.replace("%", "%%")


def add_schema_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per overridable setting, grouped as in the tab, with type, choices and help from the schema."""
    groups: dict[str, Any] = {}
    for field in settings(TrainingConfig):
        if field.name in NOT_OVERRIDABLE:
            continue
        group_name = field.metadata["group"]
        group = groups.setdefault(group_name, parser.add_argument_group(f"{group_name} settings"))
        kind = field_type(TrainingConfig, field.name)
        choices = field.metadata.get("choices")
        metavar = "{" + ",".join(choices) + "}" if choices else ("true|false" if kind is bool else kind.__name__.upper())
        group.add_argument(flag_name(field.name), dest=f"setting_{field.name}", default=None, metavar=metavar,
                           type=_schema_type(TrainingConfig, field.name), help=_flag_help(field))


def schema_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {name[len("setting_"):]: value for name, value in vars(args).items()
            if name.startswith("setting_") and value is not None}


# --- commands ----------------------------------------------------------------------------------

def _say(text: str) -> None:
    print(text, flush=True)


def _note(text: str) -> None:
    print(f"note: {text}", file=sys.stderr, flush=True)


def cmd_serve(args: argparse.Namespace, layout: Layout) -> int:
    serve = _helper("dreambooth.ui.app", "serve", "serve")
    options = {"open_browser": True} if args.open_browser else {}
    result = serve(layout.ensure(), host=args.host, port=args.port, **options)
    return result if isinstance(result, int) else 0


def cmd_demo_model(args: argparse.Namespace, layout: Layout) -> int:
    write = _helper("dreambooth.models.demo", "write_demo_checkpoint", "demo-model")
    out = Path(args.out) if args.out else layout.ensure().checkpoints_dir / f"demo-{args.family}.safetensors"
    written = write(args.family, out)
    _say(f"Wrote a tiny {args.family} checkpoint: {written or out}")
    return 0


def find_checkpoint(layout: Layout, source: str) -> Path:
    """A path as given, else a file (or diffusers folder) of that name in the checkpoints folder."""
    candidates = [Path(source).expanduser(), layout.checkpoints_dir / source]
    if not Path(source).suffix:
        candidates += [layout.checkpoints_dir / f"{source}{ext}" for ext in (".safetensors", ".ckpt")]
    for candidate in candidates:
        if candidate.exists():
            return candidate
    raise ConfigError(f"Checkpoint '{source}' not found as a path or in {layout.checkpoints_dir}; "
                      "give the file's path or its name in the checkpoints folder.")


def cmd_create(args: argparse.Namespace, layout: Layout) -> int:
    store = ModelStore(layout.ensure())
    store.model(args.name)  # refuse an unsafe name before any slow import
    if store.model(args.name).exists():
        raise ConfigError(f"A model named '{args.name}' already exists in {layout.dreambooth_dir}; choose another "
                          "name or delete that folder.")
    source = find_checkpoint(layout, args.source)
    create = _helper("dreambooth.models.loading", "create_model", "create")
    prediction = "v_prediction" if args.v_prediction else None
    create(store, args.name, source, args.family, prediction)
    config = store.existing(args.name).load_config()
    _say(f"Created model '{args.name}' ({config.model_family}, {config.prediction_type}) from {source} in "
         f"{store.model(args.name).root}")
    return 0


def model_summary(store: ModelStore, name: str) -> str:
    try:
        config = store.model(name).load_config()
    except DreamboothError as error:
        return f"{name}\t(config unreadable: {error})"
    return f"{name}\t{config.model_family}\t{config.method}\t{len(config.concepts)} concept(s)"


def cmd_list(args: argparse.Namespace, layout: Layout) -> int:
    store = ModelStore(layout)
    names = store.names()
    if not names:
        _say(f"No models in {layout.dreambooth_dir} yet; create one with: {PROG} create --name NAME --from CKPT")
        return 0
    _say("name\tfamily\tmethod\tconcepts")
    for name in names:
        _say(model_summary(store, name))
    return 0


def cmd_config(args: argparse.Namespace, layout: Layout) -> int:
    model = ModelStore(layout).existing(args.name)
    config = model.load_config()
    changed = False
    if args.replace and not args.import_file:
        raise UsageError("--replace goes with --import FILE (it replaces the settings with the file's).")
    if args.import_file:
        from .config.legacy import import_file

        result = import_file(args.import_file, base=config, replace=args.replace)
        config, changed = result.config, True
        for message in result.messages:
            _note(message)
    if args.set_identity:
        from .config.legacy import apply_identity

        changes = dict(_split_assignment(item) for item in args.set_identity)
        config, changed = apply_identity(config, changes, "--set-identity"), True
    if args.set:
        config, changed = apply_assignments(config, args.set), True
    if changed:
        model.save_config(config)
        _say(f"Saved {model.config_path}")
    if args.show or not changed:
        _say(json.dumps(io.to_dict(config), indent=2, ensure_ascii=False))
    return 0


def settings_hash(config: TrainingConfig) -> str:
    text = json.dumps(io.to_dict(config), sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def cmd_export(args: argparse.Namespace, layout: Layout) -> int:
    model = ModelStore(layout).existing(args.name)
    config = model.load_config()
    precision = args.precision or config.save_precision
    out = Path(args.out) if args.out else layout.ensure().checkpoints_dir / f"{args.name}.safetensors"
    export_working = _helper("dreambooth.models.export", "export_working", "export")
    if not model.working.is_dir():
        raise ConfigError(f"Model '{args.name}' has no weights in {model.working}; create it again from a checkpoint.")
    metadata = {"dreambooth_model": args.name, "dreambooth_base": base_checkpoint_name(config),
                "dreambooth_settings_hash": settings_hash(config)}
    with model.writer_lock("export", _note):
        written = export_working(model.working, out, precision, metadata=metadata, warn=_note)
    _say(f"Exported '{args.name}' ({precision}) to {written or out}")
    return 0


def training_overrides(args: argparse.Namespace, config: TrainingConfig) -> dict[str, Any]:
    """Generated-flag values plus --set items (typed), checked against the model's config before training."""
    overrides = schema_overrides(args)
    trial = copy.deepcopy(config)
    for item in args.set or []:
        name, raw = _split_assignment(item)
        overrides[name] = set_override(trial, name, raw)
    apply_overrides(config, overrides)
    return overrides


def cmd_train(args: argparse.Namespace, layout: Layout) -> int:
    model = ModelStore(layout).existing(args.name)
    overrides = training_overrides(args, model.load_config())
    run_training = _helper("dreambooth.cli_train", "run_training", "train")
    result = run_training(layout, args.name, overrides)
    return result if isinstance(result, int) else 0


def cmd_wizard(args: argparse.Namespace, layout: Layout) -> int:
    run_cli = _helper("dreambooth.guide.wizard", "run_cli", "wizard")
    return int(run_cli(args) or 0)


# --- LoRA tools ----------------------------------------------------------------------------------

def rank_rule(args: argparse.Namespace, rank: int) -> Any:
    """--rank N (fixed), or --dynamic ratio:R / energy:F capped at --max-rank."""
    rules = _helper("dreambooth.loratools.extract", "RankRule", "lora tools")
    if not args.dynamic:
        return rules("fixed", rank).check("--rank")
    mode, sep, value = args.dynamic.partition(":")
    if not sep or mode not in ("ratio", "energy"):
        raise UsageError(f"--dynamic {args.dynamic!r}: use ratio:R (keep singular values >= largest/R) or "
                         "energy:F (keep the fraction F of the change).")
    try:
        return rules(mode, float(value), args.max_rank).check("--dynamic")
    except ValueError:
        raise UsageError(f"--dynamic {args.dynamic!r}: {value!r} is not a number.") from None


def _tool_done(result: Any) -> int:
    _say(result.message)
    return 0


def cmd_lora_extract(args: argparse.Namespace, layout: Layout) -> int:
    extract = _helper("dreambooth.loratools.jobs", "extract", "lora-extract")
    rule = rank_rule(args, args.rank)
    conv = _helper("dreambooth.loratools.jobs", "conv_rule_for", "lora-extract")(rule, args.conv_rank)
    return _tool_done(extract(layout.ensure(), args.source, args.base, rule, conv, args.out, args.precision,
                              restrict=False))


def cmd_lora_resize(args: argparse.Namespace, layout: Layout) -> int:
    resize = _helper("dreambooth.loratools.jobs", "resize", "lora-resize")
    return _tool_done(resize(layout.ensure(), args.lora, rank_rule(args, args.rank), args.out, args.family,
                             args.precision, restrict=False))


def cmd_lora_merge(args: argparse.Namespace, layout: Layout) -> int:
    loras = _helper("dreambooth.loratools.jobs", "parse_weighted", "lora-merge")(args.lora)
    if args.into:
        merge = _helper("dreambooth.loratools.jobs", "merge_to_checkpoint", "lora-merge")
        return _tool_done(merge(layout.ensure(), args.into, loras, args.out, args.precision or "fp16", restrict=False))
    rule = rank_rule(args, args.rank) if args.rank or args.dynamic else None
    merge = _helper("dreambooth.loratools.jobs", "merge_to_lora", "lora-merge")
    return _tool_done(merge(layout.ensure(), loras, rule, args.out, args.family, args.precision or "fp32",
                            restrict=False))


def _rank_options(parser: argparse.ArgumentParser, rank_default: int | None, what: str) -> None:
    parser.add_argument("--rank", type=int, default=rank_default, help=f"Fixed rank {what}.")
    parser.add_argument("--dynamic", metavar="MODE:VALUE", help="Rank per layer instead: ratio:R keeps singular "
                        "values >= largest/R, energy:F keeps the fraction F (e.g. 0.9) of each layer's change.")
    parser.add_argument("--max-rank", type=int, default=128, help="Highest rank --dynamic may choose (default 128).")
    parser.add_argument("--out", metavar="NAME", help="Output file name (no folder; never replaces a file).")


def _add_lora_tools(add: Callable[..., argparse.ArgumentParser]) -> None:
    extract = add("lora-extract", cmd_lora_extract, "Extract a LoRA (LoCon) from a trained model minus its base.")
    extract.add_argument("--from", dest="source", required=True, metavar="SOURCE", help="model:NAME (a model's "
                         "working weights), a checkpoint in the checkpoints folder or a path.")
    extract.add_argument("--base", metavar="CKPT", help="Base checkpoint (default: the model's own base).")
    _rank_options(extract, 8, "of the linear layers (default 8)")
    extract.add_argument("--conv-rank", type=int, default=0, help="Rank of the 3x3 convolutions (LoCon; with --dynamic their cap); 0: none.")
    extract.add_argument("--precision", choices=PRECISIONS, default="fp32", help="Saved precision (default fp32).")
    resize = add("lora-resize", cmd_lora_resize, "Resize a LoRA to a lower rank (alpha rescaled, same effect).")
    resize.add_argument("--lora", required=True, metavar="FILE", help="LoRA in the LoRA folder, or a path.")
    _rank_options(resize, 8, "(default 8)")
    resize.add_argument("--family", choices=FAMILIES, help="Model family, for files in diffusers/peft spelling.")
    resize.add_argument("--precision", choices=PRECISIONS, default="fp32", help="Saved precision (default fp32).")
    merge = add("lora-merge", cmd_lora_merge, "Merge LoRAs into a checkpoint (--into) or into one LoRA.")
    merge.add_argument("--lora", required=True, nargs="+", action="extend", metavar="FILE[:WEIGHT]",
                       help="LoRAs and their weights (default 1), e.g. style.safetensors:0.7.")
    merge.add_argument("--into", metavar="CKPT", help="Checkpoint to merge into (output: the checkpoints folder).")
    _rank_options(merge, None, "of the merged LoRA (default: concatenated ranks, exact)")
    merge.add_argument("--family", choices=FAMILIES, help="Model family, for files in diffusers/peft spelling.")
    merge.add_argument("--precision", choices=PRECISIONS, help="Saved precision (default fp16 for checkpoints, "
                       "fp32 for LoRAs).")


# --- parser ------------------------------------------------------------------------------------

def _location_options(parser: argparse.ArgumentParser, defaults: bool) -> None:
    # Sub-commands repeat these with SUPPRESS so that `list --data-dir X` works and does not reset a global value.
    keep = {} if defaults else {"default": argparse.SUPPRESS}
    parser.add_argument("--data-dir", metavar="DIR", help="Root in the web UI's layout: DIR/models/Stable-diffusion, "
                        "DIR/models/Lora, DIR/models/dreambooth (default: ./data).",
                        **({"default": str(DEFAULT_DATA_DIR)} if defaults else keep))
    for flag, what in (("--ckpt-dir", "checkpoints (default: DIR/models/Stable-diffusion)"),
                       ("--lora-dir", "LoRAs (default: DIR/models/Lora)"),
                       ("--dreambooth-dir", "trainable models (default: DIR/models/dreambooth)")):
        parser.add_argument(flag, metavar="PATH", help=f"Folder of {what}.", **({"default": None} if defaults else keep))


def _add_wizard(commands: Any, common: argparse.ArgumentParser) -> None:
    parser = commands.add_parser("wizard", parents=[common], help="Suggest steps, class images and LR for a dataset.",
                                 description="Print a training plan (steps, class images, learning rate).")
    parser.set_defaults(handler=cmd_wizard)
    try:
        add_arguments = _helper("dreambooth.guide.wizard", "add_arguments", "wizard")
    except Unavailable as why:
        parser.set_defaults(unavailable=str(why))
        return
    add_arguments(parser)


CommandAdder = Callable[[str, Callable[..., int], str], argparse.ArgumentParser]


def _add_app_commands(add: CommandAdder) -> None:
    serve = add("serve", cmd_serve, "Run the standalone training app in the browser (the default command).")
    serve.add_argument("--host", default="127.0.0.1", help="Address to listen on (default: 127.0.0.1, this "
                       "machine only; 0.0.0.0 for the network).")
    serve.add_argument("--port", type=int, default=7860, help="Port to listen on (default: 7860).")
    serve.add_argument("--open-browser", action="store_true", help="Open the app in the default browser.")
    demo = add("demo-model", cmd_demo_model, "Write a tiny random checkpoint of a family (for tests and trials).")
    demo.add_argument("--family", choices=FAMILIES, required=True, help="Architecture to imitate.")
    demo.add_argument("--out", metavar="FILE", help="Output .safetensors (default: the checkpoints folder, "
                      "demo-FAMILY.safetensors).")


def _add_model_commands(add: CommandAdder) -> None:
    create = add("create", cmd_create, "Create a trainable model from a checkpoint.")
    create.add_argument("--name", required=True, help="Name of the new model (its folder under models/dreambooth).")
    create.add_argument("--from", dest="source", required=True, metavar="CKPT",
                        help="Checkpoint path, a file name in the checkpoints folder, or a diffusers folder.")
    create.add_argument("--family", choices=FAMILIES, help="Architecture, when detection should be overridden.")
    create.add_argument("--v-prediction", action="store_true",
                        help="The checkpoint is an SD 2.x 768-v model (when the file does not say so).")
    add("list", cmd_list, "List the trainable models with their family and method.")
    _add_config_command(add)


def _add_config_command(add: CommandAdder) -> None:
    config = add("config", cmd_config, "Show, change or import a model's settings.")
    config.add_argument("--name", required=True, help="The model.")
    config.add_argument("--show", action="store_true", help="Print the settings as JSON (also after changes).")
    config.add_argument("--set", nargs="+", action="extend", metavar="FIELD=VALUE", help="Change settings, e.g. learning_rate=1e-6 "
                        "concepts.0.instance_prompt='photo of sks dog' (index = count adds a concept).")
    config.add_argument("--import", dest="import_file", metavar="FILE", help="Import our JSON, the old DreamBooth "
                        "extension's db_config.json, or a concepts list JSON, merged onto the current settings "
                        "(the model's family, prediction type and base are kept); unmapped keys are listed.")
    config.add_argument("--replace", action="store_true", help="With --import: replace all settings with the "
                        "file's (unnamed ones go back to their defaults) instead of merging.")
    config.add_argument("--set-identity", nargs="+", action="extend", metavar="FIELD=VALUE", help="Correct what "
                        "the model is when detection chose wrong: model_family, prediction_type or "
                        "base_checkpoint, e.g. prediction_type=v_prediction.")


def _add_run_commands(add: CommandAdder) -> None:
    export = add("export", cmd_export, "Export a model as a .safetensors checkpoint for the web UI.")
    export.add_argument("--name", required=True, help="The model.")
    export.add_argument("--precision", choices=PRECISIONS, help="Weights precision (default: the model's "
                        "save_precision). fp32 keeps every training update; fp16/bf16 halve the size.")
    export.add_argument("--out", metavar="FILE", help="Output file (default: checkpoints folder, NAME.safetensors).")
    train = add("train", cmd_train, "Train a model; flags override its saved settings for this run only.")
    train.add_argument("--name", required=True, help="The model.")
    train.add_argument("--set", nargs="+", action="extend", metavar="FIELD=VALUE", help="Overrides by name, including concept "
                       "settings: concepts.0.instance_prompt='photo of sks dog'.")
    add_schema_flags(train)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="DreamBooth, LoRA and fine-tune training for Stable Diffusion. "
                     "Without a command: serve the standalone app.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _location_options(parser, defaults=True)
    common = _Parser(add_help=False)
    _location_options(common, defaults=False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def add(name: str, handler: Callable[..., int], help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, parents=[common], help=help, description=help)
        sub.set_defaults(handler=handler)
        return sub

    # The order here is the order of `--help`.
    _add_app_commands(add)
    _add_model_commands(add)
    _add_run_commands(add)
    _add_wizard(commands, common)
    _add_lora_tools(add)
    return parser


def run(argv: Sequence[str] | None = None) -> int:
    """Parse and run; DreamboothError propagates (main() turns it into one line)."""
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    if getattr(args, "unavailable", None):
        raise Unavailable(args.unavailable)
    if args.command is None:
        args = build_parser().parse_args(["serve", *(list(argv) if argv is not None else sys.argv[1:])])
    if args.handler is cmd_serve:  # the server's jobs silence third-party notices themselves
        return args.handler(args, layout_from_args(args))
    with third_party_quiet():
        return args.handler(args, layout_from_args(args))


def _one_line(error: BaseException) -> str:
    if isinstance(error, OSError) and error.filename:
        return f"{error.strerror or error}: {error.filename}"
    return " ".join(str(error).split()) or type(error).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m dreambooth`; returns the exit status."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(DropAlreadyShown())  # printed through the run's callbacks already
    logging.getLogger("dreambooth").setLevel(logging.INFO)
    try:
        return run(argv)
    except UsageError as error:
        print(f"error: {_one_line(error)}", file=sys.stderr)
        return EXIT_USAGE
    except (DreamboothError, OSError) as error:
        print(f"error: {_one_line(error)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
