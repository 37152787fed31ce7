"""Discriminator scoring time per batch, in process (the Scorer deployment's engine).

    python loadtests/bench_scorer.py [--bundle-cache ~/.cache/rorem] [--batches 1 4 8] [--runs 5] [--threads 2]

Uses the configured cache's tiny bundle (or --bundle PATH). Prints a table (per batch: p50 of the runs and
each stage's median over the runs) and writes JSON (default out/bench_scorer.json).
"""

from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path

from benchlib import center_mask, photo, positive_int, summarize, timed_runs

from engines.jobs import ScoreJob


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bundle", default=None, help="a bundle folder (default: the tiny bundle)")
    parser.add_argument("--bundle-cache", default="~/.cache/rorem")
    parser.add_argument("--side", type=int, default=512, help="crop side (scored on a 512 view)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--runs", type=positive_int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("out/bench_scorer.json"))
    args = parser.parse_args()
    import torch  # the model libraries load after the arguments are checked: a bad flag is refused at once

    from engines.scorer import ScoringEngine
    from engines.sources import open_bundle

    if args.threads:
        torch.set_num_threads(args.threads)
    bundle = open_bundle(path=args.bundle, authors=None, cache_dir=args.bundle_cache)
    engine = ScoringEngine.from_bundle(bundle, device=args.device)
    job = ScoreJob(source=photo(args.side), mask=center_mask(args.side), edited=photo(args.side)[::-1].copy())
    rows = []
    for batch in args.batches:
        jobs = [job] * batch
        engine.score(jobs)
        samples, stages = timed_runs(partial(engine.score, jobs), args.runs)
        summary = summarize(samples)
        rows.append({"batch": batch, **summary, "per_job_ms": round(summary["p50_ms"] / batch, 1),
                     "stages_p50_ms": {k: round(v, 1) for k, v in stages.items()}})  # fmt: skip
    result = {"bundle": bundle.manifest.name, "device": args.device, "torch_threads": torch.get_num_threads(),
              "crop_side": args.side, "score_size": engine.score_size, "rows": rows}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"{'batch':>5} {'p50 ms':>8} {'per job':>8}  stages (median of the runs, ms)")
    for row in rows:
        print(f"{row['batch']:>5} {row['p50_ms']:>8} {row['per_job_ms']:>8}  {row['stages_p50_ms']}")
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
