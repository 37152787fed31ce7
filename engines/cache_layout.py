"""Where bundles made on demand are kept in bundle.cache_dir. Without torch: the CLI checks a tiny bundle's
exports before Ray starts."""

from __future__ import annotations

import hashlib
from pathlib import Path


def tiny_bundle_folder(cache_dir: str | Path, seed: int = 0, prompt: str | None = None) -> Path:
    """The tiny bundle of this seed and prompt; the prompt "" keeps the name tiny-SEED, which export's help and the
    benchmark records show."""
    prompted = f"-prompt-{hashlib.sha256(prompt.encode()).hexdigest()[:12]}" if prompt else ""
    return Path(cache_dir).expanduser() / f"tiny-{seed}{prompted}"
