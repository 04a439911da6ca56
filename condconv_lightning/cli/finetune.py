"""``condconv-finetune``: LightningCLI for fine-tuning CondConv image classifiers.

Defaults run out of the box on CPU: the model is :class:`ImageClassifier` around
``resnet_tiny``, the data :class:`SyntheticImageDataModule`, and the Trainer's
callbacks convert ``layer3`` and ``layer4`` on the fly (:class:`CondConvConversion`)
and monitor routing (:class:`RoutingEntropyMonitor`). Any LightningDataModule can
replace the data by ``class_path``; a ``trainer.callbacks`` list in a config replaces
the default callbacks (``--trainer.callbacks+=...`` appends to them instead).
``--model.num_classes`` defaults to the data's ``num_classes`` (an image folder's class
folders).

Without ``--trainer.log_every_n_steps``, training values are logged about ten times per
epoch, or per run when ``--trainer.max_steps`` ends it sooner (every ``steps // 10`` steps,
at least every step and at most every 50, Lightning's default), so small data and short
runs show their metrics. A run bounded by ``--trainer.max_steps`` alone (no epoch limit,
validation left at Lightning's defaults) validates at its last step. Errors in the
options, the model or the data are one line (exit status 2); ``--help`` is short and
``--help_full`` lists every option.

Examples:

    condconv-finetune fit --trainer.max_steps 10
    condconv-finetune fit --data ImageFolderDataModule --data.root my_images
    condconv-finetune fit --config examples/configs/pretrained_folder.yaml
"""

from __future__ import annotations

import math
import pickle
import signal
import sys
import warnings
from pathlib import Path
from typing import Any, NoReturn

import lightning.pytorch as pl
from jsonargparse import ArgumentParser, Namespace
from lightning.pytorch import Callback, LightningDataModule
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.trainer.states import TrainerStatus

from ..callbacks import CondConvConversion, RoutingEntropyMonitor
from ..checkpoints import UntrustedCheckpointError, read_checkpoint, untrusted_hparams
from ..demos.data import SyntheticImageDataModule
from ..finetune.image_folder import (  # noqa: F401 (--data ImageFolderDataModule resolves it)
    DataFolderError,
    ImageFolderDataModule,
)
from ..finetune.module import ImageClassifier
from ..functional import is_tuning_enabled
from ..loading.errors import one_line
from ..loading.imports import make_cwd_importable
from .errors import print_error
from .parser import FinetuneParser

LIGHTNING_CKPT_NAMES = ("best", "last", "hpc", "registry")
"""``--ckpt_path`` values Lightning resolves itself (``Trainer.fit(ckpt_path=...)``), not files."""
EXIT_STATUS = {"SIGTERM": 128 + signal.SIGTERM, "SIGINT": 128 + signal.SIGINT}
"""The exit status of a run a signal stopped, as a shell reports a process the signal ended (143, 130)."""

__all__ = ["main"]


class FinetuneCLI(LightningCLI):
    """LightningCLI with defaults for data (any LightningDataModule is accepted) and for the Trainer's callbacks.

    ``--ckpt_path`` checkpoints are untrusted: unless ``--trust_checkpoint true``, their
    hyperparameters set the model's options only as values that pass the model's schema
    (:func:`~condconv_lightning.checkpoints.untrusted_hparams`), assigned to the configuration
    as they are, and never set ``weights``, ``trust_pickle``, ``optimizer`` or ``scheduler``.
    SIGTERM and SIGINT during a run end it with exit status 143 and 130, after Lightning has
    stopped the run as it does.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """LightningCLI's, but a run stopped by SIGTERM or SIGINT exits 143 or 130, not 0 or 1.

        Lightning stops a run on SIGTERM with an exit status of 0 and on SIGINT with 1, after
        saving what it saves; a pre-empted job would look successful.
        """
        try:
            super().__init__(*args, **kwargs)
        except SystemExit as error:
            trainer = getattr(self, "trainer", None)
            if trainer is None or trainer.state.status != TrainerStatus.INTERRUPTED:
                raise
            if trainer.received_sigterm:
                stopped_by = "SIGTERM"
            elif isinstance(error.__context__, KeyboardInterrupt):  # Lightning's sys.exit(1) after Ctrl-C
                stopped_by = "SIGINT"
            else:
                raise
            print(
                f"condconv-finetune: stopped by {stopped_by} at step {trainer.global_step}; checkpoints written "
                "before it are kept",
                file=sys.stderr,
            )
            raise SystemExit(EXIT_STATUS[stopped_by]) from None

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--trust_checkpoint",
            type=bool,
            default=False,
            help="pass a --ckpt_path checkpoint's hyperparameters to the parser unchecked, as Lightning does: they "
            "may name classes to import and build (trusted files only)",
        )
        parser.set_defaults(
            {
                "data": {"class_path": _class_path(SyntheticImageDataModule)},
                "model.num_classes": None,  # the data's (see instantiate_classes)
                "trainer.callbacks": [
                    {
                        "class_path": _class_path(CondConvConversion),
                        "init_args": {"layers": ["layer3", "layer4"], "submodule": "model"},
                    },
                    {"class_path": _class_path(RoutingEntropyMonitor)},
                ],
            }
        )

    def before_instantiate_classes(self) -> None:
        """Put back an untrusted ``--ckpt_path`` (see :meth:`parse_arguments`); let a short step-bounded run
        validate (see the module docstring)."""
        if self._untrusted_ckpt_path is not None:
            self._settings()["ckpt_path"] = self._untrusted_ckpt_path
        trainer = self._settings().get("trainer")
        if trainer is None:
            return
        max_steps = trainer.get("max_steps") or -1
        if max_steps <= 0 or trainer.get("max_epochs") is not None:
            return
        if trainer.get("val_check_interval") is None and trainer.get("check_val_every_n_epoch") == 1:
            trainer["val_check_interval"] = max_steps
            trainer["check_val_every_n_epoch"] = None

    def instantiate_classes(self) -> None:
        """Build model, data and Trainer; a bad value in them is a one-line error, not a traceback.

        ``--model.num_classes`` left out is the data's ``num_classes`` (the class folders of an image folder):
        the data module is built once beforehand to read it (data modules are cheap to build; they read their
        data in ``setup``).
        """
        settings = self._settings()
        try:
            if settings["model"].get("num_classes") is None:
                settings["model"]["num_classes"] = _data_classes(settings.get("data"))
            super().instantiate_classes()
        except (ValueError, ImportError) as error:
            _exit_with(_cause(error))
        if not self._settings().get("trust_checkpoint"):
            self.trainer.callbacks.append(SafeCheckpointPaths())
        if (self._settings().get("trainer") or {}).get("log_every_n_steps") is None:
            self.trainer.callbacks.append(LogIntervalFromData())
        classes = getattr(self.datamodule, "num_classes", None)
        outputs = getattr(self.model, "hparams", {}).get("num_classes")
        if isinstance(classes, int) and isinstance(outputs, int) and classes != outputs:
            _exit_with(f"the data has {classes} classes but --model.num_classes is {outputs}: pass {classes}")

    def _settings(self) -> Any:
        subcommand = self.config.get("subcommand")
        return self.config.get(subcommand) if subcommand else self.config

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse, then read an untrusted ``--ckpt_path`` checkpoint's hyperparameters as checked values only.

        LightningCLI reads a checkpoint's hyperparameters right after parsing and hands them to the
        parser, which imports any class or callable a string there names. Without
        ``--trust_checkpoint`` this method reads them instead, through the one checked reader, and
        assigns the values to the model's options directly (no parser sees them); it sets
        ``ckpt_path`` aside until the classes are built, so Lightning finds none to read, and
        :meth:`before_instantiate_classes` puts it back for ``Trainer.fit``.
        """
        super().parse_arguments(parser, args)
        self._untrusted_ckpt_path = None
        subcommand = self.config.get("subcommand")
        settings = self._settings() if subcommand else None
        ckpt_path = settings.get("ckpt_path") if settings else None
        if ckpt_path and not (Path(ckpt_path).is_file() or ckpt_path in LIGHTNING_CKPT_NAMES or "://" in ckpt_path):
            parser.error(f"--ckpt_path {ckpt_path}: no such file; check the path")
        if not ckpt_path or not Path(ckpt_path).is_file() or settings.get("trust_checkpoint"):
            return
        try:
            checkpoint = read_checkpoint(ckpt_path)
            values = untrusted_hparams(self.model_class, checkpoint, ckpt_path, "--trust_checkpoint true")
        except UntrustedCheckpointError as error:
            parser.error(str(error))
        except (ValueError, OSError, RuntimeError, EOFError, pickle.UnpicklingError) as error:
            damaged = isinstance(error, pickle.UnpicklingError)  # not torch's advice to unpickle it
            reason = "it holds pickled objects or is damaged" if damaged else one_line(error)
            parser.error(f"--ckpt_path {ckpt_path}: cannot read it weights-only ({reason})")
        for key, value in values.items():
            settings["model"][key] = value
        self._untrusted_ckpt_path = ckpt_path
        settings["ckpt_path"] = None


class LogIntervalFromData(Callback):
    """Set the Trainer's ``log_every_n_steps`` from the run's length, when the user gave none.

    Lightning logs every 50 optimizer steps by default, counted across epochs: with 7 batches per
    epoch, a run of a few epochs logs no training value at all, and Lightning warns that the
    interval exceeds the epoch. The number of batches is known only once the data is loaded, after
    that warning's check: this callback logs every step until then, and at train start sets the
    interval to :func:`log_interval` of the steps per epoch and the step limit.
    """

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        trainer.log_every_n_steps = 1

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        steps_per_epoch = math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches)
        trainer.log_every_n_steps = log_interval(steps_per_epoch, trainer.max_steps)


def log_interval(steps_per_epoch: float, max_steps: int) -> int:
    """Log about ten times in the shorter of an epoch and the run (``max_steps``, when positive): every
    ``steps // 10`` optimizer steps, at least every step and at most every 50 (Lightning's default)."""
    steps = min(steps_per_epoch, max_steps if max_steps > 0 else math.inf)
    return 50 if math.isinf(steps) else min(50, max(1, int(steps) // 10))


class SafeCheckpointPaths(Callback):
    """Drop the checkpoint paths of a resumed ModelCheckpoint state that Lightning could be led to delete.

    ModelCheckpoint restores the paths of the checkpoints it wrote (``best_model_path``,
    ``best_k_models``, ...) and deletes one when a newer checkpoint replaces it, if it lies in its
    folder: a check that reads ``..`` as a folder name (``checkpoints/../../precious.txt`` passes)
    and passes every remote path. Without ``--trust_checkpoint`` such paths are dropped before
    ModelCheckpoint reads its state, with a warning; paths of other folders stay (that check
    keeps them), so resuming a run in a new folder is as before.
    """

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        states = checkpoint.get("callbacks")
        if not isinstance(states, dict):
            return
        for callback in trainer.callbacks:
            state = states.get(callback.state_key)
            if isinstance(callback, ModelCheckpoint) and isinstance(state, dict):
                dropped = _drop_deletable_paths(callback.dirpath, state)
                if dropped:
                    warnings.warn(
                        f"--ckpt_path: ignored {dropped} checkpoint paths in its ModelCheckpoint state that lead out "
                        f"of {callback.dirpath} (a run deletes the checkpoints it replaces); pass "
                        "--trust_checkpoint true to keep them",
                        stacklevel=1,
                    )


CHECKPOINT_PATH_KEYS = ("best_model_path", "kth_best_model_path", "last_model_path")
"""The paths a ModelCheckpoint state holds besides ``best_k_models``."""


def _drop_deletable_paths(folder: str | None, state: dict) -> int:
    """Empty every checkpoint path of a ModelCheckpoint ``state`` that is not :func:`_safe`; how many were emptied."""
    dropped = 0
    for key in CHECKPOINT_PATH_KEYS:
        if state.get(key) and not _safe(folder, state[key]):
            state[key] = ""
            dropped += 1
    if "best_k_models" in state:
        best = state["best_k_models"] if isinstance(state["best_k_models"], dict) else {}
        state["best_k_models"] = {path: score for path, score in best.items() if _safe(folder, path)}
        dropped += len(best) - len(state["best_k_models"])
    return dropped


def _safe(folder: str | None, path: object) -> bool:
    """Whether ModelCheckpoint deletes ``path`` only if it is a file of ``folder``: a local path without ``..``,
    or a remote one directly in a remote ``folder``."""
    if not isinstance(path, str) or ".." in path.replace("\\", "/").split("/"):
        return False
    if "://" not in path:
        return True
    return folder is not None and "://" in folder and path.rpartition("/")[0] == folder.rstrip("/")


def _data_classes(spec: Any) -> int:
    """``num_classes`` of the data module that ``--data`` (a class path and its options, as parsed) describes."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--data", type=LightningDataModule | None)
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes  # its name before 4.49
    data = instantiate(Namespace(data=spec)).data
    classes = getattr(data, "num_classes", None)
    if not isinstance(classes, int):
        _exit_with(f"the data ({type(data).__name__}) does not say how many classes it has: pass --model.num_classes")
    return classes


def _cause(error: BaseException) -> str:
    """The error a class's constructor raised, in one line, out of jsonargparse's wrapping of it."""
    while error.__cause__ is not None:
        error = error.__cause__
    return " ".join(str(error).split()) if isinstance(error, ValueError) else one_line(error)


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _exit_with(message: str) -> NoReturn:
    print_error("condconv-finetune", message)
    raise SystemExit(2)


def main(args: list[str] | None = None) -> None:
    """Entry point of ``condconv-finetune`` (``args`` replaces ``sys.argv[1:]``, for tests and notebooks).

    The current folder is importable (appended to ``sys.path``, so it never shadows an installed
    package), so ``--data mydata.MyDataModule`` and ``--model.arch mymodels:Net`` find the user's
    own modules.
    """
    try:
        is_tuning_enabled()  # a CONDCONV_TUNE that is no switch stops the command before any work
    except ValueError as error:
        _exit_with(str(error))
    make_cwd_importable()
    try:
        FinetuneCLI(
            ImageClassifier,
            LightningDataModule,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            parser_class=FinetuneParser,
            auto_configure_optimizers=False,
            args=args,
        )
    except DataFolderError as error:  # found while the Trainer set the data up, after the classes were built
        message = str(error)
        if "\nOriginal Traceback" in message:  # raised in a DataLoader worker: torch's report ends with the error
            message = message.strip().splitlines()[-1].partition(": ")[2]
        _exit_with(message)
    except KeyboardInterrupt:  # Ctrl-C before or after the Trainer ran, where Lightning does not handle it
        print("condconv-finetune: stopped by SIGINT", file=sys.stderr)
        raise SystemExit(EXIT_STATUS["SIGINT"]) from None


if __name__ == "__main__":
    main()
