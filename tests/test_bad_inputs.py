"""A corpus of bad, odd and hostile inputs, over REST and gRPC, against one local Serve (tiny bundle).

CASES is the table: what a client sends and the one right answer. A success is a valid image of the input's
size whose pixels outside the dilated mask are those of the input; anything else is a specific 4xx
problem+json (on gRPC: the mapped status code, the same problem document in the status details). No case may
be answered with a 5xx, and after the whole corpus the service is still ready and still removes.

docs/reliability.md ("## Bad input") shows the same table; `python -m tests.test_bad_inputs` prints it.
"""

from __future__ import annotations

import base64
import functools
import http.client
import json
import math
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from engines.imaging import DecodeLimits, decode_image
from serve import rorem_pb2 as pb
from serve.grpc_api import status_code
from serve.grpc_client import problem_of, stub
from serve.problems import Problem
from tests.helpers import PROBLEM, encoded, photo, png_bytes, png_declaring_size

REPO = Path(__file__).resolve().parent.parent
REFERENCE = DecodeLimits(max_bytes=2**31, max_megapixels=1000)  # for decoding in the checks, not the service's
MiB = 1024 * 1024
H, W = 48, 64  # small images: most cases never reach the model, and the ones that do stay quick
DILATE = 3
REMOVE = {"dilate": DILATE, "gate": "off", "seed": 7, "output_format": "png"}  # png out: pixels can be compared
SUCCESS = ("removed", "unchanged")


@dataclass(frozen=True)
class Sent:
    files: dict[str, bytes]  # the uploads by field name: multipart file parts, protobuf bytes fields
    removed: np.ndarray | None = None  # where the request asks for removal, for the checks of a success


@dataclass
class Answer:
    status: int  # HTTP status; on gRPC 200 for OK, else the `status` of the problem document
    media_type: str | None
    problem: dict | None
    image: bytes | None
    gate: str | None
    grpc_code: grpc.StatusCode | None = None


@dataclass(frozen=True)
class Case:
    name: str
    status: int
    expect: str  # "removed", "unchanged" (200), or the problem type's last segment
    build: Callable[[], Sent] = lambda: Sent({})
    options: dict = field(default_factory=dict)
    grpc_options: dict | None = None  # gRPC fields are typed: where its values differ from REST's
    rest: Callable[..., httpx.Response | Answer] | None = None  # a REST request other than multipart of build()
    grpc: bool = True  # False: the case has no gRPC form (content types, JSON, HTTP framing)
    route: str = "/remove"
    detail: str = ""  # a phrase the problem's detail must contain


# --- inputs -------------------------------------------------------------------------------------


def box(height: int = H, width: int = W) -> np.ndarray:
    mask = np.zeros((height, width), bool)
    mask[16:32, 20:40] = True
    return mask


def gray(mask: np.ndarray) -> bytes:
    return png_bytes(mask.astype(np.uint8) * 255)


def with_box(image: bytes, height: int = H, width: int = W) -> Sent:
    return Sent({"image": image, "mask": gray(box(height, width))}, box(height, width))


def unmasked(image: bytes, height: int = H, width: int = W) -> Sent:
    return Sent({"image": image, "mask": gray(np.zeros((height, width), bool))}, np.zeros((height, width), bool))


def photo_png() -> bytes:
    return png_bytes(photo(H, W))


def photo_as(fmt: str, mode: str = "RGB", **params) -> bytes:
    return encoded(Image.fromarray(photo(H, W)).convert(mode), fmt, **params)


def truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def blank_png(width: int, height: int) -> bytes:
    """A real, valid, all-black 1-bit PNG: zlib squeezes its rows about 1000-fold (20000x20000: ~50 KB)."""
    row = b"\0" * (1 + (width + 7) // 8)
    squeeze = zlib.compressobj(9)
    pixels = b"".join(squeeze.compress(row) for _ in range(height)) + squeeze.flush()

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def jpeg_declaring_size(width: int, height: int) -> bytes:
    """An 8x8 JPEG whose frame header (SOF0) claims another size."""
    data = bytearray(encoded(Image.new("RGB", (8, 8)), "JPEG"))
    start = data.index(b"\xff\xc0")
    data[start + 5 : start + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def exif_rotated_jpeg() -> bytes:
    """Stored 64 wide x 48 high; EXIF orientation 6 shows it turned: 48 wide x 64 high."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return photo_as("JPEG", exif=exif.tobytes())


def animated(fmt: str) -> bytes:
    frames = [Image.fromarray(photo(H, W)), Image.new("RGB", (W, H), (0, 0, 255))]
    return encoded(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)


def sixteen_bit_png() -> bytes:
    return png_bytes(np.arange(H * W, dtype=np.uint16).reshape(H, W) * 21)


def palette_png_with_transparency() -> bytes:
    quantized = Image.fromarray(photo(H, W)).quantize(16)
    indices = np.asarray(quantized).copy()
    indices[:, :8] = 15  # a transparent band on the left
    image = Image.fromarray(indices, mode="P")
    image.putpalette(quantized.getpalette())
    return encoded(image, transparency=15)


def anti_aliased() -> Sent:
    soft = np.rint(ndimage.gaussian_filter(box().astype(np.float32) * 255, sigma=2)).astype(np.uint8)
    assert 0 < np.count_nonzero((soft > 0) & (soft < 255)), "the edges must have intermediate values"
    return Sent({"image": photo_png(), "mask": png_bytes(soft)}, soft > 127)


def strokes_on_transparent_layer() -> Sent:
    rgba = np.zeros((H, W, 4), np.uint8)  # black strokes: only their alpha says where
    rgba[box(), 3] = 255
    return Sent({"image": photo_png(), "mask": png_bytes(rgba)}, box())


def alpha_as_mask(alpha_inside: int, alpha_outside: int = 255) -> Callable[[], Sent]:
    def build() -> Sent:
        alpha = np.where(box(), alpha_inside, alpha_outside).astype(np.uint8)
        return Sent({"image": png_bytes(np.dstack([photo(H, W), alpha]))}, alpha < 128)

    return build


def exif_with_upright_mask() -> Sent:
    upright = np.zeros((W, H), bool)  # 48 wide, 64 high
    upright[20:40, 10:30] = True
    return Sent({"image": exif_rotated_jpeg(), "mask": gray(upright)}, upright)


def strip(width: int, masked_width: int) -> Sent:
    """A 1-pixel-high image: its square model window is `width` on a side, almost all of it outside the image."""
    rgb = np.random.default_rng(0).integers(0, 256, (1, width, 3), dtype=np.uint8)
    mask = np.zeros((1, width), bool)
    mask[:, :masked_width] = True
    return Sent({"image": png_bytes(rgb), "mask": gray(mask)}, mask)


def score_triple(source=photo_png, mask=lambda: gray(box()), edited=photo_png) -> Callable[[], Sent]:
    return lambda: Sent({"source": source(), "mask": mask(), "edited": edited()})


# --- REST requests other than a plain multipart of the case's files ----------------------------


def raw(content: bytes | Callable[[], object], content_type: str | None):
    def send(service, case, sent):
        headers = {"content-type": content_type} if content_type else {}
        return service.client.post(case.route, content=content() if callable(content) else content, headers=headers)

    return send


def as_json(document: Callable[[Sent], object]):
    def send(service, case, sent):
        return service.client.post(case.route, json=document(sent))

    return send


def multipart(files: Callable[[Sent], list], fields: dict[str, str | list[str]], query: dict | None = None):
    def send(service, case, sent):
        return service.client.post(case.route, files=files(sent), data=fields, params=query)

    return send


def json_text(document: Callable[[Sent], str]):
    """A JSON body as written (as_json cannot repeat a key)."""

    def send(service, case, sent):
        return service.client.post(case.route, content=document(sent), headers={"content-type": "application/json"})

    return send


def multipart_cut_inside_the_mask(service, case, sent):
    """The image part whole, the mask part cut in half, no closing boundary: a connection dropped mid-upload."""
    head = 'Content-Disposition: form-data; name="{}"; filename="{}.png"\r\nContent-Type: image/png\r\n\r\n'
    body = b"--b0undary\r\n" + head.format("image", "image").encode() + sent.files["image"]
    body += b"\r\n--b0undary\r\n" + head.format("mask", "mask").encode() + sent.files["mask"][: len(sent.files["mask"]) // 2]
    headers = {"content-type": "multipart/form-data; boundary=b0undary"}
    return service.client.post(case.route, content=body, headers=headers)


def declared_length(declared: int, content: bytes):
    """A body whose Content-Length header lies (httpx would correct it, so http.client writes the request)."""

    def send(service, case, sent):
        url = httpx.URL(service.url)
        connection = http.client.HTTPConnection(url.host, url.port, timeout=60)
        try:
            connection.putrequest("POST", case.route)
            connection.putheader("Content-Type", "application/json")
            connection.putheader("Content-Length", str(declared))
            connection.putheader("Connection", "close")  # else the proxy reads the rest as a next request
            connection.endheaders()
            connection.send(content)
            response = connection.getresponse()
            media_type = response.getheader("content-type", "")
            body = response.read()
        finally:
            connection.close()
        problem = json.loads(body) if media_type == PROBLEM else None
        return Answer(response.status, media_type, problem, None, None)

    return send


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def b64_files(sent: Sent) -> dict:
    return {name: b64(data) for name, data in sent.files.items()}


def chunks_of(total: int, size: int = MiB):
    return lambda: (b"A" * size for _ in range(total // size))


def image_and(*extra: tuple) -> Callable[[Sent], list]:
    return lambda sent: [("image", ("image.png", sent.files["image"])), *extra]


# --- the table ----------------------------------------------------------------------------------


def valid_pair() -> Sent:
    return with_box(photo_png())


def options_case(name: str, rest_value, grpc_value=None) -> Case:
    """A valid image and mask with one option out of range; grpc_value None: protobuf cannot carry the value."""
    option = name.split()[0]
    grpc_options = None if grpc_value is None else {option: grpc_value}
    return Case(
        name, 422, "invalid-request", valid_pair, {option: rest_value}, grpc_options, grpc=grpc_value is not None
    )


# fmt: off
CASES: list[Case] = [
    # HTTP framing and content types (REST only)
    Case("empty body", 422, "invalid-request", rest=raw(b"", "multipart/form-data; boundary=x"), grpc=False,
         detail="empty"),
    Case("no content type", 415, "unsupported-media-type", rest=raw(b"image", None), grpc=False),
    Case("text/plain body", 415, "unsupported-media-type", rest=raw(b"hello", "text/plain"), grpc=False),
    Case("image bytes as the body (image/png)", 415, "unsupported-media-type", rest=raw(photo_png(), "image/png"),
         grpc=False),
    Case("form-urlencoded body", 415, "unsupported-media-type",
         rest=raw(b"image=abc", "application/x-www-form-urlencoded"), grpc=False),
    Case("chunked body over the limit, no Content-Length", 413, "payload-too-large",
         rest=raw(chunks_of(9 * MiB), "application/json"), grpc=False),
    Case("Content-Length shorter than the body", 400, "malformed-body",
         rest=declared_length(5, b'{"image": "AAAA"}'), grpc=False),
    Case("Content-Length declaring 10 GB", 413, "payload-too-large",
         rest=declared_length(10 * 1024**3, b'{"image": "AAAA"}'), grpc=False),
    # multipart (REST only)
    Case("multipart without a boundary", 400, "malformed-body", rest=raw(b"--x--", "multipart/form-data"),
         grpc=False),
    Case("multipart that is not multipart", 400, "malformed-body",
         rest=raw(b"garbage", "multipart/form-data; boundary=x"), grpc=False),
    Case("multipart cut short inside its mask part", 400, "malformed-body", valid_pair,
         rest=multipart_cut_inside_the_mask, grpc=False, detail="closing boundary"),
    Case("multipart: mask as a text field", 422, "invalid-request", valid_pair,
         rest=multipart(image_and(), {"mask": "white"}), grpc=False, detail="file part"),
    Case("multipart: an option given twice", 422, "invalid-request", valid_pair,
         rest=multipart(image_and(), {"seed": ["1", "2"]}), grpc=False, detail="more than once"),
    Case("multipart: options in the query string (?seed=7&gate=off)", 422, "invalid-request", valid_pair,
         rest=multipart(image_and(), {}, query={"seed": "7", "gate": "off"}), grpc=False,
         detail="unknown fields: 'query.seed', 'query.gate'; no query parameter is read"),
    Case("multipart: the image file given twice", 422, "invalid-request", valid_pair,
         rest=multipart(image_and(("image", ("again.png", photo_png()))), {}), grpc=False, detail="more than once"),
    Case("multipart: three files for two fields", 422, "invalid-request", valid_pair,
         rest=multipart(image_and(("mask", ("m.png", gray(box()))), ("extra", ("x.png", b"x"))), {}), grpc=False,
         detail="unknown file fields"),
    Case("multipart: an unknown file field", 422, "invalid-request", valid_pair,
         rest=multipart(image_and(("photo", ("p.png", photo_png()))), {}), grpc=False,
         detail="unknown file fields: ['photo']; the files are image, mask"),
    Case("multipart: 40 text fields", 400, "malformed-body", valid_pair,
         rest=multipart(image_and(), {f"field{i}": "1" for i in range(40)}), grpc=False, detail="Too many fields"),
    Case("multipart: unknown option (strength)", 422, "invalid-request", valid_pair, {"strength": 0.5}, grpc=False,
         detail="strength"),
    # JSON (REST only)
    Case("JSON that does not parse", 400, "malformed-body", rest=raw(b'{"image": ', "application/json"), grpc=False),
    Case("JSON nested 100000 deep", 400, "malformed-body",
         rest=raw(b'{"image": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "application/json"), grpc=False,
         detail="not valid JSON"),
    Case("JSON that is not UTF-8", 400, "malformed-body", rest=raw(b'{"image": "\xff\xfe"}', "application/json"),
         grpc=False),
    Case("JSON: a field name with a lone surrogate", 422, "invalid-request",
         rest=raw(b'{"image": "QUJD", "\\udc80": 1}', "application/json"), grpc=False, detail="unknown field"),
    Case("JSON: an array", 422, "invalid-request", rest=as_json(lambda sent: [1, 2]), grpc=False),
    Case("JSON: image null", 422, "invalid-request", rest=as_json(lambda sent: {"image": None}), grpc=False),
    Case("JSON: image is a number", 422, "invalid-request", rest=as_json(lambda sent: {"image": 5}), grpc=False),
    Case("JSON: invalid base64", 422, "invalid-request", rest=as_json(lambda sent: {"image": "%%not base64%%"}),
         grpc=False, detail="base64"),
    Case("JSON: an option given twice", 422, "invalid-request", valid_pair,
         rest=json_text(lambda sent: '{"image": "%s", "seed": 1, "seed": 2}' % b64(sent.files["image"])), grpc=False,
         detail="field 'seed' is given more than once"),
    Case("JSON: unknown option", 422, "invalid-request", valid_pair,
         rest=as_json(lambda sent: {**b64_files(sent), "strength": 0.5}), grpc=False, detail="strength"),
    Case("JSON: gate_threshold NaN (a literal)", 422, "invalid-request",
         rest=raw(b'{"image": "AAAA", "gate_threshold": NaN}', "application/json"), grpc=False, detail="finite"),
    Case("JSON: a 5000-digit seed", 400, "malformed-body",
         rest=raw(b'{"image": "AAAA", "seed": ' + b"9" * 5000 + b"}", "application/json"), grpc=False),
    Case("JSON: body over the limit (9 MiB)", 413, "payload-too-large",
         rest=as_json(lambda sent: {"image": "A" * 9 * MiB}), grpc=False),
    Case("JSON: images as data: URLs", 200, "removed", valid_pair,
         rest=as_json(lambda sent: {**{k: f"data:image/png;base64,{v}" for k, v in b64_files(sent).items()}, **REMOVE}),
         grpc=False),
    # what the image is
    Case("no image", 422, "invalid-request", lambda: Sent({"mask": gray(box())}), detail="image",
         grpc=False),  # proto3: no image is an empty one
    Case("empty image", 422, "invalid-image", lambda: with_box(b""), detail="the image is empty"),
    Case("upload over the 6 MiB limit", 413, "payload-too-large",
         lambda: Sent({"image": np.random.default_rng(0).bytes(6 * MiB + 1)})),
    Case("plain text", 422, "invalid-image", lambda: with_box(b"this is not an image")),
    Case("truncated PNG", 422, "invalid-image", lambda: with_box(truncated(photo_png()))),
    Case("truncated JPEG", 422, "invalid-image", lambda: with_box(truncated(photo_as("JPEG")))),
    Case("PNG with a 0x10 header", 422, "invalid-image", lambda: with_box(png_declaring_size(0, 10))),
    Case("SVG", 422, "invalid-image",
         lambda: with_box(b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="64" height="48"/>')),
    Case("PDF", 422, "invalid-image", lambda: with_box(b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n")),
    Case("HTML page", 422, "invalid-image", lambda: with_box(b"<!doctype html><html><body><img src=x></body></html>")),
    Case("ZIP archive", 422, "invalid-image", lambda: with_box(b"PK\x03\x04" + bytes(26) + b"PK\x05\x06" + bytes(18))),
    Case("EPS (PIL would run Ghostscript)", 422, "invalid-image",
         lambda: with_box(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 48\nshowpage\n")),
    Case("PCX (PIL reads it; not accepted)", 422, "invalid-image", lambda: with_box(photo_as("PCX"))),
    Case("decompression bomb: PNG header says 50000x50000", 413, "image-too-large",
         lambda: with_box(png_declaring_size(50_000, 50_000)), detail="the limit is 40 megapixels"),
    Case("PNG header says 8000x8000 (64 MP: past our limit, under PIL's guard)", 413, "image-too-large",
         lambda: with_box(png_declaring_size(8000, 8000)), detail="8000x8000 (64.0 megapixels)"),
    Case("20000x20000 blank PNG (~50 KB)", 413, "image-too-large", lambda: with_box(blank_png(20_000, 20_000)),
         detail="the limit is 40 megapixels"),
    Case("JPEG header says 60000x60000", 413, "image-too-large",
         lambda: with_box(jpeg_declaring_size(60_000, 60_000)), detail="the limit is 40 megapixels"),
    Case("1x1 image, white mask", 200, "removed",
         lambda: Sent({"image": png_bytes(np.full((1, 1, 3), 9, np.uint8)), "mask": gray(np.ones((1, 1), bool))},
                      np.ones((1, 1), bool)), REMOVE),
    Case("1x1 image, black mask", 200, "unchanged", lambda: unmasked(png_bytes(np.full((1, 1, 3), 9, np.uint8)), 1, 1)),
    Case("1x20000 strip, mostly masked", 200, "removed", lambda: strip(20_000, 18_000), REMOVE),
    Case("20000x1 image, webp output", 413, "image-too-large", lambda: unmasked(png_bytes(np.zeros((1, 20_000, 3),
         np.uint8)), 1, 20_000), {"output_format": "webp"}, detail="webp"),
    Case("65501x1 image, jpeg output", 413, "image-too-large", lambda: unmasked(png_bytes(np.zeros((1, 65_501, 3),
         np.uint8)), 1, 65_501), {"output_format": "jpeg"}, detail="jpeg"),
    Case("grayscale PNG", 200, "removed", lambda: with_box(photo_as("PNG", "L")), REMOVE),
    Case("16-bit grayscale PNG", 200, "removed", lambda: with_box(sixteen_bit_png()), REMOVE),
    Case("CMYK JPEG", 200, "removed", lambda: with_box(photo_as("JPEG", "CMYK")), REMOVE),
    Case("palette PNG with transparency", 200, "removed", lambda: with_box(palette_png_with_transparency()), REMOVE),
    Case("animated GIF (first frame)", 200, "removed", lambda: with_box(animated("GIF")), REMOVE),
    Case("animated WebP (first frame)", 200, "removed", lambda: with_box(animated("WEBP")), REMOVE),
    Case("TIFF", 200, "unchanged", lambda: unmasked(photo_as("TIFF"))),
    Case("BMP", 200, "unchanged", lambda: unmasked(photo_as("BMP"))),
    Case("EXIF-rotated JPEG, mask not rotated", 422, "mask-size-mismatch", lambda: with_box(exif_rotated_jpeg()),
         detail="EXIF"),
    Case("EXIF-rotated JPEG, upright mask", 200, "removed", exif_with_upright_mask, REMOVE),
    Case("RGBA image, no mask (alpha is the mask)", 200, "removed", alpha_as_mask(0), REMOVE),
    Case("RGBA image, fully transparent, no mask", 200, "removed", alpha_as_mask(0, 0), REMOVE),
    Case("RGBA image, fully opaque, no mask", 200, "unchanged", alpha_as_mask(255)),
    Case("RGB image, no mask", 422, "invalid-mask", lambda: Sent({"image": photo_png()})),
    # what the mask is
    Case("all-black mask (nothing to remove)", 200, "unchanged", lambda: unmasked(photo_png())),
    Case("all-white mask", 200, "removed", lambda: Sent({"image": photo_png(), "mask": gray(np.ones((H, W), bool))},
         np.ones((H, W), bool)), REMOVE),
    Case("anti-aliased mask edges", 200, "removed", anti_aliased, REMOVE),
    Case("mask: strokes on a transparent layer", 200, "removed", strokes_on_transparent_layer, REMOVE),
    Case("mask: RGBA, fully transparent", 200, "unchanged",
         lambda: Sent({"image": photo_png(), "mask": png_bytes(np.zeros((H, W, 4), np.uint8))})),
    Case("mask smaller than the image", 422, "mask-size-mismatch",
         lambda: Sent({"image": photo_png(), "mask": gray(box(40, W))}), detail="64x40"),
    Case("mask larger than the image", 422, "mask-size-mismatch",
         lambda: Sent({"image": photo_png(), "mask": gray(box(H * 2, W * 2))})),
    Case("0-byte mask", 422, "invalid-mask", lambda: Sent({"image": photo_png(), "mask": b""})),
    Case("truncated mask", 422, "invalid-mask", lambda: Sent({"image": photo_png(), "mask": truncated(gray(box()))})),
    Case("mask is not an image", 422, "invalid-mask", lambda: Sent({"image": photo_png(), "mask": b"white box"})),
    Case("mask header says 20000x20000", 413, "image-too-large",
         lambda: Sent({"image": photo_png(), "mask": png_declaring_size(20_000, 20_000)})),
    # options (gRPC sends them as typed fields)
    options_case("seed -1", -1),
    options_case("seed 2^64", 2**64, 2**64 - 1),
    options_case("dilate -1", -1, -1),
    options_case("dilate 10^9", 10**9, 10**9),
    options_case("quality 0", 0, 0),
    options_case("max_attempts 0", 0, 0),
    options_case("gate bogus", "bogus", "bogus"),
    options_case("output_format gif", "gif", "gif"),
    options_case("gate_threshold -1", -1, -1.0),
    options_case("gate_threshold NaN", "nan", math.nan),
    options_case("gate_threshold infinity", "inf", math.inf),
    # POST /score
    Case("score: edited of another size", 422, "image-size-mismatch",
         score_triple(edited=lambda: png_bytes(photo(32, 32))), route="/score"),
    Case("score: mask of another size", 422, "mask-size-mismatch",
         score_triple(mask=lambda: gray(box(40, 40))), route="/score"),
    Case("score: empty mask", 422, "invalid-mask",
         score_triple(mask=lambda: gray(np.zeros((H, W), bool))), route="/score"),
    Case("score: no edited image", 422, "invalid-request",
         lambda: Sent({"source": photo_png(), "mask": gray(box())}), route="/score",
         grpc=False),  # proto3: no edited is an empty one
    Case("score: empty edited image", 422, "invalid-image", score_triple(edited=lambda: b""), route="/score",
         detail="the edited image is empty"),  # "the image is empty" did not say which (a gRPC trial)
    Case("score: edited is not an image", 422, "invalid-image",
         score_triple(edited=lambda: b"%PDF-1.4\n"), route="/score"),
]
# fmt: on

REST_CASES = CASES
GRPC_CASES = [case for case in CASES if case.grpc]


@functools.cache
def sent_for(name: str) -> Sent:
    return next(case for case in CASES if case.name == name).build()


# --- sending and checking -----------------------------------------------------------------------


def rest_answer(service, case: Case) -> Answer:
    sent = sent_for(case.name)
    if case.rest is None:
        files = {name: (f"{name}.bin", data) for name, data in sent.files.items()}
        response = service.client.post(case.route, files=files, data={k: str(v) for k, v in case.options.items()})
    else:
        response = case.rest(service, case, sent)
    if isinstance(response, Answer):
        return response
    media_type = response.headers.get("content-type", "").split(";")[0]
    return Answer(
        response.status_code,
        media_type,
        response.json() if media_type == PROBLEM else None,
        response.content if media_type.startswith("image/") else None,
        response.headers.get("x-gate"),
    )


def grpc_answer(client, case: Case) -> Answer:
    sent = sent_for(case.name)
    options = case.options if case.grpc_options is None else case.grpc_options
    if case.route == "/remove":
        call, request = client.Remove, pb.RemoveRequest(**sent.files, **options)
    else:
        call, request = client.Score, pb.ScoreRequest(**sent.files, **options)
    try:
        reply = call(request, timeout=120)
    except grpc.RpcError as error:
        problem = problem_of(error)
        return Answer(problem.get("status", 0), None, problem, None, None, error.code())
    if case.route == "/remove":
        return Answer(200, reply.media_type, None, reply.image, reply.gate, grpc.StatusCode.OK)
    return Answer(200, None, None, None, None, grpc.StatusCode.OK)


def assert_answer(case: Case, answer: Answer, protocol: str) -> None:
    if case.expect in SUCCESS:
        assert answer.status == 200, answer.problem
        (check_removed if case.expect == "removed" else check_unchanged)(sent_for(case.name), answer)
        return
    assert answer.problem is not None, f"{answer.status}, {answer.media_type}: not a problem document"
    assert (answer.status, answer.problem.get("status")) == (case.status, case.status), answer.problem
    assert answer.problem["type"].endswith("/" + case.expect), answer.problem
    assert case.detail in answer.problem["detail"], answer.problem
    if protocol == "rest":
        assert answer.media_type == PROBLEM
    else:
        assert answer.grpc_code == status_code(Problem(case.expect, "")), answer.grpc_code


def check_removed(sent: Sent, answer: Answer) -> None:
    """A PNG of the input's (upright) size; every pixel beyond the dilated mask is the input's, alpha kept."""
    assert answer.gate == "off" and answer.media_type == "image/png"
    source = decode_image(sent.files["image"], REFERENCE)
    result = decode_image(answer.image, REFERENCE)
    assert result.rgb.shape == source.rgb.shape
    region = ndimage.binary_dilation(sent.removed, np.ones((2 * DILATE + 1,) * 2, bool))
    assert np.array_equal(result.rgb[~region], source.rgb[~region]), "pixels outside the dilated mask changed"
    assert not np.array_equal(result.rgb[sent.removed], source.rgb[sent.removed]), "the masked pixels must change"
    kept_alpha = source.alpha if "mask" in sent.files else None  # without a mask, the alpha was the mask
    assert (result.alpha is None) == (kept_alpha is None)
    if kept_alpha is not None:
        assert np.array_equal(result.alpha, kept_alpha)


def check_unchanged(sent: Sent, answer: Answer) -> None:
    assert answer.gate == "nothing-to-remove"
    source = decode_image(sent.files["image"], REFERENCE)
    result = decode_image(answer.image, REFERENCE)
    assert result.rgb.shape == source.rgb.shape and np.array_equal(result.rgb, source.rgb)


# --- the tests ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(service):
    with service.channel() as channel:
        yield stub(channel)


@pytest.mark.parametrize("case", REST_CASES, ids=lambda case: case.name)
def test_rest(service, case):
    assert_answer(case, rest_answer(service, case), "rest")


@pytest.mark.parametrize("case", GRPC_CASES, ids=lambda case: case.name)
def test_grpc(client, case):
    assert_answer(case, grpc_answer(client, case), "grpc")


def test_after_the_corpus_the_service_is_ready_and_removes(service, client):
    assert service.client.get("/readyz").status_code == 200
    normal = next(case for case in CASES if case.name == "grayscale PNG")
    assert_answer(normal, rest_answer(service, normal), "rest")
    assert_answer(normal, grpc_answer(client, normal), "grpc")


# --- docs/reliability.md ------------------------------------------------------------------------

GRPC_SUCCESS = {"removed": "OK, the image, object removed", "unchanged": "OK, the input unchanged"}
REST_SUCCESS = {"removed": "200, the image, object removed", "unchanged": "200, the input unchanged"}


def bad_input_table() -> str:
    """The "## Bad input" table of docs/reliability.md, from CASES."""
    rows = ["| case | REST answer | gRPC answer |", "|---|---|---|"]
    for case in CASES:
        if case.expect in SUCCESS:
            rest, grpc_text = REST_SUCCESS[case.expect], GRPC_SUCCESS[case.expect]
        else:
            rest = f"{case.status} {case.expect}"
            grpc_text = f"{status_code(Problem(case.expect, '')).name} {case.expect}"
        rows.append(f"| {case.name} | {rest} | {grpc_text if case.grpc else 'n/a'} |")
    return "\n".join(rows) + "\n"


def test_reliability_doc_shows_the_corpus():
    doc = (REPO / "docs" / "reliability.md").read_text()
    assert doc.startswith("# Reliability\n")
    assert bad_input_table() in doc.split("## Bad input", 1)[1], "regenerate it: python -m tests.test_bad_inputs"


def test_case_names_are_unique_and_the_corpus_is_large():
    names = [case.name for case in CASES]
    assert len(set(names)) == len(names)
    assert len(REST_CASES) >= 30 and len(GRPC_CASES) >= 30


if __name__ == "__main__":
    print(bad_input_table(), end="")
