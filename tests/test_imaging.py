"""Behaviour of engines.imaging: what clients can send, what the model sees, what comes back."""

import io
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from engines.errors import (
    ImageTooLarge,
    InputError,
    InvalidImage,
    InvalidMask,
    MaskSizeMismatch,
    UnsupportedOutputFormat,
)
from engines.imaging import (
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
)

LIMITS = DecodeLimits()


def encoded(image: Image.Image, fmt: str = "PNG", **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def noise(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def png_declaring_size(width: int, height: int) -> bytes:
    """A real 1x1 PNG whose IHDR claims another size (valid CRC): a decompression bomb in a few bytes."""
    data = bytearray(encoded(Image.new("L", (1, 1))))
    ihdr_start = 8 + 4  # signature, chunk length
    data[ihdr_start + 4 : ihdr_start + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr_start : ihdr_start + 4 + 13]))
    data[ihdr_start + 17 : ihdr_start + 21] = struct.pack(">I", crc)
    return bytes(data)


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
    max_pixels_before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageTooLarge):
        decode_image(png_declaring_size(side, side), DecodeLimits(max_megapixels=1000))
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


def test_undecodable_mask_is_an_invalid_mask():
    with pytest.raises(InvalidMask):
        decode_mask(b"not an image", (10, 10), LIMITS)
    with pytest.raises(ImageTooLarge):
        decode_mask(png_declaring_size(20000, 20000), (20000, 20000), LIMITS)


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


def test_dilation_of_large_image_is_fast():
    mask = np.zeros((3000, 4000), bool)
    mask[1000:1400, 2000:2600] = True
    started = time.perf_counter()
    dilated = dilate_mask(mask, 40)
    assert time.perf_counter() - started < 0.5
    assert dilated[960:1440, 1960:2640].all() and dilated.sum() == 480 * 680


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
    assert not crop_mask[:106].any() and not crop_mask[406:].any()
    np.testing.assert_array_equal(crop_mask[106:406], mask)


def test_thin_image_overhang_falls_back_to_edge_padding():
    rgb, mask = noise(20, 600), blob_mask(20, 600, 5, 300, 8)
    plan = plan_crop(mask, (512,), 8)
    crop, crop_mask = crop_for_model(rgb, mask, plan)
    assert crop.shape == (512, 512, 3) and crop_mask.shape == (512, 512)


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


def test_unknown_output_format_is_refused_with_alternatives():
    with pytest.raises(UnsupportedOutputFormat, match="png, jpeg, webp"):
        encode_image(noise(4, 4), None, "bmp")


def test_webp_beyond_its_size_limit_is_refused():
    with pytest.raises(ImageTooLarge, match="webp"):
        encode_image(np.zeros((10, 16384, 3), np.uint8), None, "webp")
