"""The installed console scripts, run in a child process as users run them, for the command-line tests."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

UNTUNED = {"CONDCONV_TUNE": "0", "OMP_NUM_THREADS": "1"}
"""Environment for runs whose outputs are compared: no timed strategy choice, one thread."""


def script_environment(columns: int = 120, debug: bool = False, extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment at a fixed console width, with tracebacks only where ``debug`` asks."""
    env = {key: value for key, value in os.environ.items() if key != "CONDCONV_DEBUG"}
    env.update({"COLUMNS": str(columns), **(extra or {})})
    if debug:
        env["CONDCONV_DEBUG"] = "1"
    return env


def run_script(
    program: str,
    *args: object,
    cwd: Path,
    columns: int = 120,
    debug: bool = False,
    extra_env: dict[str, str] | None = None,
    **kwargs: object,
) -> subprocess.CompletedProcess:
    """``program`` (a console script of the installed package) with ``args``; ``kwargs`` go to ``subprocess.run``."""
    command = shutil.which(program)
    if command is None:
        pytest.fail(f"the {program} console script is not installed; run `pip install -e .`")
    return subprocess.run(
        [command, *map(str, args)],
        cwd=cwd,
        env=script_environment(columns, debug, extra_env),
        capture_output=True,
        text=True,
        timeout=300,
        **kwargs,
    )
