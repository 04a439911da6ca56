"""The quickstart, run as a user runs it (reduced mode): every artifact exists and holds real, finite data."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch

from condconv_lightning.condconv2d import CondConv2d
from condconv_lightning.demos import resnet_tiny
from condconv_lightning.surgery import load_converted

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "examples" / "quickstart.py"


def run_quickstart(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("quickstart") / "out"  # not created yet: the script makes it
    completed = subprocess.run(
        [sys.executable, str(QUICKSTART), "--quick", "--out", str(out)],
        cwd=tmp_path_factory.mktemp("cwd"),
        capture_output=True,
        text=True,
        timeout=600,  # catches a hang; a loaded 2-core machine took 113 s
        env={**os.environ, "COLUMNS": "200"},  # rich wraps to the terminal; keep table cells on one line
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return out, completed.stdout


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    return run_quickstart(tmp_path_factory)


def _finite_numbers(value: object) -> list[float]:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return []
    if isinstance(value, (int, float)):
        return [float(value)]
    if isinstance(value, dict):
        return [n for v in value.values() for n in _finite_numbers(v)]
    if isinstance(value, list):
        return [n for v in value for n in _finite_numbers(v)]
    raise AssertionError(f"unexpected JSON value {value!r}")


def test_summary_is_complete_and_finite(run: tuple[Path, str]) -> None:
    out, _ = run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "quick"
    numbers = _finite_numbers(summary)
    assert numbers and all(math.isfinite(n) for n in numbers)
    condconv, baseline = summary["results"]["condconv"], summary["results"]["baseline"]
    for result in (condconv, baseline):
        for key in ("val_acc_before", "val_acc"):
            assert 0.0 <= result[key] <= 1.0
        assert result["step_ms"] > 0 and result["val_loss"] > 0
    # Exact upcycling: before fine-tuning, the converted model classifies exactly as the original.
    assert condconv["val_acc_before"] == baseline["val_acc_before"]
    assert baseline["parameters"] == sum(p.numel() for p in resnet_tiny(num_classes=4).parameters())
    assert condconv["parameters"] > baseline["parameters"]
    assert 0.0 <= condconv["val_routing_entropy"] <= 1.0 and baseline["val_routing_entropy"] is None
    # layer3 and layer4 of resnet_tiny hold two 3x3 convs and a 1x1 shortcut each.
    assert sorted(summary["converted_layers"]) == sorted(
        f"layer{s}.0.{c}" for s in (3, 4) for c in ("conv1", "conv2", "downsample.0")
    )
    for table in summary["routing_by_context_class"].values():
        routing = np.array(table)
        assert routing.shape == (2 * 4, 4)  # (warm, cool) x 4 classes, 4 experts
        assert ((routing > 0) & (routing < 1)).all()  # sigmoid routing


def test_a_second_run_gives_the_same_numbers_and_prints_progress(
    run: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory
) -> None:
    def reproducible(summary: dict) -> dict:
        timing = ("step_ms", "metrics_csv")
        results = {n: {k: v for k, v in r.items() if k not in timing} for n, r in summary["results"].items()}
        return {"results": results, "routing": summary["routing_by_context_class"], "config": summary["config"]}

    out, stdout = run
    again, _ = run_quickstart(tmp_path_factory)
    first, second = (json.loads((o / "summary.json").read_text()) for o in (out, again))
    assert reproducible(first) == reproducible(second)
    assert "step    8/8  train_loss" in stdout  # progress lines during every fit


def test_converted_file_came_from_the_cli_and_loads(run: tuple[Path, str]) -> None:
    out, stdout = run
    assert "check converted vs original, input 2x3x16x16: passed" in stdout  # printed by condconv-convert itself
    original = resnet_tiny(num_classes=4)
    original.load_state_dict(torch.load(out / "original.pt", weights_only=True))
    converted = load_converted(out / "converted.pt", resnet_tiny(num_classes=4))
    names = [name for name, m in converted.named_modules() if isinstance(m, CondConv2d)]
    assert len(names) == 6 and all(name.startswith(("layer3", "layer4")) for name in names)
    images = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(converted.eval()(images), original.eval()(images), rtol=1e-5, atol=1e-6)


def test_csv_logs_hold_routing_entropy_per_layer(run: tuple[Path, str]) -> None:
    out, _ = run
    header = (out / "logs" / "condconv" / "metrics.csv").read_text().splitlines()[0].split(",")
    for stage in (3, 4):
        assert f"routing/model.layer{stage}.0.conv2/entropy" in header
    assert "val_acc" in (out / "logs" / "baseline" / "metrics.csv").read_text().splitlines()[0].split(",")


@pytest.mark.parametrize("name", ["routing_entropy.png", "routing_heatmap.png"])
def test_plots_are_real_images(run: tuple[Path, str], name: str) -> None:
    out, _ = run
    image = matplotlib.image.imread(out / name)
    assert image.ndim == 3 and image.shape[0] >= 300 and image.shape[1] >= 300 and image.shape[2] in (3, 4)
    assert np.isfinite(image).all() and image[..., :3].std() > 0.05  # not blank: axes, lines, colours


def test_table_is_printed(run: tuple[Path, str]) -> None:
    _, stdout = run
    for text in ("CondConv K=4", "unconverted", "step time", "routing entropy", "summary.json"):
        assert text in stdout
