"""load_image: every conversion rule of serving.images on small generated files."""

import numpy as np
import pytest
from PIL import Image

from serving.errors import ImageError
from serving.images import ALPHA_BACKGROUND, load_image

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def solid(color, size=(32, 32), mode="RGB"):
    return Image.new(mode, size, color)


def composite(color, alpha):
    """The documented blend onto ALPHA_BACKGROUND for one RGBA pixel."""
    return [(c * alpha + b * (255 - alpha) + 127) // 255 for c, b in zip(color, ALPHA_BACKGROUND)]


def test_rgb_png_32_is_returned_unchanged(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    result = load_image(tmp_path / "a.png")
    assert result.dtype == np.uint8
    assert result.shape == (32, 32, 3)
    np.testing.assert_array_equal(result, pixels)


def test_jpeg_32_equals_plain_decode(tmp_path):
    pixels = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.jpg", quality=90)
    with Image.open(tmp_path / "a.jpg") as image:
        expected = np.asarray(image.convert("RGB"))
    np.testing.assert_array_equal(load_image(str(tmp_path / "a.jpg")), expected)


def test_grayscale_is_replicated(tmp_path):
    gray = np.arange(32 * 32, dtype=np.uint32).reshape(32, 32) % 256
    Image.fromarray(gray.astype(np.uint8)).save(tmp_path / "gray.png")
    result = load_image(tmp_path / "gray.png")
    for channel in range(3):
        np.testing.assert_array_equal(result[:, :, channel], gray)


def test_one_bit_image_becomes_black_and_white(tmp_path):
    image = solid(0, mode="1")
    image.putpixel((5, 7), 1)
    image.save(tmp_path / "bits.png")
    result = load_image(tmp_path / "bits.png")
    assert result[7, 5].tolist() == [255, 255, 255]
    assert result[0, 0].tolist() == [0, 0, 0]


def test_16_bit_grayscale_png_is_scaled_by_257(tmp_path):
    values = np.zeros((32, 32), dtype=np.uint16)
    values[0, :4] = [65535, 257 * 100, 128, 129]
    Image.fromarray(values).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as image:
        assert image.mode == "I;16"
    result = load_image(tmp_path / "deep.png")
    assert result[0, :4, 0].tolist() == [255, 100, 0, 1]
    np.testing.assert_array_equal(result[:, :, 0], result[:, :, 2])


def test_32_bit_integer_image_is_stretched_not_clipped(tmp_path):
    values = np.full((32, 32), 1000, dtype=np.int32)
    values[0, 0] = -5000
    values[0, 1] = 100000
    Image.fromarray(values).save(tmp_path / "wide.tif")
    result = load_image(tmp_path / "wide.tif")
    assert result[0, 0].tolist() == [0, 0, 0]
    assert result[0, 1].tolist() == [255, 255, 255]
    assert result[5, 5, 0] == round((1000 + 5000) * 255 / 105000)


def test_float_image_is_stretched(tmp_path):
    values = np.full((32, 32), 0.5, dtype=np.float32)
    values[0, 0] = 0.0
    values[0, 1] = 2.0
    Image.fromarray(values).save(tmp_path / "float.tif")
    result = load_image(tmp_path / "float.tif")
    assert result[0, 0, 0] == 0
    assert result[0, 1, 0] == 255
    assert result[9, 9, 1] == round(0.5 * 255 / 2.0)


def test_constant_float_image_becomes_black(tmp_path):
    Image.fromarray(np.full((32, 32), 7.0, dtype=np.float32)).save(tmp_path / "flat.tif")
    assert load_image(tmp_path / "flat.tif").max() == 0


def test_rgba_png_is_composited_on_background(tmp_path):
    image = solid((0, 0, 0, 0), mode="RGBA")
    image.putpixel((1, 0), (255, 0, 0, 128))
    image.putpixel((2, 0), (10, 20, 30, 255))
    image.save(tmp_path / "alpha.png")
    result = load_image(tmp_path / "alpha.png")
    assert result[0, 0].tolist() == list(ALPHA_BACKGROUND)
    assert result[0, 1].tolist() == composite((255, 0, 0), 128)
    assert result[0, 2].tolist() == [10, 20, 30]


def test_gray_alpha_is_composited(tmp_path):
    image = solid((100, 0), mode="LA")
    image.putpixel((3, 3), (100, 255))
    image.save(tmp_path / "la.png")
    result = load_image(tmp_path / "la.png")
    assert result[0, 0].tolist() == list(ALPHA_BACKGROUND)
    assert result[3, 3].tolist() == [100, 100, 100]


def test_palette_gif_with_transparency(tmp_path):
    image = Image.new("P", (32, 32), 0)
    image.putpalette([0, 0, 0, *RED, *BLUE] + [0] * (256 * 3 - 9))
    image.paste(1, (0, 0, 16, 32))
    image.paste(2, (16, 0, 24, 32))
    image.save(tmp_path / "palette.gif", transparency=0)
    result = load_image(tmp_path / "palette.gif")
    assert result[0, 0].tolist() == list(RED)
    assert result[0, 20].tolist() == list(BLUE)
    assert result[0, 30].tolist() == list(ALPHA_BACKGROUND)


def test_palette_png_without_transparency_is_expanded(tmp_path):
    image = Image.new("P", (32, 32), 1)
    image.putpalette([0, 0, 0, 12, 34, 56] + [0] * (256 * 3 - 6))
    image.save(tmp_path / "palette.png")
    assert load_image(tmp_path / "palette.png")[4, 4].tolist() == [12, 34, 56]


def test_cmyk_jpeg_uses_pillow_conversion(tmp_path):
    solid((0, 255, 255, 0), mode="CMYK").save(tmp_path / "cmyk.jpg", quality=100)
    with Image.open(tmp_path / "cmyk.jpg") as image:
        assert image.mode == "CMYK"
        expected = np.asarray(image.convert("RGB"))
    result = load_image(tmp_path / "cmyk.jpg")
    np.testing.assert_array_equal(result, expected)
    assert np.abs(result.astype(int) - RED).max() <= 3


def test_exif_orientation_is_applied(tmp_path):
    # Stored: red top half, blue bottom half. Orientation 6 means "rotate 90 degrees
    # clockwise to display", so the viewer sees blue on the left and red on the right.
    image = solid(RED)
    image.paste(BLUE, (0, 16, 32, 32))
    exif = Image.Exif()
    exif[0x0112] = 6
    image.save(tmp_path / "rotated.jpg", quality=100, exif=exif)
    result = load_image(tmp_path / "rotated.jpg").astype(int)
    assert np.abs(result[16, 4] - BLUE).max() <= 8
    assert np.abs(result[16, 27] - RED).max() <= 8


def test_animated_gif_uses_first_frame(tmp_path):
    frames = [solid(RED).convert("P"), solid(BLUE).convert("P")]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=100)
    with Image.open(tmp_path / "anim.gif") as image:
        assert image.n_frames == 2
    assert load_image(tmp_path / "anim.gif")[10, 10].tolist() == list(RED)


def test_wide_image_is_centre_cropped(tmp_path):
    # 64x48: the centred 48x48 square (x 8..55) is all green; the bands outside are not.
    image = solid(GREEN, size=(64, 48))
    image.paste(RED, (0, 0, 8, 48))
    image.paste(BLUE, (56, 0, 64, 48))
    image.save(tmp_path / "wide.png")
    result = load_image(tmp_path / "wide.png")
    assert result.shape == (32, 32, 3)
    assert (result == GREEN).all()


def test_tall_image_is_cropped_then_lanczos_resized(tmp_path):
    pixels = np.random.default_rng(2).integers(0, 256, (100, 60, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "tall.png")
    expected = Image.fromarray(pixels[20:80]).resize((32, 32), Image.Resampling.LANCZOS)
    np.testing.assert_array_equal(load_image(tmp_path / "tall.png"), np.asarray(expected))


def test_small_image_is_upscaled(tmp_path):
    solid(BLUE, size=(8, 8)).save(tmp_path / "small.png")
    result = load_image(tmp_path / "small.png")
    assert result.shape == (32, 32, 3)
    assert (result == BLUE).all()


def test_large_jpeg_decoded_at_reduced_size(tmp_path):
    rng = np.random.default_rng(3)
    coarse = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    Image.fromarray(coarse).resize((1024, 768), Image.Resampling.BILINEAR).save(tmp_path / "big.jpg", quality=95)
    with Image.open(tmp_path / "big.jpg") as image:
        full = image.convert("RGB")
    reference = np.asarray(full.crop((128, 0, 896, 768)).resize((32, 32), Image.Resampling.LANCZOS)).astype(int)
    with Image.open(tmp_path / "big.jpg") as image:
        result = load_image(image)  # a caller's image is not drafted
    np.testing.assert_array_equal(result, reference)
    drafted = load_image(tmp_path / "big.jpg").astype(int)
    assert drafted.shape == (32, 32, 3)
    assert np.abs(drafted - reference).mean() < 3


def test_pillow_image_is_not_closed(tmp_path):
    image = solid(GREEN)
    assert (load_image(image) == GREEN).all()
    assert image.getpixel((0, 0)) == GREEN


def test_truncated_jpeg_raises_image_error(tmp_path):
    pixels = np.random.default_rng(4).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "whole.jpg")
    data = (tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError) as caught:
        load_image(tmp_path / "cut.jpg")
    assert str(caught.value).startswith(f"cannot read image {tmp_path / 'cut.jpg'}: ")
    assert "truncated" in caught.value.reason


def test_zero_byte_file_raises_image_error(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ImageError) as caught:
        load_image(tmp_path / "empty.jpg")
    assert str(caught.value) == f"cannot read image {tmp_path / 'empty.jpg'}: empty file (0 bytes)"


def test_text_file_named_jpg_raises_image_error(tmp_path):
    (tmp_path / "notes.jpg").write_text("not a picture\n")
    with pytest.raises(ImageError) as caught:
        load_image(tmp_path / "notes.jpg")
    assert caught.value.reason == "not an image format that Pillow can decode"
    assert caught.value.path == str(tmp_path / "notes.jpg")


def test_missing_file_and_folder_raise_image_error(tmp_path):
    with pytest.raises(ImageError, match="file not found"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="is a directory"):
        load_image(tmp_path)


def test_decompression_bomb_guard_is_kept(tmp_path, monkeypatch):
    # A lowered limit replaces a huge image, because 32x32 is more than twice 100 pixels.
    solid(RED).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ImageError) as caught:
        load_image(tmp_path / "bomb.png")
    assert "decompression-bomb guard" in caught.value.reason
    assert "1024 pixels" in caught.value.reason


def test_cut_header_is_reported_as_truncated(tmp_path):
    pixels = np.random.default_rng(5).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "whole.jpg")
    (tmp_path / "head.jpg").write_bytes((tmp_path / "whole.jpg").read_bytes()[:300])
    with pytest.raises(ImageError) as caught:
        load_image(tmp_path / "head.jpg")
    assert caught.value.reason == "image file is truncated (Truncated File Read)"
