"""python -m export {onnx,verify,tensorrt,all,bench}: export the bundle's UNet, record it in the bundle.

    python -m export onnx --tiny --dtype float32                  # ~/.cache/rorem/tiny-0/exports/unet.fp32.onnx
    python -m export onnx --bundle PATH --dtype float16 --config serve/configs/local.yaml   # + its buckets checked
    python -m export verify --bundle PATH --dtype float32         # ONNX Runtime (CPU) vs torch, at the sides
                                                                   # its record lists + --buckets
    python -m export tensorrt --bundle PATH --config serve/configs/local.yaml   # from the fp16 ONNX; GPU + tensorrt
    python -m export all --config serve/configs/local.yaml       # the bundle Serve would load: fp32 ONNX
                                                                   # + verify; fp16 ONNX + plan on a GPU
    python -m export bench --tiny --runners torch,onnx --side 512  # one removal per runner, ms per stage (each
                                                                   # runner's export made first: export all --tiny)
Every ONNX export is checked against the torch UNet on ONNX Runtime before it replaces the bundle's
current one (--no-verify records it unchecked, and serving refuses it); with a Serve config or
--buckets the check includes one image at each bucket side, and serving refuses a graph not checked at
each bucket it runs.
The bundle is --bundle PATH, or --tiny (generated in --cache-dir, as Serve does), or the one the
Serve config names (--config). Files go to <bundle>/exports/ and are recorded in its manifest.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import sys
import typing
from pathlib import Path

from engines.stopping import stopping_on_sigterm
from export.progress import Progress


def _bundle_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--bundle", help="project bundle folder")
    group.add_argument("--tiny", action="store_true", help="the tiny bundle (generated in --cache-dir if missing)")
    parser.add_argument("--cache-dir", default="~/.cache/rorem", help="where --tiny lives (Serve's bundle.cache_dir)")
    parser.add_argument("--seed", type=int, default=0, help="tiny bundle seed")
    parser.add_argument(
        "--config", help="Serve config YAML: its bundle (without --bundle/--tiny), buckets and batch sizes"
    )
    parser.add_argument("--app", default=None, help="the application of --config to read (default: its first)")
    parser.add_argument("--quiet", action="store_true", help="no progress output")


def _int_in(low: int, high: int):
    """An argparse type: an integer from low to high."""

    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            number = None
        if number is None or not low <= number <= high:
            raise argparse.ArgumentTypeError(f"{value!r}: an integer from {low} to {high}")
        return number

    return parse


def _sides(value: str) -> list[int]:
    """--buckets: image sides in pixels, by the rule of the Serve config's buckets (serve.config.Buckets)."""
    from pydantic import TypeAdapter, ValidationError

    from serve.config import Buckets

    try:
        sides = [int(side) for side in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: image sides in pixels, comma-separated, e.g. 512,1024") from None
    try:
        return TypeAdapter(Buckets).validate_python(sides)
    except ValidationError as exc:
        reason = exc.errors()[0]["msg"].removeprefix("Value error, ")
        raise argparse.ArgumentTypeError(f"{value!r}: {reason}") from None


def _side(value: str) -> int:
    """--side: one image side, by the same rule as --buckets."""
    if "," in value:
        raise argparse.ArgumentTypeError(f"{value!r}: one image side in pixels, e.g. 512")
    return _sides(value)[0]


def _cases(value: str) -> tuple[tuple[int, int, int], ...]:
    """--cases: BATCHxLATENT_HxLATENT_W, comma-separated; latent sides the runners take (ONNX Runtime's own error
    for a 30 was a Resize shape mismatch)."""
    from engines.runners import LATENT_MULTIPLE, VAE_FACTOR

    try:
        cases = tuple(tuple(int(v) for v in case.split("x")) for case in value.split(","))
    except ValueError:
        cases = ()
    if not cases or any(len(case) != 3 or min(case) < 1 for case in cases):
        raise argparse.ArgumentTypeError(f"{value!r}: BATCHxLATENT_HxLATENT_W, comma-separated, e.g. 1x32x32,3x64x64")
    if any(side % LATENT_MULTIPLE for case in cases for side in case[1:]):
        raise argparse.ArgumentTypeError(
            f"{value!r}: latent sides must be multiples of {LATENT_MULTIPLE} (image sides multiples of "
            f"{LATENT_MULTIPLE * VAE_FACTOR})"
        )
    return cases


def _runners(value: str) -> list[str]:
    """--runners: checked before the first runner's minutes, not after."""
    from engines.runners import RunnerKind

    known = typing.get_args(RunnerKind)
    kinds = [kind.strip() for kind in value.split(",")]
    if any(kind not in known for kind in kinds):
        raise argparse.ArgumentTypeError(f"{value!r}: comma-separated, of {', '.join(known)}")
    return kinds


def _dtype_arg(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument("--dtype", choices=["float32", "float16"], default=default)


def build_parser() -> argparse.ArgumentParser:
    from export.onnx_export import BATCH_LIMIT, DEFAULT_OPSET, MAX_BATCH, OPSETS

    parser = argparse.ArgumentParser(prog="python -m export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    onnx = sub.add_parser("onnx", help="export the UNet to ONNX")
    _bundle_args(onnx)
    _dtype_arg(onnx, "float32")
    onnx.add_argument("--out", help="output .onnx (default <bundle>/exports/unet.fp32.onnx / unet.fp16.onnx)")
    onnx.add_argument("--opset", type=_int_in(OPSETS[0], OPSETS[-1]), default=DEFAULT_OPSET, help="default %(default)s")
    onnx.add_argument("--static", action="store_true", help="fixed shapes (batch 2, latent 64x64)")
    onnx.add_argument(
        "--max-batch", type=_int_in(1, BATCH_LIMIT), default=MAX_BATCH, help="the graph's largest batch (%(default)s)"
    )
    onnx.add_argument("--exporter", choices=["auto", "dynamo", "torchscript"], default="auto")
    onnx.add_argument(
        "--verify", action=argparse.BooleanOptionalAction, default=True,
        help="the ONNX Runtime parity check before the export replaces the current one (--no-verify: recorded "
        "unchecked, which serving refuses until `python -m export verify` passes)",
    )  # fmt: skip
    onnx.add_argument(
        "--buckets", type=_sides, help="image sides also checked, e.g. 512,1024 (default: the Serve config's)"
    )

    verify = sub.add_parser("verify", help="ONNX Runtime vs torch on the same inputs")
    _bundle_args(verify)
    _dtype_arg(verify, "float32")
    verify.add_argument("--onnx", help="another .onnx to check, not recorded (default: the bundle's export of --dtype)")
    verify.add_argument(
        "--cases", type=_cases,
        help="BATCHxLATENT_HxLATENT_W, comma-separated (default 1x32x32,3x64x64 and 1 image at each "
        "side of --buckets or the Serve config's buckets and at each side the bundle's record was checked at, so "
        "a record never loses a side; cases that leave one of those out are checked, not recorded)",
    )  # fmt: skip
    verify.add_argument(
        "--buckets", type=_sides,
        help="image sides, e.g. 512,1024, checked besides those the record lists (default: the Serve config's)",
    )
    verify.add_argument("--max-abs", type=float, default=None, help="tolerance override")
    verify.add_argument("--mean-abs", type=float, default=None, help="tolerance override")

    trt = sub.add_parser("tensorrt", help="build a TensorRT plan from the fp16 ONNX (needs a GPU)")
    _bundle_args(trt)
    _dtype_arg(trt, "float16")
    trt.add_argument("--onnx", help="the .onnx (default: the bundle's current export of --dtype)")
    _trt_args(trt)

    everything = sub.add_parser("all", help="onnx + verify for float32; with TensorRT and a GPU also float16 + plan")
    _bundle_args(everything)
    everything.add_argument("--skip-tensorrt", action="store_true")
    _trt_args(everything)
    bench = sub.add_parser(
        "bench",
        help="one removal with each runner (torch, onnx, tensorrt): median ms per stage, and each runner's largest "
        "output difference from the first runner's (vs_<runner>_max_diff, in 0-255 levels of any pixel channel)",
    )
    _bundle_args(bench)
    bench.add_argument(
        "--runners", type=_runners, default="torch,onnx", help="comma-separated: torch, onnx, tensorrt"
    )
    bench.add_argument("--side", type=_side, default=512, help="the photo's side in pixels, one bucket (default 512)")
    bench.add_argument("--batch", type=_int_in(1, BATCH_LIMIT), default=1, help="removals per engine call (default 1)")
    bench.add_argument("--runs", type=_int_in(1, 1000), default=5, help="timed runs after a warm-up (default 5)")
    bench.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    return parser


def _trt_args(parser: argparse.ArgumentParser) -> None:
    from export.onnx_export import BATCH_LIMIT

    parser.add_argument("--buckets", type=_sides, help="image sides, e.g. 512,1024 (default: the Serve config's)")
    parser.add_argument(
        "--max-batch-size", type=_int_in(1, BATCH_LIMIT),
        help="every bucket's (default: the Serve config's, batching.per_bucket included)",
    )
    parser.add_argument("--spanning", action="store_true", help="one profile over all buckets instead of one each")
    parser.add_argument("--plan", help="output plan (default <bundle>/exports/unet.fp16.smXY.plan)")
    parser.add_argument("--timing-cache", help="default <bundle>/exports/timing.smXY.cache")
    parser.add_argument("--workspace-gb", type=float, default=None)
    parser.add_argument("--opt-level", type=int, default=3, help="builder optimization level 0-5")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)  # "torchvision is not installed"
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    progress = Progress(enabled=not args.quiet)
    with stopping_on_sigterm() as caught:
        try:
            return _run_command(args, progress)
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the staging folder is gone, the manifest as it was
            caught.stopping = True
            by = "" if caught.signal is None else " by SIGTERM"
            print(
                f"python -m export {args.command}: interrupted{by}; the bundle records what was done before it (an"
                " export cut short is not recorded: the previous one is kept)",
                file=sys.stderr,
            )
            return 130 if caught.signal is None else 128 + caught.signal


def _run_command(args: argparse.Namespace, progress: Progress) -> int:
    try:
        commands = {"onnx": _cmd_onnx, "verify": _cmd_verify, "tensorrt": _cmd_tensorrt, "all": _cmd_all, "bench": _cmd_bench}
        return commands[args.command](args, progress)
    except (RuntimeError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # a full disk, a read-only mount, a folder where a file was named
        print(f"error: {_os_error(exc)}", file=sys.stderr)
        return 1
    except Exception as exc:  # ONNX Runtime's errors (InvalidArgument, Fail, ...) subclass Exception only
        if not type(exc).__module__.startswith("onnxruntime"):
            raise
        print(f"error: ONNX Runtime: {exc}", file=sys.stderr)
        return 1


_OS_ERROR_ADVICE = {
    errno.ENOSPC: "free space there, or write the export elsewhere (a copy of the bundle, --out / --plan)",
    errno.EDQUOT: "free space within the quota, or write the export elsewhere (a copy of the bundle, --out / --plan)",
    errno.EROFS: "a read-only mount: run the command where the bundle is writable, or on a writable copy of it",
    errno.EACCES: "not writable by this user: run as the bundle's owner, or on a copy of the bundle",
    errno.EPERM: "not writable by this user: run as the bundle's owner, or on a copy of the bundle",
}


def _os_error(exc: OSError) -> str:
    """An OSError as one line naming the file, with what to do where that is known."""
    where = f": {exc.filename}" if exc.filename else ""
    advice = _OS_ERROR_ADVICE.get(exc.errno)
    return f"{exc.strerror or exc}{where}" + (f" ({advice})" if advice else "")


def _open_bundle(args, progress: Progress):
    from engines.bundle import Bundle

    if args.bundle:
        bundle = Bundle.load(Path(args.bundle).expanduser())
    elif args.tiny or not args.config:
        from engines.sources import open_bundle

        with progress.stage(f"tiny bundle (seed {args.seed}) in {args.cache_dir}"):
            bundle = open_bundle(path=None, authors=None, cache_dir=args.cache_dir, tiny_seed=args.seed)
    else:
        from export.tensorrt_build import load_serve_settings

        with progress.stage(f"bundle named by {args.config}"):
            bundle = load_serve_settings(args.config, args.app).bundle.open()
        # serving leaves the weights to their readers; an export is hashed where a command reads it
        with progress.stage("checking the bundle's own files' sha256"):
            bundle.verify()
    progress.say(f"bundle {bundle.manifest.name} at {bundle.path}")
    return bundle


def _check_onnx_files(bundle, dtype: str, buckets: list[int]) -> None:
    """The files of the bundle's ONNX export of `dtype`, hashed before a command reads them by path (the parity
    check, TensorRT's parser) and records what it read: the bundle's own verify leaves the exports out."""
    from engines.bundle import BundleError
    from engines.runners import export_command, recorded_export

    record, _ = recorded_export(bundle, "onnx", dtype, buckets=buckets)
    try:
        bundle.check_files(record["files"])
    except BundleError as exc:
        raise BundleError(f"{exc}: run `{export_command(bundle, 'onnx', dtype, buckets)}`") from None


def _cmd_onnx(args, progress: Progress) -> int:
    from export.manifest import export_and_record_onnx

    bundle = _open_bundle(args, progress)
    path, record = export_and_record_onnx(
        bundle,
        args.dtype,
        out_path=Path(args.out) if args.out else None,
        verify=args.verify,
        buckets=_serve_buckets(args),
        progress=progress,
        opset=args.opset,
        dynamic=not args.static,
        max_batch=args.max_batch,
        exporter=args.exporter,
    )
    _summary(progress, path, record)
    return 0


def _cmd_verify(args, progress: Progress) -> int:
    """Checks the bundle's export of --dtype (or --onnx) against its UNet; the bundle's own export is
    recorded as current (made from the UNet it was checked against, whatever weights it was exported from)
    only when it passes at the default tolerances, so a stale export that fails, or passes only a loosened
    check, stays refused by serving. The record's report lists the sizes checked: serving refuses the graph
    for a bucket side not among them, so the check runs at each side the record it replaces lists as well as
    the served ones, and a record never loses one."""
    from export.manifest import export_lock

    bundle = _open_bundle(args, progress)
    with export_lock(bundle.path, args.dtype, required=False):  # not while an export replaces the record
        return _verify_locked(args, bundle.path, progress)


def _verify_locked(args, bundle_path: Path, progress: Progress) -> int:
    from engines.bundle import UNET_WEIGHTS, Bundle, BundleError, sha256_of
    from engines.runners import export_key, recorded_export
    from export.manifest import record_export, sides_to_check
    from export.onnx_export import onnx_files
    from export.verify import cases_for_graph, verify_onnx

    bundle, served = Bundle.load(bundle_path, verify=False), _serve_buckets(args)  # the record as it is now
    if args.onnx:
        record, path = None, Path(args.onnx)
    else:
        record, export = recorded_export(bundle, "onnx", args.dtype, buckets=served)
        path = export.path
        _check_onnx_files(bundle, args.dtype, served)
    required = cases_for_graph(path, served if record is None else sides_to_check(bundle, args.dtype, served))
    cases = args.cases or required
    report = verify_onnx(
        path, bundle.load_unet(), cases=cases, max_abs=args.max_abs, mean_abs=args.mean_abs, progress=progress,
        sequence_length=bundle.manifest.architecture.prompt.sequence_length,
    )  # fmt: skip
    loosened = args.max_abs is not None or args.mean_abs is not None
    narrowed = not set(required) <= set(cases)  # --cases that leave out a shape served or recorded as checked
    checked_against = bundle.manifest.files[UNET_WEIGHTS].sha256  # what bundle.load_unet hashed
    if record is not None and report["passed"] and not loosened and not narrowed:
        if _record_covers(bundle, record, path, report, checked_against):
            listed = bundle.manifest.files
            changed = [name for name in record["files"] if sha256_of(bundle.file(name)) != listed[name].sha256]
            if changed:
                raise BundleError(f"{bundle.path}: {', '.join(changed)} changed while it was checked; check it again")
            progress.say(f"{record['path']}: its record already says so (not rewritten)")
        else:
            key, recorded = export_key("onnx", args.dtype), {**record, "verify": report}
            hashed = {name: entry.sha256 for name, entry in bundle.manifest.files.items()}  # as _check_onnx_files found
            try:
                record_export(bundle, key, onnx_files(path), recorded, made_from=checked_against, checked=hashed)
            except OSError as exc:
                print(f"passed; not recorded (bundle not writable: {_os_error(exc)})", file=sys.stderr)
            else:
                progress.say(f"recorded {record['path']} as matching the bundle's UNet")
    elif record is not None:
        why = "failed" if not report["passed"] else "tolerances overridden" if loosened else "--cases leave out buckets"
        progress.say(f"not recorded: {why}")
    _summary(progress, path, {"verify": report})
    if not report["passed"]:  # said with --quiet too: the exit code alone did not say what failed
        worst = f"max_abs {report.get('max_abs'):.3g}, mean_abs {report.get('mean_abs'):.3g}"
        print(f"{path}: failed its parity check ({worst}; tolerance {report.get('tolerance')})", file=sys.stderr)
    return 0 if report["passed"] else 1


def _record_covers(bundle, record: dict, path: Path, report: dict, checked_against: str) -> bool:
    """Whether the bundle's record of the graph at `path` already says what a passed `report` would write: passed,
    against the UNet `checked_against`, at each side checked, for the same files. Then `verify` does not rewrite
    the manifest, so it passes on a read-only bundle (serving's mount)."""
    from engines.runners import verified_sides
    from export.onnx_export import onnx_files

    files = [file.resolve().relative_to(bundle.path.resolve()).as_posix() for file in onnx_files(path)]
    return (
        isinstance(record.get("verify"), dict) and record["verify"].get("passed") is True
        and record.get("unet_sha256") == checked_against
        and verified_sides({"verify": report}) <= verified_sides(record)
        and record.get("files") == files
    )  # fmt: skip


def _cmd_tensorrt(args, progress: Progress) -> int:
    buckets = list(_plan_shape(args))
    bundle = _open_bundle(args, progress) if (args.bundle or args.tiny or args.config) else None
    if args.onnx:
        onnx_path = Path(args.onnx)
    elif bundle is not None:
        from engines.bundle import BundleError
        from engines.runners import current_export

        try:
            onnx_path = current_export(bundle, "onnx", args.dtype, buckets=buckets).path
            _check_onnx_files(bundle, args.dtype, buckets)
        except BundleError as exc:  # its advice (export an ONNX first) does not help alone on a machine without one
            unavailable = _tensorrt_unavailable()
            if unavailable:
                raise BundleError(f"{exc}; and the plan is built on the GPU that runs it: {unavailable} here") from exc
            raise
    else:
        raise ValueError("name the ONNX (--onnx) or a bundle (--bundle / --tiny / --config)")
    if not onnx_path.is_file():
        raise FileNotFoundError(f"{onnx_path} not found: run `python -m export onnx --dtype {args.dtype}` first")
    _build_and_record(args, bundle, onnx_path, args.dtype, progress)
    return 0


def _cmd_all(args, progress: Progress) -> int:
    from export.manifest import export_and_record_onnx

    skipped = "--skip-tensorrt" if args.skip_tensorrt else _tensorrt_unavailable()
    if not skipped:
        _plan_shape(args)  # before minutes of exporting, not after
    bundle = _open_bundle(args, progress)
    buckets = _serve_buckets(args)
    path, record = export_and_record_onnx(bundle, "float32", verify=True, buckets=buckets, progress=progress)
    _summary(progress, path, record)
    if skipped:
        progress.say(f"tensorrt: skipped ({skipped})")
        return 0
    path16, record16 = export_and_record_onnx(bundle, "float16", verify=True, buckets=buckets, progress=progress)
    _summary(progress, path16, record16)
    from engines.bundle import Bundle

    _build_and_record(args, Bundle.load(bundle.path, verify=False), path16, "float16", progress)
    return 0


def _serve_buckets(args) -> list[int]:
    """The image sides the service runs: --buckets, else the Serve config's, else none known."""
    if getattr(args, "buckets", None):
        return list(args.buckets)
    if args.config:
        from export.tensorrt_build import load_serve_settings

        return list(load_serve_settings(args.config, args.app).imaging.buckets)
    return []


def _plan_shape(args) -> dict[int, int]:
    """The plan's profiles need each of the service's buckets and its largest batch: from --buckets and
    --max-batch-size (one size for every bucket), or the Serve config (--config: batching.per_bucket, else
    batching.max_batch_size)."""
    if not args.config and not (args.buckets and args.max_batch_size):
        skip = ", or --skip-tensorrt" if args.command == "all" else ""
        raise ValueError(
            f"the TensorRT plan is built for the service's buckets and batch size: give --config SERVE_CONFIG "
            f"(e.g. serve/configs/local.yaml) or both --buckets and --max-batch-size{skip}"
        )
    buckets = _serve_buckets(args)
    if args.max_batch_size:
        return dict.fromkeys(buckets, args.max_batch_size)
    from export.tensorrt_build import load_serve_settings

    batching = load_serve_settings(args.config, args.app).batching
    return {side: batching.for_bucket(side)[0] for side in buckets}


def _tensorrt_unavailable() -> str | None:
    import importlib.util

    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU"
    if importlib.util.find_spec("tensorrt") is None:
        return "tensorrt is not installed"
    return None


def _build_and_record(args, bundle, onnx_path: Path, dtype: str, progress: Progress) -> None:
    import torch

    from engines.bundle import sha256_of
    from engines.runners import export_filename, export_key, plan_sidecar
    from export.manifest import check_inside_bundle, check_output_paths, check_plan_source, check_writable, record_plan
    from export.staging import staging_folder
    from export.tensorrt_build import build_plan, onnx_static_dims, profiles_from_serve_config

    if dtype != "float16":
        progress.say("note: a float32 graph builds a float32 plan (strongly typed): float16 is the fast one")
    shape = _plan_shape(args)
    profiles = profiles_from_serve_config(shape, spanning=args.spanning, **onnx_static_dims(onnx_path))
    for profile in profiles:
        progress.say(f"profile {profile.name}: sample {profile.shapes['sample']}")
    if not torch.cuda.is_available():
        raise RuntimeError("building a TensorRT plan needs a CUDA GPU")
    cc = "%d.%d" % torch.cuda.get_device_capability()
    if args.plan:
        plan_path = Path(args.plan)
    elif bundle is not None:
        plan_path = bundle.path / export_filename("tensorrt", dtype, cc)
        check_inside_bundle(bundle.path, plan_path)
    else:
        plan_path = onnx_path.with_name(onnx_path.stem + f".sm{cc.replace('.', '')}.plan")
    cache = Path(args.timing_cache) if args.timing_cache else plan_path.with_name(f"timing.sm{cc.replace('.', '')}.cache")
    options = {"timing_cache_path": cache, "workspace_gb": args.workspace_gb, "optimization_level": args.opt_level}
    if bundle is not None:
        key = export_key("tensorrt", dtype, cc)
        check_output_paths(bundle.path, key, [plan_path, plan_sidecar(plan_path), cache])  # before the build
    recorded = bundle is not None and plan_path.resolve().is_relative_to(bundle.path.resolve())
    check_writable([plan_path, cache], record_in=bundle.path if recorded else None)  # before building too
    if recorded:
        check_plan_source(bundle, sha256_of(onnx_path), dtype, list(shape))  # before minutes of building, not after
        with staging_folder(plan_path.parent) as staging:
            info = build_plan(onnx_path, staging / plan_path.name, profiles, progress=progress, **options)
            record_plan(bundle, plan_path, info.to_json(), dtype, buckets=list(shape), staged=staging)
        progress.say(f"recorded {plan_path.name} in the bundle manifest")
    else:
        info = build_plan(onnx_path, plan_path, profiles, progress=progress, **options)
        if bundle is not None:
            progress.say(f"{plan_path}: written, not recorded: outside the bundle folder {bundle.path}")
    _summary(progress, plan_path, {"plan": info.to_json()})


def _summary(progress: Progress, path: Path, record: dict) -> None:
    brief = {"path": str(path)}
    if "verify" in record:
        v = record["verify"]
        brief["verify"] = {k: v[k] for k in ("passed", "skipped", "dtype", "max_abs", "mean_abs", "tolerance") if k in v}
    if "plan" in record:
        p = record["plan"]
        brief["plan"] = {k: p[k] for k in ("tensorrt_version", "gpu", "compute_capability", "build_seconds", "bytes")}
    if "metadata" in record:
        brief["onnx"] = {k: record["metadata"].get(k) for k in ("dtype", "opset", "exporter", "external_data")}
    progress.say("result " + json.dumps(brief))


def _cmd_bench(args, progress: Progress) -> int:
    import statistics
    import time

    import numpy as np
    import torch

    from engines.jobs import RemovalJob
    from engines.remover import RemovalEngine
    from serve.placement import available_device

    device = available_device(args.device)  # before the bundle is opened, not at the first runner
    bundle = _open_bundle(args, progress)
    side = args.side
    image = _photo(side)
    mask = np.zeros((side, side), bool)
    mask[side // 3 : 2 * side // 3, side // 3 : 2 * side // 3] = True
    jobs = [RemovalJob(image, mask, seed=i) for i in range(args.batch)]
    results, outputs = {}, {}
    for kind in args.runners:
        with progress.stage(f"{kind} runner: warm-up + {args.runs} runs of {args.batch} x {side} px"):
            engine = RemovalEngine.from_bundle(bundle, device=device, runner=kind, buckets=[side])
            engine.remove(jobs)
            totals, stages = [], []
            for _ in range(args.runs):
                timings: dict[str, float] = {}
                started = time.perf_counter()
                outputs[kind] = engine.remove(jobs, timings=timings)
                totals.append((time.perf_counter() - started) * 1000)
                stages.append(timings)
        results[kind] = {
            "dtype": str(engine.dtype).removeprefix("torch."),
            "total_ms": round(statistics.median(totals), 1),
            **{f"{k}_ms": round(statistics.median(t[k] for t in stages) * 1000, 1) for k in stages[0]},
        }
    first = next(iter(outputs))
    for kind in outputs:
        diff = np.abs(np.stack(outputs[kind]).astype(int) - np.stack(outputs[first]))
        results[kind][f"vs_{first}_max_diff"] = int(diff.max())
    progress.say(f"torch threads {torch.get_num_threads()}, device {device}")
    columns = list(next(iter(results.values())))
    print("runner    " + "  ".join(f"{c:>18}" for c in columns))
    for kind, row in results.items():
        print(f"{kind:<10}" + "  ".join(f"{str(row[c]):>18}" for c in columns))
    print(f"vs_{first}_max_diff: the largest difference of any pixel channel from the {first} runner's, 0-255 levels")
    return 0


def _photo(side: int):
    """scikit-image's astronaut (a dev dependency), resized; seeded noise without it."""
    import numpy as np

    try:
        import skimage
        from PIL import Image

        path = Path(skimage.__file__).parent / "data" / "astronaut.png"
        return np.asarray(Image.open(path).convert("RGB").resize((side, side)))
    except ImportError:
        return np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
