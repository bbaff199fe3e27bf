"""Summarise a test report written through RESBM_TEST_REPORT (see tests/conftest.py).

    python bench/summarize_tests.py tests-report.txt [--slowest 15]

Prints the outcome counts, the test time per file (summed over workers) and
the slowest tests: what a GPU session learns even when its time cap stopped
pytest before its own summary.
"""

from __future__ import annotations

import argparse
import collections
import sys


def summarize(lines, slowest: int) -> str:
    outcomes = collections.Counter()
    per_file = collections.defaultdict(float)
    rows = []
    for line in lines:
        parts = line.rstrip("\n").split(" ", 2)
        if len(parts) != 3:
            continue
        outcome, seconds, nodeid = parts
        outcomes[outcome] += 1
        per_file[nodeid.split("::")[0]] += float(seconds)
        rows.append((float(seconds), outcome, nodeid))
    if not rows:
        return "no finished tests in the report"
    total = sum(s for s, _, _ in rows)
    out = [f"{len(rows)} tests finished: " + ", ".join(f"{n} {o}" for o, n in sorted(outcomes.items()))
           + f"; {total:.0f} s of test time (all workers)"]
    out += [f"{s:8.1f} s  {path}" for path, s in sorted(per_file.items(), key=lambda kv: -kv[1])]
    out.append(f"slowest {min(slowest, len(rows))}:")
    out += [f"{s:8.2f} s  {o:7} {nodeid}" for s, o, nodeid in sorted(rows, reverse=True)[:slowest]]
    failed = [nodeid for _, o, nodeid in rows if o == "failed"]
    if failed:
        out.append("FAILED: " + " ".join(failed))
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report")
    parser.add_argument("--slowest", type=int, default=15)
    args = parser.parse_args(argv)
    try:
        with open(args.report) as f:
            print(summarize(f, args.slowest))
    except FileNotFoundError:
        print(f"no test report at {args.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
