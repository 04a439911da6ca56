"""Which convs convert() takes: selector forms, filters, skips and every rejection message."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from zoo import SqueezeExcite, zoo_model

from condconv_lightning import CondConv2d
from condconv_lightning.surgery import ConversionSpec, SelectorError, convert, list_convs


def converted_names(model: nn.Module) -> list[str]:
    return [name for name, m in list_convs(model) if isinstance(m, CondConv2d)]


# (zoo model, layers, options, expected converted names) -- peft-style table of cases
SELECTION_CASES = [
    ("resnet", "layer3.0.conv1", {}, ["layer3.0.conv1"]),
    ("resnet", "layer3", {}, ["layer3.0.conv1", "layer3.0.conv2", "layer3.0.downsample.0"]),
    ("resnet", ["layer3", "conv1"], {}, ["conv1", "layer3.0.conv1", "layer3.0.conv2", "layer3.0.downsample.0"]),
    ("resnet", "layer*.0.conv2", {}, ["layer1.0.conv2", "layer2.0.conv2", "layer3.0.conv2", "layer4.0.conv2"]),
    ("resnet", "layer[34].*.conv?", {}, ["layer3.0.conv1", "layer3.0.conv2", "layer4.0.conv1", "layer4.0.conv2"]),
    ("resnet", "re:layer[34]\\.\\d+\\.conv1", {}, ["layer3.0.conv1", "layer4.0.conv1"]),
    ("resnet", "re:layer4", {}, ["layer4.0.conv1", "layer4.0.conv2", "layer4.0.downsample.0"]),  # full match: the stage
    ("resnet", "re:conv1", {}, ["conv1"]),  # full match, not search
    ("resnet", "layer4", {"exclude": "layer4.0.downsample"}, ["layer4.0.conv1", "layer4.0.conv2"]),
    (
        "resnet",
        "*",
        {"exclude": ["re:.*downsample.*", "conv1"]},
        [
            "layer1.0.conv1",
            "layer1.0.conv2",
            "layer2.0.conv1",
            "layer2.0.conv2",
            "layer3.0.conv1",
            "layer3.0.conv2",
            "layer4.0.conv1",
            "layer4.0.conv2",
        ],
    ),
    ("resnet", "*", {"kernel_sizes": [1]}, ["layer2.0.downsample.0", "layer3.0.downsample.0", "layer4.0.downsample.0"]),
    ("resnet", "layer4", {"min_channels": 128}, ["layer4.0.conv2"]),
    ("resnet", "module.layer3.0.conv1", {}, ["layer3.0.conv1"]),  # written for a DDP-wrapped model
    ("resnet", "re:module\\.layer3\\.0\\.conv1", {}, ["layer3.0.conv1"]),
    ("mobilenet", "features.2", {"include_depthwise": False}, ["features.2.conv.0", "features.2.conv.6"]),
    (
        "mobilenet",
        "features.*.conv.3",
        {},
        ["features.1.conv.3", "features.2.conv.3", "features.3.conv.3", "features.4.conv.3"],
    ),
    ("grouped", "*", {"kernel_sizes": [(3, 3)], "include_depthwise": False}, ["grouped2", "grouped4"]),
    ("nested", "branches.right", {}, ["branches.right.0.0", "branches.right.1.0"]),
    ("nested", "branches.*.0.0", {}, ["branches.left.0.0", "branches.right.0.0"]),
    ("nested", "fuse", {}, ["fuse.0.0"]),
    ("lightning", "model.features.2", {}, ["model.features.2"]),
]


@pytest.mark.parametrize(("name", "layers", "options", "expected"), SELECTION_CASES)
def test_selection(name: str, layers, options: dict, expected: list[str]) -> None:
    model = zoo_model(name)
    report = convert(model, layers, **options)
    assert converted_names(model) == expected
    assert [r.name for r in report.converted] == expected
    assert sorted(report.spec.layers) == sorted(expected)


def test_filtered_and_excluded_convs_are_reported_with_their_reason() -> None:
    model = zoo_model("mobilenet")
    report = convert(model, "features.1", exclude="features.1.conv.6", include_depthwise=False, min_channels=8)
    assert {s.name: s.reason for s in report.skipped} == {
        "features.1.conv.3": "depthwise (groups == in_channels) and include_depthwise=False",
        "features.1.conv.6": "excluded by exclude",
    }
    small = convert(zoo_model("plain"), "features", kernel_sizes=[3], min_channels=8)
    assert [r.name for r in small.converted] == ["features.2"]
    assert {s.name: s.reason for s in small.skipped} == {
        "features.0": "3 -> 8 channels is below min_channels=8",
        "features.4": "kernel size (1, 3) is not in kernel_sizes [(3, 3)]",
    }


def test_a_data_parallel_wrapper_resolves_names_of_the_inner_model() -> None:
    model = zoo_model("resnet")
    wrapped = nn.DataParallel(model)  # no GPU: a plain wrapper with a `module.` prefix
    report = convert(wrapped, "layer4.0.conv1")
    assert [r.name for r in report.converted] == ["module.layer4.0.conv1"]
    assert isinstance(model.layer4[0].conv1, CondConv2d)


def test_selecting_only_converted_layers_is_reported_not_an_error() -> None:
    model = zoo_model("resnet")
    convert(model, "layer2")
    report = convert(model, ["layer2", "layer2.0.conv1"])
    assert report.converted == [] and report.already_converted == [
        "layer2.0.conv1",
        "layer2.0.conv2",
        "layer2.0.downsample.0",
    ]


# ---- rejections: (layers, options, error type, message pattern)

REJECTION_CASES = [
    ("layr3", {}, SelectorError, r"^layers selector 'layr3' matches no module; closest names: layer3, "),
    (
        "layer3.0.conv3",
        {},
        SelectorError,
        r"^layers selector 'layer3.0.conv3' matches no module; closest names: layer3.0.conv2, layer3.0.conv1, ",
    ),
    (
        "fc",
        {},
        SelectorError,
        r"^layers selector 'fc' matches no Conv2d: it matches fc \(Linear\) with no Conv2d beneath; closest conv names: ",
    ),
    ("layer9*", {}, SelectorError, r"^layers selector 'layer9\*' matches no module; closest names: "),
    ("re:layer3(", {}, SelectorError, r"^layers selector 're:layer3\(' is not a valid regular expression \("),
    (
        "layer3",
        {"exclude": "layer3.0.conv9"},
        SelectorError,
        r"^exclude selector 'layer3.0.conv9' matches no module; closest names: layer3.0.conv2, layer3.0.conv1",
    ),
    ([], {}, SelectorError, r"^layers is empty; name at least one layer"),
    (["layer3", " "], {}, SelectorError, r"^layers contains an empty selector; use '\*'"),
    ("layer3", {"num_experts": 0}, ValueError, r"^num_experts must be a positive integer, got 0$"),
    (
        "layer3",
        {"routing": "relu"},
        ValueError,
        r"^routing must be one of \('sigmoid', 'softmax', 'normalized_sigmoid'\), got 'relu'$",
    ),
    ("layer3", {"strategy": "fast"}, ValueError, r"^strategy must be one of"),
    ("layer3", {"temperature": 0}, ValueError, r"^temperature must be a positive finite number, got 0$"),
    ("layer3", {"init": "copy"}, ValueError, r"^init must be one of \('upcycle', 'fresh'\), got 'copy'$"),
    ("layer3", {"perturbation": -1.0}, ValueError, r"^perturbation must be a number >= 0"),
    ("layer3", {"min_channels": -1}, ValueError, r"^min_channels must be an integer >= 0"),
    ("layer3", {"kernel_sizes": 3}, TypeError, r"^kernel_sizes must be a sequence such as \[3\]"),
    ("layer3", {"kernel_sizes": [0]}, ValueError, r"^kernel_sizes must hold positive ints or \(kh, kw\) pairs, got 0$"),
    ("layer3", {"allow_classes": [nn.Linear]}, TypeError, r"^allow_classes must hold nn.Conv2d subclasses"),
    ("layer3", {"seed": 1.5}, ValueError, r"^seed must be an integer in \[0, 2\*\*63\) or None, got 1.5$"),
    ("layer3", {"include_depthwise": "no"}, ValueError, r"^include_depthwise must be True or False, got 'no'$"),
    (
        "layer3",
        {"include_squeeze_excitation": 0},
        ValueError,
        r"^include_squeeze_excitation must be True or False, got 0$",
    ),
    (
        "layer3",
        {"include_squeeze_excitation": False},
        ValueError,
        r"^include_squeeze_excitation=False needs input_size=\(C, H, W\): only a forward pass shows",
    ),
]


@pytest.mark.parametrize(("layers", "options", "error", "pattern"), REJECTION_CASES)
def test_rejections_leave_the_model_unchanged(layers, options: dict, error: type, pattern: str) -> None:
    model = zoo_model("resnet")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=pattern) as info:
        convert(model, layers, **options)
    assert "\n" not in str(info.value)
    assert converted_names(model) == []
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class WeightStandardizedConv2d(nn.Conv2d):
    """Weight standardization (Qiao et al. 2019): its forward normalizes the kernel first."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class TaggedConv2d(nn.Conv2d):
    """A subclass that only adds an attribute: its forward is a plain convolution."""

    tag = "backbone"


def model_with(*convs: nn.Module) -> nn.Sequential:
    return nn.Sequential(*convs)


def test_subclass_that_overrides_forward_is_skipped_with_a_warning_naming_it() -> None:
    model = model_with(nn.Conv2d(3, 4, 3), WeightStandardizedConv2d(4, 4, 3))
    with pytest.warns(
        UserWarning,
        match=r"convert left these convs alone: 1 \(a subclass of nn.Conv2d \(test_surgery_select.WeightStandardizedConv2d\) that overrides forward;.*allow_classes=\(WeightStandardizedConv2d,\)",
    ):
        report = convert(model, "*")
    assert converted_names(model) == ["0"] and type(model[1]) is WeightStandardizedConv2d
    assert [s.name for s in report.skipped] == ["1"]


def test_subclass_is_converted_when_its_class_is_allowed() -> None:
    model = model_with(TaggedConv2d(3, 4, 3))
    original = [m for m in model]
    x = torch.randn(2, 3, 6, 6)
    expected = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = convert(model, "*", allow_classes=[TaggedConv2d])
    assert isinstance(model[0], CondConv2d) and model[0] is not original[0]
    assert report.spec.layers["0"].source_class == "test_surgery_select.TaggedConv2d"
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)


def test_weight_normed_conv_is_skipped_with_the_way_out() -> None:
    from torch.nn.utils import weight_norm

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # weight_norm is deprecated in favour of parametrizations
        model = model_with(weight_norm(nn.Conv2d(3, 4, 3)))
    with pytest.warns(
        UserWarning,
        match=r"0 \(has a WeightNorm hook that recomputes its weight every forward; remove it \(torch.nn.utils.remove_weight_norm",
    ):
        report = convert(model, "*")
    assert report.converted == [] and type(model[0]) is nn.Conv2d


def test_parametrized_conv_is_skipped() -> None:
    from torch.nn.utils.parametrizations import orthogonal

    model = model_with(nn.Conv2d(3, 4, 1))
    orthogonal(model[0])
    with pytest.warns(UserWarning, match=r"a subclass of nn.Conv2d \(torch.nn.utils.parametrize.ParametrizedConv2d\)"):
        convert(model, "*")
    assert not converted_names(model)


def test_lazy_conv_is_refused_until_materialized() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.LazyConv2d(8, 3))
    with pytest.raises(
        ValueError, match=r"^cannot convert a lazy LazyConv2d before its shapes are known; run one forward pass"
    ):
        convert(model, "*")
    assert converted_names(model) == []  # nothing changed, not even the ready conv
    model(torch.randn(1, 3, 8, 8))
    convert(model, "*")
    assert converted_names(model) == ["0", "1"]


def test_torchscript_model_is_refused() -> None:
    scripted = torch.jit.script(model_with(nn.Conv2d(3, 4, 3)))
    with pytest.raises(
        TypeError,
        match=r"^cannot convert a TorchScript module: its compiled code would not see new layers; convert the eager nn.Module",
    ):
        convert(scripted, "*")


def test_selector_reaching_into_a_scripted_submodule_is_refused() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), torch.jit.script(nn.Sequential(nn.Conv2d(4, 4, 3))))
    with pytest.raises(
        TypeError, match=r"^selector '1' reaches into '1', a TorchScript module: its compiled code cannot be changed"
    ):
        convert(model, "1")
    assert converted_names(model) == []
    convert(model, "0")  # the eager part still converts
    assert isinstance(model[0], CondConv2d)


def se_net() -> nn.Sequential:
    """A stem, an SE block and a 1x1 conv on the full map (a 1x1 kernel is not a 1x1 input)."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), SqueezeExcite(8, 2), nn.Conv2d(8, 8, 1))


def test_squeeze_excitation_convs_are_left_out_on_request() -> None:
    assert converted_names(m := se_net()) == [] and len(convert(m, "*").converted) == 4  # kept by default
    model = se_net()
    x = torch.randn(2, 3, 8, 8)
    expected = model(x)
    report = convert(model, "*", include_squeeze_excitation=False, input_size=(3, 8, 8))
    assert converted_names(model) == ["0", "2"]
    assert {s.name: s.reason for s in report.skipped} == {
        name: "squeeze-and-excitation conv (1x1 input) and include_squeeze_excitation=False"
        for name in ("1.reduce", "1.expand")
    }
    assert report.converted[1].input_hw == (8, 8)  # one probe served the filter and the MAC counts
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)


def test_spec_round_trips_the_squeeze_excitation_option_and_old_specs_default_it() -> None:
    spec = convert(se_net(), "*", include_squeeze_excitation=False, input_size=(3, 8, 8)).spec
    data = spec.to_dict()
    assert data["options"]["include_squeeze_excitation"] is False
    assert ConversionSpec.from_dict(data).config == spec.config
    del data["options"]["include_squeeze_excitation"]  # a spec written before the option existed
    assert ConversionSpec.from_dict(data).config.include_squeeze_excitation is True
