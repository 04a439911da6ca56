"""Router initialization and routings that sum to one: exact where they can be, said where they cannot.

Independent references: the normalized sigmoid against its definition, and a random router's
exactness against the float64 per-sample loop of ``tests/reference.py``.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

from condconv_lightning import CondConv2d, ConversionSpec, apply_spec, convert
from condconv_lightning.functional import route
from condconv_lightning.surgery import ConversionConfig


def test_normalized_sigmoid_is_the_sigmoid_divided_by_its_sum() -> None:
    torch.manual_seed(0)
    x, weight, bias = torch.randn(5, 6, 4, 4, dtype=torch.float64), torch.randn(3, 6), torch.randn(3)
    logits = x.mean(dim=(2, 3)) @ weight.double().T + bias.double()
    gates = torch.sigmoid(logits / 2.0)
    expected = gates / gates.sum(dim=1, keepdim=True)
    actual = route(x, weight.double(), bias.double(), "normalized_sigmoid", 2.0)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(actual.sum(dim=1), torch.ones(5, dtype=torch.float64), rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        ({}, None),
        ({"routing": "softmax", "router_init": "random", "perturbation": 0.0}, None),
        ({"routing": "normalized_sigmoid", "router_init": "random", "perturbation": 0.0}, None),
        ({"router_init": "random"}, "a random router under sigmoid routing"),
        ({"router_init": "random", "perturbation": 0.0}, "a random router under sigmoid routing"),
        ({"routing": "softmax", "router_init": "random"}, "mixes the perturbed experts unevenly (perturbation 0.05)"),
        ({"init": "fresh"}, "init='fresh' trains experts from scratch"),
    ],
)
def test_the_config_says_whether_a_conversion_is_exact(options: dict, reason: str | None) -> None:
    inexactness = ConversionConfig(**options).inexactness
    assert inexactness is None if reason is None else reason in inexactness


def test_an_inexact_conversion_warns_and_is_not_exact() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    original, x = copy.deepcopy(model), torch.randn(2, 3, 8, 8)
    with pytest.warns(UserWarning, match=r"will not compute what their convs did: a random router under sigmoid"):
        convert(model, "*", router_init="random", seed=0)
    with torch.no_grad():
        assert not torch.allclose(model(x), original(x), rtol=1e-3, atol=0)


@pytest.mark.parametrize("routing", ["softmax", "normalized_sigmoid"])
@pytest.mark.parametrize("scale", [0.5, 4.0])
def test_a_random_router_with_identical_experts_is_exact_against_a_float64_per_sample_loop(
    routing: str, scale: float
) -> None:
    from reference import reference_forward, reference_parameters

    torch.manual_seed(0)
    conv = nn.Conv2d(6, 4, 3, stride=2, padding=1, groups=2, dtype=torch.float64)
    layer = CondConv2d.from_conv(conv, 4, routing=routing, router_init="random", router_scale=scale, perturbation=0.0)
    x = torch.randn(3, 6, 9, 9, dtype=torch.float64)
    routing_weights = layer.route(x).detach()
    assert float(routing_weights.std(dim=0).max()) > 1e-3, "the router routes each sample its own way"
    with torch.no_grad():
        by_loop = reference_forward(layer, x, reference_parameters(layer))
        torch.testing.assert_close(layer(x), conv(x), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(by_loop, conv(x), rtol=1e-12, atol=1e-12)


def test_random_router_weights_have_the_documented_scale_and_follow_the_seed() -> None:
    conv = nn.Conv2d(256, 8, 1)
    draw = lambda seed: CondConv2d.from_conv(
        conv, 8, routing="softmax", router_init="random", router_scale=2.0, perturbation=0.0,
        generator=torch.Generator().manual_seed(seed),
    ).router  # fmt: skip
    router = draw(0)
    assert not router.bias.any()
    assert float(router.weight.std()) == pytest.approx(2.0 / math.sqrt(256), rel=0.05)  # 2048 draws
    assert torch.equal(draw(0).weight, router.weight) and not torch.equal(draw(1).weight, router.weight)


def test_the_spec_records_the_router_init_and_repeats_it() -> None:
    from condconv_lightning.demos import resnet_tiny

    torch.manual_seed(0)
    model = resnet_tiny()
    report = convert(model, "layer4", routing="softmax", router_init="random", perturbation=0.0, seed=3)
    spec = ConversionSpec.from_json(report.spec.to_json())
    assert (spec.config.router_init, spec.config.router_scale) == ("random", 1.0)
    again = resnet_tiny()
    apply_spec(again, spec)
    torch.testing.assert_close(again.layer4[0].conv1.router.weight, model.layer4[0].conv1.router.weight)


def test_options_written_before_router_init_existed_mean_a_zero_router() -> None:
    options = ConversionConfig().to_dict()
    del options["router_init"], options["router_scale"]
    config = ConversionConfig.from_dict(options)
    assert (config.router_init, config.router_scale) == ("zero", 1.0)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"router_init": "kmeans"}, r"router_init must be one of \('zero', 'random'\)"),
        ({"router_scale": 0.0}, "router_scale must be a positive finite number"),
        ({"router_scale": float("nan")}, "router_scale must be a positive finite number"),
        ({"routing": "relu"}, "routing must be one of"),
    ],
)
def test_bad_router_options_are_one_line_errors(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ConversionConfig(**options)


def test_a_random_router_breaks_the_symmetry_a_zero_router_keeps() -> None:
    """With identical experts and a zero router every expert gets the same gradient; a random router differs."""
    torch.manual_seed(0)
    conv, x = nn.Conv2d(4, 4, 3, padding=1), torch.randn(8, 4, 6, 6)
    gradients = {}
    for init in ("zero", "random"):
        layer = CondConv2d.from_conv(conv, 4, routing="softmax", router_init=init, perturbation=0.0)
        layer(x).square().sum().backward()
        gradients[init] = layer.weight.grad
    spread = lambda grad: float((grad - grad.mean(dim=0)).abs().max() / grad.abs().max())
    assert spread(gradients["zero"]) < 1e-6
    assert spread(gradients["random"]) > 1e-2


def test_the_warnings_filter_sees_no_warning_for_the_default_conversion() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        convert(nn.Sequential(nn.Conv2d(3, 4, 3)), "*")
