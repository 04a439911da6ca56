"""Names private to torch and Lightning: only ``condconv_lightning/compat.py`` may use them, and its probes work.

A private name (one that starts with an underscore) changes without notice between releases:
torch 2.14 removed ``torch.fx._symbolic_trace._is_fx_tracing_flag``, which every forward read.
The scan below fails on any private torch or Lightning name used elsewhere in the package:
imported, reached as an attribute of a module, read from an object (a name the package itself
never defines), passed to ``getattr``/``setattr``/``hasattr`` as a string, or a private method
of a torch or Lightning base class overridden by one of the package's classes.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest
import torch
from torch import nn

import condconv_lightning
from condconv_lightning import compat

PACKAGE = Path(condconv_lightning.__file__).parent
COMPAT = PACKAGE / "compat.py"
EXTERNAL = ("torch", "lightning", "pytorch_lightning", "lightning_fabric", "lightning_utilities", "torchmetrics")
STDLIB_PRIVATE = frozenset({"_actions", "_action_groups", "_group_actions", "_SubParsersAction", "_get_subactions"})
"""argparse's: the standard library keeps them stable, and the CLI's help layout needs them."""


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def package_sources() -> dict[Path, ast.Module]:
    return {path: ast.parse(path.read_text(), str(path)) for path in sorted(PACKAGE.rglob("*.py"))}


def names_the_package_defines(trees: dict[Path, ast.Module]) -> set[str]:
    """Every function, class, attribute, variable, argument and keyword name the package itself binds."""
    defined: set[str] = set()
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                defined.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                defined.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                defined.add(node.id)
            elif isinstance(node, ast.arg) or (isinstance(node, ast.keyword) and node.arg):
                defined.add(node.arg)
    return defined


def external_aliases(tree: ast.Module) -> dict[str, str]:
    """Local name -> dotted path, for every name a module binds by importing from torch or Lightning."""
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in EXTERNAL:
                    local = alias.asname or alias.name.split(".")[0]
                    aliases[local] = alias.name if alias.asname else local
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in EXTERNAL:
            for alias in node.names:
                aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return aliases


def dotted(node: ast.expr) -> list[str] | None:
    """``a.b.c`` as ``["a", "b", "c"]`` when the chain starts at a plain name, else None."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return [node.id, *reversed(parts)]


def private_uses(tree: ast.Module, defined: set[str]) -> list[str]:
    """``line: what`` for every private torch or Lightning name ``tree`` uses."""
    aliases = external_aliases(tree)
    found: list[str] = []

    def report(node: ast.AST, what: str) -> None:
        found.append(f"{node.lineno}: {what}")

    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            module = node.module if isinstance(node, ast.ImportFrom) else None
            names = [alias.name for alias in node.names]
            paths = [f"{module}.{name}" for name in names] if module else names
            for full in paths:
                if full.split(".")[0] in EXTERNAL and any(is_private(part) for part in full.split(".")):
                    report(node, f"imports {full}")
        elif isinstance(node, ast.Attribute) and is_private(node.attr) and node.attr not in STDLIB_PRIVATE:
            chain = dotted(node)
            if chain and chain[0] in aliases:
                report(node, f"uses {aliases[chain[0]]}.{'.'.join(chain[1:])}")
            elif (
                not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")) and node.attr not in defined
            ):
                report(node, f"reads {ast.unparse(node)}, a name the package never defines")
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "setattr", "hasattr", "delattr")
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
            and is_private(node.args[1].value)
            and node.args[1].value not in defined
        ):
            report(node, f"{node.func.id}(..., {node.args[1].value!r})")
    return sorted(found, key=lambda use: (int(use.split(":")[0]), use))


def test_no_private_torch_or_lightning_name_outside_the_compat_module() -> None:
    trees = package_sources()
    defined = names_the_package_defines({p: t for p, t in trees.items() if p != COMPAT})
    found = [
        f"{path.relative_to(PACKAGE.parent)}:{use}"
        for path, tree in trees.items()
        if path != COMPAT
        for use in private_uses(tree, defined)
    ]
    assert not found, "private torch/Lightning names outside condconv_lightning/compat.py:\n" + "\n".join(found)


def test_the_scan_finds_each_kind_of_private_use() -> None:
    """The scan would have caught each private name the package once used, and passes its own names."""
    tree = ast.parse(
        "import torch\n"
        "import torch.fx\n"
        "from torch.utils._python_dispatch import _get_current_dispatch_mode\n"
        "def f(trainer, model):\n"
        "    a = torch.fx._symbolic_trace._is_fx_tracing_flag\n"
        "    b = trainer.fit_loop.epoch_loop._should_accumulate()\n"
        "    c = getattr(model, '_orig_mod', None)\n"
        "    return model._mine, self._also_mine, torch.__version__\n"
    )
    assert private_uses(tree, {"f", "a", "b", "c", "trainer", "model", "_mine"}) == [
        "3: imports torch.utils._python_dispatch._get_current_dispatch_mode",
        "5: uses torch.fx._symbolic_trace",
        "5: uses torch.fx._symbolic_trace._is_fx_tracing_flag",
        "6: reads trainer.fit_loop.epoch_loop._should_accumulate, a name the package never defines",
        "7: getattr(..., '_orig_mod')",
    ]


def package_classes() -> list[type]:
    classes = []
    for info in pkgutil.walk_packages(condconv_lightning.__path__, "condconv_lightning."):
        module = importlib.import_module(info.name)
        classes += [c for _, c in inspect.getmembers(module, inspect.isclass) if c.__module__ == module.__name__]
    return classes


def test_no_class_overrides_a_private_method_of_torch_or_lightning() -> None:
    overrides = []
    for cls in package_classes():
        external = [base for base in cls.__mro__[1:] if base.__module__.split(".")[0] in EXTERNAL]
        for name, value in vars(cls).items():
            method = inspect.isfunction(value) or isinstance(value, (property, classmethod, staticmethod))
            if method and is_private(name) and any(name in vars(base) for base in external):
                overrides.append(f"{cls.__module__}.{cls.__qualname__}.{name}")
    assert not overrides, f"overrides of private torch/Lightning methods: {overrides}"


# The probes: present on every tested torch, and right.


def test_every_probe_is_present_on_this_torch() -> None:
    assert compat.MISSING == [], (
        f"torch {torch.__version__} lacks {compat.MISSING}: update condconv_lightning/compat.py"
    )


def test_probes_answer_no_outside_their_contexts() -> None:
    assert not compat.dispatch_mode_active()
    assert not compat.in_backward_pass()
    assert not compat.saved_tensor_hooks_active()
    assert not compat.functorch_transform_active()


def test_dispatch_mode_probe_sees_fake_tensors_and_other_modes() -> None:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False):
        assert compat.dispatch_mode_active()
    assert not compat.dispatch_mode_active()


def test_backward_probe_answers_inside_a_backward_pass_only() -> None:
    seen: list[bool] = []

    class Probe(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            seen.append(compat.in_backward_pass())
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            seen.append(compat.in_backward_pass())
            return grad

    Probe.apply(torch.ones(2, requires_grad=True)).sum().backward()
    assert seen == [False, True]


def test_saved_tensor_hooks_probe_sees_activation_checkpointing_hooks() -> None:
    with torch.autograd.graph.save_on_cpu():
        assert compat.saved_tensor_hooks_active()
    assert not compat.saved_tensor_hooks_active()


def test_functorch_probe_answers_inside_vmap_and_grad() -> None:
    seen: list[bool] = []

    def f(x):
        seen.append(compat.functorch_transform_active())
        return x.sin().sum()

    torch.func.vmap(f)(torch.ones(2, 3))
    torch.func.grad(f)(torch.ones(3))
    assert seen == [True, True]


def test_weights_only_globals_include_torchs_own() -> None:
    allowed = compat.weights_only_default_globals()
    assert "torch._utils._rebuild_tensor_v2" in allowed and "collections.OrderedDict" in allowed


def test_hooks_move_with_their_handles() -> None:
    old, new = nn.Conv2d(2, 2, 1), nn.Conv2d(2, 2, 1)
    calls: list[str] = []
    handles = [
        old.register_forward_pre_hook(lambda m, args: calls.append("pre")),
        old.register_forward_hook(lambda m, args, out: calls.append("post")),
        old.register_full_backward_hook(lambda m, gin, gout: calls.append("backward")),
    ]
    compat.move_hooks(old, new)
    assert [type(h).__name__ for h in compat.forward_pre_hooks(new)] == ["function"]
    new(torch.ones(1, 2, 1, 1, requires_grad=True)).sum().backward()
    assert calls == ["pre", "post", "backward"]
    for handle in handles:
        handle.remove()
    calls.clear()
    new(torch.ones(1, 2, 1, 1, requires_grad=True)).sum().backward()
    assert calls == [], "the caller's handles remove the hooks from the new module"


def test_the_module_inside_torch_compile_is_found() -> None:
    inner = nn.Linear(2, 2)
    assert compat.compiled_module_inside(torch.compile(inner)) is inner
    assert compat.compiled_module_inside(inner) is None


# Fallbacks: a torch without a probe gets the answer that keeps results correct.


@pytest.mark.parametrize(
    ("attribute", "probe", "answer"),
    [
        ("_current_dispatch_mode", compat.dispatch_mode_active, True),
        ("_current_graph_task_id", compat.in_backward_pass, True),
        ("_top_saved_tensors_hooks", compat.saved_tensor_hooks_active, True),
        ("_functorch_transforms_active", compat.functorch_transform_active, True),
        ("_weights_only_allowed_globals", compat.weights_only_default_globals, set()),
    ],
)
def test_a_missing_probe_falls_back_to_the_safe_answer(monkeypatch, attribute: str, probe, answer) -> None:
    monkeypatch.setattr(compat, attribute, None)
    assert probe() == answer


def test_without_probes_auto_runs_by_its_rules_and_computes_the_same(monkeypatch) -> None:
    from condconv_lightning import CondConv2d
    from condconv_lightning.functional import autotune, clear_tuning_cache, tuning

    torch.manual_seed(0)
    layer, x = CondConv2d(4, 6, 3, padding=1, num_experts=3, strategy="grouped"), torch.randn(2, 4, 8, 8)
    expected = layer(x)
    layer.strategy = "auto"
    for attribute in ("_current_dispatch_mode", "_current_graph_task_id", "_functorch_transforms_active"):
        monkeypatch.setattr(compat, attribute, None)
    monkeypatch.setattr(autotune, "_fastest", lambda *args, **kwargs: pytest.fail("timed without its probes"))
    clear_tuning_cache()
    with tuning(True):
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
    assert autotune.tuning_cache() == {}, "nothing timed, nothing cached"
