"""What an engine is asked to do: plain numpy in, so the Ingress and the pipeline can build jobs
without loading the model libraries (torch, diffusers) that only the model replicas need."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LATENT_CELL = 8  # pixels a side of one latent cell: SDXL's VAE downscales by 8
SCORE_SIZE = 512  # the side of the view the discriminator scores, the only size it was trained at


@dataclass
class RemovalJob:
    """One square crop to fill: white (True) mask pixels are removed."""

    image: np.ndarray  # (S, S, 3) uint8
    mask: np.ndarray  # (S, S) bool
    seed: int


@dataclass
class ScoreJob:
    """One removal to judge: the source crop, its mask (True = removed) and the edited crop, same size."""

    source: np.ndarray  # (H, W, 3) uint8
    mask: np.ndarray  # (H, W) bool
    edited: np.ndarray  # (H, W, 3) uint8

    def check(self) -> None:
        h, w = self.mask.shape[:2]
        if self.source.shape != (h, w, 3) or self.edited.shape != (h, w, 3) or self.mask.ndim != 2:
            raise ValueError(
                f"a score job needs source (H,W,3), mask (H,W), edited (H,W,3) of one size; got "
                f"{self.source.shape}, {self.mask.shape}, {self.edited.shape}"
            )
