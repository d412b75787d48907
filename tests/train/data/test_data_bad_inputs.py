"""Bad inputs, generated: each is skipped with a reason naming the file and the fix, or trains correctly.

Every case puts one good image beside the bad one, scans, loads what trains, and checks that no
user file was changed or removed.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, features

from dreambooth.errors import DataError
from dreambooth.train.data import BatchItem, DatasetPlan, load_pixels, scan_dataset
from dreambooth.train.data.buckets import crop_offset

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg_bytes(image: Image.Image, **args) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95, **args)
    return buffer.getvalue()


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int, height: int) -> bytes:
    """A PNG header declaring a huge 1-bit image with a tiny (invalid) pixel stream."""
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def halves(left, right, mode="RGB", size=(64, 64)) -> Image.Image:
    image = Image.new(mode, size, left)
    image.paste(right, (size[0] // 2, 0, size[0], size[1]))
    return image


def top_bottom(top, bottom, size=(60, 40)) -> Image.Image:
    image = Image.new("RGB", size, bottom)
    image.paste(top, (0, 0, size[0], size[1] // 2))
    return image


def exif_jpeg(orientation: int) -> bytes:
    image = top_bottom(RED, BLUE)
    exif = image.getexif()
    exif[0x0112] = orientation
    return jpeg_bytes(image, exif=exif.tobytes())


def palette_with_transparency() -> bytes:
    image = Image.new("P", (64, 64), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.paste(1, (32, 0, 64, 64))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", transparency=0)
    return buffer.getvalue()


def animated(fmt: str) -> bytes:
    frames = [Image.new("RGB", (64, 64), RED), Image.new("RGB", (64, 64), BLUE)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format=fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buffer.getvalue()


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def corrupt_idat() -> bytes:
    data = bytearray(png_bytes(halves(RED, BLUE)))
    start = data.index(b"IDAT") + 8
    data[start:start + 20] = b"\xff" * 20
    return bytes(data)


# name -> (file name, bytes factory, substring of the skip reason)
SKIPS: dict[str, tuple[str, Callable[[], bytes], str]] = {
    "zero_byte_png": ("empty.png", lambda: b"", "0-byte"),
    "zero_byte_jpg": ("empty.jpg", lambda: b"", "0-byte"),
    "truncated_png": ("cut.png", lambda: png_bytes(halves(RED, BLUE))[:60], "corrupt"),
    "truncated_jpeg": ("cut.jpg", lambda: jpeg_bytes(Image.effect_noise((64, 64), 50).convert("RGB"))[:400],
                       "truncated"),
    "corrupt_png_data": ("bad.png", corrupt_idat, "corrupt"),
    "text_as_jpg": ("notes.jpg", lambda: b"just some text, not an image\n" * 5, "not an image"),
    "html_as_png": ("page.png", lambda: b"<!doctype html><html><body>404</body></html>", "not an image"),
    "random_bytes_webp": ("noise.webp", lambda: np.random.default_rng(0).bytes(2000), "not an image"),
    "bomb_png": ("bomb.png", lambda: bomb_png(100_000, 100_000), "bomb"),
    "just_over_limit_png": ("huge.png", lambda: bomb_png(10_000, 9_000), "megapixel"),
    "truncated_gif": ("cut.gif", lambda: animated("GIF")[:30], "corrupt"),
    "truncated_bmp": ("cut.bmp", lambda: encoded(halves(RED, BLUE), "BMP")[:100], "corrupt"),
    "unsupported_heic": ("phone.heic", lambda: b"\0\0\0\x18ftypheic", "not supported"),
    "macos_metadata": ("._photo.jpg", lambda: b"\0\5\26\7\0\2\0\0Mac OS X", "hidden"),
    "too_small_no_upscale": ("tiny.png", lambda: png_bytes(Image.new("RGB", (20, 20), RED)), "smaller than"),
}


def check_red_right_blue_left(pixels) -> None:
    assert _rgb(pixels, 60, 32) == pytest.approx(RED, abs=40) and _rgb(pixels, 3, 32) == pytest.approx(BLUE, abs=40)


def _rgb(pixels, x: int, y: int) -> tuple[int, ...]:
    return tuple(int(v) for v in ((pixels[:, y, x] + 1) * 127.5).round())


def expect(left, right, tolerance=12):
    def check(pixels) -> None:
        assert _rgb(pixels, 4, 32) == pytest.approx(left, abs=tolerance)
        assert _rgb(pixels, 59, 32) == pytest.approx(right, abs=tolerance)
    return check


def expect_rows(top, bottom):
    def check(pixels) -> None:
        assert _rgb(pixels, 32, 3) == pytest.approx(top, abs=40)
        assert _rgb(pixels, 32, 60) == pytest.approx(bottom, abs=40)
    return check


def grey16() -> bytes:
    return png_bytes(Image.fromarray(np.full((64, 64), 32896, dtype=np.uint16)))


# name -> (file name, bytes factory, check of the loaded (3,64,64) pixels)
TRAINS: dict[str, tuple[str, Callable[[], bytes], Callable]] = {
    "cmyk_jpeg": ("cmyk.jpg", lambda: jpeg_bytes(halves((0, 255, 255, 0), (255, 255, 0, 0), "CMYK")),
                  expect(RED, BLUE, 40)),
    "cmyk_tiff": ("cmyk.tif", lambda: encoded(halves((0, 255, 255, 0), (255, 255, 0, 0), "CMYK"), "TIFF"),
                  expect(RED, BLUE)),
    "grey_16bit_png": ("g16.png", grey16, expect((128, 128, 128), (128, 128, 128), 2)),
    "palette_transparency": ("pal.png", palette_with_transparency, expect(WHITE, RED)),
    "rgba_transparent": ("rgba.png", lambda: png_bytes(halves((0, 0, 0, 0), (255, 0, 0, 255), "RGBA")),
                         expect(WHITE, RED)),
    "rgba_half_alpha": ("half.png", lambda: png_bytes(halves((0, 0, 255, 128), (0, 0, 255, 255), "RGBA")),
                        expect((127, 127, 255), BLUE, 3)),
    "greyscale_la": ("la.png", lambda: png_bytes(halves((0, 0), (0, 255), "LA")), expect(WHITE, (0, 0, 0))),
    "greyscale_jpeg": ("grey.jpg", lambda: jpeg_bytes(halves(30, 220, "L")), expect((30,) * 3, (220,) * 3, 12)),
    "one_bit_bmp": ("bw.bmp", lambda: encoded(halves(0, 1, "1"), "BMP"), expect((0, 0, 0), WHITE, 1)),
    "exif_rotate_90_cw": ("rot6.jpg", lambda: exif_jpeg(6), check_red_right_blue_left),
    "exif_rotate_90_ccw": ("rot8.jpg", lambda: exif_jpeg(8), expect(RED, BLUE, 40)),
    "exif_rotate_180": ("rot3.jpg", lambda: exif_jpeg(3), expect_rows(BLUE, RED)),
    "animated_gif_first_frame": ("anim.gif", lambda: animated("GIF"), expect(RED, RED, 20)),
    "png_named_jpg": ("really_png.jpg", lambda: png_bytes(halves(RED, BLUE)), expect(RED, BLUE)),
    "unicode_and_spaces": ("häßlich hund 🐶 (1).png", lambda: png_bytes(halves(RED, BLUE)), expect(RED, BLUE)),
    "float_tiff": ("float.tif", lambda: encoded(Image.fromarray(np.full((64, 64), 0.5, np.float32)), "TIFF"),
                   expect((0, 0, 0), (0, 0, 0), 2)),
}
if features.check_module("webp"):
    TRAINS["animated_webp_first_frame"] = ("anim.webp", lambda: animated("WEBP"), expect(RED, RED, 20))


def snapshot(folder: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def scan_with(tmp_path: Path, config_for, name: str, data: bytes, folder: str = "my images/ü",
              **settings) -> tuple[DatasetPlan, Path, dict]:
    target = tmp_path / folder
    target.mkdir(parents=True)
    Image.new("RGB", (64, 64), (9, 9, 9)).save(target / "good.png")
    (target / name).write_bytes(data)
    before = snapshot(target)
    config = config_for(folder, enable_bucketing=False, **settings)
    return scan_dataset(config), target, before


@pytest.mark.parametrize("case", sorted(SKIPS))
def test_bad_file_is_skipped_with_reason(tmp_path: Path, config_for, case: str) -> None:
    name, factory, reason = SKIPS[case]
    settings = {"bucket_no_upscale": True} if case == "too_small_no_upscale" else {}
    plan, folder, before = scan_with(tmp_path, config_for, name, factory(), **settings)
    assert [r.path.name for r in plan.instance] == ["good.png"]
    [(path, message)] = plan.skipped
    assert path == folder / name and name in message and reason in message
    assert any(fix in message for fix in ("re-", "convert", "downscale", "use a", "check", "delete"))
    assert snapshot(folder) == before


@pytest.mark.parametrize("case", sorted(TRAINS))
def test_odd_image_trains_correctly(tmp_path: Path, config_for, case: str) -> None:
    name, factory, check = TRAINS[case]
    plan, folder, before = scan_with(tmp_path, config_for, name, factory())
    assert plan.skipped == []
    [record] = [r for r in plan.instance if r.path.name == name]
    item = BatchItem(record, (64, 64), False, crop_offset(record.size, (64, 64), None), 0)
    pixels, _ = load_pixels(item, plan_config(plan, tmp_path))
    assert pixels.shape == (3, 64, 64)
    check(pixels)
    assert snapshot(folder) == before


def plan_config(plan: DatasetPlan, tmp_path: Path):
    from dreambooth.config.schema import TrainingConfig

    return TrainingConfig(resolution=64, enable_bucketing=False, concepts=plan.concepts)


def test_exif_rotation_swaps_recorded_size(tmp_path: Path, config_for) -> None:
    plan, _, _ = scan_with(tmp_path, config_for, "rot.jpg", exif_jpeg(6))
    assert {r.path.name: r.size for r in plan.instance}["rot.jpg"] == (40, 60)


def test_extremely_wide_image_trains_in_a_wide_bucket(tmp_path: Path, config_for) -> None:
    (tmp_path / "d").mkdir()
    Image.new("RGB", (2000, 20), RED).save(tmp_path / "d" / "strip.png")
    config = config_for("d", resolution=128, bucket_step=32)
    [record] = scan_dataset(config).instance
    from dreambooth.train.data import epoch_batches

    [[item]] = epoch_batches(scan_dataset(config), config, 0, 0)
    assert item.bucket[0] > item.bucket[1]
    assert load_pixels(item, config)[0].shape[1:] == (item.bucket[1], item.bucket[0])


# --- captions -----------------------------------------------------------------------------------

def caption_warnings(tmp_path: Path, config_for, caption: bytes | None, **concept) -> tuple[str, list[str]]:
    (tmp_path / "d").mkdir()
    Image.new("RGB", (64, 64)).save(tmp_path / "d" / "a.png")
    if caption is not None:
        (tmp_path / "d" / "a.txt").write_bytes(caption)
    warnings: list[str] = []
    config = config_for("d", concept={"instance_prompt": "[filewords]", "instance_token": "sks",
                                      "class_token": "dog", **concept})
    plan = scan_dataset(config, warn=warnings.append)
    return plan.instance[0].caption, warnings


def test_missing_caption_warns_and_uses_tokens(tmp_path: Path, config_for) -> None:
    caption, warnings = caption_warnings(tmp_path, config_for, None)
    assert caption == "sks dog"
    assert any("no caption file" in w and "a.png" in w for w in warnings)


@pytest.mark.parametrize("content", [b"", b"   \n\t\n"])
def test_empty_caption_warns(tmp_path: Path, config_for, content: bytes) -> None:
    caption, warnings = caption_warnings(tmp_path, config_for, content)
    assert caption == "sks dog" and any("a.txt" in w and "empty" in w for w in warnings)


def test_over_long_caption_warns(tmp_path: Path, config_for) -> None:
    long_caption = ", ".join(f"tag{i} word" for i in range(60)).encode()
    caption, warnings = caption_warnings(tmp_path, config_for, long_caption)
    assert caption.startswith("sks dog, tag0")
    assert any("over 75 tokens" in w and "a.png" in w for w in warnings)


def test_non_utf8_caption_warns(tmp_path: Path, config_for) -> None:
    caption, warnings = caption_warnings(tmp_path, config_for, "a dog in a café".encode("cp1252"))
    assert caption == "a sks dog in a café" and any("Latin-1" in w for w in warnings)


def test_no_caption_and_no_prompt_warns_empty(tmp_path: Path, config_for) -> None:
    caption, warnings = caption_warnings(tmp_path, config_for, None, instance_token="", class_token="")
    assert caption == "" and any("empty prompt" in w for w in warnings)


# --- folders and masks --------------------------------------------------------------------------

def test_folder_of_only_bad_files_raises_with_first_reason(tmp_path: Path, config_for) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.png").write_bytes(b"")
    with pytest.raises(DataError) as error:
        scan_dataset(config_for("d"))
    assert "x.png" in str(error.value) and "0-byte" in str(error.value) and str(tmp_path / "d") in str(error.value)


def test_corrupt_mask_warns_and_trains_unmasked(tmp_path: Path, config_for) -> None:
    (tmp_path / "d").mkdir()
    Image.new("RGB", (64, 64)).save(tmp_path / "d" / "a.png")
    (tmp_path / "d" / "a-masklabel.png").write_bytes(b"garbage")
    warnings: list[str] = []
    plan = scan_dataset(config_for("d", masked_training=True), warn=warnings.append)
    assert plan.instance[0].mask_path is None
    assert any("a-masklabel.png" in w and "without a mask" in w for w in warnings)


def test_file_removed_or_changed_after_scan_is_a_clear_error(tmp_path: Path, config_for) -> None:
    (tmp_path / "d").mkdir()
    Image.new("RGB", (64, 64)).save(tmp_path / "d" / "a.png")
    config = config_for("d")
    [record] = scan_dataset(config).instance
    item = BatchItem(record, (64, 64), False, (0, 0), 0)
    Image.new("RGB", (64, 64), RED).save(record.path)
    with pytest.raises(DataError, match="a.png.*changed since"):
        load_pixels(item, config)
    record.path.unlink()
    with pytest.raises(DataError, match="a.png.*0-byte|a.png.*cannot be read"):
        load_pixels(item, config)


def test_all_cases_counted() -> None:
    # The matrix stays broad: at least 30 distinct bad inputs, each generated by the tests above.
    assert len(SKIPS) + len(TRAINS) >= 30
