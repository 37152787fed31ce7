"""Where the authors' pieces are named: `hf:OWNER/NAME[@REVISION][/SUBPATH]` references and the published ones.

Without torch or diffusers, so that the service's config and its CLI check a layout before anything starts
(engines.authors_layout imports it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from engines.errors import BundleError

HUB_PREFIX = "hf:"
COMMIT = re.compile(r"[0-9a-f]{40}")  # how the hub names a commit, and its cache a snapshot folder
# Published on the hub: the RORem pipeline, and the SDXL-inpainting pipeline whose UNet the authors trained the
# discriminator on.
ROREM_PIPELINE = "hf:LetsThink/RORem"
SDXL_INPAINTING_PIPELINE = "hf:diffusers/stable-diffusion-xl-1.0-inpainting-0.1"
SDXL_INPAINTING_UNET = f"{SDXL_INPAINTING_PIPELINE}/unet"


def local_path(ref: object) -> Path | None:
    """The file or folder a piece reference names on this machine; None for a hub reference or none."""
    if not isinstance(ref, str) or not ref or ref.startswith(HUB_PREFIX):
        return None
    return Path(ref).expanduser()


@dataclass(frozen=True)
class HubRef:
    """`hf:OWNER/NAME[@REVISION][/SUBPATH]`: a piece on the Hugging Face hub."""

    repo_id: str
    revision: str | None  # a commit, branch or tag; None: the repository's default branch
    subpath: str

    @classmethod
    def parse(cls, ref: str) -> HubRef:
        owner, _, rest = ref[len(HUB_PREFIX) :].strip("/").partition("/")
        name_at, _, subpath = rest.partition("/")
        name, at, revision = name_at.partition("@")
        if not owner or not name or (at and not revision) or "@" in subpath:
            raise BundleError(f"{ref}: expected hf:OWNER/NAME[@REVISION][/SUBPATH]")
        return cls(f"{owner}/{name}", revision or None, subpath)

    @property
    def pinned(self) -> bool:
        """Only a commit names fixed weights: a branch or tag can be moved to other ones."""
        return self.revision is not None and COMMIT.fullmatch(self.revision) is not None

    def at(self, commit: str) -> str:
        return f"{HUB_PREFIX}{self.repo_id}@{commit}" + (f"/{self.subpath}" if self.subpath else "")

    @property
    def commits_page(self) -> str:
        return f"https://huggingface.co/{self.repo_id}/commits/main"


def is_sdxl_inpainting_pipeline(ref: str) -> bool:
    """`ref` names the SDXL-inpainting pipeline on the hub (at any revision): its unet/ is that UNet, not RORem's.
    A local folder is not known to be it."""
    if not ref.startswith(HUB_PREFIX):
        return False
    hub = HubRef.parse(ref)
    return hub.repo_id == HubRef.parse(SDXL_INPAINTING_PIPELINE).repo_id and not hub.subpath


def discriminator_trunk_problem(base: str, discriminator: str | None, discriminator_unet: str | None) -> str | None:
    """Why the discriminator would not be built on the SDXL-inpainting UNet it was trained on, or None."""
    if not discriminator or discriminator_unet or is_sdxl_inpainting_pipeline(base):
        return None
    return (
        f"discriminator_unet is not set, and base ({base}) is not the SDXL-inpainting pipeline on the hub: "
        "its unet/ may be RORem's (LetsThink/RORem's is), and the discriminator was trained on the "
        f"SDXL-inpainting UNet. Set discriminator_unet to {SDXL_INPAINTING_UNET} at a commit (or a local copy; "
        "base itself if base is a copy of the SDXL-inpainting pipeline)"
    )
