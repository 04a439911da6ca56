"""Performance rules of CondConv execution: what ``auto`` picks, the per-sample-kernel
memory budget (chunking must not change results), and the channels_last / AMP hot paths.

Speed itself is measured by ``tools/bench_layers.py``, never timed here.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import condconv_lightning.functional.auto as auto
import condconv_lightning.functional.condconv as condconv
from condconv_lightning import CondConv2d
from condconv_lightning.functional import choose_strategy, condconv2d

# (name, Cin, Cout, k, groups, H=W, batch, channels_last, expected) - shapes of the benchmark suite
RULES = [
    ("r50.layer1.3x3", 64, 64, 3, 1, 56, 32, False, "grouped"),
    ("r50.layer2.3x3", 128, 128, 3, 1, 28, 32, False, "grouped"),
    ("r50.layer3.3x3", 256, 256, 3, 1, 14, 32, False, "grouped"),
    ("r50.layer4.3x3 (kernel 94x input)", 512, 512, 3, 1, 7, 32, False, "mixture"),
    ("r50.layer1.3x3 channels_last", 64, 64, 3, 1, 56, 32, True, "mixture"),
    ("r50.layer3.3x3 B=128 (chunked)", 256, 256, 3, 1, 14, 128, False, "grouped"),
    ("r50.layer3.1x1", 1024, 256, 1, 1, 14, 32, False, "bmm"),
    ("r50.layer3.1x1 channels_last", 1024, 256, 1, 1, 14, 32, True, "bmm"),
    ("r50.layer3.1x1 expansion (kernel 5.2x input)", 256, 1024, 1, 1, 14, 32, False, "bmm"),
    ("r50.layer4.1x1 (kernel 10x input)", 2048, 512, 1, 1, 7, 128, False, "bmm"),
    ("r50.layer2.1x1", 512, 128, 1, 1, 28, 128, False, "bmm"),
    ("effb0.dw3x3", 144, 144, 3, 144, 56, 32, False, "grouped"),
    ("r50.layer4.3x3 B=1", 512, 512, 3, 1, 7, 1, False, "grouped"),
    ("effb0.pw1x1 B=1", 240, 40, 1, 1, 28, 1, True, "grouped"),
]


def meta_call(cin, cout, k, groups, size, batch, channels_last, experts=4):
    """Arguments of choose_strategy on the meta device: shapes without memory."""
    x = torch.empty(batch, cin, size, size, device="meta")
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.empty(experts, cout, cin // groups, k, k, device="meta")
    return x, weight, (1, 1), (k // 2, k // 2), (1, 1), groups


def test_dense_pointwise_convs_use_bmm_whatever_the_kernel_size_and_experts():
    for cin, cout in ((2048, 512), (512, 2048), (192, 1152)):
        for experts in (4, 8):
            assert choose_strategy(*meta_call(cin, cout, 1, 1, 7, 32, False, experts=experts)) == "bmm"


@pytest.mark.parametrize("case", RULES, ids=[c[0] for c in RULES])
def test_auto_rules(case):
    *shape, expected = case[1:]
    assert choose_strategy(*meta_call(*shape)) == expected


@pytest.mark.parametrize("case", RULES, ids=[c[0] for c in RULES])
def test_auto_under_export_is_batch_independent(case, monkeypatch):
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
    _, _cin, _cout, k, groups, *_ = case
    assert choose_strategy(*meta_call(*case[1:-1])) == ("bmm" if (k, groups) == (1, 1) else "mixture")


def test_budget_counts_the_autocast_dtype():
    x, weight = torch.empty(1, 64, 8, 8), torch.empty(4, 64, 64, 3, 3, device="meta")
    assert auto.per_sample_kernel_bytes(x, weight) == 64 * 64 * 9 * 4
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert auto.per_sample_kernel_bytes(x, weight) == 64 * 64 * 9 * 2


def routed_layer(k, groups, strategy, experts=3, channels=8, bias=True):
    torch.manual_seed(0)
    layer = CondConv2d(
        channels, channels, k, padding=k // 2, groups=groups, bias=bias, num_experts=experts, strategy=strategy
    )
    with torch.no_grad():  # routing and bias that differ between samples and experts
        layer.router.weight.normal_()
        if bias:
            layer.bias.normal_()
    return layer


def forward_backward(layer, x):
    x = x.detach().requires_grad_(True)
    y = layer(x)
    grad_out = torch.linspace(-1, 1, y.numel()).reshape(y.shape)
    (y * grad_out).sum().backward()
    grads = [x.grad, layer.weight.grad, layer.router.weight.grad, layer.router.bias.grad, layer.bias.grad]
    layer.zero_grad(set_to_none=True)
    return y.detach(), [g.clone() for g in grads]


@pytest.mark.parametrize("strategy", ["grouped", "bmm"])
@pytest.mark.parametrize("k,groups", [(1, 1), (3, 1), (3, 8)], ids=["1x1", "3x3", "depthwise"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_budget_chunks_match_whole_batch_and_stay_in_budget(strategy, k, groups, channels_last, monkeypatch):
    layer = routed_layer(k, groups, strategy)
    x = torch.randn(7, 8, 6, 6)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y_whole, grads_whole = forward_backward(layer, x)

    kernel_bytes = layer.weight[0].numel() * 4
    monkeypatch.setattr(auto, "KERNEL_BUDGET_BYTES", 3 * kernel_bytes)  # 3 samples per chunk: 3 + 3 + 1
    batches: list[int] = []
    inner = condconv._STRATEGY_FNS[strategy]
    monkeypatch.setitem(condconv._STRATEGY_FNS, strategy, lambda x, *a: batches.append(x.shape[0]) or inner(x, *a))
    y_chunked, grads_chunked = forward_backward(layer, x)

    assert batches == [3, 3, 1, 3, 3, 1] or sorted(batches) == [1, 1, 3, 3, 3, 3]  # forward, then backward recompute
    torch.testing.assert_close(y_chunked, y_whole, rtol=1e-5, atol=1e-6)
    for chunked, whole in zip(grads_chunked, grads_whole):  # sums of many cancelling terms: scaled to their size
        torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5 * float(whole.abs().max()))
    assert y_chunked.is_contiguous(memory_format=torch.channels_last) == y_whole.is_contiguous(
        memory_format=torch.channels_last
    )


def test_budget_chunks_without_grad_run_once(monkeypatch):
    layer = routed_layer(3, 1, "grouped")
    monkeypatch.setattr(auto, "KERNEL_BUDGET_BYTES", 2 * layer.weight[0].numel() * 4)
    batches: list[int] = []
    inner = condconv._STRATEGY_FNS["grouped"]
    monkeypatch.setitem(condconv._STRATEGY_FNS, "grouped", lambda x, *a: batches.append(x.shape[0]) or inner(x, *a))
    with torch.no_grad():
        layer(torch.randn(5, 8, 6, 6))
    assert batches == [2, 2, 1]


class OpLog(TorchDispatchMode):
    """Every aten op with its output shapes and its input dtypes."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        ins = [a for a in args if isinstance(a, torch.Tensor)]
        # shapes only: holding the outputs would keep them alive and change what autograd copies
        self.ops.append((func, [o.shape for o in outs if isinstance(o, torch.Tensor)], [a.dtype for a in ins]))
        return out


COPIES = {
    torch.ops.aten.clone.default,
    torch.ops.aten.contiguous.default,
    torch.ops.aten.copy_.default,
    torch.ops.aten._to_copy.default,
    torch.ops.aten.as_strided_copy.default,
}


def channels_last_copies(strategy: str, k: int) -> tuple[list, bool]:
    """Activation-sized layout copies made by one forward+backward of a strategy on NHWC input,
    and whether its output and input gradient stay NHWC."""
    torch.manual_seed(0)
    leaf = torch.randn(4, 16, 24, 24).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    weight = torch.randn(3, 16, 16, k, k, requires_grad=True)
    bias = torch.randn(3, 16, requires_grad=True)
    r = torch.rand(4, 3, requires_grad=True)
    log = OpLog()
    with log:
        x = leaf * 2.0  # an activation, as inside a network (a leaf's grad accumulation may copy)
        y = condconv2d(x, weight, r, bias, padding=k // 2, strategy=strategy)
        y.backward(torch.ones_like(y))
    keeps_layout = all(t.is_contiguous(memory_format=torch.channels_last) for t in (y, leaf.grad))
    return [(f, o[0]) for f, o, _ in log.ops if f in COPIES and o and o[0].numel() >= x.numel()], keeps_layout


@pytest.mark.parametrize("strategy,k", [("bmm", 1), ("mixture", 1), ("mixture", 3), ("auto", 1), ("auto", 3)])
def test_channels_last_forward_backward_copies_no_activation(strategy, k):
    """The strategies auto uses on NHWC read and write it in place (the router, outside them, is not examined)."""
    copied, keeps_layout = channels_last_copies(strategy, k)
    assert not copied, f"activation-sized layout copies in the hot path: {copied}"
    assert keeps_layout


def test_grouped_copies_channels_last_input_which_is_why_auto_avoids_it():
    copied, keeps_layout = channels_last_copies("grouped", 3)
    assert copied and not keeps_layout


@pytest.mark.parametrize(
    "strategy,k,groups", [("grouped", 3, 1), ("grouped", 3, 8), ("mixture", 3, 1), ("bmm", 1, 1), ("bmm", 3, 1)]
)
def test_autocast_keeps_bf16_in_the_matrix_products(strategy, k, groups):
    layer = routed_layer(k, groups, strategy)
    x = torch.randn(3, 8, 6, 6)
    products = {
        torch.ops.aten.convolution.default,
        torch.ops.aten.bmm.default,
        torch.ops.aten.mm.default,
        torch.ops.aten.convolution_backward.default,
    }
    log = OpLog()
    with log:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x.requires_grad_(True))
        y.float().sum().backward()
    seen = [(f, dtypes) for f, _, dtypes in log.ops if f in products]
    assert seen and all(set(dtypes) == {torch.bfloat16} for _, dtypes in seen), seen
    assert y.dtype == torch.bfloat16


@pytest.mark.parametrize("strategy", ["auto", "grouped", "mixture", "bmm"])
@pytest.mark.parametrize("k,groups", [(1, 1), (3, 1), (3, 4)], ids=["1x1", "3x3", "grouped"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_empty_batch_gives_empty_output_and_zero_gradients(strategy, k, groups, channels_last):
    x = torch.randn(0, 8, 6, 6)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    weight = torch.randn(3, 8, 8 // groups, k, k, requires_grad=True)
    bias = torch.randn(3, 8, requires_grad=True)
    r = torch.rand(0, 3, requires_grad=True)
    y = condconv2d(x, weight, r, bias, stride=2, padding=k // 2, groups=groups, strategy=strategy)
    expected = torch.nn.functional.conv2d(x, weight[0], bias[0], 2, k // 2, 1, groups)
    assert y.shape == expected.shape == (0, 8, 3, 3)
    y.sum().backward()
    for tensor in (x, weight, bias, r):
        assert tensor.grad is not None and tensor.grad.shape == tensor.shape and not tensor.grad.any()


@pytest.mark.parametrize("strategy", ["auto", "grouped", "mixture", "bmm"])
def test_empty_batch_through_the_layer_and_its_router(strategy):
    layer = routed_layer(3, 1, strategy)
    seen = []
    layer.register_routing_hook(lambda _, r: seen.append(r.shape))
    y = layer(torch.randn(0, 8, 6, 6, requires_grad=True))
    assert y.shape == (0, 8, 6, 6) and seen == [(0, 3)]
    y.sum().backward()
    assert not layer.weight.grad.any() and not layer.router.weight.grad.any()
