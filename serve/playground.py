"""The playground page (GET /playground; GET / points to it): try a removal by hand in a browser.

The page is self-contained under a strict, hash-based Content-Security-Policy (serve/page_headers.py). Its
API calls carry the key typed into its key box, so the page itself is public.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from engines.imaging import ACCEPTED_FORMATS
from serve.config import ImagingSettings, RetentionSettings
from serve.page_headers import fill_marks, page_html, strict_page_headers
from serve.protocol import MAX_SEED

PLAYGROUND_PAGE = Path(__file__).parent / "static" / "playground.html"
# The page reads the service's settings from its body: whether (and by default) results are kept, and which
# photos the service takes (formats, megapixels, bytes), so it refuses others when they are opened rather than
# after an upload, and the largest seed. The file says "off" and leaves the others empty (unchecked); and whether
# the model is the tiny bundle's.
_RETENTION_MARK = 'data-retention="off"'
_FORMATS_MARK = 'data-accepted-formats=""'
_MEGAPIXELS_MARK = 'data-max-megapixels=""'
_BYTES_MARK = 'data-max-upload-bytes=""'
_SEED_MARK = 'data-max-seed=""'
_TINY_MARK = 'data-tiny="false"'
RetentionMode = Literal["off", "ask", "always"]


@lru_cache(maxsize=1)
def _template() -> tuple[str, dict[str, str]]:
    html = page_html(PLAYGROUND_PAGE)
    _filled(html, "off", 0.0, 0, False)  # a page without one of the marks is refused at once
    return html, strict_page_headers(html, PLAYGROUND_PAGE.name, img_src="blob:")  # the photo, shown before it is sent


def retention_mode(settings: RetentionSettings) -> RetentionMode:
    """off: no rating; ask: the person opts in per removal (retain=true); always: kept unless they opt out."""
    if not settings.enabled:
        return "off"
    return "always" if settings.default_retain else "ask"


@lru_cache(maxsize=6)
def _page(mode: RetentionMode, max_megapixels: float, max_upload_bytes: int, tiny: bool) -> str:
    return _filled(_template()[0], mode, max_megapixels, max_upload_bytes, tiny)


def _filled(html: str, mode: RetentionMode, max_megapixels: float, max_upload_bytes: int, tiny: bool) -> str:
    formats = " ".join(name.lower() for name in ACCEPTED_FORMATS)
    return fill_marks(
        html,
        PLAYGROUND_PAGE.name,
        {
            _RETENTION_MARK: f'data-retention="{mode}"',
            _FORMATS_MARK: f'data-accepted-formats="{formats}"',
            _TINY_MARK: f'data-tiny="{str(tiny).lower()}"',
            _BYTES_MARK: f'data-max-upload-bytes="{max_upload_bytes}"',
            _SEED_MARK: f'data-max-seed="{MAX_SEED}"',
            _MEGAPIXELS_MARK: f'data-max-megapixels="{max_megapixels:g}"',
        },
    )


def playground_page(retention: RetentionSettings, imaging: ImagingSettings, tiny: bool = False) -> str:
    """`tiny`: the service runs the tiny bundle, and the page says its results are noise."""
    return _page(retention_mode(retention), imaging.max_megapixels, imaging.max_upload_bytes, tiny)


def playground_headers() -> dict[str, str]:
    """The page's response headers: the hash-based CSP, no caching, no referrer, no sniffing."""
    return dict(_template()[1])
