"""Turn any image into the 32x32 RGB uint8 array of the ONNX contract.

This is the one decoding function: the data stage builds the dataset with it and the
predictor feeds the network with it, so training and serving see identical pixels.

Conversion policy, applied in this order:
- Files: an animated file gives its first frame. A JPEG whose shorter side is at least
  4 * 32 pixels is decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling through
  `Image.draft`), choosing the smallest scale that keeps both sides at least 2 * 32.
  Pillow's decompression-bomb guard (`PIL.Image.MAX_IMAGE_PIXELS`) stays as Pillow sets it.
- EXIF orientation is applied, so the array is upright as a viewer shows it.
- Modes: RGB is kept. Grayscale ("L", "1") is replicated to three channels, and a
  palette ("P") is expanded. Alpha ("RGBA", "LA", "PA", or a transparency key on a
  "P", "L" or "RGB" image) is composited onto white. CMYK, YCbCr and other modes go
  through Pillow's convert("RGB").
- Bit depth: 16-bit integer modes ("I;16", "I;16B", ...) are scaled by 255/65535
  (value / 257, rounded). 32-bit integer ("I") and float ("F") images have no fixed
  range, so their own minimum and maximum are stretched to 0 and 255. A constant image
  becomes 0, and so does NaN. Nothing is clipped.
- Size: the largest centred square is cut out (rounding its offset down) and resized
  to 32x32 with Lanczos resampling (antialiased when shrinking). A 32x32 image is not
  resampled.
"""

import os
import struct
import zlib

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from serving.contract import IMAGE_SIZE
from serving.errors import ImageError

# Transparent pixels are composited onto white, because images with alpha are mostly
# web graphics and cut-outs meant for white pages. Dropping alpha instead would expose
# whatever colour the encoder left under transparent pixels.
ALPHA_BACKGROUND = (255, 255, 255)

# A JPEG is decoded at reduced scale only while both sides stay at least this long, so
# the final Lanczos resize still shrinks by 2x or more from real pixels.
DRAFT_MIN_SIDE = 2 * IMAGE_SIZE

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa")

# Errors that Pillow's decoders raise for damaged files, besides OSError; Pillow
# documents none of them as a complete list, so these are the ones seen in its plugins.
_DECODE_ERRORS = (
    OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error,
    Image.DecompressionBombError,
)


def load_image(source):
    """Decode `source` to uint8 [32, 32, 3] RGB following the module's conversion policy.

    `source` is a path (str or os.PathLike), a binary file object, or a Pillow image
    (not closed here). The returned array may be read-only.
    Raises ImageError naming the file and the reason when it cannot be decoded. The
    error's `path` and `reason` attributes contain the two parts of the message.
    """
    if isinstance(source, Image.Image):
        return _to_array(source)
    name = _describe_source(source)
    try:
        with Image.open(source) as image:
            _request_reduced_decoding(image)
            image.load()
            return _to_array(image)
    except UnidentifiedImageError as error:
        raise _image_error(name, _unidentified_reason(source)) from error
    except FileNotFoundError as error:
        raise _image_error(name, "file not found") from error
    except IsADirectoryError as error:
        raise _image_error(name, "is a directory") from error
    except PermissionError as error:
        raise _image_error(name, "permission denied") from error
    except ImageError as error:
        raise _image_error(name, str(error)) from error
    except Image.DecompressionBombError as error:
        reason = f"{error} (Pillow's decompression-bomb guard; raise PIL.Image.MAX_IMAGE_PIXELS only for a trusted file)"
        raise _image_error(name, reason) from error
    except _DECODE_ERRORS as error:
        raise _image_error(name, _decode_reason(error)) from error


def _image_error(name, reason):
    """Return an ImageError whose `path` and `reason` attributes contain the two parts of its message."""
    error = ImageError(f"cannot read image {name}: {reason}")
    error.path = name
    error.reason = reason
    return error


def _describe_source(source):
    if isinstance(source, (str, bytes, os.PathLike)):
        return os.fsdecode(source)
    return str(getattr(source, "name", "<file object>"))


def _unidentified_reason(source):
    try:
        if isinstance(source, (str, bytes, os.PathLike)) and os.path.getsize(source) == 0:
            return "empty file (0 bytes)"
    except OSError:
        pass
    return "not an image format that Pillow can decode"


def _decode_reason(error):
    reason = str(error) or type(error).__name__
    if isinstance(error, (EOFError, struct.error)):
        return f"truncated or damaged image data ({reason})"
    if "truncated" in reason.lower() and not reason.startswith("image file is truncated"):
        return f"image file is truncated ({reason})"  # Pillow raises "Truncated File Read" when the header is cut
    return reason


def _request_reduced_decoding(image):
    # Only JPEG implements draft() with a size; other formats ignore the request.
    if image.format == "JPEG" and min(image.size) >= 2 * DRAFT_MIN_SIDE:
        image.draft(image.mode, (DRAFT_MIN_SIDE, DRAFT_MIN_SIDE))


def _to_array(image):
    # Frame 0 is the current frame right after opening; a caller's Pillow image keeps
    # whatever frame it was seeked to.
    if image.getexif().get(ExifTags.Base.Orientation, 1) != 1:
        image = ImageOps.exif_transpose(image)
    image = _to_rgb(image)
    if image.size != (IMAGE_SIZE, IMAGE_SIZE):
        image = _crop_and_resize(image)
    return np.asarray(image)


def _to_rgb(image):
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _SIXTEEN_BIT_MODES:
        pixels = np.asarray(image).astype(np.uint32)
        return _gray_array_to_rgb(((pixels + 128) // 257).astype(np.uint8))
    if mode in ("I", "F"):
        return _gray_array_to_rgb(_stretch_to_bytes(np.asarray(image)))
    if mode in _ALPHA_MODES or (mode in ("P", "L", "RGB") and "transparency" in image.info):
        return _composite_on_background(image.convert("RGBA"))
    try:
        return image.convert("RGB")
    except ValueError as error:
        raise ImageError(f"unsupported image mode {mode}: {error}") from error


def _gray_array_to_rgb(gray):
    return Image.fromarray(np.repeat(gray[:, :, np.newaxis], 3, axis=2))


def _stretch_to_bytes(pixels):
    """Map the finite range of `pixels` linearly onto 0-255; constant images and NaN give 0."""
    values = pixels.astype(np.float64)
    finite = values[np.isfinite(values)]
    if finite.size == 0 or finite.max() == finite.min():
        return np.zeros(values.shape, dtype=np.uint8)
    low, high = finite.min(), finite.max()
    values = np.nan_to_num(values, nan=low, posinf=high, neginf=low)
    return np.rint((values - low) * (255.0 / (high - low))).astype(np.uint8)


def _composite_on_background(rgba_image):
    """Blend RGBA onto ALPHA_BACKGROUND: out = round((c * a + b * (255 - a)) / 255)."""
    rgba = np.asarray(rgba_image).astype(np.uint32)
    alpha = rgba[:, :, 3:4]
    background = np.array(ALPHA_BACKGROUND, dtype=np.uint32)
    blended = (rgba[:, :, :3] * alpha + background * (255 - alpha) + 127) // 255
    return Image.fromarray(blended.astype(np.uint8))


def _crop_and_resize(image):
    # crop() first: resize(box=...) would let the filter read pixels outside the square.
    side = min(image.size)
    left = (image.width - side) // 2
    top = (image.height - side) // 2
    square = image.crop((left, top, left + side, top + side))
    if side == IMAGE_SIZE:
        return square
    return square.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)
