"""Routing Entropy Monitor
=========================

Logs how CondConv layers route (Yang et al., NeurIPS 2019, arXiv:1904.04971): per-sample
routing entropy, expert-usage entropy and per-expert mean routing, for every
``CondConv2d`` and averaged over layers, and warns when a layer collapses onto one
expert. Values are logged with ``LightningModule.log``, so Lightning writes them in the
same rows as the module's own metrics (``train_loss`` of the same step, ``val_loss``
of the same validation), to every logger of the Trainer.
"""

from __future__ import annotations

import warnings
from functools import partial
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from ..condconv2d import CondConv2d
from ..messages import printable
from ..metrics import RoutingEntropy

__all__ = ["RoutingEntropyMonitor"]

UNIFORM_TOLERANCE = 1e-3
"""Per-sample routing entropy within this of 1 counts as uniform routing (see ``uniform_steps``)."""


class RoutingEntropyMonitor(Callback):
    r"""Log routing statistics of every ``CondConv2d`` in the LightningModule.

    For each layer ``<layer>`` (its dotted name in the LightningModule) it logs
    ``<prefix>/<layer>/entropy``, ``<prefix>/<layer>/usage_entropy`` and
    ``<prefix>/<layer>/expert_<k>``, and over all layers ``<prefix>/entropy`` and
    ``<prefix>/usage_entropy`` (means of the layers' values). Validation values use the
    prefix ``val_<prefix>``. Definitions: :func:`condconv_lightning.functional.routing_entropy`.

    The routing weights are those the forward already computed, received through
    :meth:`CondConv2d.register_routing_hook` (no second forward) and accumulated on the
    device in :class:`~condconv_lightning.metrics.RoutingEntropy` states (no host
    synchronization per step). A logged training value covers every training sample
    since the previous training log; under DDP the states are summed over processes
    before the values are computed, so they are the values of the global batches.
    Under gradient accumulation a training log comes at the optimizer step Lightning
    logs, and covers all of its micro-batches. A layer that saw no sample since the
    previous log (a head used only in training, say) is left out of that log, and of
    the means over layers. Collapse is checked with or without a logger. Hooks are
    registered at fit/validation start and removed in ``teardown`` or when the run fails.

    Args:
        logging_interval: ``None`` logs training statistics when Lightning logs its own
            (every ``log_every_n_steps`` optimizer steps), 0 logs no training values. A
            positive value must equal the Trainer's ``log_every_n_steps``: the values share
            the rows of Lightning's metrics, so the Trainer sets their cadence.
        collapse_threshold: warn once per layer, on rank zero, when its usage entropy
            falls below this value (0 disables). For K = 4, one expert taking 90% of the
            routing weight gives about 0.3; two experts used evenly give 0.5.
        uniform_steps: warn once, on rank zero, when converted layers have routed every
            sample uniformly (training per-sample entropy within :data:`UNIFORM_TOLERANCE`
            of 1 at every training log) for this many optimizer steps (0 disables): such a
            layer is one kernel, not a conditional one. It is what a zero router under
            sigmoid routing keeps (the conversion's default); the warning names the
            conversion options that break the symmetry. Checked at training logs, so it
            needs training values to be logged.
        log_experts: also log the mean routing weight of every expert.
        prog_bar: show ``<prefix>/entropy`` (and ``val_<prefix>/entropy``), the mean over layers, on
            the progress bar.
        prefix: first component of every logged name.

    Raises:
        ValueError: a negative ``logging_interval``, a ``collapse_threshold`` outside
            ``[0, 1]``, or an empty ``prefix``.

    Examples:

        >>> from lightning.pytorch import Trainer
        >>> from condconv_lightning.callbacks import RoutingEntropyMonitor
        >>> # routing values every 10 steps, with Lightning's own: the Trainer sets the cadence
        >>> trainer = Trainer(log_every_n_steps=10, callbacks=[RoutingEntropyMonitor()])
    """

    def __init__(
        self,
        logging_interval: int | None = None,
        collapse_threshold: float = 0.2,
        log_experts: bool = True,
        prefix: str = "routing",
        uniform_steps: int = 500,
        prog_bar: bool = True,
    ) -> None:
        if logging_interval is not None and (isinstance(logging_interval, bool) or logging_interval < 0):
            raise ValueError(f"logging_interval must be None or a non-negative integer, got {logging_interval!r}")
        if not 0.0 <= collapse_threshold <= 1.0:
            raise ValueError(
                f"collapse_threshold must lie in [0, 1] (0 disables the warning), got {collapse_threshold!r}"
            )
        if not prefix:
            raise ValueError("prefix must be a non-empty string such as 'routing'")
        if isinstance(uniform_steps, bool) or not isinstance(uniform_steps, int) or uniform_steps < 0:
            raise ValueError(f"uniform_steps must be a non-negative integer (0 disables), got {uniform_steps!r}")
        self.logging_interval = logging_interval
        self.collapse_threshold = collapse_threshold
        self.log_experts = log_experts
        self.prog_bar = prog_bar
        self.prefix = prefix
        self.uniform_steps = uniform_steps
        self._uniform_since: dict[str, int] = {}
        self._warned_uniform = False
        self._layers: dict[str, CondConv2d] = {}
        self._train: dict[str, RoutingEntropy] = {}
        self._val: dict[str, RoutingEntropy] = {}
        self._active: dict[str, RoutingEntropy] | None = None
        self._handles: list[RemovableHandle] = []
        self._warned: set[str] = set()

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._attach(pl_module)
        if self.logging_interval and self.logging_interval != trainer.log_every_n_steps:
            raise ValueError(
                f"RoutingEntropyMonitor(logging_interval={self.logging_interval}) differs from the Trainer's "
                f"log_every_n_steps={trainer.log_every_n_steps}: routing values share the rows of Lightning's own "
                f"metrics; set Trainer(log_every_n_steps={self.logging_interval}) and leave logging_interval None"
            )

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._attach(pl_module)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._active = self._train

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._active = None
        interval = trainer.log_every_n_steps if self.logging_interval is None else self.logging_interval
        if interval and _lightning_logs_this_batch(trainer, batch_idx, interval):
            self._log(trainer, pl_module, self._train, self.prefix, in_training=True)

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._active = self._val

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._active = None
        if trainer.sanity_checking:
            _reset(self._val)
        else:
            self._log(trainer, pl_module, self._val, f"val_{self.prefix}", in_training=False)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._detach()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._detach()  # Lightning calls no teardown then: the hooks must not outlive the run

    def _detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._layers, self._train, self._val, self._active = {}, {}, {}, None

    def _attach(self, pl_module: pl.LightningModule) -> None:
        """Register one routing hook per CondConv2d (once; shared layers count once)."""
        layers = {name: m for name, m in pl_module.named_modules() if isinstance(m, CondConv2d)}
        if (
            self._handles
            and layers.keys() == self._layers.keys()
            and all(self._layers[n] is m for n, m in layers.items())
        ):
            return  # already observing exactly these layers
        self._detach()
        if not layers:
            rank_zero_warn("RoutingEntropyMonitor found no CondConv2d in the LightningModule; convert the model first")
        self._layers = layers
        for name, layer in layers.items():
            self._train[name] = RoutingEntropy(layer.num_experts, validate_args=False).to(pl_module.device)
            self._val[name] = RoutingEntropy(layer.num_experts, validate_args=False).to(pl_module.device)
            self._handles.append(layer.register_routing_hook(partial(self._record, name)))

    def _record(self, name: str, layer: CondConv2d, routing: Tensor) -> None:
        if self._active is not None and routing.shape[0]:  # an empty batch has no routing to average
            self._active[name].update(routing)

    def _log(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        metrics: dict[str, RoutingEntropy],
        prefix: str,
        in_training: bool,
    ) -> None:
        """Compute (synchronized across processes), log beside the module's metrics, check collapse, reset.

        The layers observed by any process are computed on every process (each computes with the
        same collective calls); the others are left out."""
        counts = torch.tensor([m.update_count for m in metrics.values()], device=pl_module.device)
        observed = [
            name for name, count in zip(metrics, trainer.strategy.reduce(counts, reduce_op="sum").tolist()) if count
        ]
        if not observed:
            _reset(metrics)
            return
        names: list[str] = []
        values: list[Tensor] = []
        entropies, usages = [], []
        for layer in observed:
            metric = metrics[layer]
            with warnings.catch_warnings():  # a process that saw none of this layer's samples still syncs them
                warnings.filterwarnings("ignore", message=".*compute.*before the.*update.*")
                stats = metric.compute()
            entropies.append(stats["entropy"])
            usages.append(stats["usage_entropy"])
            names += [f"{prefix}/{layer}/entropy", f"{prefix}/{layer}/usage_entropy"]
            values += [stats["entropy"], stats["usage_entropy"]]
            if self.log_experts:
                names += [f"{prefix}/{layer}/expert_{k}" for k in range(metric.num_experts)]
                values += list(stats["expert_mean"].unbind())
        names += [f"{prefix}/entropy", f"{prefix}/usage_entropy"]
        values += [torch.stack(entropies).mean(), torch.stack(usages).mean()]
        logged = dict(zip(names, torch.stack(values).tolist()))  # the one host read of this log
        _reset(metrics)
        # The values are already reduced over processes, so every rank holds the same ones. Lightning asks for
        # sync_dist on epoch-level values under DDP (one warning per name): the max of equal values is that value.
        options = dict(on_step=in_training, on_epoch=not in_training, sync_dist=not in_training, reduce_fx="max")
        shown = f"{prefix}/entropy" if self.prog_bar else None
        if shown is not None:  # on the progress bar with or without a logger; rank zero's loggers write it
            pl_module.log(shown, logged[shown], prog_bar=True, logger=bool(trainer.loggers), **options)
        if trainer.loggers:
            pl_module.log_dict({k: v for k, v in logged.items() if k != shown}, **options)
        self._warn_on_collapse(logged, prefix, observed)
        if in_training:
            self._warn_on_uniform(logged, prefix, observed, trainer.global_step)

    def _warn_on_collapse(self, logged: dict[str, float], prefix: str, observed: list[str]) -> None:
        for name in observed:
            layer, usage = self._layers[name], logged[f"{prefix}/{name}/usage_entropy"]
            if layer.num_experts > 1 and usage < self.collapse_threshold and name not in self._warned:
                self._warned.add(name)
                rank_zero_warn(
                    f"routing of {printable(name)} collapsed onto few experts: usage entropy {usage:.3f} < "
                    f"collapse_threshold {self.collapse_threshold}; consider a temperature above 1 "
                    "(RoutingTemperatureScheduler), a smaller router_scale when converting, or a lower learning rate "
                    "for routers"
                )

    def _warn_on_uniform(self, logged: dict[str, float], prefix: str, observed: list[str], step: int) -> None:
        """Track since when each layer's routing has been uniform; warn once when some stayed so long enough."""
        for name in observed:
            if self._layers[name].num_experts > 1 and logged[f"{prefix}/{name}/entropy"] >= 1 - UNIFORM_TOLERANCE:
                self._uniform_since.setdefault(name, step)
            else:
                self._uniform_since.pop(name, None)
        stuck = [name for name, since in self._uniform_since.items() if step - since >= self.uniform_steps]
        if self.uniform_steps and stuck and not self._warned_uniform:
            self._warned_uniform = True
            shown = ", ".join(stuck[:3]) + (f" and {len(stuck) - 3} more" if len(stuck) > 3 else "")
            rank_zero_warn(
                f"routing of {len(stuck)} CondConv2d layer(s) ({shown}) has been uniform for {self.uniform_steps} "
                "steps: every sample mixes the experts alike, so each layer acts as one kernel. Convert with "
                "router_init='random', routing='softmax' and perturbation=0 (still exact; CLI: --router-init random "
                "--routing softmax --perturbation 0) so the experts get different gradients from the first step"
            )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"uniform_since": dict(self._uniform_since), "warned_uniform": self._warned_uniform}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        since = state_dict.get("uniform_since", {})
        if isinstance(since, dict) and all(isinstance(k, str) and type(v) is int for k, v in since.items()):
            self._uniform_since = dict(since)
        self._warned_uniform = state_dict.get("warned_uniform") is True


def _lightning_logs_this_batch(trainer: pl.Trainer, batch_idx: int, interval: int) -> bool:
    """Whether Lightning writes its step metrics after training batch ``batch_idx``, as its logger connector
    decides (``update_train_step_metrics``, ``should_update_logs``), from public Trainer state only.

    Lightning counts the batches that ended in an optimizer step. Under automatic optimization that is
    ``global_step`` (which already counts this batch's step), and nothing is logged while gradients
    accumulate; under manual optimization every batch counts, however many optimizers it steps.
    """
    if not trainer.lightning_module.automatic_optimization:
        stepped = trainer.fit_loop.epoch_loop.total_batch_idx + 1
    else:
        accumulated = (batch_idx + 1) % trainer.accumulate_grad_batches == 0
        last = batch_idx + 1 == trainer.num_training_batches
        if not accumulated and (trainer.strategy.handles_gradient_accumulation or not last):
            return False
        stepped = trainer.global_step
    return stepped % interval == 0 or trainer.should_stop


def _reset(metrics: dict[str, RoutingEntropy]) -> None:
    for metric in metrics.values():
        metric.reset()
