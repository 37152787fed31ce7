"""Cost bombs: small files that would cost large CPU or memory to decode or to process once decoded.

Each is built here, small, and must be refused (413 image-too-large) from its structure, before its pixels
are decoded: quickly at the unit level, and over REST and gRPC within 2 s while /healthz keeps answering.
docs/reliability.md ("Cost bombs") has the table, with each bomb's cost before the limits.
"""

from __future__ import annotations

import functools
import io
import json
import struct
import threading
import time
import zlib

import grpc
import httpx
import numpy as np
import pytest
from PIL import Image, TiffImagePlugin

from engines.errors import ImageTooLarge, InvalidImage
from engines.imaging import DecodedImage, DecodeLimits, decode_image
from serve import openapi
from serve import rorem_pb2 as pb
from serve.grpc_client import problem_of, stub
from serve.problems import Problem, invalid_request
from serve.protocol import JSONRemoveBody, validate
from tests.helpers import PROBLEM, png_bytes

LIMITS = DecodeLimits(max_bytes=6 * 1024 * 1024)  # the service tests' upload limit, every other bound default
DEADLINE_S = 2.0


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def flat_png(width: int, height: int, before_idat: bytes = b"") -> bytes:
    """A valid all-black 8-bit gray PNG, its rows squeezed ~1000-fold by zlib."""
    pixels = zlib.compress((b"\0" * (1 + width)) * height, 9)
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + before_idat + _chunk(b"IDAT", pixels) + _chunk(b"IEND", b"")


def _jpeg_segments(data: bytes) -> list[tuple[int, int, int]]:
    """(marker, start, end) of each segment; a scan's entropy-coded data belongs to its SOS segment."""
    segments, position = [], 2
    while data[position + 1] != 0xD9:
        marker = data[position + 1]
        end = position + 2 + int.from_bytes(data[position + 2 : position + 4], "big")
        while marker == 0xDA and (data[end] != 0xFF or data[end + 1] == 0 or 0xD0 <= data[end + 1] <= 0xD7):
            end += 1
        segments.append((marker, position, end))
        position = end
    return segments


def _ac_first(data: bytes, start: int) -> bool:
    """An SOS segment that starts the AC coefficients of a band (spectral start > 0, no earlier bits)."""
    components = data[start + 4]
    spectral_start, approximation = data[start + 5 + 2 * components], data[start + 7 + 2 * components]
    return spectral_start > 0 and approximation >> 4 == 0


def jpeg_many_scans(side: int, copies: int) -> bytes:
    """A progressive JPEG with one AC scan repeated: libjpeg warns and decodes each copy over the whole image."""
    buffer = io.BytesIO()
    Image.new("L", (side, side), 128).save(buffer, "JPEG", progressive=True)
    data = buffer.getvalue()
    segments = _jpeg_segments(data)
    last = max(i for i, (marker, start, _) in enumerate(segments) if marker == 0xDA and _ac_first(data, start))
    first = last
    while segments[first - 1][0] == 0xC4:  # its Huffman tables
        first -= 1
    scan = data[segments[first][1] : segments[last][2]]
    return data[:-2] + scan * copies + data[-2:]


def small_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (64, 48), 128).save(buffer, "JPEG")
    return buffer.getvalue()


def gif_comment_blocks(count: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("P", (64, 48)).save(buffer, "GIF")
    data = buffer.getvalue()
    start = 13 + (3 << ((data[10] & 7) + 1) if data[10] & 0x80 else 0)
    return data[:start] + b"\x21\xfe" + b"\x01A" * count + b"\x00" + data[start:]


def _ifd(tags: list[tuple[int, int, int, int]]) -> bytes:
    """A little-endian TIFF directory of (tag, type, count, value) entries: one SHORT is stored in its entry, any
    other value is an offset (or a LONG)."""
    inline = struct.Struct("<HHIHH")
    entries = b"".join(
        inline.pack(tag, kind, n, value, 0) if (kind, n) == (3, 1) else struct.pack("<HHII", tag, kind, n, value)
        for tag, kind, n, value in tags
    )
    return struct.pack("<H", len(tags)) + entries + bytes(4)


def gray_tiff_1x1(extra: list[tuple[int, int, int, int]], tail: bytes = b"", compression: int = 1) -> bytes:
    """A 1x1 8-bit gray TIFF: its first directory at 9, the pixel at 8, `tail` after the directory (at
    tiff_tail_at(len(extra)): `extra`'s offsets point into it)."""
    tags = [(256, 3, 1, 1), (257, 3, 1, 1), (258, 3, 1, 8), (259, 3, 1, compression), (262, 3, 1, 1),
            (273, 4, 1, 8), (277, 3, 1, 1), (278, 3, 1, 1), (279, 4, 1, 1)]  # fmt: skip
    return b"II*\x00" + struct.pack("<I", 9) + b"\x00" + _ifd(sorted(tags + extra)) + tail


def tiff_tail_at(extra: int) -> int:
    return 9 + 2 + 12 * (9 + extra) + 4


def tiff_with_orientation_values(count: int) -> bytes:
    """A 1x1 gray TIFF whose Orientation tag holds `count` SHORTs (Pillow unpacks them all into a tuple)."""
    return gray_tiff_1x1([(274, 3, count, tiff_tail_at(1))], b"\x01\x00" * count)


def tiff_with_shared_exif(count: int) -> bytes:
    """A 1x1 gray TIFF whose EXIF, GPS and Interop pointers all name one directory of `count` RATIONALs: after
    decoding, Pillow unpacks it once for each (3 x `count` IFDRational objects)."""
    directory_at = tiff_tail_at(3)
    pointers = [(0x8769, 4, 1, directory_at), (0x8825, 4, 1, directory_at), (0xA005, 4, 1, directory_at)]
    directory = _ifd([(0x0005, 5, count, directory_at + 2 + 12 * 2 + 4), (0xA005, 4, 1, directory_at)])
    return gray_tiff_1x1(pointers, directory + struct.pack("<II", 1, 3) * count)


def tiff_with_camera_exif() -> bytes:
    """An RGB TIFF with EXIF, GPS and Interop directories as a camera's (Pillow writes them as it would a JPEG's)."""
    ifd = TiffImagePlugin.ImageFileDirectory_v2()
    ifd[0x010F] = "Camera maker"
    ifd[0x8769] = {0x9003: "2024:01:01 12:00:00", 0x829A: 0.004, 0x920A: 50.0, 0xA005: {1: "R98"}}
    ifd[0x8825] = {1: "N", 2: (52.0, 31.0, 12.0)}
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), "gray").save(buffer, "TIFF", tiffinfo=ifd)
    return buffer.getvalue()

def rle_bmp(width: int, height: int) -> bytes:
    """An RLE8 BMP of 1-pixel runs: Pillow's decoder for it is Python, 2 bytes per step."""
    pixels = (b"\x01\x00" * width + b"\x00\x00") * height + b"\x00\x01"
    palette = bytes(4 * 256)
    offset = 14 + 40 + len(palette)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 1, len(pixels), 2835, 2835, 256, 0)
    return b"BM" + struct.pack("<IHHI", offset + len(pixels), 0, 0, offset) + info + palette + pixels


def tiled_tiff(width: int, height: int, tile_width: int, tile_length: int, data: bool = True) -> bytes:
    """An 8-bit gray, deflate-compressed, tiled TIFF (libtiff decodes it); without `data` every tile points at one
    tiny stream (the check that refuses such a file comes before any decoding)."""
    tiles = -(-width // tile_width) * -(-height // tile_length)
    stream = zlib.compress(bytes(tile_width * tile_length) if data else b"", 9)
    tags = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (259, 3, 1, 8), (262, 3, 1, 1),
            (277, 3, 1, 1), (322, 4, 1, tile_width), (323, 4, 1, tile_length)]  # fmt: skip
    arrays_at = 8 + 2 + 12 * (len(tags) + 2) + 4
    pixels_at = arrays_at + 8 * tiles
    offsets = struct.pack(f"<{tiles}I", *(pixels_at + (i * len(stream) if data else 0) for i in range(tiles)))
    counts = struct.pack(f"<{tiles}I", *([len(stream)] * tiles))
    if tiles == 1:  # one value fits in its entry: stored there, not at an offset
        tags += [(324, 4, 1, pixels_at), (325, 4, 1, len(stream))]
    else:
        tags += [(324, 4, tiles, arrays_at), (325, 4, tiles, arrays_at + 4 * tiles)]
    header = b"II*\x00" + struct.pack("<I", 8) + _ifd(tags) + offsets + counts
    return header + stream * (tiles if data else 1)


def png_with_exif(size: int) -> bytes:
    exif = b"II*\x00" + struct.pack("<IHHHII", 8, 1, 0x0112, 3, 1, 1) + bytes(4)
    return flat_png(64, 48, _chunk(b"eXIf", exif + bytes(size - len(exif))))


def png_with_exif_text(entries: int, kind: bytes = b"zTXt") -> bytes:
    """EXIF of an orientation and `entries` - 1 more tags, as Pillow reads it from a compressed PNG text keyed
    "Raw profile type exif": hex, 72 characters a line."""
    tags = [(0x0112, 6)] + [(0x1000 + i, 0) for i in range(entries - 1)]
    body = b"".join(struct.pack("<HHIHH", tag, 3, 1, value, 0) for tag, value in tags)
    hexed = (b"II*\x00" + struct.pack("<IH", 8, entries) + body + bytes(4)).hex()
    text = f"\nexif\n{len(hexed) // 2:8d}\n" + "\n".join(hexed[at : at + 72] for at in range(0, len(hexed), 72))
    flags = b"\0" if kind == b"zTXt" else b"\1\0\0\0"  # iTXt: compressed, deflate, no language or translation
    return flat_png(64, 48, _chunk(kind, b"Raw profile type exif\0" + flags + zlib.compress(text.encode(), 9)))


# name -> (build, a phrase of the detail); every one is 413 image-too-large
BOMBS = {
    "PNG 40000000x1 (a strip: 40 MP, ~40 KB)": (lambda: flat_png(40_000_000, 1), "pixels a side"),
    "PNG 1x40000000 (a column)": (lambda: flat_png(1, 40_000_000), "pixels a side"),
    "PNG 65536x1 (one past the side limit)": (lambda: flat_png(65_536, 1), "65535 pixels a side"),
    "PNG with 100000 empty IDAT chunks": (lambda: flat_png(64, 48, _chunk(b"IDAT", b"") * 100_000), "PNG chunks"),
    "PNG with 100000 ancillary chunks": (lambda: flat_png(64, 48, _chunk(b"abCd", b"") * 100_000), "PNG chunks"),
    "PNG with 100 KB of EXIF": (lambda: png_with_exif(100_000), "EXIF"),
    "JPEG 6000x6000 progressive, 2000 scans": (lambda: jpeg_many_scans(6000, 2000), "JPEG scans"),
    "JPEG with 100000 comment segments": (lambda: small_jpeg()[:2] + b"\xff\xfe\x00\x02" * 100_000 + small_jpeg()[2:],
                                          "JPEG segments"),
    "JPEG with 400000 fill bytes": (lambda: small_jpeg()[:2] + b"\xff" * 400_000 + small_jpeg()[2:], "JPEG segments"),
    "GIF with 100000 comment sub-blocks": (lambda: gif_comment_blocks(100_000), "GIF blocks"),
    "TIFF orientation of 100000 values": (lambda: tiff_with_orientation_values(100_000), "TIFF tag"),
    "TIFF whose EXIF, GPS and Interop name one directory of 30000 RATIONALs": (
        lambda: tiff_with_shared_exif(30_000), "bytes of EXIF"
    ),
    "BMP RLE8 of 1-pixel runs (2 MB)": (lambda: rle_bmp(1000, 1000), "RLE BMP"),
    "BMP RLE8 declaring 9 MP in a few bytes": (lambda: rle_bmp(3000, 3000)[:1100], "RLE BMP of 9000000 pixels"),
    "TIFF 16x16 in one 16384x16384 tile": (lambda: tiled_tiff(16, 16, 16384, 16384, data=False), "TIFF tiles"),
    "TIFF 65535x1 in 32 tiles of 2048x2048 (134 MP)": (lambda: tiled_tiff(65535, 1, 2048, 2048, data=False), "TIFF tiles"),
    "TIFF 65535x1 in 4096 tiles of 16x134217712": (
        lambda: tiled_tiff(65535, 1, 16, 134_217_712, data=False), "TIFF tiles"
    ),
    "BigTIFF": (lambda: b"II+\x00" + struct.pack("<HHQ", 8, 0, 16) + bytes(64), "BigTIFF"),
    "JPEG arithmetic-coded": (lambda: small_jpeg().replace(b"\xff\xc0", b"\xff\xc9", 1), "arithmetic-coded"),
    "PNG with 100 KB of EXIF after its pixels": (
        lambda: flat_png(64, 48)[:-12] + _chunk(b"eXIf", bytes(100_000)) + _chunk(b"IEND", b""), "EXIF"
    ),
    "PNG with 2 MB of text (a hex EXIF profile)": (
        lambda: flat_png(64, 48, _chunk(b"tEXt", b"Raw profile type exif\x00" + b"0" * 2_000_000)), "EXIF as PNG text"
    ),
    "PNG with 480 KB of EXIF as hex in 100 KB of zTXt": (lambda: png_with_exif_text(40_000), "EXIF as PNG text"),
    "PNG with 480 KB of EXIF as hex in 100 KB of iTXt": (
        lambda: png_with_exif_text(40_000, b"iTXt"), "EXIF as PNG text"
    ),
}  # fmt: skip


@functools.cache
def bomb(name: str) -> bytes:
    return BOMBS[name][0]()


@pytest.mark.timing
@pytest.mark.parametrize("name", BOMBS)
def test_each_bomb_is_refused_from_its_structure_quickly(name):
    data = bomb(name)
    assert len(data) < LIMITS.max_bytes
    started = time.perf_counter()
    with pytest.raises(ImageTooLarge, match=BOMBS[name][1]):
        decode_image(data, LIMITS)
    assert time.perf_counter() - started < DEADLINE_S


@pytest.mark.parametrize(
    "data",
    [
        flat_png(65_535, 1),
        flat_png(64, 48, _chunk(b"abCd", b"") * 1000),
        jpeg_many_scans(64, 80),  # a progressive JPEG's own ~10 scans plus 80: under the limit
        gif_comment_blocks(1000),
        tiff_with_orientation_values(1),
        rle_bmp(64, 48),
        png_with_exif(60_000),
        tiled_tiff(100, 100, 256, 256),
        tiled_tiff(1000, 700, 256, 256),
        flat_png(64, 48, _chunk(b"iTXt", b"XML:com.adobe.xmp\x00\x00\x00\x00\x00" + b" " * 4_000_000)),
        tiled_tiff(6000, 200, 512, 512),
        tiled_tiff(16, 16, 2048, 2048),
        tiled_tiff(20000, 100, 512, 512),
        png_with_exif_text(5000),
        png_with_exif_text(5000, b"iTXt"),
        tiff_with_camera_exif(),
        tiff_with_shared_exif(2000),
    ],
    ids=["65535x1", "1000 chunks", "90 scans", "1000 GIF blocks", "TIFF", "small RLE BMP", "60 KB EXIF",
         "100x100 in a 256 tile", "1000x700 in 256 tiles", "4 MB of XMP (a bloated Photoshop file)",
         "6000x200 in GDAL's 512 tiles", "16x16 in one 2048 tile", "20000x100 in 512 tiles",
         "60 KB EXIF as zTXt hex", "60 KB EXIF as iTXt hex", "TIFF with a camera's EXIF, GPS, Interop",
         "TIFF with 48 KB of EXIF read three times"],  # fmt: skip
)
def test_just_under_each_limit_decodes(data):
    assert decode_image(data, LIMITS).rgb.size > 0


def test_a_tiff_exif_directory_named_three_times_is_refused_before_decoding():
    """29 MB of RATIONALs that EXIF, GPS and Interop all name: 22 s and 1.2 GB to unpack thrice after decoding."""
    data = tiff_with_shared_exif(3_700_000)
    started = time.process_time()
    with pytest.raises(ImageTooLarge, match="bytes of EXIF"):
        decode_image(data, DecodeLimits())
    assert time.process_time() - started < 0.5


@pytest.mark.parametrize("compression", [6, 7])
def test_a_jpeg_compressed_tiff_is_refused(compression):
    """libtiff decodes its JPEG strips with none of a JPEG file's checks (arithmetic coding, scan count)."""
    with pytest.raises(InvalidImage, match=f"compression {compression}"):
        decode_image(gray_tiff_1x1([], compression=compression), LIMITS)
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), "gray").save(buffer, "TIFF", compression="jpeg")
    with pytest.raises(InvalidImage, match="send the JPEG itself"):
        decode_image(buffer.getvalue(), LIMITS)

def png_with_deflated_tail(width: int, height: int, tail_mb: int) -> bytes:
    """An all-black gray PNG whose zlib stream goes on past the last row with `tail_mb` MB more of zeros
    (~1 KB of file a MB: a copy of one fully flushed deflate block, its adler32 recomputed)."""
    deflate = zlib.compressobj(9, wbits=-15)
    rows = deflate.compress(b"\0" * (height * (1 + width))) + deflate.flush(zlib.Z_FULL_FLUSH)
    megabyte = b"\0" * (1 << 20)
    block = deflate.compress(megabyte) + deflate.flush(zlib.Z_FULL_FLUSH)
    checksum = zlib.adler32(b"\0" * (height * (1 + width)))
    for _ in range(tail_mb):
        checksum = zlib.adler32(megabyte, checksum)
    stream = b"\x78\xda" + rows + block * tail_mb + b"\x03\x00" + checksum.to_bytes(4, "big")
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", stream) + _chunk(b"IEND", b"")


def test_deflated_data_past_the_last_row_is_not_inflated():
    """libpng (imagecodecs.png_decode) inflated an IDAT stream to its end: 1 GB of zeros in a 1 MB file cost 2 s
    of CPU, 28 GB in 29 MB a minute, past the decode timeout. Pillow and libspng stop at the last row."""
    small = png_with_deflated_tail(64, 64, 2)
    assert len(zlib.decompress(small[small.index(b"IDAT") + 4 : -16])) == 64 * 65 + (2 << 20)  # a valid stream
    data = png_with_deflated_tail(64, 64, 512)
    assert len(data) < 600_000
    started = time.process_time()
    decoded = decode_image(data, LIMITS)
    assert time.process_time() - started < 0.2
    assert decoded.rgb.shape == (64, 64, 3) and not decoded.rgb.any()


def test_avif_is_not_accepted():
    """libavif decodes the whole AV1 frame, whatever size the container declares, and Pillow re-serialises an
    AVIF's EXIF while opening it: no structure check could bound either, so AVIF is refused."""
    from PIL import features

    if not features.check("avif"):
        pytest.skip("this Pillow cannot write AVIF")
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48)).save(buffer, "AVIF")
    with pytest.raises(InvalidImage, match="not a recognised image.*png, jpeg, webp, gif, bmp, tiff\\)$"):
        decode_image(buffer.getvalue(), LIMITS)


def test_pasting_back_a_mask_that_is_all_edge_costs_memory_by_the_photo_not_by_its_edge():
    """A mask of one row in 12 dilated by 5 puts nearly every pixel in the feather band: the paste built the
    band's index and weight arrays at once, ~55 bytes a pixel at its peak (a 40 MP photo, sent as a 157 KB
    request: 2 GB), where a box mask over half the photo peaks at ~11. Blended a block of rows at a time, into
    the one copy of the photo, it stays near the box's."""
    import tracemalloc

    from engines import regions
    from engines.pipeline import CropSettings, RemovalPipeline
    from serve.config import AppSettings

    side = 3072
    pipeline = RemovalPipeline(None, CropSettings.from_imaging(AppSettings().imaging), LIMITS)
    rgb = np.zeros((side, side, 3), np.uint8)
    stripes = np.zeros((side, side), bool)
    stripes[::12] = True
    prepared = pipeline.prepare_pixels(DecodedImage(rgb, None, "png"), stripes, 5, 4)
    assert prepared.mask.mean() > 0.9
    results = [np.full((plan.bucket, plan.bucket, 3), 7, np.uint8) for plan in prepared.plans]
    tracemalloc.start()
    try:
        edited = regions.paste_back_regions(rgb, prepared.mask, results, prepared.plans, 6)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak / side**2 < 20, f"{peak / side**2:.1f} bytes a pixel at the paste's peak"
    assert (edited[~prepared.mask] == 0).all() and (edited[prepared.mask] != 0).mean() > 0.9


def test_the_limits_are_settings():
    tight = DecodeLimits(max_side=1000, max_jpeg_scans=5, max_chunks=100)
    with pytest.raises(ImageTooLarge, match="1000 pixels a side"):
        decode_image(flat_png(1001, 1), tight)
    with pytest.raises(ImageTooLarge, match="5 scans"):
        decode_image(jpeg_many_scans(64, 0), tight)
    with pytest.raises(ImageTooLarge, match="PNG chunks"):
        decode_image(flat_png(8, 8, _chunk(b"abCd", b"") * 100), tight)


def test_a_validation_error_of_a_million_unknown_keys_is_a_few_kb():
    with pytest.raises(Problem) as caught:
        validate(JSONRemoveBody, {"image": "AAAA", **{f"key{i}": i for i in range(200_000)}})
    document = json.dumps(caught.value.body("request-id"))
    assert len(document) < 10_000
    assert caught.value.body()["detail"].startswith("200000 unknown fields") and "key0" in document


def test_every_problem_document_is_bounded():
    fields = [{"field": "k" * 10**4, "message": "m"}] * 10**4
    body = Problem("invalid-request", "x" * 10**6, errors=fields).body()
    assert len(json.dumps(body)) < 10_000 and len(body["errors"]) == 20
    body = Problem("invalid-request", "x" * 10**6, notes=["n" * 10**4] * 10**4).body()
    assert len(json.dumps(body)) < 10_000 and body["notes"][-1] == f"... and {10**4 - 20} more"


def test_a_cut_errors_list_keeps_the_shape_the_openapi_document_promises():
    """Unknown fields are listed in `errors` as every invalid field is; past 20, it holds the first 20 as {field,
    message} objects, as a client generated from /openapi.json parses them, and the detail counts the rest (a
    text item among them broke that parse)."""
    long = "k" * 150  # the keys quoted fill the clipped detail: the count comes before them
    with pytest.raises(Problem) as caught:
        validate(JSONRemoveBody, {"image": "AAAA", **{f"{long}{i}": i for i in range(25)}})
    body = caught.value.body("request-id")
    document = openapi.Problem.model_validate(body)
    assert len(document.errors) == 20 and document.errors[0].field == f"{long}0"
    assert body["detail"].startswith("25 unknown fields, the first 20: ")
    body = invalid_request([{"loc": ("body", f"{long}{i}"), "msg": "bad"} for i in range(25)]).body()
    assert len(openapi.Problem.model_validate(body).errors) == 20
    assert body["detail"].startswith("25 invalid fields, the first 20: ")


# --- over the wire ------------------------------------------------------------------------------


class HealthProbe:
    """GETs /healthz in a loop on its own connection and keeps every answer: when it was sent and answered, and
    the replica's own event-loop lag since the previous answer (`loop_lag_ms`, serve.loop_lag)."""

    def __init__(self, url: str):
        self.answers: list[tuple[float, float, float]] = []  # (sent, answered, loop lag s)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(url,), daemon=True)
        self._failure: BaseException | None = None  # raised in the test when the probe stops

    def _run(self, url: str) -> None:
        try:
            self._probe(url)
        except BaseException as exc:  # a thread's exception would only be a warning: the test re-raises it
            self._failure = exc

    def _probe(self, url: str) -> None:
        with httpx.Client(base_url=url, timeout=10) as client:
            client.get("/healthz")  # starts the replica's lag ticker; what it reports covers the time before
            while not self._stop.is_set():
                sent = time.perf_counter()
                response = client.get("/healthz")
                assert response.status_code == 200
                self.answers.append((sent, time.perf_counter(), response.json()["loop_lag_ms"] / 1000))
                self._stop.wait(0.02)

    def during(self, started: float, ended: float) -> tuple[float, float]:
        """The worst /healthz latency and replica loop lag over probes whose span meets [started, ended]: a lag
        answered at `answered` happened since the previous answer."""
        previous = [0.0] + [answered for _, answered, _ in self.answers]
        met = [(answered - sent, lag) for (sent, answered, lag), since in zip(self.answers, previous)
               if answered >= started and since <= ended]  # fmt: skip
        return max((latency for latency, _ in met), default=0.0), max((lag for _, lag in met), default=0.0)

    def __enter__(self) -> "HealthProbe":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        if self._failure is not None:
            raise AssertionError(f"the /healthz probe failed: {self._failure!r}") from self._failure


LOOP_LAG_MAX_S = 0.1  # inside the replica: the goal itself
HEALTHZ_MAX_S = 1.0  # at the client


def _send_bombs(service, files: dict[str, bytes], mask: bytes, many_keys: bytes | None):
    """Each bomb over REST and gRPC (each answered with its 413), then `many_keys` as a JSON body (its 422), while
    /healthz is probed: (the probe, when its quiet first second ended, one row per request: bomb, protocol,
    request s, worst /healthz ms, worst loop lag ms)."""
    spans = []  # (bomb, protocol, started, ended)
    with HealthProbe(service.url) as probe, service.channel() as channel:
        client = stub(channel)
        time.sleep(1.0)  # quiet probes first: this machine's /healthz latency without bombs, the yardstick below
        quiet_until = time.perf_counter()
        for name, data in files.items():
            started = time.perf_counter()
            response = service.client.post("/remove", files={"image": ("i", data), "mask": ("m", mask)})
            spans.append((name, "rest", started, time.perf_counter()))
            assert response.status_code == 413 and response.headers["content-type"] == PROBLEM, name
            assert response.json()["type"].endswith("/image-too-large"), response.json()
            started = time.perf_counter()
            with pytest.raises(grpc.RpcError) as caught:
                client.Remove(pb.RemoveRequest(image=data, mask=mask), timeout=30)
            spans.append((name, "grpc", started, time.perf_counter()))
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, name
            assert problem_of(caught.value)["status"] == 413
        if many_keys is not None:
            started = time.perf_counter()
            response = service.client.post("/remove", content=many_keys, headers={"content-type": "application/json"})
            spans.append(("JSON body of 100000 unknown keys", "rest", started, time.perf_counter()))
            assert response.status_code == 422 and response.headers["content-type"] == PROBLEM
            assert len(response.content) < 10_000
        time.sleep(0.1)  # the probe answers that cover the last request
    report = [(name, protocol, round(ended - started, 3), *(round(s * 1000) for s in probe.during(started, ended)))
              for name, protocol, started, ended in spans]  # fmt: skip
    return probe, quiet_until, report


def test_bombs_get_a_4xx_in_2_s_over_rest_and_grpc_while_healthz_answers(cluster, service):
    """The goal (issue 17) is every /healthz under 100 ms while the bombs arrive. What the ingress controls is its
    own event loop: none of its work may hold the loop (or the GIL, from a worker thread) that long, and that is
    measured inside the replica (loop_lag_ms), so it is asserted at the goal. Measured on a 2-core machine shared
    at load 6-15: the 100000-key JSON body lagged the loop 118 ms while json.loads parsed it in one call, 18 ms
    once the parse went member by member; no other bomb lagged it over 41 ms. A client's latency adds the proxy
    process and both processes' wait for a core: probes took up to 116 ms while the loop lagged at most 41 ms,
    and a clean CI run (before the member-by-member parse) had one at 791 ms. So the client side is bound at
    what a busy runner holds: p95 250 ms, none over 1 s (before the limits a bomb stalled it 8 s), and a median
    under 50 ms or, on a machine slower than that even without bombs, under twice this run's quiet median (a
    clean CI run measured 52 ms with p95 74 ms and a loop lag of 10 ms: the machine, not a bomb). A bomb whose
    span saw the loop lag past the goal, or that was refused past DEADLINE_S, is sent again and must not do so
    again over the same protocol: a clean CI run on a slow day had one lag of 103 ms spanning two bombs that had
    never lagged it over 41 ms. `cluster`: timed after every application's start, not beside another's replicas
    importing or exporting."""
    mask = png_bytes(np.zeros((48, 64), np.uint8))
    files = {name: bomb(name) for name in BOMBS}  # built before any clock starts
    many_keys = json.dumps({"image": "AAAA", **{f"key{i}": 0 for i in range(100_000)}}).encode()
    probe, quiet_until, report = _send_bombs(service, files, mask, many_keys)
    print("bomb, protocol, request s, worst /healthz ms, worst loop lag ms", *report, sep="\n")
    assert len(probe.answers) > 20
    quiet = sorted(answered - sent for sent, answered, _ in probe.answers if answered <= quiet_until)
    latencies = sorted(answered - sent for sent, answered, _ in probe.answers if answered > quiet_until)
    p50, p95 = (latencies[int(q * (len(latencies) - 1))] for q in (0.5, 0.95))
    quiet_p50 = quiet[len(quiet) // 2]
    late = {(row[0], row[1]) for row in report if row[2] > DEADLINE_S}
    lagged = {(row[0], row[1]) for row in report if row[4] >= LOOP_LAG_MAX_S * 1000}
    if late or lagged:  # sent again: a bomb that is expensive or blocks the loop is so again, a hiccup does not recur
        names = {name for name, _ in late | lagged}
        again = _send_bombs(
            service, {name: data for name, data in files.items() if name in names}, mask,
            many_keys if names - set(files) else None,
        )[2]  # fmt: skip
        print("sent again", *again, sep="\n")
        # the same bomb over the same protocol: a clean CI run saw one lag 137 ms over gRPC then 14 ms, and its
        # REST twin 12 ms then 190 ms (a 2-core runner's hiccups, each on one protocol, once)
        # (and a refusal took 2.011 s on a runner that ran torch work at half its speed)
        repeated = [
            row for row in again
            if ((row[0], row[1]) in lagged and row[4] >= LOOP_LAG_MAX_S * 1000)
            or ((row[0], row[1]) in late and row[2] > DEADLINE_S)
        ]  # fmt: skip
        assert not repeated, (again, report)
    assert p50 < max(0.05, 2 * quiet_p50) and p95 < 0.25 and latencies[-1] < HEALTHZ_MAX_S, (
        f"/healthz p50 {p50 * 1000:.0f} ms (quiet {quiet_p50 * 1000:.0f} ms), p95 {p95 * 1000:.0f} ms,"
        f" max {latencies[-1] * 1000:.0f} ms",
        report,
    )


def test_a_png_text_chunk_that_inflates_past_pillows_cap_is_refused_in_the_services_words():
    """A zTXt of 2 MB inflated (a plain comment) answered "corrupt or truncated: Decompressed data too large for
    PngImagePlugin.MAX_TEXT_CHUNK": Pillow's internals, and a file called corrupt for a limit it passed."""
    data = flat_png(64, 48, _chunk(b"zTXt", b"Comment\x00\x00" + zlib.compress(b"a" * 2_000_000)))
    with pytest.raises(ImageTooLarge) as refused:
        decode_image(data, LIMITS)
    assert str(refused.value) == (
        "the image has PNG text or colour-profile chunks that inflate past the limit; "
        "the limit is 1 MiB a chunk, 64 MiB in all"
    )
