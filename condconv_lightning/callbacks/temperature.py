"""Routing Temperature Scheduler
===============================

Anneals the routing temperature of CondConv layers. Dynamic Convolution (Chen et al.,
CVPR 2020, arXiv:1912.03458, Sec. 3.2) divides softmax logits by a temperature that
falls linearly from 30 to 1 over the first 10 epochs: near-uniform attention early
keeps every expert trained, sharper attention later makes kernels input specific.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks.callback import Callback
from typing_extensions import override

from ..condconv2d import CondConv2d

__all__ = ["RoutingTemperatureScheduler"]


class RoutingTemperatureScheduler(Callback):
    r"""Set the temperature of CondConv layers from ``start`` to ``end`` over ``duration`` epochs or steps.

    The temperature is a function of training progress (``trainer.current_epoch`` or
    ``trainer.global_step``), applied before every training batch with
    :meth:`CondConv2d.set_temperature` (an in-place buffer fill: no recompilation under
    ``torch.compile``) whenever its value changes; after ``duration`` it stays at ``end``.
    The last applied temperature is saved in checkpoints and applied again on resume.

    Args:
        start: temperature at the beginning of training.
        end: temperature from ``duration`` on.
        duration: length of the annealing, in units of ``interval``.
        interval: ``"epoch"`` (one value per epoch, as DynamicConv) or ``"step"``
            (a new value every optimizer step).
        annealing: ``"linear"`` or ``"cosine"`` (half-cosine from ``start`` to ``end``).
        routing: which layers to anneal: those with ``"softmax"`` routing, ``"sigmoid"``
            routing, or ``"all"``.

    Raises:
        ValueError: a non-positive temperature or ``duration``, or an unknown
            ``interval``/``annealing``/``routing``; at training start, when the model
            has no CondConv2d layer with the selected routing.

    Examples:

        >>> from lightning.pytorch import Trainer
        >>> from condconv_lightning.callbacks import RoutingTemperatureScheduler
        >>> trainer = Trainer(callbacks=[RoutingTemperatureScheduler(start=30.0, end=1.0, duration=10)])
    """

    def __init__(
        self,
        start: float = 30.0,
        end: float = 1.0,
        duration: int = 10,
        interval: Literal["epoch", "step"] = "epoch",
        annealing: Literal["linear", "cosine"] = "linear",
        routing: Literal["softmax", "sigmoid", "all"] = "softmax",
    ) -> None:
        if not (start > 0 and end > 0):
            raise ValueError(f"start and end temperatures must be positive, got start={start!r}, end={end!r}")
        if isinstance(duration, bool) or not isinstance(duration, int) or duration < 1:
            raise ValueError(f"duration must be a positive integer (epochs or steps), got {duration!r}")
        for arg, value, allowed in (
            ("interval", interval, ("epoch", "step")),
            ("annealing", annealing, ("linear", "cosine")),
            ("routing", routing, ("softmax", "sigmoid", "all")),
        ):
            if value not in allowed:
                raise ValueError(f"{arg} must be one of {allowed}, got {value!r}")
        self.start = float(start)
        self.end = float(end)
        self.duration = duration
        self.interval = interval
        self.annealing = annealing
        self.routing = routing
        self.temperature: float | None = None
        self._layers: list[CondConv2d] = []

    def temperature_at(self, progress: int) -> float:
        """Temperature after ``progress`` epochs or steps (``interval``)."""
        fraction = min(max(progress, 0) / self.duration, 1.0)
        if self.annealing == "cosine":
            fraction = (1.0 - math.cos(math.pi * fraction)) / 2.0
        return self.start + (self.end - self.start) * fraction

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._layers = [
            m for m in pl_module.modules() if isinstance(m, CondConv2d) and self.routing in ("all", m.routing)
        ]
        if not self._layers:
            raise ValueError(
                f"RoutingTemperatureScheduler found no CondConv2d with {self.routing!r} routing; "
                "convert with routing='softmax' (or set routing='all')"
            )
        if self.temperature is not None:  # resumed: the value saved with the checkpoint
            self._apply(self.temperature)
        self._update(trainer)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._update(trainer)

    @property
    @override
    def state_key(self) -> str:
        # One scheduler per routing (or schedule) in a Trainer: each restores its own temperature.
        return self._generate_state_key(
            routing=self.routing,
            start=self.start,
            end=self.end,
            duration=self.duration,
            interval=self.interval,
            annealing=self.annealing,
        )

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Checkpoints of earlier releases hold the state under the class name (one scheduler per Trainer then).
        states = checkpoint.get("callbacks") or {}
        if self.state_key not in states and type(self).__qualname__ in states:
            states[self.state_key] = states[type(self).__qualname__]

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"temperature": self.temperature}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.temperature = state_dict["temperature"]

    def _update(self, trainer: pl.Trainer) -> None:
        progress = trainer.current_epoch if self.interval == "epoch" else trainer.global_step
        temperature = self.temperature_at(progress)
        if temperature != self.temperature:
            self._apply(temperature)

    def _apply(self, temperature: float) -> None:
        for layer in self._layers:
            layer.set_temperature(temperature)
        self.temperature = temperature
