"""The UNet (LCM LoRA already fused in the bundle) to ONNX, with a flat signature.

Inputs (engines.runners.UNET_INPUTS) and output:
    sample [B, 9, h, w]  timestep [B] float32  encoder_hidden_states [B, 77, D]  text_embeds [B, P]
    time_ids [B, 6]  ->  noise_pred [B, 4, h, w]
timestep is a [B] float32 vector (not a scalar): one graph serves any batch, and float32 keeps
999 exact in an fp16 graph. The other inputs are in the graph's dtype (float32 or float16; TensorRT
11 builds strongly typed networks, so the precision lives in the ONNX).

Dynamic dims: batch in [1, max_batch], latent h and w = 4 * k with k in [2, max_latent / 4]
(torch.export proves the graph for these; other latent sides take another upsampling path in the
UNet). ONNX itself cannot hold a "multiple of 4" constraint: the runners check it before running.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import UNet2DConditionModel

from engines.bundle import UNET_WEIGHTS, Bundle
from engines.runners import EXPORT_DTYPES, LATENT_MULTIPLE, UNET_INPUTS, UNET_OUTPUT
from export.progress import QUIET, Progress
from export.staging import staging_folder

# torchlib implements opset 18 natively (no version conversion). At 20, GELU becomes the opset-20
# `Gelu` op; at 18 it is Erf arithmetic, which every TensorRT 10/11 parser reads (and fuses).
DEFAULT_OPSET = 18
OPSETS = range(18, 24)  # below 18 torch converts versions, which may keep 18 unsaid; 23 is its exporter's latest
MAX_BATCH = 32  # torch.export proves batch <= 63 for this UNet; 32 covers Serve's max_batch_size defaults
BATCH_LIMIT = 63
MAX_LATENT = 256  # latent side 256 = 2048 px images
EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf's limit is 2 GiB for the whole file: go external well before
METADATA_PREFIX = "rorem."
EXAMPLE_SHAPE = (2, 64, 64)  # (batch, latent h, latent w) the export traces with: a --static graph's only shape


class FlatUNet(torch.nn.Module):
    """SDXL UNet with positional tensor inputs and one tensor output, as the exported graph has them."""

    def __init__(self, unet: UNet2DConditionModel):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids):
        # diffusers concatenates text_embeds with the float32 time-id embedding, which torch
        # type-promotes to float32; the ONNX exporter drops that promotion (an fp16 graph then has
        # a Concat of float16 and float32, which ONNX Runtime refuses). Upcasting here is exact and
        # is what torch does anyway.
        return self.unet(
            sample,
            timestep,
            encoder_hidden_states=encoder_hidden_states,
            added_cond_kwargs={"text_embeds": text_embeds.float(), "time_ids": time_ids},
            return_dict=False,
        )[0]


def unet_input_dims(config) -> dict[str, int]:
    """Channel / embedding sizes of the UNet's inputs, from its diffusers config."""
    return {
        "in_channels": config["in_channels"],
        "out_channels": config["out_channels"],
        "embed_dim": config["cross_attention_dim"],
        "pooled_dim": config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"],
    }


def example_inputs(
    config,
    batch: int,
    latent_h: int,
    latent_w: int,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    sequence_length: int = 77,
) -> tuple[torch.Tensor, ...]:
    """Seeded inputs in the flat order, at the scales serving feeds (noise, a 0/1 mask, latents,
    prompt-embedding-like values, time ids of the image size), distinct timesteps per sample."""
    dims = unet_input_dims(config)
    g = torch.Generator("cpu").manual_seed(seed)
    latents = torch.randn(batch, 4, latent_h, latent_w, generator=g)
    mask = (torch.rand(batch, 1, latent_h, latent_w, generator=g) > 0.5).float()
    masked = torch.randn(batch, dims["in_channels"] - 5, latent_h, latent_w, generator=g)
    sample = torch.cat([latents, mask, masked], dim=1)
    timestep = torch.tensor([999.0, 759.0, 499.0, 259.0] * (batch // 4 + 1))[:batch]
    states = torch.randn(batch, sequence_length, dims["embed_dim"], generator=g)
    pooled = torch.randn(batch, dims["pooled_dim"], generator=g)
    side_h, side_w = 8 * latent_h, 8 * latent_w
    time_ids = torch.tensor([[side_h, side_w, 0, 0, side_h, side_w]], dtype=torch.float32).expand(batch, -1)
    cast = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(sample), timestep.to(device), cast(states), cast(pooled), cast(time_ids.contiguous())


def dynamic_shapes(max_batch: int = MAX_BATCH, max_latent: int = MAX_LATENT) -> dict[str, dict]:
    from torch.export import Dim

    if max_latent % LATENT_MULTIPLE:
        raise ValueError(f"max_latent must be a multiple of {LATENT_MULTIPLE}")
    batch = Dim("batch", min=1, max=max_batch)
    h = Dim("latent_h_div4", min=2, max=max_latent // LATENT_MULTIPLE)
    w = Dim("latent_w_div4", min=2, max=max_latent // LATENT_MULTIPLE)
    return {
        "sample": {0: batch, 2: LATENT_MULTIPLE * h, 3: LATENT_MULTIPLE * w},
        "timestep": {0: batch},
        "encoder_hidden_states": {0: batch},
        "text_embeds": {0: batch},
        "time_ids": {0: batch},
    }


def export_unet_onnx(
    bundle_or_unet: Bundle | UNet2DConditionModel,
    out_path: str | Path,
    *,
    dtype: Literal["float32", "float16"] = "float32",
    opset: int = DEFAULT_OPSET,
    dynamic: bool = True,
    max_batch: int = MAX_BATCH,
    max_latent: int = MAX_LATENT,
    exporter: Literal["dynamo", "torchscript", "auto"] = "auto",
    sequence_length: int | None = None,
    progress: Progress = QUIET,
) -> Path:
    """Export to `out_path` (plus `out_path`.data when over ~2 GB); returns the path.

    The export metadata (dtype, opset, input shapes, versions, source weights' sha256) is stored
    in the ONNX metadata_props; read it back with `read_onnx_metadata`. exporter "auto" uses the
    dynamo exporter and falls back to the TorchScript one (dynamic_axes, no multiple-of-4 proof)
    if it fails, saying so.
    """
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"dtype must be float32 or float16, not {dtype}")
    out_path = Path(out_path)
    source: dict[str, Any] = {}
    if isinstance(bundle_or_unet, Bundle):
        bundle = bundle_or_unet
        with progress.stage(f"load UNet of bundle {bundle.manifest.name}"):
            unet = bundle.load_unet()
        source = {"bundle": bundle.manifest.name, "unet_sha256": bundle.manifest.files[UNET_WEIGHTS].sha256}
        sequence_length = sequence_length or bundle.manifest.architecture.prompt.sequence_length
    else:
        unet = bundle_or_unet
    sequence_length = sequence_length or 77
    torch_dtype = EXPORT_DTYPES[dtype]
    device = next(unet.parameters()).device
    if unet.dtype != torch_dtype:
        unet = unet.to(torch_dtype)  # in place: a module passed in is cast
    model = FlatUNet(unet.eval()).eval()
    args = example_inputs(unet.config, *EXAMPLE_SHAPE, torch_dtype, device, sequence_length=sequence_length)
    shapes = dynamic_shapes(max_batch, max_latent) if dynamic else None
    parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    external = parameter_bytes > EXTERNAL_DATA_BYTES

    with staging_folder(out_path.parent, prefix=".onnx-") as staging:
        staged = staging / out_path.name
        used = exporter
        if exporter in ("dynamo", "auto"):
            try:
                _export_dynamo(model, args, shapes, opset, staged, external, progress)
                used = "dynamo"
            except Exception as exc:
                if exporter == "dynamo":
                    raise
                progress.say(f"dynamo exporter failed ({type(exc).__name__}: {str(exc)[:300]}); "
                             "falling back to the TorchScript exporter")
                used = "torchscript"
        if used == "torchscript":
            _export_torchscript(model, args, dynamic, opset, staged, external, progress)
        metadata = {
            "format": "rorem-unet-flat-v1",
            "dtype": dtype,
            "opset": opset,
            "exporter": used,
            "inputs": _graph_io(staged),
            "dynamic": {
                "batch": [1, max_batch] if dynamic else None,
                "latent_side": [2 * LATENT_MULTIPLE, max_latent] if dynamic else None,
                "latent_multiple": LATENT_MULTIPLE,
            },
            "external_data": (out_path.name + ".data") if external else None,
            "parameters": sum(p.numel() for p in model.parameters()),
            "torch": torch.__version__,
            "diffusers": _version("diffusers"),
            "onnx": _version("onnx"),
            "onnxscript": _version("onnxscript"),
            "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **source,
        }
        _write_metadata(staged, metadata)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        for produced in sorted(onnx_files(staged)):  # the graph and its .data keep their relative names
            produced.replace(out_path.parent / produced.name)
        if not external and (out_path.parent / (out_path.name + ".data")).exists():
            (out_path.parent / (out_path.name + ".data")).unlink()  # a stale one from an earlier export
    return out_path


def _export_dynamo(model, args, shapes, opset, path: Path, external: bool, progress: Progress) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*axis name.*will not be used.*")
        with progress.stage("torch.export + ONNX translation (dynamo exporter)") as stage:
            program = torch.onnx.export(
                model,
                args,
                input_names=list(UNET_INPUTS),
                output_names=[UNET_OUTPUT],
                dynamic_shapes=shapes,
                opset_version=opset,
                dynamo=True,
                optimize=False,
                verbose=False,
            )
            stage.note = f"{_count_nodes(program.model.graph)} nodes"
        with progress.stage("graph cleanup (onnxscript optimizer: constant folding, dead code, CSE)") as stage:
            program.optimize()
            stage.note = f"{_count_nodes(program.model.graph)} nodes"
        with progress.stage(f"save {path.name}{' + external data' if external else ''}"):
            program.save(str(path), external_data=external)


def _export_torchscript(model, args, dynamic: bool, opset, path: Path, external: bool, progress: Progress) -> None:
    import onnx

    axes = None
    if dynamic:
        axes = {"sample": {0: "batch", 2: "latent_h", 3: "latent_w"}, UNET_OUTPUT: {0: "batch", 2: "latent_h", 3: "latent_w"}}
        axes.update({name: {0: "batch"} for name in UNET_INPUTS[1:]})
    with progress.stage("ONNX export (TorchScript exporter)"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, args, str(path), input_names=list(UNET_INPUTS), output_names=[UNET_OUTPUT],
            dynamic_axes=axes, opset_version=min(opset, 18), dynamo=False, do_constant_folding=True,
        )  # fmt: skip
    if external:
        proto = onnx.load(str(path))
        onnx.save(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=path.name + ".data")


def _count_nodes(graph) -> int:
    return sum(1 for _ in graph.all_nodes()) if hasattr(graph, "all_nodes") else len(graph)


def _graph_io(path: Path) -> dict[str, dict]:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    names = {1: "float32", 10: "float16", 16: "bfloat16", 7: "int64"}

    def describe(value):
        tensor = value.type.tensor_type
        dims = [d.dim_param or d.dim_value for d in tensor.shape.dim]
        return {"dtype": names.get(tensor.elem_type, str(tensor.elem_type)), "shape": dims}

    io = {v.name: describe(v) for v in proto.graph.input}
    io.update({v.name: describe(v) for v in proto.graph.output})
    return io


def _write_metadata(path: Path, metadata: dict[str, Any]) -> None:
    """metadata_props are strings: one key per field, JSON-encoded values."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    kept = [p for p in proto.metadata_props if not p.key.startswith(METADATA_PREFIX)]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    for key, value in metadata.items():
        proto.metadata_props.add(key=METADATA_PREFIX + key, value=json.dumps(value))
    onnx.save(proto, str(path))  # external tensors stay where they are (not loaded, not rewritten)


def read_graph(path: str | Path):
    """The ONNX model at `path` without its external weights; a file that is not one is a ValueError naming it
    (protobuf's DecodeError names neither)."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        return onnx.load(str(path), load_external_data=False)
    except DecodeError as exc:
        raise ValueError(f"{path} is not an ONNX model ({exc})") from None


def read_unet_graph(path: str | Path):
    """`read_graph`, refused (a ValueError naming it) unless it takes the inputs of an exported UNet (UNET_INPUTS):
    an empty file parses as an empty model, and any other graph stopped in a bare KeyError or StopIteration."""
    proto = read_graph(path)
    inputs = [i.name for i in proto.graph.input]
    if not set(UNET_INPUTS) <= set(inputs):
        raise ValueError(f"{path} is not an exported UNet: inputs {inputs}, expected {list(UNET_INPUTS)}")
    return proto


def read_onnx_metadata(path: str | Path) -> dict[str, Any]:
    """The export metadata written by export_unet_onnx (without loading the weights)."""
    proto = read_graph(path)
    return {
        p.key.removeprefix(METADATA_PREFIX): json.loads(p.value)
        for p in proto.metadata_props
        if p.key.startswith(METADATA_PREFIX)
    }


def onnx_files(path: str | Path) -> list[Path]:
    """The graph file and, when present, its external data file."""
    path = Path(path)
    data = path.with_name(path.name + ".data")
    return [path, data] if data.is_file() else [path]


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None
