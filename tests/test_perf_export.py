"""Export of CondConv models keeps the batch dimension dynamic (issue 6).

``grouped`` folds the batch into ``groups``, which ONNX stores as a constant; under
export ``auto`` therefore picks ``bmm``/``mixture``. Checked with ``torch.export`` at a
batch size other than the traced one, and with onnxruntime at two batch sizes,
against the eager model.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from condconv_lightning import CondConv2d

BATCH = torch.export.Dim("batch", min=1, max=1024)


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


def test_torch_export_keeps_batch_dynamic(model):
    program = torch.export.export(model, (torch.randn(3, 3, 12, 12),), dynamic_shapes=({0: BATCH},))
    for batch in (1, 5):
        x = torch.randn(batch, 3, 12, 12)
        torch.testing.assert_close(program.module()(x), model(x), rtol=1e-5, atol=1e-6)


def test_onnx_export_runs_in_onnxruntime_at_two_batch_sizes(model, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    path = tmp_path / "model.onnx"
    torch.onnx.export(model, (torch.randn(3, 3, 12, 12),), path, dynamo=True, dynamic_shapes=({0: BATCH},))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for batch in (1, 5):
        x = torch.randn(batch, 3, 12, 12)
        (out,) = session.run(None, {name: x.numpy()})
        torch.testing.assert_close(torch.from_numpy(out), model(x).detach(), rtol=1e-5, atol=1e-5)
