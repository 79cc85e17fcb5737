"""Reading images from users: a path, a PIL image or a numpy array, in any mode, with clear errors.

Everything ends up as an 8-bit RGB PIL image. Files that are not images, truncated files and images
above a pixel limit (decompression bombs) are refused with the file named.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .paths import not_a_file

MAX_PIXELS = 64_000_000  # about 8000 x 8000; larger images are refused rather than decoded
# CLIP's transform resizes the short side to the tower's size: a 1 x 20,000 picture became 224 x 4,480,000 pixels
MAX_ASPECT = 32


def load_image(image: Any, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """An RGB PIL image from a path, a PIL image or an array ([H, W], [H, W, 3|4], uint8/uint16/float)."""
    if isinstance(image, (str, os.PathLike)):
        return _open(Path(image), max_pixels)
    if isinstance(image, np.ndarray):
        return to_rgb(_from_array(image), max_pixels, "image")
    if isinstance(image, Image.Image):
        return to_rgb(image, max_pixels, "image")
    raise ValueError(f"image: expected a path, a PIL image or a numpy array, got {type(image).__name__}")


def _open(path: Path, max_pixels: int) -> Image.Image:
    if not path.is_file():
        raise FileNotFoundError(f"image: {not_a_file(path)}")
    return decode_image(path, str(path), max_pixels)


def decode_image(source: Path | BinaryIO, name: str, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """An image file's (or file object's) picture as 8-bit RGB, upright as its EXIF orientation says (as viewers,
    gradio and OpenCV show a phone's photo); its size checked before it is decoded; ValueError naming `name`."""
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with Image.open(source) as opened:
            _check_size(opened, max_pixels, name)
            opened.load()
            return to_rgb(ImageOps.exif_transpose(opened), max_pixels, name)
    except UnidentifiedImageError as error:
        raise ValueError(f"image: {name} is not an image file") from error
    except Image.DecompressionBombError as error:
        raise ValueError(f"image: {name} has more pixels than the limit of {max_pixels:,} ({error})") from error
    except (OSError, SyntaxError) as error:
        raise ValueError(f"image: {name} could not be decoded ({error}); is it truncated?") from error


def image_file_problem(path: Path, max_pixels: int = MAX_PIXELS) -> str | None:
    """What makes an image file unreadable (a data file's up-front check: not an image, a file cut short or
    broken, too many pixels); None when it reads. A JPEG is decoded at an eighth of its size (all of its data read,
    under 1 ms for a 640x480 photo), other formats whole. Each file is read once while it is unchanged (LLaVA's
    records name the same pictures many times)."""
    stat = path.stat()
    return _file_problem(path, stat.st_size, stat.st_mtime_ns, max_pixels)


@lru_cache(maxsize=1 << 16)
def _file_problem(path: Path, size: int, mtime_ns: int, max_pixels: int) -> str | None:
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with Image.open(path) as opened:
            _check_size(opened, max_pixels, str(path))
            width, height = opened.size
            opened.draft(None, (width // 8, height // 8))  # JPEG alone decodes smaller; a format's verify() is not
            opened.load()                                   # enough (a cut JPEG, GIF, BMP or TIFF passes it)
    except UnidentifiedImageError:
        return f"{path} is not an image file"
    except ValueError as error:
        return str(error).removeprefix("image: ")
    except (OSError, SyntaxError, Image.DecompressionBombError) as error:
        return f"{path} could not be decoded ({error})"
    return None


def _check_size(image: Image.Image, max_pixels: int, name: str) -> None:
    width, height = image.size
    if width * height > max_pixels:
        raise ValueError(f"image: {name} has {width}x{height} pixels, more than the limit of {max_pixels:,}")
    if width == 0 or height == 0:
        raise ValueError(f"image: {name} is empty ({width}x{height})")
    if max(width, height) > MAX_ASPECT * min(width, height):
        raise ValueError(f"image: {name} is {width}x{height} pixels, more than {MAX_ASPECT} times as long as it is "
                         "wide; the tower would see a sliver of it (and resizing it would take gigabytes)")


def _from_array(array: np.ndarray) -> Image.Image:
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ValueError(f"image: array of shape {array.shape}; expected [H, W], [H, W, 3] or [H, W, 4]")
    if array.dtype == np.uint8:
        scaled = array
    elif array.dtype == np.uint16:
        scaled = (array >> 8).astype(np.uint8)
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ValueError("image: array has NaN or infinite values")
        low, high = float(array.min()), float(array.max())
        if low < 0 or high > 1:  # most often 0-255 values in floats, which clipping made a white picture
            raise ValueError(f"image: a float array's values must be in [0, 1], got {low:g} to {high:g}"
                             f"{'; divide it by 255' if high <= 255 and low >= 0 else ''}")
        scaled = (array * 255 + 0.5).astype(np.uint8)
    else:
        raise ValueError(f"image: array dtype {array.dtype}; expected uint8, uint16 or float in [0, 1]")
    return Image.fromarray(np.ascontiguousarray(scaled))


def to_rgb(image: Image.Image, max_pixels: int = MAX_PIXELS, name: str = "image") -> Image.Image:
    """Any PIL mode to 8-bit RGB; transparency is composited on white (as a viewer shows it)."""
    _check_size(image, max_pixels, name)
    if image.mode == "RGB":
        return image.copy()
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # PIL's "F" holds 0-255, as convert("F") writes it
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        return Image.fromarray((np.clip(array / peak, 0, 1) * 255 + 0.5).astype(np.uint8)).convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def gather_uploads(images: Sequence[str | os.PathLike], folder: Path) -> None:
    """Uploaded pictures side by side in `folder` under their own file names, so that records naming them find
    them; two of one name would be ambiguous and are refused. Links, not copies, where the system lets this user
    make them (Windows asks for a privilege or developer mode): copies elsewhere."""
    for image in images:
        source = Path(image)
        if not source.is_file():
            raise ValueError(f"images: {source.name} was not uploaded completely; upload it again")
        target = folder / source.name
        if target.exists():
            raise ValueError(f"images: two uploads are named {source.name}; rename one")
        try:
            target.symlink_to(source.resolve())
        except OSError:
            shutil.copyfile(source, target)
