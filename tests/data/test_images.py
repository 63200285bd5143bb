from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, TiffImagePlugin, features

from fpndet.data.images import image_size, load_image
from fpndet.errors import InputError


def _two_halves(width: int = 40, height: int = 20) -> Image.Image:
    """Left half red, right half blue."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, : width // 2] = (255, 0, 0)
    pixels[:, width // 2 :] = (0, 0, 255)
    return Image.fromarray(pixels)


def test_rgb_png_round_trips_exactly(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, size=(7, 11, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    image = load_image(tmp_path / "a.png")
    assert image.dtype == torch.uint8 and image.shape == (3, 7, 11)
    assert torch.equal(image, torch.from_numpy(pixels).permute(2, 0, 1))
    assert image_size(tmp_path / "a.png") == (7, 11)


def test_exif_orientation_6_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored image must be rotated 90 degrees clockwise for display
    _two_halves().save(tmp_path / "rotated.jpg", exif=exif.tobytes(), quality=95)
    image = load_image(tmp_path / "rotated.jpg")
    assert image.shape == (3, 40, 20)
    assert image_size(tmp_path / "rotated.jpg") == (40, 20)
    # Rotating clockwise brings the left (red) half to the top.
    top, bottom = image[:, 5, 10].tolist(), image[:, 35, 10].tolist()
    assert top[0] > 200 and top[2] < 60
    assert bottom[2] > 200 and bottom[0] < 60


# EXIF orientation -> what a viewer shows, as a transform of the stored [H, W, C] pixels.
_DISPLAYED = {
    1: lambda stored: stored,
    6: lambda stored: np.rot90(stored, -1),  # rotate 90 degrees clockwise
    8: lambda stored: np.rot90(stored, 1),  # rotate 90 degrees counter-clockwise
}


def _save_oriented(stored: np.ndarray, path, orientation: int, **options) -> None:
    image = Image.fromarray(stored)
    if path.suffix == ".tif":
        image.save(path, tiffinfo={0x0112: orientation}, **options)
    else:
        exif = Image.Exif()
        exif[0x0112] = orientation
        image.save(path, exif=exif.tobytes(), **options)


@pytest.mark.parametrize("orientation", [1, 6, 8])
@pytest.mark.parametrize("name, options", [
    ("raw.tif", {}),
    ("lzw.tif", {"compression": "tiff_lzw"}),  # decoded through libtiff
    ("photo.jpg", {"quality": 95}),
])
def test_image_size_matches_load_image_for_every_orientation(tmp_path, orientation, name, options):
    if "compression" in options and not features.check("libtiff"):
        pytest.skip("Pillow built without libtiff")
    stored = np.random.default_rng(orientation).integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    path = tmp_path / name
    _save_oriented(stored, path, orientation, **options)
    expected = (30, 20) if orientation in (6, 8) else (20, 30)  # (H, W) as displayed

    image = load_image(path)
    assert tuple(image.shape) == (3, *expected)
    assert image_size(path) == expected
    if path.suffix == ".tif":  # lossless: the orientation is applied once, in the right sense
        displayed = _DISPLAYED[orientation](stored)
        assert torch.equal(image, torch.from_numpy(np.ascontiguousarray(displayed)).permute(2, 0, 1))


def test_image_size_of_tiff_does_not_depend_on_pillow_pre_rotating_the_size(tmp_path, monkeypatch):
    """Pillow >= 11 reports a rotated ``size`` for TIFF orientations 5-8, older Pillow the stored
    one; simulate the older behaviour on the installed Pillow and expect the same answer."""
    stored = np.zeros((20, 30, 3), np.uint8)
    for orientation in (6, 8):
        _save_oriented(stored, tmp_path / f"o{orientation}.tif", orientation)

    original_setup = TiffImagePlugin.TiffImageFile._setup

    def setup_reporting_stored_size(self):
        original_setup(self)
        self._size = (self.tag_v2[256], self.tag_v2[257])  # ImageWidth, ImageLength as stored

    monkeypatch.setattr(TiffImagePlugin.TiffImageFile, "_setup", setup_reporting_stored_size)
    with Image.open(tmp_path / "o6.tif") as opened:
        assert opened.size == (30, 20)  # the simulation is in effect: (W, H) un-rotated
    assert image_size(tmp_path / "o6.tif") == (30, 20)
    assert image_size(tmp_path / "o8.tif") == (30, 20)


def test_grayscale_modes_become_three_equal_channels(tmp_path):
    gray = np.array([[0, 100, 255]], np.uint8)
    Image.fromarray(gray).save(tmp_path / "l.png")
    image = load_image(tmp_path / "l.png")
    assert image.shape == (3, 1, 3)
    assert image[:, 0].tolist() == [[0, 100, 255]] * 3

    deep = np.array([[0, 257 * 100, 65535]], np.uint16)
    Image.fromarray(deep).save(tmp_path / "i16.png")
    assert Image.open(tmp_path / "i16.png").mode.startswith("I")
    assert load_image(tmp_path / "i16.png")[:, 0].tolist() == [[0, 100, 255]] * 3

    Image.fromarray(np.array([[True, False]])).convert("1").save(tmp_path / "bw.png")
    assert Image.open(tmp_path / "bw.png").mode == "1"
    assert load_image(tmp_path / "bw.png")[:, 0].tolist() == [[255, 0]] * 3


def test_palette_with_transparency_is_composited_over_white(tmp_path):
    palette_image = Image.new("P", (2, 1))
    palette_image.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))
    palette_image.putpixel((0, 0), 0)
    palette_image.putpixel((1, 0), 1)
    palette_image.save(tmp_path / "p.png", transparency=0)
    image = load_image(tmp_path / "p.png")
    assert image[:, 0, 0].tolist() == [255, 255, 255]  # transparent index -> white
    assert image[:, 0, 1].tolist() == [255, 0, 0]

    palette_image.save(tmp_path / "opaque.png")
    assert load_image(tmp_path / "opaque.png")[:, 0, 0].tolist() == [0, 0, 0]


def test_alpha_is_composited_over_white(tmp_path):
    rgba = np.array([[[0, 0, 255, 0], [0, 0, 255, 255], [0, 0, 0, 128]]], np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    image = load_image(tmp_path / "rgba.png")
    assert image[:, 0, 0].tolist() == [255, 255, 255]
    assert image[:, 0, 1].tolist() == [0, 0, 255]
    assert all(abs(v - 127) <= 1 for v in image[:, 0, 2].tolist())

    Image.fromarray(np.array([[[50, 0], [50, 255]]], np.uint8), "LA").save(tmp_path / "la.png")
    assert load_image(tmp_path / "la.png")[:, 0].T.tolist() == [[255, 255, 255], [50, 50, 50]]


def test_cmyk_becomes_rgb(tmp_path):
    Image.new("CMYK", (3, 2), (255, 0, 0, 0)).save(tmp_path / "cyan.tif")
    image = load_image(tmp_path / "cyan.tif")
    assert image.shape == (3, 2, 3)
    assert image[:, 1, 2].tolist() == [0, 255, 255]


def test_garbage_bytes_raise_input_error_naming_the_file(tmp_path):
    path = tmp_path / "garbage.jpg"
    path.write_bytes(b"this is not an image at all" * 10)
    with pytest.raises(InputError, match="garbage.jpg: cannot read image") as caught:
        load_image(path)
    assert caught.value.path == str(path)
    with pytest.raises(InputError, match="garbage.jpg"):
        image_size(path)


def test_truncated_jpeg_raises_input_error(tmp_path):
    noise = np.random.default_rng(1).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "full.jpg", quality=90)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    assert image_size(tmp_path / "cut.jpg") == (64, 64)  # header is intact
    with pytest.raises(InputError, match="cut.jpg: cannot read image"):
        load_image(tmp_path / "cut.jpg")


def test_missing_file_raises_input_error(tmp_path):
    with pytest.raises(InputError, match="nothing.png: cannot read image: no such file"):
        load_image(tmp_path / "nothing.png")
