"""``tools/gpu_check.sh``: its argument handling, and a dry run of its CPU-side parts.

The dry run (``--devices cpu``) runs every stage with tiny sizes and must leave each
stage's JSON behind, packed in the two files a device machine returns, so the script is
known to work before a GPU machine runs it.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "gpu_check.sh"
sys.path.insert(0, str(SCRIPT.parents[1] / "tests"))
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
        (["--wheels", "EMPTY"], "holds no .whl file"),
        (["--wheels", "TWICE"], "more than one version of: gpucheckprobe;"),
    ],
    ids=["unknown", "bad-device", "missing-value", "wheels-not-a-folder", "wheels-empty", "wheels-twice"],
)
def test_bad_arguments_exit_2_with_a_message(args, message, tmp_path):
    if "TWICE" in args:  # pip would install neither version
        probe_wheel(tmp_path)
        probe_wheel(tmp_path, "0.2")
    args = [str(tmp_path) if a in ("EMPTY", "TWICE") else a for a in args]
    result = run(*args, "--out", str(tmp_path)) if args != ["--out"] else run(*args)
    assert result.returncode == 2 and message in result.stderr
    assert not list(tmp_path.glob("*.json"))


def test_every_test_file_with_cuda_tests_is_run_by_the_script():
    """The script names its test files (so a missing optional module elsewhere cannot stop collection):
    a new file with CUDA tests must be added to it."""
    tests = SCRIPT.parents[1] / "tests"
    marked = {
        f"tests/{path.name}"
        for path in tests.glob("test_*.py")
        if re.search(r"CUDA_PARAM|mark\.cuda|needs_cuda", path.read_text())
        and path.name not in ("test_fused.py", Path(__file__).name)
    }
    (named,) = re.findall(r"^CUDA_TESTS=\((.*)\)$", SCRIPT.read_text(), flags=re.MULTILINE)
    assert set(named.split()) == marked
    fused = re.findall(r"tests/test_fused.py::(\w+)(?:\[([\w-]+)\])?", SCRIPT.read_text())
    import_fused = __import__("test_fused")  # the named cases exist
    assert fused and all(hasattr(import_fused, name) for name, _ in fused)
    assert all(case in import_fused.CASES for _, case in fused if case)


def test_the_stages_time_limits_add_up_to_under_eight_minutes():
    """Each stage may take its limit and the kill grace after it; together they stay under 8 minutes."""
    text = SCRIPT.read_text()
    limits = {name: int(limit) for name, limit in re.findall(r'^\s*stage "?([\w$]+)"? (\d+) ', text, re.MULTILINE)}
    assert "bench_dispatch" in limits and "pytest_fused" in limits
    runs = {name: 2 if "$dtype" in name else 1 for name in limits}  # bench_layers, once per dtype
    (grace,) = map(int, re.findall(r"--kill-after=(\d+)", text))
    assert sum((limits[name] + grace) * runs[name] for name in limits) < 8 * 60


def probe_wheel(folder: Path, version: str = "0.1") -> None:
    """A minimal pure-Python wheel, as pip download would bring one."""
    dist = f"gpucheckprobe-{version}.dist-info"
    with zipfile.ZipFile(folder / f"gpucheckprobe-{version}-py3-none-any.whl", "w") as wheel:
        wheel.writestr("gpucheckprobe/__init__.py", "VALUE = 1\n")
        wheel.writestr(f"{dist}/METADATA", f"Metadata-Version: 2.1\nName: gpucheckprobe\nVersion: {version}\n")
        wheel.writestr(
            f"{dist}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        wheel.writestr(f"{dist}/RECORD", "")


def test_help_prints_usage_and_exits_0():
    result = run("--help")
    assert result.returncode == 0 and result.stdout.startswith("usage: tools/gpu_check.sh")


@pytest.mark.slow
def test_cpu_dry_run_writes_every_stage_json(tmp_path, monkeypatch):
    (tmp_path / "wheels").mkdir()
    probe_wheel(tmp_path / "wheels")
    monkeypatch.chdir(tmp_path)  # a relative --wheels folder, while the stages run from the repository
    result = run("--devices", "cpu", "--quick", "--out", "out", "--wheels", "wheels", timeout=600)
    out = tmp_path / "out"
    assert sorted(path.name for path in out.iterdir()) == ["results.tar.gz", "summary.json"]
    with tarfile.open(out / "results.tar.gz") as archive:
        archive.extractall(tmp_path / "unpacked", filter="data")
    summary = json.loads((out / "summary.json").read_text())
    tmp_path = tmp_path / "unpacked" / "results"
    stages = {"wheels", "environment", "pytest_cuda", "bench_layers_fp32", "bench_layers_bf16", "bench_model"}
    stages |= {"bench_dispatch"}
    assert set(summary) == stages | {"finetune", "pytest_fused"}
    assert "Successfully installed gpucheckprobe" in (tmp_path / "wheels.log").read_text()
    failed = {
        name: json.loads((tmp_path / f"{name}.status.json").read_text())["output_tail"][-600:]
        for name, stage in summary.items()
        if stage["rc"] != 0
    }
    assert not failed and result.returncode == 0, failed
    layers = json.loads((tmp_path / "bench_layers_bf16.json").read_text())
    assert {row["dtype"] for row in layers["rows"]} == {"bf16"} and layers["summary"]
    assert json.loads((tmp_path / "bench_model.json").read_text())["converted_layers"] > 0
    dispatch = json.loads((tmp_path / "bench_dispatch.json").read_text())
    assert {row["phase"] for row in dispatch["rows"]} == {"train", "infer"}
    assert json.loads((tmp_path / "environment.json").read_text())["torch"]
    assert json.loads((tmp_path / "finetune.json").read_text())["logged_rows"] > 0
