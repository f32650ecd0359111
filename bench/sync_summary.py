#!/usr/bin/env python3
"""Summary of bench/sync's per-run TSV: medians over seeds and ntspy/chronyd ratios.

Usage: ``bench/sync_summary.py RUNS.TSV [SUMMARY.TSV]`` (bench/sync calls it).
Prints a table; with SUMMARY.TSV also writes the medians there, one line per
scenario and client.  A time to sync that never happened counts as infinite.
"""

from __future__ import annotations

import csv
import math
import statistics
import sys

METRICS = ("rms_offset", "max_offset", "rms_freq", "sync_s", "tracebacks", "wall_s")


def _num(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan


def _fmt(value: float, kind: str) -> str:
    if math.isnan(value):
        return "nan"
    if kind == "sync_s":
        return "never" if math.isinf(value) else f"{value:.0f}"
    if kind == "tracebacks":
        return f"{value:g}"
    if kind == "wall_s":
        return f"{value:.1f}"
    return f"{value:.2e}"


def _ratio(a: float, b: float) -> str:
    if math.isnan(a) or math.isnan(b):
        return "-"
    if b == 0:
        return "-" if a == 0 else "inf"
    if math.isinf(a) or math.isinf(b):
        return "inf" if math.isinf(a) and not math.isinf(b) else "-"
    return f"{a / b:.3g}"


def main(argv: list[str]) -> int:
    with open(argv[1], newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    groups: dict[tuple[str, str], list[dict[str, str]]] = {}
    for row in rows:
        groups.setdefault((row["scenario"], row["client"]), []).append(row)

    medians: dict[tuple[str, str], dict[str, float]] = {}
    for key, runs in groups.items():
        med: dict[str, float] = {}
        for m in METRICS:
            vals = [_num(r[m]) for r in runs]
            if m == "sync_s":  # -1 = never synced (or the run ended early)
                vals = [math.inf if v < 0 else v for v in vals]
            vals = [v for v in vals if not math.isnan(v)]
            med[m] = statistics.median(vals) if vals else math.nan
        med["runs"] = len(runs)
        med["short"] = sum(1 for r in runs if r["complete"] != "1")
        medians[key] = med

    head = (
        f"{'scenario':8s} {'client':7s} {'runs':>4s} {'rms_off':>9s} {'max|off|':>9s} "
        f"{'rms_freq':>9s} {'sync_s':>6s} {'tb':>3s} {'wall_s':>6s}   "
        f"{'ratio: rms':>10s} {'max':>7s} {'freq':>7s} {'sync':>7s}"
    )
    print("medians over seeds (offset/frequency figures after the reset time)")
    print(head)
    print("-" * len(head))
    summary: list[list[str]] = []
    for sc in dict.fromkeys(k[0] for k in groups):
        ref = medians.get((sc, "chronyd"))
        for cl in dict.fromkeys(k[1] for k in groups):
            med = medians.get((sc, cl))
            if med is None:
                continue
            ratios = [
                _ratio(med[m], ref[m]) if ref is not None and cl != "chronyd" else "-"
                for m in ("rms_offset", "max_offset", "rms_freq", "sync_s")
            ]
            short = f"  ({med['short']:.0f} run(s) ended early)" if med["short"] else ""
            print(
                f"{sc:8s} {cl:7s} {med['runs']:4.0f} {_fmt(med['rms_offset'], ''):>9s} "
                f"{_fmt(med['max_offset'], ''):>9s} {_fmt(med['rms_freq'], ''):>9s} "
                f"{_fmt(med['sync_s'], 'sync_s'):>6s} {_fmt(med['tracebacks'], 'tracebacks'):>3s} "
                f"{_fmt(med['wall_s'], 'wall_s'):>6s}   {ratios[0]:>10s} {ratios[1]:>7s} "
                f"{ratios[2]:>7s} {ratios[3]:>7s}{short}"
            )
            summary.append(
                [sc, cl, f"{med['runs']:.0f}", f"{med['short']:.0f}"]
                + [repr(med[m]) for m in METRICS]
                + ratios
            )
    if len(argv) > 2:
        with open(argv[2], "w", newline="") as f:
            w = csv.writer(f, delimiter="\t", lineterminator="\n")
            w.writerow(
                ["scenario", "client", "runs", "ended_early"]
                + [f"median_{m}" for m in METRICS]
                + ["ratio_rms_offset", "ratio_max_offset", "ratio_rms_freq", "ratio_sync_s"]
            )
            w.writerows(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
