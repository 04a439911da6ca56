"""What a conversion did: per-layer records, totals, a rich table and JSON.

Extra cost per sample of a CondConv2d over its Conv2d (CondConv, Yang et al. 2019,
section 3): routing is a global average pool (``Cin * H * W`` adds) plus a linear layer
(``Cin * K`` MACs); kernel mixing is ``K * P`` MACs for the kernel (``P = Cout *
Cin/groups * kh * kw``) plus ``K * Cout`` for the bias. The static convolution itself
costs ``P * Hout * Wout``. Quantities that depend on the spatial size are known only
when the conversion was given an ``input_size`` (then a forward pass measures the
shapes every layer sees) and are None otherwise.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn
from rich import box
from rich.console import Console, ConsoleOptions, RenderResult
from rich.table import Table
from rich.text import Text

from ..messages import printable
from ..modes import evaluating
from .spec import ConversionSpec

HW = tuple[int, int]


@dataclass(frozen=True)
class LayerShapes:
    """Spatial sizes a conv sees in one forward pass, how many times it runs (shared convs run more),
    and for a CondConv2d the strategy it ran (``last_strategy``)."""

    input_hw: HW
    output_hw: HW
    calls: int
    strategy: str | None = None


@dataclass(frozen=True)
class ConvertedLayer:
    """One Conv2d that became a CondConv2d."""

    name: str
    aliases: tuple[str, ...]
    in_channels: int
    out_channels: int
    kernel_size: HW
    stride: HW
    groups: int
    num_experts: int
    routing: str
    params_before: int
    params_after: int
    input_hw: HW | None
    output_hw: HW | None
    calls: int | None
    conv_macs: int | None
    routing_macs: int | None
    mixing_macs: int
    strategy: str | None = None

    @classmethod
    def measure(
        cls,
        name: str,
        aliases: Sequence[str],
        conv: nn.Conv2d,
        layer: nn.Module,
        shapes: LayerShapes | None,
        probed: LayerShapes | None = None,
    ) -> ConvertedLayer:
        """Count parameters and per-sample MACs of ``conv`` and its replacement ``layer``
        (``probed``: ``layer`` seen in a forward pass, for the strategy it ran)."""
        k = layer.num_experts
        per_expert = conv.weight.numel()
        calls = shapes.calls if shapes is not None else 1
        conv_macs = routing_macs = None
        if shapes is not None:
            (h, w), (ho, wo) = shapes.input_hw, shapes.output_hw
            conv_macs = calls * per_expert * ho * wo
            routing_macs = calls * (conv.in_channels * h * w + conv.in_channels * k)
        mixing = calls * k * (per_expert + (conv.out_channels if conv.bias is not None else 0))
        return cls(
            name=name,
            aliases=tuple(aliases),
            in_channels=conv.in_channels,
            out_channels=conv.out_channels,
            kernel_size=tuple(conv.kernel_size),
            stride=tuple(conv.stride),
            groups=conv.groups,
            num_experts=k,
            routing=layer.routing,
            params_before=sum(p.numel() for p in conv.parameters()),
            params_after=sum(p.numel() for p in layer.parameters()),
            input_hw=shapes.input_hw if shapes else None,
            output_hw=shapes.output_hw if shapes else None,
            calls=shapes.calls if shapes else None,
            conv_macs=conv_macs,
            routing_macs=routing_macs,
            mixing_macs=mixing,
            strategy=probed.strategy if probed else None,
        )


@dataclass(frozen=True)
class SkippedLayer:
    """A selected conv left alone, and why."""

    name: str
    reason: str


@dataclass
class ConversionReport:
    """The result of :func:`~condconv_lightning.surgery.convert` (or :func:`~condconv_lightning.surgery.apply_spec`).

    ``print`` it with rich for a table; ``to_json()`` for machines.
    """

    converted: list[ConvertedLayer]
    skipped: list[SkippedLayer]
    already_converted: list[str]
    spec: ConversionSpec
    input_size: tuple[int, ...] | None = None
    totals: dict[str, int | None] = field(init=False)

    def __post_init__(self) -> None:
        self.totals = {
            "layers": len(self.converted),
            "params_before": sum(r.params_before for r in self.converted),
            "params_after": sum(r.params_after for r in self.converted),
            "params_added": sum(r.params_after - r.params_before for r in self.converted),
            "conv_macs": _sum_or_none(r.conv_macs for r in self.converted),
            "routing_macs": _sum_or_none(r.routing_macs for r in self.converted),
            "mixing_macs": sum(r.mixing_macs for r in self.converted),
        }

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types only (tuples become lists), so ``json.loads(to_json()) == to_dict()``."""
        return {
            "converted": [_lists(asdict(r)) for r in self.converted],
            "skipped": [asdict(r) for r in self.skipped],
            "already_converted": list(self.already_converted),
            "input_size": list(self.input_size) if self.input_size is not None else None,
            "totals": dict(self.totals),
            "spec": self.spec.to_dict(),
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield self.table(options.max_width)

    def table(self, width: int | None = None) -> Table:
        """The report as a rich table; with ``width``, names too long for the columns the others leave them
        wrap at their dots, the continuation indented (a name never breaks mid-word into what reads as another
        layer)."""
        size = "x".join(map(str, self.input_size)) if self.input_size else None
        table = Table(
            title=f"CondConv conversion: {len(self.converted)} layers",
            caption=self._caption(size),
            show_footer=bool(self.converted),
            box=box.SIMPLE_HEAD,  # no vertical rules and one space between columns: 80 columns hold
            padding=(0, 0),  # ResNet-50's names with every column
        )
        t = self.totals
        footers = [
            "total",
            "",
            "",
            _int(t["params_before"]),
            _int(t["params_after"]),
            _int(t["routing_macs"]),
            _int(t["mixing_macs"]),
        ]
        rows = [
            [
                # a layer name is text, never markup or terminal control; made printable before it wraps
                printable(r.name + (f" (= {', '.join(r.aliases[1:])})" if len(r.aliases) > 1 else "")),
                _conv(r),
                str(r.num_experts),
                _int(r.params_before),
                _int(r.params_after),
                _int(r.routing_macs),
                _int(r.mixing_macs),
                r.strategy or "-",
            ]
            for r in self.converted
        ]
        headers = ["layer", "conv", "K", "params", "after", "routing", "mixing", "strategy"]
        footers.append("")
        if not any(r.strategy for r in self.converted):  # known from the probe forward (input_size) only
            headers, footers, rows = headers[:-1], footers[:-1], [row[:-1] for row in rows]
        for i, (header, footer) in enumerate(zip(headers, footers)):
            # only the names may wrap (never truncate): the other columns are short, and a fixed width
            # (min_width) would push the table past the console, which then crops whole columns
            justify = "left" if i == 0 else "right"
            table.add_column(header, footer=footer, justify=justify, no_wrap=i > 0, overflow="fold")
        if width is not None:  # one space between columns and at each edge (SIMPLE_HEAD, no padding)
            others = sum(max(len(cell) for cell in column) for column in zip(headers, footers, *rows))
            others -= max(len(cell) for cell in (headers[0], footers[0], *(row[0] for row in rows)))
            name_width = max(12, width - others - (len(headers) + 1))  # separators and the two edges
            rows = [[wrap_at_dots(row[0], name_width), *row[1:]] for row in rows]
        for row in rows:
            table.add_row(Text(row[0]), *row[1:])
        return table

    def _caption(self, size: str | None) -> str:
        parts = [
            f"routing and mixing: extra MACs per sample at input {size}"
            if size
            else "routing and mixing: extra MACs per sample (routing needs input_size)"
        ]
        conv = self.totals["conv_macs"]
        extra = self.totals["mixing_macs"] + (self.totals["routing_macs"] or 0)
        if conv:
            parts.append(f"+{100 * extra / conv:.2f}% over the converted convs' own {_int(conv)}")
        if any(r.strategy for r in self.converted):
            parts.append("strategy: what each layer ran in that batch-1 inference forward")
        if self.skipped:
            parts.append(f"{len(self.skipped)} skipped")
        if self.already_converted:
            parts.append(f"{len(self.already_converted)} already CondConv2d")
        return "; ".join(parts)


class InputSizeError(ValueError):
    """The model's forward fails on zeros of the ``input_size`` a conversion was given.

    ``input_size`` and ``reason`` (the forward's error) let a caller phrase its own advice.
    """

    def __init__(self, input_size: tuple[int, ...], reason: str) -> None:
        super().__init__(
            f"input_size={input_size} does not fit the model ({reason}); pass the (C, H, W) of one input sample, "
            "or input_size=None to skip the spatial MAC counts"
        )
        self.input_size = input_size
        self.reason = reason


def probe_shapes(model: nn.Module, convs: Sequence[nn.Module], input_size: Sequence[int]) -> dict[int, LayerShapes]:
    """Run one probing forward (:func:`~condconv_lightning.modes.evaluating`) on zeros of ``(1, *input_size)``.

    Raises:
        InputSizeError: the model's forward fails on that input (a ValueError).
    """
    seen: dict[int, list[tuple[HW, HW]]] = {id(m): [] for m in convs}

    def record(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        strategy = getattr(module, "last_strategy", None)
        seen[id(module)].append((tuple(args[0].shape[-2:]), tuple(output.shape[-2:]), strategy))

    first = next(model.parameters(), None)
    factory = {"device": first.device, "dtype": first.dtype} if first is not None else {}
    handles = [m.register_forward_hook(record) for m in {id(m): m for m in convs}.values()]
    try:
        with evaluating(model):
            model(torch.zeros(1, *input_size, **factory))
    except Exception as error:
        raise InputSizeError(tuple(input_size), f"{type(error).__name__}: {error}") from None
    finally:
        for handle in handles:
            handle.remove()
    return {
        key: LayerShapes(calls[0][0], calls[0][1], len(calls), calls[0][2])  # type: ignore[arg-type]
        for key, calls in seen.items()
        if calls
    }


def wrap_at_dots(name: str, width: int) -> str:
    """``name`` in lines of at most ``width`` characters, broken after dots; continuation lines start with two
    spaces, which no module name does. A part longer than a line is folded as it is."""
    if len(name) <= width:
        return name
    lines: list[str] = []
    line = ""
    for part in name.replace(".", ".\0").split("\0"):
        room = width - (2 if lines else 0)
        if line and len(line) + len(part) > room:
            lines.append(line)
            line = ""
        line += part
    lines.append(line)
    return "\n".join(lines[:1] + ["  " + rest for rest in lines[1:]])


def _conv(r: ConvertedLayer) -> str:
    """``Cin->Cout kh x kw``, then ``/stride`` and ``gGroups`` where they are not 1."""
    text = f"{r.in_channels}->{r.out_channels} {'x'.join(map(str, r.kernel_size))}"
    if r.stride != (1, 1):
        text += f"/{r.stride[0]}" if r.stride[0] == r.stride[1] else f"/{'x'.join(map(str, r.stride))}"
    return text + (f" g{r.groups}" if r.groups != 1 else "")


def _lists(record: dict[str, Any]) -> dict[str, Any]:
    return {key: list(value) if isinstance(value, tuple) else value for key, value in record.items()}


def _sum_or_none(values: Any) -> int | None:
    values = list(values)
    return None if any(v is None for v in values) else sum(values)


def _int(value: int | None) -> str:
    """Counts for the table: exact below 10,000, else 3 significant digits with k/M/G (JSON keeps them exact)."""
    if value is None:
        return "-"
    for scale, unit in ((10**9, "G"), (10**6, "M"), (10**3, "k")):
        if value >= 10_000 and value >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:,}"
