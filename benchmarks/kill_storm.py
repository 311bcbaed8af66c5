#!/usr/bin/env python
"""The long kill storm (issue 6): 200 rounds of SIGKILLing a durable kernel or its checkpoint child.

    python benchmarks/kill_storm.py [--rounds 200] [--seed N] [--workdir DIR] [--json PATH]

Same logic as tests/test_reliability_crash.py (which runs 10 rounds in CI), from
tests/reliability_support.py: even rounds SIGKILL the kernel at a random instant
(half of them aimed at a checkpoint in progress), odd rounds SIGKILL the checkpoint
child at a random instant of its life; every restart must restore exactly one state a
cell produced, never a mix, no older than the last one seen committed, and the one the
store's loader picks.  Prints ``rounds, restored-ok, fell-back, lost`` (lost must be 0)
and exits 1 if anything was lost.  Uses the *installed* durable_kernel and a private
store and signing key under a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from reliability_support import run_storm  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--seed", type=int, default=None, help="default: random (printed)")
    parser.add_argument("--workdir", default=None, help="default: a temporary folder, removed at the end")
    parser.add_argument("--json", default=None, help="also write the figures here")
    parser.add_argument("--quiet", action="store_true", help="no line per round")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kill-storm-") as tmp:
        workdir = Path(args.workdir or tmp)
        result = run_storm(
            args.rounds, workdir, seed=args.seed, say=None if args.quiet else (lambda s: print(s, flush=True))
        )
    figures = result.as_dict()
    print(json.dumps({k: v for k, v in figures.items() if k != "problems"}))
    for problem in result.problems:
        print("problem:", problem)
    print(result.line())
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")
    return 0 if result.lost == 0 and not result.problems else 1


if __name__ == "__main__":
    sys.exit(main())
