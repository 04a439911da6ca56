"""Independent float64 reference for CondConv2d: a per-sample loop over nn.Conv2d.

Shares no code with the library: routing is written out from the paper's formula
(global average pool, linear, sigmoid/softmax of logits / T), and each sample is
convolved by an ``nn.Conv2d`` of the same configuration holding that sample's mixed
kernel, so padding modes, 'same' padding, dilation and groups come from PyTorch itself.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor
from torch.func import functional_call


def reference_parameters(layer) -> dict[str, Tensor]:
    """float64 leaf copies of a CondConv2d's parameters, in the reference's own layout."""
    k, cout = layer.num_experts, layer.out_channels
    params = {
        "experts": layer.weight.detach()
        .double()
        .reshape(k, cout, layer.in_channels // layer.groups, *layer.kernel_size),
        "router_weight": layer.router.weight.detach().double(),
        "router_bias": layer.router.bias.detach().double(),
    }
    if layer.bias is not None:
        params["bias"] = layer.bias.detach().double()
    return {name: t.clone().requires_grad_(True) for name, t in params.items()}


def reference_routing(x: Tensor, params: dict[str, Tensor], routing: str, temperature: float) -> Tensor:
    pooled = torch.nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)
    logits = (pooled @ params["router_weight"].T + params["router_bias"]) / temperature
    return torch.sigmoid(logits) if routing == "sigmoid" else torch.softmax(logits, dim=1)


def reference_forward(layer, x: Tensor, params: dict[str, Tensor]) -> Tensor:
    """Output of ``layer`` for float64 input ``x`` computed sample by sample."""
    conv = nn.Conv2d(
        layer.in_channels,
        layer.out_channels,
        layer.kernel_size,
        layer.stride,
        layer.padding,
        layer.dilation,
        layer.groups,
        layer.bias is not None,
        layer.padding_mode,
        dtype=torch.float64,
    )
    r = reference_routing(x, params, layer.routing, float(layer.temperature))
    outputs = []
    for b in range(x.shape[0]):
        kernel = (r[b].view(-1, 1, 1, 1, 1) * params["experts"]).sum(0)
        tensors = {"weight": kernel}
        if "bias" in params:
            tensors["bias"] = (r[b].view(-1, 1) * params["bias"]).sum(0)
        outputs.append(functional_call(conv, tensors, (x[b : b + 1],)))
    return torch.cat(outputs)
