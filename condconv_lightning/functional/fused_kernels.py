"""Triton kernels of the ``fused`` strategy: implicit-GEMM convolutions that mix CondConv experts on-chip.

CondConv (Yang et al., NeurIPS 2019, arXiv:1904.04971) convolves sample ``b`` with
``W_b = sum_k r[b, k] E_k``. Materializing the B kernels ``W_b`` (and, in training,
their gradients) is what makes ``grouped`` and ``bmm`` slow on small feature maps, where
``mixture`` pays K times the convolution instead. These
kernels are implicit GEMMs (the convolution as a matrix product whose operand tiles are
gathered from the image on the fly, no ``unfold`` in memory) in which every program
serves one sample, so it builds its weight tile as ``sum_k r[b, k] E_k[tile]`` in
registers and nothing B x P ever reaches memory:

- ``_forward``: ``y_b = conv(x_b, W_b) + r_b @ bias``; M = output positions,
  N = output channels, reduction over (input channel, kernel row, kernel column).
- ``_input_grad``: ``dx_b = conv_transpose(dy_b, W_b)`` as a gather over input
  positions; with stride s only 1/s^2 of the gathered (position, tap) pairs are
  non-zero, so strided layers pay up to s^2 x the dense work here.
- ``_weight_grad``: per-sample tiles ``G_b = wgrad(x_b, dy_b)`` stay on-chip; the
  epilogue adds ``r[b, k] G_b`` into K register accumulators (written once per
  program, into a per-batch-chunk buffer that the caller sums: deterministic, no
  atomics) and writes ``<E_k, G_b>`` restricted to the tile, summed by the caller
  into ``dr[b, k]``.

Every tensor is addressed through its strides, so NCHW and NHWC (channels_last) inputs
are read in place. ``CHANNELS_INNER`` orders the flattened reduction index with the
channel innermost, which makes NHWC gathers contiguous; NCHW gathers are contiguous
only along output positions (stride 1), not along the reduction.

``kernels(interpret)`` returns the launchers: compiled and autotuned over a few tile
shapes for CUDA tensors, or the Triton interpreter with one small tile shape (numpy on
the CPU, for tests) when ``TRITON_INTERPRET=1``. This module imports triton; import it
only after checking that triton is installed.
"""

import functools
from collections.abc import Callable
from types import SimpleNamespace

import triton
import triton.language as tl
from triton.runtime.jit import JITFunction


def _add(a, b):
    return a + b


# The kernels use Triton builtins only, never its ``@triton.jit`` library functions (``tl.zeros``,
# ``tl.sum``, ``tl.cdiv``): those are compiled or interpreted depending on TRITON_INTERPRET at the
# time triton was imported, so referencing them would tie both modes to that moment (and the
# interpreter, once it has called one, leaves the language patched for numpy, breaking every
# later compiled kernel in the process). The sum combiner is therefore built here, compiled.
_ADD = JITFunction(_add)


def _forward(
    x_ptr, w_ptr, r_ptr, bias_ptr, y_ptr,
    H, W, OH, OW, G, CIN_G, COUT_G, NUM_EXPERTS,
    sxb, sxc, sxh, sxw, syb, syc, syh, syw,
    SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    DH: tl.constexpr, DW: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    HAS_BIAS: tl.constexpr, CHANNELS_INNER: tl.constexpr, PRECISION: tl.constexpr, INTERPRETER: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_bg = tl.program_id(2)
    b = pid_bg // G
    g = pid_bg % G
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < OH * OW
    oh = offs_m // OW
    ow = offs_m % OW
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < COUT_G
    co = g * COUT_G + offs_n
    red = CIN_G * KH * KW
    expert_stride = G * COUT_G * red
    x_base = x_ptr + b.to(tl.int64) * sxb + (g * CIN_G).to(tl.int64) * sxc
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for j0 in range(0, red, BLOCK_K):
        j = j0 + tl.arange(0, BLOCK_K)
        j_mask = j < red
        if CHANNELS_INNER:
            c = j % CIN_G
            kh = j // CIN_G // KW
            kw = j // CIN_G % KW
        else:
            c = j // (KH * KW)
            kh = j // KW % KH
            kw = j % KW
        ih = oh[:, None] * SH - PH + kh[None, :] * DH
        iw = ow[:, None] * SW - PW + kw[None, :] * DW
        x_mask = m_mask[:, None] & j_mask[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        x_tile = tl.load(x_base + c[None, :] * sxc + ih * sxh + iw * sxw, mask=x_mask, other=0.0)
        w_offs = co[None, :] * red + (c * (KH * KW) + kh * KW + kw)[:, None]
        w_mask = j_mask[:, None] & n_mask[None, :]
        w_tile = tl.full((BLOCK_K, BLOCK_N), 0.0, tl.float32)
        for e in range(NUM_EXPERTS):
            r_be = tl.load(r_ptr + b * NUM_EXPERTS + e).to(tl.float32)
            w_tile += r_be * tl.load(w_ptr + e * expert_stride + w_offs, mask=w_mask, other=0.0).to(tl.float32)
        if INTERPRETER:  # its tl.dot multiplies the raw bits of bfloat16 operands
            x_tile = x_tile.to(tl.float32)
        acc = tl.dot(x_tile, w_tile.to(x_tile.dtype), acc, input_precision=PRECISION)
    if HAS_BIAS:
        mixed_bias = tl.full((BLOCK_N,), 0.0, tl.float32)
        for e in range(NUM_EXPERTS):
            r_be = tl.load(r_ptr + b * NUM_EXPERTS + e).to(tl.float32)
            mixed_bias += r_be * tl.load(bias_ptr + e * G * COUT_G + co, mask=n_mask, other=0.0).to(tl.float32)
        acc += mixed_bias[None, :]
    y_offs = b.to(tl.int64) * syb + co[None, :] * syc + oh[:, None] * syh + ow[:, None] * syw
    tl.store(y_ptr + y_offs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def _input_grad(
    dy_ptr, w_ptr, r_ptr, dx_ptr,
    H, W, OH, OW, G, CIN_G, COUT_G, NUM_EXPERTS,
    sdb, sdc, sdh, sdw, sxb, sxc, sxh, sxw,
    SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    DH: tl.constexpr, DW: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    CHANNELS_INNER: tl.constexpr, PRECISION: tl.constexpr, INTERPRETER: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_bg = tl.program_id(2)
    b = pid_bg // G
    g = pid_bg % G
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < H * W
    ih = offs_m // W
    iw = offs_m % W
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < CIN_G
    red = COUT_G * KH * KW
    expert_stride = G * COUT_G * CIN_G * KH * KW
    dy_base = dy_ptr + b.to(tl.int64) * sdb + (g * COUT_G).to(tl.int64) * sdc
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for j0 in range(0, red, BLOCK_K):
        j = j0 + tl.arange(0, BLOCK_K)
        j_mask = j < red
        if CHANNELS_INNER:
            o = j % COUT_G
            kh = j // COUT_G // KW
            kw = j // COUT_G % KW
        else:
            o = j // (KH * KW)
            kh = j // KW % KH
            kw = j % KW
        # Output position (oh, ow) reads input (ih, iw) through tap (kh, kw) iff oh * SH - PH + kh * DH = ih.
        th = ih[:, None] + PH - kh[None, :] * DH
        tw = iw[:, None] + PW - kw[None, :] * DW
        oh = th // SH
        ow = tw // SW
        dy_mask = (m_mask[:, None] & j_mask[None, :] & (th >= 0) & (tw >= 0)
                   & (th % SH == 0) & (tw % SW == 0) & (oh < OH) & (ow < OW))
        dy_tile = tl.load(dy_base + o[None, :] * sdc + oh * sdh + ow * sdw, mask=dy_mask, other=0.0)
        w_offs = ((g * COUT_G + o) * (CIN_G * KH * KW) + kh * KW + kw)[:, None] + offs_n[None, :] * (KH * KW)
        w_mask = j_mask[:, None] & n_mask[None, :]
        w_tile = tl.full((BLOCK_K, BLOCK_N), 0.0, tl.float32)
        for e in range(NUM_EXPERTS):
            r_be = tl.load(r_ptr + b * NUM_EXPERTS + e).to(tl.float32)
            w_tile += r_be * tl.load(w_ptr + e * expert_stride + w_offs, mask=w_mask, other=0.0).to(tl.float32)
        if INTERPRETER:
            dy_tile = dy_tile.to(tl.float32)
        acc = tl.dot(dy_tile, w_tile.to(dy_tile.dtype), acc, input_precision=PRECISION)
    dx_offs = (b.to(tl.int64) * sxb + (g * CIN_G + offs_n)[None, :] * sxc + ih[:, None] * sxh + iw[:, None] * sxw)
    tl.store(dx_ptr + dx_offs, acc.to(dx_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def _weight_grad(
    x_ptr, dy_ptr, w_ptr, r_ptr, dw_part_ptr, dr_part_ptr,
    B, H, W, OH, OW, G, CIN_G, COUT_G, NUM_EXPERTS, SAMPLES_PER_CHUNK,
    sxb, sxc, sxh, sxw, sdb, sdc, sdh, sdw,
    SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    DH: tl.constexpr, DW: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    CHANNELS_INNER: tl.constexpr, PRECISION: tl.constexpr, INTERPRETER: tl.constexpr, EXPERTS_POW2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_t = tl.program_id(0)
    g = tl.program_id(1)
    chunk = tl.program_id(2)
    red = CIN_G * KH * KW
    tiles_n = (red + BLOCK_N - 1) // BLOCK_N
    pid_m = pid_t // tiles_n
    pid_n = pid_t % tiles_n
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < COUT_G
    co = g * COUT_G + offs_m
    j = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    j_mask = j < red
    if CHANNELS_INNER:
        c = j % CIN_G
        kh = j // CIN_G // KW
        kw = j // CIN_G % KW
    else:
        c = j // (KH * KW)
        kh = j // KW % KH
        kw = j % KW
    expert_stride = G * COUT_G * red
    e_offs = co[:, None] * red + (c * (KH * KW) + kh * KW + kw)[None, :]
    tile_mask = m_mask[:, None] & j_mask[None, :]
    experts = tl.arange(0, EXPERTS_POW2)
    e_mask = experts < NUM_EXPERTS
    e_tile_offs = experts[:, None, None] * expert_stride + e_offs[None, :, :]
    e_tile_mask = e_mask[:, None, None] & tile_mask[None, :, :]
    tile_id = g * tl.num_programs(0) + pid_t
    acc = tl.full((EXPERTS_POW2, BLOCK_M, BLOCK_N), 0.0, tl.float32)
    first = chunk * SAMPLES_PER_CHUNK
    for b in range(first, tl.minimum(first + SAMPLES_PER_CHUNK, B)):
        b64 = tl.cast(b, tl.int64)
        x_base = x_ptr + b64 * sxb + (g * CIN_G).to(tl.int64) * sxc
        dy_base = dy_ptr + b64 * sdb
        g_b = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
        for s0 in range(0, OH * OW, BLOCK_K):
            s = s0 + tl.arange(0, BLOCK_K)
            s_mask = s < OH * OW
            oh = s // OW
            ow = s % OW
            dy_tile = tl.load(dy_base + co[:, None] * sdc + oh[None, :] * sdh + ow[None, :] * sdw,
                              mask=m_mask[:, None] & s_mask[None, :], other=0.0)
            ih = oh[:, None] * SH - PH + kh[None, :] * DH
            iw = ow[:, None] * SW - PW + kw[None, :] * DW
            x_mask = s_mask[:, None] & j_mask[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            x_tile = tl.load(x_base + c[None, :] * sxc + ih * sxh + iw * sxw, mask=x_mask, other=0.0)
            if INTERPRETER:
                dy_tile, x_tile = dy_tile.to(tl.float32), x_tile.to(tl.float32)
            g_b = tl.dot(dy_tile, x_tile, g_b, input_precision=PRECISION)
        r_b = tl.load(r_ptr + b * NUM_EXPERTS + experts, mask=e_mask, other=0.0).to(tl.float32)
        acc += r_b[:, None, None] * g_b[None, :, :]
        e_tile = tl.load(w_ptr + e_tile_offs, mask=e_tile_mask, other=0.0).to(tl.float32)
        dr_b = e_tile * g_b[None, :, :]
        if INTERPRETER:  # the interpreter runs a custom combiner element by element: halve the tile instead
            dr_b = tl.reshape(dr_b, (EXPERTS_POW2, BLOCK_M * BLOCK_N))
            while dr_b.shape[1] > 1:
                low, high = tl.split(tl.reshape(dr_b, (EXPERTS_POW2, dr_b.shape[1] // 2, 2)))
                dr_b = low + high
            dr_b = tl.reshape(dr_b, (EXPERTS_POW2,))
        else:
            dr_b = tl.reduce(tl.reduce(dr_b, 2, _ADD), 1, _ADD)
        tl.store(dr_part_ptr + (tile_id * B + b) * NUM_EXPERTS + experts, dr_b, mask=e_mask)
    tl.store(dw_part_ptr + chunk.to(tl.int64) * NUM_EXPERTS * expert_stride + e_tile_offs, acc, mask=e_tile_mask)


_WEIGHT_GRAD_REGISTERS = 8192
"""Most fp32 values of the weight-gradient kernel's K expert accumulators (EXPERTS_POW2 x BLOCK_M x BLOCK_N)
one program may hold; larger tiles would spill registers."""

_TILES = [
    # BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages
    (64, 64, 32, 4, 3),
    (128, 64, 32, 8, 3),
    (64, 128, 32, 8, 3),
    (128, 128, 32, 8, 3),
    (32, 64, 64, 4, 4),
    (64, 32, 64, 4, 4),
    (32, 32, 32, 4, 4),
]
_WEIGHT_GRAD_TILES = [
    (32, 32, 64, 4, 3),
    (64, 32, 64, 4, 3),
    (32, 64, 64, 4, 3),
    (64, 64, 32, 4, 3),
    (16, 32, 64, 4, 3),
    (16, 16, 64, 2, 3),
]
_SMALLEST_WEIGHT_GRAD_TILE = min(_WEIGHT_GRAD_TILES, key=lambda tile: tile[0] * tile[1])
"""The weight gradient's tile when K is so large that no other fits the registers."""

_INTERPRETER_TILE = {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 64}
_INTERPRETER_WEIGHT_GRAD_TILE = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64}
"""Single tiles under TRITON_INTERPRET=1: autotuning in the numpy interpreter would cost minutes, and
fewer, larger tiles run faster there (every program runs one after another)."""

_SHAPE_KEY = ["H", "W", "OH", "OW", "G", "CIN_G", "COUT_G", "NUM_EXPERTS", "KH", "KW", "SH", "SW", "CHANNELS_INNER"]


def _configs(tiles: list[tuple[int, int, int, int, int]]) -> list[triton.Config]:
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=warps, num_stages=stages)
        for m, n, k, warps, stages in tiles
    ]


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Cap num_warps at 4 for 3x3 kernels, and keep the K accumulators of the weight gradient in registers.

    Triton miscompiled inductor's 3x3 implicit-GEMM template at num_warps=8; capping the
    warps at 4 for 3x3 is the fix PyTorch adopted, applied here to every 3x3 config.
    """
    args = {**named_args, **kwargs}
    experts = args.get("EXPERTS_POW2")
    kept, seen = [], set()
    for config in configs:
        warps = min(config.num_warps, 4) if (args["KH"], args["KW"]) == (3, 3) else config.num_warps
        tile = config.kwargs
        if experts is not None and experts * tile["BLOCK_M"] * tile["BLOCK_N"] > _WEIGHT_GRAD_REGISTERS:
            continue
        signature = (tuple(sorted(tile.items())), warps, config.num_stages)
        if signature not in seen:
            seen.add(signature)
            kept.append(triton.Config(dict(tile), num_warps=warps, num_stages=config.num_stages))
    return kept or _configs([_SMALLEST_WEIGHT_GRAD_TILE])


def _bind(kernel: object, tile: dict | None, interpreter: bool) -> Callable:
    """A launcher ``launch(grid, *args, **constexprs)``, ``grid`` mapping the tile sizes to the launch grid.

    ``tile`` fixes the tile sizes; None leaves them to the autotuner.
    """

    def launch(grid: Callable[[dict], tuple], *args, **constexprs) -> None:
        if tile is None:
            kernel[grid](*args, **constexprs, INTERPRETER=interpreter)
        else:
            kernel[grid(tile)](*args, **constexprs, **tile, INTERPRETER=interpreter)

    return launch


@functools.cache
def kernels(interpret: bool) -> SimpleNamespace:
    """Launchers ``forward``, ``input_grad``, ``weight_grad``, and ``min_weight_grad_tile``.

    ``min_weight_grad_tile`` (BLOCK_M, BLOCK_N) bounds the number of weight-gradient
    programs, which sizes the routing-gradient partial buffer before the autotuner has
    chosen a tile. ``INTERPRETER`` switches on two workarounds: the interpreter computes
    ``tl.dot`` on the raw bits of bfloat16 operands, so there they are cast to float32
    first (exact for products of bfloat16 and float16 numbers); and it runs ``tl.reduce``
    with a custom combiner element by element, so the routing-gradient sum halves the
    tile with builtins instead.
    """
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction

        return SimpleNamespace(
            forward=_bind(InterpretedFunction(_forward), _INTERPRETER_TILE, True),
            input_grad=_bind(InterpretedFunction(_input_grad), _INTERPRETER_TILE, True),
            weight_grad=_bind(InterpretedFunction(_weight_grad), _INTERPRETER_WEIGHT_GRAD_TILE, True),
            min_weight_grad_tile=(_INTERPRETER_WEIGHT_GRAD_TILE["BLOCK_M"], _INTERPRETER_WEIGHT_GRAD_TILE["BLOCK_N"]),
        )
    prune = {"early_config_prune": _prune}
    forward = triton.autotune(_configs(_TILES), key=_SHAPE_KEY, prune_configs_by=prune)(JITFunction(_forward))
    input_grad = triton.autotune(_configs(_TILES), key=_SHAPE_KEY, prune_configs_by=prune)(JITFunction(_input_grad))
    weight_grad = triton.autotune(
        _configs(_WEIGHT_GRAD_TILES), key=[*_SHAPE_KEY, "B"], prune_configs_by=prune, reset_to_zero=["dr_part_ptr"]
    )(JITFunction(_weight_grad))
    return SimpleNamespace(
        forward=_bind(forward, None, False),
        input_grad=_bind(input_grad, None, False),
        weight_grad=_bind(weight_grad, None, False),
        min_weight_grad_tile=_SMALLEST_WEIGHT_GRAD_TILE[:2],
    )
