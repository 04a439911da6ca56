"""``tools/gpu_check.sh``: its argument handling, and a dry run of its CPU-side parts.

The dry run (``--devices cpu``) runs every stage with tiny sizes and must leave each
stage's JSON behind, so the script is known to work before a GPU machine runs it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "gpu_check.sh"
pytestmark = pytest.mark.skipif(
    shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and coreutils' timeout"
)


def run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--no-such-flag"], "unknown argument '--no-such-flag'"),
        (["--devices", "tpu"], "--devices must be cuda or cpu, got 'tpu'"),
        (["--out"], "usage:"),
        (["--wheels", "/no/such/folder"], "is not a folder"),
    ],
    ids=["unknown", "bad-device", "missing-value", "wheels-not-a-folder"],
)
def test_bad_arguments_exit_2_with_a_message(args, message, tmp_path):
    result = run(*args, "--out", str(tmp_path)) if args != ["--out"] else run(*args)
    assert result.returncode == 2 and message in result.stderr
    assert not list(tmp_path.glob("*.json"))


def test_help_prints_usage_and_exits_0():
    result = run("--help")
    assert result.returncode == 0 and result.stdout.startswith("usage: tools/gpu_check.sh")


@pytest.mark.slow
def test_cpu_dry_run_writes_every_stage_json(tmp_path):
    result = run("--devices", "cpu", "--quick", "--out", str(tmp_path), timeout=600)
    summary = json.loads((tmp_path / "summary.json").read_text())
    stages = {"environment", "pytest_cuda", "bench_layers_fp32", "bench_layers_bf16", "bench_model", "finetune"}
    assert set(summary) == stages
    failed = {
        name: json.loads((tmp_path / f"{name}.status.json").read_text())["output_tail"][-600:]
        for name, stage in summary.items()
        if stage["rc"] != 0
    }
    assert not failed and result.returncode == 0, failed
    layers = json.loads((tmp_path / "bench_layers_bf16.json").read_text())
    assert {row["dtype"] for row in layers["rows"]} == {"bf16"} and layers["summary"]
    assert json.loads((tmp_path / "bench_model.json").read_text())["converted_layers"] > 0
    assert json.loads((tmp_path / "environment.json").read_text())["torch"]
    assert json.loads((tmp_path / "finetune.json").read_text())["logged_rows"] > 0
