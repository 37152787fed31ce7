"""Latency at rising offered load: where the service saturates and what it does beyond.

    python loadtests/latency_report.py [--levels 1 2 4 8 16 32] [--seconds 40] [--max-in-flight 8]
                                       [--warmup-seconds 5]

Starts the local service once (tiny bundle, the shipped config with `overload.max_in_flight` set so
shedding shows on this machine), then for each level runs that many closed-loop clients for
--seconds (loadtests/soak.py's client: a 512 photo, a centred mask, every answer checked). A client
told to come back waits Retry-After, as a polite client does. Per level: removals completed (a valid
image) inside the window per second (each client's request in flight when the window closes is awaited but
not counted: with N closed-loop clients counting it overstated the rate by ~N / (rate x seconds)),
p50/p95/p99 of the successful ones, the share of 429 and 503 answers, other 4xx, other 5xx, bad answers (a
200 without the image, an error without problem+json), lost. The saturation point is the lowest level
reaching 95% of the best throughput; there is none when no level completed a removal, and the script then
exits 1. Saves out/latency_report.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import benchlib
from benchlib import start_service, stop_service
from soak import SoakReport, run_soak


def level_row(report: SoakReport) -> dict:
    """One row of the table. ok_per_s counts the removals completed inside the window only: run_soak waits
    for each client's last request, which ends after the window closes."""
    answered = max(report.answered, 1)
    return {
        "clients": report.clients,
        "ok_per_s": round(report.ok_in_window / report.seconds, 3),
        "ok_after_window": report.ok - report.ok_in_window,
        **{f"{q}_ms": v for q, v in report.latency_ms.items()},
        "sent": report.sent,
        "share_429": round(report.errored.get("429", 0) / answered, 3),
        "share_503": round(report.errored.get("503", 0) / answered, 3),
        "other_4xx": sum(n for s, n in report.errored.items() if s.startswith("4") and s != "429"),
        "other_5xx": sum(n for s, n in report.errored.items() if s.startswith("5") and s != "503"),
        "bad_answers": report.bad_result + report.bad_error,
        "lost": report.lost,
    }


def saturation_point(levels: list[dict]) -> int | None:
    """The fewest clients reaching 95% of the best ok/s (benchlib.saturation_point); None when no level
    completed a removal."""
    return benchlib.saturation_point(levels, load="clients", rate="ok_per_s")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--seconds", type=float, default=40)
    parser.add_argument(
        "--warmup-seconds", type=float, default=5, help="one client on the levels' path first (0: a warm service)"
    )
    parser.add_argument("--side", type=int, default=512)
    parser.add_argument("--max-in-flight", type=int, default=8, help="overload.max_in_flight of the ingress")
    parser.add_argument("--gate", default="annotate")
    parser.add_argument("--out", type=Path, default=Path("out/latency_report.json"))
    args = parser.parse_args()

    def adjust(config: dict) -> None:
        config["applications"][0]["args"]["overload"] = {"max_in_flight": args.max_in_flight, "retry_after_s": 1}

    work = Path(tempfile.mkdtemp(prefix="rorem-latency-"))
    child, url = start_service(work, "latency", adjust)
    levels = []
    try:
        fields = {"gate": args.gate}
        if args.warmup_seconds > 0:
            run_soak(url, seconds=args.warmup_seconds, clients=1, side=args.side, fields=fields)
        for clients in args.levels:
            report = run_soak(url, seconds=args.seconds, clients=clients, side=args.side, fields=fields)
            levels.append(level_row(report))
            print(levels[-1], flush=True)
    finally:
        stop_service(child)
    best = max(level["ok_per_s"] for level in levels)
    saturation = saturation_point(levels)
    result = {"seconds": args.seconds, "side": args.side, "max_in_flight": args.max_in_flight, "gate": args.gate,
              "levels": levels, "saturation_clients": saturation, "best_ok_per_s": best}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(
        f"{'clients':>7} {'ok/s':>6} {'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7} {'429':>6} {'503':>6} {'4xx':>4}"
        f" {'5xx':>4} {'bad':>4} {'lost':>4}"
    )
    for level in levels:
        print(
            f"{level['clients']:>7} {level['ok_per_s']:>6} {level.get('p50_ms', '-'):>7} {level.get('p95_ms', '-'):>7}"
            f" {level.get('p99_ms', '-'):>7} {level['share_429']:>6.1%} {level['share_503']:>6.1%}"
            f" {level['other_4xx']:>4} {level['other_5xx']:>4} {level['bad_answers']:>4} {level['lost']:>4}"
        )
    print(f"ok/s: removals completed inside each {args.seconds:g} s window, per second; bad: a 200 without the image,"
          " an error without problem+json")  # fmt: skip
    if saturation is None:
        print(f"latency_report: no level completed a removal: no saturation point; saved {args.out}", file=sys.stderr)
        return 1
    print(f"saturation at {saturation} clients ({best} removals/s); saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
