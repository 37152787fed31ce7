"""A bound on what a client may send Ray Serve's HTTP proxy before its request exists: the request's head.

Ray's proxy runs uvicorn with httptools, which caps neither the size of a request line and its headers nor the
time they take; uvicorn starts no timer on a new connection. Every guard of serve.proxy_middleware runs once
the headers are in, so without this one a client could hold the proxy's memory with one endless header (a
200 MiB header: +270 MiB) or hold connections open forever by sending a byte now and then (slowloris), keys on
or off. BoundedHttpProtocol is uvicorn's httptools protocol with two bounds on each request's head:

- at most MAX_HEAD_BYTES: read before its headers are complete, or (a head that comes whole in one read) its
  target and header lines as parsed; past that, 431 problem+json, and the connection is closed without
  parsing or running anything more (a head never costs the proxy more than this plus one read);
- at most HEAD_TIMEOUT_S from the request's first byte (a new connection's: from its opening) to its last
  header: past that, the connection is closed without an answer, as uvicorn closes an idle keep-alive one.

The time a request runs and the time between requests (Ray's keep_alive_timeout_s) are not the head's: a
removal may take longer than HEAD_TIMEOUT_S on a connection that then carries another request.

A chunked body's trailer fields are dropped (uvicorn added them to the request's headers, counted by nothing) and
bounded as a head. And an answer is not kept waiting on a client that reads nothing: once the proxy's writes to
a connection (a full buffer, or a closing connection's unsent tail) have waited SEND_TIMEOUT_S without the client
taking any (nginx's send_timeout), the connection is aborted (one that takes some is given as long again); a
client that never read its 12 MB result held its connection for good. Whenever a connection ends under a request,
the request running and those pipelined behind it are told their client left (uvicorn tells the newest only).

And a refusal ends the connection cleanly for a client that is still sending. The proxy's own refusals before a
body is all in (its 413 or 401, the 431 and 400 here) say `connection: close`, and uvicorn closes the connection
as soon as such an answer is sent: closed with the client's bytes unread, the kernel ends it with a reset (RST)
after the answer, not a FIN. On Linux a client still reads the answer first (10 of 10 here, a 512 KiB head or a
body 1 MiB over the limit), but one that reads to the end gets ECONNRESET, a stack that drops what it holds on a
reset loses the answer, and a proxy in front that is still forwarding the body may answer its own client with an
error instead. So such a close ends our side after the answer (FIN), drops what the client still sends unparsed,
and closes when the client closes its side or after LINGER_S (nginx's lingering close).

A request whose line or headers httptools cannot parse (a repeated Content-Length, Content-Length with chunked
framing, an unknown method or version, a folded header line), or whose chunked framing it cannot parse, gets 400
`malformed-request` problem+json in place of uvicorn's plain-text 400, and the same close as a 431: nothing more
is parsed, and a client still sending meets the lingering close, not a reset. Every answer of this module names
the request as serve.proxy_middleware's do (X-Request-Id, `instance`: the client's id if it came before the
refusal, else a fresh one) and is counted as a proxy refusal. A refused request pipelined behind others is answered
after them, as HTTP/1.1 orders answers: written at once, its refusal went out as the earlier request's answer.

`install()` makes it uvicorn's "auto" protocol in the process that calls it: serve.proxy_middleware's callback,
which Ray's proxy calls before it builds its uvicorn server.
"""

from __future__ import annotations

import asyncio
import http
import json
import sys

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from serve.problems import ANSWER_HEADERS, MEDIA_TYPE, Problem
from serve.proxy_middleware import MAX_LOGGED_TARGET_CHARS, note_refusal, refusal_request_id

# nginx's default allows 4 x 8 KiB of header lines; this API's own headers (a key, a request id) take < 1 KiB.
MAX_HEAD_BYTES = 64 * 1024
HEAD_TIMEOUT_S = 15.0
# a lingering close (below) ends after this long in all (nginx: lingering_time 30 s, with lingering_timeout 5 s
# between reads), or once this much more has come: a client still sending that much has had the answer already
LINGER_S = 5.0
LINGER_MAX_BYTES = 8 * 1024 * 1024
SEND_TIMEOUT_S = 60.0  # nginx's send_timeout: the longest a client may leave the proxy's writes waiting
PROTOCOL_PATH = "serve.proxy_connections:BoundedHttpProtocol"


def install() -> None:
    from uvicorn import config

    config.HTTP_PROTOCOLS["auto"] = PROTOCOL_PATH


class BoundedHttpProtocol(HttpToolsProtocol):
    _head_timer = None
    _head_bytes = 0
    _in_head = False
    _refused = False
    _body_pending = False  # a request's head is in and its body is not all in (uvicorn's more_body can stay set)
    _shutting_down = False
    _trailer_bytes = 0
    _after_chunk_size = False  # a chunk's size line is in and none of its data: the last chunk's trailer, maybe
    _read_had_body = False
    _trailer_read = 0
    _send_timer = None
    _running_cycle = None
    _lost = False
    _pending_refusal: bytes | None = None  # a refusal that waits for the answers of the requests before it
    _dropped_waiting = 0

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.transport = LingeringClose(transport, self)  # what this protocol and its request cycles close
        self._start_head()

    def connection_lost(self, exc) -> None:
        self._lost = True
        self._stop_head()
        if self._send_timer is not None:
            self._send_timer.cancel()
        self.transport.stop_lingering()
        self.tell_requests_client_left()
        super().connection_lost(exc)

    def _start_asgi_task(self, cycle, app) -> None:
        self._running_cycle = cycle
        super()._start_asgi_task(cycle, app)

    def tell_requests_client_left(self) -> None:
        """The request running and those pipelined behind it: uvicorn tells only the newest, a queued one, so a
        request running when its client left (or was refused a pipelined request) ran on, told nothing."""
        queued = [cycle for cycle, _ in self.pipeline]
        for cycle in [self._running_cycle, self.cycle, *queued]:
            if cycle is not None and not cycle.response_complete:
                cycle.disconnected = True
                cycle.message_event.set()

    def pause_writing(self) -> None:
        """The transport's buffer is full: the client reads slower than the answer is written, or not at all."""
        super().pause_writing()
        self.watch_send()

    def resume_writing(self) -> None:
        """A closing connection's tail below the buffer's low mark still waits on the client: watched till sent."""
        super().resume_writing()
        if self._send_timer is not None and not self.transport.is_closing():
            self._send_timer.cancel()
            self._send_timer = None

    def watch_send(self) -> None:
        """Bytes wait on the client (a full buffer, or a connection closing with its answer's tail unsent)."""
        if self._send_timer is None and not self._lost and self._unsent():
            self._send_timer = self.loop.call_later(SEND_TIMEOUT_S, self._send_too_slow, self._unsent())

    def _unsent(self) -> int:
        return self.transport.get_write_buffer_size()

    def _send_too_slow(self, unsent: int) -> None:
        """SEND_TIMEOUT_S since the writes paused with `unsent` bytes waiting: a client that took some since is
        given as long again (a write of an app can take a slow reader longer than that to drain); one that took
        none is aborted, not closed: a close waits for the buffer to drain, which it never lets happen. The
        request still running is told its client left (connection_lost)."""
        now = self._unsent()
        if 0 < now < unsent:
            self._send_timer = self.loop.call_later(SEND_TIMEOUT_S, self._send_too_slow, now)
            return
        self._send_timer = None
        if now:
            self.transport.abort()

    def client_still_sending(self) -> bool:
        """A refused head, or a request whose body is not all in; nothing during a server shutdown (it closes at
        once)."""
        return not self._shutting_down and (self._refused or self._body_pending)

    def shutdown(self) -> None:
        self._shutting_down = True
        if self.transport.lingering:
            self.transport.close()
        super().shutdown()

    def data_received(self, data: bytes) -> None:
        if self.transport.lingering:
            self.transport.dropped(len(data))
            return
        if self._refused:
            if self._pending_refusal is not None:
                self._dropped_waiting += len(data)
                if self._dropped_waiting > LINGER_MAX_BYTES:
                    self.transport.abort()
            return
        if self._in_head:
            self._head_bytes += len(data)
        self._read_had_body = False
        in_trailer = self._after_chunk_size  # a read that began after a size line: not a head's, not a chunk's data
        super().data_received(data)
        if self._in_head and self._head_bytes > MAX_HEAD_BYTES:
            self._refuse_head()
        elif in_trailer and self._after_chunk_size and not self._read_had_body:
            self._trailer_read += len(data)
            if self._trailer_read > MAX_HEAD_BYTES:
                self._refuse_trailer()

    def on_message_begin(self) -> None:
        if self._refused:
            return
        if not self._in_head:
            self._start_head()
        self._trailer_bytes = 0
        self._trailer_read = 0
        super().on_message_begin()

    def on_header(self, name: bytes, value: bytes) -> None:
        """A header line, or past the head a chunked body's trailer field: uvicorn appended those to the request's
        headers, uncounted (20 MiB of trailer lines grew the proxy by ~500 MiB and went on to the Ingress). They
        are dropped (no route reads one), and bounded as a head is: here as parsed (a trailer that came in one
        read), and in data_received as read (httptools holds a field until it ends: one endless field is only
        seen there)."""
        if self._in_head:
            super().on_header(name, value)
            return
        self._trailer_bytes += len(name) + len(value) + 4
        if self._trailer_bytes > MAX_HEAD_BYTES:
            self._refuse_trailer()

    def on_chunk_header(self) -> None:
        self._after_chunk_size = True

    def on_chunk_complete(self) -> None:
        """A chunk's data and its CRLF are in; or, for the last chunk (size 0), its trailer."""
        self._after_chunk_size = False
        self._trailer_read = 0

    def _refuse_trailer(self) -> None:
        if self._refused:
            return
        if self.cycle is not None and self.cycle.response_started:  # answered before its body was read (a 401)
            self._refused = True
            self.transport.close()
            return
        self._refuse(Problem("headers-too-large", f"a chunked body's trailer fields may take {MAX_HEAD_BYTES} bytes"))

    def on_headers_complete(self) -> None:
        """A head that came whole in one read is measured here: its target and header lines, as parsed."""
        self._stop_head()
        if self._refused:
            return
        if len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers) > MAX_HEAD_BYTES:
            self._refuse_head()
            return
        self._body_pending = True
        try:
            super().on_headers_complete()
        except BaseException:  # a head httptools refuses at its end (CONNECT): no body was pending
            self._body_pending = False
            raise

    def on_body(self, body: bytes) -> None:
        self._read_had_body = True
        self._after_chunk_size = False
        self._trailer_read = 0
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        self._body_pending = False
        if not self._refused:
            super().on_message_complete()

    def _start_head(self) -> None:
        self._in_head = True
        self._head_bytes = 0
        self._head_timer = self.loop.call_later(HEAD_TIMEOUT_S, self._head_too_slow)

    def _stop_head(self) -> None:
        self._in_head = False
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if self._in_head and not self.transport.is_closing():
            self.transport.close()

    def _refuse_head(self) -> None:
        limit = f"a request's target and header lines may take {MAX_HEAD_BYTES} bytes"
        self._refuse(Problem("headers-too-large", limit))

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to what httptools cannot parse (it calls this in its `except HttpParserError`: the
        exception handled is the parser's reason), as problem+json."""
        reason = sys.exc_info()[1] or msg
        framing = "the request's chunked body framing" if self._body_pending else "the request's line and headers"
        self._refuse(Problem("malformed-request", f"{framing} cannot be parsed: {reason} (at the proxy)"))

    def _refuse(self, problem: Problem) -> None:
        """The answer, then nothing more is parsed or run on this connection. Answers go out in the order of their
        requests (RFC 9112): a request pipelined behind others still running or queued is answered after them
        (on_response_complete); written at once, its 431 went out as the answer of the request before it, or
        into the middle of that answer. Waiting, what the client still sends is dropped up to LINGER_MAX_BYTES, past
        which the connection is aborted (7.5 GiB were read and dropped in 4 s); reading goes on, so a client that
        leaves is seen (the running request is told). One refusal is all a connection gets."""
        self._stop_head()
        self._refused = True
        if self.transport.is_closing() or self._pending_refusal is not None:
            return
        own = self.cycle if self._body_pending else None  # the refused request's, once its head was in
        if own is not None:
            own.disconnected = True
            self.pipeline = type(self.pipeline)(entry for entry in self.pipeline if entry[0] is not own)
        request_id = refusal_request_id(self.headers or [])  # the refused request's, as far as they were parsed
        target = getattr(self, "url", b"")[:MAX_LOGGED_TARGET_CHARS].decode("latin-1")  # the target parsed so far
        note_refusal(problem, "http", target, request_id)  # before any ASGI app: nothing of Ray's sees it
        body = json.dumps(problem.body(request_id)).encode()
        head = (
            f"HTTP/1.1 {problem.status} {http.HTTPStatus(problem.status).phrase}\r\n"
            f"content-type: {MEDIA_TYPE}\r\ncontent-length: {len(body)}\r\n"
            f"x-request-id: {request_id}\r\n"
            + "".join(f"{name.lower()}: {value}\r\n" for name, value in ANSWER_HEADERS.items())
            + "connection: close\r\n\r\n"
        )
        self._pending_refusal = head.encode() + body
        self._answer_refusal_in_turn(own)

    def _answer_refusal_in_turn(self, own=None) -> None:
        running = self._running_cycle
        if (running is not None and running is not own and not running.response_complete) or self.pipeline:
            return
        answer, self._pending_refusal = self._pending_refusal, None
        if self.timeout_keep_alive_task is not None:
            self.timeout_keep_alive_task.cancel()
            self.timeout_keep_alive_task = None
        self.transport.write(answer)
        self.transport.close()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._pending_refusal is not None:
            self._answer_refusal_in_turn()


class LingeringClose:
    """A connection's transport as uvicorn's protocol and request cycles see it: `close()` while the client is
    still sending lingers (the module's docstring says why); a second `close()` (a server shutdown) closes. While
    it lingers the connection is over for the app: a request still running on it (one pipelined before a refused
    head) is told its client left, and what it writes is dropped, as on a closed connection."""

    def __init__(self, transport: asyncio.Transport, protocol: BoundedHttpProtocol):
        self._transport = transport
        self._protocol = protocol
        self._timer = None
        self._dropped = 0
        self.lingering = False

    def __getattr__(self, name: str):
        return getattr(self._transport, name)

    def is_closing(self) -> bool:
        return self.lingering or self._transport.is_closing()

    def write(self, data: bytes) -> None:
        if not self.lingering:
            self._transport.write(data)

    def close(self) -> None:
        """A close waits for the answer's unsent bytes: the protocol's send timeout watches them."""
        if self.lingering or self._transport.is_closing() or not self._transport.can_write_eof():
            self.stop_lingering()
            self._transport.close()
            self._protocol.watch_send()
            return
        if not self._protocol.client_still_sending():
            self._transport.close()
            self._protocol.watch_send()
            return
        self.lingering = True
        self._transport.write_eof()
        self._protocol.watch_send()
        self._protocol.tell_requests_client_left()
        self._protocol.flow.resume_reading()  # a request body's reads may be paused (uvicorn's high water mark)
        self._timer = self._protocol.loop.call_later(LINGER_S, self._transport.close)

    def dropped(self, size: int) -> None:
        self._dropped += size
        if self._dropped > LINGER_MAX_BYTES:
            self.close()

    def stop_lingering(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
