"""Graphs for serving: a ``torch.export`` program (``.pt2``) or an ONNX file, with a dynamic batch.

A served model takes whatever batch arrives, so the batch is a symbolic dimension,
``torch.export.Dim("batch")``, unbounded. CondConv layers export as they are: under
export ``auto`` runs ``bmm`` or ``mixture``, which keep the batch symbolic, where
``grouped`` would store the traced batch in the conv's ``groups``
(docs/performance.md). The model is traced in eval mode on an example of
:data:`TRACE_BATCH` samples, since ``torch.export`` turns a dimension of size 1 into the
constant 1.

Files are written through :func:`~condconv_lightning.io.atomic_write`, so a caller can
run what was written (:func:`run_exported`) before it takes its name. ONNX needs
``onnxscript`` to export and ``onnxruntime`` to run (``pip install
condconv-lightning[onnx]``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn
from torch import Tensor

from .io import PathLike, Verify, atomic_write
from .loading.check import output_tensors
from .modes import evaluating

__all__ = [
    "SUFFIXES",
    "TRACE_BATCH",
    "ExportFormat",
    "export_model",
    "missing_packages",
    "run_exported",
    "save_exported",
]

ExportFormat = Literal["onnx", "torch-export"]
SUFFIXES: dict[str, str] = {"onnx": ".onnx", "torch-export": ".pt2"}
"""The file name suffix of each format, as its tools expect it."""
TRACE_BATCH = 2
"""Samples in the example the model is traced on: any size but 1 keeps the batch symbolic."""
EXPORTERS: dict[str, tuple[str, ...]] = {"onnx": ("onnx", "onnxscript"), "torch-export": ()}
RUNTIMES: dict[str, tuple[str, ...]] = {"onnx": ("onnxruntime",), "torch-export": ()}


def missing_packages(format: ExportFormat, *, run: bool) -> list[str]:
    """The packages ``format`` needs that are not installed: to export, and with ``run`` to run the file."""
    needed = EXPORTERS[format] + (RUNTIMES[format] if run else ())
    return [name for name in needed if importlib.util.find_spec(name) is None]


def export_model(model: nn.Module, example: Tensor, format: ExportFormat) -> object:
    """``model`` traced on ``example`` (``[B, ...]``, B not 1) in eval mode, its batch dimension dynamic:
    a ``torch.export.ExportedProgram`` or a ``torch.onnx.ONNXProgram``. ``model``'s modes are restored."""
    dynamic = ({0: torch.export.Dim("batch")},)
    with evaluating(model):
        if format == "torch-export":
            return torch.export.export(model, (example,), dynamic_shapes=dynamic)
        return torch.onnx.export(model, (example,), dynamo=True, dynamic_shapes=dynamic, verbose=False)


def save_exported(graph: object, path: PathLike, *, overwrite: bool = False, verify: Verify | None = None) -> Path:
    """Write what :func:`export_model` returned to ``path`` atomically, as one file; ``verify`` checks it first."""
    target = Path(path)
    with atomic_write(target, overwrite=overwrite, verify=verify) as tmp:
        if isinstance(graph, torch.export.ExportedProgram):
            with open(tmp, "wb") as file:  # a file object: torch.export names a path by its suffix
                torch.export.save(graph, file)
        else:
            graph.save(tmp, external_data=False)  # type: ignore[attr-defined]  # the weights inside, one file
    return target


def run_exported(path: PathLike, format: ExportFormat, x: Tensor) -> list[Tensor]:
    """The outputs of the exported file at ``path`` on ``x``, in float32 on the CPU, flattened in order.

    ``torch.export.load`` unpickles parts of the archive: run only files you wrote or trust.
    """
    if format == "torch-export":
        with open(path, "rb") as file:
            program = torch.export.load(file)
        with torch.no_grad():
            output = program.module()(x)
        return [t.detach().float().cpu() for t in output_tensors(output)]
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (name,) = [node.name for node in session.get_inputs()]
    return [torch.from_numpy(array).float() for array in session.run(None, {name: x.cpu().numpy()})]
