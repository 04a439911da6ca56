"""Two-process DDP fine-tuning on CPU (gloo) through ``condconv-finetune``, end to end.

Uses ``examples/configs/ddp_cpu.yaml`` as shipped (conversion, temperature scheduler,
routing monitor, checkpointing), shrunk by command-line overrides, plus ``RankSnapshot``
below to record every rank's parameters. A second run resumes from the checkpoint.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from condconv_lightning import CondConv2d

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "configs" / "ddp_cpu.yaml"


class RankSnapshot(Callback):
    """Saves each rank's step, parameters and routing temperature at train start and end."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)

    def _save(self, trainer: Trainer, pl_module: LightningModule, when: str) -> None:
        temperatures = [float(m.temperature) for m in pl_module.modules() if isinstance(m, CondConv2d)]
        snapshot = {
            "step": trainer.global_step,
            "params": {k: v.detach().clone() for k, v in pl_module.named_parameters()},
            "state": {k: v.detach().clone() for k, v in pl_module.state_dict().items()},
            "temperatures": temperatures,
        }
        torch.save(snapshot, self.folder / f"{when}_rank{trainer.global_rank}.pt")

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._save(trainer, pl_module, "start")

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._save(trainer, pl_module, "end")


def finetune(workdir: Path, snapshots: Path, max_steps: int, *extra: str) -> str:
    snapshots.mkdir()
    command = [
        sys.executable, "-m", "condconv_lightning.cli.finetune", "fit", "--config", str(CONFIG),
        f"--trainer.max_steps={max_steps}", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        "--trainer.callbacks+=test_lightning_ddp.RankSnapshot", f"--trainer.callbacks.folder={snapshots}",
        "--data.init_args.train_size=32", "--data.init_args.val_size=16", "--data.init_args.batch_size=8",
        "--data.init_args.image_size=16", *extra,
    ]  # fmt: skip
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    done = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stderr


def load(path: Path) -> dict[str, Any]:
    return torch.load(path, weights_only=True)


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
def test_two_process_ddp_finetune_logs_checkpoints_and_resumes(tmp_path: Path) -> None:
    # 32 images / 2 ranks / batch 8 = 2 steps per epoch: 4 steps are two epochs, each checkpointed.
    stderr = finetune(tmp_path, tmp_path / "first", max_steps=4)
    assert "sync_dist=True" not in stderr, "routing values are reduced already: no warning a user cannot act on"
    ranks = [load(tmp_path / "first" / f"end_rank{r}.pt") for r in range(2)]
    assert ranks[0]["step"] == ranks[1]["step"] == 4
    # Parameters, not buffers: without SyncBatchNorm each rank's BatchNorm statistics see its own last batch.
    assert_same_state(ranks[0]["params"], ranks[1]["params"])
    start = load(tmp_path / "first" / "start_rank0.pt")
    assert any(k.endswith("router.weight") for k in ranks[0]["state"]), "the conversion callback converted the model"
    changed = [
        k
        for k in start["state"]
        if k.endswith("router.weight") and not torch.equal(start["state"][k], ranks[0]["state"][k])
    ]
    assert changed, "the optimizer updated the routers created by the conversion"
    assert ranks[0]["temperatures"] == pytest.approx([30.0 - 29.0 * 1 / 4] * 6)  # epoch 1 of a 4-epoch 30 -> 1 schedule

    (log_dir,) = (tmp_path / "lightning_logs").iterdir()
    with open(log_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    routing = {k: float(v) for row in rows for k, v in row.items() if k.startswith(("routing/", "val_routing/")) and v}
    assert "routing/entropy" in routing and "val_routing/entropy" in routing
    assert any(k.startswith("routing/model.layer4.0.conv2/expert_") for k in routing)
    assert all(0.0 <= v <= 1.0 for v in routing.values()), routing

    checkpoint = log_dir / "checkpoints" / "last.ckpt"
    assert checkpoint.is_file()
    saved = torch.load(checkpoint, weights_only=False, map_location="cpu")
    assert saved["global_step"] == 4

    finetune(tmp_path, tmp_path / "resumed", 6, f"--ckpt_path={checkpoint}")
    for rank in range(2):
        resumed = load(tmp_path / "resumed" / f"start_rank{rank}.pt")
        assert resumed["step"] == 4
        assert_same_state(resumed["state"], ranks[0]["state"])
        assert resumed["temperatures"] == ranks[0]["temperatures"]
    ends = [load(tmp_path / "resumed" / f"end_rank{r}.pt") for r in range(2)]
    assert ends[0]["step"] == ends[1]["step"] == 6
    assert_same_state(ends[0]["params"], ends[1]["params"])
