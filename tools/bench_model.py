"""Training-step throughput and peak memory of a model before and after CondConv conversion, in one run.

What conversion costs end to end: a ResNet-50-like network
(``condconv_lightning.demos.resnet50_like``) trains as is and with ``layer3`` and
``layer4`` converted by ``condconv_lightning.surgery.convert`` (K=4 experts,
``auto`` strategy). Steps of the two models alternate in one process, so both see
the same caches and the same other load. A step is forward, cross-entropy,
backward and an SGD update. Reported: images/s of each (from the fastest step of
``--steps``) and the converted/static ratio, the peak memory one step allocates
above the model's own, with the same measures as ``bench_layers.py``, and the time
of the first (warm-up) step, which includes ``auto``'s tuning of each new problem
(``CONDCONV_TUNE=0`` turns tuning off for comparison). As ``bench_layers.py`` does,
it has glibc's malloc keep freed memory first (``--system-malloc`` leaves it).

    python tools/bench_model.py                          # ResNet-50-like, 224x224, B=16
    python tools/bench_model.py --batch 32 --dtype bf16 --json model.json
    python tools/bench_model.py --quick                  # CI-sized: resnet_tiny, 32x32
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from bench_layers import DTYPES, SYSTEM_MALLOC_HELP, keep_freed_memory, machine, peak_bytes, timed_ms
from rich.console import Console
from rich.table import Table

from condconv_lightning.demos import resnet50_like, resnet_tiny
from condconv_lightning.functional import is_tuning_enabled, tuning_cache
from condconv_lightning.io import atomic_write
from condconv_lightning.surgery import convert

MODELS: dict[str, Callable[[], nn.Module]] = {"resnet50_like": resnet50_like, "resnet_tiny": resnet_tiny}


def training_step(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, dtype: torch.dtype) -> Callable[[], None]:
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    autocast = torch.autocast(x.device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = F.cross_entropy(model(x), labels)
        loss.backward()
        optimizer.step()

    return step


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="resnet50_like")
    parser.add_argument("--layers", default="layer3,layer4", help="comma-separated selectors to convert")
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--strategy", choices=("auto", "grouped", "mixture", "bmm"), default="auto")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=224, help="input height and width")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per model (the fastest is reported)")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--system-malloc", action="store_true", help=SYSTEM_MALLOC_HELP)
    parser.add_argument("--quick", action="store_true", help="CI-sized: resnet_tiny, 32x32, B=4, one step")
    parser.add_argument("--json", type=Path, help="also write the measurements to this JSON file")
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.size, args.batch, args.steps = "resnet_tiny", 32, 4, 1
    if min(args.batch, args.size, args.steps, args.experts) < 1:
        parser.error("--batch, --size, --steps and --experts must be positive")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if not args.system_malloc:
        keep_freed_memory()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    torch.manual_seed(0)
    static = MODELS[args.model]().to(device, memory_format=memory_format).train()
    converted = copy.deepcopy(static)
    report = convert(converted, args.layers.split(","), num_experts=args.experts, strategy=args.strategy, seed=0)
    converted.to(memory_format=memory_format)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device).contiguous(memory_format=memory_format)
    labels = torch.randint(0, 10, (args.batch,), device=device)
    steps = {
        name: training_step(model, x, labels, dtype) for name, model in (("static", static), ("converted", converted))
    }
    tuned_before = len(tuning_cache())
    # warm-up: primitives, optimizer state, and auto's tuning (each new problem is timed once)
    first_ms = {name: timed_ms(step, device) for name, step in steps.items()}
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.steps):
        for name, step in steps.items():
            times[name].append(timed_ms(step, device))
    for model in (static, converted):  # gradients start unallocated, so each peak counts them once
        model.zero_grad(set_to_none=True)
    peaks = {name: peak_bytes(step, device) for name, step in steps.items()}
    result = {
        "machine": machine(),
        "model": args.model,
        "layers": args.layers,
        "converted_layers": len(report.converted),
        "experts": args.experts,
        "strategy": args.strategy,
        "batch": args.batch,
        "size": args.size,
        "dtype": args.dtype,
        "device": str(device),
        "channels_last": args.channels_last,
        "params": {
            name: sum(p.numel() for p in m.parameters()) for name, m in (("static", static), ("converted", converted))
        },
        "step_ms": {name: min(t) for name, t in times.items()},
        "images_per_s": {name: args.batch * 1e3 / min(t) for name, t in times.items()},
        "peak_bytes": peaks,
        "first_step_ms": first_ms,
        "tuning": is_tuning_enabled(),
        "tuned_problems": len(tuning_cache()) - tuned_before,
    }
    # what the first step cost beyond a steady one, less the static model's own warm-up: auto's tuning
    warm_up_ms = {name: first_ms[name] - result["step_ms"][name] for name in steps}
    result["tuning_overhead_s"] = (warm_up_ms["converted"] - max(warm_up_ms["static"], 0)) / 1e3
    result["throughput_ratio"] = result["images_per_s"]["converted"] / result["images_per_s"]["static"]
    result["peak_ratio"] = peaks["converted"] / max(peaks["static"], 1)

    table = Table(
        title=f"{args.model}, {args.layers} -> CondConv K={args.experts} ({args.strategy}), "
        f"B={args.batch}, {args.size}x{args.size}, {args.dtype}, {device}"
    )
    for column in ("model", "params", "step ms", "images/s", "peak MiB"):
        table.add_column(column, justify="right")
    for name in steps:
        table.add_row(
            name,
            f"{result['params'][name] / 1e6:.1f}M",
            f"{result['step_ms'][name]:.1f}",
            f"{result['images_per_s'][name]:.1f}",
            f"{peaks[name] / 2**20:.0f}",
        )
    table.add_row("converted/static", "", "", f"{result['throughput_ratio']:.2f}x", f"{result['peak_ratio']:.2f}x")
    table.caption = (
        f"first step of the converted model: {first_ms['converted'] / 1e3:.1f} s, about "
        f"{result['tuning_overhead_s']:.1f} s of it tuning {result['tuned_problems']} problems"
    )
    if not result["tuning"]:
        table.caption = "tuning off (rules-only auto)"
    Console(width=None if sys.stdout.isatty() else 120).print(table)
    if args.json:
        with atomic_write(args.json, overwrite=True) as tmp:
            Path(tmp).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
