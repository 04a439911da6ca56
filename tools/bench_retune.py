"""Tune the same problems again and again: does tuned ``auto`` pick the same strategy each
time, and is its pick the fastest when the fixed strategies are timed right after?

``bench_layers.py`` tunes each problem once and then times every strategy over many
interleaved rounds. Where its fastest fixed strategy and tuned ``auto``'s pick differ by
a few percent, this tells the two possible causes apart: the tuner's short rounds being
noisy (its picks vary from one tuning to the next) or the strategies' order changing
between moments of a run (its picks agree with the timings taken right after them, not
with the benchmark's). For each configuration it repeats ``--tunings`` times: clear the
tuning cache, tune a training call (forward+backward) and a forward-only call of
CondConv2d under ``auto``, as the benchmark's warm-up does, then time each fixed
strategy once in both phases, in an order that rotates from one repetition to the next.
Reported per configuration and phase: how often each strategy was picked, each fixed
strategy's median time, the fastest by that median, how many picks it got, and how long
the call that tuned took (the tuning and one call of the layer; the JSON keeps each).
``--timed-runs`` sets the tuner's number of rounds for the run, to see whether timing
longer at the first call would settle the near-ties.

The configurations, devices, dtypes and timing (``bench_layers.MIN_SAMPLE_MS`` per
sample, glibc's malloc keeping freed memory unless ``--system-malloc``) are the
benchmark's; bf16 runs under autocast with a bf16 input.

    python tools/bench_retune.py --only "r50.layer4 1x1 1024->512" --dtype bf16 --batch 1 --experts 4
    python tools/bench_retune.py --quick --tunings 3
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
from pathlib import Path

import torch
from bench_layers import (
    DTYPES,
    FIXED_STRATEGIES,
    MIN_SAMPLE_MS,
    MISS,
    PHASES,
    SYSTEM_MALLOC_HELP,
    configurations,
    keep_freed_memory,
    layer_step,
    machine,
    return_freed_memory,
    variants,
)
from bench_suite import Shape
from rich.console import Console
from rich.table import Table

from condconv_lightning.functional import autotune, clear_tuning_cache
from condconv_lightning.functional.autotune import timed_ms
from condconv_lightning.io import atomic_write


def retune(shape: Shape, batch: int, experts: int, dtype_name: str, device: torch.device, tunings: int) -> list[dict]:
    """One row per phase: the tuner's picks over ``tunings`` fresh tunings and each fixed strategy's times."""
    dtype = DTYPES[dtype_name]
    torch.manual_seed(0)
    modules = variants(shape, experts, device, (*FIXED_STRATEGIES, "auto"))
    x = torch.randn(batch, shape.in_channels, shape.size, shape.size, device=device, dtype=dtype).requires_grad_(True)
    steps = {
        (name, phase): layer_step(modules[name], x, dtype, tune=True, train=phase == "train")
        for name in (*FIXED_STRATEGIES, "auto")
        for phase in PHASES
    }
    for name in FIXED_STRATEGIES:  # warm-up: primitive creation, first touch of the buffers
        for phase in PHASES:
            steps[name, phase]()
    picks = {phase: collections.Counter() for phase in PHASES}
    tuning_ms: dict[str, list[float]] = {phase: [] for phase in PHASES}
    times = {phase: {name: [] for name in FIXED_STRATEGIES} for phase in PHASES}
    order = list(FIXED_STRATEGIES)
    for _ in range(tunings):
        clear_tuning_cache()
        for phase in PHASES:
            tuning_ms[phase].append(timed_ms(steps["auto", phase], device))  # one call, which tunes
            picks[phase][modules["auto"].last_strategy] += 1
        order = order[1:] + order[:1]
        for name in order:
            for phase in PHASES:
                times[phase][name].append(timed_ms(steps[name, phase], device, MIN_SAMPLE_MS))
    clear_tuning_cache()  # leave no choice behind for the next configuration
    rows = []
    for phase in PHASES:
        medians = {name: statistics.median(samples) for name, samples in times[phase].items()}
        fastest = min(medians, key=medians.__getitem__)
        rows.append(
            {
                "device": str(device),
                "dtype": dtype_name,
                "shape": shape.name,
                "batch": batch,
                "experts": experts,
                "phase": phase,
                "tunings": tunings,
                "picks": dict(picks[phase].most_common()),
                "tuning_ms": tuning_ms[phase],
                "median_ms": medians,
                "samples_ms": times[phase],
                "fastest": fastest,
                "picked_fastest": picks[phase][fastest],
            }
        )
    return rows


def render(rows: list[dict], console: Console) -> None:
    table = Table(title="tuned auto, tuned again and again: its picks against the fixed strategies timed right after")
    for column in ("device", "dtype", "B", "K", "shape", "phase", "picks", *FIXED_STRATEGIES):
        table.add_column(column)
    for column in ("fastest", "agree", "tuning ms"):
        table.add_column(column)
    for row in rows:
        best = row["median_ms"][row["fastest"]]
        table.add_row(
            row["device"],
            row["dtype"],
            str(row["batch"]),
            str(row["experts"]),
            row["shape"],
            row["phase"],
            " ".join(f"{name} {count}" for name, count in row["picks"].items()),
            *(f"{row['median_ms'][name] / best:.2f}" for name in FIXED_STRATEGIES),
            row["fastest"],
            f"{row['picked_fastest']}/{row['tunings']}",
            f"{statistics.median(row['tuning_ms']):.1f}",
        )
    console.print(table)
    console.print(
        "Strategy columns: median time over the fastest strategy's median (1.00 = the fastest); tuning ms: the "
        "median of the calls that tuned."
    )
    misses = [gap for row in rows for gap in pick_gaps(row) if gap > MISS]
    console.print(
        f"{sum(row['tunings'] for row in rows)} tunings, {len(misses)} of them picked a strategy more than {MISS:.2f}x "
        f"the fastest (worst {max(misses, default=1.0):.2f}x)"
    )


def pick_gaps(row: dict) -> list[float]:
    """Each tuning's pick, by its median time over the fastest strategy's."""
    best = row["median_ms"][row["fastest"]]
    return [row["median_ms"][name] / best for name, count in row["picks"].items() for _ in range(count)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    parser.add_argument("--devices", nargs="+", default=default_devices, help="default: all present")
    parser.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=["fp32"])
    parser.add_argument("--batch", nargs="+", type=int, default=[1])
    parser.add_argument("--experts", nargs="+", type=int, default=[4])
    parser.add_argument("--only", nargs="+", default=[], help="keep suite shapes whose name contains one of these")
    parser.add_argument("--tunings", type=int, default=10, help="how many times each problem is tuned afresh")
    parser.add_argument(
        "--timed-runs",
        type=int,
        default=autotune.TIMED_RUNS,
        help="the tuner's rounds per problem for this run (default: the library's, %(default)s): does timing "
        "longer settle near-ties?",
    )
    parser.add_argument("--system-malloc", action="store_true", help=SYSTEM_MALLOC_HELP)
    parser.add_argument("--quick", action="store_true", help="CI-sized run: two tiny shapes, B=2, K=4")
    parser.add_argument("--json", type=Path, help="also write every pick and timing to this JSON file")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.experts = [2], [4]
    if min(args.batch) < 1 or min(args.experts) < 1 or args.tunings < 1 or args.timed_runs < 1:
        parser.error("--batch, --experts, --tunings and --timed-runs must be positive")
    if not args.quick and not args.only:
        parser.error("pass --only with parts of suite shape names (or --quick): each problem is tuned many times")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 150)
    if not args.system_malloc:
        keep_freed_memory()
    started = machine() | {"timed_runs": args.timed_runs}
    rows: list[dict] = []
    library_runs, autotune.TIMED_RUNS = autotune.TIMED_RUNS, args.timed_runs
    try:
        for shape, batch, experts, dtype_name, device in configurations(args):
            console.log(f"{device} {dtype_name} {shape.name} B={batch} K={experts}")
            rows.extend(retune(shape, batch, experts, dtype_name, device, args.tunings))
            return_freed_memory()
            if args.json:  # after every configuration: a run cut short keeps what it measured
                with atomic_write(args.json, overwrite=True) as tmp:
                    Path(tmp).write_text(json.dumps({"machine": started, "rows": rows}, indent=1))
    finally:
        autotune.TIMED_RUNS = library_runs
    if not rows:
        sys.exit("no configuration selected: check --only against the suite's shape names")
    render(rows, console)
    return rows


if __name__ == "__main__":
    main()
