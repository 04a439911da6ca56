"""``condconv-convert``: convert the Conv2d layers of a saved model into CondConv2d, safely.

    condconv-convert model.pt --layers layer3,layer4 [-o OUT] [--num-experts K] ...

The file is read without running its code unless ``--trust-pickle`` says it may
(:mod:`condconv_lightning.loading`), converted in memory with :func:`condconv_lightning.surgery.convert`,
checked against the original on a random input (:mod:`condconv_lightning.loading.check`), and only then written,
atomically, with the same kind as the input: a full module for a full module, weights
plus the conversion spec for weights (:func:`condconv_lightning.surgery.save_converted`).
Every failure is one line on stderr and exit status 1 (usage errors: 2), with nothing
written; ``CONDCONV_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from rich.console import Console
from rich.markup import escape

from ..condconv2d import CondConv2d
from ..functional import is_tuning_enabled
from ..io import SAFETENSORS_SUFFIXES, OutputPathError, UnsafeFileError, WriteError, check_writable
from ..loading import LoadedModel, ModelFileError, import_object, load_model, one_line
from ..loading.architectures import BUILTIN_MODELS
from ..loading.check import (
    DEFAULT_TOLERANCE,
    CheckResult,
    compare,
    default_tolerance,
    float32_outputs,
    inferred_input_shapes,
    reference_run,
)
from ..messages import printable
from ..surgery import ConversionReport, SelectorError, convert, save_converted
from ..surgery.report import InputSizeError
from ..version import __version__
from .errors import CommandError, print_error
from .listing import conv_rows, conv_table, mark_selection
from .options import add_config_arguments, config_from_args

PROG = "condconv-convert"
DEBUG_ENV = "CONDCONV_DEBUG"
OUTPUT_SUFFIX = ".condconv.pt"
IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the exit status (0 done, 1 error, 2 usage error, 130/143 interrupted/terminated)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.layers is None and not args.list:
        parser.error("--layers is required (e.g. --layers layer3,layer4); run with --list to see the layer names")
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
        "the converted model computes what the original did), check it, and save it.",
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
        "globs or regexes, as condconv_lightning.surgery.convert takes them",
    )
    parser.add_argument(
        "--exclude", type=_selectors, metavar="SELECTORS", help="comma-separated selectors to leave alone"
    )
    parser.add_argument(
        "-o",
        "--output",
        type=Path,
        metavar="OUT",
        help=f"output file (default: MODEL's stem + {OUTPUT_SUFFIX}, beside it)",
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
    parser.add_argument("--dry-run", action="store_true", help="convert and check in memory, write nothing")
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
    parser.add_argument("--no-check", action="store_true", help="skip comparing original and converted outputs")
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


def _run(args: argparse.Namespace, out: Console, err: Console) -> int:
    started = time.perf_counter()
    try:
        is_tuning_enabled()  # a CONDCONV_TUNE that is no switch stops the command before any work
    except ValueError as error:
        raise CommandError(str(error)) from None
    output = None if args.list or args.dry_run else _output_path(args.model, args.output, args.force)
    allow_classes = tuple(import_object(target, "--allow-class") for target in args.allow_class)
    with err.status(f"Loading {escape(printable(str(args.model)))} ({_megabytes(args.model)})"):
        loaded = load_model(args.model, arch=args.arch, arch_kwargs=args.arch_kwargs, trust_pickle=args.trust_pickle)
    model = loaded.model
    if args.list:
        return _list(args, loaded, allow_classes, out)
    if output is not None and loaded.full_module and output.suffix in SAFETENSORS_SUFFIXES:
        raise CommandError(
            f"-o {output}: a full pickled module is written back as one, which safetensors cannot hold; pass a .pt "
            "path, or the model's state dict with --arch to write weights + spec as safetensors"
        )

    check_input = None
    if not args.no_check:
        with err.status("Running the original model"):
            check_input, reference = reference_run(model, _check_shapes(args, model), args.seed)
        tolerance = default_tolerance(model) if args.tolerance is None else args.tolerance
    # A model converted before needs a spec of all its CondConv2d layers, not only of this run's.
    spec_of_model = any(isinstance(m, CondConv2d) for m in model.modules())
    with err.status("Converting"):
        report = _convert(model, args, allow_classes, _sample_size(args, model, check_input))
    check = None
    if check_input is not None:
        with err.status("Running the converted model"):
            check = compare(reference, float32_outputs(model, check_input), check_input.shape, tolerance)
    if check is not None and not check.passed:
        if not args.json:
            _print_result(args, loaded, report, check, None, out)
        raise CommandError(
            f"check failed: the converted model's outputs differ from the original's by {check.max_rel_diff:.3g} "
            f"(relative) > tolerance {check.tolerance:g}; nothing was written",
            facts=_facts(args, loaded, report, check, None),
        )
    if output is not None:
        with err.status(f"Writing {escape(printable(str(output)))}"):
            save_converted(
                model,
                output,
                None if spec_of_model else report.spec,
                as_module=loaded.full_module,
                overwrite=args.force,
            )
        args.written = output
    _print_result(args, loaded, report, check, output, out, time.perf_counter() - started)
    return 0


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
    if not report.converted:
        reasons = "; ".join(f"{s.name}: {s.reason}" for s in report.skipped[:3])
        already = f"{len(report.already_converted)} already CondConv2d" if report.already_converted else ""
        details = "; ".join(part for part in (reasons, already) if part) or "no Conv2d matched"
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


def _output_path(model: Path, output: Path | None, force: bool) -> Path:
    """Resolve the output path and fail before any work if it cannot be written."""
    target = output if output is not None else model.with_name(model.stem + OUTPUT_SUFFIX)
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


def _print_result(
    args: argparse.Namespace,
    loaded: LoadedModel,
    report: ConversionReport,
    check: CheckResult | None,
    output: Path | None,
    out: Console,
    seconds: float | None = None,
) -> None:
    if args.json:
        print(json.dumps({**_facts(args, loaded, report, check, output), "seconds": seconds}, indent=2))
        return
    written = output is not None and output.exists()
    out.print(
        printable(f"{args.model}: {loaded.holds}, {_millions(loaded.model)} parameters after conversion"), markup=False
    )
    out.print(report)
    for record in report.skipped:
        out.print(f"[yellow]skipped[/] {escape(printable(record.name))}: {escape(printable(record.reason))}")
    if check is not None:
        verdict = "[green]passed[/]" if check.passed else "[red]FAILED[/]"
        out.print(
            f"check: input {'x'.join(map(str, check.input_shape))}, max abs diff {check.max_abs_diff:.3g}, "
            f"max rel diff {check.max_rel_diff:.3g} (tolerance {check.tolerance:g}): {verdict}"
        )
    if written:
        kind = "full module" if loaded.full_module else "weights + conversion spec"
        out.print(printable(f"wrote {output} ({kind}, {_megabytes(output)}) in {seconds:.1f} s"), markup=False)
    elif args.dry_run:
        out.print("dry run: nothing written")


def _facts(
    args: argparse.Namespace,
    loaded: LoadedModel,
    report: ConversionReport,
    check: CheckResult | None,
    output: Path | None,
) -> dict[str, Any]:
    """What ``--json`` prints: the same facts as the tables."""
    written = output is not None and output.exists()
    return {
        "condconv_lightning": __version__,
        "input": _input_facts(args.model, loaded),
        "conversion": report.to_dict(),
        "check": check.to_dict() if check is not None else None,
        "output": {
            "path": str(output) if output is not None else None,
            "written": written,
            "kind": "full module" if loaded.full_module else "weights + conversion spec",
            "bytes": output.stat().st_size if written else None,
        },
    }


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
