"""Measured ``auto``: time the strategies once per problem, then reuse the fastest.

In the manner of ``torch.backends.cudnn.benchmark`` and Triton's autotune: the first
call with a new problem key (device, compute dtype, memory format, every size of the
call, K, bias, whether gradients are needed) times each candidate strategy on the
call's own tensors and caches the fastest; later calls with the same key
use the cached choice. The rules of :mod:`.auto` remain the fallback: with tuning off
(which ignores the cache too), and while tracing (``torch.compile``, ``torch.export``,
ONNX, ``torch.jit.trace``, a dispatch mode such as FakeTensor), under ``torch.func``
transforms, inside activation checkpointing (saved-tensor hooks) or a backward pass,
and on devices other than CPU and CUDA, where nothing is timed and a cached choice is
used if there is one (export and tracing: never, since their batch size may be
symbolic). A problem first met inside saved-tensor hooks keeps the rules' choice inside
such hooks for the rest of the process (kept apart from the cache, never saved), so that
a checkpoint's recompute in the backward runs what its forward ran.

What is timed: forward+backward when the call needs gradients, forward only
otherwise; on CUDA between events after a synchronize, on CPU by the wall clock. A
timed sample repeats the call for at least :data:`MIN_SAMPLE_MS` (one call of a small
problem is noise). Each candidate is sampled once to warm up (a candidate
``2 * DROP_FACTOR`` times slower than the fastest warm-up is dropped), then up to
:data:`TIMED_RUNS` interleaved rounds sample the candidates still in the race; after
each round a candidate whose median sample is more than :data:`DROP_FACTOR` times the
best median is dropped, and a lone survivor wins at once. The lowest median wins; ties
go to the rules' choice. A median, not the fastest sample: on a shared machine one run
in several can be a third faster than the rest of the same code, and the fastest
sample follows such outliers (in a suite run on 2 CPU cores, choosing by the median of
three runs was never worse than by the fastest; docs/performance.md). The call's tensors
are timed detached (as leaves that need gradients where the call's do): tuning copies
nothing, so a timed call holds what the candidate's own call holds and no more, draws no
random numbers, and leaves the module and the caller's autograd graph and gradients
untouched. A candidate whose buffers do not fit in CUDA memory is out of the race; if
none fits, the rules decide that problem.

Candidates: ``grouped``, ``mixture`` and ``bmm``; opt-in strategies (``fused``) are
never timed. Before anything is timed, two bounds leave candidates out. Memory: a
candidate whose estimated peak (:func:`footprint_bytes`, from the problem key alone) is
more than :data:`MEMORY_MARGIN` times the rules' choice's is never run, however fast it
might be: tuning needs at most about twice what the call it tunes needs with tuning off,
never the many-fold of an ``unfold`` buffer or of K outputs (host memory cannot be caught
running out; the kernel ends the process). Speed: the cost model rules out candidates
that lose by a wide margin, the rules' choice included (the rules know nothing of what
timing costs). The rules' choice, if left, is timed first; a problem left with one
candidate is not timed at all (with none, the rules decide). A tuning cache entry
(:func:`load_tuning_cache`) is checked by the same two bounds: a strategy they leave out
for its problem (other than the rules' choice) is ignored. The cost model's exclusions:

- ``mixture`` when ``(K - 1) * S`` exceeds :data:`MIXTURE_MAX_EXTRA_POSITIONS`
  (S = output positions; 4096 in float32, 12288 in bfloat16 and float16): its K convs
  then cost far more than per-sample kernels, whose cost relative to the conv falls as
  1/S (in the suite run of docs/performance.md, 2026-11-28/29 on 2 CPU cores: ResNet-50
  layer1's 3x3 at S = 3136, fp32, B = 32, K = 4: mixture 4.45x the static conv, grouped
  1.18x). Below it mixture can win, also on CPU, but not always: in the suite run (bf16,
  B = 32, K = 4) EfficientNet-B0's strided depthwise 5x5 (S = 784) ran 0.70x the static
  conv under mixture against grouped's 1.02x, while ResNet-50 layer3's strided 3x3
  (S = 196) ran 4.14x under mixture against grouped's 2.78x; so below it mixture is
  timed. Over that whole run (B 1/32/128, K 4/8), mixture came within 1.9x of the
  fastest nowhere beyond 4096 in fp32, while in bf16 it won at 5488 (that strided
  depthwise 5x5 at K = 8, 1.27-1.56x faster than the tuner's choice under the float32
  limit) and, in a first measurement, at 9408 (ResNet-50 layer1's 3x3 at B = 128,
  K = 4, 1.38x; measured again, grouped was 1.19x faster there), and stayed 1.64x or
  more off beyond 12288;
- ``grouped`` on dense 1x1 convs with B > 1 when the call needs gradients: ``bmm`` does
  the same products as one batched matrix product (faster in training on all 424 dense
  1x1 problems with B > 1 in a suite run on 2 CPU cores). Forward only it is no such
  margin, and ``grouped`` is timed: in that run it beat ``bmm`` on 12 of the 424 in
  inference, all float32 with few input channels at a large output (MobileNetV2's
  16->96 at 112x112: up to 1.28x by the median of three runs). At B = 1 ``grouped`` is
  a plain conv with the mixed kernel and is timed;
- ``bmm`` on a stride-1 depthwise conv (one input and one output channel per group)
  whose ``unfold`` buffer exceeds ``auto.KERNEL_BUDGET_BYTES``: the buffer holds every
  input element kh * kw times for a matrix-vector product per channel, and reading and
  writing it costs several times the conv (3.3x to 18x the fastest strategy on every
  such problem of a suite run on 2 CPU cores: B 32 and 128, K 4 and 8, fp32 and bf16). A large
  ``unfold`` alone is no such margin: at B = 128 ``bmm`` ran ResNet-50's 7x7 stem
  1.6-1.8x (fp32) and 2.8-3.3x (bf16) faster than ``grouped``, and MobileNetV2's
  strided depthwise 3x3 at 112x112 1.1-1.6x faster in bf16 (K 4 and 8); the memory bound
  now leaves ``bmm`` out of the stem in training and in bf16, and out of that depthwise
  conv in bf16 (docs/auto-tuning.md).

A call whose per-sample kernels exceed ``auto.KERNEL_BUDGET_BYTES`` runs ``grouped`` and
``bmm`` in recomputed chunks, and they are timed all the same: which side wins depends
on the layer, B, K and dtype. In a suite run on 2 CPU cores (K = 4, fp32, glibc's malloc
keeping freed memory), ResNet-50 layer4's strided 3x3 at B = 32 ran 2.9x the static conv
chunked under grouped (2.8x under bmm) against mixture's 3.6x; at B = 128 layer3's 3x3
ran 1.8x chunked under grouped against mixture's 4.2x, and layer4's strided 1x1 2.7x
chunked under bmm against 3.7x chunked under grouped.

Each process tunes on its own, every DDP rank included: the strategies compute the
same function, so ranks that pick differently still train the same model.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import reprlib
import stat
import statistics
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor

from .. import compat
from ..io import atomic_write
from . import auto

Runner = Callable[[str, Tensor, Tensor, Tensor | None, Tensor], Tensor]
"""``run(strategy, x, weight, bias, routing_weights)``: one call of a strategy, conv arguments bound."""

CANDIDATES: tuple[str, ...] = ("grouped", "mixture", "bmm")
TIMED_RUNS = 3
DROP_FACTOR = 1.5
MIN_SAMPLE_MS = 2.0
"""A timed sample repeats the call until this many ms have passed: one call of a small
problem (a fraction of a ms) is at the mercy of the scheduler."""
MIXTURE_MAX_EXTRA_POSITIONS: dict[int, int] = {16: 12288, 32: 4096}
"""``mixture`` is timed while ``(K - 1) * S`` is at most this, by the bits of the compute dtype
(float64 takes float32's): in float32 at K = 4, S <= 1365 (down to 28x28); in bfloat16 and
float16 at K = 4, S <= 4096 (down to 64x64), at K = 8 down to 41x41."""
MEMORY_MARGIN = 2.0
"""A candidate is run only while its estimated peak memory (:func:`footprint_bytes`) is at most this many
times the rules' choice's (or :data:`MEMORY_SLACK_BYTES` above it): tuning may hold the call's memory once
more, room for the estimate's error and for the strategies' ties, while ``bmm``'s ``unfold`` (kh * kw
times the input), ``mixture``'s K outputs and per-sample kernels many times the activations stay out
(docs/auto-tuning.md has what that gives up)."""
MEMORY_SLACK_BYTES = 16 * 2**20
"""Below this much more than the rules' choice a candidate fits whatever :data:`MEMORY_MARGIN` says: less
than the scratchpads a backend sizes on its own, which the estimate leaves out (oneDNN's reached 28 MiB
on CPU for a depthwise 5x5 conv of 1152 channels), and nothing next to the memory a process that imports
PyTorch holds."""

_KEY_FIELDS = (
    ("device", str),
    ("dtype", str),
    ("memory_format", str),
    ("batch", int),
    ("in_channels", int),
    ("out_channels", int),
    ("height", int),
    ("width", int),
    ("kernel_size", list),
    ("stride", list),
    ("padding", list),
    ("dilation", list),
    ("groups", int),
    ("experts", int),
    ("bias", bool),
    ("grad", bool),
)
_SIZE_FIELDS = (3, 6, 7)
"""Positions of the sizes that may be symbolic under ``torch.compile`` (batch, height, width) in a key."""
_CACHE_VERSION = 1
MAX_CACHE_ENTRIES = 10_000
"""Most entries a tuning cache holds, one per problem: a process meets each converted conv at a few
batch sizes (training, its last partial batch, evaluation), with and without gradients; the 85
distinct convs of ResNet-50, MobileNetV2 and EfficientNet-B0 so make about 340 problems, and this
bound is some thirty times that."""
MAX_CACHE_FILE_BYTES = 8 * 2**20
"""A larger file is refused after reading this much: :func:`save_tuning_cache` writes 450-480 bytes per
entry for real problems and at most 724 (every size of 18 digits, the most a key may hold), so
:data:`MAX_CACHE_ENTRIES` entries of any problems fit."""
_CONTAINERS_PER_ENTRY = 6
"""JSON objects and arrays of one entry as saved: the entry, its key, and the key's four pairs."""
_COMMAS_PER_ENTRY = 21
"""Commas of one entry as saved, the one after it included: 15 between the key's fields, one in each
pair, one between key and strategy. The file's two top-level fields add one, which the last entry lacks."""
_DTYPES = ("float16", "bfloat16", "float32", "float64", "complex64", "complex128")
_DTYPE_OBJECTS = {name: getattr(torch, name) for name in _DTYPES}
_DEVICE_TYPES = ("cpu", "cuda")
"""Where anything is timed (elsewhere the rules decide): CPU by the wall clock, CUDA by events."""
_MEMORY_FORMATS = ("contiguous", "channels_last", "strided")
_SWITCH = {"1": True, "true": True, "on": True, "yes": True, "0": False, "false": False, "off": False, "no": False}


def _switch_from_environment() -> tuple[bool | None, str]:
    """``CONDCONV_TUNE`` read at import: 0/false/off/no or 1/true/on/yes, any case; unset or empty means on.

    Any other value gives no setting but the error :func:`is_tuning_enabled` raises, where
    tuning is first consulted rather than at import: a command line reports it as one line.
    """
    value = os.environ.get("CONDCONV_TUNE", "").strip()
    if value.lower() not in _SWITCH and value:
        return None, f"CONDCONV_TUNE={reprlib.repr(value)} is not a switch; set it to 0 (off) or 1 (on), or unset it"
    return _SWITCH.get(value.lower(), True), ""


_cache: dict[tuple, str] = {}
_by_problem: dict[tuple, dict[tuple, str]] = {}
"""The same choices by the key without its sizes (batch, height, width), then by those sizes:
what a ``torch.compile`` trace looks up without hashing a symbolic size (:func:`_lookup`)."""
_pinned: dict[tuple, str] = {}
"""The rules' choices for problems first met inside saved-tensor hooks (activation checkpointing,
offloading such as ``save_on_cpu``), where nothing can be timed: consulted inside such hooks
only, so that a checkpoint's recompute runs what its forward ran; never saved or shown."""
_cache_lock = threading.RLock()
"""Held while a problem is timed and while the cache is changed or read as a whole: two threads
meeting the same new problem time it once, and one problem is timed at a time (other work of
other threads still runs beside the timing)."""
_enabled, _switch_error = _switch_from_environment()  # _enabled is None while CONDCONV_TUNE holds no switch


def set_tuning(enabled: bool) -> None:
    """Turn measured ``auto`` on or off for this process (default: on, or ``CONDCONV_TUNE=0`` for off).

    The setting is process-wide, as ``torch.backends.cudnn.benchmark`` is: it applies to
    every thread.
    """
    global _enabled
    _enabled = bool(enabled)


def is_tuning_enabled() -> bool:
    """Whether ``auto`` times the strategies on a new problem and uses the cache (otherwise: the rules).

    Raises ``ValueError`` while ``CONDCONV_TUNE`` holds no switch and :func:`set_tuning` was not called.
    """
    if _enabled is None:
        raise ValueError(_switch_error)
    return _enabled


@contextlib.contextmanager
def tuning(enabled: bool) -> Iterator[None]:
    """Turn tuning on or off inside a ``with`` block, restoring the previous setting after it."""
    global _enabled
    previous = _enabled
    set_tuning(enabled)
    try:
        yield
    finally:
        _enabled = previous


def clear_tuning_cache() -> None:
    """Forget every tuned choice (the next call of each problem tunes again)."""
    with _cache_lock:
        _cache.clear()
        _by_problem.clear()
        _pinned.clear()


def tuning_cache() -> dict[tuple, str]:
    """A copy of the cache: problem key (a tuple in the order of the JSON key's fields) -> strategy."""
    with _cache_lock:
        return dict(_cache)


def save_tuning_cache(path: str | os.PathLike) -> None:
    """Write the tuned choices to a JSON file, atomically (replacing ``path`` if it exists).

    A file holds at most :data:`MAX_CACHE_ENTRIES` choices, the latest; with more in the cache,
    the earlier ones are left out with a warning (those problems are tuned again where they are met).
    """
    choices = list(tuning_cache().items())
    if len(choices) > MAX_CACHE_ENTRIES:
        warnings.warn(
            f"{path}: saved the latest {MAX_CACHE_ENTRIES} of {len(choices)} tuned choices, as many as a "
            "tuning cache holds",
            stacklevel=2,
        )
        choices = choices[-MAX_CACHE_ENTRIES:]
    entries = [
        {"key": dict(zip((name for name, _ in _KEY_FIELDS), _jsonable(key))), "strategy": s} for key, s in choices
    ]
    with atomic_write(path, overwrite=True) as tmp:
        Path(tmp).write_text(json.dumps({"version": _CACHE_VERSION, "entries": entries}, indent=1))


def load_tuning_cache(path: str | os.PathLike, device: str | torch.device | None = None) -> int:
    """Add the choices of a file written by :func:`save_tuning_cache`; returns how many were added.

    The file is validated strictly (a regular file, its size, known fields, types, sizes a
    convolution can have, dtype, device and strategy names) before anything is added; it is
    data only, nothing in it is executed. A choice the tuner could not have made for its
    problem (a strategy the cost model or the memory bound leaves out there, module docstring)
    is ignored, with one warning that counts them: those problems are tuned again.

    Args:
        path: the JSON file.
        device: take every entry tuned on a device of this type as tuned on this device,
            as ``map_location`` does for ``torch.load``: the key holds the device index,
            so a DDP rank loading the file rank 0 saved passes its own device
            (``torch.device("cuda", torch.cuda.current_device())``, or in Lightning
            ``trainer.strategy.root_device``); entries of other device types (CPU ones,
            in that example) are kept as they are.

    Raises:
        ValueError: the file is not such a cache, or ``device`` is not a CPU or CUDA device.
    """
    target = None if device is None else _device_name(str(device))
    if device is not None and target is None:
        raise ValueError(
            f"device must be 'cpu' or a CUDA device with its index such as 'cuda:1', got {reprlib.repr(device)}"
        )
    try:
        data = json.loads(_read_cache_file(path), parse_int=_short_int, object_pairs_hook=_fields)
    except RecursionError:
        raise ValueError(
            f"cannot read tuning cache {path}: nested too deeply; save one with save_tuning_cache"
        ) from None
    except (OSError, ValueError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        reason = " ".join(str(error).split())[:200]
        raise ValueError(f"cannot read tuning cache {path}: {reason}; save one with save_tuning_cache") from None
    if (
        not isinstance(data, dict)
        or set(data) != {"version", "entries"}
        or type(data["version"]) is not int
        or data["version"] != _CACHE_VERSION
    ):
        raise ValueError(f"{path} is not a version-{_CACHE_VERSION} tuning cache; save one with save_tuning_cache")
    if not isinstance(data["entries"], list):
        raise ValueError(f"{path}: 'entries' must be a list; save the cache with save_tuning_cache")
    parsed = [_parse_entry(index, entry, path) for index, entry in enumerate(data["entries"])]
    loaded = {key: strategy for key, strategy in parsed if _plausible(strategy, key)}
    if len(loaded) < len(parsed):
        ignored = len(parsed) - len(loaded)
        warnings.warn(
            f"{path}: ignored {ignored} tuning cache {'entry' if ignored == 1 else 'entries'} whose strategy the "
            "tuner would not choose for its problem (too slow or too much memory); those problems are tuned again",
            stacklevel=2,
        )
    if target is not None:
        kind = target.partition(":")[0]
        loaded = {
            (target if key[0].partition(":")[0] == kind else key[0], *key[1:]): strategy
            for key, strategy in loaded.items()
        }
    with _cache_lock:
        for key, strategy in loaded.items():
            _store(key, strategy)
    return len(loaded)


def _read_cache_file(path: str | os.PathLike) -> str:
    """The text of a tuning cache, read only from a regular file and only up to the size limits, before
    any parsing: a FIFO would block the read, a device would never end it, and the JSON parser holds
    many times a file's size in Python objects (hence the bounds on the values it may create)."""
    _check_regular(os.stat(path).st_mode)  # before opening: opening a device can act on it
    descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(descriptor, "rb") as file:
        _check_regular(os.fstat(file.fileno()).st_mode)  # the name may have been replaced meanwhile
        raw = file.read(MAX_CACHE_FILE_BYTES + 1)
    if len(raw) > MAX_CACHE_FILE_BYTES:
        raise ValueError(f"larger than {MAX_CACHE_FILE_BYTES // 2**20} MiB")
    if not raw.isascii():  # save_tuning_cache writes ASCII; other text would take up to 4 bytes a character
        raise ValueError("not ASCII text")
    containers, separators = raw.count(b"{") + raw.count(b"["), raw.count(b",")
    if containers > 2 + _CONTAINERS_PER_ENTRY * MAX_CACHE_ENTRIES or separators > _COMMAS_PER_ENTRY * MAX_CACHE_ENTRIES:
        raise ValueError(f"more JSON values than {MAX_CACHE_ENTRIES} entries hold")
    return raw.decode("ascii")  # the bytes are freed on return, before the parser creates anything


def _check_regular(mode: int) -> None:
    if not stat.S_ISREG(mode):
        kinds = {stat.S_IFDIR: "a directory", stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket"}
        kinds |= {stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device"}
        raise ValueError(f"{kinds.get(stat.S_IFMT(mode), 'not a regular file')}, not a regular file")


def _fields(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """A JSON object of the cache; a name given twice is refused (a parser keeps one of them silently)."""
    fields = dict(pairs)
    if len(fields) < len(pairs):
        names = [name for name, _ in pairs]
        raise ValueError(f"field {reprlib.repr(next(n for n in names if names.count(n) > 1))} given twice")
    return fields


def problem_key(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    routing_weights: Tensor,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
) -> tuple:
    """Everything a strategy's speed depends on, in the order of the cache's JSON fields."""
    num_experts, out_channels, in_per_group, kh, kw = weight.shape
    batch, _, height, width = x.shape
    in_channels = in_per_group * groups  # x's, from the weight: static under torch.compile
    if in_channels > 1 and x.is_contiguous(memory_format=torch.channels_last):
        memory_format = "channels_last"
    else:  # permuted or sliced inputs run the strategies at other speeds than either dense layout
        memory_format = "contiguous" if x.is_contiguous() else "strided"
    requires_grad = x.requires_grad or weight.requires_grad or routing_weights.requires_grad
    # Inference mode records no graph even where enable_grad() turns grad mode back on (Dynamo
    # cannot trace the query, and a compiled graph runs under inference mode as under no_grad).
    recording = torch.is_grad_enabled() and (torch.compiler.is_compiling() or not torch.is_inference_mode_enabled())
    grad = recording and (requires_grad or (bias is not None and bias.requires_grad))
    return (
        str(x.device),
        str(auto.compute_dtype(x)).removeprefix("torch."),
        memory_format,
        batch,
        in_channels,
        out_channels,
        height,
        width,
        (kh, kw),
        tuple(stride),
        tuple(padding),
        tuple(dilation),
        groups,
        num_experts,
        bias is not None,
        grad,
    )


def tuned_strategy(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    routing_weights: Tensor,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
    run: Runner,
) -> str:
    """The strategy ``auto`` runs for this call: cached, else timed now, else the rules' choice.

    Not for calls under export or TorchScript tracing (``auto.is_exporting``, which the caller
    checks once per call): their sizes may be symbolic, and a key would guard on them. A cached
    problem costs one key and one lookup (``tools/bench_dispatch.py`` measures what that adds to
    a layer's call); the rules are consulted only for a problem not in the cache.
    """
    if not is_tuning_enabled():
        return auto.choose_strategy(x, weight, stride, padding, dilation, groups)
    key = problem_key(x, weight, bias, routing_weights, stride, padding, dilation, groups)
    compiling = torch.compiler.is_compiling()  # first: Dynamo cannot trace the autograd-state queries below
    if _symbolic(key, compiling):
        return auto.choose_strategy(x, weight, stride, padding, dilation, groups)
    hooks = not compiling and compat.saved_tensor_hooks_active()
    if key[-1] and not (compiling or hooks) and compat.in_backward_pass():
        # A reentrant checkpoint recomputes, in the backward, a forward it ran under no_grad:
        # that forward was a forward-only problem, and the recompute must run its strategy so
        # that the gradient is the one of the output the forward returned.
        key = (*key[:-1], False)
    pinned = _pinned.get(key) if hooks else None
    if pinned is not None:
        return pinned
    cached = _lookup(key, compiling)
    if cached is not None:
        return cached
    rules = auto.choose_strategy(x, weight, stride, padding, dilation, groups)
    if not _can_time(x):
        if hooks and _can_time_apart_from_hooks(x):
            # Activation checkpointing recomputes this forward in the backward, by which time
            # another layer may have tuned the problem: inside such hooks the rules' choice stays.
            with _cache_lock:
                return _pinned.setdefault(key, rules)
        return rules
    with _cache_lock:
        cached = _cache.get(key)  # another thread may have timed it while this one waited
        if cached is None:
            candidates = _candidates(key, rules)
            if candidates[1:]:
                try:
                    candidates = [_fastest(candidates, x, weight, bias, routing_weights, key[-1], run)]
                except torch.cuda.OutOfMemoryError:  # no candidate fit next to the caller's tensors
                    candidates = [rules]
            cached = _store(key, candidates[0])
    return cached


def _symbolic(key: tuple, compiling: bool) -> bool:
    """Whether sizes of ``key`` are symbolic outside ``torch.compile`` (``make_fx`` with
    ``tracing_mode="symbolic"``, FakeTensor with a shape environment): such a size cannot be
    hashed, so no cache holds it and nothing can be timed. Under ``torch.compile`` the sizes
    may be symbolic too, and :func:`_lookup` compares them without hashing."""
    if compiling:
        return False
    try:
        hash(key)
    except TypeError:
        return True
    return False


def _store(key: tuple, strategy: str) -> str:
    """Cache ``strategy`` for ``key`` in both indexes (the caller holds the lock); returns it."""
    _cache[key] = strategy
    static, sizes = _split(key)
    _by_problem.setdefault(static, {})[sizes] = strategy
    return strategy


def _split(key: tuple) -> tuple[tuple, tuple]:
    """``key`` as (the fields that do not change with the input's size, (batch, height, width))."""
    return tuple(v for i, v in enumerate(key) if i not in _SIZE_FIELDS), tuple(key[i] for i in _SIZE_FIELDS)


def _lookup(key: tuple, compiling: bool) -> str | None:
    """The cached choice for ``key``, if any.

    While ``torch.compile`` traces, batch, height and width may be symbolic: hashing them
    would specialize the graph to these sizes (one graph per batch size under
    ``dynamic=True``, then the recompile limit and eager calls that time). So the trace
    looks up the layer problem without its sizes, which are static, and compares the sizes
    only with the entries of that problem: the graph is guarded on that problem's entries
    (whether there are any, and their sizes), not on the rest of the cache.
    """
    if not compiling:
        return _cache.get(key)
    static, sizes = _split(key)
    for cached_sizes, strategy in tuple(_by_problem.get(static, {}).items()):
        if cached_sizes == sizes:
            return strategy
    return None


def _can_time(x: Tensor) -> bool:
    """False while tracing, under a dispatch mode (FakeTensor, op logging), a ``torch.func``
    transform (its tensors cannot be timed outside it), saved-tensor hooks (activation
    checkpointing would count the timing runs as part of the forward it recomputes), inside
    a backward pass, during CUDA graph capture, and on devices other than CPU and CUDA."""
    return _can_time_apart_from_hooks(x) and not compat.saved_tensor_hooks_active() and not compat.in_backward_pass()


def _can_time_apart_from_hooks(x: Tensor) -> bool:
    if torch.compiler.is_compiling() or compat.dispatch_mode_active():
        return False
    if x.device.type not in _DEVICE_TYPES or compat.functorch_transform_active():
        return False
    return not (x.is_cuda and torch.cuda.is_current_stream_capturing())


def _candidates(key: tuple, rules: str) -> list[str]:
    """What the tuner times for problem ``key``, the rules' choice first: the strategies that neither lose
    by a wide margin (:func:`_worth_timing`) nor hold more memory than the rules' choice allows
    (:func:`_fits`); the rules' choice alone when none is left."""
    order = [rules] + [s for s in CANDIDATES if s != rules]
    return [s for s in order if _worth_timing(s, key) and _fits(s, key, rules)] or [rules]


def _plausible(strategy: str, key: tuple) -> bool:
    """Whether tuning could have chosen ``strategy`` for ``key``: one of its candidates, or the rules' choice
    (what runs when no candidate fits in CUDA memory). A cache entry is checked by this, the same test
    the tuner applies before timing."""
    rules = _rules_for(key)
    return strategy == rules or strategy in _candidates(key, rules)


def _rules_for(key: tuple) -> str:
    """:func:`auto.choose_strategy`'s choice for the call ``key`` describes."""
    in_channels, out_channels, height, width, (kh, kw) = key[4:9]
    groups = key[12]
    return auto.rules_choice(
        key[3],
        in_channels * height * width,
        out_channels * (in_channels // groups) * kh * kw,
        groups,
        (kh, kw) == (1, 1) and groups == 1,
        lambda: key[2] == "channels_last",
    )


def _positions(key: tuple) -> int:
    """Output positions of the call ``key`` describes."""
    height, width, (kh, kw), (sh, sw), (ph, pw), (dh, dw) = key[6:12]
    return ((height + 2 * ph - dh * (kh - 1) - 1) // sh + 1) * ((width + 2 * pw - dw * (kw - 1) - 1) // sw + 1)


def _worth_timing(strategy: str, key: tuple) -> bool:
    """The cost model's wide-margin exclusions (module docstring)."""
    batch, in_channels, out_channels = key[3:6]
    (kh, kw), (sh, sw), _, _, groups, experts = key[8:14]
    positions = _positions(key)
    dtype = _DTYPE_OBJECTS[key[1]]
    if strategy == "mixture":
        return (experts - 1) * positions <= MIXTURE_MAX_EXTRA_POSITIONS[min(torch.finfo(dtype).bits, 32)]
    pointwise = (kh, kw) == (1, 1) and groups == 1
    if strategy == "grouped":  # at B = 1 a plain conv with the mixed kernel; forward only it can win
        needs_grad = key[-1]
        return not (pointwise and batch > 1 and needs_grad)
    unfold_bytes = batch * in_channels * kh * kw * positions * dtype.itemsize
    depthwise = 1 < groups == in_channels == out_channels and (sh, sw) == (1, 1)
    return strategy == "bmm" and (pointwise or not depthwise or unfold_bytes <= auto.KERNEL_BUDGET_BYTES)


def _fits(strategy: str, key: tuple, rules: str) -> bool:
    """Whether a call of ``strategy`` holds at most :data:`MEMORY_MARGIN` times the memory of the rules'
    choice, or at most :data:`MEMORY_SLACK_BYTES` more, by :func:`footprint_bytes`."""
    bound = footprint_bytes(rules, key)
    return footprint_bytes(strategy, key) <= max(MEMORY_MARGIN * bound, bound + MEMORY_SLACK_BYTES)


def footprint_bytes(strategy: str, key: tuple) -> int:
    """Estimated peak bytes of one call of ``strategy`` on problem ``key`` as the tuner times it (the
    forward, and with gradients its backward), read off ``condconv.py``: the inputs and the output, and
    what the strategy allocates beside them.

    - ``grouped`` and ``bmm``: the per-sample kernels of one batch chunk (``auto.KERNEL_BUDGET_BYTES``),
      and the output twice where chunks are concatenated;
    - ``bmm`` with a kernel larger than 1x1 (or padding, or groups): one chunk's ``unfold`` buffer,
      every input element kh * kw times per output position; at 1x1, a strided or sliced input's copy;
    - ``mixture``: the K stacked experts and their K outputs, then the mixed output (and with a bias,
      ``bmm``'s and ``mixture``'s output once more: the bias is added after the product);
    - a convolution (``grouped``'s, ``mixture``'s): a copy of its weights and of its input or output,
      the larger, as oneDNN makes on CPU to reorder them into its own layout; ``grouped`` on input that
      is not NCHW-contiguous copies it to NCHW.

    A 16-bit compute dtype is taken to be autocast's: the inputs stay float32, the products copy them
    to 16 bits, and ``unfold``, which autocast leaves alone, fills its buffer in float32 before the
    product copies it. With gradients, the backward holds each input and each buffer it reads with its
    gradient, and the output with its gradient. Workspaces a backend sizes on its own (cuDNN's,
    oneDNN's scratchpads) are not counted.
    """
    batch, in_channels, out_channels, height, width, (kh, kw), (sh, sw), (ph, pw) = key[3:11]
    groups, experts, bias, grad = key[12:16]
    item = _DTYPE_OBJECTS[key[1]].itemsize
    stored = 4 if item == 2 else item  # the inputs' own dtype
    kernel = out_channels * (in_channels // groups) * kh * kw  # elements of one expert, or of one sample's kernel
    sample, positions = in_channels * height * width, _positions(key)
    output = batch * out_channels * positions * item
    chunk = min(batch, max(1, auto.KERNEL_BUDGET_BYTES // (kernel * item)))
    inputs = (batch * sample + experts * kernel + batch * experts + bias * experts * out_channels) * stored
    casts = (batch * sample + experts * kernel) * item if stored != item else 0  # autocast's copies
    copies = 0
    if strategy == "mixture":
        stacked, outputs = experts * kernel * item, experts * output
        saved, copies = stacked + outputs, _conv_copies(batch * sample * item, outputs, stacked)
        forward = outputs + max(stacked + copies, (1 + bias) * output)
    elif strategy == "grouped":
        kernels = chunk * kernel * item
        saved = kernels + (0 if key[2] == "contiguous" else chunk * sample * item)  # the NCHW copy
        copies = _conv_copies(chunk * sample * item, output * chunk // batch, kernels)
        forward = max(saved + output + copies, 2 * output if chunk < batch else 0)
    else:
        if (kh, kw, ph, pw, groups) != (1, 1, 0, 0, 1):
            columns = chunk * in_channels * kh * kw * positions * (stored + item if stored != item else item)
        elif (sh, sw) != (1, 1) or key[2] == "strided":
            columns = chunk * in_channels * positions * item
        else:
            columns = 0
        saved = chunk * kernel * item + columns
        forward = saved + (1 + bias + (chunk < batch)) * output
    peak = inputs + casts + forward
    if grad:  # the backward: the inputs, the buffers it reads and the output, each with its gradient
        peak = max(peak, 2 * (inputs + saved + output) + casts + copies)
    return peak


def _conv_copies(conv_input: int, conv_output: int, weight: int) -> int:
    """Bytes of the copies a convolution's backend may make: of its weights, and of its input or output."""
    return weight + max(conv_input, conv_output)


def _fastest(
    candidates: list[str],
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    routing_weights: Tensor,
    grad: bool,
    run: Runner,
) -> str:
    """Time each candidate on the call's own tensors; ties go to the earlier candidate.

    The tensors are detached (with gradients, as leaves that need them where the call's do): the
    timing reads them and allocates only what a call of the candidate allocates, with no copy beside
    the caller's, and the caller's autograd graph and gradients are left alone.
    """
    tensors = (x, weight, bias, routing_weights)
    own = [None if t is None else t.detach().requires_grad_(grad and t.requires_grad) for t in tensors]

    def step(strategy: str) -> Callable[[], None]:
        def call() -> None:
            with torch.enable_grad() if grad else torch.no_grad():
                y = run(strategy, *own)  # type: ignore[arg-type]
                if grad:
                    y.backward(torch.ones_like(y))

        return call

    def sample(strategy: str) -> float:
        """One timed sample; a candidate whose buffers do not fit in CUDA memory takes forever."""
        try:
            return timed_ms(step(strategy), x.device, MIN_SAMPLE_MS)
        except torch.cuda.OutOfMemoryError:
            return math.inf

    # The warm-up round includes one-time setup (oneDNN primitives, cuDNN plans, first-touch
    # memory), so it drops only losers by twice the margin; its times are not kept.
    warm_up = {strategy: sample(strategy) for strategy in candidates}
    if math.isinf(min(warm_up.values())):
        raise torch.cuda.OutOfMemoryError("no candidate strategy fits in CUDA memory next to the caller's tensors")
    alive = [s for s in candidates if warm_up[s] <= 2 * DROP_FACTOR * min(warm_up.values())]
    times: dict[str, list[float]] = {strategy: [] for strategy in alive}
    medians = dict.fromkeys(alive, 0.0)
    for _ in range(TIMED_RUNS if len(alive) > 1 else 0):  # interleaved rounds; a lone survivor wins
        for strategy in alive:
            times[strategy].append(sample(strategy))
        medians = {s: statistics.median(times[s]) for s in alive}
        best_ms = min(medians.values())
        alive = [s for s in alive if medians[s] <= DROP_FACTOR * best_ms]
        if len(alive) == 1:
            break
    return min(alive, key=medians.__getitem__)


def timed_ms(call: Callable[[], None], device: torch.device, min_ms: float = 0.0) -> float:
    """Mean wall time per call in ms over as many calls as take ``min_ms`` (at least one call).

    CUDA work is timed between events after a synchronize. ``tools/bench_layers.py``
    times with this function too.
    """
    calls, total = 0, 0.0
    while calls == 0 or total < min_ms:
        total += _one_call_ms(call, device)
        calls += 1
    return total / calls


def _one_call_ms(call: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        with torch.cuda.device(device):  # the events go on the stream of the call's device, not the current one
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            call()
            end.record()
            end.synchronize()
        return start.elapsed_time(end)
    start_s = time.perf_counter()
    call()
    return (time.perf_counter() - start_s) * 1e3


def _jsonable(key: tuple) -> list:
    return [list(v) if isinstance(v, tuple) else v for v in key]


def _parse_entry(index: int, entry: object, path: object) -> tuple[tuple, str]:
    """One cache entry as (key, strategy), or a one-line ValueError naming the entry and what is wrong."""

    def invalid(what: str) -> ValueError:
        return ValueError(
            f"{path}: tuning cache entry {index}: {what}; delete the file or save it again with save_tuning_cache"
        )

    if not isinstance(entry, dict) or set(entry) != {"key", "strategy"}:
        raise invalid("must hold exactly 'key' and 'strategy'")
    if entry["strategy"] not in CANDIDATES:
        raise invalid(f"strategy {reprlib.repr(entry['strategy'])} is not one of {', '.join(CANDIDATES)}")
    fields = entry["key"]
    if not isinstance(fields, dict) or set(fields) != {name for name, _ in _KEY_FIELDS}:
        raise invalid(f"'key' must hold exactly the fields {', '.join(name for name, _ in _KEY_FIELDS)}")
    allowed = {"dtype": _DTYPES, "memory_format": _MEMORY_FORMATS}
    key = []
    for name, kind in _KEY_FIELDS:
        value = fields[name]
        if kind is list:
            if not (isinstance(value, list) and len(value) == 2 and all(_is_int(v) for v in value)):
                raise invalid(f"{name} must be two non-negative integers")
            value = tuple(value)
        elif not {bool: isinstance(value, bool), int: _is_int(value), str: isinstance(value, str)}[kind]:
            raise invalid(f"{name} must be {'a non-negative integer' if kind is int else kind.__name__}")
        elif name in allowed and value not in allowed[name]:
            raise invalid(f"{name} {reprlib.repr(value)} is not one of {', '.join(allowed[name])}")
        elif name == "device" and _device_name(value) != value:
            raise invalid(f"device {reprlib.repr(value)} is not 'cpu' or a CUDA device with its index such as 'cuda:0'")
        key.append(value)
    problem = _not_a_convolution(tuple(key))
    if problem:
        raise invalid(problem)
    return tuple(key), entry["strategy"]


def _not_a_convolution(key: tuple) -> str:
    """What keeps ``key`` from describing a call of a convolution (empty if nothing does)."""
    batch, in_channels, out_channels, height, width, kernel, stride, padding, dilation, groups, experts = key[3:14]
    if 0 in (batch, in_channels, out_channels, height, width, groups, experts, *kernel, *stride, *dilation):
        return "batch, channels, height, width, kernel_size, stride, dilation, groups and experts must be positive"
    if in_channels % groups or out_channels % groups:
        return "in_channels and out_channels must be multiples of groups"
    sizes = zip((height, width), padding, dilation, kernel)
    if any(size + 2 * pad < span * (k - 1) + 1 for size, pad, span, k in sizes):
        return "the kernel is larger than the padded input"
    return ""


def _short_int(text: str) -> int:
    """An integer of the cache file; no size of a conv has more than 18 digits."""
    if len(text.lstrip("-")) > 18:
        raise ValueError(f"an integer of {len(text)} digits")
    return int(text)


def _device_name(text: str) -> str | None:
    """``str(torch.device(text))`` for ``cpu`` or a CUDA device with its index (as keys hold them), else None."""
    if len(text) > 32:
        return None
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        return None
    if (device.type, device.index is None) not in (("cpu", True), ("cuda", False)):
        return None
    return str(device)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
