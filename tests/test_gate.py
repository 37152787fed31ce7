"""The gate policy as plain logic: which attempt is kept, how many run, what fails open or closed."""

import asyncio
import re

import pytest

from engines.gate import REPLY_VERDICTS, GatePolicy, ScorerUnavailable, attempt_seed, max_crops, run_gated
from serve.config import GateSettings
from tests.helpers import REPO


def _run(policy, scores, seed=7):
    """Run the gate with a fake remover (result = the seed it got) and scores handed out in order."""
    calls = {"remove": [], "score": 0}
    queue = list(scores)

    async def remove(s):
        calls["remove"].append(s)
        return s

    async def score(result):
        calls["score"] += 1
        value = queue.pop(0)
        if isinstance(value, Exception):
            raise value
        return value

    outcome = asyncio.run(run_gated(policy, seed, remove, score))
    return outcome, calls


def _policy(mode, threshold=0.5, attempts=3, fail_open=True):
    return GatePolicy(mode, threshold, attempts, fail_open)


def test_off_runs_once_and_never_scores():
    outcome, calls = _run(_policy("off"), [])
    assert (outcome.attempts, outcome.score, outcome.verdict, calls["score"]) == (1, None, "off", 0)


@pytest.mark.parametrize("value, verdict", [(0.7, "passed"), (0.2, "failed")])
def test_annotate_scores_once(value, verdict):
    outcome, calls = _run(GatePolicy.resolve(GateSettings(mode="annotate")), [value])
    assert (outcome.attempts, outcome.score, outcome.verdict, calls["score"]) == (1, value, verdict, 1)
    assert outcome.accepted


def test_retry_stops_at_the_first_passing_attempt():
    outcome, calls = _run(_policy("retry"), [0.1, 0.8, 0.9])
    assert outcome.attempts == 2 and outcome.score == 0.8 and outcome.verdict == "passed"
    assert outcome.result == attempt_seed(7, 1) == outcome.seed and len(calls["remove"]) == 2


def test_retry_keeps_the_best_when_none_passes():
    outcome, calls = _run(_policy("retry"), [0.1, 0.4, 0.2])
    assert outcome.attempts == 3 and outcome.score == 0.4 and outcome.verdict == "failed" and outcome.accepted
    assert outcome.seed == attempt_seed(7, 1)
    assert calls["remove"] == [7, attempt_seed(7, 1), attempt_seed(7, 2)] and len(set(calls["remove"])) == 3


def test_reject_refuses_when_every_attempt_fails():
    outcome, _ = _run(_policy("reject", attempts=2), [0.3, 0.1])
    assert outcome.verdict == "rejected" and not outcome.accepted and outcome.attempts == 2 and outcome.score == 0.3


def test_scorer_down_fails_open_or_closed():
    outcome, _ = _run(_policy("retry", fail_open=True), [ScorerUnavailable("down")])
    assert outcome.verdict == "unscored" and outcome.score is None and outcome.accepted
    with pytest.raises(ScorerUnavailable):
        _run(_policy("reject", fail_open=False), [ScorerUnavailable("down")])
    outcome, _ = _run(_policy("annotate", attempts=1, fail_open=False), [ScorerUnavailable("down")])
    assert outcome.verdict == "unscored"


@pytest.mark.parametrize("fail_open", [True, False])
def test_a_later_attempt_the_scorer_cannot_score_leaves_the_answer_to_the_scored_ones(fail_open):
    """Fail-open or closed is about a result nobody scored; when earlier attempts were scored, the best of them
    answers (retry keeps it, reject refuses it), not the unscored one nor a 503."""
    outcome, calls = _run(_policy("retry", fail_open=fail_open), [0.3, 0.4, ScorerUnavailable("down")])
    assert (outcome.verdict, outcome.score, outcome.attempts, outcome.seed) == ("failed", 0.4, 2, attempt_seed(7, 1))
    assert len(calls["remove"]) == 3
    outcome, _ = _run(_policy("reject", fail_open=fail_open), [0.3, ScorerUnavailable("down")])
    assert (outcome.verdict, outcome.score, outcome.attempts) == ("rejected", 0.3, 1)


def test_request_overrides_apply_only_when_allowed():
    allowed = GatePolicy.resolve(GateSettings(), mode="reject", threshold=0.9, max_attempts=3)
    assert (allowed.mode, allowed.threshold, allowed.max_attempts) == ("reject", 0.9, 3)
    locked = GatePolicy.resolve(GateSettings(allow_request_override=False), mode="off", threshold=0.1)
    assert (locked.mode, locked.threshold, locked.max_attempts) == ("annotate", 0.5, 1)


def test_attempt_seeds_are_reproducible_and_json_safe():
    """A derived seed is exact as a JSON number in every client (JavaScript: at most 2**53 - 1), whatever the
    request's seed; the request's own seed is used as sent."""
    for first in (0, 7, 2**53 - 1, 2**53, 2**63 - 1):
        seeds = [attempt_seed(first, k) for k in range(8)]
        assert seeds == [attempt_seed(first, k) for k in range(8)]
        assert seeds[0] == first and len(set(seeds)) == 8 and all(0 <= s < 2**53 for s in seeds[1:]), first


def test_one_request_never_causes_more_model_calls_than_the_cap():
    for cap in (2, 5, 8, 16):
        for mode in ("retry", "reject"):
            policy = GatePolicy.resolve(GateSettings(max_attempts=1, max_model_calls=cap), mode=mode, max_attempts=8)
            assert 2 * policy.max_attempts <= cap and policy.max_attempts == min(8, cap // 2)
    with pytest.raises(ValueError, match="max_model_calls"):
        GateSettings(max_attempts=5, max_model_calls=8)


def test_the_crops_an_attempt_may_cut_keep_even_the_first_attempt_within_the_cap():
    """With a Scorer every mode plans the scored bound (the crops do not depend on the gate); without one the
    gate is off and a crop is one call."""
    for cap in (2, 3, 8, 16):
        for scored, modes in ((True, ("off", "annotate", "retry", "reject")), (False, ("off",))):
            crops = max_crops(cap, scored)
            assert crops == (cap // 2 if scored else cap)
            for mode in modes:
                settings = GateSettings(max_attempts=1, max_model_calls=cap)
                policy = GatePolicy.resolve(settings, mode=mode, max_attempts=8).within_calls(cap, crops)
                assert policy.max_attempts * crops * (1 if mode == "off" else 2) <= cap, (cap, mode)


def test_a_request_with_several_crops_runs_fewer_attempts_within_the_same_cap():
    policy = GatePolicy.resolve(GateSettings(max_model_calls=8), mode="retry", max_attempts=4)
    assert [policy.within_calls(8, crops).max_attempts for crops in (1, 2, 3, 4, 16)] == [4, 2, 1, 1, 1]
    off = GatePolicy.resolve(GateSettings(), mode="off")
    assert off.within_calls(8, 16).max_attempts == 1, "at least one attempt, even past the cap"


class _QueueFull(Exception):
    pass


def test_an_error_of_the_moment_in_a_later_attempt_leaves_the_best_and_any_other_error_propagates():
    """The caller says which errors are of the moment (the service: a full model queue, failed replicas); a later
    attempt lost to one leaves the answer to the attempts before it, while the first attempt's, and an error of
    another kind (a bug) in any attempt, still reach the caller."""

    def run(mode, fails_at, error):
        async def remove(seed):
            if seed == attempt_seed(7, fails_at):
                raise error
            return seed

        async def score(result):
            return 0.3 if result == 7 else 0.2

        return asyncio.run(
            run_gated(_policy(mode), 7, remove, score, transient=lambda exc: isinstance(exc, _QueueFull))
        )

    kept = run("retry", 1, _QueueFull())
    assert (kept.verdict, kept.attempts, kept.score, kept.seed) == ("failed", 1, 0.3, 7)
    assert run("reject", 2, _QueueFull()).verdict == "rejected"
    with pytest.raises(_QueueFull):
        run("retry", 0, _QueueFull())
    with pytest.raises(KeyError):
        run("retry", 1, KeyError("a bug"))


@pytest.mark.timing
@pytest.mark.parametrize("mode, fail_open", [("annotate", False), ("retry", True)])
def test_a_scoring_still_running_at_the_deadline_counts_as_the_scorer_down_where_unscored_is_kept(mode, fail_open):
    """The scoring waited scorer.timeout_s (10 s) whatever was left of the request: a removal done in 0.1 s of a
    3 s deadline became a 504 under a Scorer still loading, where fail-open promises the unscored result."""

    async def remove(s):
        return s

    async def hung_score(result):
        await asyncio.sleep(3600)

    async def main():
        loop = asyncio.get_running_loop()
        began = loop.time()
        outcome = await run_gated(_policy(mode, fail_open=fail_open), 7, remove, hung_score, loop.time() + 0.2)
        return outcome, loop.time() - began

    outcome, took = asyncio.run(asyncio.wait_for(main(), 10))
    assert took < 1.0 and (outcome.verdict, outcome.score, outcome.result) == ("unscored", None, 7)


@pytest.mark.parametrize("mode", ["retry", "reject"])
def test_fail_closed_a_first_scoring_past_the_gates_deadline_is_not_blamed_on_the_scorer(mode):
    """Fail-closed, a healthy Scorer scoring a slow removal's result just past the gate's deadline answered 503
    scorer-unavailable: the request's own deadline (the caller's) bounds it, as before."""

    async def remove(s):
        return s

    async def slow_score(result):
        await asyncio.sleep(0.3)
        return 0.9

    async def main():
        loop = asyncio.get_running_loop()
        return await run_gated(_policy(mode, fail_open=False), 7, remove, slow_score, loop.time() + 0.1)

    outcome = asyncio.run(asyncio.wait_for(main(), 10))
    assert (outcome.verdict, outcome.score, outcome.attempts) == ("passed", 0.9, 1)


def _named_verdicts(path: str) -> list[str]:
    """The verdict words a file names for X-Gate / the gRPC reply's `gate` (the playground: its GATE_WORDS keys)."""
    text = " ".join((REPO / path).read_text().split())
    if path.endswith(".html"):
        block = re.search(r"const GATE_WORDS = \{(.*?)\};", text)[1]
        return sorted(re.findall(r"(?:^|\",) \"?([\w-]+)\"?: \"", block))
    pattern = {
        "serve/rorem.proto": r"string gate = \d+; // verdict: ((?:[\w-]+(?: \| )?)+)",
        "README.md": r"`X-Gate` \(((?:`[\w-]+`(?:, )?)+)\)",
        "docs/api.md": r"`X-Gate` \(the verdict: ((?:`[\w-]+`(?:, )?)+)\)",
    }[path]
    found = re.search(pattern, text)
    assert found, f"{path} names no verdicts where {pattern}"
    return sorted(re.findall(r"[\w-]+", found[1]))


@pytest.mark.parametrize("path", ["serve/rorem.proto", "README.md", "docs/api.md", "serve/static/playground.html"])
def test_the_proto_the_docs_and_the_playground_name_exactly_the_reply_verdicts(path):
    """X-Gate / the gRPC reply's `gate` is one of engines.gate.REPLY_VERDICTS: the proto's comment, the README, the
    API reference and the playground's words for each verdict name those, no fewer and no others."""
    assert _named_verdicts(path) == sorted(REPLY_VERDICTS)


def test_the_gate_outcome_metrics_labels_are_documented():
    """ray_rorem_gate_outcomes_total's verdict label: a gate outcome's words and scorer-unavailable (one Literal)."""
    from typing import get_args

    from engines.gate import OutcomeLabel

    def words(literal) -> list[str]:
        return [w for arg in get_args(literal) for w in (words(arg) if get_args(arg) else [arg])]

    metric = "| `ray_rorem_gate_outcomes_total` | counter | `mode`, `verdict` ("
    row = (REPO / "docs" / "api.md").read_text().split(metric)[1]
    assert row.split(")", 1)[0].split(", ") == words(OutcomeLabel)
