"""The ``fused`` strategy: CondConv as Triton kernels that mix the experts on-chip.

CondConv (Yang et al., NeurIPS 2019, arXiv:1904.04971) convolves sample ``b`` with
``W_b = sum_k r[b, k] E_k``. The kernels of :mod:`.fused_kernels` are implicit GEMMs
that build each tile of ``W_b`` in registers from the K expert tiles, so neither the
forward nor the backward stores B per-sample kernels or their gradients:

- forward: ``y_b = conv(x_b, W_b) + r_b @ bias``;
- input gradient: ``dx_b = conv_transpose(dy_b, W_b)``;
- expert and routing gradients: per-sample tiles ``G_b`` of ``wgrad(x_b, dy_b)`` are
  reduced on-chip into ``dE_k = sum_b r[b, k] G_b`` and ``dr[b, k] = <E_k, G_b>``;
- bias: ``dbias_k = sum_b r[b, k] sum_hw dy_b`` and ``dr[b, k] += <bias_k, sum_hw dy_b>``,
  small enough for plain torch.

The convolution is one ``torch.library.custom_op`` with a fake (meta) implementation
and an autograd formula whose backward calls two more custom ops, so ``torch.compile``
traces it without graph breaks. Exported graphs never contain it: ``condconv2d`` runs
``auto`` instead under export, because ONNX and ``torch.export`` consumers cannot run
Triton.

Scope: dense and grouped convolutions (not depthwise), any kernel size, stride and
dilation, symmetric zero padding (``condconv2d`` applies any other padding first),
NCHW or NHWC input, float32 (TF32 when ``torch.backends.cudnn.allow_tf32`` allows it,
as for ``F.conv2d``), bfloat16 and float16 with float32 accumulation. Runs on CUDA
tensors, or on CPU tensors through the Triton interpreter when ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence

import torch
from torch import Tensor

from .auto import compute_dtype

_MAX_WEIGHT_GRAD_CHUNKS = 16
"""Most batch chunks the weight gradient is split into (each a K x P float32 partial sum)."""


def interpreting() -> bool:
    """Whether Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``), read as Triton reads it."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes", "y")


FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""What the Triton kernels compute in (accumulating in float32)."""


def check_fused(x: Tensor, groups: int) -> None:
    """Raise a one-line error if the ``fused`` strategy cannot run on ``x`` with these ``groups``."""
    has_triton = importlib.util.find_spec("triton") is not None
    if not has_triton or not (x.is_cuda or interpreting()):
        raise RuntimeError(
            "strategy='fused' needs triton and a CUDA tensor (or TRITON_INTERPRET=1 to run CPU tensors through "
            f"Triton's interpreter); got a {x.device.type} tensor"
            + ("" if has_triton else " and triton is not installed")
        )
    if groups > 1 and groups == x.shape[1]:
        raise ValueError(
            "strategy='fused' does not support depthwise convolutions (groups == in_channels); use 'grouped'"
        )
    if compute_dtype(x) not in FUSED_DTYPES:  # its tiles accumulate in float32: float64 would lose its precision
        raise ValueError(
            f"strategy='fused' computes in float32, bfloat16 or float16, got {compute_dtype(x)}; "
            "use 'grouped' or 'auto'"
        )


def _kernels():
    from .fused_kernels import kernels

    return kernels(interpreting())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _channels_last(x: Tensor) -> bool:
    return x.shape[1] > 1 and x.is_contiguous(memory_format=torch.channels_last)


def _like_input(x: Tensor, shape: Sequence[int]) -> Tensor:
    """An empty tensor of ``shape`` with ``x``'s dtype, device and memory format (NHWC stays NHWC)."""
    fmt = torch.channels_last if _channels_last(x) else torch.contiguous_format
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt)


def _output_size(x: Tensor, weight: Tensor, stride, padding, dilation) -> tuple[int, int]:
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = weight.shape[-2:], stride, padding, dilation
    return (x.shape[2] + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (x.shape[3] + 2 * pw - dw * (kw - 1) - 1) // sw + 1


def _precision(x: Tensor) -> str:
    """TF32 for float32 dots where ``F.conv2d`` would use it too (the cuDNN flag), else exact."""
    return "tf32" if x.is_cuda and x.dtype == torch.float32 and torch.backends.cudnn.allow_tf32 else "ieee"


def _constexprs(x: Tensor, weight: Tensor, stride, padding, dilation) -> dict:
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    return dict(
        SH=sh,
        SW=sw,
        PH=ph,
        PW=pw,
        DH=dh,
        DW=dw,
        KH=weight.shape[3],
        KW=weight.shape[4],
        CHANNELS_INNER=_channels_last(x),
        PRECISION=_precision(x),
    )


@torch.library.custom_op("condconv_lightning::fused_condconv2d", mutates_args=())
def fused_condconv2d(
    x: Tensor,
    weight: Tensor,
    routing_weights: Tensor,
    bias: Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> Tensor:
    """``y_b = conv2d(x_b, sum_k r[b, k] E_k, r_b @ bias)`` with the experts mixed on-chip.

    ``weight`` is ``[K, Cout, Cin/groups, kh, kw]``, ``routing_weights`` ``[B, K]``,
    ``bias`` ``[K, Cout]`` or None; all of one dtype; padding is symmetric zero padding.
    """
    batch, _, height, width = x.shape
    num_experts, out_channels, in_per_group = weight.shape[:3]
    out_h, out_w = _output_size(x, weight, stride, padding, dilation)
    y = _like_input(x, (batch, out_channels, out_h, out_w))
    weight, r = weight.contiguous(), routing_weights.contiguous()
    bias_arg = bias.contiguous() if bias is not None else r

    def grid(meta: dict) -> tuple[int, int, int]:
        return _cdiv(out_h * out_w, meta["BLOCK_M"]), _cdiv(out_channels // groups, meta["BLOCK_N"]), batch * groups

    _kernels().forward(
        grid,
        x,
        weight,
        r,
        bias_arg,
        y,
        height,
        width,
        out_h,
        out_w,
        groups,
        in_per_group,
        out_channels // groups,
        num_experts,
        *x.stride(),
        *y.stride(),
        HAS_BIAS=bias is not None,
        **_constexprs(x, weight, stride, padding, dilation),
    )
    return y


@fused_condconv2d.register_fake
def _(x, weight, routing_weights, bias, stride, padding, dilation, groups):
    out_h, out_w = _output_size(x, weight, stride, padding, dilation)
    return _like_input(x, (x.shape[0], weight.shape[1], out_h, out_w))


@torch.library.custom_op("condconv_lightning::fused_condconv2d_input_grad", mutates_args=())
def fused_input_grad(
    grad: Tensor,
    x: Tensor,
    weight: Tensor,
    routing_weights: Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> Tensor:
    """``dx_b = conv_transpose2d(dy_b, sum_k r[b, k] E_k)``; ``x`` gives the shape and memory format only."""
    batch, _, height, width = x.shape
    num_experts, out_channels, in_per_group = weight.shape[:3]
    out_h, out_w = grad.shape[-2:]
    dx = _like_input(x, x.shape)
    weight, r = weight.contiguous(), routing_weights.contiguous()

    def grid(meta: dict) -> tuple[int, int, int]:
        return _cdiv(height * width, meta["BLOCK_M"]), _cdiv(in_per_group, meta["BLOCK_N"]), batch * groups

    _kernels().input_grad(
        grid,
        grad,
        weight,
        r,
        dx,
        height,
        width,
        out_h,
        out_w,
        groups,
        in_per_group,
        out_channels // groups,
        num_experts,
        *grad.stride(),
        *dx.stride(),
        **_constexprs(x, weight, stride, padding, dilation),
    )
    return dx


@fused_input_grad.register_fake
def _(grad, x, weight, routing_weights, stride, padding, dilation, groups):
    return _like_input(x, x.shape)


@torch.library.custom_op("condconv_lightning::fused_condconv2d_weight_grad", mutates_args=())
def fused_weight_grad(
    grad: Tensor,
    x: Tensor,
    weight: Tensor,
    routing_weights: Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> tuple[Tensor, Tensor]:
    """``(dE, dr)`` with ``dE_k = sum_b r[b, k] G_b`` and ``dr[b, k] = <E_k, G_b>``, ``G_b = wgrad(x_b, dy_b)``.

    ``dE`` has the experts' dtype; ``dr`` stays float32 until the bias term is added.

    Deterministic: each program owns its tile of ``dE`` for a chunk of the batch; the
    chunks' float32 partial sums and the tiles' partial ``dr`` are summed here.
    """
    batch, _, height, width = x.shape
    num_experts, out_channels, in_per_group, kh, kw = weight.shape
    out_h, out_w = grad.shape[-2:]
    launch = _kernels()
    cout_g, red = out_channels // groups, in_per_group * kh * kw
    min_m, min_n = launch.min_weight_grad_tile
    max_tiles = groups * _cdiv(cout_g, min_m) * _cdiv(red, min_n)
    # Enough programs to fill the GPU (a few per SM), at most one chunk per sample; two
    # under the interpreter, so that small shapes there exercise the sum over chunks.
    programs = 4 * torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 2
    chunks = max(1, min(batch, _MAX_WEIGHT_GRAD_CHUNKS, _cdiv(programs, max_tiles)))
    per_chunk = _cdiv(batch, chunks)
    chunks = _cdiv(batch, per_chunk)
    weight, r = weight.contiguous(), routing_weights.contiguous()
    dw_part = torch.empty((chunks, *weight.shape), dtype=torch.float32, device=x.device)
    dr_part = torch.zeros((max_tiles, batch, num_experts), dtype=torch.float32, device=x.device)

    def grid(meta: dict) -> tuple[int, int, int]:
        return _cdiv(cout_g, meta["BLOCK_M"]) * _cdiv(red, meta["BLOCK_N"]), groups, chunks

    launch.weight_grad(
        grid,
        x,
        grad,
        weight,
        r,
        dw_part,
        dr_part,
        batch,
        height,
        width,
        out_h,
        out_w,
        groups,
        in_per_group,
        cout_g,
        num_experts,
        per_chunk,
        *x.stride(),
        *grad.stride(),
        EXPERTS_POW2=max(1, 1 << (num_experts - 1).bit_length()),
        **_constexprs(x, weight, stride, padding, dilation),
    )
    return dw_part.sum(0).to(weight.dtype), dr_part.sum(0)


@fused_weight_grad.register_fake
def _(grad, x, weight, routing_weights, stride, padding, dilation, groups):
    return weight.new_empty(weight.shape), routing_weights.new_empty(routing_weights.shape, dtype=torch.float32)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, routing_weights, bias, stride, padding, dilation, groups = inputs
    ctx.save_for_backward(x, weight, routing_weights, bias)
    ctx.conv = (stride, padding, dilation, groups)


def _backward(ctx, grad: Tensor):
    x, weight, r, bias = ctx.saved_tensors
    needs_x, needs_weight, needs_r, needs_bias = ctx.needs_input_grad[:4]
    dx = fused_input_grad(grad, x, weight, r, *ctx.conv) if needs_x else None
    d_weight = dr = None
    if needs_weight or needs_r:
        d_weight, dr = fused_weight_grad(grad, x, weight, r, *ctx.conv)
    d_bias = None
    if bias is not None and (needs_bias or needs_r):
        grad_sum = grad.sum((2, 3), dtype=torch.float32)
        if needs_bias:
            d_bias = (r.to(torch.float32).t() @ grad_sum).to(bias.dtype)
        if needs_r:
            dr = dr + grad_sum @ bias.to(torch.float32).t()
    if dr is not None:
        dr = dr.to(r.dtype)
    return dx, d_weight, dr, d_bias, None, None, None, None


fused_condconv2d.register_autograd(_backward, setup_context=_setup_context)


def fused(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    routing_weights: Tensor,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
) -> Tensor:
    """The ``fused`` strategy with ``condconv2d``'s strategy signature.

    Casts every operand to the compute dtype first, as ``F.conv2d`` is cast under
    autocast (the custom op itself is not autocast-aware).
    """
    check_fused(x, groups)
    dtype = compute_dtype(x)
    x, weight, routing_weights = x.to(dtype), weight.to(dtype), routing_weights.to(dtype)
    bias = bias.to(dtype) if bias is not None else None
    return fused_condconv2d(x, weight, routing_weights, bias, list(stride), list(padding), list(dilation), groups)
