"""Quality gating and POST /score against the local Serve (tiny bundle with its tiny discriminator).

Thresholds are forced per request (gate_threshold 0 or 10) so retry and reject really happen.
"""

import base64
from types import SimpleNamespace

import numpy as np
import pytest

from engines.gate import attempt_seed
from tests.helpers import assert_problem as _assert_problem
from tests.helpers import box_mask as _mask
from tests.helpers import decode_png as _decode
from tests.helpers import photo, png_bytes
from tests.helpers import post_remove as _remove

IMPOSSIBLE = 10.0


def _score(service, source: bytes, mask: bytes, edited: bytes, **fields):
    files = {
        "source": ("source.png", source, "image/png"),
        "mask": ("mask.png", mask, "image/png"),
        "edited": ("edited.png", edited, "image/png"),
    }
    return service.client.post("/score", files=files, data={k: str(v) for k, v in fields.items()})


@pytest.fixture(scope="module")
def inputs():
    return png_bytes(photo()), png_bytes(_mask())


def test_annotate_reports_the_score_in_header_and_json(service, inputs):
    image, mask = inputs
    response = _remove(service, image, mask, seed=3, gate="annotate")
    assert response.status_code == 200, response.text
    score = float(response.headers["x-removal-score"])
    assert score >= 0 and response.headers["x-attempts"] == "1"
    assert response.headers["x-gate"] == ("passed" if score >= 0.5 else "failed")
    as_json = service.client.post(
        "/remove",
        json={"image": base64.b64encode(image).decode(), "mask": base64.b64encode(mask).decode(), "seed": 3},
        headers={"Accept": "application/json"},
    )
    body = as_json.json()
    assert as_json.status_code == 200 and body["attempts"] == 1 and body["seed"] == 3
    assert body["score"] == pytest.approx(score, abs=1e-4), "same seed, same score"
    assert np.array_equal(_decode(base64.b64decode(body["image"])), _decode(response.content))


def test_off_does_not_score(service, inputs):
    response = _remove(service, *inputs, seed=3, gate="off")
    assert response.status_code == 200 and "x-removal-score" not in response.headers
    assert response.headers["x-gate"] == "off"


def test_retry_runs_every_attempt_and_keeps_the_best(service, inputs):
    image, mask = inputs
    response = _remove(service, image, mask, seed=11, gate="retry", gate_threshold=IMPOSSIBLE, max_attempts=3)
    assert response.status_code == 200, response.text
    assert response.headers["x-attempts"] == "3" and response.headers["x-gate"] == "failed"
    kept_seed, kept_score = int(response.headers["x-seed"]), float(response.headers["x-removal-score"])
    attempt_scores = {}
    for k in range(3):
        seed = attempt_seed(11, k)
        single = _remove(service, image, mask, seed=seed, gate="annotate")
        attempt_scores[seed] = float(single.headers["x-removal-score"])
        if seed == kept_seed:
            assert np.array_equal(_decode(single.content), _decode(response.content)), "kept image = that seed's result"
    assert kept_seed in attempt_scores and len(set(attempt_scores.values())) > 1, "new seeds give new results"
    assert kept_score == pytest.approx(max(attempt_scores.values()), abs=1e-4)


def test_retry_stops_once_an_attempt_passes(service, inputs):
    response = _remove(service, *inputs, seed=11, gate="retry", gate_threshold=0.0)
    assert response.headers["x-attempts"] == "1" and response.headers["x-gate"] == "passed"


def test_reject_answers_422_with_the_best_score(service, inputs):
    response = _remove(service, *inputs, seed=5, gate="reject", gate_threshold=IMPOSSIBLE, max_attempts=2)
    _assert_problem(response, 422, "removal-failed")
    body = response.json()
    assert body["attempts"] == 2 and body["threshold"] == IMPOSSIBLE and body["score"] >= 0
    assert body["seed"] in (5, attempt_seed(5, 1))


def test_score_of_the_returned_image_equals_the_score_header(service, inputs):
    """The gate scores what the caller receives, so POST /score on a PNG result reproduces X-Removal-Score."""
    image, mask = inputs
    response = _remove(service, image, mask, seed=8, gate="annotate", output_format="png")
    rescored = _score(service, image, mask, response.content).json()["score"]
    assert rescored == pytest.approx(float(response.headers["x-removal-score"]), abs=1e-4)


def test_score_endpoint_is_deterministic_and_input_dependent(service, inputs):
    image, mask = inputs
    edited = _remove(service, image, mask, seed=2, gate="off", output_format="png").content
    first = _score(service, image, mask, edited)
    assert first.status_code == 200, first.text
    body = first.json()
    assert body["threshold"] == 0.5 and body["passed"] == (body["score"] >= 0.5) and body["bucket"] in (256, 512)
    assert _score(service, image, mask, edited).json()["score"] == body["score"]
    unchanged = _score(service, image, mask, image).json()["score"]
    assert unchanged != body["score"]
    strict = _score(service, image, mask, edited, gate_threshold=IMPOSSIBLE).json()
    assert strict["passed"] is False and strict["threshold"] == IMPOSSIBLE


def test_score_errors(service, inputs):
    image, mask = inputs
    small = png_bytes(photo(128, 128))
    _assert_problem(_score(service, image, mask, small), 422, "image-size-mismatch")
    empty = png_bytes(np.zeros((256, 320), np.uint8))
    _assert_problem(_score(service, image, empty, image), 422, "invalid-mask")
    missing = service.client.post("/score", files={"source": ("s.png", image, "image/png")})
    _assert_problem(missing, 422, "invalid-request")


def test_unknown_gate_mode_is_a_clear_422(service, inputs):
    _assert_problem(_remove(service, *inputs, gate="sometimes"), 422, "invalid-request")
    _assert_problem(_remove(service, *inputs, gate="retry", max_attempts=99), 422, "invalid-request")


def test_the_score_header_never_contradicts_the_gate():
    """X-Removal-Score was rounded to 4 places: 0.49996 showed as 0.5000 next to X-Gate: failed (threshold 0.5).
    It carries the JSON reply's digits (the shortest repr of the float). No Ray: the Ingress's reply alone."""
    import asyncio
    import json

    from serve.app import Ingress
    from serve.service import RemovalResult
    from serve.uploads import Offload

    class Stages:
        def observe(self, stages):
            pass

    ingress = object.__new__(Ingress.func_or_class.__bases__[0])  # not @serve.ingress's wrapper: its __del__ is async
    ingress.metrics, ingress.offload = SimpleNamespace(stages=Stages()), Offload(1, 4)
    for score in (0.49996, 0.4999999999, 1e-05, 0.5):
        reply = RemovalResult(b"png", "png", 3, [512], 1, score, 1, "passed" if score >= 0.5 else "failed")
        image = asyncio.run(ingress._removal_response(reply, 0.0, "image/png"))
        as_json = asyncio.run(ingress._removal_response(reply, 0.0, "application/json"))
        header = image.headers["x-removal-score"]
        assert float(header) == score == json.loads(as_json.body)["score"], header
        assert (float(header) >= 0.5) == (image.headers["x-gate"] == "passed")
