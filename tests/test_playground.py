"""The playground page (serve/playground.py, serve/static/playground.html): its policy offline, the page in
headless Chromium against a stand-in for the service (the test answers its requests; /remove decodes with the
service's own engines.imaging), then a person's session against the local Serve: choose a photo larger than the
view, paint with the mouse (brush, eraser, undo), Remove, compare, download, try another seed, rate the result,
and errors told in words."""

from __future__ import annotations

import base64
import hashlib
import io
import re
from email.parser import BytesParser
from email.policy import HTTP

import numpy as np
import pytest
from PIL import Image, ImageDraw
from scipy import ndimage

from engines import imaging
from engines.errors import InputError
from serve.config import ImagingSettings, RetentionSettings
from serve.page_headers import page_html
from serve.playground import PLAYGROUND_PAGE, playground_headers, playground_page
from serve.problems import Problem
from serve.protocol import MAX_SEED
from serve.quotas import CONCURRENCY, RATE, Decision, Limits
from serve.retention.keeper import ANNOTATION_PAGE
from tests.helpers import PAGE_ORIGIN, answer_offline, encoded, fulfill_problem, png_bytes

BRUSH_CSS = 40  # the page's default brush size, in CSS pixels
SLACK = 20 + 3  # imaging.dilate's default (the service grows the mask by it) plus antialiasing


def _policy(headers: dict[str, str]) -> dict[str, list[str]]:
    directives = [part.split() for part in headers["Content-Security-Policy"].split(";") if part.strip()]
    return {name: sources for name, *sources in directives}


def _inline(tag: str, html: str) -> str:
    return re.search(rf"<{tag}>(.*?)</{tag}>", html, flags=re.DOTALL).group(1)


def _hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def _annotation_page() -> tuple[str, dict[str, str]]:
    from serve.retention.keeper import annotation_page

    html, headers = annotation_page()
    return html, dict(headers)


def _annotation_page_headers() -> dict[str, str]:
    return _annotation_page()[1]


@pytest.mark.parametrize(
    "page, headers",
    [(PLAYGROUND_PAGE, playground_headers), (ANNOTATION_PAGE, _annotation_page_headers)],
    ids=["playground", "annotate"],
)
def test_the_page_allows_only_its_own_script_and_style_and_names_no_other_origin(page, headers):
    # both pages read the API key from the browser's storage: no inline script but their own may ever run
    policy = _policy(headers())
    html = page_html(page)  # with static/shared.js written in
    assert headers()["X-Content-Type-Options"] == "nosniff" and headers()["Cache-Control"] == "no-store"
    assert policy["default-src"] == ["'none'"] and policy["connect-src"] == ["'self'"]
    assert policy["script-src"] == [_hash(_inline("script", html))], "only the page's own script, by its hash"
    assert policy["style-src"] == [_hash(_inline("style", html))]
    for sources in policy.values():
        assert not {"'unsafe-inline'", "'unsafe-eval'", "*", "data:", "http:", "https:"} & set(sources)
    assert policy["frame-ancestors"] == ["'none'"] and policy["base-uri"] == ["'none'"]
    assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/", html, flags=re.IGNORECASE), (
        "no CDN, no external request"
    )
    assert not re.search(r"<script[^>]*\bsrc=|<link|@import|url\(", html), "nothing loaded from elsewhere"


def test_the_playground_keeps_its_hashed_script_in_every_retention_mode():
    html = page_html(PLAYGROUND_PAGE)
    modes = {
        "off": RetentionSettings(),
        "ask": RetentionSettings(enabled=True),
        "always": RetentionSettings(enabled=True, default_retain=True),
    }
    for mode, settings in modes.items():
        page = playground_page(settings, ImagingSettings(max_megapixels=12.5))
        assert f'<body data-state="empty" data-retention="{mode}" ' in page
        assert (
            'data-accepted-formats="png jpeg webp gif bmp tiff" data-max-megapixels="12.5"'
            f' data-max-upload-bytes="{ImagingSettings().max_upload_bytes}" data-max-seed="{MAX_SEED}"'
            ' data-tiny="false">'
        ) in page
        assert _inline("script", page) == _inline("script", html), "the served page keeps the hashed script"


# ---- in the browser, against a stand-in for the service ----------------------------------------------


class StandIn:
    """The service's answers to the page, from the test's process. /remove reads the photo and the mask with
    the service's own decoding (the photo upright by its EXIF orientation, the mask's size checked against it)
    and answers the photo with the masked pixels black; a test sets what else it needs."""

    def __init__(self):
        self.masks: list[np.ndarray] = []  # each removal's mask, as the service reads it
        self.mask_files: list[bytes] = []  # and as the page sent it
        self.seeds: list[bytes | None] = []  # each removal's seed field
        self.remove_problem: Problem | None = None
        self.feedback_problem: Problem | None = None
        self.held: list = []  # removals left unanswered while `hold` is set
        self.hold = False

    def __call__(self, route, path: str) -> None:
        if path == "/remove":
            if self.hold:
                self.held.append(route)
            else:
                self.remove(route)
        elif path == "/feedback":
            if self.feedback_problem is not None:
                fulfill_problem(route, self.feedback_problem)
            else:
                route.fulfill(status=201, content_type="application/json", body="{}")
        else:
            fulfill_problem(route, Problem("not-found", f"no route {path}"))

    def remove(self, route) -> None:
        if self.remove_problem is not None:
            fulfill_problem(route, self.remove_problem)
            return
        fields = _form_fields(route.request)
        try:
            photo = imaging.decode_image(fields["image"], imaging.DecodeLimits())
            mask = imaging.decode_mask(fields["mask"], photo.rgb.shape[:2], imaging.DecodeLimits())
        except InputError as error:
            fulfill_problem(route, Problem.from_input_error(error))
            return
        self.masks.append(mask)
        self.mask_files.append(fields["mask"])
        self.seeds.append(fields.get("seed"))
        result = photo.rgb.copy()
        result[mask] = 0
        headers = {"X-Seed": "7", "X-Removal-Score": "0.900", "X-Gate": "passed"}
        if fields.get("retain") == b"true":
            headers["X-Result-Id"] = "b" * 32
        route.fulfill(status=200, headers={**headers, "Content-Type": "image/png"}, body=png_bytes(result))


def _wait_until_held(page, stand_in: StandIn, count: int) -> None:
    """Until `count` removals are held: the page sends one only once the mask's PNG is made, which a busy machine
    can take a while to do after the click (and the stand-in sees it only while playwright is called)."""
    for _ in range(500):
        if len(stand_in.held) >= count:
            return
        page.wait_for_timeout(20)
    raise AssertionError(f"{len(stand_in.held)} of {count} removals reached the service in 10 s")


def _form_fields(request) -> dict[str, bytes]:
    """A multipart/form-data body by field name."""
    head = f"Content-Type: {request.headers['content-type']}\r\n\r\n".encode()
    message = BytesParser(policy=HTTP).parsebytes(head + request.post_data_buffer)
    parts = message.iter_parts()
    return {part.get_param("name", header="content-disposition"): part.get_payload(decode=True) for part in parts}


def _open_offline(
    browser,
    stand_in: StandIn,
    imaging_settings: ImagingSettings | None = None,
    *,
    viewport: tuple[int, int] = (1280, 900),
    retention: RetentionSettings | None = None,
    prefix: str = "",
):
    """The playground as the service serves it (results kept when asked, unless `retention` says otherwise), its API
    answered by `stand_in` (paths without the route `prefix`); the annotation page is served next to it."""
    page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]}, accept_downloads=True)
    html = playground_page(retention or RetentionSettings(enabled=True), imaging_settings or ImagingSettings())
    pages = {prefix + "/playground": (html, playground_headers()), prefix + "/annotate": _annotation_page()}
    answer_offline(page, pages, lambda route, path: stand_in(route, path.removeprefix(prefix)))
    problems = _problems_of(page)
    page.goto(PAGE_ORIGIN + prefix + "/playground")
    page.wait_for_selector("body[data-state=empty]")
    return page, problems


def _open_and_paint(page, name: str) -> None:
    """A 320 x 240 photo opened and a stroke painted across it: ready for Remove."""
    _choose(page, name, png_bytes(_big_photo(320, 240)), "image/png")
    page.wait_for_selector("body[data-state=editing]")
    _stroke(page, page.locator("#mask").bounding_box(), [(0.3, 0.3), (0.6, 0.6)])


def _error_says(page, expected: str) -> str:
    page.wait_for_function(
        "text => { const s = document.querySelector('#status');"
        " return s.classList.contains('error') && s.textContent.includes(text); }",
        arg=expected,
        timeout=10_000,
    )
    return page.inner_text("#status")


def test_a_photo_the_service_would_refuse_is_refused_when_opened(browser):
    # the page's limits are the service's settings, written into the page by the server
    page, problems = _open_offline(browser, StandIn(), ImagingSettings(max_megapixels=0.05))
    assert page.is_hidden("#tiny-note"), "a real bundle: no note"
    svg = b'<svg xmlns="http://www.w3.org/2000/svg" width="300" height="200"><rect width="300" height="200"/></svg>'
    icon = encoded(Image.new("RGB", (32, 32), "teal"), "ICO")
    for name, data, mime in [("drawing.svg", svg, "image/svg+xml"), ("icon.ico", icon, "image/x-icon")]:
        _choose(page, name, data, mime)
        said = _error_says(page, f'"{name}" ({mime}) is not a format the service accepts')
        assert "(PNG, JPEG, WEBP, GIF, BMP, TIFF)" in said
        assert page.get_attribute("body", "data-state") == "empty", "nothing to paint"

    _choose(page, "wide.png", png_bytes(_big_photo(300, 200)), "image/png")  # 0.06 megapixels
    _error_says(page, '"wide.png" is 300 × 200 px (0.1 megapixels); the service takes photos of up to 0.05 megapixels')
    assert page.get_attribute("body", "data-state") == "empty"
    _choose(page, "named.gif", png_bytes(_big_photo(250, 200)), "image/gif")  # a PNG, whatever its name says
    page.wait_for_selector("body[data-state=editing]")
    assert problems == [], problems


def test_a_photo_over_the_byte_limit_is_refused_when_opened_and_with_its_mask_before_it_is_sent(browser):
    """The page sent a photo over the service's byte limit whole, for a 413 after the upload."""
    photo = png_bytes(_big_photo(320, 240))
    stand_in = StandIn()
    page, problems = _open_offline(browser, stand_in, ImagingSettings(max_upload_bytes=len(photo) - 1))
    _choose(page, "heavy.png", photo, "image/png")
    said = _error_says(page, f'"heavy.png" is {round(len(photo) / 1024)} KiB; the service takes uploads of up to ')
    assert f"up to {round((len(photo) - 1) / 1024)} KiB (the photo and the mask together)" in said, "one unit for both"
    assert page.get_attribute("body", "data-state") == "empty"

    page, problems = _open_offline(browser, stand_in, ImagingSettings(max_upload_bytes=len(photo) + 64))
    _choose(page, "heavy.png", photo, "image/png")  # opens: the photo alone fits, its mask (a PNG) will not
    page.wait_for_selector("body[data-state=editing]")
    _stroke(page, page.locator("#mask").bounding_box(), [(0.3, 0.3), (0.6, 0.6)])
    page.click("#remove")
    _error_says(page, "The photo and its mask come to")
    assert stand_in.masks == [] and problems == [], "nothing sent"
    assert page.is_enabled("#remove"), "the page is not left busy"


def test_a_webp_with_an_exif_orientation_is_shown_and_painted_upright_as_the_service_reads_it(browser):
    """The service turns every photo upright by its EXIF orientation; Chromium shows a WebP as stored. The page
    turns it: the mask it sends must be the upright size, painted where the person painted on the upright view."""
    from PIL import ImageOps

    stored = Image.new("RGB", (240, 120))
    for (x, y), colour in zip([(0, 0), (120, 0), (0, 60), (120, 60)], ["red", "lime", "blue", "yellow"]):
        stored.paste(colour, (x, y, x + 120, y + 60))  # one colour a quadrant: each orientation shows them apart
    quarters = [(0.25, 0.25), (0.75, 0.25), (0.25, 0.75), (0.75, 0.75)]
    stand_in = StandIn()
    page, problems = _open_offline(browser, stand_in)
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        data = encoded(stored, "WEBP", lossless=True, exif=exif.tobytes())
        upright = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
        _choose(page, f"turned{orientation}.webp", data, "image/webp")
        page.wait_for_function(
            "name => document.querySelector('#photo-info').textContent.startsWith(name)",
            arg=f"turned{orientation}.webp",
        )
        info = page.inner_text("#photo-info")
        assert info.endswith(f"{upright.width} × {upright.height} px, 1 KiB"), "not 0.0 MiB, nor KB"
        shown = page.locator("#photo").evaluate(
            "(c, quarters) => quarters.map(([fx, fy]) => Array.from(c.getContext('2d')"
            ".getImageData(Math.floor(fx * c.width), Math.floor(fy * c.height), 1, 1).data).slice(0, 3))",
            quarters,
        )
        expected = [list(upright.getpixel((int(fx * upright.width), int(fy * upright.height)))) for fx, fy in quarters]
        assert shown == expected, f"orientation {orientation}: the photo is shown upright"

        _stroke(page, page.locator("#mask").bounding_box(), [(0.1, 0.15), (0.3, 0.15)])
        count = int(page.get_attribute("#outcome", "data-count"))
        page.click("#remove")
        page.wait_for_selector(f"#outcome[data-count='{count + 1}']", timeout=10_000)
        mask = stand_in.masks[-1]
        assert mask.shape == (upright.height, upright.width), "the service read the mask (upright size)"
        rows, cols = np.nonzero(mask)
        assert rows.max() < 0.5 * upright.height and cols.max() < 0.5 * upright.width, (
            f"orientation {orientation}: the mask is where the stroke was, on the upright photo"
        )
    assert problems == [], problems


def test_a_visible_stroke_on_a_tiny_photo_is_painted_in_the_mask_the_service_reads(browser):
    """An 8 x 8 photo is shown about 75 times enlarged: the default brush (40 CSS px) is half an image pixel, its
    stroke anti-aliased to alpha the service reads as unpainted (> 127 is painted)."""
    stand_in = StandIn()
    page, problems = _open_offline(browser, stand_in)
    _choose(page, "tiny.png", png_bytes(_big_photo(8, 8)), "image/png")
    page.wait_for_selector("body[data-state=editing]")
    box = page.locator("#mask").bounding_box()
    assert box["width"] > 400, "greatly enlarged"
    _stroke(page, box, [(0.3, 0.45), (0.7, 0.45)])
    page.click("#remove")
    page.wait_for_selector("#outcome[data-count='1']", timeout=10_000)
    sent = np.asarray(Image.open(io.BytesIO(stand_in.mask_files[-1])).convert("RGBA"))
    assert set(np.unique(sent[..., 3])) <= {0, 255}, "each pixel painted or clear: no partial alpha"
    painted = stand_in.masks[-1]
    assert painted[3:5, 3:5].all() and painted.sum() <= 8 * 3, "the stroke, at least 2 image pixels wide"
    assert not painted[:2].any() and not painted[6:].any()
    assert problems == [], problems


def test_a_refusal_by_the_keys_quota_is_told_apart_from_a_busy_service(browser):
    stand_in = StandIn()
    page, problems = _open_offline(browser, stand_in)
    _open_and_paint(page, "photo.png")
    refusals = [  # the service's own refusals, and what the page says after their detail
        (Decision("app", Limits(100, None, 60), False, remaining=0, reset_s=41.2, refused_by=RATE), ""),
        (Decision("app", Limits(100, None, 5), False, remaining=0, reset_s=4.5, refused_by=RATE), ""),
        (
            Decision("app", Limits(None, 2, 60), False, in_flight=2, refused_by=CONCURRENCY),
            ". This key has as many requests in progress as it may; try again in 1 s.",
        ),
    ]
    for decision, hint in refusals:
        with pytest.raises(Problem) as refused:
            decision.check()
        stand_in.remove_problem = refused.value
        page.click("#remove")
        said = _error_says(page, f"The removal failed (429): Too many requests; retry later: {refused.value.detail}")
        assert said.endswith(refused.value.detail + hint), said
        assert sum(said.count(words) for words in ("back in", "try again")) == 1, f"the wait is said once: {said}"

    stand_in.remove_problem = Problem("too-many-requests", "refused", headers={"Retry-After": "3"})
    page.click("#remove")
    said = _error_says(page, "The removal failed (429): Too many requests; retry later: refused.")
    assert said.endswith(". The service is busy; try again in 3 s."), "the replica's admission names no quota"
    assert problems == [], problems


def test_a_seed_past_the_services_largest_is_refused_naming_the_range_and_the_largest_is_sent(browser):
    """The page took any 19 digits: 9999999999999999999 was sent, for a 422, and its words named no largest seed."""
    stand_in = StandIn()
    page, problems = _open_offline(browser, stand_in)
    _open_and_paint(page, "photo.png")
    for refused in (str(MAX_SEED + 1), "9" * 19, "twelve", "-1"):
        page.fill("#seed", refused)
        page.click("#remove")
        _error_says(page, f"The seed must be a whole number from 0 to {MAX_SEED}, or blank for a random one.")
    assert stand_in.seeds == [], "nothing sent"
    page.fill("#seed", str(MAX_SEED))
    page.click("#remove")
    page.wait_for_selector("#outcome[data-count='1']", timeout=10_000)
    assert stand_in.seeds == [str(MAX_SEED).encode()]
    assert problems == [], problems


def test_a_photo_opened_during_a_removal_is_told_to_wait(browser):
    stand_in = StandIn()
    page, problems = _open_offline(browser, stand_in)
    _open_and_paint(page, "first.png")
    stand_in.hold = True
    page.click("#remove")
    page.wait_for_selector("body[data-busy=yes]")
    _choose(page, "second.png", png_bytes(_big_photo(160, 120)), "image/png")
    _error_says(page, 'Wait for the removal to finish, then open "second.png" again.')
    assert page.inner_text("#photo-info").startswith("first.png")
    assert page.get_attribute("#other", "aria-disabled") == "true", "'Other photo' looks unavailable"

    _wait_until_held(page, stand_in, 1)
    stand_in.hold = False
    stand_in.remove(stand_in.held.pop())
    page.wait_for_selector("#outcome[data-count='1']", timeout=10_000)
    assert page.get_attribute("#other", "aria-disabled") == "false"
    assert problems == [], problems


@pytest.mark.parametrize("how", ["button", "escape"])
def test_a_removal_can_be_stopped_which_closes_its_request_and_shows_nothing(browser, how):
    """A removal that took long could only be waited out (or the tab closed): Stop and Esc call it off, the request is
    closed (the service sees its client leave and drops the work) and a late answer shows nothing."""
    stand_in = StandIn()
    page, problems = _open_offline(browser, stand_in)
    _open_and_paint(page, "photo.png")
    assert page.is_hidden("#stop")
    stand_in.hold = True
    page.click("#remove")
    page.wait_for_selector("#stop", state="visible")
    _wait_until_held(page, stand_in, 1)  # stopped before the request goes out, there would be nothing to close
    with page.expect_event("requestfailed") as failed:
        if how == "button":
            page.click("#stop")
        else:
            page.keyboard.press("Escape")
    assert (failed.value.url, failed.value.failure) == (PAGE_ORIGIN + "/remove", "net::ERR_ABORTED")
    page.wait_for_selector("body[data-busy=no]")
    assert page.inner_text("#status").startswith("Stopped: nothing was removed"), page.inner_text("#status")
    assert "error" not in (page.get_attribute("#status", "class") or "")
    assert page.is_hidden("#stop") and page.is_enabled("#remove")
    page.wait_for_timeout(200)
    assert page.get_attribute("#outcome", "data-count") == "0", "the late answer is not shown"

    stand_in.hold = False
    page.click("#remove")
    page.wait_for_selector("#outcome[data-count='1']", timeout=10_000)
    assert page.is_hidden("#stop") and len(stand_in.masks) == 1

    stand_in.hold = True  # Try another, stopped: the result before stays, and the words say so
    page.click("#another")
    page.wait_for_selector("#stop", state="visible")
    _wait_until_held(page, stand_in, 2)
    page.click("#stop")
    page.wait_for_selector("body[data-busy=no]")
    assert page.inner_text("#status") == "Stopped: the result shown is still the one before."
    assert page.get_attribute("#outcome", "data-count") == "1" and page.is_visible("#comparison")
    assert problems == [], problems


def test_a_key_that_cannot_rate_is_told_so_and_the_rating_buttons_go(browser):
    stand_in = StandIn()
    stand_in.feedback_problem = Problem("forbidden", "the API key lacks the 'feedback' scope")
    page, problems = _open_offline(browser, stand_in)
    page.fill("#api-key", "rk_remove_only")
    _open_and_paint(page, "photo.png")
    page.check("#retain")
    page.click("#remove")
    page.wait_for_selector("#rate:not([hidden])", timeout=10_000)
    page.click("#yes")
    _error_says(page, "This API key cannot rate results")
    assert page.is_hidden("#rate"), "no Yes / No that cannot work"
    page.click("#another")
    page.wait_for_selector("#outcome[data-count='2']", timeout=10_000)
    assert page.is_hidden("#rate"), "nor for the key's next result"
    page.fill("#api-key", "rk_another")
    page.wait_for_selector("#rate:not([hidden])", timeout=2_000)  # another key may rate the result shown
    page.fill("#api-key", "rk_remove_only")
    assert page.is_hidden("#rate")
    page.fill("#api-key", "rk_another")
    page.click("#another")
    page.wait_for_selector("#outcome[data-count='3']", timeout=10_000)
    assert page.is_visible("#rate"), "another key may rate"
    assert problems == [], problems
    page.locator("#api-key").blur()  # a typed key is taken on change
    stored = page.evaluate("() => [localStorage.getItem('rorem.apiKey'), sessionStorage.getItem('rorem.apiKey')]")
    assert stored == [None, "rk_another"], "the key lives in this tab only, not in the origin's lasting storage"


def test_remove_pressed_while_another_photo_opens_sends_nothing_of_the_photo_shown_before(browser):
    """Remove pressed after choosing a photo, before the page had opened it, sent the photo shown before; its answer
    was then drawn over the new photo, to download as "<new>-removed.png". Here both happen in one task: the new
    photo cannot have opened in between."""
    stand_in = StandIn()
    page, problems = _open_offline(browser, stand_in)
    _open_and_paint(page, "first.png")
    stand_in.hold = True
    page.evaluate(
        """data => {
            const chosen = new DataTransfer();
            const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
            chosen.items.add(new File([bytes], "second.png", { type: "image/png" }));
            const input = document.querySelector("#file");
            input.files = chosen.files;
            input.dispatchEvent(new Event("change"));
            document.querySelector("#remove").click();
        }""",
        base64.b64encode(png_bytes(_big_photo(160, 120))).decode(),
    )
    page.wait_for_function("() => document.querySelector('#photo-info').textContent.startsWith('second.png')")
    assert page.get_attribute("body", "data-busy") == "no", "no removal of first.png under way, to land on second.png"
    assert page.get_attribute("body", "data-state") == "editing" and page.get_attribute("#download", "href") is None
    assert page.get_attribute("#outcome", "data-count") == "0", "no answer shown"

    stand_in.hold = False
    _stroke(page, page.locator("#mask").bounding_box(), [(0.3, 0.3), (0.6, 0.6)])
    page.click("#remove")
    page.wait_for_selector("#outcome[data-count='1']", timeout=10_000)
    assert stand_in.held == [] and len(stand_in.masks) == 1, "one removal sent"
    assert stand_in.masks[0].shape == (120, 160), "of second.png"
    assert page.get_attribute("#download", "download") == "second-removed.png"
    assert problems == [], problems


def test_a_result_this_browser_cannot_show_keeps_the_words_that_say_so(browser):
    """The page said "Done. Drag across the picture..." over its own warning that it cannot show the result."""

    def api(route, path):
        if path == "/remove":  # an image this browser cannot decode (JPEG XL's signature)
            headers = {"Content-Type": "image/jxl", "X-Seed": "7", "X-Removal-Score": "0.900", "X-Gate": "passed"}
            route.fulfill(status=200, headers=headers, body=b"\xff\x0a" + bytes(64))
        else:
            fulfill_problem(route, Problem("not-found", f"no route {path}"))

    page, problems = _open_offline(browser, api)
    _open_and_paint(page, "photo.png")
    page.click("#remove")
    page.wait_for_selector("#outcome[data-count='1']", timeout=10_000)
    assert page.inner_text("#status") == "This browser cannot show the result's format; use Download."
    assert "error" in page.get_attribute("#status", "class").split()
    assert page.get_attribute("#download", "href"), "the download is offered"
    assert problems == [], problems


def test_a_403_or_503_is_hinted_by_its_problem_type_and_only_a_scope_refusal_takes_the_rating_away(browser):
    """Every 403 was hinted "ask for a key with the needed scope", a host name or a request taken for another site's
    too; any 403 to a verdict took Yes / No away for the key; a request cut by a draining instance was hinted "The
    service is busy or starting"."""
    stand_in = StandIn()
    page, problems = _open_offline(browser, stand_in)
    _open_and_paint(page, "photo.png")
    hints = {
        "host-not-allowed": "Open the page at a host name the service answers",
        "cross-site-request": "The service took this for another site's request",
        "forbidden": "Ask for a key with the needed scope",
        "stopping": "The service is being stopped or restarted; try again in 2 s.",
        "overloaded": "The service is busy or starting; try again in 2 s.",
    }
    for slug, hint in hints.items():
        kind = Problem(slug, "").kind
        stand_in.remove_problem = Problem(slug, "refused", headers={"Retry-After": "2"} if kind.status == 503 else None)
        page.click("#remove")
        said = _error_says(page, f"The removal failed ({kind.status}): {kind.title}: refused. {hint}")
        assert ("Ask for a key" in said) == (slug == "forbidden"), said
        assert ("busy" in said) == (slug == "overloaded"), said

    stand_in.remove_problem = None
    page.check("#retain")
    page.click("#remove")
    page.wait_for_selector("#rate:not([hidden])", timeout=10_000)
    stand_in.feedback_problem = Problem("host-not-allowed", "the Host 'gpu-box:8000' is not one this service answers")
    page.click("#yes")
    _error_says(page, "Your verdict was not saved (403): This host name is not served here")
    assert page.is_visible("#rate"), "a host name refused, not the key: Yes / No stay"
    stand_in.feedback_problem = Problem("forbidden", "the API key lacks the 'feedback' scope")
    page.click("#yes")
    _error_says(page, "This API key cannot rate results")
    assert page.is_hidden("#rate")
    assert problems == [], problems


def test_a_key_with_a_character_no_key_has_is_told_so_and_nothing_is_sent(browser):
    """A key pasted with a zero-width space made fetch() throw building the header: "the service cannot be
    reached ... is it running?"."""
    stand_in = StandIn()
    page, problems = _open_offline(browser, stand_in)
    sent = []
    page.on("request", lambda request: sent.append(request.url) if request.url.endswith("/remove") else None)
    page.fill("#api-key", "rk_abc123\u200b")
    _open_and_paint(page, "photo.png")
    page.click("#remove")
    said = _error_says(page, "The removal failed: the API key has a character no key has (U+200B, character 10 of 10)")
    assert "reached" not in said and sent == [] and stand_in.masks == []
    assert page.is_enabled("#remove")
    assert problems == [], problems


def test_the_editor_is_in_the_accessibility_tree_and_says_painting_needs_a_pointer(browser):
    page, problems = _open_offline(browser, StandIn())
    _open_and_paint(page, "photo.png")
    editor = page.get_by_role("img", name=re.compile("painting the region to remove needs a mouse, pen or touch"))
    assert editor.count() == 1 and editor.get_attribute("id") == "editor"
    page.focus("#size")
    page.keyboard.press("Shift+Tab")  # the editor comes before the tools in the tab order
    for _ in range(12):
        if page.evaluate("document.activeElement.id") == "editor":
            break
        page.keyboard.press("Shift+Tab")
    assert page.evaluate("document.activeElement.id") == "editor", "the editor can be reached with the keyboard"
    assert problems == [], problems


def test_a_webp_is_not_turned_again_where_the_browser_turns_it_itself(browser):
    """The page took a WebP's shown size against its stored size for whether the browser had turned it: equal for
    orientations 2-4 and for a square photo, so a browser that turns WebPs itself got them turned twice. It asks
    once, of a tiny built-in WebP."""
    from PIL import ImageOps

    page, problems = _open_offline(browser, StandIn())
    assert page.evaluate("() => browserTurnsWebp()") is False, "Chromium shows a WebP as stored"
    turned = Image.open(io.BytesIO(base64.b64decode(page.evaluate("() => TURNED_WEBP"))))
    assert turned.size == (2, 1) and ImageOps.exif_transpose(turned).size == (1, 2), "the probe a quarter turned"
    orientations = (
        "async (data) => { const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));"
        " return webpOrientation(new Blob([bytes])); }"
    )
    for size, orientation in [((240, 120), 3), ((200, 200), 6), ((240, 120), 6)]:
        exif = Image.Exif()
        exif[0x0112] = orientation
        data = base64.b64encode(encoded(Image.new("RGB", size, "teal"), "WEBP", exif=exif.tobytes())).decode()
        assert page.evaluate(orientations, data) == orientation, "this browser leaves it to the page"
        page.evaluate("() => { browserTurnsWebp.answer = Promise.resolve(true); }")  # as a browser that turns it
        assert page.evaluate(orientations, data) == 1, f"{size}, orientation {orientation}: not turned again"
        page.evaluate("() => { browserTurnsWebp.answer = Promise.resolve(false); }")
    assert problems == [], problems


# A canvas of the given size gets no context, as iOS Safari answers one over 16.7 megapixels
_NO_CONTEXT_AT = """(size) => {
  const getContext = HTMLCanvasElement.prototype.getContext;
  HTMLCanvasElement.prototype.getContext = function (...args) {
    return this.width === size[0] && this.height === size[1] ? null : getContext.apply(this, args);
  };
}"""


def test_a_photo_larger_than_a_canvas_this_browser_makes_is_refused_in_words(browser):
    """getContext() answers null for a canvas larger than the browser holds (iOS: 16.7 megapixels): a TypeError."""
    stand_in = StandIn()
    page, problems = _open_offline(browser, stand_in)
    page.evaluate(_NO_CONTEXT_AT, [120, 240])  # the upright size of a 240 x 120 WebP turned a quarter
    exif = Image.Exif()
    exif[0x0112] = 6
    _choose(
        page, "turned.webp", encoded(Image.new("RGB", (240, 120), "teal"), "WEBP", exif=exif.tobytes()), "image/webp"
    )
    _error_says(page, '"turned.webp" cannot be opened here: this browser cannot draw a picture of 120 × 240 px')
    assert page.get_attribute("body", "data-state") == "empty" and page.get_attribute("body", "data-busy") == "no"

    page.evaluate(_NO_CONTEXT_AT, [320, 240])  # the mask, made at the photo's size
    _open_and_paint(page, "photo.png")
    page.click("#remove")
    _error_says(page, "The removal failed: this browser cannot draw a picture of 320 × 240 px")
    assert stand_in.masks == [] and page.is_enabled("#remove")
    assert problems == [], problems


def test_the_results_bitmap_is_closed_when_another_replaces_it(browser):
    """state.after (the result at the view's size) was replaced without close(): its pixels stayed until collected."""
    page, problems = _open_offline(browser, StandIn())
    page.evaluate(
        "() => { const made = window.bitmaps = []; const create = window.createImageBitmap;"
        " window.createImageBitmap = async (...args) => { const b = await create(...args); made.push(b); return b; }; }"
    )
    _open_and_paint(page, "photo.png")
    for count, button in [(1, "#remove"), (2, "#another"), (3, "#another")]:
        page.click(button)
        page.wait_for_selector(f"#outcome[data-count='{count}']", timeout=10_000)
    page.set_viewport_size({"width": 1000, "height": 800})  # drawn again at the new size
    page.wait_for_function("() => window.bitmaps.length === 4")
    open_ = "() => window.bitmaps.map((b) => b.width > 0)"
    assert page.evaluate(open_) == [False, False, False, True], "only the bitmap shown is open"
    _choose(page, "other.png", png_bytes(_big_photo(160, 120)), "image/png")
    page.wait_for_function("() => document.querySelector('#photo-info').textContent.startsWith('other.png')")
    assert page.evaluate(open_) == [False] * 4, "closed with its result"
    assert problems == [], problems


def test_a_mask_whose_paint_is_all_erased_is_nothing_painted_and_nothing_is_sent(browser):
    """The page took "any brush stroke" for "something painted": painted then erased away, it sent the mask (the
    stroke's edge pixels, a little alpha left by the eraser, sent as painted), for a 200 that removed nothing there
    is to see."""
    stand_in = StandIn()
    page, problems = _open_offline(browser, stand_in)
    _open_and_paint(page, "photo.png")  # from (0.3, 0.3) to (0.6, 0.6)
    box = page.locator("#mask").bounding_box()
    page.click("#eraser")
    _stroke(page, box, [(0.3, 0.3), (0.45, 0.45)])  # the brush's size, over the brush's path
    _stroke(page, box, [(0.45, 0.45), (0.6, 0.6)])
    page.click("#remove")
    said = _error_says(page, "Nothing is painted yet: paint over the object with the brush first.")
    assert said == page.inner_text("#status") and stand_in.masks == [], "as for a mask never painted: nothing sent"
    assert page.get_attribute("body", "data-busy") == "no" and page.is_enabled("#remove")
    assert problems == [], problems


def test_an_answer_that_removed_nothing_is_not_called_done(browser):
    """The service's 200 `X-Gate: nothing-to-remove` (an empty mask, as the API may send one) was headed "Done. Drag
    across the picture (or the slider) to compare before and after." over "Nothing was painted, so the photo came
    back unchanged."."""

    def nothing(route, path):  # as the service answers an empty mask (e.g. one the API sent): the photo unchanged
        fields = _form_fields(route.request)
        headers = {"Content-Type": "image/png", "X-Gate": "nothing-to-remove"}
        route.fulfill(status=200, headers=headers, body=fields["image"])

    page, problems = _open_offline(browser, nothing)
    _open_and_paint(page, "photo.png")
    page.click("#remove")
    page.wait_for_selector("#outcome[data-count='1']", timeout=10_000)
    status, words = page.inner_text("#status"), page.inner_text("#gate-words")
    assert status == "Nothing was removed: the photo came back unchanged.", status
    assert words == "The service found nothing painted in the mask, so the photo came back unchanged.", words
    assert page.inner_text("#gate") == "nothing-to-remove" and page.inner_text("#score") == "none"
    assert problems == [], problems


def test_the_keyboard_focus_stays_on_the_button_pressed_once_its_request_is_answered(browser):
    """Remove, Try another, Yes and No are disabled while their request runs: the focus fell to the page's body, and a
    keyboard user started again from its top."""
    stand_in = StandIn()
    page, problems = _open_offline(browser, stand_in)
    _open_and_paint(page, "photo.png")
    page.check("#retain")
    focused = "() => document.activeElement.id"
    for count, button in [(1, "#remove"), (2, "#another")]:
        page.focus(button)
        page.keyboard.press("Enter")
        page.wait_for_selector(f"#outcome[data-count='{count}']", timeout=10_000)
        page.wait_for_selector("body[data-busy=no]")
        assert page.evaluate(focused) == button[1:], f"after {button}"
    page.focus("#yes")
    page.keyboard.press("Enter")
    page.wait_for_function("() => document.querySelector('#rated').textContent.startsWith('Saved')")
    assert page.evaluate(focused) == "yes"

    stand_in.remove_problem = Problem("overloaded", "busy")
    page.focus("#another")
    page.keyboard.press("Enter")
    _error_says(page, "The removal failed (503)")
    assert page.evaluate(focused) == "another", "a refusal too"
    stand_in.feedback_problem = Problem("forbidden", "the API key lacks the 'feedback' scope")
    page.focus("#no")
    page.keyboard.press("Enter")
    _error_says(page, "This API key cannot rate results")
    assert page.is_hidden("#no") and page.evaluate(focused) == "another", "Yes / No are gone: the next thing to do"
    assert problems == [], problems


def test_on_a_phone_the_result_is_brought_into_view_when_it_comes(browser):
    """On a narrow screen the result (score, gate, Download, Yes / No) comes below every tool: after Remove it lay
    below the screen, and nothing said that it had come."""
    page, problems = _open_offline(browser, StandIn(), viewport=(375, 667))
    _open_and_paint(page, "photo.png")
    page.click("#remove")
    page.wait_for_selector("#outcome[data-count='1']", timeout=10_000)
    page.wait_for_timeout(100)  # any scroll done
    box = page.evaluate("() => { const r = document.querySelector('#outcome').getBoundingClientRect();"
                        " return [r.top, r.bottom, window.innerHeight]; }")
    assert 0 <= box[0] and box[1] <= box[2], f"the result within the screen: {box}"
    assert problems == [], problems


def test_where_a_rating_is_asked_a_link_leads_to_the_annotation_page_under_the_route_prefix(browser):
    stand_in = StandIn()
    page, problems = _open_offline(browser, stand_in, prefix="/v2")
    page.fill("#api-key", "rk_typed_into_the_box")
    page.locator("#api-key").blur()  # taken on change
    _open_and_paint(page, "photo.png")
    page.check("#retain")
    page.click("#remove")
    page.wait_for_selector("#rate:not([hidden])", timeout=10_000)
    link = page.get_by_role("link", name="annotation page")
    assert link.is_visible() and link.evaluate("a => a.href") == PAGE_ORIGIN + "/v2/annotate"
    link.click()
    page.wait_for_url(PAGE_ORIGIN + "/v2/annotate")
    page.wait_for_selector("body[data-state=error]")  # the stand-in knows no queue
    assert page.input_value("#api-key") == "rk_typed_into_the_box", "the key typed in the playground goes along"
    assert problems == [], problems

    page, problems = _open_offline(browser, stand_in, retention=RetentionSettings())
    assert page.locator("#annotate-more").evaluate("e => e.hidden"), "retention off: GET annotate is not found"


def test_text_dropped_into_the_key_or_seed_box_goes_in_and_a_photo_opens_wherever_dropped(browser):
    """The page cancelled every drop, so text could not be dropped into the API key or Seed box."""
    page, problems = _open_offline(browser, StandIn())
    _open_and_paint(page, "photo.png")
    for box, text in [("#api-key", "rk_dragged"), ("#seed", "4242")]:
        page.evaluate(  # words on the page, selected, dragged with the mouse into the box
            """text => { const words = document.querySelector("#photo-info"); words.textContent = text;
              getSelection().selectAllChildren(words); }""",
            text,
        )
        start, end = page.locator("#photo-info").bounding_box(), page.locator(box).bounding_box()
        page.mouse.move(start["x"] + 3, start["y"] + start["height"] / 2)
        page.mouse.down()
        page.mouse.move(end["x"] + 10, end["y"] + end["height"] / 2, steps=10)
        page.mouse.up()
        page.wait_for_function(
            "([box, text]) => document.querySelector(box).value === text", arg=[box, text], timeout=5_000
        )

    drop = """([selector, photo]) => {  // a file cannot be dragged in from the test: the events the browser sends
      const carried = new DataTransfer();
      carried.items.add(new File([Uint8Array.from(atob(photo), (c) => c.charCodeAt(0))], "dropped.png",
                                 { type: "image/png" }));
      const event = (type) => new DragEvent(type, { dataTransfer: carried, bubbles: true, cancelable: true });
      const target = document.querySelector(selector);
      return [target.dispatchEvent(event("dragover")), target.dispatchEvent(event("drop"))];
    }"""
    photo = base64.b64encode(png_bytes(_big_photo(160, 120))).decode()
    assert page.evaluate(drop, ["#api-key", photo]) == [False, False], "taken by the page, not the box"
    page.wait_for_function("() => document.querySelector('#photo-info').textContent.startsWith('dropped.png')")
    assert page.input_value("#api-key") == "rk_dragged"
    assert problems == [], problems


@pytest.mark.parametrize("path", ["/playground", "/annotate"])
def test_the_key_box_is_in_a_form_that_enter_does_not_submit(browser, path):
    """Chromium said "[DOM] Password field is not contained in a form" on each load of either page; a form, though,
    is submitted by Enter in its one box (and the policy's form-action 'none' refuses that)."""
    page, problems = _open_offline(browser, StandIn())
    said: list[str] = []
    page.on("console", lambda message: said.append(message.text) if "[DOM]" in message.text else None)
    page.goto(PAGE_ORIGIN + path)
    page.wait_for_load_state("load")
    page.fill("#api-key", "rk_typed_into_the_box")
    page.press("#api-key", "Enter")
    page.wait_for_timeout(200)
    assert page.url == PAGE_ORIGIN + path and page.input_value("#api-key") == "rk_typed_into_the_box", "not submitted"
    assert said == [] and problems == [], (said, problems)
    assert page.evaluate("() => sessionStorage.getItem('rorem.apiKey')") == "rk_typed_into_the_box"


def test_a_page_another_site_opens_in_a_popup_gets_no_key_where_one_this_site_opens_does(browser):
    """Chromium copies a tab's sessionStorage into the popups it opens: a page of another site, visited next in the
    tab where a reviewer typed the key, opened /annotate in a popup holding it, and the reviewer's next keystroke
    (N) recorded a verdict under that key (the web security review)."""
    page, problems = _open_offline(browser, StandIn())
    pages = {"/annotate": _annotation_page()}
    attacker = "<!doctype html><button id=open onclick=\"window.open('%s/annotate', 'x', 'popup')\">go</button>"
    page.context.route(PAGE_ORIGIN + "/annotate", lambda route: route.fulfill(
        status=200, headers={**pages["/annotate"][1], "Content-Type": "text/html; charset=utf-8"},
        body=pages["/annotate"][0]))  # fmt: skip
    page.context.route("http://other.test/**", lambda route: route.fulfill(
        status=200, content_type="text/html", body=attacker % PAGE_ORIGIN))  # fmt: skip
    page.fill("#api-key", "rk_reviewers_key")
    page.dispatch_event("#api-key", "change")

    with page.expect_popup() as opened:  # this site's own: the key goes with it, as the playground's link needs
        page.evaluate("origin => window.open(origin + '/annotate', 'mine', 'popup')", PAGE_ORIGIN)
    own = opened.value
    own.wait_for_load_state("load")
    assert own.input_value("#api-key") == "rk_reviewers_key"
    own.close()

    page.goto("http://other.test/")
    with page.expect_popup() as opened:
        page.click("#open")
    foreign = opened.value
    foreign.wait_for_load_state("load")
    assert foreign.input_value("#api-key") == "", "no key in a window another site opened"
    assert foreign.evaluate("() => sessionStorage.getItem('rorem.apiKey')") is None
    assert problems == [], problems


@pytest.mark.parametrize("path", ["/annotate", "/playground"])
def test_a_page_another_sites_navigation_led_to_drops_the_key_whatever_its_opener_says(browser, path):
    """The opener check alone was got round (the diff review): the attacker's popup disowns its opener
    (window.opener = null) before it goes to the page, or the opener goes back to this site first. The service
    marks a page another site's navigation led to (Sec-Fetch-Site), and the page drops the key there."""
    from serve.page_headers import marked_for_its_opener

    assert [marked_for_its_opener("<body x>", site) for site in ("cross-site", "same-site", "same-origin", "none",
            None)] == ['<body data-opened-by-another-site="true" x>'] * 2 + ["<body x>"] * 3  # fmt: skip
    page, problems = _open_offline(browser, StandIn())
    page.fill("#api-key", "rk_reviewers_key")
    page.dispatch_event("#api-key", "change")
    if path == "/annotate":
        html, headers = _annotation_page()
    else:
        html, headers = playground_page(RetentionSettings(enabled=True), ImagingSettings()), playground_headers()
    page.route(PAGE_ORIGIN + path, lambda route: route.fulfill(
        status=200, headers={**headers, "Content-Type": "text/html; charset=utf-8"},
        body=marked_for_its_opener(html, "cross-site")))  # fmt: skip
    page.goto(PAGE_ORIGIN + path)  # no opener at all: what a disowned popup looks like
    page.wait_for_load_state("load")
    assert page.input_value("#api-key") == ""
    assert page.evaluate("() => sessionStorage.getItem('rorem.apiKey')") is None
    assert problems == [], problems


# ---- in the browser, against the service ---------------------------------------------------------


def _big_photo(width: int = 1400, height: int = 1000) -> np.ndarray:
    """A real photo larger than the page's view (the astronaut, scaled up), so the page must scale."""
    import skimage.data

    return np.asarray(Image.fromarray(skimage.data.astronaut()).resize((width, height), Image.BICUBIC))


def _stroke(page, box, points, *, steps: int = 8) -> None:
    """Drag the mouse through `points`, given as fractions of the canvas."""
    at = [(box["x"] + fx * box["width"], box["y"] + fy * box["height"]) for fx, fy in points]
    page.mouse.move(*at[0])
    page.mouse.down()
    for x, y in at[1:]:
        page.mouse.move(x, y, steps=steps)
    page.mouse.up()


def _painted(shape, strokes) -> np.ndarray:
    """Where the strokes leave paint, in image pixels: (erase, points as fractions, width in px), in order."""
    height, width = shape
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for erase, points, size in strokes:
        xy = [(fx * width, fy * height) for fx, fy in points]
        draw.line(xy, fill=0 if erase else 255, width=round(size), joint="curve")
        for x, y in (xy[0], xy[-1]):
            draw.ellipse([x - size / 2, y - size / 2, x + size / 2, y + size / 2], fill=0 if erase else 255)
    return np.asarray(canvas) > 0


def _grown(region: np.ndarray, pixels: int) -> np.ndarray:
    """Grown by a square, as the service dilates the mask (engines.imaging.dilate_mask)."""
    return ndimage.binary_dilation(region, structure=np.ones((3, 3), bool), iterations=pixels)


def _downloaded(page) -> np.ndarray:
    with page.expect_download() as download:
        page.click("#download")
    return np.asarray(Image.open(download.value.path()).convert("RGB"))


def _open_page(browser, url: str, *, intercept_file_choosers: bool = False):
    """`intercept_file_choosers` subscribes before the page loads: playwright turns interception on without
    waiting, so a chooser opened soon after `expect_file_chooser` starts can slip past it (3 in 12 here)."""
    page = browser.new_page(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    if intercept_file_choosers:
        page.on("filechooser", lambda chooser: None)
    problems = _problems_of(page)
    page.goto(url)
    page.wait_for_selector("body[data-state=empty]")
    return page, problems


def _problems_of(page) -> list[str]:
    """What the page will get wrong, as it happens: script errors, and anything its Content Security Policy blocks."""
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    page.on(
        "console",
        lambda message: problems.append(message.text) if "Content Security Policy" in message.text else None,
    )
    return problems


def _choose(page, name: str, data: bytes, mime: str) -> None:
    page.set_input_files("#file", files=[{"name": name, "mimeType": mime, "buffer": data}])


def test_the_front_page_is_the_public_playground_with_its_policy(service):
    front = service.client.get("/")
    assert front.status_code == 307 and front.headers["location"] == "/playground"
    page = service.client.get("/playground")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.headers["content-security-policy"] == playground_headers()["Content-Security-Policy"]
    assert page.headers["cache-control"] == "no-store" and page.headers["x-content-type-options"] == "nosniff"
    assert 'data-retention="ask"' in page.text, "the test service keeps results only when asked"


def test_paint_remove_compare_download_try_another_and_rate(service, browser):
    photo = _big_photo()
    height, width = photo.shape[:2]
    page, problems = _open_page(browser, service.url + "/")
    assert page.url == service.url + "/playground"
    assert page.is_visible("#tiny-note"), "the test service runs the tiny bundle: the page says its results are noise"
    page.fill("#api-key", "rk_typed_into_the_box")
    sent_keys: list[str | None] = []
    page.on("request", lambda r: sent_keys.append(r.headers.get("x-api-key")) if r.url.endswith("/remove") else None)

    _choose(page, "astronaut.png", png_bytes(photo), "image/png")
    page.wait_for_selector("body[data-state=editing]")
    assert f"{width} × {height} px" in page.inner_text("#photo-info")
    box = page.locator("#mask").bounding_box()
    assert box["width"] < width, "the view is scaled down; the mask is still made at the photo's size"
    brush = BRUSH_CSS * width / box["width"]  # image pixels

    first = [(0.20, 0.20), (0.35, 0.25), (0.40, 0.40)]
    second = [(0.60, 0.30), (0.75, 0.32)]
    erased = [(0.72, 0.20), (0.72, 0.45)]
    undone = [(0.10, 0.85), (0.30, 0.90)]
    _stroke(page, box, first)
    _stroke(page, box, second)
    page.click("#eraser")
    for _ in range(3):
        page.keyboard.press("]")  # a wider eraser
    eraser = int(page.input_value("#size")) * width / box["width"]
    assert eraser > 1.5 * brush
    _stroke(page, box, erased)
    page.click("#brush")
    _stroke(page, box, undone)
    page.click("#undo")
    page.click("#remove")
    page.wait_for_selector("#outcome[data-count='1']", timeout=120_000)
    assert not page.locator("#status").evaluate("e => e.classList.contains('error')"), page.inner_text("#status")

    seed = page.inner_text("#seed-used")
    assert seed.isdigit() and page.inner_text("#gate") in {"passed", "failed"}
    assert re.fullmatch(r"\d\.\d{3}", page.inner_text("#score")) and page.inner_text("#gate-words")
    result = _downloaded(page)
    assert result.shape == photo.shape

    painted = _painted((height, width), [(False, first, brush), (False, second, brush), (True, erased, eraser)])
    outside = ~_grown(painted, SLACK)
    changed = (result != photo).any(axis=-1)
    assert not changed[outside].any(), f"{changed[outside].sum()} pixels changed outside the painted region"
    undone_region = _painted((height, width), [(False, undone, eraser)])
    assert not changed[undone_region].any(), "the undone stroke removed nothing"
    unpainted = _painted((height, width), [(False, second, brush)]) & outside
    assert unpainted.sum() > 500 and not changed[unpainted].any(), "the eraser took back part of a stroke"
    core = ndimage.binary_erosion(painted, iterations=4)
    assert changed[core].mean() > 0.5, "the painted region was filled"

    split = page.locator("#comparison")
    at = _painted((height, width), [(False, [first[1]], 1)])  # a point inside the first stroke
    y, x = (int(v.mean()) for v in np.nonzero(at))
    view = split.bounding_box()
    pixel = f"c => Array.from(c.getContext('2d').getImageData({x * view['width'] / width:.0f}, {y * view['height'] / height:.0f}, 1, 1).data)"
    slide = "(range, value) => { range.value = value; range.dispatchEvent(new Event('input')); }"
    page.locator("#split").evaluate(slide, "100")
    before = split.evaluate(pixel)
    page.locator("#split").evaluate(slide, "0")
    after = split.evaluate(pixel)
    assert before != after, "the slider shows before on one side and after on the other"

    page.check("#retain")
    page.click("#another")
    page.wait_for_selector("#outcome[data-count='2']", timeout=120_000)
    assert page.inner_text("#seed-used").isdigit() and page.inner_text("#seed-used") != seed
    assert not (_downloaded(page) != photo).any(axis=-1)[outside].any()
    page.wait_for_selector("#rate:not([hidden])")
    result_id = page.get_attribute("#rate", "data-result-id")
    page.click("#no")
    page.wait_for_function("() => document.querySelector('#rated').textContent.startsWith('Saved')")
    assert service.client.get(f"/results/{result_id}").json()["label"] == "no"

    assert sent_keys == ["rk_typed_into_the_box"] * 2, "every API call carries the key from the key box"
    assert problems == [], problems


def test_mistakes_and_refusals_are_told_in_words(service, browser):
    page, problems = _open_page(browser, service.url + "/playground")

    def status(expected: str) -> str:
        page.wait_for_function(
            "text => { const s = document.querySelector('#status');"
            " return s.classList.contains('error') && s.textContent.includes(text); }",
            arg=expected,
            timeout=120_000,
        )
        return page.inner_text("#status")

    _choose(page, "notes.txt", b"not a photo at all", "text/plain")
    status('"notes.txt" is not a photo this browser can open')
    assert page.get_attribute("body", "data-state") == "empty"

    # the browser shows an SVG, the service takes raster photos only: the page says so before any painting
    svg = b'<svg xmlns="http://www.w3.org/2000/svg" width="300" height="200"><rect width="300" height="200" fill="teal"/></svg>'
    _choose(page, "drawing.svg", svg, "image/svg+xml")
    status('"drawing.svg" (image/svg+xml) is not a format the service accepts')
    assert page.get_attribute("body", "data-state") == "empty"

    # a photo past the test service's upload limit (6 MiB), as the service's settings put it in the page
    noise = np.random.default_rng(0).integers(0, 256, (1400, 1500, 3), dtype=np.uint8)
    _choose(page, "noise.png", png_bytes(noise), "image/png")
    status("MiB; the service takes uploads of up to 6.0 MiB (the photo and the mask together)")
    assert page.get_attribute("body", "data-state") == "empty"
    _choose(page, "photo.png", png_bytes(_big_photo(320, 240)), "image/png")
    page.wait_for_selector("body[data-state=editing]")
    page.click("#remove")
    status("Nothing is painted yet")
    box = page.locator("#mask").bounding_box()
    _stroke(page, box, [(0.3, 0.3), (0.6, 0.6)])
    page.fill("#seed", "twelve")
    page.click("#remove")
    status("The seed must be a whole number")
    page.fill("#seed", "")

    # a wrong key where the service asks for one: the answer is replayed here, the service runs without keys
    page.route(
        "**/remove",
        lambda route: route.fulfill(
            status=401,
            content_type="application/problem+json",
            body='{"type": "x/unauthorized", "title": "A valid API key is required", "status": 401,'
            ' "detail": "the API key is not valid"}',
        ),
    )
    page.click("#remove")
    status("A valid API key is required: the API key is not valid. Enter a valid key in the API key box")
    assert page.get_attribute("body", "data-busy") == "no" and page.is_enabled("#remove")
    assert problems == [], problems


def test_once_a_chosen_photo_opens_its_shortcuts_apply(browser):
    """The focus stayed on the file input after a photo was chosen by clicking: E and ] did nothing and Space or
    Enter opened the chooser again (a browser trial). It moves to the photo."""
    page, problems = _open_offline(browser, StandIn())
    page.focus("#file")
    _choose(page, "photo.png", png_bytes(_big_photo(320, 240)), "image/png")
    page.wait_for_selector("body[data-state=editing]")
    assert page.evaluate("document.activeElement.id") == "editor"
    size = int(page.input_value("#size"))
    page.keyboard.press("e")
    page.keyboard.press("]")
    assert page.get_attribute("#eraser", "aria-pressed") == "true" and int(page.input_value("#size")) > size
    assert problems == []
    page.close()


def test_a_200_that_is_no_image_is_told_as_a_failure_not_shown_as_a_result(browser):
    """A proxy's sign-in page answered 200 was shown as the result ("this browser cannot show the result's format")
    and downloaded as photo-removed.img (a browser trial)."""

    class SignInPage(StandIn):
        def remove(self, route) -> None:
            route.fulfill(status=200, content_type="text/html", body="<html>sign in</html>")

    page, problems = _open_offline(browser, SignInPage())
    _open_and_paint(page, "photo.png")
    page.click("#remove")
    said = _error_says(page, "The removal failed")
    assert "the service answered text/html, not an image" in said
    assert page.get_attribute("body", "data-state") == "editing"
    page.close()


def _contrast(first: tuple[int, ...], second: tuple[int, ...]) -> float:
    """WCAG 2's contrast ratio of two sRGB colours."""

    def luminance(rgb):
        linear = [c / 255 / 12.92 if c / 255 <= 0.04045 else ((c / 255 + 0.055) / 1.055) ** 2.4 for c in rgb[:3]]
        return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]

    lighter, darker = sorted((luminance(first), luminance(second)), reverse=True)
    return (lighter + 0.05) / (darker + 0.05)


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_the_pages_words_in_colour_are_readable_in_either_colour_scheme(browser, scheme):
    """In the dark scheme the error red and the gate's green and red were 3.5:1 and 3.7:1 on the page, under WCAG's
    4.5:1 for text this size (a browser trial)."""
    page, _ = _open_offline(browser, StandIn())
    canvas = {"light": (255, 255, 255), "dark": (18, 18, 18)}[scheme]  # Chromium's canvas in each scheme
    for path, names in (("/playground", ("--bad", "--good")), ("/annotate", ("--bad",))):
        page.emulate_media(color_scheme=scheme)
        page.goto(PAGE_ORIGIN + path)
        for name in names:
            colour = page.evaluate(f"getComputedStyle(document.documentElement).getPropertyValue('{name}').trim()")
            rgb = tuple(int(colour[i : i + 2], 16) for i in (1, 3, 5))
            assert _contrast(rgb, canvas) >= 4.5, (path, name, colour)
    page.close()


def test_a_photo_can_be_chosen_with_the_keyboard_alone(service, browser):
    page, problems = _open_page(browser, service.url + "/playground", intercept_file_choosers=True)
    for _ in range(6):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.id") == "file":
            break
    assert page.evaluate("document.activeElement.id") == "file", "the photo chooser is in the tab order"
    assert page.evaluate("getComputedStyle(document.querySelector('#drop')).outlineStyle") == "solid", "and shows it"
    with page.expect_file_chooser(timeout=5000) as chooser:
        page.keyboard.press("Enter")
    chooser.value.set_files(
        files=[{"name": "photo.png", "mimeType": "image/png", "buffer": png_bytes(_big_photo(320, 240))}]
    )
    page.wait_for_selector("body[data-state=editing]")
    assert problems == []
    page.close()
