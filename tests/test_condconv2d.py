"""CondConv2d behaves like an nn.Conv2d wherever a surrounding model relies on it."""

from __future__ import annotations

import copy
import io
import math
import pickle

import pytest
import torch
import torch.nn as nn
from conftest import CUDA_PARAM
from reference import reference_parameters, reference_routing

from condconv_lightning import CondConv2d
from condconv_lightning.functional import condconv2d

CONV_CONFIGS = [
    dict(in_channels=4, out_channels=6, kernel_size=3),
    dict(in_channels=4, out_channels=6, kernel_size=(3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2)),
    dict(in_channels=4, out_channels=8, kernel_size=3, groups=4, padding="same", padding_mode="reflect"),
    dict(in_channels=6, out_channels=6, kernel_size=1, stride=2, bias=False),
    dict(in_channels=4, out_channels=4, kernel_size=4, padding="same", padding_mode="circular"),
    dict(in_channels=4, out_channels=6, kernel_size=3, padding="valid", padding_mode="replicate"),
]
PUBLIC_ATTRIBUTES = [
    "in_channels",
    "out_channels",
    "kernel_size",
    "stride",
    "padding",
    "dilation",
    "groups",
    "padding_mode",
]


def routed(layer: CondConv2d) -> CondConv2d:
    """Give the router weights that make routing differ between samples."""
    with torch.no_grad():
        layer.router.weight.normal_()
    return layer


@pytest.mark.parametrize("cfg", CONV_CONFIGS)
def test_attributes_and_output_shape_match_conv2d(cfg):
    conv, layer = nn.Conv2d(**cfg), CondConv2d(**cfg)
    for name in PUBLIC_ATTRIBUTES:
        assert getattr(layer, name) == getattr(conv, name), name
    x = torch.randn(2, cfg["in_channels"], 11, 9)
    assert layer(x).shape == conv(x).shape
    assert layer(x[0]).shape == conv(x[0]).shape  # unbatched input, as nn.Conv2d accepts


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(groups=3), "divisible by groups"),
        (dict(groups=0), "groups must be a positive integer"),
        (dict(padding="full"), "padding must be 'same', 'valid'"),
        (dict(padding="same", stride=2), "padding='same' is not supported for strided"),
        (dict(padding_mode="mirror"), "padding_mode must be one of"),
        (dict(num_experts=0), "num_experts must be a positive integer"),
        (dict(num_experts=2.5), "num_experts must be a positive integer"),
        (dict(routing="relu"), "routing must be one of"),
        (dict(strategy="fast"), "strategy must be one of"),
        (dict(temperature=0.0), "temperature must be a positive finite number"),
        (dict(kernel_size=(1, 2, 3)), "kernel_size must be an int or a pair"),
        (dict(kernel_size=0), "kernel_size must be positive"),
        (dict(stride=0), "stride must be positive"),
        (dict(dilation=(1, 0)), "dilation must be positive"),
        (dict(in_channels=0, groups=1), "in_channels must be a positive integer"),
        (dict(out_channels=True), "out_channels must be a positive integer"),
    ],
)
def test_bad_arguments_raise_one_line_errors(kwargs, message):
    args = dict(in_channels=4, out_channels=8, kernel_size=3)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message) as info:
        CondConv2d(**args)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("strategy", ["auto", "grouped", "mixture", "bmm"])
@pytest.mark.parametrize(
    "weight_shape, kwargs, message",
    [
        ((2, 4, 4, 3, 3), dict(stride=0), "stride must be positive"),
        ((2, 4, 4, 3, 3), dict(dilation=0), "dilation must be positive"),
        ((2, 0, 4, 1, 1), {}, "none of them 0"),
    ],
)
def test_the_function_refuses_degenerate_arguments_in_one_line(strategy, weight_shape, kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        condconv2d(torch.randn(2, 4, 6, 6), torch.randn(weight_shape), torch.rand(2, 2), strategy=strategy, **kwargs)
    assert "\n" not in str(info.value)


def test_strategy_can_be_changed_later_without_changing_the_function():
    layer = routed(CondConv2d(4, 6, 3, padding=1, strategy="grouped"))
    x = torch.randn(3, 4, 8, 8)
    expected = layer(x)
    for strategy in ["mixture", "bmm", "auto"]:
        layer.strategy = strategy
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    layer.strategy = "nonsense"
    with pytest.raises(ValueError, match="strategy must be one of"):
        layer(x)


def test_repr_is_readable():
    text = repr(
        CondConv2d(
            4, 8, 3, padding="same", groups=2, bias=False, padding_mode="reflect", num_experts=8, routing="softmax"
        )
    )
    for part in [
        "CondConv2d(",
        "4, 8, kernel_size=(3, 3)",
        "padding='same'",
        "groups=2",
        "bias=False",
        "padding_mode=reflect",
        "num_experts=8",
        "routing=softmax",
        "strategy=auto",
        "(router): Linear(in_features=4, out_features=8",
    ]:
        assert part in text, part


def test_route_expert_weight_and_bias_expose_the_math():
    layer = routed(CondConv2d(4, 6, (3, 5), groups=2, num_experts=5, routing="softmax", temperature=2.0))
    x = torch.randn(3, 4, 7, 7)
    experts = layer.expert_weight()
    assert experts.shape == (5, 6, 2, 3, 5)
    assert experts.data_ptr() == layer.weight.data_ptr() and experts._base is layer.weight  # a view, not a copy
    assert layer.expert_bias() is layer.bias and layer.bias.shape == (5, 6)
    params = reference_parameters(layer)
    expected = reference_routing(x.double(), params, "softmax", 2.0)
    torch.testing.assert_close(layer.route(x).double(), expected, rtol=1e-6, atol=1e-6)
    assert layer.route(x).shape == (3, 5)


def test_routing_hook_sees_the_forward_routing_detached_and_can_be_removed():
    layer = routed(CondConv2d(4, 6, 3))
    seen = []
    handle = layer.register_routing_hook(lambda module, r: seen.append((module, r)))
    x = torch.randn(2, 4, 6, 6)
    layer(x).sum().backward()
    assert len(seen) == 1
    module, r = seen[0]
    assert module is layer
    assert not r.requires_grad and r.grad_fn is None  # no autograd graph outlives the step
    torch.testing.assert_close(r, layer.route(x).detach())
    handle.remove()
    layer(x)
    assert len(seen) == 1


def test_state_dict_round_trip_and_names():
    source = routed(CondConv2d(4, 6, 3, num_experts=3, temperature=5.0))
    target = CondConv2d(4, 6, 3, num_experts=3)
    assert set(source.state_dict()) == {"weight", "bias", "router.weight", "router.bias", "temperature"}
    target.load_state_dict(source.state_dict(), strict=True)
    x = torch.randn(2, 4, 6, 6)
    torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)
    assert float(target.temperature) == 5.0


def test_deepcopy_and_pickle_keep_parameters_but_not_routing_hooks():
    layer = routed(CondConv2d(4, 6, 3, padding=1))
    calls = []
    layer.register_routing_hook(lambda m, r: calls.append(r))
    x = torch.randn(2, 4, 5, 5)
    expected = layer(x)
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    copies = [copy.deepcopy(layer), pickle.loads(pickle.dumps(layer)), torch.load(buffer, weights_only=False)]
    calls.clear()
    for clone in copies:
        torch.testing.assert_close(clone(x), expected, rtol=0, atol=0)
    assert calls == []  # copies do not report into the original's observers
    layer(x)
    assert len(calls) == 1  # the original still does


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtype_conversions(dtype):
    layer = routed(CondConv2d(4, 6, 3, padding=1))
    x = torch.randn(2, 4, 6, 6)
    expected = layer(x)
    converted = {torch.float16: layer.half, torch.bfloat16: layer.bfloat16, torch.float64: layer.double}[dtype]()
    assert all(p.dtype == dtype for p in converted.parameters()) and converted.temperature.dtype == dtype
    y = converted(x.to(dtype))
    assert y.dtype == dtype
    tol = {torch.float16: 1e-2, torch.bfloat16: 5e-2, torch.float64: 1e-5}[dtype]
    torch.testing.assert_close(y.float(), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("device", ["cpu", CUDA_PARAM])
def test_to_device_and_factory_kwargs(device):
    layer = CondConv2d(4, 6, 3, device=device, dtype=torch.float64)
    assert {p.device.type for p in layer.parameters()} == {device}
    assert {p.dtype for p in layer.parameters()} == {torch.float64}
    moved = CondConv2d(4, 6, 3).to(device)
    assert moved.weight.device.type == device and moved.temperature.device.type == device
    assert moved(torch.randn(1, 4, 5, 5, device=device)).device.type == device


def test_model_to_channels_last_works_and_keeps_outputs():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), routed(CondConv2d(4, 6, 3, padding=1)), nn.ReLU(), routed(CondConv2d(6, 8, 1))
    )
    x = torch.randn(2, 3, 8, 8)
    expected = model(x)
    model = model.to(memory_format=torch.channels_last)
    assert model[1].weight.dim() == 2  # experts are stored 2-D, so conversion leaves them alone
    y = model(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("routing", ["sigmoid", "softmax"])
@pytest.mark.parametrize("strategy", ["grouped", "mixture", "bmm"])
def test_autocast_keeps_low_precision(dtype, routing, strategy):
    layer = routed(CondConv2d(4, 6, 3, padding=1, routing=routing, strategy=strategy))
    x = torch.randn(2, 4, 6, 6)
    with torch.autocast("cpu", dtype=dtype):
        r = layer.route(x)
        expected_router_dtype = torch.nn.functional.linear(x.mean((2, 3)), layer.router.weight).dtype
        y = layer(x)
    assert r.dtype in (expected_router_dtype, torch.float32)  # what autocast gives the linear / softmax
    assert y.dtype == dtype  # the activations themselves are never upcast to fp32
    torch.testing.assert_close(y.float(), layer(x), rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("strategy", ["auto", "grouped", "mixture", "bmm"])
def test_torch_compile_fullgraph_without_graph_breaks(strategy):
    """fullgraph=True fails on any graph break: the forward, routing hook included, is one graph."""
    torch._dynamo.reset()
    layer = routed(CondConv2d(4, 6, 3, padding=1, strategy=strategy))
    seen = []
    layer.register_routing_hook(lambda module, r: seen.append(r))
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 4, 6, 6)
    torch.testing.assert_close(compiled(x), layer(x), rtol=1e-5, atol=1e-5)
    assert len(seen) == 2 and not seen[0].requires_grad
    layer.set_temperature(3.0)  # a buffer filled in place: same graph, new value
    torch.testing.assert_close(compiled(x), layer(x), rtol=1e-5, atol=1e-5)
    compiled(x).sum().backward()
    assert layer.weight.grad is not None and layer.router.weight.grad is not None


def test_initialization_matches_conv2d_per_expert():
    """Each expert has nn.Conv2d's U(-1/sqrt(fan_in), 1/sqrt(fan_in)) init, fan-in of ONE kernel."""
    torch.manual_seed(0)
    conv = nn.Conv2d(64, 96, 3, groups=2)
    layer = CondConv2d(64, 96, 3, groups=2, num_experts=8)
    bound = 1 / math.sqrt(32 * 9)
    conv_std, conv_bias_std = conv.weight.std().item(), conv.bias.std().item()
    for k in range(8):
        expert = layer.expert_weight()[k]
        assert expert.abs().max().item() <= bound
        assert abs(expert.std().item() - conv_std) / conv_std < 0.03
        assert abs(expert.mean().item()) < 0.05 * conv_std
        assert layer.bias[k].abs().max().item() <= bound
    assert abs(layer.bias.std().item() - conv_bias_std) / conv_bias_std < 0.15
    assert layer.fan_in == 32 * 9


@pytest.mark.parametrize("autocast_dtype", [None, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("routing", ["sigmoid", "softmax"])
@pytest.mark.parametrize("strategy", ["grouped", "mixture", "bmm"])
def test_numerical_robustness(autocast_dtype, routing, strategy):
    """Batch 1, 1x1 spatial input, zeros and very large activations give finite outputs."""
    torch.manual_seed(0)
    layer = routed(CondConv2d(8, 8, 3, padding=1, routing=routing, strategy=strategy))
    large = {None: 1e30, torch.bfloat16: 1e30, torch.float16: 1e3}[autocast_dtype]  # fp16 itself overflows past 65504
    inputs = [
        torch.randn(1, 8, 5, 5),
        torch.randn(4, 8, 1, 1),
        torch.zeros(3, 8, 6, 6),
        torch.randn(2, 8, 6, 6) * large,
    ]
    for x in inputs:
        with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            y = layer(x)
        assert torch.isfinite(y).all(), (tuple(x.shape), float(x.abs().max()))
    assert layer(torch.zeros(3, 8, 6, 6)).std(dim=0).max() == 0  # identical inputs, identical routing


def test_set_temperature_changes_routing_in_place():
    layer = routed(CondConv2d(4, 6, 3, routing="softmax", temperature=30.0))
    x = torch.randn(4, 4, 6, 6)
    flat = layer.route(x)
    buffer = layer.temperature
    layer.set_temperature(0.5)
    assert layer.temperature is buffer and float(layer.temperature) == 0.5
    sharp = layer.route(x)
    entropy = lambda p: -(p * p.log()).sum(1).mean()
    assert entropy(sharp) < entropy(flat)
    with pytest.raises(ValueError, match="temperature must be a positive finite number"):
        layer.set_temperature(-1.0)


def test_torch_fx_symbolic_trace_of_a_model_containing_the_layer():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), routed(CondConv2d(4, 6, 3, padding="same", padding_mode="reflect")), nn.ReLU()
    )
    traced = torch.fx.symbolic_trace(model)
    assert any(node.op == "call_function" and "condconv2d" in str(node.target) for node in traced.graph.nodes)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(traced(x), model(x), rtol=0, atol=0)
    torch.testing.assert_close(traced(torch.randn(5, 3, 9, 7)).shape, model(torch.randn(5, 3, 9, 7)).shape)
