"""Tuning Cache
============

Reuses measured ``auto``'s choices across runs and DDP ranks: the choices are read from
a JSON file when a run sets up and written back when it ends, so that a later run (a
resumed fine-tuning job, an evaluation, a deployment) times nothing it met before. The
switch and the file format are those of :mod:`condconv_lightning.functional.autotune`;
this callback only decides when, as ``ModelCheckpoint`` does for checkpoints.
"""

from __future__ import annotations

import os
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks.callback import Callback
from typing_extensions import override

from ..functional.autotune import load_tuning_cache, save_tuning_cache

__all__ = ["TuningCache"]


class TuningCache(Callback):
    """Load ``auto``'s tuned choices from ``path`` at setup (if the file exists) and save them at teardown.

    Every rank loads the file onto its own device (the key holds the device index, so
    rank 3 reads the choices rank 0 saved for ``cuda:0`` as its own on ``cuda:3``); only
    global rank 0 writes it, atomically, after each ``fit``, ``validate``, ``test`` or
    ``predict``, and when one stops on an exception (Ctrl-C included), so a long run that
    fails keeps what it tuned. The file is validated strictly before anything in it is
    used (see :func:`~condconv_lightning.functional.load_tuning_cache`); a bad file, or a
    path that is no regular file (a FIFO, a device), stops the run with a one-line error
    before any step, and is left as it is. Entries the tuner would not choose for their
    problems are ignored with a warning and left out of the file saved at the end.

    Args:
        path: the JSON file; its folder must exist.

    Example::

        Trainer(callbacks=[TuningCache("tuning.json")])
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.parent.is_dir():
            raise ValueError(f"TuningCache: folder {self.path.parent} does not exist; create it or pass another path")
        self.loaded = 0
        """How many choices the last setup read from the file."""
        self._ready = False

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.loaded, self._ready = 0, False
        if self.path.exists():
            device = trainer.strategy.root_device  # set by now; the module moves there after setup
            self.loaded = load_tuning_cache(self.path, device=device if device.type in ("cpu", "cuda") else None)
        self._ready = True

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._save(trainer)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._save(trainer)

    def _save(self, trainer: pl.Trainer) -> None:
        # Only after this process's setup has read the file (or found none): a run that failed
        # before it (in prepare_data, say), or on a file it could not read, must not replace it.
        if self._ready and trainer.is_global_zero:
            save_tuning_cache(self.path)
        self._ready = False  # once per run: the next run's setup reads the file again first
