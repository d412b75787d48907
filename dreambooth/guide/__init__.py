"""Training guidance: the wizard (seed 001's formulas), memory presets and estimate, pre-flight checks.

Pure Python; importing it imports neither torch nor gradio.
"""

from .memory import ItSlowdownMonitor, MemoryEstimate, estimate_memory, warn_if_exceeds
from .preflight import Finding, preflight, raise_on_errors
from .presets import apply_preset, preset_for, preset_notes
from .wizard import WizardInput, WizardResult, apply, plan

__all__ = [
    "Finding", "ItSlowdownMonitor", "MemoryEstimate", "WizardInput", "WizardResult", "apply", "apply_preset",
    "estimate_memory", "plan", "preflight", "preset_for", "preset_notes", "raise_on_errors", "warn_if_exceeds",
]
