"""Properties of engines.imaging over random images, masks, buckets and margins (hypothesis).

The model only ever sees plan_crop's window and only what paste_back writes comes back, so these are the
guarantees the service's "every pixel outside the mask is bit-identical" rests on.
"""

import io

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from scipy import ndimage

import engines.imaging as imaging
from engines.imaging import (
    MAX_BUCKET_DOWNSCALE,
    DecodeLimits,
    crop_for_model,
    decode_image,
    dilate_mask,
    encode_image,
    paste_back,
    plan_crop,
)

LIMITS = DecodeLimits()
FAST = settings(max_examples=60, deadline=None)


@st.composite
def masks(draw, max_side: int = 160, allow_empty: bool = False) -> np.ndarray:
    """A bool mask: a few rectangles (touching the borders too), or scattered pixels, or both."""
    height, width = draw(st.integers(1, max_side)), draw(st.integers(1, max_side))
    mask = np.zeros((height, width), bool)
    for _ in range(draw(st.integers(0 if allow_empty else 1, 3))):
        top, left = draw(st.integers(0, height - 1)), draw(st.integers(0, width - 1))
        mask[top : top + draw(st.integers(1, height)), left : left + draw(st.integers(1, width))] = True
    if draw(st.booleans()):
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        mask |= rng.random((height, width)) < draw(st.sampled_from([0.001, 0.01, 0.1]))
    return mask


buckets = st.lists(st.sampled_from([64, 128, 192, 256]), min_size=1, max_size=3, unique=True)
margins = st.integers(0, 80)
dilations = st.integers(0, 12)


def noise(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def bounding_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.nonzero(mask)
    return rows.min(), rows.max() + 1, cols.min(), cols.max() + 1


# --- dilate_mask --------------------------------------------------------------------------------


@FAST
@given(masks(allow_empty=True), dilations)
def test_dilation_contains_the_mask_and_grows_by_exactly_a_square(mask, pixels):
    dilated = dilate_mask(mask, pixels)
    assert dilated.shape == mask.shape and dilated.dtype == np.bool_
    assert not (mask & ~dilated).any(), "the dilated mask must contain the input"
    reference = ndimage.binary_dilation(mask, np.ones((2 * pixels + 1,) * 2, bool)) if pixels else mask
    np.testing.assert_array_equal(dilated, reference)


@FAST
@given(masks(allow_empty=True), dilations, dilations)
def test_dilation_is_monotone_in_pixels(mask, a, b):
    small, large = dilate_mask(mask, min(a, b)), dilate_mask(mask, max(a, b))
    assert not (small & ~large).any()


@FAST
@given(masks(allow_empty=True))
def test_zero_dilation_is_an_identical_copy(mask):
    dilated = dilate_mask(mask, 0)
    np.testing.assert_array_equal(dilated, mask)
    assert not np.shares_memory(dilated, mask)


# --- plan_crop ----------------------------------------------------------------------------------


@FAST
@given(masks(allow_empty=True), dilations, buckets, margins)
def test_plan_covers_the_dilated_mask_with_a_bucket_window(mask, pixels, sides, margin):
    dilated = dilate_mask(mask, pixels)
    plan = plan_crop(dilated, sides, margin)
    if not dilated.any():
        assert plan is None
        return
    height, width = dilated.shape
    top, bottom, left, right = bounding_box(dilated)
    need = min(max(bottom - top, right - left) + 2 * margin, max(height, width))
    # the smallest bucket that holds the region and its margin (never more than the image), else the largest;
    # where that bucket is larger than the image, the next smaller one if the window nearly fits it
    holding = min((b for b in sides if b >= need), default=max(sides))
    smaller = max((b for b in sides if b < holding), default=None)
    nearly = smaller is not None and holding > max(height, width) and need <= smaller * MAX_BUCKET_DOWNSCALE
    assert plan.bucket == (smaller if nearly else holding)
    # a bucket-sized window, except on images smaller than it and regions larger than every bucket
    assert plan.side == min(max(need, plan.bucket), max(height, width))
    assert plan.top <= top and bottom <= plan.top + plan.side
    assert plan.left <= left and right <= plan.left + plan.side
    for start, extent in ((plan.top, height), (plan.left, width)):
        if plan.side <= extent:
            assert 0 <= start and start + plan.side <= extent, "a window that fits lies inside the image"
        else:
            assert start == (extent - plan.side) // 2, "a window larger than the image is centred on it"


# --- crop_for_model / paste_back ----------------------------------------------------------------


@FAST
@given(masks(), dilations, buckets, margins, st.integers(0, 2**32 - 1))
def test_crop_is_bucket_sized_and_keeps_the_mask(mask, pixels, sides, margin, seed):
    mask = dilate_mask(mask, pixels)
    rgb = noise((*mask.shape, 3), seed)
    plan = plan_crop(mask, sides, margin)
    crop, crop_mask = crop_for_model(rgb, mask, plan)
    assert crop.shape == (plan.bucket, plan.bucket, 3) and crop.dtype == np.uint8 and crop.flags.c_contiguous
    assert crop_mask.shape == (plan.bucket, plan.bucket) and crop_mask.dtype == np.bool_
    assert crop_mask.any(), "no stroke may vanish from what the model is asked to repaint"
    if plan.side == plan.bucket and plan.top >= 0 and plan.left >= 0:
        window = np.s_[plan.top : plan.top + plan.side, plan.left : plan.left + plan.side]
        np.testing.assert_array_equal(crop, rgb[window])
        np.testing.assert_array_equal(crop_mask, mask[window])


@FAST
@given(masks(), dilations, buckets, margins, st.integers(0, 6), st.integers(0, 2**32 - 1), st.sampled_from([0, 255]))
def test_paste_back_changes_only_masked_pixels(mask, pixels, sides, margin, feather, seed, colour):
    mask = dilate_mask(mask, pixels)
    rgb = noise((*mask.shape, 3), seed)
    before = rgb.copy()
    plan = plan_crop(mask, sides, margin)
    result = np.full((plan.bucket, plan.bucket, 3), colour, np.uint8)

    out = paste_back(rgb, mask, result, plan, feather)

    np.testing.assert_array_equal(rgb, before)
    assert out.shape == rgb.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out[~mask], rgb[~mask])
    # inside, every pixel moves towards the model's colour, never away (resampling may be off by one)
    distance_before = np.abs(rgb[mask].astype(int) - colour)
    distance_after = np.abs(out[mask].astype(int) - colour)
    assert (distance_after <= distance_before + 1).all()
    if feather == 0:
        assert (distance_after <= 1).all(), "without feathering the masked pixels are the model's"


# --- encode / decode ----------------------------------------------------------------------------


@FAST
@given(st.integers(1, 48), st.integers(1, 48), st.booleans(), st.integers(0, 2**32 - 1))
def test_png_round_trip_is_exact(height, width, with_alpha, seed):
    rgb = noise((height, width, 3), seed)
    alpha = noise((height, width), seed + 1) if with_alpha else None
    if alpha is not None:
        alpha[0, 0] = 0  # an alpha plane that carries something (a fully opaque one is dropped on decoding)
    decoded = decode_image(encode_image(rgb, alpha, "png"), LIMITS)
    assert decoded.format == "png"
    np.testing.assert_array_equal(decoded.rgb, rgb)
    if alpha is None:
        assert decoded.alpha is None
    else:
        np.testing.assert_array_equal(decoded.alpha, alpha)


@FAST
@given(st.integers(1, 64), st.integers(1, 64), st.sampled_from(["jpeg", "webp"]), st.integers(1, 100))
def test_lossy_formats_keep_the_size(height, width, fmt, quality):
    decoded = decode_image(encode_image(noise((height, width, 3), height * width), None, fmt, quality), LIMITS)
    assert decoded.format == fmt and decoded.rgb.shape == (height, width, 3)


@FAST
@given(masks(), dilations, buckets, margins, st.integers(0, 20), st.integers(0, 2**32 - 1))
def test_paste_back_blends_by_the_exact_distance_to_the_mask_edge(mask, pixels, sides, margin, feather, seed):
    """The feathered paste equals its definition: weight min(EDT / feather, 1) over the window, blended in float32."""
    mask = dilate_mask(mask, pixels)
    rgb = noise((*mask.shape, 3), seed)
    plan = plan_crop(mask, sides, margin)
    result = noise((plan.bucket, plan.bucket, 3), seed + 1)
    hard = paste_back(rgb, mask, result, plan, 0)  # the model's pixels on the whole mask, the input elsewhere

    out = paste_back(rgb, mask, result, plan, feather)

    height, width = mask.shape
    y0, y1 = max(plan.top, 0), min(plan.top + plan.side, height)
    x0, x1 = max(plan.left, 0), min(plan.left + plan.side, width)
    window = mask[y0:y1, x0:x1]
    weight = mask.astype(np.float32)
    if feather and not window.all():
        weight[y0:y1, x0:x1] = np.minimum(ndimage.distance_transform_edt(window) / feather, 1.0)
    band = (weight > 0) & (weight < 1)
    expected = hard.copy()
    band_weight = weight[band][:, None]
    blended = np.rint(rgb[band] * (1.0 - band_weight) + hard[band] * band_weight)
    expected[band] = np.clip(blended, 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(out, expected)


@FAST
@given(masks(allow_empty=True), st.integers(13, 48))
def test_wide_dilation_is_a_square_too(mask, pixels):
    """Against scipy's maximum filter (separable, so a wide square costs what a narrow one does; the narrow
    cases are checked against binary_dilation in tests/test_imaging.py): outside the image counts as unmasked."""
    reference = ndimage.maximum_filter(mask, size=2 * pixels + 1, mode="constant", cval=False)
    np.testing.assert_array_equal(dilate_mask(mask, pixels), reference)


@FAST
@given(
    st.integers(1, 40),
    st.integers(1, 40),
    st.sampled_from(["RGB", "RGBA", "L", "LA"]),
    st.sampled_from([("PNG", {}), ("JPEG", {"quality": 95}), ("JPEG", {"quality": 60, "subsampling": 0})]),
    st.integers(0, 2**32 - 1),
)
def test_fast_decoding_equals_pillows(height, width, mode, fmt_params, seed):
    fmt, params = fmt_params
    if fmt == "JPEG" and mode in ("RGBA", "LA"):
        mode = mode[:-1]
    image = Image.fromarray(noise((height, width, 4), seed)).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    fast = decode_image(buffer.getvalue(), LIMITS)
    codecs, imaging.imagecodecs = imaging.imagecodecs, None
    try:
        slow = decode_image(buffer.getvalue(), LIMITS)
    finally:
        imaging.imagecodecs = codecs
    np.testing.assert_array_equal(fast.rgb, slow.rgb)
    assert (fast.alpha is None) == (slow.alpha is None)
    if slow.alpha is not None:
        np.testing.assert_array_equal(fast.alpha, slow.alpha)
