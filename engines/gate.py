"""Quality gating: run a removal, score it, and decide by policy whether to keep, retry or refuse.

The policy is plain logic over two awaitables (remove with a seed, score a result), so it is tested
without Ray; engines.pipeline runs it for the service, the release gate and the benchmarks alike.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace
from typing import Awaitable, Callable, Generic, Literal, Protocol, TypeVar, get_args

GateMode = Literal["off", "annotate", "retry", "reject"]
KeptVerdict = Literal["passed", "failed", "off", "unscored"]
"""A kept result's verdict: passed; failed (below the threshold, kept under annotate / retry); off (not scored);
unscored (the scorer failed and the policy fails open)."""
GateVerdict = Literal[KeptVerdict, "rejected"]
"""A gate outcome's verdict: a kept one, or rejected (reject: no attempt passed; answered as a problem)."""
OutcomeLabel = Literal[GateVerdict, "scorer-unavailable"]
"""The `verdict` label of ray_rorem_gate_outcomes_total: a gate outcome's, or scorer-unavailable (the scorer failed
and the policy fails closed: no outcome, a 503)."""
ReplyVerdict = Literal[KeptVerdict, "nothing-to-remove"]
"""What a removal's reply says in X-Gate / the gRPC reply's `gate`: a kept verdict, or nothing-to-remove (an empty
mask: the image came back as sent, nothing scored)."""
REPLY_VERDICTS: tuple[str, ...] = get_args(ReplyVerdict)
NOTHING_TO_REMOVE: ReplyVerdict = "nothing-to-remove"


class GateConfig(Protocol):
    """What the policy reads from its settings: serve.config.GateSettings validates them (the engines never
    import the service)."""

    mode: GateMode
    threshold: float
    max_attempts: int
    max_model_calls: int
    allow_request_override: bool
    on_scorer_error: Literal["fail_open", "fail_closed"]

Result = TypeVar("Result")
_GOLDEN = 0x9E3779B97F4A7C15
MAX_SAFE_SEED = 2**53 - 1
"""The largest seed the service chooses, random or derived: JSON's largest safe integer (JavaScript's
Number.MAX_SAFE_INTEGER), so a client that parses the reply's `seed` as a double reads it exactly."""


def attempt_seed(seed: int, attempt: int) -> int:
    """Attempt 0 uses the request's seed as sent (a client's may exceed MAX_SAFE_SEED); later attempts derive
    new, reproducible seeds from it: (seed + attempt * _GOLDEN) mod 2**53, at most MAX_SAFE_SEED."""
    if attempt == 0:
        return seed
    return (seed + attempt * _GOLDEN) % (MAX_SAFE_SEED + 1)


class ScorerUnavailable(RuntimeError):
    """The scorer could not score a result (down, overloaded, timed out)."""


@dataclass(frozen=True)
class GatePolicy:
    mode: GateMode
    threshold: float
    max_attempts: int
    fail_open: bool

    @classmethod
    def resolve(
        cls,
        settings: GateConfig,
        mode: GateMode | None = None,
        threshold: float | None = None,
        max_attempts: int | None = None,
    ) -> "GatePolicy":
        """The configured policy with the request's overrides, when the config allows them; attempts capped
        so that one request never causes more than `max_model_calls` model calls."""
        if not settings.allow_request_override:
            mode = threshold = max_attempts = None
        mode = mode or settings.mode
        return cls(
            mode=mode,
            threshold=settings.threshold if threshold is None else threshold,
            max_attempts=1
            if mode in ("off", "annotate")
            else min(max_attempts or settings.max_attempts, settings.max_model_calls // 2),
            fail_open=settings.on_scorer_error == "fail_open",
        )


    def within_calls(self, max_model_calls: int, crops: int) -> "GatePolicy":
        """Attempts capped for a request of `crops` crops: each attempt is one removal per crop, plus one
        scoring per crop when the gate scores; at least one attempt always runs."""
        per_attempt = crops * _calls_per_crop(self.mode != "off")
        attempts = max(1, min(self.max_attempts, max_model_calls // per_attempt))
        return self if attempts == self.max_attempts else replace(self, max_attempts=attempts)


def _calls_per_crop(scored: bool) -> int:
    """Model calls one crop costs in one attempt: its removal, and its scoring when the gate scores."""
    return 2 if scored else 1


def max_crops(max_model_calls: int, scored: bool) -> int:
    """The most crops (after merging) one attempt may cut within `max_model_calls`: a mask that needs more has
    regions share windows until it fits (engines.regions), so that even the first attempt stays within the cap.
    `scored`: the deployment has a Scorer. Not the request's gate mode: a mask's crops are the same whatever the
    gate, so gate=off with a scored removal's seed gives its image, and POST /score cuts what a removal cut."""
    return max(1, max_model_calls // _calls_per_crop(scored))


@dataclass
class GateOutcome(Generic[Result]):
    """What the gate kept and why (`verdict`: GateVerdict)."""

    result: Result
    seed: int
    score: float | None
    attempts: int
    verdict: GateVerdict

    @property
    def accepted(self) -> bool:
        return self.verdict != "rejected"

    @property
    def kept_verdict(self) -> KeptVerdict:
        """What the reply of a kept result says (X-Gate); a rejected outcome is answered as a problem instead."""
        if self.verdict == "rejected":
            raise ValueError("a rejected outcome keeps no result")
        return self.verdict


async def run_gated(
    policy: GatePolicy,
    seed: int,
    remove: Callable[[int], Awaitable[Result]],
    score: Callable[[Result], Awaitable[float]],
    deadline: float | None = None,
    transient: Callable[[Exception], bool] | None = None,
) -> GateOutcome[Result]:
    """Attempt removals with derived seeds until one scores >= threshold or attempts run out.

    A ScorerUnavailable from the first attempt's `score`: fail-open keeps its result unscored, fail-closed
    re-raises (the entry point answers 503). From a later attempt's, the attempts before it answer, scored. Where
    the first attempt's result would be kept unscored, a scoring still running at `deadline` counts as one: a
    removal done in time is not lost to a slow Scorer (fail-closed, the caller's deadline answers: not the Scorer's
    fault, as far as anyone knows).

    An attempt after the first that is lost to the moment does not cost the ones before it: the gate answers with
    what those earned, as if attempts had run out, rather than start one with less time left before `deadline`
    (the event loop's time; None: none) than the attempts so far took on average, or once one is cut at
    `deadline`, cannot be scored, or fails with an error that `transient` says is of the moment (a full queue).
    The first attempt's errors, and any other error (a bug), propagate.
    """
    if policy.mode == "off":
        return GateOutcome(await remove(seed), seed, None, 1, "off")

    async def scored(attempt_s: int, first: bool) -> tuple[Result, float | None]:
        result = await remove(attempt_s)
        kept_unscored = first and (policy.fail_open or policy.mode == "annotate")
        try:  # where an unscored result is kept, it is kept by `deadline`; fail-closed, the request's own bounds it
            async with asyncio.timeout_at(deadline if kept_unscored else None) as scoring:
                return result, await score(result)
        except TimeoutError as exc:
            if not scoring.expired():
                raise
            outage = ScorerUnavailable("no score before the request's deadline")
            outage.__cause__ = exc
        except ScorerUnavailable as exc:
            outage = exc
        if kept_unscored:
            return result, None
        raise outage

    loop = asyncio.get_running_loop()
    best: GateOutcome[Result] | None = None
    took: list[float] = []
    for attempt in range(policy.max_attempts):
        attempt_s = attempt_seed(seed, attempt)
        later = best is not None
        if later and deadline is not None and deadline - loop.time() < sum(took) / len(took):
            break
        began = loop.time()
        try:
            async with asyncio.timeout_at(deadline if later else None) as cut:
                result, value = await scored(attempt_s, first=not later)
        except TimeoutError:
            if later and cut.expired():
                break
            raise
        except Exception as exc:
            if later and (isinstance(exc, ScorerUnavailable) or (transient is not None and transient(exc))):
                break
            raise
        if value is None:
            return GateOutcome(result, attempt_s, None, attempt + 1, "unscored")
        took.append(loop.time() - began)
        if best is None or value > best.score:
            best = GateOutcome(result, attempt_s, value, attempt + 1, "failed")
        best.attempts = attempt + 1
        if value >= policy.threshold:
            best.verdict = "passed"
            return best
    assert best is not None
    if policy.mode == "reject":
        best.verdict = "rejected"
    return best
