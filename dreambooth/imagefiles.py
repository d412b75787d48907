"""Which files are training images: one list of extensions for the scanner, pre-flight, the tab and imports.

Every extension here is one PIL decodes without plugins; a mask sits beside its image as NAME-masklabel.png
and is never an image of its own.
"""

from __future__ import annotations

from pathlib import PurePath

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MASK_SUFFIX = "-masklabel.png"


def is_image_name(path: str | PurePath) -> bool:
    """True for a training image's file name (any case), false for masks and every other file."""
    name = PurePath(path).name.lower()
    return name.endswith(IMAGE_EXTENSIONS) and not name.endswith(MASK_SUFFIX)
