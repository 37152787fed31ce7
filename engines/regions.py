"""One crop per mask region: far-apart objects each keep their native resolution instead of sharing one huge,
downscaled window (project issue 18).

`plan_region_crops` labels the connected regions of the (dilated) mask, gives each the window `imaging.plan_crop`
would give it alone, and merges groups of regions until no two windows overlap and no merge is free. Merging is
free when the merged window still runs at native resolution in a bucket no larger than the larger of the two:
the model then sees no fewer pixels per object and no more pixels in all, and the request makes one call fewer.
Two regions that would each take a 512 crop are not merged into one 1024 crop: that is twice the pixels of two
512 crops, which batch together anyway.

`paste_back_regions` pastes each crop's result with `imaging.paste_back` inside its own window only. Windows never
overlap and each group's mask pixels lie inside its window, so a window holds exactly its own group's pixels: no
paste can touch another region, and every pixel outside the mask stays bit-identical.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from engines.imaging import EIGHT_CONNECTED, CropPlan, paste_back, plan_crop, window_sizes, window_start

# Beyond this many connected regions, or this many crops after merging, a request is planned as one box, as
# before: planning stays cheap and a speckled mask cannot turn one request into hundreds of model calls.
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

    Regions are 8-connected. A single region, or regions that all end up merged, get exactly `plan_crop`'s plan.
    """
    whole = plan_crop(mask, buckets, margin)  # validates the arguments
    if whole is None:
        return []
    boxes = _region_boxes(mask, max_regions)
    if boxes is None or len(boxes) == 1:
        return [whole]
    boxes = _merge(boxes, mask.shape, buckets, margin)
    if len(boxes) > max_crops:
        return [whole]
    plans = [CropPlan(*map(int, window)) for window in zip(*_windows(boxes, mask.shape, buckets, margin))]
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
        out[y0:y1, x0:x1] = paste_back(out[y0:y1, x0:x1], window_mask, result, local, feather)
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


def _merge(boxes: np.ndarray, shape: tuple[int, int], buckets: Sequence[int], margin: int) -> np.ndarray:
    """Union boxes (top, bottom, left, right) whose windows overlap or merge for free, until none do.

    Each merge removes a box, so there are fewer checks than twice the boxes; each check is one vectorised
    comparison against all the other boxes.
    """
    boxes = boxes.copy()
    windows = np.stack(_windows(boxes, shape, buckets, margin), axis=1)
    index = 0
    while index < len(boxes):
        top, left, side, bucket = windows[index]
        overlap = (
            (windows[:, 0] < top + side)
            & (top < windows[:, 0] + windows[:, 2])
            & (windows[:, 1] < left + side)
            & (left < windows[:, 1] + windows[:, 2])
        )
        union = np.concatenate(
            [np.minimum(boxes[:, [0]], boxes[index, 0]), np.maximum(boxes[:, [1]], boxes[index, 1]),
             np.minimum(boxes[:, [2]], boxes[index, 2]), np.maximum(boxes[:, [3]], boxes[index, 3])],
            axis=1,
        )  # fmt: skip
        _, _, union_side, union_bucket = _windows(union, shape, buckets, margin)
        free = (union_side == union_bucket) & (union_bucket <= np.maximum(windows[:, 3], bucket))
        partners = np.flatnonzero(overlap | free)
        partners = partners[partners != index]
        if partners.size == 0:
            index += 1
            continue
        partner = partners[0]
        boxes[index] = union[partner]
        windows[index] = np.stack(_windows(union[[partner]], shape, buckets, margin), axis=1)[0]
        boxes, windows = np.delete(boxes, partner, axis=0), np.delete(windows, partner, axis=0)
        # Stay on the grown box: it is checked against every box, passed ones too. The pairs not involving
        # it are unchanged, and were checked already.
        index -= int(partner < index)
    return boxes


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
