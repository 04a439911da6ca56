"""``revert``: CondConv2d back to ``nn.Conv2d``, to compare a trained CondConv model with a static one.

A CondConv layer computes ``conv(x_b, sum_k r_bk E_k)`` with a kernel of its own for
every sample (Yang et al. 2019, eq. 2). The closest single kernel over a batch of
inputs is the one mixed with the mean routing over that batch, ``sum_k mean_b(r_bk) E_k``
(and the bias likewise); without inputs the plain expert mean ``mean_k E_k`` is used.
Right after exact upcycling the routing is the same constant for every input, so
reverting with inputs gives back the original conv.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn
from torch import Tensor

from ..compat import move_hooks
from ..condconv2d import CondConv2d, conv_settings
from ..messages import name_list
from ..modes import evaluating
from .replace import replace_modules


def revert(model: nn.Module, inputs: Tensor | None = None) -> nn.Module:
    """Replace every CondConv2d in ``model`` by an ``nn.Conv2d`` in place, and return ``model`` (the new
    ``nn.Conv2d`` when ``model`` itself is a CondConv2d).

    Args:
        model: a model holding CondConv2d layers.
        inputs: a batch for ``model``'s forward: each layer's kernel is mixed with its
            mean routing over this batch (one eval-mode, no-grad forward; modes are
            restored). None mixes the experts with equal weights ``1/K``.

    Device, dtype, mode, ``requires_grad`` and hooks carry over; a layer shared at
    several paths becomes one shared Conv2d.
    """
    layers = {id(m): m for m in model.modules() if isinstance(m, CondConv2d)}
    weights = _mean_routing(model, list(layers.values()), inputs) if inputs is not None else {}
    replacements: dict[int, nn.Module] = {}
    for key, layer in layers.items():
        routing = weights.get(key)
        if routing is None:
            routing = torch.full((layer.num_experts,), 1.0 / layer.num_experts, dtype=torch.float64)
        conv = _static_conv(layer, routing)
        move_hooks(layer, conv)
        replacements[key] = conv
    replace_modules(model, replacements)
    return replacements.get(id(model), model)  # a bare layer has no parent to swap it in: its Conv2d is the result


@torch.no_grad()
def _static_conv(layer: CondConv2d, routing: Tensor) -> nn.Conv2d:
    """The ``nn.Conv2d`` whose kernel and bias are ``layer``'s experts mixed by ``routing`` [K]."""
    weight = layer.weight
    conv = nn.Conv2d(**conv_settings(layer), device=weight.device, dtype=weight.dtype)
    mix = routing.to(device=weight.device, dtype=torch.float64)
    conv.weight.copy_((mix @ weight.double()).view_as(conv.weight))
    conv.weight.requires_grad_(weight.requires_grad)
    if layer.bias is not None:
        conv.bias.copy_(mix @ layer.bias.double())
        conv.bias.requires_grad_(layer.bias.requires_grad)
    return conv.train(layer.training)


def _mean_routing(model: nn.Module, layers: list[CondConv2d], inputs: Tensor) -> dict[int, Tensor]:
    sums: dict[int, list[Tensor]] = {id(layer): [] for layer in layers}

    def record(layer: CondConv2d, routing: Tensor) -> None:
        sums[id(layer)].append(routing.double().sum(dim=0))
        sums[id(layer)].append(torch.tensor(float(routing.shape[0]), dtype=torch.float64, device=routing.device))

    handles = [layer.register_routing_hook(record) for layer in layers]
    try:
        with evaluating(model):
            model(inputs)
    finally:
        for handle in handles:
            handle.remove()
    means: dict[int, Tensor] = {}
    for key, parts in sums.items():
        if parts:
            means[key] = sum(parts[0::2]) / sum(parts[1::2])
    unused = [name for name, m in model.named_modules() if isinstance(m, CondConv2d) and id(m) not in means]
    if unused:
        warnings.warn(
            f"revert: the inputs never reached {name_list(unused, len(unused))}; those use the plain expert mean",
            stacklevel=3,
        )
    return means
