"""Reading image files into RGB uint8 tensors through Pillow.

Every image fpndet reads goes through :func:`load_image`, so all datasets agree on orientation
(EXIF applied) and colour (3-channel RGB) whatever the file holds: grayscale (``1``, ``L``,
``I;16``, ``I``, ``F``), palette (``P``, with or without transparency), CMYK, or images with an
alpha channel.
"""

from __future__ import annotations

import os
import struct

import numpy as np
import torch
from PIL import Image, ImageOps, TiffImagePlugin, UnidentifiedImageError

from fpndet.errors import InputError

__all__ = ["load_image", "image_size"]

_EXIF_ORIENTATION_TAG = 0x0112
_TIFF_IMAGE_WIDTH_TAG = 256
_TIFF_IMAGE_LENGTH_TAG = 257
_ORIENTATIONS_SWAPPING_AXES = {5, 6, 7, 8}
_ALPHA_BACKGROUND = (255, 255, 255)
# What Pillow raises on missing, corrupt or truncated files (decoders are not consistent).
_READ_ERRORS = (
    OSError,
    EOFError,
    ValueError,
    SyntaxError,
    IndexError,
    struct.error,
    UnidentifiedImageError,
    Image.DecompressionBombError,
)


def load_image(path: str | os.PathLike) -> torch.Tensor:
    """Decode an image file into an RGB tensor, EXIF orientation applied (exactly once).

    The whole file is decoded (``Image.load()``), so a truncated file fails here rather than
    later. Colour handling:

    - grayscale ``1``/``L`` is replicated to three channels; 16- and 32-bit integer grayscale
      (``I;16*``, ``I``) is scaled by 1/257 (65535 -> 255) and clipped; float ``F`` is clipped
      to [0, 255];
    - palette ``P`` is expanded through its palette; pixels made transparent by a ``tRNS``
      entry, like any pixel of an image with alpha (``RGBA``, ``LA``, ``PA``), are composited
      over white;
    - CMYK, YCbCr and other modes go through Pillow's ``convert("RGB")``.

    Args:
        path: image file.

    Returns:
        uint8 tensor ``[3, H, W]``, RGB, H and W in pixels after EXIF rotation.

    Raises:
        InputError(path, "cannot read image: ..."): missing, corrupt, truncated or non-image file,
            or a colour mode that cannot be converted to RGB.
    """
    try:
        with Image.open(path) as opened:
            opened.load()
            rgb = _to_rgb(_upright(opened))
            pixels = np.array(rgb, dtype=np.uint8)
    except _READ_ERRORS as error:
        raise InputError(path, f"cannot read image: {_describe(error)}") from error
    # NumPy transposes single-threaded; torch's multi-threaded copy is slower for one image.
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """Height and width of an image from its header, without decoding the pixels.

    EXIF orientations 5-8 (the ones that rotate by 90 degrees) swap the two, so the result
    matches the shape :func:`load_image` returns. The swap is applied to the size as *stored*
    in the file, never blindly to ``Image.size``: for TIFF, Pillow >= 11.0
    (python-pillow/Pillow#8390, ``TiffImageFile._setup``) already reports the rotated size,
    while older Pillow reports the stored one until the pixels are loaded. So for TIFF the
    stored size is read from the ``ImageWidth``/``ImageLength`` tags (256/257) of the first
    frame, which neither behaviour alters; JPEG, PNG, WebP and other formats use
    ``Image.size``, which Pillow reports un-rotated. Only the header is parsed in every case.

    Args:
        path: image file.

    Returns:
        ``(H, W)`` in pixels, after EXIF rotation.

    Raises:
        InputError(path, "cannot read image: ..."): missing file or unreadable header.
    """
    try:
        with Image.open(path) as opened:
            width, height = _stored_size(opened)
            orientation = opened.getexif().get(_EXIF_ORIENTATION_TAG)
    except _READ_ERRORS as error:
        raise InputError(path, f"cannot read image: {_describe(error)}") from error
    if orientation in _ORIENTATIONS_SWAPPING_AXES:
        return width, height
    return height, width


def _stored_size(opened: Image.Image) -> tuple[int, int]:
    """``(W, H)`` of the pixels as stored in the file, before any EXIF orientation is applied.

    Pillow's TIFF plugin may already have swapped ``Image.size`` for orientations 5-8 (it does
    so from 11.0 on, so that ``load()``, which transposes in place, does not change ``size``);
    the raw ``ImageWidth``/``ImageLength`` tags are what the file stores whatever the version.
    Other formats: ``Image.size``, which no Pillow version rotates before decoding.
    """
    if isinstance(opened, TiffImagePlugin.TiffImageFile):
        tags = opened.tag_v2
        width = tags.get(_TIFF_IMAGE_WIDTH_TAG)
        height = tags.get(_TIFF_IMAGE_LENGTH_TAG)
        if isinstance(width, int) and isinstance(height, int):
            return width, height
    return opened.size


def _upright(loaded: Image.Image) -> Image.Image:
    """A loaded image with its EXIF orientation applied exactly once.

    Pillow's TIFF plugin applies the orientation tag itself when the pixels are loaded (every
    Pillow the project supports, >= 9.0; python-pillow/Pillow#4063). Pillow >= 10.1 also drops
    the tag then (#7383), so a second ``exif_transpose`` is a no-op, but older versions keep it
    and ``exif_transpose`` would rotate or flip the pixels a second time. Other formats are
    never transposed on load, so they go through ``ImageOps.exif_transpose``.
    """
    if isinstance(loaded, TiffImagePlugin.TiffImageFile):
        return loaded
    return ImageOps.exif_transpose(loaded)


def _to_rgb(image: Image.Image) -> Image.Image:
    """Pillow image of any mode -> mode ``RGB`` (see :func:`load_image` for the rules)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P":
        has_alpha = "transparency" in image.info or image.palette.mode == "RGBA"
        return _over_white(image.convert("RGBA")) if has_alpha else image.convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return _over_white(image.convert("RGBA"))
    if mode.startswith("I") or mode == "F":
        return Image.fromarray(_high_depth_to_uint8(image)).convert("RGB")
    if mode == "L" and "transparency" in image.info:
        return _over_white(image.convert("RGBA"))
    return image.convert("RGB")


def _over_white(rgba: Image.Image) -> Image.Image:
    """Alpha-composite an RGBA image over an opaque white background."""
    background = Image.new("RGBA", rgba.size, _ALPHA_BACKGROUND + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _high_depth_to_uint8(image: Image.Image) -> np.ndarray:
    """``I;16*``/``I`` (16-bit range, scaled by 1/257) or ``F`` (clipped) -> uint8 ``[H, W]``."""
    values = np.asarray(image, dtype=np.float64)
    if image.mode != "F":
        values = values / 257.0
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _describe(error: BaseException) -> str:
    if isinstance(error, FileNotFoundError):
        return "no such file"
    text = str(error).strip()
    return text or type(error).__name__
