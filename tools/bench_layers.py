"""Time CondConv2d under each strategy against ``nn.Conv2d`` of the same shape, side by side.

For every suite shape, batch, K, dtype and device, the static conv and CondConv2d under
``grouped``, ``mixture``, ``bmm``, tuned ``auto`` (the default: each problem timed once,
see ``condconv_lightning.functional.autotune``) and rules-only ``auto`` (tuning off)
(and timm's CondConv2d when timm is importable) run interleaved, so that caches, clocks
and other load hit them alike. Each run calls the variant until it has taken at least
:data:`MIN_SAMPLE_MS` and counts the mean per call; rounds go on past ``--repeats``
until each variant has run :data:`MIN_TOTAL_MS` (a small layer thus gets some twenty
short runs, of which the fastest is kept: one call, or one long run, of a 1 ms layer
is at the mercy of the scheduler). The order of the variants rotates from one round
to the next, so that none always runs right after the same one (a call that follows
a memory-hungry strategy starts with cold caches). A fixed strategy (or timm) more
than :data:`SLOW` times slower than the fastest in its first round sits out the other
rounds (``samples`` in the JSON): it cannot be the fastest, and at B = 128 such runs
would take most of the time; a strategy that an ``auto`` chose races on, since its time
judges that choice. Cells run from the smallest batch and K up, so a run cut
short keeps complete cells. Each cell reports its own noise floor: rules-only ``auto``
against the fixed strategy it ran, the same code timed twice. Reported per variant
(the fastest of its runs; the JSON keeps them all, for other estimators):
forward+backward time (training step of the layer: input and weights require grad)
and forward-only time (``torch.no_grad``, the inference case CondConv was designed
for), each over the static conv's, and the peak memory the forward+backward allocates
above what existed before, over the static conv's. ``auto`` tunes in the warm-up run,
which is not timed; the strategy it chose is shown next to its ratio.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated``; on CPU the allocation
events of ``torch.profiler`` (``profile_memory=True``) summed in time order. bf16
runs under ``torch.autocast`` with a bf16 input, as mixed-precision training does.

The suite is every distinct conv of ResNet-50, MobileNetV2 and EfficientNet-B0 at
224x224 (``bench_suite.py``), grouped by model and stage; ``--only`` keeps the shapes
whose name contains a given text (``--only r50.layer4 effb0.stage6``); ``--quick`` is
a CI-sized run of two tiny shapes. The summaries give, for training (forward+backward)
and for inference (forward only) apart, since ``auto`` tunes each on its own, and per
(device, dtype, B, K), each variant's geometric mean and worst ratio over the static
conv, and tuned and rules-only ``auto`` against the fastest fixed strategy of each
shape: as timed, tuned ``auto`` also round by round (paired: the median of its time over
each fixed strategy's in the same round), and by the time of the fixed strategy each
chose, which tells a wrong choice from the noise of timing the same code twice. The JSON keeps every timed run
(``train_samples_ms``, ``infer_samples_ms``), not only the fastest.

A whole run takes hours on a few CPU cores; ``--resume`` continues the run saved in
``--json`` (written after every shape), measuring only the configurations it lacks. It
refuses a file measured with another torch, CPU architecture, thread count, GPU,
allocator setting or memory format; the report lists when each segment started.

Before measuring, the script has glibc's malloc keep freed memory, as jemalloc, tcmalloc
and CUDA's caching allocator do (:func:`keep_freed_memory`; ``--system-malloc`` leaves
it): with glibc's defaults each call of a large layer page-faults its buffers in again,
which at B = 128 took more time than the convolution and varied from call to call. It
gives the kept memory back between configurations (:func:`return_freed_memory`): a sweep
over ever-different large buffers fragments it until the OS kills the run. The report
records the setting (``machine.malloc``, ``machine.trim``).

    python tools/bench_layers.py                       # full suite, every device present
    python tools/bench_layers.py --batch 32 --experts 4 --dtype fp32 --only r50 --json out.json
    python tools/bench_layers.py --rules               # rules-only auto against the fixed strategies
    python tools/bench_layers.py --json run.json --resume   # continue a run cut short
    python tools/bench_layers.py --devices cuda --fused --min-total-ms 50   # a GPU: fused too, fewer rounds
    python tools/bench_layers.py --quick
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import datetime
import functools
import json
import math
import platform
import statistics
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
from bench_suite import QUICK_SUITE, Shape, suite
from rich.console import Console
from rich.table import Table

from condconv_lightning import CondConv2d
from condconv_lightning.functional import tuning
from condconv_lightning.functional.autotune import timed_ms
from condconv_lightning.io import atomic_write

FIXED_STRATEGIES = ("grouped", "mixture", "bmm")
AUTO_VARIANTS = {"auto": True, "auto-rules": False}
"""The two ``auto`` variants and whether each tunes."""
STRATEGY_VARIANTS = (*FIXED_STRATEGIES, *AUTO_VARIANTS)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MISS = 1.10
"""A shape where ``auto`` takes more than this times the fastest fixed strategy is listed as a miss."""
GAPS = {
    "auto_over_best": "tuned / fastest",
    "auto_paired_over_best": "tuned / fastest, paired",
    "auto_choice_over_best": "tuned's choice / fastest",
    "auto-rules_over_best": "rules / fastest",
}
"""Each ``auto`` against the fastest fixed strategy per shape (summary key: column title): tuned ``auto`` as
timed and by the fixed strategy's time of its choice, which tells a wrong choice from timing noise."""


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
    samples: int
    train_samples_ms: list[float]
    infer_samples_ms: list[float]
    auto_picks: str = ""
    auto_picks_infer: str = ""


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


SLOW = 2.0
"""A fixed strategy (or timm) whose first timed run takes more than this times the fastest fixed
strategy's, in training and inference, is not run again: its ratio comes from that one run."""
MIN_SAMPLE_MS = 10.0
"""Each timed run of a variant repeats its call until this many ms have passed (timeit's autorange idea)."""
MIN_TOTAL_MS = 200.0
"""Rounds go on past ``--repeats`` until every variant in the race has run this long in training
(at most :data:`MAX_ROUNDS`): on 2 CPU cores a 1 ms layer measured 1.02-1.49 ms from one 50 ms
run to the next, while the fastest of twenty 10 ms runs agreed within 2% between two copies."""
MAX_ROUNDS = 40


MALLOC = {"malloc": "system"}
"""How the C allocator was left for this run (process-wide state, recorded in every report)."""
SYSTEM_MALLOC_HELP = (
    "leave the C allocator as it is: glibc then returns large freed blocks to the OS, and each call "
    "page-faults its big buffers in again (slower, and noisier)"
)


@functools.cache
def libc() -> ctypes.CDLL:
    """The C library this process runs on (raises OSError where there is none to load)."""
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of returning it to the OS.

    By default glibc serves blocks over 32 MiB with ``mmap`` and unmaps them when freed, so
    every large buffer is page-faulted in anew on each call: on 2 CPU cores the static
    fwd+bwd of ResNet-50's layer1 1x1 conv (64->256 @56, B = 128) took 1.14-1.23 s, most of
    it kernel time, against 0.46-0.51 s with freed memory kept, and CondConv's ``bmm``
    0.70-0.89 s against 0.40-0.53 s (six calls each). jemalloc and tcmalloc keep freed
    memory (PyTorch's CPU tuning guide recommends them), as CUDA's caching allocator
    does; this does the same with glibc's own ``mallopt`` (no ``mmap``, trim threshold
    2 GiB). False where the C library is not glibc.
    """
    try:
        set_option = libc().mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's malloc.h
    if not (set_option(m_mmap_max, 0) and set_option(m_trim_threshold, 2**31 - 1)):
        return False
    MALLOC["malloc"] = "glibc, freed memory kept"
    MALLOC["trim"] = "after each configuration"
    return True


def return_freed_memory() -> None:
    """Give the memory kept by :func:`keep_freed_memory` back to the OS (glibc's ``malloc_trim``).

    Called between configurations: kept memory is reused by calls of the same sizes, but a
    sweep over ever-different large buffers fragments it, and the heap kept growing until the
    OS killed the run at B = 128, K = 8 on a 24 GiB machine. Each configuration thus starts
    from a trimmed heap, as the first one of a fresh process does (its untimed warm-up
    page-faults its buffers in). A no-op unless memory is being kept.
    """
    if "trim" in MALLOC:
        libc().malloc_trim(0)


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
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def timm_condconv(shape: Shape, experts: int, device: torch.device) -> nn.Module | None:
    """timm's CondConv2d with its routing computed by the same kind of router, or None without timm."""
    try:
        from timm.layers import CondConv2d as TimmCondConv2d
    except ImportError:
        return None

    class Routed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = TimmCondConv2d(
                shape.in_channels,
                shape.out_channels,
                shape.kernel_size,
                shape.stride,
                shape.padding,
                groups=shape.groups,
                num_experts=experts,
            )
            self.router = nn.Linear(shape.in_channels, experts)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x, torch.sigmoid(self.router(x.mean((2, 3)))))

    return Routed().to(device)


def variants(shape: Shape, experts: int, device: torch.device, names: tuple[str, ...]) -> dict[str, nn.Module]:
    static = nn.Conv2d(
        shape.in_channels, shape.out_channels, shape.kernel_size, shape.stride, shape.padding, groups=shape.groups
    )
    modules: dict[str, nn.Module] = {"static": static.to(device)}
    for name in names:
        if not measured_here(name, shape, device.type):
            continue
        strategy = "auto" if name in AUTO_VARIANTS else name
        modules[name] = CondConv2d.from_conv(static, experts, strategy=strategy, init="fresh").to(device)
    comparator = timm_condconv(shape, experts, device)
    if comparator is not None:
        modules["timm"] = comparator
    return modules


def layer_step(module: nn.Module, x: torch.Tensor, dtype: torch.dtype, tune: bool, train: bool) -> Callable[[], None]:
    """One call of ``module`` on ``x`` as timed: forward+backward (``train``) or forward only under
    ``no_grad``; 16-bit dtypes under autocast, as mixed-precision training runs; tuning set to ``tune``
    (it matters to ``auto`` only)."""

    def step() -> None:
        with contextlib.ExitStack() as stack:
            stack.enter_context(tuning(tune))
            if dtype != torch.float32:
                stack.enter_context(torch.autocast(x.device.type, dtype=dtype))
            if not train:
                stack.enter_context(torch.no_grad())
            y = module(x)
        if train:
            y.backward(torch.ones_like(y))

    return step


def measured_here(variant: str, shape: Shape, device_type: str) -> bool:
    """Whether ``variant`` is measured on this shape and device: ``fused`` only where its Triton
    kernels run (CUDA, not depthwise), everything else everywhere."""
    return variant != "fused" or (device_type == "cuda" and not 1 < shape.groups == shape.in_channels)


def measure(
    shape: Shape,
    batch: int,
    experts: int,
    dtype_name: str,
    device: torch.device,
    repeats: int,
    min_total_ms: float,
    channels_last: bool,
    names: tuple[str, ...],
) -> list[Result]:
    dtype = DTYPES[dtype_name]
    torch.manual_seed(0)
    modules = variants(shape, experts, device, names)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    for module in modules.values():
        module.to(memory_format=memory_format)
    x = torch.randn(batch, shape.in_channels, shape.size, shape.size, device=device, dtype=dtype)
    x = x.contiguous(memory_format=memory_format).requires_grad_(True)

    def train_step(name: str) -> Callable[[], None]:
        return layer_step(modules[name], x, dtype, AUTO_VARIANTS.get(name, True), train=True)

    def infer_step(name: str) -> Callable[[], None]:
        return layer_step(modules[name], x, dtype, AUTO_VARIANTS.get(name, True), train=False)

    train: dict[str, list[float]] = {name: [] for name in modules}
    infer: dict[str, list[float]] = {name: [] for name in modules}
    picks: dict[str, tuple[str, str]] = {}
    for name in modules:  # warm-up (primitive creation, and tuning for auto)
        train_step(name)()
        picked = getattr(modules[name], "last_strategy", "") if name in AUTO_VARIANTS else ""
        infer_step(name)()
        picks[name] = (picked, getattr(modules[name], "last_strategy", "") if name in AUTO_VARIANTS else "")
    order, racing = list(modules), list(modules)
    for repeat in range(MAX_ROUNDS):
        spent = min(sum(max(ms, MIN_SAMPLE_MS) for ms in train[name]) for name in racing)
        if repeat >= repeats and spent >= min_total_ms:
            break
        order = order[1:] + order[:1]  # rotated: no variant always runs right after the same one
        for name in (name for name in order if name in racing):
            train[name].append(timed_ms(train_step(name), device, MIN_SAMPLE_MS))
            infer[name].append(timed_ms(infer_step(name), device, MIN_SAMPLE_MS))
        if repeat == 0:
            chosen = frozenset(pick for pair in picks.values() for pick in pair)
            racing = [name for name in modules if not out_of_the_race(name, train, infer, chosen)]
    peaks = {}
    for name, module in modules.items():  # gradients start unallocated, so each peak counts them once
        module.zero_grad(set_to_none=True)
        x.grad = None
        peaks[name] = peak_bytes(train_step(name), device)
    return [
        Result(
            device=str(device),
            dtype=dtype_name,
            shape=shape.name,
            batch=batch,
            experts=experts,
            variant=name,
            train_ms=min(train[name]),
            infer_ms=min(infer[name]),
            peak_bytes=peaks[name],
            samples=len(train[name]),
            train_samples_ms=train[name],
            infer_samples_ms=infer[name],
            auto_picks=picks[name][0],
            auto_picks_infer=picks[name][1],
        )
        for name in modules
    ]


def out_of_the_race(
    name: str, train: dict[str, list[float]], infer: dict[str, list[float]], chosen: frozenset[str] = frozenset()
) -> bool:
    """Whether a comparator's first run was more than :data:`SLOW` times the fastest fixed strategy's,
    for training and inference alike: repeating it cannot make it the fastest. A strategy an ``auto``
    chose (``chosen``) races on: its time judges that choice, and one run, if noise slowed it, would
    make a right choice look wrong."""
    if name == "static" or name in AUTO_VARIANTS or name in chosen:
        return False
    fixed = [s for s in FIXED_STRATEGIES if s in train]
    return all(times[name][0] > SLOW * min(times[s][0] for s in fixed) for times in (train, infer))


def configurations(args: argparse.Namespace) -> Iterator[tuple[Shape, int, int, str, torch.device]]:
    """Cells (batch, K, device, dtype) from the smallest batch and K up, so that a run cut short keeps
    complete cells of the cheap sizes."""
    shapes = QUICK_SUITE if args.quick else suite()
    shapes = [shape for shape in shapes if not args.only or any(part in shape.name for part in args.only)]
    for batch in sorted(args.batch):
        for experts in sorted(args.experts):
            for device in args.devices:
                for dtype_name in args.dtype:
                    for shape in shapes:
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


PHASES = {"train": "forward+backward", "infer": "forward only"}
"""What a row times (``train_ms``, ``infer_ms``): a training step of the layer, and inference under ``no_grad``.
``auto`` tunes each on its own (a problem key holds whether gradients are needed)."""


SUMMARIES = {"train": "summary", "infer": "summary_infer"}
"""The report's key of each phase's summary."""


def summaries(rows: list[dict]) -> dict[str, list[dict]]:
    """Both phases' summaries, by their report keys."""
    return {key: summary(rows, phase) for phase, key in SUMMARIES.items()}


def picks(phase: str) -> str:
    """The row field naming the strategy tuned ``auto`` ran in ``phase``."""
    return "auto_picks" if phase == "train" else "auto_picks_infer"


def summary(rows: list[dict], phase: str = "train") -> list[dict]:
    """Per (device, dtype, B, K): geomean/worst ratio of each variant over the static conv in ``phase``, and
    each auto against the fastest fixed strategy of every shape (geomean, worst, and the shapes more than 10%
    slower), as timed (``auto_over_best``), round by round (``auto_paired_over_best``) and by the fixed
    strategy's time of its choice (``auto_choice_over_best``)."""
    ms = f"{phase}_ms"
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["device"], row["dtype"], row["batch"], row["experts"]), []).append(row)
    out = []
    for (device, dtype, batch, experts), members in sorted(groups.items()):
        entry: dict = {"device": device, "dtype": dtype, "batch": batch, "experts": experts}
        entry["shapes"] = len({m["shape"] for m in members})
        for variant in sorted({m["variant"] for m in members}):
            ratios_ = [m[f"{phase}_ratio"] for m in members if m["variant"] == variant]
            entry[variant] = {"geomean": geomean(ratios_), "worst": max(ratios_)}
        configs = {key[2]: by_variant for key, by_variant in by_configuration(members).items()}  # by shape
        fastest = {shape: row for shape, by_variant in configs.items() if (row := fastest_fixed(by_variant, phase))}
        static = {m["shape"]: m[f"static_{ms}"] for m in members}
        entry["best_per_shape_geomean"] = geomean([row[ms] / static[shape] for shape, row in fastest.items()])
        rules = [
            (m, chosen)
            for m in members
            if m["variant"] == "auto-rules" and (chosen := chosen_fixed(m, configs[m["shape"]], phase))
        ]
        if rules:  # the run's own noise: the same code timed twice, as rules-only auto and as its strategy
            entry["same_code_worst"] = max(max(m[ms] / c[ms], c[ms] / m[ms]) for m, c in rules)
        autos = {
            variant: [m for m in members if m["variant"] == variant and m["shape"] in fastest]
            for variant in AUTO_VARIANTS
        }
        times = {
            "auto_over_best": {m["shape"]: m[ms] for m in autos["auto"]},
            "auto_choice_over_best": {
                m["shape"]: c[ms] for m in autos["auto"] if (c := chosen_fixed(m, configs[m["shape"]], phase))
            },
            "auto-rules_over_best": {m["shape"]: m[ms] for m in autos["auto-rules"]},
        }
        gaps = {key: {shape: t / fastest[shape][ms] for shape, t in of.items()} for key, of in times.items()}
        gaps["auto_paired_over_best"] = {
            m["shape"]: gap for m in autos["auto"] if (gap := paired_over_fastest(m, configs[m["shape"]], phase))
        }
        entry |= {key: gap_summary(gaps[key]) for key in GAPS if gaps[key]}
        out.append(entry)
    return out


def chosen_fixed(auto: dict, by_variant: dict[str, dict], phase: str = "train") -> dict | None:
    """The row of the fixed strategy an ``auto`` row ran in ``phase``, among its configuration's rows, or None."""
    return by_variant.get(auto[picks(phase)]) if auto[picks(phase)] in FIXED_STRATEGIES else None


def paired_over_fastest(auto: dict, by_variant: dict[str, dict], phase: str = "train") -> float | None:
    """Tuned ``auto`` over the fastest fixed strategy, round by round: over the fixed strategies that ran
    every round beside it, the largest median of its time over theirs within a round (the variants of a
    round run one after the other, so the machine's slower drifts cancel). None without per-round samples."""
    key = f"{phase}_samples_ms"
    samples = auto.get(key)
    ratios = [
        statistics.median(a / f for a, f in zip(samples, row[key], strict=True))
        for strategy in FIXED_STRATEGIES
        if samples and (row := by_variant.get(strategy)) and len(row.get(key, ())) == len(samples)
    ]
    return max(ratios, default=None)


def gap_summary(gaps: dict[str, float]) -> dict:
    """Per-shape ratios to the fastest fixed strategy: geomean, worst, and the shapes beyond MISS."""
    return {
        "geomean": geomean(list(gaps.values())),
        "worst": max(gaps.values()),
        "misses": sorted(shape for shape, gap in gaps.items() if gap > MISS),
    }


def by_configuration(rows: list[dict]) -> dict[tuple, dict[str, dict]]:
    """Rows keyed by (device, dtype, shape, B, K), then by variant, in the order measured."""
    configs: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        configs.setdefault((row["device"], row["dtype"], row["shape"], row["batch"], row["experts"]), {})[
            row["variant"]
        ] = row
    return configs


def render(report: dict, console: Console) -> None:
    """One row per configuration, in sections by model and stage; then the summaries per (dtype, B, K)."""
    rows = report["rows"]
    names = [v for v in (*STRATEGY_VARIANTS, "fused", "timm") if any(r["variant"] == v for r in rows)]
    table = Table(title="CondConv2d fwd+bwd time / nn.Conv2d's (same shape, same run); auto: (strategy chosen)")
    for column in ("device", "dtype", "shape", "B", "K", "static ms", *names, "auto fwd", "auto peak"):
        table.add_column(column, justify="left" if column in ("device", "dtype", "shape") else "right")
    group = None
    for (device, dtype, shape, batch, experts), by_variant in by_configuration(rows).items():
        if group is not None and shape.split(" ")[0] != group:
            table.add_section()
        group = shape.split(" ")[0]
        first = next(iter(by_variant.values()))
        cells = []
        for name in names:
            row = by_variant.get(name)
            pick = f" ({row['auto_picks']})" if row and row["auto_picks"] else ""
            cells.append(f"{row['train_ratio']:.2f}x{pick}" if row else "-")
        auto = by_variant.get("auto") or by_variant.get("auto-rules") or first
        pick = f" ({auto['auto_picks_infer']})" if auto["auto_picks_infer"] else ""
        table.add_row(
            device,
            dtype,
            shape,
            str(batch),
            str(experts),
            f"{first['static_train_ms']:.2f}",
            *cells,
            f"{auto['infer_ratio']:.2f}x{pick}",
            f"{auto['peak_ratio']:.1f}x",
        )
    console.print(table)
    for phase, title in PHASES.items():
        summaries = report[SUMMARIES[phase]]
        overview = Table(title=f"{title}: CondConv2d over the static conv, geomean / worst across shapes")
        variant_names = [v for v in names if any(v in s for s in summaries)]
        for column in ("device", "dtype", "B", "K", *variant_names, "fastest fixed, per shape"):
            overview.add_column(column)
        gaps = Table(
            title=f"{title}: auto over the fastest fixed strategy per shape, geomean / worst (shapes > 10% "
            "slower); the same code timed twice, worst pair"
        )
        for column in ("device", "dtype", "B", "K", *GAPS.values(), "same code"):
            gaps.add_column(column)
        for s in summaries:
            cell = (s["device"], s["dtype"], str(s["batch"]), str(s["experts"]))
            overview.add_row(
                *cell,
                *(f"{s[v]['geomean']:.2f} / {s[v]['worst']:.2f}" if v in s else "-" for v in variant_names),
                f"{s['best_per_shape_geomean']:.2f}",
            )
            gaps.add_row(*cell, *gap_cells(s), f"{s['same_code_worst']:.2f}" if "same_code_worst" in s else "-")
        console.print(overview)
        console.print(gaps)


def gap_cells(summary: dict) -> list[str]:
    """The GAPS entries of one summary as 'geomean / worst (misses)'."""
    return [
        f"{g['geomean']:.2f} / {g['worst']:.2f} ({len(g['misses'])})" if (g := summary.get(key)) else "-"
        for key in GAPS
    ]


def markdown(report: dict) -> str:
    """The summaries and every miss of ``auto``, per phase, as Markdown tables for the docs (numbers as measured)."""
    m = report["machine"]
    lines = [
        f"Measured {m.get('started', '?')} to {m['date']}"
        + (f" (resumed at {', '.join(m['segments'][1:])})" if len(m.get("segments", [])) > 1 else "")
        + f": {m['cpu']}, {m['threads']} threads, torch {m['torch']}"
        + (f", {m['gpu']}" if "gpu" in m else "")
        + (", channels_last" if report["channels_last"] else "")
        + "."
    ]
    for phase, title in PHASES.items():
        ms = f"{phase}_ms"
        lines += [
            "",
            f"{title.capitalize()}:",
            "",
            "| device | dtype | B | K | shapes | grouped | mixture | bmm | tuned `auto` | rules-only `auto` | fastest "
            "fixed, per shape | " + " | ".join(f"{gap} (misses)" for gap in GAPS.values()) + " | same code, worst |",
            "|" + "---|" * (12 + len(GAPS)),
        ]
        for s in report[SUMMARIES[phase]]:
            cells = [f"{s[v]['geomean']:.2f}x / {s[v]['worst']:.2f}x" if v in s else "-" for v in STRATEGY_VARIANTS]
            cell = [s["device"], s["dtype"], str(s["batch"]), str(s["experts"]), str(s["shapes"])]
            noise = f"{s['same_code_worst']:.2f}" if "same_code_worst" in s else "-"
            lines.append(
                "| " + " | ".join([*cell, *cells, f"{s['best_per_shape_geomean']:.2f}x", *gap_cells(s), noise]) + " |"
            )
        misses = miss_rows(report["rows"], phase)
        if misses:
            lines += [
                "",
                f"Shapes where tuned `auto` took more than {MISS:.2f}x the fastest fixed strategy, {title}:",
                "",
                "| device | dtype | B | K | shape | tuned `auto` | fastest fixed | tuned / fastest "
                "| its choice / fastest |",
                "|---|---|---|---|---|---|---|---|---|",
            ]
            for auto, chosen, best in misses:
                choice = f"{chosen[ms] / best[ms]:.2f}" if chosen else "-"
                lines.append(
                    f"| {auto['device']} | {auto['dtype']} | {auto['batch']} | {auto['experts']} | `{auto['shape']}` "
                    f"| {auto[picks(phase)]} {auto[f'{phase}_ratio']:.2f}x | {best['variant']} "
                    f"{best[f'{phase}_ratio']:.2f}x | {auto[ms] / best[ms]:.2f} | {choice} |"
                )
    return "\n".join(lines)


def fastest_fixed(by_variant: dict[str, dict], phase: str = "train") -> dict | None:
    """The row of the fastest fixed strategy in ``phase`` of one configuration, or None if none was measured."""
    fixed = [by_variant[s] for s in FIXED_STRATEGIES if s in by_variant]
    return min(fixed, key=lambda r: r[f"{phase}_ms"]) if fixed else None


def miss_rows(rows: list[dict], phase: str = "train") -> list[tuple[dict, dict | None, dict]]:
    """(tuned auto's row, the row of the fixed strategy it chose in ``phase`` or None, the fastest fixed
    strategy's row) wherever auto took more than MISS times as long as the fastest in ``phase``; ordered
    by batch, K, device and dtype."""
    out = []
    ms = f"{phase}_ms"
    for by_variant in by_configuration(rows).values():
        best = fastest_fixed(by_variant, phase)
        if "auto" in by_variant and best and by_variant["auto"][ms] > MISS * best[ms]:
            out.append((by_variant["auto"], chosen_fixed(by_variant["auto"], by_variant, phase), best))
    dtypes = list(DTYPES)
    return sorted(out, key=lambda m: (m[0]["batch"], m[0]["experts"], m[0]["device"], dtypes.index(m[0]["dtype"])))


RESUME_MUST_MATCH = ("torch", "cpu", "threads", "gpu", "malloc")
"""What a resumed run must share with the saved one for their rows to sit in one table."""


def machine() -> dict:
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        **MALLOC,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    parser.add_argument(
        "--devices", nargs="+", default=default_devices, help="devices to measure (default: all present)"
    )
    parser.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), help="default: fp32 bf16 (--quick: fp32)")
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 32, 128])
    parser.add_argument("--experts", nargs="+", type=int, default=[4, 8])
    parser.add_argument("--only", nargs="+", default=[], help="keep suite shapes whose name contains one of these")
    parser.add_argument("--repeats", type=int, default=3, help="least number of timed rounds (the fastest is reported)")
    parser.add_argument(
        "--min-total-ms",
        type=float,
        default=MIN_TOTAL_MS,
        help="rounds go on until every variant has run this long (default: %(default)s; on CUDA, timed by "
        "events, a few rounds suffice)",
    )
    parser.add_argument(
        "--fused",
        action="store_true",
        help="also time the opt-in fused Triton strategy (CUDA, not depthwise; Triton tunes each new shape "
        "in the untimed warm-up); it is no fixed strategy auto may choose",
    )
    parser.add_argument("--channels-last", action="store_true", help="input and modules in channels_last")
    parser.add_argument("--tuned", action="store_true", help="of the two auto variants, measure tuned auto only")
    parser.add_argument("--rules", action="store_true", help="of the two auto variants, measure rules-only auto only")
    parser.add_argument("--system-malloc", action="store_true", help=SYSTEM_MALLOC_HELP)
    parser.add_argument("--quick", action="store_true", help="CI-sized run: two tiny shapes, B=2, K=4, 1 repeat")
    parser.add_argument("--json", type=Path, help="also write every measurement and the summary to this JSON file")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run saved in --json: keep its measurements, measure only what it lacks",
    )
    parser.add_argument("--markdown", action="store_true", help="print the summaries and auto's misses as Markdown")
    parser.add_argument(
        "--from-json", type=Path, metavar="JSON", help="measure nothing: print the tables of a run saved with --json"
    )
    args = parser.parse_args(argv)
    if args.resume and not (args.json and args.json.exists()):
        parser.error("--resume continues a run saved with --json: pass --json FILE of that run")
    args.dtype = args.dtype or (["fp32"] if args.quick else ["fp32", "bf16"])
    if args.quick:
        args.batch, args.experts, args.repeats, args.min_total_ms = [2], [4], 1, 0.0
    if min(args.batch) < 1 or min(args.experts) < 1 or args.repeats < 1 or args.min_total_ms < 0:
        parser.error("--batch, --experts and --repeats must be positive, --min-total-ms not negative")
    autos = [name for name, flag in (("auto", args.tuned), ("auto-rules", args.rules)) if flag] or list(AUTO_VARIANTS)
    fused = ("fused",) if args.fused else ()
    args.variants = (*FIXED_STRATEGIES, *fused, *autos)  # neither flag, or both: tuned and rules-only side by side
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 150)
    if args.from_json:
        try:
            report = json.loads(args.from_json.read_text())
            report |= summaries(report["rows"])  # recomputed: a run saved by an older script gains new columns
        except (OSError, ValueError, KeyError, TypeError) as error:
            sys.exit(f"cannot read {args.from_json}: {error!r}; pass a file written by --json")
    else:
        if not args.system_malloc:
            keep_freed_memory()
        report = run(args, console)
    if args.markdown:
        print(markdown(report))
    else:
        render(report, console)
    return report


def run(args: argparse.Namespace, console: Console) -> dict:
    segments = [machine()["date"]]  # when the run, and each resumption of it, started
    rows: list[dict] = []
    if args.resume:
        rows, segments = resumed(args, segments[0])
    done = set(by_configuration(rows))
    report = None
    for shape, batch, experts, dtype_name, device in configurations(args):
        if (str(device), dtype_name, shape.name, batch, experts) in done:
            continue
        console.log(f"{device} {dtype_name} {shape.name} B={batch} K={experts}")
        results = measure(
            shape,
            batch,
            experts,
            dtype_name,
            device,
            args.repeats,
            args.min_total_ms,
            args.channels_last,
            args.variants,
        )
        rows.extend(ratios(results))
        return_freed_memory()
        report = write_report(rows, args, segments)  # after every configuration: a run cut short keeps it
    if report is None and not done:
        sys.exit("no configuration selected: check --only against the suite's shape names")
    return report or write_report(rows, args, segments)


def resumed(args: argparse.Namespace, now: str) -> tuple[list[dict], list[str]]:
    """The rows of the run saved in ``--json`` whose configuration has every variant asked for, and the
    run's segments with this one added. Refuses a file from another torch, CPU architecture, thread count,
    GPU, allocator setting or memory format: its ratios would not compare with the new ones."""
    try:
        report = json.loads(args.json.read_text())
        rows, saved = report["rows"], report["machine"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        sys.exit(f"cannot resume from {args.json}: {error!r}; pass the file a run wrote with --json")
    here = machine()
    differs = [
        f"{key} {saved.get(key)!r} there, {here.get(key)!r} here"
        for key in RESUME_MUST_MATCH
        if saved.get(key) != here.get(key)
    ]
    for setting, default in (("channels_last", False), ("min_total_ms", MIN_TOTAL_MS)):
        if report.get(setting, default) != getattr(args, setting):
            differs.append(f"{setting} {report.get(setting, default)!r} there, {getattr(args, setting)!r} here")
    if differs:
        sys.exit(
            f"cannot resume {args.json}: measured with other settings ({'; '.join(differs)}); start a new --json file"
        )
    shapes = {shape.name: shape for shape in (*suite(), *QUICK_SUITE)}
    complete = {
        key
        for key, by_variant in by_configuration(rows).items()
        if key[2] in shapes
        and {v for v in args.variants if measured_here(v, shapes[key[2]], torch.device(key[0]).type)} <= set(by_variant)
    }
    kept = [
        row for row in rows if (row["device"], row["dtype"], row["shape"], row["batch"], row["experts"]) in complete
    ]
    return kept, [*saved.get("segments", [saved.get("started", saved["date"])]), now]


def write_report(rows: list[dict], args: argparse.Namespace, segments: list[str]) -> dict:
    report = {
        "machine": {**machine(), "started": segments[0], "segments": segments},
        "channels_last": args.channels_last,
        "min_total_ms": args.min_total_ms,
        "rows": rows,
        **summaries(rows),
    }
    if args.json:
        with atomic_write(args.json, overwrite=True) as tmp:
            Path(tmp).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
