"""Conversion specs, save_converted/load_converted: strict round trips onto fresh instances."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from zoo import ZOO, zoo_input, zoo_model

from condconv_lightning import CondConv2d
from condconv_lightning.demos import resnet_tiny
from condconv_lightning.surgery import ConversionSpec, apply_spec, convert, load_converted, read_spec, save_converted

# (zoo model, layers, options): each converted, then rebuilt from its spec on a fresh instance
SPEC_CASES = [
    ("plain", "features", {"routing": "softmax", "num_experts": 3}),
    ("resnet", ["layer3", "layer4"], {"exclude": "layer4.0.downsample", "temperature": 2.0}),
    ("mobilenet", "features", {"include_depthwise": False, "strategy": "mixture"}),
    ("dilated", "*", {}),
    ("grouped", "*", {"num_experts": 2}),
    ("padding_modes", "*", {"routing": "softmax"}),
    ("shared", "*", {}),
    ("nested", "branches", {"num_experts": 5}),
    ("lightning", "model", {}),
]


def trained(model: nn.Module) -> nn.Module:
    """Move every CondConv2d parameter away from its upcycled value, as fine-tuning would."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, CondConv2d):
                for parameter in module.parameters():
                    parameter.add_(torch.randn_like(parameter) * 0.01)
    return model


@pytest.mark.parametrize(("name", "layers", "options"), SPEC_CASES)
def test_spec_rebuilds_the_architecture_so_strict_loading_succeeds(name: str, layers, options: dict) -> None:
    model = zoo_model(name)
    report = convert(model, layers, **options)
    trained(model).eval()
    spec = ConversionSpec.from_json(report.spec.to_json())  # through JSON text, as it is stored
    assert spec.to_dict() == report.spec.to_dict()
    fresh = zoo_model(name, seed=1)
    apply_spec(fresh, spec)
    fresh.load_state_dict(model.state_dict(), strict=True)
    x = zoo_input(name)
    torch.testing.assert_close(fresh.eval()(x), model(x), rtol=0, atol=0)
    for (path, got), (_, want) in zip(fresh.named_modules(), model.named_modules()):
        assert type(got) is type(want), path
        if isinstance(got, CondConv2d):
            assert (got.routing, got.strategy, got.num_experts) == (want.routing, want.strategy, want.num_experts)


def test_spec_records_version_selectors_names_and_options() -> None:
    model = zoo_model("resnet")
    spec = convert(
        model, "layer4", exclude="layer4.0.downsample", num_experts=3, seed=4, kernel_sizes=[3]
    ).spec.to_dict()
    from condconv_lightning import __version__

    assert spec["version"] == __version__ and spec["format"] == 1
    assert spec["selectors"] == ["layer4"] and spec["exclude"] == ["layer4.0.downsample"]
    assert (
        spec["options"]["num_experts"] == 3
        and spec["options"]["seed"] == 4
        and spec["options"]["kernel_sizes"] == [[3, 3]]
    )
    assert spec["layers"] == {
        name: {
            "num_experts": 3,
            "routing": "sigmoid",
            "temperature": 1.0,
            "strategy": "auto",
            "source_class": "torch.nn.modules.conv.Conv2d",
        }
        for name in ("layer4.0.conv1", "layer4.0.conv2")
    }
    json.dumps(spec)  # plain JSON


def test_applying_a_seeded_spec_to_the_same_original_reproduces_the_conversion() -> None:
    model = zoo_model("resnet")
    spec = convert(model, "layer2", seed=3).spec
    again = zoo_model("resnet")
    apply_spec(again, spec)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_weights_and_spec_round_trip(tmp_path: Path, suffix: str) -> None:
    model = zoo_model("resnet")
    report = convert(model, "layer3", routing="softmax")
    trained(model).eval()
    path = save_converted(model, tmp_path / f"model{suffix}", report.spec)
    assert path == tmp_path / f"model{suffix}" and sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    assert read_spec(path).to_dict() == report.spec.to_dict()
    loaded = load_converted(path, zoo_model("resnet", seed=5))
    x = zoo_input("resnet")
    torch.testing.assert_close(loaded.eval()(x), model(x), rtol=0, atol=0)
    assert loaded.layer3[0].conv1.routing == "softmax"


def test_default_spec_describes_every_converted_layer(tmp_path: Path) -> None:
    model = zoo_model("resnet")
    convert(model, "layer1", num_experts=2)
    convert(model, "layer4", routing="softmax")  # two conversions, one file
    path = save_converted(model, tmp_path / "model.pt")
    loaded = load_converted(path, zoo_model("resnet"))
    assert loaded.layer1[0].conv1.num_experts == 2 and loaded.layer4[0].conv2.routing == "softmax"
    raw = torch.load(path, weights_only=True)  # no code runs to read it
    assert set(raw) == {"format", "spec", "state_dict"}


def test_full_module_needs_trust(tmp_path: Path) -> None:
    model = zoo_model("mobilenet")
    convert(model, "features.3")
    path = save_converted(model, tmp_path / "module.pt", as_module=True)
    with pytest.raises(
        ValueError,
        match=r"module.pt is a full pickled module: loading it runs code from the file; pass trust_pickle=True",
    ):
        load_converted(path)
    loaded = load_converted(path, trust_pickle=True)
    x = zoo_input("mobilenet")
    torch.testing.assert_close(loaded.eval()(x), model.eval()(x), rtol=0, atol=0)
    assert isinstance(loaded.features[3].conv[3], CondConv2d)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_wrapper_prefixes_in_saved_weights_load(tmp_path: Path, prefix: str) -> None:
    model = zoo_model("plain")
    report = convert(model, "features")
    wrapped = nn.Module()
    for part in prefix.rstrip(".").split("."):  # build a wrapper chain with these attribute names
        outer = nn.Module()
        setattr(outer, part, wrapped if part != prefix.rstrip(".").split(".")[-1] else model)
        wrapped = outer
    state = {prefix + k: v for k, v in model.state_dict().items()}
    spec = ConversionSpec({prefix + k: v for k, v in report.spec.layers.items()})
    path = tmp_path / "prefixed.pt"
    torch.save({"format": "condconv_lightning.converted/1", "spec": spec.to_json(), "state_dict": state}, path)
    loaded = load_converted(path, zoo_model("plain"))
    x = zoo_input("plain")
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_saving_a_wrapped_model_loads_into_a_plain_one(tmp_path: Path) -> None:
    model = zoo_model("plain")
    wrapped = nn.DataParallel(model)
    convert(wrapped, "features.2")
    path = save_converted(wrapped, tmp_path / "ddp.safetensors")
    loaded = load_converted(path, zoo_model("plain"))
    assert isinstance(loaded.features[2], CondConv2d)
    x = zoo_input("plain")
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_existing_file_is_kept_unless_overwrite(tmp_path: Path) -> None:
    model = zoo_model("plain")
    convert(model, "features.0")
    target = tmp_path / "model.pt"
    target.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match=r"already exists; pass overwrite=True"):
        save_converted(model, target)
    assert target.read_bytes() == b"keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]
    save_converted(model, target, overwrite=True)
    assert load_converted(target, zoo_model("plain")).features[0].num_experts == 4


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    class Unpicklable(nn.Module):
        def __reduce_ex__(self, protocol):
            raise RuntimeError("cannot pickle")

    model = nn.Sequential(nn.Conv2d(3, 4, 3), Unpicklable())
    with pytest.raises(RuntimeError, match="cannot pickle"):
        save_converted(model, tmp_path / "module.pt", as_module=True)
    assert list(tmp_path.iterdir()) == []


# ---- rejections


def test_load_rejections(tmp_path: Path) -> None:
    model = zoo_model("plain")
    report = convert(model, "features.0")
    weights = save_converted(model, tmp_path / "w.pt", report.spec)
    with pytest.raises(
        ValueError,
        match=r"w.pt holds weights and a conversion spec; pass a fresh instance of its architecture as model$",
    ):
        load_converted(weights)
    plain = tmp_path / "plain.pt"
    torch.save(zoo_model("plain").state_dict(), plain)
    with pytest.raises(
        ValueError,
        match=r"plain.pt holds no conversion spec \(it was not written by save_converted\); convert a fresh model",
    ):
        load_converted(plain, zoo_model("plain"))
    with pytest.raises(FileNotFoundError, match=r"missing.pt does not exist or is not a file"):
        load_converted(tmp_path / "missing.pt", zoo_model("plain"))
    with pytest.raises(ValueError, match=r"metadata is only stored in .safetensors files"):
        from condconv_lightning.io import save_state_dict

        save_state_dict({}, tmp_path / "x.pt", metadata={"a": "b"})
    with pytest.raises(
        ValueError, match=r"a full module cannot be stored as safetensors; use a .pt path or as_module=False"
    ):
        save_converted(model, tmp_path / "m.safetensors", as_module=True)


def test_spec_that_misses_converted_layers_is_refused(tmp_path: Path) -> None:
    model = zoo_model("resnet")
    first = convert(model, "layer1")
    convert(model, "layer2")
    with pytest.raises(
        ValueError,
        match=r"^the spec does not cover the CondConv2d layers layer2.0.conv1, layer2.0.conv2, layer2.0.downsample.0; pass spec=None",
    ):
        save_converted(model, tmp_path / "m.pt", first.spec)
    assert list(tmp_path.iterdir()) == []


def test_spec_rejections() -> None:
    spec = convert(zoo_model("resnet"), "layer4.0.conv1").spec
    with pytest.raises(
        ValueError,
        match=r"^conversion spec format 2 is newer than this library reads \(1\); upgrade condconv-lightning",
    ):
        ConversionSpec.from_dict({**spec.to_dict(), "format": 2})
    with pytest.raises(ValueError, match=r"^not a conversion spec: expected a JSON object with a 'layers' object"):
        ConversionSpec.from_dict({"selectors": []})
    with pytest.raises(ValueError, match=r"^conversion spec is not valid JSON \("):
        ConversionSpec.from_json("{")
    with pytest.raises(
        ValueError, match=r"^invalid conversion spec: LayerOptions.__init__\(\) got an unexpected keyword argument"
    ):
        ConversionSpec.from_dict({"layers": {"conv1": {"experts": 3}}})
    with pytest.raises(
        ValueError, match=r"^spec layer 'layer4.0.conv1' is not a convolution in this model \(closest: "
    ):
        apply_spec(zoo_model("plain"), spec)
    with pytest.raises(
        TypeError,
        match=r"^spec layer 'layer4.0.conv1' was a torch.nn.modules.conv.Conv2d when converted but is a test_surgery_persist.Odd",
    ):
        other = zoo_model("resnet")
        other.layer4[0].conv1 = Odd(64, 128, 3, 2, 1, bias=False)
        apply_spec(other, spec)
    not_conv = ConversionSpec.from_dict({"layers": {"layer4": spec.to_dict()["layers"]["layer4.0.conv1"]}})
    with pytest.raises(ValueError, match=r"^spec layer 'layer4' is not a convolution in this model"):
        apply_spec(zoo_model("resnet"), not_conv)


class Odd(nn.Conv2d):
    """A Conv2d subclass standing in for an architecture that changed."""


def test_every_zoo_model_round_trips_through_a_file(tmp_path: Path) -> None:
    for name in ZOO:
        model = zoo_model(name)
        convert(model, "*", seed=0)
        path = save_converted(trained(model).eval(), tmp_path / f"{name}.pt")
        loaded = load_converted(path, zoo_model(name, seed=9)).eval()
        x = zoo_input(name)
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0, msg=name)
        assert copy.deepcopy(loaded) is not loaded


def test_default_spec_of_an_allowed_subclass_loads_into_a_fresh_instance(tmp_path: Path) -> None:
    def build() -> nn.Sequential:
        torch.manual_seed(0)
        return nn.Sequential(Odd(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 1))

    model = build()
    convert(model, "*", allow_classes=[Odd])
    path = save_converted(model, tmp_path / "odd.pt")  # spec=None: described from the converted model
    assert read_spec(path).layers["0"].source_class is None
    loaded = load_converted(path, build())
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


class ChildNamedModule(nn.Module):
    """A model whose own child is called ``module``, as DataParallel's is."""

    def __init__(self) -> None:
        super().__init__()
        self.module = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


def test_a_child_named_module_is_no_wrapper_prefix(tmp_path) -> None:
    from condconv_lightning.loading import load_model

    torch.manual_seed(0)
    model = ChildNamedModule()
    convert(model, "module.0", num_experts=4)
    path = save_converted(model, tmp_path / "child.pt")
    loaded = load_converted(path, ChildNamedModule())
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    plain = ChildNamedModule()
    torch.save(plain.state_dict(), tmp_path / "plain.pt")
    reloaded = load_model(tmp_path / "plain.pt", arch=f"{__name__}:ChildNamedModule").model
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), plain.state_dict().values()))


RELOAD = """
import sys

import torch

from condconv_lightning import load_converted
from condconv_lightning.demos import resnet_tiny
from condconv_lightning.functional import load_tuning_cache, save_tuning_cache

path, probe, output, cache = sys.argv[1:]
model = load_converted(path, resnet_tiny(num_classes=10)).eval()
if cache.endswith(".in"):
    load_tuning_cache(cache)
with torch.no_grad():
    logits = model(torch.load(probe))
if cache.endswith(".out"):
    save_tuning_cache(cache)
torch.save(logits, output)
"""


def reload_in_a_new_process(folder: Path, name: str, cache: str = "none") -> torch.Tensor:
    """Load ``folder/model.safetensors`` in a new Python with measured ``auto`` on, and run it on the probe."""
    command = [sys.executable, "-c", RELOAD, "model.safetensors", "probe.pt", f"{name}.pt", cache]
    env = {**os.environ, "CONDCONV_TUNE": "1"}
    done = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(folder / f"{name}.pt")


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["auto", "mixture"])
def test_two_processes_compute_the_same_bits_with_a_pinned_strategy_or_the_same_tuned_choices(
    tmp_path: Path, strategy: str
) -> None:
    """With ``auto``, a new process may time another strategy for a layer, which rounds differently: a strategy
    stored in the file's spec, or the first process's tuning cache loaded in the second, gives the same bits."""
    torch.manual_seed(0)
    model = resnet_tiny(num_classes=10)
    convert(model, ["layer3", "layer4"], num_experts=4, seed=0, strategy=strategy)
    save_converted(trained(model), tmp_path / "model.safetensors")
    torch.save(torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)), tmp_path / "probe.pt")
    if strategy == "auto":
        first = reload_in_a_new_process(tmp_path, "first", cache="tuning.json.out")
        (tmp_path / "tuning.json.out").rename(tmp_path / "tuning.json.in")
        second = reload_in_a_new_process(tmp_path, "second", cache="tuning.json.in")
    else:
        first, second = (reload_in_a_new_process(tmp_path, name) for name in ("first", "second"))
    assert torch.equal(first, second)
