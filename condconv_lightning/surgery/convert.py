"""``convert``: turn selected ``nn.Conv2d`` layers of any model into CondConv2d, in place.

Model surgery in the style of ``nn.SyncBatchNorm.convert_sync_batchnorm`` and peft's
``inject_adapter_in_model``: :meth:`CondConv2d.from_conv` builds each layer from its
conv (exact upcycling, so the model computes what it did), and :mod:`.replace` puts it
in every place the conv was. The choice of layers is :mod:`.select`'s; everything is
checked before the first module changes, so a refused conversion leaves the model as
it was.
"""

from __future__ import annotations

import dataclasses
import warnings
import zlib
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from ..compat import forward_pre_hooks, move_hooks
from ..condconv2d import CondConv2d
from ..messages import printable
from ..wrappers import strip
from .config import ConversionConfig
from .replace import modules_by_name, replace_modules, restore_modules
from .report import ConversionReport, ConvertedLayer, InputSizeError, LayerShapes, SkippedLayer, probe_shapes
from .select import (
    Candidate,
    SelectorError,
    Selectors,
    as_selector_list,
    candidates,
    closest_names,
    filter_reason,
    resolve,
)
from .spec import ConversionSpec, LayerOptions, class_path

Plan = list[tuple[Candidate, LayerOptions]]


def convert(
    model: nn.Module,
    layers: Selectors,
    config: ConversionConfig | None = None,
    *,
    exclude: Selectors | None = None,
    allow_classes: Sequence[type] = (),
    input_size: Sequence[int] | None = None,
    **options: Any,
) -> ConversionReport:
    """Replace the ``nn.Conv2d`` layers that ``layers`` selects by CondConv2d, in place.

    Args:
        model: any ``nn.Module`` (a LightningModule, a ``torch.compile`` or DataParallel
            wrapper too; not a DistributedDataParallel one: convert before wrapping).
        layers: one selector or several: exact dotted names (a conv, or a module whose
            convs are all taken), globs (``"layer3.*.conv2"``) or ``"re:"`` regexes.
        config: the conversion's options (:class:`ConversionConfig`); default options if None.
        exclude: selectors of convs to leave alone, in the same forms.
        allow_classes: ``nn.Conv2d`` subclasses to convert although they are not plain
            ``nn.Conv2d``: only for subclasses whose forward is an ordinary convolution.
        input_size: ``(C, H, W)`` of one input sample; when given, one eval-mode
            forward on zeros measures every layer's shapes for the report's MAC counts
            (and for ``include_squeeze_excitation=False``, which needs it).
        **options: fields of :class:`ConversionConfig` (``num_experts=8, seed=0``), on
            top of ``config``.

    Returns:
        A :class:`ConversionReport`; its ``spec`` repeats the conversion on a fresh model.

    Raises:
        SelectorError: a selector (or exclude) matches no convolution; the message
            names the closest existing names.
        TypeError: the model or a selected module is TorchScript, or an unknown option.
        ValueError: a selected conv is lazy and not yet initialized, an option is
            invalid, or the model is wrapped in DistributedDataParallel.

    Convs that are ``nn.Conv2d`` subclasses (not in ``allow_classes``) or carry a
    weight_norm/spectral_norm hook are skipped with a warning; layers that already are
    CondConv2d are listed in ``already_converted`` (converting twice changes nothing).

    Examples:
        >>> from condconv_lightning import convert
        >>> from condconv_lightning.demos import resnet_tiny
        >>> model = resnet_tiny()
        >>> report = convert(model, ["layer3", "layer4"], num_experts=4, input_size=(3, 32, 32))
        >>> print(report.totals["layers"])
    """
    _refuse_unconvertible_model(model)
    config = with_options(config, options)
    for cls in allow_classes:
        if not (isinstance(cls, type) and issubclass(cls, nn.Conv2d)):
            raise TypeError(f"allow_classes must hold nn.Conv2d subclasses, got {cls!r}")
    selectors = as_selector_list(layers, "layers")
    if not selectors:
        raise SelectorError("layers is empty; name at least one layer, e.g. 'layer4' or '*' for every Conv2d")
    excludes = as_selector_list(exclude, "exclude")
    chosen = resolve(model, selectors, "layers")
    excluded = resolve(model, excludes, "exclude") if excludes else {}
    if not config.include_squeeze_excitation and input_size is None:
        raise ValueError(
            "include_squeeze_excitation=False needs input_size=(C, H, W): only a forward pass shows which convs "
            "see a 1x1 input; pass the model's real input size"
        )
    allowed = tuple(allow_classes)
    for key, candidate in chosen.items():
        if key not in excluded:
            _refuse_lazy(candidate.module)  # before the probe, whose forward would materialize it
    # one probe serves the filters (input sizes) and the report (MACs); it fails before anything changes
    shapes = probe_shapes(model, [c.module for c in chosen.values()], input_size) if input_size is not None else {}

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
        elif (reason := filter_reason(module, config, _input_hw(shapes, module))) is not None:
            skipped.append(SkippedLayer(candidate.name, reason))
        else:
            layer_options = LayerOptions(
                config.num_experts, config.routing, config.temperature, config.strategy, class_path(type(module))
            )
            plan.append((candidate, layer_options))
    if refused:
        warnings.warn(
            printable("convert left these convs alone: " + "; ".join(f"{s.name} ({s.reason})" for s in refused)),
            stacklevel=2,
        )
    if plan and config.init == "upcycle" and (reason := config.inexactness) is not None:
        warnings.warn(
            f"the converted layers will not compute what their convs did: {reason}; for an exact conversion with a "
            "random router, use routing='softmax' or 'normalized_sigmoid' with perturbation=0",
            stacklevel=2,
        )
    if tied := _tied_weights(model, [candidate.module for candidate, _ in plan]):
        warnings.warn(
            printable(
                f"convert gives each CondConv2d its own experts, so these convs no longer share their weight: {tied}; "
                "they compute what they did now and train apart from here on"
            ),
            stacklevel=2,
        )
    spec = ConversionSpec(
        layers={candidate.name: layer_options for candidate, layer_options in plan},
        selectors=selectors,
        exclude=excludes,
        config=config,
        allow_classes=[class_path(c) for c in allowed],
    )
    converted = _convert_planned(model, plan, config, input_size, shapes)
    return ConversionReport(converted, refused + skipped, already, spec, _size(input_size))


def _tied_weights(model: nn.Module, planned: list[nn.Module]) -> str:
    """Names of convs that share one weight tensor with a conv about to be converted ('a = b' groups), or ''."""
    converting = {id(module) for module in planned}
    by_weight: dict[int, list[tuple[str, nn.Module]]] = {}
    for name, module in model.named_modules():  # a module used twice is listed once: it stays one layer
        if isinstance(module, nn.Conv2d) and not isinstance(module, CondConv2d):
            by_weight.setdefault(id(module.weight), []).append((name, module))
    groups = [
        " = ".join(name for name, _ in sharing)
        for sharing in by_weight.values()
        if len(sharing) > 1 and any(id(module) in converting for _, module in sharing)
    ]
    return "; ".join(groups)


def with_options(config: ConversionConfig | None, options: dict[str, Any]) -> ConversionConfig:
    """``config`` (default: the defaults) with ``options`` (its field names) replaced; validated."""
    unknown = sorted(set(options) - set(ConversionConfig.field_names()))
    if unknown:
        raise TypeError(
            f"unknown conversion option {unknown[0]!r}; options are the fields of ConversionConfig: "
            f"{', '.join(ConversionConfig.field_names())}"
        )
    return dataclasses.replace(config or ConversionConfig(), **options)


def apply_spec(
    model: nn.Module, spec: ConversionSpec, *, input_size: Sequence[int] | None = None, upcycle: bool = True
) -> ConversionReport:
    """Convert exactly the layers ``spec`` names, with their recorded options, in ``model`` (a fresh instance).

    Expert initialization repeats the recorded ``init``/``perturbation``/``seed``, so with
    a seed and the same original weights the result is identical. ``upcycle=False``
    skips the upcycling draws, for callers that load converted weights next.

    Raises:
        SelectorError: a recorded layer name is not a convolution in ``model``.
        TypeError: a recorded layer has another class in ``model`` than when it was converted.
    """
    _refuse_unconvertible_model(model)
    plan: Plan = []
    already: list[str] = []
    named: dict[int, tuple[str, LayerOptions]] = {}  # a module named by several aliases is converted once
    found = candidates(model)
    by_name: dict[str, Candidate] = {}
    for candidate in found:  # the first conv (in module order) a stripped name belongs to
        for alias in candidate.aliases:
            by_name.setdefault(strip(alias), candidate)
    for name, layer_options in spec.layers.items():
        candidate = _recorded_conv(by_name, found, name)
        module = candidate.module
        if id(module) in named:
            first, first_options = named[id(module)]
            if first_options != layer_options:
                raise ValueError(
                    f"spec layers {first!r:.80} and {name!r:.80} name the same layer with different options; "
                    "keep one of them"
                )
            continue
        named[id(module)] = (name, layer_options)
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
    config = spec.config if upcycle else dataclasses.replace(spec.config, init="fresh")
    converted = _convert_planned(model, plan, config, input_size)
    return ConversionReport(converted, [], already, dataclasses.replace(spec), _size(input_size))


def describe(model: nn.Module) -> ConversionSpec:
    """A spec of every CondConv2d already in ``model`` (what :func:`save_converted` writes by default)."""
    layers: dict[str, LayerOptions] = {}
    for candidate in candidates(model):
        module = candidate.module
        if isinstance(module, CondConv2d):
            layers[candidate.name] = LayerOptions(
                module.num_experts, module.routing, float(module.temperature), module.strategy
            )
    return ConversionSpec(layers=layers, selectors=list(layers))


def _convert_planned(
    model: nn.Module,
    plan: Plan,
    config: ConversionConfig,
    input_size: Sequence[int] | None,
    shapes: dict[int, LayerShapes] | None = None,
) -> list[ConvertedLayer]:
    """The one mechanism both entry points share: measure, build with ``from_conv``, replace.

    With ``input_size``, the model is probed before (shapes, unless the caller measured them)
    and after the replacement (the strategy each CondConv2d ran); a failure of either changes nothing.
    """
    if shapes is None:
        shapes = probe_shapes(model, [c.module for c, _ in plan], input_size) if input_size is not None and plan else {}
    replacements: dict[int, nn.Module] = {}
    built: list[tuple[Candidate, nn.Module, CondConv2d]] = []
    for candidate, options in plan:
        conv = candidate.module
        layer = CondConv2d.from_conv(
            conv,
            options.num_experts,
            routing=options.routing,
            temperature=options.temperature,
            strategy=options.strategy,
            init=config.init,
            perturbation=config.perturbation,
            router_init=config.router_init,
            router_scale=config.router_scale,
            generator=_layer_generator(config.seed, candidate.name),
        )
        move_hooks(conv, layer)
        replacements[id(conv)] = layer
        built.append((candidate, conv, layer))
    before = modules_by_name(model)
    replace_modules(model, replacements)
    try:
        ran = (
            probe_shapes(model, [layer for *_, layer in built], input_size) if input_size is not None and built else {}
        )
    except BaseException as error:  # the converted model cannot run (fused without Triton, say): leave it as it was
        restore_modules(model, before)
        if isinstance(error, InputSizeError):  # the input fitted the model before: the options are at fault
            raise ValueError(
                f"the converted model fails on input_size={error.input_size} ({error.reason}); nothing was "
                "converted: check the conversion options (the strategy, say)"
            ) from None
        raise
    return [
        ConvertedLayer.measure(c.name, c.aliases, conv, layer, shapes.get(id(conv)), ran.get(id(layer)))
        for c, conv, layer in built
    ]


def _recorded_conv(by_name: dict[str, Candidate], found: list[Candidate], name: str) -> Candidate:
    """The conv a spec names, looked up exactly (wrapper prefixes on either side resolve); never a pattern.

    ``by_name`` maps each alias of each of the model's convs (``found``), wrapper prefixes stripped, to it.
    """
    candidate = by_name.get(strip(name))
    if candidate is not None:
        return candidate
    raise SelectorError(
        f"spec layer {name!r} is not a convolution in this model "
        f"(closest: {closest_names(name, [c.name for c in found])}); "
        "apply the spec to the architecture it was made from"
    )


def _layer_generator(seed: int | None, name: str) -> torch.Generator | None:
    if seed is None:
        return None
    return torch.Generator().manual_seed((seed * 0x9E3779B1 + zlib.crc32(name.encode())) % 2**63)


def _refuse_lazy(module: nn.Module) -> None:
    """Lazy convs are an error, not a skip: converting them later is the user's fix."""
    if isinstance(module, LazyModuleMixin) and module.has_uninitialized_params():
        raise ValueError(
            f"cannot convert a lazy {type(module).__name__} before its shapes are known; run one forward pass "
            "through the model first so it materializes, then convert"
        )


def _refusal(module: nn.Module, allowed: tuple[type, ...]) -> str | None:
    """Why a selected conv must not be converted, or None."""
    _refuse_lazy(module)
    if type(module) is not nn.Conv2d and type(module) not in allowed:
        overrides = [m for m in ("forward", "_conv_forward") if getattr(type(module), m) is not getattr(nn.Conv2d, m)]
        what = f"overrides {' and '.join(overrides)}" if overrides else "may change what the conv computes"
        return (
            f"a subclass of nn.Conv2d ({class_path(type(module))}) that {what}; its behaviour would be lost. "
            f"Pass allow_classes=({type(module).__name__},) if its forward is a plain convolution"
        )
    for hook in forward_pre_hooks(module):
        if isinstance(hook, (WeightNorm, SpectralNorm)):
            return (
                f"has a {type(hook).__name__} hook that recomputes its weight every forward; remove it "
                "(torch.nn.utils.remove_weight_norm / remove_spectral_norm) before converting"
            )
    return None


def _refuse_unconvertible_model(model: nn.Module) -> None:
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError(
            "cannot convert a TorchScript module: its compiled code would not see new layers; convert the eager "
            "nn.Module, then torch.jit.script the result"
        )
    for name, module in model.named_modules():
        if isinstance(module, nn.parallel.DistributedDataParallel):
            where = f" at {name!r}" if name else ""
            raise ValueError(
                f"the model{where} is wrapped in DistributedDataParallel, which registered its parameters and "
                "gradient hooks when it was built, so converted layers would not be synchronized; convert the inner "
                "model (ddp.module) first, then wrap it in DDP"
            )


def _input_hw(shapes: dict[int, LayerShapes], module: nn.Module) -> tuple[int, int] | None:
    measured = shapes.get(id(module))
    return measured.input_hw if measured is not None else None


def _size(input_size: Sequence[int] | None) -> tuple[int, ...] | None:
    return tuple(input_size) if input_size is not None else None
