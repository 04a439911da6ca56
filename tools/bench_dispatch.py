"""What choosing costs: ``auto`` against the fixed strategy it runs, per call, on a layer so small
that a call is mostly Python and dispatch.

A problem that tuned ``auto`` has met before costs one problem key and one cache lookup per
call; rules-only ``auto`` (tuning off) costs the rules. Both are paid on every call of every
layer, so at batch 1 (the inference case CondConv was designed for) and on a GPU, where a
small conv takes a few microseconds, they are part of the layer's time. Here CondConv2d
(``--channels`` in and out, 3x3, ``--size`` squared input, B = 1, K = 4) runs under tuned
``auto``, rules-only ``auto`` and each fixed strategy they picked, in interleaved rounds
whose order rotates; each sample is the mean per call over calls taking at least
``--sample-ms`` (``autotune.timed_ms``, CUDA by events). Reported for forward only
(``no_grad``) and forward+backward: each variant's median microseconds per call and, for
each ``auto``, what it adds to the fixed strategy it ran: the median over rounds of the
difference within a round (a paired difference, so that the machine's slow drifts cancel),
with its quartiles.

    python tools/bench_dispatch.py
    python tools/bench_dispatch.py --device cuda --json dispatch.json
    python tools/bench_dispatch.py --quick
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
from bench_layers import AUTO_VARIANTS, PHASES, layer_step, machine
from rich.console import Console
from rich.table import Table

from condconv_lightning import CondConv2d
from condconv_lightning.functional.autotune import timed_ms
from condconv_lightning.io import atomic_write

EXPERTS = 4


def measure(device: torch.device, channels: int, size: int, rounds: int, sample_ms: float) -> list[dict]:
    """One row per phase: per-call times of every variant and what each ``auto`` adds to its strategy.

    Every variant calls the same layer (``layer.strategy`` set before each call), so that only the
    dispatch differs: not the weights, nor where they lie in memory.
    """
    torch.manual_seed(0)
    layer = CondConv2d.from_conv(nn.Conv2d(channels, channels, 3, padding=1), EXPERTS).to(device)
    x = torch.randn(1, channels, size, size, device=device, requires_grad=True)

    def variant(strategy: str, tune: bool, train: bool) -> Callable[[], None]:
        step = layer_step(layer, x, torch.float32, tune, train)

        def call() -> None:
            layer.strategy = strategy
            step()

        return call

    rows = []
    for phase in PHASES:
        train = phase == "train"
        steps = {name: variant("auto", tune, train) for name, tune in AUTO_VARIANTS.items()}
        picks = {}
        for name, step in steps.items():  # warm-up; tuned auto tunes here (or finds the problem cached)
            step()
            picks[name] = layer.last_strategy
        for strategy in sorted(set(picks.values())):
            steps[strategy] = variant(strategy, True, train)
            steps[strategy]()
        samples: dict[str, list[float]] = {name: [] for name in steps}
        order = list(steps)
        for _ in range(rounds):
            order = order[1:] + order[:1]
            for name in order:
                samples[name].append(timed_ms(steps[name], device, sample_ms) * 1e3)
        extra = {}
        for name, strategy in picks.items():
            differences = [a - f for a, f in zip(samples[name], samples[strategy], strict=True)]
            quartiles = statistics.quantiles(differences, n=4) if len(differences) > 1 else differences * 3
            extra[name] = {"ran": strategy, "median_us": statistics.median(differences), "quartiles_us": quartiles}
        rows.append(
            {
                "device": str(device),
                "phase": phase,
                "channels": channels,
                "size": size,
                "median_us": {name: statistics.median(times) for name, times in samples.items()},
                "samples_us": samples,
                "extra": extra,
            }
        )
    return rows


def render(rows: list[dict], console: Console) -> None:
    table = Table(title="per call: auto against the fixed strategy it ran (B = 1, K = 4)")
    for column in ("device", "phase", "variant", "ran", "us per call", "strategy's us", "auto adds us (quartiles)"):
        table.add_column(column)
    for row in rows:
        for name, extra in row["extra"].items():
            low, _, high = extra["quartiles_us"]
            table.add_row(
                row["device"],
                PHASES[row["phase"]],
                name,
                extra["ran"],
                f"{row['median_us'][name]:.1f}",
                f"{row['median_us'][extra['ran']]:.1f}",
                f"{extra['median_us']:+.1f} ({low:+.1f} to {high:+.1f})",
            )
    console.print(table)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    parser.add_argument("--channels", type=int, default=8, help="in and out channels of the 3x3 layer")
    parser.add_argument("--size", type=int, default=4, help="height and width of the input")
    parser.add_argument("--rounds", type=int, default=21, help="interleaved rounds (default: %(default)s)")
    parser.add_argument("--sample-ms", type=float, default=20.0, help="least time of one sample (default: 20)")
    parser.add_argument("--quick", action="store_true", help="CI-sized run: 3 rounds of 2 ms samples")
    parser.add_argument("--json", type=Path, help="also write every sample to this JSON file")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.sample_ms = 3, 2.0
    if min(args.channels, args.size, args.rounds) < 1 or args.sample_ms < 0:
        parser.error("--channels, --size and --rounds must be positive, --sample-ms not negative")
    if args.device not in ("cpu", "cuda") or (args.device == "cuda" and not torch.cuda.is_available()):
        parser.error(f"--device {args.device}: pass cpu, or cuda on a machine with a CUDA GPU")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 150)
    rows = measure(torch.device(args.device), args.channels, args.size, args.rounds, args.sample_ms)
    report = {"machine": machine(), "rows": rows}
    if args.json:
        with atomic_write(args.json, overwrite=True) as tmp:
            Path(tmp).write_text(json.dumps(report, indent=1))
    render(rows, console)
    return report


if __name__ == "__main__":
    main()
