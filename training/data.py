"""Triplet data in the RORem metadata format: reading, validating, writing, and a torch Dataset.

The format (RORem paper, reference code): a JSON array of objects with image paths relative to the
JSON file,

    [{"source": "source/0001.png", "mask": "mask/0001.png", "GT": "gt/0001.png"}, ...]

`source` is the photo with the object, `mask` is white where the object is (white = remove), `GT`
is the photo without it. The discriminator's labelled set adds `"score"` (1 = a good removal,
0 = a bad one) and then `GT` is the *edited image being judged*, which is the paper's format.
Unlabelled pairs (for `annotate`) need only `source` and `mask`. An optional `"group"` (a string)
names the photo an entry was cut from (export-labels' windows): the discriminator's held-out split
keeps a group on one side. Other keys are ignored.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from engines import imaging

if TYPE_CHECKING:
    from engines.jobs import ScoreJob
    from engines.pipeline import CropSettings

FIELDS = ("source", "mask", "GT")


class DatasetError(ValueError):
    """A metadata file or one of its images is unusable; the message names file, entry and field."""


@dataclass(frozen=True)
class Triplet:
    """One record, with absolute paths. `gt` is the removed image (or the judged edit when `score` is set)."""

    source: Path
    mask: Path
    gt: Path | None = None
    score: float | None = None
    group: str | None = None  # the photo it was cut from; None: the source file is its own


def load_metadata(
    path: str | Path,
    require: Sequence[str] = FIELDS,
    check_sizes: bool = True,
) -> list[Triplet]:
    """Read and validate a metadata file: JSON array, required fields, files exist, decode, same sizes.

    `require` names the fields every entry must have, among "source", "mask", "GT", "score".
    `check_sizes` decodes every image as training reads it (read_rgb, read_mask), in threads, to check it decodes
    whole (a truncated file's header is intact) and that source, mask and GT agree in size.
    """
    path = Path(path)
    unknown = set(require) - {*FIELDS, "score"}
    if unknown:
        raise ValueError(f"unknown required fields {sorted(unknown)}; fields are {[*FIELDS, 'score']}")
    if path.is_dir():
        raise DatasetError(f"{path} is a folder, not a metadata file (--data {path / 'metadata.json'}?)")
    if not path.is_file():
        raise DatasetError(f"{path}: metadata file not found")
    try:
        entries = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from exc
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not a UTF-8 text file ({exc.reason})") from exc
    if not isinstance(entries, list):
        raise DatasetError(f"{path}: expected a JSON array of objects, got a JSON {type(entries).__name__}")
    if not entries:
        raise DatasetError(f"{path}: the array is empty")
    root = path.parent
    records, checks = [], []
    for index, entry in enumerate(entries):
        where = f"{path}: entry {index}"
        if not isinstance(entry, dict):
            raise DatasetError(f"{where}: expected an object with {list(require)}, got {type(entry).__name__}")
        for field in require:
            if field not in entry:
                raise DatasetError(f"{where}: field {field!r} is missing (entry has {sorted(entry)})")
        files: dict[str, Path | None] = {}
        for field in FIELDS:
            value = entry.get(field)
            if value is None:
                files[field] = None
                continue
            if not isinstance(value, str) or not value:
                raise DatasetError(f"{where}: field {field!r} must be a non-empty path string, got {value!r}")
            file = (root / value).resolve() if not os.path.isabs(value) else Path(value)
            if not file.is_file():
                raise DatasetError(f"{where}: field {field!r}: file {value} not found (looked for {file})")
            files[field] = file
        score = entry.get("score")
        if score is not None:
            if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
                raise DatasetError(f"{where}: field 'score' must be a finite number, got {score!r}")
            score = float(score)
        group = entry.get("group")
        if group is not None and (not isinstance(group, str) or not group):
            raise DatasetError(f"{where}: field 'group' must be a non-empty string, got {group!r}")
        if files["source"] is None or files["mask"] is None:
            raise DatasetError(f"{where}: 'source' and 'mask' are needed in every entry")
        records.append(Triplet(files["source"], files["mask"], files["GT"], score, group))
        checks.append((where, files))
    if check_sizes:
        _check_files(checks)
    return records


def _check_files(checks: list[tuple[str, dict[str, Path | None]]]) -> None:
    """Each entry's files decoded in a thread pool (the decoders release the GIL); the first bad entry, in file
    order, is raised and the work not started is dropped."""
    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        try:
            for _ in pool.map(lambda check: _check_entry(*check), checks):
                pass
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise


def _check_entry(where: str, files: dict[str, Path | None]) -> None:
    sizes = {}
    for field, file in files.items():
        if file is None:
            continue
        try:
            pixels = read_mask(file) if field == "mask" else read_rgb(file)
        except DatasetError as exc:
            raise DatasetError(f"{where}: field {field!r}: {exc}") from exc
        except OSError as exc:
            raise DatasetError(f"{where}: field {field!r}: cannot read {file} ({exc.strerror or exc})") from exc
        sizes[field] = pixels.shape[1], pixels.shape[0]
    if len(set(sizes.values())) > 1:
        described = ", ".join(f"{field} {w}x{h}" for field, (w, h) in sizes.items())
        raise DatasetError(f"{where}: image sizes differ ({described}); source, mask and GT must have one size")


def write_metadata(path: str | Path, records: Iterable[Triplet]) -> Path:
    """Write records as a RORem metadata file, paths relative to the file's folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    root = path.parent.resolve()
    entries = []
    for record in records:
        entry = {"source": _relative(record.source, root), "mask": _relative(record.mask, root)}
        if record.gt is not None:
            entry["GT"] = _relative(record.gt, root)
        if record.score is not None:
            entry["score"] = record.score
        if record.group is not None:
            entry["group"] = record.group
        entries.append(entry)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(entries, indent=1))
    tmp.replace(path)
    return path


def _relative(file: Path, root: Path) -> str:
    return Path(os.path.relpath(Path(file).resolve(), root)).as_posix()


# ---------------------------------------------------------------- pixels


def load_rgb(path: Path, resolution: int | None) -> np.ndarray:
    """(R, R, 3) uint8: read_rgb's photo, the shorter side resized to R (bicubic), then center-cropped (R None:
    the center square, not resized)."""
    return np.asarray(_resize_crop(Image.fromarray(read_rgb(path)), resolution, Image.Resampling.BICUBIC))


def load_mask(path: Path, resolution: int | None) -> np.ndarray:
    """(R, R) bool, True = remove: read_mask's mask, resized (nearest) and center-cropped."""
    mask = Image.fromarray(read_mask(path).astype(np.uint8) * 255)
    return np.asarray(_resize_crop(mask, resolution, Image.Resampling.NEAREST)) > 127


def read_rgb(path: Path) -> np.ndarray:
    """(H, W, 3) uint8, the service's own reading of a photo (engines.imaging.decode_image: upright, 16-bit and
    float samples scaled to 8 bits, not clipped as PIL's convert("RGB") clips them)."""
    data, limits, _ = _read_file(path)
    return _decoded(path, lambda: imaging.decode_image(data, limits).rgb)


def read_mask(path: Path) -> np.ndarray:
    """(H, W) bool, True = remove, the service's own reading of a mask (engines.imaging.decode_mask: upright;
    white, or the strokes of a mask with transparency)."""
    data, limits, size = _read_file(path)
    return _decoded(path, lambda: imaging.decode_mask(data, size, limits))


def _read_file(path: Path) -> tuple[bytes, imaging.DecodeLimits, tuple[int, int]]:
    """The file's bytes, DecodeLimits sized to the file (training data is trusted, not an upload) and its upright
    (height, width)."""
    data = Path(path).read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = imaging.upright_size(img)
    except (UnidentifiedImageError, OSError) as exc:
        raise DatasetError(f"{path}: not a readable image ({exc})") from exc
    limits = imaging.DecodeLimits(max_bytes=max(len(data), 1), max_megapixels=max(width * height / 1e6, 1.0))
    return data, limits, (height, width)


def _decoded(path: Path, decode) -> np.ndarray:
    from engines.errors import InputError

    try:
        return decode()
    except InputError as exc:
        raise DatasetError(f"{path}: {exc}") from exc


def _resize_crop(img: Image.Image, resolution: int | None, resample: Image.Resampling) -> Image.Image:
    width, height = img.size
    resolution = resolution or min(width, height)
    scale = resolution / min(width, height)
    new_w, new_h = max(resolution, round(width * scale)), max(resolution, round(height * scale))
    if (new_w, new_h) != (width, height):
        img = img.resize((new_w, new_h), resample=resample)
    left, top = (new_w - resolution) // 2, (new_h - resolution) // 2
    return img.crop((left, top, left + resolution, top + resolution))


def to_tensor(rgb: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> [3, H, W] float in [-1, 1]."""
    return torch.from_numpy(np.array(rgb, copy=True)).permute(2, 0, 1).float() / 127.5 - 1.0


class TripletDataset(torch.utils.data.Dataset):
    """Records as tensors at `resolution` (multiple of 64): source / GT in [-1, 1] [3,R,R], mask {0,1} [1,R,R].

    Items are dicts with "source", "mask", and "gt" when the record has one, "score" when it has one
    (the discriminator's label), and "index". `score_crops`: each record is the view the service's Scorer is
    given of it (score_view_job), not the center square: the discriminator then learns on the pixels it will score.
    """

    def __init__(self, records: Sequence[Triplet], resolution: int, score_crops: CropSettings | None = None):
        if resolution <= 0 or resolution % 64:
            raise ValueError(f"resolution must be a positive multiple of 64, got {resolution}")
        if not records:
            raise ValueError("a dataset needs at least one record")
        self.records = list(records)
        self.resolution = resolution
        self.score_crops = score_crops

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        record = self.records[index]
        item = {"index": torch.tensor(index)}
        if self.score_crops is not None:
            from engines.scorer import score_view

            job = score_view_job(record, self.score_crops)
            pictures = torch.stack([to_tensor(job.source), to_tensor(job.edited)])
            mask = torch.from_numpy(job.mask.astype(np.float32))[None, None]
            viewed, mask = score_view(pictures, mask, self.resolution)
            item.update(source=viewed[0], gt=viewed[1], mask=mask[0])
        else:
            item["source"] = to_tensor(load_rgb(record.source, self.resolution))
            item["mask"] = torch.from_numpy(load_mask(record.mask, self.resolution)).float()[None]
            if record.gt is not None:
                item["gt"] = to_tensor(load_rgb(record.gt, self.resolution))
        if record.score is not None:
            item["score"] = torch.tensor(record.score, dtype=torch.float32)
        return item


def score_view_job(record: Triplet, crops: CropSettings) -> ScoreJob:
    """The record's (source, mask, GT = the edited image) as POST /score cuts them (RemovalPipeline.prepare_score):
    decoded, the mask dilated by `crops.dilate`, one window planned around it at `crops`' buckets and margin, the
    mask as the Scorer is given it. The center square could hold none of the edit."""
    from engines.errors import InputError
    from engines.pipeline import RemovalPipeline

    files = [_read_file(path) for path in (record.source, record.mask, record.gt)]
    limits = imaging.DecodeLimits(
        max_bytes=max(limits.max_bytes for _, limits, _ in files),
        max_megapixels=max(limits.max_megapixels for _, limits, _ in files),
    )
    try:
        [job] = RemovalPipeline(None, crops, limits).prepare_score(*(data for data, _, _ in files), max_crops=1)
    except InputError as exc:
        raise DatasetError(f"{record.source}, {record.mask}, {record.gt}: {exc}") from exc
    return job


class StepBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Endless batches whose content depends only on (seed, batch number, process): resumable exactly.

    The sample stream is a concatenation of seeded permutations (one per epoch); global batch `b`
    takes `batch_size` consecutive positions for each process, so process `rank` of `world` gets
    positions ((b * world + rank) * batch_size ...). Starting at `start_batch` continues a run.
    """

    def __init__(
        self,
        size: int,
        batch_size: int,
        seed: int,
        start_batch: int = 0,
        world: int = 1,
        rank: int = 0,
        repeat_first: bool = False,
    ):
        if size <= 0 or batch_size <= 0:
            raise ValueError("a sampler needs a non-empty dataset and a positive batch size")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.start_batch, self.world, self.rank = start_batch, world, rank
        self.repeat_first = repeat_first  # every batch is batch 0 (overfitting one batch, a debug check)
        self._epoch, self._perm = -1, np.arange(0)

    def _position(self, position: int) -> int:
        epoch, offset = divmod(position, self.size)
        if epoch != self._epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.size)
            self._epoch = epoch
        return int(self._perm[offset])

    def batch(self, number: int) -> list[int]:
        first = (number * self.world + self.rank) * self.batch_size
        return [self._position(p) for p in range(first, first + self.batch_size)]

    def __iter__(self) -> Iterator[list[int]]:
        number = self.start_batch
        while True:
            yield self.batch(0 if self.repeat_first else number)
            number += 1

    def __len__(self) -> int:  # endless; DataLoader only needs it for len(), which the loops never call
        return 2**62


def save_image(array: np.ndarray, path: Path) -> Path:
    """Write an RGB image or a mask (bool: white = True) as a file, making its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    Image.fromarray(array).save(path)
    return path
