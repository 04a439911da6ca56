"""CI sessions (https://nox.thea.codes): lint and docs once, the whole test suite on each tested PyTorch stack.

``nox`` runs them all, each in a fresh virtual environment under ``.nox/``; ``nox -s tests``
runs the suite on every stack, ``nox -s "tests(stack='torch-2.13')"`` on one, ``nox -l`` lists them.
``docs/index.md`` lists the stacks as the tested ones, and ``pyproject.toml``'s lower bounds
are their versions: a change here changes both.
"""

from __future__ import annotations

import nox

nox.options.default_venv_backend = "venv"
nox.options.sessions = ["lint", "docs", "tests"]
nox.options.error_on_missing_interpreters = True

STACKS: dict[str, tuple[str, ...]] = {
    # the CPU build of torch: small, and what CI machines without a GPU install
    "torch-2.13": ("torch==2.13.0",),
    # what most CNN users have today: a CUDA build (it runs on the CPU) with torchvision and timm
    "torch-2.14-vision": ("torch==2.14.1", "torchvision==0.29.1", "timm==1.0.31"),
}
"""Each stack's PyTorch packages, installed before the project so that pip keeps them."""
DOCS_STACK = "torch-2.13"


@nox.session
def lint(session: nox.Session) -> None:
    """ruff's lint rules and its formatting check (the version pinned in the ``dev`` extra)."""
    session.install("ruff==0.17.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def docs(session: nox.Session) -> None:
    """The documentation site builds without a warning."""
    session.install(*STACKS[DOCS_STACK])
    session.install("-e", ".[docs]")
    session.run("mkdocs", "build", "--strict", "--site-dir", session.create_tmp())


@nox.session
@nox.parametrize("stack", list(STACKS))
def tests(session: nox.Session, stack: str) -> None:
    """The whole test suite, the ONNX export included; tests that need torchvision or timm skip, with the
    reason, where they are missing."""
    session.install(*STACKS[stack])
    session.install("-e", ".[dev,onnx]")  # onnx: condconv-convert --to onnx runs its check in onnxruntime
    session.run("python", "-m", "pytest", "-q", *session.posargs)
