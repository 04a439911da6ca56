"""A ``condconv-finetune`` run SIGKILLed after a checkpoint and resumed ends exactly where an uninterrupted run does.

Tiny synthetic data: 32 images in batches of 8 are 4 steps per epoch, 10 steps in all, a checkpoint every 2 steps.
Softmax routing with a per-step temperature schedule and a per-step learning-rate scheduler, so the resumed run
must restore the step, the data order (epoch and position in it), the optimizer, the scheduler and the temperature.
"""

from __future__ import annotations

import functools
import json
import operator
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch.utils.data import TensorDataset

from condconv_lightning.demos.data import EpochShuffleSampler, ResumableDataLoader

ROOT = Path(__file__).resolve().parents[1]
MAX_STEPS = 10
CONFIG = {
    "seed_everything": 0,
    "trainer": {
        "accelerator": "cpu", "devices": 1, "max_steps": MAX_STEPS, "logger": False, "enable_progress_bar": False,
        "enable_model_summary": False, "num_sanity_val_steps": 0, "limit_val_batches": 1,
        "callbacks": [
            {"class_path": "condconv_lightning.callbacks.CondConvConversion", "init_args": {
                "layers": ["layer4"], "submodule": "model", "verbose": False, "config": {
                    "num_experts": 2, "routing": "softmax", "temperature": 30.0, "seed": 0,
                    "strategy": "grouped"}}},  # not "auto": it may time, then pick, per process
            {"class_path": "condconv_lightning.callbacks.RoutingTemperatureScheduler", "init_args": {
                "start": 30.0, "end": 1.0, "duration": 8, "interval": "step"}},
            {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {
                "filename": "{step}", "every_n_train_steps": 2, "save_top_k": -1, "save_last": True}},
        ],
    },
    "model": {
        "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.01}}, "router_lr": 0.05,
        "scheduler": {"class_path": "torch.optim.lr_scheduler.StepLR", "init_args": {"step_size": 3, "gamma": 0.5}},
        "scheduler_interval": "step",
    },
    "data": {"class_path": "condconv_lightning.demos.SyntheticImageDataModule", "init_args": {
        "train_size": 32, "val_size": 8, "batch_size": 8, "image_size": 16}},
}  # fmt: skip


class Stall(Callback):
    """Hangs before the batch at ``step``, after the checkpoint of ``step`` is written, and says so in ``marker``."""

    def __init__(self, step: int, marker: str) -> None:
        self.step = step
        self.marker = Path(marker)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            self.marker.touch()
            time.sleep(300)


def drive(stages: str) -> None:
    """Runs the ``condconv-finetune fit`` runs of each stage in forked processes, all from this one import of torch
    and Lightning (the bulk of a run's time). ``stages``: JSON list of ``{name: [run_dir, *args]}``; for each stage,
    prints the pids, then the exit codes once all have ended. A stage after the first waits for a line on stdin.
    """
    from condconv_lightning.cli.finetune import main

    for index, stage in enumerate(json.loads(stages)):
        if index:
            sys.stdin.readline()
        pids = {}
        for name, (run_dir, *args) in stage.items():
            sys.stdout.flush()
            pids[name] = os.fork() or run_forked(main, run_dir, args)
        print(json.dumps(pids), flush=True)
        codes = {name: os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for name, pid in pids.items()}
        print(json.dumps(codes), flush=True)


def run_forked(main: Callable[[list[str]], None], run_dir: str, args: list[str]) -> NoReturn:
    """``condconv-finetune fit --trainer.default_root_dir run_dir ...args``, output in ``run_dir/log.txt``; exits."""
    log = os.open(Path(run_dir) / "log.txt", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(log, 1)
    os.dup2(log, 2)
    code = 1
    try:
        main(["fit", f"--trainer.default_root_dir={run_dir}", *args])
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def assert_identical(a: Any, b: Any, where: str = "") -> None:
    """Equal structure, and bit-identical tensors (``torch.equal``) at every leaf."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_identical(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_identical(x, y, f"{where}/{i}")
    else:
        assert a == b, where


def final_state(run_dir: Path) -> dict[str, Any]:
    """Model, optimizer, scheduler and temperature state of the last checkpoint (not its run-specific paths)."""
    saved = torch.load(run_dir / "checkpoints" / f"step={MAX_STEPS}.ckpt", map_location="cpu", weights_only=False)
    assert saved["global_step"] == MAX_STEPS
    state = {key: saved[key] for key in ("state_dict", "optimizer_states", "lr_schedulers")}
    (temperature,) = [v for k, v in saved["callbacks"].items() if k.startswith("RoutingTemperatureScheduler")]
    return {**state, "temperature": temperature}


def epoch(loader: ResumableDataLoader, number: int) -> list[list[int]]:
    """The batches of epoch ``number``, as Lightning sets it."""
    loader.sampler.set_epoch(number)
    return [batch.tolist() for (batch,) in loader]


def test_order_depends_on_seed_and_epoch_and_resumes_mid_epoch() -> None:
    data = TensorDataset(torch.arange(24))
    loader = ResumableDataLoader(data, 4, EpochShuffleSampler(data, seed=3))
    first, second = epoch(loader, 0), epoch(loader, 1)
    assert first != second and epoch(loader, 0) == first
    assert (
        sorted(functools.reduce(operator.iadd, first, []))
        == sorted(functools.reduce(operator.iadd, second, []))
        == list(range(24))
    )
    # DDP: each rank a disjoint shard; at every step the ranks' batches together are the single-process batch.
    ranks = [epoch(ResumableDataLoader(data, 2, EpochShuffleSampler(data, 2, rank, seed=3)), 1) for rank in range(2)]
    assert [sorted(a + b) for a, b in zip(*ranks, strict=True)] == [sorted(batch) for batch in second]

    loader.sampler.set_epoch(1)
    batches = iter(loader)
    consumed = [next(batches)[0].tolist() for _ in range(2)]
    state = loader.state_dict()
    restored = ResumableDataLoader(data, 4, EpochShuffleSampler(data, seed=3))
    restored.load_state_dict(state)
    assert consumed + epoch(restored, 1) == second  # Lightning calls set_epoch with the same epoch mid-epoch
    restored.load_state_dict(state)
    assert epoch(restored, 2) == epoch(loader, 2)  # the position belongs to its epoch only


@pytest.mark.slow
def test_killed_and_resumed_runs_match_an_uninterrupted_one(tmp_path: Path) -> None:
    runs = {name: tmp_path / name for name in ("uninterrupted", "killed", "epoch_end")}
    for run_dir in runs.values():
        run_dir.mkdir()
    config = tmp_path / "config.yaml"  # not in a run's folder: the CLI saves each run's own config.yaml there
    config.write_text(json.dumps(CONFIG))  # JSON is YAML
    marker, checkpoints = tmp_path / "stalled", runs["killed"] / "checkpoints"
    stall = ["--trainer.callbacks+=test_lightning_resume.Stall", "--trainer.callbacks.step=6"]
    stall.append(f"--trainer.callbacks.marker={marker}")
    stages = [
        {"uninterrupted": [str(runs["uninterrupted"])], "killed": [str(runs["killed"]), *stall]},
        # Step 6 is halfway through epoch 1 (resumed in place, from last.ckpt); step 4 ends epoch 0 (resumed in a
        # new folder). Both then cross into epoch 2.
        {
            "mid_epoch": [str(runs["killed"]), f"--ckpt_path={checkpoints / 'last.ckpt'}"],
            "epoch_end": [str(runs["epoch_end"]), f"--ckpt_path={checkpoints / 'step=4.ckpt'}"],
        },
    ]
    for stage in stages:
        for run in stage.values():
            run.insert(1, f"--config={config}")
    pythonpath = os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1"}  # one thread: the same sums in every run
    command = [sys.executable, "-c", "import sys, test_lightning_resume as t; t.drive(sys.argv[1])", json.dumps(stages)]
    with open(tmp_path / "driver.txt", "w") as errors:
        pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "stderr": errors}
        driver = subprocess.Popen(command, env=env, text=True, start_new_session=True, **pipes)

    def report() -> dict[str, int]:
        line = driver.stdout.readline()
        assert line, "\n".join(log.read_text()[-3000:] for log in tmp_path.glob("**/*.txt"))
        return json.loads(line)

    with driver:
        try:
            pids = report()
            deadline = time.monotonic() + 120
            while not (marker.exists() and (checkpoints / "step=6.ckpt").exists()):
                assert driver.poll() is None and time.monotonic() < deadline, (runs["killed"] / "log.txt").read_text()
                time.sleep(0.05)
            os.kill(pids["killed"], signal.SIGKILL)
            assert report() == {"uninterrupted": 0, "killed": -signal.SIGKILL}
            assert torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 6
            assert not (checkpoints / "step=8.ckpt").exists()
            driver.stdin.write("\n")
            driver.stdin.flush()
            report()
            assert report() == {"mid_epoch": 0, "epoch_end": 0}
            assert driver.wait(timeout=60) == 0
        finally:
            if driver.poll() is None:
                os.killpg(driver.pid, signal.SIGKILL)  # the driver's process group: it and the runs it forked
    expected = final_state(runs["uninterrupted"])
    assert_identical(final_state(runs["killed"]), expected)
    assert_identical(final_state(runs["epoch_end"]), expected)
