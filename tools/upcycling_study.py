"""Multi-seed upcycling study: does converting a trained CNN to CondConv pay, and with which options?

    python tools/upcycling_study.py [--quick] [--seeds N] [--tasks gratings,digits] [--variants a,b,...] [--out DIR]

Protocol (per task and seed): pre-train a narrow static ResNet for ``pretrain_steps``,
then, from that same state and with the same batches in the same order, fine-tune
every variant for ``steps`` AdamW steps: the static model itself (the control) and
copies converted with :func:`condconv_lightning.surgery.convert` under different
options (perturbation, router initialization and learning rate, routing and
temperature schedule, K, which layers, what trains). Every ``eval_every`` steps the
validation accuracy is recorded; each step is timed, so variants are compared at
equal steps and at equal wall-clock (the accuracy a variant reaches within the static
model's fine-tuning time). At the end, routing statistics on the validation images:
per-sample and usage entropy and how differently the sub-populations (contexts of the
gratings, classes of the digits) are routed.

Tasks: ``gratings`` (:func:`condconv_lightning.demos.make_multicontext_gratings`: the
right filter depends on a global colour cast) and ``digits`` (scikit-learn's bundled
8x8 handwritten digits, upsampled; a real-image control with no context structure).

Writes ``results.json`` (every run), ``summary.md`` (tables) and the plots
``accuracy_vs_steps_<task>.png``, ``accuracy_vs_time_<task>.png`` and
``delta_vs_static_<task>.png`` (paired difference to the control) into ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from condconv_lightning import __version__
from condconv_lightning.callbacks import RoutingTemperatureScheduler
from condconv_lightning.condconv2d import CondConv2d
from condconv_lightning.demos import ResNet, make_multicontext_gratings
from condconv_lightning.finetune import parameter_groups
from condconv_lightning.io import atomic_write
from condconv_lightning.metrics import RoutingEntropy
from condconv_lightning.surgery import ConversionConfig, convert

matplotlib.use("Agg")  # files only
import matplotlib.pyplot as plt

ROUTER_RANDOM_STD = 0.1
"""Std of the ``router_random`` variant's Gaussian router weights: about ``nn.Linear``'s init scale at 32 inputs."""


@dataclass(frozen=True)
class StudyConfig:
    """Sizes of a run; ``--quick`` shrinks them to a pipeline check."""

    widths: tuple[int, ...] = (4, 8, 8, 16)  # a narrow ResNet (1 basic block per stage): capacity-limited
    image_size: int = 16
    batch_size: int = 64
    lr: float = 2e-3
    pretrain_steps: int = 400
    steps: int = 400
    eval_every: int = 25
    anneal_fraction: float = 1 / 3  # softmax temperature 30 -> 1 over this fraction of the fine-tuning steps
    gratings_classes: int = 6
    gratings_contexts: int = 6
    gratings_noise: float = 0.5
    gratings_train: int = 8192
    gratings_val: int = 1024
    digits_val: int = 497  # of 1797: 1300 training images
    seeds: int = 5


FULL = StudyConfig()
QUICK = dataclasses.replace(
    FULL, pretrain_steps=12, steps=12, eval_every=4, gratings_train=512, gratings_val=256, digits_val=256, seeds=2
)


@dataclass(frozen=True)
class Variant:
    """One way to continue from the pre-trained static model; ``convert=False`` is the control."""

    description: str
    convert: bool = True
    layers: tuple[str, ...] = ("layer3", "layer4")
    num_experts: int = 4
    routing: str = "sigmoid"
    perturbation: float = 0.05
    router_init_std: float = 0.0
    router_lr_multiplier: float = 1.0
    anneal: bool = False
    freeze_base: bool = False


VARIANTS: dict[str, Variant] = {
    "static": Variant("unconverted model, fine-tuned on (control)", convert=False),
    "default": Variant("library defaults: sigmoid, K=4, perturbation 0.05, zero router, router lr 1x; layer3+layer4"),
    "perturb_0": Variant("perturbation 0 (identical experts)", perturbation=0.0),
    "perturb_0.2": Variant("perturbation 0.2", perturbation=0.2),
    "perturb_0.5": Variant("perturbation 0.5", perturbation=0.5),
    "router_random": Variant(
        f"router weights ~ N(0, {ROUTER_RANDOM_STD}^2) instead of zero (not exact)", router_init_std=ROUTER_RANDOM_STD
    ),
    "router_lr_10x": Variant("router learning rate 10x the base", router_lr_multiplier=10.0),
    "softmax": Variant("softmax routing, temperature 1", routing="softmax"),
    "softmax_anneal": Variant(
        "softmax routing, temperature 30 -> 1 (DynamicConv schedule)", routing="softmax", anneal=True
    ),
    "k8": Variant("K=8 experts", num_experts=8),
    "layer4": Variant("convert layer4 only", layers=("layer4",)),
    "layer2-4": Variant("convert layer2, layer3 and layer4", layers=("layer2", "layer3", "layer4")),
    "experts_only": Variant("train experts and routers only (the rest frozen)", freeze_base=True),
    "combined": Variant(
        "softmax routing, random router (not exact), router lr 10x, perturbation 0.5: every symmetry breaker at once",
        routing="softmax",
        router_init_std=ROUTER_RANDOM_STD,
        router_lr_multiplier=10.0,
        perturbation=0.5,
    ),
}
QUICK_VARIANTS = ("static", "default", "router_random", "softmax_anneal")


@dataclass
class Task:
    """A classification task held in memory; ``groups`` are the sub-populations whose routing is compared."""

    name: str
    description: str
    num_classes: int
    train_x: Tensor
    train_y: Tensor
    val_x: Tensor
    val_y: Tensor
    val_groups: Tensor
    group_name: str


def gratings_task(config: StudyConfig) -> Task:
    generator = torch.Generator().manual_seed(0)
    args = (config.gratings_classes, config.gratings_contexts, config.image_size, config.gratings_noise)
    train_x, train_y, _, _ = make_multicontext_gratings(config.gratings_train, *args, generator=generator)
    val_x, val_y, val_contexts, _ = make_multicontext_gratings(config.gratings_val, *args, generator=generator)
    return Task(
        "gratings",
        f"make_multicontext_gratings: {config.gratings_classes} classes, {config.gratings_contexts} contexts, "
        f"{config.image_size}x{config.image_size}, noise {config.gratings_noise}; "
        f"{config.gratings_train} training / {config.gratings_val} validation images",
        config.gratings_classes,
        train_x,
        train_y,
        val_x,
        val_y,
        val_contexts,
        "context",
    )


def digits_task(config: StudyConfig) -> Task:
    """scikit-learn's bundled 8x8 digits (1797 images, no download), bilinearly upsampled, gray in 3 channels."""
    from sklearn.datasets import load_digits  # only this task needs scikit-learn

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    images = F.interpolate(images, size=config.image_size, mode="bilinear", align_corners=False).expand(-1, 3, -1, -1)
    labels = torch.tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    val, train = order[: config.digits_val], order[config.digits_val :]
    mean, std = images[train].mean(), images[train].std()
    images = ((images - mean) / std).contiguous()
    return Task(
        "digits",
        f"scikit-learn load_digits (UCI handwritten digits, 8x8 gray, 10 classes) upsampled to "
        f"{config.image_size}x{config.image_size}, 3 channels; {len(train)} training / {len(val)} validation images",
        10,
        images[train],
        labels[train],
        images[val],
        labels[val],
        labels[val],
        "class",
    )


TASKS = {"gratings": gratings_task, "digits": digits_task}
PLURAL = {"context": "contexts", "class": "classes"}


def build_model(config: StudyConfig, num_classes: int) -> nn.Module:
    return ResNet((1,) * len(config.widths), config.widths, num_classes)


def batch_order(num_samples: int, steps: int, batch_size: int, seed: int) -> Tensor:
    """``[steps, batch]`` training indices: epoch-wise permutations from one seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    epochs = -(-steps * batch_size // num_samples) + 1
    flat = torch.cat([torch.randperm(num_samples, generator=generator) for _ in range(epochs)])
    return flat[: steps * batch_size].view(steps, batch_size)


@torch.no_grad()
def logits_of(model: nn.Module, images: Tensor, batch_size: int = 512) -> Tensor:
    was_training = model.training
    model.eval()
    try:
        return torch.cat([model(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])
    finally:
        model.train(was_training)


def accuracy(model: nn.Module, task: Task) -> float:
    return float((logits_of(model, task.val_x).argmax(1) == task.val_y).float().mean())


def train_accuracy(model: nn.Module, task: Task, limit: int = 1024) -> float:
    """Accuracy on the first ``limit`` training images: close to the validation accuracy means underfitting."""
    return float((logits_of(model, task.train_x[:limit]).argmax(1) == task.train_y[:limit]).float().mean())


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, images: Tensor, labels: Tensor) -> float:
    loss = F.cross_entropy(model(images), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def pretrain(task: Task, config: StudyConfig, seed: int) -> tuple[nn.Module, dict[str, Any]]:
    """The static model every variant of this seed starts from."""
    torch.manual_seed(seed)
    model = build_model(config, task.num_classes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr)
    order = batch_order(len(task.train_y), config.pretrain_steps, config.batch_size, seed=1000 + seed)
    started = time.perf_counter()
    for indices in order:
        train_step(model, optimizer, task.train_x[indices], task.train_y[indices])
    seconds = time.perf_counter() - started
    return model, {"val_acc": accuracy(model, task), "train_acc": train_accuracy(model, task), "seconds": seconds}


def convert_variant(model: nn.Module, variant: Variant, seed: int) -> None:
    """Convert with the library; a random router init is drawn afterwards (the library's upcycling is exact)."""
    config = ConversionConfig(
        num_experts=variant.num_experts, routing=variant.routing, perturbation=variant.perturbation, seed=seed
    )
    convert(model, list(variant.layers), config)
    if variant.router_init_std > 0:
        generator = torch.Generator().manual_seed(2000 + seed)
        with torch.no_grad():
            for layer in condconv_layers(model):
                layer.router.weight.normal_(0.0, variant.router_init_std, generator=generator)


def condconv_layers(model: nn.Module) -> list[CondConv2d]:
    return [m for m in model.modules() if isinstance(m, CondConv2d)]


def fine_tune(
    task: Task, config: StudyConfig, seed: int, name: str, variant: Variant, pretrained: nn.Module, reference: Tensor
) -> dict[str, Any]:
    """One run: convert a copy of ``pretrained`` as ``variant`` says, measure step 0, fine-tune, measure."""
    torch.manual_seed(seed)
    model = copy.deepcopy(pretrained)
    if variant.convert:
        convert_variant(model, variant, seed)
    logits = logits_of(model, task.val_x)
    step0 = {
        "val_acc": float((logits.argmax(1) == task.val_y).float().mean()),
        "max_rel_diff": float((logits - reference).abs().max() / reference.abs().max()),
    }
    layers = condconv_layers(model)
    if variant.freeze_base:
        trainable = {id(p) for layer in layers for p in layer.parameters()}
        for parameter in model.parameters():
            parameter.requires_grad_(id(parameter) in trainable)
    groups = parameter_groups(model, router_lr=config.lr * variant.router_lr_multiplier)
    optimizer = torch.optim.AdamW(groups, lr=config.lr)
    schedule = (
        RoutingTemperatureScheduler(30.0, 1.0, max(1, round(config.steps * config.anneal_fraction)), interval="step")
        if variant.anneal
        else None
    )
    order = batch_order(len(task.train_y), config.steps, config.batch_size, seed=5000 + seed)
    curve_steps, curve_acc, step_seconds = [0], [step0["val_acc"]], []
    for step, indices in enumerate(order):
        if schedule is not None:
            for layer in layers:
                layer.set_temperature(schedule.temperature_at(step))
        started = time.perf_counter()
        train_step(model, optimizer, task.train_x[indices], task.train_y[indices])
        step_seconds.append(time.perf_counter() - started)
        if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
            curve_steps.append(step + 1)
            curve_acc.append(accuracy(model, task))
    return {
        "task": task.name,
        "variant": name,
        "seed": seed,
        "step0": step0,
        "curve": {"steps": curve_steps, "val_acc": curve_acc},
        "final_val_acc": curve_acc[-1],
        "final_train_acc": train_accuracy(model, task),
        "step_ms_median": 1e3 * statistics.median(step_seconds[1:] or step_seconds),  # the first step tunes `auto`
        "params": sum(p.numel() for p in model.parameters()),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "routing": routing_statistics(model, task) if layers else None,
    }


@torch.no_grad()
def routing_statistics(model: nn.Module, task: Task) -> dict[str, Any]:
    """Routing on the validation images: entropies (RoutingEntropy) and how far apart the groups are routed.

    ``group_tv``: per layer, the mean over pairs of groups of the total-variation distance between the groups'
    mean routing distributions (0: every group routed alike; 1: disjoint experts), then the mean over layers.
    """
    layers = {name: m for name, m in model.named_modules() if isinstance(m, CondConv2d)}
    metrics = {name: RoutingEntropy(layer.num_experts) for name, layer in layers.items()}
    num_groups = int(task.val_groups.max()) + 1
    sums = {name: torch.zeros(num_groups, layer.num_experts, dtype=torch.float64) for name, layer in layers.items()}
    current: list[Tensor] = []

    def record(name: str, routing: Tensor) -> None:
        metrics[name].update(routing)
        sums[name].index_add_(0, current[0], routing.double())

    handles = [
        layer.register_routing_hook(lambda _, routing, name=name: record(name, routing))
        for name, layer in layers.items()
    ]
    model.eval()
    try:
        for start in range(0, len(task.val_y), 512):
            current[:] = [task.val_groups[start : start + 512]]
            model(task.val_x[start : start + 512])
    finally:
        for handle in handles:
            handle.remove()
    counts = torch.bincount(task.val_groups, minlength=num_groups).double()[:, None]
    per_layer: dict[str, dict[str, float]] = {}
    for name in layers:
        values = metrics[name].compute()
        means = sums[name][counts[:, 0] > 0] / counts[counts[:, 0] > 0]
        distributions = means / means.sum(dim=1, keepdim=True)
        tv = 0.5 * (distributions[:, None] - distributions[None]).abs().sum(-1)
        pairs = len(distributions) * (len(distributions) - 1)
        per_layer[name] = {
            "entropy": float(values["entropy"]),
            "usage_entropy": float(values["usage_entropy"]),
            "group_tv": float(tv.sum() / pairs) if pairs else 0.0,
        }
    return {
        key: statistics.fmean(layer[key] for layer in per_layer.values())
        for key in ("entropy", "usage_entropy", "group_tv")
    } | {"per_layer": per_layer}


def accuracy_within(run: dict[str, Any], budget_ms: float) -> float:
    """Validation accuracy at the last evaluation the run reached within ``budget_ms`` of training time."""
    curve = run["curve"]
    return [acc for s, acc in zip(curve["steps"], curve["val_acc"]) if s * run["step_ms_median"] <= budget_ms][-1]


def add_wall_clock(runs: list[dict[str, Any]], steps: int) -> None:
    """``acc_at_static_time`` and ``step_time_ratio`` of every run, against the static run of its task and seed."""
    static = {(r["task"], r["seed"]): r for r in runs if r["variant"] == "static"}
    for run in runs:
        control = static.get((run["task"], run["seed"]))
        if control is None:
            continue
        run["step_time_ratio"] = run["step_ms_median"] / control["step_ms_median"]
        run["acc_at_static_time"] = accuracy_within(run, steps * control["step_ms_median"])


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "condconv_lightning": __version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "load_average_1min": os.getloadavg()[0],
    }


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summary_rows(runs: list[dict[str, Any]], task: str, variants: Sequence[str]) -> list[dict[str, Any]]:
    """Per variant: aggregates over seeds, and the paired difference to the static run of the same seed."""
    static = {r["seed"]: r for r in runs if r["task"] == task and r["variant"] == "static"}
    rows = []
    for name in variants:
        chosen = [r for r in runs if r["task"] == task and r["variant"] == name]
        if not chosen:
            continue
        final = [r["final_val_acc"] for r in chosen]
        paired = [r["final_val_acc"] - static[r["seed"]]["final_val_acc"] for r in chosen if r["seed"] in static]
        paired_at_time = [
            r["acc_at_static_time"] - static[r["seed"]]["final_val_acc"] for r in chosen if r["seed"] in static
        ]
        routing = [r["routing"] for r in chosen if r["routing"] is not None]
        rows.append(
            {
                "variant": name,
                "seeds": len(chosen),
                "final": mean_std(final),
                "range": (min(final), max(final)),
                "train": statistics.fmean(r["final_train_acc"] for r in chosen),
                "paired": mean_std(paired) if paired else None,
                "wins": sum(d > 0 for d in paired),
                "at_static_time": mean_std([r["acc_at_static_time"] for r in chosen if "acc_at_static_time" in r]),
                "paired_at_static_time": mean_std(paired_at_time) if paired_at_time else None,
                "step_ratio": statistics.fmean(r.get("step_time_ratio", float("nan")) for r in chosen),
                "step_ms": statistics.fmean(r["step_ms_median"] for r in chosen),
                "params": chosen[0]["params"],
                "step0_acc": statistics.fmean(r["step0"]["val_acc"] for r in chosen),
                "step0_diff": max(r["step0"]["max_rel_diff"] for r in chosen),
                "entropy": statistics.fmean(x["entropy"] for x in routing) if routing else None,
                "usage_entropy": statistics.fmean(x["usage_entropy"] for x in routing) if routing else None,
                "group_tv": statistics.fmean(x["group_tv"] for x in routing) if routing else None,
            }
        )
    return rows


def summary_markdown(results: dict[str, Any]) -> str:
    config = results["config"]
    info = results["machine"]
    lines = [
        "# Upcycling study",
        "",
        f"{info['date']}; {info['platform']}, {info['cpu_count']} CPUs, {info['torch_threads']} torch thread(s), "
        f"torch {info['torch']}; mode {results['mode']}; {results['seconds'] / 60:.1f} min in all.",
        f"Per seed: {config['pretrain_steps']} pre-training steps of the static model, then {config['steps']} "
        f"fine-tuning steps per variant (AdamW lr {config['lr']}, batch {config['batch_size']}), same batches.",
        "",
    ]
    for task, about in results["tasks"].items():
        pre = [p["val_acc"] for p in about["pretrain"].values()]
        pre_train = statistics.fmean(p["train_acc"] for p in about["pretrain"].values())
        lines += [
            f"## {task}",
            "",
            f"{about['description']}. Pre-trained static model: val acc {statistics.fmean(pre):.3f} "
            f"(seeds {', '.join(f'{v:.3f}' for v in pre)}), train acc {pre_train:.3f}. "
            f"Routing difference between {PLURAL[about['groups']]}: mean total-variation distance between their "
            "mean routing distributions (0 = routed alike).",
            "",
            "| variant | final val acc (mean ± std) | min-max | train acc | Δ vs static, paired | beats static | "
            "acc at static's wall-clock | step time vs static | params | step-0 acc | step-0 max rel. diff | "
            f"routing entropy | usage entropy | {about['groups']} routing difference |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in summary_rows(results["runs"], task, results["variants_run"]):
            control = row["variant"] == "static"
            paired = "-" if control or row["paired"] is None else "{:+.3f} ± {:.3f}".format(*row["paired"])
            wins = "-" if control else f"{row['wins']}/{row['seeds']}"
            at_time = "" if control or row["paired_at_static_time"] is None else " (Δ {:+.3f} ± {:.3f})"
            at_time = at_time.format(*row["paired_at_static_time"]) if at_time else ""
            cells = [
                row["variant"],
                "{:.3f} ± {:.3f}".format(*row["final"]),
                "{:.3f}-{:.3f}".format(*row["range"]),
                f"{row['train']:.3f}",
                paired,
                wins,
                "{:.3f} ± {:.3f}".format(*row["at_static_time"]) + at_time,
                f"{row['step_ratio']:.2f}x ({row['step_ms']:.1f} ms)",
                f"{row['params']:,}",
                f"{row['step0_acc']:.3f}",
                f"{row['step0_diff']:.1e}",
                *("-" if row[key] is None else f"{row[key]:.3f}" for key in ("entropy", "usage_entropy", "group_tv")),
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Variants", ""]
    lines += [f"- `{name}`: {results['variants'][name]['description']}" for name in results["variants_run"]]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], task: str, out: Path) -> list[Path]:
    """Per variant, mean over seeds (line) and min-max (band): accuracy over steps and over time, and the paired
    difference to the static run of the same seed over steps (seed-to-seed spread of the pre-trained model cancels).
    """
    runs = [r for r in results["runs"] if r["task"] == task]
    names = [n for n in results["variants_run"] if any(r["variant"] == n for r in runs)]
    static = {r["seed"]: r for r in runs if r["variant"] == "static"}
    colours = plt.get_cmap("tab20")
    paths = []
    for kind in ("steps", "time", "delta"):
        figure, axis = plt.subplots(figsize=(9, 5.5), dpi=110)
        for index, name in enumerate(names):
            chosen = [r for r in runs if r["variant"] == name and (kind != "delta" or r["seed"] in static)]
            if kind == "delta" and (name == "static" or not chosen):
                continue
            acc = torch.tensor([r["curve"]["val_acc"] for r in chosen])
            if kind == "delta":
                acc = acc - torch.tensor([static[r["seed"]]["curve"]["val_acc"] for r in chosen])
            x = torch.tensor(chosen[0]["curve"]["steps"], dtype=torch.float64)
            if kind == "time":
                x = x * statistics.fmean(r["step_ms_median"] for r in chosen) / 1e3
            style = {"color": "black", "linewidth": 2.2} if name == "static" else {"color": colours(index % 20)}
            axis.plot(x, acc.mean(0), label=name, **style)
            axis.fill_between(x, acc.min(0).values, acc.max(0).values, alpha=0.12, color=style["color"])
        if kind == "time" and static:
            budget = results["config"]["steps"] * statistics.fmean(r["step_ms_median"] for r in static.values()) / 1e3
            axis.axvline(budget, color="black", linestyle=":", label="static's fine-tuning time")
        if kind == "delta":
            axis.axhline(0.0, color="black", linewidth=1.5)
        axis.set(
            xlabel="fine-tuning time (s, median step time x steps)" if kind == "time" else "fine-tuning step",
            ylabel="val accuracy minus static's (same seed)" if kind == "delta" else "validation accuracy",
            title=f"{task}: mean over {results['seeds']} seeds (band: min-max)",
        )
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7, ncol=2, loc="lower left" if kind == "delta" else "lower right")
        path = out / (f"delta_vs_static_{task}.png" if kind == "delta" else f"accuracy_vs_{kind}_{task}.png")
        figure.tight_layout()
        with atomic_write(path, overwrite=True) as tmp:
            figure.savefig(tmp, format="png")
        plt.close(figure)
        paths.append(path)
    return paths


def write_json(path: Path, data: dict[str, Any]) -> None:
    with atomic_write(path, overwrite=True) as tmp:
        tmp.write_text(json.dumps(data, indent=1))


def parse_list(text: str, known: Sequence[str], what: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown {what} {unknown or text!r}; known: {', '.join(known)}")
    return names


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI-sized: 2 seeds, 4 variants, a few steps")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default: 5, quick: 2)")
    parser.add_argument("--tasks", type=lambda t: parse_list(t, list(TASKS), "task"), default=list(TASKS))
    parser.add_argument(
        "--variants",
        type=lambda t: parse_list(t, list(VARIANTS), "variant"),
        default=None,
        help=f"comma-separated subset of {', '.join(VARIANTS)} (static is always run)",
    )
    parser.add_argument("--steps", type=int, default=None, help="fine-tuning steps per run (default: 400)")
    parser.add_argument("--pretrain-steps", type=int, default=None, help="pre-training steps per seed (default: 400)")
    parser.add_argument(
        "--widths", type=lambda t: tuple(int(w) for w in t.split(",")), default=None, help="ResNet stage widths"
    )
    parser.add_argument("--out", type=Path, default=Path("runs/upcycling_study"))
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: 1 unless OMP_NUM_THREADS is set; on a shared 2-core machine, 2 threads "
        "made these small steps several times slower)",
    )
    args = parser.parse_args(argv)
    config = QUICK if args.quick else FULL
    if args.widths is not None:
        config = dataclasses.replace(config, widths=args.widths)
    overrides = {"seeds": args.seeds, "steps": args.steps, "pretrain_steps": args.pretrain_steps}
    for key, value in overrides.items():
        if value is not None:
            if value < 1:
                parser.error(f"--{key.replace('_', '-')} must be at least 1")
            config = dataclasses.replace(config, **{key: value})
    variants = args.variants or list(QUICK_VARIANTS if args.quick else VARIANTS)
    variants = ["static", *(v for v in variants if v != "static")]
    if args.threads is not None or "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(args.threads or 1)
    args.out.mkdir(parents=True, exist_ok=True)

    results: dict[str, Any] = {
        "mode": "quick" if args.quick else "full",
        "config": dataclasses.asdict(config),
        "machine": machine(),
        "seeds": config.seeds,
        "variants_run": variants,
        "variants": {name: dataclasses.asdict(VARIANTS[name]) for name in variants},
        "tasks": {},
        "runs": [],
    }
    started = time.perf_counter()
    # progress in units of training steps: pre-training counts like one fine-tuning run of its length
    total = len(args.tasks) * config.seeds * (config.pretrain_steps + len(variants) * config.steps)
    done = 0
    for task_name in args.tasks:
        task = TASKS[task_name](config)
        results["tasks"][task_name] = {
            "description": task.description,
            "groups": task.group_name,
            "train_size": len(task.train_y),
            "val_size": len(task.val_y),
            "num_classes": task.num_classes,
            "pretrain": {},
        }
        for seed in range(config.seeds):
            pretrained, info = pretrain(task, config, seed)
            results["tasks"][task_name]["pretrain"][str(seed)] = info
            done += config.pretrain_steps
            progress(f"{task_name} seed {seed} pre-trained: val acc {info['val_acc']:.3f}", started, done, total)
            reference = logits_of(pretrained, task.val_x)
            for name in variants:
                run_started = time.perf_counter()
                run = fine_tune(task, config, seed, name, VARIANTS[name], pretrained, reference)
                run["seconds"] = time.perf_counter() - run_started
                results["runs"].append(run)
                done += config.steps
                progress(
                    f"{task_name} seed {seed} {name}: val acc {run['step0']['val_acc']:.3f} -> "
                    f"{run['final_val_acc']:.3f}, {run['step_ms_median']:.1f} ms/step, {run['seconds']:.1f} s",
                    started,
                    done,
                    total,
                )
            add_wall_clock(results["runs"], config.steps)
            results["seconds"] = time.perf_counter() - started
            write_json(args.out / "results.json", results)  # after every seed: a stopped run keeps what it did
    results["machine"]["load_average_1min_at_end"] = os.getloadavg()[0]
    plots = [path for task_name in args.tasks for path in plot(results, task_name, args.out)]
    results["seconds"] = time.perf_counter() - started
    write_json(args.out / "results.json", results)
    with atomic_write(args.out / "summary.md", overwrite=True) as tmp:
        tmp.write_text(summary_markdown(results))
    print(f"wrote results.json, summary.md and {len(plots)} plots to {args.out} in {results['seconds']:.0f} s")
    return 0


def progress(message: str, started: float, done: int, total: int) -> None:
    elapsed = time.perf_counter() - started
    eta = elapsed / done * (total - done) if done else float("nan")
    print(f"[{elapsed / 60:5.1f} min, ETA {eta / 60:4.1f} min] {message}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
