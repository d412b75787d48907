"""DreamBooth, LoRA and fine-tune training for Stable Diffusion, usable with or without a web UI.

Importing this package imports neither gradio nor any web UI module.
"""

__version__ = "0.1.0"
