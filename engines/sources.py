"""Open the bundle a configuration names: a project bundle folder, the authors' published layout
(local or on the hub, imported once into a cache), or the tiny bundle (generated once)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from filelock import FileLock

from engines.authors_layout import AuthorsLayout, import_authors_layout, pin
from engines.bundle import MANIFEST, Bundle, DTypeName


def open_bundle(
    *,
    path: str | None,
    authors: AuthorsLayout | None,
    cache_dir: str | Path,
    prompt: str = "",
    import_dtype: DTypeName = "float16",
    tiny_seed: int = 0,
    verify: bool = True,
) -> Bundle:
    """Exactly one of `path` / `authors` names a real bundle; neither means the tiny bundle."""
    if path and authors:
        raise ValueError("configure either a bundle path or the authors' layout, not both")
    if path:
        return Bundle.load(Path(path).expanduser(), verify=verify)
    cache = Path(cache_dir).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    if authors:
        authors = pin(authors)  # the key names the commit of each hub piece: a moved branch is imported again
        key = hashlib.sha256(json.dumps([authors.describe(), prompt, import_dtype]).encode()).hexdigest()[:16]
        target = cache / f"imported-{key}"
        with FileLock(str(target) + ".lock"):
            if (target / MANIFEST).is_file():
                return Bundle.load(target, verify=verify)
            return import_authors_layout(authors, target, prompt=prompt, dtype=import_dtype)
    from engines.tiny import tiny_bundle

    target = cache / f"tiny-{tiny_seed}"
    with FileLock(str(target) + ".lock"):
        return tiny_bundle(target, seed=tiny_seed, prompt=prompt)
