"""Time ``condconv-convert`` on a 25.6M-parameter ResNet-50, as users run it, against the 10 s target.

The target: converting a ResNet-50-sized model, check included, takes under 10 s
on 2 CPU cores. This script saves ``condconv_lightning.demos.resnet50_like``
(state dict, and full module), runs the installed command on it in a subprocess,
and prints, side by side with it, the floor any such command pays on the same
machine: a fresh python that imports torch, ``torch.load``s the file and
``torch.save``s the model again. Ratios: command / 10 s target, command / floor. CPU
seconds (user + system) are printed too: other load on the machine inflates them far
less than wall time, and with 2 cores wall time is at least about CPU / 2.

    python tools/bench_convert.py [--layers layer3,layer4] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from condconv_lightning.demos import resnet50_like

TARGET_SECONDS = 10.0
FLOOR = "import sys, torch; m = torch.load(sys.argv[1], weights_only=False); torch.save(m, sys.argv[2])"


def timed(command: list[str]) -> tuple[float, float, subprocess.CompletedProcess]:
    """Wall seconds, CPU seconds (user + system; less sensitive to other load on the machine), result."""
    start, cpu_start = time.perf_counter(), _children_cpu()
    result = subprocess.run(command, capture_output=True, text=True)
    elapsed, cpu = time.perf_counter() - start, _children_cpu() - cpu_start
    if result.returncode != 0:
        sys.exit(f"{' '.join(command)} failed: {result.stderr.strip()}")
    return elapsed, cpu, result


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--layers", action="append", help="selectors to convert (repeatable; default: layer3,layer4 and every stage)"
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs per case; the median is reported")
    args = parser.parse_args()
    command = shutil.which("condconv-convert")
    if command is None:
        sys.exit("condconv-convert is not installed; run `pip install -e .`")
    layer_sets = args.layers or ["layer3,layer4", "conv1,layer1,layer2,layer3,layer4"]

    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        model = resnet50_like().eval()
        parameters = sum(p.numel() for p in model.parameters())
        torch.save(model.state_dict(), work / "resnet50.pt")
        torch.save(model, work / "resnet50_full.pt")
        floors = [
            timed([sys.executable, "-c", FLOOR, str(work / "resnet50_full.pt"), str(work / "floor.pt")])
            for _ in range(args.repeat)
        ]
        floor = statistics.median(f[0] for f in floors)
        floor_cpu = statistics.median(f[1] for f in floors)
        print(
            f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
            f"torch threads {torch.get_num_threads()}"
        )
        print(f"load average (1 min) before: {os.getloadavg()[0]:.2f}")
        print(
            f"model: resnet50_like, {parameters / 1e6:.1f}M parameters; "
            f"floor (python + torch.load + torch.save): {floor:.2f} s wall, {floor_cpu:.2f} s CPU"
        )
        print(
            f"{'input':<12} {'layers':<34} {'converted':>9} {'check':>6} {'out MB':>7} {'wall s':>7} {'CPU s':>6} "
            f"{'/target':>8} {'/floor':>7}"
        )
        cases = [
            ("state dict", "resnet50.pt", ["--arch", "condconv_lightning.demos:resnet50_like"]),
            ("full module", "resnet50_full.pt", ["--trust-pickle"]),
        ]
        for kind, name, extra in cases:
            for layers in layer_sets:
                runs = []
                for _ in range(args.repeat):
                    out = work / "out.pt"
                    elapsed, cpu, result = timed(
                        [command, str(work / name), *extra, "--layers", layers, "-o", str(out), "--force", "--json"]
                    )
                    runs.append((elapsed, cpu, json.loads(result.stdout)))
                wall = statistics.median(r[0] for r in runs)
                cpu = statistics.median(r[1] for r in runs)
                facts = runs[0][2]
                check = facts["check"]
                print(
                    f"{kind:<12} {layers:<34} {len(facts['conversion']['converted']):>9} "
                    f"{'pass' if check['passed'] else 'FAIL':>6} {facts['output']['bytes'] / 1e6:>7.0f} "
                    f"{wall:>7.2f} {cpu:>6.2f} {wall / TARGET_SECONDS:>8.2f} {wall / floor:>7.2f}"
                )
        print(f"load average (1 min) after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
