"""Measured ``auto`` within bounds: what tuning may run, what a tuning cache may hold, what reading one costs.

Nothing here times a strategy: which candidates are timed is read from the tuner's own decisions
(``_fastest`` replaced by a recorder), memory from allocations, a resource limit or peak RSS.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch
from peak_memory import PRELUDE
from torch.profiler import ProfilerActivity, profile

import condconv_lightning.functional.autotune as autotune
import condconv_lightning.functional.condconv as condconv
from condconv_lightning.callbacks import TuningCache
from condconv_lightning.functional import (
    clear_tuning_cache,
    condconv2d,
    condconv2d_with_strategy,
    load_tuning_cache,
    save_tuning_cache,
    tuning_cache,
)
from condconv_lightning.functional.auto import choose_strategy

pytestmark = pytest.mark.usefixtures("fresh_tuning")  # tuning on, an empty cache, the process left as found


@pytest.fixture
def timed(monkeypatch) -> list[list[str]]:
    """The candidates of every problem the tuner times; the first of them wins, nothing is run."""
    raced: list[list[str]] = []

    def first(candidates, *args):
        raced.append(list(candidates))
        return candidates[0]

    monkeypatch.setattr(autotune, "_fastest", first)
    return raced


def problem(
    batch, cin, cout, size, k, stride=1, groups=1, experts=4, dtype="float32", grad=False, memory_format="contiguous"
) -> tuple:
    """A problem key as the tuner makes it (CPU, 'same' padding, no bias)."""
    pad, pair = k // 2, (lambda v: (v, v))
    return ("cpu", dtype, memory_format, batch, cin, cout, size, size, pair(k), pair(stride), pair(pad), (1, 1), groups,
            experts, False, grad)  # fmt: skip


def entry(key: tuple, strategy: str) -> dict:
    return {"key": dict(zip((name for name, _ in autotune._KEY_FIELDS), autotune._jsonable(key))), "strategy": strategy}


def write_cache(path, entries: list[dict]) -> None:
    path.write_text(json.dumps({"version": 1, "entries": entries}, indent=1))


# Memory: tuning never runs a candidate that needs far more than the rules' choice (host memory cannot
# be caught running out).

MEMORY_CASES = [  # problem, the candidates timed (nothing is timed where one is left)
    ("r50.layer1 3x3, B 32: unfold 9x the input", problem(32, 64, 64, 56, 3), ["grouped"]),
    ("the same in training", problem(32, 64, 64, 56, 3, grad=True), ["grouped"]),
    ("dw5x5, stride 1, under the unfold budget", problem(8, 240, 240, 28, 5, groups=240), ["grouped"]),
    ("dw5x5 at 32x32: mixture's K outputs fit", problem(8, 64, 64, 32, 5, groups=64), ["grouped", "mixture"]),
    ("mbv2 strided dw3x3, B 128, bf16", problem(128, 96, 96, 112, 3, 2, 96, dtype="bfloat16"), ["grouped", "mixture"]),
    ("r50 stem, B 128: unfold within twice", problem(128, 3, 64, 224, 7, 2), ["grouped", "bmm"]),
    ("r50 stem, B 128, bf16 under autocast", problem(128, 3, 64, 224, 7, 2, dtype="bfloat16"), ["grouped"]),
    ("r50.layer3 strided 3x3: all fit", problem(32, 256, 256, 28, 3, 2), ["grouped", "mixture", "bmm"]),
    ("r50.layer4 3x3 at 7x7: kernels 4x the rules'", problem(32, 512, 512, 7, 3), ["mixture"]),
    ("dense 1x1 forward: bmm, grouped fits", problem(32, 256, 64, 56, 1), ["bmm", "grouped"]),
    ("a tiny conv: all within the slack", problem(2, 8, 8, 6, 3, experts=3), ["grouped", "mixture", "bmm"]),
]


@pytest.mark.parametrize("key,expected", [c[1:] for c in MEMORY_CASES], ids=[c[0] for c in MEMORY_CASES])
def test_candidates_whose_memory_exceeds_twice_the_rules_choice_are_never_run(key, expected):
    rules = autotune._rules_for(key)
    assert autotune._candidates(key, rules) == expected
    needs = autotune.footprint_bytes(rules, key)
    bound = max(autotune.MEMORY_MARGIN * needs, needs + autotune.MEMORY_SLACK_BYTES)
    assert all(autotune.footprint_bytes(s, key) <= bound for s in expected)


def test_a_call_times_only_the_candidates_that_fit(timed):
    x, weight, r = torch.randn(8, 64, 32, 32), torch.randn(4, 64, 1, 5, 5), torch.rand(8, 4)
    _, strategy = condconv2d_with_strategy(x, weight, r, padding=2, groups=64)  # dw5x5: bmm's unfold is 25x
    assert timed == [["grouped", "mixture"]] and strategy == "grouped"
    _, strategy = condconv2d_with_strategy(torch.randn(8, 64, 56, 56), torch.randn(4, 64, 64, 3, 3), r, padding=1)
    assert timed == [["grouped", "mixture"]] and strategy == "grouped"  # one candidate left: not timed at all


def test_the_rules_read_from_a_key_are_the_rules_of_the_call():
    for batch, cin, cout, k, groups, size, channels_last in [
        (1, 64, 64, 3, 1, 56, False),
        (32, 512, 512, 3, 1, 7, False),
        (32, 64, 64, 3, 1, 56, True),
        (32, 256, 64, 1, 1, 56, True),
        (32, 144, 144, 3, 144, 56, False),
        (32, 1, 8, 3, 1, 16, True),
    ]:
        x = torch.empty(batch, cin, size, size, device="meta")
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        weight, r = torch.empty(4, cout, cin // groups, k, k, device="meta"), torch.empty(batch, 4, device="meta")
        conv = (1, 1), (k // 2, k // 2), (1, 1), groups
        key = autotune.problem_key(x, weight, None, r, *conv)
        assert autotune._rules_for(key) == choose_strategy(x, weight, *conv)


def test_timing_runs_on_the_calls_own_tensors_and_copies_none(monkeypatch):
    x, weight, r = torch.randn(4, 8, 6, 6, requires_grad=True), torch.randn(3, 8, 8, 3, 3), torch.rand(4, 3)
    seen = []
    inner = autotune._fastest

    def spy(candidates, x_, weight_, bias_, r_, grad, run):
        def recorded(strategy, *tensors):
            seen.append([t.data_ptr() for t in tensors if t is not None])
            return run(strategy, *tensors)

        return inner(candidates, x_, weight_, bias_, r_, grad, recorded)

    monkeypatch.setattr(autotune, "_fastest", spy)
    condconv2d(x, weight, r, padding=1).sum().backward()
    assert seen and all(ptrs == [x.data_ptr(), weight.data_ptr(), r.data_ptr()] for ptrs in seen)
    assert x.grad is not None and torch.equal(x.grad, autograd_grad(x, weight, r))  # the timing left no gradient


def autograd_grad(x, weight, r) -> torch.Tensor:
    leaf = x.detach().requires_grad_()
    condconv2d(leaf, weight, r, padding=1, strategy=autotune.tuning_cache().popitem()[1]).sum().backward()
    return leaf.grad


def allocated_peak(fn) -> int:
    """Peak bytes allocated while ``fn`` runs, above what was allocated before (CPU)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    events = (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bfloat16-autocast"])
@pytest.mark.parametrize("k", [1, 3])
def test_the_estimate_of_bmm_follows_what_it_allocates(k, autocast):
    """``bmm`` runs no convolution, so its allocations are torch's own: its unfold buffer (in float32
    under autocast, then copied), per-sample kernels and output, as the estimate counts them."""
    torch.manual_seed(0)
    x, weight, r = torch.randn(8, 32, 40, 40), torch.randn(4, 48, 32, k, k), torch.rand(8, 4)
    dtype = torch.bfloat16 if autocast else torch.float32

    def call():
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=autocast):
            condconv2d(x, weight, r, padding=k // 2, strategy="bmm")

    call()
    inputs = sum(t.numel() * t.element_size() for t in (x, weight, r))
    with torch.autocast("cpu", dtype=dtype, enabled=autocast):
        key = autotune.problem_key(x, weight, None, r, (1, 1), (k // 2, k // 2), (1, 1), 1)
    estimate = autotune.footprint_bytes("bmm", key) - inputs
    ratio = allocated_peak(call) / estimate
    if autocast:  # oneDNN adds a reorder buffer for bf16 matmuls on CPUs without native bf16 (1.29x measured)
        assert 0.9 <= ratio <= 1.5
    else:
        assert 0.9 <= ratio <= 1.1


def test_the_estimate_counts_per_sample_kernels_chunk_by_chunk(monkeypatch):
    """As ``condconv.py`` runs them: beyond the budget, one chunk of kernels at a time."""
    key = problem(32, 512, 512, 14, 3, 2)  # r50.layer4's strided 3x3: 302 MiB of kernels in fp32
    whole = autotune.footprint_bytes("grouped", key)
    monkeypatch.setattr(condconv.auto, "KERNEL_BUDGET_BYTES", 2**20)
    assert autotune.footprint_bytes("grouped", key) < whole / 3


LIMITED = """
import resource, sys, torch
from condconv_lightning.functional import condconv2d_with_strategy, tuning
torch.set_num_threads(1)
x, weight, r = torch.randn(8, 32, 128, 128), torch.randn(4, 32, 32, 3, 3), torch.rand(8, 4)
def call(tune):
    with torch.no_grad(), tuning(tune):
        return condconv2d_with_strategy(x, weight, r, padding=1)[1]
call(False), call(False)  # one-time setup (oneDNN primitives, allocator pools) before the limit
size = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmSize:")) * 1024
resource.setrlimit(resource.RLIMIT_AS, (size + 80 * 2**20, resource.getrlimit(resource.RLIMIT_AS)[1]))
print(call(False), call(True))
"""


def test_a_forward_that_fits_with_tuning_off_fits_with_tuning_on():
    """A 3x3 conv on 16 MiB of input under an address-space limit 80 MiB above the process's: the rules'
    ``grouped`` needs about 33 MiB more, ``bmm``'s unfold buffer alone 144 MiB, which no tuning may try."""
    env = {**os.environ, "MALLOC_ARENA_MAX": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", LIMITED], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["grouped", "grouped"]


# A cache entry is checked by the tuner's own bounds.


def test_a_cache_entry_the_tuner_would_not_choose_is_ignored_with_one_warning(tmp_path, timed):
    depthwise = problem(8, 64, 64, 32, 5, groups=64)
    pointwise = problem(32, 256, 64, 56, 1, grad=True)  # training: bmm leaves grouped out by a wide margin
    fine = problem(4, 8, 8, 6, 3, experts=3)
    path = tmp_path / "tuning.json"
    write_cache(path, [entry(depthwise, "bmm"), entry(pointwise, "grouped"), entry(fine, "bmm")])
    with pytest.warns(UserWarning, match=rf"^{re.escape(str(path))}: ignored 2 tuning cache entries whose") as record:
        assert load_tuning_cache(path) == 1
    assert len(record) == 1 and tuning_cache() == {fine: "bmm"}
    x, weight, r = torch.randn(8, 64, 32, 32), torch.randn(4, 64, 1, 5, 5), torch.rand(8, 4)
    _, strategy = condconv2d_with_strategy(x, weight, r, padding=2, groups=64)
    assert timed == [["grouped", "mixture"]] and strategy == "grouped"  # tuned again, within the bounds


def test_every_choice_the_tuner_can_make_loads_back_without_a_warning(tmp_path, recwarn):
    """The file is checked by the tuner's own decision, so whatever it stores, the loader accepts."""
    keys = [c[1] for c in MEMORY_CASES]
    for key in keys:
        rules = autotune._rules_for(key)
        for strategy in {rules, *autotune._candidates(key, rules)}:
            clear_tuning_cache()
            autotune._store(key, strategy)
            save_tuning_cache(tmp_path / "tuning.json")
            clear_tuning_cache()
            assert load_tuning_cache(tmp_path / "tuning.json") == 1 and tuning_cache() == {key: strategy}
    assert not recwarn.list


def test_a_cache_for_other_devices_is_checked_the_same_and_kept_as_it_is(tmp_path):
    depthwise = problem(8, 64, 64, 32, 5, groups=64)
    on_gpu = ("cuda:3", *depthwise[1:])
    single = (*on_gpu[:3], 1, *on_gpu[4:])  # at B = 1 grouped is the rules' choice
    write_cache(tmp_path / "tuning.json", [entry(on_gpu, "bmm"), entry(single, "grouped")])
    with pytest.warns(UserWarning, match="ignored 1 tuning cache entry whose"):
        assert load_tuning_cache(tmp_path / "tuning.json") == 1
    assert list(tuning_cache()) == [single]  # not this machine's device: kept, never used


# Only a regular file is read.


@contextmanager
def at_most(seconds: int) -> Iterator[None]:
    """Fail, instead of hanging, if the block takes longer (a read of a FIFO without a writer blocks)."""

    def expired(signum, frame):
        raise TimeoutError(f"blocked for {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize(
    "make,kind",
    [
        (lambda p: os.mkfifo(p), "a FIFO"),
        (lambda p: p.mkdir(), "a directory"),
        (lambda p: p.symlink_to("/dev/null"), "a character device"),
        (lambda p: (os.mkfifo(p.with_suffix(".fifo")), p.symlink_to(p.with_suffix(".fifo"))), "a FIFO"),
    ],
    ids=["fifo", "directory", "device", "link-to-fifo"],
)
def test_only_a_regular_file_is_read_as_a_tuning_cache(tmp_path, make, kind):
    path = tmp_path / "tuning.json"
    make(path)
    with (
        at_most(10),
        pytest.raises(ValueError, match=rf"^cannot read tuning cache {re.escape(str(path))}: {kind}, not"),
    ):
        load_tuning_cache(path)
    trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cpu")))
    callback = TuningCache(path)
    with at_most(10), pytest.raises(ValueError, match=f"{kind}, not a regular file"):
        callback.setup(trainer, None, "fit")  # type: ignore[arg-type]


# Reading a file costs a small multiple of the size limit, which is what a cache needs.

PEAK = (
    PRELUDE
    + """
import sys
from condconv_lightning.functional import load_tuning_cache
load_tuning_cache(sys.argv[2])  # a small cache: every import and first use before the baseline
reset_peak()
try:
    print("loaded", load_tuning_cache(sys.argv[1]))
except ValueError as error:
    print("refused", error)
print(peak_growth())
"""
)
"""Peak RSS of a load over the RSS before it, in a process of its own (:mod:`peak_memory`)."""


def the_largest_cache(path) -> None:
    """:data:`MAX_CACHE_ENTRIES` entries of the largest sizes a key holds, all of them loadable."""
    big = 10**18 - 1
    sizes = (big, big, big, big, (big, big), (big, big), (big, big), (1, 1), big, big, False, False)
    entries = [
        entry(("cuda:127", "complex128", "channels_last", i + 1, *sizes), "grouped")
        for i in range(autotune.MAX_CACHE_ENTRIES)
    ]
    write_cache(path, entries)


def sparse(path, size: int) -> None:
    with open(path, "wb") as file:
        file.truncate(size)


CONTENTS = [  # what the file holds, whether it loads
    ("60 MiB, over the size limit", lambda p: sparse(p, 60 * 2**20), False),
    ("empty arrays up to the limit", lambda p: p.write_bytes(b"[" + b"[]," * 2_700_000 + b"[]]"), False),
    ("numbers up to the limit", lambda p: p.write_bytes(b"[" + b"1.5," * 2_000_000 + b"0]"), False),
    ("strings up to both bounds", lambda p: p.write_bytes(b"[" + (b'"' + b"x" * 38 + b'",') * 200_000 + b"0]"), False),
    ("the largest cache", the_largest_cache, True),
]


@pytest.mark.parametrize("make,loads", [c[1:] for c in CONTENTS], ids=[c[0] for c in CONTENTS])
def test_reading_a_cache_file_holds_a_small_multiple_of_the_size_limit(tmp_path, make, loads):
    path, small = tmp_path / "tuning.json", tmp_path / "small.json"
    make(path)
    write_cache(small, [entry(problem(4, 8, 8, 6, 3, experts=3), "grouped")])
    run = subprocess.run([sys.executable, "-c", PEAK, str(path), str(small)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    outcome, grown = run.stdout.splitlines()
    assert outcome.startswith("loaded" if loads else "refused")
    # 27 MiB measured at most (glibc and pymalloc arenas, huge pages): a small multiple of the 8 MiB limit,
    # where the 64 MiB limit before took 1.5 GiB
    assert int(grown) <= 8 * autotune.MAX_CACHE_FILE_BYTES


def test_the_size_limit_is_what_the_largest_cache_needs(tmp_path):
    the_largest_cache(tmp_path / "tuning.json")
    size = (tmp_path / "tuning.json").stat().st_size
    assert size <= autotune.MAX_CACHE_FILE_BYTES < 1.25 * size
    assert load_tuning_cache(tmp_path / "tuning.json") == autotune.MAX_CACHE_ENTRIES
    save_tuning_cache(tmp_path / "again.json")
    assert (tmp_path / "again.json").read_bytes() == (tmp_path / "tuning.json").read_bytes()


def test_saving_more_choices_than_a_cache_holds_keeps_the_latest_with_a_warning(tmp_path):
    keys = [problem(batch, 8, 8, 6, 3) for batch in range(1, autotune.MAX_CACHE_ENTRIES + 3)]
    for key in keys:
        autotune._store(key, "grouped")
    with pytest.warns(UserWarning, match=rf"saved the latest {autotune.MAX_CACHE_ENTRIES} of {len(keys)} tuned"):
        save_tuning_cache(tmp_path / "tuning.json")
    clear_tuning_cache()
    assert load_tuning_cache(tmp_path / "tuning.json") == autotune.MAX_CACHE_ENTRIES
    assert list(tuning_cache()) == keys[2:]


# Other contents a cache file may have.


def malformed(tmp_path, change) -> str:
    """The message of loading a one-entry cache after ``change`` (a function of the file's text)."""
    path = tmp_path / "tuning.json"
    write_cache(path, [entry(problem(4, 8, 8, 6, 3, experts=3), "grouped")])
    path.write_bytes(change(path.read_text()).encode("utf-8"))
    with pytest.raises(ValueError) as info:
        load_tuning_cache(path)
    assert not tuning_cache() and "\n" not in str(info.value)
    return str(info.value)


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda t: t.replace('"strategy": "grouped"', '"strategy": "bmm", "strategy": "grouped"'), "'strategy' given"),
        (lambda t: t.replace('"groups": 1', '"groups": 1, "groups": 2'), "field 'groups' given twice"),
        (lambda t: t.replace('"cpu"', '"cpu\u00a0"'), "not ASCII text"),
        (lambda t: t.replace('"groups": 1', '"groups": 0'), "must be positive"),
        (lambda t: t.replace('"batch": 4', '"batch": 0'), "must be positive"),
        (lambda t: t.replace('"stride": [\n     1,', '"stride": [\n     0,'), "must be positive"),
        (lambda t: t.replace('"groups": 1', '"groups": 3'), "multiples of groups"),
        (lambda t: t.replace('"dilation": [\n     1,', '"dilation": [\n     5,'), "kernel is larger than the padded"),
        (lambda t: t.replace('"batch": 4', '"batch": ' + "9" * 19), "an integer of 19 digits"),
        (lambda t: t.replace("[\n  {", "[" + "[" * 50_000 + "]" * 50_000 + ",\n  {"), "nested too deeply"),
        (lambda t: t.replace("[\n  {", "[" + "[" * 100_000 + "]" * 100_000 + ",\n  {"), "more JSON values"),
        (lambda t: t.replace("[\n  {", "[" + "0," * 300_000 + "\n  {"), "more JSON values"),
    ],
    ids=[
        "duplicate-strategy",
        "duplicate-field",
        "not-ascii",
        "zero-groups",
        "zero-batch",
        "zero-stride",
        "groups-not-dividing",
        "kernel-larger-than-input",
        "19-digit-size",
        "deep-nesting",
        "more-nesting-than-entries-hold",
        "many-values",
    ],
)
def test_a_cache_no_call_could_have_made_is_refused_in_one_line(tmp_path, change, message):
    assert message in malformed(tmp_path, change)


def test_too_many_entries_are_refused_before_any_is_used(tmp_path):
    one = entry(problem(4, 8, 8, 6, 3, experts=3), "grouped")
    path = tmp_path / "tuning.json"
    path.write_text(json.dumps({"version": 1, "entries": [one] * (autotune.MAX_CACHE_ENTRIES + 1)}))
    with pytest.raises(ValueError, match=f"more JSON values than {autotune.MAX_CACHE_ENTRIES} entries hold"):
        load_tuning_cache(path)
    assert not tuning_cache()


def test_the_largest_sizes_a_key_holds_load_in_bounded_time(tmp_path):
    big = 10**18 - 1
    key = ("cpu", "float32", "contiguous", big, big, big, big, big, (3, 3), (1, 1), (1, 1), (1, 1), 1, big, True, True)
    write_cache(tmp_path / "tuning.json", [entry(key, s) for s in ("grouped",)])
    with at_most(10):
        assert load_tuning_cache(tmp_path / "tuning.json") == 1  # the rules' choice: always plausible
