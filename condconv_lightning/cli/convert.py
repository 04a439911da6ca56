"""``condconv-convert``: convert the Conv2d layers of a saved model into CondConv2d, safely, and write it
in the form it is used in next.

    condconv-convert model.pt --layers layer3,layer4 [-o OUT] [--num-experts K] ...
    condconv-convert last.ckpt --arch resnet_tiny --to onnx

The file is read without running its code unless ``--trust-pickle`` says it may
(:mod:`condconv_lightning.loading`), converted in memory with :func:`condconv_lightning.surgery.convert`
(a file that carries a conversion spec, such as a fine-tuning checkpoint, arrives converted and
needs no ``--layers``), checked against the original on a random input
(:mod:`condconv_lightning.loading.check`), and only then written, atomically. ``--to`` picks
what is written: the converted model in the same kind as the input (a full module for a full
module, weights plus the conversion spec for weights:
:func:`condconv_lightning.surgery.save_converted`), the plain model that
:func:`condconv_lightning.surgery.revert` gives back, or a graph for serving with a dynamic
batch (:mod:`condconv_lightning.export`). Every output is read back (loaded, or run in
onnxruntime or ``torch.export.load``) and compared with the model before it takes its name.
Every failure is one line on stderr and exit status 1 (usage errors: 2), with nothing
written; ``CONDCONV_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import logging
import math
import os
import re
import signal
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from rich.console import Console
from rich.markup import escape

from ..condconv2d import CondConv2d
from ..export import SUFFIXES as EXPORT_SUFFIXES
from ..export import TRACE_BATCH, export_model, missing_packages, run_exported, save_exported
from ..functional import is_tuning_enabled
from ..io import (
    SAFETENSORS_SUFFIXES,
    OutputPathError,
    UnsafeFileError,
    Verify,
    WriteError,
    check_writable,
    load_state_dict,
    load_trusted_pickle,
    save_module,
    save_state_dict,
)
from ..loading import LoadedModel, ModelFileError, import_object, load_model, one_line
from ..loading.architectures import BUILTIN_MODELS
from ..loading.check import (
    DEFAULT_TOLERANCE,
    CheckResult,
    compare,
    default_tolerance,
    float32_outputs,
    inferred_input_shapes,
    random_input,
    reference_run,
)
from ..messages import printable
from ..surgery import ConversionReport, SelectorError, convert, load_converted, revert, save_converted
from ..surgery.report import InputSizeError
from ..version import __version__
from .errors import CommandError, UsageError, print_error
from .listing import conv_rows, conv_table, mark_selection
from .options import add_config_arguments, config_from_args

PROG = "condconv-convert"
DEBUG_ENV = "CONDCONV_DEBUG"
OUTPUT_SUFFIXES = {"converted": ".condconv.pt", "plain": ".plain.pt", **EXPORT_SUFFIXES}
"""What ``--to`` writes, each with the suffix of its default output name (MODEL's stem + suffix, beside it)."""
IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")

# The checks, as the output names them, and as a failure states them.
CONVERSION = "converted vs original"
REVERTED = "plain vs CondConv model"
READ_BACK = "written file vs model"
RUNTIMES = {"onnx": "onnxruntime vs model", "torch-export": "torch.export.load vs model"}
FAILURES = {
    CONVERSION: "the converted model's outputs differ from the original's",
    REVERTED: "the plain model's outputs differ from the CondConv model's",
    READ_BACK: "the written file, loaded back, computes outputs that differ from the model's",
    RUNTIMES["onnx"]: "the ONNX file's outputs in onnxruntime differ from the model's",
    RUNTIMES["torch-export"]: "the exported program's outputs differ from the model's",
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the exit status (0 done, 1 error, 2 usage error, 130/143 interrupted/terminated)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_output_name(parser, args)
    out = Console(highlight=False)
    err = Console(stderr=True, highlight=False)
    args.written = None  # the output path once it exists: every later message must say so
    received: list[int] = []  # a signal raised inside torch's file writer reaches us as its RuntimeError

    def stop(signum: int, frame: Any) -> None:
        received.append(signum)
        raise KeyboardInterrupt() if signum == signal.SIGINT else Terminated()

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}  # atomic_write cleans up
    try:
        try:
            return _run(args, out, err)
        except Exception:
            if received:  # the interruption, not what it broke, is what happened
                raise KeyboardInterrupt() if received[0] == signal.SIGINT else Terminated() from None
            raise
    except KeyboardInterrupt:
        return _fail(args, "interrupted" + _nothing_written(args), 130)
    except Terminated:
        return _fail(args, "terminated (SIGTERM)" + _nothing_written(args), 143)
    except UsageError as error:
        parser.print_usage(sys.stderr)
        return _fail(args, str(error), 2)
    except BrokenPipeError:
        os.dup2(
            os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno()
        )  # the interpreter's last flush must not fail again
        return _fail(args, "standard output was closed before the result was printed" + _nothing_written(args))
    except (CommandError, ModelFileError, OutputPathError, SelectorError, UnsafeFileError, WriteError) as error:
        if os.environ.get(DEBUG_ENV) == "1":
            raise
        return _fail(args, str(error), facts=getattr(error, "facts", None))
    except Exception as error:  # a bug or an unforeseen input: still one line unless debugging
        if os.environ.get(DEBUG_ENV) == "1":
            raise
        return _fail(
            args, f"unexpected {one_line(error)}{_nothing_written(args)} (set {DEBUG_ENV}=1 for the traceback)"
        )
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _nothing_written(args: argparse.Namespace) -> str:
    return "" if args.written else "; nothing was written"


class Terminated(BaseException):
    """SIGTERM, raised where the program is so that ``finally`` blocks (temporary files) run."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Convert the Conv2d layers of a saved model into CondConv2d (exact upcycling: "
        "the converted model computes what the original did), check it, and save it: as weights + conversion "
        "spec, as the plain model revert gives back, or as an ONNX or torch.export graph for serving (--to). "
        "A fine-tuning checkpoint arrives converted and needs no --layers.",
        epilog=f"Errors print one line and exit 1 (usage errors: 2); set {DEBUG_ENV}=1 for tracebacks.",
    )
    parser.add_argument(
        "model",
        type=Path,
        metavar="MODEL",
        help="torch.save(model) file, state dict (.pt/.pth/.bin), .safetensors or Lightning .ckpt",
    )
    parser.add_argument(
        "--layers",
        type=_selectors,
        metavar="SELECTORS",
        help="comma-separated selectors of the convs to convert: exact names, prefixes (layer3), "
        "globs or regexes, as condconv_lightning.surgery.convert takes them; not needed for a model that "
        "holds CondConv2d layers (a file that carries a conversion spec, such as a fine-tuning checkpoint)",
    )
    parser.add_argument(
        "--exclude", type=_selectors, metavar="SELECTORS", help="comma-separated selectors to leave alone"
    )
    parser.add_argument(
        "-o",
        "--output",
        type=Path,
        metavar="OUT",
        help="output file (default: MODEL's stem + "
        + ", ".join(f"{suffix} for {to}" for to, suffix in OUTPUT_SUFFIXES.items())
        + ", beside it)",
    )
    parser.add_argument(
        "--to",
        choices=tuple(OUTPUT_SUFFIXES),
        default="converted",
        help="what to write: converted (the default: weights + conversion spec, a full module for a full module), "
        "plain (CondConv2d layers reverted to nn.Conv2d, mixing the experts with their routing on the check's "
        "input), onnx or torch-export (a graph for serving, .onnx or .pt2: any batch, the height and width of "
        "--input-shape)",
    )
    parser.add_argument(
        "--arch",
        type=_architecture,
        metavar="ARCH",
        help=(
            "architecture for a weights file: module.path:ClassOrFactory (a LightningModule class loads a .ckpt "
            f"itself), timm:NAME, torchvision:NAME, or a built-in model ({', '.join(BUILTIN_MODELS)})"
        ),
    )
    parser.add_argument(
        "--arch-kwargs",
        type=_json_object,
        default={},
        metavar="JSON",
        help="keyword arguments for --arch, a JSON object",
    )
    parser.add_argument(
        "--allow-class",
        type=_import_path,
        action="append",
        default=[],
        metavar="MODULE:CLASS",
        help="convert this Conv2d subclass too (its forward must be a plain convolution); repeatable",
    )
    parser.add_argument(
        "--trust-pickle",
        action="store_true",
        help="load a full pickled module; unpickling runs code from the file, so only for files you trust",
    )
    parser.add_argument(
        "--list", action="store_true", help="list every Conv2d (and what --layers selects); convert nothing"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="convert, revert or export and check in memory; write nothing"
    )
    parser.add_argument(
        "--input-shape",
        type=_shape,
        metavar="N,C,H,W",
        help="input of the check (default: 1, the first conv's in_channels, 64, 64; then 224, 224 if that fails)",
    )
    parser.add_argument(
        "--report-size",
        type=_height_width,
        metavar="H,W",
        help="input height and width at which the report counts MACs, e.g. the model's real 224,224 "
        "(default: the check's)",
    )
    parser.add_argument(
        "--no-check", action="store_true", help="skip comparing outputs (original, converted, written file)"
    )
    parser.add_argument(
        "--tolerance",
        type=_positive_float,
        default=None,
        help=f"largest relative output difference the check accepts (default: {DEFAULT_TOLERANCE:g}; for a bf16 "
        "or fp16 model, its dtype's machine epsilon)",
    )
    parser.add_argument("--force", action="store_true", help="replace an existing output file")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__} (torch {torch.__version__})")
    # the seed also draws the check's input, so the command is reproducible by default
    add_config_arguments(parser, defaults={"seed": 0})
    return parser


@dataclass
class Outcome:
    """What a run did, for the tables and ``--json``: a failure shows as much of it as was done."""

    loaded: LoadedModel
    carried: int  # CondConv2d layers the model held when it was read
    parameters: str = ""  # the converted model's parameter count, for people
    report: ConversionReport | None = None  # None without --layers
    checks: list[tuple[str, CheckResult]] = field(default_factory=list)  # (what was compared, result), in order
    output: Path | None = None
    sample: tuple[int, ...] = ()  # an exported graph's input without the batch: the check's (--input-shape)


class CheckFailed(CommandError):
    """A check found outputs that differ by more than the tolerance; nothing was written."""


def _run(args: argparse.Namespace, out: Console, err: Console) -> int:
    started = time.perf_counter()
    try:
        is_tuning_enabled()  # a CONDCONV_TUNE that is no switch stops the command before any work
    except ValueError as error:
        raise CommandError(str(error)) from None
    _check_packages(args)
    if args.layers is not None and not (args.no_check or args.list) and (reason := config_from_args(args).inexactness):
        raise UsageError(
            f"these options do not convert exactly ({reason}), so the check would fail; for an exact random router "
            "use --routing softmax (or normalized_sigmoid) with --perturbation 0, or pass --no-check to convert anyway"
        )
    writes = not (args.list or args.dry_run)
    # A bad output fails before any work; without --layers, whether the command line works depends on the model.
    output = _output_path(args.model, args.output, args.force, args.to) if writes and args.layers else None
    allow_classes = tuple(import_object(target, "--allow-class") for target in args.allow_class)
    with err.status(f"Loading {escape(printable(str(args.model)))} ({_megabytes(args.model)})"):
        loaded = load_model(args.model, arch=args.arch, arch_kwargs=args.arch_kwargs, trust_pickle=args.trust_pickle)
    model = loaded.model
    if args.list:
        return _list(args, loaded, allow_classes, out)
    outcome = Outcome(loaded, carried=sum(isinstance(m, CondConv2d) for m in model.modules()))
    if args.layers is None and not outcome.carried:
        raise UsageError(
            "--layers is required for a model without CondConv2d layers (e.g. --layers layer3,layer4); run with "
            "--list to see the layer names"
        )
    if writes and output is None:
        output = _output_path(args.model, args.output, args.force, args.to)
    if output is not None and loaded.full_module and output.suffix in SAFETENSORS_SUFFIXES:
        raise CommandError(
            f"-o {output}: a full pickled module is written back as one, which safetensors cannot hold; pass a "
            ".pt path, or the model's state dict with --arch to write weights + spec as safetensors"
        )
    try:
        _convert_and_write(args, outcome, output, allow_classes, err)
    except CheckFailed as failure:
        if not args.json:
            _print_result(args, outcome, out)
        failure.facts = _facts(args, outcome)
        raise
    args.written = outcome.output
    _print_result(args, outcome, out, time.perf_counter() - started)
    return 0


def _convert_and_write(
    args: argparse.Namespace, outcome: Outcome, output: Path | None, allow_classes: tuple[type, ...], err: Console
) -> None:
    """Convert (with ``--layers``), check, then make and write what ``--to`` names, each step checked."""
    model = outcome.loaded.model
    check, tolerance = not args.no_check, _tolerance(args, model)
    check_input = reference = None
    if check or args.to != "converted":  # reverting and exporting need an input the model takes
        with err.status("Running the original model" if args.layers is not None else "Running the model"):
            check_input, reference = reference_run(model, _check_shapes(args, model), args.seed)
    if args.layers is not None:
        with err.status("Converting"):
            outcome.report = _convert(model, args, allow_classes, _sample_size(args, model, check_input))
        if check and outcome.report.converted:
            with err.status("Running the converted model"):
                converted = float32_outputs(model, check_input)
            _require(outcome, CONVERSION, compare(reference, converted, check_input.shape, tolerance))
            reference = converted
    outcome.parameters = _millions(model)
    if args.to == "converted":
        # A model converted before needs a spec of all its CondConv2d layers, not only of this run's.
        spec = outcome.report.spec if outcome.report is not None and not outcome.carried else None
        load = None if outcome.loaded.full_module else load_converted
        verify = _read_back(outcome, check_input, reference, tolerance, model, load) if check else None
        if output is not None:
            with err.status(f"Writing {escape(printable(str(output)))}"):
                save_converted(
                    model, output, spec, as_module=outcome.loaded.full_module, overwrite=args.force, verify=verify
                )
    elif args.to == "plain":
        _write_plain(args, outcome, output, check_input, tolerance, err)
    else:
        _write_export(args, outcome, output, check_input, tolerance, err)
    outcome.output = output


def _write_plain(
    args: argparse.Namespace,
    outcome: Outcome,
    output: Path | None,
    mixing_input: torch.Tensor,
    tolerance: float,
    err: Console,
) -> None:
    """Revert to ``nn.Conv2d``, mixing each layer's experts with its mean routing on ``mixing_input``, and check
    the plain model on another input: it computes what the CondConv model did only where the routing is the same
    for every input (as right after an exact conversion), which a plain conv with one kernel cannot follow."""
    model = outcome.loaded.model
    other = random_input(mixing_input.shape, args.seed + 1)
    condconv = float32_outputs(model, other) if not args.no_check else None
    with err.status("Reverting"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plain = revert(model, mixing_input)
    for warning in caught:  # a layer the input never reached: it uses the plain expert mean
        err.print(f"[yellow]note[/] {escape(printable(str(warning.message)))}")
    if args.no_check:
        verify = None
    else:
        outputs = float32_outputs(plain, other)
        _require(outcome, REVERTED, compare(condconv, outputs, other.shape, tolerance))
        full = outcome.loaded.full_module
        verify = _read_back(outcome, other, outputs, tolerance, plain, None if full else _load_plain)
    if output is not None:
        with err.status(f"Writing {escape(printable(str(output)))}"):
            if outcome.loaded.full_module:
                save_module(plain, output, overwrite=args.force, verify=verify)
            else:
                save_state_dict(plain.state_dict(), output, overwrite=args.force, verify=verify)


def _load_plain(path: Path, model: nn.Module) -> nn.Module:
    """``model`` with the plain weights at ``path``, loaded strictly."""
    model.load_state_dict(load_state_dict(path), strict=True)
    return model


def _write_export(
    args: argparse.Namespace,
    outcome: Outcome,
    output: Path | None,
    check_input: torch.Tensor,
    tolerance: float,
    err: Console,
) -> None:
    """Export with a dynamic batch, and run the written file at two batch sizes, neither the traced one."""
    model = outcome.loaded.model
    sample = outcome.sample = tuple(check_input.shape[1:])
    dtype = next((t.dtype for t in model.parameters() if t.is_floating_point()), torch.float32)
    example = random_input((TRACE_BATCH, *sample), args.seed).to(dtype)
    with err.status("Exporting"), _quietly():
        try:
            graph = export_model(model, example, args.to)
        except Exception as error:  # an operation the exporter does not support, a forward it cannot trace
            raise CommandError(
                f"--to {args.to}: the model does not export with a dynamic batch ({one_line(error)}); nothing was "
                "written"
            ) from None
    if output is None:
        return

    def verify(path: Path) -> None:
        for batch in (1, max(check_input.shape[0], TRACE_BATCH + 1)):
            x = random_input((batch, *sample), args.seed).to(dtype)
            with _quietly():
                ran = run_exported(path, args.to, x)
            _require(outcome, RUNTIMES[args.to], compare(float32_outputs(model, x), ran, x.shape, tolerance))

    with err.status(f"Writing {escape(printable(str(output)))}"):
        save_exported(graph, output, overwrite=args.force, verify=None if args.no_check else verify)


@contextlib.contextmanager
def _quietly() -> Iterator[None]:
    """Nothing from torch while it exports or loads a graph: no warnings, log lines or printed graphs (notes on its
    own internals, nothing a user can act on, and text that would break ``--json``); a failure is one line."""
    loggers = [
        logging.getLogger(name) for name in list(logging.Logger.manager.loggerDict) if name.split(".")[0] == "torch"
    ]
    levels = [(logger, logger.level) for logger in loggers]
    with (
        warnings.catch_warnings(),
        contextlib.redirect_stdout(io.StringIO()),
        contextlib.redirect_stderr(io.StringIO()),
    ):
        warnings.simplefilter("ignore")
        for logger in loggers:
            logger.setLevel(logging.CRITICAL)
        try:
            yield
        finally:
            for logger, level in levels:
                logger.setLevel(level)


def _read_back(
    outcome: Outcome,
    x: torch.Tensor,
    expected: list[torch.Tensor],
    tolerance: float,
    model: nn.Module,
    load: Callable[[Path, nn.Module], nn.Module] | None,
) -> Verify:
    """A ``verify`` for the writers: the written file, loaded into a copy of ``model`` with ``load(path, copy)``
    (None: a full module, unpickled; this process wrote it), must compute ``expected`` on ``x``."""

    def verify(path: Path) -> None:
        loaded = load_trusted_pickle(path) if load is None else load(path, copy.deepcopy(model))
        _require(outcome, READ_BACK, compare(expected, float32_outputs(loaded, x), x.shape, tolerance))

    return verify


def _require(outcome: Outcome, what: str, check: CheckResult) -> None:
    """Record the check; a failed one stops the run before anything is written."""
    outcome.checks.append((what, check))
    if check.passed:
        return
    hint = ""
    if what == REVERTED:  # what revert can promise: the original conv back where the routing is constant
        hint = (
            ": the routing depends on the input and a plain conv has one kernel (revert mixed the experts with "
            "their routing on the check's input)"
        )
        if math.isfinite(check.max_rel_diff):
            enough = 10 ** math.ceil(math.log10(check.max_rel_diff))
            hint += f"; pass --tolerance {enough:g} to accept the approximation"
    raise CheckFailed(
        f"check failed: {FAILURES[what]} by {check.max_rel_diff:.3g} (relative) > tolerance {check.tolerance:g}"
        f"{hint}; nothing was written"
    )


def _tolerance(args: argparse.Namespace, model: nn.Module) -> float:
    return default_tolerance(model) if args.tolerance is None else args.tolerance


def _check_packages(args: argparse.Namespace) -> None:
    """An export format's packages, before any work: to export, and unless the check is off, to run the file."""
    if args.to not in EXPORT_SUFFIXES or args.list:
        return
    missing = missing_packages(args.to, run=not (args.no_check or args.dry_run))
    if missing:
        raise CommandError(
            f"--to {args.to} needs packages that are not installed here ({', '.join(missing)}): pip install "
            f"{' '.join(missing)}, or condconv-lightning[onnx]"
        )


def _check_output_name(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """A graph's file is named by its format's suffix, and only a graph's file is: a usage error otherwise."""
    if args.output is None:
        return
    suffix = args.output.suffix
    wanted = EXPORT_SUFFIXES.get(args.to)
    if wanted is not None and suffix != wanted:
        parser.error(f"-o {args.output}: --to {args.to} writes a {wanted} file; name the output *{wanted}")
    writer = next((to for to, known in EXPORT_SUFFIXES.items() if known == suffix), None)
    if writer is not None and writer != args.to:
        parser.error(f"-o {args.output}: {suffix} names the files of --to {writer}; pass --to {writer}, or another -o")


def _convert(
    model: nn.Module, args: argparse.Namespace, allow_classes: tuple[type, ...], sample_size: tuple[int, ...] | None
) -> ConversionReport:
    """Convert in place; an empty result is an error that says why each match was left alone."""
    with warnings.catch_warnings():  # skipped layers are reported from report.skipped, one line each
        warnings.simplefilter("ignore")
        try:
            report = convert(
                model,
                args.layers,
                config_from_args(args),
                exclude=args.exclude,
                allow_classes=allow_classes,
                input_size=sample_size,
            )
        except InputSizeError as error:
            size, reason = "x".join(map(str, error.input_size)), " ".join(error.reason.split())
            raise CommandError(
                f"the model does not run at input {size} for the report's MAC counts ({reason}); "
                "pass --report-size H,W (or --input-shape) with a size the model takes"
            ) from None
    if not report.converted and not report.already_converted:  # already CondConv2d: there is the model to write
        reasons = "; ".join(f"{s.name}: {s.reason}" for s in report.skipped[:3])
        details = reasons or "no Conv2d matched"
        hint = (
            " (command line: --allow-class MODULE:CLASS)" if any("subclass" in s.reason for s in report.skipped) else ""
        )
        raise CommandError(f"nothing to convert for --layers {','.join(args.layers)}: {details}{hint}")
    return report


def _check_shapes(args: argparse.Namespace, model: nn.Module) -> list[tuple[int, ...]]:
    return [args.input_shape] if args.input_shape else inferred_input_shapes(model)


def _sample_size(
    args: argparse.Namespace, model: nn.Module, check_input: torch.Tensor | None = None
) -> tuple[int, ...] | None:
    """(C, H, W) of one sample for the report's MAC counts: the check's input (or, when no check ran,
    the first shape it would try), with ``--report-size``'s height and width when given."""
    if check_input is not None:
        size = tuple(check_input.shape[1:])
    else:
        shapes = _check_shapes(args, model)
        size = tuple(shapes[0][1:]) if shapes else None
    if size is not None and args.report_size is not None:
        size = size[:-2] + args.report_size
    return size


def _list(args: argparse.Namespace, loaded: LoadedModel, allow_classes: tuple[type, ...], out: Console) -> int:
    rows = conv_rows(loaded.model)
    if args.layers is not None:  # resolve the selection the one way conversion resolves it: by converting
        report = _convert(loaded.model, args, allow_classes, _sample_size(args, loaded.model))
        mark_selection(
            rows,
            {record.name for record in report.converted},
            {record.name: record.reason for record in report.skipped},
            set(report.already_converted),
        )
    if args.json:
        print(json.dumps({"input": _input_facts(args.model, loaded), "convs": rows}, indent=2))
    else:
        out.print(conv_table(rows, title=f"{args.model}: {loaded.holds}, {len(rows)} convolutions"))
    return 0


def _output_path(model: Path, output: Path | None, force: bool, to: str) -> Path:
    """Resolve the output path and fail before any work if it cannot be written."""
    target = output if output is not None else model.with_name(model.stem + OUTPUT_SUFFIXES[to])
    if os.path.exists(target) and model.exists() and target.resolve() == model.resolve():  # False for a bad name
        raise CommandError(f"the output {target} is the input; the input is never modified, so choose another -o")
    try:
        return check_writable(target, overwrite=force)
    except IsADirectoryError:
        raise CommandError(f"the output {target} is a directory; pass a file path with -o") from None
    except OutputPathError as error:  # a device, FIFO or socket; a name too long
        raise CommandError(f"-o: {error}") from None
    except FileExistsError:  # a symlink, dangling or not, is never followed or replaced
        raise CommandError(f"{target} already exists; pass --force to replace it, or choose another -o") from None
    except FileNotFoundError:
        raise CommandError(
            f"the output folder {target.parent} does not exist; create it or choose another -o"
        ) from None
    except PermissionError as error:
        raise CommandError(
            f"cannot write to the output folder {target.parent} ({os.strerror(error.errno)}); choose another -o"
        ) from None


def _print_result(args: argparse.Namespace, outcome: Outcome, out: Console, seconds: float | None = None) -> None:
    if args.json:
        print(json.dumps({**_facts(args, outcome), "seconds": seconds}, indent=2))
        return
    loaded, report, output = outcome.loaded, outcome.report, outcome.output
    after = " after conversion" if report is not None and report.converted else ""
    out.print(printable(f"{args.model}: {loaded.holds}, {outcome.parameters} parameters{after}"), markup=False)
    if report is None:
        out.print(f"no --layers: the model's {outcome.carried} CondConv2d layers are kept as they are")
    elif report.converted:
        out.print(report)
    else:
        out.print(f"nothing to convert: the {len(report.already_converted)} layers --layers selects are CondConv2d")
    for record in report.skipped if report is not None else []:
        out.print(f"[yellow]skipped[/] {escape(printable(record.name))}: {escape(printable(record.reason))}")
    for what, check in outcome.checks:  # two short lines each: 80 columns never break a number or a clause
        verdict, relation = ("[green]passed[/]", "<=") if check.passed else ("[red]FAILED[/]", ">")
        out.print(f"check {what}, input {'x'.join(map(str, check.input_shape))}: {verdict}")
        out.print(
            f"  max abs diff {check.max_abs_diff:.3g}, max rel diff {check.max_rel_diff:.3g} {relation} "
            f"tolerance {check.tolerance:g}"
        )
    if output is not None and output.exists():
        written = f"wrote {output} ({_kind(args, outcome)}, {_megabytes(output)})"
        out.print(printable(f"{written} in {seconds:.1f} s" if seconds is not None else written), markup=False)
    elif args.dry_run:
        out.print("dry run: nothing written")


def _facts(args: argparse.Namespace, outcome: Outcome) -> dict[str, Any]:
    """What ``--json`` prints: the same facts as the tables."""
    output = outcome.output
    written = output is not None and output.exists()
    conversion = next((check for what, check in outcome.checks if what == CONVERSION), None)
    return {
        "condconv_lightning": __version__,
        "input": _input_facts(args.model, outcome.loaded),
        "conversion": outcome.report.to_dict() if outcome.report is not None else None,
        "check": conversion.to_dict() if conversion is not None else None,
        "checks": [{"what": what, **check.to_dict()} for what, check in outcome.checks if what != CONVERSION],
        "output": {
            "path": str(output) if output is not None else None,
            "written": written,
            "kind": _kind(args, outcome),
            "bytes": output.stat().st_size if written else None,
        },
    }


def _kind(args: argparse.Namespace, outcome: Outcome) -> str:
    """What the output holds, for people."""
    if args.to in EXPORT_SUFFIXES:
        graph = "ONNX graph" if args.to == "onnx" else "torch.export program"
        return f"{graph}, input {'x'.join(map(str, ('N', *outcome.sample)))}"  # N: any batch
    plain = "plain " if args.to == "plain" else ""
    if outcome.loaded.full_module:
        return f"{plain}full module"
    return "plain weights" if plain else "weights + conversion spec"


def _input_facts(path: Path, loaded: LoadedModel) -> dict[str, Any]:
    return {"path": str(path), "format": loaded.file_format.value, "holds": loaded.holds}


def _fail(args: argparse.Namespace, message: str, status: int = 1, facts: dict[str, Any] | None = None) -> int:
    """Report a failure in one line that says truthfully whether the output was written."""
    if args.written:
        message += f"; {args.written} was written before that"
    if args.json:
        with contextlib.suppress(OSError):
            print(json.dumps({"error": message, "exit_status": status, **(facts or {})}, indent=2))
    print_error(PROG, message)
    return status


def _millions(model: nn.Module) -> str:
    return f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M"


def _megabytes(path: Path) -> str:
    return f"{path.stat().st_size / 1e6:.1f} MB" if path.is_file() else "?"


# argparse types: a bad value is a usage error (exit status 2) with argparse's own message.


def _selectors(value: str) -> list[str]:
    selectors = [part.strip() for part in value.split(",") if part.strip()]
    if not selectors:
        raise argparse.ArgumentTypeError("expected comma-separated layer selectors, e.g. layer3,layer4")
    return selectors


def _positive_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if not number > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value!r}")
    return number


def _shape(value: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in value.split(","))
    except ValueError:
        shape = ()
    if len(shape) < 2 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive sizes like 1,3,224,224, got {value!r}")
    return shape


def _height_width(value: str) -> tuple[int, int]:
    try:
        size = tuple(int(part) for part in value.split(","))
    except ValueError:
        size = ()
    if len(size) != 2 or min(size) < 1:
        raise argparse.ArgumentTypeError(f"expected a height and width like 224,224, got {value!r}")
    return size  # type: ignore[return-value]


def _import_path(value: str) -> str:
    if not IMPORT_PATH.match(value):
        raise argparse.ArgumentTypeError(f"expected an import path like mypackage.models:ResNet, got {value!r}")
    return value


def _architecture(value: str) -> str:
    if not (IMPORT_PATH.match(value) or value in BUILTIN_MODELS):
        raise argparse.ArgumentTypeError(
            f"expected an import path like mypackage.models:ResNet, timm:NAME, torchvision:NAME "
            f"or a built-in model ({', '.join(BUILTIN_MODELS)}), got {value!r}"
        )
    return value


def _json_object(value: str) -> dict[str, Any]:
    try:
        parsed = json.loads(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON ({error}): {value!r}") from None
    if not isinstance(parsed, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object like '{{\"num_classes\": 10}}', got {value!r}")
    return parsed


if __name__ == "__main__":
    sys.exit(main())
