"""CondConv2d: a drop-in replacement for ``nn.Conv2d`` with K routed expert kernels.

CondConv: Conditionally Parameterized Convolutions for Efficient Inference
(Yang, Bender, Le, Ngiam; NeurIPS 2019, arXiv:1904.04971). Softmax routing with a
temperature follows Dynamic Convolution (Chen et al., CVPR 2020, arXiv:1912.03458).

Parameter layout (as in timm's ``CondConv2d``): ``weight`` is 2-D ``[K, P]`` with
``P = Cout * Cin/groups * kh * kw`` and ``bias`` is ``[K, Cout]``. A 2-D tensor is
left alone by ``model.to(memory_format=torch.channels_last)`` (which accepts only
4-D parameters and would reject a 5-D one), and ``expert_weight()`` views it as
``[K, Cout, Cin/groups, kh, kw]`` without a copy. The router is ``router``, an
``nn.Linear(in_channels, K)`` over the globally average-pooled input.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn as nn
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from .arguments import check_num_experts, check_temperature
from .functional.condconv import (
    PADDING_MODES,
    IntPair,
    Padding,
    Strategy,
    check_strategy,
    condconv2d,
    condconv2d_with_strategy,
    pair,
)
from .functional.routing import Routing, check_routing, route, sums_to_one, uniform_routing

# torch.fx records the functional call as one node instead of tracing its shape logic,
# so models containing CondConv2d stay symbolically traceable.
torch.fx.wrap("condconv2d")

RoutingHook = Callable[["CondConv2d", Tensor], None]
CONV_SETTINGS: tuple[str, ...] = (
    "in_channels",
    "out_channels",
    "kernel_size",
    "stride",
    "padding",
    "dilation",
    "groups",
    "padding_mode",
)


def conv_settings(conv: nn.Module) -> dict[str, object]:
    """The ``nn.Conv2d`` constructor arguments of ``conv`` (an ``nn.Conv2d`` or a CondConv2d), ``bias`` as a bool.

    Both layers name their settings alike, so this one mapping converts in either direction.
    """
    return {**{name: getattr(conv, name) for name in CONV_SETTINGS}, "bias": conv.bias is not None}


def check_loaded_temperature(module: nn.Module, state_dict: dict[str, object], prefix: str, *args: object) -> None:
    """A ``load_state_dict`` pre-hook: the ``temperature`` a state dict brings is checked as the argument is
    (0 and NaN make every output NaN), before anything of the layer is copied. A missing or misshapen
    entry is left for ``load_state_dict`` to report."""
    key = f"{prefix}temperature"
    value = state_dict.get(key)
    if not isinstance(value, Tensor) or value.numel() != 1 or value.is_meta:
        return
    try:
        check_temperature(value.item())
    except ValueError as error:
        raise ValueError(f"state dict entry {key!r}: {error}; the weights are damaged, load another file") from None


ExpertInit = Literal["upcycle", "fresh"]
RouterInit = Literal["zero", "random"]


def upcycling_inexactness(routing: str, router_init: str, perturbation: float) -> str | None:
    """Why upcycling with these options does not reproduce the conv exactly, or None when it does.

    A zero router gives every expert the same weight ``c`` for every input, and the experts
    ``(W + d_k) / (K c)`` with zero-sum offsets ``d_k`` then mix to ``W``. A random router
    mixes unevenly, which only routing weights that sum to one absorb, and only when the
    experts are identical (no offsets).
    """
    if router_init == "zero":
        return None
    if not sums_to_one(routing):
        return f"a random router under {routing} routing mixes the experts to more or less than the conv's kernel"
    if perturbation > 0:
        return f"a random router mixes the perturbed experts unevenly (perturbation {perturbation:g})"
    return None


class CondConv2d(nn.Module):
    """A convolution whose kernel is a per-sample, input-routed mixture of ``num_experts`` kernels.

    Takes every argument of ``nn.Conv2d`` with the same meaning, plus:

    Args:
        num_experts: K, the number of expert kernels.
        routing: ``'sigmoid'`` (CondConv), ``'softmax'`` (DynamicConv) or
            ``'normalized_sigmoid'`` (sigmoid weights divided by their sum) over the
            router's logits divided by ``temperature``.
        temperature: divides the router's logits; stored as the buffer
            ``temperature`` (change it with :meth:`set_temperature`). A state dict
            loaded into the layer (``load_state_dict``, :func:`load_converted`, a
            Lightning checkpoint) is checked alike: a temperature of 0, below 0, inf
            or NaN is a ``ValueError`` naming the key, raised before anything of the
            layer is copied.
        strategy: how the convolution is executed: ``'auto'``, ``'grouped'``,
            ``'mixture'``, ``'bmm'`` or ``'fused'`` (Triton, CUDA only; see
            :mod:`condconv_lightning.functional`).
            All compute the same function; assign ``layer.strategy`` to change it.
            ``layer.last_strategy`` is the strategy its last forward ran (what ``auto``
            chose), or None before the first forward and in a ``torch.fx`` traced copy.

    Observing routing: :meth:`register_routing_hook` registers ``hook(layer, r)``,
    called during every forward with the detached routing weights ``r`` of shape
    ``[B, K]`` that the forward used. Detaching means no autograd graph outlives the
    step; the hook runs only if registered, so an unobserved layer pays nothing.

    Examples:
        >>> layer = CondConv2d(16, 32, 3, padding=1, num_experts=4)
        >>> layer(torch.randn(2, 16, 8, 8)).shape
        torch.Size([2, 32, 8, 8])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntPair,
        stride: IntPair = 1,
        padding: Padding = 0,
        dilation: IntPair = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        num_experts: int = 4,
        routing: Routing = "sigmoid",
        temperature: float = 1.0,
        strategy: Strategy = "auto",
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        if not isinstance(groups, int) or groups < 1:
            raise ValueError(f"groups must be a positive integer, got {groups!r}")
        for name, channels in (("in_channels", in_channels), ("out_channels", out_channels)):
            if not isinstance(channels, int) or isinstance(channels, bool) or channels < 1:
                raise ValueError(f"{name} must be a positive integer, got {channels!r}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"in_channels ({in_channels}) and out_channels ({out_channels}) must both be divisible by "
                f"groups ({groups})"
            )
        check_num_experts(num_experts)
        check_temperature(temperature)
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = pair(kernel_size, "kernel_size", positive=True)
        self.stride = pair(stride, "stride", positive=True)
        self.dilation = pair(dilation, "dilation", positive=True)
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"padding must be 'same', 'valid', an int or a pair of ints, got {padding!r}")
            if padding == "same" and self.stride != (1, 1):
                raise ValueError("padding='same' is not supported for strided convolutions (as in nn.Conv2d)")
            self.padding: str | tuple[int, int] = padding
        else:
            self.padding = pair(padding, "padding")
        self.groups = groups
        self.padding_mode = padding_mode
        self.transposed = False
        self.output_padding = (0, 0)
        self.num_experts = num_experts
        self.routing = check_routing(routing)
        self.strategy = check_strategy(strategy)
        self.last_strategy: str | None = None

        kh, kw = self.kernel_size
        self.weight = nn.Parameter(
            torch.empty(num_experts, out_channels * (in_channels // groups) * kh * kw, **factory)
        )
        if bias:
            self.bias = nn.Parameter(torch.empty(num_experts, out_channels, **factory))
        else:
            self.register_parameter("bias", None)
        self.router = nn.Linear(in_channels, num_experts, **factory)
        self.register_buffer("temperature", torch.tensor(float(temperature), **factory))
        self._routing_hooks: OrderedDict[int, RoutingHook] = OrderedDict()
        self.register_load_state_dict_pre_hook(check_loaded_temperature)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialize each expert as ``nn.Conv2d`` initializes its one kernel.

        ``nn.Conv2d`` uses ``kaiming_uniform_(a=sqrt(5))``, i.e. U(-1/sqrt(fan_in),
        1/sqrt(fan_in)) with ``fan_in = Cin/groups * kh * kw`` of a single kernel, and
        the same bound for the bias. Computing fan-in on the stacked expert tensor
        would shrink the init (a known bug elsewhere); here it is per expert.
        """
        bound = 1.0 / math.sqrt(self.fan_in)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)
        self.router.reset_parameters()

    @property
    def fan_in(self) -> int:
        """Fan-in of one expert kernel: ``Cin/groups * kh * kw``."""
        return (self.in_channels // self.groups) * self.kernel_size[0] * self.kernel_size[1]

    def expert_weight(self) -> Tensor:
        """The experts as ``[K, Cout, Cin/groups, kh, kw]``: a view of ``weight``, not a copy."""
        return self.weight.view(self.num_experts, self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    def expert_bias(self) -> Tensor | None:
        """The per-expert biases ``[K, Cout]`` (the parameter itself), or None."""
        return self.bias

    def route(self, x: Tensor) -> Tensor:
        """Routing weights ``[B, K]`` this layer uses for input ``x``."""
        return route(x, self.router.weight, self.router.bias, self.routing, self.temperature)

    def set_temperature(self, temperature: float) -> None:
        """Set the routing temperature in place (no recompilation under ``torch.compile``)."""
        with torch.no_grad():
            self.temperature.fill_(check_temperature(temperature))

    def register_routing_hook(self, hook: RoutingHook) -> RemovableHandle:
        """Call ``hook(layer, routing_weights)`` in every forward; returns a handle with ``remove()``.

        ``routing_weights`` is the detached ``[B, K]`` tensor the forward used, on the
        input's device: accumulate it on device to avoid host synchronizations. Hooks
        are not copied by ``copy.deepcopy`` or pickling: a copy of a model does not
        report into its original's monitors.
        """
        handle = RemovableHandle(self._routing_hooks)
        self._routing_hooks[handle.id] = hook
        return handle

    def forward(self, x: Tensor) -> Tensor:
        routing_weights = self.route(x)
        if self._routing_hooks:
            detached = routing_weights.detach().reshape(-1, self.num_experts)
            for hook in self._routing_hooks.values():
                hook(self, detached)
        args = (
            x,
            self.expert_weight(),
            routing_weights,
            self.bias,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            self.padding_mode,
            self.strategy,
        )
        if isinstance(x, torch.fx.Proxy):  # symbolic tracing: one condconv2d node, see torch.fx.wrap above
            return condconv2d(*args)
        output, self.last_strategy = condconv2d_with_strategy(*args)
        return output

    def __getstate__(self) -> dict:
        # Used by pickling and by copy.deepcopy: routing hooks belong to their observers.
        state = self.__dict__.copy()
        state["_routing_hooks"] = OrderedDict()
        return state

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        if self.padding != (0, 0):
            s += f", padding={self.padding!r}" if isinstance(self.padding, str) else f", padding={self.padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode}"
        return s + f", num_experts={self.num_experts}, routing={self.routing}, strategy={self.strategy}"

    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d,
        num_experts: int = 4,
        *,
        routing: Routing = "sigmoid",
        temperature: float = 1.0,
        strategy: Strategy = "auto",
        init: ExpertInit = "upcycle",
        perturbation: float = 0.05,
        router_init: RouterInit = "zero",
        router_scale: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> CondConv2d:
        """Build a CondConv2d with ``conv``'s configuration, device, dtype, mode and ``requires_grad``.

        ``init='upcycle'`` seeds the experts from ``conv`` (:meth:`upcycle_`): the new layer
        computes exactly what ``conv`` did, for every input, until training moves it, unless
        :func:`upcycling_inexactness` names a reason it cannot (a random router under plain
        sigmoid routing, or a random router with perturbed experts).

        ``init='fresh'`` keeps the from-scratch init of the constructor (training from
        scratch, as in the paper): the layer then does not reproduce ``conv``.
        """
        if init not in ("upcycle", "fresh"):
            raise ValueError(f"init must be 'upcycle' or 'fresh', got {init!r}")
        weight = conv.weight
        options = dict(
            conv_settings(conv),
            dtype=weight.dtype,
            num_experts=num_experts,
            routing=routing,
            temperature=temperature,
            strategy=strategy,
        )
        if init == "fresh":
            layer = cls(device=weight.device, **options)
        else:
            # Built on the meta device: upcycling overwrites every parameter, so the
            # random from-scratch init (K x the conv's weights) would be wasted work.
            layer = cls(device="meta", **options)
            layer = layer.to_empty(device=weight.device)
            layer.temperature.fill_(float(temperature))
            layer.upcycle_(
                conv.weight,
                conv.bias,
                perturbation=perturbation,
                router_init=router_init,
                router_scale=router_scale,
                generator=generator,
            )
        layer.weight.requires_grad_(weight.requires_grad)
        layer.router.requires_grad_(weight.requires_grad)
        if layer.bias is not None:
            layer.bias.requires_grad_(conv.bias.requires_grad)
        return layer.train(conv.training)

    @torch.no_grad()
    def upcycle_(
        self,
        weight: Tensor,
        bias: Tensor | None = None,
        *,
        perturbation: float = 0.05,
        router_init: RouterInit = "zero",
        router_scale: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> CondConv2d:
        """Seed experts and router in place from a conv's ``weight`` and ``bias`` (exact upcycling).

        - Expert ``k`` is ``(W + d_k) / (K c)``, where ``c`` is the weight a zero router gives
          every expert (``sigmoid(0) = 1/2``; ``1/K`` for routings that sum to one) and
          ``d_k = s * std(W) * (n_k - mean_j n_j)`` with Gaussian ``n_k`` and ``s = perturbation``;
          the ``d_k`` sum to zero, so ``sum_k c E_k = W``. The bias is routed the same way, ``b / (K c)``.
        - ``router_init='zero'``: zero router weight and bias, so every sample is routed by ``c``
          and the layer computes ``conv2d(x, weight, bias)`` exactly. Every expert and router row
          then gets the same gradient up to the small ``d_k``: under sigmoid routing the layer
          stays close to one kernel times a per-sample scale.
        - ``router_init='random'``: router weights drawn from ``N(0, (router_scale / sqrt(C_in))^2)``
          (logits of about ``router_scale`` times the pooled input's scale), bias zero. Each
          expert then gets its own share of every sample's gradient from the first step. Exact
          only for routings whose weights sum to one and ``perturbation=0`` (identical experts
          mix to ``W`` whatever the weights); :func:`upcycling_inexactness` says when not.

        Computed on the CPU in float32, or float64 for a float64 weight (whose exactness float32
        would round away), then copied.
        """
        expected = (self.out_channels, self.in_channels // self.groups, *self.kernel_size)
        if tuple(weight.shape) != expected:
            raise ValueError(f"weight must have shape {expected}, got {tuple(weight.shape)}")
        if (bias is None) != (self.bias is None):
            raise ValueError("bias must be given exactly when the layer has a bias")
        if not perturbation >= 0:
            raise ValueError(f"perturbation must be >= 0, got {perturbation!r}")
        if router_init not in ("zero", "random"):
            raise ValueError(f"router_init must be 'zero' or 'random', got {router_init!r}")
        if not (router_scale > 0 and math.isfinite(router_scale)):
            raise ValueError(f"router_scale must be a positive finite number, got {router_scale!r}")
        k = self.num_experts
        scale = 1.0 / (k * uniform_routing(self.routing, k))
        # float32 is enough below float64: the offsets sum to zero up to float32 rounding, the
        # same rounding the experts get when stored; drawing K x P float64 numbers was the
        # main cost of converting large models. The draws are float32 in both cases, so a
        # seed gives the same experts up to rounding in every dtype.
        dtype = torch.promote_types(torch.float32, weight.dtype)
        w = weight.detach().to(device="cpu", dtype=dtype).reshape(1, -1)
        spread = float(w.std()) if w.numel() > 1 else 0.0
        if not spread > 0:
            spread = 1.0 / math.sqrt(self.fan_in)
        noise = torch.randn(k, w.shape[1], generator=generator).to(dtype)
        offsets = noise.sub_(noise.mean(dim=0, keepdim=True)).mul_(perturbation * spread)
        self.weight.copy_(offsets.add_(w).mul_(scale))
        if bias is not None:
            self.bias.copy_(bias.detach().to(device="cpu", dtype=dtype).expand(k, -1) * scale)
        self.router.bias.zero_()
        if router_init == "zero":
            self.router.weight.zero_()
        else:
            std = router_scale / math.sqrt(self.in_channels)
            self.router.weight.copy_(torch.randn(self.router.weight.shape, generator=generator).mul_(std))
        return self
