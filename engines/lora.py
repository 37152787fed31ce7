"""Fuse a LoRA file into a UNet so that every tensor in the file is applied.

The RORem authors save LoRAs with diffusers' `convert_state_dict_to_diffusers`, which renames only
the attention projections to `.lora.down/.lora.up` and leaves every other target as
`.lora_A/.lora_B`. diffusers' own loader picks one format from the first key and silently drops
the rest, so RORem-4S is loaded here by normalising every key and fusing explicitly. Two keys that
normalise to the same tensor are refused (keeping either would be a guess), and the count of applied
tensors is checked against the file's own keys.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

_KEY_SUFFIXES = {
    ".lora.down.weight": "down",
    ".lora.up.weight": "up",
    ".lora_A.weight": "down",
    ".lora_B.weight": "up",
    ".lora_linear_layer.down.weight": "down",
    ".lora_linear_layer.up.weight": "up",
    ".alpha": "alpha",
}
_PREFIXES = ("unet.", "base_model.model.")


class LoRAError(ValueError):
    """The LoRA file does not match the model it is fused into."""


@dataclass(frozen=True)
class FusedLoRA:
    """What a fuse did: recorded in the bundle manifest's provenance."""

    file: str
    tensors_in_file: int
    tensors_applied: int
    modules: int
    rank: int
    scale: float

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@contextmanager
def open_lora(path: str | Path) -> Iterator:
    """`safe_open`, with a file safetensors cannot read (cut short, not safetensors) a LoRAError naming it."""
    try:
        with safe_open(str(path), framework="pt") as f:
            yield f
    except SafetensorError as exc:
        raise LoRAError(f"LoRA file {path}: not a readable safetensors file ({exc})") from None


def read_lora_file(path: str | Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, str]]:
    """Group a LoRA file's tensors by target module: {module: {"down", "up", "alpha"?}}."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    source_keys: dict[tuple[str, str], str] = {}
    with open_lora(path) as f:
        metadata = f.metadata() or {}
        for key in f.keys():
            module, role = _split_key(key)
            if (module, role) in source_keys:
                first, second = sorted((source_keys[module, role], key))
                raise LoRAError(
                    f"LoRA file {path}: keys {first!r} and {second!r} both name the {role} tensor of {module}"
                )
            source_keys[module, role] = key
            groups.setdefault(module, {})[role] = f.get_tensor(key)
    for module, parts in groups.items():
        if "down" not in parts or "up" not in parts:
            raise LoRAError(f"LoRA file {path}: module {module} lacks its {'up' if 'down' in parts else 'down'} matrix")
    return groups, metadata


def _split_key(key: str) -> tuple[str, str]:
    for suffix, role in _KEY_SUFFIXES.items():
        if key.endswith(suffix):
            module = key[: -len(suffix)]
            for prefix in _PREFIXES:
                if module.startswith(prefix):
                    module = module[len(prefix) :]
            return module, role
    raise LoRAError(f"unrecognised LoRA key {key!r}")


def _alpha_from_metadata(metadata: dict[str, str]) -> float | None:
    for name in ("lora_adapter_metadata", "unet.lora_adapter_metadata"):
        if name in metadata:
            try:
                return float(json.loads(metadata[name])["lora_alpha"])
            except (KeyError, ValueError, TypeError):
                return None
    return None


@torch.no_grad()
def fuse_lora_file(model: nn.Module, path: str | Path, alpha: float | None = None) -> FusedLoRA:
    """Add `scale * up @ down` into each target's weight; scale = alpha / rank.

    alpha comes from the argument, else a per-module `.alpha` tensor, else the file's adapter
    metadata, else equals the rank (scale 1), which is how the RORem authors trained (alpha = rank).
    """
    groups, metadata = read_lora_file(path)
    with open_lora(path) as f:
        tensors_in_file = len(f.keys())
    if not groups:
        raise LoRAError(f"LoRA file {path} holds no tensors")
    modules = dict(model.named_modules())
    missing = sorted(m for m in groups if m not in modules)
    if missing:
        raise LoRAError(f"LoRA file {path} targets {len(missing)} modules the model lacks, e.g. {missing[:3]}")
    file_alpha = alpha if alpha is not None else _alpha_from_metadata(metadata)
    applied, ranks, scales = 0, set(), set()
    for name, parts in groups.items():
        layer = modules[name]
        down, up = parts["down"].float(), parts["up"].float()
        rank = down.shape[0]
        module_alpha = float(parts["alpha"]) if "alpha" in parts and alpha is None else (file_alpha or rank)
        scale = module_alpha / rank
        delta = (up.flatten(1) @ down.flatten(1)) * scale
        weight = layer.weight
        if delta.numel() != weight.numel():
            raise LoRAError(f"LoRA for {name}: delta {tuple(delta.shape)} does not fit weight {tuple(weight.shape)}")
        weight.add_(delta.reshape(weight.shape).to(weight.dtype))
        applied += len(parts)
        ranks.add(rank)
        scales.add(scale)
    if applied != tensors_in_file:
        raise LoRAError(f"applied {applied} of {tensors_in_file} LoRA tensors from {path}")
    return FusedLoRA(
        file=Path(path).name,
        tensors_in_file=tensors_in_file,
        tensors_applied=applied,
        modules=len(groups),
        rank=max(ranks),
        scale=scales.pop() if len(scales) == 1 else float("nan"),
    )
