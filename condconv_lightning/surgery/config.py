"""``ConversionConfig``: every option of a conversion, in one frozen, self-validating dataclass.

The single source of truth for conversion options, as peft's ``LoraConfig`` is for
adapters: :func:`~condconv_lightning.surgery.convert` takes its fields as keywords,
the conversion callback and the command line build one, and a
:class:`~condconv_lightning.surgery.ConversionSpec` stores it as JSON. Reading it back
from a file validates every field the same way as when a user passes it, before
anything is allocated, so a file cannot make the library compute with values a
caller would have been refused.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..arguments import (
    check_choice,
    check_non_negative_int,
    check_non_negative_number,
    check_num_experts,
    check_positive_number,
    check_seed,
    check_temperature,
)
from ..condconv2d import ExpertInit, RouterInit, upcycling_inexactness
from ..functional.condconv import STRATEGIES, Strategy
from ..functional.routing import ROUTINGS, Routing

INITS: tuple[str, ...] = ("upcycle", "fresh")
ROUTER_INITS: tuple[str, ...] = ("zero", "random")
ADDED_LATER: dict[str, Any] = {"router_init": "zero", "router_scale": 1.0}
"""Fields a file written before they existed lacks, with the value that file's conversion used."""


@dataclass(frozen=True)
class ConversionConfig:
    """How selected convolutions become CondConv2d layers.

    Args:
        num_experts: K, the number of expert kernels per layer.
        routing: ``"sigmoid"`` (CondConv) or ``"softmax"`` (DynamicConv) routing.
        temperature: divides the router's logits.
        strategy: how the layers execute (see :mod:`condconv_lightning.functional`).
        init: ``"upcycle"`` (the model's outputs are preserved exactly; see
            :meth:`CondConv2d.from_conv`) or ``"fresh"`` (train from scratch, as in the paper).
        perturbation: size of the zero-sum symmetry-breaking expert offsets of
            upcycling, relative to the kernel's standard deviation.
        router_init: ``"zero"`` (every input routed alike at first) or ``"random"`` (router
            weights drawn with std ``router_scale / sqrt(C_in)``, so experts get different
            gradients from the first step). A random router keeps upcycling exact only with
            routing that sums to one (``softmax``, ``normalized_sigmoid``) and ``perturbation=0``;
            :attr:`inexactness` says when the options cannot be exact.
        router_scale: scale of a random router's weights (logits of about this many times the
            pooled input's scale).
        seed: makes the offsets reproducible; each layer draws from a generator seeded by
            ``seed`` and its name. None uses torch's global generator.
        kernel_sizes: convert only convs with these kernel sizes (ints mean square kernels).
        min_channels: convert only convs with at least this many input and output channels.
        include_depthwise: whether depthwise convs (``groups == in_channels``) are converted.
        include_squeeze_excitation: whether convs whose input is 1x1 spatially (the reduce and
            expand convs of squeeze-and-excitation blocks, which act on a globally pooled
            vector, where a per-sample kernel adds little) are converted. False needs
            ``convert``'s ``input_size``: only a forward pass shows a conv's input size.

    Raises:
        ValueError: a field has a value out of range (or of the wrong type).
        TypeError: ``kernel_sizes`` is not a sequence.
    """

    num_experts: int = field(default=4, metadata={"help": "experts per layer", "metavar": "K"})
    routing: Routing = field(default="sigmoid", metadata={"help": "router activation"})
    temperature: float = field(default=1.0, metadata={"help": "router temperature (divides the logits)"})
    strategy: Strategy = field(default="auto", metadata={"help": "how CondConv2d layers execute"})
    init: ExpertInit = field(default="upcycle", metadata={"help": "upcycle (exact) or fresh experts"})
    perturbation: float = field(default=0.05, metadata={"help": "symmetry-breaking expert offsets, relative to std(W)"})
    router_init: RouterInit = field(default="zero", metadata={"help": "router weights at conversion"})
    router_scale: float = field(default=1.0, metadata={"help": "scale of a random router's weights"})
    seed: int | None = field(
        default=None, metadata={"help": "seed of the expert offsets", "default_shown": "torch's global generator"}
    )
    kernel_sizes: tuple[tuple[int, int], ...] | None = field(
        default=None, metadata={"help": "convert only these kernel sizes, e.g. 3 or 1x3", "default_shown": "all"}
    )
    min_channels: int = field(default=0, metadata={"help": "convert only convs with this many in and out channels"})
    include_depthwise: bool = field(default=True, metadata={"help": "also convert depthwise convs"})
    include_squeeze_excitation: bool = field(
        default=True, metadata={"help": "also convert squeeze-and-excitation convs (1x1 input)"}
    )

    def __post_init__(self) -> None:
        normalized = {
            "num_experts": check_num_experts(self.num_experts),
            "routing": check_choice("routing", self.routing, ROUTINGS),
            "temperature": check_temperature(self.temperature),
            "strategy": check_choice("strategy", self.strategy, STRATEGIES),
            "init": check_choice("init", self.init, INITS),
            "perturbation": check_non_negative_number("perturbation", self.perturbation),
            "router_init": check_choice("router_init", self.router_init, ROUTER_INITS),
            "router_scale": check_positive_number("router_scale", self.router_scale),
            "seed": check_seed(self.seed),
            "kernel_sizes": kernel_pairs(self.kernel_sizes),
            "min_channels": check_non_negative_int("min_channels", self.min_channels),
        }
        for name in ("include_depthwise", "include_squeeze_excitation"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        for name, value in normalized.items():
            object.__setattr__(self, name, value)

    @property
    def inexactness(self) -> str | None:
        """Why layers converted with these options do not compute what their convs did, or None if they do."""
        if self.init == "fresh":
            return "init='fresh' trains experts from scratch"
        return upcycling_inexactness(self.routing, self.router_init, self.perturbation)

    def to_dict(self) -> dict[str, Any]:
        """JSON-native fields (kernel sizes as lists)."""
        data = dataclasses.asdict(self)
        if self.kernel_sizes is not None:
            data["kernel_sizes"] = [list(pair) for pair in self.kernel_sizes]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ConversionConfig:
        """Build from :meth:`to_dict`'s output; unknown fields are refused, missing ones take their defaults,
        except those :data:`ADDED_LATER`, which take the value files written before them meant."""
        if not isinstance(data, Mapping):
            raise ValueError(f"conversion options must be a JSON object, got {type(data).__name__}")
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(
                f"unknown conversion option(s) {', '.join(map(repr, unknown[:3]))}; known: {cls.field_names()}"
            )
        return cls(**{**ADDED_LATER, **data})

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))


def kernel_pairs(kernel_sizes: object) -> tuple[tuple[int, int], ...] | None:
    """``kernel_sizes`` as a sorted tuple of ``(kh, kw)`` pairs (ints mean square kernels), or None."""
    if kernel_sizes is None:
        return None
    if isinstance(kernel_sizes, (int, str)) or not isinstance(kernel_sizes, Sequence):
        raise TypeError(f"kernel_sizes must be a sequence such as [3] or [(1, 3)], got {kernel_sizes!r}")
    pairs: set[tuple[int, int]] = set()
    for size in kernel_sizes:
        pair = (size, size) if isinstance(size, int) else tuple(size) if isinstance(size, Sequence) else ()
        if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair):
            raise ValueError(f"kernel_sizes must hold positive ints or (kh, kw) pairs, got {size!r}")
        pairs.add(pair)  # type: ignore[arg-type]
    return tuple(sorted(pairs))
