"""Open the bundle a configuration names: a project bundle folder, the authors' published layout
(local or on the hub, imported once into a cache), or the tiny bundle (generated once)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from filelock import FileLock

from engines import authors_layout
from engines.authors_layout import AuthorsLayout, import_authors_layout, local_inputs_sha256, pin
from engines.bundle import MANIFEST, Bundle, BundleError, DTypeName, sha256_of
from engines.cache_layout import tiny_bundle_folder

INPUT_HASHES = "input-sha256.json"


def open_bundle(
    *,
    path: str | None,
    authors: AuthorsLayout | None,
    cache_dir: str | Path,
    prompt: str | None = None,
    import_dtype: DTypeName | None = None,
    tiny_seed: int = 0,
    verify: bool = True,
) -> Bundle:
    """Exactly one of `path` / `authors` names a real bundle; neither means the tiny bundle (always float32).
    `prompt` and `import_dtype` (None: "" and float16) are baked in when a bundle is written; a bundle folder
    has them already, and one asked for must be its own. `verify` hashes every file but the weights, which
    the caller loads through `Bundle.read` and so hashes as they are read, and the exports (`Bundle.verify`)."""
    if path and authors:
        raise ValueError("configure either a bundle path or the authors' layout, not both")
    if path:
        bundle = Bundle.load(Path(path).expanduser(), verify=verify, hash_weights=False)
        _refuse_other_baked_settings(bundle, prompt=prompt, import_dtype=import_dtype)
        return bundle
    prompt = prompt or ""
    cache = Path(cache_dir).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    if authors:
        # the key names every input: each hub piece's commit (a moved branch is imported again), each local
        # file's sha256 (a file replaced at the same path too), and the importer's version (a fixed import too)
        authors = pin(authors)
        hashes = RememberedSha256(cache / INPUT_HASHES)
        inputs = local_inputs_sha256(authors, hashes.of)
        hashes.save()
        dtype = import_dtype or "float16"
        described = json.dumps([authors_layout.IMPORTER_VERSION, authors.describe(), inputs, prompt, dtype])
        target = cache / f"imported-{hashlib.sha256(described.encode()).hexdigest()[:16]}"
        with FileLock(str(target) + ".lock"):
            if (target / MANIFEST).is_file():
                return Bundle.load(target, verify=verify, hash_weights=False)
            return import_authors_layout(authors, target, prompt=prompt, dtype=dtype, file_sha256=hashes.of)
    from engines.tiny import tiny_bundle

    target = tiny_bundle_folder(cache, tiny_seed, prompt)
    with FileLock(str(target) + ".lock"):
        return tiny_bundle(target, seed=tiny_seed, prompt=prompt)


def _refuse_other_baked_settings(bundle: Bundle, *, prompt: str | None, import_dtype: DTypeName | None) -> None:
    """A bundle folder's prompt embeddings and dtype were fixed when it was written: asking for others is a
    configuration error, not something to ignore."""
    baked = {
        "prompt": (prompt, bundle.manifest.architecture.prompt.text),
        "import_dtype": (import_dtype, bundle.manifest.dtype),
    }
    wrong = [f"bundle.{name} is {asked!r}, but {bundle.path} holds {held!r}" for name, (asked, held) in baked.items()
             if asked is not None and asked != held]  # fmt: skip
    if wrong:
        raise BundleError(
            "; ".join(wrong) + ": a bundle folder's prompt and dtype are fixed when it is written; leave these "
            "settings out, or import the bundle again with them"
        )


class RememberedSha256:
    """sha256 of files, remembered by each file's size, mtime, ctime and inode: the import cache key needs the
    sha256 of every local input at every start (GBs: seconds to minutes), and a file is read again only once
    it changed. Any write or replacement changes ctime or the inode, and neither can be set back (mtime can)."""

    def __init__(self, path: Path):
        self.path = path
        self.known = self._read()

    def of(self, file: Path) -> str:
        status = file.stat()
        signature = [status.st_size, status.st_mtime_ns, status.st_ctime_ns, status.st_ino]
        entry = self.known.get(str(file))
        if entry is None or entry["signature"] != signature:
            entry = self.known[str(file)] = {"signature": signature, "sha256": sha256_of(file)}
        return entry["sha256"]

    def save(self) -> None:
        with FileLock(str(self.path) + ".lock"):
            staging = self.path.with_name(self.path.name + ".partial")
            staging.write_text(json.dumps({**self._read(), **self.known}))
            staging.replace(self.path)

    def _read(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
