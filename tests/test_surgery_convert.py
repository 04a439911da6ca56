"""convert(): exact preservation over the zoo, faithful replacement, divergence under training."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from reference import relative_difference
from zoo import ZOO, SharedConvNet, zoo_input, zoo_model

from condconv_lightning import CondConv2d
from condconv_lightning.surgery import convert, list_convs

TOLERANCE = 1e-5


def converted_pair(name: str, **options) -> tuple[nn.Module, nn.Module]:
    """(original, converted) from one seeded model; the original is an untouched copy."""
    model = zoo_model(name)
    original = copy.deepcopy(model)
    convert(model, "*", **options)
    return original, model


EXACT_RECIPES = {
    "sigmoid-zero": dict(routing="sigmoid", num_experts=4),
    "softmax-zero": dict(routing="softmax", num_experts=3),
    "normalized_sigmoid-zero": dict(routing="normalized_sigmoid", num_experts=4),
    "softmax-random": dict(routing="softmax", num_experts=4, router_init="random", perturbation=0.0),
    "normalized_sigmoid-random": dict(
        routing="normalized_sigmoid", num_experts=3, router_init="random", router_scale=3.0, perturbation=0.0
    ),
}
"""Every combination of conversion options that is exact (ConversionConfig.inexactness is None)."""


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("recipe", list(EXACT_RECIPES))
@pytest.mark.parametrize("name", list(ZOO))
def test_upcycled_model_computes_what_the_original_did(name: str, recipe: str, mode: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an exact recipe converts without a warning
        original, model = converted_pair(name, **EXACT_RECIPES[recipe], seed=0)
    original.train(mode == "train")
    model.train(mode == "train")
    assert {type(m) for _, m in list_convs(model)} == {CondConv2d}
    x = zoo_input(name)
    # train mode: BatchNorm updates its running statistics; each model has its own copy
    assert relative_difference(model(x), original(x)) <= TOLERANCE
    if mode == "train":
        buffers = dict(model.named_buffers())
        for name, want in original.named_buffers():  # BatchNorm statistics moved the same way
            torch.testing.assert_close(buffers[name], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("routing", "num_experts"), [("sigmoid", 4), ("softmax", 3), ("sigmoid", 1)])
def test_a_float64_conv_upcycles_to_float64_precision(routing: str, num_experts: int) -> None:
    """Float64 weights are upcycled in float64: float32 would round away the exactness their dtype holds."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=2, dtype=torch.float64)  # weights float32 cannot hold exactly
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    layer = CondConv2d.from_conv(conv, num_experts, routing=routing)
    with torch.no_grad():
        assert relative_difference(layer(x), conv(x)) <= 1e-13
        exact = CondConv2d.from_conv(conv, num_experts, routing=routing, perturbation=0.0)
        if num_experts == 1:  # one expert, no offsets: the kernel itself, scaled by a power of two
            assert torch.equal(exact.expert_weight()[0] * 0.5, conv.weight)


def test_defaults_kept_by_the_upcycling_study_zero_router_perturbation_0_05_router_lr_of_the_optimizer() -> None:
    """docs/upcycling.md: no variant beat these over 5 seeds, and a random router init gives up exactness."""
    import inspect

    from condconv_lightning.finetune import ImageClassifier
    from condconv_lightning.surgery import ConversionConfig

    config = ConversionConfig()
    assert (config.init, config.perturbation, config.routing, config.num_experts) == ("upcycle", 0.05, "sigmoid", 4)
    assert inspect.signature(ImageClassifier).parameters["router_lr"].default is None
    original, model = converted_pair("resnet", seed=0)
    routers = [m.router for m in model.modules() if isinstance(m, CondConv2d)]
    assert all(not r.weight.any() and not r.bias.any() for r in routers), "routers start at zero"
    for mode in (True, False):
        x = zoo_input("resnet")
        assert relative_difference(model.train(mode)(x), original.train(mode)(x)) <= TOLERANCE


@pytest.mark.parametrize("name", ["resnet", "mobilenet"])
def test_fresh_init_trains_from_scratch_and_does_not_reproduce(name: str) -> None:
    original, model = converted_pair(name, init="fresh")
    x = zoo_input(name)
    assert relative_difference(model.eval()(x), original.eval()(x)) > 1e-2


def train_plain_model(perturbation: float, steps: int = 10) -> tuple[torch.Tensor, torch.Tensor, CondConv2d]:
    """SGD on a learnable task (the class is read off each image's colour cast).

    Returns the routing of ``features.2`` over the batch after training, every
    expert's total update, and the layer.
    """
    generator = torch.Generator().manual_seed(0)
    cast = torch.randn(32, 3, 1, 1, generator=generator)
    x = torch.randn(32, 3, 12, 12, generator=generator) * 0.5 + cast
    labels = cast.flatten(1).argmax(1) + (cast[:, 0, 0, 0] > 0).long() * 2
    model = zoo_model("plain")
    convert(model, "features", num_experts=4, seed=0, perturbation=perturbation)
    layer = model.features[2]
    start = layer.expert_weight().detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]  # it learns
    with torch.no_grad():
        routing = layer.route(model.features[1](model.features[0](x)))
        return routing, layer.expert_weight() - start, layer


def spread(values: torch.Tensor, dim: int) -> float:
    """Largest deviation from the mean along ``dim``."""
    return float((values - values.mean(dim, keepdim=True)).abs().max())


def test_training_makes_routing_input_dependent_and_experts_diverge() -> None:
    routing, updates, _ = train_plain_model(perturbation=0.05)
    assert routing.std(dim=0).min() > 1e-3  # every expert's weight varies across samples
    assert spread(routing, dim=1) > 1e-4  # experts get different weights for the same sample
    assert spread(updates, dim=0) > 1e-4 * updates.abs().max()  # and different updates: they diverge


def test_without_perturbation_experts_would_stay_identical() -> None:
    """The control for the test above: the offsets are what breaks the symmetry."""
    routing, updates, _ = train_plain_model(perturbation=0.0)
    assert spread(routing, dim=1) == 0 and spread(updates, dim=0) == 0


def test_seed_makes_experts_reproducible_and_independent_of_other_layers() -> None:
    first, second, third = zoo_model("resnet"), zoo_model("resnet"), zoo_model("resnet")
    convert(first, "layer3", seed=7)
    convert(second, ["layer1", "layer3"], seed=7)
    convert(third, "layer3", seed=8)
    assert torch.equal(first.layer3[0].conv1.weight, second.layer3[0].conv1.weight)
    assert not torch.equal(first.layer3[0].conv1.weight, third.layer3[0].conv1.weight)


def test_shared_conv_becomes_one_shared_condconv() -> None:
    model = zoo_model("shared")
    report = convert(model, "shared")
    assert isinstance(model.shared, CondConv2d) and model.shared is model.blocks[0]
    assert [r.aliases for r in report.converted] == [("shared", "blocks.0")]
    assert len(list(model.parameters())) == len({id(p) for p in model.parameters()})


def test_selecting_a_shared_conv_by_its_second_path_converts_it_everywhere() -> None:
    model = SharedConvNet()
    convert(model, "blocks.0")
    assert isinstance(model.shared, CondConv2d) and model.shared is model.blocks[0]


def test_converting_twice_changes_nothing() -> None:
    model = zoo_model("resnet")
    convert(model, "layer2", seed=0)
    state = copy.deepcopy(model.state_dict())
    layers = {name: m for name, m in model.named_modules()}
    report = convert(model, "layer2")
    assert report.converted == [] and report.skipped == []
    assert sorted(report.already_converted) == sorted(
        n for n, m in layers.items() if n.startswith("layer2") and isinstance(m, CondConv2d)
    )
    assert all(layers[name] is m for name, m in model.named_modules())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_dtype_device_mode_and_requires_grad_carry_over() -> None:
    model = zoo_model("plain").double()
    model.features[0].requires_grad_(False)
    model.features[2].bias.requires_grad_(False)
    model.features[2].eval()
    convert(model, "features")
    frozen, partly, normal = model.features[0], model.features[2], model.features[4]
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert not any(p.requires_grad for p in frozen.parameters())
    assert partly.weight.requires_grad and not partly.bias.requires_grad
    assert not partly.training and normal.training and model.training


def test_hooks_carry_over_and_their_handles_still_remove_them() -> None:
    model = zoo_model("plain")
    conv = model.features[2]
    calls: list[str] = []
    handles = [
        conv.register_forward_pre_hook(lambda m, args: calls.append(f"pre:{type(m).__name__}")),
        conv.register_forward_pre_hook(lambda m, args, kwargs: calls.append("pre-kwargs"), with_kwargs=True),
        conv.register_forward_hook(lambda m, args, out: calls.append(f"post:{tuple(out.shape)}")),
        conv.register_forward_hook(lambda m, args, kwargs, out: calls.append("post-kwargs"), with_kwargs=True),
        conv.register_forward_hook(lambda m, args, out: calls.append("always"), always_call=True),
    ]
    convert(model, "features.2")
    model(zoo_input("plain"))
    assert calls == ["pre:CondConv2d", "pre-kwargs", "post:(3, 12, 6, 6)", "post-kwargs", "always"]
    for handle in handles:
        handle.remove()
    calls.clear()
    model(zoo_input("plain"))
    assert calls == []


def test_full_backward_hook_carries_over() -> None:
    model = zoo_model("plain")
    grads: list[torch.Size] = []
    model.features[2].register_full_backward_hook(lambda m, gin, gout: grads.append(gout[0].shape))
    convert(model, "features.2")
    model(zoo_input("plain").requires_grad_()).sum().backward()
    assert grads == [torch.Size([3, 12, 6, 6])]


def test_lightning_module_converts_and_trains() -> None:
    import lightning.pytorch as pl

    module = zoo_model("lightning")
    convert(module, "model.features.2")
    x, labels = zoo_input("lightning", batch=8), torch.randint(0, 5, (8,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, labels), batch_size=4)
    trainer = pl.Trainer(
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    before = module.model.features[2].router.weight.detach().clone()
    trainer.fit(module, loader)
    assert not torch.equal(before, module.model.features[2].router.weight)  # the optimizer saw the new parameters


def test_fx_symbolic_trace_of_a_converted_model() -> None:
    original, model = converted_pair("resnet", seed=0)
    model.eval()
    original.eval()
    traced = torch.fx.symbolic_trace(model)
    assert sum(
        node.target.__name__ == "condconv2d"
        for node in traced.graph.nodes
        if node.op == "call_function" and hasattr(node.target, "__name__")
    ) == len(list_convs(model))
    x = zoo_input("resnet")
    assert relative_difference(traced(x), original(x)) <= TOLERANCE


def test_torch_compile_of_a_converted_model() -> None:
    """backend='eager' runs dynamo's capture (graph breaks surface) without inductor's slow CPU codegen."""
    torch._dynamo.reset()
    original, model = converted_pair("plain", seed=0)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    x = zoo_input("plain")
    assert relative_difference(compiled(x), original(x)) <= TOLERANCE


def test_converting_a_compiled_model_reaches_the_inner_model() -> None:
    torch._dynamo.reset()
    model = zoo_model("plain")
    original = copy.deepcopy(model)
    compiled = torch.compile(model, backend="eager")
    report = convert(compiled, "features.0")
    assert [r.name for r in report.converted] == ["_orig_mod.features.0"]
    assert isinstance(model.features[0], CondConv2d)
    x = zoo_input("plain")
    assert relative_difference(compiled(x), original(x)) <= TOLERANCE


def test_no_warning_for_plain_convs() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        convert(zoo_model("mobilenet"), "*")


def test_converting_convs_that_share_a_weight_warns_that_they_train_apart() -> None:
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
    model[2].weight = model[0].weight  # tied, as some weight-sharing models do
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        expected = model(x)
    with pytest.warns(UserWarning, match=r"no longer share their weight: 0 = 2;"):
        convert(model, "*", num_experts=4)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    plain = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        convert(plain, "*", num_experts=4)  # nothing shared: no warning
