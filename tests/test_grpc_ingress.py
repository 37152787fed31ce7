"""The gRPC Ingress's own answers, without Ray and through the proxy.

Request bytes that are not a valid message (corrupt wire format, a string field that is not UTF-8) are the
problem malformed-body over gRPC, as a body that does not parse is over REST: INVALID_ARGUMENT with the problem
document, `problem-type` and `request_id` trailing metadata, counted. Ray's proxy parses with the registered
deserializer (serve/grpc_servicer.py); the generated one raised inside grpcio (UNKNOWN, nothing else)."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import logging
import pickle
from types import SimpleNamespace
from unittest.mock import Mock

import grpc
import pytest
import yaml
from google.protobuf.message import DecodeError

from serve import rorem_pb2 as pb
from serve import rorem_pb2_grpc as pb_grpc
from serve.grpc_api import GrpcMethods
from serve.grpc_client import problem_of
from serve.grpc_servicer import (
    SERVICE,
    SERVICER_FUNCTION,
    MalformedMessage,
    add_servicer,
    method_handlers,
    status_code,
)
from serve.problems import Problem
from tests.helpers import REPO, RecordedMetric, logged_by_ray_serve, record_proxy_metrics
from tests.helpers import FakeGrpcContext as Context

GARBAGE = b"\xff\xff\xff\xff"
BAD_UTF8_GATE = bytes([0x3A, 2, 0xC3, 0x28])  # field 7 (gate), 2 bytes that are not UTF-8
BAD_UTF8_OUTPUT_FORMAT = bytes([0x22, 1, 0xFF])  # field 4 (output_format)
TRUNCATED_BYTES_FIELD = bytes([0x0A, 10, 1])  # field 1 announces 10 bytes, 1 follows
MALFORMED = {
    "Remove": [GARBAGE, BAD_UTF8_GATE, BAD_UTF8_OUTPUT_FORMAT, TRUNCATED_BYTES_FIELD],
    "Score": [GARBAGE, TRUNCATED_BYTES_FIELD],  # ScoreRequest has no string field
}
MALFORMED_BODY = "https://github.com/rorem-serve/problems/malformed-body"


class Server:
    """Records what a servicer function registers, as Ray's gRPCGenericServer receives it."""

    def __init__(self):
        self.generic, self.registered = [], {}

    def add_generic_rpc_handlers(self, handlers):
        self.generic.extend(handlers)

    def add_registered_method_handlers(self, service, handlers):
        self.registered[service] = handlers


def _parser(method: str):
    return method_handlers(Mock())[method].request_deserializer


@pytest.mark.parametrize("method, raw", [(m, raw) for m, cases in MALFORMED.items() for raw in cases])
def test_bytes_that_do_not_parse_become_a_picklable_marker(method, raw):
    message_class = getattr(pb, f"{method}Request")
    with pytest.raises(DecodeError, match="Error parsing message"):
        message_class.FromString(raw)  # what the generated deserializer does
    marker = _parser(method)(raw)
    assert isinstance(marker, MalformedMessage) and marker.message_type == f"rorem.v1.{method}Request"
    assert "Error parsing message" in marker.error
    assert pickle.loads(pickle.dumps(marker)) == marker  # Ray's proxy pickles it to the replica


def test_valid_messages_parse_as_before():
    remove = pb.RemoveRequest(image=b"i", mask=b"m", seed=3, output_format="png", gate="retry", gate_threshold=0.5)
    assert _parser("Remove")(remove.SerializeToString()) == remove
    score = pb.ScoreRequest(source=b"s", mask=b"m", edited=b"e", dilate=2)
    assert _parser("Score")(score.SerializeToString()) == score
    assert _parser("Remove")(b"") == pb.RemoveRequest()


def test_the_servicer_registers_what_the_generated_one_does():
    ours, generated = Server(), Server()
    servicer = Mock()
    add_servicer(servicer, ours)
    pb_grpc.add_ObjectRemovalServicer_to_server(servicer, generated)
    assert (
        [h.service_name() for h in ours.generic] == [h.service_name() for h in generated.generic] == [SERVICE.full_name]
    )
    assert ours.generic[0]._method_handlers.keys() == generated.generic[0]._method_handlers.keys()
    assert ours.registered.keys() == generated.registered.keys()
    for name, handler in ours.registered[SERVICE.full_name].items():
        original = generated.registered[SERVICE.full_name][name]
        assert (
            handler.unary_unary is original.unary_unary and handler.response_serializer == original.response_serializer
        )
        assert not handler.request_streaming and not handler.response_streaming
    assert list(ours.registered[SERVICE.full_name]) == [m.name for m in SERVICE.methods] == ["Remove", "Score"]


def test_rays_proxy_keeps_our_deserializer():
    """Ray's gRPC server replaces each handler's call and response serializer, not the request deserializer."""
    from ray.serve._private.grpc_util import gRPCGenericServer

    async def build():
        server = gRPCGenericServer(lambda **kwargs: Mock())
        add_servicer(Mock(), server)
        return server.generic_rpc_handlers[0][0]._method_handlers

    handlers = asyncio.run(build())
    assert set(handlers) == {f"/{SERVICE.full_name}/{m.name}" for m in SERVICE.methods}
    for handler in handlers.values():
        assert isinstance(handler.request_deserializer(GARBAGE), MalformedMessage)


def test_with_keys_on_rays_grpc_proxy_refuses_a_call_without_a_valid_key_before_routing_it(tmp_path, monkeypatch):
    """A keyless call (up to max_upload_bytes) was parsed, pickled and queued to an Ingress replica, which only then
    refused it, where the HTTP proxy refuses a keyless body before reading it. Checked through a real server of
    Ray's class, by the generated stub (grpcio's registered-method path) and by a raw call (the generic path)."""
    import json as json_module

    from ray.serve._private.grpc_util import gRPCGenericServer
    from ray.serve.generated import serve_pb2
    from ray.serve.generated.serve_pb2_grpc import RayServeAPIServiceStub, add_RayServeAPIServiceServicer_to_server

    from serve.auth import new_key_entry
    from serve.grpc_gate import APPS_ENV

    key, entry = new_key_entry("app", ["score"])
    (tmp_path / "keys.yaml").write_text(yaml.safe_dump({"keys": [entry]}))
    keyed = {"keys_file": str(tmp_path / "keys.yaml"), "keys_reload_s": 10.0}
    monkeypatch.setenv(APPS_ENV, json_module.dumps({"keyed": {"keys": keyed}, "open": {"keys": None}}))
    routed = []

    def factory(service_method, streaming_type):
        async def unary_unary(request, context):
            routed.append((service_method, dict(context.invocation_metadata()).get("application")))
            return pb.RemoveReply(gate="off").SerializeToString()

        return unary_unary

    async def main():
        server = gRPCGenericServer(factory)
        port = server.add_insecure_port("127.0.0.1:0")
        add_RayServeAPIServiceServicer_to_server(Mock(), server)
        add_servicer(Mock(), server)
        await server.start()
        answers = []
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.ObjectRemovalStub(channel)
            raw = channel.unary_unary(f"/{SERVICE.full_name}/Remove")
            calls = [
                lambda: stub.Remove(pb.RemoveRequest(), metadata=[("application", "keyed"), ("request_id", "r-1")]),
                lambda: raw(b"", metadata=[("application", "keyed"), ("x-api-key", "rk_wrong")]),
                lambda: stub.Remove(pb.RemoveRequest(), metadata=[("application", "keyed"), ("x-api-key", key)]),
                lambda: stub.Remove(pb.RemoveRequest(), metadata=[("application", "open")]),
                lambda: RayServeAPIServiceStub(channel).Healthz(serve_pb2.HealthzRequest()),
                # Ray routes by the last entry: the first (no keys) decided the key check and the call reached "keyed"
                lambda: stub.Remove(pb.RemoveRequest(), metadata=[("application", "open"), ("application", "keyed")]),
                lambda: stub.Remove(pb.RemoveRequest()),  # two applications, none named
                lambda: stub.Remove(pb.RemoveRequest(), metadata=[("application", "nope"), ("x-api-key", key)]),
            ]
            for call in calls:
                try:
                    await call()
                    answers.append("OK")
                except grpc.aio.AioRpcError as error:
                    answers.append((error.code(), json_module.loads(error.details()), dict(error.trailing_metadata())))
        await server.stop(None)
        return answers

    recorded = record_proxy_metrics(monkeypatch)
    with logged_by_ray_serve() as records:
        answers = asyncio.run(main())
    for code, problem, trailing in answers[:2]:
        assert code == grpc.StatusCode.UNAUTHENTICATED and problem["type"].endswith("/unauthorized")
        assert trailing["problem-type"] == problem["type"]
    assert answers[0][1]["instance"] == "urn:request:r-1" and answers[0][2]["request_id"] == "r-1"
    assert len(answers[1][2]["request_id"]) == 32, "a fresh id where the call sent none, as Ray's proxy gives"
    assert answers[2:5] == ["OK", "OK", "OK"], "a valid key of any scope passes here (the Ingress checks the scope)"
    assert "OK" not in answers[5:], "a call naming two applications, or none of them, was routed"
    named = [(code, problem["type"].rsplit("/", 1)[1], trailing["problem-type"]) for code, problem, trailing in
             answers[5:]]
    assert [(code, slug) for code, slug, _ in named] == [
        (grpc.StatusCode.INVALID_ARGUMENT, "malformed-request"), (grpc.StatusCode.NOT_FOUND, "not-found"),
        (grpc.StatusCode.NOT_FOUND, "not-found"),
    ] and all(trailing.endswith(f"/{slug}") for _, slug, trailing in named)
    assert [who for _, who in routed if who] == ["keyed", "open"], "the refused calls never reached Ray's router"
    assert recorded.refusals == ["unauthorized", "unauthorized", "malformed-request", "not-found", "not-found"]
    assert set(recorded.protocols) == {"grpc"}, "counted apart from the HTTP proxy's refusals"
    lines = [record.getMessage() for record in records if "proxy refused" in record.getMessage()]
    assert len(lines) == 5 and lines[0] == (
        f"gRPC proxy refused '/{SERVICE.full_name}/Remove': 401 unauthorized (send an API key: Authorization: Bearer "
        "<key> or X-API-Key) request_id=r-1"
    ), lines


@contextlib.asynccontextmanager
async def _rays_grpc_server(factory):
    """A server of Ray's gRPC proxy's class on a free loopback port, with this service registered as Ray's proxy
    registers it (add_servicer) and `factory` standing in for the route to the Ingress: yields a channel to it."""
    from ray.serve._private.grpc_util import gRPCGenericServer

    server = gRPCGenericServer(factory)
    port = server.add_insecure_port("127.0.0.1:0")
    add_servicer(Mock(), server)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield channel
    finally:
        await server.stop(None)


def _count_parsed_messages(monkeypatch) -> list[int]:
    """The sizes of the request messages the proxy's parser reads from here on (serve.grpc_servicer)."""
    from serve import grpc_servicer

    parsed, lenient_parser = [], grpc_servicer.lenient_parser

    def counting_parser(message_class, max_bytes=None):
        parse = lenient_parser(message_class, max_bytes)
        return lambda data: parsed.append(len(data)) or parse(data)

    monkeypatch.setattr(grpc_servicer, "lenient_parser", counting_parser)
    return parsed


def _image_size_factory(service_method, streaming_type):
    """Ray's handler factory standing in for the route to the Ingress: replies with the image's size as the seed."""

    async def unary_unary(request, context):
        return pb.RemoveReply(gate="off", seed=len(request.image)).SerializeToString()

    return unary_unary


def test_rays_grpc_proxy_reads_no_message_of_a_call_it_refuses(tmp_path, monkeypatch):
    """grpcio reads a unary method's whole message before the handler runs: a keyless call of up to the proxy's
    message limit (~200 MB) was received and parsed before the gate refused it, and four at once held ~1 GB. The
    gated methods are client-streaming at the proxy: the message is read once the key check has passed. Clients
    are unchanged (the generated stub and a raw unary call); a stream with no message is malformed."""

    from serve.auth import new_key_entry
    from serve.grpc_gate import APPS_ENV

    key, entry = new_key_entry("app", ["remove"])
    (tmp_path / "keys.yaml").write_text(yaml.safe_dump({"keys": [entry]}))
    monkeypatch.setenv(APPS_ENV, json.dumps({"keyed": {"keys": {"keys_file": str(tmp_path / "keys.yaml")}}}))
    parsed = _count_parsed_messages(monkeypatch)

    big = pb.RemoveRequest(image=bytes(20 << 20), mask=b"m")

    async def main():
        answers = []
        async with _rays_grpc_server(_image_size_factory) as channel:
            stub = pb_grpc.ObjectRemovalStub(channel)
            raw = channel.unary_unary(f"/{SERVICE.full_name}/Remove")
            empty_stream = channel.stream_unary(f"/{SERVICE.full_name}/Remove")
            calls = [
                lambda: stub.Remove(big),
                lambda: raw(big.SerializeToString(), metadata=[("x-api-key", "rk_wrong")]),
                lambda: empty_stream(iter(()), metadata=[("x-api-key", key)]),
                lambda: stub.Remove(big, metadata=[("x-api-key", key)]),
            ]
            for call in calls:
                try:
                    answers.append(("OK", (await asyncio.wait_for(call(), 30)).seed))
                except grpc.aio.AioRpcError as error:
                    answers.append((error.code(), dict(error.trailing_metadata())["problem-type"].rsplit("/")[-1]))
        return answers

    assert asyncio.run(main()) == [
        (grpc.StatusCode.UNAUTHENTICATED, "unauthorized"), (grpc.StatusCode.UNAUTHENTICATED, "unauthorized"),
        (grpc.StatusCode.INVALID_ARGUMENT, "malformed-request"), ("OK", 20 << 20),
    ]  # fmt: skip
    assert parsed == [big.ByteSize()], "only the call that passed had its message read"


def test_rays_grpc_proxy_refuses_a_compressed_message_without_inflating_it(monkeypatch):
    """~190 KB of gzip was inflated to a 190 MB message by grpcio before any handler ran (24 such calls at once took
    the proxy to 1.9 GB). The proxy's callback enables no compression on the gRPC server Ray builds after it."""
    from ray.serve._private import grpc_util

    from serve import proxy_connections, proxy_middleware

    monkeypatch.setattr(grpc_util, "DEFAULT_GRPC_SERVER_OPTIONS", list(grpc_util.DEFAULT_GRPC_SERVER_OPTIONS))
    monkeypatch.setattr(proxy_connections, "install", lambda: None)
    parsed = _count_parsed_messages(monkeypatch)

    async def main():
        proxy_middleware.middlewares()  # what Ray's proxy calls first
        answers = []
        async with _rays_grpc_server(_image_size_factory) as channel:
            stub = pb_grpc.ObjectRemovalStub(channel)
            for compression in (grpc.Compression.Gzip, None):
                try:
                    reply = await stub.Remove(pb.RemoveRequest(image=bytes(8 << 20)), compression=compression,
                                              timeout=30)  # fmt: skip
                    answers.append(("OK", reply.seed))
                except grpc.aio.AioRpcError as error:
                    answers.append((error.code(), error.details()))
        return answers

    gzip, plain = asyncio.run(main())
    assert gzip == (grpc.StatusCode.UNIMPLEMENTED, "Compression algorithm 'gzip' is disabled.")
    assert plain == ("OK", 8 << 20) and parsed == [(8 << 20) + 5], "the compressed message was never inflated"


def test_every_serve_config_names_this_servicer_function():
    from ray.serve.config import gRPCOptions

    module, _, name = SERVICER_FUNCTION.rpartition(".")
    assert getattr(importlib.import_module(module), name) is add_servicer
    assert gRPCOptions(grpc_servicer_functions=[SERVICER_FUNCTION]).grpc_servicer_func_callable == [add_servicer]
    local = yaml.safe_load((REPO / "serve" / "configs" / "local.yaml").read_text())
    assert local["grpc_options"]["grpc_servicer_functions"] == [SERVICER_FUNCTION]


# --- the Ingress's side ---------------------------------------------------------------------------------------------


class Access:
    async def check_grpc(self, scope, metadata, peer):
        return None


class Quotas:
    async def acquire(self, principal):
        return None

    def release(self, decision):
        pass


class Admission:
    def slot(self):
        raise AssertionError("a message that did not parse takes no admission slot")


class Metrics:
    def __init__(self):
        self.answers = []

    def answered(self, route, protocol, status, seconds, http_status, problem=None, over_quota=False):
        self.answers.append((route, protocol, status))


def _ingress() -> GrpcMethods:
    ingress = GrpcMethods()
    ingress.access, ingress.quotas, ingress.metrics = Access(), Quotas(), Metrics()
    ingress.admissions = {"/remove": Admission(), "/score": Admission()}
    return ingress


@pytest.mark.parametrize("method, raw, route", [("Remove", BAD_UTF8_GATE, "/remove"), ("Score", GARBAGE, "/score")])
def test_the_ingress_answers_the_marker_as_malformed_body(method, raw, route):
    ingress, context = _ingress(), Context()
    marker = pickle.loads(pickle.dumps(_parser(method)(raw)))
    reply = asyncio.run(getattr(ingress, method)(marker, context))
    assert reply == getattr(pb, f"{method}Reply")()
    assert context.code == grpc.StatusCode.INVALID_ARGUMENT
    problem = json.loads(context.details)
    assert problem["type"] == MALFORMED_BODY and problem["status"] == 400 and problem["instance"] == "urn:request:rid-1"
    assert "cannot parse the request message" in problem["detail"] and f"rorem.v1.{method}Request" in problem["detail"]
    assert ("problem-type", MALFORMED_BODY) in context.trailing
    assert ingress.metrics.answers == [(route, "grpc", "INVALID_ARGUMENT")]


def test_a_refused_call_leaves_a_log_line_with_its_code_and_problem(caplog):
    """Ray's access lines said `CALL rorem OK` for an INVALID_ARGUMENT: no line told a refused call from an answer."""
    ingress, context = _ingress(), Context()
    with caplog.at_level(logging.INFO, logger="ray.serve"):
        asyncio.run(ingress.Remove(_parser("Remove")(GARBAGE), context))
    lines = [record.getMessage() for record in caplog.records]
    assert any(line.startswith("gRPC /remove answered INVALID_ARGUMENT malformed-body") for line in lines), lines


def test_unknown_fields_are_dropped_so_their_bytes_are_not_carried_past_the_size_check():
    """The app's size check adds up the files: 100 MiB in a field the proto does not define passed it, and the
    whole message was pickled to the replica and held there for the call."""
    from google.protobuf.internal.encoder import _VarintBytes

    padding = b"\xa2\x06" + _VarintBytes(1 << 20) + bytes(1 << 20)  # field 100, length-delimited, 1 MiB
    message = _parser("Remove")(pb.RemoveRequest(image=b"photo").SerializeToString() + padding)
    assert message == pb.RemoveRequest(image=b"photo") and message.ByteSize() < 100
    assert len(pickle.dumps(message)) < 1000


@pytest.mark.parametrize("method, route", [("Remove", "/remove"), ("Score", "/score")])
def test_a_message_over_the_largest_request_reaches_the_ingress_without_its_bytes_and_is_payload_too_large(
    monkeypatch, method, route
):
    """Up to Ray's message limit (sized for replies: 201 MB) a request was parsed and pickled to a replica whole,
    before the Ingress's key check; now only its size travels, and the key is still checked first."""
    from serve.grpc_servicer import MAX_REQUEST_ENV, OversizedMessage

    monkeypatch.setenv(MAX_REQUEST_ENV, "1000")
    server = Server()
    add_servicer(Mock(), server)
    parse = server.registered[SERVICE.full_name][method].request_deserializer
    assert isinstance(parse(bytes(1000)), MalformedMessage), "at the limit the message is parsed"
    marker = parse(b"\x0a\x80\x08" + bytes(1024))
    assert marker == OversizedMessage(1027, 1000) and len(pickle.dumps(marker)) < 200
    ingress, context = _ingress(), Context()
    asyncio.run(getattr(ingress, method)(marker, context))
    problem = json.loads(context.details)
    assert context.code == grpc.StatusCode.RESOURCE_EXHAUSTED and problem["type"].endswith("/payload-too-large")
    assert problem["detail"] == "the message is 1027 bytes; the limit is 1000"
    assert ingress.metrics.answers == [(route, "grpc", "RESOURCE_EXHAUSTED")]

    class Refused(Access):
        async def check_grpc(self, scope, metadata, peer):
            raise Problem("unauthorized", "no key")

    ingress.access, context = Refused(), Context()
    asyncio.run(getattr(ingress, method)(marker, context))
    assert context.code == grpc.StatusCode.UNAUTHENTICATED, "the key is checked before the size"


@pytest.mark.parametrize("cancellation", ["raised", "caught as Ray's proxy does"])
@pytest.mark.timing
def test_the_local_stop_waits_for_grpc_calls_refuses_new_ones_and_answers_the_late_ones_stopping(
    tmp_path, monkeypatch, cancellation
):
    """The stop's drain counted HTTP requests only: on a service with gRPC traffic alone it ended at once, and Ray's
    shutdown cut the calls in flight with a bare UNAVAILABLE; new calls were parsed and routed to an Ingress first.
    Through a real server of Ray's class: new calls are refused at the proxy, calls in flight are counted in the
    drain's `in_flight` and finish, and one still running after the grace gets `stopping` with its problem."""

    from serve.proxy_middleware import DRAIN_FLAG_ENV, DRAIN_PATH, Drain

    flag = tmp_path / "draining"
    monkeypatch.setenv(DRAIN_FLAG_ENV, str(flag))
    recorded = record_proxy_metrics(monkeypatch)
    routed = []

    async def main():
        release_quick = asyncio.Event()

        def factory(service_method, streaming_type):
            async def unary_unary(request, context):
                who = dict(context.invocation_metadata())["request_id"]
                routed.append(who)
                if who == "quick":
                    await release_quick.wait()
                    return pb.RemoveReply(gate="off").SerializeToString()
                try:
                    await asyncio.sleep(3600)
                except asyncio.CancelledError:
                    if cancellation == "raised":
                        raise
                    context.set_code(grpc.StatusCode.CANCELLED)  # Ray's proxy: "Client ... disconnected."
                    return b""

            return unary_unary

        async def drained(drain) -> int:
            sent = []
            scope = {"type": "http", "method": "GET", "path": DRAIN_PATH, "headers": []}
            await drain(scope, None, lambda message: asyncio.sleep(0, sent.append(message)))
            return json.loads(sent[-1]["body"])["in_flight"]

        drain = Drain(None, flag=str(flag), grace_s=0.3)
        async with _rays_grpc_server(factory) as channel:
            stub = pb_grpc.ObjectRemovalStub(channel)

            async def call(who):
                try:
                    metadata = [("request_id", who)]
                    return "OK", await stub.Remove(pb.RemoveRequest(), metadata=metadata, timeout=5)
                except grpc.aio.AioRpcError as error:
                    return error.code(), json.loads(error.details() or "null")

            in_flight = [asyncio.create_task(call(who)) for who in ("quick", "slow")]
            while len(routed) < 2:
                await asyncio.sleep(0.01)
            flag.touch()
            counted = await drained(drain)
            new = await call("new")
            release_quick.set()
            quick, slow = await asyncio.gather(*in_flight)
            left = await drained(drain)
        return counted, new, quick, slow, left

    counted, new, quick, slow, left = asyncio.run(main())
    assert counted == 2, "the stop waits for the gRPC calls in flight"
    assert quick[0] == "OK", "a call in flight when the stop began finishes"
    assert new[0] == grpc.StatusCode.UNAVAILABLE and new[1]["type"].endswith("/stopping")
    assert "was not run" in new[1]["detail"] and new[1]["instance"] == "urn:request:new"
    assert slow[0] == grpc.StatusCode.UNAVAILABLE and slow[1]["type"].endswith("/stopping")
    assert "0.3 s into the stop" in slow[1]["detail"]
    assert routed == ["quick", "slow"] or routed == ["slow", "quick"], "the new call never reached Ray's router"
    assert left == 0 and recorded.refusals == ["stopping", "stopping"]


def test_a_call_whose_key_check_waits_is_already_in_flight_for_the_stop(monkeypatch, tmp_path):
    """A key check that waits (a keys-file reload runs in a thread) was counted nowhere: a stop beginning then
    saw no call in flight and stopped Ray under it (a bare UNAVAILABLE)."""
    from serve.grpc_gate import ProxyGate
    from serve.proxy_middleware import DRAIN_FLAG_ENV, GRPC_CALLS

    monkeypatch.setenv(DRAIN_FLAG_ENV, str(tmp_path / "draining"))
    checking, go_on = asyncio.Event(), asyncio.Event()

    class SlowKeys:
        async def check_grpc(self, scope, metadata, peer):
            checking.set()
            await go_on.wait()

    async def handler(request, context):
        return b"answered"

    gate = ProxyGate({})
    gate.names, gate.policies = ["keyed"], {"keyed": SlowKeys()}
    context = SimpleNamespace(invocation_metadata=lambda: (), peer=lambda: "ipv4:127.0.0.1:1")

    async def one_message():
        yield b""

    async def main():
        call = asyncio.create_task(gate.wrap(handler, f"/{SERVICE.full_name}/Remove")(one_message(), context))
        await checking.wait()
        counted = len(GRPC_CALLS.running)
        go_on.set()
        return counted, await call

    assert asyncio.run(main()) == (1, b"answered")
    assert not GRPC_CALLS.running


class _GateContext:
    """A gRPC call's context as the gate sees it: its peer, and the status a refusal sets."""

    def __init__(self, peer: str = "ipv4:127.0.0.1:1"):
        self.peer = lambda: peer
        self.invocation_metadata = lambda: ()
        self.code = self.details = None

    def set_code(self, code):
        self.code = code

    def set_details(self, details):
        self.details = json.loads(details)

    def set_trailing_metadata(self, metadata):
        pass


@pytest.mark.parametrize("call", ["from another machine, keys off", "its message never sent", "a message too large"])
def test_the_gate_holds_each_call_to_its_application_before_its_message_goes_on(call):
    """A gRPC trial: with keys off on loopback, another machine's call was refused at the Ingress only, after its 30
    MB message was read and sent there; a call that never sent its message was held for good; an application's
    own message limit (8 MiB where another takes 30) was checked at its Ingress only, after the message went there."""
    from serve.grpc_gate import ProxyGate

    limits = {"keys": None, "max_request_bytes": 1000, "body_timeout_s": 0.2}
    gate = ProxyGate({"rorem": limits}, loopback_only=True)
    read, handled = [], []

    async def handler(request, context):
        handled.append(request)
        return b"answered"

    async def messages():
        if call == "its message never sent":
            await asyncio.sleep(30)
        read.append(1)
        yield pb.RemoveRequest(image=bytes(2000 if call == "a message too large" else 10))

    context = _GateContext("ipv4:192.0.2.7:5" if call == "from another machine, keys off" else "ipv4:127.0.0.1:5")
    answer = asyncio.run(asyncio.wait_for(gate.wrap(handler, f"/{SERVICE.full_name}/Remove")(messages(), context), 5))
    expected = {
        "from another machine, keys off": (grpc.StatusCode.PERMISSION_DENIED, "host-not-allowed", []),
        "its message never sent": (grpc.StatusCode.INVALID_ARGUMENT, "body-timeout", []),
        "a message too large": (grpc.StatusCode.RESOURCE_EXHAUSTED, "payload-too-large", [1]),
    }[call]
    assert (context.code, context.details["type"].rsplit("/", 1)[1], read) == expected and not handled
    assert answer == b""
    context = _GateContext()
    small = asyncio.run(gate.wrap(handler, f"/{SERVICE.full_name}/Remove")(_one(pb.RemoveRequest(image=b"x")), context))
    assert small == b"answered" and context.code is None


async def _one(message):
    yield message


# --- through Ray Serve's gRPC proxy ---------------------------------------------------------------------------------


@pytest.mark.parametrize("method, raw", [(m, raw) for m, cases in MALFORMED.items() for raw in cases])
def test_malformed_messages_are_invalid_argument_through_the_proxy(service, method, raw):
    with service.channel() as channel:
        rpc = channel.unary_unary(f"/{SERVICE.full_name}/{method}", request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as caught:
            rpc(raw, timeout=60)
    error = caught.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    trailing = dict(error.trailing_metadata() or ())
    assert trailing.get("problem-type") == MALFORMED_BODY and trailing.get("request_id")
    problem = problem_of(error)
    assert problem["type"] == MALFORMED_BODY and problem["status"] == 400
    assert problem["instance"] == f"urn:request:{trailing['request_id']}"


def test_a_compressed_message_is_refused_by_the_proxy_and_a_plain_one_still_answers(service):
    """The proxy's callback runs before Ray builds its gRPC server: compression is off there (serve.grpc_gate)."""
    with service.channel() as channel:
        rpc = channel.unary_unary(f"/{SERVICE.full_name}/Remove", request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as caught:
            rpc(bytes(MALFORMED["Remove"][0]), timeout=60, compression=grpc.Compression.Gzip)
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED, caught.value.details()
        with pytest.raises(grpc.RpcError) as caught:
            rpc(bytes(MALFORMED["Remove"][0]), timeout=60)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, "the same message, uncompressed, is parsed"


def test_a_call_the_client_cancels_is_counted_and_gives_back_its_slot_and_lease():
    """A cancelled call (the client hung up, or its deadline passed) left the request counter without a trace,
    where REST counted the same hang-up as a 500 (now 499)."""
    from serve.admission import Admission as RealAdmission

    ingress = _ingress()
    ingress.admissions["/remove"] = RealAdmission(48, 1)
    released = []
    ingress.quotas.release = released.append

    async def model_work(message, request_id, principal, place):
        await asyncio.sleep(60)

    async def main():
        call = asyncio.ensure_future(ingress._grpc("/remove", Context(), pb.RemoveReply, model_work, None))
        await asyncio.sleep(0.1)
        assert ingress.admissions["/remove"].in_flight == 1
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        return ingress.admissions["/remove"].in_flight

    assert asyncio.run(main()) == 0
    assert ingress.metrics.answers == [("/remove", "grpc", "CANCELLED")] and released == [None]


def test_scores_and_removals_are_admitted_each_by_their_own_rate_and_count():
    """The Scorer and the Remover are different deployments: scores counted into the removals' rate and count made
    the Remover look as fast as the Scorer (removals admitted far past max_queue_wait_s)."""
    from serve.admission import Admission as RealAdmission

    ingress = _ingress()
    ingress.admissions = {"/remove": RealAdmission(48, 1), "/score": RealAdmission(48, 1)}

    async def model_work(message, request_id, principal, place):
        await asyncio.sleep(60)

    async def main():
        call = asyncio.ensure_future(ingress._grpc("/score", Context(), pb.ScoreReply, model_work, None))
        await asyncio.sleep(0.1)
        in_flight = {route: admission.in_flight for route, admission in ingress.admissions.items()}
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        return in_flight

    assert asyncio.run(main()) == {"/remove": 0, "/score": 1}


def _ingress_with_4_s_of_work_ahead(route: str, settings: dict) -> tuple[GrpcMethods, list]:
    """An ingress whose `route` has served 1 result a second and holds 4 requests in progress; the held slots are
    returned (a slot dropped unreferenced closes)."""
    from serve.admission import Admission as RealAdmission
    from serve.config import AppSettings

    now = [0.0]
    ingress = _ingress()
    ingress.settings = AppSettings.model_validate(settings)
    ingress.service = Mock()
    admission = ingress.admissions[route] = RealAdmission(48, 1, max_queue_wait_s=5.0, clock=lambda: now[0])
    for _ in range(20):
        with admission.slot() as place:
            place.planned(1, 60.0)
            now[0] += 1.0
    ahead = [admission.slot() for _ in range(4)]
    for slot in ahead:
        slot.__enter__()
    return ingress, ahead


def test_a_removal_without_timeout_s_is_refused_when_request_timeout_s_is_shorter_than_the_wait_ahead():
    """The request runs under request_timeout_s when it gives no timeout_s (or a longer one): the check before its
    decode skipped a missing timeout_s and admitted it with more work ahead than it could wait for."""
    ingress, _ahead = _ingress_with_4_s_of_work_ahead("/remove", {"request_timeout_s": 3})
    for timeout_s in (None, 60):
        context = Context()
        message = pb.RemoveRequest(image=b"photo", timeout_s=timeout_s)
        asyncio.run(ingress._grpc("/remove", context, pb.RemoveReply, ingress._grpc_remove, message))
        problem = json.loads(context.details)
        assert problem["type"].endswith("/too-many-requests") and "request_timeout_s" in problem["detail"]
    ingress.service.remove.assert_not_called()


def test_a_score_is_refused_before_its_decode_when_its_timeout_s_is_shorter_than_the_wait_ahead():
    """A score request runs under its own timeout_s too, and is checked against the wait ahead as a removal is."""
    ingress, _ahead = _ingress_with_4_s_of_work_ahead("/score", {})
    context = Context()
    message = pb.ScoreRequest(source=b"photo", mask=b"mask", edited=b"photo", timeout_s=2)
    asyncio.run(ingress._grpc("/score", context, pb.ScoreReply, ingress._grpc_score, message))
    problem = json.loads(context.details)
    assert problem["type"].endswith("/too-many-requests") and "(2 s)" in problem["detail"], problem
    ingress.service.score.assert_not_called()


@pytest.mark.parametrize("given", ["has spaces", "x" * 200, "naïve"])
def test_a_grpc_request_id_that_is_not_a_valid_one_is_replaced_by_the_same_id_each_time_it_is_read(monkeypatch, given):
    """A gRPC client's request_id metadata reaches Serve's context unchecked; an invalid one got a fresh id at
    each read, so the reply named one id and the retained result another."""
    from ray.serve import context

    from serve.request_ids import serve_request_id, valid_request_id

    monkeypatch.setattr(context, "_get_serve_request_context", lambda: Mock(request_id=given))
    first, second = serve_request_id(), serve_request_id()
    assert first == second != given and valid_request_id(first) == first
    assert serve_request_id() != valid_request_id("another invalid id")


def test_a_removal_sends_its_stage_timings_as_rests_server_timing_does():
    """gRPC had no Server-Timing (the README says it has REST's fields): the stage timings now come back as
    `server-timing` trailing metadata, in the header's format, beside the quota's fields."""
    from serve.admission import Admission as RealAdmission
    from serve.config import AppSettings
    from engines.pipeline import Timings
    from serve.service import RemovalResult

    timings = Timings()
    timings.add("decode", 0.0123)
    timings.add("unet", 0.2)
    reply = RemovalResult(b"png", "png", 3, [512], 1, 0.9, 1, "passed", timings)

    async def remove(upload, owner, admitted):
        return reply

    class Metered(Quotas):
        async def acquire(self, principal):
            return SimpleNamespace(check=lambda: None, metadata=lambda: [("ratelimit", '"minute";r=59;t=60')])

    ingress = _ingress()
    ingress.settings, ingress.quotas = AppSettings(), Metered()
    ingress.service = SimpleNamespace(remove=remove)
    ingress.metrics.stages = SimpleNamespace(observe=lambda stages: None)
    ingress.admissions["/remove"] = RealAdmission(48, 1)
    context = Context()
    message = pb.RemoveRequest(image=b"photo")
    answer = asyncio.run(ingress._grpc("/remove", context, pb.RemoveReply, ingress._grpc_remove, message))
    assert answer.score == pytest.approx(0.9) and ingress.metrics.answers == [("/remove", "grpc", "OK")]
    trailing = dict(context.trailing)
    assert trailing["ratelimit"] == '"minute";r=59;t=60', "the quota's fields stay"
    assert trailing["server-timing"].startswith("decode;dur=12.3, unet;dur=200.0, total;dur=")
    sent, rest = (text.rpartition(", total;dur=")[0] for text in (trailing["server-timing"], timings.server_timing()))
    assert sent == rest, "REST's header, by the same function"


@pytest.mark.parametrize(
    ("problem", "extra", "outcome"),
    [
        ("overloaded", {}, "refused"),
        ("replica-failed", {}, "server_error"),
        ("too-many-requests", {}, "refused"),
        ("too-many-requests", {"quota": "minute"}, "over_quota"),
    ],
)
def test_a_grpc_answers_outcome_and_problem_label_come_from_its_problem_kind(problem, extra, outcome):
    """UNAVAILABLE is one code for a shed call and a failed replica: the latency outcome and the request counter's
    `problem` tell them apart (a failing model read as a busy one). RESOURCE_EXHAUSTED too-many-requests is a busy
    replica's or a key's quota: only the first is the service shedding load."""
    from serve.metrics import IngressMetrics

    ingress = _ingress()
    ingress.metrics = IngressMetrics()
    ingress.metrics.requests, ingress.metrics.latency = RecordedMetric(), RecordedMetric()

    async def model_work(message, request_id, principal, place):
        raise Problem(problem, "for the test", **extra)

    ingress.admissions["/remove"] = SimpleNamespace(slot=contextlib.nullcontext)
    asyncio.run(ingress._grpc("/remove", Context(), pb.RemoveReply, model_work, None))
    assert [tags["outcome"] for tags in ingress.metrics.latency.tags] == [outcome]
    code = status_code(Problem(problem, "")).name
    assert [(tags["status"], tags["problem"]) for tags in ingress.metrics.requests.tags] == [(code, problem)]


def test_a_cancelled_calls_unretrieved_task_leaves_no_traceback_in_the_proxys_log(monkeypatch):
    """Ray's gRPC proxy leaves the response task of each call its client cancels unretrieved: asyncio logged a
    "Task exception was never retrieved" traceback per cancelled call in the proxy's log (the gRPC trial). The
    proxy's callback drops those, and only those."""
    import gc

    from ray.serve.exceptions import RequestCancelledError

    from serve.proxy_middleware import middlewares

    asyncio_logger = logging.getLogger("asyncio")
    monkeypatch.setattr(asyncio_logger, "filters", list(asyncio_logger.filters))
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    asyncio_logger.addHandler(handler)
    try:
        middlewares()

        async def cancelled():
            raise RequestCancelledError("r-1")

        async def failed():
            raise ValueError("a real error")

        async def main():
            asyncio.ensure_future(cancelled())
            asyncio.ensure_future(failed())
            await asyncio.sleep(0.05)

        asyncio.run(main())
        gc.collect()
    finally:
        asyncio_logger.removeHandler(handler)
    assert [type(record.exc_info[1]).__name__ for record in records] == ["ValueError"]
