"""``convert``: turn selected ``nn.Conv2d`` layers of any model into CondConv2d, in place.

Model surgery in the style of ``nn.SyncBatchNorm.convert_sync_batchnorm`` and peft's
``inject_adapter_in_model``: :meth:`CondConv2d.from_conv` builds each layer from its
conv (exact upcycling, so the model computes what it did), and :mod:`.replace` puts it
in every place the conv was. The choice of layers is :mod:`.select`'s; everything is
checked before the first module changes, so a refused conversion leaves the model as
it was.
"""

from __future__ import annotations

import warnings
import zlib
from typing import Optional, Sequence

import torch
import torch.nn as nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from ..condconv2d import CondConv2d, ExpertInit
from ..functional.condconv import Strategy, check_strategy
from ..functional.routing import Routing, check_routing
from .replace import carry_hooks, replace_modules
from .report import ConversionReport, ConvertedLayer, SkippedLayer, probe_shapes
from .select import (
    Candidate,
    KernelSize,
    SelectorError,
    Selectors,
    as_selector_list,
    filter_reason,
    kernel_filter,
    resolve,
    strip_wrapper_prefix,
)
from .spec import ConversionSpec, LayerOptions, class_path

Plan = list[tuple[Candidate, LayerOptions]]


def convert(
    model: nn.Module,
    layers: Selectors,
    *,
    num_experts: int = 4,
    routing: Routing = "sigmoid",
    temperature: float = 1.0,
    strategy: Strategy = "auto",
    exclude: Optional[Selectors] = None,
    init: ExpertInit = "upcycle",
    perturbation: float = 0.05,
    seed: Optional[int] = None,
    kernel_sizes: Optional[Sequence[KernelSize]] = None,
    min_channels: int = 0,
    include_depthwise: bool = True,
    allow_classes: Sequence[type] = (),
    input_size: Optional[Sequence[int]] = None,
) -> ConversionReport:
    """Replace the ``nn.Conv2d`` layers that ``layers`` selects by CondConv2d, in place.

    Args:
        model: any ``nn.Module`` (a LightningModule, a DDP/compile wrapper too).
        layers: one selector or several: exact dotted names (a conv, or a module whose
            convs are all taken), globs (``"layer3.*.conv2"``) or ``"re:"`` regexes.
        num_experts, routing, temperature, strategy: as for :class:`CondConv2d`.
        exclude: selectors of convs to leave alone, in the same forms.
        init: ``"upcycle"`` (the model's outputs are preserved exactly; see
            :meth:`CondConv2d.from_conv`) or ``"fresh"`` (train from scratch, as in the paper).
        perturbation: size of the symmetry-breaking expert offsets, relative to the
            kernel's standard deviation.
        seed: makes the offsets reproducible; each layer draws from a generator seeded
            by ``seed`` and its name, so a layer's experts do not depend on which other
            layers are converted. None uses torch's global generator.
        kernel_sizes: keep only convs with these kernel sizes (ints mean square kernels).
        min_channels: keep only convs with at least this many input and output channels.
        include_depthwise: whether depthwise convs (``groups == in_channels``) are kept.
        allow_classes: ``nn.Conv2d`` subclasses to convert although they are not plain
            ``nn.Conv2d``: only for subclasses whose forward is an ordinary convolution.
        input_size: ``(C, H, W)`` of one input sample; when given, one eval-mode
            forward on zeros measures every layer's shapes for the report's MAC counts.

    Returns:
        A :class:`ConversionReport`; its ``spec`` repeats the conversion on a fresh model.

    Raises:
        SelectorError: a selector (or exclude) matches no convolution; the message
            names the closest existing names.
        TypeError: the model or a selected module is TorchScript.
        ValueError: a selected conv is lazy and not yet initialized, or an option is invalid.

    Convs that are ``nn.Conv2d`` subclasses (not in ``allow_classes``) or carry a
    weight_norm/spectral_norm hook are skipped with a warning; layers that already are
    CondConv2d are listed in ``already_converted`` (converting twice changes nothing).

    Example:
        >>> model = resnet_tiny()
        >>> report = convert(model, ["layer3", "layer4"], num_experts=4, input_size=(3, 32, 32))
        >>> print(report.totals["layers"])
    """
    _refuse_torchscript(model)
    options = _check_options(num_experts, routing, temperature, strategy, init, perturbation, seed, min_channels, allow_classes)
    selectors = as_selector_list(layers, "layers")
    if not selectors:
        raise SelectorError("layers is empty; name at least one layer, e.g. 'layer4' or '*' for every Conv2d")
    excludes = as_selector_list(exclude, "exclude")
    kernels = kernel_filter(kernel_sizes)
    chosen = resolve(model, selectors, "layers")
    excluded = resolve(model, excludes, "exclude") if excludes else {}
    allowed = tuple(allow_classes)

    plan: Plan = []
    skipped: list[SkippedLayer] = []
    refused: list[SkippedLayer] = []
    already: list[str] = []
    for key, candidate in chosen.items():
        module = candidate.module
        if isinstance(module, CondConv2d):
            already.append(candidate.name)
        elif key in excluded:
            skipped.append(SkippedLayer(candidate.name, "excluded by exclude"))
        elif (reason := _refusal(module, allowed)) is not None:
            refused.append(SkippedLayer(candidate.name, reason))
        elif (reason := filter_reason(module, kernels, min_channels, include_depthwise)) is not None:
            skipped.append(SkippedLayer(candidate.name, reason))
        else:
            plan.append((candidate, LayerOptions(num_experts, routing, float(temperature), strategy, class_path(type(module)))))
    if refused:
        warnings.warn(
            "convert left these convs alone: " + "; ".join(f"{s.name} ({s.reason})" for s in refused), stacklevel=2
        )
    spec = ConversionSpec(
        layers={candidate.name: layer_options for candidate, layer_options in plan},
        selectors=selectors,
        exclude=excludes,
        options={**options, "kernel_sizes": [list(k) for k in sorted(kernels)] if kernels else None,
                 "include_depthwise": include_depthwise, "allow_classes": [class_path(c) for c in allowed]},
    )
    converted = _convert_planned(model, plan, init, perturbation, seed, input_size)
    return ConversionReport(converted, refused + skipped, already, spec, _size(input_size))


def convert_recorded(model: nn.Module, spec: ConversionSpec, *, input_size: Optional[Sequence[int]] = None) -> ConversionReport:
    """Convert exactly the layers ``spec`` names with their recorded options (``ConversionSpec.apply``)."""
    _refuse_torchscript(model)
    plan: Plan = []
    already: list[str] = []
    for name, layer_options in spec.layers.items():
        candidate = _recorded_conv(model, name)
        module = candidate.module
        if isinstance(module, CondConv2d):
            already.append(candidate.name)
            continue
        if layer_options.source_class not in (None, class_path(type(module))):
            raise TypeError(
                f"spec layer {name!r} was a {layer_options.source_class} when converted but is a "
                f"{class_path(type(module))} here; apply the spec to the architecture it was made from"
            )
        if (reason := _refusal(module, (type(module),))) is not None:
            raise ValueError(f"spec layer {name!r} cannot be converted: it {reason}")
        plan.append((candidate, layer_options))
    options = spec.options
    converted = _convert_planned(
        model, plan, options.get("init", "upcycle"), options.get("perturbation", 0.05), options.get("seed"), input_size
    )
    applied = ConversionSpec(dict(spec.layers), list(spec.selectors), list(spec.exclude), dict(options))
    return ConversionReport(converted, [], already, applied, _size(input_size))


def _convert_planned(
    model: nn.Module,
    plan: Plan,
    init: str,
    perturbation: float,
    seed: Optional[int],
    input_size: Optional[Sequence[int]],
) -> list[ConvertedLayer]:
    """The one mechanism both entry points share: measure, build with ``from_conv``, replace."""
    shapes = probe_shapes(model, [c.module for c, _ in plan], input_size) if input_size is not None and plan else {}
    replacements: dict[int, nn.Module] = {}
    records: list[ConvertedLayer] = []
    for candidate, options in plan:
        conv = candidate.module
        layer = CondConv2d.from_conv(
            conv,
            options.num_experts,
            routing=options.routing,
            temperature=options.temperature,
            strategy=options.strategy,
            init=init,
            perturbation=perturbation,
            generator=_layer_generator(seed, candidate.name),
        )
        carry_hooks(conv, layer)
        replacements[id(conv)] = layer
        records.append(ConvertedLayer.measure(candidate.name, candidate.aliases, conv, layer, shapes.get(id(conv))))
    replace_modules(model, replacements)
    return records


def _recorded_conv(model: nn.Module, name: str) -> Candidate:
    """The conv a spec names (wrapper prefixes on either side resolve, as for selectors)."""
    wanted = strip_wrapper_prefix(name)
    for candidate in resolve(model, [name], "spec layer").values():
        if wanted in {strip_wrapper_prefix(alias) for alias in candidate.aliases}:
            return candidate
    raise SelectorError(f"spec layer {name!r} is not a convolution in this model; apply the spec to the architecture it was made from")


def _layer_generator(seed: Optional[int], name: str) -> Optional[torch.Generator]:
    if seed is None:
        return None
    return torch.Generator().manual_seed((seed * 0x9E3779B1 + zlib.crc32(name.encode())) % 2**63)


def _refusal(module: nn.Module, allowed: tuple[type, ...]) -> Optional[str]:
    """Why a selected conv must not be converted, or None. Lazy convs are an error, not a skip."""
    if isinstance(module, LazyModuleMixin) and module.has_uninitialized_params():
        raise ValueError(
            f"cannot convert a lazy {type(module).__name__} before its shapes are known; run one forward pass "
            "through the model first so it materializes, then convert"
        )
    if type(module) is not nn.Conv2d and type(module) not in allowed:
        overrides = [m for m in ("forward", "_conv_forward") if getattr(type(module), m) is not getattr(nn.Conv2d, m)]
        what = f"overrides {' and '.join(overrides)}" if overrides else "may change what the conv computes"
        return (
            f"a subclass of nn.Conv2d ({class_path(type(module))}) that {what}; its behaviour would be lost. "
            f"Pass allow_classes=({type(module).__name__},) if its forward is a plain convolution"
        )
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, (WeightNorm, SpectralNorm)):
            return (
                f"has a {type(hook).__name__} hook that recomputes its weight every forward; remove it "
                "(torch.nn.utils.remove_weight_norm / remove_spectral_norm) before converting"
            )
    return None


def _refuse_torchscript(model: nn.Module) -> None:
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError(
            "cannot convert a TorchScript module: its compiled code would not see new layers; convert the eager "
            "nn.Module, then torch.jit.script the result"
        )


def _check_options(
    num_experts: int,
    routing: str,
    temperature: float,
    strategy: str,
    init: str,
    perturbation: float,
    seed: Optional[int],
    min_channels: int,
    allow_classes: Sequence[type],
) -> dict:
    """Validate every option before any layer changes; returns them as the spec records them."""
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be a positive integer, got {num_experts!r}")
    check_routing(routing)
    check_strategy(strategy)
    if not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    if init not in ("upcycle", "fresh"):
        raise ValueError(f"init must be 'upcycle' or 'fresh', got {init!r}")
    if not isinstance(perturbation, (int, float)) or not perturbation >= 0:
        raise ValueError(f"perturbation must be a number >= 0, got {perturbation!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"seed must be an integer or None, got {seed!r}")
    if isinstance(min_channels, bool) or not isinstance(min_channels, int) or min_channels < 0:
        raise ValueError(f"min_channels must be an integer >= 0, got {min_channels!r}")
    for cls in allow_classes:
        if not (isinstance(cls, type) and issubclass(cls, nn.Conv2d)):
            raise TypeError(f"allow_classes must hold nn.Conv2d subclasses, got {cls!r}")
    return {
        "num_experts": num_experts,
        "routing": routing,
        "temperature": float(temperature),
        "strategy": strategy,
        "init": init,
        "perturbation": float(perturbation),
        "seed": seed,
        "min_channels": min_channels,
    }


def _size(input_size: Optional[Sequence[int]]) -> Optional[tuple[int, ...]]:
    return tuple(input_size) if input_size is not None else None
