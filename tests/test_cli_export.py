"""From a fine-tuned checkpoint to a deployable file with ``condconv-convert``.

The checkpoint comes from a real ``condconv-finetune fit`` run (a few steps on the synthetic
data, routers with a learning rate of their own, so that the routing depends on the input).
Each output is loaded back the way its users load it (``load_converted``, a plain model's
strict ``load_state_dict``, onnxruntime, ``torch.export.load``) and compared with the
fine-tuned model as Lightning reloads it, here, independently of the command.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from console_scripts import UNTUNED, run_script, script_environment
from test_real_models import registry

from condconv_lightning import CondConv2d
from condconv_lightning.demos import resnet_tiny
from condconv_lightning.finetune import ImageClassifier
from condconv_lightning.surgery import load_converted, revert

NUM_CLASSES = 4
ARCH = ("--arch", "resnet_tiny", "--arch-kwargs", json.dumps({"num_classes": NUM_CLASSES}))
TOLERANCE = 2**7 * torch.finfo(torch.float32).eps
"""Float32 rounding of the same network computed in another order (another process, kernel or runtime), relative
to the largest output: a few ulps per layer over a dozen layers, with room; a wrong weight differs by far more."""
MIXING_INPUT = (1, 3, 64, 64)
"""The check's input (the first shape it tries on a 3-channel model), seeded by --seed 0: revert mixes with it."""


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_cli(*args: object, cwd: Path, columns: int = 120) -> subprocess.CompletedProcess:
    return run_script("condconv-convert", *args, cwd=cwd, columns=columns, extra_env=UNTUNED)


def succeeded(result: subprocess.CompletedProcess) -> dict:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout) if result.stdout.startswith("{") else {}


def relative_difference(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


def sample(batch: int, seed: int = 7) -> torch.Tensor:
    return torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding ``last.ckpt``, from ``condconv-finetune fit``: layer3 and layer4 converted, then trained."""
    folder = tmp_path_factory.mktemp("finetuned")
    done = subprocess.run(
        [
            sys.executable, "-m", "condconv_lightning.cli.finetune", "fit",
            "--trainer.max_steps", "4", "--trainer.default_root_dir", str(folder), "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--data.init_args.train_size", "32", "--data.init_args.val_size", "8",
            "--data.init_args.batch_size", "8", "--data.init_args.image_size", "32",
            "--model.num_classes", str(NUM_CLASSES), "--model.router_lr", "0.5",
        ],
        cwd=folder, env=script_environment(extra=UNTUNED), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    (checkpoint,) = folder.glob("**/*.ckpt")
    shutil.copy(checkpoint, folder / "last.ckpt")
    return folder


@pytest.fixture(scope="module")
def finetuned(run: Path) -> nn.Module:
    """The fine-tuned network as Lightning reloads it (the checkpoint's spec converts a fresh one)."""
    return ImageClassifier.load_from_checkpoint(run / "last.ckpt").model.eval()


def outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def test_the_finetuned_routing_depends_on_the_input(finetuned: nn.Module) -> None:
    """What makes the plain model an approximation below: one kernel per layer cannot follow the routing."""
    routings = []
    layer = finetuned.layer4[0].conv1
    handle = layer.register_routing_hook(lambda _, routing: routings.append(routing))
    outputs(finetuned, sample(2))
    handle.remove()
    (routing,) = routings
    assert (routing[0] - routing[1]).abs().max() > 1e-3


def test_a_finetuned_checkpoint_needs_no_layers_and_loads_into_the_plain_architecture(
    run: Path, finetuned: nn.Module
) -> None:
    before = sha256(run / "last.ckpt")
    facts = succeeded(run_cli("last.ckpt", *ARCH, "-o", "weights.safetensors", "--json", cwd=run))
    assert facts["input"]["holds"].startswith("Lightning checkpoint") and "conversion spec" in facts["input"]["holds"]
    assert facts["conversion"] is None and facts["check"] is None  # nothing converted: the file carried it
    assert [(c["what"], c["passed"]) for c in facts["checks"]] == [("written file vs model", True)]
    assert facts["output"] == {
        "path": "weights.safetensors",
        "written": True,
        "kind": "weights + conversion spec",
        "bytes": (run / "weights.safetensors").stat().st_size,
    }
    assert sha256(run / "last.ckpt") == before  # the input is never modified

    loaded = load_converted(run / "weights.safetensors", resnet_tiny(NUM_CLASSES))
    assert {n for n, m in loaded.named_modules() if isinstance(m, CondConv2d)} == {
        n for n, m in finetuned.named_modules() if isinstance(m, CondConv2d)
    }
    x = sample(3)
    assert relative_difference(outputs(loaded, x), outputs(finetuned, x)) <= TOLERANCE


@pytest.mark.parametrize(
    ("arch", "layers"),
    [(ARCH, "layer3,layer4"), (("--arch", "condconv_lightning.finetune:ImageClassifier"), "model.layer3,model.layer4")],
    ids=["network", "LightningModule"],
)
def test_layers_already_converted_are_no_error_the_model_is_written(
    run: Path, finetuned: nn.Module, tmp_path: Path, arch: tuple[str, ...], layers: str
) -> None:
    output = tmp_path / "resaved.pt"
    facts = succeeded(run_cli("last.ckpt", *arch, "--layers", layers, "-o", output, "--json", cwd=run))
    conversion = facts["conversion"]
    assert conversion["converted"] == [] and len(conversion["already_converted"]) == 6
    assert facts["output"]["written"] and facts["output"]["kind"] == "weights + conversion spec"
    if arch == ARCH:
        loaded = load_converted(output, resnet_tiny(NUM_CLASSES))
    else:
        loaded = load_converted(output, ImageClassifier(num_classes=NUM_CLASSES)).model
    x = sample(2)
    assert relative_difference(outputs(loaded, x), outputs(finetuned, x)) <= TOLERANCE


def test_onnx_with_a_dynamic_batch_runs_in_onnxruntime_as_the_finetuned_model(run: Path, finetuned: nn.Module) -> None:
    ort = pytest.importorskip("onnxruntime")
    facts = succeeded(run_cli("last.ckpt", *ARCH, "--to", "onnx", "--json", cwd=run))
    assert facts["output"]["path"] == "last.onnx" and facts["output"]["kind"] == "ONNX graph, input Nx3x64x64"
    assert [(c["what"], c["input_shape"][0], c["passed"]) for c in facts["checks"]] == [
        ("onnxruntime vs model", 1, True),
        ("onnxruntime vs model", 3, True),
    ]
    session = ort.InferenceSession(str(run / "last.onnx"), providers=["CPUExecutionProvider"])
    (name,) = [i.name for i in session.get_inputs()]
    for batch in (1, 5):  # neither is the traced batch
        x = sample(batch)
        (logits,) = session.run(None, {name: x.numpy()})
        assert logits.shape == (batch, NUM_CLASSES)
        assert relative_difference(torch.from_numpy(logits), outputs(finetuned, x)) <= TOLERANCE


def test_torch_export_program_with_a_dynamic_batch_computes_the_finetuned_model(
    run: Path, finetuned: nn.Module, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from condconv_lightning.cli.convert import main

    monkeypatch.chdir(run)
    assert main(["last.ckpt", *ARCH, "--to", "torch-export", "-o", "served.pt2", "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["output"]["kind"] == "torch.export program, input Nx3x64x64"
    assert facts["output"]["written"]
    program = torch.export.load(run / "served.pt2")
    (batch_range,) = program.range_constraints.values()
    assert batch_range.lower <= 1 and batch_range.upper > 2**20  # unbounded: whatever batch a server gets
    for batch in (1, 5):
        x = sample(batch)
        with torch.no_grad():
            served = program.module()(x)
        assert relative_difference(served, outputs(finetuned, x)) <= TOLERANCE


def test_plain_model_of_a_finetuned_run_is_refused_until_its_difference_is_accepted(
    run: Path, finetuned: nn.Module
) -> None:
    """After fine-tuning the routing depends on the input, so no plain model computes what the CondConv model
    does: the command says by how much it differs, writes nothing, and writes it once the user accepts that."""
    refused = run_cli("last.ckpt", *ARCH, "--to", "plain", cwd=run)
    message = refused.stderr.strip()
    assert refused.returncode == 1 and len(message.splitlines()) == 1, message
    assert "plain model's outputs differ from the CondConv model's" in message
    assert "routing depends on the input" in message and "nothing was written" in message
    assert not (run / "last.plain.pt").exists()
    tolerance = re.search(r"pass --tolerance (\S+)", message).group(1)

    facts = succeeded(run_cli("last.ckpt", *ARCH, "--to", "plain", "--tolerance", tolerance, "--json", cwd=run))
    assert facts["output"]["kind"] == "plain weights"
    assert [c["what"] for c in facts["checks"]] == ["plain vs CondConv model", "written file vs model"]
    plain = resnet_tiny(NUM_CLASSES)
    plain.load_state_dict(torch.load(run / "last.plain.pt", weights_only=True), strict=True)  # plain keys, strictly

    # What revert promises: each kernel is its experts mixed with the routing of the input it was given.
    mixing_input = torch.randn(MIXING_INPUT, generator=torch.Generator().manual_seed(0))
    expected = revert(ImageClassifier.load_from_checkpoint(run / "last.ckpt").model, mixing_input)
    x = sample(3)
    assert relative_difference(outputs(plain, x), outputs(expected, x)) <= TOLERANCE
    assert relative_difference(outputs(plain, mixing_input), outputs(finetuned, mixing_input)) <= TOLERANCE
    assert relative_difference(outputs(plain, x), outputs(finetuned, x)) > 1e-5  # the difference it reported


def test_plain_model_right_after_conversion_computes_the_original(tmp_path: Path, monkeypatch, capsys) -> None:
    """Freshly upcycled routing is the same for every input, so revert gives back the original convs."""
    from condconv_lightning.cli.convert import main

    torch.manual_seed(0)
    original = resnet_tiny(NUM_CLASSES).eval()
    torch.save(original.state_dict(), tmp_path / "weights.pt")
    monkeypatch.chdir(tmp_path)
    assert main(["weights.pt", *ARCH, "--layers", "layer3,layer4", "--to", "plain", "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert [(c["what"], c["passed"]) for c in facts["checks"]] == [
        ("plain vs CondConv model", True),
        ("written file vs model", True),
    ]
    plain = resnet_tiny(NUM_CLASSES)
    plain.load_state_dict(torch.load(tmp_path / "weights.plain.pt", weights_only=True), strict=True)
    x = sample(2)
    assert relative_difference(outputs(plain, x), outputs(original, x)) <= TOLERANCE


def corrupt_load(*args, **kwargs):
    """load_converted, then one weight changed: a file that does not hold what was meant to be written."""
    model = load_converted(*args, **kwargs)
    with torch.no_grad():
        model.get_submodule("fc").bias.add_(1.0)
    return model


def corrupt_run(path, format, x):
    from condconv_lightning.export import run_exported

    return [t + 1.0 for t in run_exported(path, format, x)]


@pytest.mark.parametrize(
    ("to", "replaced", "replacement", "failure"),
    [
        ("converted", "load_converted", corrupt_load, "the written file, loaded back, computes outputs that differ"),
        ("torch-export", "run_exported", corrupt_run, "the exported program's outputs differ from the model's"),
    ],
    ids=["converted", "torch-export"],
)
def test_an_output_that_fails_its_check_is_never_written_nor_replaces_one(
    run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, to: str, replaced, replacement, failure
) -> None:
    import condconv_lightning.cli.convert as cli

    monkeypatch.setattr(cli, replaced, replacement)
    monkeypatch.chdir(run)
    output = tmp_path / ("out.pt2" if to == "torch-export" else "out.safetensors")
    output.write_bytes(b"an earlier output")
    status = cli.main(["last.ckpt", *ARCH, "--to", to, "-o", str(output), "--force"])
    error = capsys.readouterr().err
    assert status == 1 and error.count("\n") == 1, error
    assert f"check failed: {failure}" in error and "nothing was written" in error
    assert output.read_bytes() == b"an earlier output" and sorted(p.name for p in tmp_path.iterdir()) == [output.name]


class DataDependent(nn.Module):
    """A forward that branches on its values: no graph with a symbolic batch can hold it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y if y.sum() > 0 else -y


def test_a_model_that_does_not_export_is_one_line_and_a_dry_run_exports_in_memory(
    run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from condconv_lightning.cli.convert import main

    torch.save(DataDependent(), tmp_path / "branchy.pt")
    monkeypatch.chdir(tmp_path)
    assert main(["branchy.pt", "--trust-pickle", "--layers", "conv", "--to", "torch-export"]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "--to torch-export: the model does not export with a dynamic batch (" in error
    assert error.rstrip().endswith("nothing was written") and sorted(os.listdir(tmp_path)) == ["branchy.pt"]

    monkeypatch.chdir(run)
    before = sorted(os.listdir(run))
    assert main(["last.ckpt", *ARCH, "--to", "torch-export", "--dry-run"]) == 0
    assert capsys.readouterr().out.rstrip().endswith("dry run: nothing written") and sorted(os.listdir(run)) == before


USAGE_CASES = [
    # (id, arguments after the checkpoint's, exit status, phrases of the one-line error)
    ("an ONNX file named otherwise", ["--to", "onnx", "-o", "model.pt"], 2, ["--to onnx writes a .onnx file"]),
    ("a .pt2 name for weights", ["-o", "model.pt2"], 2, [".pt2 names the files of --to torch-export"]),
    ("a plain model needs --layers", [], 2, ["--layers is required for a model without CondConv2d"]),
    (
        "no exporter installed",
        ["--to", "onnx"],
        1,
        ["--to onnx needs packages that are not installed here (onnxscript): pip install onnxscript"],
    ),
]


@pytest.mark.parametrize(
    ("arguments", "status", "phrases"), [c[1:] for c in USAGE_CASES], ids=[c[0] for c in USAGE_CASES]
)
def test_command_lines_that_cannot_work_get_one_line_and_write_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, arguments: list, status: int, phrases: list
) -> None:
    import condconv_lightning.cli.convert as cli

    torch.save(resnet_tiny(NUM_CLASSES).state_dict(), tmp_path / "weights.pt")
    monkeypatch.setattr(cli, "missing_packages", lambda format, run: ["onnxscript"] if format == "onnx" else [])
    monkeypatch.chdir(tmp_path)
    try:
        returned = cli.main(["weights.pt", *ARCH, *arguments])
    except SystemExit as usage_error:  # argparse's own usage errors
        returned = usage_error.code
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert returned == status and message.startswith("condconv-convert: error: "), message
    for phrase in phrases:
        assert phrase in message, message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights.pt"]


def test_check_lines_read_whole_in_80_columns(tmp_path: Path) -> None:
    """Each check is two lines that fit: no number or clause is cut across lines."""
    torch.manual_seed(0)
    torch.save(resnet_tiny().state_dict(), tmp_path / "weights.pt")
    result = run_cli("weights.pt", "--arch", "resnet_tiny", "--layers", "layer4", cwd=tmp_path, columns=80)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert max(map(len, lines)) <= 80
    checks = [i for i, line in enumerate(lines) if line.startswith("check ")]
    assert [lines[i] for i in checks] == [
        "check converted vs original, input 1x3x64x64: passed",
        "check written file vs model, input 1x3x64x64: passed",
    ]
    number = r"(\d[\d.e+-]*|nan|inf)"
    for i in checks:
        assert re.fullmatch(rf"  max abs diff {number}, max rel diff {number} <= tolerance 1e-05", lines[i + 1]), lines[
            i + 1
        ]


@pytest.mark.slow
def test_a_torchvision_resnet18_checkpoint_converts_as_the_report_ran_it(tmp_path: Path) -> None:
    """The command of the report: a checkpoint of ImageClassifier(arch="torchvision:resnet18"), --arch naming the
    network; with --layers (now already converted) and without."""
    torchvision = registry("torchvision")
    from lightning.pytorch import Trainer

    from condconv_lightning.callbacks import CondConvConversion
    from condconv_lightning.demos import SyntheticImageDataModule

    torch.manual_seed(0)
    module = ImageClassifier(arch="torchvision:resnet18", num_classes=3, router_lr=0.5)
    trainer = Trainer(
        accelerator="cpu", max_steps=2, default_root_dir=tmp_path, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
        callbacks=[CondConvConversion(["layer3", "layer4"], submodule="model", verbose=False)],
    )  # fmt: skip
    trainer.fit(module, SyntheticImageDataModule(num_classes=3, train_size=16, val_size=8, batch_size=8))
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    arch = ("--arch", "torchvision:resnet18", "--arch-kwargs", '{"num_classes": 3}', "--input-shape", "2,3,32,32")
    for layers in (("--layers", "layer3,layer4"), ()):
        facts = succeeded(run_cli("last.ckpt", *arch, *layers, "--force", "--json", cwd=tmp_path))
        assert facts["output"]["path"] == "last.condconv.pt" and facts["output"]["written"]
        loaded = load_converted(tmp_path / "last.condconv.pt", torchvision.models.resnet18(num_classes=3))
        x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        assert relative_difference(outputs(loaded, x), outputs(module.model, x)) <= TOLERANCE
