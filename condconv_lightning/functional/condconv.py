"""Conditionally parameterized convolution as a function, with interchangeable strategies.

CondConv (Yang et al., NeurIPS 2019, arXiv:1904.04971) convolves sample ``b`` with
the kernel ``sum_k r[b, k] * W_k``. Every strategy below computes exactly that; they
differ only in how the work is laid out:

- ``grouped``: the batch folded into conv groups (the formulation of the original
  note and of timm): one conv with ``groups * B`` groups over per-sample kernels.
- ``mixture``: one conv with all K experts stacked on the output channels, then the
  K outputs mixed by the routing weights. K times the conv FLOPs, no per-sample kernels.
- ``bmm``: per-sample kernels as batched matrix products; 1x1 kernels multiply the
  input directly, larger kernels go through ``unfold``.
- ``fused``: Triton implicit-GEMM kernels that mix the expert tiles on-chip, so no
  per-sample kernel is ever stored (:mod:`.fused`); CUDA only (or the Triton
  interpreter), opt-in: ``auto`` never picks it, and export runs ``auto`` instead.
- ``auto``: picks one of the above per call: the fastest, timed once per problem
  (:mod:`.autotune`), or by the rules of :mod:`.auto` when tuning is off or tracing.

``grouped`` and ``bmm`` hold B per-sample kernels; beyond ``auto.KERNEL_BUDGET_BYTES``
of them a call runs in batch chunks (:func:`_in_budget_chunks`).

Padding is resolved once for all strategies: non-zero padding modes and asymmetric
'same' padding are applied with ``F.pad`` first, exactly as ``nn.Conv2d`` does, and
the strategies then see symmetric zero padding only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from . import auto
from .auto import is_exporting, per_sample_kernel_bytes
from .autotune import tuned_strategy
from .fused import fused

Strategy = Literal["auto", "grouped", "mixture", "bmm", "fused"]
STRATEGIES: tuple[str, ...] = ("auto", "grouped", "mixture", "bmm", "fused")
PADDING_MODES: tuple[str, ...] = ("zeros", "reflect", "replicate", "circular")
_PAD_MODE = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate", "circular": "circular"}

IntPair = int | Sequence[int]
Padding = str | int | Sequence[int]


def pair(value: IntPair, name: str = "value", positive: bool = False) -> tuple[int, int]:
    """``3 -> (3, 3)``, ``(3, 5) -> (3, 5)``; anything else, or with ``positive`` a value below 1,
    is a one-line ValueError."""
    if isinstance(value, int) and not isinstance(value, bool):
        items = (value, value)
    else:
        items = tuple(value)
        if len(items) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
            raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    if positive and min(items) < 1:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return items  # type: ignore[return-value]


def check_strategy(strategy: str) -> str:
    """Return ``strategy`` if it is known, else raise a one-line ValueError."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    return strategy


def explicit_padding(
    kernel_size: tuple[int, int], padding: Padding, dilation: tuple[int, int]
) -> tuple[int, int, int, int]:
    """Padding as ``(left, right, top, bottom)`` pixels, the order ``F.pad`` takes.

    ``'same'`` puts the odd pixel on the right/bottom, as ``nn.Conv2d`` and
    ``F.conv2d`` do; ``'valid'`` is no padding.
    """
    if padding == "valid":
        return (0, 0, 0, 0)
    if padding == "same":
        (kh, kw), (dh, dw) = kernel_size, dilation
        th, tw = dh * (kh - 1), dw * (kw - 1)
        return (tw // 2, tw - tw // 2, th // 2, th - th // 2)
    if isinstance(padding, str):
        raise ValueError(f"padding must be 'same', 'valid', an int or a pair of ints, got {padding!r}")
    ph, pw = pair(padding, "padding")  # type: ignore[arg-type]
    if ph < 0 or pw < 0:
        raise ValueError(f"padding must be non-negative, got {padding!r}")
    return (pw, pw, ph, ph)


def _channels_last(x: Tensor) -> bool:
    """Whether ``x`` is stored NHWC, so the strategies keep that layout instead of copying it."""
    return x.dim() == 4 and x.shape[1] > 1 and x.is_contiguous(memory_format=torch.channels_last)


def _mixed_bias(r: Tensor, bias: Tensor | None, out: Tensor) -> Tensor | None:
    """Per-sample bias ``r @ bias`` shaped to broadcast over ``out``'s spatial positions."""
    return None if bias is None else torch.mm(r, bias).to(out.dtype)[:, :, None, None]


def _grouped(
    x: Tensor, weight: Tensor, bias: Tensor | None, r: Tensor, stride, padding, dilation, groups: int
) -> Tensor:
    batch, in_channels, height, width = x.shape
    num_experts, out_channels = weight.shape[:2]
    kernels = torch.mm(r, weight.reshape(num_experts, -1)).reshape(batch * out_channels, *weight.shape[2:])
    mixed_bias = torch.mm(r, bias).reshape(-1) if bias is not None else None
    # Folding the batch into channels needs per-sample NCHW memory: for channels_last
    # input this reshape copies (auto therefore avoids grouped for such input).
    y = F.conv2d(
        x.reshape(1, batch * in_channels, height, width), kernels, mixed_bias, stride, padding, dilation, groups * batch
    )
    return y.reshape(batch, out_channels, *y.shape[-2:])


def _mixture(
    x: Tensor, weight: Tensor, bias: Tensor | None, r: Tensor, stride, padding, dilation, groups: int
) -> Tensor:
    num_experts, out_channels = weight.shape[:2]
    per_group = out_channels // groups
    experts = weight.reshape(num_experts, groups, per_group, *weight.shape[2:])
    nhwc = _channels_last(x)
    # Stacked output channels: each conv group first (it reads its own input channels),
    # then the order that makes the mix one batched matrix product over y's memory:
    # (expert, channel) for NCHW, (channel, expert) for NHWC, whose channels are innermost.
    order = (1, 2, 0) if nhwc else (1, 0, 2)
    stacked = experts.permute(*order, 3, 4, 5).reshape(groups * num_experts * per_group, *weight.shape[2:])
    y = F.conv2d(x, stacked, None, stride, padding, dilation, groups)
    batch, _, out_h, out_w = y.shape
    mix = r.to(y.dtype)
    if nhwc:  # y's memory is [B, H, W, groups, per_group, K]
        rows = y.permute(0, 2, 3, 1).reshape(batch, out_h * out_w * out_channels, num_experts)
        out = torch.bmm(rows, mix[:, :, None])
        out = out.view(batch, out_h, out_w, out_channels).permute(0, 3, 1, 2)
    else:  # y's memory is [B, groups, K, per_group, H, W]
        out = torch.matmul(mix[:, None, None, :], y.reshape(batch, groups, num_experts, per_group * out_h * out_w))
        out = out.view(batch, out_channels, out_h, out_w)
    mixed_bias = _mixed_bias(r, bias, out)
    return out if mixed_bias is None else out + mixed_bias


def _bmm(x: Tensor, weight: Tensor, bias: Tensor | None, r: Tensor, stride, padding, dilation, groups: int) -> Tensor:
    batch, _, height, width = x.shape
    num_experts, out_channels, in_per_group, kh, kw = weight.shape
    kernels = torch.mm(r, weight.reshape(num_experts, -1))
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    out_h = (height + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    out_w = (width + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if (kh, kw, ph, pw, groups) == (1, 1, 0, 0, 1):
        if (sh, sw) != (1, 1):
            x = x[:, :, ::sh, ::sw]
        kernels = kernels.view(batch, out_channels, in_per_group)
        if _channels_last(x):  # [B, HW, Cin] @ [B, Cin, Cout] reads and writes NHWC in place
            rows = x.permute(0, 2, 3, 1).reshape(batch, out_h * out_w, in_per_group)
            out = torch.bmm(rows, kernels.transpose(1, 2)).view(batch, out_h, out_w, out_channels).permute(0, 3, 1, 2)
        else:
            out = torch.bmm(kernels, x.reshape(batch, in_per_group, out_h * out_w))
            out = out.view(batch, out_channels, out_h, out_w)
    else:
        kernels = kernels.view(batch, groups, out_channels // groups, in_per_group * kh * kw)
        cols = F.unfold(x, (kh, kw), (dh, dw), (ph, pw), (sh, sw))
        cols = cols.view(batch, groups, in_per_group * kh * kw, out_h * out_w)
        out = torch.matmul(kernels, cols).reshape(batch, out_channels, out_h, out_w)
    mixed_bias = _mixed_bias(r, bias, out)
    return out if mixed_bias is None else out + mixed_bias


def _in_budget_chunks(
    fn: Callable[..., Tensor], x: Tensor, weight: Tensor, bias: Tensor | None, r: Tensor, *conv_args, exporting: bool
) -> Tensor:
    """Run a per-sample-kernel strategy on batch chunks whose kernels fit ``auto.KERNEL_BUDGET_BYTES``.

    When autograd records, each chunk runs under activation checkpointing (Chen et al.,
    arXiv:1604.06174; ``torch.utils.checkpoint``): its kernels are freed after the
    forward and rebuilt one chunk at a time in the backward, so the budget bounds
    training too, for one extra kernel mixing and conv forward per chunk. Under export
    the batch is symbolic and the call runs whole.
    """
    if exporting:  # checked first: comparing the symbolic batch with chunk would guard on it
        return fn(x, weight, bias, r, *conv_args)
    chunk = max(1, auto.KERNEL_BUDGET_BYTES // per_sample_kernel_bytes(x, weight))
    if x.shape[0] <= chunk:
        return fn(x, weight, bias, r, *conv_args)
    records = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, r))
    outputs = [
        checkpoint(fn, xs, weight, bias, rs, *conv_args, use_reentrant=False)
        if records
        else fn(xs, weight, bias, rs, *conv_args)
        for xs, rs in zip(x.split(chunk), r.split(chunk))
    ]
    return torch.cat(outputs)


_STRATEGY_FNS: dict[str, Callable[..., Tensor]] = {
    "grouped": _grouped,
    "mixture": _mixture,
    "bmm": _bmm,
    "fused": fused,
}
_PER_SAMPLE_KERNELS = ("grouped", "bmm")


def _run(
    strategy: str, x: Tensor, weight: Tensor, bias: Tensor | None, r: Tensor, *conv_args, exporting: bool
) -> Tensor:
    """One call of a named strategy; those holding per-sample kernels stay within the memory budget
    (``exporting``: :func:`~.auto.is_exporting`, checked once by the caller)."""
    fn = _STRATEGY_FNS[strategy]
    if strategy in _PER_SAMPLE_KERNELS:
        return _in_budget_chunks(fn, x, weight, bias, r, *conv_args, exporting=exporting)
    return fn(x, weight, bias, r, *conv_args)


def condconv2d(
    x: Tensor,
    weight: Tensor,
    routing_weights: Tensor,
    bias: Tensor | None = None,
    stride: IntPair = 1,
    padding: Padding = 0,
    dilation: IntPair = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
    strategy: Strategy = "auto",
) -> Tensor:
    """Convolve each sample of ``x`` with its own mixture of expert kernels.

    Args:
        x: input ``[B, Cin, H, W]`` (any memory format), or unbatched ``[Cin, H, W]``
            with ``routing_weights`` of shape ``[K]``.
        weight: experts ``[K, Cout, Cin / groups, kh, kw]``.
        routing_weights: ``[B, K]``, the mixing coefficients of each sample.
        bias: per-expert bias ``[K, Cout]``, mixed with the same coefficients, or None.
        stride, padding, dilation, groups, padding_mode: as in ``nn.Conv2d``
            (``padding`` also takes ``'same'`` and ``'valid'``).
        strategy: ``'auto'``, ``'grouped'``, ``'mixture'``, ``'bmm'`` or ``'fused'``; all
            compute the same function.

    Returns:
        ``[B, Cout, H_out, W_out]``.

    Raises:
        ValueError: on shapes that do not fit together or unknown options.
    """
    return condconv2d_with_strategy(
        x, weight, routing_weights, bias, stride, padding, dilation, groups, padding_mode, strategy
    )[0]


def condconv2d_with_strategy(
    x: Tensor,
    weight: Tensor,
    routing_weights: Tensor,
    bias: Tensor | None = None,
    stride: IntPair = 1,
    padding: Padding = 0,
    dilation: IntPair = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
    strategy: Strategy = "auto",
) -> tuple[Tensor, str]:
    """:func:`condconv2d`, also returning the strategy that ran (for ``auto``, the one it chose).

    ``CondConv2d`` records it as ``last_strategy``.
    """
    if x.dim() == 3 and routing_weights.dim() == 1:  # unbatched input, as nn.Conv2d accepts
        output, strategy = condconv2d_with_strategy(
            x[None], weight, routing_weights[None], bias, stride, padding, dilation, groups, padding_mode, strategy
        )
        return output[0], strategy
    check_strategy(strategy)
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
    if x.dim() != 4:
        raise ValueError(f"condconv2d expects input of shape [B, C, H, W], got {tuple(x.shape)}")
    if weight.dim() != 5 or 0 in weight.shape:
        raise ValueError(
            f"weight must have shape [K, Cout, Cin/groups, kh, kw], none of them 0, got {tuple(weight.shape)}"
        )
    num_experts, out_channels, in_per_group = weight.shape[:3]
    if groups < 1 or out_channels % groups or x.shape[1] != in_per_group * groups:
        raise ValueError(
            f"input has {x.shape[1]} channels but weight {tuple(weight.shape)} with groups={groups} expects "
            f"{in_per_group * groups} (and Cout divisible by groups)"
        )
    if routing_weights.shape != (x.shape[0], num_experts):
        raise ValueError(
            f"routing_weights must have shape [B, K] = [{x.shape[0]}, {num_experts}], "
            f"got {tuple(routing_weights.shape)}"
        )
    if bias is not None and bias.shape != (num_experts, out_channels):
        raise ValueError(f"bias must have shape [K, Cout] = [{num_experts}, {out_channels}], got {tuple(bias.shape)}")

    kernel_size = (weight.shape[3], weight.shape[4])
    stride, dilation = pair(stride, "stride", positive=True), pair(dilation, "dilation", positive=True)
    if padding == "same" and stride != (1, 1):
        raise ValueError("padding='same' is not supported for strided convolutions (as in nn.Conv2d)")
    left, right, top, bottom = explicit_padding(kernel_size, padding, dilation)
    if padding_mode != "zeros" or left != right or top != bottom:
        if left or right or top or bottom:
            x = F.pad(x, (left, right, top, bottom), mode=_PAD_MODE[padding_mode])
        conv_padding = (0, 0)
    else:
        conv_padding = (top, left)

    conv_args = (stride, conv_padding, dilation, groups)
    exporting = is_exporting()  # once per call: it costs more than the cached tuner's lookup
    if exporting:  # checked first: the batch may be symbolic, and comparing it would guard on it
        if strategy in ("auto", "fused", "grouped"):
            # Exported graphs must not need Triton, nor hold the traced batch in grouped's groups.
            strategy = auto.choose_strategy(x, weight, *conv_args)
    elif x.shape[0] == 0:  # as nn.Conv2d: an empty output; grouped would need 0 groups
        strategy = "mixture"
    elif strategy == "auto":

        def timed(name: str, *tensors: Tensor | None) -> Tensor:  # what the tuner times: never under export
            return _run(name, *tensors, *conv_args, exporting=False)

        strategy = tuned_strategy(x, weight, bias, routing_weights, *conv_args, run=timed)
    return _run(strategy, x, weight, bias, routing_weights, *conv_args, exporting=exporting), strategy
