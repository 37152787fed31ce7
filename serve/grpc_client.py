"""A small gRPC client for the service, and the example docs/api.md "gRPC" shows.

    python -m serve.grpc_client [--target 127.0.0.1:9000] remove photo.jpg mask.png -o out.png [--gate retry]
        (the output format: --output-format, else -o's suffix (.png, .jpg / .jpeg, .webp; another image format's,
        .gif say, is refused), else the photo's if it is PNG, JPEG or WebP, else PNG)
    python -m serve.grpc_client remove photo.png -o out.png   # no mask: the photo's alpha is the mask
    python -m serve.grpc_client remove photo.jpg mask.png -o out.png --dilate 8 --quality 90 --retain false
    python -m serve.grpc_client score photo.jpg mask.png out.png [--gate-threshold 0.6]
        (every option of serve.protocol's RemoveOptions / ScoreOptions, as --dilate, --max-attempts...; timeout_s
        is --timeout's share, `service_timeout_s`)
    ROREM_API_KEY=rk_... python -m serve.grpc_client remove ...   # or --api-key: a service with API keys on
    python -m serve.grpc_client --target rorem.example.com:443 --tls [--ca-cert ca.pem] remove ...  # TLS in front
    python -m serve.grpc_client --application NAME remove ...  # one of several applications on one cluster

gRPC clients refuse messages over 4 MiB by default; `open_channel` raises both limits so a
1024x1024 PNG (or a 12 MP photo) passes both ways. Errors carry the problem+json document in the
status details (`problem_of`).
"""

from __future__ import annotations

import argparse
import collections
import functools
import ipaddress
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import grpc

from serve import rorem_pb2 as pb
from serve import rorem_pb2_grpc as pb_grpc
from serve.ports import DEFAULT_GRPC_PORT

SERVICE_SHARE = 0.95  # of the call's deadline, sent as timeout_s (`service_timeout_s`)
SERVICE_SLACK_S = 0.5  # the least a call's deadline keeps past its timeout_s, for the answer's way back
DEFAULT_DEADLINE_S = 120.0  # --timeout's default (a call sends its own timeout_s, `service_timeout_s`)
OUTPUT_SUFFIXES = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}  # for engines.imaging.OUTPUT_FORMATS
DERIVED_OPTION = "timeout_s"  # sent as --timeout's share (`service_timeout_s`), never a flag of its own
API_KEY_ENV = "ROREM_API_KEY"
APPLICATION_METADATA = "application"  # Ray's gRPC proxy routes a call to the Serve application it names
MAX_MESSAGE_BYTES = 2**31 - 1  # gRPC's own ceiling: the service's limit follows max_megapixels (serve.proxy_limits)
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


def open_channel(
    target: str = f"127.0.0.1:{DEFAULT_GRPC_PORT}",
    application: str | None = None,
    tls: bool = False,
    ca_cert: bytes | None = None,
) -> grpc.Channel:
    """A channel to the service; `application`: the Serve application each unary call names in its metadata (in
    place of any `application` the call gives), which Ray's gRPC proxy needs where one cluster serves several (a
    cluster of one takes any call). `tls`: to a TLS front (the service itself speaks plaintext: docs/kubernetes.md
    "TLS in front"), trusting `ca_cert` (PEM) or the system's roots. The service's RPCs are unary."""
    if tls:
        channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(ca_cert), options=CHANNEL_OPTIONS)
    else:
        channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
    if application is None:
        return channel
    return grpc.intercept_channel(channel, _NamesApplication(application))


class _CallDetails(
    collections.namedtuple("_CallDetails", "method timeout metadata credentials wait_for_ready compression"),
    grpc.ClientCallDetails,
):
    pass


class _NamesApplication(grpc.UnaryUnaryClientInterceptor):
    def __init__(self, application: str):
        self.entry = (APPLICATION_METADATA, application)

    def intercept_unary_unary(self, continuation, details, request):
        metadata = [entry for entry in details.metadata or () if entry[0] != APPLICATION_METADATA]
        named = _CallDetails(
            details.method, details.timeout, [*metadata, self.entry], details.credentials,
            details.wait_for_ready, details.compression,
        )  # fmt: skip
        return continuation(named, request)


def stub(channel: grpc.Channel) -> pb_grpc.ObjectRemovalStub:
    return pb_grpc.ObjectRemovalStub(channel)


def problem_of(error: grpc.RpcError) -> dict:
    """The problem+json document of a failed call ({"detail": ...} if the server sent plain text)."""
    details = error.details() or ""
    try:
        return json.loads(details)
    except ValueError:
        return {"detail": details}


@functools.cache
def _request_types() -> SimpleNamespace:
    """The request's Seed and timeout_s bounds, the formats the service writes and the option models, from their one
    home (serve.protocol, engines.imaging), imported only when the command line needs them: a program that only
    opens a channel (locust's gRPC user, an app) stays light (grpc and the stubs)."""
    from PIL import Image
    from pydantic import TypeAdapter

    from engines.imaging import OUTPUT_FORMATS
    from serve.protocol import RemoveOptions, ScoreOptions, Seed, TimeoutS

    # Pillow's table names other image formats' suffixes (to refuse them); the service's own are fixed here, so a
    # Pillow built without one (WebP) does not leave -o out.webp to be written in the photo's format
    suffixes = {suffix: name.lower() for suffix, name in Image.registered_extensions().items()}
    suffixes |= OUTPUT_SUFFIXES
    return SimpleNamespace(
        seed=TypeAdapter(Seed), timeout_max=TypeAdapter(TimeoutS).json_schema()["maximum"], formats=OUTPUT_FORMATS,
        suffixes=suffixes, remove_options=RemoveOptions, score_options=ScoreOptions,
    )  # fmt: skip


def output_formats() -> tuple[str, ...]:
    """The formats the service writes (engines.imaging.OUTPUT_FORMATS)."""
    return _request_types().formats


def seed(text: str) -> int:
    """--seed: a seed the service takes (serve.protocol.Seed), else refused as argparse refuses a bad value (a
    negative one, which the request's uint64 cannot hold, was a traceback)."""
    seed_type = _request_types().seed
    try:
        return seed_type.validate_python(int(text))
    except ValueError:  # pydantic's ValidationError is one
        bounds = seed_type.json_schema()
        raise argparse.ArgumentTypeError(
            f"{text!r} is no seed: an integer from {bounds['minimum']} to {bounds['maximum']}"
        ) from None


def output_format(output: Path, requested: str | None) -> str | None:
    """The format to ask for: `requested`, else the one -o's suffix names (None: neither names one, the service
    chooses). A suffix naming a format the service does not write (.gif), or not the one `requested`, is a
    ValueError: the file would hold another format than its name says."""
    formats, image_suffixes = _request_types().formats, _request_types().suffixes
    named = image_suffixes.get(output.suffix.lower())
    if named is not None and named not in formats:
        suffixes = ", ".join(suffix for suffix, fmt in image_suffixes.items() if fmt in formats)
        raise ValueError(f"-o {output.name}: the service writes no {named.upper()}; name the file {suffixes}")
    if requested and named and requested != named:
        raise ValueError(f"-o {output.name} names {named}, --output-format {requested}")
    return requested or named


STDOUT = "-"  # -o -: the image to standard output, the removal's line to standard error


def output_file(text: str) -> Path:
    """-o: a file its folder lets us write, checked before the call spends model work and a quota's request (an
    unwritable one was a traceback after the removal, its result id never printed); `-`: standard output."""
    if text == STDOUT:
        return Path(STDOUT)
    path = Path(text)
    folder = path.parent
    if not text or path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a folder, not a file")
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} cannot be written: no folder {str(folder)!r}")
    if not os.access(path if path.exists() else folder, os.W_OK):
        raise argparse.ArgumentTypeError(f"{text!r} cannot be written: permission denied")
    return path


def input_file(text: str) -> Path:
    """An input image: a readable regular file, else refused as argparse refuses a bad value (a missing one was a
    FileNotFoundError traceback, an empty name an IsADirectoryError)."""
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text!r} is no file")
    try:
        path.open("rb").close()
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} cannot be read: {exc.strerror}") from None
    return path


class RequestOption:
    """An argparse type: the text read as the service reads the form field `name` of `model` (serve.protocol), so a
    value the service would refuse is refused before any call, in the service's words."""

    def __init__(self, model, name: str):
        self.model = model
        self.name = name

    def __call__(self, text: str):
        from pydantic import ValidationError

        try:
            return getattr(self.model.model_validate({self.name: text}), self.name)
        except ValidationError as exc:
            raise argparse.ArgumentTypeError(f"{text!r}: {exc.errors()[0]['msg']}") from None


def add_request_options(parser: argparse.ArgumentParser, model, **own: dict) -> None:
    """A flag per option of the service's `model` (--max-attempts for max_attempts), but timeout_s, which is
    --timeout's (`service_timeout_s`); `own`: a flag's own add_argument settings."""
    for name, field in model.model_fields.items():
        if name != DERIVED_OPTION:
            settings = {"type": RequestOption(model, name), "help": field.description, **own.get(name, {})}
            parser.add_argument(f"--{name.replace('_', '-')}", **settings)


def request_options(options: argparse.Namespace) -> dict:
    """The request's option fields from the parsed flags (None: not sent, the service's default)."""
    return {name: getattr(options, name) for name in options.options_model.model_fields if name != DERIVED_OPTION}


def deadline(text: str) -> float:
    """--timeout: a positive number of seconds (0 or less ended every call at once in a bare DEADLINE_EXCEEDED)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is no deadline: a number of seconds above 0")
    return value


def service_timeout_s(deadline_s: float) -> float:
    """The timeout_s sent with a call of this deadline: a little less, so a slow removal ends in the service's
    timeout problem (DEADLINE_EXCEEDED with its document) before the channel's bare DEADLINE_EXCEEDED. At least
    SERVICE_SLACK_S less (95% of 2 s left the answer 0.1 s), but never under half the deadline."""
    share = min(deadline_s * SERVICE_SHARE, deadline_s - SERVICE_SLACK_S)
    return min(max(share, deadline_s / 2), _request_types().timeout_max)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; a removal's `output_format` is the one to ask for (`output_format`). Mistakes exit 2 with
    the usage, as argparse answers them."""
    parser = argparse.ArgumentParser(prog="python -m serve.grpc_client")
    parser.add_argument(
        "--target", default=f"127.0.0.1:{DEFAULT_GRPC_PORT}", help="host:port of the gRPC proxy (default %(default)s)"
    )
    parser.add_argument(
        "--timeout", type=deadline, default=DEFAULT_DEADLINE_S,
        help=f"the call's deadline in seconds (default {DEFAULT_DEADLINE_S:g}); the call asks the service to answer "
        f"within {SERVICE_SHARE:.0%}% of it",
    )  # fmt: skip
    parser.add_argument(
        "--application", default=None, help="the Serve application to call, where one cluster serves several"
    )
    parser.add_argument(
        "--api-key", default=os.environ.get(API_KEY_ENV), help=f"sent as authorization: Bearer (default: ${API_KEY_ENV})"
    )
    parser.add_argument("--tls", action="store_true", help="call a TLS front (the service itself speaks plaintext)")
    parser.add_argument(
        "--ca-cert", type=input_file, default=None, help="the CA (PEM) to trust with --tls (default: the system's)"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    remove_options, score_options = _request_types().remove_options, _request_types().score_options
    remove = sub.add_parser("remove", help="remove the masked object")
    remove.add_argument("image", type=input_file)
    remove.add_argument("mask", type=input_file, nargs="?", help="absent: the image's alpha is the mask")
    remove.add_argument(
        "-o", "--output", type=output_file, required=True, help="the file to write (its suffix picks the format); "
        "- for standard output"
    )
    add_request_options(
        remove, remove_options, seed={"type": seed},
        output_format={"help": f"{', '.join(output_formats())}, any case (jpg: jpeg); default: from -o's suffix, "
                       "else the photo's"},
    )  # fmt: skip
    remove.set_defaults(options_model=remove_options)
    score = sub.add_parser("score", help="score a (source, mask, edited) triple")
    score.add_argument("source", type=input_file)
    score.add_argument("mask", type=input_file)
    score.add_argument("edited", type=input_file)
    add_request_options(score, score_options)
    score.set_defaults(options_model=score_options)
    options = parser.parse_args(argv)
    if options.ca_cert is not None and not options.tls:
        parser.error("--ca-cert is for --tls")
    if options.command == "remove":
        try:
            options.output_format = output_format(options.output, options.output_format)
        except ValueError as exc:
            parser.error(str(exc))
    return options


def _is_loopback(target: str) -> bool:
    """Whether a gRPC target ("host:port", "[v6]:port", a bare address, "unix:path") stays on this machine."""
    if target.startswith("unix:"):
        return True
    host = target.removeprefix("dns:///")
    if host.startswith("["):
        host = host[1:].split("]")[0]
    elif host.count(":") == 1:
        host = host.split(":")[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv: list[str] | None = None) -> int:
    options = parse(argv)
    metadata = [("authorization", f"Bearer {options.api_key}")] if options.api_key else None
    if metadata and not options.tls and not _is_loopback(options.target):
        print(f"warning: the API key goes to {options.target} in clear text; --tls for a TLS front", file=sys.stderr)
    ca_cert = options.ca_cert.read_bytes() if options.ca_cert else None
    with open_channel(options.target, options.application, options.tls, ca_cert) as channel:
        client = stub(channel)
        try:
            if options.command == "remove":
                request = pb.RemoveRequest(
                    image=options.image.read_bytes(),
                    mask=options.mask.read_bytes() if options.mask else None,
                    timeout_s=service_timeout_s(options.timeout),
                    **request_options(options),
                )
                reply = client.Remove(request, timeout=options.timeout, metadata=metadata)
                used = reply.seed if reply.HasField("seed") else "-"
                score = f"{reply.score:.3f}" if reply.HasField("score") else "-"
                kept = f", result {reply.result_id}" if reply.result_id else ""  # what /feedback and /results/ name
                said = (
                    f"seed {used}, score {score}, gate {reply.gate}, attempts {reply.attempts}{kept}, "
                    f"request {reply.request_id}"
                )
                if str(options.output) == STDOUT:
                    sys.stdout.buffer.write(reply.image)
                    sys.stdout.flush()
                    print(f"-: {said}", file=sys.stderr)
                    return 0
                try:
                    options.output.write_bytes(reply.image)
                except OSError as exc:  # checked before the call, so only what changed since
                    print(f"cannot write {options.output}: {exc.strerror} (the removal: {said})", file=sys.stderr)
                    return 1
                print(f"{options.output}: {said}")
            else:
                reply = client.Score(
                    pb.ScoreRequest(
                        source=options.source.read_bytes(),
                        mask=options.mask.read_bytes(),
                        edited=options.edited.read_bytes(),
                        timeout_s=service_timeout_s(options.timeout),
                        **request_options(options),
                    ),
                    timeout=options.timeout,
                    metadata=metadata,
                )
                # a float32 holds ~7 significant digits: 0.6 comes back as 0.6000000238418579
                print(f"score {reply.score:.3f} (threshold {reply.threshold:.7g}, passed {reply.passed})")
        except grpc.RpcError as error:
            print(f"{error.code().name}: {json.dumps(problem_of(error), indent=2)}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
