"""The response headers of the service's HTML pages (the playground, the annotation page) and of the answers
that hold a user's data (retained results, their images, the annotation queue).

Each page is self-contained under a strict Content-Security-Policy: its one inline script and one inline
style are allowed by their SHA-256 hashes, computed from the page as served, so an edit to a page can neither
break nor loosen the policy (no 'unsafe-inline'): one HTML-injection bug could not become script that reads the
API key the pages keep in the browser's storage. Code both pages need (static/shared.js) is written into each
page's script where it is served (page_html), not loaded from a URL: one copy, and no script-src but the hash.
"""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path

# A key travels in X-API-Key as often as in Authorization, and a shared cache need not keep apart answers that
# differ by X-API-Key: answers holding a user's data are never stored; a stored image is never sniffed as HTML,
# nor embedded by a page of another site (an <img> needs no key while keys are off).
PRIVATE_HEADERS = {
    "Cache-Control": "no-store", "Referrer-Policy": "no-referrer", "X-Content-Type-Options": "nosniff",
    "Cross-Origin-Resource-Policy": "same-origin",
}  # fmt: skip
SHARED_SCRIPT = Path(__file__).parent / "static" / "shared.js"
_SHARED_MARK = "/* shared.js */"


def page_html(page: Path) -> str:
    """The page's file with static/shared.js written into its script at the line /* shared.js */."""
    shared = SHARED_SCRIPT.read_text(encoding="utf-8").strip()
    return fill_marks(page.read_text(encoding="utf-8"), page.name, {_SHARED_MARK: shared})


def fill_marks(html: str, page: str, filled: dict[str, str]) -> str:
    """`html` with each mark replaced by its text; a page (named `page`, for the error) that does not carry a mark
    exactly once is refused, so an edit to a page cannot leave a setting unfilled or fill it twice."""
    for mark, text in filled.items():
        if html.count(mark) != 1:
            raise ValueError(f"{page} must carry {mark} once")
        html = html.replace(mark, text)
    return html


FOREIGN_FETCH_SITES = ("cross-site", "same-site")  # Sec-Fetch-Site of a navigation another site's page started


def marked_for_its_opener(html: str, sec_fetch_site: str | None) -> str:
    """The page marked `data-opened-by-another-site` where the browser says a page of another site led here: a
    popup another site opens gets a copy of the tab's sessionStorage, the API key with it, and a check of
    window.opener in the page alone can be got round (the opener disowned, or sent back to this site first).
    static/shared.js storedKey() then drops the key. Browsers send Sec-Fetch-Site over HTTPS and to localhost."""
    if sec_fetch_site not in FOREIGN_FETCH_SITES:
        return html
    return html.replace("<body ", '<body data-opened-by-another-site="true" ', 1)


def strict_page_headers(html: str, page: str, img_src: str) -> dict[str, str]:
    """`page`: the file's name, for the error; `img_src`: where the page's images come from."""
    policy = "; ".join(
        [
            "default-src 'none'",
            f"script-src {sha256_source(_only('script', html, page))}",
            f"style-src {sha256_source(_only('style', html, page))}",
            f"img-src {img_src}",
            "connect-src 'self'",  # the API, relative to the page
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ]
    )
    return {**PRIVATE_HEADERS, "Content-Security-Policy": policy}


def sha256_source(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode() + "'"


def _only(tag: str, html: str, page: str) -> str:
    found = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.DOTALL)
    if len(found) != 1 or html.count(f"<{tag}") != 1:
        raise ValueError(f"{page} must hold exactly one plain <{tag}> element")
    return found[0]
