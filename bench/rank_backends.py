"""Rank the backends per pass from a GPU benchmark run, for ``auto`` selection.

    python bench/rank_backends.py bench/results/<card>-<date>.json [--out resbm_kernels/backends/measured.json]

Reads the kernel items of a pytest-benchmark JSON written on a GPU (``gpu``
in its machine_info), and for each pass ranks the backends that ran it
(``eager`` is the reference; the torch.compile baseline is not a backend):
at every shape all of them ran, each backend's median time is divided by the
fastest one's; the ranking orders backends by the geometric mean of that
ratio. Only items that passed their correctness check are in the JSON, so a
backend that failed on this card is never ranked. The entry for the card
replaces any earlier one in ``measured.json``; other cards are kept.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys

MEASURED = pathlib.Path(__file__).resolve().parents[1] / "resbm_kernels" / "backends" / "measured.json"
BACKEND_OF = {"eager": "reference", "triton": "triton", "cuda": "cuda"}


def rank(results: dict) -> tuple[str, dict]:
    """(card name, measured.json entry) from one benchmark JSON."""
    card = results.get("machine_info", {}).get("gpu")
    if not card:
        raise ValueError("these results were not measured on a GPU (no 'gpu' in machine_info)")
    times: dict[str, dict[str, dict[tuple, float]]] = {}  # pass -> backend -> shape -> median s
    for item in results.get("benchmarks", []):
        info = item.get("extra_info", {})
        backend = BACKEND_OF.get(info.get("backend"))
        if info.get("suite") != "kernels" or backend is None:
            continue
        shape = (info["N"], info["d"], info["k"], info["bits"])
        times.setdefault(info["pass"], {}).setdefault(backend, {})[shape] = info["median_s"]
    if not times:
        raise ValueError("no kernel benchmark items in these results")
    passes, ratios, shapes = {}, {}, {}
    for op, by_backend in sorted(times.items()):
        common = set.intersection(*(set(t) for t in by_backend.values()))
        if not common:
            raise ValueError(f"{op}: no shape was measured on every backend ({sorted(by_backend)}); "
                             "rerun the benchmarks with a larger budget or a narrower -k")
        logs = {b: 0.0 for b in by_backend}
        for shape in common:
            best = min(t[shape] for t in by_backend.values())
            for b, t in by_backend.items():
                logs[b] += math.log(t[shape] / best)
        geo = {b: math.exp(v / len(common)) for b, v in logs.items()}
        passes[op] = sorted(geo, key=geo.get)
        ratios[op] = {b: round(geo[b], 3) for b in passes[op]}
        shapes[op] = len(common)
    info = results.get("machine_info", {})
    entry = dict(measured=results.get("datetime"), torch=info.get("torch"), triton=info.get("triton"),
                 triton_autotune=results.get("resbm", {}).get("triton_autotune"),
                 passes=passes, time_vs_fastest_geomean=ratios, shapes=shapes)
    return card, entry


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=pathlib.Path, help="pytest-benchmark JSON from a GPU run")
    parser.add_argument("--out", type=pathlib.Path, default=MEASURED, help="measured.json to update")
    args = parser.parse_args(argv)
    try:
        card, entry = rank(json.loads(args.results.read_text()))
    except (OSError, ValueError, KeyError) as e:
        print(f"rank_backends: {args.results}: {e}", file=sys.stderr)
        return 2
    entry["source"] = args.results.name
    table = json.loads(args.out.read_text()) if args.out.exists() else {"format": 1, "devices": {}}
    table["devices"][card] = entry
    args.out.write_text(json.dumps(table, indent=2, sort_keys=True) + "\n")
    print(f"{card}: ranking written to {args.out}")
    for op, order in entry["passes"].items():
        ratios = entry["time_vs_fastest_geomean"][op]
        print(f"  {op:16s} " + " > ".join(f"{b} ({ratios[b]:.2f}x)" for b in order)
              + f"  [{entry['shapes'][op]} shapes]")
        missing = sorted(set(BACKEND_OF.values()) - set(order))
        if missing:  # auto never tries these for this pass on this card
            print(f"  warning: {op}: no passing results for {', '.join(missing)} (failed, skipped or cut by the "
                  "time budget): auto will not use them on this card", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
