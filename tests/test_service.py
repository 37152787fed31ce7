"""The REST API against one local Ray Serve (started the README's way, tiny bundle, loopback only)."""

import base64
import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from tests.helpers import assert_problem as _assert_problem
from tests.helpers import box_mask as _mask
from tests.helpers import decode_png as _decode
from tests.helpers import photo, png_bytes
from tests.helpers import post_remove as _remove


def test_ready_reports_the_loaded_tiny_bundle(service):
    health = service.client.get("/healthz").json()
    assert health["status"] == "alive" and health["instance"], health  # the id `serve run` generated
    ready = service.client.get("/readyz")
    assert ready.status_code == 200
    model = ready.json()["model"]
    assert model["tiny"] is True and model["steps"] == 4 and model["buckets"] == [256, 512]
    assert model["bundle"]["name"] == "tiny-0" and "path" not in model["bundle"] and "source" not in model["bundle"]
    assert str(service.work) not in ready.text, "/readyz is public: it names no folder of the host"


def test_photo_and_mask_come_back_with_only_the_masked_region_changed(service):
    source, mask = photo(), _mask()
    response = _remove(service, png_bytes(source), png_bytes(mask), dilate=0, seed=1)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    assert response.headers["x-request-id"] and response.headers["x-seed"] == "1"
    assert "unet;dur=" in response.headers["server-timing"]
    result = _decode(response.content)
    assert result.shape == source.shape
    outside = mask == 0
    assert np.array_equal(result[outside], source[outside]), "pixels outside the mask must be bit-identical"
    inside = mask > 0
    assert np.abs(result[inside].astype(int) - source[inside]).mean() > 5, "the masked region must change"


def test_default_dilation_keeps_everything_beyond_it_identical(service):
    source, mask = photo(), _mask()
    result = _decode(_remove(service, png_bytes(source), png_bytes(mask), seed=2).content)
    dilate = service.config["imaging"]["dilate"]
    far = np.ones(mask.shape, bool)
    far[90 - dilate : 170 + dilate, 120 - dilate : 220 + dilate] = False
    assert np.array_equal(result[far], source[far])
    ring = np.zeros(mask.shape, bool)
    ring[90 - dilate : 90, 120:220] = True
    assert not np.array_equal(result[ring], source[ring]), "the dilated ring is part of the removal"


def test_same_seed_same_result(service):
    source, mask = png_bytes(photo()), png_bytes(_mask())
    first = _remove(service, source, mask, seed=5).content
    second = _remove(service, source, mask, seed=5).content
    assert first == second


def test_json_with_base64_fields(service):
    source, mask = photo(), _mask()
    body = {
        "image": base64.b64encode(png_bytes(source)).decode(),
        "mask": base64.b64encode(png_bytes(mask)).decode(),
        "seed": 3,
        "output_format": "webp",
    }
    response = service.client.post("/remove", json=body)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/webp"
    assert _decode(response.content).shape == source.shape


def test_jpeg_in_jpeg_out_and_accept_header_picks_the_format(service):
    buffer = io.BytesIO()
    Image.fromarray(photo()).save(buffer, format="JPEG", quality=90)
    response = _remove(service, buffer.getvalue(), png_bytes(_mask()))
    assert response.headers["content-type"] == "image/jpeg"
    files = {"image": ("i.png", png_bytes(photo())), "mask": ("m.png", png_bytes(_mask()))}
    response = service.client.post("/remove", files=files, headers={"Accept": "image/webp"})
    assert response.headers["content-type"] == "image/webp"
    assert response.headers["vary"] == "Accept", "a cache must not give one client's format to another"
    # two Accept lines are one list (RFC 9110 5.3): only the first was read, and PNG came back
    two_lines = [("accept", "image/png;q=0.1"), ("accept", "application/json")]
    assert service.client.post("/remove", files=files, headers=two_lines).headers["content-type"] == "application/json"


def test_alpha_is_kept(service):
    rgba = np.dstack([photo(), np.full((256, 320), 200, np.uint8)])
    response = _remove(service, png_bytes(rgba), png_bytes(_mask()))
    assert response.status_code == 200
    out = Image.open(io.BytesIO(response.content))
    assert out.mode == "RGBA" and np.all(np.asarray(out)[..., 3] == 200)


def test_empty_mask_returns_the_input_without_running_the_model(service):
    source = png_bytes(photo())
    response = _remove(service, source, png_bytes(np.zeros((256, 320), np.uint8)))
    assert response.status_code == 200
    assert response.content == source
    assert response.headers["x-bucket"] == "none"
    assert "x-batch-size" not in response.headers and "unet;dur" not in response.headers["server-timing"]
    assert response.headers["x-attempts"] == "0" and response.headers["x-gate"] == "nothing-to-remove"
    files = {"image": ("i.png", source, "image/png"), "mask": ("m.png", png_bytes(np.zeros((256, 320), np.uint8)))}
    reply = service.client.post("/remove", files=files, headers={"Accept": "application/json"})
    facts = {name: reply.json()[name] for name in ("seed", "bucket", "buckets", "batch_size", "score", "attempts")}
    assert facts == {"seed": None, "bucket": None, "buckets": [], "batch_size": None, "score": None, "attempts": 0}


def test_concurrent_requests_are_batched(service):
    """Eight at once, with a 0.25 s batch window: the Remover must really run batches > 1."""
    source, mask = png_bytes(photo()), png_bytes(_mask())
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda seed: _remove(service, source, mask, seed=seed), range(8)))
    assert all(r.status_code == 200 for r in responses)
    sizes = [int(r.headers["x-batch-size"]) for r in responses]
    assert max(sizes) > 1, sizes
    assert max(sizes) <= service.config["batching"]["max_batch_size"]
    results = {r.content for r in responses}
    assert len(results) == 8, "each request keeps its own seed inside a batch"


def test_non_image_bytes(service):
    _assert_problem(_remove(service, b"this is not an image", png_bytes(_mask())), 422, "invalid-image")


def test_mismatched_sizes(service):
    response = _remove(service, png_bytes(photo()), png_bytes(_mask(200, 200, (10, 10, 50, 50))))
    _assert_problem(response, 422, "mask-size-mismatch")
    assert "200x200" in response.json()["detail"]


def test_zero_size_upload(service):
    _assert_problem(_remove(service, b"", png_bytes(_mask())), 422, "invalid-image")


def test_oversized_upload_is_413(service):
    limit = service.config["imaging"]["max_upload_bytes"]
    noise = np.random.default_rng(0).integers(0, 256, (1600, 1600, 3), dtype=np.uint8)
    big = png_bytes(noise)
    assert len(big) > limit
    _assert_problem(_remove(service, big, None), 413, "payload-too-large")


def test_megapixel_bomb_is_refused(service):
    import struct
    import zlib

    tiny = bytearray(png_bytes(np.zeros((8, 8), np.uint8)))
    ihdr = bytearray(tiny[16:29])
    ihdr[0:8] = struct.pack(">II", 30000, 30000)
    tiny[16:29] = ihdr
    tiny[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)) & 0xFFFFFFFF)
    _assert_problem(_remove(service, bytes(tiny), None), 413, "image-too-large")


@pytest.mark.parametrize(
    "kwargs, problem, status",
    [
        ({"content": b"hello", "headers": {"content-type": "text/plain"}}, "unsupported-media-type", 415),
        ({"content": b"{not json", "headers": {"content-type": "application/json"}}, "malformed-body", 400),
        ({"json": {"image": "%%%not-base64%%%"}}, "invalid-request", 422),
        ({"json": {"mask": "AAAA"}}, "invalid-request", 422),
        ({"json": {"image": "AAAA", "strength": 0.5}}, "invalid-request", 422),
        ({"json": {"image": "AAAA", "seed": -1}}, "invalid-request", 422),
        ({"json": {"image": "AAAA", "output_format": "bmp"}}, "invalid-request", 422),
    ],
)
def test_bad_requests_get_problem_json(service, kwargs, problem, status):
    _assert_problem(service.client.post("/remove", **kwargs), status, problem)


def test_no_mask_and_no_alpha_is_a_clear_error(service):
    _assert_problem(_remove(service, png_bytes(photo()), None), 422, "invalid-mask")


def test_the_docs_page_is_served_with_pinned_scripts(service):
    docs = service.client.get("/docs")
    assert docs.status_code == 200 and docs.headers["content-type"].startswith("text/html")
    assert docs.text.count('integrity="sha384-') == 2 and service.client.get("/redoc").status_code == 404


def test_unknown_route_is_problem_json(service):
    _assert_problem(service.client.get("/nope"), 404, "not-found")
    not_allowed = service.client.get("/remove")
    _assert_problem(not_allowed, 405, "method-not-allowed")
    assert not_allowed.headers["allow"] == "POST", "RFC 9110: a 405 says what is allowed"
    assert service.client.delete("/healthz").headers["allow"] == "GET, HEAD", "every method, not the first route's"
