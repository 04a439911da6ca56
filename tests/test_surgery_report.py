"""The conversion report: parameter and MAC counts against hand-derived shapes, JSON and the rich table."""

from __future__ import annotations

import json

import pytest
import torch
from rich.console import Console
from torch import nn
from zoo import zoo_model

from condconv_lightning.demos import resnet50_like
from condconv_lightning.functional import STRATEGIES
from condconv_lightning.surgery import convert

# PlainCNN at input 3x12x12, shapes worked out by hand from its definition:
# (name, Cin, Cout, kh, kw, input HxW, output HxW, has bias)
PLAIN_LAYERS = [
    ("features.0", 3, 8, 3, 3, (12, 12), (12, 12), True),  # 3x3, padding 1
    ("features.2", 8, 12, 3, 3, (12, 12), (6, 6), True),  # 3x3, stride 2, padding 1
    ("features.4", 12, 16, 1, 3, (6, 6), (6, 6), True),  # 1x3, padding (0, 1)
]


def expected_counts(cin: int, cout: int, kh: int, kw: int, hw_in, hw_out, bias: bool, k: int, calls: int = 1) -> dict:
    """CondConv's extra cost written out: pool + linear routing, K*P kernel mixing (+ K*Cout bias)."""
    p = cout * cin * kh * kw
    return {
        "params_before": p + (cout if bias else 0),
        "params_after": k * p + (k * cout if bias else 0) + cin * k + k,
        "conv_macs": calls * p * hw_out[0] * hw_out[1],
        "routing_macs": calls * (cin * hw_in[0] * hw_in[1] + cin * k),
        "mixing_macs": calls * k * (p + (cout if bias else 0)),
    }


@pytest.mark.parametrize("k", [2, 4])
def test_counts_match_hand_derived_shapes(k: int) -> None:
    report = convert(zoo_model("plain"), "features", num_experts=k, input_size=(3, 12, 12))
    for record, (name, cin, cout, kh, kw, hw_in, hw_out, bias) in zip(report.converted, PLAIN_LAYERS):
        assert record.name == name and record.input_hw == hw_in and record.output_hw == hw_out
        got = {
            key: getattr(record, key)
            for key in ("params_before", "params_after", "conv_macs", "routing_macs", "mixing_macs")
        }
        assert got == expected_counts(cin, cout, kh, kw, hw_in, hw_out, bias, k)
    expected = [expected_counts(*layer[1:], k) for layer in PLAIN_LAYERS]
    for key in ("params_before", "params_after", "conv_macs", "routing_macs", "mixing_macs"):
        assert report.totals[key] == sum(e[key] for e in expected)
    assert report.totals["params_added"] == report.totals["params_after"] - report.totals["params_before"]


def test_a_conv_applied_twice_counts_twice() -> None:
    report = convert(zoo_model("shared"), "shared", input_size=(3, 10, 10))
    (record,) = report.converted
    assert record.calls == 2 and record.aliases == ("shared", "blocks.0")
    assert record.routing_macs == expected_counts(8, 8, 3, 3, (10, 10), (10, 10), True, 4, calls=2)["routing_macs"]


def test_without_input_size_spatial_counts_are_none() -> None:
    report = convert(zoo_model("plain"), "features.2")
    (record,) = report.converted
    assert record.conv_macs is None and record.routing_macs is None and record.input_hw is None
    assert record.mixing_macs == 4 * (12 * 8 * 9 + 12)
    assert report.totals["routing_macs"] is None and report.totals["mixing_macs"] == record.mixing_macs


def test_shape_probe_changes_no_state() -> None:
    model = zoo_model("resnet")
    model.layer1.eval()
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    convert(model, "layer2", input_size=(3, 16, 16))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in stats.items())
    assert model.training and not model.layer1.training and model.layer2.training


def test_wrong_input_size_is_one_clear_line_and_changes_nothing() -> None:
    model = zoo_model("plain")
    with pytest.raises(
        ValueError,
        match=r"^input_size=\(4, 12, 12\) does not fit the model \(RuntimeError: .*\); pass the \(C, H, W\) of one input sample",
    ) as info:
        convert(model, "features", input_size=(4, 12, 12))
    assert "\n" not in str(info.value)
    assert all(type(m) is torch.nn.Conv2d for m in model.features if isinstance(m, torch.nn.Conv2d))


def test_json_round_trips_and_holds_the_spec() -> None:
    model = zoo_model("mobilenet")
    report = convert(model, "features.1", include_depthwise=False, input_size=(3, 16, 16))
    data = json.loads(report.to_json())
    assert data == report.to_dict()
    assert [r["name"] for r in data["converted"]] == ["features.1.conv.0", "features.1.conv.6"]
    assert data["skipped"] == [
        {"name": "features.1.conv.3", "reason": "depthwise (groups == in_channels) and include_depthwise=False"}
    ]
    assert data["input_size"] == [3, 16, 16] and data["spec"]["layers"].keys() == {
        "features.1.conv.0",
        "features.1.conv.6",
    }


def test_rich_table_shows_every_layer_and_the_totals_in_80_columns() -> None:
    model = zoo_model("resnet")
    convert(model, "layer2")
    report = convert(model, ["layer2", "layer3"], exclude="layer3.0.conv2", input_size=(3, 16, 16))
    console = Console(record=True, width=80)
    console.print(report)
    lines = console.export_text().splitlines()
    assert max(map(len, lines)) <= 80
    rows = {line.split()[0]: line.split()[1:] for line in lines if line.strip().startswith(("layer", "total"))}
    # layer3.0.conv1: 32->64 3x3 stride 2, K=4; 4*18432 + 4*32 + 32*4 + 4 = 73,860 parameters after
    assert rows["layer3.0.conv1"][:5] == ["32->64", "3x3/2", "4", "18.4k", "73.9k"]
    # layer3.0.downsample.0: 1x1, 32*64 = 2,048 -> 4*2048 + 32*4 + 4 = 8,324; layer3 sees layer2's 8x8 output
    *counts, strategy = rows["layer3.0.downsample.0"]
    assert counts == ["32->64", "1x1/2", "4", "2,048", "8,324", f"{32 * 8 * 8 + 32 * 4:,}", "8,192"]
    assert strategy == report.converted[1].strategy and strategy in STRATEGIES
    assert rows["total"] == [
        "20.5k",
        "82.2k",
        f"{2 * (32 * 8 * 8 + 32 * 4):,}",
        "81.9k",
    ]  # 18,432 + 2,048; 73,860 + 8,324; 73,728 + 8,192
    text = " ".join(" ".join(lines).split())  # the caption wraps at the table's width
    assert "CondConv conversion: 2 layers" in text
    assert "1 skipped" in text and "3 already CondConv2d" in text and "extra MACs per sample at input 3x16x16" in text


def test_the_probe_forward_records_each_layers_strategy_and_only_it_shows_the_column() -> None:
    model = zoo_model("resnet")
    probed = convert(model, "layer2", input_size=(3, 16, 16))
    assert all(r.strategy == model.get_submodule(r.name).last_strategy in STRATEGIES for r in probed.converted)
    assert all(r["strategy"] == c.strategy for r, c in zip(probed.to_dict()["converted"], probed.converted))
    unprobed = convert(zoo_model("resnet"), "layer2")
    assert all(r.strategy is None for r in unprobed.converted)
    for report, shown in ((probed, True), (unprobed, False)):
        console = Console(record=True, width=80)
        console.print(report)
        assert ("strategy" in console.export_text()) == shown


def test_resnet50_report_keeps_every_name_and_column_in_80_columns() -> None:
    report = convert(resnet50_like(), "*", input_size=(3, 64, 64))
    console = Console(record=True, width=80)
    console.print(report)
    text = console.export_text()
    assert max(map(len, text.splitlines())) <= 80 and "…" not in text
    words = text.split()
    assert all(r.name in words for r in report.converted) and "layer4.0.downsample.0" in words  # whole, never cut
    assert {"layer", "conv", "K", "params", "after", "routing", "mixing", "strategy"} <= set(words)
    assert "extra MACs per sample at input 3x64x64" in " ".join(words)  # the size the MACs were counted at


def test_names_too_long_for_the_console_fold_instead_of_dropping_columns() -> None:
    model = torch.nn.Sequential()
    model.add_module("a_very_long_block_name_from_some_model", torch.nn.Sequential(torch.nn.Conv2d(3, 1024, 1)))
    report = convert(model, "*", input_size=(3, 8, 8))
    console = Console(record=True, width=60)
    console.print(report)
    text = console.export_text()
    assert max(map(len, text.splitlines())) <= 60 and "…" not in text
    lines = text.splitlines()
    first = next(i for i, line in enumerate(lines) if "───" in line) + 1
    body = lines[first : lines.index(" " * len(lines[first]), first)]  # the rows, up to the blank line
    assert "".join(line.split()[0] for line in body) == "a_very_long_block_name_from_some_model.0"
    assert {"routing", "mixing", "strategy"} <= set(text.split())
    assert body[0].split()[1:] == [
        "3->1024",
        "1x1",
        "4",
        "4,096",
        "16.4k",
        "204",
        "16.4k",
        report.converted[0].strategy,
    ]


def test_a_conversion_whose_probe_fails_converts_nothing(monkeypatch) -> None:
    """The input fits the original model; the converted one cannot run it (fused on CPU without Triton's interpreter)."""
    from condconv_lightning import CondConv2d
    from condconv_lightning.demos import resnet_tiny

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = resnet_tiny()
    before = dict(model.named_modules())
    with pytest.raises(ValueError, match=r"converted model fails on input_size=\(3, 32, 32\).*nothing was converted"):
        convert(model, "layer4", strategy="fused", input_size=(3, 32, 32))
    assert dict(model.named_modules()) == before and not any(isinstance(m, CondConv2d) for m in model.modules())


def test_long_names_wrap_at_dots_with_an_indented_continuation_in_80_columns() -> None:
    """timm's EfficientNet names (blocks.5.0.se.conv_reduce) do not fit 80 columns beside the counts."""

    class Excite(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv_reduce, self.conv_expand = nn.Conv2d(1152, 48, 1), nn.Conv2d(48, 1152, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.conv_expand(self.conv_reduce(x.mean((2, 3), keepdim=True))).sigmoid()

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv_pw = nn.Conv2d(192, 1152, 1)
            self.conv_dw = nn.Conv2d(1152, 1152, 5, padding=2, groups=1152)
            self.se = Excite()
            self.conv_pwl = nn.Conv2d(1152, 192, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv_pwl(self.se(self.conv_dw(self.conv_pw(x))))

    model = nn.Sequential()
    model.add_module("blocks", nn.Sequential(*[nn.Sequential(Block()) for _ in range(6)]))
    report = convert(model, "*", input_size=(192, 4, 4))
    console = Console(record=True, width=80)
    console.print(report)
    lines = console.export_text().splitlines()
    assert max(map(len, lines)) <= 80
    body = lines[lines.index(next(line for line in lines if "───" in line)) + 1 :]
    names, current = [], None
    for line in body:
        if line.startswith(" blocks."):
            current = line.split()[0]
            names.append(current)
        elif line.startswith("   ") and line.strip() and current is not None and not line.strip()[0].isdigit():
            names[-1] += line.split()[0]  # the continuation of the name above, indented
        else:
            current = None
    assert names == [r.name for r in report.converted]
    assert any(len(name) > len(line.split()[0]) for name, line in zip(names, body)), "some names wrapped"
    wide = Console(record=True, width=160)
    wide.print(report)
    words = wide.export_text().split()
    assert all(r.name in words for r in report.converted), "unbroken where they fit"
