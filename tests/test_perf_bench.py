"""The benchmark scripts run in their CI-sized ``--quick`` mode and report what they promise.

Only that they run and report: speed targets are read off their full output (README),
never asserted in tests.
"""

from __future__ import annotations

import json
import math
import platform
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TOOLS = Path(__file__).resolve().parents[1] / "tools"
sys.path.insert(0, str(TOOLS))

import bench_dispatch  # noqa: E402
import bench_layers  # noqa: E402
import bench_model  # noqa: E402
import bench_retune  # noqa: E402
import bench_suite  # noqa: E402

from condconv_lightning.functional import autotune  # noqa: E402


@pytest.fixture(autouse=True)
def allocator_left_alone(monkeypatch):
    """The scripts' switch of the C allocator is process-wide: in-process runs record the call instead."""
    calls = []

    def keep_freed_memory():
        calls.append(True)
        monkeypatch.setitem(bench_layers.MALLOC, "malloc", "kept (recorded by the test)")
        return True

    monkeypatch.setattr(bench_layers, "keep_freed_memory", keep_freed_memory)
    monkeypatch.setattr(bench_model, "keep_freed_memory", keep_freed_memory)
    monkeypatch.setattr(bench_retune, "keep_freed_memory", keep_freed_memory)
    return calls


def test_bench_layers_quick_reports_every_variant_against_static(tmp_path, capsys, allocator_left_alone):
    out = tmp_path / "layers.json"
    report = bench_layers.main(["--quick", "--json", str(out)])
    assert allocator_left_alone == [True] and report["machine"]["malloc"] == "kept (recorded by the test)"
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    rows = report["rows"]
    shapes = {shape.name for shape in bench_layers.QUICK_SUITE}
    assert {(r["shape"], r["variant"]) for r in rows} >= {
        (s, v) for s in shapes for v in bench_layers.STRATEGY_VARIANTS
    }
    for row in rows:
        for key in ("train_ratio", "infer_ratio", "peak_ratio"):
            assert math.isfinite(row[key]) and row[key] > 0, (row["shape"], row["variant"], key)
        assert row["static_peak_bytes"] > 0
    for variant in bench_layers.AUTO_VARIANTS:
        picks = {(r["auto_picks"], r["auto_picks_infer"]) for r in rows if r["variant"] == variant}
        assert picks and all({train, infer} <= set(bench_layers.FIXED_STRATEGIES) for train, infer in picks)
    (summary,) = report["summary"]
    assert (summary["batch"], summary["experts"]) == (2, 4)
    assert math.isfinite(summary["same_code_worst"]) and summary["same_code_worst"] >= 1
    for variant in bench_layers.AUTO_VARIANTS:
        assert summary[variant]["geomean"] > 0 and summary[f"{variant}_over_best"]["worst"] > 0
        assert set(summary[f"{variant}_over_best"]["misses"]) <= shapes
    printed = capsys.readouterr().out
    assert "fwd+bwd" in printed and "tiny.dw3x3" in printed and "forward only" in printed
    (inference,) = report["summary_infer"]
    assert inference["auto"]["geomean"] > 0 and set(inference["auto_over_best"]["misses"]) <= shapes
    assert all(title in printed for title in bench_layers.GAPS.values())
    assert bench_layers.main(["--from-json", str(out), "--markdown"]) == json.loads(out.read_text())
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| cpu | fp32 | 2 | 4 |")]
    tuned = summary["auto"]
    assert table[0].split(" | ")[8] == f"{tuned['geomean']:.2f}x / {tuned['worst']:.2f}x"  # the tuned auto column
    assert len(table) == 2 + sum(len(bench_layers.miss_rows(rows, phase)) for phase in bench_layers.PHASES)


def test_bench_layers_markdown_lists_each_miss_of_auto_against_the_fastest_strategy():
    def row(variant, ms, pick="", infer_ms=1.0, infer_pick=""):
        return {
            "device": "cpu",
            "dtype": "fp32",
            "shape": "s",
            "batch": 1,
            "experts": 4,
            "variant": variant,
            "train_ms": ms,
            "train_ratio": ms / 2,
            "static_train_ms": 2.0,
            "auto_picks": pick,
            "infer_ms": infer_ms,
            "infer_ratio": infer_ms,
            "static_infer_ms": 1.0,
            "auto_picks_infer": infer_pick,
        }

    rows = [row("grouped", 2.0), row("mixture", 1.0), row("bmm", 3.0), row("auto", 1.2, "mixture")]
    assert bench_layers.miss_rows(rows) == [(rows[3], rows[1], rows[1])]
    (summary,) = bench_layers.summary(rows)
    assert summary["auto_over_best"] == {"geomean": pytest.approx(1.2), "worst": pytest.approx(1.2), "misses": ["s"]}
    assert summary["auto_choice_over_best"] == {"geomean": 1.0, "worst": 1.0, "misses": []}  # the right choice
    rows[3]["auto_picks"] = "grouped"  # a wrong choice: its strategy ran 2x the fastest
    assert bench_layers.miss_rows(rows) == [(rows[3], rows[0], rows[1])]
    assert bench_layers.summary(rows)[0]["auto_choice_over_best"]["misses"] == ["s"]
    report = {"machine": bench_layers.machine(), "channels_last": False, "rows": rows}
    assert "| 1.20 | 2.00 |" in bench_layers.markdown({**report, **bench_layers.summaries(rows)})
    del rows[0]  # its choice was not timed as a fixed strategy: no choice to compare
    assert bench_layers.miss_rows(rows) == [(rows[2], None, rows[0])]
    assert "auto_choice_over_best" not in bench_layers.summary(rows)[0]
    assert "| 1.20 | - |" in bench_layers.markdown({**report, "rows": rows, **bench_layers.summaries(rows)})
    rows.insert(0, row("grouped", 2.0))
    rows[3]["train_ms"] = 1.05
    assert bench_layers.miss_rows(rows) == []


def test_bench_layers_pairs_tuned_auto_with_each_fixed_strategy_round_by_round():
    """A round that ran slow for every variant cancels out: by the fastest runs bmm looks 2x faster than auto,
    round by round it is 1.25x; a strategy that sat out after its first run is not compared."""
    by_variant = {
        "auto": {"train_samples_ms": [2.0, 5.0, 2.0]},
        "grouped": {"train_samples_ms": [2.0, 5.0, 2.0]},
        "bmm": {"train_samples_ms": [1.6, 1.0, 1.6]},
        "mixture": {"train_samples_ms": [0.1]},
    }
    assert bench_layers.paired_over_fastest(by_variant["auto"], by_variant) == pytest.approx(1.25)
    del by_variant["bmm"]
    assert bench_layers.paired_over_fastest(by_variant["auto"], by_variant) == pytest.approx(1.0)
    assert bench_layers.paired_over_fastest({"train_ms": 1.0}, by_variant) is None  # no per-round samples


def test_bench_layers_summarizes_inference_apart_from_training():
    """auto tunes a forward-only call on its own: a wrong choice there is a miss of inference only."""

    def row(variant, train_ms, infer_ms, picks=("", "")):
        return {
            "device": "cpu",
            "dtype": "fp32",
            "shape": "s",
            "batch": 32,
            "experts": 4,
            "variant": variant,
            "train_ms": train_ms,
            "train_ratio": train_ms,
            "static_train_ms": 1.0,
            "infer_ms": infer_ms,
            "infer_ratio": infer_ms / 0.5,
            "static_infer_ms": 0.5,
            "auto_picks": picks[0],
            "auto_picks_infer": picks[1],
        }

    rows = [row("grouped", 2.0, 0.5), row("mixture", 4.0, 2.0), row("bmm", 1.0, 0.65), row("auto", 1.0, 0.65)]
    rows[3]["auto_picks"], rows[3]["auto_picks_infer"] = "bmm", "bmm"
    assert bench_layers.miss_rows(rows, "train") == []
    assert bench_layers.miss_rows(rows, "infer") == [(rows[3], rows[2], rows[0])]
    report = {"machine": bench_layers.machine(), "channels_last": False, "rows": rows, **bench_layers.summaries(rows)}
    (train,), (infer,) = report["summary"], report["summary_infer"]
    assert train["auto_choice_over_best"]["misses"] == [] and train["best_per_shape_geomean"] == 1.0
    assert infer["auto_choice_over_best"] == {"geomean": 1.3, "worst": 1.3, "misses": ["s"]}
    assert infer["grouped"] == {"geomean": 1.0, "worst": 1.0} and infer["best_per_shape_geomean"] == 1.0
    text = bench_layers.markdown(report)
    assert text.count("| cpu | fp32 | 32 | 4 | 1 |") == 2  # one summary row per phase
    assert "Forward only:" in text and "| `s` | bmm 1.30x | grouped 1.00x | 1.30 | 1.30 |" in text


def test_bench_layers_suite_is_every_distinct_conv_of_three_architectures():
    shapes = bench_layers.suite()
    models = [s.name.split(".")[0] for s in shapes]
    keys = [
        (s.in_channels, s.out_channels, s.kernel_size, s.stride, s.groups, s.size, m) for s, m in zip(shapes, models)
    ]
    assert len(keys) == len(set(keys))
    assert set(models) == {"r50", "mbv2", "effb0"}
    assert models.count("r50") == 23  # the stem and 5 or 6 distinct convs per stage
    assert any(s.kernel_size == 5 and s.groups == s.in_channels == 1152 and s.size == 7 for s in shapes)  # effb0 stage6


@pytest.mark.parametrize("flag,variants", [("--tuned", {"auto"}), ("--rules", {"auto-rules"})])
def test_bench_layers_can_measure_one_auto_variant(flag, variants):
    args = bench_layers.parse_args(["--quick", flag])
    assert {v for v in args.variants if v.startswith("auto")} == variants


def test_bench_layers_times_fused_only_when_asked_and_where_its_kernels_run():
    args = bench_layers.parse_args(["--fused", "--min-total-ms", "50"])
    assert "fused" in args.variants and args.min_total_ms == 50
    assert "fused" not in bench_layers.parse_args(["--quick"]).variants
    assert bench_layers.parse_args(["--quick", "--min-total-ms", "50"]).min_total_ms == 0  # CI-sized
    shape = bench_layers.QUICK_SUITE[0]
    dense, depthwise = (
        next(s for s in bench_suite.suite() if cond(s)) for cond in (lambda s: s.groups == 1, lambda s: s.groups > 1)
    )
    assert bench_layers.measured_here("fused", dense, "cuda") and not bench_layers.measured_here(
        "fused", depthwise, "cuda"
    )
    assert not bench_layers.measured_here("fused", dense, "cpu") and bench_layers.measured_here("bmm", depthwise, "cpu")
    modules = bench_layers.variants(shape, 4, torch.device("cpu"), args.variants)
    assert "fused" not in modules and {"grouped", "mixture", "bmm", "auto"} <= set(modules)


@pytest.mark.cuda
def test_bench_layers_times_fused_on_cuda_except_depthwise():
    dense, depthwise = (
        next(s for s in bench_suite.suite() if cond(s)) for cond in (lambda s: s.groups == 1, lambda s: s.groups > 1)
    )
    for shape, expected in ((dense, True), (depthwise, False)):
        assert ("fused" in bench_layers.variants(shape, 4, torch.device("cuda"), ("fused",))) == expected


def test_gpu_check_measures_one_suite_shape_per_selection():
    script = (TOOLS / "gpu_check.sh").read_text()
    (selection,) = re.findall(r"SHAPES=\((.*?)\)", script, flags=re.DOTALL)
    names = [s.name for s in bench_suite.suite()]
    for text in re.findall(r'"([^"]+)"', selection):
        assert sum(text in name for name in names) == 1, text


def test_bench_layers_rejects_a_selection_that_matches_nothing():
    with pytest.raises(SystemExit, match="no configuration selected"):
        bench_layers.main(["--quick", "--only", "no-such-shape"])


def test_bench_retune_tunes_every_problem_afresh_each_time_and_times_the_strategies_after(
    tmp_path, capsys, monkeypatch, allocator_left_alone
):
    timings = []
    real_fastest = autotune._fastest

    def counted_fastest(candidates, *args):
        timings.append(tuple(candidates))
        return real_fastest(candidates, *args)

    monkeypatch.setattr(autotune, "_fastest", counted_fastest)
    runs_while_sampling = []
    real_timed_ms = autotune.timed_ms

    def sample(*args):
        runs_while_sampling.append(autotune.TIMED_RUNS)
        return real_timed_ms(*args)

    monkeypatch.setattr(autotune, "timed_ms", sample)
    out = tmp_path / "retune.json"
    library_runs = autotune.TIMED_RUNS
    rows = bench_retune.main(["--quick", "--tunings", "2", "--timed-runs", "5", "--json", str(out)])
    assert allocator_left_alone == [True]
    # Both tiny shapes leave every strategy to time, in training and inference: 2 shapes x 2 phases x 2 tunings.
    assert len(timings) == 8 and all(len(candidates) == 3 for candidates in timings)
    assert set(runs_while_sampling) == {5}  # --timed-runs held while the tuner sampled, and only then:
    assert library_runs == autotune.TIMED_RUNS
    assert {(row["shape"], row["phase"]) for row in rows} == {
        (shape.name, phase) for shape in bench_layers.QUICK_SUITE for phase in bench_layers.PHASES
    }
    for row in rows:
        assert sum(row["picks"].values()) == 2 and set(row["picks"]) <= set(bench_layers.FIXED_STRATEGIES)
        assert all(len(row["samples_ms"][name]) == 2 for name in bench_layers.FIXED_STRATEGIES)
        assert row["fastest"] == min(row["median_ms"], key=row["median_ms"].get)
        assert row["picked_fastest"] == row["picks"].get(row["fastest"], 0)
    saved = json.loads(out.read_text())
    assert saved["rows"] == json.loads(json.dumps(rows)) and saved["machine"]["timed_runs"] == 5
    assert "tiny.dw3x3" in capsys.readouterr().out
    assert autotune.tuning_cache() == {}  # no choice left behind


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--only", "r50.layer4", "--tunings", "0"], "must be positive"),
        (["--quick", "--timed-runs", "0"], "must be positive"),
        ([], "pass --only"),
    ],
)
def test_bench_retune_refuses_a_run_that_would_tune_nothing_or_the_whole_suite(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench_retune.main(argv)
    assert message in capsys.readouterr().err


def test_bench_dispatch_quick_reports_what_auto_adds_to_the_strategy_it_ran(tmp_path, capsys):
    out = tmp_path / "dispatch.json"
    report = bench_dispatch.main(["--quick", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert [row["phase"] for row in report["rows"]] == list(bench_layers.PHASES)
    cached = autotune.tuning_cache()
    for row in report["rows"]:
        assert set(row["extra"]) == set(bench_layers.AUTO_VARIANTS)
        # At B = 1 the rules pick grouped; tuned auto runs what the cache holds for the layer's problem.
        assert row["extra"]["auto-rules"]["ran"] == "grouped"
        grad = row["phase"] == "train"
        (choice,) = {
            strategy
            for key, strategy in cached.items()
            if key[3:8] == (1, 8, 8, 4, 4) and key[13] == bench_dispatch.EXPERTS and key[-1] == grad
        }
        assert row["extra"]["auto"]["ran"] == choice
        for name, extra in row["extra"].items():
            own, ran = row["samples_us"][name], row["samples_us"][extra["ran"]]
            assert len(own) == len(ran) == 3 and min(own + ran) > 0
            assert extra["median_us"] == pytest.approx(statistics.median(a - b for a, b in zip(own, ran)))
            assert row["median_us"][name] == pytest.approx(statistics.median(own))
    assert "auto against the fixed strategy it ran" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [(["--device", "tpu"], "--device tpu"), (["--rounds", "0"], "must be positive")],
)
def test_bench_dispatch_refuses_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench_dispatch.main(argv)
    assert message in capsys.readouterr().err


def test_bench_model_quick_reports_throughput_and_memory_ratios(tmp_path, capsys, allocator_left_alone):
    out = tmp_path / "model.json"
    result = bench_model.main(["--quick", "--json", str(out)])
    assert allocator_left_alone == [True] and result["machine"]["malloc"] == "kept (recorded by the test)"
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["converted_layers"] > 0
    assert result["params"]["converted"] > result["params"]["static"]
    assert result["throughput_ratio"] > 0 and result["peak_ratio"] > 0
    assert all(v > 0 for v in result["images_per_s"].values())
    assert "converted/static" in capsys.readouterr().out


def test_bench_layers_runs_cells_from_the_smallest_batch_and_k_up():
    args = bench_layers.parse_args(["--batch", "128", "1", "--experts", "8", "4", "--dtype", "fp32", "bf16"])
    args.devices = ["cpu"]
    cells = list(dict.fromkeys((b, k, d) for _, b, k, d, _ in bench_layers.configurations(args)))
    assert cells == [(b, k, d) for b in (1, 128) for k in (4, 8) for d in ("fp32", "bf16")]


def test_bench_layers_stops_repeating_a_strategy_only_when_it_is_slow_in_training_and_inference():
    train = {"static": [1.0], "grouped": [2.0], "mixture": [4.1], "bmm": [3.0], "auto": [9.0], "timm": [9.0]}
    infer = {"static": [1.0], "grouped": [1.0], "mixture": [2.1], "bmm": [2.5], "auto": [9.0], "timm": [1.5]}
    out = {name for name in train if bench_layers.out_of_the_race(name, train, infer)}
    assert out == {"mixture"}  # bmm is within 2x in training, timm in inference; static and auto always run
    chosen = frozenset({"mixture", ""})  # what the autos ran (a fixed strategy's own pick is empty)
    assert not any(bench_layers.out_of_the_race(name, train, infer, chosen) for name in train)


def test_bench_layers_resume_measures_only_the_configurations_the_saved_run_lacks(tmp_path, monkeypatch):
    out = tmp_path / "layers.json"
    first = bench_layers.main(["--quick", "--json", str(out)])
    kept, dropped = (shape.name for shape in bench_layers.QUICK_SUITE)
    saved = json.loads(out.read_text())
    saved["rows"] = [r for r in saved["rows"] if r["shape"] != dropped or r["variant"] != "bmm"]  # cut short
    out.write_text(json.dumps(saved))
    measured = []
    measure = bench_layers.measure
    monkeypatch.setattr(bench_layers, "measure", lambda shape, *a: measured.append(shape.name) or measure(shape, *a))
    report = bench_layers.main(["--quick", "--json", str(out), "--resume"])
    assert measured == [dropped]
    old = [r for r in first["rows"] if r["shape"] == kept]
    assert [r for r in report["rows"] if r["shape"] == kept] == old  # kept as measured, not re-measured
    assert {r["variant"] for r in report["rows"] if r["shape"] == dropped} >= set(bench_layers.STRATEGY_VARIANTS)
    segments = report["machine"]["segments"]
    assert len(segments) == 2 and segments[0] == first["machine"]["started"] == report["machine"]["started"]
    assert json.loads(out.read_text())["machine"]["segments"] == segments


@pytest.mark.parametrize(
    ("field", "value", "flags"),
    [
        ("torch", "0.0.1", []),
        ("threads", 999, []),
        ("channels_last", None, ["--channels-last"]),
        ("min_total_ms", 50.0, []),
    ],
)
def test_bench_layers_resume_refuses_a_run_measured_with_other_settings(tmp_path, monkeypatch, field, value, flags):
    out = tmp_path / "layers.json"
    saved = {"machine": bench_layers.machine(), "channels_last": False, "min_total_ms": 0.0, "rows": []}
    if value is not None:
        (saved if field in saved else saved["machine"])[field] = value
    out.write_text(json.dumps(saved))
    monkeypatch.setattr(bench_layers, "measure", lambda *a: pytest.fail("measured despite the mismatch"))
    with pytest.raises(SystemExit, match=f"cannot resume .*{field}.*start a new --json file"):
        bench_layers.main(["--quick", "--json", str(out), "--resume", *flags])
    assert json.loads(out.read_text()) == saved  # the saved run is left as it was


def test_bench_layers_resume_needs_the_saved_run(tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench_layers.main(["--quick", "--resume"])
    with pytest.raises(SystemExit):
        bench_layers.main(["--quick", "--resume", "--json", str(tmp_path / "missing.json")])
    assert "--resume continues a run saved with --json" in capsys.readouterr().err


def test_bench_layers_system_malloc_leaves_the_allocator_and_says_so(allocator_left_alone):
    report = bench_layers.main(["--quick", "--only", "tiny.dw3x3", "--system-malloc"])
    assert allocator_left_alone == [] and report["machine"]["malloc"] == "system"


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the switch is glibc's mallopt")
def test_keep_freed_memory_stops_large_buffers_from_page_faulting_on_every_call_until_trimmed():
    probe = f"""
import resource, sys, torch
sys.path.insert(0, {str(TOOLS)!r})
import bench_layers

def faults(calls):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(calls):
        torch.ones(16 * 2**20)  # 64 MiB, freed at once
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

def resident_mib():
    return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize() // 2**20

faults(1)
system = faults(3)
kept = bench_layers.keep_freed_memory()
faults(3)  # the heap grows to hold the buffer
kept_faults, held = faults(3), resident_mib()
bench_layers.return_freed_memory()
print(kept, system, kept_faults, held - resident_mib(), faults(1), bench_layers.machine()["malloc"])
"""
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    kept, system_faults, kept_faults, returned_mib, after_trim = out[0], *map(int, out[1:5])
    assert kept == "True" and " ".join(out[5:]) == "glibc, freed memory kept"
    assert kept_faults * 10 < system_faults, (system_faults, kept_faults)
    assert returned_mib >= 64 and after_trim * 10 > system_faults // 3, (returned_mib, after_trim)  # back to the OS
