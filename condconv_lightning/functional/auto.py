"""Rules by which the ``auto`` strategy picks how to execute a CondConv call.

First rules, from the FLOP model of ``../shared/DESIGN.md`` section 2 (grouped and
bmm cost the static conv plus the kernel mixing; mixture costs K static convs):
1x1 convolutions without groups are plain batched matrix products (``bmm``);
everything else uses ``grouped``. The performance work retunes these by measurement.
"""

from __future__ import annotations

from torch import Tensor


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
    if (kh, kw) == (1, 1) and groups == 1:
        return "bmm"
    return "grouped"
