"""Import the layout the RORem authors publish into a project bundle.

Where the pieces are (github.com/leeruibin/RORem, README and inference scripts):
- `hf:LetsThink/RORem`: a full diffusers SDXL-inpainting pipeline (VAE, scheduler, both CLIP text
  encoders and tokenizers) whose `unet/` is RORem's. As `base` without `unet`, it gives everything
  but the LoRA and the discriminator. (Or the authors' scripts' own layout: base =
  the SDXL-inpainting pipeline, `unet` = a RORem UNet folder.) No variant is ever requested.
- the RORem-4S LCM LoRA (`pytorch_lora_weights.safetensors`, trained on the RORem UNet) and the
  discriminator folder (`pytorch_lora_weights.safetensors` + `cls_pred_branch.pt`, trained on the
  *SDXL-inpainting* UNet) are on Google Drive only (DRIVE_FOLDERS): download them, copy them where
  `lcm_lora` / `discriminator` point. The head may also be `cls_pred_branch.safetensors`.
- the discriminator's trunk, `discriminator_unet`: the SDXL-inpainting UNet (SDXL_INPAINTING_UNET). It may
  be left out only when base is that pipeline on the hub; a trunk with the RORem UNet's weights is refused.
Each piece is a local path or `hf:OWNER/NAME[@REVISION][/SUBPATH]` on the Hugging Face hub (the
revision where huggingface_hub's HfFileSystem puts it). A hub piece without a commit follows a branch
that can move: it is resolved to the commit the branch is at, with a warning, and the bundle names
that commit. Local pieces are checked before anything is downloaded, and one error names every
missing file and where it was looked for. The import fuses the LoRAs, computes the constant prompt
embeddings once, and writes a bundle; serving then never loads a text encoder.
"""

from __future__ import annotations

import logging
import posixpath
import re
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from diffusers import AutoencoderKL, LCMScheduler, UNet2DConditionModel

from engines.bundle import Bundle, DTypeName, SamplingDefaults, sha256_of
from engines.errors import BundleError
from engines.hub_refs import (
    COMMIT,
    HUB_PREFIX,
    SDXL_INPAINTING_UNET,
    HubRef,
    discriminator_trunk_problem,
    local_path,
)
from engines.lora import fuse_lora_file

if TYPE_CHECKING:
    from engines.scorer import Discriminator

logger = logging.getLogger(__name__)

# raised whenever the import makes other bundle files from the same inputs: it is in the import cache key, so a
# bundle imported before is imported again. 2: the discriminator's trunk checked, fp32 prompt embeddings.
IMPORTER_VERSION = 2
LORA_FILENAME = "pytorch_lora_weights.safetensors"
PIPELINE_PARTS = ("vae", "scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
WEIGHT_SUFFIXES = (".safetensors", ".bin")
FILE_SUFFIXES = (".safetensors", ".pt")  # a hub piece whose subpath ends so is one file
UNET_READS = ("config.json", "diffusion_pytorch_model*", "unet/*")  # a UNet folder, or a pipeline's unet/
# never read here: weight variants (none is ever requested), single-file checkpoints, other frameworks' formats
NOT_READ = ("*.fp16.*", "*.ckpt", "*.onnx*", "*.msgpack", "*.h5", "*.pb")
# Published on Google Drive only (the authors' README), by AuthorsLayout field.
DRIVE_FOLDERS = {
    "lcm_lora": ("RORem-LCM", "https://drive.google.com/drive/folders/1QK8qcqT7SKRzD2AyGtgfwWwlQrUesAc1"),
    "discriminator": (
        "RORem-Discriminator",
        "https://drive.google.com/drive/folders/1ka3tN_hEeP1QR2CU81Uf9QM1JBHdDvc2",
    ),
}


@dataclass(frozen=True)
class AuthorsLayout:
    base: str  # pipeline folder: VAE, scheduler, text encoders, tokenizers (+ unet/, see below)
    unet: str | None = None  # RORem UNet folder; None: base's unet/ (base is then the RORem pipeline)
    lcm_lora: str | None = None  # the import needs it: the LoRA file, or its folder (pytorch_lora_weights.safetensors)
    discriminator: str | None = None  # folder: pytorch_lora_weights.safetensors + cls_pred_branch.{safetensors,pt}
    # the SDXL-inpainting UNet (folder, or a pipeline folder with unet/) the discriminator's LoRA
    # applies to; None only when base is the SDXL-inpainting pipeline on the hub (its unet/ is that UNet)
    discriminator_unet: str | None = None

    def describe(self) -> dict[str, str | None]:
        """The layout as recorded in provenance (`source`) and in import cache keys (with the local files'
        sha256). `discriminator` and `discriminator_unet` appear only when set."""
        described = {"base": self.base, "unet": self.unet, "lcm_lora": self.lcm_lora}
        for optional in ("discriminator", "discriminator_unet"):
            if getattr(self, optional) is not None:
                described[optional] = getattr(self, optional)
        return described


@dataclass(frozen=True)
class LocatedLayout:
    """Every file or folder the import reads, all checked to exist."""

    base: Path
    unet: Path
    lcm_lora: Path | None
    discriminator_lora: Path | None
    discriminator_head: Path | None
    discriminator_unet: Path | None


def _pieces(layout: AuthorsLayout) -> dict[str, str]:
    return {field.name: ref for field in fields(layout) if (ref := getattr(layout, field.name))}


def _check_local_pieces(layout: AuthorsLayout) -> _Finder:
    """The local pieces, found; raises (one BundleError naming every missing file) before anything is downloaded."""
    problem = discriminator_trunk_problem(layout.base, layout.discriminator, layout.discriminator_unet)
    if problem:
        raise BundleError(problem)
    local = {field: path for field, ref in _pieces(layout).items() if (path := local_path(ref))}
    finder = _Finder(layout, local)
    finder.raise_if_missing("nothing was downloaded")
    return finder


def locate(layout: AuthorsLayout) -> LocatedLayout:
    """Find every piece: the local ones first (nothing is downloaded while one is missing), then
    the hub ones. Each round raises one BundleError naming every missing file and where it looked."""
    local = _check_local_pieces(layout).paths
    fetched = {
        field: fetch(ref, piece_reads(layout, field)) for field, ref in _pieces(layout).items() if field not in local
    }
    found = _Finder(layout, {**local, **fetched})
    found.raise_if_missing("")
    return found.located()


def pin(layout: AuthorsLayout) -> AuthorsLayout:
    """The layout with each hub piece at the commit it is at now, so that the import, its cache key and the
    bundle's provenance name the weights read. Downloads what is not pinned (after the local pieces are found)."""
    local = _check_local_pieces(layout).paths
    pinned = {
        field: _pin(ref, piece_reads(layout, field)) for field, ref in _pieces(layout).items() if field not in local
    }
    return replace(layout, **pinned)


def pin_hub_pieces(layout: AuthorsLayout) -> AuthorsLayout:
    """The layout with each hub piece at the commit it is at now, asked of the hub without downloading anything
    (offline: of its local cache); local pieces as they are, unchecked. For where a service is built, once: its
    replicas, each resolving a branch at its own start, served other weights once the branch moved."""
    hub_pieces = {field: ref for field, ref in _pieces(layout).items() if ref.startswith(HUB_PREFIX)}
    return replace(layout, **{field: _pin(ref, ()) for field, ref in hub_pieces.items()})


def _pin(ref: str, reads: tuple[str, ...]) -> str:
    """`ref` at a commit: the one its branch is at, downloading what `reads` names (nothing: only the commit)."""
    hub = HubRef.parse(ref)
    if hub.pinned:
        return ref
    commit = _snapshot(hub, reads).name if reads else _head_commit(hub)
    logger.warning(
        "%s is not pinned to a commit: it follows %s, now at %s; write %s to keep importing these weights",
        ref, hub.revision or "the default branch", commit, hub.at(commit),
    )  # fmt: skip
    return hub.at(commit)


def _head_commit(hub: HubRef) -> str:
    """The commit hub.revision is at: the hub's answer, else (offline) the local cache's."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    at = hub.revision or "the default branch"
    try:
        commit = HfApi().repo_info(hub.repo_id, revision=hub.revision).sha
    except (RepositoryNotFoundError, RevisionNotFoundError) as exc:  # gated too: the hub's answer, not a cache's
        raise BundleError(f"the Hugging Face hub has no {hub.repo_id} at {at} for us: {type(exc).__name__}") from exc
    except Exception:  # huggingface_hub raises many types for "offline"; the cache may know the branch
        try:
            commit = Path(snapshot_download(hub.repo_id, revision=hub.revision, local_files_only=True)).name
        except Exception as exc:
            raise BundleError(
                f"cannot resolve {hub.repo_id} at {at} to a commit: the Hugging Face hub does not answer and its "
                f"local cache does not know it ({type(exc).__name__}); name the commit: {hub.at('COMMIT')}"
            ) from exc
    if not commit or not COMMIT.fullmatch(commit):
        raise BundleError(f"{hub.repo_id} at {hub.revision or 'the default branch'}: gave {commit!r}, not a commit")
    return commit


def local_inputs_sha256(layout: AuthorsLayout, sha256: Callable[[Path], str] = sha256_of) -> dict[str, str]:
    """sha256 of every local file the import reads, by path: with the commits of the hub pieces (in their refs),
    what the imported bundle depends on besides prompt and dtype."""
    files = {file for path in _check_local_pieces(layout).reads for file in folder_files(path)}
    return {str(file): sha256(file) for file in sorted(files)}


def verify_sha256_lists(
    layout: AuthorsLayout, lists: dict[str, str], sha256: Callable[[Path], str] = sha256_of
) -> None:
    """Before the import, the local pieces copied by hand (Google Drive publishes no checksum) against the sha256
    sums given for them: `lists` maps a field (lcm_lora, discriminator) to `sha256sum` output, "SHA256 FILE" pairs
    with FILE relative to the piece's folder (an empty list: not checked). Every file the import reads of the
    piece must be listed and match. One BundleError names every mismatch."""
    problems = []
    for field, listing in lists.items():
        if not listing.strip():
            continue
        ref = getattr(layout, field)
        path = local_path(ref) if ref else None
        if path is None:
            problems.append(f"{field}: sha256 sums are given, but {field} ({ref or 'not set'}) is no local piece")
            continue
        tokens = listing.split()
        pairs = list(zip(tokens[::2], tokens[1::2]))
        malformed = [digest for digest, _ in pairs if not re.fullmatch(r"[0-9a-fA-F]{64}", digest)]
        if len(tokens) % 2 or malformed:
            problems.append(f"{field}: the sha256 list is not `sha256sum` output (SHA256 FILE pairs): {listing!r}")
            continue
        expected = {name.lstrip("*"): digest.lower() for digest, name in pairs}  # `*`: sha256sum's binary mode
        reads = [file for file in _Finder(layout, {field: path}).reads if file.is_file()]
        read_names = {(file.relative_to(path).as_posix() if path.is_dir() else file.name): file for file in reads}
        for name, file in sorted(read_names.items()):
            if name not in expected:
                problems.append(f"{field}: {file} has no sha256 in the list, and the import reads it")
            elif (actual := sha256(file)) != expected[name]:
                problems.append(f"{field}: {file} has sha256 {actual}, the list says {expected[name]}")
        unread = [name for name in expected if name not in read_names]
        problems += [f"{field}: {name} is listed, but {path} holds no such file the import reads" for name in unread]
    if problems:
        head = "the local pieces do not match their sha256 lists (a different or damaged copy: copy it again)"
        raise BundleError("\n  - ".join([head, *problems]))


def folder_files(path: Path) -> list[Path]:
    """The file, or the files in the folder but hidden ones (a download's .cache/ bookkeeping is not read)."""
    if path.is_file():
        return [path]
    return [
        file for file in path.rglob("*")
        if file.is_file() and not any(part.startswith(".") for part in file.relative_to(path).parts)
    ]  # fmt: skip


def refuse_unpinned(layout: AuthorsLayout) -> None:
    """For imports that must be reproducible (the Kubernetes Job): every hub piece names a commit."""
    hubs = {field: HubRef.parse(ref) for field, ref in _pieces(layout).items() if ref.startswith(HUB_PREFIX)}
    unpinned = [f"{field} ({getattr(layout, field)}): pick it on {hub.commits_page}" for field, hub in hubs.items()
                if not hub.pinned]  # fmt: skip
    if unpinned:
        head = "each hub piece must name the commit to import: hf:OWNER/NAME@COMMIT[/SUBPATH], the 40-character hash"
        raise BundleError("\n  - ".join([head, *unpinned]))


class _Finder:
    """Looks for each piece's files where the authors put them, collecting what is missing."""

    def __init__(self, layout: AuthorsLayout, paths: dict[str, Path]):
        self.layout, self.paths, self.problems = layout, paths, []
        self.found: dict[str, Path | None] = {}
        self.reads: list[Path] = []  # the files and folders the import reads
        for field, path in paths.items():
            getattr(self, f"_{field}")(path)

    def raise_if_missing(self, note: str) -> None:
        if self.problems:
            head = f"the authors' layout is incomplete{f' ({note})' if note else ''}:"
            raise BundleError("\n  - ".join([head, *self.problems]))

    def located(self) -> LocatedLayout:
        base = self.paths["base"]
        unet = self.found.get("unet") or base / "unet"
        disc_unet = self.found.get("discriminator_unet") or (base / "unet" if self.layout.discriminator else None)
        return LocatedLayout(
            base=base,
            unet=unet,
            lcm_lora=self.found.get("lcm_lora"),
            discriminator_lora=self.found.get("discriminator_lora"),
            discriminator_head=self.found.get("discriminator_head"),
            discriminator_unet=disc_unet,
        )

    def _missing(self, field: str, what: str, looked: list[Path]) -> None:
        ref = getattr(self.layout, field)
        where = " or ".join(str(p) for p in looked)
        line = f"{field} ({ref}): {what} not found; looked for {where}"
        nested = [hit for p in looked for hit in _nested_copies(p)]
        if nested:
            line += f"; found {nested[0]}: point {field} at its folder"
        if field in DRIVE_FOLDERS and not ref.startswith(HUB_PREFIX):
            name, url = DRIVE_FOLDERS[field]
            line += f"; it is on Google Drive only: download the folder {name} from {url}, copy its files to {looked[0].parent}"
        self.problems.append(line)

    def _base(self, path: Path) -> None:
        wanted = _base_parts(self.layout)
        absent = [path / part for part in wanted if not (path / part).is_dir()]
        self.reads += [path / part for part in wanted]
        if not path.is_dir():
            self._missing("base", "the pipeline folder", [path])
        elif absent:
            parts = ", ".join(p.name + "/" for p in absent)
            self._missing("base", f"not an SDXL-inpainting pipeline folder: {parts}", absent)

    def _unet(self, path: Path, field: str = "unet") -> None:
        """A UNet folder, or a pipeline folder holding one in unet/ (as the authors load it)."""
        candidates = [path / "config.json", path / "unet" / "config.json"]
        config = next((c for c in candidates if c.is_file()), None)
        if config is None:
            self._missing(field, "a UNet config.json", candidates)
        self.found[field] = config.parent if config else None
        self.reads += [config.parent] if config else []

    def _discriminator_unet(self, path: Path) -> None:
        self._unet(path, "discriminator_unet")

    def _lcm_lora(self, path: Path) -> None:
        file = path if path.suffix == ".safetensors" else path / LORA_FILENAME
        if not file.is_file():
            self._missing("lcm_lora", LORA_FILENAME, [file])
        self.found["lcm_lora"] = file
        self.reads.append(file)

    def _discriminator(self, path: Path) -> None:
        from engines.scorer import HEAD_FILENAMES, find_head_file

        lora, head = path / LORA_FILENAME, find_head_file(path)
        if not lora.is_file():
            self._missing("discriminator", LORA_FILENAME, [lora])
        if head is None:
            self._missing("discriminator", "the head", [path / name for name in HEAD_FILENAMES])
        self.found["discriminator_lora"], self.found["discriminator_head"] = lora, head
        self.reads += [lora, head] if head else [lora]


def _base_parts(layout: AuthorsLayout) -> tuple[str, ...]:
    """The folders the import reads of base."""
    if not layout.unet or (layout.discriminator and not layout.discriminator_unet):
        return (*PIPELINE_PARTS, "unet")  # RORem's UNet, or the discriminator's (see AuthorsLayout)
    return PIPELINE_PARTS


def pipeline_reads(parts: tuple[str, ...] = (*PIPELINE_PARTS, "unet")) -> tuple[str, ...]:
    """Globs of a pipeline folder's `parts`, each read whole."""
    return tuple(f"{part}/*" for part in parts)


def piece_reads(layout: AuthorsLayout, field: str) -> tuple[str, ...]:
    """Globs, relative to a piece's folder, of the files the import reads of it: all a hub piece downloads."""
    from engines.scorer import HEAD_FILENAMES

    return {
        "base": pipeline_reads(_base_parts(layout)),
        "unet": UNET_READS,
        "discriminator_unet": UNET_READS,
        "lcm_lora": (LORA_FILENAME,),
        "discriminator": (LORA_FILENAME, *HEAD_FILENAMES),
    }[field]


def _refuse_rorem_unet_as_trunk(found: LocatedLayout, inputs_sha256: dict[str, str]) -> None:
    """The discriminator built on the RORem UNet scores wrongly without a word: refuse a trunk that shares a
    weight file with it. A local file is known by its sha256, a hub one by its cache blob, which the hub's cache
    names by the sha256 of a weight (LFS) file."""

    def content(file: Path) -> str:
        blob = file.resolve()
        return inputs_sha256.get(str(file)) or (blob.name if blob.parent.name == "blobs" else str(blob))

    def weights(folder: Path) -> set[str]:
        return {content(file) for file in folder_files(folder) if file.suffix in WEIGHT_SUFFIXES}

    if found.discriminator_unet and weights(found.discriminator_unet) & weights(found.unet):
        raise BundleError(
            f"discriminator_unet ({found.discriminator_unet}) holds the weights of the RORem UNet ({found.unet}); the "
            f"discriminator was trained on the SDXL-inpainting UNet: set discriminator_unet to {SDXL_INPAINTING_UNET} "
            "at a commit (or a local copy)"
        )


def _nested_copies(path: Path, depth: int = 3) -> list[Path]:
    """Files named like `path` further down its parent folder (an unpacked Drive download adds a level)."""
    folder = path.parent
    if not folder.is_dir():
        return []
    return sorted(
        hit for hit in folder.rglob(path.name) if hit != path and len(hit.relative_to(folder).parts) <= depth
    )[:1]


def fetch(ref: str, reads: tuple[str, ...] = ("*",)) -> Path:
    """A local path as is; `hf:OWNER/NAME[@REVISION][/SUBPATH]` from the hub (or its local cache), with a clear
    error offline. `reads`: globs, relative to SUBPATH, of the files needed (see download_patterns)."""
    if not ref.startswith(HUB_PREFIX):
        path = Path(ref).expanduser()
        if not path.exists():
            raise BundleError(f"{ref} does not exist")
        return path
    hub = HubRef.parse(ref)
    path = _snapshot(hub, reads) / hub.subpath
    if not path.exists():
        raise BundleError(f"{ref}: {hub.subpath} not found in {hub.repo_id}")
    return path


def download_patterns(
    subpath: str, reads: tuple[str, ...], files: list[str] | None
) -> tuple[list[str], list[str] | None]:
    """snapshot_download's allow and ignore patterns for the files `reads` names under `subpath`, without what no
    loader here reads (NOT_READ) and, where the repository's listing `files` is known, without the .bin weights
    of a folder that has .safetensors ones (diffusers and transformers load those first; a folder with .bin
    only keeps them)."""
    from huggingface_hub.utils import filter_repo_objects

    if subpath.endswith(FILE_SUFFIXES):
        return [subpath], None

    def under(globs: tuple[str, ...]) -> list[str]:
        return [f"{subpath}/{glob}" if subpath else glob for glob in globs]

    allow, ignore = under(reads), under(NOT_READ)
    if files is not None:
        kept = list(filter_repo_objects(files, allow_patterns=allow, ignore_patterns=ignore))
        safetensors_folders = {posixpath.dirname(file) for file in kept if file.endswith(".safetensors")}
        ignore += [file for file in kept if file.endswith(".bin") and posixpath.dirname(file) in safetensors_folders]
    return allow, ignore


def _repo_files(hub: HubRef) -> list[str] | None:
    """The repository's files at hub.revision; None where the hub does not answer (offline, the cache does)."""
    from huggingface_hub import list_repo_files

    try:
        return list_repo_files(hub.repo_id, revision=hub.revision)
    except Exception:  # huggingface_hub raises many types for "offline"; snapshot_download says what is wrong
        return None


def _snapshot(hub: HubRef, reads: tuple[str, ...]) -> Path:
    """The snapshot folder of hub's revision (its name is the commit), downloading only what `reads` names."""
    at = f" at {hub.revision}" if hub.revision else ""
    try:
        from huggingface_hub import snapshot_download

        allow, ignore = download_patterns(hub.subpath, reads, _repo_files(hub))
        root = Path(snapshot_download(hub.repo_id, revision=hub.revision, allow_patterns=allow, ignore_patterns=ignore))
    except Exception as exc:  # huggingface_hub raises many types for "offline" and "not found"
        option = f" --revision {hub.revision}" if hub.revision else ""
        raise BundleError(
            f"cannot fetch {hub.repo_id}{at} from the Hugging Face hub and it is not in the local cache "
            f"({type(exc).__name__}: {str(exc).splitlines()[0]}). Download it on a connected machine "
            f"(`huggingface-cli download {hub.repo_id}{option}`) or point the bundle at a local folder."
        ) from exc
    if not COMMIT.fullmatch(root.name) or (hub.pinned and root.name != hub.revision):
        raise BundleError(f"{hub.repo_id}{at}: the hub's cache gave {root}, not the snapshot folder of a commit")
    return root


@torch.no_grad()
def encode_constant_prompt(base: Path, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL prompt encoding as diffusers does it: penultimate hidden states of both CLIP
    encoders concatenated, pooled output of the second. In fp32 whatever the stored dtype: transformers 5 loads
    a model in its stored dtype (LetsThink/RORem's encoders are fp16), 4 in fp32; `torch_dtype` is the name both
    accept."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    encoders = [
        (
            CLIPTokenizer.from_pretrained(base / "tokenizer"),
            CLIPTextModel.from_pretrained(base / "text_encoder", torch_dtype=torch.float32),
        ),
        (
            CLIPTokenizer.from_pretrained(base / "tokenizer_2"),
            CLIPTextModelWithProjection.from_pretrained(base / "text_encoder_2", torch_dtype=torch.float32),
        ),
    ]
    hidden, pooled = [], None
    for tokenizer, encoder in encoders:
        ids = tokenizer(
            prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        out = encoder.eval()(ids, output_hidden_states=True)
        if pooled is None and out[0].ndim == 2:
            pooled = out[0]
        hidden.append(out.hidden_states[-2])
    if pooled is None:
        raise BundleError(f"{base}: text_encoder_2 gave no pooled output")
    return torch.cat(hidden, dim=-1), pooled


def import_authors_layout(
    layout: AuthorsLayout,
    out_dir: str | Path,
    *,
    prompt: str = "",
    dtype: DTypeName = "float16",
    name: str = "rorem-4s",
    sampling: SamplingDefaults | None = None,
    provenance: dict | None = None,
    lcm_schedule: dict | None = None,
    require_pinned: bool = False,
    file_sha256: Callable[[Path], str] = sha256_of,
) -> Bundle:
    """The bundle samples RORem-4S: 4 LCM steps, which only the LCM LoRA fused into the UNet makes right. The
    engine has no other sampler, so a layout without the LoRA is refused before anything is read or downloaded.
    The bundle's provenance names each hub piece at the commit read (require_pinned: every one must name it) and
    the sha256 of each local file read (file_sha256: how to get it, e.g. remembered by open_bundle).
    lcm_schedule: LCMScheduler settings the LoRA was distilled with (original_inference_steps, timestep_scaling),
    over LCMScheduler's defaults (50 and 10, the authors')."""
    if require_pinned:
        refuse_unpinned(layout)
    if not layout.lcm_lora:
        name, url = DRIVE_FOLDERS["lcm_lora"]
        raise BundleError(
            "lcm_lora is not set: the service samples RORem-4S (4 LCM steps), which needs the LCM LoRA fused into "
            f"the UNet; without it the UNet would be sampled wrongly. Download the folder {name} from {url} and "
            "point lcm_lora at it"
        )
    layout = pin(layout)
    found = locate(layout)
    inputs_sha256 = local_inputs_sha256(layout, file_sha256)
    _refuse_rorem_unet_as_trunk(found, inputs_sha256)
    discriminator, discriminator_info, discriminator_embeds = None, None, None
    if found.discriminator_lora:
        # first, so the fp32 SDXL-inpainting UNet is freed before the RORem UNet is loaded
        discriminator, discriminator_info = _import_discriminator(found)
    unet = UNet2DConditionModel.from_pretrained(found.unet, torch_dtype=torch.float32)
    if unet.config.in_channels != 9:
        raise BundleError(f"{found.unet}: UNet has {unet.config.in_channels} input channels, an inpainting UNet has 9")
    lora_info = fuse_lora_file(unet, found.lcm_lora).as_dict()
    base = found.base
    vae = AutoencoderKL.from_pretrained(base / "vae", torch_dtype=torch.float32)
    scheduler = LCMScheduler.from_pretrained(base / "scheduler", **(lcm_schedule or {}))
    prompt_embeds, pooled = encode_constant_prompt(base, prompt)
    if discriminator is not None:
        discriminator_embeds = (prompt_embeds, pooled) if prompt == "" else encode_constant_prompt(base, "")
    return Bundle.write(
        out_dir,
        name=name,
        unet=unet,
        vae=vae,
        scheduler=scheduler,
        prompt=prompt,
        prompt_embeds=prompt_embeds,
        pooled_prompt_embeds=pooled,
        dtype=dtype,
        sampling=sampling,
        provenance={
            "source": layout.describe(),
            "importer_version": IMPORTER_VERSION,
            "inputs_sha256": inputs_sha256,
            "lcm_lora": lora_info,
            **({"discriminator": discriminator_info} if discriminator is not None else {}),
            **(provenance or {}),
        },
        discriminator=discriminator,
        discriminator_prompt_embeds=discriminator_embeds,
    )


def _import_discriminator(found: LocatedLayout) -> tuple[Discriminator, dict]:
    """The published discriminator on the SDXL-inpainting UNet it was trained on (fp32, LoRA fused)."""
    from engines.scorer import load_published_discriminator

    base_unet = UNet2DConditionModel.from_pretrained(found.discriminator_unet, torch_dtype=torch.float32)
    discriminator, info = load_published_discriminator(base_unet, found.discriminator_lora, found.discriminator_head)
    del base_unet
    return discriminator, info
