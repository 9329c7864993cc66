"""Reproduce the OPD papers' findings on a small pretrained model, in one command on the CPU.

    python science/run.py --out runs/science [--docs docs/science]   # the full run (see docs/papers.md)
    python science/run.py --quick --out /tmp/science-quick           # every measurement, tiny (a minute or two)
    python science/run.py --report-only --out runs/science --docs docs/science   # redo verdicts and report

Pretrains (once, cached) a small Llama on a synthetic corpus of three skills, each answered by a worked trace (a
chain of steps, about 34 tokens, where an early error is carried to the answer) in two thinking patterns, plus
traces with the answer given in context; derives a stronger teacher, an incompatible one (that always thinks in the
other pattern) and a same-data one (the base pretrained longer). Accuracy runs, from the same base at one learning
rate and token budget, the main ones over several seeds: SFT on teacher samples, OPD (reverse KL on opd_fast's fused
losses), RLVR as GRPO (several samples per prompt, group-normalised 0/1 reward), OPSD with the answer as privileged
context and its off-policy counterpart; OPD from the incompatible teacher and its two recoveries (cold start,
data.select_pool prompt selection), OPD from the same-data teacher, and subspace-locked OPD and SFT. Geometry runs,
the geometry paper's protocol: OPD, RLVR and three controls (sparsified tokens, off-policy rollouts, an
RLVR-dominated mix) from the SFT run's checkpoint at lr 1e-6. It measures held-out accuracy, the top-k overlap at
student-visited states, drift and the update geometry with ``opd-fast diagnose``, and writes ``results.json``, plots
and ``claims.md``: each claim, the paper's words, our protocol and rule, our numbers (mean ± standard error over
seeds) and the verdict from the registry in science/opd_science/claims.py. See science/opd_science/.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from opd_science import claims, pipeline, report

from opd_fast._argtypes import positive_int


def default_cache() -> Path:
    """The user cache directory (``$XDG_CACHE_HOME`` or ``~/.cache``) / opd_fast / science."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "opd_fast" / "science"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="run directory: runs, checkpoints, results.json")
    parser.add_argument(
        "--quick", action="store_true", help="tiny models and runs: checks that every measurement is produced"
    )
    parser.add_argument(
        "--cache",
        type=Path,
        help=f"where the pretrained base and the teachers are cached (default {default_cache()})",
    )
    parser.add_argument(
        "--docs", type=Path, help="also write results.json, plots and claims.md here (e.g. docs/science)"
    )
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=1,
        help="torch CPU threads (default 1: tiny models gain little from more, and lose a lot on a shared machine)",
    )
    parser.add_argument(
        "--report-only", action="store_true", help="re-evaluate the claims and rewrite the report from --out"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.report_only:
        results = args.out / report.RESULTS_FILE
        if not results.is_file():
            parser.error(f"--report-only needs {results} from an earlier run")
        data = report.from_json(json.loads(results.read_text()))
        data["claims"] = claims.evaluate(data)
        results.write_text(json.dumps(report.to_json(data), indent=1) + "\n")
        if args.docs is not None:
            report.write(data, args.docs)
    else:
        data = pipeline.run(
            "quick" if args.quick else "full",
            args.out,
            args.cache or default_cache(),
            args.docs,
            threads=args.threads,
            progress=not args.no_progress,
        )
    print(report.table(data))
    print(f"\nresults: {args.out / report.RESULTS_FILE}" + (f"; report: {args.docs}" if args.docs else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
