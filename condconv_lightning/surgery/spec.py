"""A conversion spec: the JSON record that rebuilds a converted architecture.

The state dict of a converted model only loads into a model with the same layers
converted the same way (``weight`` becomes ``[K, P]``, a ``router`` appears). The
spec records the library version, the selectors and options the caller used, and
every resolved layer name with the options that shape it, so :meth:`ConversionSpec.apply`
converts a fresh instance of the architecture into one whose
``load_state_dict(strict=True)`` accepts the converted weights.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence

import torch.nn as nn

from ..condconv2d import CondConv2d
from .report import ConversionReport

SPEC_FORMAT = 1


def library_version() -> str:
    from .. import __version__

    return __version__


def class_path(cls: type) -> str:
    """``module.QualName`` of a class, as the spec records it."""
    return f"{cls.__module__}.{cls.__qualname__}"


@dataclass(frozen=True)
class LayerOptions:
    """What shapes one CondConv2d beyond its conv's own configuration.

    ``source_class`` is the converted conv's class (``module.QualName``); None when
    unknown (a spec described from an already converted model): then any Conv2d class
    at that name is accepted.
    """

    num_experts: int
    routing: str
    temperature: float
    strategy: str
    source_class: Optional[str] = None


@dataclass
class ConversionSpec:
    """JSON-serializable record of a conversion; ``apply`` repeats it on a fresh model.

    Example:
        >>> spec = convert(model, "layer4").spec
        >>> fresh = resnet_tiny(); spec.apply(fresh)
        >>> fresh.load_state_dict(model.state_dict())  # strict
    """

    layers: dict[str, LayerOptions]
    selectors: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    version: str = field(default_factory=library_version)
    format: int = SPEC_FORMAT

    @classmethod
    def from_model(cls, model: nn.Module) -> "ConversionSpec":
        """Describe every CondConv2d already in ``model`` (the spec :func:`save_converted` writes by default)."""
        layers: dict[str, LayerOptions] = {}
        seen: set[int] = set()
        for name, module in model.named_modules(remove_duplicate=False):
            if isinstance(module, CondConv2d) and id(module) not in seen:
                seen.add(id(module))
                layers[name] = LayerOptions(
                    module.num_experts, module.routing, float(module.temperature), module.strategy
                )
        return cls(layers=layers, selectors=list(layers))

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "version": self.version,
            "selectors": list(self.selectors),
            "exclude": list(self.exclude),
            "options": dict(self.options),
            "layers": {name: asdict(options) for name, options in self.layers.items()},
        }

    def to_json(self, indent: Optional[int] = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ConversionSpec":
        """Rebuild a spec from :meth:`to_dict`'s output.

        Raises:
            ValueError: ``data`` is not a conversion spec, or one of a newer format.
        """
        if not isinstance(data, dict) or not isinstance(data.get("layers"), dict):
            raise ValueError("not a conversion spec: expected a JSON object with a 'layers' object (ConversionSpec.to_dict)")
        if data.get("format", SPEC_FORMAT) > SPEC_FORMAT:
            raise ValueError(
                f"conversion spec format {data['format']} is newer than this library reads ({SPEC_FORMAT}); "
                f"upgrade condconv-lightning (the spec was written by version {data.get('version')})"
            )
        try:
            layers = {name: LayerOptions(**options) for name, options in data["layers"].items()}
        except TypeError as error:
            raise ValueError(f"conversion spec has malformed layer options ({error})") from None
        return cls(
            layers=layers,
            selectors=list(data.get("selectors", [])),
            exclude=list(data.get("exclude", [])),
            options=dict(data.get("options", {})),
            version=str(data.get("version", "unknown")),
            format=int(data.get("format", SPEC_FORMAT)),
        )

    @classmethod
    def from_json(cls, text: str) -> "ConversionSpec":
        try:
            data = json.loads(text)
        except ValueError as error:
            raise ValueError(f"conversion spec is not valid JSON ({error})") from None
        return cls.from_dict(data)

    def apply(self, model: nn.Module, *, input_size: Optional[Sequence[int]] = None) -> "ConversionReport":
        """Convert the recorded layers of ``model`` (a fresh instance of the architecture) in place.

        Expert initialization repeats the recorded ``init``/``perturbation``/``seed``,
        so with a seed and the same original weights the result is identical.

        Raises:
            SelectorError: a recorded layer name does not exist in ``model``.
            TypeError: a recorded layer has another class in ``model`` than when it was converted.
        """
        from .convert import convert_recorded  # convert builds specs, so it is imported late

        return convert_recorded(model, self, input_size=input_size)

