"""Export of CondConv models keeps the batch dimension dynamic.

``grouped`` folds the batch into ``groups``, which ONNX stores as a constant; under
export ``auto`` therefore picks ``bmm``/``mixture`` (a layer forced to ``grouped`` or
``fused`` runs ``auto`` there), and no code path compares the
batch size with anything (the batch-1 rule, the memory-budget chunking, the empty-batch
case and tuning all stand aside), so an unbounded ``Dim`` exports without a guard.
Checked with ``torch.export`` at batch sizes other than the traced one, and with
onnxruntime at two batch sizes, against the eager model.

Tracing at batch 1 needs ``backed_size_oblivious``: without it torch.export
specializes a size-1 dimension to the constant 1 for any model, a plain ``nn.Conv2d``
included; likewise ``Dim.AUTO``/``Dim.DYNAMIC`` from batch 3 infer ``batch >= 2``
unless it is set.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from torch.fx.experimental import _config as fx_config
from torch.utils._sympy.numbers import int_oo

import condconv_lightning.functional.auto as auto
from condconv_lightning import CondConv2d

BOUNDED_BATCH = torch.export.Dim("batch", min=1, max=1024)


def routed(*args, **kwargs) -> CondConv2d:
    layer = CondConv2d(*args, num_experts=3, **kwargs)
    with torch.no_grad():  # routing that differs between samples
        layer.router.weight.normal_()
    return layer


@pytest.fixture(scope="module")
def model() -> nn.Module:
    """Every kind of layer auto distinguishes: dense 3x3, depthwise, 1x1, strided, bias-free."""
    torch.manual_seed(0)
    return nn.Sequential(
        routed(3, 8, 3, padding=1),
        nn.ReLU(),
        routed(8, 8, 3, padding=1, groups=8),
        routed(8, 6, 1, bias=False),
        nn.ReLU(),
        routed(6, 4, 3, stride=2),
    ).eval()


def test_torch_export_keeps_bounded_batch_dynamic(model):
    program = torch.export.export(model, (torch.randn(3, 3, 12, 12),), dynamic_shapes=({0: BOUNDED_BATCH},))
    for batch in (1, 5):
        x = torch.randn(batch, 3, 12, 12)
        torch.testing.assert_close(program.module()(x), model(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("traced_batch", [1, 3])
@pytest.mark.parametrize(
    "dim", [torch.export.Dim("batch"), torch.export.Dim.AUTO, torch.export.Dim.DYNAMIC], ids=["Dim", "AUTO", "DYNAMIC"]
)
def test_torch_export_with_unbounded_batch_has_no_batch_guard(model, dim, traced_batch):
    with fx_config.patch(backed_size_oblivious=True):
        program = torch.export.export(model, (torch.randn(traced_batch, 3, 12, 12),), dynamic_shapes=({0: dim},))
    assert_unbounded_batch(program)
    for batch in (1, 2, 7):
        x = torch.randn(batch, 3, 12, 12)
        torch.testing.assert_close(program.module()(x), model(x), rtol=1e-5, atol=1e-6)


def test_torch_export_with_unbounded_dim_needs_no_config_from_batch_3(model, monkeypatch):
    monkeypatch.setattr(auto, "KERNEL_BUDGET_BYTES", 1)  # eager calls would run in chunks of one sample
    program = torch.export.export(model, (torch.randn(3, 3, 12, 12),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    assert_unbounded_batch(program)
    x = torch.randn(1, 3, 12, 12)
    torch.testing.assert_close(program.module()(x), model(x), rtol=1e-5, atol=1e-6)


def assert_unbounded_batch(program: torch.export.ExportedProgram) -> None:
    """The batch symbol keeps its full range and no runtime assertion on a size is in the graph."""
    (batch_range,) = program.range_constraints.values()
    assert batch_range.lower <= 1 and batch_range.upper == int_oo, batch_range
    size_asserts = {torch.ops.aten._assert_scalar.default, torch.ops.aten.sym_constrain_range_for_size.default}
    assert not [n for n in program.graph.nodes if n.target in size_asserts]


@pytest.mark.parametrize(
    "strategy,channels_last",
    [("auto", False), ("grouped", True), ("mixture", True), ("bmm", False), ("fused", True)],
)  # fmt: skip
def test_onnx_export_runs_in_onnxruntime_at_two_batch_sizes(model, strategy, channels_last, tmp_path):
    """With an unbounded batch, whatever strategy the layers are set to: a layer forced to ``grouped`` (or
    ``fused``) exports as ``auto``, the same function with the batch kept symbolic."""
    ort = pytest.importorskip("onnxruntime")
    forced = copy.deepcopy(model)
    for layer in forced.modules():
        if isinstance(layer, CondConv2d):
            layer.strategy = strategy
    path = tmp_path / "model.onnx"
    example = torch.randn(3, 3, 12, 12)
    if channels_last:
        example = example.contiguous(memory_format=torch.channels_last)
    torch.onnx.export(forced, (example,), path, dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch")},))
    runtime = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = runtime.get_inputs()[0].name
    for batch in (1, 5):
        x = torch.randn(batch, 3, 12, 12)
        (out,) = runtime.run(None, {name: x.numpy()})
        torch.testing.assert_close(torch.from_numpy(out), model(x).detach(), rtol=1e-5, atol=1e-5)
