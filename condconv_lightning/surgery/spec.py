"""A conversion spec: the JSON record that rebuilds a converted architecture.

The state dict of a converted model only loads into a model with the same layers
converted the same way (``weight`` becomes ``[K, P]``, a ``router`` appears). The
spec records the library version, the selectors and the :class:`ConversionConfig`
the caller used, and every resolved layer name with the options that shape it, so
:func:`~condconv_lightning.surgery.apply_spec` converts a fresh instance of the
architecture into one whose ``load_state_dict(strict=True)`` accepts the converted
weights.

A spec is pure data. Specs travel inside model files and checkpoints, so reading one
validates every field (types, ranges, name syntax) before anything is allocated;
layer names are looked up exactly, never compiled as patterns.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from ..arguments import check_choice, check_num_experts, check_temperature
from ..functional.condconv import STRATEGIES
from ..functional.routing import ROUTINGS
from ..version import __version__
from .config import ConversionConfig

SPEC_FORMAT = 1
MAX_TEXT = 1000
"""Longest layer name, selector or class path a spec may hold."""
CLASS_PATH = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")


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
    source_class: str | None = None

    def __post_init__(self) -> None:
        check_num_experts(self.num_experts)
        check_choice("routing", self.routing, ROUTINGS)
        object.__setattr__(self, "temperature", check_temperature(self.temperature))
        check_choice("strategy", self.strategy, STRATEGIES)
        if self.source_class is not None and not _is_class_path(self.source_class):
            raise ValueError(f"source_class must be a dotted class path or None, got {self.source_class!r:.80}")


@dataclass
class ConversionSpec:
    """JSON-serializable record of a conversion; :func:`apply_spec` repeats it on a fresh model.

    Examples:
        >>> from condconv_lightning import apply_spec, convert
        >>> from condconv_lightning.demos import resnet_tiny
        >>> model = resnet_tiny()
        >>> spec = convert(model, "layer4").spec
        >>> fresh = resnet_tiny(); apply_spec(fresh, spec)
        >>> fresh.load_state_dict(model.state_dict())  # strict
    """

    layers: dict[str, LayerOptions]
    selectors: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    config: ConversionConfig = field(default_factory=ConversionConfig)
    allow_classes: list[str] = field(default_factory=list)
    version: str = __version__
    format: int = SPEC_FORMAT

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "version": self.version,
            "selectors": list(self.selectors),
            "exclude": list(self.exclude),
            "options": self.config.to_dict(),
            "allow_classes": list(self.allow_classes),
            "layers": {name: asdict(options) for name, options in self.layers.items()},
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: object) -> ConversionSpec:
        """Rebuild and validate a spec from :meth:`to_dict`'s output (or a file's).

        Raises:
            ValueError: ``data`` is not a valid conversion spec (the message names the
                offending field), or one of a newer format.
        """
        if not isinstance(data, Mapping) or not isinstance(data.get("layers"), Mapping):
            raise ValueError(
                "not a conversion spec: expected a JSON object with a 'layers' object (ConversionSpec.to_dict)"
            )
        spec_format = data.get("format", SPEC_FORMAT)
        if isinstance(spec_format, bool) or not isinstance(spec_format, int):
            raise ValueError(f"conversion spec format must be an integer, got {spec_format!r:.80}")
        version = _text(data.get("version", "unknown"), "version")
        if spec_format > SPEC_FORMAT:
            raise ValueError(
                f"conversion spec format {spec_format} is newer than this library reads ({SPEC_FORMAT}); "
                f"upgrade condconv-lightning (the spec was written by version {version})"
            )
        options = data.get("options", {})
        if not isinstance(options, Mapping):
            raise ValueError(f"conversion spec options must be an object, got {type(options).__name__}")
        # specs of the first release kept allow_classes among the options
        options = dict(options)
        allow_classes = options.pop("allow_classes", None) or data.get("allow_classes", [])
        try:
            layers = {
                _layer_name(name): LayerOptions(**_object(options_of_layer, name))
                for name, options_of_layer in data["layers"].items()
            }
            return cls(
                layers=layers,
                selectors=_texts(data.get("selectors", []), "selectors"),
                exclude=_texts(data.get("exclude", []), "exclude"),
                config=ConversionConfig.from_dict(options),
                allow_classes=[_class_path_text(path) for path in _texts(allow_classes, "allow_classes")],
                version=version,
                format=spec_format,
            )
        except (TypeError, ValueError) as error:
            raise ValueError(f"invalid conversion spec: {error}") from None

    @classmethod
    def from_json(cls, text: str) -> ConversionSpec:
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as error:  # RecursionError: nesting deeper than Python's stack
            raise ValueError(f"conversion spec is not valid JSON ({type(error).__name__}: {error})") from None
        return cls.from_dict(data)


def _is_class_path(value: object) -> bool:
    return isinstance(value, str) and len(value) <= MAX_TEXT and CLASS_PATH.match(value) is not None


def _class_path_text(value: str) -> str:
    if not _is_class_path(value):
        raise ValueError(f"allow_classes must hold dotted class paths, got {value!r:.80}")
    return value


def _text(value: object, what: str) -> str:
    if not isinstance(value, str) or len(value) > MAX_TEXT:
        raise ValueError(f"{what} must be a string of at most {MAX_TEXT} characters, got {value!r:.80}")
    return value


def _texts(values: object, what: str) -> list[str]:
    if not isinstance(values, list):
        raise ValueError(f"{what} must be a list of strings, got {type(values).__name__}")
    return [_text(value, what) for value in values]


def _layer_name(name: object) -> str:
    """A dotted module path: non-empty parts, no pattern syntax (names are looked up exactly)."""
    text = _text(name, "a layer name")
    if not text or any(not part for part in text.split(".")) or text.startswith("re:"):
        raise ValueError(f"layer names must be dotted module paths such as 'layer3.0.conv1', got {text!r:.80}")
    return text


def _object(value: object, name: str) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise ValueError(f"layer {name!r:.80} must map to an object of options, got {type(value).__name__}")
    return dict(value)
