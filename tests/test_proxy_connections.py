"""serve.proxy_connections: the bound on a request's head in Ray's HTTP proxy, run as Ray runs it (a uvicorn
server on a loopback socket, with Ray's keep-alive), without Ray."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import pytest
import uvicorn

from serve import proxy_connections, proxy_middleware
from serve.proxy_connections import MAX_HEAD_BYTES, BoundedHttpProtocol
from tests.helpers import record_proxy_metrics


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


def _config(**http) -> uvicorn.Config:
    """The arguments Ray's proxy gives uvicorn (ray/serve/_private/http_util.py, start_asgi_http_server)."""
    return uvicorn.Config(
        lambda: _echo, factory=True, timeout_keep_alive=5, lifespan="off", access_log=False, log_level=None,
        log_config=None, **http,
    )  # fmt: skip


@pytest.fixture
def proxy_port():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(_config(http=BoundedHttpProtocol))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(server.serve(sockets=[sock]),), daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    yield sock.getsockname()[1]
    server.should_exit = True
    thread.join(10)


@pytest.fixture
def short_head_timeout(monkeypatch):
    monkeypatch.setattr(proxy_connections, "HEAD_TIMEOUT_S", 0.5)
    return 0.5


def _connect(port: int) -> socket.socket:
    client = socket.create_connection(("127.0.0.1", port), timeout=10)
    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
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


@pytest.mark.parametrize("shape", ["one endless header", "many small headers", "an endless request line"])
def test_a_head_past_the_limit_gets_431_problem_json_and_the_connection_closes(proxy_port, shape):
    """uvicorn's httptools protocol read on (a 200 MiB header: +270 MiB in the proxy); here the answer comes
    once the head passes MAX_HEAD_BYTES, and the rest is never read."""
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
    assert sent < 64 * MAX_HEAD_BYTES, "the server read a head of 4 MiB"
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


def test_a_431_is_counted_as_a_proxy_refusal(proxy_port, monkeypatch):
    """The 431 is answered before any ASGI app runs: no count of Ray's or the Ingress's sees it."""
    recorded = record_proxy_metrics(monkeypatch)
    with _connect(proxy_port) as client:
        client.sendall(b"GET / HTTP/1.1\r\nHost: a\r\nX-Padding: " + b"p" * MAX_HEAD_BYTES + b"\r\n\r\n")
        [(status, _)] = _responses(_read_all(client))
    assert status == 431 and recorded.refusals == ["headers-too-large"]


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
