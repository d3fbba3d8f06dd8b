"""Image reading, mode conversion and the original CLI's resize rule."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from ip2p.io.images import (
    check_edit_area,
    edit_size,
    load_image,
    pil_to_tensor,
    resize_for_editing,
    save_image_atomic,
    tensor_to_pil,
    to_rgb,
)
from ip2p.errors import Ip2pError

# (width, height, resolution) -> size, each worked out by hand with the original rule:
#   f = res / long; f = ceil(short * f / 64) * 64 / short; side -> floor(side * f / 64) * 64
EDIT_SIZES = [
    ((512, 512, 512), (512, 512)),     # f = 1
    ((1024, 768, 512), (512, 384)),    # f = 0.5: 768 * 0.5 = 384 = 6 * 64
    ((768, 1024, 512), (384, 512)),    # portrait of the same
    ((640, 480, 512), (512, 384)),     # f = 0.8: 480 * 0.8 = 384
    ((4032, 3024, 512), (512, 384)),   # phone photo: 3024 * 512 / 4032 = 384 exactly
    ((1000, 700, 512), (512, 384)),    # 700 * 0.512 = 358.4 -> 6 * 64 = 384; f = 384/700; 1000 f = 548.6 -> 512
    ((6000, 4000, 512), (576, 384)),   # 4000 * 512/6000 = 341.3 -> 384; f = 0.096; 6000 f = 576 (long side grows)
    ((96, 80, 512), (512, 448)),       # 80 * 512/96 = 426.7 -> 448; f = 5.6; 96 f = 537.6 -> 512
    ((80, 96, 128), (128, 128)),       # 80 * 128/96 = 106.7 -> 128; f = 1.6; 96 f = 153.6 -> 128
    ((300, 200, 256), (256, 192)),     # 200 * 256/300 = 170.7 -> 192; f = 0.96; 300 f = 288 -> 256
    ((2000, 100, 512), (1280, 64)),    # 100 * 0.256 = 25.6 -> 64; f = 0.64; 2000 f = 1280
    ((100, 100, 64), (64, 64)),        # 100 * 0.64 = 64
    ((49, 49, 128), (128, 128)),       # 49 * 128/49 = 128 (the float version gave 64)
    ((47, 47, 768), (768, 768)),       # 47 * 768/47 = 768 (the float version gave 704)
    ((1, 1, 512), (512, 512)),         # a single pixel
    ((10, 1, 512), (640, 64)),         # 1 * 51.2 -> 64; f = 64; 10 f = 640
]


@pytest.mark.parametrize("args,expected", EDIT_SIZES)
def test_edit_size_table(args, expected):
    assert edit_size(*args) == expected


def test_edit_size_rejects_empty_images():
    with pytest.raises(Ip2pError):
        edit_size(0, 10, 512)


@pytest.mark.parametrize("size,resolution", [((96, 80), 512), ((333, 517), 256), ((64, 64), 64), ((700, 90), 128)])
def test_resize_for_editing_gives_multiples_of_64(size, resolution):
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    out = resize_for_editing(img, resolution)
    assert out.size == edit_size(*size, resolution)
    assert out.width % 64 == 0 and out.height % 64 == 0
    assert out.mode == "RGB"


def test_resize_for_editing_keeps_an_already_fitting_image():
    img = Image.fromarray(np.random.default_rng(2).integers(0, 256, (128, 192, 3), dtype=np.uint8))
    assert np.array_equal(np.asarray(resize_for_editing(img, 192)), np.asarray(img))


# --- to_rgb for every mode: the expected pixels are worked out by hand ---

def pixels(img: Image.Image) -> list[tuple[int, int, int]]:
    assert img.mode == "RGB"
    return [img.getpixel((x, 0)) for x in range(img.width)]


def test_to_rgb_rgb_unchanged():
    img = Image.new("RGB", (2, 1))
    img.putdata([(1, 2, 3), (250, 128, 0)])
    assert pixels(to_rgb(img)) == [(1, 2, 3), (250, 128, 0)]


def test_to_rgb_rgba_transparent_becomes_white():
    img = Image.new("RGBA", (3, 1))
    img.putdata([(10, 20, 30, 0), (10, 20, 30, 255), (0, 0, 0, 51)])
    # alpha 51/255 = 0.2 of black over white: 255 * 0.8 = 204
    assert pixels(to_rgb(img)) == [(255, 255, 255), (10, 20, 30), (204, 204, 204)]


def test_to_rgb_la():
    img = Image.new("LA", (2, 1))
    img.putdata([(40, 0), (40, 255)])
    assert pixels(to_rgb(img)) == [(255, 255, 255), (40, 40, 40)]


def test_to_rgb_palette():
    img = Image.new("P", (2, 1))
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * (3 * 254))
    img.putdata([0, 1])
    assert pixels(to_rgb(img)) == [(255, 0, 0), (0, 0, 255)]


def test_to_rgb_palette_with_transparency(tmp_path):
    img = Image.new("P", (2, 1))
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * (3 * 254))
    img.putdata([0, 1])
    path = tmp_path / "t.png"
    img.save(path, transparency=1)  # palette entry 1 (blue) is transparent
    with Image.open(path) as reread:
        assert reread.mode == "P" and "transparency" in reread.info
        assert pixels(to_rgb(reread)) == [(255, 0, 0), (255, 255, 255)]


def test_to_rgb_cmyk():
    img = Image.new("CMYK", (3, 1))
    img.putdata([(0, 0, 0, 0), (255, 0, 0, 0), (0, 0, 0, 255)])
    assert pixels(to_rgb(img)) == [(255, 255, 255), (0, 255, 255), (0, 0, 0)]


def test_to_rgb_l_and_1():
    grey = Image.new("L", (2, 1))
    grey.putdata([0, 77])
    assert pixels(to_rgb(grey)) == [(0, 0, 0), (77, 77, 77)]
    bilevel = Image.new("1", (2, 1))
    bilevel.putdata([0, 1])
    assert pixels(to_rgb(bilevel)) == [(0, 0, 0), (255, 255, 255)]


def test_to_rgb_16_bit():
    img = Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.uint16))
    assert img.mode == "I;16"
    # 32768 / 65535 * 255 = 127.50 -> 128
    assert pixels(to_rgb(img)) == [(0, 0, 0), (128, 128, 128), (255, 255, 255)]


def test_to_rgb_32_bit_integer():
    img = Image.fromarray(np.array([[0, 100, 60000]], dtype=np.int32))
    assert img.mode == "I"
    # values up to 65535 are 16-bit data: 100 / 65535 * 255 = 0.39 -> 0; 60000 -> 233.46 -> 233
    assert pixels(to_rgb(img)) == [(0, 0, 0), (0, 0, 0), (233, 233, 233)]
    dark = Image.fromarray(np.array([[0, 100]], dtype=np.int32))
    # 8-bit range data is not stretched to its maximum
    assert pixels(to_rgb(dark)) == [(0, 0, 0), (100, 100, 100)]


def test_to_rgb_float():
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert unit.mode == "F"
    # [0, 1] data: 0.5 * 255 = 127.5 -> 128 (round half to even)
    assert pixels(to_rgb(unit)) == [(0, 0, 0), (128, 128, 128), (255, 255, 255)]
    bytes_range = Image.fromarray(np.array([[0.0, 20.0, 255.0]], dtype=np.float32))
    assert pixels(to_rgb(bytes_range)) == [(0, 0, 0), (20, 20, 20), (255, 255, 255)]


# --- load_image ---

def test_load_image_applies_exif_orientation(tmp_path):
    # A 40x20 image, left half red, right half blue. Orientation 6 means "rotate 90 degrees clockwise
    # to display": the displayed image is 20x40 with red on top.
    arr = np.zeros((20, 40, 3), dtype=np.uint8)
    arr[:, :20] = (255, 0, 0)
    arr[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    Image.fromarray(arr).save(path, exif=exif, quality=95)
    img = load_image(path, max_pixels=10_000)
    assert img.mode == "RGB" and img.size == (20, 40)
    top, bottom = np.asarray(img)[5, 10], np.asarray(img)[35, 10]
    assert top[0] > 200 and top[2] < 60
    assert bottom[2] > 200 and bottom[0] < 60


def test_load_image_converts_to_rgb(tmp_path):
    path = tmp_path / "grey.png"
    Image.new("LA", (8, 4), (30, 255)).save(path)
    img = load_image(path, max_pixels=1000)
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (30, 30, 30)


def assert_one_line_naming(err: pytest.ExceptionInfo, path) -> None:
    message = str(err.value)
    assert str(path) in message
    assert "\n" not in message


def test_load_image_missing_file(tmp_path):
    path = tmp_path / "nope.png"
    with pytest.raises(Ip2pError) as err:
        load_image(path, max_pixels=1000)
    assert_one_line_naming(err, path)


def test_load_image_not_an_image(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is not a picture\n")
    with pytest.raises(Ip2pError) as err:
        load_image(path, max_pixels=1000)
    assert_one_line_naming(err, path)


@pytest.mark.parametrize("suffix,fmt", [(".png", "PNG"), (".jpg", "JPEG")])
def test_load_image_corrupt_file(tmp_path, suffix, fmt):
    full = tmp_path / f"full{suffix}"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(full, format=fmt)
    data = full.read_bytes()
    path = tmp_path / f"cut{suffix}"
    path.write_bytes(data[: len(data) // 2])  # header intact, pixel data cut off
    with pytest.raises(Ip2pError) as err:
        load_image(path, max_pixels=100_000)
    assert_one_line_naming(err, path)


def test_load_image_oversized(tmp_path):
    path = tmp_path / "big.png"
    Image.new("RGB", (30, 20)).save(path)
    with pytest.raises(Ip2pError) as err:
        load_image(path, max_pixels=599)
    assert_one_line_naming(err, path)
    assert "600" in str(err.value)
    assert load_image(path, max_pixels=600).size == (30, 20)


# --- tensors and saving ---

def test_tensor_round_trip_is_exact_for_8_bit_images():
    arr = np.random.default_rng(3).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    t = pil_to_tensor([Image.fromarray(arr)])
    assert t.shape == (1, 3, 16, 24)
    assert float(t.min()) >= -1.0 and float(t.max()) <= 1.0
    assert np.array_equal(np.asarray(tensor_to_pil(t)[0]), arr)


@pytest.mark.parametrize("name", ["out.png", "out.jpg", "out.webp"])
def test_save_image_atomic_leaves_no_temp_files(tmp_path, name):
    img = Image.fromarray(np.random.default_rng(4).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    folder = tmp_path / "sub"
    path = save_image_atomic(img, folder / name)
    assert os.listdir(folder) == [name]
    with Image.open(path) as reread:
        assert reread.size == (16, 16)
    save_image_atomic(img, path)  # overwriting works and still leaves one file
    assert os.listdir(folder) == [name]


def test_save_image_atomic_png_is_lossless(tmp_path):
    arr = np.random.default_rng(5).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    path = save_image_atomic(Image.fromarray(arr), tmp_path / "x.png")
    assert np.array_equal(np.asarray(Image.open(path)), arr)


def test_save_image_atomic_unknown_extension(tmp_path):
    with pytest.raises(Ip2pError):
        save_image_atomic(Image.new("RGB", (4, 4)), tmp_path / "x.unknownext")
    assert list(tmp_path.iterdir()) == []


def test_save_image_atomic_unwritable_target_is_one_line_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    target = blocker / "out.png"  # parent is a file: cannot be created
    with pytest.raises(Ip2pError) as err:
        save_image_atomic(Image.new("RGB", (4, 4)), target)
    assert_one_line_naming(err, target)


def test_uint8_batches_round_trip_through_vae_tensors():
    from ip2p.io.images import to_tensor, to_uint8

    images = np.random.default_rng(0).integers(0, 256, (3, 5, 7, 3), dtype=np.uint8)
    x = to_tensor(images)
    assert x.shape == (3, 3, 5, 7) and x.dtype == torch.float32
    assert np.allclose(x.permute(0, 2, 3, 1).numpy(), images / 127.5 - 1.0, atol=1e-6)   # the hand formula
    assert (to_uint8(x) == images).all()
    assert (to_uint8(torch.full((1, 3, 1, 1), 4.0)) == 255).all() and (to_uint8(-x.abs() - 2) == 0).all()


@pytest.mark.parametrize("args,expected", EDIT_SIZES)
def test_the_edit_area_bound_keeps_every_size_of_the_table(args, expected):
    # edit.max_edit_area=2 refuses only elongated inputs; every size above edits as before
    assert check_edit_area(*args, max_area=2) == expected


def test_the_edit_area_bound_refuses_an_elongated_strip():
    with pytest.raises(Ip2pError, match=r"a 2000x8 image would be edited at 16000x64 px, more than 2 x 256x256 "
                                        r"\(edit.max_edit_area\)"):
        check_edit_area(2000, 8, 256, 2, "edit.max_edit_area")
    assert check_edit_area(2000, 8, 8192, 2) == (16000, 64)  # 1.5% of the pixels asked for at 8192: allowed
