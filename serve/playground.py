"""The playground page (GET /playground; GET / points to it): try a removal by hand in a browser.

The page is self-contained under a strict, hash-based Content-Security-Policy (serve/page_headers.py). Its
API calls carry the key typed into its key box, so the page itself is public.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from serve.config import RetentionSettings
from serve.page_headers import strict_page_headers

PLAYGROUND_PAGE = Path(__file__).parent / "static" / "playground.html"
# the page reads whether (and by default) results are kept from its body; the file says "off"
_RETENTION_MARK = 'data-retention="off"'
RetentionMode = Literal["off", "ask", "always"]


@lru_cache(maxsize=1)
def _template() -> tuple[str, dict[str, str]]:
    html = PLAYGROUND_PAGE.read_text(encoding="utf-8")
    if html.count(_RETENTION_MARK) != 1:
        raise ValueError(f"{PLAYGROUND_PAGE.name} must carry {_RETENTION_MARK} once")
    return html, strict_page_headers(html, PLAYGROUND_PAGE.name, img_src="blob:")  # the photo, shown before it is sent


def retention_mode(settings: RetentionSettings) -> RetentionMode:
    """off: no rating; ask: the person opts in per removal (retain=true); always: kept unless they opt out."""
    if not settings.enabled:
        return "off"
    return "always" if settings.default_retain else "ask"


@lru_cache(maxsize=3)
def _page(mode: RetentionMode) -> str:
    return _template()[0].replace(_RETENTION_MARK, f'data-retention="{mode}"')


def playground_page(retention: RetentionSettings) -> str:
    return _page(retention_mode(retention))


def playground_headers() -> dict[str, str]:
    """The page's response headers: the hash-based CSP, no caching, no referrer, no sniffing."""
    return dict(_template()[1])
