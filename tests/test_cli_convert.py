"""condconv-convert, run as users run it: the installed console script in a subprocess.

References are independent of the command: the original model's outputs computed
here, layer names read from ``named_modules``, file bytes hashed before and after.
Each python start imports torch (~1.5 s), so cases that share a setup share a run.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from console_scripts import run_script
from rich.console import Console
from zoo import SqueezeExcite

from condconv_lightning import CondConv2d, ConversionConfig, __version__
from condconv_lightning.cli.listing import conv_rows, conv_table, mark_selection
from condconv_lightning.demos import mobilenet_tiny, resnet50_like, resnet_tiny

SMALL_INPUT = "2,3,32,32"
TOLERANCE = 1e-5

# A user's own model code, importable from the folder the command runs in.
USER_ARCHS = '''
import torch
import torch.nn as nn
import torch.nn.functional as F

from condconv_lightning.demos import resnet_tiny


def tiny(num_classes: int = 10) -> nn.Module:
    return resnet_tiny(num_classes)


class WSConv2d(nn.Conv2d):
    """Weight standardization (Qiao et al. 2019): a Conv2d subclass whose forward is not a plain conv."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class WSNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = WSConv2d(8, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.head(torch.relu(self.body(torch.relu(self.stem(x)))))
        return self.fc(x.mean(dim=(2, 3)))
'''

USER_LIGHTNING = """
import lightning.pytorch as pl

from condconv_lightning.demos import resnet_tiny


class TinyClassifier(pl.LightningModule):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = resnet_tiny(num_classes)

    def forward(self, x):
        return self.model(x)
"""


def seeded(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BatchNorm statistics too, so eval-mode outputs depend on every buffer."""
    torch.manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("cli")
    (folder / "user_archs.py").write_text(USER_ARCHS)
    (folder / "user_lightning.py").write_text(USER_LIGHTNING)
    sys.path.insert(0, str(folder))
    try:
        import user_archs
    finally:
        sys.path.remove(str(folder))
    torch.save(seeded(resnet_tiny()), folder / "full.pt")
    weights = seeded(resnet_tiny(7), seed=1).state_dict()
    torch.save(weights, folder / "weights.pt")
    from safetensors.torch import save_file

    save_file(weights, str(folder / "weights.safetensors"))
    torch.save(seeded(mobilenet_tiny()), folder / "mobile.pt")
    torch.save(user_archs.WSNet().eval(), folder / "wsnet.pt")
    fixed_head = nn.Sequential(
        nn.Conv2d(3, 2, 3, stride=4, padding=1), nn.MaxPool2d(8), nn.Flatten(), nn.Linear(2 * 7 * 7, 3)
    )
    torch.save(fixed_head.eval(), folder / "fixed_head.pt")
    return folder


def run_cli(*args: object, cwd: Path, debug: bool = False) -> subprocess.CompletedProcess:
    return run_script("condconv-convert", *args, cwd=cwd, debug=debug)


def succeeded(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stderr
    return result


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def conv_names(model: nn.Module, *prefixes: str) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and n.startswith(prefixes)]


@torch.no_grad()
def assert_same_function(original: nn.Module, converted: nn.Module, shape: tuple[int, ...] = (3, 3, 32, 32)) -> None:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(123))
    expected, actual = original.eval()(x), converted.eval()(x)
    assert (actual - expected).abs().max() <= TOLERANCE * expected.abs().max()


def test_full_module_is_converted_checked_and_written_beside_the_input(work: Path) -> None:
    before = sha256(work / "full.pt")
    result = succeeded(
        run_cli(
            "full.pt", "--trust-pickle", "--layers", "layer3,layer4", "--input-shape", SMALL_INPUT, "--json", cwd=work
        )
    )
    facts = json.loads(result.stdout)
    out = work / "full.condconv.pt"
    original = torch.load(work / "full.pt", weights_only=False)
    assert facts["output"] == {
        "path": "full.condconv.pt",
        "written": True,
        "kind": "full module",
        "bytes": out.stat().st_size,
    }
    assert facts["check"]["passed"] and facts["check"]["input_shape"] == [2, 3, 32, 32]
    assert facts["check"]["max_rel_diff"] <= TOLERANCE
    assert [r["name"] for r in facts["conversion"]["converted"]] == conv_names(original, "layer3", "layer4")
    assert sha256(work / "full.pt") == before  # the input is never modified

    converted = torch.load(out, weights_only=False)
    kinds = {name: type(m) for name, m in converted.named_modules()}
    assert all(kinds[name] is CondConv2d for name in conv_names(original, "layer3", "layer4"))
    assert all(kinds[name] is nn.Conv2d for name in conv_names(original, "conv1", "layer1", "layer2"))
    assert_same_function(original, converted)


@pytest.mark.parametrize("weights", ["weights.pt", "weights.safetensors"])
def test_weights_with_arch_give_weights_plus_spec(work: Path, weights: str) -> None:
    from condconv_lightning.surgery import load_converted

    out = work / "out" / f"{weights}.condconv.pt"
    out.parent.mkdir(exist_ok=True)
    result = succeeded(
        run_cli(
            weights,
            "--arch",
            "user_archs:tiny",
            "--arch-kwargs",
            '{"num_classes": 7}',
            "--layers",
            "layer4",
            "--num-experts",
            "3",
            "--routing",
            "softmax",
            "--input-shape",
            SMALL_INPUT,
            "-o",
            out,
            cwd=work,
        )
    )
    for name in conv_names(resnet_tiny(), "layer4"):  # people get a table of the converted layers
        assert name in result.stdout
    assert "passed" in result.stdout and f"wrote {out}" in result.stdout

    original = resnet_tiny(7)
    original.load_state_dict(torch.load(work / "weights.pt", weights_only=True))
    converted = load_converted(out, resnet_tiny(7))
    layer = converted.get_submodule("layer4.0.conv1")
    assert isinstance(layer, CondConv2d) and layer.num_experts == 3 and layer.routing == "softmax"
    assert_same_function(original, converted)


def test_converted_weights_convert_further_and_keep_their_experts(work: Path) -> None:
    from condconv_lightning.surgery import load_converted

    arch = ("--arch", "user_archs:tiny", "--arch-kwargs", '{"num_classes": 7}', "--input-shape", SMALL_INPUT)
    succeeded(run_cli("weights.pt", *arch, "--layers", "layer3", "-o", "step1.pt", cwd=work))
    result = succeeded(run_cli("step1.pt", *arch, "--layers", "layer4", "-o", "step2.pt", "--json", cwd=work))
    assert json.loads(result.stdout)["input"]["holds"].startswith("converted weights + spec")

    original = resnet_tiny(7)
    original.load_state_dict(torch.load(work / "weights.pt", weights_only=True))
    step1, step2 = load_converted(work / "step1.pt", resnet_tiny(7)), load_converted(work / "step2.pt", resnet_tiny(7))
    assert all(isinstance(step2.get_submodule(n), CondConv2d) for n in conv_names(original, "layer3", "layer4"))
    assert torch.equal(step1.layer3[0].conv1.weight, step2.layer3[0].conv1.weight)
    assert_same_function(original, step2)


def test_lightning_checkpoint_loads_through_the_lightning_module(work: Path) -> None:
    import lightning.pytorch as pl

    sys.path.insert(0, str(work))
    try:
        from user_lightning import TinyClassifier
    finally:
        sys.path.remove(str(work))
    from condconv_lightning.surgery import load_converted

    module = TinyClassifier(num_classes=5)
    seeded(module.model, seed=2)
    trainer = pl.Trainer(
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.strategy.connect(module)
    trainer.save_checkpoint(work / "run.ckpt")

    result = succeeded(
        run_cli(
            "run.ckpt",
            "--arch",
            "user_lightning:TinyClassifier",
            "--layers",
            "model.layer3",
            "--input-shape",
            SMALL_INPUT,
            "--json",
            cwd=work,
        )
    )
    facts = json.loads(result.stdout)
    assert facts["input"]["holds"].startswith("Lightning checkpoint")
    assert facts["output"]["kind"] == "weights + conversion spec"
    # num_classes=5 came from the checkpoint's hyperparameters, not from --arch-kwargs
    converted = load_converted(work / "run.condconv.pt", TinyClassifier(num_classes=5))
    assert isinstance(converted.model.layer3[0].conv1, CondConv2d)
    assert_same_function(module, converted)


def test_list_marks_what_layers_selects_and_writes_nothing(work: Path) -> None:
    original = torch.load(work / "full.pt", weights_only=False)
    before = sorted(os.listdir(work))
    listed = json.loads(succeeded(run_cli("full.pt", "--trust-pickle", "--list", "--json", cwd=work)).stdout)["convs"]
    expected = [
        (n, m.in_channels, m.out_channels, m.weight.numel())
        for n, m in original.named_modules()
        if isinstance(m, nn.Conv2d)
    ]
    assert [(r["name"], r["in_channels"], r["out_channels"], r["parameters"]) for r in listed] == expected

    table = succeeded(
        run_cli(
            "full.pt", "--trust-pickle", "--list", "--layers", "layer4", "--exclude", "layer4.0.downsample", cwd=work
        )
    ).stdout
    names = {name for name, *_ in expected}
    rows = {cells[0]: line for line in table.splitlines() if (cells := line.split()) and cells[0] in names}
    assert set(rows) == names  # every conv is listed
    assert sorted(name for name, line in rows.items() if "selected" in line) == ["layer4.0.conv1", "layer4.0.conv2"]
    assert sorted(os.listdir(work)) == before


def test_dry_run_converts_and_checks_in_memory_only(work: Path) -> None:
    before = sorted(os.listdir(work))
    result = succeeded(run_cli("full.pt", "--trust-pickle", "--layers", "layer2", "--dry-run", cwd=work))
    assert "layer2.0.conv1" in result.stdout and "passed" in result.stdout and "nothing written" in result.stdout
    assert sorted(os.listdir(work)) == before


def test_check_input_shape_is_inferred_from_the_first_conv(work: Path) -> None:
    result = succeeded(
        run_cli("mobile.pt", "--trust-pickle", "--layers", "features.2", "--dry-run", "--json", cwd=work)
    )
    check = json.loads(result.stdout)["check"]
    assert check["input_shape"] == [1, 3, 64, 64] and check["passed"]
    # A head that needs 7x7 features (VGG-style flatten + Linear) fails at 64x64 and is checked at 224x224.
    result = succeeded(run_cli("fixed_head.pt", "--trust-pickle", "--layers", "0", "--dry-run", "--json", cwd=work))
    assert json.loads(result.stdout)["check"]["input_shape"] == [1, 3, 224, 224]


def test_seed_sets_the_expert_perturbations(work: Path) -> None:
    from condconv_lightning.surgery import convert

    succeeded(
        run_cli(
            "full.pt", "--trust-pickle", "--layers", "layer1", "--no-check", "--seed", "5", "-o", "seeded.pt", cwd=work
        )
    )
    written = torch.load(work / "seeded.pt", weights_only=False).layer1[0].conv1.weight
    experts = {}
    for seed in (5, 6):
        model = torch.load(work / "full.pt", weights_only=False)
        convert(model, ["layer1"], seed=seed)
        experts[seed] = model.layer1[0].conv1.weight
    assert torch.equal(written, experts[5]) and not torch.equal(written, experts[6])


def test_an_exact_random_router_passes_the_check_and_is_stored_in_the_spec(work: Path) -> None:
    options = ["--router-init", "random", "--router-scale", "3", "--routing", "softmax", "--perturbation", "0"]
    result = run_cli("full.pt", "--trust-pickle", "--layers", "layer4", *options, "-o", "routed.pt", "--json", cwd=work)
    facts = json.loads(succeeded(result).stdout)
    assert facts["check"]["passed"] and facts["check"]["max_rel_diff"] <= 1e-5
    routers = [
        m.router.weight for m in torch.load(work / "routed.pt", weights_only=False).modules() if hasattr(m, "router")
    ]
    assert routers and all(router.abs().sum() > 0 for router in routers)


def test_version(work: Path) -> None:
    assert succeeded(run_cli("--version", cwd=work)).stdout.split()[:2] == ["condconv-convert", __version__]


# ---- errors: one line on stderr, exit 1 (usage errors 2), no traceback, nothing written


class FileCreator:
    """Unpickling this object calls ``open(path, 'w')``: it creates a file (a stand-in for any payload)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def unwritable_folder(folder: Path) -> Path:
    """A folder this process cannot create files in: chmod 555, or sysfs for root (which ignores modes)."""
    if os.geteuid() == 0:
        return Path("/sys")
    locked = folder / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    return locked


def make_bad_inputs(work: Path, folder: Path) -> None:
    """Files for the error cases; the archives come from the real torch writers."""
    for name in ("full.pt", "weights.pt", "wsnet.pt", "user_archs.py"):
        shutil.copy(work / name, folder / name)
    (folder / "a_folder").mkdir()
    (folder / "empty.pt").write_bytes(b"")
    whole = (folder / "full.pt").read_bytes()
    (folder / "truncated.pt").write_bytes(whole[: len(whole) // 2])
    (folder / "notes.txt").write_text("not a model\n")
    torch.jit.save(torch.jit.script(nn.Sequential(nn.Conv2d(3, 4, 3))), str(folder / "scripted.pt"))
    exported = torch.export.export(nn.Sequential(nn.Conv2d(3, 4, 3)), (torch.randn(1, 3, 8, 8),))
    torch.export.save(exported, str(folder / "exported.pt2"))
    (folder / "taken.pt").write_bytes(b"already here")
    torch.save({"weights": FileCreator(str(folder / "payload-ran"))}, folder / "payload.pt")


ERROR_CASES = [
    # (id, arguments, exit status, phrases the message must contain)
    ("missing file", ["nope.pt", "--layers", "layer3"], 1, ["nope.pt", "no such file"]),
    ("a directory", ["a_folder", "--layers", "layer3"], 1, ["is a directory"]),
    ("empty file", ["empty.pt", "--layers", "layer3"], 1, ["empty"]),
    ("truncated file", ["truncated.pt", "--trust-pickle", "--layers", "layer3"], 1, ["truncated"]),
    ("not a PyTorch file", ["notes.txt", "--layers", "layer3"], 1, ["not a PyTorch file"]),
    (
        "full module without --trust-pickle",
        ["full.pt", "--layers", "layer3"],
        1,
        ["--trust-pickle", "condconv_lightning.demos.models.ResNet"],
    ),
    (
        "pickle payload without --trust-pickle",
        ["payload.pt", "--layers", "layer3"],
        1,
        ["--trust-pickle", "io.open", "nothing was loaded"],
    ),
    ("TorchScript", ["scripted.pt", "--layers", "0"], 1, ["TorchScript", "state_dict", "--arch"]),
    ("torch.export", ["exported.pt2", "--layers", "0"], 1, ["torch.export", "--arch"]),
    ("state dict without --arch", ["weights.pt", "--layers", "layer3"], 1, ["state dict", "--arch"]),
    (
        "--arch does not import",
        ["weights.pt", "--arch", "no_such_package.models:Net", "--layers", "layer3"],
        1,
        ["cannot import", "no_such_package"],
    ),
    (
        "--arch does not match",
        ["weights.pt", "--arch", "user_archs:tiny", "--layers", "layer3"],
        1,
        ["do not match", "fc.weight", "--arch-kwargs"],
    ),
    ("selector matches nothing", ["full.pt", "--trust-pickle", "--layers", "layer3,layer9"], 1, ["layer9"]),
    (
        "--num-experts 0",
        ["full.pt", "--layers", "layer3", "--num-experts", "0"],
        2,
        ["--num-experts", "positive integer"],
    ),
    (
        "--num-experts not an integer",
        ["full.pt", "--layers", "layer3", "--num-experts", "2.5"],
        2,
        ["--num-experts", "positive integer"],
    ),
    (
        "existing output",
        ["full.pt", "--trust-pickle", "--layers", "layer3", "-o", "taken.pt"],
        1,
        ["taken.pt", "--force"],
    ),
    (
        "output folder not writable",
        ["full.pt", "--trust-pickle", "--layers", "layer3", "-o", "{unwritable}/out.pt"],
        1,
        ["cannot write to the output folder"],
    ),
    (
        "Conv2d subclass only",
        ["wsnet.pt", "--trust-pickle", "--layers", "body"],
        1,
        ["body", "WSConv2d", "--allow-class"],
    ),
    (
        "Conv2d subclass forced",
        [
            "wsnet.pt",
            "--trust-pickle",
            "--layers",
            "body",
            "--allow-class",
            "user_archs:WSConv2d",
            "--input-shape",
            "2,3,16,16",
        ],
        1,
        ["check failed", "nothing was written"],
    ),
]


@pytest.fixture(scope="module")
def error_runs(work: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict, dict, Path]:
    """Run every error case at once (each run mostly waits on importing torch), in a folder of their own."""
    folder = tmp_path_factory.mktemp("cli-errors")
    make_bad_inputs(work, folder)
    unwritable = unwritable_folder(folder)
    snapshot = lambda: {p: sha256(p) for p in folder.rglob("*") if p.is_file()}
    before = snapshot()
    cases = {case[0]: [str(a).replace("{unwritable}", str(unwritable)) for a in case[1]] for case in ERROR_CASES}
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        futures = {name: pool.submit(run_cli, *arguments, cwd=folder) for name, arguments in cases.items()}
        results = {name: future.result() for name, future in futures.items()}
    return results, before, snapshot(), unwritable


@pytest.mark.parametrize(
    ("name", "status", "phrases"), [(c[0], c[2], c[3]) for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES]
)
def test_bad_input_gets_one_line_and_writes_nothing(error_runs: tuple, name: str, status: int, phrases: list) -> None:
    results, before, after, unwritable = error_runs
    result = results[name]
    message = result.stderr.strip()
    assert result.returncode == status, message
    assert "Traceback" not in result.stderr
    if status == 1:
        assert len(message.splitlines()) == 1 and message.startswith("condconv-convert: error: "), message
    for phrase in phrases:
        assert phrase in message, message
    if "check failed" not in message:  # a failed check still shows people what it compared
        assert result.stdout == ""
    assert after == before  # no run wrote, renamed or modified anything
    assert not (unwritable / "out.pt").exists()


IN_PROCESS_CASES = [
    # Argument checks that fail before any file is read: main() in this process (no torch start-up per case).
    (
        "--arch is not module:callable",
        ["weights.pt", "--arch", "user_archs.tiny", "--layers", "layer3"],
        2,
        ["--arch", "import path"],
    ),
    (
        "--arch-kwargs not JSON",
        ["weights.pt", "--arch", "user_archs:tiny", "--arch-kwargs", "{num_classes: 7}", "--layers", "layer3"],
        2,
        ["JSON"],
    ),
    ("--layers missing", ["full.pt", "--trust-pickle"], 2, ["--layers", "--list"]),
    (
        "output is the input",
        ["full.pt", "--trust-pickle", "--layers", "layer3", "-o", "full.pt", "--force"],
        1,
        ["is the input"],
    ),
    (
        "random router under sigmoid, checked",
        ["full.pt", "--trust-pickle", "--layers", "layer4", "--router-init", "random"],
        2,
        ["do not convert exactly (a random router under sigmoid routing", "--no-check"],
    ),
    (
        "random router with perturbed experts, checked",
        ["full.pt", "--trust-pickle", "--layers", "layer4", "--router-init", "random", "--routing", "softmax"],
        2,
        ["(a random router mixes the perturbed experts unevenly (perturbation 0.05))", "--perturbation 0"],
    ),
    (
        "full module to safetensors",
        ["full.pt", "--trust-pickle", "--layers", "layer4", "-o", "out.safetensors"],
        1,
        ["-o out.safetensors: a full pickled module", "pass a .pt path"],
    ),
]


@pytest.mark.parametrize(
    ("arguments", "status", "phrases"), [c[1:] for c in IN_PROCESS_CASES], ids=[c[0] for c in IN_PROCESS_CASES]
)
def test_bad_arguments_in_process(
    work: Path, monkeypatch: pytest.MonkeyPatch, capsys, arguments: list, status: int, phrases: list
) -> None:
    from condconv_lightning.cli.convert import main

    monkeypatch.chdir(work)
    before = {p: sha256(p) for p in work.iterdir() if p.is_file()}
    try:
        returned = main(arguments)
    except SystemExit as usage_error:  # argparse exits 2 after printing usage and the message
        returned = usage_error.code
    message = capsys.readouterr().err
    assert returned == status and "Traceback" not in message
    for phrase in phrases:
        assert phrase in message, message
    assert {p: sha256(p) for p in work.iterdir() if p.is_file()} == before


def run_in_process(arguments: list[str], capsys) -> tuple[int, dict]:
    from condconv_lightning.cli.convert import main

    status = main(arguments)
    return status, json.loads(capsys.readouterr().out)


def test_filter_flags_generated_from_the_config_leave_layers_out(
    work: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    torch.save(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), SqueezeExcite(8, 2)).eval(), tmp_path / "se.pt")
    monkeypatch.chdir(tmp_path)
    status, facts = run_in_process(
        ["se.pt", "--trust-pickle", "--layers", "*", "--no-include-squeeze-excitation", "--dry-run", "--json"], capsys
    )
    conversion = facts["conversion"]
    assert status == 0 and facts["check"]["passed"] and [r["name"] for r in conversion["converted"]] == ["0"]
    assert {r["name"]: r["reason"] for r in conversion["skipped"]} == {
        name: "squeeze-and-excitation conv (1x1 input) and include_squeeze_excitation=False"
        for name in ("1.reduce", "1.expand")
    }
    assert conversion["spec"]["options"]["include_squeeze_excitation"] is False
    monkeypatch.chdir(work)
    status, facts = run_in_process(
        ["mobile.pt", "--trust-pickle", "--layers", "features.2", "--no-include-depthwise", "--dry-run", "--json"],
        capsys,
    )
    assert status == 0 and facts["conversion"]["skipped"] == [
        {"name": "features.2.conv.3", "reason": "depthwise (groups == in_channels) and include_depthwise=False"}
    ]


def test_report_size_counts_macs_at_the_real_resolution_while_the_check_stays_small(
    work: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from condconv_lightning.surgery import convert

    monkeypatch.chdir(work)
    arguments = ["full.pt", "--trust-pickle", "--layers", "layer4", "--dry-run", "--json"]
    status, facts = run_in_process([*arguments, "--report-size", "128,96"], capsys)
    assert status == 0 and facts["check"]["input_shape"] == [1, 3, 64, 64]
    assert facts["conversion"]["input_size"] == [3, 128, 96]
    expected = convert(torch.load("full.pt", weights_only=False), "layer4", input_size=(3, 128, 96)).totals
    assert facts["conversion"]["totals"] == expected
    # the table says which size its MACs were counted at
    from condconv_lightning.cli.convert import main

    assert main([*arguments[:-1], "--report-size", "128,96"]) == 0
    assert "extra MACs per sample at input 3x128x96" in " ".join(capsys.readouterr().out.split())
    # a size the model cannot take is one line that names the option
    assert main(["fixed_head.pt", "--trust-pickle", "--layers", "0", "--dry-run", "--report-size", "100,100"]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "does not run at input 3x100x100" in error and "--report-size H,W" in error


def test_list_table_keeps_resnet50_names_and_columns_whole_in_80_columns() -> None:
    model = resnet50_like()
    rows = conv_rows(model)
    names = [row["name"] for row in rows]
    selected = {name for name in names if name.startswith("layer4")} - {"layer4.0.downsample.0"}
    mark_selection(rows, selected, {"layer4.0.downsample.0": "excluded by exclude"}, set())
    console = Console(record=True, width=80)
    console.print(conv_table(rows, title="resnet50_like.pt: full module, 53 convolutions"))
    text = console.export_text()
    lines = text.splitlines()
    assert max(map(len, lines)) <= 80 and "…" not in text
    listed = [line.split()[0] for line in lines if line.split() and line.split()[0] in set(names)]
    assert listed == names  # every name whole, on its own row
    assert {"name", "type", "in->out", "kernel", "stride", "groups", "params", "--layers"} <= set(text.split())
    assert sum(line.split()[-1] == "selected" for line in lines) == 9
    assert "excluded" in text.split()  # a note wraps; it is never cut short


def test_pickle_payload_does_not_run_without_trust(tmp_path: Path) -> None:
    marker = tmp_path / "payload-ran"
    torch.save({"weights": FileCreator(str(marker))}, tmp_path / "payload.pt")
    result = run_cli("payload.pt", "--layers", "layer3", "--json", cwd=tmp_path)
    error = json.loads(result.stdout)  # programs get one JSON document for errors too
    assert result.returncode == 1 and error["exit_status"] == 1 and "--trust-pickle" in error["error"]
    assert not marker.exists()
    # The payload is real: trusting the file runs it (and the command then refuses the non-model content).
    trusted = run_cli("payload.pt", "--layers", "layer3", "--trust-pickle", cwd=tmp_path)
    assert trusted.returncode == 1 and "not a model" in trusted.stderr and marker.exists()


def test_debug_environment_shows_the_traceback(tmp_path: Path) -> None:
    (tmp_path / "empty.pt").write_bytes(b"")
    result = run_cli("empty.pt", "--layers", "layer3", cwd=tmp_path, debug=True)
    assert result.returncode == 1 and "Traceback" in result.stderr and "ModelFileError" in result.stderr


def test_interrupted_write_leaves_no_file(work: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """An interrupt while the output is being written (simulated in-process: signals cannot be timed reliably)."""
    from condconv_lightning.cli.convert import main

    real_save = torch.save

    def save_then_interrupt(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)  # the bytes are on disk, under a temporary name
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", save_then_interrupt)
    monkeypatch.chdir(work)
    status = main(["full.pt", "--trust-pickle", "--layers", "layer3", "--no-check", "-o", str(tmp_path / "out.pt")])
    assert status == 130 and "interrupted; nothing was written" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_built_in_architecture_is_named_by_its_bare_name(work: Path) -> None:
    from condconv_lightning.surgery import load_converted

    out = work / "builtin.condconv.pt"
    arch = ("--arch", "resnet_tiny", "--arch-kwargs", '{"num_classes": 7}')
    succeeded(run_cli("weights.pt", *arch, "--layers", "layer4", "-o", out, cwd=work))
    original = resnet_tiny(7)
    original.load_state_dict(torch.load(work / "weights.pt", weights_only=True))
    converted = load_converted(out, resnet_tiny(7))
    assert isinstance(converted.get_submodule("layer4.0.conv1"), CondConv2d)
    assert_same_function(original, converted)
    result = run_cli("weights.pt", "--arch", "resnet", "--layers", "layer4", cwd=work)
    assert result.returncode == 2 and "a built-in model (mobilenet_tiny, resnet50_like, resnet_tiny)" in result.stderr


@pytest.mark.parametrize(
    ("dtype", "tolerance"), [(torch.bfloat16, 2**-7), (torch.float16, 2**-10), (torch.float64, 1e-5)]
)
def test_the_check_holds_a_bf16_or_fp16_model_to_its_own_precision(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, dtype: torch.dtype, tolerance: float
) -> None:
    """Each upcycled expert is rounded to the model's dtype on its own, so their mix is the kernel to within that
    rounding; the default tolerance would refuse every bf16 model."""
    torch.manual_seed(0)
    torch.save(resnet_tiny().to(dtype), tmp_path / "model.pt")
    monkeypatch.chdir(tmp_path)
    status, facts = run_in_process(["model.pt", "--trust-pickle", "--layers", "layer4", "--dry-run", "--json"], capsys)
    assert status == 0 and facts["check"]["passed"] and facts["check"]["tolerance"] == tolerance
    status, facts = run_in_process(
        ["model.pt", "--trust-pickle", "--layers", "layer4", "--dry-run", "--json", "--tolerance", "1e-9"], capsys
    )
    assert facts["check"]["tolerance"] == 1e-9  # an explicit --tolerance is taken as given


def test_every_conversion_option_says_its_default_in_words() -> None:
    """Options generated from ConversionConfig: a None default reads as what it means, never as 'None'."""
    from condconv_lightning.cli.convert import build_parser

    parser = build_parser()
    helps = {action.dest: action.help for action in parser._actions if action.help}
    for field in dataclasses.fields(ConversionConfig):
        assert "(default: " in helps[field.name] and "None" not in helps[field.name], helps[field.name]
    assert helps["kernel_sizes"].endswith("(default: all)") and helps["seed"].endswith("(default: 0)")
