"""Every code snippet in README.md and docs/*.md runs, and prints what the page shows.

Per page, in a fresh temporary folder and in document order:

- ```python blocks run in one namespace (as a reader pasting them into one interpreter would);
- ```bash / ```console blocks run with bash (the installed commands on PATH, ``examples/``
  of the checkout linked into the folder), after the python blocks above them;
- a ```text block right after a code block is that block's printed output (stdout), compared
  after stripping trailing whitespace; ``<!-- output: approximate -->`` on the line before it
  compares lines with every number replaced and runs of spaces collapsed;
- ``<!-- snippet: file NAME -->`` before a block writes the block to NAME instead of running it;
- ``<!-- snippet: skip (reason) -->`` before a block skips it (installs, GPUs, long runs);
- ``<!-- snippet: exit N -->`` before a shell block expects exit status N.

Measured ``auto`` is off (``CONDCONV_TUNE=0``) so that the strategies reports print are the
rules' choices, not this machine's timings; the pages say so where it shows.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import rich

from condconv_lightning.functional import tuning

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PYTHON = {"python", "py", "pycon"}
SHELL = {"bash", "sh", "shell", "console"}
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>```+|~~~+)\s*(?P<lang>[\w+-]*)")
MARKER = re.compile(r"^\s*<!--\s*(?P<kind>snippet|output):\s*(?P<value>.*?)\s*-->\s*$")
SKIP = re.compile(r"^skip\s*\((?P<reason>.*)\)$")
NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+(?:\.\d*)?|\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?", re.IGNORECASE)
"""A number as printed: thousands separators only in groups of three digits, so the comma after a
number ("diff 0, max") stays punctuation whichever number a machine prints."""
SHELL_TIMEOUT_S = 120


@dataclass
class Block:
    """One fenced code block of a page, with its marker and the output block that follows it."""

    page: Path
    line: int
    lang: str
    code: str
    marker: str | None = None
    output: str | None = None
    output_marker: str | None = None

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    @property
    def skip_reason(self) -> str | None:
        match = SKIP.match(self.marker or "")
        return match["reason"].strip() if match else None


def _marker(line: str, kind: str) -> str | None:
    match = MARKER.match(line)
    return match["value"] if match and match["kind"] == kind else None


def parse(page: Path) -> list[Block]:
    """The fenced blocks of ``page``; text blocks that are another block's output are attached to it."""
    lines = page.read_text(encoding="utf-8").splitlines()
    raw: list[tuple[int, int, Block]] = []  # (first line index, index after the closing fence, block)
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, fence = match["indent"], match["fence"]
        end = i + 1
        while end < len(lines) and not lines[end].strip().startswith(fence):
            end += 1
        body = [line[len(indent) :] if line.startswith(indent) else line.lstrip() for line in lines[i + 1 : end]]
        marker = _marker(lines[i - 1], "snippet") if i > 0 else None
        raw.append((i, end + 1, Block(page, i + 1, match["lang"].lower(), "\n".join(body) + "\n", marker)))
        i = end + 1
    blocks: list[Block] = []
    outputs: set[int] = set()
    for n, (_, after, block) in enumerate(raw):
        if n in outputs:
            continue
        blocks.append(block)
        if block.lang not in PYTHON | SHELL or n + 1 >= len(raw):
            continue
        start, _, following = raw[n + 1]
        between = [line for line in lines[after:start] if line.strip()]
        output_marker = _marker(between[-1], "output") if between else None
        if following.lang == "text" and len(between) == (1 if output_marker else 0):
            block.output, block.output_marker = following.code, output_marker
            outputs.add(n + 1)
    return blocks


def _normalized(text: str, approximate: bool) -> str:
    lines = [line.rstrip() for line in text.strip("\n").splitlines()]
    if approximate:
        lines = [re.sub(r"\s+", " ", NUMBER.sub("#", line)).strip() for line in lines]
    return "\n".join(lines).strip("\n")


def _check_output(block: Block, printed: str) -> None:
    if block.output is None:
        return
    if block.output_marker not in (None, "approximate"):
        pytest.fail(f"{block.where}: unknown output marker {block.output_marker!r}")
    approximate = block.output_marker == "approximate"
    expected, actual = _normalized(block.output, approximate), _normalized(printed, approximate)
    assert actual == expected, f"{block.where}: printed output differs from the page\n--- printed:\n{printed}"


def _run_python(block: Block, namespace: dict[str, object]) -> None:
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        try:
            exec(compile(block.code, block.where, "exec"), namespace)
        except Exception as error:
            raise AssertionError(
                f"{block.where}: snippet raised {error!r}\n--- printed:\n{stdout.getvalue()}"
            ) from error
    _check_output(block, stdout.getvalue())


def _run_shell(block: Block, cwd: Path, env: dict[str, str]) -> None:
    expected_status = 0
    if block.marker and block.marker.startswith("exit"):
        expected_status = int(block.marker.split()[1])
    code = "\n".join(line[2:] if line.startswith("$ ") else line for line in block.code.splitlines())
    done = subprocess.run(
        ["bash", "-eo", "pipefail", "-c", code],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=SHELL_TIMEOUT_S,
    )
    assert done.returncode == expected_status, (
        f"{block.where}: exit status {done.returncode}, expected {expected_status}\n"
        f"--- stdout:\n{done.stdout[-3000:]}\n--- stderr:\n{done.stderr[-3000:]}"
    )
    _check_output(block, done.stdout)


def _shell_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("CONDCONV_DEBUG", "FORCE_COLOR", "TTY_COMPATIBLE")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["COLUMNS"] = "80"
    env["CONDCONV_TUNE"] = "0"
    return env


def _snippets(page: Path) -> list[Block]:
    """The blocks of ``page`` the runner acts on: code, and files to write."""
    return [b for b in parse(page) if b.lang in PYTHON | SHELL or (b.marker or "").startswith("file ")]


RUNNABLE = [page for page in PAGES if any(b.skip_reason is None for b in _snippets(page))]


@pytest.mark.parametrize("page", RUNNABLE, ids=[str(p.relative_to(ROOT)) for p in RUNNABLE])
def test_page_snippets(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The page's snippets run in order in one namespace and print what the page shows."""
    blocks = _snippets(page)
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    monkeypatch.chdir(tmp_path)
    env = _shell_env()
    for key in ("CONDCONV_DEBUG", "FORCE_COLOR", "TTY_COMPATIBLE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("COLUMNS", "80")
    rich.reconfigure()  # a fresh global console: reads COLUMNS, writes to the captured sys.stdout
    namespace: dict[str, object] = {"__name__": "__main__"}
    with tuning(False):
        for block in blocks:
            if block.skip_reason is not None:
                continue
            if block.marker and block.marker.startswith("file "):
                (tmp_path / block.marker.split(maxsplit=1)[1]).write_text(block.code)
            elif block.lang in PYTHON:
                _run_python(block, namespace)
            else:
                _run_shell(block, tmp_path, env)


def test_markers_are_well_formed() -> None:
    """Every skip names its reason; every marker is one the runner knows."""
    for page in PAGES:
        for block in parse(page):
            marker = block.marker
            if marker is None:
                continue
            if marker.startswith("skip"):
                assert block.skip_reason, f"{block.where}: a skip marker needs a reason: <!-- snippet: skip (why) -->"
            elif marker.startswith("exit"):
                assert block.lang in SHELL and re.fullmatch(r"exit \d+", marker), f"{block.where}: bad {marker!r}"
            else:
                assert re.fullmatch(r"file [\w.-]+", marker), f"{block.where}: unknown snippet marker {marker!r}"


def test_runner_parses_outputs_and_markers(tmp_path: Path) -> None:
    """The parser pairs a code block with the text block after it and reads markers."""
    page = tmp_path / "page.md"
    page.write_text(
        "<!-- snippet: skip (needs a GPU) -->\n```bash\nnvidia-smi\n```\n\n"
        "```python\nprint(1.5)\n```\n<!-- output: approximate -->\n```text\n2.5\n```\n"
        "```text\nnot an output\n```\n"
    )
    skipped, printing, text = parse(page)
    assert skipped.skip_reason == "needs a GPU" and skipped.lang == "bash"
    assert printing.output == "2.5\n" and printing.output_marker == "approximate"
    assert text.lang == "text" and text.output is None
    assert _normalized("x 1.5  y\n", True) == _normalized("x 22.75 y", True)
    # each number a machine may print in one place normalizes alike, punctuation after it kept
    printed = ["diff 0, max 1", "diff 3.1e-08, max 1", "diff 1,234.5, max 1", "diff -2E+03, max 1", "diff .5, max 1"]
    assert {_normalized(line, True) for line in printed} == {"diff #, max #"}
