"""Reading image files of any mode as 8-bit RGB, and checking that files decode."""

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from deltavision.errors import DataError

IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)
DECODE_ERRORS = (OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError)
HIGH_DEPTH_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N", "F"})


def is_image_file(path: Path) -> bool:
    """True for a visible file whose extension is a common image format."""
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


def _high_depth_to_grey(image: Image.Image) -> Image.Image:
    """Scale a 16/32-bit or float single-channel image to 8-bit grey instead of clipping it."""
    values = np.asarray(image, dtype=np.float64)
    peak = values.max(initial=0.0)
    if image.mode == "F" and peak <= 1.0:
        values = values * 255.0
    elif peak > 255.0:
        values = values / 257.0  # the 16-bit range 0..65535 onto 0..255
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert an image of any mode (L, LA, P, RGBA, CMYK, I;16, F, ...) to RGB.

    Grey images have their channel replicated three times; transparent pixels are composited
    onto white; high-bit-depth images are rescaled to 8 bits.
    """
    if image.mode in HIGH_DEPTH_MODES:
        image = _high_depth_to_grey(image)
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def load_rgb_image(path: Path) -> Image.Image:
    """Decode ``path`` fully as an upright RGB image, raising DataError if it cannot be read."""
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            image.load()
            return to_rgb(image)
    except DECODE_ERRORS as error:
        raise DataError(f"Cannot read image {path} ({error}); replace or delete the file.") from error


def check_image_file(path: Path) -> None:
    """Cheaply check that ``path`` looks like a valid image (header and structure), else DataError."""
    try:
        with Image.open(path) as image:
            image.verify()
    except DECODE_ERRORS as error:
        raise DataError(f"Corrupt or unreadable image {path} ({error}); replace or delete the file.") from error
