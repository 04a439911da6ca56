"""Time CondConv2d under each strategy against ``nn.Conv2d`` of the same shape, side by side.

Issue 6 asks for a layer benchmark whose numbers are ratios measured in one run: for
every suite shape, batch, K, dtype and device, the static conv and CondConv2d under
``grouped``, ``mixture``, ``bmm`` and ``auto`` (and timm's CondConv2d when timm is
importable) run interleaved, so that caches, clocks and other load hit them alike.
Reported per variant (the fastest of ``--repeats`` interleaved runs, since other
processes on a shared machine only ever add time): forward+backward time (training step of the layer: input and
weights require grad) and forward-only time (``torch.no_grad``, the inference case
CondConv was designed for), each over the static conv's, and the peak memory the
forward+backward allocates above what existed before, over the static conv's.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated``; on CPU the allocation
events of ``torch.profiler`` (``profile_memory=True``) summed in time order. bf16
runs under ``torch.autocast`` with a bf16 input, as mixed-precision training does.

The default suite is ResNet-50 (layer1..layer4: the 3x3 and the first 1x1 of a
block, 224x224 input) and EfficientNet-B0 (a depthwise 3x3 and a pointwise 1x1);
``--quick`` is a CI-sized run of two small shapes.

    python tools/bench_layers.py                       # full suite, every device present
    python tools/bench_layers.py --batch 32 --experts 4 --dtype fp32 --json out.json
    python tools/bench_layers.py --quick
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
import torch.nn as nn
from rich.console import Console
from rich.table import Table

from condconv_lightning import CondConv2d
from condconv_lightning.functional.auto import choose_strategy
from condconv_lightning.io import atomic_write

STRATEGY_VARIANTS = ("grouped", "mixture", "bmm", "auto")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Shape:
    """One convolution of a real network: what nn.Conv2d takes, plus its input size."""

    name: str
    in_channels: int
    out_channels: int
    kernel_size: int
    stride: int
    groups: int
    size: int

    @property
    def padding(self) -> int:
        return self.kernel_size // 2


SUITE = (
    Shape("r50.layer1.3x3", 64, 64, 3, 1, 1, 56),
    Shape("r50.layer1.1x1", 256, 64, 1, 1, 1, 56),
    Shape("r50.layer2.3x3", 128, 128, 3, 1, 1, 28),
    Shape("r50.layer2.1x1", 512, 128, 1, 1, 1, 28),
    Shape("r50.layer3.3x3", 256, 256, 3, 1, 1, 14),
    Shape("r50.layer3.1x1", 1024, 256, 1, 1, 1, 14),
    Shape("r50.layer4.3x3", 512, 512, 3, 1, 1, 7),
    Shape("r50.layer4.1x1", 2048, 512, 1, 1, 1, 7),
    Shape("effb0.dw3x3", 144, 144, 3, 1, 144, 56),
    Shape("effb0.pw1x1", 240, 40, 1, 1, 1, 28),
)
QUICK_SUITE = (Shape("tiny.3x3", 16, 16, 3, 1, 1, 8), Shape("tiny.dw3x3", 16, 16, 3, 1, 16, 8))


@dataclass
class Result:
    device: str
    dtype: str
    shape: str
    batch: int
    experts: int
    variant: str
    train_ms: float
    infer_ms: float
    peak_bytes: int
    auto_picks: str = ""


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_ms(fn: Callable[[], None], device: torch.device) -> float:
    """Wall time of one call in ms; CUDA work is bracketed by events after a synchronize."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        synchronize(device)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    start_s = time.perf_counter()
    fn()
    return (time.perf_counter() - start_s) * 1e3


def peak_bytes(fn: Callable[[], None], device: torch.device) -> int:
    """Peak bytes allocated by ``fn`` above what was allocated before it."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def timm_condconv(shape: Shape, experts: int, device: torch.device) -> Optional[nn.Module]:
    """timm's CondConv2d with its routing computed by the same kind of router, or None without timm."""
    try:
        from timm.layers import CondConv2d as TimmCondConv2d
    except ImportError:
        return None

    class Routed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = TimmCondConv2d(
                shape.in_channels, shape.out_channels, shape.kernel_size, shape.stride, shape.padding,
                groups=shape.groups, num_experts=experts,
            )
            self.router = nn.Linear(shape.in_channels, experts)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x, torch.sigmoid(self.router(x.mean((2, 3)))))

    return Routed().to(device)


def variants(shape: Shape, experts: int, device: torch.device) -> dict[str, nn.Module]:
    static = nn.Conv2d(
        shape.in_channels, shape.out_channels, shape.kernel_size, shape.stride, shape.padding, groups=shape.groups
    )
    modules: dict[str, nn.Module] = {"static": static.to(device)}
    for strategy in STRATEGY_VARIANTS:
        modules[strategy] = CondConv2d.from_conv(static, experts, strategy=strategy, init="fresh").to(device)
    comparator = timm_condconv(shape, experts, device)
    if comparator is not None:
        modules["timm"] = comparator
    return modules


def measure(
    shape: Shape, batch: int, experts: int, dtype_name: str, device: torch.device, repeats: int, channels_last: bool
) -> list[Result]:
    dtype = DTYPES[dtype_name]
    torch.manual_seed(0)
    modules = variants(shape, experts, device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    for module in modules.values():
        module.to(memory_format=memory_format)
    x = torch.randn(batch, shape.in_channels, shape.size, shape.size, device=device, dtype=dtype)
    x = x.contiguous(memory_format=memory_format).requires_grad_(True)
    autocast = (
        torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    )

    def train_step(module: nn.Module) -> Callable[[], None]:
        def step() -> None:
            with autocast:
                y = module(x)
            y.backward(torch.ones_like(y))

        return step

    def infer_step(module: nn.Module) -> Callable[[], None]:
        def step() -> None:
            with torch.no_grad(), autocast:
                module(x)

        return step

    train: dict[str, list[float]] = {name: [] for name in modules}
    infer: dict[str, list[float]] = {name: [] for name in modules}
    for name, module in modules.items():  # warm-up (and cudnn/oneDNN primitive creation)
        train_step(module)()
        infer_step(module)()
    for _ in range(repeats):
        for name, module in modules.items():
            train[name].append(timed_ms(train_step(module), device))
            infer[name].append(timed_ms(infer_step(module), device))
    peaks = {}
    for name, module in modules.items():  # gradients start unallocated, so each peak counts them once
        module.zero_grad(set_to_none=True)
        x.grad = None
        peaks[name] = peak_bytes(train_step(module), device)
    with autocast:
        cast = x.to(torch.get_autocast_dtype(device.type)) if dtype != torch.float32 else x
        picks = choose_strategy(
            cast, modules["auto"].expert_weight(), (shape.stride,) * 2, (shape.padding,) * 2, (1, 1), shape.groups
        )
    return [
        Result(
            device=str(device), dtype=dtype_name, shape=shape.name, batch=batch, experts=experts, variant=name,
            train_ms=min(train[name]), infer_ms=min(infer[name]), peak_bytes=peaks[name],
            auto_picks=picks if name == "auto" else "",
        )
        for name in modules
    ]


def configurations(args: argparse.Namespace) -> Iterator[tuple[Shape, int, int, str, torch.device]]:
    suite = QUICK_SUITE if args.quick else SUITE
    for device in args.devices:
        for dtype_name in args.dtype:
            for batch in args.batch:
                for experts in args.experts:
                    for shape in suite:
                        if args.only and not any(part in shape.name for part in args.only):
                            continue
                        yield shape, batch, experts, dtype_name, torch.device(device)


def ratios(results: list[Result]) -> list[dict]:
    """One row per (configuration, CondConv variant): times and peak over the static conv of that configuration."""
    static = {(r.device, r.dtype, r.shape, r.batch, r.experts): r for r in results if r.variant == "static"}
    rows = []
    for r in results:
        if r.variant == "static":
            continue
        base = static[(r.device, r.dtype, r.shape, r.batch, r.experts)]
        rows.append(
            {
                **asdict(r),
                "train_ratio": r.train_ms / base.train_ms,
                "infer_ratio": r.infer_ms / base.infer_ms,
                "peak_ratio": r.peak_bytes / max(base.peak_bytes, 1),
                "static_train_ms": base.train_ms,
                "static_infer_ms": base.infer_ms,
                "static_peak_bytes": base.peak_bytes,
            }
        )
    return rows


def geomean(values: list[float]) -> float:
    return math.exp(statistics.fmean(math.log(v) for v in values)) if values else float("nan")


def summary(rows: list[dict]) -> list[dict]:
    """Per (device, dtype, batch): geomean/worst train ratio of each variant; auto's gap to the per-shape best."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["device"], row["dtype"], row["batch"]), []).append(row)
    out = []
    for (device, dtype, batch), members in sorted(groups.items()):
        entry: dict = {"device": device, "dtype": dtype, "batch": batch}
        for variant in sorted({m["variant"] for m in members}):
            ratios_ = [m["train_ratio"] for m in members if m["variant"] == variant]
            entry[variant] = {"geomean": geomean(ratios_), "worst": max(ratios_)}
        best: dict[tuple, float] = {}
        for m in members:
            if m["variant"] in STRATEGY_VARIANTS[:-1]:
                key = (m["shape"], m["experts"])
                best[key] = min(best.get(key, math.inf), m["train_ms"])
        gaps = [m["train_ms"] / best[(m["shape"], m["experts"])] for m in members if m["variant"] == "auto"]
        entry["auto_over_best_worst"] = max(gaps)
        entry["best_per_shape_geomean"] = geomean(
            [best[(m["shape"], m["experts"])] / m["static_train_ms"] for m in members if m["variant"] == "auto"]
        )
        out.append(entry)
    return out


def render(rows: list[dict], summaries: list[dict], console: Console) -> None:
    table = Table(title="CondConv2d / nn.Conv2d (same shape, same run): fwd+bwd, fwd-only, peak memory")
    for column in ("device", "dtype", "shape", "B", "K", "static ms", "variant", "fwd+bwd", "fwd", "peak"):
        table.add_column(column, justify="right" if column not in ("device", "dtype", "shape", "variant") else "left")
    for row in rows:
        variant = row["variant"] + (f" ({row['auto_picks']})" if row["auto_picks"] else "")
        table.add_row(
            row["device"], row["dtype"], row["shape"], str(row["batch"]), str(row["experts"]),
            f"{row['static_train_ms']:.2f}", variant, f"{row['train_ratio']:.2f}x", f"{row['infer_ratio']:.2f}x",
            f"{row['peak_ratio']:.1f}x",
        )
    console.print(table)
    overview = Table(title="fwd+bwd over static conv: geomean / worst across shapes and K")
    variant_names = sorted({v for s in summaries for v in s if isinstance(s[v], dict)})
    for column in ("device", "dtype", "B", *variant_names, "best/shape", "auto/best worst"):
        overview.add_column(column)
    for s in summaries:
        overview.add_row(
            s["device"], s["dtype"], str(s["batch"]),
            *(f"{s[v]['geomean']:.2f} / {s[v]['worst']:.2f}" if v in s else "-" for v in variant_names),
            f"{s['best_per_shape_geomean']:.2f}", f"{s['auto_over_best_worst']:.2f}",
        )
    console.print(overview)


def machine() -> dict:
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    parser.add_argument("--devices", nargs="+", default=default_devices, help="devices to measure (default: all present)")
    parser.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 32, 128])
    parser.add_argument("--experts", nargs="+", type=int, default=[4, 8])
    parser.add_argument("--only", nargs="+", default=[], help="keep suite shapes whose name contains one of these")
    parser.add_argument("--repeats", type=int, default=3, help="timed iterations per variant (the fastest is reported)")
    parser.add_argument("--channels-last", action="store_true", help="input and modules in channels_last")
    parser.add_argument("--quick", action="store_true", help="CI-sized run: two tiny shapes, B=2, K=4, fp32, 1 repeat")
    parser.add_argument("--json", type=Path, help="also write every measurement and the summary to this JSON file")
    args = parser.parse_args(argv)
    if args.quick:
        args.dtype, args.batch, args.experts, args.repeats = ["fp32"], [2], [4], 1
    if min(args.batch) < 1 or min(args.experts) < 1 or args.repeats < 1:
        parser.error("--batch, --experts and --repeats must be positive")
    return args


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 150)
    results: list[Result] = []
    for shape, batch, experts, dtype_name, device in configurations(args):
        console.log(f"{device} {dtype_name} {shape.name} B={batch} K={experts}")
        results.extend(measure(shape, batch, experts, dtype_name, device, args.repeats, args.channels_last))
    if not results:
        sys.exit("no configuration selected: check --only against the suite's shape names")
    rows = ratios(results)
    summaries = summary(rows)
    render(rows, summaries, console)
    report = {"machine": machine(), "channels_last": args.channels_last, "rows": rows, "summary": summaries}
    if args.json:
        with atomic_write(args.json, overwrite=True) as tmp:
            Path(tmp).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
