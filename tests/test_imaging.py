"""Behaviour of engines.imaging: what clients can send, what the model sees, what comes back."""

import gc
import io
import struct
import sys
import time
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps
from scipy import ndimage

import engines.imaging as imaging
from engines.errors import (
    ImageTooLarge,
    InputError,
    InvalidImage,
    InvalidMask,
    MaskSizeMismatch,
    UnsupportedOutputFormat,
)
from engines.imaging import (
    MAX_BUCKET_DOWNSCALE,
    MEDIA_TYPES,
    OUTPUT_FORMATS,
    CropPlan,
    DecodedImage,
    DecodeLimits,
    crop_for_model,
    decode_image,
    decode_mask,
    dilate_mask,
    encode_image,
    mask_from_alpha,
    paste_back,
    plan_crop,
    seen_on_grid,
    whole_cells,
)
from tests.helpers import encoded, png_declaring_size

LIMITS = DecodeLimits()


def noise(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


# --- decode_image: modes ------------------------------------------------------------------------


def test_rgb_png_decodes_to_identical_pixels():
    pixels = noise(30, 40)
    decoded = decode_image(encoded(Image.fromarray(pixels)), LIMITS)
    assert decoded.format == "png"
    assert decoded.alpha is None
    assert decoded.rgb.dtype == np.uint8 and decoded.rgb.flags.c_contiguous
    np.testing.assert_array_equal(decoded.rgb, pixels)


def test_rgba_keeps_alpha_apart_from_rgb():
    rgba = np.dstack([noise(20, 25), np.tile(np.arange(25, dtype=np.uint8) * 10, (20, 1))])
    decoded = decode_image(encoded(Image.fromarray(rgba)), LIMITS)
    np.testing.assert_array_equal(decoded.rgb, rgba[..., :3])
    np.testing.assert_array_equal(decoded.alpha, rgba[..., 3])
    assert decoded.rgb.flags.c_contiguous


def test_fully_opaque_alpha_is_dropped():
    rgba = np.dstack([noise(10, 10), np.full((10, 10), 255, np.uint8)])
    assert decode_image(encoded(Image.fromarray(rgba)), LIMITS).alpha is None


def test_grayscale_becomes_three_equal_channels():
    gray = np.arange(256, dtype=np.uint8).reshape(16, 16)
    decoded = decode_image(encoded(Image.fromarray(gray)), LIMITS)
    assert decoded.rgb.shape == (16, 16, 3)
    for channel in range(3):
        np.testing.assert_array_equal(decoded.rgb[..., channel], gray)


def test_gray_with_alpha_keeps_alpha():
    image = Image.merge("LA", [Image.new("L", (8, 6), 200), Image.new("L", (8, 6), 7)])
    decoded = decode_image(encoded(image), LIMITS)
    assert (decoded.rgb == 200).all()
    assert (decoded.alpha == 7).all()


def test_palette_transparency_becomes_alpha():
    indices = np.zeros((6, 8), np.uint8)
    indices[:, 4:] = 1
    image = Image.fromarray(indices, mode="P")
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    decoded = decode_image(encoded(image, transparency=1), LIMITS)
    assert (decoded.alpha[:, :4] == 255).all() and (decoded.alpha[:, 4:] == 0).all()
    assert (decoded.rgb[:, :4] == [255, 0, 0]).all()


@pytest.mark.parametrize(
    ("mode", "colour", "expected_rgb"),
    [("RGBA", (50, 25, 10, 128), (99, 49, 19)), ("LA", (50, 128), (99, 99, 99))],
)
def test_premultiplied_alpha_tiff_is_unpremultiplied(mode, colour, expected_rgb):
    data = encoded(Image.new(mode, (4, 4), colour), "TIFF")
    unassociated = b"\x52\x01\x03\x00\x01\x00\x00\x00\x02\x00"  # ExtraSamples = 2 (straight alpha)
    assert data.count(unassociated) == 1
    data = data.replace(unassociated, unassociated[:-2] + b"\x01\x00")  # = 1: premultiplied
    decoded = decode_image(data, LIMITS)
    np.testing.assert_allclose(decoded.rgb[0, 0], expected_rgb, atol=1)
    assert (decoded.alpha == 128).all()


def test_cmyk_jpeg_becomes_rgb():
    cyan = Image.new("CMYK", (16, 16), (255, 0, 0, 0))
    decoded = decode_image(encoded(cyan, "JPEG", quality=95), LIMITS)
    assert decoded.format == "jpeg"
    assert decoded.rgb.shape == (16, 16, 3)
    np.testing.assert_allclose(decoded.rgb.reshape(-1, 3).mean(axis=0), [0, 255, 255], atol=4)


def test_16bit_grayscale_is_scaled_with_rounding():
    values = np.array([[0, 65535, 32896, 257, 32639, 129]], dtype=np.uint16)
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    decoded = decode_image(encoded(image), LIMITS)
    np.testing.assert_array_equal(decoded.rgb[0, :, 0], [0, 255, 128, 1, 127, 1])


def test_a_16bit_gray_pngs_transparent_key_gives_alpha_as_at_8_bits():
    # Pillow keeps a 16-bit gray tRNS key but gives no alpha for I;16: the transparency was dropped
    samples = np.array([[0, 0, 200, 200], [51400, 51401, 65535, 1]], np.uint16)
    for key, transparent in ((0, samples == 0), (51400, samples == 51400)):
        decoded = decode_image(encoded(Image.fromarray(samples), transparency=key), LIMITS)
        np.testing.assert_array_equal(decoded.alpha, np.where(transparent, 0, 255))
        np.testing.assert_array_equal(mask_from_alpha(decoded), transparent)
    row = np.array([[0, 0, 200, 200]])
    eight, sixteen = (
        decode_image(encoded(Image.fromarray(row.astype(dtype) * scale), transparency=0), LIMITS)
        for scale, dtype in ((1, np.uint8), (257, np.uint16))
    )
    np.testing.assert_array_equal(sixteen.alpha, eight.alpha)
    np.testing.assert_array_equal(sixteen.rgb, eight.rgb)
    assert decode_image(encoded(Image.fromarray(samples), transparency=7), LIMITS).alpha is None


def test_32bit_integer_tiff_is_scaled_like_16bit():
    image = Image.fromarray(np.array([[0, 65535, 32896, 100000]], dtype=np.int32))
    assert image.mode == "I"
    decoded = decode_image(encoded(image, "TIFF"), LIMITS)
    np.testing.assert_array_equal(decoded.rgb[0, :, 1], [0, 255, 128, 255])


@pytest.mark.parametrize(
    ("values", "expected"),
    [([0.0, 0.5, 1.0], [0, 128, 255]), ([0.0, 100.0, 300.0], [0, 100, 255])],
)
def test_float_tiff_is_read_as_unit_range_or_clipped(values, expected):
    image = Image.fromarray(np.array([values], dtype=np.float32))
    assert image.mode == "F"
    decoded = decode_image(encoded(image, "TIFF"), LIMITS)
    np.testing.assert_array_equal(decoded.rgb[0, :, 2], expected)


@pytest.mark.parametrize(("mode", "most_bytes_per_pixel"), [("I;16", 8), ("F", 12)])
def test_deep_samples_are_scaled_a_block_at_a_time(monkeypatch, mode, most_bytes_per_pixel):
    """A 12 KB 4 MP 16-bit PNG peaked at 14 bytes per pixel in whole-array uint32 temporaries (a 40 MP one:
    ~600 MB of the ingress, five times an 8-bit one); scaled in blocks, the values stay the same."""
    import tracemalloc

    rng = np.random.default_rng(3)
    small = rng.integers(0, 65536, (37, 53)).astype(np.uint16 if mode == "I;16" else np.float32)
    if mode == "F":
        small /= 65535.0
        small[0, :4] = [np.nan, np.inf, -np.inf, 0.25]
    whole = decode_image(encoded(Image.fromarray(small), "PNG" if mode == "I;16" else "TIFF"), LIMITS).rgb
    monkeypatch.setattr(imaging, "_SCALE_BLOCK_PIXELS", 100)  # a block is ~2 rows: many blocks, a ragged last one
    blocked = decode_image(encoded(Image.fromarray(small), "PNG" if mode == "I;16" else "TIFF"), LIMITS).rgb
    np.testing.assert_array_equal(blocked, whole)
    monkeypatch.undo()

    big = Image.new(mode, (2000, 2000), 40000 if mode == "I;16" else 0.5)
    data = encoded(big, "PNG" if mode == "I;16" else "TIFF")
    tracemalloc.start()
    try:
        decode_image(data, LIMITS)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak / (2000 * 2000) < most_bytes_per_pixel, f"{peak / 4e6:.1f} bytes per pixel at the peak"


def test_one_bit_image_is_black_and_white():
    checker = (np.indices((8, 8)).sum(axis=0) % 2).astype(bool)
    decoded = decode_image(encoded(Image.fromarray(checker)), LIMITS)
    np.testing.assert_array_equal(decoded.rgb[..., 0], np.where(checker, 255, 0))


def test_exif_orientation_is_applied():
    stored = np.zeros((20, 40, 3), np.uint8)  # 40 wide, 20 high as stored
    stored[:8, :8] = [255, 0, 0]  # stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored rotated 90 degrees clockwise
    data = encoded(Image.fromarray(stored), "JPEG", quality=95, exif=exif.tobytes())
    decoded = decode_image(data, LIMITS)
    assert decoded.rgb.shape == (40, 20, 3)
    assert decoded.rgb[2, -3, 0] > 200 and decoded.rgb[2, -3, 2] < 50  # now top-right
    assert decoded.rgb[2, 2, 0] < 50


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP"])
def test_animated_image_yields_first_frame(fmt):
    frames = [Image.new("RGB", (12, 10), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    data = encoded(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    decoded = decode_image(data, LIMITS)
    assert decoded.rgb.shape == (10, 12, 3)
    assert decoded.rgb[5, 5, 0] > 200 and decoded.rgb[5, 5, 2] < 50


def test_multi_picture_jpeg_reports_jpeg_and_first_picture():
    pictures = [Image.new("RGB", (16, 12), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    data = encoded(pictures[0], "MPO", save_all=True, append_images=pictures[1:])
    assert Image.open(io.BytesIO(data)).format == "MPO"
    decoded = decode_image(data, LIMITS)
    assert decoded.format == "jpeg"
    assert decoded.rgb[6, 8, 0] > 200 and decoded.rgb[6, 8, 2] < 50


# --- decode_image: refusals ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [b"", np.random.default_rng(1).bytes(5000), b"\x89PNG\r\n\x1a\n" + b"\x00" * 40],
    ids=["empty", "random", "png-signature-only"],
)
def test_bytes_that_are_not_an_image_are_invalid(data):
    with pytest.raises(InvalidImage) as info:
        decode_image(data, LIMITS)
    assert info.value.detail


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file_is_invalid(fmt):
    data = encoded(Image.fromarray(noise(64, 64)), fmt)
    with pytest.raises(InvalidImage, match="truncated"):
        decode_image(data[: len(data) // 2], LIMITS)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "WEBP", "BMP"])
def test_corrupted_files_only_ever_raise_input_errors(fmt):
    original = encoded(Image.fromarray(noise(24, 32)), fmt)
    rng = np.random.default_rng(6)
    for _ in range(60):
        data = bytearray(original)
        for _ in range(int(rng.integers(1, 6))):
            position = int(rng.integers(0, len(data)))
            if rng.random() < 0.5:
                data[position] = int(rng.integers(0, 256))
            else:
                del data[position : position + int(rng.integers(1, 40))]
        try:
            decode_image(bytes(data), LIMITS)
        except InputError:
            pass


def test_format_outside_the_accepted_list_is_refused():
    with pytest.raises(InvalidImage, match="not a recognised image"):
        decode_image(encoded(Image.new("RGB", (4, 4)), "PCX"), LIMITS)


@pytest.mark.parametrize("side", [9000, 20000])
def test_header_declaring_huge_size_is_refused_before_decoding(side):
    # Were pixels decoded first, this 1-pixel payload would fail as truncated (InvalidImage) instead.
    with pytest.raises(ImageTooLarge):
        decode_image(png_declaring_size(side, side), LIMITS)


def test_too_many_pixels_names_the_size_and_limit():
    with pytest.raises(ImageTooLarge, match=r"9000x8000 \(72.0 megapixels\); the limit is 40 megapixels"):
        decode_image(png_declaring_size(9000, 8000), LIMITS)


@pytest.mark.parametrize("side", [10_000, 20_000], ids=["pil-warning", "pil-error"])
def test_pil_decompression_bomb_guard_becomes_image_too_large(side):
    """Past PIL's own guard (89.5 MP), the detail quoted PIL's words too: another limit and "could be decompression
    bomb DOS attack", to someone who sent a large photo."""
    max_pixels_before = Image.MAX_IMAGE_PIXELS
    for configured, limit in ((40, "40"), (1000, "89.4785")):
        with pytest.raises(ImageTooLarge) as caught:
            decode_image(png_declaring_size(side, side), DecodeLimits(max_megapixels=configured))
        detail = str(caught.value)
        assert detail == f"the image is {side * side / 1e6:.1f} megapixels; the limit is {limit} megapixels", detail
    assert Image.MAX_IMAGE_PIXELS == max_pixels_before


def test_megapixel_limit_boundary():
    limits = DecodeLimits(max_megapixels=0.01)
    assert decode_image(encoded(Image.new("RGB", (100, 100))), limits).rgb.shape == (100, 100, 3)
    with pytest.raises(ImageTooLarge):
        decode_image(encoded(Image.new("RGB", (101, 100))), limits)


def test_zero_width_header_is_invalid():
    with pytest.raises(InvalidImage):
        decode_image(png_declaring_size(0, 10), LIMITS)


def test_byte_limit():
    data = encoded(Image.fromarray(noise(32, 32)))
    with pytest.raises(ImageTooLarge, match="bytes"):
        decode_image(data, DecodeLimits(max_bytes=len(data) - 1))
    decode_image(data, DecodeLimits(max_bytes=len(data)))


# --- masks --------------------------------------------------------------------------------------


def rectangle_mask(height=40, width=50) -> np.ndarray:
    mask = np.zeros((height, width), bool)
    mask[10:20, 5:30] = True
    return mask


def test_white_on_black_grayscale_mask():
    mask = rectangle_mask()
    decoded = decode_mask(encoded(Image.fromarray(mask.astype(np.uint8) * 255)), (40, 50), LIMITS)
    assert decoded.dtype == np.bool_
    np.testing.assert_array_equal(decoded, mask)


def test_white_on_black_rgb_mask():
    mask = rectangle_mask()
    rgb = np.zeros((40, 50, 3), np.uint8)
    rgb[mask] = [255, 255, 255]
    np.testing.assert_array_equal(decode_mask(encoded(Image.fromarray(rgb), "JPEG"), (40, 50), LIMITS), mask)


def test_strokes_on_transparent_layer_use_alpha():
    mask = rectangle_mask()
    rgba = np.zeros((40, 50, 4), np.uint8)  # black strokes: luminance alone would find nothing
    rgba[mask, 3] = 255
    rgba[0, :2, 3] = [127, 128]  # anti-aliased stroke edge
    mask[0, 1] = True
    np.testing.assert_array_equal(decode_mask(encoded(Image.fromarray(rgba)), (40, 50), LIMITS), mask)


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_a_black_and_white_mask_with_a_transparent_pixel_keeps_its_white(mode):
    # one transparent corner used to switch the whole mask to its alpha: 59999 of 60000 pixels removed
    mask = rectangle_mask()
    pixels = np.dstack([mask.astype(np.uint8) * 255] * 3 + [np.full(mask.shape, 255, np.uint8)])
    pixels[0, 0, 3] = 0
    pixels[39, 49, 3] = 100
    image = Image.fromarray(pixels).convert(mode)
    np.testing.assert_array_equal(decode_mask(encoded(image), (40, 50), LIMITS), mask)


@pytest.mark.parametrize("transparent", [1, 20])  # of 2000 pixels: up to 1% (ALMOST_OPAQUE)
def test_an_all_black_mask_with_a_few_transparent_pixels_removes_nothing(transparent):
    """One transparent corner (an anti-aliased canvas border) switched an all-black mask to its alpha: all of it."""
    rgba = np.zeros((40, 50, 4), np.uint8)
    rgba[..., 3] = 255
    rgba[0, :transparent, 3] = 0
    assert not decode_mask(encoded(Image.fromarray(rgba)), (40, 50), LIMITS).any()


def test_black_strokes_over_most_of_a_transparent_layer_are_still_strokes():
    rgba = np.zeros((40, 50, 4), np.uint8)
    rgba[:30, :, 3] = 255  # 75% painted, black
    np.testing.assert_array_equal(decode_mask(encoded(Image.fromarray(rgba)), (40, 50), LIMITS), rgba[..., 3] > 0)


@pytest.mark.parametrize("colour", [(0, 0, 0), (255, 255, 255), (255, 0, 0), (255, 255, 0)])
def test_strokes_of_one_colour_on_a_transparent_layer_use_alpha(colour):
    mask = rectangle_mask()
    rgba = np.zeros((40, 50, 4), np.uint8)
    rgba[mask] = [*colour, 255]
    rgba[0, :3] = [[*colour, 127], [*colour, 128], [*colour, 200]]  # anti-aliased edge
    mask[0, 1:3] = True
    np.testing.assert_array_equal(decode_mask(encoded(Image.fromarray(rgba)), (40, 50), LIMITS), mask)


def test_strokes_of_dark_and_light_colours_on_a_transparent_layer_use_alpha():
    """Red (luminance 76) and yellow (226) strokes are both dark and light, but not a black-and-white mask."""
    mask = rectangle_mask()
    rgba = np.zeros((40, 50, 4), np.uint8)
    rgba[mask] = [255, 0, 0, 255]
    rgba[mask & (np.arange(50) >= 25)] = [255, 255, 0, 255]
    np.testing.assert_array_equal(decode_mask(encoded(Image.fromarray(rgba)), (40, 50), LIMITS), mask)


@pytest.mark.parametrize("white, black", [((255, 250, 235), (0, 0, 0)), ((255, 255, 255), (10, 20, 60))])
def test_a_tinted_black_and_white_mask_with_a_transparent_pixel_keeps_its_white(white, black):
    """A warm white or a navy black is not strokes of colour: one transparent pixel must not flip it to alpha."""
    mask = rectangle_mask()
    rgba = np.zeros((40, 50, 4), np.uint8)
    rgba[...] = [*black, 255]
    rgba[mask] = [*white, 255]
    rgba[0, 0, 3] = 0
    rgba[39, 49, :3] = [255, 0, 0]  # and one stray red pixel
    np.testing.assert_array_equal(decode_mask(encoded(Image.fromarray(rgba)), (40, 50), LIMITS), mask)


def test_mask_threshold_is_above_127():
    gray = np.array([[0, 127, 128, 255]], np.uint8)
    decoded = decode_mask(encoded(Image.fromarray(gray)), (1, 4), LIMITS)
    np.testing.assert_array_equal(decoded, [[False, False, True, True]])


def test_16bit_mask_is_scaled_before_threshold():
    values = np.array([[32639, 32896]], np.uint16)  # 127 and 128 once scaled
    decoded = decode_mask(encoded(Image.fromarray(values)), (1, 2), LIMITS)
    np.testing.assert_array_equal(decoded, [[False, True]])


def test_mask_of_other_size_is_refused_with_both_sizes():
    data = encoded(Image.new("L", (100, 80)))
    with pytest.raises(MaskSizeMismatch) as info:
        decode_mask(data, (160, 200), LIMITS)
    assert info.value.detail == "mask is 100x80 but image is 200x160"


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "JPEG", "TIFF"])
@pytest.mark.parametrize("orientation", [1, 6])
def test_a_mask_of_another_size_is_refused_before_its_pixels_are_decoded(monkeypatch, fmt, orientation):
    # a 1.7 KB lossless WebP mask of 6320x6320 for a 1x1 image cost 1 s and 770 MB before its 422
    exif = Image.Exif()
    exif[0x0112] = orientation
    params = {"lossless": True} if fmt == "WEBP" else {}
    data = encoded(Image.new("L", (300, 200), 255), fmt, exif=exif.tobytes(), **params)
    with Image.open(io.BytesIO(data)) as opened:
        opened_class = type(opened)

    def must_not_run(*args, **kwargs):
        raise AssertionError("a mask of another size was decoded")

    monkeypatch.setattr(opened_class, "load", must_not_run)
    monkeypatch.setattr(imaging, "_fast_decode", must_not_run)
    upright = "200x300" if orientation == 6 else "300x200"
    with pytest.raises(MaskSizeMismatch) as info:
        decode_mask(data, (1, 1), LIMITS)
    assert info.value.detail == f"mask is {upright} but image is 1x1"
    with pytest.raises(MaskSizeMismatch) as info:
        decode_mask(data, (300, 201), LIMITS)
    assert info.value.detail == f"mask is {upright} but image is 201x300"
    monkeypatch.undo()
    turned = (200, 300) if orientation == 6 else (300, 200)  # the image's (H, W): the stored mask's, transposed
    with pytest.raises(MaskSizeMismatch, match="^mask is .* turned a quarter: .* as it is shown upright$"):
        decode_mask(data, turned, LIMITS)
    assert decode_mask(data, turned[::-1], LIMITS).all()


def test_undecodable_mask_is_an_invalid_mask():
    with pytest.raises(InvalidMask):
        decode_mask(b"not an image", (10, 10), LIMITS)
    with pytest.raises(ImageTooLarge):
        decode_mask(png_declaring_size(20000, 20000), (20000, 20000), LIMITS)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])  # libwebp writes no alpha channel for a fully opaque one
def test_a_fully_opaque_alpha_channel_is_an_empty_mask_not_a_missing_one(fmt):
    """Its alpha plane is dropped at decoding (nothing to keep in the result), but the image had one: without a mask,
    nothing is erased, so nothing is to be removed. An image without one still has no mask to give."""
    rgba = np.dstack([noise(10, 12), np.full((10, 12), 255, np.uint8)])
    decoded = decode_image(encoded(Image.fromarray(rgba), fmt), LIMITS)
    assert decoded.alpha is None and decoded.has_alpha
    assert not mask_from_alpha(decoded).any() and mask_from_alpha(decoded).shape == (10, 12)
    with pytest.raises(InvalidMask, match="no alpha channel"):
        mask_from_alpha(decode_image(encoded(Image.fromarray(rgba[..., :3]), fmt), LIMITS))


def test_mask_from_alpha_marks_transparent_pixels():
    rgba = np.dstack([noise(10, 10), np.full((10, 10), 255, np.uint8)])
    rgba[2:5, 3:7, 3] = 0
    rgba[0, 0, 3] = 127
    rgba[0, 1, 3] = 128
    mask = mask_from_alpha(decode_image(encoded(Image.fromarray(rgba)), LIMITS))
    expected = np.zeros((10, 10), bool)
    expected[2:5, 3:7] = True
    expected[0, 0] = True
    np.testing.assert_array_equal(mask, expected)


def test_mask_from_alpha_without_alpha_is_invalid():
    image = DecodedImage(rgb=np.zeros((4, 4, 3), np.uint8), alpha=None, format="jpeg")
    with pytest.raises(InvalidMask, match="no alpha"):
        mask_from_alpha(image)


# --- dilate_mask --------------------------------------------------------------------------------


def test_single_pixel_dilates_to_square():
    mask = np.zeros((20, 20), bool)
    mask[10, 10] = True
    expected = np.zeros((20, 20), bool)
    expected[7:14, 7:14] = True
    np.testing.assert_array_equal(dilate_mask(mask, 3), expected)


def test_dilation_is_clipped_at_the_border():
    mask = np.zeros((20, 20), bool)
    mask[0, 19] = True
    dilated = dilate_mask(mask, 3)
    assert dilated.shape == (20, 20)
    expected = np.zeros((20, 20), bool)
    expected[0:4, 16:20] = True
    np.testing.assert_array_equal(dilated, expected)


def test_zero_dilation_returns_an_equal_copy():
    mask = rectangle_mask()
    dilated = dilate_mask(mask, 0)
    np.testing.assert_array_equal(dilated, mask)
    dilated[0, 0] = True
    assert not mask[0, 0]


def test_dilation_matches_reference_and_keeps_empty_masks_empty():
    mask = np.random.default_rng(2).random((120, 90)) > 0.995
    reference = ndimage.binary_dilation(mask, structure=np.ones((11, 11), bool))
    np.testing.assert_array_equal(dilate_mask(mask, 5), reference)
    assert not dilate_mask(np.zeros((30, 30), bool), 4).any()


@pytest.mark.timing
def test_dilation_of_large_image_is_fast():
    mask = np.zeros((3000, 4000), bool)
    mask[1000:1400, 2000:2600] = True
    started = time.perf_counter()
    dilated = dilate_mask(mask, 40)
    assert time.perf_counter() - started < 0.5
    assert dilated[960:1440, 1960:2640].all() and dilated.sum() == 480 * 680


# --- masks on a model's grid --------------------------------------------------------------------


def test_whole_cells_grows_the_mask_to_every_cell_it_touches_and_no_other():
    mask = np.zeros((32, 48), bool)
    mask[9, 9] = mask[20:30, 40:42] = True
    grown = whole_cells(mask, 8)
    expected = np.zeros_like(mask)
    expected[8:16, 8:16] = expected[16:32, 40:48] = True
    np.testing.assert_array_equal(grown, expected)


def test_only_a_region_with_no_pixel_on_the_grid_is_grown():
    """What a view sampling every 8th pixel sees: every region; a region it sees already, and the background
    between, as they were (a mask whose off-grid pixels are the only unmasked ones grew over them)."""
    mask = np.zeros((32, 32), bool)
    mask[9:12, 9:12] = True  # no pixel on the grid: grown to its cell
    mask[14:25, 14:25] = True  # on the grid at (16, 16) and (24, 24): kept as it is
    expected = mask.copy()
    expected[8:16, 8:16] = True
    np.testing.assert_array_equal(seen_on_grid(mask, 8), expected)
    holes = np.ones((32, 32), bool)
    holes[1::8, 1::8] = False
    np.testing.assert_array_equal(seen_on_grid(holes, 8), holes)


# --- plan_crop ----------------------------------------------------------------------------------


def assert_window_contains_bbox_and_fits(plan: CropPlan, mask: np.ndarray) -> None:
    rows, cols = np.nonzero(mask)
    assert plan.top <= rows.min() and rows.max() < plan.top + plan.side
    assert plan.left <= cols.min() and cols.max() < plan.left + plan.side
    height, width = mask.shape
    for start, extent in ((plan.top, height), (plan.left, width)):
        if plan.side <= extent:
            assert 0 <= start and start + plan.side <= extent


def test_empty_mask_needs_no_crop():
    assert plan_crop(np.zeros((100, 100), bool), (512, 1024), 64) is None


def test_small_mask_gets_smallest_bucket_at_native_resolution():
    mask = np.zeros((1500, 2000), bool)
    mask[700:800, 950:1050] = True
    plan = plan_crop(mask, (512, 1024), 64)
    assert (plan.side, plan.bucket) == (512, 512)
    assert_window_contains_bbox_and_fits(plan, mask)
    assert abs(plan.top + 256 - 750) <= 1 and abs(plan.left + 256 - 1000) <= 1


def test_a_small_image_runs_at_the_bucket_that_holds_it_not_upscaled_for_context():
    mask = np.zeros((256, 256), bool)
    mask[85:170, 85:170] = True  # the region plus margins (341 px) would want the 512 bucket
    plan = plan_crop(mask, (256, 512, 1024), 128)
    assert (plan.side, plan.bucket, plan.top, plan.left) == (256, 256, 0, 0)


@pytest.mark.parametrize(
    ("shape", "box", "expected"),
    [
        ((520, 520), (110, 410, 110, 410), (520, 512)),  # was 1024: 520 px upscaled 1.97x, 4x the model pixels
        ((600, 800), (100, 390, 100, 390), (546, 512)),  # was (800, 1024)
        ((1000, 1000), (150, 850, 150, 850), (1000, 1024)),  # 512 would shrink the window 1.95x: upscaled to 1024
        ((2000, 2000), (700, 1050, 700, 1050), (1024, 1024)),  # 1024 fits in the image: native, more context
    ],
)
def test_a_window_the_image_cannot_fill_to_its_bucket_goes_a_bucket_down_when_it_nearly_fits(shape, box, expected):
    """Within MAX_BUCKET_DOWNSCALE of the smaller bucket, a window is downscaled into it rather than upscaled into
    a bucket larger than the image (a review: a 520x520 photo ran in the 1024 bucket)."""
    top, bottom, left, right = box
    mask = np.zeros(shape, bool)
    mask[top:bottom, left:right] = True
    plan = plan_crop(mask, (512, 1024), 128)
    assert (plan.side, plan.bucket) == expected
    assert_window_contains_bbox_and_fits(plan, mask)
    assert plan.side / plan.bucket <= MAX_BUCKET_DOWNSCALE


def test_window_is_shifted_inside_at_corners():
    mask = np.zeros((1500, 2000), bool)
    mask[10:60, 20:90] = True
    plan = plan_crop(mask, (512, 1024), 64)
    assert (plan.top, plan.left) == (0, 0)

    mask = np.zeros((1500, 2000), bool)
    mask[1450:1499, 1900:1990] = True
    plan = plan_crop(mask, (512, 1024), 64)
    assert (plan.top + plan.side, plan.left + plan.side) == (1500, 2000)


def test_large_mask_is_downscaled_into_largest_bucket():
    mask = np.zeros((1500, 2000), bool)
    mask[100:1500, 100:1900] = True
    plan = plan_crop(mask, (512, 1024), 64)
    assert plan.bucket == 1024 and plan.side == 1800 + 128
    assert_window_contains_bbox_and_fits(plan, mask)


def test_window_never_exceeds_the_larger_image_side():
    mask = np.ones((1500, 2000), bool)
    plan = plan_crop(mask, (512, 1024), 64)
    assert (plan.side, plan.bucket, plan.left, plan.top) == (2000, 1024, 0, -250)


def test_small_image_window_overhangs_centred():
    mask = np.zeros((200, 300), bool)
    mask[90:110, 140:160] = True
    plan = plan_crop(mask, (512, 1024), 64)
    assert plan == CropPlan(top=-50, left=0, side=300, bucket=512)


def test_random_masks_always_get_a_containing_window():
    rng = np.random.default_rng(3)
    for _ in range(200):
        height, width = rng.integers(50, 1500, size=2)
        mask = np.zeros((height, width), bool)
        top, left = rng.integers(0, height), rng.integers(0, width)
        mask[top : top + rng.integers(1, height), left : left + rng.integers(1, width)] = True
        plan = plan_crop(mask, (512, 768, 1024), int(rng.integers(0, 200)))
        assert plan.side <= max(height, width)
        assert_window_contains_bbox_and_fits(plan, mask)


@pytest.mark.parametrize("buckets", [(), (500,), (0, 512), (-64,)])
def test_bad_buckets_are_a_programming_error(buckets):
    with pytest.raises(ValueError):
        plan_crop(rectangle_mask(), buckets, 8)


# --- crop_for_model / paste_back ----------------------------------------------------------------


def blob_mask(height: int, width: int, top: int, left: int, size: int) -> np.ndarray:
    mask = np.zeros((height, width), bool)
    mask[top : top + size, left : left + size] = True
    mask[top + size // 2, left - 5 : left + size + 5] = True  # thin arm
    return mask


def test_crop_at_bucket_size_is_an_exact_copy():
    rgb, mask = noise(600, 800), blob_mask(600, 800, 250, 350, 60)
    plan = plan_crop(mask, (512,), 32)
    assert plan.side == plan.bucket == 512
    crop, crop_mask = crop_for_model(rgb, mask, plan)
    window = np.s_[plan.top : plan.top + 512, plan.left : plan.left + 512]
    np.testing.assert_array_equal(crop, rgb[window])
    np.testing.assert_array_equal(crop_mask, mask[window])


def test_downscaled_crop_has_bucket_shape_and_keeps_single_pixels():
    rgb = noise(1500, 2000)
    mask = np.zeros((1500, 2000), bool)
    dots = np.mgrid[100:1400:7, 300:1700:7].reshape(2, -1).T
    mask[dots[:, 0], dots[:, 1]] = True
    plan = plan_crop(mask, (512, 1024), 64)
    assert plan.side > plan.bucket
    crop, crop_mask = crop_for_model(rgb, mask, plan)
    assert crop.shape == (1024, 1024, 3) and crop.dtype == np.uint8 and crop.flags.c_contiguous
    assert crop_mask.shape == (1024, 1024) and crop_mask.dtype == np.bool_
    scale = plan.bucket / plan.side
    for row, col in dots:
        y, x = int((row - plan.top + 0.5) * scale), int((col - plan.left + 0.5) * scale)
        assert crop_mask[y - 1 : y + 2, x - 1 : x + 2].any(), (row, col)


def test_overhanging_crop_pads_outside_the_image():
    rgb, mask = noise(300, 512), blob_mask(300, 512, 120, 200, 40)
    plan = plan_crop(mask, (512,), 16)
    assert plan.side == plan.bucket == 512 and plan.top == -106
    crop, crop_mask = crop_for_model(rgb, mask, plan)
    np.testing.assert_array_equal(crop[106:406], rgb)
    np.testing.assert_array_equal(crop[105], crop[107])  # reflected
    np.testing.assert_array_equal(crop_mask[:106], crop_mask[212:106:-1])  # the mask with it
    np.testing.assert_array_equal(crop_mask[406:], crop_mask[404:298:-1])
    np.testing.assert_array_equal(crop_mask[106:406], mask)


def test_the_model_never_sees_an_unmasked_mirror_of_the_masked_object():
    """The image was padded by reflection and the mask with False: an object at the image's edge (a person standing
    on a photo's bottom edge, a short landscape's top) was mirrored into the pad as context beside the hole."""
    for height, padding in ((400, "reflect"), (120, "edge")):
        rgb, mask = np.full((height, 1024, 3), 128, np.uint8), np.zeros((height, 1024), bool)
        rgb[:60, 400:560], mask[:60, 400:560] = (255, 0, 0), True
        plan = plan_crop(mask, (512, 1024), 128)
        assert plan.top < 0 and (-plan.top < height) == (padding == "reflect")
        crop, crop_mask = crop_for_model(rgb, mask, plan)
        red = (crop == (255, 0, 0)).all(-1)
        assert red[: -plan.top].any() and not (red & ~crop_mask).any(), padding


def test_a_downscaled_crop_keeps_every_masked_pixel_in_its_model_mask():
    """8-bit coverage rounded a 1-pixel dot to nothing past a downscale of ~22: the model got an empty mask."""
    mask = np.zeros((30_000, 1300), bool)
    mask[100, 100] = mask[29_800, 1200] = True
    plan = CropPlan(top=0, left=-14_350, side=30_000, bucket=1024)
    _, crop_mask = crop_for_model(np.zeros((30_000, 1300, 3), np.uint8), mask, plan)
    assert crop_mask.sum() >= 2 and crop_mask[:512].any() and crop_mask[512:].any()


def test_thin_image_overhang_falls_back_to_edge_padding():
    rgb, mask = noise(20, 600), blob_mask(20, 600, 5, 300, 8)
    plan = plan_crop(mask, (512,), 8)
    crop, crop_mask = crop_for_model(rgb, mask, plan)
    assert crop.shape == (512, 512, 3) and crop_mask.shape == (512, 512)
    pad = -plan.top  # reflecting 20 rows 246 times over would mirror them; the edge rows are repeated instead
    assert pad > 20 and (crop[:pad] == crop[pad]).all() and (crop[pad + 20 :] == crop[pad + 19]).all()
    assert (crop_mask[:pad] == crop_mask[pad]).all() and (crop_mask[pad + 20 :] == crop_mask[pad + 19]).all()


def test_a_strip_is_cropped_and_pasted_without_a_window_sized_buffer():
    """A 1 x 12000 strip masked over 11000 pixels: its window is 11064 square, 367 MB if padded at full size."""
    import tracemalloc

    rgb = noise(1, 12_000)
    mask = np.zeros((1, 12_000), bool)
    mask[:, :11_000] = True
    plan = plan_crop(mask, (256, 512), 32)
    assert (plan.side, plan.bucket) == (11_064, 512)
    tracemalloc.start()
    try:
        crop, crop_mask = crop_for_model(rgb, mask, plan)
        out = paste_back(rgb, mask, noise(512, 512, seed=1), plan, feather=6)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 * 1024 * 1024, f"peak {peak / 1e6:.0f} MB"
    assert crop.shape == (512, 512, 3) and crop_mask.any() and not crop_mask.all()
    np.testing.assert_array_equal(out[:, 11_000:], rgb[:, 11_000:])
    assert not np.array_equal(out[:, :11_000], rgb[:, :11_000])


@pytest.mark.parametrize(
    ("shape", "blob", "buckets", "window"),
    [
        ((600, 800), (250, 350, 60), (512,), (512, 512, False)),
        ((1500, 2000), (200, 300, 1100), (512, 1024), (1182, 1024, False)),
        ((300, 512), (120, 200, 40), (512,), (512, 512, True)),
    ],
    ids=["side-equals-bucket", "downscaled", "overhanging"],
)
def test_paste_back_changes_only_masked_pixels(shape, blob, buckets, window):
    rgb = noise(*shape, seed=4)
    mask = dilate_mask(blob_mask(*shape, *blob), 4)
    plan = plan_crop(mask, buckets, 32)
    assert (plan.side, plan.bucket, plan.top < 0) == window
    result = noise(plan.bucket, plan.bucket, seed=5)
    before = rgb.copy()

    out = paste_back(rgb, mask, result, plan, feather=6)

    np.testing.assert_array_equal(rgb, before)
    assert out.shape == rgb.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out[~mask], rgb[~mask])
    if plan.side != plan.bucket:
        result = np.asarray(Image.fromarray(result).resize((plan.side, plan.side), Image.Resampling.LANCZOS))
    deep = ndimage.binary_erosion(mask, structure=np.ones((3, 3)), iterations=6, border_value=1)
    rows, cols = np.nonzero(deep)
    assert rows.size > 0
    np.testing.assert_array_equal(out[rows, cols], result[rows - plan.top, cols - plan.left])


def test_feather_ramps_from_the_mask_edge():
    rgb = np.zeros((512, 512, 3), np.uint8)
    mask = np.zeros((512, 512), bool)
    mask[200:300, 200:300] = True
    plan = CropPlan(top=0, left=0, side=512, bucket=512)
    white = np.full((512, 512, 3), 255, np.uint8)
    feathered = paste_back(rgb, mask, white, plan, feather=8)
    assert feathered[250, 200, 0] == round(255 / 8)  # one pixel from unmasked
    assert feathered[250, 203, 0] == round(255 * 4 / 8)
    assert feathered[250, 250, 0] == 255
    hard = paste_back(rgb, mask, white, plan, feather=0)
    np.testing.assert_array_equal(hard[..., 0], np.where(mask, 255, 0))


@pytest.mark.parametrize("feather", [1, 5, 40])
def test_feather_weight_equals_a_whole_window_distance_transform(feather):
    seeds = np.random.default_rng(7).random((768, 768)) > 0.9995
    mask = dilate_mask(seeds, 30)
    mask[:, :200] = True  # one region touching the image edges
    plan = CropPlan(top=0, left=0, side=768, bucket=768)
    black, white = np.zeros((768, 768, 3), np.uint8), np.full((768, 768, 3), 255, np.uint8)

    out = paste_back(black, mask, white, plan, feather)

    weight = np.minimum(ndimage.distance_transform_edt(mask) / feather, 1.0).astype(np.float32)
    np.testing.assert_array_equal(out[..., 0], np.rint(np.uint8(255) * weight).astype(np.uint8))


# --- encode_image -------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", OUTPUT_FORMATS)
def test_encoded_output_decodes_to_same_size_and_pixels(fmt):
    rows, cols = np.mgrid[0:30, 0:50]
    rgb = np.dstack([rows * 8, cols * 5, 255 - cols * 5]).astype(np.uint8)  # smooth, so lossy codecs stay close
    decoded = decode_image(encode_image(rgb, None, fmt), LIMITS)
    assert decoded.format == fmt and decoded.rgb.shape == (30, 50, 3)
    assert MEDIA_TYPES[fmt] == f"image/{fmt}"
    error = np.abs(decoded.rgb.astype(int) - rgb).mean()
    assert error == 0 if fmt == "png" else error < 4


def test_png_round_trips_alpha_exactly():
    rgb, alpha = noise(30, 50), noise(30, 50, seed=9)[..., 0]
    decoded = decode_image(encode_image(rgb, alpha, "png"), LIMITS)
    np.testing.assert_array_equal(decoded.rgb, rgb)
    np.testing.assert_array_equal(decoded.alpha, alpha)


def test_alpha_is_kept_in_webp_and_dropped_in_jpeg():
    rgb, alpha = noise(30, 50), np.full((30, 50), 255, np.uint8)
    alpha[:, :25] = 0
    webp = decode_image(encode_image(rgb, alpha, "webp", quality=80), LIMITS)
    assert webp.alpha is not None and (webp.alpha[:, :20] < 10).all()
    assert decode_image(encode_image(rgb, alpha, "jpeg"), LIMITS).alpha is None


@pytest.mark.parametrize("fmt", OUTPUT_FORMATS)
def test_a_source_with_a_fully_opaque_alpha_channel_keeps_it_in_a_png(fmt):
    """A review: a fully opaque RGBA PNG came back RGB (the opaque plane is dropped at decoding). The channel comes
    back, opaque, in a PNG; libwebp writes none for an opaque plane; JPEG holds none."""
    rgba = np.dstack([noise(30, 50), np.full((30, 50), 255, np.uint8)])
    decoded = decode_image(encoded(Image.fromarray(rgba), "PNG"), LIMITS)
    assert decoded.alpha is None and decoded.has_alpha
    body = encode_image(decoded.rgb, decoded.alpha, fmt, has_alpha=decoded.has_alpha)
    with Image.open(io.BytesIO(body)) as result:
        assert result.mode == ("RGBA" if fmt == "png" else "RGB")
        if fmt == "png":
            np.testing.assert_array_equal(np.asarray(result), rgba)
    with Image.open(io.BytesIO(encode_image(decoded.rgb, None, "png"))) as result:
        assert result.mode == "RGB", "a source without an alpha channel gets none"


def test_unknown_output_format_is_refused_with_alternatives():
    with pytest.raises(UnsupportedOutputFormat, match="png, jpeg, webp"):
        encode_image(noise(4, 4), None, "bmp")


def test_webp_beyond_its_size_limit_is_refused():
    with pytest.raises(ImageTooLarge, match="webp"):
        encode_image(np.zeros((10, 16384, 3), np.uint8), None, "webp")


# --- the fast codec path (imagecodecs) against Pillow's ---------------------------------------------

needs_imagecodecs = pytest.mark.skipif(imaging.imagecodecs is None, reason="imagecodecs is not installed")


def decoded_both_ways(data: bytes, monkeypatch) -> tuple[DecodedImage, DecodedImage]:
    """decode_image as it is, and as it was before imagecodecs (Pillow decoding everything)."""
    fast = decode_image(data, LIMITS)
    monkeypatch.setattr(imaging, "imagecodecs", None)
    slow = decode_image(data, LIMITS)
    monkeypatch.undo()
    return fast, slow


def photo_like(height: int = 48, width: int = 64) -> np.ndarray:
    """Smooth gradients plus noise: JPEG's subsampling and IDCT rounding get something to do."""
    rows, cols = np.mgrid[0:height, 0:width]
    smooth = np.dstack([rows * 255 // height, cols * 255 // width, (rows + cols) % 256]).astype(np.int16)
    return np.clip(smooth + np.random.default_rng(11).integers(-20, 21, smooth.shape), 0, 255).astype(np.uint8)


@needs_imagecodecs
@pytest.mark.parametrize(
    ("mode", "fmt", "params"),
    [
        ("RGB", "PNG", {}),
        ("RGBA", "PNG", {}),
        ("L", "PNG", {}),
        ("LA", "PNG", {}),
        ("RGB", "JPEG", {"quality": 95}),
        ("RGB", "JPEG", {"quality": 75, "subsampling": 0}),
        ("RGB", "JPEG", {"quality": 90, "progressive": True}),
        ("RGB", "JPEG", {"quality": 50, "subsampling": 1, "optimize": True}),
        ("L", "JPEG", {"quality": 90}),
    ],
)
def test_fast_decoding_gives_pillows_pixels_and_alpha(monkeypatch, mode, fmt, params):
    pixels = np.dstack([photo_like(), np.tile(np.arange(64, dtype=np.uint8) * 4, (48, 1))])
    image = Image.fromarray(pixels).convert(mode)
    fast, slow = decoded_both_ways(encoded(image, fmt, **params), monkeypatch)
    np.testing.assert_array_equal(fast.rgb, slow.rgb)
    assert fast.rgb.flags.c_contiguous and fast.rgb.dtype == np.uint8
    assert (fast.alpha is None) == (slow.alpha is None) and fast.format == slow.format
    if slow.alpha is not None:
        np.testing.assert_array_equal(fast.alpha, slow.alpha)
        assert fast.alpha.flags.c_contiguous


@needs_imagecodecs
def test_fast_decoding_is_used_for_plain_png_and_jpeg(monkeypatch):
    calls = []

    def recorded(name):
        real = getattr(imaging.imagecodecs, name)
        return lambda data: calls.append(name) or real(data)

    for name in ("spng_decode", "jpeg8_decode"):
        monkeypatch.setattr(imaging.imagecodecs, name, recorded(name))
    decode_image(encoded(Image.fromarray(photo_like())), LIMITS)
    decode_image(encoded(Image.fromarray(photo_like()), "JPEG"), LIMITS)
    decode_image(encoded(Image.fromarray(photo_like()), "JPEG", progressive=True), LIMITS)
    decode_mask(encoded(Image.new("L", (64, 48))), (48, 64), LIMITS)
    assert calls == ["spng_decode", "jpeg8_decode", "jpeg8_decode", "spng_decode"]


@needs_imagecodecs
@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_exif_orientation_matches_pillows_exif_transpose(monkeypatch, orientation, fmt):
    stored = photo_like(20, 36)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encoded(Image.fromarray(stored), fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))
    with Image.open(io.BytesIO(data)) as image:
        expected = np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
    fast, slow = decoded_both_ways(data, monkeypatch)
    np.testing.assert_array_equal(fast.rgb, expected)
    np.testing.assert_array_equal(slow.rgb, expected)


_XMP_TURNED = (
    '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
    '<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>'
)


def _png_with_text(key: str, text: str, international: bool = False) -> bytes:
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    (info.add_itxt if international else info.add_text)(key, text)
    return encoded(Image.fromarray(photo_like(20, 36)), pnginfo=info)


def _exif_as_png_text(orientation: int) -> str:
    """ImageMagick's way of keeping EXIF in a PNG: "Raw profile type exif", hex, 72 characters a line."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    raw = exif.tobytes()
    return f"\nexif\n{len(raw):8d}\n" + "\n".join(raw.hex()[i : i + 72] for i in range(0, len(raw.hex()), 72)) + "\n"


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(lambda: encoded(Image.fromarray(photo_like(20, 36)), "JPEG", xmp=_XMP_TURNED.encode()), id="JPEG XMP"),
        pytest.param(lambda: _png_with_text("XML:com.adobe.xmp", _XMP_TURNED, international=True), id="PNG XMP"),
        pytest.param(lambda: _png_with_text("Raw profile type exif", _exif_as_png_text(6)), id="PNG EXIF as text"),
    ],
)
def test_an_orientation_only_in_xmp_or_png_text_is_not_applied_as_no_browser_applies_it(monkeypatch, data):
    """Pillow's exif_transpose turns such a photo; browsers show it as stored, so the playground's mask (drawn on
    the photo as shown) was refused as "turned a quarter", or, on a square photo, removed the wrong region."""
    data = data()
    with Image.open(io.BytesIO(data)) as image:
        assert image.getexif().get(0x0112) == 6, "Pillow reads an orientation there"
    for decoded in decoded_both_ways(data, monkeypatch):
        assert decoded.rgb.shape == (20, 36, 3)
    assert decode_mask(encoded(Image.new("L", (36, 20), 255)), (20, 36), LIMITS).all()


def test_the_alpha_of_a_photo_turned_by_its_exif_turns_with_it():
    stored = np.zeros((20, 36, 4), np.uint8)
    stored[..., :3] = photo_like(20, 36)
    stored[..., 3] = 255
    stored[:5, :5, 3] = 0  # the top left corner, as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned a quarter clockwise: that corner is then at the top right
    decoded = decode_image(encoded(Image.fromarray(stored), "WEBP", lossless=True, exact=True, exif=exif.tobytes()), LIMITS)
    assert decoded.rgb.shape == (36, 20, 3) and decoded.alpha.shape == (36, 20)
    assert (decoded.alpha[:5, -5:] == 0).all() and decoded.alpha.sum() == 255 * (36 * 20 - 25)
    np.testing.assert_array_equal(decoded.rgb, np.rot90(stored[..., :3], -1))


@needs_imagecodecs
@pytest.mark.parametrize("channels", [3, 4])
def test_16bit_color_png_reads_as_pillow_does(monkeypatch, channels):
    """Pillow opens 16-bit RGB(A) PNGs in 8-bit modes (keeping the high bytes); they stay on its path."""
    values = np.random.default_rng(15).integers(0, 65536, (6, 7, channels), dtype=np.uint16)
    values[..., 3:] = 40000  # a meaningful alpha is kept, a fully opaque one dropped: either way as Pillow does
    data = imaging.imagecodecs.png_encode(values)
    with Image.open(io.BytesIO(data)) as image:
        assert image.mode == ("RGB", "RGBA")[channels - 3]
    monkeypatch.setattr(imaging.imagecodecs, "spng_decode", lambda data: pytest.fail("16-bit PNG decoded twice"))
    fast = decode_image(data, LIMITS)
    monkeypatch.undo()
    fast, slow = decoded_both_ways(data, monkeypatch)
    np.testing.assert_array_equal(fast.rgb, slow.rgb)
    np.testing.assert_array_equal(fast.rgb, (values[..., :3] >> 8).astype(np.uint8))
    assert (fast.alpha is None) == (slow.alpha is None)


def _png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    chunks, position = [], 8
    while position < len(data):
        length = struct.unpack(">I", data[position : position + 4])[0]
        chunks.append((data[position + 4 : position + 8], data[position + 8 : position + 8 + length]))
        position += 12 + length
    return chunks


def _png_from_chunks(chunks: list[tuple[bytes, bytes]]) -> bytes:
    body = b"".join(
        struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
        for kind, payload in chunks
    )
    return b"\x89PNG\r\n\x1a\n" + body


def test_png_orientation_written_after_the_pixels_is_not_applied_as_browsers_do_not_apply_it(monkeypatch):
    """The PNG specification puts eXIf before the image data; Pillow also applies one after it (while decoding),
    browsers do not: a mask drawn on such a photo as a browser shows it was refused as "turned a quarter"."""
    exif = Image.Exif()
    exif[0x0112] = 6
    chunks = _png_chunks(encoded(Image.fromarray(photo_like(20, 36)), exif=exif.tobytes()))
    late = [c for c in chunks if c[0] != b"eXIf"]
    late.insert(-1, next(c for c in chunks if c[0] == b"eXIf"))  # just before IEND
    for decoded in decoded_both_ways(_png_from_chunks(late), monkeypatch):
        assert decoded.rgb.shape == (20, 36, 3)
    assert decode_image(_png_from_chunks(chunks), LIMITS).rgb.shape == (36, 20, 3), "one before the pixels is"


@pytest.mark.parametrize("cut", [1, 2, 13, 100])
def test_png_cut_short_at_its_end_decodes_as_pillow_decides(monkeypatch, cut):
    data = encoded(Image.fromarray(photo_like()))[:-cut]
    monkeypatch.setattr(imaging, "imagecodecs", None)
    try:
        expected = decode_image(data, LIMITS).rgb
    except InvalidImage:
        expected = None
    monkeypatch.undo()
    if expected is None:
        with pytest.raises(InvalidImage):
            decode_image(data, LIMITS)
    else:
        np.testing.assert_array_equal(decode_image(data, LIMITS).rgb, expected)


@pytest.mark.parametrize("cut", [0.3, 0.6, 0.9, 0.99])
def test_truncated_jpeg_is_refused_even_with_an_end_marker_in_its_header(cut):
    # libjpeg-turbo pads a cut-off scan with gray where Pillow refuses the file: the fast path must not accept it,
    # and an end-of-image marker inside a header segment (a comment here, an EXIF thumbnail in photos) is no end
    data = encoded(Image.fromarray(photo_like(96, 128)), "JPEG", quality=95, comment=b"\xff\xd9 not the end")
    with pytest.raises(InvalidImage, match="truncated"):
        decode_image(data[: int(len(data) * cut)], LIMITS)


def _jpeg_segment(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + (2 + len(payload)).to_bytes(2, "big") + payload


def _with_comment_before_second_scan(data: bytes, comment: bytes) -> tuple[bytes, int]:
    """A progressive JPEG with a comment segment inserted between its first two scans; where that scan starts."""
    first = data.index(b"\xff\xda")
    second = data.index(b"\xff\xda", first + 2)
    return data[:second] + _jpeg_segment(0xFE, comment) + data[second:], second + 4 + len(comment)


@pytest.mark.parametrize("cut", [0.2, 0.5, 0.9])
def test_truncated_progressive_jpeg_is_refused_with_an_end_marker_between_its_scans(cut):
    # a comment between scans may hold FF D9: libjpeg skips it by its length, so must the check for an end
    data = encoded(Image.fromarray(photo_like(96, 128)), "JPEG", quality=95, progressive=True)
    data, scan = _with_comment_before_second_scan(data, b"x\xff\xd9 not the end")
    assert decode_image(data, LIMITS).rgb.shape == (96, 128, 3)
    with pytest.raises(InvalidImage, match="truncated"):
        decode_image(data[: scan + int((len(data) - scan) * cut)], LIMITS)


def test_start_of_scan_bytes_inside_segments_are_not_counted_as_scans():
    # a photo's metadata may hold any bytes; only real scans cost a pass over the image
    pixels = photo_like(96, 128)
    data = encoded(Image.fromarray(pixels), "JPEG", quality=95, progressive=True)
    data, _ = _with_comment_before_second_scan(data, b"\xff\xda" * 200)
    data = data[:2] + _jpeg_segment(0xE1, b"XMP\0" + b"\xff\xda" * 300) + data[2:]
    assert decode_image(data, LIMITS).rgb.shape == (96, 128, 3)
    with pytest.raises(ImageTooLarge, match="scans"):
        decode_image(data, DecodeLimits(max_jpeg_scans=3))



def test_the_jpeg_marker_search_holds_the_gil_a_window_at_a_time(monkeypatch):
    # the regex runs in C without letting go of the GIL: a crafted run of 0xFF fill after a scan header (29 MB:
    # 670 ms in one call) stalled the event loop as long; each search must see at most one window
    window = 4096
    monkeypatch.setattr(imaging, "_JPEG_SEARCH_WINDOW", window)
    spans = []

    class Recorded:
        def search(self, data, start, end):
            spans.append(min(end, len(data)) - start)
            return marker.search(data, start, end)

    marker = imaging._JPEG_MARKER
    monkeypatch.setattr(imaging, "_JPEG_MARKER", Recorded())
    photo = encoded(Image.fromarray(photo_like(96, 128)), "JPEG", quality=95, progressive=True)
    sos = photo.index(b"\xff\xda")
    header_end = sos + 2 + int.from_bytes(photo[sos + 2 : sos + 4], "big")
    assert not imaging._check_structure(photo[:header_end] + b"\xff" * (1 << 20), LIMITS, "image")
    assert max(spans) <= window + 1 and len(spans) >= (1 << 20) // window
    spans.clear()
    assert imaging._check_structure(photo, LIMITS, "image"), "markers across a window's edge are still found"
    np.testing.assert_array_equal(decode_image(photo, LIMITS).rgb, np.asarray(Image.open(io.BytesIO(photo))))

@needs_imagecodecs
def test_a_file_imagecodecs_refuses_goes_to_pillow(monkeypatch):
    def refuse(data):
        raise RuntimeError("refused")

    monkeypatch.setattr(imaging.imagecodecs, "spng_decode", refuse)
    monkeypatch.setattr(imaging.imagecodecs, "jpeg8_decode", refuse)
    pixels = photo_like()
    np.testing.assert_array_equal(decode_image(encoded(Image.fromarray(pixels)), LIMITS).rgb, pixels)
    assert decode_image(encoded(Image.fromarray(pixels), "JPEG"), LIMITS).rgb.shape == pixels.shape


def _broken_pngs() -> dict[str, bytes]:
    rows = zlib.compress(b"".join(b"\0" + row.tobytes() for row in photo_like(16, 16)))
    header = (b"IHDR", struct.pack(">IIBBBBB", 16, 16, 8, 2, 0, 0, 0))
    good = _png_from_chunks([header, (b"IDAT", rows), (b"IEND", b"")])
    at = good.index(b"IDAT") + 4 + len(rows)
    return {
        "bad adler32": _png_from_chunks([header, (b"IDAT", rows[:-4] + bytes(4)), (b"IEND", b"")]),
        "bad IDAT CRC": good[:at] + bytes(4) + good[at + 4 :],
        "rows missing": _png_from_chunks([header, (b"IDAT", zlib.compress(bytes(100))), (b"IEND", b"")]),
    }


@needs_imagecodecs
@pytest.mark.parametrize("name", ["bad adler32", "bad IDAT CRC", "rows missing"])
def test_a_png_the_fast_decoder_refuses_leaks_nothing_and_pillow_decides(monkeypatch, name):
    """libpng's png_decode dropped a reference to None on each error: CPython 3.11 aborts at ~40,000 of them.
    (libspng refuses the first and last of these; the bad IDAT CRC it skips, decoding as Pillow does. From
    Python 3.12 None is immortal: its count cannot show a leak, so that part runs on 3.10-3.11 only.)"""
    data = _broken_pngs()[name]

    def outcome():
        try:
            return decode_image(data, LIMITS).rgb
        except InvalidImage:
            return None

    monkeypatch.setattr(imaging, "imagecodecs", None)
    expected = outcome()
    monkeypatch.undo()
    got = outcome()
    assert (got is None) == (expected is None)
    if expected is not None:
        np.testing.assert_array_equal(got, expected)
    if sys.version_info >= (3, 12):
        return
    gc.collect()
    before = sys.getrefcount(None)
    for _ in range(500):
        outcome()
    gc.collect()
    assert abs(sys.getrefcount(None) - before) < 100


@needs_imagecodecs
@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_size_guard_runs_before_any_pixel_is_decoded(monkeypatch, fmt):
    def must_not_run(data):
        raise AssertionError("decoded past the size guard")

    monkeypatch.setattr(imaging.imagecodecs, "spng_decode", must_not_run)
    monkeypatch.setattr(imaging.imagecodecs, "jpeg8_decode", must_not_run)
    data = encoded(Image.new("RGB", (101, 100)), fmt)
    with pytest.raises(ImageTooLarge):
        decode_image(data, DecodeLimits(max_megapixels=0.01))
    with pytest.raises(ImageTooLarge):
        decode_mask(data, (100, 101), DecodeLimits(max_megapixels=0.01))


@pytest.mark.parametrize("use_imagecodecs", [True, False], ids=["imagecodecs", "pillow"])
def test_mask_luminance_is_the_integer_rec601_threshold(monkeypatch, use_imagecodecs):
    # every colour whose luma is within one of the threshold, plus random ones
    rng = np.random.default_rng(12)
    colours = rng.integers(0, 256, (4000, 3))
    luma = colours @ np.array([299, 587, 114])
    colours = np.concatenate([colours[np.abs(luma - 127_000) < 1500], rng.integers(0, 256, (400, 3))])
    rgb = colours.astype(np.uint8).reshape(1, -1, 3)
    if not use_imagecodecs:
        monkeypatch.setattr(imaging, "imagecodecs", None)
    expected = (rgb.astype(np.int64) @ np.array([299, 587, 114])) > 127_000
    np.testing.assert_array_equal(decode_mask(encoded(Image.fromarray(rgb)), rgb.shape[:2], LIMITS), expected)
    opaque = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])  # alpha that carries nothing: luminance
    np.testing.assert_array_equal(decode_mask(encoded(Image.fromarray(opaque)), rgb.shape[:2], LIMITS), expected)


def test_mask_luminance_threshold_over_many_rows_matches_the_formula():
    rgb = np.random.default_rng(13).integers(0, 256, (203, 7, 3), dtype=np.uint8)  # not a multiple of the band
    expected = (rgb.astype(np.int64) @ np.array([299, 587, 114])) > 127_000
    np.testing.assert_array_equal(imaging._luminance_above_127(rgb), expected)


@pytest.mark.parametrize("use_imagecodecs", [True, False], ids=["imagecodecs", "pillow"])
def test_gray_alpha_mask_uses_alpha_and_gray_mask_uses_value(monkeypatch, use_imagecodecs):
    if not use_imagecodecs:
        monkeypatch.setattr(imaging, "imagecodecs", None)
    gray = np.tile(np.arange(256, dtype=np.uint8), (3, 1))
    np.testing.assert_array_equal(decode_mask(encoded(Image.fromarray(gray)), (3, 256), LIMITS), gray > 127)
    alpha = gray[:, ::-1].copy()
    la = Image.merge("LA", [Image.fromarray(np.zeros_like(gray)), Image.fromarray(alpha)])
    np.testing.assert_array_equal(decode_mask(encoded(la), (3, 256), LIMITS), alpha > 127)


@pytest.mark.parametrize("pixels", [1, 2, 3, 7, 20, 33, 64])
def test_dilation_equals_scipy_binary_dilation_with_a_square(pixels):
    rng = np.random.default_rng(pixels)
    for density in (0.0005, 0.01, 0.2):
        mask = rng.random((int(rng.integers(1, 150)), int(rng.integers(1, 150)))) < density
        mask[0, -1] = True  # touching a corner
        # a (2p+1)-square is p steps of the 3x3 square: the same set, at a cost that does not grow with p^2
        reference = ndimage.binary_dilation(mask, structure=np.ones((3, 3), bool), iterations=pixels)
        np.testing.assert_array_equal(dilate_mask(mask, pixels), reference)


@pytest.mark.parametrize("feather", [2, 6, 11, 12, 16])
def test_feather_band_equals_the_distance_transform_weights(feather):
    """The shifted-minimum band (feathers up to 16; uint8 sums up to 11, uint16 above) against the EDT tiles."""
    seeds = np.random.default_rng(feather).random((300, 280)) > 0.999
    mask = dilate_mask(seeds, 12)
    mask[:, :30] = True  # touching the window's edge
    box = imaging._bounding_box(mask)
    rows, cols = slice(box[0], box[1]), slice(box[2], box[3])
    weight = imaging._feather_weight(mask, feather, rows, cols)
    band, band_weight = imaging._feather_band(mask, feather, rows, cols)
    expected = np.flatnonzero((weight > 0) & (weight < 1))
    np.testing.assert_array_equal(band, expected)
    np.testing.assert_array_equal(band_weight, weight.ravel()[expected])


def test_paste_back_of_a_strided_model_output_equals_a_contiguous_one():
    rgb, mask = noise(600, 800, seed=3), dilate_mask(blob_mask(600, 800, 250, 350, 60), 4)
    plan = plan_crop(mask, (512,), 32)
    planar = np.ascontiguousarray(noise(plan.bucket, plan.bucket, seed=8).transpose(2, 0, 1))
    strided = planar.transpose(1, 2, 0)  # how a CHW tensor looks once made HWC: not one pixel per 3 bytes
    assert not strided.flags.c_contiguous
    np.testing.assert_array_equal(
        paste_back(rgb, mask, strided, plan, 6), paste_back(rgb, mask, np.ascontiguousarray(strided), plan, 6)
    )


@pytest.mark.parametrize("alpha", [False, True])
def test_png_output_is_lossless_for_an_independent_decoder(alpha):
    rgb = photo_like(300, 400)
    plane = np.random.default_rng(14).integers(0, 256, (300, 400), dtype=np.uint8) if alpha else None
    with Image.open(io.BytesIO(encode_image(rgb, plane, "png"))) as image:
        assert image.format == "PNG" and image.mode == ("RGBA" if alpha else "RGB")
        pixels = np.asarray(image)
    np.testing.assert_array_equal(pixels[..., :3], rgb)
    if alpha:
        np.testing.assert_array_equal(pixels[..., 3], plane)


@needs_imagecodecs
def test_a_noisy_one_pixel_wide_strip_is_written_as_png_losslessly():
    """imagecodecs' PNG encoder sizes its output too small for incompressible 3-byte rows (5000 x 1 noisy RGB):
    its PngError was a 500 for an image every limit allows; Pillow writes such an image instead."""
    rgb = np.random.default_rng(15).integers(0, 256, (5000, 1, 3), dtype=np.uint8)
    with Image.open(io.BytesIO(encode_image(rgb, None, "png"))) as image:
        np.testing.assert_array_equal(np.asarray(image), rgb)


@needs_imagecodecs
def test_png_output_size_stays_close_to_pillows(monkeypatch):
    rgb = np.asarray(Image.fromarray(photo_like(300, 400)).resize((800, 600), Image.Resampling.BICUBIC))
    fast = len(encode_image(rgb, None, "png"))
    monkeypatch.setattr(imaging, "imagecodecs", None)
    pillow = len(encode_image(rgb, None, "png"))
    assert fast < 1.1 * pillow


@pytest.mark.parametrize("quality", [30, 95])
def test_jpeg_output_decodes_to_pillows_own_encoding(monkeypatch, quality):
    rgb = photo_like(120, 160)
    body = encode_image(rgb, np.zeros((120, 160), np.uint8), "jpeg", quality)
    with Image.open(io.BytesIO(body)) as image:
        assert image.format == "JPEG" and image.mode == "RGB" and image.size == (160, 120)
        pixels = np.asarray(image)
    monkeypatch.setattr(imaging, "imagecodecs", None)
    with Image.open(io.BytesIO(encode_image(rgb, None, "jpeg", quality))) as image:
        np.testing.assert_array_equal(pixels, np.asarray(image))


def _rgb_profile(size: int = 0) -> bytes:
    """A real sRGB profile, padded to `size` bytes (the bytes are given back as they came, so padding is fine)."""
    from PIL import ImageCms

    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    return profile + b"\0" * max(0, size - len(profile))


@pytest.mark.parametrize("use_imagecodecs", [True, False], ids=["imagecodecs", "pillow"])
@pytest.mark.parametrize("size", [0, 200_000], ids=["small", "over-one-jpeg-segment"])
@pytest.mark.parametrize("source", ["PNG", "JPEG"])
@pytest.mark.parametrize("output", ["png", "jpeg", "webp"])
def test_an_rgb_colour_profile_comes_back_with_the_result(monkeypatch, use_imagecodecs, size, source, output):
    # a Display P3 or Adobe RGB photo given back untagged would look washed out or shifted in any colour-managed view
    if not use_imagecodecs:
        monkeypatch.setattr(imaging, "imagecodecs", None)
    profile = _rgb_profile(size)
    pixels = photo_like(40, 56)
    decoded = decode_image(encoded(Image.fromarray(pixels), source, icc_profile=profile), LIMITS)
    assert decoded.icc_profile == profile
    result = encode_image(decoded.rgb, decoded.alpha, output, icc_profile=decoded.icc_profile)
    with Image.open(io.BytesIO(result)) as reopened:
        assert reopened.info.get("icc_profile") == profile
        if output == "png":
            np.testing.assert_array_equal(np.asarray(reopened), decoded.rgb)
    assert decode_image(result, LIMITS).icc_profile == profile


def _tiff_with_icc_tag(kind: int, count: int, value: int) -> bytes:
    """A 1x1 8-bit gray TIFF whose ICC profile tag (34675) has the given type, count and inline value."""
    tags = [(256, 3, 1, 1), (257, 3, 1, 1), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1), (273, 4, 1, 0),
            (277, 3, 1, 1), (278, 3, 1, 1), (279, 4, 1, 1), (34675, kind, count, value)]  # fmt: skip
    pixel_at = 8 + 2 + 12 * len(tags) + 4
    entries = b"".join(
        struct.pack("<HHIHH", tag, k, n, v, 0) if k == 3 and n == 1 else struct.pack("<HHII", tag, k, n, v)
        for tag, k, n, v in ((tag, k, n, pixel_at if tag == 273 else v) for tag, k, n, v in tags)
    )
    return b"II*\x00" + struct.pack("<IH", 8, len(tags)) + entries + bytes(4) + b"\x80" + bytes(64)


@pytest.mark.parametrize(
    ("kind", "count", "value"),
    [(3, 1, 5), (4, 1, 7), (3, 2, 0x00050006), (5, 1, 8), (11, 1, 0x3F800000), (2, 3, 0x00414141)],
    ids=["SHORT", "LONG", "2 SHORTs", "RATIONAL", "FLOAT", "ASCII"],
)
def test_a_tiff_icc_tag_that_is_no_profile_is_ignored(kind, count, value):
    # Pillow gives such a tag as an int, float or IFDRational: its len() was a TypeError outside the decode's try (500)
    decoded = decode_image(_tiff_with_icc_tag(kind, count, value), LIMITS)
    assert decoded.icc_profile is None
    np.testing.assert_array_equal(decoded.rgb, [[[128, 128, 128]]])


def test_a_profile_of_another_colour_space_is_not_given_to_the_rgb_result():
    gray_profile = _rgb_profile()[:16] + b"GRAY" + _rgb_profile()[20:]
    cmyk_profile = _rgb_profile()[:16] + b"CMYK" + _rgb_profile()[20:]
    gray = decode_image(encoded(Image.fromarray(photo_like()[..., 0]), "PNG", icc_profile=gray_profile), LIMITS)
    cmyk = decode_image(encoded(Image.new("CMYK", (64, 48), (0, 80, 160, 0)), "JPEG", icc_profile=cmyk_profile), LIMITS)
    assert (gray.rgb.ndim, cmyk.rgb.ndim) == (3, 3)
    assert gray.icc_profile is None and cmyk.icc_profile is None
    assert decode_image(encoded(Image.fromarray(photo_like())), LIMITS).icc_profile is None
    for output in ("png", "jpeg"):
        with Image.open(io.BytesIO(encode_image(photo_like(), None, output))) as untagged:
            assert "icc_profile" not in untagged.info


def test_a_lossless_webp_result_is_encoded_at_most_at_effort_50_whatever_the_quality_asked():
    """A lossless WebP reads `quality` as effort: 95 (the default) cost ~3x the CPU of 50 for the same bytes, and a
    46 KB upload of 40 MP asked at 100 took ~35 s to encode (loadtests/bench_webp_effort.py)."""
    import io

    from skimage.data import astronaut

    from engines.imaging import LOSSLESS_WEBP_MAX_EFFORT

    rgb = np.asarray(Image.fromarray(astronaut()).resize((128, 128)))
    capped = encode_image(rgb, None, "webp", quality=LOSSLESS_WEBP_MAX_EFFORT, webp_lossless=True)
    assert encode_image(rgb, None, "webp", quality=100, webp_lossless=True) == capped
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(capped)).convert("RGB")), rgb), "still lossless"
    lossy = encode_image(rgb, None, "webp", quality=100), encode_image(rgb, None, "webp", quality=50)
    assert lossy[0] != lossy[1], "a lossy WebP takes the quality as asked"


def test_a_jpeg_of_a_kind_pillow_does_not_decode_is_not_called_an_unknown_format():
    """A 12-bit JPEG was "not a recognised image (accepted formats: png, jpeg, ...)": a JPEG told it is no JPEG."""
    import io

    buffer = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buffer, "JPEG")
    data = buffer.getvalue()
    frame = data.index(b"\xff\xc0")
    twelve_bit = data[: frame + 4] + bytes([12]) + data[frame + 5 :]
    with pytest.raises(InvalidImage, match=r"is a JPEG file this service cannot decode: damaged, or of a kind it does "
                       r"not read \(a 12-bit JPEG, say\)"):  # fmt: skip
        decode_image(twelve_bit, DecodeLimits())
    with pytest.raises(InvalidImage, match="is not a recognised image"):
        decode_image(b"hello, not an image", DecodeLimits())
    # a damaged PNG was told it might be "a 12-bit JPEG" (an adversarial trial)
    with pytest.raises(InvalidImage) as caught:
        decode_image(b"\x89PNG\r\n\x1a\n" + bytes(40), DecodeLimits())
    assert "is a PNG file this service cannot decode: damaged, or of a kind it does not read; send" in str(caught.value)
