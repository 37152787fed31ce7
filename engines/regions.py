"""One crop per mask region: far-apart objects each keep their native resolution instead of sharing one huge,
downscaled window (project issue 18).

`plan_region_crops` labels the connected regions of the (dilated) mask, gives each the window `imaging.plan_crop`
would give it alone, and merges groups of regions until no two windows overlap and no merge is free. Merging is
free when the merged window still runs at native resolution in a bucket no larger than the larger of the two:
the model then sees no fewer pixels per object and no more pixels in all, and the request makes one call fewer.
Two regions that would each take a 512 crop are not merged into one 1024 crop: that is twice the pixels of two
512 crops, which batch together anyway.

Windows start centred on their regions. Two that overlap are first slid apart, each within the range that
still holds its regions' box plus the margin (cut at the image's edges) inside the image, and only merged where
no such move separates them without overlapping a third. Past `max_crops` (what the request's model-call cap
allows), the pair whose shared window is downscaled least (then the smallest) merges, again until `max_crops`
remain: a fifth object costs one shared window, not one window around all five.

`paste_back_regions` pastes each crop's result with `imaging.paste_back_into` inside its own window only.
Windows never overlap and each group's mask pixels lie inside its window, so a window holds exactly its own
group's pixels: no paste can touch another region, and every pixel outside the mask stays bit-identical.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from engines.imaging import EIGHT_CONNECTED, CropPlan, paste_back_into, plan_crop, window_sizes, window_start

# Beyond this many connected regions a request is planned as one box, as before: planning stays cheap (it is
# quadratic in the regions at worst) and a speckled mask cannot turn one request into hundreds of model calls.
# Past this many crops, or the request's own max_crops, the cheapest pairs merge (see above).
MAX_REGIONS = 256
MAX_CROPS = 16


def plan_region_crops(
    mask: np.ndarray,
    buckets: Sequence[int],
    margin: int,
    max_regions: int = MAX_REGIONS,
    max_crops: int = MAX_CROPS,
) -> list[CropPlan]:
    """Crop windows for the mask's regions, sorted by (top, left); [] when the mask is empty.

    Regions are 8-connected. A single region, regions that all end up merged, or more than `max_regions` regions
    get exactly `plan_crop`'s plan. Each window has `plan_crop`'s side and bucket for the regions it holds.
    """
    whole = plan_crop(mask, buckets, margin)  # validates the arguments
    if whole is None:
        return []
    boxes = _region_boxes(mask, max_regions)
    if boxes is None or len(boxes) == 1:
        return [whole]
    _, windows = _merge(boxes, mask.shape, buckets, margin, max(max_crops, 1))
    if len(windows) == 1:
        return [whole]  # the union of every region's box: the mask's box
    plans = [CropPlan(*map(int, window)) for window in windows]
    plans.sort(key=lambda plan: (plan.top, plan.left))
    _check_disjoint(plans)
    return plans


def paste_back_regions(
    rgb: np.ndarray,
    mask: np.ndarray,
    results: Sequence[np.ndarray],
    plans: Sequence[CropPlan],
    feather: int,
) -> np.ndarray:
    """Blend each crop's result into a copy of the image, inside its own window's part of the mask only."""
    if len(results) != len(plans):
        raise ValueError(f"{len(results)} results for {len(plans)} plans")
    if rgb.shape[:2] != mask.shape:
        raise ValueError(f"image {rgb.shape[:2]} and mask {mask.shape} differ in size")
    _check_disjoint(plans)
    height, width = mask.shape
    out = rgb.copy()
    covered = 0
    for result, plan in zip(results, plans):
        y0, y1 = max(plan.top, 0), min(plan.top + plan.side, height)
        x0, x1 = max(plan.left, 0), min(plan.left + plan.side, width)
        local = CropPlan(top=plan.top - y0, left=plan.left - x0, side=plan.side, bucket=plan.bucket)
        window_mask = mask[y0:y1, x0:x1]
        covered += np.count_nonzero(window_mask)
        paste_back_into(out[y0:y1, x0:x1], window_mask, result, local, feather)
    if covered != np.count_nonzero(mask):
        raise ValueError("the plans leave part of the mask uncovered: plan them with plan_region_crops")
    return out


def _region_boxes(mask: np.ndarray, max_regions: int) -> np.ndarray | None:
    """(top, bottom, left, right) of each 8-connected region, bottom/right exclusive; None past max_regions.

    Only the blocks that `_separated_blocks` leaves are labelled: two small objects on a 12 MP photo cost two
    small labellings, not one of the whole image (scipy's label + find_objects on 12 MP: 60-120 ms).
    """
    blocks = _separated_blocks(mask, max_regions)
    if blocks is None:
        return None
    boxes = []
    for top, bottom, left, right in blocks:
        labels, count = ndimage.label(mask[top:bottom, left:right], structure=EIGHT_CONNECTED)
        if len(boxes) + count > max_regions:
            return None
        boxes += [(top + r.start, top + r.stop, left + c.start, left + c.stop) for r, c in ndimage.find_objects(labels)]
    return np.array(boxes, np.int64).reshape(-1, 4)


def _separated_blocks(mask: np.ndarray, max_blocks: int, rounds: int = 3) -> list[tuple[int, int, int, int]] | None:
    """Rectangles holding every mask pixel that no region crosses: the mask cut along its empty rows, then each
    band along its empty columns, for a few rounds. None when there are more than `max_blocks` (each block
    holds at least one region)."""
    done, todo = [], [(0, mask.shape[0], 0, mask.shape[1])]
    for _ in range(rounds):
        split = []
        for top, bottom, left, right in todo:
            block = mask[top:bottom, left:right]
            pieces = []
            # counted before any tuple is built: a dot every other pixel would make millions (seconds, gigabytes)
            rows = _runs(block.any(axis=1), max_blocks - len(done) - len(split))
            if rows is None:
                return None
            for r0, r1 in rows:
                columns = _runs(block[r0:r1].any(axis=0), max_blocks - len(done) - len(split) - len(pieces))
                if columns is None:
                    return None
                pieces += [(top + r0, top + r1, left + c0, left + c1) for c0, c1 in columns]
            # one piece is the block's tight box and has no empty row or column left: nothing more to cut
            (done if len(pieces) == 1 else split).extend(pieces)
        todo = split
    return done + todo


def _runs(flags: np.ndarray, at_most: int) -> list[tuple[int, int]] | None:
    """(start, stop) of each run of True; None when there are more than `at_most`."""
    edges = np.flatnonzero(np.diff(flags, prepend=False, append=False))
    if len(edges) // 2 > at_most:
        return None
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def _merge(
    boxes: np.ndarray, shape: tuple[int, int], buckets: Sequence[int], margin: int, max_crops: int
) -> tuple[np.ndarray, np.ndarray]:
    """Group boxes (top, bottom, left, right) until no two windows overlap, no merge is free and there are at
    most `max_crops`: the groups' boxes and their windows (top, left, side, bucket).

    Two windows that overlap are first slid apart (`_slide_apart`); merged only where no placement holding each
    box plus its margin separates them. Past `max_crops`, the pair whose merged window is downscaled least (then
    the smallest) is merged, and the grown window checked again. Each check is one vectorised comparison against
    the other boxes; each merge removes a box and each slide one overlapping pair, so the loop ends.
    """
    boxes = boxes.copy()
    windows = np.stack(_windows(boxes, shape, buckets, margin), axis=1)
    limits = _slide_limits(boxes, windows, shape, margin)
    alive = np.ones(len(boxes), bool)
    costs = None  # (downscale, side) of merging each pair, once the count must come down

    def grow(index: int, partner: int) -> None:
        boxes[index] = _union(boxes[[index]], boxes[[partner]])[0]
        windows[index] = np.stack(_windows(boxes[[index]], shape, buckets, margin), axis=1)[0]
        limits[index] = _slide_limits(boxes[[index]], windows[[index]], shape, margin)[0]
        alive[partner] = False
        if costs is not None:
            _update_costs(costs, boxes, alive, index, partner, shape, buckets, margin)

    todo = list(range(len(boxes)))[::-1]  # popped in order; a grown box is pushed back to be checked again
    while True:
        while todo:
            index = todo.pop()
            if not alive[index]:
                continue
            top, left, side, bucket = windows[index]
            overlap = (
                (windows[:, 0] < top + side)
                & (top < windows[:, 0] + windows[:, 2])
                & (windows[:, 1] < left + side)
                & (left < windows[:, 1] + windows[:, 2])
            )
            _, _, union_side, union_bucket = _windows(_union(boxes, boxes[[index]]), shape, buckets, margin)
            free = (union_side == union_bucket) & (union_bucket <= np.maximum(windows[:, 3], bucket))
            partners = np.flatnonzero((overlap | free) & alive)
            partners = partners[partners != index]
            if partners.size == 0:
                continue
            partner = partners[0]
            if not free[partner] and _slide_apart(windows, limits, alive, index, partner):
                todo.append(index)  # the pair no longer overlaps, and no other pair does: look for the next partner
                continue
            grow(index, partner)
            todo.append(index)
        if np.count_nonzero(alive) <= max_crops:
            return boxes[alive], windows[alive]
        if costs is None:
            costs = _pair_costs(boxes, alive, shape, buckets, margin)
        downscale, side = costs
        best = np.where(downscale == downscale.min(), side, np.iinfo(np.int64).max)
        index, partner = np.unravel_index(np.argmin(best), best.shape)  # row-major: the first such pair
        grow(int(index), int(partner))
        todo.append(int(index))


def _union(boxes: np.ndarray, box: np.ndarray) -> np.ndarray:
    """Each box (top, bottom, left, right) joined with `box` (one row)."""
    return np.concatenate(
        [np.minimum(boxes[:, [0]], box[0, 0]), np.maximum(boxes[:, [1]], box[0, 1]),
         np.minimum(boxes[:, [2]], box[0, 2]), np.maximum(boxes[:, [3]], box[0, 3])],
        axis=1,
    )  # fmt: skip


def _pair_costs(
    boxes: np.ndarray, alive: np.ndarray, shape: tuple[int, int], buckets: Sequence[int], margin: int
) -> tuple[np.ndarray, np.ndarray]:
    """(downscale, side) matrices of the window that merging each pair (row < column, both alive) would take;
    inf / int64 max elsewhere. Downscale: photo pixels per model pixel, 1 at native resolution."""
    count = len(boxes)
    downscale = np.full((count, count), np.inf)
    side = np.full((count, count), np.iinfo(np.int64).max)
    for index in np.flatnonzero(alive):
        _fill_costs((downscale, side), boxes, alive, index, shape, buckets, margin)
    return downscale, side


def _fill_costs(
    costs: tuple[np.ndarray, np.ndarray], boxes: np.ndarray, alive: np.ndarray, index: int,
    shape: tuple[int, int], buckets: Sequence[int], margin: int,
) -> None:  # fmt: skip
    """Row and column `index` of the cost matrices: merging box `index` with each other live box."""
    downscale, side = costs
    _, _, union_side, union_bucket = _windows(_union(boxes, boxes[[index]]), shape, buckets, margin)
    row_downscale = np.where(alive, union_side / np.minimum(union_side, union_bucket), np.inf)
    row_side = np.where(alive, union_side, np.iinfo(np.int64).max)
    row_downscale[index], row_side[index] = np.inf, np.iinfo(np.int64).max
    later, earlier = np.arange(len(boxes)) > index, np.arange(len(boxes)) < index
    downscale[index, later], side[index, later] = row_downscale[later], row_side[later]
    downscale[earlier, index], side[earlier, index] = row_downscale[earlier], row_side[earlier]


def _update_costs(
    costs: tuple[np.ndarray, np.ndarray], boxes: np.ndarray, alive: np.ndarray, index: int, gone: int,
    shape: tuple[int, int], buckets: Sequence[int], margin: int,
) -> None:  # fmt: skip
    for matrix, none in zip(costs, (np.inf, np.iinfo(np.int64).max)):
        matrix[gone, :], matrix[:, gone] = none, none
    _fill_costs(costs, boxes, alive, index, shape, buckets, margin)


def _slide_limits(boxes: np.ndarray, windows: np.ndarray, shape: tuple[int, int], margin: int) -> np.ndarray:
    """(first top, last top, first left, last left) of each window that still holds its box plus `margin` (cut
    at the image's edges) inside the image; a window longer than the image along an axis stays where it is."""
    limits = []
    for axis, (lo, hi, start) in enumerate(((boxes[:, 0], boxes[:, 1], windows[:, 0]),
                                            (boxes[:, 2], boxes[:, 3], windows[:, 1]))):  # fmt: skip
        extent, side = shape[axis], windows[:, 2]
        first = np.maximum(np.minimum(hi + margin, extent) - side, 0)
        last = np.minimum(np.maximum(lo - margin, 0), extent - side)
        fixed = side > extent
        limits += [np.where(fixed, start, np.minimum(first, start)), np.where(fixed, start, np.maximum(last, start))]
    return np.stack(limits, axis=1)


def _slide_apart(windows: np.ndarray, limits: np.ndarray, alive: np.ndarray, a: int, b: int) -> bool:
    """Move windows `a` and `b` within their limits so that they no longer overlap and overlap no other live
    window, the least distance in all, split between the two as evenly as their limits allow; False (nothing
    moved) when no such move along one axis exists. Candidates in a fixed order: deterministic."""
    others = alive.copy()
    others[[a, b]] = False
    best = None
    for axis in (0, 1):
        for first, second in ((a, b), (b, a)):
            overlap = windows[first, axis] + windows[first, 2] - windows[second, axis]
            back = windows[first, axis] - limits[first, 2 * axis]  # how far `first` can move towards 0
            ahead = limits[second, 2 * axis + 1] - windows[second, axis]  # and `second` away from it
            if overlap > back + ahead or (best is not None and overlap >= best[0]):
                continue
            step = int(np.clip(overlap // 2, overlap - ahead, back))
            moved = windows[[first, second]].copy()
            moved[0, axis] -= step
            moved[1, axis] += overlap - step
            if not _overlaps_any(moved, windows[others]):
                best = (overlap, first, second, moved)
    if best is None:
        return False
    _, first, second, moved = best
    windows[[first, second]] = moved
    return True


def _overlaps_any(windows: np.ndarray, others: np.ndarray) -> bool:
    """Whether any of `windows` (top, left, side, ...) overlaps any of `others`."""
    a, b = windows[:, None, :], others[None, :, :]
    return bool(
        ((a[..., 0] < b[..., 0] + b[..., 2]) & (b[..., 0] < a[..., 0] + a[..., 2])
         & (a[..., 1] < b[..., 1] + b[..., 2]) & (b[..., 1] < a[..., 1] + a[..., 2])).any()
    )  # fmt: skip


def _windows(
    boxes: np.ndarray, shape: tuple[int, int], buckets: Sequence[int], margin: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(top, left, side, bucket) arrays: `plan_crop`'s window for each box, as if it were the whole mask."""
    height, width = shape
    top, bottom, left, right = boxes.T
    side, bucket = window_sizes(np.maximum(bottom - top, right - left), margin, max(height, width), buckets)
    return window_start(top, bottom, side, height), window_start(left, right, side, width), side, bucket


def _check_disjoint(plans: Sequence[CropPlan]) -> None:
    for i, a in enumerate(plans):
        for b in plans[i + 1 :]:
            if (
                a.top < b.top + b.side
                and b.top < a.top + a.side
                and a.left < b.left + b.side
                and b.left < a.left + a.side
            ):
                raise ValueError(f"crop windows overlap: {a} and {b}")
