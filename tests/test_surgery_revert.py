"""revert(): CondConv2d back to nn.Conv2d with the routing-weighted mean kernel, against a float64 reference."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from zoo import ZOO, zoo_input, zoo_model

from condconv_lightning import CondConv2d
from condconv_lightning.surgery import convert, list_convs, revert


def perturb(model: nn.Module) -> nn.Module:
    """Make routing input dependent and experts distinct, as training would."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, CondConv2d):
                for parameter in module.parameters():
                    parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model


@pytest.mark.parametrize("name", list(ZOO))
def test_reverting_an_upcycled_model_with_inputs_gives_back_the_original(name: str) -> None:
    """Upcycled routing is the same constant for every input, so the mean-routing kernel is the conv's."""
    model = zoo_model(name).eval()
    original = copy.deepcopy(model)
    convert(model, "*", routing="softmax" if name == "grouped" else "sigmoid")
    x = zoo_input(name)
    revert(model, x)
    assert all(type(m) is nn.Conv2d for _, m in list_convs(model))
    for (path, got), (_, want) in zip(list_convs(model), list_convs(original)):
        torch.testing.assert_close(got.weight, want.weight, rtol=1e-5, atol=1e-6, msg=path)
    torch.testing.assert_close(model(x), original(x), rtol=1e-5, atol=1e-5)


def reference_mean_routing(layer: CondConv2d, layer_input: torch.Tensor) -> torch.Tensor:
    """The paper's router written out in float64: sigmoid(W avgpool(x) + b), averaged over the batch."""
    pooled = layer_input.double().mean(dim=(2, 3))
    logits = pooled @ layer.router.weight.double().T + layer.router.bias.double()
    return torch.sigmoid(logits / float(layer.temperature)).mean(dim=0)


def test_kernel_is_mixed_with_the_mean_routing_over_the_inputs() -> None:
    model = perturb(convert_all(zoo_model("plain"))).eval()
    x = zoo_input("plain", batch=5)
    layer = model.features[2]
    layer_input = model.features[1](model.features[0](x)).detach()
    mix = reference_mean_routing(layer, layer_input)
    expected_weight = torch.einsum("k,kp->p", mix, layer.weight.double()).view(12, 8, 3, 3)
    expected_bias = mix @ layer.bias.double()
    assert mix.std() > 1e-3  # distinct experts get distinct weights
    revert(model, x)
    torch.testing.assert_close(model.features[2].weight.double(), expected_weight, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(model.features[2].bias.double(), expected_bias, rtol=1e-6, atol=1e-7)


def convert_all(model: nn.Module) -> nn.Module:
    convert(model, "*")
    return model


def test_without_inputs_the_plain_expert_mean_is_used() -> None:
    model = perturb(convert_all(zoo_model("grouped")))
    experts = {name: (m.weight.detach().double().mean(0), m.bias) for name, m in list_convs(model)}
    revert(model)
    for name, conv in list_convs(model):
        mean_weight, bias = experts[name]
        torch.testing.assert_close(conv.weight.double().flatten(), mean_weight)
        if bias is not None:
            torch.testing.assert_close(conv.bias, bias.detach().mean(0))
    assert model.grouped4.bias is None and model.depthwise.groups == 8


def test_revert_keeps_sharing_hooks_mode_dtype_and_the_train_state_of_batchnorm() -> None:
    model = convert_all(zoo_model("shared")).double()
    model.shared.eval()
    model.shared.bias.requires_grad_(False)
    calls: list[str] = []
    model.shared.register_forward_hook(lambda m, args, out: calls.append(type(m).__name__))
    stats = model.blocks[1].running_mean.clone()
    revert(model, zoo_input("shared").double())
    assert torch.equal(model.blocks[1].running_mean, stats)  # the routing pass ran in eval mode
    assert model.training and not model.shared.training and model.blocks[1].training
    assert type(model.shared) is nn.Conv2d and model.shared is model.blocks[0]
    assert model.shared.weight.dtype == torch.float64
    assert model.shared.weight.requires_grad and not model.shared.bias.requires_grad
    assert calls == ["CondConv2d", "CondConv2d"]  # revert's routing pass is a forward like any other
    calls.clear()
    model(zoo_input("shared").double())
    assert calls == ["Conv2d", "Conv2d"]  # applied twice, the hook followed the layer


def test_layers_the_inputs_never_reach_fall_back_with_a_warning() -> None:
    class Unused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = nn.Conv2d(3, 4, 3)
            self.unused = nn.Conv2d(4, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    model = Unused()
    convert(model, "*")
    with pytest.warns(UserWarning, match=r"revert: the inputs never reached unused; those use the plain expert mean"):
        revert(model, torch.randn(2, 3, 6, 6))
    assert type(model.unused) is nn.Conv2d


def test_reverting_a_bare_layer_returns_its_conv() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    layer = CondConv2d.from_conv(conv, 4)
    x = torch.randn(2, 4, 8, 8)
    reverted = revert(layer, x)
    assert type(reverted) is nn.Conv2d
    with torch.no_grad():
        torch.testing.assert_close(reverted(x), conv(x), rtol=1e-5, atol=1e-6)
