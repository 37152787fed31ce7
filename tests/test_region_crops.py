"""engines.regions: one crop per far-apart mask region, pasted back without touching anything else."""

import io

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from engines.imaging import MAX_BUCKET_DOWNSCALE, CropPlan, crop_for_model, dilate_mask, paste_back, plan_crop
from engines.regions import _region_boxes, _separated_blocks, paste_back_regions, plan_region_crops

BUCKETS = (512, 1024)
MARGIN = 128


def squares(shape: tuple[int, int], *corners: tuple[int, int], size: int = 120) -> np.ndarray:
    mask = np.zeros(shape, bool)
    for top, left in corners:
        mask[top : top + size, left : left + size] = True
    return mask


def noise(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def constant_results(plans: list[CropPlan]) -> list[np.ndarray]:
    """A distinct flat colour per crop, so every repainted pixel tells which crop it came from."""
    return [np.full((plan.bucket, plan.bucket, 3), 10 + 40 * i, np.uint8) for i, plan in enumerate(plans)]


def contains(plan: CropPlan, mask: np.ndarray) -> bool:
    rows, cols = np.nonzero(mask)
    return (
        plan.top <= rows.min() and rows.max() < plan.top + plan.side
        and plan.left <= cols.min() and cols.max() < plan.left + plan.side
    )  # fmt: skip


def overlap(a: CropPlan, b: CropPlan) -> bool:
    return a.top < b.top + b.side and b.top < a.top + a.side and a.left < b.left + b.side and b.left < a.left + a.side


def window_of(plan: CropPlan, shape: tuple[int, int]) -> np.ndarray:
    window = np.zeros(shape, bool)
    window[max(plan.top, 0) : plan.top + plan.side, max(plan.left, 0) : plan.left + plan.side] = True
    return window


def assert_windows_hold_their_regions(mask: np.ndarray, plans: list[CropPlan], buckets, margin: int) -> None:
    """No two windows overlap; each runs at plan_crop's resolution for the regions it holds, with their box plus
    `margin` of context (cut at the image's edges) and, where it fits, inside the image; together they hold the
    mask."""
    assert all(not overlap(a, b) for i, a in enumerate(plans) for b in plans[i + 1 :])
    height, width = mask.shape
    covered = np.zeros_like(mask)
    for plan in plans:
        window = window_of(plan, mask.shape)
        alone = plan_crop(mask & window, buckets, margin)
        assert (plan.side, plan.bucket) == (alone.side, alone.bucket), "plan_crop's resolution for its regions"
        rows, cols = np.nonzero(mask & window)
        for start, lo, hi, extent in ((plan.top, rows.min(), rows.max() + 1, height),
                                      (plan.left, cols.min(), cols.max() + 1, width)):  # fmt: skip
            assert start <= max(lo - margin, 0) and min(hi + margin, extent) <= start + plan.side, "the margin"
            assert plan.side > extent or 0 <= start <= extent - plan.side, "inside the image"
        covered |= window
    assert not (mask & ~covered).any()


def scale_of(plan: CropPlan) -> float:
    """Model pixels per photo pixel for what the plan's window holds (upscaling counts as 1)."""
    return min(plan.bucket, plan.side) / plan.side


def scales(mask: np.ndarray, plans: list[CropPlan], objects: list[tuple[int, int]]) -> list[float]:
    """The scale each object (a top-left corner in the mask) is processed at."""
    return [scale_of(next(p for p in plans if window_of(p, mask.shape)[corner])) for corner in objects]


# --- plan_region_crops --------------------------------------------------------------------------


def test_far_apart_small_regions_get_their_own_native_crops_at_the_smallest_bucket():
    mask = dilate_mask(squares((3000, 4000), (200, 200), (2680, 3680)), 20)
    assert plan_crop(mask, BUCKETS, MARGIN).side > 1024, "one box would be downscaled"
    plans = plan_region_crops(mask, BUCKETS, MARGIN)
    assert len(plans) == 2
    assert all(plan.bucket == 512 and plan.side == plan.bucket for plan in plans)
    assert [(p.top, p.left) for p in plans] == sorted((p.top, p.left) for p in plans)
    top_left, bottom_right = np.zeros_like(mask), np.zeros_like(mask)
    top_left[:1500], bottom_right[1500:] = mask[:1500], mask[1500:]
    assert contains(plans[0], top_left) and contains(plans[1], bottom_right)


def test_close_regions_share_one_crop():
    mask = squares((3000, 4000), (1000, 1000), (1000, 1200))  # 80 px apart: the windows overlap
    assert plan_region_crops(mask, BUCKETS, MARGIN) == [plan_crop(mask, BUCKETS, MARGIN)]


def test_regions_that_fit_one_native_window_of_the_same_bucket_share_it():
    # 300 px apart with no margin: the windows do not overlap but their union (420 px) fits one 512 window
    mask = squares((3000, 4000), (1000, 1000), (1000, 1300))
    plans = plan_region_crops(mask, BUCKETS, 0)
    assert plans == [plan_crop(mask, BUCKETS, 0)] and plans[0].bucket == 512


def test_two_small_crops_are_not_merged_into_a_larger_bucket():
    # each fits 512 alone; together they would need a 1024 crop: twice the pixels of two 512 crops
    mask = squares((3000, 4000), (1000, 1000), (1000, 1600))
    plans = plan_region_crops(mask, BUCKETS, MARGIN)
    assert [plan.bucket for plan in plans] == [512, 512]
    assert plan_crop(mask, BUCKETS, MARGIN).bucket == 1024


def test_regions_on_a_small_photo_share_a_slightly_downscaled_512_crop_not_an_upscaled_1024_one():
    """An 800x600 photo with two close objects: their shared window (546 px) went to the 1024 bucket, the photo's
    800 px side upscaled 1.28x, 4x the model pixels of a 512 crop (a review)."""
    mask = dilate_mask(squares((600, 800), (100, 100), (100, 300), size=50), 20)
    assert [(plan.side, plan.bucket) for plan in plan_region_crops(mask, BUCKETS, MARGIN)] == [(546, 512)]


def test_merging_cascades_until_no_windows_overlap():
    # a chain of regions, each 180 px from the next: neighbours' windows overlap wherever they slide (each 512
    # window holds its 120 px region plus 128 px a side: it can move 136 px), the ends' do not
    mask = squares((3000, 4000), *[(1400, 200 + 300 * i) for i in range(6)])
    plans = plan_region_crops(mask, BUCKETS, MARGIN, max_crops=64)
    assert plans == [plan_crop(mask, BUCKETS, MARGIN)]


def test_a_grown_window_is_checked_again_against_regions_already_passed():
    mask = np.zeros((2000, 2000), bool)
    for top, bottom, left, right in [
        (170, 261, 1162, 1186), (550, 631, 480, 490), (561, 620, 980, 998),
        (612, 628, 1709, 1728), (1471, 1491, 1301, 1371), (1884, 1975, 1115, 1164),
    ]:  # fmt: skip
        mask[top:bottom, left:right] = True
    plans = plan_region_crops(mask, BUCKETS, 64)
    assert_windows_hold_their_regions(mask, plans, BUCKETS, 64)


def test_a_fifth_object_merges_two_objects_not_all_five_into_one_downscaled_window():
    """A review: with a Scorer and the default max_model_calls 8, a request gets 4 crops; a fifth far-apart
    60 px object on a 12 MP photo made the whole request one 3656 px window in the 1024 bucket (0.28 model px
    per photo px for every object). Now the pair whose shared window is downscaled least shares one."""
    from engines.gate import max_crops
    from engines.pipeline import CropSettings, RemovalPipeline
    from engines.imaging import DecodeLimits

    pipeline = RemovalPipeline(None, CropSettings(BUCKETS, MARGIN, 20, 6), DecodeLimits())
    spots = [(300, 300), (300, 3600), (2600, 300), (2600, 3600), (1500, 2000)]
    four_ = squares((3000, 4000), *spots[:4], size=60)
    five = squares((3000, 4000), *spots, size=60)
    _, plans = pipeline.plan(four_, 20, max_crops(8, scored=True))
    assert scales(four_, plans, spots[:4]) == [1.0] * 4
    dilated, plans = pipeline.plan(five, 20, max_crops(8, scored=True))
    assert len(plans) == 4
    per_object = sorted(scales(five, plans, spots))
    assert per_object[2:] == [1.0] * 3, "three objects keep native resolution"
    assert per_object[:2] == pytest.approx([1024 / 1956] * 2), "the centre object and one corner share a window"
    assert_windows_hold_their_regions(dilated, plans, BUCKETS, MARGIN)


def test_overlapping_centred_windows_slide_apart_when_that_keeps_each_objects_margin():
    """A review: two 400 px objects 300 px apart on a 3000 px photo went into one 1356 px window downscaled to
    1024 (0.755 model px per photo px), although two disjoint 1024 windows each hold one object plus its 128 px
    margin ([504, 1528) and [1528, 2552) along x, say)."""
    objects = [(1000, 1000), (1000, 1700)]
    mask = squares((3000, 3000), *objects, size=400)
    plans = plan_region_crops(mask, BUCKETS, MARGIN)
    assert scales(mask, plans, objects) == [1.0, 1.0]
    assert [(plan.side, plan.bucket) for plan in plans] == [(1024, 1024)] * 2
    assert_windows_hold_their_regions(mask, plans, BUCKETS, MARGIN)
    assert plan_region_crops(mask, BUCKETS, MARGIN) == plans, "deterministic"
    # 180 px apart: no placement holds both with their margin; one shared window
    close = squares((3000, 3000), (1000, 1000), (1000, 1580), size=400)
    assert plan_region_crops(close, BUCKETS, MARGIN) == [plan_crop(close, BUCKETS, MARGIN)]


def test_a_chain_too_long_for_one_native_window_keeps_its_last_object_native():
    # each 260 px from the next: neighbours' windows slide apart only at the chain's end
    objects = [(1400, 200 + 380 * i) for i in range(6)]
    mask = squares((3000, 4000), *objects)
    plans = plan_region_crops(mask, BUCKETS, MARGIN, max_crops=64)
    assert scale_of(plan_crop(mask, BUCKETS, MARGIN)) == pytest.approx(1024 / 2276)
    assert scales(mask, plans, objects) == pytest.approx([1024 / 1896] * 5 + [1.0])
    assert_windows_hold_their_regions(mask, plans, BUCKETS, MARGIN)


def test_a_single_region_gets_exactly_plan_crops_plan():
    mask = np.zeros((900, 1300), bool)
    mask[100:400, 50:70] = True
    mask[399, 70:600] = True  # an L: one region whose bounding box is much larger than its pixels
    assert plan_region_crops(mask, BUCKETS, MARGIN) == [plan_crop(mask, BUCKETS, MARGIN)]


def test_diagonal_neighbours_are_one_region():
    mask = squares((3000, 4000), (2800, 3800), size=50)
    mask[np.arange(300), np.arange(300)] = True  # 300 regions if only edge neighbours counted: past max_regions
    plans = plan_region_crops(mask, BUCKETS, MARGIN, max_regions=256)
    assert len(plans) == 2 and all(plan.side == plan.bucket for plan in plans)


def test_empty_mask_plans_nothing():
    assert plan_region_crops(np.zeros((100, 100), bool), BUCKETS, MARGIN) == []


def test_too_many_regions_fall_back_to_one_box_too_many_crops_merge_the_cheapest_pair():
    mask = np.zeros((3000, 4000), bool)
    mask[::100, ::100] = True  # 1200 dots, 100 px apart
    whole = plan_crop(mask, BUCKETS, 8)
    assert plan_region_crops(mask, BUCKETS, 8) == [whole]
    corners = [(100, 100), (100, 3700), (2700, 100), (2700, 3700)]
    four = squares((3000, 4000), *corners, size=10)
    assert len(plan_region_crops(four, BUCKETS, MARGIN)) == 4
    assert plan_region_crops(four, BUCKETS, MARGIN, max_regions=3) == [plan_crop(four, BUCKETS, MARGIN)]
    # one crop fewer: the two objects one above the other (2600 px apart, not 3600) share a window
    three = plan_region_crops(four, BUCKETS, MARGIN, max_crops=3)
    assert len(three) == 3
    assert sorted(scales(four, three, corners)) == pytest.approx([1024 / 2866, 1024 / 2866, 1.0, 1.0])
    assert scale_of(plan_crop(four, BUCKETS, MARGIN)) == pytest.approx(1024 / 3866)
    assert plan_region_crops(four, BUCKETS, MARGIN, max_crops=1) == [plan_crop(four, BUCKETS, MARGIN)]


def test_a_mask_of_scattered_dots_is_given_up_on_before_it_costs_memory():
    """A dot every other pixel (a 60 KB PNG with dilate=0) made millions of Python tuples before the block count
    was checked: 2.1 GB and 20 s on 6000 x 6600. The count now comes first."""
    import tracemalloc

    mask = np.zeros((2000, 2000), bool)
    mask[::2, ::2] = True  # a million regions
    tracemalloc.start()
    try:
        assert _separated_blocks(mask, 256) is None
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20, f"{peak / 2**20:.0f} MiB"
    whole = plan_crop(mask, BUCKETS, MARGIN)
    assert plan_region_crops(mask, BUCKETS, MARGIN) == [whole], "too many regions: one box, as before"


@pytest.mark.parametrize("buckets", [(), (500,), (0, 512)])
def test_bad_buckets_are_refused_as_plan_crop_refuses_them(buckets):
    with pytest.raises(ValueError):
        plan_region_crops(squares((600, 600), (0, 0)), buckets, 8)


# --- paste_back_regions -------------------------------------------------------------------------


@pytest.mark.parametrize("feather", [0, 6, 24])
def test_paste_changes_nothing_outside_the_mask_and_each_region_gets_its_own_crop(feather):
    shape = (1500, 2000)
    mask = dilate_mask(squares(shape, (100, 100), (1250, 1700), (100, 1750), size=60), 20)
    rgb = noise((*shape, 3))
    plans = plan_region_crops(mask, BUCKETS, MARGIN)
    assert len(plans) == 3
    results = constant_results(plans)
    out = paste_back_regions(rgb, mask, results, plans, feather)
    np.testing.assert_array_equal(out[~mask], rgb[~mask])
    inner = mask & ~dilate_mask(~mask, feather)  # farther than `feather` from the mask's edge: no blending
    for plan, result in zip(plans, results):
        window = np.zeros_like(mask)
        window[plan.top : plan.top + plan.side, plan.left : plan.left + plan.side] = True
        assert (out[inner & window] == result[0, 0]).all()
        assert (mask & window).any()
    assert not np.shares_memory(out, rgb)


def test_paste_equals_plan_crop_paste_back_for_each_window():
    shape = (1200, 1600)
    mask = dilate_mask(squares(shape, (50, 50), (1000, 1400), size=40), 12)
    rgb = noise((*shape, 3), seed=1)
    plans = plan_region_crops(mask, BUCKETS, 64)
    results = [noise((p.bucket, p.bucket, 3), seed=2 + i) for i, p in enumerate(plans)]
    out = paste_back_regions(rgb, mask, results, plans, 6)
    for plan, result in zip(plans, results):
        alone = paste_back(rgb, mask, result, plan, 6)
        rows = slice(max(plan.top, 0), plan.top + plan.side)
        cols = slice(max(plan.left, 0), plan.left + plan.side)
        np.testing.assert_array_equal(out[rows, cols], alone[rows, cols])


def test_round_trip_of_the_crops_restores_the_image():
    shape = (1000, 1400)
    mask = dilate_mask(squares(shape, (30, 30), (850, 1250), size=50), 10)
    rgb = noise((*shape, 3), seed=3)
    plans = plan_region_crops(mask, BUCKETS, MARGIN)
    crops = [crop_for_model(rgb, mask, plan)[0] for plan in plans]
    np.testing.assert_array_equal(paste_back_regions(rgb, mask, crops, plans, 6), rgb)


def test_overlapping_or_incomplete_plans_are_refused():
    shape = (1000, 1400)
    mask = squares(shape, (30, 30), (850, 1250), size=50)
    rgb = noise((*shape, 3))
    plans = plan_region_crops(mask, BUCKETS, MARGIN)
    results = constant_results(plans)
    with pytest.raises(ValueError, match="overlap"):
        paste_back_regions(rgb, mask, results, [plans[0], CropPlan(100, 100, 512, 512)], 0)
    with pytest.raises(ValueError, match="uncovered"):
        paste_back_regions(rgb, mask, results[:1], plans[:1], 0)
    with pytest.raises(ValueError, match="results"):
        paste_back_regions(rgb, mask, results[:1], plans, 0)


# --- properties ---------------------------------------------------------------------------------


@st.composite
def scattered_masks(draw) -> np.ndarray:
    height, width = draw(st.integers(1, 700)), draw(st.integers(1, 700))
    mask = np.zeros((height, width), bool)
    for _ in range(draw(st.integers(1, 6))):
        top, left = draw(st.integers(0, height - 1)), draw(st.integers(0, width - 1))
        mask[top : top + draw(st.integers(1, 80)), left : left + draw(st.integers(1, 80))] = True
    return mask


@settings(max_examples=60, deadline=None)
@given(
    scattered_masks(), st.sampled_from([(64,), (64, 128), (128, 256, 512)]), st.integers(0, 64), st.integers(0, 8),
    st.integers(1, 6),
)
def test_plans_cover_the_mask_never_overlap_and_pasting_touches_only_the_mask(mask, buckets, margin, feather, crops):
    plans = plan_region_crops(mask, buckets, margin, max_crops=crops)
    assert len(plans) <= crops
    whole = plan_crop(mask, buckets, margin)
    assert len(plans) >= 1 and (len(plans) > 1 or plans == [whole])
    assert_windows_hold_their_regions(mask, plans, buckets, margin)
    for plan in plans:
        # resolution, not upsampling, counts; a window may go into the next smaller bucket where the one holding it
        # exceeds the image, at most MAX_BUCKET_DOWNSCALE (imaging.window_sizes): a region can, where one box is
        # just past that and runs native (a region of 257 px in 256 beside a box of 385 px in 512)
        native_share = min(plan.bucket, plan.side) * whole.side * MAX_BUCKET_DOWNSCALE
        assert native_share >= min(whole.bucket, whole.side) * plan.side, "no region runs at a lower scale than one box"
    rgb = noise((*mask.shape, 3))
    out = paste_back_regions(rgb, mask, constant_results(plans), plans, feather)
    np.testing.assert_array_equal(out[~mask], rgb[~mask])


@settings(max_examples=80, deadline=None)
@given(scattered_masks(), st.integers(1, 10))
def test_region_boxes_are_those_of_labelling_the_whole_mask(mask, max_regions):
    labels, count = ndimage.label(mask, structure=np.ones((3, 3), bool))
    expected = sorted((r.start, r.stop, c.start, c.stop) for r, c in ndimage.find_objects(labels))
    boxes = _region_boxes(mask, max_regions)
    if count > max_regions:
        assert boxes is None
    else:
        assert sorted(map(tuple, boxes.tolist())) == expected


@settings(max_examples=60, deadline=None)
@given(scattered_masks(), st.integers(1, 4))
def test_separated_blocks_hold_every_region_whole_whatever_the_rounds(mask, rounds):
    blocks = _separated_blocks(mask, 10_000, rounds)
    owner = np.zeros(mask.shape, np.int64)
    for number, (top, bottom, left, right) in enumerate(blocks, start=1):
        assert not owner[top:bottom, left:right].any(), "blocks overlap"
        owner[top:bottom, left:right] = number
    labels, count = ndimage.label(mask, structure=np.ones((3, 3), bool))
    assert (owner[mask] > 0).all()
    for region in range(1, count + 1):
        assert len(np.unique(owner[labels == region])) == 1, "a region crosses blocks"


def test_far_apart_objects_are_removed_in_their_own_crops_over_rest_json_and_grpc(service):
    from PIL import Image as PILImage

    from serve import rorem_pb2 as pb
    from serve.rorem_pb2_grpc import ObjectRemovalStub
    from tests.helpers import photo, png_bytes
    from tests.helpers import post_remove as _remove

    image = photo(512, 412)  # the photo is 412 wide
    mask = np.zeros((512, 412), np.uint8)
    mask[20:40, 20:40] = 255
    mask[470:490, 370:390] = 255
    image_png, mask_png = png_bytes(image), png_bytes(mask)
    response = _remove(service, image_png, mask_png, seed=3, gate="annotate")
    assert response.status_code == 200, response.text
    smallest = min(service.config["imaging"]["buckets"])
    assert response.headers["x-bucket"] == f"{smallest}, {smallest}", "one crop per object, at native resolution"
    result = np.asarray(PILImage.open(io.BytesIO(response.content)).convert("RGB"))
    dilate = service.config["imaging"]["dilate"]
    outside = np.ones((512, 412), bool)
    for top, left in ((20, 20), (470, 370)):
        outside[max(top - dilate, 0) : top + 20 + dilate, max(left - dilate, 0) : left + 20 + dilate] = False
    assert np.array_equal(result[outside], image[outside]), "pixels outside the dilated masks are the input's"
    assert not np.array_equal(result[20:40, 20:40], image[20:40, 20:40])
    assert not np.array_equal(result[470:490, 370:390], image[470:490, 370:390])

    as_json = service.client.post(
        "/remove", files={"image": image_png, "mask": mask_png}, data={"seed": "3"}, headers={"accept": "application/json"}
    ).json()
    assert as_json["buckets"] == [smallest, smallest] and as_json["bucket"] == smallest
    reply = ObjectRemovalStub(service.channel()).Remove(
        pb.RemoveRequest(image=image_png, mask=mask_png, seed=3), timeout=120
    )
    assert list(reply.buckets) == [smallest, smallest] and reply.bucket == smallest
