"""The reply's format from Accept: q-values, case, wildcards, and a format that cannot hold the image."""

import io
import time

import numpy as np
import pytest
from PIL import Image

from engines import imaging
from serve.negotiation import MAX_RANGES, media_ranges, output_format, wants_json

BROWSER = "image/avif,image/webp,image/apng,image/svg+xml,image/*,*/*;q=0.8"


@pytest.mark.parametrize(
    ("accept", "source", "expected"),
    [
        ("", "png", "png"),
        ("*/*", "jpeg", "jpeg"),
        ("image/*", "webp", "webp"),
        ("*/*", "gif", "png"),  # the upload's format cannot be written back: PNG
        ("image/jpeg", "png", "jpeg"),
        ("IMAGE/JPEG", "png", "jpeg"),  # media types are case-insensitive: this gave the upload's PNG
        ("image/png;q=0, image/jpeg", "png", "jpeg"),  # q=0 refuses a type: PNG was sent anyway
        ("image/png;q=0.2, image/jpeg;q=0.9", "png", "jpeg"),
        ("image/png, image/jpeg", "jpeg", "jpeg"),  # a tie goes to the upload's own format
        ("image/webp, */*;q=0.8", "png", "webp"),
        (BROWSER, "png", "webp"),
        ("image/png;q=0, image/jpeg;q=0, image/webp;q=0", "jpeg", "jpeg"),  # every type refused: no 406
        ("text/html, application/xhtml+xml", "jpeg", "jpeg"),
        ("image/jpeg;q=nan, image/png;q=2", "webp", "webp"),  # not a q-value: the range is left out
    ],
)
def test_the_reply_is_the_image_type_the_client_prefers(accept, source, expected):
    assert output_format(None, accept, source, 480, 640) == expected


def test_a_format_that_cannot_hold_the_image_is_passed_over_unless_asked_for():
    """A browser's Accept made a 17000 px wide PNG upload fail with 413 "webp output is limited to 16383 pixels"."""
    assert output_format(None, BROWSER, "png", 40, 17000) == "png"
    assert output_format(None, "image/webp, image/jpeg;q=0.5", "png", 40, 17000) == "jpeg"
    assert output_format("webp", BROWSER, "png", 40, 17000) == "webp", "output_format is the client's word: its 413"


@pytest.mark.parametrize(
    ("accept", "source", "expected"),
    [
        ("image/jpeg, image/png;q=0.9", "png", "png"),  # was JPEG: the alpha dropped, what it hid shown
        ("image/jpeg, image/webp;q=0.5", "png", "webp"),
        ("image/jpeg", "webp", "webp"),  # nothing acceptable holds it: the upload's format, as for a size
        ("image/jpeg", "gif", "png"),
    ],
)
def test_jpeg_is_passed_over_for_an_image_with_alpha_unless_asked_for(accept, source, expected):
    assert output_format(None, accept, source, 480, 640, alpha=True) == expected
    assert output_format(None, accept, source, 480, 640) == "jpeg", "an opaque image"
    assert output_format("jpeg", accept, source, 480, 640, alpha=True) == "jpeg", "output_format is the client's word"


@pytest.mark.parametrize(
    ("accept", "json"),
    [
        ("application/json", True),
        ("Application/JSON", True),  # was the image
        ("application/json, */*", True),
        ("application/json;q=0, image/*", False),  # was JSON
        ("application/json, image/png", False),  # both named outright: the image, as before
        ("application/json;q=0.5, image/png;q=0.4", True),
        ("application/json;q=0.5, image/*", False),  # images preferred, if only by a wildcard: was JSON
        ("application/json;q=0.5, */*", False),
        ("image/*;q=0.5, application/json", True),
        ("*/*", False),
        ("application/*", False),
        ("", False),
    ],
)
def test_the_json_reply_is_given_where_json_is_preferred(accept, json):
    chosen = imaging.MEDIA_TYPES[output_format(None, accept, "png", 480, 640)]
    assert wants_json(accept, chosen) is json


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        ("image/jpeg, application/json;q=0.5", "json"),  # was image/png, which the client never accepted
        ("image/jpeg;q=1, image/png;q=0, application/json;q=0.5", "json"),  # was image/png, refused outright
        ("image/jpeg, image/png;q=0.4, application/json;q=0.5", "json"),
        ("image/jpeg, image/png;q=0.6, application/json;q=0.5", "png"),
        ("image/jpeg, application/json;q=0", "png"),  # nothing acceptable: the image, no 406 (as output_format)
        ("image/jpeg", "png"),
    ],
)
def test_json_is_set_against_the_format_chosen_not_one_that_cannot_hold_the_image(accept, expected):
    chosen = output_format(None, accept, "png", 480, 640, alpha=True)
    answer = "json" if wants_json(accept, imaging.MEDIA_TYPES[chosen]) else chosen
    assert answer == expected


@pytest.mark.timing
def test_a_huge_accept_header_costs_a_bounded_parse():
    header = ",".join(["image/png;q=0.1"] * 100_000)
    started = time.perf_counter()
    assert len(media_ranges(header)) == MAX_RANGES
    assert output_format(None, header, "jpeg", 10, 10) == "png"
    assert time.perf_counter() - started < 0.5


@pytest.mark.parametrize("pil_format", imaging.ACCEPTED_FORMATS)
def test_without_a_format_asked_for_an_upload_comes_back_in_its_own_if_it_can_else_png(pil_format):
    """negotiation.DEFAULT, which the docs quote: they said "the input's format" while a GIF came back as PNG."""
    buffer = io.BytesIO()
    Image.fromarray(np.full((48, 64, 3), 90, np.uint8)).save(buffer, format=pil_format)
    decoded = imaging.decode_image(buffer.getvalue(), imaging.DecodeLimits())
    expected = pil_format.lower() if pil_format in ("PNG", "JPEG", "WEBP") else "png"
    for accept in ("", "*/*", "text/html"):
        assert output_format(None, accept, decoded.format, 48, 64) == expected, accept
