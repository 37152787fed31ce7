"""serve.proxy_connections: the bound on a request's head in Ray's HTTP proxy, run as Ray runs it (a uvicorn
server on a loopback socket, with Ray's keep-alive), without Ray."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import threading
import time

import pytest
import uvicorn
import uvloop
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from serve import proxy_connections, proxy_middleware
from serve.proxy_connections import MAX_HEAD_BYTES, BoundedHttpProtocol
from serve.proxy_middleware import REQUEST_ID_PATTERN, BodyBuffer, HeaderGuard
from tests.helpers import logged_by_ray_serve, record_proxy_metrics


async def _echo(scope, receive, send):
    """Answers the size of the body it got; /slow first waits a second."""
    size, more = 0, True
    while more:
        message = await receive()
        size += len(message.get("body", b""))
        more = message.get("more_body", False)
    if scope["path"] == "/slow":
        await asyncio.sleep(1.0)
    body = str(size).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body})


def _config(app=_echo, **http) -> uvicorn.Config:
    """The arguments Ray's proxy gives uvicorn (ray/serve/_private/http_util.py, start_asgi_http_server)."""
    return uvicorn.Config(
        lambda: app, factory=True, timeout_keep_alive=5, lifespan="off", access_log=False, log_level=None,
        log_config=None, **http,
    )  # fmt: skip


class _Server:
    """The protocol on a loopback socket, on uvloop as in Ray's proxy (ray._private.async_compat)."""

    def __init__(self, app, send_buffer: int | None = None):
        sock = socket.socket()
        if send_buffer is not None:  # accepted connections take it from the listening socket (Linux)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
        sock.bind(("127.0.0.1", 0))
        self.server = uvicorn.Server(_config(app, http=BoundedHttpProtocol))
        loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=loop.run_until_complete, args=(self.server.serve(sockets=[sock]),))
        self.thread.daemon = True
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)
        self.port = sock.getsockname()[1]

    def stop(self) -> float:
        """Seconds uvicorn's graceful shutdown took."""
        began = time.monotonic()
        self.server.should_exit = True
        self.thread.join(10)
        return time.monotonic() - began


def _serve(app):
    server = _Server(app)
    yield server.port
    server.stop()


@pytest.fixture
def proxy_port():
    yield from _serve(_echo)


@pytest.fixture
def body_limit_port():
    """The proxy's body limit (serve.proxy_middleware.BodyBuffer) at 1000 bytes, in front of the echo."""
    yield from _serve(BodyBuffer(_echo, limit=1000))


@pytest.fixture
def short_head_timeout(monkeypatch):
    monkeypatch.setattr(proxy_connections, "HEAD_TIMEOUT_S", 0.5)
    return 0.5


ONE_READ = 256 * 1024  # the largest read of a socket: asyncio (selector_events.max_size), uvloop (256,000 bytes)


def _connect(port: int) -> socket.socket:
    client = socket.create_connection(("127.0.0.1", port), timeout=10)
    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return client


def _until_any(seen: list, seconds: float) -> None:
    """Waits until an app running in the server's thread has noted something in `seen`, at most `seconds`."""
    deadline = time.monotonic() + seconds
    while not seen and time.monotonic() < deadline:
        time.sleep(0.05)


def _reading_nothing(port: int) -> socket.socket:
    """A client whose receive buffer is small (4 KiB): an answer it does not read waits in the server."""
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.settimeout(10)
    client.connect(("127.0.0.1", port))
    return client


def _read_all(client: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    received = b""
    while chunk := client.recv(65536):
        received += chunk
    return received


def _responses(data: bytes) -> list[tuple[int, bytes]]:
    """(status, body) of each response in `data` (every one has a content-length)."""
    answers = []
    while data:
        head, data = data.split(b"\r\n\r\n", 1)
        lines = head.decode().split("\r\n")
        length = next(int(line.split(":")[1]) for line in lines if line.lower().startswith("content-length:"))
        answers.append((int(lines[0].split()[1]), data[:length]))
        data = data[length:]
    return answers


def _closed_within(client: socket.socket, seconds: float) -> bool:
    client.settimeout(seconds)
    try:
        return client.recv(65536) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def test_a_request_whose_headers_and_large_body_come_in_one_write_is_served(proxy_port):
    body = b"x" * (4 * MAX_HEAD_BYTES)
    with _connect(proxy_port) as client:
        head = f"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        client.sendall(head.encode() + body)
        assert _responses(_read_all(client)) == [(200, str(len(body)).encode())]


@pytest.fixture
def parsed(monkeypatch) -> list[int]:
    """The size of each read handed to uvicorn's parser (httptools)."""
    sizes = []
    parse = HttpToolsProtocol.data_received
    monkeypatch.setattr(
        HttpToolsProtocol, "data_received", lambda self, data: sizes.append(len(data)) or parse(self, data)
    )
    return sizes


@pytest.mark.parametrize("shape", ["one endless header", "many small headers", "an endless request line"])
def test_a_head_past_the_limit_gets_431_problem_json_and_the_connection_closes(proxy_port, parsed, shape):
    """uvicorn's httptools protocol read on (a 200 MiB header: +270 MiB in the proxy); here the answer comes
    once the head passes MAX_HEAD_BYTES, and the rest is never parsed (read and dropped while the client still
    sends: the lingering close)."""
    start, piece = {
        "one endless header": (b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: ", b"y" * 4096),
        "many small headers": (b"GET / HTTP/1.1\r\nHost: a\r\n", b"".join(b"X-%d: v\r\n" % i for i in range(400))),
        "an endless request line": (b"GET /", b"z" * 4096),
    }[shape]
    sent = 0
    with _connect(proxy_port) as client:
        client.sendall(start)
        try:
            while sent < 64 * MAX_HEAD_BYTES:
                client.sendall(piece)
                sent += len(piece)
        except (BrokenPipeError, ConnectionResetError):
            pass
        try:
            answer = _read_all(client)
        except ConnectionResetError:
            pytest.fail(f"the connection was reset without the 431 after {sent} bytes")
    assert sum(parsed) <= MAX_HEAD_BYTES + ONE_READ, f"{sum(parsed)} bytes of a head parsed"
    [(status, body)] = _responses(answer)
    assert status == 431 and b"content-type: application/problem+json" in answer.lower()
    problem = json.loads(body)
    assert problem["type"].endswith("/headers-too-large") and str(MAX_HEAD_BYTES) in problem["detail"]


def test_a_whole_head_past_the_limit_in_one_write_gets_431_and_nothing_after_it_runs(proxy_port):
    """A head that comes whole in one read is measured as parsed; a request behind it is neither run nor
    answered."""
    padding = b"X-Padding: " + b"p" * MAX_HEAD_BYTES + b"\r\n"
    with _connect(proxy_port) as client:
        client.sendall(b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n" + padding + b"\r\nok")
        client.sendall(b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n")
        answer = _read_all(client)
    [(status, body)] = _responses(answer)
    assert status == 431 and json.loads(body)["type"].endswith("/headers-too-large")
    with _connect(proxy_port) as client:
        half = padding[: MAX_HEAD_BYTES // 2]
        client.sendall(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n" + half + b"\r\n\r\n")
        assert _responses(_read_all(client)) == [(200, b"0")]


def test_a_client_still_sending_its_head_reads_the_431_and_is_cut_off_after_the_linger(proxy_port, monkeypatch):
    """Closed at once with the client's bytes unread, the kernel reset the connection after the 431: a client
    sending a 512 KiB head and reading to the end got ECONNRESET in 20 tries of 20. Now the answer, then a FIN;
    what it still sends is dropped for at most LINGER_S."""
    padding = b"X-Padding: " + b"p" * (8 * MAX_HEAD_BYTES) + b"\r\n\r\n"
    for _ in range(3):
        with _connect(proxy_port) as client:
            sender = threading.Thread(target=_send_quietly, args=(client, b"GET / HTTP/1.1\r\nHost: a\r\n" + padding))
            sender.start()
            answer = _read_all(client)
            sender.join(10)
        [(status, body)] = _responses(answer)
        assert status == 431 and json.loads(body)["type"].endswith("/headers-too-large")
    monkeypatch.setattr(proxy_connections, "LINGER_S", 0.5)
    status, held_s = _an_endless_head(proxy_port)
    assert status == 431 and held_s < 3.0, "an endless head held the connection"


def _an_endless_head(port: int) -> tuple[int, float]:
    """A head sent on and on: the answer's status, and the seconds until the proxy stopped taking it."""
    with _connect(port) as client:
        stopped = []
        sender = threading.Thread(target=_send_quietly, args=(client, b"X-More: x\r\n" * 4096, stopped, 10**6))
        client.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n")
        began = time.monotonic()
        sender.start()
        [(status, _)] = _responses(_read_all(client))
        sender.join(10)
    assert stopped, "the proxy never stopped taking it"
    return status, stopped[0] - began


def _send_quietly(client: socket.socket, data: bytes, stopped: list | None = None, times: int = 1) -> None:
    """Sends `data` `times` times, or until refused; `stopped` gets the time it stopped."""
    try:
        for _ in range(times):
            client.sendall(data)
    except OSError:
        pass
    if stopped is not None:
        stopped.append(time.monotonic())


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_client_still_sending_a_body_over_the_limit_reads_the_413(body_limit_port, framing):
    """uvicorn closed the connection right after the 413 with the body unread: the kernel reset it, and a client
    sending 1 MiB against the limit and reading to the end got ECONNRESET in 10 tries of 10 (after the 413). Now
    the answer, then a FIN. A request within the limit is served as before."""
    body = b"x" * (1024 * 1024)
    if framing == "chunked":
        head, body = b"Transfer-Encoding: chunked\r\n", b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    else:
        head = b"Content-Length: %d\r\n" % len(body)
    for _ in range(3):
        with _connect(body_limit_port) as client:
            request = b"POST /remove HTTP/1.1\r\nHost: a\r\n" + head + b"\r\n" + body
            sender = threading.Thread(target=_send_quietly, args=(client, request))
            sender.start()
            answer = _read_all(client)
            sender.join(10)
        [(status, problem)] = _responses(answer)
        assert status == 413 and json.loads(problem)["type"].endswith("/payload-too-large")
    with _connect(body_limit_port) as client:
        client.sendall(b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\nConnection: close\r\n\r\n" + b"y" * 10)
        assert _responses(_read_all(client)) == [(200, b"10")]


@pytest.mark.timing
def test_a_server_shutdown_closes_an_idle_connection_at_once(monkeypatch):
    """uvicorn leaves a request's more_body set when it answered before the body was all in: its idle keep-alive
    connection lingered at the shutdown's close, and the shutdown waited LINGER_S for it."""
    monkeypatch.setattr(proxy_connections, "LINGER_S", 30.0)

    async def answers_first(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    server = _Server(answers_first)
    with _connect(server.port) as client:
        client.sendall(b"POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n")
        assert client.recv(65536).endswith(b"ok")
        client.sendall(b"0123456789")
        time.sleep(0.1)
        assert server.stop() < 2.0


def test_a_linger_ends_once_the_client_has_sent_its_byte_cap(proxy_port, monkeypatch):
    """A fast client could make the proxy read and drop ~5 GB a connection in LINGER_S."""
    monkeypatch.setattr(proxy_connections, "LINGER_S", 30.0)
    monkeypatch.setattr(proxy_connections, "LINGER_MAX_BYTES", 1024 * 1024)
    status, held_s = _an_endless_head(proxy_port)
    assert status == 431 and held_s < 3.0, "the linger ran to LINGER_S"


def test_a_431_is_counted_as_a_proxy_refusal(proxy_port, monkeypatch):
    """The 431 is answered before any ASGI app runs: no count of Ray's or the Ingress's sees it."""
    recorded = record_proxy_metrics(monkeypatch)
    with _connect(proxy_port) as client:
        client.sendall(b"GET / HTTP/1.1\r\nHost: a\r\nX-Padding: " + b"p" * MAX_HEAD_BYTES + b"\r\n\r\n")
        [(status, _)] = _responses(_read_all(client))
    assert status == 431 and recorded.refusals == ["headers-too-large"]


def _answer_of(answer: bytes) -> tuple[int, dict[str, str], dict]:
    """The one response in `answer`: its status, headers (lower-case names) and problem document."""
    [(status, body)] = _responses(answer)
    lines = answer.split(b"\r\n\r\n", 1)[0].decode().split("\r\n")[1:]
    headers = {name.lower(): value.strip() for name, value in (line.split(":", 1) for line in lines)}
    return status, headers, json.loads(body)


def _named(headers: dict[str, str], problem: dict) -> str:
    """The id the answer names its request by, in its X-Request-Id and its `instance` alike."""
    request_id = headers["x-request-id"]
    assert re.fullmatch(REQUEST_ID_PATTERN, request_id) and problem["instance"] == f"urn:request:{request_id}"
    return request_id


def test_a_431_names_the_request(proxy_port):
    """The 431 carried no X-Request-Id and no `instance`, where every other problem of the service does."""
    with _connect(proxy_port) as client:
        client.sendall(b"GET / HTTP/1.1\r\nHost: a\r\nX-Padding: " + b"p" * MAX_HEAD_BYTES + b"\r\n\r\n")
        status, headers, problem = _answer_of(_read_all(client))
    assert status == 431 and problem["type"].endswith("/headers-too-large") and _named(headers, problem)


BODY = b"x" * (1024 * 1024)
# a head httptools refuses: (its request line, its header lines after Host and X-Request-Id, whether the id is parsed
# before the fault); %d: the body's size
UNPARSABLE_HEADS = {
    "two content-lengths": (b"POST /up HTTP/1.1", b"Content-Length: %d\r\nContent-Length: %d", True),
    "content-length and chunked": (b"POST /up HTTP/1.1", b"Content-Length: %d\r\nTransfer-Encoding: chunked", True),
    "an unknown method": (b"FOO /up HTTP/1.1", b"Content-Length: %d", False),
    "a lower-case method": (b"post /up HTTP/1.1", b"Content-Length: %d", False),
    "HTTP/1.2": (b"POST /up HTTP/1.2", b"Content-Length: %d", False),
    "a folded header line": (b"POST /up HTTP/1.1", b"X-A: b\r\n c\r\nContent-Length: %d", True),
    "a space before the colon": (b"POST /up HTTP/1.1", b"Content-Length : %d", True),
}


@pytest.mark.parametrize("shape", UNPARSABLE_HEADS)
def test_a_head_the_parser_refuses_gets_a_named_400_problem_json_that_a_client_still_sending_reads(
    proxy_port, monkeypatch, shape
):
    """uvicorn answered a text/plain 400 "Invalid HTTP request received." with no X-Request-Id and closed at once:
    a client still sending its body got ECONNRESET (5 of 5, live). Now the service's problem+json, named, counted
    as the proxy's refusal, and the lingering close of a refused head: the rest is dropped unparsed."""
    recorded = record_proxy_metrics(monkeypatch)
    line, header_lines, id_parsed = UNPARSABLE_HEADS[shape]
    header_lines = header_lines.replace(b"%d", str(len(BODY)).encode())
    request = line + b"\r\nHost: a\r\nX-Request-Id: given-1\r\n" + header_lines + b"\r\n\r\n" + BODY
    with _connect(proxy_port) as client, logged_by_ray_serve() as records:
        sender = threading.Thread(target=_send_quietly, args=(client, request))
        sender.start()
        try:
            answer = _read_all(client)
        except ConnectionResetError:
            pytest.fail("the connection was reset")
        sender.join(10)
    status, headers, problem = _answer_of(answer)
    assert status == 400 and headers["content-type"] == "application/problem+json"
    assert problem["type"].endswith("/malformed-request") and problem["status"] == 400
    assert "cannot be parsed" in problem["detail"] and "(at the proxy)" in problem["detail"]
    assert (_named(headers, problem) == "given-1") == id_parsed
    assert recorded.refusals == ["malformed-request"]
    lines = [record.getMessage() for record in records if "proxy refused" in record.getMessage()]
    assert len(lines) == 1 and ": 400 malformed-request (" in lines[0] and lines[0].endswith(
        f"request_id={_named(headers, problem)}"
    ), lines


def test_a_chunked_body_the_parser_refuses_gets_a_named_400_problem_json(proxy_port, monkeypatch):
    """A bad chunk size, once the request runs: 400 problem+json too, named by the request's own id."""
    recorded = record_proxy_metrics(monkeypatch)
    with _connect(proxy_port) as client:
        client.sendall(b"POST /up HTTP/1.1\r\nHost: a\r\nX-Request-Id: given-2\r\nTransfer-Encoding: chunked\r\n\r\n")
        time.sleep(0.1)
        client.sendall(b"5\r\nhello\r\nzz\r\n" + b"y" * 1000)
        status, headers, problem = _answer_of(_read_all(client))
    assert status == 400 and problem["type"].endswith("/malformed-request") and "chunked" in problem["detail"]
    assert _named(headers, problem) == "given-2" and recorded.refusals == ["malformed-request"]


def test_a_connect_request_is_told_its_head_cannot_be_parsed_not_its_body(proxy_port):
    """CONNECT (refused by httptools as its head ends) was told "the request's chunked body framing cannot be
    parsed": it sent no body."""
    with _connect(proxy_port) as client:
        client.sendall(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
        status, _, problem = _answer_of(_read_all(client))
    assert status == 400 and problem["detail"].startswith("the request's line and headers cannot be parsed"), problem


async def _header_names(scope, receive, send):
    """Answers the header names it sees once the whole body is in (where a trailer field would be)."""
    more = True
    while more:
        more = (await receive()).get("more_body", False)
    body = b",".join(sorted(name for name, _ in scope["headers"]))
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body})


def test_a_chunked_bodys_trailer_fields_are_dropped_and_bounded_as_a_head():
    """uvicorn appended a chunked body's trailer fields to the request's headers, counted by no bound: 20 MiB of
    trailer lines grew Ray's proxy by ~500 MiB (an anonymous client's too, with keys on) and reached the app."""
    server = _Server(_header_names)
    try:
        head = b"POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n1\r\n{\r\n0\r\n"
        with _connect(server.port) as client:
            client.sendall(head + b"X-Trailer: 1\r\n\r\n")
            assert _responses(_read_all(client)) == [(200, b"connection,host,transfer-encoding")]
        with _connect(server.port) as client:
            sender = threading.Thread(target=_send_quietly, args=(client, head + b"A:b\r\n" * 40_000 + b"\r\n"))
            sender.start()
            [(status, problem)] = _responses(_read_all(client))
            sender.join(10)
        assert status == 431 and json.loads(problem)["type"].endswith("/headers-too-large")
        assert f"trailer fields may take {MAX_HEAD_BYTES} bytes" in json.loads(problem)["detail"]
        with _connect(server.port) as client:  # heads over 64 KiB in one read, ending in a size line (a review)
            gets = b"".join(b"GET /%d HTTP/1.1\r\nHost: a\r\nX-Pad: %s\r\n\r\n" % (n, b"p" * 25_000) for n in range(3))
            client.sendall(gets + head.split(b"\r\n\r\n")[0] + b"\r\n\r\n1\r\n")
            time.sleep(0.3)
            client.sendall(b"{\r\n0\r\n\r\n")
            assert [status for status, _ in _responses(_read_all(client))] == [200] * 4
        with _connect(server.port) as client:  # many chunks, their size lines and data in writes of their own
            client.sendall(head.split(b"\r\n\r\n")[0] + b"\r\n\r\n")
            for _ in range(100):
                client.sendall(b"%x\r\n" % 2048)
                time.sleep(0.002)
                client.sendall(b"c" * 2048 + b"\r\n")
            client.sendall(b"0\r\n\r\n")
            assert _responses(_read_all(client)) == [(200, b"connection,host,transfer-encoding")]
        with _connect(server.port) as client:  # one field that never ends: httptools holds it, no on_header (a review)
            client.settimeout(5)
            sender = threading.Thread(target=_send_quietly, args=(client, head + b"X-T: " + b"a" * (1 << 20)))
            sender.start()
            [(status, problem)] = _responses(_read_all(client))
            sender.join(10)
        assert status == 431 and f"trailer fields may take {MAX_HEAD_BYTES} bytes" in json.loads(problem)["detail"]
    finally:
        server.stop()


@pytest.mark.parametrize("answer", ["not started", "started"])
@pytest.mark.parametrize("refused", ["head", "trailer"])
def test_a_pipelined_request_refused_is_answered_after_the_requests_before_it(refused, answer):
    """A refusal was written at once: with a request before it still running, its 431 went out as that request's
    answer, or into the middle of it (a review), and lingering then made the running request fail (`Cannot call
    write() after write_eof()`). Answers go in the order of their requests (RFC 9112): the running request's whole
    answer, then the 431, then the connection closes."""
    raised = []

    async def slow(scope, receive, send):
        while (await receive()).get("more_body", False):
            pass
        try:
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"4")]})
            if answer == "started":
                await send({"type": "http.response.body", "body": b"ok", "more_body": True})
            await asyncio.sleep(0.5)
            await send({"type": "http.response.body", "body": b"okok"[-2:] if answer == "started" else b"okok"})
        except Exception as exc:
            raised.append(exc)

    server = _Server(slow)
    try:
        with _connect(server.port) as client:
            client.sendall(b"GET /running HTTP/1.1\r\nHost: a\r\n\r\n")
            time.sleep(0.1)
            if refused == "head":
                client.sendall(b"GET /next HTTP/1.1\r\nHost: a\r\nX-Big: " + b"y" * (2 * MAX_HEAD_BYTES) + b"\r\n\r\n")
            else:
                chunked = b"POST /next HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n1\r\n{\r\n0\r\n"
                client.sendall(chunked + b"A:b\r\n" * 20_000 + b"\r\n")
            answers = _responses(_read_all(client))
    finally:
        server.stop()
    assert [status for status, _ in answers] == [200, 431] and answers[0][1] == b"okok" and raised == []
    assert json.loads(answers[1][1])["type"].endswith("/headers-too-large")


def test_a_connection_gets_one_refusal_while_one_waits(monkeypatch):
    """A parse error after a refused pipelined head, in the same read, replaced the waiting 431 with a 400 and counted
    both (a review)."""
    recorded = record_proxy_metrics(monkeypatch)

    async def slow(scope, receive, send):
        await receive()
        await asyncio.sleep(0.5)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    server = _Server(slow)
    try:
        with _connect(server.port) as client:
            client.sendall(b"GET /running HTTP/1.1\r\nHost: a\r\n\r\n")
            time.sleep(0.1)
            big = b"GET /next HTTP/1.1\r\nHost: a\r\nX-Big: " + b"y" * (2 * MAX_HEAD_BYTES) + b"\r\n\r\n"
            client.sendall(big + b"GARBAGE\r\n\r\n")
            answers = _responses(_read_all(client))
    finally:
        server.stop()
    assert [status for status, _ in answers] == [200, 431] and recorded.refusals == ["headers-too-large"]


@pytest.mark.parametrize("client", ["leaves", "keeps sending"])
def test_while_a_pipelined_refusal_waits_its_client_is_still_read(client):
    """A refusal waiting for the request before it read and dropped all the client sent (7.5 GiB in 4 s); reading
    paused instead, a client that left was not seen and the request ran on, told nothing (reviews). What the client
    sends is dropped up to LINGER_MAX_BYTES, then the connection is aborted; one that leaves is seen."""
    from serve.proxy_connections import LINGER_MAX_BYTES

    told = []

    async def waits_for_its_client(scope, receive, send):
        while (await receive()).get("more_body", False):
            pass
        with contextlib.suppress(TimeoutError):
            told.append((await asyncio.wait_for(receive(), 10.0))["type"])

    server = _Server(waits_for_its_client)
    sent = 0
    try:
        with _connect(server.port) as sender:
            sender.sendall(b"GET /running HTTP/1.1\r\nHost: a\r\n\r\n")
            time.sleep(0.1)
            sender.sendall(b"GET /next HTTP/1.1\r\nHost: a\r\nX-Big: " + b"y" * (2 * MAX_HEAD_BYTES) + b"\r\n\r\n")
            if client == "keeps sending":
                with contextlib.suppress(OSError):
                    for _ in range(64):
                        sender.sendall(b"z" * (1 << 20))
                        sent += 1 << 20
        _until_any(told, 5.0)
    finally:
        server.stop()
    assert told == ["http.disconnect"]
    assert sent < 4 * LINGER_MAX_BYTES, "cut off past the bound, not read for as long as the request ran"


def test_a_request_cut_off_by_the_send_timeout_with_one_pipelined_behind_it_ends_quietly(monkeypatch):
    """The send timeout's abort told only the queued request its client left: the running one went on writing its
    answer to the aborted connection and failed (RuntimeError: the handler is closed) (a review)."""
    monkeypatch.setattr(proxy_connections, "SEND_TIMEOUT_S", 1.0)
    seen = []

    async def big_answer_then_waits(scope, receive, send):
        try:
            await _big_answer(scope, receive, send)
            seen.append((await asyncio.wait_for(receive(), 2.0))["type"])
        except Exception as exc:
            seen.append(exc)

    server = _Server(big_answer_then_waits)
    try:
        client = _reading_nothing(server.port)
        with client:
            client.sendall(b"GET /big HTTP/1.1\r\nHost: a\r\n\r\n")
            time.sleep(0.1)
            client.sendall(b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n")
            _until_any(seen, 5.0)
    finally:
        server.stop()
    assert seen == ["http.disconnect"]


BIG_ANSWER = 16 * 1024 * 1024


async def _big_answer(scope, receive, send):
    while (await receive()).get("more_body", False):
        pass
    headers = [(b"content-length", b"%d" % BIG_ANSWER)]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    for _ in range(16):
        await send({"type": "http.response.body", "body": b"r" * (BIG_ANSWER // 16), "more_body": True})
    await send({"type": "http.response.body", "body": b""})


def test_a_client_that_reads_nothing_of_its_answer_is_cut_off_after_the_send_timeout(monkeypatch):
    """A client that never read its 12 MB result held its connection (and the answer's buffers) for as long as it
    liked, past every bound; a client that reads, however slowly, is not cut off."""
    monkeypatch.setattr(proxy_connections, "SEND_TIMEOUT_S", 1.0)
    server = _Server(_big_answer)
    try:
        client = _reading_nothing(server.port)
        with client:
            client.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            time.sleep(0.5)
            [waiting] = server.server.server_state.connections
            deadline = time.monotonic() + 5.0
            while waiting in server.server.server_state.connections and time.monotonic() < deadline:
                time.sleep(0.01)
            timer = waiting._send_timer  # none left to hold the ended connection and its answer (a review)
            assert timer is None or timer.cancelled()
            received = 0
            try:
                while chunk := client.recv(1 << 20):
                    received += len(chunk)
            except ConnectionResetError:
                pass
        assert received < BIG_ANSWER, "the whole answer waited for a client that read nothing"
        with _connect(server.port) as reader:  # reads in bursts, with pauses shorter than the timeout
            reader.sendall(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            reader.setblocking(False)
            answer, closed = b"", False
            while not closed:
                time.sleep(0.6)
                try:
                    while chunk := reader.recv(1 << 20):
                        answer += chunk
                    closed = True
                except BlockingIOError:
                    pass
        assert answer.endswith(b"r" * 1000) and len(answer.split(b"\r\n\r\n", 1)[1]) == BIG_ANSWER
    finally:
        server.stop()


@pytest.mark.timing
def test_a_client_that_reads_nothing_of_a_short_answer_is_cut_off_too(monkeypatch):
    """The send timeout started only once the proxy's buffer was full (64 KiB): a client that read none of an answer
    whose unsent tail was smaller held the closing connection for good, and a graceful shutdown waited on it (a
    review)."""
    monkeypatch.setattr(proxy_connections, "SEND_TIMEOUT_S", 1.0)

    async def short_answer(scope, receive, send):
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"49152")]})
        await send({"type": "http.response.body", "body": b"r" * 49152})

    server = _Server(short_answer, send_buffer=4096)
    try:
        client = _reading_nothing(server.port)
        with client:
            client.sendall(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            time.sleep(0.5)
            [waiting] = server.server.server_state.connections
            unsent = waiting.transport.get_write_buffer_size()
            assert 0 < unsent < 64 * 1024, "the answer's tail must wait in the proxy, under its buffer's high mark"
            time.sleep(2.0)
            assert not server.server.server_state.connections
    finally:
        assert server.stop() < 2.0


def test_a_body_in_a_coding_nobody_decodes_is_refused_not_read_as_plain(monkeypatch):
    """httptools frames `gzip, chunked` (or a gzip line, then a chunked line) as chunked and handed the app the
    gzip bytes as the body, as it did a body with a Content-Encoding, and took a chunked HTTP/1.0 request: now 400 or
    415 at the proxy (never a 5xx, though RFC 9112 suggests 501), named and counted. `chunked` alone, in any case,
    and `Content-Encoding: identity` are the body as sent."""
    recorded = record_proxy_metrics(monkeypatch)
    server = _Server(HeaderGuard(_echo))
    chunks = b"5\r\nhello\r\n0\r\n\r\n"
    heads = {
        b"HTTP/1.1\r\nTransfer-Encoding: gzip, chunked": "malformed-request",
        b"HTTP/1.1\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked": "malformed-request",
        b"HTTP/1.1\r\nTransfer-Encoding: x-custom, Chunked": "malformed-request",
        b"HTTP/1.0\r\nTransfer-Encoding: chunked": "malformed-request",
        b"HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Encoding: gzip": "unsupported-media-type",
        b"HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Encoding: identity, br": "unsupported-media-type",
        b"HTTP/1.1\r\nTransfer-Encoding: Chunked": None,
        b"HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Encoding: identity": None,
        b"HTTP/1.1\r\nContent-Length: 17\r\nContent-Encoding: gzip": "unsupported-media-type",
        b"HTTP/1.1\r\nContent-Length: 0\r\nContent-Encoding: gzip": "no body",  # nothing coded to refuse
    }
    try:
        for head, kind in heads.items():
            request = b"POST / " + head + b"\r\nHost: a\r\nX-Request-Id: te-1\r\nConnection: close\r\n\r\n" + chunks
            with _connect(server.port) as client:
                client.sendall(request)
                answer = _read_all(client)
            if kind in (None, "no body"):
                assert _responses(answer) == [(200, b"5" if kind is None else b"0")], head
                continue
            status, headers, problem = _answer_of(answer)
            assert status in (400, 415) and problem["status"] == status and problem["type"].endswith(f"/{kind}"), head
            assert _named(headers, problem) == "te-1" and "(at the proxy)" in problem["detail"]
            assert (headers["x-content-type-options"], headers["cache-control"]) == ("nosniff", "no-store")
            assert headers.get("accept-encoding") == ("identity" if status == 415 else None), "RFC 9110 15.5.16"
    finally:
        server.stop()
    assert recorded.refusals == [kind for kind in heads.values() if kind not in (None, "no body")]


def test_a_head_that_says_two_things_or_names_no_host_is_refused_as_uvicorn_parses_it(monkeypatch):
    """uvicorn hands repeated header lines on as they came and an HTTP/1.0 request as such: HeaderGuard refuses a
    second Host or Content-Type line and an HTTP/1.1 request without a Host, and lets HTTP/1.0 leave it out."""
    record_proxy_metrics(monkeypatch)
    server = _Server(HeaderGuard(_echo))
    heads = {
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n": 400,
        b"GET / HTTP/1.1\r\n": 400,
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Type: a/b\r\nContent-Type: c/d\r\nContent-Length: 0\r\n": 400,
        b"GET / HTTP/1.0\r\n": 200,
        b"GET / HTTP/1.1\r\nHost: a\r\nContent-Type: a/b\r\n": 200,
    }
    try:
        for head, expected in heads.items():
            with _connect(server.port) as client:
                client.sendall(head + b"Connection: close\r\n\r\n")
                [(status, _)] = _responses(_read_all(client))
            assert status == expected, head
    finally:
        server.stop()


@pytest.mark.timing
def test_a_head_trickled_past_the_timeout_closes_the_connection_unanswered(proxy_port, short_head_timeout):
    """A byte now and then held a connection for good (uvicorn starts no timer before a first response)."""
    with _connect(proxy_port) as client:
        client.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n")
        began = time.monotonic()
        answer = None
        while time.monotonic() - began < 10 * short_head_timeout:
            try:
                client.sendall(b"X-A: b\r\n")
            except (BrokenPipeError, ConnectionResetError):
                answer = b""
                break
            if _closed_within(client, 0.05):
                answer = b""
                break
        assert answer == b"", "still open after 10x the head timeout"
        assert time.monotonic() - began < 4 * short_head_timeout


def test_a_connection_that_sends_nothing_is_closed_after_the_head_timeout(proxy_port, short_head_timeout):
    with _connect(proxy_port) as client:
        assert _closed_within(client, 10 * short_head_timeout)


def test_requests_that_run_longer_than_the_head_timeout_keep_their_connection(proxy_port, short_head_timeout):
    """The timeout is the head's: a removal may take longer, on a connection that carries more requests, one
    after the other or pipelined."""
    request = b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n"
    with _connect(proxy_port) as client:
        client.sendall(request)
        first = b""
        while not first.endswith(b"\r\n\r\n0"):  # the head and the body may come in two reads
            first += client.recv(65536)
        assert _responses(first) == [(200, b"0")]
        client.sendall(request * 2 + b"GET /fast HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        assert _responses(_read_all(client)) == [(200, b"0")] * 3


def test_the_proxy_callback_makes_it_the_protocol_of_the_server_ray_builds(monkeypatch):
    monkeypatch.setitem(uvicorn.config.HTTP_PROTOCOLS, "auto", uvicorn.config.HTTP_PROTOCOLS["auto"])
    config = _config()
    proxy_middleware.middlewares()
    config.load()
    assert config.http_protocol_class is BoundedHttpProtocol
