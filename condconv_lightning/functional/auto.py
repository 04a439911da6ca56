"""Rules by which the ``auto`` strategy picks how to execute a CondConv call without timing it.

With tuning on (the default), ``auto`` times the strategies once per problem instead
(:mod:`.autotune`); these rules then decide where nothing can be timed (tracing,
export, a new problem under ``torch.compile``), order the candidates, and decide
everything with tuning off (``set_tuning(False)``, ``CONDCONV_TUNE=0``).

The rules were chosen by measurement (``tools/bench_layers.py``, results and machine in
``docs/performance.md``) over ResNet-50 and EfficientNet-B0 convolutions,
guided by a cost model in P weights per expert, S output positions, B samples and K
experts (the static conv costs B*P*S multiply-adds; mixing the kernels adds B*K*P):

- exporting or tracing (``torch.export``, ONNX, ``torch.jit.trace``): ``grouped``
  would bake B into the graph's ``groups``, so 1x1 dense convs use ``bmm`` and
  everything else ``mixture``; both keep B symbolic.
- B = 1: ``grouped`` is one conv with the mixed kernel, the static conv's cost plus
  the K*P mixing; nothing is faster.
- 1x1 dense convs: ``bmm``, a batched matrix product that reads NCHW and NHWC
  without a copy (on CPU often faster than oneDNN's own 1x1 conv). In the suite run
  of docs/performance.md (2 CPU cores) it was the fastest strategy on every dense 1x1
  with a 7x7 output at B = 32, whose per-sample kernels are 3-42x their input,
  where ``mixture`` ran 1.2-10.6x slower.
- depthwise and other grouped convs: ``grouped`` (``mixture`` multiplies the tiny
  depthwise conv by K, ``bmm`` goes through a k^2-times ``unfold``).
- other k x k convs: ``grouped`` while the per-sample kernels are not much larger
  than the activations (S large: ResNet-50 layer1..layer3); ``mixture`` when they
  are (layer4 has 2.4M weights per sample for 49 positions, 94x its input), and
  when the input is channels_last, which ``grouped`` would have to copy to NCHW.
  The layer4 rule comes from an earlier, smaller measurement; in the suite run
  (glibc's malloc keeping freed memory) ``grouped`` beat ``mixture`` there in 7 of 8 cells with
  B > 1 and ``bmm`` was within 1.29x of the fastest in all 8 (``mixture`` up to
  3.8x off). Tuned ``auto`` times all three; the rules stand as measured in the
  rules-only columns of docs/performance.md.

Memory budget: ``grouped`` and ``bmm`` materialize B per-sample kernels (and, in
training, their gradient). A call whose kernels would exceed
:data:`KERNEL_BUDGET_BYTES` runs in batch chunks that each fit it, recomputing each
chunk in the backward (see ``condconv.py``), so no call holds more than the budget of
per-sample kernels; ``mixture`` holds none.

``fused`` (Triton kernels that mix the experts on-chip, :mod:`.fused`) is opt-in: no rule
picks it until it has been measured on a GPU against the strategies above.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

KERNEL_BUDGET_BYTES: int = 256 * 2**20
"""Most bytes of per-sample kernels (B * Cout * Cin/groups * kh * kw elements) one call may hold at once."""

_SMALL_KERNEL_RATIO = 32.0
"""``grouped`` beats ``mixture`` on k x k dense convs while a sample's kernel has at most
this many times as many elements as its input (fitted on 2 CPU cores: ResNet-50 layer1
0.2x, layer2 1.5x, layer3 12x yes; layer4 94x no; the module docstring says what the
suite run found at layer4)."""


def is_exporting() -> bool:
    """True under ``torch.export``/dynamo export, ONNX export or TorchScript tracing."""
    return torch.compiler.is_exporting() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the convolution's matrix products run in: autocast's when it is on (autocast
    leaves float64 alone)."""
    dtype = x.dtype
    if dtype == torch.float64:
        return dtype
    device_type = x.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return dtype


def per_sample_kernel_bytes(x: Tensor, weight: Tensor) -> int:
    """Bytes of one sample's mixed kernel ``[Cout, Cin/groups, kh, kw]`` in the compute dtype."""
    return weight[0].numel() * compute_dtype(x).itemsize  # complex: two floats per element


def choose_strategy(
    x: Tensor,
    weight: Tensor,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
) -> str:
    """Name of the strategy ``auto`` uses for this call (input already padded if needed)."""
    kh, kw = weight.shape[-2:]
    pointwise = (kh, kw) == (1, 1) and groups == 1
    if is_exporting():
        return "bmm" if pointwise else "mixture"
    return rules_choice(
        x.shape[0],
        x.shape[1:].numel(),
        weight.shape[1:].numel(),
        groups,
        pointwise,
        lambda: x.is_contiguous(memory_format=torch.channels_last) and x.shape[1] > 1,
    )


def rules_choice(
    batch: int, sample: int, kernel: int, groups: int, pointwise: bool, channels_last: Callable[[], bool]
) -> str:
    """The rules outside export, from the call's sizes: what :func:`choose_strategy` decides, and what a
    tuning-cache key is checked against (``sample``: elements of one sample of the input; ``kernel``: of one
    expert; ``channels_last``: asked only where it matters, since a traced call guards on what it asks)."""
    if batch == 1 or groups > 1:
        return "grouped"
    if pointwise:
        return "bmm"
    small_kernel = kernel <= _SMALL_KERNEL_RATIO * sample
    return "grouped" if small_kernel and not channels_last() else "mixture"
