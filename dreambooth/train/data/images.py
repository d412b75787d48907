"""Reading user images safely: probe without trusting the file, decode to upright 8-bit RGB.

Every problem becomes an `ImageProblem` whose text says what is wrong and what to do; the scanner
lists it as a skipped file. Nothing here writes to or deletes a user's file.

Colour rules (documented for users):
- transparency (RGBA, LA, palette with a transparent colour) is composited on WHITE, the usual
  background of cut-out product and subject photos; black would darken anti-aliased edges;
- CMYK, YCbCr, LAB and HSV are converted to RGB by PIL;
- 16-bit and 32-bit greyscale are scaled to 8 bits (not clipped), greyscale becomes RGB;
- animated GIF/WebP/PNG train on their first frame;
- EXIF orientation is applied, so a phone photo stored sideways trains upright.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from ...imagefiles import MASK_SUFFIX

# PIL's own default bomb threshold (about 89 megapixels): far above any training image.
MAX_PIXELS = 89_478_485
# EXIF orientations 5-8 rotate by 90 degrees, so width and height swap.
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}
_EXIF_ORIENTATION = 0x0112
WHITE = (255, 255, 255)


class ImageProblem(Exception):
    """A file that cannot be used as a training image; the text is the reason and the fix."""


def mask_path_for(image: Path) -> Path:
    return image.with_name(image.stem + MASK_SUFFIX)


def content_hash(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def read_bytes(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ImageProblem(f"cannot be read ({error.strerror or error}); check the file's permissions") from None
    if not data:
        raise ImageProblem("is an empty (0-byte) file; re-export or remove it")
    return data


def probe(path: Path) -> tuple[tuple[int, int], str]:
    """(upright width, height) and content hash of a usable image, or raise ImageProblem.

    The image is fully decoded once (JPEGs at reduced scale) so truncated files are caught here,
    not hours into training.
    """
    data = read_bytes(path)
    image = _open(data)
    width, height = image.size
    if _orientation(image) in _SWAPPING_ORIENTATIONS:
        width, height = height, width
    if image.format == "PNG":
        _verify_checksums(data)
    _decode_check(image)
    return (width, height), content_hash(data)


def _verify_checksums(data: bytes) -> None:
    # PNG chunks carry CRCs that a plain decode ignores; a flipped byte would train as noise.
    try:
        Image.open(io.BytesIO(data)).verify()
    except Exception as error:  # noqa: BLE001 - any failure means the file is damaged
        raise ImageProblem(f"is truncated or corrupt ({error}); re-save or re-download it") from None


def _open(data: bytes) -> Image.Image:
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageProblem(_bomb_reason()) from None
        except Image.UnidentifiedImageError:
            raise ImageProblem("is not an image PIL can read (wrong extension or corrupt); re-save it as "
                               "PNG or JPEG") from None
        except (OSError, SyntaxError, ValueError) as error:
            raise ImageProblem(f"is truncated or corrupt ({error}); re-save it as PNG or JPEG") from None
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageProblem("has no pixels; re-export it")
    if width * height > MAX_PIXELS:
        raise ImageProblem(f"is {width}x{height} pixels, above the {MAX_PIXELS // 1_000_000} megapixel "
                           "safety limit (possible decompression bomb); downscale it")
    return image


def _bomb_reason() -> str:
    return (f"declares more than {MAX_PIXELS // 1_000_000} megapixels (possible decompression bomb); "
            "downscale it if it is a real photo")


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - a broken EXIF block only means "no rotation"
        return 1


def _decode_check(image: Image.Image) -> None:
    try:
        if image.format == "JPEG":
            # Decoding at 1/8 scale is much faster and still reads every entropy-coded byte.
            image.draft(None, (max(1, image.size[0] // 8), max(1, image.size[1] // 8)))
        image.load()
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as error:
        raise ImageProblem(f"is truncated or corrupt ({error}); re-save or re-download it") from None


def open_rgb(path: Path, expected_hash: str | None = None, min_size: tuple[int, int] | None = None) -> Image.Image:
    """The image as upright 8-bit RGB (first frame), or raise ImageProblem.

    `expected_hash` (from the scan) makes a file that changed since the scan an error instead of
    silently training something else with a stale cache key. `min_size` (upright) lets JPEGs decode
    at a reduced scale that is still at least that big: several times faster for large photos.
    """
    data = read_bytes(path)
    if expected_hash is not None and content_hash(data) != expected_hash:
        raise ImageProblem("changed since the dataset was scanned; restart training to rescan it")
    image = _open(data)
    try:
        if min_size is not None and image.format == "JPEG":
            swap = _orientation(image) in _SWAPPING_ORIENTATIONS
            image.draft(None, (min_size[1], min_size[0]) if swap else min_size)
        image.seek(0)
        image.load()
        upright = _upright(image)
        return to_rgb(upright)
    except ImageProblem:
        raise
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise ImageProblem(f"is truncated or corrupt ({error}); re-save or re-download it") from None


def _upright(image: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image) or image
    except Exception:  # noqa: BLE001 - unusable EXIF: train the pixels as stored
        return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB by the rules in the module docstring."""
    mode = image.mode
    if mode.startswith("I") or mode == "F":
        return _high_depth_grey_to_rgb(image)
    if (mode in ("P", "L", "RGB") and "transparency" in image.info) or mode == "PA":
        image = image.convert("RGBA")
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "RGBa", "La"):
        return _on_white(image)
    return image.convert("RGB")


def _on_white(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, WHITE + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _high_depth_grey_to_rgb(image: Image.Image) -> Image.Image:
    values = np.asarray(image).astype(np.float64)
    # 16-bit files arrive as I;16 or as I holding 0..65535; 8-bit-range data stays as it is.
    top = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
    grey = np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")


def open_mask(path: Path, size: tuple[int, int]) -> Image.Image:
    """A mask as upright 8-bit greyscale at `size` (the image's upright size), or raise ImageProblem."""
    image = _open(read_bytes(path))
    try:
        image.load()
        grey = to_rgb(_upright(image)).convert("L")
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise ImageProblem(f"is truncated or corrupt ({error}); re-save the mask as PNG") from None
    if grey.size != size:
        grey = grey.resize(size, Image.BILINEAR)
    return grey


# Images this far below the training resolution (shorter side under half of it) or this elongated are
# stretched or cropped into something the model learns little from; training still uses them, with a warning.
SMALL_FRACTION = 0.5
EXTREME_ASPECT = 4.0


def size_warnings(label: str, images: Sequence[Any], resolution: int) -> list[str]:
    """Warnings with counts for `images` (anything with .path and .size = (width, height)) far below
    `resolution` or of extreme aspect ratio."""
    small = [r for r in images if min(r.size) < resolution * SMALL_FRACTION]
    extreme = [r for r in images if max(r.size) > EXTREME_ASPECT * max(1, min(r.size))]
    found = []
    if small:
        worst = min(small, key=lambda r: min(r.size))
        factor = resolution / max(1, min(worst.size))
        found.append(f"{label}: {len(small)} of {len(images)} image(s) are far below the training resolution "
                        f"{resolution} px (shorter side under {int(resolution * SMALL_FRACTION)} px, e.g. "
                        f"{Path(worst.path).name} at {worst.size[0]}x{worst.size[1]}, upscaled {factor:.0f}x); they "
                        "train blurry. Replace them with larger images or lower 'resolution'.")
    if extreme:
        worst = max(extreme, key=lambda r: max(r.size) / max(1, min(r.size)))
        found.append(f"{label}: {len(extreme)} of {len(images)} image(s) have an extreme aspect ratio (over "
                        f"{EXTREME_ASPECT:.0f}:1, e.g. {Path(worst.path).name} at {worst.size[0]}x{worst.size[1]}); "
                        "most of each is cropped away or squeezed. Crop them to the subject.")
    return found
