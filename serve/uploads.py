"""Read a REST request into validated uploads (serve.protocol): bounded body read, multipart or JSON.

Only the bounded body read runs on the event loop. Parsing (multipart; JSON + base64) runs in a
worker thread (`Offload`), and in steps of at most `STEP` bytes per C call: a C call holds the GIL
for its whole length, so one long call (json.loads or a base64 decode over 20 MB: 50-250 ms) would
stall the loop, /healthz included, as surely as running it there. Between steps the loop gets
the GIL back within the interpreter's switch interval. JSON outside the base64 text goes one top-level
member per C call (_loads_stepwise). What is left whole is a copy or two of the body (memcpy speed: a few
ms for 20 MB), and any single huge JSON value.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import codecs
import json
import json.decoder
import logging
import re
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from pydantic import BaseModel
from starlette.datastructures import Headers
from starlette.formparsers import FormParserError, MultiPartException, MultiPartParser, parse_options_header
from starlette.formparsers import multipart as _multipart  # python-multipart, as starlette imports it

from serve.problems import MAX_LISTED, Problem, invalid_field, invalid_request
from serve.protocol import (
    JSONRemoveBody,
    JSONScoreBody,
    RemovalRequest,
    RemoveOptions,
    ScoreOptions,
    ScoreRequest,
    check_upload_size,
    form_options,
    validate,
)
from serve.worker_threads import worker_pool

# python-multipart logs a WARNING for each malformed body it is given ("Did not find LF at end of boundary (4)"):
# a line in the replica's log per client mistake, which the client is answered (400 malformed-body) and counted for
logging.getLogger("python_multipart").setLevel(logging.ERROR)

_JSON_OVERHEAD = 64 * 1024
STEP = 256 * 1024  # bytes per C call in the parsing and encoding helpers (a multiple of 4: base64 quads)
_LIFT_MIN = 64 * 1024  # base64-alphabet runs at least this long are kept out of json.loads (_loads)
_B64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_PLACEHOLDER = re.compile(r"~(\d+)~")
_LIFTED_VALUE = re.compile(r"(?:data:[^,~]*,)?~(?P<index>\d+)~(?P<padding>={0,2})")


class RepeatedKey(ValueError):
    """A JSON body naming a top-level key twice: json.loads keeps the last one; a multipart form's repeated field is
    refused (`{"seed": 1, "seed": 2}` removed with seed 2), and so is this."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    found = dict(pairs)
    if len(found) != len(pairs):
        seen: set[str] = set()
        raise RepeatedKey(next(key for key, _ in pairs if key in seen or seen.add(key)))
    return found


_DECODER = json.JSONDecoder()
_PARSER_STATES = sys.modules[_multipart.MultipartParser.__module__].MultipartState  # python-multipart's

Run = Callable[..., Awaitable[Any]]  # run(fn, *args): fn(*args) off the event loop


class ThreadCpu:
    """The CPU time a thread has spent on one job: read from the event loop while the job runs, kept when it ends.
    None where the platform has no per-thread CPU clock (not Linux, macOS)."""

    def __init__(self):
        self._clock: int | None = None
        self._start = 0.0
        self._spent: float | None = None

    def begin(self) -> None:
        """In the job's thread, before the job."""
        if hasattr(time, "pthread_getcpuclockid"):
            self._clock = time.pthread_getcpuclockid(threading.get_ident())
            self._start = time.clock_gettime(self._clock)

    def end(self) -> None:
        """In the job's thread, after the job."""
        self._spent = self.seconds()

    def seconds(self) -> float | None:
        if self._spent is not None:
            return self._spent
        if self._clock is None:
            return None
        try:
            return time.clock_gettime(self._clock) - self._start
        except OSError:  # the thread has gone (the pool shut down)
            return None


@dataclass(frozen=True)
class Job:
    """A job submitted to an Offload: `started` once a thread runs it; `result` its outcome (cancelling it
    before it starts takes it off the queue); `cpu` the CPU time its thread has spent on it."""

    started: asyncio.Event
    result: asyncio.Future
    cpu: ThreadCpu


class Offload:
    """A few worker threads of one ingress replica for CPU work that must not run on its event loop:
    parsing request bodies, encoding large JSON replies; decoding, pasting and encoding images (a second
    instance, serve.service.RemovalService.cpu).

    `workers` bounds the threads; `limit` bounds the jobs queued or running (a caller past it waits on
    the loop, holding no thread). A job's slot is freed when the job ends, not when its caller gives up,
    so a flood of cancelled requests cannot pile up work behind the limit."""

    def __init__(self, workers: int, limit: int, nice: int = 0, name: str = "rorem-offload"):
        self.workers = workers
        self.limit = limit
        self.name = name
        self.nice = nice  # serve.worker_threads: the threads run this many steps below the event loop
        self._pool: ThreadPoolExecutor | None = None  # created on first use, in the replica
        self._slots: asyncio.Semaphore | None = None

    async def run(self, fn: Callable[..., Any], /, *args: Any) -> Any:
        return await (await self.start(fn, *args)).result

    async def start(self, fn: Callable[..., Any], /, *args: Any) -> Job:
        """Wait for a slot and submit the job. Its `started` is set once a thread runs it (a job may wait for a
        thread when the slots outnumber the threads), so a deadline can count the job's own time alone."""
        if self._pool is None:
            self._pool = worker_pool(self.workers, self.name, self.nice)
            self._slots = asyncio.Semaphore(self.limit)
        await self._slots.acquire()
        loop = asyncio.get_running_loop()
        started = asyncio.Event()
        cpu = ThreadCpu()

        def call():
            cpu.begin()
            loop.call_soon_threadsafe(started.set)
            try:
                return fn(*args)
            finally:
                cpu.end()

        try:
            job = self._pool.submit(call)
        except BaseException:
            self._slots.release()
            raise
        slots = self._slots

        def free(_job) -> None:
            try:
                loop.call_soon_threadsafe(slots.release)
            except RuntimeError:  # the loop has closed (shutdown): nobody waits for the slot
                pass

        job.add_done_callback(free)
        return Job(started, asyncio.wrap_future(job), cpu)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


async def read_removal_request(
    request: Request, max_upload_bytes: int, run: Run = asyncio.to_thread, body_timeout_s: float | None = None
) -> RemovalRequest:
    """`run(fn, *args)` runs the parsing off the event loop (the ingress passes its `Offload.run`); the body
    must have arrived within `body_timeout_s` (None: no deadline)."""
    names = ("image", "mask")
    files, options = await _read_upload(
        request, max_upload_bytes, names, ("image",), RemoveOptions, JSONRemoveBody, run, body_timeout_s
    )
    return RemovalRequest(image=files["image"], mask=files.get("mask"), options=options)


async def read_score_request(
    request: Request, max_upload_bytes: int, run: Run = asyncio.to_thread, body_timeout_s: float | None = None
) -> ScoreRequest:
    names = ("source", "mask", "edited")
    files, options = await _read_upload(
        request, max_upload_bytes, names, names, ScoreOptions, JSONScoreBody, run, body_timeout_s
    )
    return ScoreRequest(source=files["source"], mask=files["mask"], edited=files["edited"], options=options)


async def read_json(
    request: Request, model: type[BaseModel], limit: int = _JSON_OVERHEAD, body_timeout_s: float | None = None
):
    """A small JSON document (POST /feedback): bounded read, then the same problems as /remove's JSON."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise Problem("unsupported-media-type", f"send application/json, not {_sent_type(content_type)}")
    return validate(model, _json_object(await _read_body(request, limit, body_timeout_s))[0])


def _sent_type(content_type: str) -> str:
    return content_type or "a body without a Content-Type"


def largest_json_body(max_upload_bytes: int) -> int:
    """The largest body read at all: a JSON one, whose base64 files are 4/3 of their bytes (the proxy's limit
    too, serve.proxy_limits)."""
    return max_upload_bytes * 4 // 3 + _JSON_OVERHEAD


async def _read_upload(request, max_upload_bytes, names, required, options_model, json_model, run: Run, timeout_s):
    if request.query_params:  # refused before the body is read: a `?seed=7` went unread and the answer said nothing
        problem = invalid_request([], [f"query.{key}" for key in dict.fromkeys(request.query_params)])
        problem.detail += "; no query parameter is read: send the options as form fields or JSON keys"
        raise problem
    header = request.headers.get("content-type", "")
    content_type = header.split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        why = f"imaging.max_upload_bytes {max_upload_bytes} for the files, plus {_JSON_OVERHEAD} for the form"
        chunks = await _read_chunks(request, max_upload_bytes + _JSON_OVERHEAD, timeout_s, why)
        files, options = await run(_from_multipart, header, chunks, names, required, options_model)
    elif content_type == "application/json":
        why = f"imaging.max_upload_bytes {max_upload_bytes} for the files, as base64, plus {_JSON_OVERHEAD} for the JSON"
        chunks = await _read_chunks(request, largest_json_body(max_upload_bytes), timeout_s, why)
        files, options = await run(_from_json, chunks, names, options_model, json_model)
    else:
        raise Problem(
            "unsupported-media-type",
            f"send multipart/form-data (file fields {', '.join(names)}) or application/json, "
            f"not {_sent_type(content_type)}",
        )
    check_upload_size(sum(len(f) for f in files.values()), max_upload_bytes)
    return files, options


async def _read_body(request: Request, limit: int, timeout_s: float | None = None) -> bytes:
    return b"".join(await _read_chunks(request, limit, timeout_s))


async def _read_chunks(request: Request, limit: int, timeout_s: float | None = None, why: str = "") -> list[bytes]:
    """Refuse by Content-Length before reading, stop reading once past the limit, and give up (408) on a body
    still arriving `timeout_s` after the read began. The chunks as they came: joining them (a copy of the
    whole body) is left to the worker thread. `why`: where the limit comes from, for the 413's detail (a number no
    setting holds told the client nothing)."""
    why = f" ({why})" if why else ""
    declared = request.headers.get("content-length")
    if declared and declared.isascii() and declared.isdigit() and int(declared) > limit:  # not '²'
        raise Problem("payload-too-large", f"request body is {declared} bytes; the limit is {limit}{why}")
    chunks, size = [], 0
    loop = asyncio.get_running_loop()
    deadline = None if timeout_s is None else loop.time() + timeout_s
    stream = request.stream().__aiter__()
    while True:
        try:
            if deadline is None:
                chunk = await stream.__anext__()
            else:
                chunk = await asyncio.wait_for(stream.__anext__(), timeout=max(deadline - loop.time(), 0.0))
        except StopAsyncIteration:
            break
        except asyncio.TimeoutError as exc:
            raise Problem(
                "body-timeout", f"{size} bytes of the body arrived in {timeout_s:g} s (overload.body_timeout_s)"
            ) from exc
        size += len(chunk)
        if size > limit:
            raise Problem("payload-too-large", f"request body exceeds the limit of {limit} bytes{why}")
        chunks.append(chunk)
    if size == 0:
        raise Problem("invalid-request", "the request body is empty")
    return chunks


class _File:
    """A file part's bytes (where starlette's form has an UploadFile)."""

    def __init__(self, data: bytes):
        self.data = data


class _BytesMultiPartParser(MultiPartParser):
    """Starlette's multipart parser (its callbacks: limits, field names, error messages) fed from the body
    already in memory, synchronously, in STEP-sized writes, keeping file parts in memory (no spooling)."""

    def __init__(self, max_files: int, max_fields: int, file_names: tuple[str, ...] = ()):
        super().__init__(Headers(), None, max_files=max_files, max_fields=max_fields)  # type: ignore[arg-type]
        self._pieces: list[bytes] = []  # the current file part's data
        self._file_names = file_names

    def on_part_begin(self) -> None:
        super().on_part_begin()
        self._pieces = []

    def on_headers_finished(self) -> None:
        super().on_headers_finished()
        if self._current_part.file is not None:  # a file part: its bytes go to _pieces, not to a spool file
            self._current_part.file.file.close()
            self._files_to_close_on_error.clear()
        elif self._current_part.field_name in self._file_names:  # `curl -F image=<photo.jpg`: no filename
            # said before its data is read: past 1 MB a text field is "Part exceeded maximum size"
            name = self._current_part.field_name
            raise invalid_field(name, f"{name!r} must be sent as a file part, not a text field")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._current_part.file is None:
            super().on_part_data(data, start, end)  # a text field, with starlette's max_part_size
        else:
            self._pieces.append(data[start:end])

    def on_part_end(self) -> None:
        part = self._current_part
        if part.file is None:
            super().on_part_end()
        else:
            self.items.append((part.field_name, _File(b"".join(self._pieces))))
            self._pieces = []

    def parse_body(self, content_type: str, body: bytes | list[bytes]) -> list[tuple[str, str | _File]]:
        """MultiPartParser.parse, synchronous, over `body` (bytes, or the chunks as read)."""
        _, params = parse_options_header(content_type)
        charset = params.get(b"charset", "utf-8")
        if isinstance(charset, bytes):
            charset = charset.decode("latin-1")
        try:
            self._charset = codecs.lookup(charset).name
        except LookupError:
            self._charset = "latin-1"
        if self._charset in _CODECS_RAISING_PLAIN_UNICODE_ERROR:  # treated as unknown, as starlette treats those
            self._charset = "latin-1"
        try:
            boundary = params[b"boundary"]
        except KeyError:
            raise MultiPartException("Missing boundary in multipart.")
        _check_delimiters(body, boundary, self.max_files, self.max_fields)
        callbacks = {
            "on_part_begin": self.on_part_begin,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_end": self.on_end,
        }
        try:
            parser = _multipart.MultipartParser(boundary, callbacks)
            for chunk in [body] if isinstance(body, bytes) else body:
                for start in range(0, len(chunk), STEP):
                    parser.write(chunk[start : start + STEP])
            parser.write(b"")  # as starlette's cached-body stream ends
            parser.finalize()
        except FormParserError as exc:
            raise MultiPartException("Invalid multipart data.") from exc
        if parser.state not in (_PARSER_STATES.START, _PARSER_STATES.END):
            # starlette takes a body cut before its closing boundary, less its unfinished last part: a cut mask
            # was then the image's alpha, a cut seed a random one
            raise MultiPartException("the body ends before its closing boundary (cut short?)")
        return self.items


def _check_delimiters(body: bytes | list[bytes], boundary: bytes, max_files: int, max_fields: int) -> None:
    """Refuse a body with more delimiters (CRLF "--" boundary) than the parts taken have: one before each (the first
    part's only where a preamble ends in CRLF) and the close-delimiter. RFC 2046 forbids one inside a part's data,
    where python-multipart steps through it and the byte after it a byte at a time in Python: 29 MB of
    "\\r\\n--A\\r" with boundary A took 3.6 s of the parsing thread (an ordinary 29 MB part: 0.02 s)."""
    most = max_files + max_fields + 1
    delimiter = b"\r\n--" + boundary
    if _more_than(body, delimiter, most):
        raise MultiPartException(
            f"Too many fields or files: more than {most} boundary delimiters, for at most {most - 1} parts (and a"
            " part's data may not hold its boundary: RFC 2046)"
        )
    if _long_padding(body, delimiter):
        raise MultiPartException(
            f"a boundary delimiter is followed by more than {MAX_TRANSPORT_PADDING} spaces or tabs before its CRLF"
            " (RFC 2046's transport padding)"
        )


MAX_TRANSPORT_PADDING = 64  # bytes of space or tab RFC 2046 lets follow a delimiter; no client sends more than a few


def _long_padding(body: bytes | list[bytes], delimiter: bytes) -> bool:
    """Whether a delimiter is followed by more than MAX_TRANSPORT_PADDING spaces or tabs: python-multipart steps
    through transport padding a byte at a time in Python (29 MB of spaces after one delimiter: 6.6 s of the
    parsing thread, an ordinary 29 MB part 0.03 s)."""
    padded = re.compile(re.escape(delimiter) + rb"[ \t]{%d}" % (MAX_TRANSPORT_PADDING + 1))
    seams = _seams(body, len(delimiter) + MAX_TRANSPORT_PADDING + 1)
    return any(padded.search(seam) or padded.search(chunk) for seam, chunk in seams)


# The standard codecs whose decoding fails with a plain UnicodeError rather than a UnicodeDecodeError (found by
# decoding random bytes with every codec in `encodings`): starlette's field decoding catches only the latter and
# LookupError, so a body declaring one of them was a 500.
_CODECS_RAISING_PLAIN_UNICODE_ERROR = frozenset({"punycode", "idna", "undefined"})


def _multipart_items(
    content_type: str, body: bytes | list[bytes], max_files: int, max_fields: int, file_names: tuple[str, ...] = ()
) -> list:
    """What starlette's `request.form(max_files=, max_fields=)` yields for this body, in order: (name, str) for
    a text field, (name, _File) for a file; the same MultiPartException where it raises one. A text field named
    as one of `file_names` is refused (422) at its headers; a body cut before its closing boundary (400)."""
    media_type, _ = parse_options_header(content_type)
    if media_type != b"multipart/form-data":  # starlette: an empty form
        return []
    return _BytesMultiPartParser(max_files, max_fields, file_names).parse_body(content_type, body)


def _from_multipart(content_type: str, body: bytes | list[bytes], names, required, options_model):
    try:
        # one file more than the route takes: a stray file gets its own 422 below, not "Too many files"
        items = _multipart_items(content_type, body, max_files=len(names) + 1, max_fields=16, file_names=tuple(names))
    except MultiPartException as exc:
        if exc.message.startswith("Too many files"):  # starlette's count is ours plus one: name the route's
            raise Problem("invalid-request", f"more file parts than the route's: the files are {', '.join(names)}")
        raise Problem("malformed-body", f"cannot parse the multipart body: {exc.message}") from exc
    files: dict[str, bytes] = {}
    fields: dict[str, str] = {}
    for key, value in items:
        if key in files or key in fields:
            raise invalid_field(key, f"field {key!r} is given more than once")
        if isinstance(value, _File):
            files[key] = value.data
        else:
            fields[key] = value
    unknown = sorted(set(files) - set(names))
    if unknown:
        raise Problem(
            "invalid-request",
            f"unknown file fields: {unknown}; the files are {', '.join(names)}",
            errors=[{"field": key, "message": "unknown file field"} for key in unknown[:MAX_LISTED]],
        )
    for name in required:
        if name not in files:
            raise Problem(
                "invalid-request",
                f"the multipart body has no {name!r} file",
                errors=[{"field": name, "message": "Field required"}],
            )
    return files, form_options(options_model, fields)


def _from_json(body: bytes | list[bytes], names, options_model, json_model):
    body = body if isinstance(body, bytes) else b"".join(body)
    check_json_start(body)
    check_scalar_fields(body, json_model)
    data, lifted = _json_object(body, names)
    parsed = validate(json_model, data)  # a lifted file field holds its placeholder: any str validates alike
    options = options_model.model_validate(parsed.model_dump(exclude=set(names)))
    files = {}
    for name in names:
        if name in lifted:  # the base64 text, straight from the body (never a str of its own)
            files[name] = _b64decode_payload(memoryview(body)[slice(*lifted[name])], name)
        elif getattr(parsed, name) is not None:
            files[name] = _b64decode(getattr(parsed, name), name)
    return files, options


_JSON_SPACE = re.compile(rb"[ \t\n\r]*")
_JSON_VALUE_STARTS = frozenset(b'{["-0123456789tfn')


def check_json_start(body: bytes) -> None:
    """A body whose first byte begins no JSON value is not JSON: 400 malformed-body, where the field count below
    would call a large binary body an object with too many quotes."""
    at = _JSON_SPACE.match(body, 3 if body.startswith(b"\xef\xbb\xbf") else 0).end()  # a BOM, as json.loads allows
    if at < len(body) and body[at] not in _JSON_VALUE_STARTS:
        raise Problem("malformed-body", f"the body is not JSON: it begins with byte {body[at]:#04x}, not '{{'")


def check_scalar_fields(body: bytes, json_model: type[BaseModel]) -> None:
    """A /remove or /score body is one object of at most F scalar fields: 4 F quotes (a key and a string value
    each) and 2 F commas (one between members, one in a data URL's prefix), plus room for a repeated key or a
    quoted data URL parameter. A body with more holds lists or unknown members and fails validation anyway; it
    is refused before the parse, which such a body makes expensive (40 MB of empty strings: 5.8 s of CPU in one
    replica's parsing thread, and a 0.8 s GIL hold).
    Found by memchr-speed `find` over at most STEP bytes a call, stopping at the first bound passed: a few ms
    for a 25 MB body (counting every byte took ~45 ms)."""
    fields = len(json_model.model_fields)
    for char, most, what in ((b'"', 4 * fields + 16, "quotes"), (b",", 2 * fields + 8, "commas")):
        if _more_than(body, char, most):
            raise Problem(
                "invalid-request",
                f"the JSON body must be one object of at most {fields} fields, each a string, number or boolean:"
                f" this one has more than {most} {what}",
            )


def _seams(body: bytes | list[bytes], match_length: int):
    """Each chunk of `body` (bytes, or the chunks as read) with the seam before it: the last bytes of what came
    before and the chunk's first, each one byte shorter than a match, so that a match across the seam is in it
    and no match within one side is (b"" before the first chunk)."""
    reach, carry = match_length - 1, b""
    for chunk in [body] if isinstance(body, bytes) else body:
        yield (carry + chunk[:reach] if carry else b""), chunk
        carry = (carry + chunk[-reach:])[-reach:] if reach else b""


def _more_than(body: bytes | list[bytes], needle: bytes, most: int) -> bool:
    """Whether `body` (bytes, or the chunks as read) holds more than `most` of `needle` (not overlapping), found
    STEP bytes a call, stopping once past `most`. Each window is widened by the needle's length less one; one across
    a chunk's seam is found once."""
    found, reach = 0, len(needle) - 1
    for seam, chunk in _seams(body, len(needle)):
        found += seam.count(needle)
        at = 0
        while at < len(chunk) and found <= most:
            hit = chunk.find(needle, at, at + STEP + reach)
            if hit < 0:
                at += STEP
                continue
            found += 1
            at = hit + len(needle)
        if found > most:
            return True
    return False


def _json_object(body: bytes, keep: tuple[str, ...] = ()) -> tuple[dict, dict[str, tuple[int, int]]]:
    try:
        data, lifted = _loads_lifted(body, keep)
    except RepeatedKey as exc:
        raise invalid_field(exc.args[0], f"field {exc.args[0]!r} is given more than once") from exc
    except (ValueError, RecursionError) as exc:  # RecursionError: nesting deeper than the parser's stack
        raise Problem("malformed-body", f"the body is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise Problem("invalid-request", "the JSON body must be an object")
    return data, lifted


def _loads(body: bytes) -> Any:
    """json.loads(body), a top-level key given twice refused: else the same value, or the same exception (see
    _loads_lifted)."""
    return _loads_lifted(body)[0]


def _loads_stepwise(body: bytes) -> Any:
    """json.loads(body), a top-level key given twice refused (RepeatedKey), with one C call per key and per value of
    a top-level object, not one over the whole body. 100000 small keys (1.4 MB) in one call held the GIL 50-260 ms
    (by load).

    The object goes through the json module's own Python object parser (JSONDecoder.parse_object), given its C
    scanner for the values: json.loads's parse, member by member. Left whole: one huge value (a long string,
    a nested container, whose own repeated keys keep json.loads's last-one-counts), and the body's decoding to str
    (memcpy speed for ASCII)."""
    text = str(body, json.detect_encoding(body), "surrogatepass")  # as json.loads decodes bytes
    decoder = _DECODER
    start = json.decoder.WHITESPACE.match(text).end()
    if text[start : start + 1] != "{":
        return decoder.decode(text)
    value, end = decoder.parse_object(
        (text, start + 1), decoder.strict, decoder.scan_once, decoder.object_hook, _unique_keys, {}
    )
    end = json.decoder.WHITESPACE.match(text, end).end()
    if end != len(text):
        raise json.JSONDecodeError("Extra data", text, end)
    return value


def _loads_lifted(body: bytes, keep: tuple[str, ...] = ()) -> tuple[Any, dict[str, tuple[int, int]]]:
    """json.loads(body) as _loads_stepwise takes it, without one C call over the base64 strings: the same value or
    the same exception.

    Long runs of the base64 alphabet in string literals are cut out (see _long_runs) and replaced by
    placeholders `~i~`; json.loads parses the small rest, and the runs go back into the strings
    that hold the placeholders. When that parse succeeds, every placeholder stood inside a string literal
    and not after a backslash (`~` is valid nowhere else), so each run was plain text of the same string in
    the original. Bodies that could confuse the placeholders (any `~`; any backslash, so no escapes at all)
    and any failure take json.loads over the original body, which gives the reference value or error.

    Top-level keys named in `keep` whose string is one run (+ '=' padding), or a data URL of one, keep their
    placeholder; the second value maps each such key to the (start, end) of its base64 text in `body`."""
    # body[1:2] == b"\x00": UTF-16 / UTF-32 (json.detect_encoding), where a byte run is not a run of characters
    if len(body) < STEP or body[:1] != b"{" or body[1:2] == b"\x00" or b"~" in body or b"\\" in body:
        return _loads_stepwise(body), {}
    runs = _long_runs(body)
    if not runs:
        return _loads_stepwise(body), {}
    pieces, last = [], 0
    for index, (start, end) in enumerate(runs):
        pieces += [body[last:start], b"~%d~" % index]
        last = end
    pieces.append(body[last:])
    texts: dict[int, str] = {}

    def text(index: int) -> str:
        if index not in texts:
            start, end = runs[index]
            texts[index] = str(memoryview(body)[start:end], "ascii")
        return texts[index]

    def restore(value: Any) -> Any:
        if isinstance(value, str):
            if "~" not in value:
                return value
            whole = _PLACEHOLDER.fullmatch(value)
            return text(int(whole[1])) if whole else _PLACEHOLDER.sub(lambda m: text(int(m[1])), value)
        if isinstance(value, dict):
            return {restore(k): restore(v) for k, v in value.items()}
        if isinstance(value, list):
            return [restore(v) for v in value]
        return value

    def restore_top(value: Any) -> tuple[Any, dict[str, tuple[int, int]]]:
        if not isinstance(value, dict):
            return restore(value), {}
        out, lifted = {}, {}
        for key, item in value.items():
            key = restore(key)
            lifted.pop(key, None)  # two long placeholders of one text as keys: the last one counts
            match = _LIFTED_VALUE.fullmatch(item) if key in keep and isinstance(item, str) else None
            if match:
                out[key] = item
                start, end = runs[int(match["index"])]
                lifted[key] = (start, end + len(match["padding"]))  # no escapes: the string is the body's bytes
            else:
                out[key] = restore(item)
        return out, lifted

    try:
        return restore_top(_loads_stepwise(b"".join(pieces)))
    except RepeatedKey:  # placeholders are numbered apart: the body itself repeats the key
        raise
    except Exception:  # not the common shape (or nested past the stack): the reference answer
        return _loads_stepwise(body), {}


def _long_runs(body: bytes) -> list[tuple[int, int]]:
    """(start, end) of the base64 text in each string literal of `body` at least _LIFT_MIN long: the literal's
    bytes after a short `data:...,` prefix, before any '=' padding, where all are of the base64 alphabet.

    For a body without backslashes (see _loads_lifted), where a string cannot hold a quote, quotes pair up
    into literals; in a body that is not valid JSON they may pair up wrongly, and then the placeholders land
    outside strings and the parse of the lifted body fails, as it should. Quotes are found by memchr-speed
    `find`, and the alphabet is checked STEP bytes at a time."""
    runs, at = [], 0
    while (opening := body.find(b'"', at)) >= 0 and (closing := body.find(b'"', opening + 1)) >= 0:
        at = closing + 1
        if closing - opening - 1 < _LIFT_MIN:
            continue
        start = opening + 1
        comma = body.find(b",", start, start + 256)  # a data URL's prefix (data:image/png;base64,)
        if comma >= 0:
            start = comma + 1
        end = closing
        while end > start and body[end - 1] == 0x3D:  # '='
            end -= 1
        if end - start >= _LIFT_MIN and not any(
            body[step : min(step + STEP, end)].translate(None, _B64_ALPHABET) for step in range(start, end, STEP)
        ):
            runs.append((start, end))
    return runs


def _b64decode(text: str, field: str) -> bytes:
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    return _b64decode_payload(text, field)


def _b64decode_payload(text: str | memoryview, field: str) -> bytes:
    try:
        return b64decode_stepwise(text)
    except (binascii.Error, ValueError) as exc:
        raise invalid_field(field, f"{field!r} is not valid base64: {exc}") from exc


def b64decode_stepwise(text: str | memoryview) -> bytes:
    """base64.b64decode(text, validate=True), STEP characters per C call: the same bytes or the same exception.

    Canonical base64 (alphabet only, at most two '=' at the end, a length of whole quads) is checked and
    decoded in quad-aligned steps; anything else goes to b64decode itself, whose answer is the reference.
    `text` is a str, or a memoryview of ASCII bytes (the same answer as for their str)."""
    if len(text) <= STEP or len(text) % 4:
        return base64.b64decode(text, validate=True)
    tail = text[-2:] if isinstance(text, str) else text[-2:].tobytes().decode("latin-1")
    padding = 2 if tail == "==" else 1 if tail.endswith("=") else 0
    digits, parts = len(text) - padding, []
    for start in range(0, len(text), STEP):
        piece = text[start : start + STEP]
        try:
            chunk = piece.encode("ascii") if isinstance(piece, str) else piece.tobytes()
        except UnicodeEncodeError:
            return base64.b64decode(text, validate=True)
        if chunk[: digits - start].translate(None, _B64_ALPHABET):  # a character outside the alphabet
            return base64.b64decode(text, validate=True)
        parts.append(binascii.a2b_base64(chunk))
    return b"".join(parts)


def b64encode_pieces(data: bytes) -> list[bytes]:
    """base64.b64encode(data) in pieces (joined, the same bytes), STEP output bytes per C call."""
    step, view = STEP // 4 * 3, memoryview(data)
    return [binascii.b2a_base64(view[at : at + step], newline=False) for at in range(0, len(data), step)]
