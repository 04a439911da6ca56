"""Real architectures from torchvision and timm: exact upcycling, file round trips, timm's CondConv2d, the command.

- Nine randomly initialized ImageNet models (six from torchvision, three from timm) are
  converted in float32 eval mode and must compute what they computed before (relative
  difference <= 1e-5), as a whole and layer by layer: each converted layer is run on the
  input its conv saw, because an untrained network can attenuate a layer's signal almost
  to nothing (1e-3 relative noise in one layer moves torchvision EfficientNet-B0's logits
  by under 3e-7 for half its layers). Each is saved with ``save_converted`` and loaded with
  ``load_converted`` into a fresh, differently initialized instance, which must then
  hold every tensor of the converted model and compute bit for bit what it computes.
- timm's own ``CondConv2d`` is an independent peer of ours: with the same experts and the
  same routing weights, both layers and every CPU strategy of ``condconv2d`` agree in
  float64 (outputs and gradients).
- ``condconv-convert`` converts state-dict files of torchvision's and timm's ResNet-18.

Nothing is downloaded (``weights=None``, ``pretrained=False``). BatchNorm statistics and
affine terms, LayerNorm affine terms and ConvNeXt's layer scales are randomized, since
at their defaults eval-mode normalization is near an identity, timm zero-initializes the
last BatchNorm gamma of each residual block and ConvNeXt scales each block's output by
1e-6; any of those would hide a converted layer that computes something else.

Every test is skipped, with the reason, where torchvision or timm does not import (the
torch 2.13 environment has neither; a torchvision built for another torch can fail on
import with errors other than ImportError, so any exception skips).
"""

from __future__ import annotations

import functools
import importlib
import json
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.nn as nn
from console_scripts import UNTUNED, run_script
from reference import relative_difference

from condconv_lightning import CondConv2d, convert, load_converted, save_converted
from condconv_lightning.functional import STRATEGIES, condconv2d

TOLERANCE = 1e-5  # the library's promise for float32 upcycling (docs/converting.md), as in test_surgery_convert
FLOAT64_TOLERANCE = 1e-10
INPUT_SHAPE = (2, 3, 64, 64)  # every model here takes 64x64 (its last stage is then 2x2)
CPU_STRATEGIES = [s for s in STRATEGIES if s != "fused"]  # fused is Triton, CUDA only (tests/test_fused.py)


@functools.cache
def _imported(name: str) -> ModuleType | str:
    try:
        return importlib.import_module(name)
    except Exception as error:  # a torchvision built for another torch raises RuntimeError or worse on import
        return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


def registry(name: str) -> ModuleType:
    """``torchvision`` or ``timm``, or skip the calling test saying why it does not import."""
    module = _imported(name)
    if isinstance(module, str):
        pytest.skip(f"needs {name}, which does not import here ({module})")
    return module


def build(arch: str, seed: int) -> nn.Module:
    """A randomly initialized model named as ``--arch`` names it: ``torchvision:NAME`` or ``timm:NAME``."""
    source, name = arch.split(":")
    module = registry(source)
    if source == "timm":
        registry("torchvision")  # timm's own imports of torchvision fail the same way
    torch.manual_seed(seed)
    if source == "torchvision":
        return module.models.get_model(name, weights=None)
    return module.create_model(name, pretrained=False)


@torch.no_grad()
def randomize_normalization(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BatchNorm statistics and affine terms (as ``zoo.zoo_model`` sets them), random LayerNorm
    affine terms and layer scales, so that every converted layer shows in the output."""
    generator = torch.Generator().manual_seed(seed)

    def draw(like: torch.Tensor, low: float, high: float) -> torch.Tensor:
        return torch.rand(like.shape, generator=generator) * (high - low) + low

    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):  # timm's BatchNormAct2d is one too
            module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
            module.running_var.copy_(draw(module.running_var, 0.5, 1.5))
        if isinstance(module, (nn.BatchNorm2d, nn.LayerNorm)) and module.weight is not None:
            module.weight.copy_(draw(module.weight, 0.5, 1.5))
            module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.1)
    for name, parameter in model.named_parameters():
        if name.endswith("layer_scale"):  # torchvision's ConvNeXt: 1e-6 at init
            parameter.copy_(draw(parameter, 0.5, 1.5))
    return model


def sample_input() -> torch.Tensor:
    return torch.randn(INPUT_SHAPE, generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def forward_recording(
    model: nn.Module, x: torch.Tensor, names: list[str]
) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """``model(x)`` and the input and output of each named module in that forward (its first call)."""
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(name: str) -> Callable:
        def record(module: nn.Module, args: tuple, output: torch.Tensor) -> None:  # None: the output stays
            # copies: in-place activations after a conv (SiLU(inplace=True) in timm) change its output later
            seen.setdefault(name, (args[0].clone(), output.clone()))

        return record

    handles = [model.get_submodule(name).register_forward_hook(hook(name)) for name in names]
    try:
        output = model(x)
    finally:
        for handle in handles:
            handle.remove()
    assert set(seen) == set(names), f"did not run: {sorted(set(names) - set(seen))}"
    return output, seen


def stored_keys(path: Path) -> set[str]:
    """The tensor names a file written by save_converted holds, read without the library."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as file:
            return set(file.keys())
    return set(torch.load(path, weights_only=True)["state_dict"])


def under(*prefixes: str) -> Callable[[str, nn.Conv2d], bool]:
    return lambda name, conv: name.startswith(tuple(f"{p}." for p in prefixes))


def every(name: str, conv: nn.Conv2d) -> bool:
    return True


# arch, selectors, conversion options, the convs that must convert (an independent predicate
# over named_modules), files written. Together: every selector kind, both routings, K from 2 to
# 6 (sigmoid's expert scale 2/K is a power of two only for some), every CPU strategy, filters.
REAL_MODELS = [
    pytest.param("torchvision:resnet18", "*", {}, every, (".safetensors", ".pt"), id="torchvision:resnet18"),
    pytest.param(
        "torchvision:resnet50",
        ["layer3", "layer4"],
        {"routing": "softmax", "num_experts": 2, "temperature": 30.0},
        under("layer3", "layer4"),
        (".safetensors",),
        id="torchvision:resnet50",
    ),
    pytest.param(
        "torchvision:mobilenet_v3_large",
        "features.1?",  # a glob: features.10 to features.16, all but the squeeze-and-excitation convs
        {"include_squeeze_excitation": False, "input_size": INPUT_SHAPE[1:], "strategy": "bmm"},
        lambda name, conv: name.split(".")[1] in {str(i) for i in range(10, 17)} and not name.endswith(("fc1", "fc2")),
        (".pt",),
        id="torchvision:mobilenet_v3_large",
    ),
    pytest.param(
        "torchvision:efficientnet_b0",
        "*",
        {"num_experts": 3, "strategy": "bmm"},
        every,
        (".safetensors",),
        id="torchvision:efficientnet_b0",
    ),
    pytest.param(
        "torchvision:convnext_tiny",
        "*",  # 7x7 depthwise convs, a 4x4/4 stem and 2x2/2 downsampling convs
        {"strategy": "grouped"},
        every,
        (".pt",),
        id="torchvision:convnext_tiny",
    ),
    pytest.param(
        "torchvision:regnet_y_400mf",
        r"re:trunk_output\.block[34]\..*\.f\.[abc]\.0",  # a regex: the body convs of the last two stages
        {"routing": "softmax", "strategy": "mixture"},
        lambda name, conv: (
            name.startswith(("trunk_output.block3.", "trunk_output.block4."))
            and ".se." not in name
            and ".proj." not in name
        ),
        (".safetensors",),
        id="torchvision:regnet_y_400mf",
    ),
    pytest.param(
        "timm:resnet18",
        "*",
        {"routing": "softmax", "temperature": 2.0},
        every,
        (".pt",),
        id="timm:resnet18",
    ),
    pytest.param(
        "timm:efficientnet_b0",
        ["blocks.4", "blocks.5", "blocks.6", "conv_head"],
        {"num_experts": 6},
        lambda name, conv: name == "conv_head" or under("blocks.4", "blocks.5", "blocks.6")(name, conv),
        (".safetensors",),
        id="timm:efficientnet_b0",
    ),
    pytest.param(
        "timm:mobilenetv3_large_100",
        "*",
        {"exclude": "blocks.0", "kernel_sizes": [1, 5]},  # conv_head: a 1x1 conv with bias on the pooled features
        lambda name, conv: not name.startswith("blocks.0.") and conv.kernel_size in {(1, 1), (5, 5)},
        (".safetensors",),
        id="timm:mobilenetv3_large_100",
    ),
]


@pytest.mark.parametrize(("arch", "layers", "options", "expected", "suffixes"), REAL_MODELS)
def test_real_model_upcycles_exactly_and_reloads_from_its_file(
    arch: str,
    layers: str | list[str],
    options: dict,
    expected: Callable[[str, nn.Conv2d], bool],
    suffixes: tuple[str, ...],
    tmp_path: Path,
) -> None:
    model = randomize_normalization(build(arch, seed=0)).eval()
    x = sample_input()
    selected = [name for name, m in model.named_modules() if type(m) is nn.Conv2d and expected(name, m)]
    assert selected, "the table's predicate selects no conv"
    before, seen = forward_recording(model, x, selected)

    report = convert(model, layers, seed=0, **options)
    assert [layer.name for layer in report.converted] == selected
    assert all(isinstance(model.get_submodule(name), CondConv2d) for name in selected)
    with torch.no_grad():
        after = model(x)
        # Each layer on the very input its conv saw (see the module docstring for why the output is not enough).
        layer_differences = {
            name: relative_difference(model.get_submodule(name)(i), o) for name, (i, o) in seen.items()
        }
    worst = max(layer_differences, key=layer_differences.get)
    assert layer_differences[worst] <= TOLERANCE, f"{worst}: {layer_differences[worst]:.3g}"
    assert relative_difference(after, before) <= TOLERANCE

    state = model.state_dict()
    for suffix in suffixes:
        path = save_converted(model, tmp_path / f"{arch.replace(':', '_')}{suffix}", report.spec)
        assert stored_keys(path) == set(state)
        fresh = build(arch, seed=1)  # another initialization, unconverted, BatchNorm at its defaults
        loaded = load_converted(path, fresh).eval()
        assert loaded is fresh
        reloaded = loaded.state_dict()
        assert list(reloaded) == list(state)  # strict: nothing missing, nothing left over, same order
        assert all(torch.equal(reloaded[key], value) for key, value in state.items())
        with torch.no_grad():
            # Equal bit for bit: the same float32 tensors through the same operations on the CPU, each
            # layer running the strategy the converted model's ran (forced, or auto's cached choice).
            assert torch.equal(loaded(x), after)


# Configurations both layers take: timm's CondConv2d has no padding modes, so zero padding only.
TIMM_CASES = [
    pytest.param({"in_channels": 8, "out_channels": 12, "kernel_size": 3, "padding": 1}, id="3x3"),
    pytest.param({"in_channels": 8, "out_channels": 12, "kernel_size": 3, "padding": 1, "bias": True}, id="3x3-bias"),
    pytest.param(
        {"in_channels": 8, "out_channels": 16, "kernel_size": 3, "stride": 2, "padding": 1, "bias": True},
        id="3x3-stride2-bias",
    ),
    pytest.param(
        {"in_channels": 12, "out_channels": 12, "kernel_size": 5, "padding": 2, "groups": 12},
        id="depthwise-5x5",
    ),
    pytest.param(
        {
            "in_channels": 12,
            "out_channels": 24,
            "kernel_size": 3,
            "stride": 2,
            "padding": 1,
            "groups": 12,
            "bias": True,
        },
        id="depthwise-multiplier2-stride2-bias",
    ),
    pytest.param(
        {"in_channels": 8, "out_channels": 8, "kernel_size": 3, "padding": 2, "dilation": 2, "groups": 4},
        id="grouped-dilated",
    ),
    pytest.param({"in_channels": 16, "out_channels": 8, "kernel_size": 1, "bias": True}, id="1x1-bias"),
    pytest.param(
        {"in_channels": 6, "out_channels": 10, "kernel_size": (1, 3), "stride": (2, 1), "padding": (0, 1)},
        id="1x3-stride2x1",
    ),
]


@pytest.mark.parametrize("routing", ["sigmoid", "softmax"])
@pytest.mark.parametrize("case", TIMM_CASES)
def test_timm_condconv2d_computes_what_ours_does_in_float64(case: dict, routing: str) -> None:
    """timm's layer is an independent implementation with the same [K, P] parameter layout (weight
    ``[K, Cout * Cin/groups * kh * kw]``, bias ``[K, Cout]``) that takes the routing weights as an
    argument; ours computes them with its router, so its routing is handed to timm's layer."""
    layers = registry("timm").layers
    assert layers.CondConv2d is layers.cond_conv2d.CondConv2d
    num_experts = 3
    torch.manual_seed(0)
    theirs = layers.CondConv2d(**{"bias": False, **case}, num_experts=num_experts, dtype=torch.float64)
    ours = CondConv2d(**{"bias": False, **case}, num_experts=num_experts, routing=routing, dtype=torch.float64)
    loaded = ours.load_state_dict(theirs.state_dict(), strict=False)  # same names, shapes and layout
    assert sorted(loaded.missing_keys) == ["router.bias", "router.weight", "temperature"]
    assert not loaded.unexpected_keys
    with torch.no_grad():  # a router whose routing differs between samples
        ours.router.weight.normal_(std=0.5)
        ours.router.bias.normal_(std=0.5)
    # Per-sample channel offsets, so that the pooled inputs, hence the routing weights, differ between samples.
    channels = case["in_channels"]
    x = torch.randn(3, channels, 11, 13, dtype=torch.float64) + torch.randn(3, channels, 1, 1, dtype=torch.float64)
    routing_weights = ours.route(x).detach()
    assert (routing_weights - routing_weights[0]).abs().max() > 1e-2
    expected = theirs(x, routing_weights)
    experts = theirs.weight.detach().view(num_experts, theirs.out_channels, -1, *theirs.kernel_size)
    bias = None if theirs.bias is None else theirs.bias.detach()
    conv_args = (theirs.stride, theirs.padding, theirs.dilation, theirs.groups)

    for strategy in CPU_STRATEGIES:
        ours.strategy = strategy
        with torch.no_grad():
            layer_output = ours(x)
            functional_output = condconv2d(x, experts, routing_weights, bias, *conv_args, strategy=strategy)
        assert layer_output.shape == functional_output.shape == expected.shape
        assert (layer_output - expected).abs().max() <= FLOAT64_TOLERANCE, strategy
        assert (functional_output - expected).abs().max() <= FLOAT64_TOLERANCE, strategy


@pytest.mark.parametrize("strategy", CPU_STRATEGIES)
def test_timm_condconv2d_gradients_match_the_functional_form_in_float64(strategy: str) -> None:
    """Gradients for the input, experts, bias and routing weights agree with timm's layer."""
    layers = registry("timm").layers
    torch.manual_seed(0)
    config = {"in_channels": 8, "out_channels": 16, "kernel_size": 3, "stride": 2, "padding": 1, "groups": 2}
    theirs = layers.CondConv2d(**config, bias=True, num_experts=4, dtype=torch.float64)
    x = torch.randn(3, 8, 9, 10, dtype=torch.float64, requires_grad=True)
    routing_weights = torch.rand(3, 4, dtype=torch.float64, requires_grad=True)
    grad_output = torch.randn(3, 16, 5, 5, dtype=torch.float64)
    expected = theirs(x, routing_weights)
    inputs = [x, theirs.weight, theirs.bias, routing_weights]
    expected_grads = torch.autograd.grad(expected, inputs, grad_output)

    weight = theirs.weight.detach().clone().requires_grad_(True)
    bias = theirs.bias.detach().clone().requires_grad_(True)
    experts = weight.view(4, 16, 4, 3, 3)
    output = condconv2d(x, experts, routing_weights, bias, 2, 1, 1, 2, strategy=strategy)
    grads = torch.autograd.grad(output, [x, weight, bias, routing_weights], grad_output)
    assert (output - expected).abs().max() <= FLOAT64_TOLERANCE
    for name, grad, want in zip(["input", "weight", "bias", "routing weights"], grads, expected_grads):
        assert grad.shape == want.shape, name
        assert (grad - want).abs().max() <= FLOAT64_TOLERANCE, name


def run_convert(*args: object, cwd: Path) -> subprocess.CompletedProcess:
    return run_script("condconv-convert", *args, cwd=cwd, extra_env=UNTUNED)


@pytest.mark.parametrize(
    ("arch", "meant"),
    [
        ("timm:efficientnetb0", "timm:efficientnet_b0"),
        ("timm:resnet_18", "timm:resnet18"),
        ("torchvision:efficientnetb0", "torchvision:efficientnet_b0"),
        ("torchvision:resnet_18", "torchvision:resnet18"),
    ],
)
def test_a_misspelled_registry_name_is_answered_with_the_closest_names(arch: str, meant: str) -> None:
    registry(arch.partition(":")[0])
    registry("torchvision")  # timm's own imports of torchvision fail the same way
    from condconv_lightning.loading import ModelFileError, build_architecture

    with pytest.raises(ModelFileError) as raised:
        build_architecture(arch)
    message = str(raised.value)
    assert message.startswith(f"--arch {arch}: ") and re.search(f"did you mean {meant}[,?]", message), message
    assert "\n" not in message


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["torchvision:resnet18", "timm:resnet18"])
def test_condconv_convert_converts_a_registry_models_state_dict(arch: str, tmp_path: Path) -> None:
    original = randomize_normalization(build(arch, seed=0)).eval()
    torch.save(original.state_dict(), tmp_path / "resnet18.pth")
    result = run_convert("resnet18.pth", "--arch", arch, "--layers", "layer3,layer4", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr

    facts = json.loads(result.stdout)
    assert facts["check"]["passed"] and facts["check"]["max_rel_diff"] <= TOLERANCE
    assert facts["output"]["written"] and facts["output"]["path"] == "resnet18.condconv.pt"
    output = tmp_path / "resnet18.condconv.pt"
    assert output.is_file() and facts["output"]["bytes"] == output.stat().st_size
    selected = [n for n, m in original.named_modules() if isinstance(m, nn.Conv2d) and under("layer3", "layer4")(n, m)]
    assert [layer["name"] for layer in facts["conversion"]["converted"]] == selected

    converted = load_converted(output, build(arch, seed=1)).eval()
    assert all(isinstance(converted.get_submodule(name), CondConv2d) for name in selected)
    x = sample_input()
    with torch.no_grad():
        assert relative_difference(converted(x), original(x)) <= TOLERANCE
