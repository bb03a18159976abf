"""Turn any image into the 32x32 RGB uint8 array of the ONNX contract.

This is the one decoding function: the data stage builds the dataset with it and the
predictor feeds the network with it, so training and serving see identical pixels.
"""

import os

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from serving.contract import IMAGE_SIZE
from serving.errors import ImageError


def load_image(source):
    """Decode `source` (a path or a Pillow image) to uint8 [32, 32, 3] RGB.

    Raises ImageError naming the file and the reason when it cannot be decoded.
    """
    # TODO: minimal first version (EXIF, RGB, centre crop, resize); the full mode
    # policy (16-bit, alpha, CMYK, animation, draft decoding) is still to come.
    if isinstance(source, Image.Image):
        return _to_array(source)
    path = os.fspath(source)
    try:
        with Image.open(path) as image:
            image.load()
            return _to_array(image)
    except (OSError, UnidentifiedImageError, ValueError) as error:
        raise ImageError(f"cannot read image {path}: {error}") from error


def _to_array(image):
    image = ImageOps.exif_transpose(image).convert("RGB")
    side = min(image.size)
    left = (image.width - side) // 2
    top = (image.height - side) // 2
    image = image.crop((left, top, left + side, top + side))
    if image.size != (IMAGE_SIZE, IMAGE_SIZE):
        image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)
    return np.asarray(image, dtype=np.uint8)
