"""Measured ``auto``: what is timed, when, on what, and what it leaves alone.

Timings are replaced by sleeps or counted, never asserted as speeds.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
import torch.nn as nn

import condconv_lightning.functional.autotune as autotune
import condconv_lightning.functional.condconv as condconv
from condconv_lightning import CondConv2d
from condconv_lightning.functional import (
    clear_tuning_cache,
    condconv2d,
    is_tuning_enabled,
    load_tuning_cache,
    save_tuning_cache,
    tuning,
    tuning_cache,
)

pytestmark = pytest.mark.usefixtures("fresh_tuning")  # tuning on, an empty cache, the process left as found


@pytest.fixture
def timings(monkeypatch) -> list[float]:
    """Every timed run (warm-ups included) while tuning."""
    runs: list[float] = []
    inner = autotune.timed_ms

    def counted(call, device, min_ms=0.0):
        assert min_ms == autotune.MIN_SAMPLE_MS  # every sample of the tuner runs that long, not one call
        runs.append(inner(call, device, min_ms))
        return runs[-1]

    monkeypatch.setattr(autotune, "timed_ms", counted)
    return runs


def slow_down(monkeypatch, strategy: str, seconds: float = 0.05) -> None:
    inner = condconv._STRATEGY_FNS[strategy]
    monkeypatch.setitem(condconv._STRATEGY_FNS, strategy, lambda *a: time.sleep(seconds) or inner(*a))


def layer3x3(**kwargs) -> CondConv2d:
    torch.manual_seed(0)
    layer = CondConv2d(8, 8, 3, padding=1, num_experts=3, **kwargs)
    with torch.no_grad():
        layer.router.weight.normal_()
    return layer


def test_first_call_of_a_problem_times_later_calls_reuse(timings):
    layer = layer3x3()
    x = torch.randn(4, 8, 6, 6)
    layer(x)
    assert timings and len(tuning_cache()) == 1
    count = len(timings)
    layer(torch.randn(4, 8, 6, 6))
    assert len(timings) == count
    layer(torch.randn(5, 8, 6, 6))  # a new batch size is a new problem
    assert len(timings) > count and len(tuning_cache()) == 2
    with torch.no_grad():  # so is inference
        layer(x)
    assert len(tuning_cache()) == 3
    assert [key[-1] for key in tuning_cache()] == [True, True, False]


def test_a_cached_problem_costs_a_lookup_and_not_the_rules(timings, monkeypatch):
    layer = layer3x3()
    x = torch.randn(4, 8, 6, 6)
    layer(x)

    def no_rules(*args):
        raise AssertionError("the rules ran for a cached problem")

    monkeypatch.setattr(autotune.auto, "choose_strategy", no_rules)
    count = len(timings)
    layer(x)
    assert len(timings) == count and layer.last_strategy == next(iter(tuning_cache().values()))


@pytest.mark.parametrize("slow", ["grouped", "bmm"])
def test_the_fastest_strategy_wins_and_is_recorded(slow, monkeypatch):
    slow_down(monkeypatch, slow)
    layer = layer3x3()
    layer(torch.randn(4, 8, 6, 6))
    assert layer.last_strategy != slow and layer.last_strategy in ("grouped", "mixture", "bmm")
    assert list(tuning_cache().values()) == [layer.last_strategy]


def test_a_timed_sample_repeats_a_short_call_and_reports_the_mean_per_call():
    calls: list[None] = []
    ms = autotune.timed_ms(lambda: calls.append(time.sleep(0.001)), torch.device("cpu"), min_ms=20)
    assert len(calls) >= 2 and ms >= 1.0 and ms * len(calls) >= 20


def test_the_median_sample_decides_not_a_lucky_fastest_one(monkeypatch):
    """A strategy that is steadily slower but has one run much faster than its others
    (as a shared machine gives now and then) must not win over a steady faster one."""
    script = {"steady": [20, 20, 20, 20], "lucky": [24, 24, 24, 5]}  # ms: warm-up, then three rounds
    calls = {name: 0 for name in script}
    ran: list[str] = []

    def run(strategy, x, weight, bias, r):
        ran.append(strategy)
        calls[strategy] += 1
        return x

    def scripted_ms(call, device, min_ms=0.0):  # the scripted time of the sample, not the machine's
        call()
        return script[ran[-1]][calls[ran[-1]] - 1]

    monkeypatch.setattr(autotune, "timed_ms", scripted_ms)

    x, weight, r = torch.randn(2, 4, 5, 5), torch.randn(3, 4, 4, 3, 3), torch.rand(2, 3)
    assert autotune._fastest(["lucky", "steady"], x, weight, None, r, False, run) == "steady"
    assert calls == {"lucky": 4, "steady": 4}


def test_without_tuning_auto_applies_the_rules(timings):
    layer = layer3x3()
    with tuning(False):
        layer(torch.randn(4, 8, 6, 6))
        assert not is_tuning_enabled()
    assert is_tuning_enabled()
    assert not timings and not tuning_cache() and layer.last_strategy == "grouped"


def test_a_forced_strategy_is_never_tuned(timings):
    layer = layer3x3(strategy="mixture")
    layer(torch.randn(4, 8, 6, 6))
    assert not timings and layer.last_strategy == "mixture"


def test_tuning_leaves_rng_autograd_and_module_alone():
    layer = layer3x3()
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(4, 8, 6, 6, requires_grad=True)
    rng = torch.get_rng_state()
    y = layer(x)
    assert torch.equal(torch.get_rng_state(), rng)
    assert tuning_cache()  # it did tune
    assert x.grad is None and all(p.grad is None for p in layer.parameters())
    assert all(torch.equal(v, layer.state_dict()[k]) for k, v in state.items())
    y.sum().backward()
    assert x.grad is not None and layer.weight.grad is not None


def train(tune: bool, strategies: dict[str, str] | None) -> tuple[dict, torch.Tensor, dict[str, str]]:
    """A few seeded SGD steps of a small CondConv model with dropout (which draws from the global RNG)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        CondConv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Dropout(0.3),
        CondConv2d(8, 8, 1),
        nn.ReLU(),
        CondConv2d(8, 8, 3, padding=1, groups=8),
    )
    convs = {name: m for name, m in model.named_modules() if isinstance(m, CondConv2d)}
    for name, strategy in (strategies or {}).items():
        convs[name].strategy = strategy
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with tuning(tune):
        for _ in range(3):
            x = torch.randn(6, 3, 8, 8)
            loss = model(x).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.state_dict(), torch.get_rng_state(), {name: m.last_strategy for name, m in convs.items()}


def test_a_seeded_run_is_bit_identical_with_tuning_on_or_off_given_the_same_strategies():
    tuned_state, tuned_rng, chosen = train(True, None)
    assert tuning_cache()
    clear_tuning_cache()
    rules_state, rules_rng, used = train(False, chosen)
    assert used == chosen
    assert torch.equal(tuned_rng, rules_rng)
    assert all(torch.equal(tuned_state[k], rules_state[k]) for k in tuned_state)


def test_torch_compile_times_nothing_uses_the_cache_and_records_the_strategy(timings):
    torch._dynamo.reset()
    layer = layer3x3()
    x = torch.randn(4, 8, 6, 6)
    key = autotune.problem_key(x, layer.expert_weight(), layer.bias, layer.route(x), (1, 1), (1, 1), (1, 1), 1)
    autotune._store(key, "bmm")  # not what the rules pick (grouped)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), layer(x), rtol=1e-5, atol=1e-5)
    assert layer.last_strategy == "bmm"
    layer.last_strategy = None
    compiled(torch.randn(3, 8, 6, 6))  # a new problem while compiling: the rules, and nothing timed
    assert layer.last_strategy == "grouped" and not timings
    assert len(tuning_cache()) == 1


def test_export_and_jit_trace_time_nothing(timings):
    layer = layer3x3().eval()
    torch.export.export(layer, (torch.randn(4, 8, 6, 6),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.jit.trace(layer, torch.randn(4, 8, 6, 6), check_trace=False)  # the check would run eagerly
    assert not timings and not tuning_cache()


def test_cost_model_leaves_out_clear_losers_and_a_lone_candidate_is_not_timed(timings, monkeypatch):
    seen: list[list[str]] = []
    inner = autotune._fastest
    monkeypatch.setattr(autotune, "_fastest", lambda candidates, *a: seen.append(candidates) or inner(candidates, *a))
    weight, r = torch.randn(4, 16, 16, 1, 1), torch.rand(2, 4)
    trained = weight.clone().requires_grad_()
    condconv2d(torch.randn(2, 16, 64, 64), trained, r)  # dense 1x1 at 4096 positions, training: bmm only
    assert not seen and not timings and list(tuning_cache().values()) == ["bmm"]
    condconv2d(torch.randn(2, 16, 7, 7), trained, r)  # 49 positions: mixture is worth a try, grouped is not
    assert seen == [["bmm", "mixture"]]
    condconv2d(torch.randn(2, 16, 64, 64), weight, r)  # forward only, grouped can win (few input channels)
    assert seen[-1] == ["bmm", "grouped"]
    condconv2d(torch.randn(1, 16, 64, 64), trained, r[:1])  # at B = 1 grouped is a plain conv: timed
    assert seen[-1] == ["grouped", "bmm"]
    assert "fused" not in autotune.CANDIDATES


@pytest.mark.parametrize("batch,size,stride", [(32, 14, 2), (128, 14, 1)])
@pytest.mark.parametrize("experts", [4, 8])
def test_strategies_that_would_run_in_chunks_are_timed(batch, size, stride, experts):
    """ResNet-50 layer4's strided 3x3 at B = 32 and layer3's 3x3 at B = 128 (fp32): their per-sample
    kernels exceed the budget, and whether the chunks or mixture win depends on B and K."""
    channels = 512 if stride == 2 else 256
    x = torch.empty(batch, channels, size, size, device="meta")
    weight = torch.empty(experts, channels, channels, 3, 3, device="meta")
    assert batch * autotune.auto.per_sample_kernel_bytes(x, weight) > autotune.auto.KERNEL_BUDGET_BYTES
    r = torch.empty(batch, experts, device="meta")
    key = autotune.problem_key(x, weight, None, r, (stride, stride), (1, 1), (1, 1), 1)
    assert autotune._worth_timing("grouped", key)
    assert autotune._worth_timing("bmm", key)


@pytest.mark.parametrize(
    "dtype,size,stride,experts,timed",
    [
        (torch.float32, 28, 1, 4, True),  # (K - 1) * S = 2352
        (torch.float32, 56, 1, 4, False),  # 9408: K static convs lose by far in float32
        (torch.float32, 56, 2, 8, False),  # 5488
        (torch.float64, 56, 2, 8, False),
        (torch.bfloat16, 56, 1, 4, True),  # ResNet-50 layer1's 3x3: mixture won at B = 128 in bf16
        (torch.bfloat16, 56, 2, 8, True),  # a strided conv to 28x28 at K = 8: mixture won in bf16
        (torch.float16, 56, 2, 8, True),
        (torch.bfloat16, 56, 1, 8, False),  # 21952: mixture lost by 2.2x or more in bf16 too
        (torch.bfloat16, 112, 1, 4, False),  # 37632
    ],
)
def test_mixture_is_timed_up_to_a_limit_on_extra_positions_that_depends_on_the_dtype(
    dtype, size, stride, experts, timed
):
    x = torch.empty(32, 64, size, size, device="meta", dtype=dtype)
    weight = torch.empty(experts, 64, 64, 3, 3, device="meta", dtype=dtype)
    r = torch.empty(32, experts, device="meta", dtype=dtype)
    key = autotune.problem_key(x, weight, None, r, (stride, stride), (1, 1), (1, 1), 1)
    assert autotune._worth_timing("mixture", key) is timed


@pytest.mark.parametrize(
    "channels,out_channels,kernel,stride,groups,size,timed",
    [
        (3, 64, 7, 2, 1, 224, True),  # ResNet-50's stem: a 900 MiB unfold, and bmm the fastest at B = 128
        (96, 96, 3, 2, 96, 112, True),  # MobileNetV2's strided depthwise 3x3: bmm won in bf16
        (144, 144, 3, 1, 144, 56, False),  # stride-1 depthwise: the unfold is 9 copies for a matrix-vector product
        (240, 240, 5, 1, 240, 28, False),
        (1, 64, 3, 1, 1, 256, True),  # a dense conv on one channel: a true matrix product
        (32, 64, 3, 1, 32, 112, True),  # a depthwise multiplier: not measured, so timed
    ],
)
def test_a_large_unfold_rules_out_bmm_only_for_a_stride_1_depthwise_conv(
    channels, out_channels, kernel, stride, groups, size, timed
):
    x = torch.empty(128, channels, size, size, device="meta")
    weight = torch.empty(4, out_channels, channels // groups, kernel, kernel, device="meta")
    r = torch.empty(128, 4, device="meta")
    padding = (kernel // 2, kernel // 2)
    key = autotune.problem_key(x, weight, None, r, (stride, stride), padding, (1, 1), groups)
    out = (size + 2 * (kernel // 2) - kernel) // stride + 1
    assert 128 * channels * kernel * kernel * out * out * 4 > autotune.auto.KERNEL_BUDGET_BYTES
    assert autotune._worth_timing("bmm", key) is timed
    small = torch.empty(1, channels, size, size, device="meta")  # under the budget bmm is always timed
    key = autotune.problem_key(small, weight, None, r[:1], (stride, stride), padding, (1, 1), groups)
    assert autotune._worth_timing("bmm", key)


def test_cache_round_trips_through_json(tmp_path, timings):
    layer = layer3x3()
    layer(torch.randn(4, 8, 6, 6))
    cache = tuning_cache()
    path = tmp_path / "tuning.json"
    save_tuning_cache(path)
    clear_tuning_cache()
    assert load_tuning_cache(path) == 1 and tuning_cache() == cache
    count = len(timings)
    layer(torch.randn(4, 8, 6, 6))
    assert len(timings) == count  # loaded choices are used without timing


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex64])
def test_every_dtype_a_problem_is_tuned_in_saves_and_loads(tmp_path, dtype):
    condconv2d(
        torch.randn(2, 4, 5, 5, dtype=dtype), torch.randn(2, 4, 4, 3, 3, dtype=dtype), torch.rand(2, 2, dtype=dtype)
    )
    cache = tuning_cache()
    save_tuning_cache(tmp_path / "tuning.json")
    clear_tuning_cache()
    assert load_tuning_cache(tmp_path / "tuning.json") == 1 and tuning_cache() == cache
    assert next(iter(cache))[1] == str(dtype).removeprefix("torch.")


def test_a_complex_kernel_counts_two_floats_per_element():
    from condconv_lightning.functional.auto import per_sample_kernel_bytes

    weight = torch.randn(2, 4, 4, 3, 3, dtype=torch.complex64)
    assert per_sample_kernel_bytes(torch.randn(1, 4, 5, 5, dtype=torch.complex64), weight) == 4 * 4 * 3 * 3 * 8


def saved_entry(tmp_path) -> dict:
    condconv2d(torch.randn(2, 4, 5, 5), torch.randn(2, 4, 4, 3, 3), torch.rand(2, 2))
    save_tuning_cache(tmp_path / "good.json")
    clear_tuning_cache()
    return json.loads((tmp_path / "good.json").read_text())


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda d: d["entries"][0].update(strategy="__import__('os').system('true')"),
        lambda d: d["entries"][0].update(strategy="fused"),
        lambda d: d["entries"][0]["key"].update(batch="2"),
        lambda d: d["entries"][0]["key"].update(groups=True),
        lambda d: d["entries"][0]["key"].update(stride=[1, 1, 1]),
        lambda d: d["entries"][0]["key"].update(dtype="Tensor"),
        lambda d: d["entries"][0]["key"].update(extra=1),
        lambda d: d["entries"][0]["key"].pop("grad"),
        lambda d: d["entries"][0]["key"].update(dtype="_dynamo"),
        lambda d: d["entries"][0]["key"].update(dtype="int64"),
        lambda d: d["entries"][0]["key"].update(device="cuda:0:1"),
        lambda d: d["entries"][0]["key"].update(device="meta"),
        lambda d: d["entries"][0]["key"].update(device="cuda"),
        lambda d: d["entries"][0]["key"].update(memory_format="nhwc"),
        lambda d: d.update(version=2),
        lambda d: d.update(version=True),
        lambda d: d.update(entries={}),
    ],
    ids=[
        "code",
        "fused",
        "str-int",
        "bool-int",
        "triple",
        "not-a-dtype",
        "extra-field",
        "missing-field",
        "torch-attribute",
        "integer-dtype",
        "bad-device",
        "untimed-device",
        "device-without-index",
        "memory-format",
        "version",
        "bool-version",
        "entries-not-a-list",
    ],
)
def test_loading_rejects_anything_but_a_cache(tmp_path, corrupt):
    data = saved_entry(tmp_path)
    corrupt(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="save_tuning_cache") as info:
        load_tuning_cache(path)
    assert "\n" not in str(info.value) and not tuning_cache()


@pytest.mark.parametrize(
    "value,expected",
    [
        ("0", False),
        ("1", True),
        (None, True),
        ("", True),
        ("false", False),
        (" OFF ", False),
        ("no", False),
        ("on", True),
    ],
)
def test_environment_variable_sets_the_default(value, expected):
    out = subprocess.run(**python_with_switch(value), check=True).stdout
    assert out.strip() == str(expected)


NO_SWITCH = "CONDCONV_TUNE='maybe' is not a switch; set it to 0 (off) or 1 (on), or unset it"


def test_an_environment_value_that_is_no_switch_is_refused_where_tuning_is_consulted():
    code = (
        "import torch\n"
        "from condconv_lightning import CondConv2d\n"
        "from condconv_lightning.functional import is_tuning_enabled, set_tuning, tuning\n"
        "try:\n"
        "    CondConv2d(4, 4, 3)(torch.randn(1, 4, 5, 5))\n"
        "except ValueError as error:\n"
        "    print(error)\n"
        "with tuning(False):\n"
        "    print(is_tuning_enabled())\n"
        "try:\n"
        "    is_tuning_enabled()\n"
        "except ValueError as error:\n"
        "    print(error)\n"
        "set_tuning(True)\n"
        "print(is_tuning_enabled())\n"
    )
    run = subprocess.run(**{**python_with_switch("maybe"), "args": [sys.executable, "-c", code]}, check=True)
    assert run.stdout.splitlines() == [NO_SWITCH, "False", NO_SWITCH, "True"]


@pytest.mark.parametrize(
    "command,status",
    [
        (["condconv-convert", "model.pt", "--layers", "layer3"], 1),
        (["condconv-finetune", "fit", "--trainer.max_steps", "1"], 2),
    ],
    ids=["convert", "finetune"],
)
def test_a_command_line_reports_a_value_that_is_no_switch_in_one_line(tmp_path, command, status):
    program = shutil.which(command[0])
    assert program is not None, f"the {command[0]} console script is not installed; run `pip install -e .`"
    run = subprocess.run(
        **{**python_with_switch("maybe"), "args": [program, *command[1:]], "cwd": tmp_path}, timeout=120
    )
    assert (run.returncode, run.stderr) == (status, f"{command[0]}: error: {NO_SWITCH}\n")
    assert not any(tmp_path.iterdir())


def python_with_switch(value: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "CONDCONV_TUNE"}
    if value is not None:
        env["CONDCONV_TUNE"] = value
    code = "from condconv_lightning.functional import is_tuning_enabled; print(is_tuning_enabled())"
    return {"args": [sys.executable, "-c", code], "env": env, "capture_output": True, "text": True}


@pytest.mark.parametrize(
    "text",
    ["[" * 200_000, '{"version": ' + "1" * 5000 + ', "entries": []}', "{not json"],
    ids=["deep-nesting", "huge-integer", "not-json"],
)
def test_loading_malformed_json_is_one_short_line(tmp_path, text):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=r"^cannot read tuning cache .*; save one with save_tuning_cache$") as info:
        load_tuning_cache(path)
    assert "\n" not in str(info.value) and len(str(info.value)) < 300
    assert "set_int_max_str_digits" not in str(info.value)  # Python's advice does not apply to a cache file


def test_loading_names_a_bad_entry_briefly_and_refuses_a_huge_file(tmp_path):
    data = saved_entry(tmp_path)
    data["entries"][0]["strategy"] = "x" * 5_000_000
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"entry 0: strategy 'xxx.*' is not one of grouped, mixture, bmm") as info:
        load_tuning_cache(path)
    assert len(str(info.value)) < 300
    with open(path, "wb") as file:  # sparse: refused by its size, never read whole
        file.truncate(autotune.MAX_CACHE_FILE_BYTES + 1)
    with pytest.raises(ValueError, match=f"larger than {autotune.MAX_CACHE_FILE_BYTES // 2**20} MiB"):
        load_tuning_cache(path)
    assert not tuning_cache()


def test_inside_activation_checkpointing_nothing_is_timed(timings):
    layer = layer3x3()
    x = torch.randn(4, 8, 6, 6, requires_grad=True)
    torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False).sum().backward()
    assert not timings and x.grad is not None and layer.last_strategy == "grouped"


def test_a_candidate_out_of_memory_while_timing_leaves_the_race_to_the_others(monkeypatch):
    inner = condconv._STRATEGY_FNS["mixture"]

    def out_of_memory(*args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setitem(condconv._STRATEGY_FNS, "mixture", out_of_memory)
    layer = layer3x3()
    monkeypatch.setitem(condconv._STRATEGY_FNS, "grouped", lambda *a: time.sleep(0.05) or inner(*a))
    layer(torch.randn(4, 8, 6, 6))  # grouped is slow and mixture does not fit: bmm
    assert layer.last_strategy == "bmm" and list(tuning_cache().values()) == ["bmm"]
    monkeypatch.setitem(condconv._STRATEGY_FNS, "bmm", out_of_memory)
    monkeypatch.setitem(condconv._STRATEGY_FNS, "grouped", out_of_memory)
    clear_tuning_cache()
    with pytest.raises(torch.cuda.OutOfMemoryError):  # nothing fits: the rules' choice runs, and fails
        layer(torch.randn(4, 8, 6, 6))
    assert list(tuning_cache().values()) == ["grouped"]


def test_out_of_memory_while_timing_falls_back_to_the_rules(monkeypatch):
    def out_of_memory(*args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(autotune, "_fastest", out_of_memory)
    layer = layer3x3()
    layer(torch.randn(4, 8, 6, 6))
    assert layer.last_strategy == "grouped" and list(tuning_cache().values()) == ["grouped"]


def test_torch_func_transforms_run_with_tuning_on_and_time_nothing(timings):
    layer = layer3x3()
    params = {name: p.detach() for name, p in layer.named_parameters()}
    x = torch.randn(4, 8, 6, 6)

    def loss(p, x):
        return torch.func.functional_call(layer, p, (x,)).square().sum()

    per_sample = torch.func.vmap(torch.func.grad(lambda p, xi: loss(p, xi[None])), in_dims=(None, 0))(params, x)
    whole = torch.func.grad(loss)(params, x)
    torch.func.jvp(layer, (x,), (torch.randn_like(x),))
    assert not timings and not tuning_cache()
    for name, p in layer.named_parameters():  # against plain autograd, one sample at a time
        for i in range(len(x)):
            (gradient,) = torch.autograd.grad(layer(x[i : i + 1]).square().sum(), p)
            scale = float(gradient.abs().max())  # other conv kernels, other rounding: judged against its size
            torch.testing.assert_close(per_sample[name][i], gradient, rtol=1e-5, atol=1e-5 * scale)
        (gradient,) = torch.autograd.grad(layer(x).square().sum(), p)
        torch.testing.assert_close(whole[name], gradient, rtol=1e-5, atol=1e-5 * float(gradient.abs().max()))


def test_dynamic_torch_compile_keeps_one_graph_over_batch_sizes_and_uses_a_cached_size(timings):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    layer = layer3x3()
    compiled = torch.compile(layer, dynamic=True, backend="eager")
    for batch in range(2, 8):
        y = compiled(x := torch.randn(batch, 8, 6, 6))
        with tuning(False):  # eager tuning would fill the cache the compiled graph guards on
            torch.testing.assert_close(y, layer(x), rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1  # an empty cache guards no size
    assert not timings and not tuning_cache() and layer.last_strategy == "grouped"
    x = torch.randn(4, 8, 6, 6)
    key = autotune.problem_key(x, layer.expert_weight(), layer.bias, layer.route(x), (1, 1), (1, 1), (1, 1), 1)
    autotune._store(key, "bmm")
    for batch, strategy in ((4, "bmm"), (5, "grouped"), (4, "bmm")):
        compiled(torch.randn(batch, 8, 6, 6))
        assert layer.last_strategy == strategy
    graphs = counters["stats"]["unique_graphs"]
    other = autotune.problem_key(x, layer.expert_weight(), layer.bias, layer.route(x), (2, 2), (1, 1), (1, 1), 1)
    autotune._store(other, "mixture")  # another layer's problem: no guard of this graph looks at it
    compiled(torch.randn(4, 8, 6, 6))
    assert counters["stats"]["unique_graphs"] == graphs and not timings


def test_inference_mode_is_a_forward_only_problem_even_with_grad_enabled(timings):
    # Lightning's predict and validation steps run under inference mode; a step may turn grad mode on.
    layer, x = layer3x3(), torch.randn(4, 8, 6, 6)
    with torch.inference_mode(), torch.enable_grad():
        y = layer(x)
    assert timings and [key[-1] for key in tuning_cache()] == [False]
    with torch.no_grad():
        assert torch.equal(y, layer3x3(strategy=layer.last_strategy)(x))


@pytest.mark.parametrize("tracing_mode", ["symbolic", "fake"])
def test_make_fx_traces_with_the_rules_and_times_nothing(timings, tracing_mode):
    from torch.fx.experimental.proxy_tensor import make_fx

    weight, r, x = torch.randn(3, 8, 8, 3, 3), torch.rand(4, 3), torch.randn(4, 8, 6, 6)
    graph = make_fx(lambda *a: condconv2d(*a, padding=1), tracing_mode=tracing_mode)(x, weight, r)
    assert not timings and not tuning_cache()
    with tuning(False):
        torch.testing.assert_close(graph(x, weight, r), condconv2d(x, weight, r, padding=1))


def test_a_reentrant_checkpoint_recomputes_with_the_strategy_its_forward_ran(timings, monkeypatch):
    slow_down(monkeypatch, "grouped")  # the rules' choice loses the forward-only timing
    layer = layer3x3()
    x = torch.randn(4, 8, 6, 6, requires_grad=True)
    y = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=True)
    forward, count = layer.last_strategy, len(timings)
    assert forward != "grouped" and [key[-1] for key in tuning_cache()] == [False]
    y.backward(g := torch.randn_like(y))
    assert layer.last_strategy == forward and len(timings) == count  # nothing timed in the backward
    reference = layer3x3(strategy=forward)
    x2 = x.detach().clone().requires_grad_(True)
    reference(x2).backward(g)
    assert torch.equal(x.grad, x2.grad) and torch.equal(layer.weight.grad, reference.weight.grad)


def test_two_threads_meeting_a_new_problem_time_it_once(monkeypatch):
    import threading

    calls: list[list[str]] = []
    inner = autotune._fastest

    def slow_fastest(candidates, *args):
        calls.append(candidates)
        time.sleep(0.2)  # the other thread arrives while this one times
        return inner(candidates, *args)

    monkeypatch.setattr(autotune, "_fastest", slow_fastest)
    weight, r, x = torch.randn(3, 8, 8, 3, 3), torch.rand(4, 3), torch.randn(4, 8, 6, 6)
    results: list[torch.Tensor] = []
    threads = [threading.Thread(target=lambda: results.append(condconv2d(x, weight, r, padding=1))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and len(tuning_cache()) == 1 and torch.equal(results[0], results[1])


def test_the_key_tells_memory_layouts_and_autocast_dtypes_apart():
    weight, r = torch.randn(3, 8, 8, 3, 3), torch.rand(4, 3)

    def key(x):
        return autotune.problem_key(x, weight, None, r, (1, 1), (1, 1), (1, 1), 1)

    x = torch.randn(4, 8, 6, 6)
    assert key(x)[:3] == ("cpu", "float32", "contiguous")
    assert key(x.contiguous(memory_format=torch.channels_last))[2] == "channels_last"
    assert key(x.transpose(2, 3))[2] == "strided"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert key(x)[1] == "bfloat16"
        assert key(x.double())[1] == "float64"  # autocast leaves float64 alone
        assert condconv2d(x.double(), weight.double(), r.double(), padding=1).dtype == torch.float64


def test_a_cache_loads_onto_another_device_as_map_location_does(tmp_path):
    data = saved_entry(tmp_path)
    on_gpu = json.loads(json.dumps(data["entries"][0]))
    on_gpu["key"]["device"] = "cuda:0"
    data["entries"].append(on_gpu)
    (tmp_path / "good.json").write_text(json.dumps(data))
    assert load_tuning_cache(tmp_path / "good.json", device="cuda:1") == 2
    assert sorted(key[0] for key in tuning_cache()) == ["cpu", "cuda:1"]  # CPU entries stay CPU entries
    clear_tuning_cache()
    for device in ("meta", "cuda"):  # keys hold a CUDA device with its index
        with pytest.raises(ValueError, match="device must be 'cpu' or a CUDA device with its index"):
            load_tuning_cache(tmp_path / "good.json", device=device)
    assert not tuning_cache()


def test_a_checkpointed_forward_and_its_recompute_run_one_strategy_while_another_layer_tunes(timings, monkeypatch):
    slow_down(monkeypatch, "grouped")  # timed, the rules' choice loses
    first, second = layer3x3(), layer3x3()
    x = torch.randn(4, 8, 6, 6, requires_grad=True)
    hidden = torch.utils.checkpoint.checkpoint(first, x, use_reentrant=False)
    assert first.last_strategy == "grouped" and not timings and not tuning_cache()  # the rules, not a measurement
    second(hidden).sum().backward()  # the same problem outside the checkpoint is tuned, before the recompute
    assert timings and second.last_strategy != "grouped" and list(tuning_cache().values()) == [second.last_strategy]
    assert first.last_strategy == "grouped" and x.grad is not None  # the recompute ran what the forward ran
    hidden = torch.utils.checkpoint.checkpoint(first, x, use_reentrant=False)  # inside hooks the choice stays
    assert first.last_strategy == "grouped"


def test_offloading_hooks_neither_time_nor_save_a_choice(timings):
    layer = layer3x3()
    with torch.autograd.graph.save_on_cpu():
        layer(torch.randn(4, 8, 6, 6, requires_grad=True)).sum().backward()
    assert not timings and not tuning_cache()
    meta = CondConv2d(8, 8, 3, padding=1, num_experts=3, device="meta")
    torch.utils.checkpoint.checkpoint(meta, torch.randn(4, 8, 6, 6, device="meta"), use_reentrant=False)
    assert not tuning_cache() and all(key[0] != "meta" for key in autotune._pinned)  # only timeable devices


@pytest.mark.parametrize("strategy", ["auto", "grouped", "mixture", "bmm"])
def test_a_call_asks_once_whether_it_is_exported(monkeypatch, strategy):
    """The export check costs more than the cached tuner's key and lookup together, so a call makes it once
    (tuned ``auto`` from the cache, every fixed strategy, chunked ones included)."""
    layer = CondConv2d(8, 8, 3, padding=1, num_experts=4, strategy=strategy)
    x = torch.randn(3, 8, 6, 6)
    layer(x)  # tunes auto's problem
    checks = []
    real = condconv.is_exporting

    def counted() -> bool:
        checks.append(True)
        return real()

    monkeypatch.setattr(condconv, "is_exporting", counted)
    monkeypatch.setattr(condconv.auto, "is_exporting", counted)
    monkeypatch.setattr(condconv.auto, "KERNEL_BUDGET_BYTES", 1)  # grouped and bmm in chunks of one sample
    expected = condconv2d(x, layer.expert_weight(), layer.route(x), layer.bias, padding=1, strategy="mixture")
    checks.clear()
    torch.testing.assert_close(layer(x), expected)
    assert len(checks) == 1 and layer.last_strategy in ("grouped", "mixture", "bmm")
