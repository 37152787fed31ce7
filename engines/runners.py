"""UNet runners: one call, `runner(sample, timestep, cond) -> noise_pred`.

The sampling loop depends only on this call, so the UNet can be eager PyTorch, torch.compile'd,
an exported ONNX graph run by ONNX Runtime, or a TensorRT plan, without touching the loop.

Exported graphs have a flat signature (names in UNET_INPUTS, output UNET_OUTPUT):
    sample [B, 9, h, w]   timestep [B] float32   encoder_hidden_states [B, 77, D]
    text_embeds [B, P]    time_ids [B, 6]        -> noise_pred [B, 4, h, w]
h and w (latent sides) must be multiples of 4 (image sides multiples of 32): other sizes take
another upsampling path in the SDXL UNet, which the exported graph does not hold.

Exports live in the bundle folder under exports/ and are recorded in the manifest's
provenance["exports"] (see export/manifest.py); `current_export` is the one way serving finds them:
only a recorded, hash-listed file inside the bundle, made from the bundle's UNet weights (an ONNX graph:
with a passed parity check at each bucket side served; a plan: from the bundle's current ONNX export), is
served, and the runners load it from the bytes checked against the manifest's sha256 (`read_checked`).
"""

from __future__ import annotations

import hashlib
import json
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

import torch
from diffusers import UNet2DConditionModel

from engines.bundle import EXPORTS_DIR
from engines.errors import BundleError

if TYPE_CHECKING:
    from engines.bundle import Bundle

UNET_INPUTS = ("sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids")
UNET_OUTPUT = "noise_pred"
LATENT_MULTIPLE = 4
VAE_FACTOR = 8  # image side / latent side
RunnerKind = Literal["torch", "onnx", "tensorrt"]
ExportKind = Literal["onnx", "tensorrt"]
EXPORT_DTYPES = {"float32": torch.float32, "float16": torch.float16}
_SHORT = {"float32": "fp32", "float16": "fp16"}
COMPILED_SHAPES_LIMIT = 64  # torch.compile recompiles per input shape; the warmed set is far smaller
COMPILE_MODE = "max-autotune-no-cudagraphs"  # CUDA graphs are engines.graphs' (whole stages), not inductor's


@dataclass
class UNetConditioning:
    """Everything the SDXL UNet takes besides the sample and timestep, already batched."""

    encoder_hidden_states: torch.Tensor  # [B, 77, D]
    text_embeds: torch.Tensor  # [B, P] pooled prompt embedding
    time_ids: torch.Tensor  # [B, 6] SDXL micro-conditioning


class UNetRunner(Protocol):
    device: torch.device
    dtype: torch.dtype

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, cond: UNetConditioning) -> torch.Tensor: ...


class TorchUNetRunner:
    """Eager or compiled PyTorch; channels_last on CUDA, where it speeds up the convolutions."""

    def __init__(
        self, unet: UNet2DConditionModel, device: torch.device, compile: bool = False, compile_mode: str = COMPILE_MODE
    ):
        self.device = device
        self.dtype = unet.dtype
        self.unet = unet.to(device)
        if device.type == "cuda":
            self.unet = self.unet.to(memory_format=torch.channels_last)
        self.forward = self.unet.forward
        self.compiled = compile
        if compile:
            # one compiled graph per warmed shape (buckets x padded batch sizes, engines.remover.warm_up):
            # past the recompile limit torch would silently fall back to eager
            dynamo_config = torch._dynamo.config
            limit = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
            setattr(dynamo_config, limit, max(getattr(dynamo_config, limit), COMPILED_SHAPES_LIMIT))
            self.forward = torch.compile(self.unet.forward, mode=compile_mode, dynamic=False)

    @torch.inference_mode()
    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, cond: UNetConditioning) -> torch.Tensor:
        return self.forward(
            sample,
            timestep,
            encoder_hidden_states=cond.encoder_hidden_states,
            added_cond_kwargs={"text_embeds": cond.text_embeds, "time_ids": cond.time_ids},
            return_dict=False,
        )[0]


# ----------------------------------------------------------------------------------------------
# Inputs of exported graphs


def check_latent_shape(sample: torch.Tensor) -> None:
    """Refuse what an exported UNet cannot run: not [B, C, h, w], or h / w not multiples of 4."""
    if sample.ndim != 4:
        raise ValueError(f"sample must be [B, C, h, w], got shape {tuple(sample.shape)}")
    h, w = sample.shape[-2:]
    if h % LATENT_MULTIPLE or w % LATENT_MULTIPLE:
        raise ValueError(
            f"latent sides must be multiples of {LATENT_MULTIPLE} (image sides multiples of "
            f"{8 * LATENT_MULTIPLE} px) for an exported UNet, got latent {h}x{w}"
        )


def flat_inputs(
    sample: torch.Tensor, timestep: torch.Tensor | float, cond: UNetConditioning, dtypes: dict[str, torch.dtype]
) -> dict[str, torch.Tensor]:
    """The exported graph's inputs, contiguous, on the sample's device, in the graph's dtypes;
    a scalar timestep is broadcast to [B]."""
    check_latent_shape(sample)
    batch, device = sample.shape[0], sample.device
    t = torch.as_tensor(timestep, device=device).reshape(-1)
    if t.numel() == 1:
        t = t.expand(batch)
    elif t.numel() != batch:
        raise ValueError(f"timestep has {t.numel()} values for a batch of {batch}")
    tensors = {
        "sample": sample,
        "timestep": t,
        "encoder_hidden_states": cond.encoder_hidden_states,
        "text_embeds": cond.text_embeds,
        "time_ids": cond.time_ids,
    }
    for name, tensor in tensors.items():
        if tensor.shape[0] != batch:
            raise ValueError(f"{name} has batch {tensor.shape[0]}, sample has {batch}")
    return {name: tensors[name].to(device=device, dtype=dtypes[name]).contiguous() for name in UNET_INPUTS}


def read_checked(path: Path, sha256: str | None, rebuild: str | None = None) -> bytes:
    """The file's bytes, checked against `sha256` (the bundle manifest's) when given: a runner builds on the bytes
    that were hashed (`Bundle.verify` leaves the exports to their readers), so a changed or truncated file is
    refused, not run, naming `rebuild`, the command that makes it again."""
    data = path.read_bytes()
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise _changed(path, rebuild)
    return data


def _changed(path: Path, rebuild: str | None) -> BundleError:
    fix = f": run `{rebuild}`" if rebuild else ""
    return BundleError(
        f"{path}: sha256 differs from the bundle manifest's (the file changed since it was recorded){fix}"
    )


# ----------------------------------------------------------------------------------------------
# ONNX Runtime

_ORT_TYPES = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16}


def _import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as exc:  # pragma: no cover - the export extra installs it
        raise RuntimeError("the ONNX runner needs onnxruntime: pip install -e '.[export]'") from exc
    return onnxruntime


_ORT_GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


def default_ort_providers(device: torch.device, available: list[str]) -> list[str]:
    """CUDA (then CPU) on a CUDA device, CPU otherwise.

    ONNX Runtime's TensorRT provider is not chosen by default: it builds engines at session start
    and again for every new shape unless given profiles; the TensorRT runner does that properly.
    Pass providers=["TensorrtExecutionProvider", ...] to use it anyway.
    """
    if device.type == "cuda":
        # the CUDA provider itself: with TensorRT's alone, the default list would run on the CPU
        require_ort_gpu_provider(device, [p for p in available if p == "CUDAExecutionProvider"], available)
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def require_ort_gpu_provider(device: torch.device, active: list[str], available: list[str]) -> None:
    """An ONNX session meant for a GPU that would run on the CPU is refused: the CPU-only onnxruntime wheel
    falls back without a word, and an SDXL UNet on CPU cores misses every deadline (and trips hung_after_s)."""
    if device.type == "cuda" and not set(active) & set(_ORT_GPU_PROVIDERS):
        raise RuntimeError(
            f"the ONNX runner was asked for {device}, but ONNX Runtime would run on the CPU (providers here: "
            f"{', '.join(available)}): install onnxruntime-gpu in place of onnxruntime, or serve with "
            "engine.runner: torch"
        )


class OnnxUNetRunner:
    """An exported UNet on ONNX Runtime: CPU here; on CUDA, IOBinding reads and writes torch tensors
    in place (no host round trip). The dtype is the graph's (float32 or float16)."""

    def __init__(
        self,
        onnx_path: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        providers: list | None = None,
        threads: int | None = None,
        sha256: str | None = None,
        data_sha256: str | None = None,
        rebuild: str | None = None,
    ):
        """`rebuild`: the command that exports it again, named when its bytes are not the recorded ones.
        `sha256`: what the graph's bytes must hash to (the bundle manifest's); the session is built from those
        very bytes. `data_sha256`: the same for its external data file (<graph>.data, over ~2 GB of weights),
        which ONNX Runtime reads by name when the session is built: it is hashed just before, so one swapped in
        between that hash and the session's read is the window left. Given `sha256`, a .data file beside the
        graph without `data_sha256` (not recorded with it) is refused. The graph's bytes are held until the
        session is built: with inline weights (under ~2 GB), that much memory more at start."""
        ort = _import_onnxruntime()
        self.path = Path(onnx_path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no ONNX UNet at {self.path} (export one: python -m export onnx --help)")
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.log_severity_level = 3
        # no busy-waiting between runs: torch (VAE, scheduler) needs the same cores right after
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if providers is None:
            providers = default_ort_providers(self.device, ort.get_available_providers())
        if self.device.type == "cuda":
            providers = [
                (p, {"device_id": self.device.index}) if p in ("CUDAExecutionProvider", "TensorrtExecutionProvider") else p
                for p in providers
            ]
        self.rebuild = rebuild
        model = str(self.path) if sha256 is None else self._checked_model(options, sha256, data_sha256)
        self.session = ort.InferenceSession(model, options, providers=providers)
        require_ort_gpu_provider(self.device, self.session.get_providers(), ort.get_available_providers())
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = [o.name for o in self.session.get_outputs()]
        if set(inputs) != set(UNET_INPUTS) or outputs != [UNET_OUTPUT]:
            raise ValueError(
                f"{self.path} is not an exported UNet: inputs {sorted(inputs)}, outputs {outputs}; "
                f"expected inputs {list(UNET_INPUTS)} and output {UNET_OUTPUT!r}"
            )
        unknown = {name: i.type for name, i in inputs.items() if i.type not in _ORT_TYPES}
        if unknown:
            raise ValueError(f"{self.path}: unsupported input types {unknown}")
        self.input_dtypes = {name: _ORT_TYPES[i.type] for name, i in inputs.items()}
        self.dtype = self.input_dtypes["sample"]
        if dtype is not None and dtype != self.dtype:
            raise ValueError(f"{self.path} is a {_dtype_name(self.dtype)} graph, {_dtype_name(dtype)} was requested")
        out_shape = self.session.get_outputs()[0].shape
        self.out_channels = out_shape[1] if isinstance(out_shape[1], int) else 4
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        self.providers = self.session.get_providers()
        self.iobinding = self.device.type == "cuda" and self.providers[0] != "CPUExecutionProvider"

    def _checked_model(self, options, sha256: str, data_sha256: str | None) -> bytes:
        """The graph's bytes checked against `sha256`, its external data file's against `data_sha256`, and
        `options` pointed at the graph's folder for that file (a session built from bytes has no path)."""
        from engines.bundle import sha256_of

        model = read_checked(self.path, sha256, self.rebuild)
        data = self.path.with_name(self.path.name + ".data")
        if data_sha256 is not None and sha256_of(data) != data_sha256:
            raise _changed(data, self.rebuild)
        if data_sha256 is None and data.exists():
            raise BundleError(f"{data}: beside the recorded graph {self.path.name} but not recorded with it")
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(self.path.parent))
        return model

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, cond: UNetConditioning) -> torch.Tensor:
        if self.iobinding:
            return self._run_bound(flat_inputs(sample.to(self.device), timestep, cond, self.input_dtypes))
        feeds = flat_inputs(sample.detach().cpu(), timestep, cond, self.input_dtypes)
        (out,) = self.session.run([UNET_OUTPUT], {name: t.numpy() for name, t in feeds.items()})
        return torch.from_numpy(out).to(self.device, self.dtype)

    def _run_bound(self, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
        import numpy as np

        np_types = {torch.float32: np.float32, torch.float16: np.float16}
        index = self.device.index
        binding = self.session.io_binding()
        for name, tensor in feeds.items():
            binding.bind_input(name, "cuda", index, np_types[tensor.dtype], tuple(tensor.shape), tensor.data_ptr())
        b, _, h, w = feeds["sample"].shape
        out = torch.empty((b, self.out_channels, h, w), dtype=self.dtype, device=self.device)
        binding.bind_output(UNET_OUTPUT, "cuda", index, np_types[self.dtype], tuple(out.shape), out.data_ptr())
        torch.cuda.current_stream(self.device).synchronize()  # torch's writes land before ORT's stream reads
        self.session.run_with_iobinding(binding)  # returns once ORT's stream is done (it synchronizes)
        return out


# ----------------------------------------------------------------------------------------------
# TensorRT


def import_tensorrt():
    """`tensorrt`, or a clear error: it is optional and needs NVIDIA's libraries and a GPU."""
    try:
        import tensorrt
    except ImportError as exc:
        raise RuntimeError(
            "TensorRT is not installed: use NVIDIA's TensorRT container, or `pip install tensorrt` on a "
            "machine with a CUDA GPU (the wheel fetches its libraries from NVIDIA's index)"
        ) from exc
    return tensorrt


def plan_sidecar(plan_path: str | Path) -> Path:
    """The JSON next to a plan with its build record (TensorRT version, GPU, profiles)."""
    plan_path = Path(plan_path)
    return plan_path.with_name(plan_path.name + ".json")


class TensorRTUNetRunner:
    """A TensorRT plan (strongly typed, built by export.tensorrt_build) on the torch CUDA stream.

    One execution context per input shape, all sharing one scratch buffer (they never run at the
    same time: one stream), each with its own preallocated input / output bindings; so a shape
    switch costs nothing and each context can keep a CUDA graph of its own (cuda_graph=True),
    replayed after copying the inputs into the bindings.
    """

    def __init__(
        self,
        plan_path: str | Path,
        device: str | torch.device = "cuda",
        cuda_graph: bool = False,
        sha256: str | None = None,
        rebuild: str | None = None,
        sidecar_sha256: str | None = None,
    ):
        """`sha256`: what the plan's bytes must hash to (the bundle manifest's), checked on the bytes deserialized;
        `sidecar_sha256`: the same for its build record (plan_sidecar), checked on the bytes parsed;
        `rebuild`: the command that builds it again, named when its profiles do not hold the service's shapes."""
        trt = import_tensorrt()
        self.trt = trt
        self.path = Path(plan_path)
        self.rebuild = rebuild or f"python -m export tensorrt --onnx ONNX --plan {self.path} --config SERVE_CONFIG"
        self.device = torch.device(device)
        if self.device.type != "cuda" or not torch.cuda.is_available():
            raise RuntimeError(f"the TensorRT runner needs a CUDA device, got {self.device}")
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        if not self.path.is_file():
            raise FileNotFoundError(f"no TensorRT plan at {self.path} (build one: python -m export tensorrt --help)")
        self.info = self._check_sidecar(sidecar_sha256)
        plan = read_checked(self.path, sha256, self.rebuild)
        self.cuda_graph = cuda_graph
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        with torch.cuda.device(self.device):
            self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise RuntimeError(
                f"TensorRT {trt.__version__} could not load {self.path}: plans only load on the TensorRT version "
                f"and GPU architecture they were built with (build record: {self.info or 'none'})"
            )
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        if set(inputs) != set(UNET_INPUTS) or [n for n in names if n not in inputs] != [UNET_OUTPUT]:
            raise ValueError(f"{self.path} is not an exported UNet plan: tensors {names}")
        self.dtypes = {n: _trt_to_torch(trt, self.engine.get_tensor_dtype(n)) for n in names}
        self.dtype = self.dtypes["sample"]
        self.profiles = [
            {n: tuple(tuple(s) for s in self.engine.get_tensor_profile_shape(n, p)) for n in UNET_INPUTS}
            for p in range(self.engine.num_optimization_profiles)
        ]
        self.scratch = torch.empty(max(1, _device_memory_size(self.engine)), dtype=torch.uint8, device=self.device)
        self._slots: dict[tuple, _Slot] = {}

    def _check_sidecar(self, sha256: str | None) -> dict | None:
        sidecar = plan_sidecar(self.path)
        if sha256 is None and not sidecar.is_file():
            return None
        info = json.loads(read_checked(sidecar, sha256, self.rebuild))
        have_cc = "%d.%d" % torch.cuda.get_device_capability(self.device)
        problems = []
        if info.get("tensorrt_version") and info["tensorrt_version"] != self.trt.__version__:
            problems.append(f"built with TensorRT {info['tensorrt_version']}, this is {self.trt.__version__}")
        if info.get("compute_capability") and info["compute_capability"] != have_cc:
            problems.append(f"built for compute capability {info['compute_capability']}, this GPU is {have_cc}")
        if problems:
            raise RuntimeError(f"{self.path} does not fit here: " + "; ".join(problems) + " (rebuild the plan)")
        return info

    def profile_for(self, shapes: dict[str, tuple[int, ...]]) -> int:
        """Index of the first optimization profile whose [min, max] holds every input shape."""
        for index, profile in enumerate(self.profiles):
            if _holds(profile, shapes):
                return index
        raise ValueError(
            f"no optimization profile of {self.path.name} holds sample {shapes['sample']}; {self._ranges()}"
        )

    def check_holds(self, every_shapes: list[dict[str, tuple[int, ...]]]) -> None:
        """Refuse at start the inputs no profile holds: a plan built for other buckets or smaller batches than the
        Serve config's would fail those requests (profile_for), so the service does not start on it."""
        missing = [shapes["sample"] for shapes in every_shapes if not any(_holds(p, shapes) for p in self.profiles)]
        if missing:
            raise ValueError(
                f"no optimization profile of {self.path.name} holds sample {missing}, which the Serve config's buckets "
                f"and batch sizes need; {self._ranges()}: rebuild the plan for this config: `{self.rebuild}`"
            )

    def _ranges(self) -> str:
        return f"profiles: {[{'sample': (p['sample'][0], p['sample'][2])} for p in self.profiles]}"

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, cond: UNetConditioning) -> torch.Tensor:
        feeds = flat_inputs(sample.to(self.device), timestep, cond, self.dtypes)
        key = tuple(tuple(t.shape) for t in feeds.values())
        slot = self._slots.get(key) or self._make_slot(feeds)
        for name, tensor in feeds.items():
            slot.inputs[name].copy_(tensor)
        stream = torch.cuda.current_stream(self.device)
        if slot.graph is not None:
            slot.graph.replay()
        elif not slot.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT execution failed for shapes {key}")
        return slot.output.clone()  # the binding is overwritten by the next call

    def _make_slot(self, feeds: dict[str, torch.Tensor]) -> "_Slot":
        trt = self.trt
        shapes = {name: tuple(t.shape) for name, t in feeds.items()}
        profile = self.profile_for(shapes)
        stream = torch.cuda.current_stream(self.device)
        context = _context_on(trt, self.engine, self.scratch)
        if not context.set_optimization_profile_async(profile, stream.cuda_stream):
            raise RuntimeError(f"TensorRT could not select optimization profile {profile}")
        inputs = {}
        for name, shape in shapes.items():
            if not context.set_input_shape(name, shape):
                raise ValueError(f"TensorRT refused shape {shape} for {name}")
            inputs[name] = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
            context.set_tensor_address(name, inputs[name].data_ptr())
        output = torch.empty(tuple(context.get_tensor_shape(UNET_OUTPUT)), dtype=self.dtypes[UNET_OUTPUT], device=self.device)
        context.set_tensor_address(UNET_OUTPUT, output.data_ptr())
        slot = _Slot(context, inputs, output, profile)
        if self.cuda_graph:
            for name, tensor in feeds.items():
                inputs[name].copy_(tensor)
            slot.graph = self._capture(context)
        self._slots[tuple(shapes.values())] = slot
        return slot

    def _capture(self, context) -> torch.cuda.CUDAGraph:
        """Run once (TensorRT allocates lazily on a first run), then capture one enqueue."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            if not context.execute_async_v3(side.cuda_stream):
                raise RuntimeError("TensorRT execution failed before CUDA graph capture")
        side.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
            context.execute_async_v3(side.cuda_stream)
        torch.cuda.current_stream(self.device).wait_stream(side)
        return graph


def _holds(profile: dict[str, tuple], shapes: dict[str, tuple[int, ...]]) -> bool:
    """Whether an optimization profile's [min, max] holds every input shape."""
    return all(
        len(shapes[n]) == len(lo) and all(a <= s <= b for a, s, b in zip(lo, shapes[n], hi))
        for n, (lo, _, hi) in profile.items()
    )


@dataclass
class _Slot:
    context: object
    inputs: dict[str, torch.Tensor]
    output: torch.Tensor
    profile: int
    graph: torch.cuda.CUDAGraph | None = None


def _device_memory_size(engine) -> int:
    """Scratch bytes for any profile (TensorRT 10: device_memory_size_v2; older name as a fallback)."""
    size = getattr(engine, "device_memory_size_v2", None)
    return int(size if size is not None else engine.device_memory_size)


def _context_on(trt, engine, scratch: torch.Tensor):
    """An execution context using `scratch` as its activation memory (shared: one stream, never concurrent)."""
    strategy = getattr(trt, "ExecutionContextAllocationStrategy", None)
    if strategy is not None:
        context = engine.create_execution_context(strategy.USER_MANAGED)
    else:
        context = engine.create_execution_context_without_device_memory()
    try:
        context.set_device_memory(scratch.data_ptr(), scratch.numel())
    except TypeError:  # bindings whose setter takes the pointer only
        context.device_memory = scratch.data_ptr()
    return context


def _trt_to_torch(trt, dtype) -> torch.dtype:
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16, trt.int64: torch.int64}
    if dtype not in table:
        raise ValueError(f"unsupported TensorRT tensor type {dtype}")
    return table[dtype]


# ----------------------------------------------------------------------------------------------
# Choosing a runner and its file


def _dtype_name(dtype: torch.dtype | str) -> str:
    return dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")


def export_key(kind: Literal["onnx", "tensorrt"], dtype: torch.dtype | str, compute_capability: str | None = None) -> str:
    """Key of an export record in manifest.provenance["exports"]: "onnx.float32", "tensorrt.float16.sm90"."""
    name = _dtype_name(dtype)
    if name not in EXPORT_DTYPES:
        raise ValueError(f"exports are float32 or float16, not {name}")
    if kind == "onnx":
        return f"onnx.{name}"
    if kind == "tensorrt":
        return f"tensorrt.{name}.sm{_sm(compute_capability)}"
    raise ValueError(f"unknown export kind {kind!r}")


def export_filename(kind: Literal["onnx", "tensorrt"], dtype: torch.dtype | str, compute_capability: str | None = None) -> str:
    """exports/unet.fp32.onnx, exports/unet.fp16.sm90.plan (a plan only runs on the GPU architecture it was built on)."""
    short = _SHORT[_dtype_name(dtype)]
    if kind == "onnx":
        return f"{EXPORTS_DIR}/unet.{short}.onnx"
    return f"{EXPORTS_DIR}/unet.{short}.sm{_sm(compute_capability)}.plan"


def _sm(compute_capability: str | None) -> str:
    if compute_capability is None:
        if not torch.cuda.is_available():
            raise RuntimeError("a TensorRT plan is per GPU architecture: name the compute capability or run on a GPU")
        compute_capability = "%d.%d" % torch.cuda.get_device_capability()
    return compute_capability.replace(".", "")


def default_export_dtype(device: str | torch.device) -> torch.dtype:
    """Exported graphs are float32 for CPU runs and float16 for GPU runs (TensorRT builds fp16 graphs)."""
    return torch.float32 if torch.device(device).type == "cpu" else torch.float16


@dataclass(frozen=True)
class ExportFile:
    """A bundle's export file and the sha256 its manifest lists for it (and for an ONNX graph's external data
    file, <graph>.data, or a plan's build record, plan_sidecar, when the record lists one)."""

    path: Path
    sha256: str
    data_sha256: str | None = None
    sidecar_sha256: str | None = None


def export_command(
    bundle: Bundle,
    command: Literal["onnx", "verify", "tensorrt"],
    dtype: torch.dtype | str,
    buckets: Sequence[int] = (),
) -> str:
    """What to run to (re)make, or for `verify` re-check, the bundle's export of this dtype; with `buckets` (the
    served image sides) the command checks or builds for them, so what it records serves them."""
    args = f"--bundle {shlex.quote(str(bundle.path))} --dtype {_dtype_name(dtype)}"  # pasted as said
    if command == "tensorrt":
        args += " --config SERVE_CONFIG"
    if buckets:
        args += " --buckets " + ",".join(str(side) for side in sorted(set(buckets)))
    return f"python -m export {command} {args}"


class UncheckedExport(BundleError):
    """An ONNX export refused for its parity check alone: `python -m export verify` can make it current without
    changing its bytes, so a plan built from it stays valid."""


def recorded_export(
    bundle: Bundle,
    kind: ExportKind,
    dtype: torch.dtype | str,
    *,
    compute_capability: str | None = None,
    buckets: Sequence[int] = (),
) -> tuple[dict, ExportFile]:
    """The bundle's record of this export and its file, whether current or not; refused when there is none,
    or when the file it names is not one of its files, all of them listed (with sha256) in manifest.files,
    present, plain files inside the bundle folder (naming the command that remakes it for `buckets`)."""
    key = export_key(kind, dtype, compute_capability)
    record = bundle.manifest.provenance.get("exports", {}).get(key)
    fix = f"run `{export_command(bundle, kind, dtype, buckets)}`"
    if not record:
        raise BundleError(f"{bundle.path}: no {key} export recorded in its manifest: {fix}")
    files = record.get("files") if isinstance(record.get("files"), list) else []
    if record.get("path") not in files:
        raise BundleError(
            f"{bundle.path}: the {key} record names {record.get('path')!r}, which is not among its files {files}: {fix}"
        )
    unlisted = [name for name in files if name not in bundle.manifest.files]
    if unlisted:
        raise BundleError(f"{bundle.path}: the {key} record's files {unlisted} are not listed in manifest.files: {fix}")
    try:
        missing = [name for name in files if not bundle.file(name).is_file()]
    except BundleError as exc:
        raise BundleError(f"{bundle.path}: the {key} export: {exc}: {fix}") from exc
    if missing:
        raise BundleError(f"{bundle.path}: the {key} export's files {missing} are missing: {fix}")
    listed, name = {file: bundle.manifest.files[file].sha256 for file in files}, record["path"]
    data, sidecar = name + ".data", plan_sidecar(name).as_posix()
    return record, ExportFile(bundle.file(name), listed[name], listed.get(data), listed.get(sidecar))


def verified_sides(record: dict) -> set[int]:
    """The image sides at which an ONNX export's recorded parity check ran (its report's square latent cases);
    none for a record that lists no cases (an older exporter's)."""
    verified = record.get("verify") if isinstance(record.get("verify"), dict) else {}
    sides = set()
    for case in verified.get("cases") if isinstance(verified.get("cases"), list) else []:
        latent = case.get("latent") if isinstance(case, dict) else None
        if isinstance(latent, list) and len(latent) == 2 and latent[0] == latent[1]:
            sides.add(VAE_FACTOR * latent[0])
    return sides


def current_export(
    bundle: Bundle,
    kind: ExportKind,
    dtype: torch.dtype | str,
    *,
    compute_capability: str | None = None,
    buckets: Sequence[int] = (),
) -> ExportFile:
    """The bundle's export to serve (`recorded_export`), refused when it was made from other UNet weights
    than the bundle's, for an ONNX graph when its record has no passed parity check (exported with
    --no-verify, or by an older exporter that did not check by default) or one that did not run at each of
    `buckets` (the image sides to serve: the graph takes another path at each), or, for a TensorRT plan, when
    built from another ONNX than the bundle's current export. `engine.runner_path` serves a file unchecked."""
    from engines.bundle import UNET_WEIGHTS

    record, export = recorded_export(bundle, kind, dtype, compute_capability=compute_capability, buckets=buckets)
    key = export_key(kind, dtype, compute_capability)
    fix = f"run `{export_command(bundle, kind, dtype, buckets)}`"
    unet_sha = bundle.manifest.files[UNET_WEIGHTS].sha256
    if record.get("unet_sha256") != unet_sha:
        made_from = (record.get("unet_sha256") or "unrecorded")[:12]
        raise BundleError(
            f"{bundle.path}: the {key} export was made from other UNet weights ({made_from}, "
            f"bundle {unet_sha[:12]}): {fix}"
        )
    metadata = record.get("metadata")
    dynamic = metadata.get("dynamic") if isinstance(metadata, dict) else None
    if kind == "onnx" and isinstance(dynamic, dict) and dynamic.get("batch") is None:
        raise BundleError(
            f"{bundle.path}: the {key} export is a static graph (--static: one batch size, one image side), and "
            f"serving runs batches of several sizes: {fix} (without --static)"
        )
    verified = record.get("verify") if isinstance(record.get("verify"), dict) else {}
    reverify = f"run `{export_command(bundle, 'verify', dtype, buckets)}` (records it once it passes), or {fix}"
    if kind == "onnx" and verified.get("passed") is not True:
        why = "was exported without its parity check" if verified.get("skipped") or not verified else "failed its parity check"
        raise UncheckedExport(f"{bundle.path}: the {key} export {why} against the bundle's UNet: {reverify}")
    checked = verified_sides(record)
    if kind == "onnx" and set(buckets) - checked:
        ran = f"ran at {sorted(checked)} px only" if checked else "does not say at which sizes it ran (an older record)"
        raise UncheckedExport(
            f"{bundle.path}: the {key} export's parity check {ran}, not at the served bucket sides "
            f"{sorted(set(buckets) - checked)}: {reverify}"
        )
    if kind == "tensorrt":
        try:
            onnx = current_export(bundle, "onnx", dtype, buckets=buckets)
        except UncheckedExport as exc:
            raise BundleError(f"{exc}; once verified, the {key} plan built from it serves as it is (exported again, "
                              f"build the plan again: {fix})") from exc  # fmt: skip
        except BundleError as exc:
            raise BundleError(f"{exc}; then build the {key} plan again: {fix}") from exc
        built_from = record.get("plan", {}).get("onnx_sha256")
        if built_from != onnx.sha256:
            raise BundleError(
                f"{bundle.path}: the {key} plan was built from another ONNX ({(built_from or 'unrecorded')[:12]}) than "
                f"the current {export_key('onnx', dtype)} export ({onnx.sha256[:12]}): {fix}"
            )
    return export


def make_unet_runner(
    kind: RunnerKind,
    *,
    unet: UNet2DConditionModel | None = None,
    path: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    compile: bool = False,
    cuda_graph: bool = False,
    providers: list | None = None,
    sha256: str | None = None,
    data_sha256: str | None = None,
    rebuild: str | None = None,
    sidecar_sha256: str | None = None,
) -> UNetRunner:
    """torch: `unet` (already in its dtype); onnx / tensorrt: the exported file at `path`, loaded from bytes
    checked against `sha256` when given (an ONNX graph's external data file against `data_sha256`: see
    OnnxUNetRunner; a plan's build record against `sidecar_sha256`), `rebuild` named when those bytes differ or,
    for a plan, when its profiles do not fit the service."""
    device = torch.device(device)
    if kind == "torch":
        if unet is None:
            raise ValueError("the torch runner needs the UNet module")
        return TorchUNetRunner(unet if dtype is None else unet.to(dtype), device, compile=compile)
    if compile:
        raise ValueError("compile applies to the torch runner only")
    if path is None:
        raise ValueError(f"the {kind} runner needs the exported file's path")
    if kind == "onnx":
        return OnnxUNetRunner(
            path, device, dtype=dtype, providers=providers, sha256=sha256, data_sha256=data_sha256, rebuild=rebuild
        )
    if kind == "tensorrt":
        runner = TensorRTUNetRunner(
            path, device, cuda_graph=cuda_graph, sha256=sha256, rebuild=rebuild, sidecar_sha256=sidecar_sha256
        )
        if dtype is not None and dtype != runner.dtype:
            raise ValueError(f"{path} is a {_dtype_name(runner.dtype)} plan, {_dtype_name(dtype)} was requested")
        return runner
    raise ValueError(f"unknown runner {kind!r}: torch, onnx or tensorrt")
