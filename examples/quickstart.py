"""Quickstart: the whole product on CPU in a few minutes, no downloads.

    python examples/quickstart.py [--quick] [--out runs/quickstart] [--seed 0]

1. trains ``resnet_tiny`` (stages ``layer1..layer4``) briefly on the built-in
   context-dependent gratings (:func:`condconv_lightning.finetune.make_context_gratings`:
   a global colour cast decides which grating gives the class, the kind of input on
   which CondConv's per-image kernels can help, Yang et al. 2019, arXiv:1904.04971) and
   saves its state dict as ``original.pt``;
2. converts it by running the real ``condconv-convert original.pt --layers layer3,layer4
   --arch condconv_lightning.demos:resnet_tiny`` command (weights + conversion spec out,
   no pickled code in either file);
3. fine-tunes the converted model with Lightning (``ImageClassifier`` +
   ``RoutingEntropyMonitor`` + ``CSVLogger``) with the library's defaults, the recipe the
   upcycling study (``tools/upcycling_study.py``) found no reason to change, and, as the
   control, the unconverted model for the same number of steps with the same optimizer
   and data order, printing progress as it goes;
4. prints a table (accuracy, parameters, training step time, routing entropy), writes
   ``routing_entropy.png`` (per-layer routing entropy over steps, from the CSV log),
   ``routing_heatmap.png`` (mean routing weight per context, class and expert) and
   ``summary.json`` into ``--out``.

Every number but the times is the same in every run on a machine: the seeds are fixed,
Lightning runs with ``deterministic=True``, and CondConv layers pick their strategy by
rules, not by timing (measured ``auto`` may pick another strategy in another run, whose
float rounding differs in the last bits, and training amplifies that).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import matplotlib
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn

from condconv_lightning import __version__
from condconv_lightning.callbacks import RoutingEntropyMonitor
from condconv_lightning.condconv2d import CondConv2d
from condconv_lightning.demos import SyntheticImageDataModule, make_context_gratings, resnet_tiny
from condconv_lightning.finetune import ImageClassifier
from condconv_lightning.functional import set_tuning
from condconv_lightning.io import atomic_write, save_state_dict

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt

ARCH = "condconv_lightning.demos:resnet_tiny"
LAYERS = "layer3,layer4"
CONTEXTS = ("warm", "cool")  # make_context_gratings: context 0 = warm cast (red grating counts), 1 = cool (blue)


@dataclass(frozen=True)
class QuickstartConfig:
    """The embedded configuration; ``--quick`` shrinks it for the test."""

    num_classes: int = 4
    image_size: int = 32
    noise: float = 2.0  # pixel noise (std) over gratings of amplitude 0.5: hard enough that neither run saturates
    train_size: int = 4096
    val_size: int = 1024
    probe_size: int = 1024  # held-out images with known context, for the routing heatmap
    batch_size: int = 64
    pretrain_steps: int = 120
    finetune_steps: int = 300
    num_experts: int = 4
    lr: float = 2e-3
    log_every: int = 10
    progress_every: int = 50  # print a progress line every this many steps
    seed: int = 0


DEFAULT = QuickstartConfig()
QUICK = replace(
    DEFAULT,
    image_size=16,
    train_size=256,
    val_size=64,
    probe_size=64,
    batch_size=32,
    pretrain_steps=8,
    finetune_steps=8,
    log_every=2,
    progress_every=4,
)


class Progress(Callback):
    """One line every ``every`` training steps (step, loss, elapsed time), so a long run never sits silent."""

    def __init__(self, console: Console, every: int, total: int) -> None:
        self.console, self.every, self.total = console, every, total
        self._start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step % self.every == 0 or step == self.total:
            loss = float(outputs["loss"]) if isinstance(outputs, dict) else float("nan")
            elapsed = time.perf_counter() - self._start
            self.console.print(f"  step {step:>4}/{self.total}  train_loss {loss:.3f}  {elapsed:5.0f} s")


class StepTimer(Callback):
    """Wall time of every training step (forward, backward, optimizer step), for the table's step time."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start = 0.0

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.seconds.append(time.perf_counter() - self._start)

    def median_ms(self) -> float:
        """Median over the steps after the first (which pays for one-off allocations)."""
        return 1e3 * statistics.median(self.seconds[1:] or self.seconds)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=Path("runs/quickstart"), help="folder for every artifact (default: runs/quickstart)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a reduced run (tiny data, a few steps) that checks the pipeline, not the result",
    )
    parser.add_argument(
        "--seed", type=int, default=DEFAULT.seed, help="seeds the data, the models and the training order (default: 0)"
    )
    args = parser.parse_args(argv)
    config = replace(QUICK if args.quick else DEFAULT, seed=args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    console = Console(highlight=False)
    warnings.filterwarnings("ignore", message=".*(does not have many workers|LeafSpec|Experiment logs directory).*")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # the steps below say what runs
    started = time.perf_counter()
    set_tuning(False)  # reproducible numbers: strategies by rules, not by timing (module docstring)

    data = SyntheticImageDataModule(
        config.num_classes,
        config.image_size,
        config.train_size,
        config.val_size,
        config.batch_size,
        config.noise,
        seed=config.seed,
    )
    console.rule(f"1. train resnet_tiny for {config.pretrain_steps} steps on context-dependent gratings")
    pl.seed_everything(config.seed, verbose=False)
    original = resnet_tiny(num_classes=config.num_classes)
    fit(
        ImageClassifier(original, num_classes=config.num_classes, optimizer=optimizer(config.lr)),
        data,
        config.pretrain_steps,
        config,
        console,
    )
    original_path = save_state_dict(original.state_dict(), args.out / "original.pt", overwrite=True)
    console.print(f"saved {original_path}")

    console.rule(f"2. condconv-convert --layers {LAYERS}")
    converted_path = args.out / "converted.pt"
    command = [
        sys.executable,
        "-m",
        "condconv_lightning.cli.convert",
        str(original_path),
        "--arch",
        ARCH,
        "--arch-kwargs",
        json.dumps({"num_classes": config.num_classes}),
        "--layers",
        LAYERS,
        "--num-experts",
        str(config.num_experts),
        "--seed",
        str(config.seed),
        "--input-shape",
        f"2,3,{config.image_size},{config.image_size}",
        "-o",
        str(converted_path),
        "--force",
    ]
    console.print("$ condconv-convert " + shlex.join(command[3:]), soft_wrap=True)
    subprocess.run(command, check=True)

    results: dict[str, dict[str, Any]] = {}
    for name in ("condconv", "baseline"):
        console.rule(
            f"3. fine-tune the {'converted' if name == 'condconv' else 'unconverted'} model "
            f"for {config.finetune_steps} steps"
        )
        pl.seed_everything(config.seed + 1, verbose=False)  # the same data order for both runs
        model = resnet_tiny(num_classes=config.num_classes)
        if name == "condconv":
            module = ImageClassifier(
                model,
                weights=converted_path,
                num_classes=config.num_classes,
                optimizer=optimizer(config.lr),
            )
        else:
            model.load_state_dict(torch.load(original_path, weights_only=True))
            module = ImageClassifier(model, num_classes=config.num_classes, optimizer=optimizer(config.lr))
        timer = StepTimer()
        logger = CSVLogger(args.out, name="logs", version=name)
        start_acc = validate(module, data, config)
        callbacks = [timer, RoutingEntropyMonitor()] if name == "condconv" else [timer]
        trainer = fit(module, data, config.finetune_steps, config, console, callbacks, logger)
        final = trainer.validate(module, datamodule=data, verbose=False)[0]
        results[name] = {
            "val_acc_before": start_acc,
            "val_acc": final["val_acc"],
            "val_loss": final["val_loss"],
            "parameters": sum(p.numel() for p in module.model.parameters()),
            "step_ms": timer.median_ms(),
            "metrics_csv": str(Path(logger.log_dir) / "metrics.csv"),
        }
        logged = read_logged(Path(logger.log_dir) / "metrics.csv")
        # RoutingEntropyMonitor writes to the loggers, so the final validation's value is the CSV's last.
        results[name]["val_routing_entropy"] = (
            logged["val_routing/entropy"][1][-1] if "val_routing/entropy" in logged else None
        )
        if name == "condconv":
            converted_model = module.model

    console.rule("4. results")
    probe = make_context_gratings(
        config.probe_size,
        config.num_classes,
        config.image_size,
        config.noise,
        generator=torch.Generator().manual_seed(config.seed + 2),
    )
    routing = routing_by_group(converted_model, probe, config)
    plot_entropy(
        entropy_curves(read_logged(Path(results["condconv"]["metrics_csv"]))), args.out / "routing_entropy.png"
    )
    plot_heatmaps(routing, config, args.out / "routing_heatmap.png")
    console.print(results_table(results, config))
    summary = {
        "condconv_lightning": __version__,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads",
        "config": asdict(config),
        "mode": "quick" if args.quick else "default",
        "converted_layers": list(routing),
        "results": results,
        "routing_by_context_class": {layer: table.tolist() for layer, table in routing.items()},
        "seconds": time.perf_counter() - started,
        "load_average_1min_at_end": os.getloadavg()[0],  # step times mean little if other jobs shared the cores
    }
    with atomic_write(args.out / "summary.json", overwrite=True) as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
    console.print(
        f"wrote {args.out / 'routing_entropy.png'}, {args.out / 'routing_heatmap.png'} and {args.out / 'summary.json'} "
        f"in {summary['seconds']:.0f} s"
    )
    return 0


def optimizer(lr: float) -> Any:
    """AdamW at ``lr``, the same for every run so that only the conversion differs."""
    return lambda params: torch.optim.AdamW(params, lr=lr)


def trainer_for(
    config: QuickstartConfig, max_steps: int = -1, callbacks: Sequence[Callback] = (), logger: Any = False
) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        max_epochs=-1,
        callbacks=list(callbacks),
        logger=logger,
        log_every_n_steps=config.log_every,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=True,
    )


def fit(
    module: ImageClassifier,
    data: SyntheticImageDataModule,
    steps: int,
    config: QuickstartConfig,
    console: Console,
    callbacks: Sequence[Callback] = (),
    logger: Any = False,
) -> pl.Trainer:
    progress = Progress(console, config.progress_every, steps)
    trainer = trainer_for(config, steps, [*callbacks, progress], logger)
    trainer.fit(module, datamodule=data)
    return trainer


def validate(module: ImageClassifier, data: SyntheticImageDataModule, config: QuickstartConfig) -> float:
    return trainer_for(config).validate(module, datamodule=data, verbose=False)[0]["val_acc"]


@torch.no_grad()
def routing_by_group(
    model: nn.Module, probe: tuple[Tensor, Tensor, Tensor, Tensor], config: QuickstartConfig
) -> dict[str, Tensor]:
    """Mean routing weight ``[contexts * classes, K]`` of every CondConv2d over the probe images.

    Row ``context * num_classes + label``; the routing comes from the layer's own
    forward through :meth:`CondConv2d.register_routing_hook`.
    """
    images, labels, contexts, _ = probe
    groups = contexts * config.num_classes + labels
    num_groups = len(CONTEXTS) * config.num_classes
    layers = {name: layer for name, layer in model.named_modules() if isinstance(layer, CondConv2d)}
    sums = {name: torch.zeros(num_groups, layer.num_experts, dtype=torch.float64) for name, layer in layers.items()}
    batch_groups: list[Tensor] = []

    def record(name: str, layer: CondConv2d, routing: Tensor) -> None:
        sums[name].index_add_(0, batch_groups[0], routing.double())

    handles = [
        layer.register_routing_hook(lambda layer, routing, name=name: record(name, layer, routing))
        for name, layer in layers.items()
    ]
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(images), config.batch_size):
            batch_groups[:] = [groups[start : start + config.batch_size]]
            model(images[start : start + config.batch_size])
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    counts = torch.bincount(groups, minlength=num_groups).clamp(min=1).double()[:, None]
    return {name: total / counts for name, total in sums.items()}


def read_logged(metrics_csv: Path) -> dict[str, tuple[list[int], list[float]]]:
    """Every column of a CSVLogger file as ``{name: (steps, values)}``, rows without a value left out."""
    logged: dict[str, tuple[list[int], list[float]]] = {}
    with metrics_csv.open(newline="") as handle:
        for row in csv.DictReader(handle):
            for column, value in row.items():
                if column != "step" and value:
                    steps, values = logged.setdefault(column, ([], []))
                    steps.append(int(row["step"]))
                    values.append(float(value))
    return logged


def entropy_curves(logged: dict[str, tuple[list[int], list[float]]]) -> dict[str, tuple[list[int], list[float]]]:
    """``{layer: (steps, entropies)}``: the training routing entropy RoutingEntropyMonitor logged per layer."""
    curves = {
        name.split("/")[1]: curve
        for name, curve in logged.items()
        if name.startswith("routing/") and name.endswith("/entropy") and name.count("/") == 2
    }
    if not curves:
        raise RuntimeError(
            "the fine-tune's CSV log holds no routing/<layer>/entropy columns; RoutingEntropyMonitor logged nothing"
        )
    return curves


def plot_entropy(curves: dict[str, tuple[list[int], list[float]]], path: Path) -> None:
    figure, axis = plt.subplots(figsize=(7, 4), dpi=110)
    for layer, (steps, values) in curves.items():
        axis.plot(steps, values, marker="o", markersize=3, label=layer.removeprefix("model."))
    axis.set(
        xlabel="training step",
        ylabel="routing entropy (normalized, 1 = uniform)",
        title="Per-sample routing entropy while fine-tuning",
    )
    axis.ticklabel_format(axis="y", useOffset=False)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    save_figure(figure, path)


def plot_heatmaps(routing: dict[str, Tensor], config: QuickstartConfig, path: Path) -> None:
    columns = min(3, len(routing))
    rows = math.ceil(len(routing) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 3.4 * rows), dpi=110, squeeze=False)
    labels = [f"{context} / class {c}" for context in CONTEXTS for c in range(config.num_classes)]
    for axis, (layer, table) in zip(axes.flat, routing.items()):
        image = axis.imshow(table.numpy(), aspect="auto", cmap="viridis")
        axis.set_title(layer.removeprefix("model."), fontsize=9)
        axis.set_xticks(range(table.shape[1]), [f"e{k}" for k in range(table.shape[1])], fontsize=8)
        axis.set_yticks(range(len(labels)), labels, fontsize=7)
        figure.colorbar(image, ax=axis, fraction=0.046)
    for axis in list(axes.flat)[len(routing) :]:
        axis.axis("off")
    figure.suptitle("Mean routing weight per context, class (rows) and expert (columns)", fontsize=10)
    save_figure(figure, path)


def save_figure(figure: Any, path: Path) -> None:
    figure.tight_layout()
    with atomic_write(path, overwrite=True) as tmp:
        figure.savefig(tmp, format="png")
    plt.close(figure)


def results_table(results: dict[str, dict[str, Any]], config: QuickstartConfig) -> Table:
    table = Table(
        title=f"{config.finetune_steps} fine-tuning steps after {config.pretrain_steps} training steps; "
        f"validation on {config.val_size} images"
    )
    for column in ("model", "acc before", "acc after", "params", "step time", "routing entropy"):
        table.add_column(column, justify="left" if column == "model" else "right")
    names = {"condconv": f"CondConv K={config.num_experts}", "baseline": "unconverted"}
    for name, result in results.items():
        entropy = result["val_routing_entropy"]
        table.add_row(
            names[name],
            f"{result['val_acc_before']:.3f}",
            f"{result['val_acc']:.3f}",
            f"{result['parameters']:,}",
            f"{result['step_ms']:.1f} ms",
            "-" if entropy is None else f"{entropy:.3f}",
        )
    return table


if __name__ == "__main__":
    sys.exit(main())
