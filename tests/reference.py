"""Independent float64 reference for CondConv2d: a per-sample loop over nn.Conv2d.

Shares no code with the library: routing is written out from the paper's formula
(global average pool, linear, sigmoid/softmax of logits / T), and each sample is
convolved by an ``nn.Conv2d`` of the same configuration holding that sample's mixed
kernel, so padding modes, 'same' padding, dilation and groups come from PyTorch itself.
"""

from __future__ import annotations

import contextlib

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
    if routing == "softmax":
        return torch.softmax(logits, dim=1)
    gates = 1.0 / (1.0 + torch.exp(-logits))
    return gates if routing == "sigmoid" else gates / gates.sum(dim=1, keepdim=True)


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


def assert_close_scaled(
    actual: Tensor, expected: Tensor, tol: float, what: str, magnitude: Tensor | None = None
) -> None:
    """Max error within ``tol`` times the largest reference value, or the largest ``magnitude`` if given."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    err = (actual.double() - expected).abs().max().item()
    scale = max(expected.abs().max().item(), 0.0 if magnitude is None else magnitude.abs().max().item())
    assert err <= tol * max(scale, 1e-6), f"{what}: max error {err:.3g} exceeds {tol} x {scale:.3g}"


def term_magnitudes(layer, x: Tensor, grad_out: Tensor) -> list[Tensor]:
    """The reference's output and gradients recomputed from absolute values of the input, the
    parameters and the output gradient: with sigmoid routing every term of every sum is then
    positive, so each entry is the size of the terms float32 adds up. A gradient whose terms
    cancel (a router bias summed over every sample and position) is judged against them, not
    against its own small sum, whose float32 rounding error is relative to the terms."""
    params = {name: t.detach().abs().requires_grad_(True) for name, t in reference_parameters(layer).items()}
    x_abs = x.detach().double().abs().requires_grad_(True)
    out = reference_forward(layer, x_abs, params)
    return [out.detach(), *torch.autograd.grad((out * grad_out.abs()).sum(), [x_abs, *params.values()])]


def check_against_reference(layer, x: Tensor, tol: float, autocast_dtype=None) -> Tensor:
    """Compare ``layer``'s output and every gradient with the float64 loop, scaled by the largest reference
    value or the largest of the terms it sums (:func:`term_magnitudes`), whichever is larger.

    Runs under autocast when ``autocast_dtype`` is given; returns the layer's output.
    """
    params = reference_parameters(layer)
    x_ref = x.detach().double().requires_grad_(True)
    expected = reference_forward(layer, x_ref, params)
    grad_out = torch.randn_like(expected)
    expected_grads = torch.autograd.grad((expected * grad_out).sum(), [x_ref, *params.values()])
    magnitudes = term_magnitudes(layer, x, grad_out)

    x = x.detach().requires_grad_(True)
    ctx = torch.autocast(x.device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    with ctx:
        y = layer(x)
    if autocast_dtype is not None:
        assert y.dtype == autocast_dtype, f"autocast output dtype {y.dtype}, expected {autocast_dtype}"
    assert_close_scaled(y.detach(), expected.detach(), tol, "output", magnitudes[0])
    (y.double() * grad_out).sum().backward()
    names = ["input", *params.keys()]
    actual_grads = [x.grad, layer.weight.grad, layer.router.weight.grad, layer.router.bias.grad]
    if layer.bias is not None:
        actual_grads.append(layer.bias.grad)
    for name, actual, expected_grad, magnitude in zip(names, actual_grads, expected_grads, magnitudes[1:]):
        assert_close_scaled(actual.reshape(expected_grad.shape), expected_grad, tol, f"grad of {name}", magnitude)
    return y


@torch.no_grad()
def relative_difference(actual: Tensor, expected: Tensor) -> float:
    """Largest absolute difference over the largest reference magnitude: how upcycling's exactness is judged."""
    return float((actual - expected).abs().max() / expected.abs().max())
