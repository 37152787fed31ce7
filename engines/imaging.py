"""Image and mask handling around the inpainting model: safe decoding, crop planning, blending, encoding.

Everything a client can send passes through `decode_image` / `decode_mask`, so every failure there
ends in one of the `engines.errors` input errors, never in a raw PIL or numpy exception.

Pillow opens every upload (format sniffing, the size guard, EXIF). The pixels of plain 8-bit PNG and JPEG files,
nearly all the traffic, are then decoded by imagecodecs (libspng, libjpeg-turbo: the same pixels as Pillow, 1.3-3x
faster), and PNG / JPEG output is encoded by it (libpng, libjpeg-turbo); loadtests/bench_ingress.py has the
numbers. Every other file, and any file imagecodecs will not decode, goes through Pillow as before: what is
accepted or refused stays Pillow's call.

PNG is decoded by libspng, not libpng (imagecodecs.png_decode): libpng inflates the image data to its very end,
past the last row (a 1 MB file of deflated zeros: 2 s of CPU, 29 MB: 60 s), and each png_decode error drops a
reference to None (CPython 3.11 aborts after ~40,000). libspng stops at the last row, as Pillow does.
"""

from __future__ import annotations

import io
import itertools
import logging
import math
import re
import warnings
import zlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
from PIL import Image, PngImagePlugin, TiffImagePlugin, UnidentifiedImageError
from scipy import ndimage

try:
    import imagecodecs
except ImportError:  # a declared dependency; without it Pillow does all the work, only slower
    imagecodecs = None
# imagecodecs' warnings about a client's file (a bad checksum, an odd chunk) are log noise, as Pillow's are below.
logging.getLogger("imagecodecs").setLevel(logging.ERROR)
# Pillow reads uncompressed TIFF strips one Python-level tile at a time (30 us each: 65535 one-row strips took
# 2 s); libtiff reads them in C (0.04 s), with the same pixels.
TiffImagePlugin.READ_LIBTIFF = True

from engines.errors import (
    ImageTooLarge,
    InputError,
    InvalidImage,
    InvalidMask,
    MaskSizeMismatch,
    UnsupportedOutputFormat,
)

OUTPUT_FORMATS = ("png", "jpeg", "webp")
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}

# Only these PIL plugins may open client bytes: exotic ones (EPS runs Ghostscript, for one) are attack surface.
# Not AVIF: libavif decodes the whole AV1 frame, which need not be the size the container declares (a 3 KB file
# declared 64 x 64 decoded 268 megapixels), and Pillow re-serialises its EXIF while opening it, before any check.
ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
# Phone cameras write multi-picture JPEGs (MPO); their first picture is a plain JPEG, so report them as one.
_FORMAT_ALIASES = {"mpo": "jpeg"}

# The largest side each output codec can write (PNG: 2**31 - 1, beyond any decodable input).
MAX_OUTPUT_SIDE = {"webp": 16383, "jpeg": 65500}
# A lossless WebP reads `quality` as the effort spent compressing: above 50 it bought no smaller file (within 0.5%)
# for 1.7-3.8x the CPU (95, the default quality: 2.4-2.9x; loadtests/bench_webp_effort.py, docs/benchmarks.md),
# and a 46 KB upload of 40 MP asked at 100 took ~35 s of CPU to encode.
LOSSLESS_WEBP_MAX_EFFORT = 50
# How the accepted formats' files begin: what _check_structure walks by, and a file that begins so but that Pillow
# cannot read is a variant it does not decode, not an unknown format
_SIGNATURES = {
    "PNG": (b"\x89PNG\r\n\x1a\n",), "JPEG": (b"\xff\xd8",), "GIF": (b"GIF87a", b"GIF89a"),
    "BMP": (b"BM",), "TIFF": (b"II*\x00", b"MM\x00*"),
}  # fmt: skip
KEEPS_ALPHA = frozenset({"png", "webp"})  # the output formats that store an alpha channel (JPEG drops it)
EIGHT_CONNECTED = np.ones((3, 3), bool)  # a mask's regions: pixels touching by a side or a corner
_FEATHER_TILE = 256
# Up to this feather the blend weight comes from shifted minima (exact, cheap for a narrow band); wider ones
# from scipy's distance transform, tile by tile.
_SHIFTED_FEATHER_MAX = 16
_BLEND_PIXELS = 1 << 20  # pixels of the mask's box blended at a time (paste_back_into)
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_ORIENTATION = 0x0112
# Channels per pixel of the (format, mode) pairs imagecodecs decodes exactly as Pillow does.
_FAST_DECODE = {
    ("PNG", "L"): 1, ("PNG", "RGB"): 3, ("PNG", "RGBA"): 4,  # libspng decodes no gray + alpha
    ("JPEG", "L"): 1, ("JPEG", "RGB"): 3, ("MPO", "L"): 1, ("MPO", "RGB"): 3,
}  # fmt: skip
# PNG chunks Pillow reads after the image data that can carry an EXIF orientation.
_PNG_LATE_METADATA = frozenset({b"eXIf", b"tEXt", b"zTXt", b"iTXt"})
_TIFF_OPAQUE_TYPES = frozenset({1, 2, 7})  # BYTE, ASCII, UNDEFINED
_TIFF_TILE_WIDTH, _TIFF_TILE_LENGTH = 322, 323
_TIFF_COMPRESSION = 259
_TIFF_JPEG_COMPRESSIONS = {6: "old-style JPEG", 7: "JPEG"}
_TIFF_EXIF_IFD, _TIFF_GPS_IFD, _TIFF_INTEROP_IFD = 0x8769, 0x8825, 0xA005
_TIFF_UNIT_BYTES = {kind: size for kind, (size, _) in TiffImagePlugin.ImageFileDirectory_v2._load_dispatch.items()}
_TIFF_FLOAT_TYPES = frozenset({11, 12})
# Arithmetic coding (SOF9-11, SOF13-15, and its conditioning table DAC): a progressive refinement scan then
# costs a few bytes to send and a full pass to decode (100 scans of 6320^2: 35 s). Rare in the wild.
_JPEG_ARITHMETIC_MARKERS = frozenset({0xC9, 0xCA, 0xCB, 0xCC, 0xCD, 0xCE, 0xCF})
# Outside segments, 0xFF 0x00 is a data byte, 0xFF 0xD0-D7 a restart marker and 0xFF 0xFF fill: any other
# pair is a marker.
_JPEG_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_JPEG_SEARCH_WINDOW = 1 << 20
_PNG_TEXT_CHUNKS = frozenset({b"tEXt", b"zTXt", b"iTXt"})
# Pillow reads EXIF from a PNG text keyed "Raw profile type exif" (or APP1) too, as hex: ~0.4 s per MB. Such
# texts are bounded like EXIF (hex: two characters a byte, plus line breaks); other text only by Pillow's own
# caps (1 MB a decompressed chunk, 64 MB in all: a bloated Photoshop XMP packet is a real file).
_PNG_EXIF_TEXT_KEYS = frozenset({b"Raw profile type exif", b"Raw profile type APP1"})
_RLE_PIXELS_PER_BYTE = 8  # an RLE BMP may have 8 pixels per byte of max_rle_bytes: 8 MP at the default, ~1 s
_ICC_PART_BYTES = 65519  # a JPEG segment's 65535, less its length field and the 14-byte ICC_PROFILE header
_PNG_FILTER_UP = 32  # libpng's PNG_FILTER_UP: fast, and as small as adaptive filtering on photos at level 1


@dataclass(frozen=True)
class DecodeLimits:
    """What one upload may cost to decode. Each bound is checked from the file's structure before any pixel
    is decoded; docs/reliability.md ("Limits") says why each exists and what it costs at its default."""

    max_bytes: int = 30 * 1024 * 1024
    max_megapixels: float = 40.0
    max_side: int = 65535  # crop and paste-back of a 1 x 40M strip allocate gigabytes
    max_chunks: int = 65536  # PNG chunks, JPEG segments before the first scan, GIF blocks, TIFF array lengths, WebP
    # chunks walked to find a lossless image (_webp_is_lossless)
    max_jpeg_scans: int = 100  # each progressive scan passes over the whole image
    max_exif_bytes: int = 64 * 1024  # a JPEG's APP1 segment can hold no more
    max_rle_bytes: int = 1024 * 1024  # Pillow decodes RLE BMPs in Python, ~0.4 s per MB


@dataclass
class DecodedImage:
    rgb: np.ndarray
    alpha: np.ndarray | None
    format: str | None
    icc_profile: bytes | None = None  # an RGB colour profile, given back with the result (rgb_icc_profile)
    webp_lossless: bool = False  # a lossless WebP source: its WebP result is written lossless too
    has_alpha: bool = False  # the source has an alpha channel, perhaps fully opaque (`alpha` is then None)


@dataclass(frozen=True)
class CropPlan:
    top: int
    left: int
    side: int
    bucket: int


# --- decoding -----------------------------------------------------------------------------------


def decode_image(data: bytes, limits: DecodeLimits, what: str = "image") -> DecodedImage:
    """Decode client bytes into upright RGB pixels, keeping any meaningful alpha aside; `what` names the image in
    errors (a score's two: "the image is empty" did not say which)."""
    pixels, alpha, source_format, profile = _decode(data, limits, what=what, invalid=InvalidImage)
    rgb = _gray_to_rgb(pixels) if pixels.ndim == 2 else pixels
    return DecodedImage(
        rgb=rgb, alpha=alpha if alpha is not None and alpha.min() < 255 else None, format=source_format,
        icc_profile=rgb_icc_profile(profile),
        webp_lossless=source_format == "webp" and _webp_is_lossless(data, limits.max_chunks),
        has_alpha=alpha is not None,
    )  # fmt: skip


def _webp_is_lossless(data: bytes, most_chunks: int) -> bool:
    """A WebP whose first frame, the one decoded, is VP8L (lossless), by a walk of its RIFF chunks (at most
    `most_chunks`, the other formats' bound), into the first ANMF frame of an animation: re-encoding it lossy
    would change every pixel outside the mask (gif2webp writes lossless frames by default)."""
    position, end = 12, len(data)
    for _ in range(most_chunks):
        if position + 8 > end:
            return False
        fourcc, size = data[position : position + 4], int.from_bytes(data[position + 4 : position + 8], "little")
        if fourcc in (b"VP8L", b"VP8 "):
            return fourcc == b"VP8L"
        if fourcc == b"ANMF":  # a 16-byte frame header, then the frame's own chunks (ALPH, VP8 / VP8L)
            position, end = position + 8 + 16, min(end, position + 8 + size)
            continue
        position += 8 + size + (size & 1)
    return False


def rgb_icc_profile(profile: object) -> bytes | None:
    """The profile if it describes RGB data: the result is RGB whatever the source was, so a gray or CMYK
    profile would misdescribe it (the pixels were converted to RGB as if they were sRGB).

    Anything but bytes is ignored, as no profile: a TIFF's ICC tag (34675) may be of a numeric type, and Pillow
    then gives a number for it."""
    if not isinstance(profile, bytes):
        return None
    return profile if len(profile) >= 128 and profile[16:20] == b"RGB " else None


ALMOST_OPAQUE = 0.99  # the opaque share past which a mask is black-and-white, not strokes (decode_mask)


def decode_mask(data: bytes, size: tuple[int, int], limits: DecodeLimits) -> np.ndarray:
    """Decode a mask image into a bool (H, W) array, True where the model should remove content.

    White (luminance > 127) means remove. A mask with transparency is strokes drawn on a transparent layer, read
    from alpha (> 127), unless most of it is opaque and its opaque pixels are both dark and light, or nearly all of
    it is opaque (ALMOST_OPAQUE): then it is a black-and-white mask with some transparent pixels (one transparent
    corner flipped such a mask to 59999 of 60000 pixels removed, an all-black one to all of them), and only its
    opaque light pixels mean remove. Strokes, of one colour or several, cover less than half a transparent layer.
    """
    pixels, alpha, _, _ = _decode(data, limits, what="mask", invalid=InvalidMask, size=size)
    light = _above_127(pixels) if pixels.ndim == 2 else _luminance_above_127(pixels)  # gray: its own luminance
    if alpha is None:
        mask = light
    else:
        mask = _above_127(alpha)
        opaque_light = np.logical_and(mask, light)
        opaque = np.count_nonzero(mask)
        mixed = 0 < np.count_nonzero(opaque_light) < opaque
        if opaque > mask.size / 2 and (mixed or opaque >= ALMOST_OPAQUE * mask.size):
            mask = opaque_light
    if mask.shape != tuple(size):
        raise _mask_size_mismatch(mask.shape, size)
    return mask


def _mask_size_mismatch(shape: tuple[int, int], size: tuple[int, int]) -> MaskSizeMismatch:
    (mask_h, mask_w), (image_h, image_w) = shape, size
    turned = tuple(shape) == tuple(size)[::-1]
    hint = (
        "; it is the image's size turned a quarter: both are read upright (each one's EXIF orientation applied), "
        "so draw the mask on the image as it is shown upright"
    )
    return MaskSizeMismatch(f"mask is {mask_w}x{mask_h} but image is {image_w}x{image_h}{hint if turned else ''}")


def _check_mask_size(img: Image.Image, size: tuple[int, int]) -> None:
    """Refuse a mask of another size from its header, before its pixels are decoded (a 1.7 KB 40 MP WebP mask
    cost 1 s and 770 MB to be refused after): its upright size is known from the header (exif_orientation)."""
    width, height = upright_size(img)
    if (height, width) != tuple(size):
        raise _mask_size_mismatch((height, width), size)


def upright_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) with the EXIF orientation applied, from the header: no pixel is decoded."""
    width, height = img.size
    if img.format == "TIFF":  # Pillow gives a TIFF's size upright already, and turns its pixels as it loads them
        return width, height
    return (height, width) if exif_orientation(img) in (5, 6, 7, 8) else (width, height)


def exif_orientation(img: Image.Image) -> int:
    """The orientation in the image's EXIF block (a JPEG's APP1, a PNG's eXIf, a WebP's EXIF chunk), as browsers and
    photo viewers read it: the one a mask drawn on the photo as shown was drawn in. Pillow's getexif also takes one
    from XMP or a PNG text chunk, which no browser reads (a mask painted in the playground then missed the photo).
    Read before the pixels are loaded, as browsers read it: a PNG's eXIf chunk after the pixels (the PNG
    specification puts it before them) is not applied. A TIFF's is applied by Pillow as it opens the file."""
    block = img.info.get("exif") if img.format != "TIFF" else None
    if not block:
        return 1
    exif = Image.Exif()
    exif.load(block)
    orientation = exif.get(_ORIENTATION, 1)
    return orientation if orientation in range(1, 9) else 1


def mask_from_alpha(image: DecodedImage) -> np.ndarray:
    """Use the image's own transparency as the mask: erased (alpha < 128) pixels are to be removed. A fully opaque
    alpha channel erases nothing: an empty mask (nothing to remove), not a missing one."""
    if image.alpha is not None:
        return image.alpha < 128
    if image.has_alpha:
        return np.zeros(image.rgb.shape[:2], bool)
    raise InvalidMask("no mask given and the image has no alpha channel")


def _decode(
    data: bytes, limits: DecodeLimits, what: str, invalid: type[InputError], size: tuple[int, int] | None = None
) -> tuple[np.ndarray, np.ndarray | None, str | None, bytes | None]:
    """Upright uint8 pixels, (H, W) for gray sources or (H, W, 3) RGB; the alpha plane (perhaps fully opaque) or
    None; the format; the embedded colour profile or None. With `size` (a mask's), a file of another size is
    refused unread."""
    if len(data) == 0:
        raise invalid(f"the {what} is empty")
    if len(data) > limits.max_bytes:
        raise ImageTooLarge(f"the {what} is {len(data)} bytes; the limit is {limits.max_bytes} bytes")
    complete = _check_structure(data, limits, what, invalid)  # Pillow's own header parsing of these is Python-paced
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # PIL's notes on corrupt metadata: client-made log noise
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS) as img:
                format_name = img.format.lower() if img.format else None
                source_format = _FORMAT_ALIASES.get(format_name, format_name)
                profile = img.info.get("icc_profile")
                _check_declared_size(img.size, limits, what, invalid)  # before any pixel is decoded
                _check_decoder_cost(img, data, limits, what)
                if size is not None:
                    _check_mask_size(img, size)
                planes = _fast_decode(img, data, complete)
                if planes is None:
                    orientation = exif_orientation(img)  # before the pixels: a PNG's eXIf after them is not read
                    img.load()
                    planes = tuple(
                        None if plane is None else np.ascontiguousarray(_orient(plane, orientation))
                        for plane in _split_pixels_alpha(img, what, invalid)
                    )
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # PIL's own guard fires inside Image.open, before our check, for sizes past its limit (MAX_IMAGE_PIXELS): its
        # words (another limit, "could be decompression bomb DOS attack") are not the client's to read
        found = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"is {int(found[1]) / 1e6:.1f} megapixels" if found else "has too many pixels"
        limit = min(limits.max_megapixels, Image.MAX_IMAGE_PIXELS / 1e6)
        raise ImageTooLarge(f"the {what} {size}; the limit is {limit:g} megapixels") from exc
    except UnidentifiedImageError as exc:
        kind = next((name for name, signatures in _SIGNATURES.items() if data.startswith(signatures)), None)
        if kind is not None:  # a 12-bit JPEG was "not a recognised image (accepted formats: png, jpeg, ...)"
            example = " (a 12-bit JPEG, say)" if kind == "JPEG" else ""
            raise invalid(f"the {what} is a {kind} file this service cannot decode: damaged, or of a kind it does not "
                          f"read{example}; send it as 8-bit PNG, JPEG or WebP") from exc  # fmt: skip
        accepted = ", ".join(f.lower() for f in ACCEPTED_FORMATS)
        raise invalid(f"the {what} is not a recognised image (accepted formats: {accepted})") from exc
    except Exception as exc:
        if "MAX_TEXT_CHUNK" in str(exc) or "MAX_TEXT_MEMORY" in str(exc):  # Pillow's caps: its words named its
            # internals and called the file corrupt
            chunk_mib, all_mib = PngImagePlugin.MAX_TEXT_CHUNK // 2**20, PngImagePlugin.MAX_TEXT_MEMORY // 2**20
            limit = f"{chunk_mib} MiB a chunk, {all_mib} MiB in all"
            raise _too_costly(what, "has PNG text or colour-profile chunks that inflate past the limit", limit) from exc
        # Malformed files surface from PIL's plugins as OSError, SyntaxError, ValueError, struct.error,
        # EOFError, IndexError... depending on the format; all of them mean the bytes are bad.
        raise invalid(f"the {what} is corrupt or truncated: {exc}") from exc
    return (*planes, source_format, profile)


def _check_declared_size(size: tuple[int, int], limits: DecodeLimits, what: str, invalid: type[InputError]) -> None:
    """Refuse from the header alone, before any pixel buffer is allocated (decompression bombs)."""
    width, height = size
    if width <= 0 or height <= 0:
        raise invalid(f"the {what} has zero size ({width}x{height})")
    megapixels = width * height / 1e6
    if megapixels > limits.max_megapixels:
        raise ImageTooLarge(
            f"the {what} is {width}x{height} ({megapixels:.1f} megapixels); "
            f"the limit is {limits.max_megapixels:g} megapixels"
        )
    if max(width, height) > limits.max_side:
        raise ImageTooLarge(f"the {what} is {width}x{height}; the limit is {limits.max_side} pixels a side")


def _too_costly(what: str, found: str, limit: str) -> ImageTooLarge:
    return ImageTooLarge(f"the {what} {found}; the limit is {limit}")


def _check_structure(data: bytes, limits: DecodeLimits, what: str, invalid: type[InputError] = InvalidImage) -> bool:
    """Bound what Pillow walks in Python while opening a file, and the work a JPEG's scans cause.

    Returns whether a PNG or JPEG is complete and plain enough for the fast decoder (_fast_decode): its
    structure reaches its end marker, and nothing Pillow reads for EXIF follows a PNG's pixels."""
    if data.startswith(_SIGNATURES["PNG"]):
        chunks = list(itertools.islice(_png_chunks(data, positions=True), limits.max_chunks + 1))
        if len(chunks) > limits.max_chunks:
            raise _too_costly(what, f"has over {limits.max_chunks} PNG chunks", f"{limits.max_chunks}")
        exif = exif_text = 0
        most_text = 3 * limits.max_exif_bytes
        for kind, start, length in chunks:
            exif += length if kind == b"eXIf" else 0  # wherever it is: Pillow reads one after the pixels too
            if kind in _PNG_TEXT_CHUNKS and data[start : start + 80].split(b"\0", 1)[0] in _PNG_EXIF_TEXT_KEYS:
                exif_text += _png_text_length(kind, data[start : start + length], max(1, most_text + 1 - exif_text))
        if exif > limits.max_exif_bytes:
            raise _too_costly(what, f"has {exif} bytes of EXIF", f"{limits.max_exif_bytes} bytes")
        if exif_text > most_text:  # counted no further than that
            raise _too_costly(what, f"has over {most_text} bytes of EXIF as PNG text", f"{most_text} bytes")
        return _png_is_plain(kind for kind, _, _ in chunks)
    if data.startswith(_SIGNATURES["JPEG"]):
        steps = list(itertools.islice(_jpeg_header_steps(data), limits.max_chunks + 1))
        if len(steps) > limits.max_chunks:
            raise _too_costly(what, f"has over {limits.max_chunks} JPEG segments before its first scan", f"{limits.max_chunks}")
        if any(at >= 0 and data[at + 1] in _JPEG_ARITHMETIC_MARKERS for at in steps):
            raise _too_costly(what, "is an arithmetic-coded JPEG", "Huffman-coded JPEGs")
        scans, complete = _jpeg_scans(data, steps[-1], limits.max_chunks) if steps[-1] >= 0 else (0, False)
        if scans > limits.max_jpeg_scans:
            raise _too_costly(what, f"has {scans} JPEG scans", f"{limits.max_jpeg_scans} scans")
        return complete
    if data.startswith(_SIGNATURES["GIF"]):
        if _count_at_least(_gif_blocks(data), limits.max_chunks + 1):
            raise _too_costly(what, f"has over {limits.max_chunks} GIF blocks before its first frame", f"{limits.max_chunks}")
    elif data.startswith(_SIGNATURES["TIFF"]):
        _check_tiff(data, limits, what, invalid)
    elif data[:4] in (b"II+\x00", b"MM\x00+"):  # BigTIFF: for files past 4 GB, far past any upload limit
        raise _too_costly(what, "is a BigTIFF", "classic TIFF (BigTIFF is for files over 4 GB)")
    return False


def _count_at_least(items, count: int) -> bool:
    return sum(1 for _ in zip(range(count), items)) >= count


def _check_decoder_cost(img: Image.Image, data: bytes, limits: DecodeLimits, what: str) -> None:
    """Bounds that need the opened file: metadata Pillow unpacks in Python, Python-paced decoders."""
    exif = img.info.get("exif") or b""
    if len(exif) > limits.max_exif_bytes:
        raise _too_costly(what, f"has {len(exif)} bytes of EXIF", f"{limits.max_exif_bytes} bytes")
    if img.tile and img.tile[0][0] == "bmp_rle":
        if len(data) > limits.max_rle_bytes:
            raise _too_costly(what, f"is a {len(data)}-byte RLE BMP", f"{limits.max_rle_bytes} bytes")
        pixels, most = img.size[0] * img.size[1], _RLE_PIXELS_PER_BYTE * limits.max_rle_bytes
        if pixels > most:  # RLE4 runs are expanded a pixel at a time in Python: ~0.13 s a megapixel
            raise _too_costly(what, f"is an RLE BMP of {pixels} pixels", f"{most} pixels")
    if img.format == "TIFF" and _TIFF_TILE_WIDTH in img.tag_v2:
        _check_tiff_tiles(img, limits, what)


def _check_tiff_tiles(img: Image.Image, limits: DecodeLimits, what: str) -> None:
    """libtiff inflates every tile whole, whatever part of it the image uses: a 2 MB file declaring a 65535 x 1
    image in 4096 tiles of 16 x 134217712 would take hours. The tiles may cover `max_megapixels` (what an
    image may cost anyway: any standard tiling of a thin image fits), or twice the image."""
    width, height = img.size
    tile_width, tile_length = img.tag_v2.get(_TIFF_TILE_WIDTH, 0), img.tag_v2.get(_TIFF_TILE_LENGTH, 0)
    if not (isinstance(tile_width, int) and isinstance(tile_length, int)) or tile_width <= 0 or tile_length <= 0:
        raise _too_costly(what, "has TIFF tiles of no size", "tiles of a positive size")
    covered = -(-width // tile_width) * tile_width * -(-height // tile_length) * tile_length
    if covered > max(2 * width * height, limits.max_megapixels * 1e6):
        raise _too_costly(
            what, f"is {width}x{height} in TIFF tiles of {tile_width}x{tile_length} ({covered / 1e6:.1f} megapixels)",
            f"tiles covering {limits.max_megapixels:g} megapixels, or twice the image",
        )


def _fast_decode(img: Image.Image, data: bytes, complete: bool) -> tuple[np.ndarray, np.ndarray | None] | None:
    """The pixels of an opened plain 8-bit PNG or JPEG, decoded by imagecodecs; None: let Pillow decode it.

    Only files both decoders read alike qualify (no palette, tRNS, 16-bit, gray + alpha, interlace or animation)
    and only `complete` ones (_check_structure): libjpeg-turbo pads a truncated JPEG with gray where Pillow
    refuses it. Any imagecodecs error (libspng missing from the build, too) hands the file to Pillow, which
    then decides.
    """
    channels = _FAST_DECODE.get((img.format, img.mode))
    if imagecodecs is None or channels is None or "transparency" in img.info or not complete:
        return None
    if img.format == "PNG":
        # 16-bit samples open in the same modes (rawmode "RGB;16B"...): only 8-bit ones decode to the mode itself
        eight_bit = len(img.tile) == 1 and img.tile[0][3] == img.mode
        if not eight_bit or img.info.get("interlace"):
            return None
        decode = imagecodecs.spng_decode
    else:
        decode = imagecodecs.jpeg8_decode
    try:
        pixels = decode(data)
    except Exception:
        return None
    width, height = img.size
    if pixels.dtype != np.uint8 or pixels.shape != ((height, width) if channels == 1 else (height, width, channels)):
        return None
    pixels = _orient(pixels, exif_orientation(img))
    if channels in (1, 3):
        return np.ascontiguousarray(pixels), None
    return np.ascontiguousarray(pixels[..., :3]), np.ascontiguousarray(pixels[..., -1])


def _png_chunks(data: bytes, positions: bool = False):
    """The kinds of a PNG's chunks (with `positions`: (kind, where its data starts, its length)), in order, up to
    IEND or where the chunk structure runs off the end."""
    position, end = 8, len(data)
    while position + 8 <= end:
        kind = data[position + 4 : position + 8]
        length = int.from_bytes(data[position : position + 4], "big")
        yield (kind, position + 8, length) if positions else kind
        if kind == b"IEND":
            return
        position += 12 + length


def _png_text_length(kind: bytes, chunk: bytes, most: int) -> int:
    """The length of a PNG text chunk's text as Pillow reads it: a zTXt's or compressed iTXt's inflated, counted
    up to `most` bytes (a 100 KB zTXt held 1 MB of hex EXIF: 0.5 s to parse); the chunk's length if it is not
    compressed or will not inflate (Pillow then drops it)."""
    _, _, rest = chunk.partition(b"\0")
    if kind == b"zTXt":
        compressed = rest[1:]
    elif kind == b"iTXt" and rest[:1] == b"\1":
        compressed = rest[2:].split(b"\0", 2)[-1]  # past the language tag and the translated keyword
    else:
        return len(chunk)
    try:
        return len(zlib.decompressobj().decompress(compressed, most))
    except zlib.error:
        return len(chunk)


def _png_is_plain(kinds) -> bool:
    """Chunks (their kinds, in order) well-formed up to IEND, no animation, nothing after the image data that
    Pillow reads for EXIF."""
    seen_image_data = False
    for kind in kinds:
        if kind == b"IEND":
            return True
        if kind == b"acTL":
            return False
        if kind == b"IDAT":
            seen_image_data = True
        elif seen_image_data and kind in _PNG_LATE_METADATA:
            return False
    return False


def _gif_blocks(data: bytes):
    """One item per extension sub-block before the first image descriptor (Pillow reads those in Python)."""
    position, end = 13, len(data)
    if len(data) > 10 and data[10] & 0x80:
        position += 3 << ((data[10] & 7) + 1)  # the global colour table
    while position + 1 < end and data[position] == 0x21:  # an extension: label, then sub-blocks up to a 0
        position += 2
        while position < end and data[position]:
            yield position
            position += 1 + data[position]
        position += 1


def _check_tiff(data: bytes, limits: DecodeLimits, what: str, invalid: type[InputError]) -> None:
    """Bound the tags Pillow unpacks into Python objects: those of the first directory one by one (strip offsets,
    orientation...), and after decoding every tag of the EXIF, GPS and Interop directories (load_end), as the
    EXIF block of a JPEG is bounded. JPEG-compressed strips are refused: libtiff decodes them with none of the
    checks a JPEG file gets (arithmetic coding, scans)."""
    ifd0 = _tiff_int(data, 4, 4)
    entries = list(_tiff_entries(data, ifd0))
    longest = max((count for _, kind, count, _ in entries if kind not in _TIFF_OPAQUE_TYPES), default=0)
    if longest > limits.max_chunks:
        raise _too_costly(what, f"has a TIFF tag of {longest} values", f"{limits.max_chunks} values")
    compression = _tiff_values(data, entries, (_TIFF_COMPRESSION,)).get(_TIFF_COMPRESSION)
    if compression in _TIFF_JPEG_COMPRESSIONS:
        raise invalid(
            f"the {what} is a TIFF with {_TIFF_JPEG_COMPRESSIONS[compression]} compression (TIFF compression"
            f" {compression}), which is not accepted: send the JPEG itself, or a TIFF of another compression"
        )
    exif = _tiff_exif_bytes(data, entries, limits.max_exif_bytes)
    if exif > limits.max_exif_bytes:
        raise _too_costly(what, f"has over {limits.max_exif_bytes} bytes of EXIF", f"{limits.max_exif_bytes} bytes")


def _tiff_int(data: bytes, at: int, size: int) -> int:
    return int.from_bytes(data[at : at + size], "little" if data[:2] == b"II" else "big")


def _tiff_entries(data: bytes, at: int) -> Iterator[tuple[int, int, int, int]]:
    """(tag, type, value count, where its value field is) of each entry of the TIFF directory at `at`."""
    count = _tiff_int(data, at, 2)
    for entry in range(at + 2, min(at + 2 + 12 * count, len(data) - 11), 12):
        yield _tiff_int(data, entry, 2), _tiff_int(data, entry + 2, 2), _tiff_int(data, entry + 4, 4), entry + 8


def _tiff_values(data: bytes, entries: Sequence[tuple[int, int, int, int]], tags: Sequence[int]) -> dict[int, int]:
    """The single integer values of those of `tags` that hold one, read as Pillow reads them (offsets to
    directories, the compression): signed types are taken unsigned, which puts a negative offset out of the file."""
    found = {}
    for tag, kind, count, field in entries:
        size = _TIFF_UNIT_BYTES.get(kind, 0)
        if tag in tags and count == 1 and size in (2, 4) and kind not in _TIFF_FLOAT_TYPES:
            found.setdefault(tag, _tiff_int(data, field, size))
    return found


def _tiff_exif_bytes(data: bytes, entries: Sequence[tuple[int, int, int, int]], most: int) -> int:
    """The size of the EXIF, GPS and Interop directories as an EXIF block would hold them (12 bytes a tag plus its
    values), each counted every time Pillow reads it: all three may name one directory. The walk is fixed (the
    first directory names EXIF and GPS, EXIF names Interop), so a loop of offsets goes no further. Counted no
    further than past `most`."""
    pointers = _tiff_values(data, entries, (_TIFF_EXIF_IFD, _TIFF_GPS_IFD))
    directories = list(pointers.values())
    if _TIFF_EXIF_IFD in pointers:
        exif_entries = list(_tiff_entries(data, pointers[_TIFF_EXIF_IFD]))
        directories += _tiff_values(data, exif_entries, (_TIFF_INTEROP_IFD,)).values()
    total = 0
    for at in directories:
        for _, kind, count, _ in _tiff_entries(data, at):
            total += 12 + count * _TIFF_UNIT_BYTES.get(kind, 0)
            if total > most:
                return total
    return total


def _jpeg_header_steps(data: bytes):
    """The positions of a JPEG's marker segments (and fill bytes) before its first scan; last, the scan's
    own position, or -1 where the structure breaks off first."""
    position, end = 2, len(data)
    while position + 4 <= end:
        if data[position] != 0xFF:
            break
        marker = data[position + 1]
        if marker == 0xDA:
            yield position
            return
        yield position
        if marker == 0xFF:  # fill byte
            position += 1
        elif marker == 0x01 or 0xD0 <= marker <= 0xD7:  # no length field
            position += 2
        else:
            position += 2 + int.from_bytes(data[position + 2 : position + 4], "big")
    yield -1


def _jpeg_scans(data: bytes, scan: int, most: int) -> tuple[int, bool]:
    """From the first start-of-scan: the first picture's scans, and whether it reaches its end-of-image marker.

    Marker segments between scans (tables, comments) are skipped by their length, as libjpeg reads them, so
    an FF D9 or FF DA inside one counts for nothing. Scan data is searched in C: in it, 0xFF is followed only
    by 0x00, fill or a restart marker. After `most` markers, the count of every FF DA stands in (an upper bound)."""
    scans, position = 0, scan
    for _ in range(most):
        marker = data[position + 1]
        if marker == 0xD9:
            return scans, True
        scans += marker == 0xDA
        if marker in (0x01, 0xD8):  # no length field
            position += 2
        else:
            position += 2 + int.from_bytes(data[position + 2 : position + 4], "big")
        position = _next_jpeg_marker(data, position)
        if position < 0:
            return scans, False
    return data.count(b"\xff\xda"), False


def _next_jpeg_marker(data: bytes, position: int) -> int:
    """Where the next marker starts, or -1. Searched a window at a time: the regex holds the GIL, and a
    crafted run of 0xFF fill costs it ~23 ns a byte (670 ms at 29 MB), which in one call would stall the
    event loop as long; per window, ~25 ms at most."""
    while position < len(data):
        end = position + _JPEG_SEARCH_WINDOW
        found = _JPEG_MARKER.search(data, position, end + 1)  # a marker's second byte may lie just past the window
        if found is not None:
            return found.start()
        position = end
    return -1


def _orient(pixels: np.ndarray, orientation: object) -> np.ndarray:
    """Apply an EXIF orientation as ImageOps.exif_transpose does (a view; the caller makes it contiguous)."""
    if orientation == 2:  # mirrored
        return pixels[:, ::-1]
    if orientation == 3:  # upside down
        return pixels[::-1, ::-1]
    if orientation == 4:
        return pixels[::-1]
    if orientation == 5:  # PIL's TRANSPOSE
        return pixels.swapaxes(0, 1)
    if orientation == 6:  # stored turned left: PIL's ROTATE_270
        return np.rot90(pixels, -1)
    if orientation == 7:  # PIL's TRANSVERSE
        return pixels.swapaxes(0, 1)[::-1, ::-1]
    if orientation == 8:  # PIL's ROTATE_90
        return np.rot90(pixels, 1)
    return pixels


def _split_pixels_alpha(
    img: Image.Image, what: str, invalid: type[InputError]
) -> tuple[np.ndarray, np.ndarray | None]:
    """Normalise any PIL mode to uint8 gray (H, W) or RGB (H, W, 3) plus an alpha plane (perhaps fully opaque),
    None when the mode has none. Gray stays gray: an RGB copy of it is only made for decode_image."""
    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        values = np.asarray(img)
        return _scale_16bit(values), _key_alpha(values, img.info.get("transparency"))
    if mode == "F":
        return _scale_float(np.asarray(img)), None
    if mode == "La":
        img = img.convert("LA")  # PIL has no direct La -> RGBA path; LA is the straight-alpha form
    has_alpha = mode in _ALPHA_MODES or "transparency" in img.info
    if mode == "L" and not has_alpha:
        return np.array(img), None
    target = "RGBA" if has_alpha else "RGB"
    try:
        converted = img if mode == target else img.convert(target)  # convert copies even to its own mode
    except ValueError as exc:
        raise invalid(f"the {what} uses an unsupported pixel mode {mode!r}") from exc
    pixels = np.asarray(converted)
    if not has_alpha:
        return np.ascontiguousarray(pixels), None
    return np.ascontiguousarray(pixels[..., :3]), pixels[..., 3].copy()


def _key_alpha(values: np.ndarray, key: object) -> np.ndarray | None:
    """The alpha of a 16-bit gray PNG's tRNS key: 0 where a sample equals it, compared at 16 bits; None without
    a key. Pillow keeps the key for these modes but gives no alpha (8-bit gray gets one)."""
    if not isinstance(key, int):
        return None
    opaque = values != key
    alpha = opaque.view(np.uint8)
    alpha *= 255
    return alpha


_SCALE_BLOCK_PIXELS = 1 << 20  # 16-bit and float samples are scaled this many at a time


def _blocks(values: np.ndarray) -> Iterator[slice]:
    """Row blocks of about _SCALE_BLOCK_PIXELS: whole-array temporaries in uint32 / float32 made a 0.1 MB
    40 MP 16-bit PNG cost ~600 MB at its peak, five times an 8-bit one."""
    rows = max(1, _SCALE_BLOCK_PIXELS // max(1, values[:1].size))
    return (slice(start, start + rows) for start in range(0, values.shape[0], rows))


def _scale_16bit(values: np.ndarray) -> np.ndarray:
    """Map 0..65535 onto 0..255 with rounding (65535 -> 255, 32896 -> 128); out-of-range values clip."""
    out = np.empty(values.shape, np.uint8)
    for rows in _blocks(values):
        clipped = np.clip(values[rows], 0, 65535).astype(np.uint32)
        out[rows] = (clipped * 255 + 32767) // 65535
    return out


def _scale_float(values: np.ndarray) -> np.ndarray:
    """Float images are 0..1 when they fit in it, otherwise taken as 0..255."""

    def finite(block: np.ndarray) -> np.ndarray:
        return np.nan_to_num(block.astype(np.float32), nan=0.0, posinf=255.0, neginf=0.0)

    fits_unit = values.size > 0 and max(float(finite(values[rows]).max()) for rows in _blocks(values)) <= 1.0
    out = np.empty(values.shape, np.uint8)
    for rows in _blocks(values):
        block = finite(values[rows])
        if fits_unit:
            block *= 255.0
        out[rows] = np.clip(np.rint(block), 0, 255)
    return out


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.repeat(gray[..., None], 3, axis=2))


def _luminance_times_1000(rgb: np.ndarray) -> np.ndarray:
    """Rec. 601 luma in integers, so a gray value v gives exactly 1000 * v (no float rounding at the threshold)."""
    luma = rgb[..., 0].astype(np.uint32) * 299
    luma += rgb[..., 1].astype(np.uint32) * 587
    luma += rgb[..., 2].astype(np.uint32) * 114
    return luma


def _above_127(plane: np.ndarray) -> np.ndarray:
    """plane > 127 written over the plane itself (a fresh uint8 array of ours): no second image-sized buffer."""
    return np.greater(plane, 127, out=plane.view(np.bool_))


def _luminance_above_127(rgb: np.ndarray, rows: int = 32) -> np.ndarray:
    """`_luminance_times_1000(rgb) > 127000`, a band of rows at a time: its uint32 temporaries stay in cache."""
    out = np.empty(rgb.shape[:2], bool)
    for top in range(0, rgb.shape[0], rows):
        np.greater(_luminance_times_1000(rgb[top : top + rows]), 127 * 1000, out=out[top : top + rows])
    return out


# --- mask geometry ------------------------------------------------------------------------------


def dilate_mask(mask: np.ndarray, pixels: int) -> np.ndarray:
    """Grow the mask by `pixels` in every direction (square), so the model also repaints halos and shadows.

    Only the mask's bounding box grown by `pixels` is filtered: nothing outside it can become True.
    """
    if pixels < 0:
        raise ValueError(f"dilation must be >= 0, got {pixels}")
    box = _bounding_box(mask)
    if pixels == 0 or box is None:
        return mask.copy()
    top, bottom, left, right = box
    height, width = mask.shape
    rows = slice(max(top - pixels, 0), min(bottom + pixels, height))
    cols = slice(max(left - pixels, 0), min(right + pixels, width))
    out = np.zeros_like(mask)
    # A square is separable: a run of 2 * pixels + 1 along the rows, then along the columns.
    out[rows, cols] = _grow_runs(_grow_runs(mask[rows, cols], pixels, axis=1), pixels, axis=0)
    return out


def _grow_runs(mask: np.ndarray, pixels: int, axis: int) -> np.ndarray:
    """OR over a window of 2 * pixels + 1 along `axis` (zeros beyond the ends), by doubling window lengths:
    about log2(2 * pixels + 1) shifted ORs instead of one maximum per window position."""
    if axis == 0:
        return _grow_runs(mask.T, pixels, axis=1).T
    height, width = mask.shape
    grown = np.zeros((height, width + 2 * pixels), bool)
    grown[:, pixels : pixels + width] = mask
    window, length = 2 * pixels + 1, 1
    while 2 * length <= window:  # grown[:, i] = OR of `length` inputs from i on
        grown = grown[:, :-length] | grown[:, length:]
        length *= 2
    if length < window:  # two overlapping windows cover the rest
        grown = grown[:, : length - window] | grown[:, window - length :]
    return grown


def _bounding_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(top, bottom, left, right) of the True pixels, bottom/right exclusive; None when there are none."""
    if mask.ndim != 2 or mask.dtype != np.bool_:
        raise ValueError(f"mask must be a 2-D bool array, got {mask.dtype} {mask.shape}")
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    top, bottom = int(rows[0]), int(rows[-1]) + 1
    cols = np.flatnonzero(mask[top:bottom].any(axis=0))  # only the rows that hold any
    return top, bottom, int(cols[0]), int(cols[-1]) + 1


def whole_cells(mask: np.ndarray, cell: int) -> np.ndarray:
    """The mask grown to whole `cell` x `cell` blocks of its grid: a block holding any mask pixel is all mask."""
    height, width = mask.shape
    if height % cell or width % cell:
        raise ValueError(f"a {width}x{height} mask is not whole {cell} px cells")
    shape = (height // cell, cell, width // cell, cell)
    out = np.empty_like(mask)
    out.reshape(shape)[:] = mask.reshape(shape).any(axis=(1, 3))[:, None, :, None]
    return out


def seen_on_grid(mask: np.ndarray, cell: int) -> np.ndarray:
    """The mask, with each 8-connected region that has no pixel on the grid (rows and columns at multiples of
    `cell`) grown to whole cells: a view sampling only those pixels (nearest) sees every region, the others as
    they were."""
    labels, count = ndimage.label(mask, structure=EIGHT_CONNECTED)
    seen = np.zeros(count + 1, bool)
    seen[labels[::cell, ::cell]] = True
    seen[0] = True  # the background
    hidden = ~seen[labels]
    return mask | whole_cells(hidden, cell) if hidden.any() else mask


MAX_BUCKET_DOWNSCALE = 1.25
"""How far a window may be downscaled into the next smaller bucket where the bucket that holds it is larger than
the image (its crop would be upscaled anyway). A 520x520 photo went to 1024, upscaled 1.97x: 4x the model pixels
of 512 (a UNet pass 6.76 vs 1.59 TFLOP) for no detail the photo has. Up to 1.25x, objects keep at least 80% of
their resolution at a quarter of the cost, at the side RORem was trained at (512); a larger window (over 640 px
for the 512 bucket) keeps the larger bucket and its detail."""


def window_sizes(span, margin: int, extent: int, buckets: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(side, bucket) of the window for a masked span (the longer side of its box; a number or an array) in an
    image whose longer side is `extent`.

    The window is the span plus `margin` a side, no larger than the image: context beyond the image does not
    raise the bucket. Its bucket is the smallest that holds it (else the largest: the window is downscaled),
    or the next smaller one where that bucket exceeds the image and the window fits it within
    MAX_BUCKET_DOWNSCALE. A window smaller than its bucket grows to it, within the image: native resolution.
    """
    ordered = np.sort(np.asarray(buckets, np.int64))
    need = np.minimum(np.asarray(span, np.int64) + 2 * margin, extent)
    at = np.minimum(np.searchsorted(ordered, need), len(ordered) - 1)  # the first bucket >= need, else the last
    smaller = ordered[np.maximum(at - 1, 0)]
    downscale = (at > 0) & (ordered[at] > extent) & (need <= smaller * MAX_BUCKET_DOWNSCALE)
    bucket = np.where(downscale, smaller, ordered[at])
    return np.minimum(np.maximum(need, bucket), extent), bucket


def plan_crop(mask: np.ndarray, buckets: Sequence[int], margin: int) -> CropPlan | None:
    """Choose the square window the model sees: the masked area plus `margin` of context, at a supported size
    (`window_sizes`). None means there is nothing to remove.
    """
    if not buckets or any(b <= 0 or b % 64 for b in buckets):
        raise ValueError(f"buckets must be positive multiples of 64, got {list(buckets)}")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    box = _bounding_box(mask)
    if box is None:
        return None
    top, bottom, left, right = box
    height, width = mask.shape
    side, bucket = map(int, window_sizes(max(bottom - top, right - left), margin, max(height, width), buckets))
    return CropPlan(
        top=int(window_start(top, bottom, side, height)),
        left=int(window_start(left, right, side, width)),
        side=side,
        bucket=bucket,
    )


def window_start(lo, hi, side, extent: int) -> np.ndarray:
    """Start of a `side` window covering [lo, hi) along one axis of length `extent` (numbers or arrays).

    Centred on the span and pushed inside the image when it fits; centred on the image when it cannot.
    """
    lo, hi, side = (np.asarray(value, np.int64) for value in (lo, hi, side))
    inside = np.clip(lo + (hi - lo - side) // 2, 0, np.maximum(extent - side, 0))
    return np.where(side > extent, (extent - side) // 2, inside)


def _window_inside_image(plan: CropPlan, height: int, width: int) -> tuple[slice, slice, slice, slice]:
    """Image-space rows/cols of the window's visible part, and the matching window-space rows/cols."""
    y0, y1 = max(plan.top, 0), min(plan.top + plan.side, height)
    x0, x1 = max(plan.left, 0), min(plan.left + plan.side, width)
    image_rows, image_cols = slice(y0, y1), slice(x0, x1)
    window_rows = slice(y0 - plan.top, y1 - plan.top)
    window_cols = slice(x0 - plan.left, x1 - plan.left)
    return image_rows, image_cols, window_rows, window_cols


# --- model input / output -----------------------------------------------------------------------


def crop_for_model(rgb: np.ndarray, mask: np.ndarray, plan: CropPlan) -> tuple[np.ndarray, np.ndarray]:
    """Cut the planned window and bring it to the model's bucket size: (bucket, bucket, 3) uint8 and bool mask.

    Only the part of the window inside the image is resampled; the overhang is padded at bucket scale. Padding
    at full resolution first would allocate side x side pixels: gigabytes for a 1 x 20000 strip, whose window
    is 20000 pixels square.
    """
    height, width = mask.shape
    image_rows, image_cols, window_rows, window_cols = _window_inside_image(plan, height, width)
    rgb_window = rgb[image_rows, image_cols]
    mask_window = mask[image_rows, image_cols]
    if plan.side != plan.bucket:
        window_rows, window_cols = _at_bucket_scale(window_rows, plan), _at_bucket_scale(window_cols, plan)
        size = (window_cols.stop - window_cols.start, window_rows.stop - window_rows.start)
        resized = Image.fromarray(np.ascontiguousarray(rgb_window)).resize(size, Image.Resampling.LANCZOS)
        rgb_window = np.asarray(resized)
        # Bilinear coverage > 0 keeps strokes thinner than the downscale factor instead of dropping them; in float,
        # as 8-bit coverage rounds a 1-pixel dot to 0 past a downscale of ~22 (the model then left the object).
        coverage = Image.fromarray(mask_window.astype(np.float32)).resize(size, Image.Resampling.BILINEAR)
        mask_window = np.asarray(coverage) > 0
    padding = (
        (window_rows.start, plan.bucket - window_rows.stop),
        (window_cols.start, plan.bucket - window_cols.stop),
    )
    if any(any(pair) for pair in padding):
        visible_h, visible_w = rgb_window.shape[:2]
        # Reflection looks natural to the model but needs the pad to be shorter than the visible part. The mask is
        # padded alike: a masked object at the edge is mirrored into the pad, and left unmasked there the model
        # would see a copy of what it is to remove beside the hole.
        fits = max(padding[0]) < visible_h and max(padding[1]) < visible_w
        mode = "reflect" if fits else "edge"
        rgb_window = np.pad(rgb_window, (*padding, (0, 0)), mode=mode)
        mask_window = np.pad(mask_window, padding, mode=mode)
    return np.ascontiguousarray(rgb_window), mask_window.copy()


def _at_bucket_scale(span: slice, plan: CropPlan) -> slice:
    """Where a window-space span lands in the bucket-sized model crop: at least one pixel, inside the crop."""
    scale = plan.bucket / plan.side
    start = min(round(span.start * scale), plan.bucket - 1)
    return slice(start, max(round(span.stop * scale), start + 1))


def paste_back(rgb: np.ndarray, mask: np.ndarray, result: np.ndarray, plan: CropPlan, feather: int) -> np.ndarray:
    """Blend the model's output into a copy of the image, strictly inside the mask.

    The weight ramps from 0 at the mask edge to 1 at `feather` pixels inside it, so seams are soft while every
    unmasked pixel stays bit-identical to the input. Only the mask's bounding box is written; only the band
    within `feather` of its edge is blended.
    """
    out = rgb.copy()
    paste_back_into(out, mask, result, plan, feather)
    return out


def paste_back_into(image: np.ndarray, mask: np.ndarray, result: np.ndarray, plan: CropPlan, feather: int) -> None:
    """paste_back in place: `image` (H, W, 3) uint8 is the input and receives the result (a 40 MP photo's
    copy is 120 MB, and engines.regions pastes every region into one)."""
    if result.shape != (plan.bucket, plan.bucket, 3) or result.dtype != np.uint8:
        raise ValueError(f"result must be uint8 {(plan.bucket, plan.bucket, 3)}, got {result.dtype} {result.shape}")
    if feather < 0:
        raise ValueError(f"feather must be >= 0, got {feather}")
    height, width = mask.shape
    image_rows, image_cols, window_rows, window_cols = _window_inside_image(plan, height, width)
    window_mask = mask[image_rows, image_cols]
    box = _bounding_box(window_mask)
    if box is None:
        return
    if plan.side == plan.bucket:
        result = result[window_rows, window_cols]
    else:  # the inverse of crop_for_model: only the part of the crop that lies inside the image, back to its size
        visible = result[_at_bucket_scale(window_rows, plan), _at_bucket_scale(window_cols, plan)]
        size = (window_cols.stop - window_cols.start, window_rows.stop - window_rows.start)
        result = np.asarray(Image.fromarray(np.ascontiguousarray(visible)).resize(size, Image.Resampling.LANCZOS))
    rows, cols = slice(box[0], box[1]), slice(box[2], box[3])
    inside = window_mask[rows, cols]
    repainted = result[rows, cols]
    target = image[image_rows, image_cols][rows, cols]
    if feather == 0:
        _copy_pixels(target, repainted, inside)
        return
    # a block at a time: a mask that is nearly all edge (thin stripes) made the band as large as the photo, and its
    # index and weight arrays ~50 bytes a pixel (40 MP: 2 GB at once)
    for block_rows, block_cols in _blend_blocks(inside.shape, feather):
        box_rows = slice(rows.start + block_rows.start, rows.start + block_rows.stop)
        box_cols = slice(cols.start + block_cols.start, cols.start + block_cols.stop)
        if feather <= _SHIFTED_FEATHER_MAX:
            band, weight = _feather_band(window_mask, feather, box_rows, box_cols)
        else:
            weights = _feather_weight(window_mask, feather, box_rows, box_cols)
            band = np.flatnonzero((weights > 0) & (weights < 1))
            weight = weights.ravel()[band]
        part, model_part = target[block_rows, block_cols], repainted[block_rows, block_cols]
        band_rows, band_cols = np.divmod(band, block_cols.stop - block_cols.start)
        original = _take_pixels(part, band_rows, band_cols)  # a copy, taken before the model's pixels overwrite it
        _copy_pixels(part, model_part, inside[block_rows, block_cols])
        _blend_band(part, original, model_part, band_rows, band_cols, weight)


def _blend_blocks(shape: tuple[int, int], feather: int) -> list[tuple[slice, slice]]:
    """The blocks of the mask's box that paste_back_into blends one at a time, of about _BLEND_PIXELS each: bands
    of whole rows for the shifted minima (their halo is rows above and below), squares for the distance transform,
    whose halo of `feather` is on every side (a panorama's 16-row bands cost it 1.6-3.4x at feather 64)."""
    height, width = shape
    if feather <= _SHIFTED_FEATHER_MAX:
        step = max(1, _BLEND_PIXELS // width)
        return [(slice(top, min(top + step, height)), slice(0, width)) for top in range(0, height, step)]
    side = math.isqrt(_BLEND_PIXELS)
    return [
        (slice(top, min(top + side, height)), slice(left, min(left + side, width)))
        for top in range(0, height, side)
        for left in range(0, width, side)
    ]


def _blend_band(
    target: np.ndarray, original: np.ndarray, repainted: np.ndarray, rows: np.ndarray, cols: np.ndarray, weight
) -> None:
    """target = original * (1 - weight) + repainted * weight, rounded, at the band's pixels (rows, cols);
    `original` holds those pixels' input values."""
    weight = weight[:, None]
    blended = original.astype(np.float32)
    blended *= 1.0 - weight
    repainted_part = _take_pixels(repainted, rows, cols).astype(np.float32)
    repainted_part *= weight
    blended += repainted_part
    np.rint(blended, out=blended)
    np.clip(blended, 0, 255, out=blended)
    _put_pixels(target, rows, cols, blended.astype(np.uint8))


def _as_pixels(array: np.ndarray) -> np.ndarray | None:
    """An (H, W) view of an (H, W, C) uint8 array with one C-byte item per pixel; None if its strides forbid."""
    channels = array.shape[-1]
    if array.strides[-1] != 1 or array.strides[-2] != channels:
        return None
    return array.view(f"V{channels}")[..., 0]


def _take_pixels(array: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    pixels = _as_pixels(array)
    if pixels is None:
        return array[rows, cols]
    return pixels[rows, cols].view(np.uint8).reshape(len(rows), array.shape[-1])


def _put_pixels(array: np.ndarray, rows: np.ndarray, cols: np.ndarray, values: np.ndarray) -> None:
    pixels = _as_pixels(array)
    if pixels is None:
        array[rows, cols] = values
    else:
        pixels[rows, cols] = values.view(f"V{values.shape[-1]}")[:, 0]


def _copy_pixels(target: np.ndarray, source: np.ndarray, where: np.ndarray) -> None:
    """target[where] = source[where] for (H, W, C) uint8 arrays, a whole pixel at a time where strides allow."""
    target_pixels, source_pixels = _as_pixels(target), _as_pixels(source)
    if target_pixels is None or source_pixels is None:
        np.copyto(target, source, where=where[..., None])
    else:
        np.copyto(target_pixels, source_pixels, where=where)


def _feather_band(mask: np.ndarray, feather: int, rows: slice, cols: slice) -> tuple[np.ndarray, np.ndarray]:
    """The pixels of mask[rows, cols] closer than `feather` to an unmasked pixel (flat indices into that box)
    and their float32 weights distance / feather: where `_feather_weight` is strictly between 0 and 1, and its
    values there, bit for bit.

    Squared Euclidean distances below feather**2 come exactly from two separable passes over the box plus a
    `feather` halo: the distance to the nearest unmasked pixel in the same column (capped at `feather`), then
    the minimum over column offsets dx of dx**2 + that distance**2; each pass is 2 * (feather - 1) shifted
    minima of small integers. Beyond the mask array nothing is unmasked, as for the distance transform.
    """
    height, width = mask.shape
    y0, y1 = max(rows.start - feather, 0), min(rows.stop + feather, height)
    x0, x1 = max(cols.start - feather, 0), min(cols.stop + feather, width)
    small = np.uint8 if 2 * feather * feather <= 255 else np.uint16  # holds dx**2 + column**2 below 2 feather**2
    # column distance: 0 on unmasked pixels, `feather` (= far enough) on masked ones, then shifted minima
    base = mask[y0:y1, x0:x1].view(np.uint8) * np.uint8(feather)
    column = base.copy()
    for dy in range(1, min(feather, base.shape[0])):
        np.minimum(column[dy:], base[:-dy] + np.uint8(dy), out=column[dy:])
        np.minimum(column[:-dy], base[dy:] + np.uint8(dy), out=column[:-dy])
    source = column[rows.start - y0 : rows.stop - y0].astype(small)
    source *= source
    left, box_width = cols.start - x0, cols.stop - cols.start
    squared = source[:, left : left + box_width].copy()
    for dx in range(1, feather):
        offset = small(dx * dx)
        for start in (left - dx, left + dx):
            lo, hi = max(start, 0), min(start + box_width, source.shape[1])
            if lo < hi:
                part = squared[:, lo - start : hi - start]
                np.minimum(part, source[:, lo:hi] + offset, out=part)
    band = np.flatnonzero(mask[rows, cols] & (squared < feather * feather))
    weight = (np.sqrt(squared.ravel()[band].astype(np.float64)) / feather).astype(np.float32)
    return band, weight


def _feather_weight(mask: np.ndarray, feather: int, rows: slice, cols: slice) -> np.ndarray:
    """Blend weight over mask[rows, cols]: min(distance to the nearest unmasked pixel / feather, 1), 0 off the mask.

    Computed tile by tile with a `feather`-wide halo: any unmasked pixel close enough to matter lies in the halo,
    so the result equals a whole-window distance transform, but tiles deep inside the mask cost nothing.
    """
    weight = mask[rows, cols].astype(np.float32)
    if feather == 0:
        return weight
    height, width = mask.shape
    for top in range(rows.start, rows.stop, _FEATHER_TILE):
        for left in range(cols.start, cols.stop, _FEATHER_TILE):
            bottom, right = min(top + _FEATHER_TILE, rows.stop), min(left + _FEATHER_TILE, cols.stop)
            if not mask[top:bottom, left:right].any():
                continue
            y0, x0 = max(top - feather, 0), max(left - feather, 0)
            neighbourhood = mask[y0 : min(bottom + feather, height), x0 : min(right + feather, width)]
            if neighbourhood.all():
                continue
            distance = ndimage.distance_transform_edt(neighbourhood)[top - y0 : bottom - y0, left - x0 : right - x0]
            tile = (slice(top - rows.start, bottom - rows.start), slice(left - cols.start, right - cols.start))
            weight[tile] = np.minimum(distance / feather, 1.0)
    return weight


# --- encoding -----------------------------------------------------------------------------------


def check_output(fmt: str, height: int, width: int) -> None:
    """Refuse an output format that cannot hold the image, before any work is spent on it."""
    if fmt not in OUTPUT_FORMATS:
        allowed = ", ".join(OUTPUT_FORMATS)
        raise UnsupportedOutputFormat(f"output format {fmt!r} is not supported; use one of: {allowed}")
    side = max(height, width)
    fitting = [f for f in OUTPUT_FORMATS if side <= MAX_OUTPUT_SIDE.get(f, side)]
    if fmt not in fitting:
        raise ImageTooLarge(
            f"{fmt} output is limited to {MAX_OUTPUT_SIDE[fmt]} pixels per side but the image is {width}x{height}; "
            f"ask for {' or '.join(fitting)}"
        )


def encode_image(
    rgb: np.ndarray,
    alpha: np.ndarray | None,
    fmt: str,
    quality: int = 95,
    icc_profile: bytes | None = None,
    webp_lossless: bool = False,
    has_alpha: bool = False,
) -> bytes:
    """Encode the final image; alpha is kept where the format can store it (KEEPS_ALPHA) and dropped for jpeg,
    which then shows the colours stored under transparent pixels (Accept never picks it for an image with alpha).
    `has_alpha`: the source had an alpha channel; with `alpha` None (it was fully opaque) an opaque one is
    written where the format keeps alpha, so an RGBA PNG comes back RGBA (libwebp leaves an opaque one out).

    PNG is lossless at zlib level 1 with the Up filter; JPEG is baseline 4:2:0 at `quality`, as Pillow writes it.
    `icc_profile` (the source's RGB profile) is embedded, so a Display P3 or Adobe RGB photo looks as it did.
    """
    fmt = fmt.lower()
    check_output(fmt, *rgb.shape[:2])
    if alpha is None and has_alpha and fmt in KEEPS_ALPHA:
        alpha = np.full(rgb.shape[:2], 255, np.uint8)
    if alpha is not None and fmt in KEEPS_ALPHA:
        pixels = np.dstack([rgb, alpha]).astype(np.uint8)
    else:
        pixels = np.ascontiguousarray(rgb, dtype=np.uint8)
    if imagecodecs is not None and fmt == "png":
        try:
            png = imagecodecs.png_encode(pixels, level=1, filter=_PNG_FILTER_UP)
        except imagecodecs.PngError:  # its output estimate is too small for some (a noisy 1 px wide RGB strip)
            png = None
        if png is not None:
            return _with_png_profile(bytes(png), icc_profile)
    if imagecodecs is not None and fmt == "jpeg":
        return _with_jpeg_profile(bytes(imagecodecs.jpeg8_encode(pixels, level=quality, subsampling=(2, 2))), icc_profile)
    image = Image.fromarray(pixels)
    buffer = io.BytesIO()
    profile = {"icc_profile": icc_profile} if icc_profile else {}
    if fmt == "png":
        image.save(buffer, format="PNG", compress_level=1, **profile)
    elif fmt == "jpeg":
        image.save(buffer, format="JPEG", quality=quality, **profile)
    else:
        effort = min(quality, LOSSLESS_WEBP_MAX_EFFORT) if webp_lossless else quality
        image.save(buffer, format="WEBP", quality=effort, lossless=webp_lossless, exact=webp_lossless, **profile)
    return buffer.getvalue()


def _with_png_profile(png: bytes, profile: bytes | None) -> bytes:
    """An iCCP chunk right after IHDR, as Pillow writes it (imagecodecs' encoder takes no profile)."""
    if not profile:
        return png
    payload = b"ICC Profile\0\0" + zlib.compress(profile)
    chunk = len(payload).to_bytes(4, "big") + b"iCCP" + payload + zlib.crc32(b"iCCP" + payload).to_bytes(4, "big")
    after_header = 8 + 12 + int.from_bytes(png[8:12], "big")
    return png[:after_header] + chunk + png[after_header:]


def _with_jpeg_profile(jpeg: bytes, profile: bytes | None) -> bytes:
    """APP2 ICC_PROFILE segments (numbered parts of at most 65519 bytes) after the JFIF header, as Pillow
    writes them; a profile over 255 parts cannot be stored and is left out."""
    parts = [profile[at : at + _ICC_PART_BYTES] for at in range(0, len(profile), _ICC_PART_BYTES)] if profile else []
    if not parts or len(parts) > 255:
        return jpeg
    segments = b"".join(
        b"\xff\xe2" + (16 + len(part)).to_bytes(2, "big") + b"ICC_PROFILE\0" + bytes([number, len(parts)]) + part
        for number, part in enumerate(parts, start=1)
    )
    after_header = 2 + (2 + int.from_bytes(jpeg[4:6], "big") if jpeg[2:4] == b"\xff\xe0" else 0)
    return jpeg[:after_header] + segments + jpeg[after_header:]
