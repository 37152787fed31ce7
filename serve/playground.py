"""The playground page (GET /playground; GET / points to it): try a removal by hand in a browser.

The page is self-contained under a strict Content-Security-Policy: its one inline script and one inline
style are allowed by their SHA-256 hashes, computed here from the file, so an edit to the page can
neither break nor loosen the policy (no 'unsafe-inline'). Its API calls carry the key typed into its
key box, so the page itself is public.
"""

from __future__ import annotations

import base64
import hashlib
import re
from functools import lru_cache
from pathlib import Path
from typing import Literal

from serve.config import RetentionSettings
from serve.retention.keeper import PAGE_HEADERS

PLAYGROUND_PAGE = Path(__file__).parent / "static" / "playground.html"
# the page reads whether (and by default) results are kept from its body; the file says "off"
_RETENTION_MARK = 'data-retention="off"'
RetentionMode = Literal["off", "ask", "always"]


def _sha256_source(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode() + "'"


def _only(tag: str, html: str) -> str:
    found = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.DOTALL)
    if len(found) != 1 or html.count(f"<{tag}") != 1:
        raise ValueError(f"{PLAYGROUND_PAGE.name} must hold exactly one plain <{tag}> element")
    return found[0]


@lru_cache(maxsize=1)
def _template() -> tuple[str, dict[str, str]]:
    html = PLAYGROUND_PAGE.read_text(encoding="utf-8")
    if html.count(_RETENTION_MARK) != 1:
        raise ValueError(f"{PLAYGROUND_PAGE.name} must carry {_RETENTION_MARK} once")
    policy = "; ".join(
        [
            "default-src 'none'",
            f"script-src {_sha256_source(_only('script', html))}",
            f"style-src {_sha256_source(_only('style', html))}",
            "img-src blob:",  # the chosen photo, shown before it is sent
            "connect-src 'self'",  # /remove and /feedback, relative to the page
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ]
    )
    return html, {**PAGE_HEADERS, "Content-Security-Policy": policy}


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
