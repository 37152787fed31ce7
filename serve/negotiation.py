"""What a removal answers in, from the request's Accept header (RFC 9110 12.5.1): media ranges with q-values.

Media types are case-insensitive; a q of 0 refuses a type; the most specific range naming a type gives its q
(`image/png` over `image/*` over `*/*`). The output format is the image type the client prefers among those that
can hold the image (WebP stops at 16383 px a side; JPEG has no alpha channel), ties going to a type named outright,
then to the upload's own format; an Accept that names no image type, or refuses every one, leaves DEFAULT (RFC
9110 lets a server answer what it can rather than 406). `output_format` in the request overrides all
of this.
"""

from __future__ import annotations

import math

from engines import imaging

DEFAULT = "the input's format if it is PNG, JPEG or WebP, else PNG"
"""What `output_format` answers without a request's format or an Accept that names one, in words (the docs')."""
MAX_RANGES = 64  # an Accept header is bounded by the proxy's header limit; this bounds the work on one
JSON = "application/json"


def media_ranges(accept: str) -> list[tuple[str, float]]:
    """(media range, q) in the header's order, lower-cased; a q that is not a number in [0, 1] refuses the range."""
    ranges = []
    for item in accept.split(",", MAX_RANGES)[:MAX_RANGES]:
        kind, *parameters = (part.strip() for part in item.split(";"))
        if "/" not in kind:
            continue
        q = 1.0
        for parameter in parameters:
            name, _, value = parameter.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value.strip())
                except ValueError:
                    q = 0.0
                q = q if math.isfinite(q) and 0.0 <= q <= 1.0 else 0.0
        ranges.append((kind.lower(), q))
    return ranges


def quality(ranges: list[tuple[str, float]], media_type: str) -> tuple[float, int]:
    """The q the most specific matching range gives `media_type`, and how specific it is: 2 the type itself,
    1 `type/*`, 0 `*/*`, -1 no range matches (q 0)."""
    family = media_type.split("/")[0] + "/*"
    best = (0.0, -1)
    for media_range, q in ranges:
        specificity = {media_type: 2, family: 1, "*/*": 0}.get(media_range, -1)
        if specificity > best[1]:
            best = (q, specificity)
    return best


def output_format(
    requested: str | None, accept: str, source_format: str | None, height: int, width: int, alpha: bool = False
) -> str:
    """`requested` (the request's output_format) if given, else the format the Accept header prefers (above).
    `alpha`: the result has an alpha channel."""
    if requested:
        return requested
    holds = source_format in imaging.OUTPUT_FORMATS and _holds(source_format, height, width, alpha)
    default = source_format if holds else "png"
    ranges = media_ranges(accept)
    preference = [default, *(fmt for fmt in imaging.OUTPUT_FORMATS if fmt != default)]
    ranked = []
    for order, fmt in enumerate(preference):
        q, specificity = quality(ranges, imaging.MEDIA_TYPES[fmt])
        if q > 0 and _holds(fmt, height, width, alpha):
            ranked.append((q, specificity == 2, -order, fmt))
    return max(ranked)[-1] if ranked else default


def wants_json(accept: str, media_type: str) -> bool:
    """The JSON reply (the image in base64) when the header names application/json outright with a higher q than
    `media_type` (the image type the reply is in, from output_format) gets, or the same q where that type gets it
    only from a wildcard (`application/json, */*`); a tie with the type named outright keeps the image bytes. Set
    against the type chosen, not the best image type: `image/jpeg, application/json;q=0.5` for an image with alpha
    answered image/png, which the client never accepted. Where neither is acceptable the image bytes go (no 406,
    as output_format)."""
    ranges = media_ranges(accept)
    json_q, specificity = quality(ranges, JSON)
    image_q, image_specificity = quality(ranges, media_type)
    if specificity != 2 or json_q == 0:
        return False
    return json_q > image_q or (json_q == image_q and image_specificity < 2)


def _holds(fmt: str, height: int, width: int, alpha: bool) -> bool:
    if alpha and fmt not in imaging.KEEPS_ALPHA:
        return False
    try:
        imaging.check_output(fmt, height, width)
    except imaging.InputError:
        return False
    return True
