"""The upcycling study's data, router-init option and tool (``tools/upcycling_study.py --quick``)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from condconv_lightning.demos import make_context_gratings, make_multicontext_gratings
from condconv_lightning.demos.data import _CASTS, multicontext_casts

TOOL = Path(__file__).resolve().parents[1] / "tools" / "upcycling_study.py"


def test_make_context_gratings_default_draw_is_unchanged() -> None:
    # Recorded before the multi-context generator was added to demos/data.py: the default task must not move.
    images, labels, contexts, distractor = make_context_gratings(64, generator=torch.Generator().manual_seed(7))
    digest = hashlib.sha256(b"".join(t.numpy().tobytes() for t in (labels, contexts, distractor))).hexdigest()
    assert digest[:16] == "6a72bd7e5d468386"
    assert images.shape == (64, 3, 32, 32) and images.dtype == torch.float32
    # randn's Box-Muller differs in the last bits between CPUs (vectorized or scalar log/sin/cos): the noise
    # alone moves this sum by about 133 per redraw, so 1e-4 still catches any change of the draw
    assert float(images.double().sum()) == pytest.approx(353.2202530495824, rel=1e-4)
    assert images[3, 1, 5, :4].tolist() == pytest.approx(
        [-0.03677711263298988, -0.10976257175207138, -0.001450924202799797, -0.18328897655010223], abs=1e-6
    )


def test_multicontext_gratings_shapes_and_determinism() -> None:
    draw = lambda: make_multicontext_gratings(96, 6, 6, 16, 0.5, generator=torch.Generator().manual_seed(3))
    images, labels, contexts, distractor = draw()
    assert images.shape == (96, 3, 16, 16) and images.dtype == torch.float32
    assert labels.shape == contexts.shape == distractor.shape == (96,)
    assert int(labels.max()) < 6 and int(contexts.max()) < 6 and int(distractor.max()) < 6
    assert all(torch.equal(a, b) for a, b in zip(draw(), (images, labels, contexts, distractor)))
    assert not torch.equal(make_multicontext_gratings(96, 6, 6, 16, 0.5, torch.Generator().manual_seed(4))[0], images)


def test_multicontext_gratings_cast_marks_the_context() -> None:
    # Without noise, an image's mean colour is its context's cast (the gratings average out to about zero).
    images, _, contexts, _ = make_multicontext_gratings(
        64, 4, 4, 32, noise=0.0, generator=torch.Generator().manual_seed(0)
    )
    casts = multicontext_casts(4)
    assert torch.allclose(images.mean(dim=(2, 3)), casts[contexts], atol=0.1)
    assert torch.allclose(multicontext_casts(2), _CASTS, atol=1e-6)  # two contexts: the warm/cool pair
    assert torch.allclose(casts.sum(dim=1), torch.zeros(4), atol=1e-6)  # no overall brightness change


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_classes": 1}, "num_classes must be at least 2"),
        ({"num_contexts": 0}, "num_contexts must be a positive integer"),
        ({"image_size": 4}, "image_size must be at least 8"),
    ],
)
def test_multicontext_gratings_rejects_bad_sizes(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_multicontext_gratings(8, **kwargs)


def _tool(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    spec = importlib.util.spec_from_file_location("upcycling_study", TOOL)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_unknown_variant_is_a_usage_error(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _tool(monkeypatch).main(["--variants", "static,nope"])
    assert exit_info.value.code == 2
    assert "unknown variant ['nope']" in capsys.readouterr().err


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    # A subprocess: the tool sets torch's thread count, which must not leak into the other tests.
    out = tmp_path_factory.mktemp("study") / "out"
    completed = subprocess.run(
        [sys.executable, str(TOOL), "--quick", "--out", str(out)], capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "ETA" in completed.stdout  # progress lines
    return out, json.loads((out / "results.json").read_text())


def test_quick_study_writes_every_run_and_artifact(quick: tuple[Path, dict]) -> None:
    out, results = quick
    config = results["config"]
    assert results["mode"] == "quick" and results["seeds"] == 2
    assert {"platform", "cpu_count", "torch", "date"} <= set(results["machine"])
    assert set(results["tasks"]) == {"gratings", "digits", "renderings"}
    assert {"static", "scratch", "static_wide", "k1", "random_softmax"} <= set(results["variants_run"])
    runs = {(r["task"], r["variant"], r["seed"]) for r in results["runs"]}
    expected = {(t, v, s) for t in results["tasks"] for v in results["variants_run"] for s in range(2)}
    assert runs == expected and len(results["runs"]) == len(expected)
    for run in results["runs"]:
        curve = run["curve"]
        assert all(0.0 <= a <= 1.0 for a in [run["final_val_acc"], run["acc_at_static_time"], *curve["val_acc"]])
        assert curve["steps"][0] == 0 and curve["steps"][-1] == config["total_steps"]  # every model: the same budget
        assert curve["steps"] == sorted(set(curve["steps"]))
        assert run["step_ms_median"] > 0 and run["params"] > 0 and run["time_ratio"] > 0
        from_scratch = run["variant"] in ("scratch", "static_wide")
        assert run["static_steps"] == (0 if from_scratch else config["convert_at"])
        assert (run["step0"] is None) == from_scratch
        if run["variant"] in ("static", "static_wide"):
            assert run["routing"] is None
        else:
            routing = run["routing"]
            assert all(0.0 <= routing[key] <= 1.0 + 1e-6 for key in ("entropy", "usage_entropy", "group_tv"))
    for task in results["tasks"]:
        for name in (f"accuracy_vs_steps_{task}", f"accuracy_vs_time_{task}", f"delta_vs_static_{task}"):
            assert (out / f"{name}.png").stat().st_size > 10_000
    summary = (out / "summary.md").read_text()
    assert "| static |" in summary and "| scratch |" in summary and "## renderings" in summary


def run_tool(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True, timeout=300)


def test_seeds_run_apart_merge_into_the_run_of_one_process(quick: tuple[Path, dict], tmp_path: Path) -> None:
    """A seed trains the same models in any process, so seeds split over processes join into one study."""
    for seed in (0, 1):
        part = ("--quick", "--tasks", "gratings", "--variants", "random_softmax", "--first-seed", seed, "--seeds", 1)
        completed = run_tool(*part, "--out", tmp_path / f"seed{seed}")
        assert completed.returncode == 0, completed.stderr[-3000:]
    parts = [tmp_path / f"seed{seed}" / "results.json" for seed in (0, 1)]
    completed = run_tool("--merge", *parts, "--out", tmp_path / "merged")
    assert completed.returncode == 0, completed.stderr[-3000:]
    merged = json.loads((tmp_path / "merged" / "results.json").read_text())
    assert merged["seed_list"] == [0, 1] and len(merged["runs"]) == 4  # static and random_softmax, 2 seeds
    assert merged["seeds"] == merged["config"]["seeds"] == 2  # each part ran one
    first = {(r["task"], r["variant"], r["seed"]): r for r in quick[1]["runs"]}
    for run in merged["runs"]:
        same = first[(run["task"], run["variant"], run["seed"])]
        assert run["curve"]["val_acc"] == same["curve"]["val_acc"] and run["routing"] == same["routing"]
    assert "| random_softmax |" in (tmp_path / "merged" / "summary.md").read_text()
    assert (tmp_path / "merged" / "delta_vs_static_gratings.png").stat().st_size > 10_000
    twice = run_tool("--merge", parts[0], parts[0], "--out", tmp_path / "twice")
    assert twice.returncode == 2 and "gratings seed 0 is in an earlier file too" in twice.stderr


def test_upcycled_variants_start_where_the_static_model_stands(quick: tuple[Path, dict]) -> None:
    """Every exact recipe's step-0 outputs are the static model's; the runs share the static steps' curve."""
    _, results = quick
    by_key = {(r["task"], r["variant"], r["seed"]): r for r in results["runs"]}
    exact = [name for name in results["variants_run"] if name not in ("static", "scratch", "static_wide")]
    assert exact, "the quick run holds exact recipes"
    for task in results["tasks"]:
        for seed in range(results["seeds"]):
            static = by_key[task, "static", seed]
            for name in exact:
                run = by_key[task, name, seed]
                step0 = run["step0"]
                assert step0["max_rel_diff"] <= 1e-5, (task, name, seed)
                # a prediction may change only where the static model's top two logits lie within rounding
                assert step0["changed"] <= step0["near_ties"], (task, name, seed)
                n = results["tasks"][task]["val_size"]
                assert abs(step0["val_acc"] - static["step0"]["val_acc"]) * n <= step0["near_ties"] + 1e-6
                shared = run["curve"]["steps"].index(results["config"]["convert_at"]) + 1
                assert run["curve"]["val_acc"][:shared] == static["curve"]["val_acc"][:shared]


def test_the_widened_static_control_matches_the_converted_parameter_count(quick: tuple[Path, dict]) -> None:
    _, results = quick
    for run in results["runs"]:
        if run["variant"] == "static_wide":
            converted = next(
                r
                for r in results["runs"]
                if (r["task"], r["seed"], r["variant"]) == (run["task"], run["seed"], "random_softmax")
            )
            assert abs(run["params"] - converted["params"]) / converted["params"] < 0.1


def test_renderings_draw_each_digit_four_visibly_different_ways(monkeypatch: pytest.MonkeyPatch) -> None:
    tool = _tool(monkeypatch)
    task = tool.renderings_task(tool.QUICK)
    kinds = len(tool.RENDERINGS)
    assert task.train_x.shape[1:] == (3, 16, 16) and len(task.val_y) == kinds * tool.QUICK.digits_val
    assert torch.bincount(task.val_groups).tolist() == [tool.QUICK.digits_val] * kinds
    same_digit = torch.stack([task.val_x[task.val_groups == g][0] for g in range(kinds)])  # one digit, each way
    distances = (same_digit[:, None] - same_digit[None]).abs().mean(dim=(2, 3, 4))
    assert float(distances.add(torch.eye(kinds)).min()) > 0.1, "every rendering differs visibly from every other"
    gray = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(tool.render(gray, "inverted"), 1 - gray.expand(-1, 3, -1, -1))
    assert torch.equal(tool.render(gray, "rotated"), torch.rot90(gray.expand(-1, 3, -1, -1), 1, dims=(2, 3)))
