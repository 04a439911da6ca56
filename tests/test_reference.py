"""Every strategy against the independent float64 per-sample reference (tests/reference.py).

Outputs and gradients with respect to the input, the experts, the bias and the router
are compared. Tolerances, relative to the largest magnitude of the reference tensor:
float32 2e-5; bf16 autocast 4e-2 (bf16 keeps 8 bits of mantissa, so each product is
exact only to ~4e-3 and K-way mixing plus accumulation adds more).
"""

from __future__ import annotations

import pytest
import torch
from conftest import CUDA_PARAM
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import check_against_reference

from condconv_lightning import CondConv2d

STRATEGIES = ["grouped", "mixture", "bmm", "auto"]
FP32_TOL = 2e-5
BF16_TOL = 4e-2

BASE = dict(in_channels=4, out_channels=6, kernel_size=3, padding=1, batch=3, size=(9, 8), num_experts=4)
CASES = {
    "k1": dict(kernel_size=1, padding=0),
    "k3": dict(),
    "k5": dict(kernel_size=5, padding=2),
    "k3x5": dict(kernel_size=(3, 5), padding=(1, 2)),
    "k1-stride2": dict(kernel_size=1, padding=0, stride=2),
    "k1-pad1": dict(kernel_size=1, padding=1),
    "k1-groups2": dict(kernel_size=1, padding=0, groups=2),
    "stride2": dict(stride=2),
    "stride2x1": dict(stride=(2, 1)),
    "dilation2": dict(dilation=2, padding=2),
    "dilation1x2": dict(dilation=(1, 2), padding=(1, 2)),
    "groups2": dict(groups=2),
    "depthwise": dict(in_channels=4, out_channels=4, groups=4),
    "depthwise-x2": dict(in_channels=4, out_channels=8, groups=4),
    "no-bias": dict(bias=False),
    "pad-int2": dict(padding=2),
    "pad-tuple": dict(padding=(0, 2)),
    "pad-same": dict(padding="same"),
    "pad-same-even-kernel": dict(kernel_size=4, padding="same"),
    "pad-same-dilated": dict(kernel_size=(2, 3), dilation=2, padding="same"),
    "pad-valid": dict(padding="valid"),
    "reflect": dict(padding_mode="reflect"),
    "replicate": dict(padding_mode="replicate", padding=(2, 1)),
    "circular": dict(padding_mode="circular"),
    "reflect-same-even": dict(kernel_size=(4, 2), padding="same", padding_mode="reflect"),
    "circular-stride2-groups2": dict(padding_mode="circular", stride=2, groups=2),
    "batch1": dict(batch=1),
    "batch5": dict(batch=5),
    "spatial1x1": dict(size=(1, 1), kernel_size=1, padding=0),
    "K1": dict(num_experts=1),
    "K8": dict(num_experts=8),
    "softmax": dict(routing="softmax"),
    "softmax-T3": dict(routing="softmax", temperature=3.0),
    "normalized_sigmoid": dict(routing="normalized_sigmoid", temperature=2.0),
    "sigmoid-T0.5": dict(temperature=0.5),
}
CHANNELS_LAST_CASES = ["k1", "k3", "k1-stride2", "stride2", "depthwise", "groups2", "reflect", "pad-same-even-kernel"]
BF16_CASES = ["k1", "k3", "k3x5", "stride2", "dilation2", "depthwise", "no-bias", "circular", "softmax", "K8"]


DEVICES = ["cpu", CUDA_PARAM]


@pytest.fixture(autouse=True)
def no_tf32():
    """Full fp32 on GPUs: TF32 would make the float32 comparison meaningless."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def build(case: dict, strategy: str, device: str, seed: int = 0):
    cfg = {**BASE, **case}
    batch, size = cfg.pop("batch"), cfg.pop("size")
    torch.manual_seed(seed)
    layer = CondConv2d(
        cfg.pop("in_channels"), cfg.pop("out_channels"), cfg.pop("kernel_size"), strategy=strategy, device=device, **cfg
    )
    with torch.no_grad():  # a router that actually varies across samples
        layer.router.weight.normal_(0.0, 1.0)
        layer.router.bias.normal_(0.0, 0.5)
    x = torch.randn(batch, layer.in_channels, *size, device=device)
    return layer, x


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_matches_reference_fp32(case, strategy, device):
    layer, x = build(CASES[case], strategy, device)
    check_against_reference(layer, x, FP32_TOL)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("case", CHANNELS_LAST_CASES)
def test_matches_reference_channels_last(case, strategy, device):
    layer, x = build(CASES[case], strategy, device)
    check_against_reference(layer, x.to(memory_format=torch.channels_last), FP32_TOL)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("case", BF16_CASES)
def test_matches_reference_bf16_autocast(case, strategy, device):
    layer, x = build(CASES[case], strategy, device)
    check_against_reference(layer, x, BF16_TOL, autocast_dtype=torch.bfloat16)


@st.composite
def random_configs(draw):
    groups = draw(st.sampled_from([1, 2, 3]))
    in_channels = groups * draw(st.integers(1, 3))
    out_channels = groups * draw(st.integers(1, 3))
    kernel = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = draw(
        st.one_of(
            st.sampled_from(["same", "valid"]), st.integers(0, 2), st.tuples(st.integers(0, 2), st.integers(0, 2))
        )
    )
    stride = (1, 1) if padding == "same" else (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    case = dict(
        in_channels=in_channels,
        out_channels=out_channels,
        kernel_size=kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        bias=draw(st.booleans()),
        padding_mode=draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"])),
        routing=(routing := draw(st.sampled_from(["sigmoid", "softmax", "normalized_sigmoid"]))),
        # one expert under normalized sigmoid is weighted s / s = 1: its router's true gradient is 0, and
        # float32's is the rounding of a quotient's derivative, which no relative tolerance can judge
        num_experts=draw(st.integers(2 if routing == "normalized_sigmoid" else 1, 5)),
        batch=draw(st.integers(1, 3)),
        size=(draw(st.integers(7, 10)), draw(st.integers(7, 10))),
    )
    return case, draw(st.sampled_from(STRATEGIES)), draw(st.booleans())


@settings(max_examples=60, deadline=None, derandomize=True)  # the same examples on every machine and run
@given(random_configs())
def test_random_configurations_match_reference(drawn):
    case, strategy, channels_last = drawn
    layer, x = build(case, strategy, "cpu")
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    check_against_reference(layer, x, FP32_TOL)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["k1", "k3", "depthwise", "reflect"])
def test_strategies_agree_with_each_other(case, device):
    """Same weights, same input: every strategy gives the same output to float32 rounding."""
    outputs = []
    for strategy in STRATEGIES:
        layer, x = build(CASES[case], strategy, device, seed=7)
        outputs.append(layer(x).detach())
    for other in outputs[1:]:
        torch.testing.assert_close(other, outputs[0], rtol=1e-5, atol=1e-5)
