"""Overhead of RoutingEntropyMonitor on a training step of the example model, measured side by side.

The example model is what ``condconv-finetune fit`` trains by default: ``resnet_tiny``
with ``layer3`` and ``layer4`` converted to CondConv (4 experts), on the synthetic
32x32 data. Runs with and without the monitor alternate in one process (same warm
caches, same thermal state); a step is timed from one ``on_train_batch_start`` to the
next, so it includes the forward (and the hooks in it), backward, optimizer, every
callback and the monitor's logging. The monitor logs every ``--log-every`` steps, with
one host read per log. Prints mean step times and their ratio; because two CPU
cores shared with other work make step times noisy by a few percent, it also prints
the time spent inside the monitor itself (its routing hooks and its logging, timed
in the same runs) as a share of the step: on a CPU there is no asynchronous work for
such timing to miss.

    python tools/bench_monitor.py --steps 60 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from typing import Any

import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.loggers import CSVLogger

from condconv_lightning.callbacks import CondConvConversion, RoutingEntropyMonitor
from condconv_lightning.demos import SyntheticImageDataModule
from condconv_lightning.finetune import ImageClassifier


class StepTimer(Callback):
    """Wall time between consecutive training batch starts (the last callback, so it sees everything)."""

    def __init__(self) -> None:
        self.starts: list[float] = []

    def on_train_batch_start(self, trainer: Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.starts.append(time.perf_counter())

    def on_train_end(self, trainer: Trainer, pl_module: Any) -> None:
        self.starts.append(time.perf_counter())

    def steps(self, warmup: int) -> list[float]:
        return [b - a for a, b in zip(self.starts, self.starts[1:])][warmup:]


class TimedMonitor(RoutingEntropyMonitor):
    """The monitor, with the wall time of its per-forward hook and of its logging added up."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds = 0.0

    def _record(self, *args: Any) -> None:
        start = time.perf_counter()
        super()._record(*args)
        self.seconds += time.perf_counter() - start

    def _log(self, *args: Any) -> None:
        start = time.perf_counter()
        super()._log(*args)
        self.seconds += time.perf_counter() - start


def run(monitor: bool, args: argparse.Namespace, folder: str) -> tuple[list[float], float]:
    torch.manual_seed(0)
    timer = StepTimer()
    callbacks: list[Callback] = [CondConvConversion(["layer3", "layer4"], submodule="model", seed=0, verbose=False)]
    timed = TimedMonitor()
    if monitor:
        callbacks.append(timed)
    trainer = Trainer(
        accelerator="cpu",
        max_steps=args.steps + args.warmup,
        log_every_n_steps=args.log_every,
        logger=CSVLogger(folder),
        limit_val_batches=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[*callbacks, timer],
    )
    data = SyntheticImageDataModule(batch_size=args.batch_size, train_size=args.batch_size * (args.steps + args.warmup))
    trainer.fit(ImageClassifier(), data)
    return timer.steps(args.warmup), timed.seconds / (args.steps + args.warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps at the start of each run")
    parser.add_argument("--repeats", type=int, default=5, help="pairs of runs (without, with monitor), alternating")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--log-every", type=int, default=10, help="Trainer log_every_n_steps (Lightning's default is 50)"
    )
    args = parser.parse_args()
    means: dict[bool, list[float]] = {False: [], True: []}
    inside: list[float] = []
    with tempfile.TemporaryDirectory() as folder:
        for _ in range(args.repeats):
            for monitor in (False, True):
                steps, monitor_seconds = run(monitor, args, folder)
                means[monitor].append(statistics.fmean(steps))
                if monitor:
                    inside.append(monitor_seconds)
    off, on = statistics.median(means[False]), statistics.median(means[True])
    print(
        f"device: cpu, torch threads: {torch.get_num_threads()}, batch {args.batch_size}, "
        f"{args.steps} steps x {args.repeats} repeats, log every {args.log_every}"
    )
    print(f"step without monitor: {1e3 * off:.2f} ms (runs: {', '.join(f'{1e3 * m:.1f}' for m in means[False])})")
    print(f"step with monitor:    {1e3 * on:.2f} ms (runs: {', '.join(f'{1e3 * m:.1f}' for m in means[True])})")
    print(f"ratio with/without: {on / off:.4f}  (overhead {100 * (on / off - 1):+.2f}%; target < +3%)")
    share = statistics.median(inside) / off
    print(
        f"time inside the monitor: {1e3 * statistics.median(inside):.3f} ms per step "
        f"= {100 * share:.2f}% of a step without it"
    )


if __name__ == "__main__":
    main()
