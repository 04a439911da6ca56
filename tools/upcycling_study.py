"""Multi-seed upcycling study: does converting a trained CNN to CondConv pay, and with which recipe?

    python tools/upcycling_study.py [--quick] [--seeds N] [--tasks a,b] [--variants a,b] [--total-steps N] [--out DIR]
    python tools/upcycling_study.py --merge A/results.json B/results.json --out DIR   # seeds run apart, joined

Protocol, per task and seed, at one budget of ``total_steps`` training steps for every model:

- ``static``: the narrow static ResNet trained for ``convert_at`` steps, then, with a fresh AdamW
  (as every converted variant gets), for the remaining steps on the same batches as the variants.
  Its curve over all steps shows whether it has plateaued.
- upcycled variants: the same static model at ``convert_at`` steps, converted with
  :func:`condconv_lightning.surgery.convert` (layer2-4, K = 4 unless the variant says otherwise),
  then trained for the remaining steps: equal total steps with the control.
- ``scratch``: the CondConv model trained from scratch for all the steps (``init="fresh"``, the
  paper's setting): the ceiling a recipe is measured against.
- ``static_wide``: a static ResNet widened to the converted model's parameter count, all steps:
  are the extra parameters alone worth as much?
- ``k1``: one expert under sigmoid routing (a per-sample scale of the conv): does the attention
  alone pay, or do the experts?

Every ``eval_every`` steps the validation accuracy is recorded and each step is timed, so
variants are compared at equal total steps and at equal wall-clock (the accuracy a run had
when its training time, static steps included, used up the static control's). At the end,
routing on the validation images: per-sample and usage entropy and how differently the
sub-populations are routed.

Tasks: ``gratings`` (:func:`condconv_lightning.demos.make_multicontext_gratings`: the right filter
depends on a global colour cast), ``digits`` (scikit-learn's bundled 8x8 handwritten digits,
upsampled; no designed sub-populations) and ``renderings`` (the same digits, each drawn in four
visibly different renderings: plain, inverted, rotated, colour on a coloured ground).

Writes ``results.json`` (every run), ``summary.md`` (tables) and per task the plots
``accuracy_vs_steps_<task>.png``, ``accuracy_vs_time_<task>.png`` and ``delta_vs_static_<task>.png``
into ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from condconv_lightning import __version__
from condconv_lightning.condconv2d import CondConv2d
from condconv_lightning.demos import ResNet, make_multicontext_gratings
from condconv_lightning.finetune import parameter_groups
from condconv_lightning.functional import routing_entropy, set_tuning
from condconv_lightning.io import atomic_write
from condconv_lightning.metrics import RoutingEntropy
from condconv_lightning.surgery import ConversionConfig, convert

matplotlib.use("Agg")  # files only
import matplotlib.pyplot as plt


@dataclass(frozen=True)
class StudyConfig:
    """Sizes of a run; ``--quick`` shrinks them to a pipeline check."""

    widths: tuple[int, ...] = (4, 8, 8, 16)  # a narrow ResNet (1 basic block per stage): capacity-limited
    image_size: int = 16
    batch_size: int = 64
    lr: float = 2e-3
    total_steps: int = 4000
    convert_at: int = 2000  # static steps before the upcycled variants convert
    eval_every: int = 100
    layers: tuple[str, ...] = ("layer2", "layer3", "layer4")
    gratings_classes: int = 6
    gratings_contexts: int = 6
    gratings_noise: float = 0.5
    gratings_train: int = 8192
    gratings_val: int = 2048
    digits_val: int = 497  # of 1797: 1300 training images
    calibration_images: int = 512  # the data-aware router init's k-means sample
    seeds: int = 5


FULL = StudyConfig()
QUICK = dataclasses.replace(
    FULL,
    total_steps=24,
    convert_at=12,
    eval_every=4,
    gratings_train=512,
    gratings_val=256,
    digits_val=256,
    calibration_images=64,
    seeds=2,
)


@dataclass(frozen=True)
class Variant:
    """One model trained on the budget: the control, a reference, or a recipe of upcycling.

    ``kind``: ``static`` (the control), ``wide`` (a wider static model, all steps), ``scratch``
    (CondConv from scratch, all steps) or ``upcycle`` (converted from the static model at
    ``convert_at``). The conversion fields are :class:`ConversionConfig`'s; the others are
    symmetry breakers the library does not offer, tried here first:

    - ``drop_ratio``: Drop-Upcycling (Nakamura et al., ICLR 2025, arXiv:2502.19261): after
      conversion, each expert redraws this fraction of its output channels from a normal
      distribution with the original kernel's mean and std (not exact).
    - ``kmeans_router``: a data-aware router: k-means of the layer's pooled inputs on a
      calibration batch, one centroid per expert, as the router's rows (exact with routing
      that sums to one and identical experts).
    - ``mi_weight``: an auxiliary loss, weight times the sum over layers of (mean per-sample
      routing entropy minus usage entropy): minus the mutual information between sample and
      expert (as in Mod-Squad, Chen et al., CVPR 2023), which rewards routing that is decided
      per sample and balanced over the data.
    """

    description: str
    kind: str = "upcycle"
    num_experts: int = 4
    routing: str = "sigmoid"
    router_init: str = "zero"
    router_scale: float = 1.0
    perturbation: float = 0.05
    router_lr_multiplier: float = 1.0
    drop_ratio: float = 0.0
    kmeans_router: bool = False
    mi_weight: float = 0.0

    def conversion(self, seed: int, init: str = "upcycle") -> ConversionConfig:
        return ConversionConfig(
            num_experts=self.num_experts,
            routing=self.routing,  # type: ignore[arg-type]
            init=init,  # type: ignore[arg-type]
            perturbation=self.perturbation,
            router_init=self.router_init,  # type: ignore[arg-type]
            router_scale=self.router_scale,
            seed=seed,
        )


EXACT_SOFTMAX = dict(routing="softmax", router_init="random", perturbation=0.0)
VARIANTS: dict[str, Variant] = {
    "static": Variant("unconverted model, trained on (control)", kind="static"),
    "scratch": Variant("CondConv from scratch, all steps (the paper's: sigmoid, K=4): the ceiling", kind="scratch"),
    "static_wide": Variant("static ResNet widened to the converted model's parameter count, all steps", kind="wide"),
    "k1": Variant("one expert, sigmoid: a per-sample scale of each conv (zero router, exact)", num_experts=1),
    "zero_sigmoid": Variant("sigmoid routing, zero router, perturbation 0.05 (the defaults; exact)"),
    "zero_softmax": Variant("softmax routing, zero router, perturbation 0.05 (exact)", routing="softmax"),
    "random_softmax": Variant("softmax routing, random router (scale 1), identical experts (exact)", **EXACT_SOFTMAX),
    "random_softmax_s3": Variant(
        "softmax routing, random router (scale 3), identical experts (exact)", **EXACT_SOFTMAX, router_scale=3.0
    ),
    "random_softmax_s10": Variant(
        "softmax routing, random router (scale 10), identical experts (exact)", **EXACT_SOFTMAX, router_scale=10.0
    ),
    "random_softmax_s3_lr10": Variant(
        "softmax, random router (scale 3), router learning rate 10x (exact)",
        **EXACT_SOFTMAX,
        router_scale=3.0,
        router_lr_multiplier=10.0,
    ),
    "random_nsigmoid_s3": Variant(
        "normalized sigmoid routing, random router (scale 3), identical experts (exact)",
        routing="normalized_sigmoid",
        router_init="random",
        router_scale=3.0,
        perturbation=0.0,
    ),
    "random_nsigmoid": Variant(
        "normalized sigmoid routing, random router (scale 1), identical experts (exact)",
        routing="normalized_sigmoid",
        router_init="random",
        perturbation=0.0,
    ),
    "random_sigmoid": Variant(
        "sigmoid routing, random router (scale 1), perturbation 0.05 (not exact)", router_init="random"
    ),
    "random_softmax_lr10": Variant(
        "softmax, random router (scale 1), router learning rate 10x (exact)", **EXACT_SOFTMAX, router_lr_multiplier=10.0
    ),
    "drop_upcycling": Variant(
        "softmax, random router, each expert redraws half its output channels (Drop-Upcycling; not exact)",
        **EXACT_SOFTMAX,
        drop_ratio=0.5,
    ),
    "kmeans_router": Variant(
        "softmax, router rows from k-means of the pooled inputs on a calibration batch (exact)",
        **EXACT_SOFTMAX,
        kmeans_router=True,
    ),
    "mi_loss": Variant(
        "softmax, random router, auxiliary mutual-information loss (weight 0.1; exact at conversion)",
        **EXACT_SOFTMAX,
        mi_weight=0.1,
    ),
}
QUICK_VARIANTS = ("static", "scratch", "static_wide", "k1", "zero_sigmoid", "random_softmax", "kmeans_router")


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


def load_digits(config: StudyConfig) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's bundled 8x8 digits (1797 images, no download) upsampled to ``[N, 1, S, S]`` in [0, 1],
    labels, and a fixed split (training indices, validation indices)."""
    from sklearn.datasets import load_digits as bundled  # only the digit tasks need scikit-learn

    digits = bundled()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    images = F.interpolate(images, size=config.image_size, mode="bilinear", align_corners=False).clamp(0, 1)
    labels = torch.tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    return images, labels, order[config.digits_val :], order[: config.digits_val]


def standardized(images: Tensor, train: Tensor) -> Tensor:
    mean, std = images[train].mean(), images[train].std()
    return ((images - mean) / std).contiguous()


def digits_task(config: StudyConfig) -> Task:
    """The digits, gray in 3 channels: a real-image control with no designed sub-populations."""
    images, labels, train, val = load_digits(config)
    images = standardized(images.expand(-1, 3, -1, -1), train)
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


RENDERINGS = ("plain", "inverted", "rotated", "colour")


def render(gray: Tensor, rendering: str) -> Tensor:
    """``[N, 1, S, S]`` digits in [0, 1] drawn as ``[N, 3, S, S]`` in one of :data:`RENDERINGS`."""
    rgb = gray.expand(-1, 3, -1, -1)
    if rendering == "inverted":  # dark strokes on white
        return 1.0 - rgb
    if rendering == "rotated":  # a quarter turn
        return torch.rot90(rgb, 1, dims=(2, 3))
    if rendering == "colour":  # yellow strokes on a blue ground
        ground = torch.tensor([0.1, 0.2, 0.8])[None, :, None, None]
        ink = torch.tensor([1.0, 0.9, 0.0])[None, :, None, None]
        return ground * (1.0 - gray) + ink * gray
    return rgb


def renderings_task(config: StudyConfig) -> Task:
    """Every digit in each of the four renderings: one label, four visibly different sub-populations."""
    gray, labels, train, val = load_digits(config)
    images = torch.cat([render(gray, r) for r in RENDERINGS])
    kinds = torch.arange(len(RENDERINGS)).repeat_interleave(len(labels))
    offsets = torch.arange(len(RENDERINGS)) * len(labels)
    train_all, val_all = (torch.cat([indices + o for o in offsets]) for indices in (train, val))
    images = standardized(images, train_all)
    labels = labels.repeat(len(RENDERINGS))
    return Task(
        "renderings",
        f"the digits (upsampled to {config.image_size}x{config.image_size}), each drawn {len(RENDERINGS)} ways: "
        f"{', '.join(RENDERINGS)} (yellow on blue); {len(train_all)} training / {len(val_all)} validation images",
        10,
        images[train_all],
        labels[train_all],
        images[val_all],
        labels[val_all],
        kinds[val_all],
        "rendering",
    )


TASKS: dict[str, Callable[[StudyConfig], Task]] = {
    "gratings": gratings_task,
    "digits": digits_task,
    "renderings": renderings_task,
}
PLURAL = {"context": "contexts", "class": "classes", "rendering": "renderings"}


def build_model(widths: Sequence[int], num_classes: int) -> nn.Module:
    return ResNet((1,) * len(widths), tuple(widths), num_classes)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def matching_widths(config: StudyConfig, num_classes: int, target: int) -> tuple[int, ...]:
    """Stage widths proportional to ``config.widths`` whose static ResNet has about ``target`` parameters."""
    best: tuple[int, ...] = config.widths
    for tenths in range(10, 60):
        widths = tuple(max(1, round(w * tenths / 10)) for w in config.widths)
        if abs(parameter_count(build_model(widths, num_classes)) - target) < abs(
            parameter_count(build_model(best, num_classes)) - target
        ):
            best = widths
    return best


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


def condconv_layers(model: nn.Module) -> list[CondConv2d]:
    return [m for m in model.modules() if isinstance(m, CondConv2d)]


class MutualInformationLoss:
    """Sum over layers of (mean per-sample routing entropy - usage entropy) of the last forward, with gradients.

    The library's routing hooks hand out detached weights, so this recomputes each layer's routing from its
    input in a forward pre-hook (a pool and a linear layer: cheap).
    """

    def __init__(self, layers: list[CondConv2d]) -> None:
        self.terms: list[Tensor] = []
        self.handles = [layer.register_forward_pre_hook(self.record) for layer in layers]

    def record(self, layer: nn.Module, args: tuple[Tensor, ...]) -> None:
        if layer.training:  # not during the evaluations between steps
            stats = routing_entropy(layer.route(args[0]))  # type: ignore[operator]
            self.terms.append(stats["entropy"] - stats["usage_entropy"])

    def pop(self) -> Tensor:
        total = torch.stack(self.terms).sum()
        self.terms.clear()
        return total


def train_steps(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    task: Task,
    order: Tensor,
    config: StudyConfig,
    first_step: int,
    curve: dict[str, list[float]],
    mi_weight: float = 0.0,
) -> list[float]:
    """Train on the batches of ``order``, evaluating every ``eval_every`` total steps; returns the step times (s)."""
    auxiliary = MutualInformationLoss(condconv_layers(model)) if mi_weight else None
    seconds = []
    for offset, indices in enumerate(order):
        started = time.perf_counter()
        loss = F.cross_entropy(model(task.train_x[indices]), task.train_y[indices])
        if auxiliary is not None:
            loss = loss + mi_weight * auxiliary.pop()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seconds.append(time.perf_counter() - started)
        step = first_step + offset + 1
        if step % config.eval_every == 0 or offset + 1 == len(order):
            curve["steps"].append(step)
            curve["val_acc"].append(accuracy(model, task))
    if auxiliary is not None:
        for handle in auxiliary.handles:
            handle.remove()
    return seconds


def optimizer_for(model: nn.Module, config: StudyConfig, router_lr_multiplier: float = 1.0) -> torch.optim.Optimizer:
    return torch.optim.AdamW(parameter_groups(model, router_lr=config.lr * router_lr_multiplier), lr=config.lr)


def pretrain(task: Task, config: StudyConfig, seed: int) -> tuple[nn.Module, dict[str, Any]]:
    """The static model at ``convert_at`` steps, from which the control and every upcycled variant continue."""
    torch.manual_seed(seed)
    model = build_model(config.widths, task.num_classes)
    curve: dict[str, list[float]] = {"steps": [0], "val_acc": [accuracy(model, task)]}
    order = batch_order(len(task.train_y), config.total_steps, config.batch_size, seed=1000 + seed)
    seconds = train_steps(model, optimizer_for(model, config), task, order[: config.convert_at], config, 0, curve)
    info = {
        "val_acc": curve["val_acc"][-1],
        "train_acc": train_accuracy(model, task),
        "curve": curve,
        "step_ms_median": 1e3 * statistics.median(seconds),
    }
    return model, info


def drop_upcycle(model: nn.Module, ratio: float, seed: int) -> None:
    """Drop-Upcycling for convolutions: each expert redraws ``ratio`` of its output channels from a normal
    distribution with the mean and std of its kernel (the experts start as scaled copies of one kernel)."""
    generator = torch.Generator().manual_seed(3000 + seed)
    with torch.no_grad():
        for layer in condconv_layers(model):
            experts = layer.expert_weight()  # [K, Cout, Cin/g, kh, kw], a view of the parameter
            mean, std = float(experts[0].mean()), float(experts[0].std())
            count = max(1, round(ratio * layer.out_channels))
            for expert in experts:
                channels = torch.randperm(layer.out_channels, generator=generator)[:count]
                expert[channels] = torch.randn(expert[channels].shape, generator=generator) * std + mean


@torch.no_grad()
def kmeans_routers(model: nn.Module, images: Tensor, scale: float, seed: int, iterations: int = 20) -> None:
    """Router rows from k-means (K centroids) of each CondConv2d's pooled inputs on ``images``.

    Row ``k`` is centroid ``k`` minus the mean of the pooled inputs; the bias centres the logits,
    and rows and bias are scaled so the logits' std over the sample is ``scale``.
    """
    layers = condconv_layers(model)
    pooled: dict[int, Tensor] = {}
    handles = [
        layer.register_forward_pre_hook(lambda m, args: pooled.__setitem__(id(m), args[0].mean(dim=(2, 3))))
        for layer in layers
    ]
    logits_of(model, images)  # eval mode, as the routers will first see the data
    for handle in handles:
        handle.remove()
    generator = torch.Generator().manual_seed(4000 + seed)
    for layer in layers:
        features = pooled[id(layer)].double()
        mean = features.mean(0)
        centroids = features[torch.randperm(len(features), generator=generator)[: layer.num_experts]].clone()
        for _ in range(iterations):
            nearest = torch.cdist(features, centroids).argmin(1)
            for k in range(layer.num_experts):
                if bool((nearest == k).any()):
                    centroids[k] = features[nearest == k].mean(0)
        rows = centroids - mean
        logits = (features - mean) @ rows.T
        factor = scale / float(logits.std().clamp_min(1e-12))
        layer.router.weight.copy_(rows * factor)
        layer.router.bias.copy_(-(mean @ rows.T) * factor)


def run_variant(
    task: Task,
    config: StudyConfig,
    seed: int,
    name: str,
    variant: Variant,
    pretrained: nn.Module,
    pre: dict[str, Any],
    reference: Tensor,
) -> dict[str, Any]:
    """One model trained on the budget (see the module docstring); its curve is over total steps."""
    torch.manual_seed(seed)
    order = batch_order(len(task.train_y), config.total_steps, config.batch_size, seed=1000 + seed)
    if variant.kind in ("scratch", "wide"):
        widths = config.widths
        if variant.kind == "wide":
            target = parameter_count(upcycled_reference(config, task.num_classes, seed))
            widths = matching_widths(config, task.num_classes, target)
        model = build_model(widths, task.num_classes)
        if variant.kind == "scratch":
            convert(model, list(config.layers), variant.conversion(seed, init="fresh"))
        first_step, static_ms, step0 = 0, 0.0, None
        curve: dict[str, list[float]] = {"steps": [0], "val_acc": [accuracy(model, task)]}
    else:
        model = copy.deepcopy(pretrained)
        if variant.kind == "upcycle":
            convert(model, list(config.layers), variant.conversion(seed))
            if variant.drop_ratio:
                drop_upcycle(model, variant.drop_ratio, seed)
            if variant.kmeans_router:
                kmeans_routers(model, task.train_x[: config.calibration_images], variant.router_scale, seed)
        logits = logits_of(model, task.val_x)
        difference = (logits - reference).abs().max()
        top2 = reference.topk(2, dim=1).values
        step0 = {
            "val_acc": float((logits.argmax(1) == task.val_y).float().mean()),
            "max_rel_diff": float(difference / reference.abs().max()),
            # predictions the conversion changed, and those it could change within its float32 rounding
            "changed": int((logits.argmax(1) != reference.argmax(1)).sum()),
            "near_ties": int((top2[:, 0] - top2[:, 1] <= 2 * difference).sum()),
        }
        first_step, static_ms = config.convert_at, pre["step_ms_median"]
        curve = {"steps": list(pre["curve"]["steps"]), "val_acc": list(pre["curve"]["val_acc"])}
    optimizer = optimizer_for(model, config, variant.router_lr_multiplier)
    seconds = train_steps(model, optimizer, task, order[first_step:], config, first_step, curve, variant.mi_weight)
    step_ms = 1e3 * statistics.median(seconds[1:] or seconds)  # the first step tunes `auto`
    return {
        "task": task.name,
        "variant": name,
        "seed": seed,
        "step0": step0,
        "curve": curve,
        "final_val_acc": curve["val_acc"][-1],
        "final_train_acc": train_accuracy(model, task),
        "step_ms_median": step_ms,
        "static_steps": first_step,
        "static_step_ms": static_ms,
        "params": parameter_count(model),
        "routing": routing_statistics(model, task) if condconv_layers(model) else None,
    }


def upcycled_reference(config: StudyConfig, num_classes: int, seed: int) -> nn.Module:
    """The model the recipes produce (layer2-4, K = 4), for its parameter count."""
    model = build_model(config.widths, num_classes)
    convert(model, list(config.layers), num_experts=4, seed=seed)
    return model


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


def elapsed_ms(run: dict[str, Any], step: int) -> float:
    """Training time of ``run`` up to total step ``step``: its static steps at the static step time, then its own."""
    static = min(step, run["static_steps"])
    return static * run["static_step_ms"] + (step - static) * run["step_ms_median"]


def accuracy_within(run: dict[str, Any], budget_ms: float) -> float:
    """Validation accuracy at the last evaluation the run reached within ``budget_ms`` of training time."""
    curve = run["curve"]
    return [acc for s, acc in zip(curve["steps"], curve["val_acc"]) if elapsed_ms(run, s) <= budget_ms * 1.0001][-1]


def add_wall_clock(runs: list[dict[str, Any]], total_steps: int) -> None:
    """``acc_at_static_time`` and ``time_ratio`` of every run, against the static run of its task and seed."""
    static = {(r["task"], r["seed"]): r for r in runs if r["variant"] == "static"}
    for run in runs:
        control = static.get((run["task"], run["seed"]))
        if control is None:
            continue
        budget = elapsed_ms(control, total_steps)
        run["time_ratio"] = elapsed_ms(run, total_steps) / budget
        run["acc_at_static_time"] = accuracy_within(run, budget)


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


def standard_error(values: Sequence[float]) -> float:
    return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")


def summary_rows(runs: list[dict[str, Any]], task: str, variants: Sequence[str]) -> list[dict[str, Any]]:
    """Per variant: aggregates over seeds, and the paired difference to the static run of the same seed."""
    static = {r["seed"]: r for r in runs if r["task"] == task and r["variant"] == "static"}
    scratch = {r["seed"]: r for r in runs if r["task"] == task and r["variant"] == "scratch"}
    scratch_gain = [scratch[s]["final_val_acc"] - static[s]["final_val_acc"] for s in scratch if s in static]
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
        step0 = [r["step0"] for r in chosen if r["step0"] is not None]
        rows.append(
            {
                "variant": name,
                "seeds": len(chosen),
                "final": mean_std(final),
                "train": statistics.fmean(r["final_train_acc"] for r in chosen),
                "paired": mean_std(paired) if paired else None,
                "paired_se": standard_error(paired) if paired else None,
                "wins": sum(d > 0 for d in paired),
                "of_scratch": statistics.fmean(paired) / statistics.fmean(scratch_gain)
                if paired and scratch_gain and statistics.fmean(scratch_gain) > 0
                else None,
                "paired_at_static_time": mean_std(paired_at_time) if paired_at_time else None,
                "time_ratio": statistics.fmean(r.get("time_ratio", float("nan")) for r in chosen),
                "step_ms": statistics.fmean(r["step_ms_median"] for r in chosen),
                "params": chosen[0]["params"],
                "step0_diff": max(s["max_rel_diff"] for s in step0) if step0 else None,
                "entropy": statistics.fmean(x["entropy"] for x in routing) if routing else None,
                "usage_entropy": statistics.fmean(x["usage_entropy"] for x in routing) if routing else None,
                "group_tv": statistics.fmean(x["group_tv"] for x in routing) if routing else None,
            }
        )
    return rows


def plateau(curve: dict[str, list[float]], total_steps: int) -> tuple[float, float]:
    """Mean validation accuracy over the last quarter of the steps and over the quarter before it."""
    steps, acc = curve["steps"], curve["val_acc"]
    last = [a for s, a in zip(steps, acc) if s > 0.75 * total_steps]
    before = [a for s, a in zip(steps, acc) if 0.5 * total_steps < s <= 0.75 * total_steps]
    return statistics.fmean(before or last), statistics.fmean(last)


def summary_markdown(results: dict[str, Any]) -> str:
    config = results["config"]
    info = results["machine"]
    lines = [
        "# Upcycling study",
        "",
        f"{info['date']}; {info['platform']}, {info['cpu_count']} CPUs, {info['torch_threads']} torch thread(s), "
        f"torch {info['torch']}; mode {results['mode']}; {results['seconds'] / 60:.1f} min in all.",
        f"Every model trains {config['total_steps']} steps (AdamW lr {config['lr']}, batch {config['batch_size']}, "
        f"the same batches); upcycled variants convert {', '.join(config['layers'])} of the static model at step "
        f"{config['convert_at']}.",
        "",
    ]
    for task, about in results["tasks"].items():
        static = [r for r in results["runs"] if r["task"] == task and r["variant"] == "static"]
        halves = [plateau(r["curve"], config["total_steps"]) for r in static]
        lines += [
            f"## {task}",
            "",
            f"{about['description']}. Static control: mean val acc over the third quarter of the steps "
            f"{statistics.fmean(h[0] for h in halves):.3f}, over the last quarter "
            f"{statistics.fmean(h[1] for h in halves):.3f}. Routing difference between "
            f"{PLURAL[about['groups']]}: mean total-variation distance between their mean routing distributions "
            "(0 = routed alike).",
            "",
            "| variant | final val acc (mean ± std) | train acc | Δ vs static, paired (± s.e.) | beats static | "
            "share of scratch's gain | Δ at static's wall-clock | time vs static | params | step-0 max rel. diff | "
            f"routing entropy | usage entropy | {about['groups']} routing difference |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in summary_rows(results["runs"], task, results["variants_run"]):
            control = row["variant"] == "static"
            paired = "-" if control else "{:+.3f} ± {:.3f}".format(row["paired"][0], row["paired_se"])
            cells = [
                row["variant"],
                "{:.3f} ± {:.3f}".format(*row["final"]),
                f"{row['train']:.3f}",
                paired,
                "-" if control else f"{row['wins']}/{row['seeds']}",
                "-" if control or row["of_scratch"] is None else f"{row['of_scratch']:.2f}",
                "-" if control else "{:+.3f} ± {:.3f}".format(*row["paired_at_static_time"]),
                f"{row['time_ratio']:.2f}x ({row['step_ms']:.1f} ms/step)",
                f"{row['params']:,}",
                "-" if row["step0_diff"] is None else f"{row['step0_diff']:.1e}",
                *("-" if row[key] is None else f"{row[key]:.3f}" for key in ("entropy", "usage_entropy", "group_tv")),
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Variants", ""]
    lines += [f"- `{name}`: {results['variants'][name]['description']}" for name in results["variants_run"]]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], task: str, out: Path) -> list[Path]:
    """Per variant, mean over seeds (line) and min-max (band): accuracy over total steps and over training time,
    and the paired difference to the static run of the same seed over steps."""
    runs = [r for r in results["runs"] if r["task"] == task]
    names = [n for n in results["variants_run"] if any(r["variant"] == n for r in runs)]
    static = {r["seed"]: r for r in runs if r["variant"] == "static"}
    colours = plt.get_cmap("tab20")
    total = results["config"]["total_steps"]
    paths = []
    for kind in ("steps", "time", "delta"):
        figure, axis = plt.subplots(figsize=(9, 5.5), dpi=110)
        for index, name in enumerate(names):
            chosen = [r for r in runs if r["variant"] == name and (kind != "delta" or r["seed"] in static)]
            if kind == "delta" and (name == "static" or not chosen):
                continue
            steps = chosen[0]["curve"]["steps"]
            acc = torch.tensor([r["curve"]["val_acc"] for r in chosen])
            if kind == "delta":
                acc = acc - torch.tensor([static[r["seed"]]["curve"]["val_acc"] for r in chosen])
            x = torch.tensor(steps, dtype=torch.float64)
            if kind == "time":
                x = torch.tensor([statistics.fmean(elapsed_ms(r, s) for r in chosen) / 1e3 for s in steps])
            style = {"color": "black", "linewidth": 2.2} if name == "static" else {"color": colours(index % 20)}
            axis.plot(x, acc.mean(0), label=name, **style)
            axis.fill_between(x, acc.min(0).values, acc.max(0).values, alpha=0.12, color=style["color"])
        if kind == "time" and static:
            budget = statistics.fmean(elapsed_ms(r, total) for r in static.values()) / 1e3
            axis.axvline(budget, color="black", linestyle=":", label="static's training time")
        if kind != "time":
            axis.axvline(results["config"]["convert_at"], color="gray", linestyle="--", linewidth=1)
        if kind == "delta":
            axis.axhline(0.0, color="black", linewidth=1.5)
        axis.set(
            xlabel="training time (s, median step times x steps)" if kind == "time" else "training step",
            ylabel="val accuracy minus static's (same seed)" if kind == "delta" else "validation accuracy",
            title=f"{task}: mean over {results['seeds']} seeds (band: min-max)",
        )
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7, ncol=2, loc="upper left" if kind == "delta" else "lower right")
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
    parser.add_argument("--quick", action="store_true", help="CI-sized: 2 seeds, a few variants, a few steps")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default: 5, quick: 2)")
    parser.add_argument("--first-seed", type=int, default=0, help="seeds run from this one on (default: 0)")
    parser.add_argument("--tasks", type=lambda t: parse_list(t, list(TASKS), "task"), default=list(TASKS))
    parser.add_argument(
        "--variants",
        type=lambda t: parse_list(t, list(VARIANTS), "variant"),
        default=None,
        help=f"comma-separated subset of {', '.join(VARIANTS)} (static is always run)",
    )
    parser.add_argument("--total-steps", type=int, default=None, help="training steps of every model (default: 4000)")
    parser.add_argument("--convert-at", type=int, default=None, help="static steps before conversion (default: half)")
    parser.add_argument("--out", type=Path, default=Path("runs/upcycling_study"))
    parser.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        metavar="RESULTS",
        help="instead of training, join the results.json of runs of other seeds or tasks (same settings and "
        "variants; seeds train the same models in any process) and write their tables and plots into --out",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: 1 unless OMP_NUM_THREADS is set; on a shared 2-core machine, 2 threads "
        "made these small steps several times slower)",
    )
    args = parser.parse_args(argv)
    if args.merge:
        try:
            results = merged(args.merge)
        except ValueError as error:
            parser.error(str(error))
        return write_report(results, args.out)
    config = QUICK if args.quick else FULL
    if args.total_steps is not None:
        config = dataclasses.replace(config, total_steps=args.total_steps, convert_at=args.total_steps // 2)
    for key, value in {"seeds": args.seeds, "convert_at": args.convert_at}.items():
        if value is not None:
            config = dataclasses.replace(config, **{key: value})
    if config.seeds < 1 or not 1 <= config.convert_at < config.total_steps:
        parser.error("need --seeds >= 1 and 1 <= --convert-at < --total-steps")
    variants = args.variants or list(QUICK_VARIANTS if args.quick else VARIANTS)
    variants = ["static", *(v for v in variants if v != "static")]
    if args.threads is not None or "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(args.threads or 1)
    # The rules, not timings, pick each layer's strategy: timed choices can differ from run to run, and
    # strategies round differently, so a rerun would train another model.
    set_tuning(False)
    args.out.mkdir(parents=True, exist_ok=True)
    seeds = range(args.first_seed, args.first_seed + config.seeds)

    results: dict[str, Any] = {
        "mode": "quick" if args.quick else "full",
        "config": dataclasses.asdict(config),
        "machine": machine(),
        "seeds": config.seeds,
        "seed_list": list(seeds),
        "variants_run": variants,
        "variants": {name: dataclasses.asdict(VARIANTS[name]) for name in variants},
        "tasks": {},
        "runs": [],
    }
    started = time.perf_counter()
    # progress in training steps: the shared static steps count once per seed
    per_variant = {
        name: config.total_steps
        if VARIANTS[name].kind in ("scratch", "wide")
        else config.total_steps - config.convert_at
        for name in variants
    }
    total = len(args.tasks) * config.seeds * (config.convert_at + sum(per_variant.values()))
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
        for seed in seeds:
            pretrained, pre = pretrain(task, config, seed)
            results["tasks"][task_name]["pretrain"][str(seed)] = pre
            done += config.convert_at
            progress(
                f"{task_name} seed {seed} static at {config.convert_at}: {pre['val_acc']:.3f}", started, done, total
            )
            reference = logits_of(pretrained, task.val_x)
            for name in variants:
                run_started = time.perf_counter()
                run = run_variant(task, config, seed, name, VARIANTS[name], pretrained, pre, reference)
                run["seconds"] = time.perf_counter() - run_started
                results["runs"].append(run)
                done += per_variant[name]
                progress(
                    f"{task_name} seed {seed} {name}: val acc {run['final_val_acc']:.3f}, "
                    f"{run['step_ms_median']:.1f} ms/step, {run['seconds']:.1f} s",
                    started,
                    done,
                    total,
                )
            add_wall_clock(results["runs"], config.total_steps)
            results["seconds"] = time.perf_counter() - started
            write_json(args.out / "results.json", results)  # after every seed: a stopped run keeps what it did
    results["machine"]["load_average_1min_at_end"] = os.getloadavg()[0]
    results["seconds"] = time.perf_counter() - started
    return write_report(results, args.out)


def write_report(results: dict[str, Any], out: Path) -> int:
    """``results.json``, ``summary.md`` and the plots of every task into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    plots = [path for task_name in results["tasks"] for path in plot(results, task_name, out)]
    write_json(out / "results.json", results)
    with atomic_write(out / "summary.md", overwrite=True) as tmp:
        tmp.write_text(summary_markdown(results))
    print(f"wrote results.json, summary.md and {len(plots)} plots to {out} ({results['seconds'] / 60:.1f} min of runs)")
    return 0


def merged(paths: Sequence[Path]) -> dict[str, Any]:
    """One results dict from the ``results.json`` of several runs with the same settings and variants.

    Runs of one seed train the same models in any process (seeded, strategies by rules), so runs
    split over processes or machines join into the run one process would have made; only the
    timings differ. A (task, seed) in two files is refused.
    """
    parts = [json.loads(Path(path).read_text()) for path in paths]
    first = parts[0]

    def setting(part: dict[str, Any]) -> dict[str, Any]:
        return {"mode": part["mode"], "config": {**part["config"], "seeds": None}, "variants_run": part["variants_run"]}

    for path, part in zip(paths, parts):
        for key, value in setting(part).items():
            if value != setting(first)[key]:
                raise ValueError(f"{path}: its {key} differs from {paths[0]}'s; merge runs of one setting only")
    results = copy.deepcopy(first)
    results["runs"], results["tasks"], seen = [], {}, set()
    for path, part in zip(paths, parts):
        for task, about in part["tasks"].items():
            joined = results["tasks"].setdefault(task, {**about, "pretrain": {}})
            for seed in about["pretrain"]:
                if (task, seed) in seen:
                    raise ValueError(f"{path}: {task} seed {seed} is in an earlier file too")
                seen.add((task, seed))
                joined["pretrain"][seed] = about["pretrain"][seed]
        results["runs"] += part["runs"]
    seeds = sorted({int(seed) for _, seed in seen})
    results.update(seeds=len(seeds), seed_list=seeds, seconds=sum(part["seconds"] for part in parts))
    results["config"]["seeds"] = len(seeds)
    results["merged_from"] = [
        {"path": str(path), "machine": part["machine"], "seed_list": part["seed_list"], "seconds": part["seconds"]}
        for path, part in zip(paths, parts)
    ]
    return results


def progress(message: str, started: float, done: int, total: int) -> None:
    elapsed = time.perf_counter() - started
    eta = elapsed / done * (total - done) if done else float("nan")
    print(f"[{elapsed / 60:5.1f} min, ETA {eta / 60:4.1f} min] {message}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
