"""Image and mask handling around the inpainting model: safe decoding, crop planning, blending, encoding.

Everything a client can send passes through `decode_image` / `decode_mask`, so every failure there
ends in one of the `engines.errors` input errors, never in a raw PIL or numpy exception.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from scipy import ndimage

from engines.errors import (
    ImageTooLarge,
    InputError,
    InvalidImage,
    InvalidMask,
    MaskSizeMismatch,
    UnsupportedOutputFormat,
)

OUTPUT_FORMATS = ("png", "jpeg", "webp")
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}

# Only these PIL plugins may open client bytes: exotic ones (EPS runs Ghostscript, for one) are attack surface.
ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "AVIF")
# Phone cameras write multi-picture JPEGs (MPO); their first picture is a plain JPEG, so report them as one.
_FORMAT_ALIASES = {"mpo": "jpeg"}

# The largest side each output codec can write (PNG: 2**31 - 1, beyond any decodable input).
MAX_OUTPUT_SIDE = {"webp": 16383, "jpeg": 65500}
_FEATHER_TILE = 256
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})


@dataclass(frozen=True)
class DecodeLimits:
    max_bytes: int = 30 * 1024 * 1024
    max_megapixels: float = 40.0


@dataclass
class DecodedImage:
    rgb: np.ndarray
    alpha: np.ndarray | None
    format: str | None


@dataclass(frozen=True)
class CropPlan:
    top: int
    left: int
    side: int
    bucket: int


# --- decoding -----------------------------------------------------------------------------------


def decode_image(data: bytes, limits: DecodeLimits) -> DecodedImage:
    """Decode client bytes into upright RGB pixels, keeping any meaningful alpha aside."""
    return _decode(data, limits, what="image", invalid=InvalidImage)


def decode_mask(data: bytes, size: tuple[int, int], limits: DecodeLimits) -> np.ndarray:
    """Decode a mask image into a bool (H, W) array, True where the model should remove content.

    Strokes drawn on a transparent layer are read from alpha; otherwise white (luminance > 127) means remove.
    """
    decoded = _decode(data, limits, what="mask", invalid=InvalidMask)
    if decoded.alpha is not None:
        mask = decoded.alpha > 127
    else:
        mask = _luminance_times_1000(decoded.rgb) > 127 * 1000
    if mask.shape != tuple(size):
        (mask_h, mask_w), (image_h, image_w) = mask.shape, size
        turned = mask.shape == tuple(size)[::-1]
        hint = "; the image is read upright (its EXIF orientation applied): draw the mask on the upright image"
        raise MaskSizeMismatch(f"mask is {mask_w}x{mask_h} but image is {image_w}x{image_h}{hint if turned else ''}")
    return mask


def mask_from_alpha(image: DecodedImage) -> np.ndarray:
    """Use the image's own transparency as the mask: erased (alpha < 128) pixels are to be removed."""
    if image.alpha is None:
        raise InvalidMask("no mask given and the image has no alpha channel")
    return image.alpha < 128


def _decode(data: bytes, limits: DecodeLimits, what: str, invalid: type[InputError]) -> DecodedImage:
    if len(data) == 0:
        raise invalid(f"the {what} is empty")
    if len(data) > limits.max_bytes:
        raise ImageTooLarge(f"the {what} is {len(data)} bytes; the limit is {limits.max_bytes} bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # PIL's notes on corrupt metadata: client-made log noise
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS) as img:
                format_name = img.format.lower() if img.format else None
                source_format = _FORMAT_ALIASES.get(format_name, format_name)
                _check_declared_size(img.size, limits, what, invalid)
                img.load()
                ImageOps.exif_transpose(img, in_place=True)
                rgb, alpha = _split_rgb_alpha(img, what, invalid)
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # PIL's own guard fires inside Image.open, before our check, for sizes past its limit: name ours too
        limit = f"the limit is {limits.max_megapixels:g} megapixels"
        raise ImageTooLarge(f"the {what} has too many pixels; {limit} ({exc})") from exc
    except UnidentifiedImageError as exc:
        accepted = ", ".join(f.lower() for f in ACCEPTED_FORMATS)
        raise invalid(f"the {what} is not a recognised image (accepted formats: {accepted})") from exc
    except Exception as exc:
        # Malformed files surface from PIL's plugins as OSError, SyntaxError, ValueError, struct.error,
        # EOFError, IndexError... depending on the format; all of them mean the bytes are bad.
        raise invalid(f"the {what} is corrupt or truncated: {exc}") from exc
    return DecodedImage(rgb=rgb, alpha=alpha, format=source_format)


def _check_declared_size(size: tuple[int, int], limits: DecodeLimits, what: str, invalid: type[InputError]) -> None:
    """Refuse from the header alone, before any pixel buffer is allocated (decompression bombs)."""
    width, height = size
    if width <= 0 or height <= 0:
        raise invalid(f"the {what} has zero size ({width}x{height})")
    megapixels = width * height / 1e6
    if megapixels > limits.max_megapixels:
        raise ImageTooLarge(
            f"the {what} is {width}x{height} ({megapixels:.1f} megapixels); "
            f"the limit is {limits.max_megapixels:g} megapixels"
        )


def _split_rgb_alpha(img: Image.Image, what: str, invalid: type[InputError]) -> tuple[np.ndarray, np.ndarray | None]:
    """Normalise any PIL mode to uint8 RGB plus an alpha plane that is None when it carries nothing."""
    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        return _gray_to_rgb(_scale_16bit(np.asarray(img))), None
    if mode == "F":
        return _gray_to_rgb(_scale_float(np.asarray(img))), None
    if mode == "La":
        img = img.convert("LA")  # PIL has no direct La -> RGBA path; LA is the straight-alpha form
    has_alpha = mode in _ALPHA_MODES or "transparency" in img.info
    try:
        converted = img.convert("RGBA" if has_alpha else "RGB")
    except ValueError as exc:
        raise invalid(f"the {what} uses an unsupported pixel mode {mode!r}") from exc
    pixels = np.asarray(converted)
    if not has_alpha:
        return np.ascontiguousarray(pixels), None
    alpha = pixels[..., 3]
    return np.ascontiguousarray(pixels[..., :3]), (alpha.copy() if alpha.min() < 255 else None)


def _scale_16bit(values: np.ndarray) -> np.ndarray:
    """Map 0..65535 onto 0..255 with rounding (65535 -> 255, 32896 -> 128); out-of-range values clip."""
    clipped = np.clip(values, 0, 65535).astype(np.uint32)
    return ((clipped * 255 + 32767) // 65535).astype(np.uint8)


def _scale_float(values: np.ndarray) -> np.ndarray:
    """Float images are 0..1 when they fit in it, otherwise taken as 0..255."""
    values = np.nan_to_num(values.astype(np.float32), nan=0.0, posinf=255.0, neginf=0.0)
    if values.size and values.max() <= 1.0:
        values = values * 255.0
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.repeat(gray[..., None], 3, axis=2))


def _luminance_times_1000(rgb: np.ndarray) -> np.ndarray:
    """Rec. 601 luma in integers, so a gray value v gives exactly 1000 * v (no float rounding at the threshold)."""
    luma = rgb[..., 0].astype(np.uint32) * 299
    luma += rgb[..., 1].astype(np.uint32) * 587
    luma += rgb[..., 2].astype(np.uint32) * 114
    return luma


# --- mask geometry ------------------------------------------------------------------------------


def dilate_mask(mask: np.ndarray, pixels: int) -> np.ndarray:
    """Grow the mask by `pixels` in every direction (square), so the model also repaints halos and shadows.

    Only the mask's bounding box grown by `pixels` is filtered: nothing outside it can become True.
    """
    if pixels < 0:
        raise ValueError(f"dilation must be >= 0, got {pixels}")
    box = _bounding_box(mask)
    if pixels == 0 or box is None:
        return mask.copy()
    top, bottom, left, right = box
    height, width = mask.shape
    rows = slice(max(top - pixels, 0), min(bottom + pixels, height))
    cols = slice(max(left - pixels, 0), min(right + pixels, width))
    grown = ndimage.maximum_filter(mask[rows, cols].view(np.uint8), size=2 * pixels + 1, mode="constant", cval=0)
    out = np.zeros_like(mask)
    out[rows, cols] = grown.astype(bool)
    return out


def _bounding_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(top, bottom, left, right) of the True pixels, bottom/right exclusive; None when there are none."""
    if mask.ndim != 2 or mask.dtype != np.bool_:
        raise ValueError(f"mask must be a 2-D bool array, got {mask.dtype} {mask.shape}")
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def plan_crop(mask: np.ndarray, buckets: Sequence[int], margin: int) -> CropPlan | None:
    """Choose the square window the model sees: the masked area plus `margin` of context, at a supported size.

    A window no larger than its bucket keeps native resolution (more context, no resampling); a larger one
    is downscaled to the largest bucket. Context wanted beyond the image does not raise the bucket: a
    small image runs at the smallest bucket that holds it. None means there is nothing to remove.
    """
    if not buckets or any(b <= 0 or b % 64 for b in buckets):
        raise ValueError(f"buckets must be positive multiples of 64, got {list(buckets)}")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    box = _bounding_box(mask)
    if box is None:
        return None
    top, bottom, left, right = box
    height, width = mask.shape
    need = min(max(bottom - top, right - left) + 2 * margin, max(height, width))  # no context beyond the image
    bucket = min((b for b in buckets if b >= need), default=max(buckets))
    side = min(max(need, bucket), max(height, width))
    return CropPlan(
        top=_place_window(top, bottom, side, height),
        left=_place_window(left, right, side, width),
        side=side,
        bucket=bucket,
    )


def _place_window(lo: int, hi: int, side: int, extent: int) -> int:
    """Start of a `side` window covering [lo, hi) along one axis of length `extent`.

    Centred on the span and pushed inside the image when it fits; centred on the image when it cannot.
    """
    if side > extent:
        return (extent - side) // 2
    start = lo + (hi - lo - side) // 2
    return min(max(start, 0), extent - side)


def _window_inside_image(plan: CropPlan, height: int, width: int) -> tuple[slice, slice, slice, slice]:
    """Image-space rows/cols of the window's visible part, and the matching window-space rows/cols."""
    y0, y1 = max(plan.top, 0), min(plan.top + plan.side, height)
    x0, x1 = max(plan.left, 0), min(plan.left + plan.side, width)
    image_rows, image_cols = slice(y0, y1), slice(x0, x1)
    window_rows = slice(y0 - plan.top, y1 - plan.top)
    window_cols = slice(x0 - plan.left, x1 - plan.left)
    return image_rows, image_cols, window_rows, window_cols


# --- model input / output -----------------------------------------------------------------------


def crop_for_model(rgb: np.ndarray, mask: np.ndarray, plan: CropPlan) -> tuple[np.ndarray, np.ndarray]:
    """Cut the planned window and bring it to the model's bucket size: (bucket, bucket, 3) uint8 and bool mask.

    Only the part of the window inside the image is resampled; the overhang is padded at bucket scale. Padding
    at full resolution first would allocate side x side pixels: gigabytes for a 1 x 20000 strip, whose window
    is 20000 pixels square.
    """
    height, width = mask.shape
    image_rows, image_cols, window_rows, window_cols = _window_inside_image(plan, height, width)
    rgb_window = rgb[image_rows, image_cols]
    mask_window = mask[image_rows, image_cols]
    if plan.side != plan.bucket:
        window_rows, window_cols = _at_bucket_scale(window_rows, plan), _at_bucket_scale(window_cols, plan)
        size = (window_cols.stop - window_cols.start, window_rows.stop - window_rows.start)
        resized = Image.fromarray(np.ascontiguousarray(rgb_window)).resize(size, Image.Resampling.LANCZOS)
        rgb_window = np.asarray(resized)
        # Bilinear coverage > 0 keeps strokes thinner than the downscale factor instead of dropping them.
        coverage = Image.fromarray(mask_window.astype(np.uint8) * 255).resize(size, Image.Resampling.BILINEAR)
        mask_window = np.asarray(coverage) > 0
    padding = (
        (window_rows.start, plan.bucket - window_rows.stop),
        (window_cols.start, plan.bucket - window_cols.stop),
    )
    if any(any(pair) for pair in padding):
        visible_h, visible_w = rgb_window.shape[:2]
        # Reflection looks natural to the model but needs the pad to be shorter than the visible part.
        fits = max(padding[0]) < visible_h and max(padding[1]) < visible_w
        rgb_window = np.pad(rgb_window, (*padding, (0, 0)), mode="reflect" if fits else "edge")
        mask_window = np.pad(mask_window, padding, mode="constant", constant_values=False)
    return np.ascontiguousarray(rgb_window), mask_window.copy()


def _at_bucket_scale(span: slice, plan: CropPlan) -> slice:
    """Where a window-space span lands in the bucket-sized model crop: at least one pixel, inside the crop."""
    scale = plan.bucket / plan.side
    start = min(round(span.start * scale), plan.bucket - 1)
    return slice(start, max(round(span.stop * scale), start + 1))


def paste_back(rgb: np.ndarray, mask: np.ndarray, result: np.ndarray, plan: CropPlan, feather: int) -> np.ndarray:
    """Blend the model's output into a copy of the image, strictly inside the mask.

    The weight ramps from 0 at the mask edge to 1 at `feather` pixels inside it, so seams are soft while every
    unmasked pixel stays bit-identical to the input.
    """
    if result.shape != (plan.bucket, plan.bucket, 3) or result.dtype != np.uint8:
        raise ValueError(f"result must be uint8 {(plan.bucket, plan.bucket, 3)}, got {result.dtype} {result.shape}")
    if feather < 0:
        raise ValueError(f"feather must be >= 0, got {feather}")
    height, width = mask.shape
    image_rows, image_cols, window_rows, window_cols = _window_inside_image(plan, height, width)
    if plan.side == plan.bucket:
        result = result[window_rows, window_cols]
    else:  # the inverse of crop_for_model: only the part of the crop that lies inside the image, back to its size
        visible = result[_at_bucket_scale(window_rows, plan), _at_bucket_scale(window_cols, plan)]
        size = (window_cols.stop - window_cols.start, window_rows.stop - window_rows.start)
        result = np.asarray(Image.fromarray(np.ascontiguousarray(visible)).resize(size, Image.Resampling.LANCZOS))
    out = rgb.copy()
    window_mask = mask[image_rows, image_cols]
    box = _bounding_box(window_mask)
    if box is None:
        return out
    rows, cols = slice(box[0], box[1]), slice(box[2], box[3])
    original = rgb[image_rows, image_cols][rows, cols]
    repainted = result[rows, cols]
    target = out[image_rows, image_cols][rows, cols]
    target[...] = np.where(window_mask[rows, cols][..., None], repainted, original)
    weight = _feather_weight(window_mask, feather, rows, cols)
    band = (weight > 0) & (weight < 1)
    band_weight = weight[band][:, None]
    blended = np.rint(original[band] * (1.0 - band_weight) + repainted[band] * band_weight)
    target[band] = np.clip(blended, 0, 255).astype(np.uint8)
    return out


def _feather_weight(mask: np.ndarray, feather: int, rows: slice, cols: slice) -> np.ndarray:
    """Blend weight over mask[rows, cols]: min(distance to the nearest unmasked pixel / feather, 1), 0 off the mask.

    Computed tile by tile with a `feather`-wide halo: any unmasked pixel close enough to matter lies in the halo,
    so the result equals a whole-window distance transform, but tiles deep inside the mask cost nothing.
    """
    weight = mask[rows, cols].astype(np.float32)
    if feather == 0:
        return weight
    height, width = mask.shape
    for top in range(rows.start, rows.stop, _FEATHER_TILE):
        for left in range(cols.start, cols.stop, _FEATHER_TILE):
            bottom, right = min(top + _FEATHER_TILE, rows.stop), min(left + _FEATHER_TILE, cols.stop)
            if not mask[top:bottom, left:right].any():
                continue
            y0, x0 = max(top - feather, 0), max(left - feather, 0)
            neighbourhood = mask[y0 : min(bottom + feather, height), x0 : min(right + feather, width)]
            if neighbourhood.all():
                continue
            distance = ndimage.distance_transform_edt(neighbourhood)[top - y0 : bottom - y0, left - x0 : right - x0]
            tile = (slice(top - rows.start, bottom - rows.start), slice(left - cols.start, right - cols.start))
            weight[tile] = np.minimum(distance / feather, 1.0)
    return weight


# --- encoding -----------------------------------------------------------------------------------


def check_output(fmt: str, height: int, width: int) -> None:
    """Refuse an output format that cannot hold the image, before any work is spent on it."""
    if fmt not in OUTPUT_FORMATS:
        allowed = ", ".join(OUTPUT_FORMATS)
        raise UnsupportedOutputFormat(f"output format {fmt!r} is not supported; use one of: {allowed}")
    side = max(height, width)
    fitting = [f for f in OUTPUT_FORMATS if side <= MAX_OUTPUT_SIDE.get(f, side)]
    if fmt not in fitting:
        raise ImageTooLarge(
            f"{fmt} output is limited to {MAX_OUTPUT_SIDE[fmt]} pixels per side but the image is {width}x{height}; "
            f"ask for {' or '.join(fitting)}"
        )


def encode_image(rgb: np.ndarray, alpha: np.ndarray | None, fmt: str, quality: int = 95) -> bytes:
    """Encode the final image; alpha is kept where the format can store it (png, webp) and dropped for jpeg."""
    fmt = fmt.lower()
    check_output(fmt, *rgb.shape[:2])
    if alpha is not None and fmt != "jpeg":
        image = Image.fromarray(np.dstack([rgb, alpha]).astype(np.uint8))
    else:
        image = Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8))
    buffer = io.BytesIO()
    if fmt == "png":
        image.save(buffer, format="PNG", compress_level=1)
    elif fmt == "jpeg":
        image.save(buffer, format="JPEG", quality=quality)
    else:
        image.save(buffer, format="WEBP", quality=quality, lossless=False)
    return buffer.getvalue()
