"""The exact ranking panels' Python side in-process, at sizes the query benchmark does not fill.

    .venv/bin/python benchmarks/windows.py                          # 1M and 10M predictions
    .venv/bin/python benchmarks/windows.py --predictions 1000000 --metric average_precision

A 7-day panel of 1-hour sliding windows at a 5-minute step (2,016 points) reads the labeled
rows of 7 days + 1 hour: at N predictions over 30 days, 80 % labeled, N x 0.8 x 169 / 720 rows
(188K at 1M, 1.88M at 10M). Those rows are made here, time-sorted, with scores and labels
drawn as ``common.synthesize`` draws them (logistic scores, labels from the drifting rate;
no ids, no database: 10M predictions would take the query benchmark an hour to fill). Timed:
the metric's ``windows`` function as the engine calls it (``engine._batches``), its peak of
traced memory above the inputs, and the per-window function it replaces (``roc_auc`` or
``average_precision`` on each window's rows; a sample of windows, scaled to all). Every
sampled window of the batch is checked against the per-window value.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
import tracemalloc

import common
import numpy as np

from datasource import engine, metrics

POINTS, STEP_S, WINDOW_S = 2016, 300, 3600
SPAN_S = (POINTS - 1) * STEP_S + WINDOW_S
PER_WINDOW = {"roc_auc": metrics.roc_auc, "average_precision": metrics.average_precision}


def panel_rows(predictions: int, seed: int):
    """(label, score, lo_idx, hi_idx): the panel's labeled rows and each point's [lo, hi)."""
    rng = np.random.default_rng(seed)
    n = round(predictions * common.LABELED_SHARE * SPAN_S / (30 * common.DAY_S))
    ts = np.sort(rng.uniform(0, SPAN_S, n))
    z = rng.normal(rng.choice([0.9, 0.3, 0.2, -0.3, -0.1], size=n), 1.6)
    drift = 0.9 * ts / (30 * common.DAY_S)
    label = (rng.random(n) < 1.0 / (1.0 + np.exp(-(z - drift)))).astype(np.float64)
    points = np.arange(SPAN_S - (POINTS - 1) * STEP_S, SPAN_S + 1, STEP_S)
    lo = np.searchsorted(ts, points - WINDOW_S, side="right")
    return label, 1.0 / (1.0 + np.exp(-z)), lo, np.searchsorted(ts, points, side="right")


def batch(fn, label, score, lo, hi) -> tuple[np.ndarray, int]:
    """Every window's value as the engine computes it, and the number of calls."""
    values, calls = np.empty(len(lo)), 0
    for chunk in engine._batches(np.arange(len(lo)), lo, hi):
        values[chunk] = fn(label, score, lo[chunk], hi[chunk])
        calls += 1
    return values, calls


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--predictions", default="1000000,10000000", help="comma list")
    ap.add_argument("--metric", choices=sorted(PER_WINDOW), default="roc_auc")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--sample", type=int, default=201, help="windows timed one at a time")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    fn, one = metrics.REGISTRY[args.metric].windows, PER_WINDOW[args.metric]
    info = common.host()
    load = common.OtherLoad().start()
    rows = []
    try:
        for n in (int(x) for x in args.predictions.split(",")):
            label, score, lo, hi = panel_rows(n, args.seed)
            t0, secs = load.now(), []
            for _ in range(args.reps):
                started = time.perf_counter()
                values, calls = batch(fn, label, score, lo, hi)
                secs.append(time.perf_counter() - started)
            others = load.cores(t0, load.now())
            tracemalloc.start()
            batch(fn, label, score, lo, hi)
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            sample = np.linspace(0, POINTS - 1, args.sample).astype(int)
            started = time.perf_counter()
            expected = np.array([one(label[lo[k]:hi[k]], score[lo[k]:hi[k]]) for k in sample])
            per_window = (time.perf_counter() - started) / len(sample) * POINTS
            differs = np.nanmax(np.abs(values[sample] - expected))
            rows.append([f"{n:,}", f"{len(label):,}", str(calls), common.fmt_ms(min(secs)),
                         common.fmt_ms(common.pct(secs, 50)), f"{peak / 2**20:,.1f} MiB",
                         common.fmt_ms(per_window), f"{differs:.0e}", common.fmt_cores(others)])
    finally:
        load.stop()
    print(f"\n{args.metric}: {POINTS} windows of {WINDOW_S // 60} min at a {STEP_S // 60}-minute step, "
          f"{args.reps} runs each\n")
    print(common.table(["predictions", "labeled rows", "calls", "batch min", "batch p50",
                        "peak above inputs", "per window (scaled)", "max |Δ|", "others' cores"], rows))
    common.print_machine(info)
    print(f"\ncommand: {shlex.join([sys.executable, *sys.argv])}")


if __name__ == "__main__":
    main()
