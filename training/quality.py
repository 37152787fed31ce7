"""Image similarity measures for judging removals: PSNR and SSIM (whole image or a region), LPIPS, and
the cosine similarity of CLIP or DINOv2 image embeddings.

Maintained implementations only: torchmetrics computes PSNR, SSIM and LPIPS, transformers runs CLIP
and DINOv2. The learned measures need weights, which are never downloaded here: a loader returns the
measure or the reason it is unavailable, and an evaluation reports that reason instead of a number.

Images are (H, W, 3) uint8 arrays, compared in [0, 1] (data range 1). A region is an (H, W) bool array.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Literal

import numpy as np
import torch

LpipsNet = Literal["alex", "vgg", "squeeze", "off"]
EmbeddingKind = Literal["clip", "dino"]
EMBEDDING_MODELS = {"clip": "CLIP", "dino": "DINOv2"}
EMBEDDING_MODEL_TYPES = {"clip": ("clip",), "dino": ("dinov2", "dinov2_with_registers")}


def _pixels(rgb: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> [1, 3, H, W] float32 in [0, 1]."""
    return torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1)[None].float() / 255.0


def psnr(edited: np.ndarray, reference: np.ndarray, region: np.ndarray | None = None) -> float | None:
    """PSNR in dB over every pixel, or over the region's pixels only (all three channels); inf when they
    are identical, None for an empty region."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    preds, target = _pixels(edited), _pixels(reference)
    if region is not None:
        if not region.any():
            return None
        selected = torch.from_numpy(region)
        preds, target = preds[..., selected], target[..., selected]
    return float(peak_signal_noise_ratio(preds, target, data_range=1.0))


def ssim(edited: np.ndarray, reference: np.ndarray, region: np.ndarray | None = None) -> float | None:
    """SSIM with torchmetrics' defaults (Gaussian window 11, sigma 1.5) over the whole image; with a region,
    the SSIM map averaged over the region's pixels (each pixel's window still sees its neighbours)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    if region is not None and not region.any():
        return None
    value, full = structural_similarity_index_measure(
        _pixels(edited), _pixels(reference), data_range=1.0, return_full_image=True
    )
    if region is None:
        return float(value)
    return float(full[..., torch.from_numpy(region)].mean())


def unavailable_reason(exc: Exception) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


class Lpips:
    """LPIPS (torchmetrics) of two images: lower is closer. Its backbone comes from torchvision's weights."""

    def __init__(self, net: Literal["alex", "vgg", "squeeze"], device: torch.device):
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

        self.metric = LearnedPerceptualImagePatchSimilarity(net_type=net, normalize=True).to(device).eval()
        self.device = device

    @torch.inference_mode()
    def __call__(self, edited: np.ndarray, reference: np.ndarray) -> float:
        preds, target = (_pixels(x).to(self.device) for x in (edited, reference))
        return float(self.metric(preds, target))


def load_lpips(net: LpipsNet, device: torch.device) -> tuple[Lpips | None, str | None]:
    """(the measure, None) or (None, why it is unavailable)."""
    if net == "off":
        return None, "turned off (lpips_net: off)"
    if importlib.util.find_spec("torchvision") is None:
        return None, f"torchvision is not installed: torchmetrics' LPIPS builds its {net} backbone with it"
    try:
        return Lpips(net, device), None
    except Exception as exc:  # noqa: BLE001 - its backbone weights not in the local cache, or anything else
        return None, f"torchmetrics' LPIPS ({net}) could not be built: {unavailable_reason(exc)}"


class ImageEmbedder:
    """A local transformers folder, CLIP (projected image features) or DINOv2 (CLS token after the final
    norm): image -> unit embedding. local_files_only: a missing file is an error, never a download."""

    def __init__(self, kind: EmbeddingKind, path: str | Path, device: torch.device):
        if not Path(path).is_dir():
            raise FileNotFoundError(f"{path} is not a folder")
        from transformers import AutoConfig, AutoImageProcessor, AutoModel, CLIPModel

        model_type = AutoConfig.from_pretrained(str(path), local_files_only=True).model_type
        if model_type not in EMBEDDING_MODEL_TYPES[kind]:
            raise ValueError(f"the folder holds a {model_type!r} model, not {EMBEDDING_MODELS[kind]}")
        model_class = CLIPModel if kind == "clip" else AutoModel
        model, loading = model_class.from_pretrained(str(path), local_files_only=True, output_loading_info=True)
        if loading["missing_keys"]:  # transformers would fill them with random values
            missing = sorted(loading["missing_keys"])
            raise ValueError(f"{len(missing)} weights are missing from the folder, e.g. {missing[:3]}")
        self.kind = kind
        self.device = device
        self.processor = AutoImageProcessor.from_pretrained(str(path), local_files_only=True)
        self.model = model.to(device).eval()

    @torch.inference_mode()
    def embed(self, images: list[np.ndarray]) -> torch.Tensor:
        inputs = self.processor(images=images, return_tensors="pt").to(self.device)
        if self.kind == "clip":
            output = self.model.get_image_features(pixel_values=inputs["pixel_values"])
        else:
            output = self.model(pixel_values=inputs["pixel_values"])
        features = output if isinstance(output, torch.Tensor) else output.pooler_output
        return torch.nn.functional.normalize(features.float(), dim=-1)

    def similarity(self, edited: np.ndarray, reference: np.ndarray) -> float:
        """Cosine similarity of the two images' embeddings, in [-1, 1]."""
        first, second = self.embed([edited, reference])
        return float(first @ second)


def load_embedder(
    kind: EmbeddingKind, path: Path | None, device: torch.device
) -> tuple[ImageEmbedder | None, str | None]:
    """(the embedder, None) or (None, why it is unavailable)."""
    flag = f"--{kind}-model"
    if path is None:
        return None, f"no {flag} given (a local transformers {EMBEDDING_MODELS[kind]} folder)"
    try:
        return ImageEmbedder(kind, path, device), None
    except Exception as exc:  # noqa: BLE001 - missing files, a broken config: the reason is reported
        return None, f"{flag} {path} could not be loaded: {unavailable_reason(exc)}"
