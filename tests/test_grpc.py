"""The gRPC API through Ray Serve's gRPC proxy: same pixels as REST, same problems, big messages."""

import io
import shutil
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import grpc
import numpy as np
import pytest
from PIL import Image

from serve import rorem_pb2 as pb
from serve.grpc_client import problem_of, stub
from tests.helpers import box_mask as _mask
from tests.helpers import decode_png as _decode
from tests.helpers import photo, png_bytes
from tests.helpers import post_remove as _remove

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def client(service):
    with service.channel() as channel:
        yield stub(channel)


def test_grpc_and_rest_give_identical_pixels_and_score(service, client):
    image, mask = png_bytes(photo()), png_bytes(_mask())
    rest = _remove(service, image, mask, seed=42, gate="annotate")
    reply = client.Remove(pb.RemoveRequest(image=image, mask=mask, seed=42, gate="annotate"), timeout=120)
    assert reply.media_type == "image/png" and reply.seed == 42 and reply.attempts == 1 and reply.request_id
    assert np.array_equal(_decode(reply.image), _decode(rest.content))
    assert reply.score == pytest.approx(float(rest.headers["x-removal-score"]), abs=1e-4)
    assert reply.bucket == int(rest.headers["x-bucket"])

    scored = client.Score(pb.ScoreRequest(source=image, mask=mask, edited=reply.image), timeout=120)
    rest_score = service.client.post(
        "/score",
        files={"source": ("s.png", image), "mask": ("m.png", mask), "edited": ("e.png", reply.image)},
    ).json()
    assert scored.score == pytest.approx(rest_score["score"], abs=1e-5) and scored.passed == rest_score["passed"]


def test_grpc_errors_carry_status_codes_and_problem_details(service, client):
    with pytest.raises(grpc.RpcError) as bad_image:
        client.Remove(pb.RemoveRequest(image=b"not an image", mask=png_bytes(_mask())), timeout=60)
    assert bad_image.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    problem = problem_of(bad_image.value)
    assert problem["type"].endswith("/invalid-image") and problem["status"] == 422 and problem["detail"]

    with pytest.raises(grpc.RpcError) as rejected:
        client.Remove(
            pb.RemoveRequest(
                image=png_bytes(photo()), mask=png_bytes(_mask()), seed=1, gate="reject", gate_threshold=10, max_attempts=2
            ),
            timeout=120,
        )
    assert rejected.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    problem = problem_of(rejected.value)
    assert problem["type"].endswith("/removal-failed") and problem["attempts"] == 2 and problem["score"] >= 0

    with pytest.raises(grpc.RpcError) as bad_option:
        client.Remove(pb.RemoveRequest(image=png_bytes(photo()), gate="sometimes"), timeout=60)
    assert bad_option.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    with pytest.raises(grpc.RpcError) as too_big:
        limit = service.config["imaging"]["max_upload_bytes"]
        client.Remove(pb.RemoveRequest(image=b"\0" * (limit + 1)), timeout=60)
    assert too_big.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert problem_of(too_big.value)["type"].endswith("/payload-too-large")


def test_a_1024_png_over_4_mib_passes_both_ways(service, client):
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (1024, 1024, 4), dtype=np.uint8)  # noise with alpha: about 4.2 MB as PNG
    mask = np.zeros((1024, 1024), np.uint8)
    mask[400:500, 400:500] = 255
    buffer = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buffer, format="PNG")
    request = pb.RemoveRequest(image=buffer.getvalue(), mask=png_bytes(mask), seed=0, gate="off", output_format="png")
    assert request.ByteSize() > 4 * 1024 * 1024, "the test must exceed gRPC's default 4 MiB limit"
    reply = client.Remove(request, timeout=120)
    assert len(reply.image) > 4 * 1024 * 1024 and reply.bucket > 0
    result = np.asarray(Image.open(io.BytesIO(reply.image)))
    outside = np.ones((1024, 1024), bool)
    outside[300:600, 300:600] = False
    assert result.shape == rgba.shape and np.array_equal(result[outside], rgba[outside])


def test_stubs_are_what_make_proto_generates(tmp_path):
    """The committed stubs match the .proto: regenerate them the documented way and compare."""
    pytest.importorskip("grpc_tools", reason="grpcio-tools (dev extra) generates the stubs")
    shutil.copytree(REPO / "serve", tmp_path / "serve", ignore=shutil.ignore_patterns("*_pb2*", "__pycache__"))
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", ".", "--python_out=.", "--pyi_out=.", "--grpc_python_out=.",
         "serve/rorem.proto"],
        cwd=tmp_path, check=True,
    )  # fmt: skip
    for name in ("rorem_pb2.py", "rorem_pb2.pyi", "rorem_pb2_grpc.py"):
        assert (tmp_path / "serve" / name).read_text() == (REPO / "serve" / name).read_text(), f"{name}: run make proto"


def test_rpc_names_match_the_ingress_methods():
    """Ray's gRPC proxy calls the ingress method named like the RPC."""
    from serve.app import Ingress

    service = pb.DESCRIPTOR.services_by_name["ObjectRemoval"]
    for method in service.methods:
        assert hasattr(Ingress.func_or_class, method.name), method.name
    assert [m.name for m in service.methods] == ["Remove", "Score"]


def test_the_cli_client_asks_for_the_format_its_output_file_names(monkeypatch, tmp_path):
    """`python -m serve.grpc_client remove photo.jpg mask.png -o out.png` (the README's gRPC example) wrote a JPEG
    into out.png: the client never asked for a format, so the service answered in the photo's."""
    import typing

    from serve import grpc_client
    from serve.protocol import RemoveOptions

    assert grpc_client.output_formats() == typing.get_args(typing.get_args(RemoveOptions.model_fields["output_format"].annotation)[0])
    asked = []

    class Stub:
        def __init__(self, channel):
            pass

        def Remove(self, request, timeout, metadata=None):
            asked.append(request.output_format)
            return pb.RemoveReply(image=b"x", gate="off", bucket=256)

    monkeypatch.setattr(grpc_client, "stub", Stub)
    (tmp_path / "photo.jpg").write_bytes(b"j")
    (tmp_path / "mask.png").write_bytes(b"m")
    for output, extra in (("out.png", []), ("out.JPG", []), ("out.bin", []), ("out.bin", ["--output-format", "webp"])):
        args = ["--target", "127.0.0.1:1", "remove", str(tmp_path / "photo.jpg"), str(tmp_path / "mask.png")]
        assert grpc_client.main([*args, "-o", str(tmp_path / output), *extra]) == 0
    assert asked == ["png", "jpeg", "", "webp"]


class FakeStub:
    """In place of the client's stub: records each call; a Remove's reply has no seed (an empty mask's)."""

    calls: ClassVar[list] = []

    def __init__(self, channel):
        pass

    def Remove(self, request, timeout, metadata=None):
        FakeStub.calls.append((request, timeout))
        reply = pb.RemoveReply(image=b"x", gate="nothing-to-remove", request_id="req-1")
        if request.HasField("seed"):
            reply.seed = request.seed
        if request.retain:
            reply.result_id = "r" * 32
        return reply

    def Score(self, request, timeout, metadata=None):
        FakeStub.calls.append((request, timeout))
        threshold = request.gate_threshold if request.HasField("gate_threshold") else 0.5
        return pb.ScoreReply(score=0.5, threshold=threshold, passed=True)


@pytest.fixture
def cli(monkeypatch, tmp_path):
    """serve.grpc_client.main over FakeStub, run in a folder holding the files the docs' examples name."""
    from serve import grpc_client

    monkeypatch.setattr(grpc_client, "stub", FakeStub)
    monkeypatch.setattr(FakeStub, "calls", [])
    monkeypatch.chdir(tmp_path)
    for name in ("photo.jpg", "photo.png", "mask.png", "out.png"):
        (tmp_path / name).write_bytes(b"x")
    return grpc_client.main


def _usage_lines() -> list[list[str]]:
    """Every command line of the client that the docs and its own docstring show, as argv (one ending in ... is
    an outline); the docstring's optional [...] given."""
    import shlex

    from serve import grpc_client

    docs = ("README.md", "docs/api.md", "docs/configuration.md")
    texts = [grpc_client.__doc__, *((REPO / name).read_text() for name in docs)]
    lines = []
    for text in texts:
        for line in text.replace("`", "\n").splitlines():
            if "-m serve.grpc_client " in line:
                words = [word.strip("[]") for word in shlex.split(line.split("#")[0])]
                if words[-1] != "...":
                    lines.append(words[words.index("serve.grpc_client") + 1 :])
    return lines


def test_the_documented_command_lines_run(cli):
    """The docstring put --target after the subcommand, which argparse refuses."""
    lines = _usage_lines()
    assert len(lines) >= 5, lines
    for argv in lines:
        assert cli(argv) == 0, argv


@pytest.mark.parametrize("seed", ["-1", str(2**63), "7.5", "x"])
def test_the_cli_client_refuses_a_seed_the_service_would_not_take_as_argparse_does(cli, seed, capsys):
    """--seed -1 ended in a traceback (a uint64 field cannot hold it)."""
    with pytest.raises(SystemExit) as exited:
        cli(["remove", "photo.png", "mask.png", "-o", "out.png", "--seed", seed])
    assert exited.value.code == 2 and FakeStub.calls == []
    assert f"argument --seed: {seed!r} is no seed: an integer from 0 to {2**63 - 1}" in capsys.readouterr().err
    assert cli(["remove", "photo.png", "mask.png", "-o", "out.png", "--seed", str(2**63 - 1)]) == 0
    assert FakeStub.calls[0][0].seed == 2**63 - 1


@pytest.mark.parametrize(
    ("output", "extra"),
    [("out.gif", []), ("out.TIFF", []), ("out.bmp", ["--output-format", "png"]), ("out.png", ["--output-format", "webp"])],
)  # fmt: skip
def test_the_cli_client_refuses_an_output_file_named_for_another_format(cli, output, extra, capsys, tmp_path):
    """-o out.gif wrote PNG bytes into out.gif."""
    before = (tmp_path / "out.png").read_bytes()
    with pytest.raises(SystemExit) as exited:
        cli(["remove", "photo.png", "mask.png", "-o", output, *extra])
    assert exited.value.code == 2 and FakeStub.calls == []
    err = capsys.readouterr().err
    assert (".png" in err and ".webp" in err) or "--output-format webp" in err, err
    assert not (tmp_path / output).exists() or (tmp_path / output).read_bytes() == before


@pytest.mark.parametrize("timeout", ["0", "-5", "nan", "inf", "soon"])
def test_the_cli_client_refuses_a_deadline_that_is_not_a_positive_number(cli, timeout, capsys):
    """--timeout 0 sent timeout_s 0.0 and ended the call at once; -5 sent -4.75."""
    with pytest.raises(SystemExit) as exited:
        cli(["--timeout", timeout, "remove", "photo.png", "mask.png", "-o", "out.png"])
    assert exited.value.code == 2 and FakeStub.calls == []
    assert f"argument --timeout: {timeout!r} is no deadline" in capsys.readouterr().err


def test_the_cli_client_names_the_services_formats_by_suffix_whatever_pillow_registers(cli, monkeypatch):
    """The suffixes came from Pillow's table alone: a Pillow built without WebP left -o out.webp naming no
    format, and the service answered in the photo's (JPEG bytes in out.webp)."""
    from PIL import Image

    from serve import grpc_client

    without_webp = {k: v for k, v in Image.registered_extensions().items() if v != "WEBP"}
    monkeypatch.setattr(Image, "registered_extensions", lambda: without_webp)
    grpc_client._request_types.cache_clear()
    try:
        assert cli(["remove", "photo.png", "mask.png", "-o", "out.webp"]) == 0
    finally:
        grpc_client._request_types.cache_clear()
    assert FakeStub.calls[0][0].output_format == "webp"
    assert set(grpc_client.OUTPUT_SUFFIXES.values()) == set(grpc_client.output_formats())


def test_the_cli_client_prints_no_seed_when_nothing_was_removed_and_asks_for_an_answer_before_its_deadline(cli, capsys):
    """An empty mask's reply has no seed: the client printed "seed 0", a valid seed. And a slow removal ended in the
    channel's bare DEADLINE_EXCEEDED: the call now asks the service to answer first (its timeout problem)."""
    from serve.grpc_client import SERVICE_SHARE

    args = ["--timeout", "30", "remove", "photo.png", "mask.png", "-o", "o.png"]
    assert cli(args) == 0 and cli([*args, "--seed", "0"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert ": seed -, score -," in printed[0] and ": seed 0, score -," in printed[1], printed
    assert printed[0].endswith(", request req-1"), "the id to quote about this removal"
    (first, timeout), (second, _) = FakeStub.calls
    assert not first.HasField("seed") and second.HasField("seed") and second.seed == 0
    assert first.HasField("timeout_s") and 0 < first.timeout_s < timeout == 30
    assert first.timeout_s == pytest.approx(30 * SERVICE_SHARE)
    assert f"`serve.grpc_client` sends {SERVICE_SHARE:.0%} of" in " ".join((REPO / "docs" / "api.md").read_text().split())


def test_the_cli_client_prints_the_id_of_a_retained_result(cli, capsys):
    """`--retain true` kept the result, but the client printed no id to label it or read it back by."""
    assert cli(["remove", "photo.png", "mask.png", "-o", "o.png", "--retain", "true"]) == 0
    assert cli(["remove", "photo.png", "mask.png", "-o", "o.png"]) == 0
    kept, not_kept = capsys.readouterr().out.splitlines()
    assert f", result {'r' * 32}, " in kept and "result" not in not_kept


def test_the_cli_client_prints_the_threshold_as_it_was_given(cli, capsys):
    """A reply's threshold is a 32-bit float: `--gate-threshold 0.6` printed "threshold 0.6000000238418579"."""
    assert cli(["score", "photo.jpg", "mask.png", "out.png", "--gate-threshold", "0.6"]) == 0
    assert cli(["score", "photo.jpg", "mask.png", "out.png", "--gate-threshold", "9.3"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert "(threshold 0.6, passed True)" in printed[0] and "(threshold 9.3, passed True)" in printed[1], printed


@pytest.mark.parametrize(("deadline", "sent"), [(120, 114.0), (10, 9.5), (2, 1.5), (1, 0.5), (0.3, 0.15), (5000, 3600)])
def test_the_cli_client_leaves_its_answer_time_to_come_back(cli, deadline, sent):
    """95% of --timeout 2 left the service's answer 0.1 s before the channel's bare DEADLINE_EXCEEDED."""
    assert cli(["--timeout", str(deadline), "remove", "photo.png", "mask.png", "-o", "o.png"]) == 0
    [(request, timeout)] = FakeStub.calls
    assert timeout == deadline and request.timeout_s == pytest.approx(sent)


def test_the_cli_clients_score_asks_for_an_answer_before_its_deadline_as_a_removal_does(cli):
    """ScoreRequest had no timeout_s: a slow score ended in the channel's bare DEADLINE_EXCEEDED, or the client's
    deadline had to outlast the service's request_timeout_s."""
    from serve.config import AppSettings

    assert cli(["score", "photo.png", "mask.png", "out.png"]) == 0
    assert cli(["remove", "photo.png", "mask.png", "-o", "o.png"]) == 0
    assert cli(["--timeout", "10", "score", "photo.png", "mask.png", "out.png"]) == 0
    (score, score_deadline), (removal, remove_deadline), (short, short_deadline) = FakeStub.calls
    assert score_deadline == remove_deadline == 120 and score.timeout_s == removal.timeout_s
    assert removal.timeout_s < remove_deadline and removal.timeout_s <= AppSettings().request_timeout_s
    assert short_deadline == 10 and short.timeout_s == pytest.approx(9.5)


@pytest.mark.parametrize(
    "argv",
    [["remove", "missing.png", "mask.png", "-o", "o.png"], ["remove", "", "mask.png", "-o", "o.png"],
     ["remove", "photo.png", "folder", "-o", "o.png"], ["score", "photo.png", "mask.png", "missing.png"]],
)  # fmt: skip
def test_the_cli_client_refuses_an_input_that_is_no_readable_file_as_argparse_does(cli, argv, capsys, tmp_path):
    """A missing file ended in a FileNotFoundError traceback, an empty name in IsADirectoryError."""
    (tmp_path / "folder").mkdir()
    named = next(word for word in argv[1:] if word in ("missing.png", "", "folder"))
    with pytest.raises(SystemExit) as exited:
        cli(argv)
    assert exited.value.code == 2 and FakeStub.calls == []
    assert f"{named!r} is no file" in capsys.readouterr().err


@pytest.mark.parametrize("output", ["missing-folder/o.png", "folder", ""])
def test_the_cli_client_refuses_an_output_it_cannot_write_before_the_call(cli, output, capsys, tmp_path):
    """-o in a folder that does not exist was a FileNotFoundError traceback after the removal had run: its model
    work and a quota's request spent, a retained result's id never printed."""
    (tmp_path / "folder").mkdir()
    with pytest.raises(SystemExit) as exited:
        cli(["remove", "photo.png", "mask.png", "-o", output])
    assert exited.value.code == 2 and FakeStub.calls == []
    assert f"{output!r} " in capsys.readouterr().err


def test_the_cli_client_writes_the_image_to_standard_output_for_a_dash(cli, capsysbinary):
    """-o - wrote a file named "-" (the diff review); now the image goes to standard output, the line to stderr."""
    assert cli(["remove", "photo.png", "mask.png", "-o", "-"]) == 0
    captured = capsysbinary.readouterr()
    assert captured.out == b"x" and captured.err.startswith(b"-: seed -, score -,")
    assert not Path("-").exists()


def test_the_cli_client_says_which_removal_it_could_not_write_without_a_traceback(cli, capsys, monkeypatch):
    """A file that became unwritable after the check: exit 1, one line naming the removal (its seed, its result)."""
    from serve import grpc_client

    def refuse(self, data):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(grpc_client.Path, "write_bytes", refuse)
    assert cli(["remove", "photo.png", "mask.png", "-o", "o.png"]) == 1
    said = capsys.readouterr().err
    assert said.startswith("cannot write o.png: Permission denied (the removal: seed ") and "Traceback" not in said


def test_the_cli_client_sends_no_mask_without_one_so_the_photos_alpha_is_the_mask(cli):
    """The mask was a required argument: the client could not use the image's alpha, which the API offers."""
    assert cli(["remove", "photo.png", "-o", "o.png"]) == 0
    assert cli(["remove", "photo.png", "mask.png", "-o", "o.png"]) == 0
    (without, _), (with_mask, _) = FakeStub.calls
    assert without.mask == b"" and with_mask.mask == b"x"


def test_the_cli_client_sends_every_option_of_the_request_models(cli):
    """It offered --seed, --gate and --output-format only: dilate, quality, gate_threshold, max_attempts and retain
    (and a score's dilate and gate_threshold) could not be sent."""
    from serve.protocol import RemoveOptions, ScoreOptions

    remove = {"seed": "7", "output_format": "JPG", "quality": "90", "dilate": "8", "gate": "retry",
              "gate_threshold": "0.6", "max_attempts": "2", "retain": "false"}  # fmt: skip
    score = {"dilate": "4", "gate_threshold": "0.7"}
    assert set(remove) == set(RemoveOptions.model_fields) - {"timeout_s"}
    assert set(score) == set(ScoreOptions.model_fields) - {"timeout_s"}

    def flags(options: dict) -> list[str]:
        return [word for name, value in options.items() for word in (f"--{name.replace('_', '-')}", value)]

    assert cli(["remove", "photo.png", "mask.png", "-o", "o.jpg", *flags(remove)]) == 0
    assert cli(["score", "photo.png", "mask.png", "out.png", *flags(score)]) == 0
    (removal, _), (scored, _) = FakeStub.calls
    assert (removal.seed, removal.output_format, removal.quality) == (7, "jpeg", 90)
    assert (removal.dilate, removal.gate) == (8, "retry")
    assert removal.gate_threshold == pytest.approx(0.6) and removal.max_attempts == 2
    assert removal.HasField("retain") and removal.retain is False
    assert scored.dilate == 4 and scored.gate_threshold == pytest.approx(0.7)


@pytest.mark.parametrize(
    ("command", "flag", "value"),
    [("remove", "--quality", "0"), ("remove", "--dilate", "-1"), ("remove", "--max-attempts", "9"),
     ("remove", "--gate-threshold", "nan"), ("remove", "--retain", "maybe"), ("remove", "--gate", "sometimes"),
     ("remove", "--output-format", "gif"), ("score", "--dilate", "257"), ("score", "--gate-threshold", "11")],
)  # fmt: skip
def test_the_cli_client_refuses_an_option_the_service_would_refuse_before_any_call(cli, command, flag, value, capsys):
    """Each option is read as the service reads its form field: a bad one is a usage error, not a round trip."""
    files = ["photo.png", "mask.png", "-o", "o.png"] if command == "remove" else ["photo.png", "mask.png", "out.png"]
    with pytest.raises(SystemExit) as exited:
        cli([command, *files, flag, value])
    assert exited.value.code == 2 and FakeStub.calls == []
    assert f"argument {flag}: {value!r}: Input should be" in capsys.readouterr().err


def _self_signed() -> tuple[bytes, bytes]:
    """A key and certificate for 127.0.0.1 and localhost, PEM."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    names = x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1)).add_extension(names, critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    pkcs8 = serialization.PrivateFormat.PKCS8
    key_pem = key.private_bytes(serialization.Encoding.PEM, pkcs8, serialization.NoEncryption())
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


def test_the_cli_client_calls_a_tls_front_trusting_the_ca_it_is_given(tmp_path, capsys, monkeypatch):
    """kubernetes.md puts TLS in front of the service, and the client could only open plaintext channels: it could
    not call that front at all."""
    from concurrent import futures

    from serve import grpc_client
    from serve import rorem_pb2_grpc as pb_grpc

    key_pem, cert_pem = _self_signed()
    (tmp_path / "ca.pem").write_bytes(cert_pem)
    (tmp_path / "photo.png").write_bytes(b"x")
    seen = []

    class Servicer(pb_grpc.ObjectRemovalServicer):
        def Remove(self, request, context):
            seen.append(dict(context.invocation_metadata()).get("authorization"))
            return pb.RemoveReply(image=b"result", gate="nothing-to-remove")

    server = grpc.server(futures.ThreadPoolExecutor(1))
    pb_grpc.add_ObjectRemovalServicer_to_server(Servicer(), server)
    port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([(key_pem, cert_pem)]))
    server.start()
    monkeypatch.chdir(tmp_path)
    try:
        argv = ["--target", f"127.0.0.1:{port}", "--tls", "--ca-cert", "ca.pem", "--api-key", "rk_x", "--timeout", "10"]
        assert grpc_client.main([*argv, "remove", "photo.png", "-o", "out.png"]) == 0
        assert (tmp_path / "out.png").read_bytes() == b"result" and seen == ["Bearer rk_x"]
        plaintext = ["--target", f"127.0.0.1:{port}", "--timeout", "5", "remove", "photo.png", "-o", "again.png"]
        assert grpc_client.main(plaintext) == 1, "a plaintext call to a TLS port fails"
    finally:
        server.stop(None)


def test_the_cli_client_warns_before_it_sends_a_key_in_clear_text_off_this_machine(cli, capsys):
    assert cli(["--target", "10.0.0.7:9000", "--api-key", "rk_x", "remove", "photo.jpg", "-o", "out.png"]) == 0
    assert "the API key goes to 10.0.0.7:9000 in clear text" in capsys.readouterr().err
    assert cli(["--target", "[::1]:9000", "--api-key", "rk_x", "remove", "photo.jpg", "-o", "out.png"]) == 0
    assert cli(["--target", "10.0.0.7:9000", "remove", "photo.jpg", "-o", "out.png"]) == 0
    assert "clear text" not in capsys.readouterr().err, "loopback, or no key: nothing to warn of"


def test_the_cli_client_takes_a_ca_cert_only_for_tls(cli, capsys):
    with pytest.raises(SystemExit) as caught:
        cli(["--ca-cert", "mask.png", "remove", "photo.jpg", "-o", "out.png"])
    assert caught.value.code == 2 and "--ca-cert is for --tls" in capsys.readouterr().err
