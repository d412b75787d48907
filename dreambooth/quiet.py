"""Third-party output the user cannot act on, silenced while our own jobs run (and only then).

A training run, a model creation or an export loads and saves weights through diffusers and transformers,
which print progress bars for files we read and write ourselves ("Loading weights", "Writing model shards"),
notices about casts we make on purpose (diffusers' "modules that should be kept in float32"), and
bitsandbytes' notices about optional CPU kernels from a hub this project never uses. None names a setting of
ours, so the user can do nothing about them; real errors (logged at ERROR) still pass. Our own warnings reach
the user through the run's callbacks instead.

`ALREADY_SHOWN` marks a log record whose text the user has seen through a callback already; the CLI's log
handler drops such records so a warning is printed once.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

ALREADY_SHOWN = "dreambooth_already_shown"
# Loggers of notices about our own deliberate loading, casting and kernel choices.
NOISY_LOGGERS = ("bitsandbytes", "diffusers", "transformers", "accelerate", "peft", "huggingface_hub")
# Deprecation and usage notices the libraries raise about each other's APIs, not about ours.
NOISY_WARNING_MODULES = r"(bitsandbytes|diffusers|transformers|accelerate|peft|huggingface_hub)(\.|$)"
NOISY_WARNING_CATEGORIES = (FutureWarning, DeprecationWarning, UserWarning)
# Progress-bar switches of the libraries that draw bars while we load or save: (module, is_on, off, on).
PROGRESS_BARS = (("transformers.utils.logging", "is_progress_bar_enabled", "disable_progress_bar",
                  "enable_progress_bar"),
                 ("diffusers.utils.logging", "is_progress_bar_enabled", "disable_progress_bar",
                  "enable_progress_bar"))

_lock = threading.Lock()
_depth = 0
_restore: list[Any] = []


class DropAlreadyShown(logging.Filter):
    """Drops log records marked ALREADY_SHOWN (their text reached the user through a callback)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, ALREADY_SHOWN, False)


def shown(extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The `extra` of a log call whose message the user has already seen."""
    return {**(extra or {}), ALREADY_SHOWN: True}


@contextmanager
def third_party_quiet() -> Iterator[None]:
    """Silence the notices above for the block; nested and concurrent uses restore once, at the last exit."""
    global _depth
    with _lock:
        _depth += 1
        if _depth == 1:
            _restore[:] = _silence()
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                for undo in reversed(_restore):
                    undo()
                _restore.clear()


def _silence() -> list[Any]:
    # Progress bars first: importing the libraries' logging modules sets their loggers' levels, once.
    undo: list[Any] = _progress_bars_off()
    for name in NOISY_LOGGERS:
        logger = logging.getLogger(name)
        undo.append(lambda logger=logger, level=logger.level: logger.setLevel(level))
        logger.setLevel(logging.ERROR)
    for category in NOISY_WARNING_CATEGORIES:
        warnings.filterwarnings("ignore", category=category, module=NOISY_WARNING_MODULES)
    added = warnings.filters[:len(NOISY_WARNING_CATEGORIES)]
    undo.append(lambda: _remove_filters(added))
    return undo


def _remove_filters(added: list[Any]) -> None:
    for entry in added:
        if entry in warnings.filters:
            warnings.filters.remove(entry)
    mutated = getattr(warnings, "_filters_mutated", None)  # drops the per-module caches of old decisions
    if mutated is not None:
        mutated()


def _progress_bars_off() -> list[Any]:
    undo = []
    for module_name, is_on, off, on in PROGRESS_BARS:
        package = module_name.split(".")[0]
        if package not in sys.modules and importlib.util.find_spec(package) is None:
            continue
        module = importlib.import_module(module_name)
        if getattr(module, is_on)():
            getattr(module, off)()
            undo.append(getattr(module, on))
    return undo
