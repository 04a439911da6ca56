"""The ``fused`` strategy (Triton kernels) against the independent float64 reference (tests/reference.py).

On the CPU the kernels run through Triton's interpreter. Triton 3.8 reads ``TRITON_INTERPRET``
whenever ``triton.jit`` decorates a function (its own library functions such as ``tl.sum``
at import) and whenever its ``knobs.runtime.interpret`` is read. The library's kernels call
Triton builtins only, and it builds interpreted launchers (``InterpretedFunction``) or
compiled ones per call from the variable's current value, so the ``interpret`` fixture sets
it for one test at a time; the rest of the suite, and the CUDA tests here, run without it
(``test_interpreter_leaves_triton_unpatched`` checks that nothing leaks).

Outputs and gradients with respect to the input, experts, bias and router are compared,
relative to the largest magnitude of the reference tensor: float32 2e-5, bfloat16 4e-2
(as in tests/test_reference.py), float16 5e-3 (11 bits of mantissa against bfloat16's 8).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn as nn
from reference import check_against_reference

from condconv_lightning import CondConv2d
from condconv_lightning.functional import condconv2d

FP32_TOL = 2e-5
BF16_TOL = 4e-2
FP16_TOL = 5e-3
TOLERANCES = {"fp32": FP32_TOL, "bf16": BF16_TOL, "bf16-autocast": BF16_TOL, "fp16-autocast": FP16_TOL}

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="the fused strategy needs triton")
needs_cuda = pytest.mark.cuda

BASE = dict(in_channels=4, out_channels=6, kernel_size=3, padding=1, batch=3, size=(9, 8), num_experts=4)
CASES = {
    "k1": dict(kernel_size=1, padding=0),
    "k3": dict(),
    "k5-K8": dict(kernel_size=5, padding=2, num_experts=8),
    "k3x5": dict(kernel_size=(3, 5), padding=(1, 2)),
    "k1-stride2": dict(kernel_size=1, padding=0, stride=2),
    "stride2": dict(stride=2),
    "stride2x1-nhwc": dict(stride=(2, 1), channels_last=True),
    "dilation2": dict(dilation=2, padding=2),
    "dilation1x2-stride2": dict(dilation=(1, 2), padding=(1, 2), stride=2),
    "groups2": dict(groups=2),
    "groups2-k1-nhwc": dict(groups=2, kernel_size=1, padding=0, channels_last=True),
    "groups2-stride2-dilation2-nhwc": dict(groups=2, stride=2, dilation=2, padding=2, channels_last=True),
    "nhwc-k3": dict(channels_last=True),
    "nhwc-k5-stride2": dict(kernel_size=5, padding=2, stride=2, channels_last=True),
    "K1": dict(num_experts=1),
    "K8-batch5-softmax": dict(num_experts=8, batch=5, routing="softmax"),
    "batch1": dict(batch=1),
    "batch5-nhwc": dict(batch=5, channels_last=True),
    "softmax-no-bias": dict(routing="softmax", bias=False),
    "k1-no-bias": dict(kernel_size=1, padding=0, bias=False),
    "pad-same-even-kernel": dict(kernel_size=4, padding="same"),
    "reflect": dict(padding_mode="reflect"),
    "multi-tile": dict(in_channels=8, out_channels=20, size=(9, 9)),
    "bf16-autocast": dict(dtype="bf16-autocast"),
    "bf16-autocast-groups2-nhwc-stride2": dict(dtype="bf16-autocast", groups=2, stride=2, channels_last=True),
    "fp16-autocast-dilation2": dict(dtype="fp16-autocast", dilation=2, padding=2),
    "bf16-weights-k1-K8": dict(dtype="bf16", kernel_size=1, padding=0, num_experts=8),
}


@pytest.fixture
def interpret(monkeypatch):
    """Run Triton kernels through the interpreter (numpy on the CPU) for this test only."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def compiled(monkeypatch):
    """Compiled Triton kernels, and full float32 (TF32 would make the float32 comparison meaningless)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


def build(case: dict, device: str, seed: int = 0):
    cfg = {**BASE, **case}
    batch, size = cfg.pop("batch"), cfg.pop("size")
    channels_last, dtype = cfg.pop("channels_last", False), cfg.pop("dtype", "fp32")
    torch.manual_seed(seed)
    layer = CondConv2d(
        cfg.pop("in_channels"), cfg.pop("out_channels"), cfg.pop("kernel_size"), strategy="fused", device=device, **cfg
    )
    with torch.no_grad():  # a router that actually varies across samples
        layer.router.weight.normal_(0.0, 1.0)
        layer.router.bias.normal_(0.0, 0.5)
    x = torch.randn(batch, layer.in_channels, *size, device=device)
    if dtype == "bf16":
        layer, x = layer.to(torch.bfloat16), x.to(torch.bfloat16)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    return layer, x, dtype


def check_case(name: str, device: str) -> None:
    layer, x, dtype = build(CASES[name], device)
    expected_dtype = {"fp32": torch.float32, "fp16-autocast": torch.float16}.get(dtype, torch.bfloat16)
    autocast_dtype = expected_dtype if dtype.endswith("autocast") else None
    y = check_against_reference(layer, x, TOLERANCES[dtype], autocast_dtype)
    assert y.dtype == expected_dtype
    assert y.is_contiguous(memory_format=torch.channels_last) == CASES[name].get("channels_last", False)


@needs_triton
@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference_interpreted(name, interpret):
    check_case(name, "cpu")


@needs_triton
@pytest.mark.parametrize("name", [pytest.param(name, marks=needs_cuda) for name in CASES])
def test_matches_reference_cuda(name, compiled):
    check_case(name, "cuda")


@needs_triton
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_opcheck(bias, channels_last, interpret):
    from condconv_lightning.functional.fused import fused_condconv2d

    torch.manual_seed(0)
    x = torch.randn(2, 4, 6, 5, requires_grad=True)
    if channels_last:
        x = x.detach().to(memory_format=torch.channels_last).requires_grad_(True)
    weight = torch.randn(3, 6, 2, 3, 3, requires_grad=True)
    r = torch.rand(2, 3, requires_grad=True)
    b = torch.randn(3, 6, requires_grad=True) if bias else None
    torch.library.opcheck(fused_condconv2d, (x, weight, r, b, [2, 1], [1, 1], [1, 2], 2))


@needs_triton
def test_compile_fullgraph_has_no_graph_break(interpret):
    torch.manual_seed(0)
    model = nn.Sequential(
        CondConv2d(4, 6, 3, padding=1, strategy="fused"), nn.ReLU(), CondConv2d(6, 4, 1, strategy="fused")
    )
    x = torch.randn(2, 4, 7, 7)
    compiled_model = torch.compile(model, fullgraph=True, backend="aot_eager")
    y = compiled_model(x)
    y.square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    for layer in (model[0], model[2]):
        layer.strategy = "mixture"
    expected = model(x)
    expected.square().sum().backward()
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    for grad, param in zip(grads, model.parameters()):
        torch.testing.assert_close(grad, param.grad, rtol=1e-4, atol=1e-5)


def test_export_runs_auto_instead_of_the_custom_op(monkeypatch):
    """Exported graphs must run where Triton does not: no custom op node, and no triton or CUDA needed."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    torch.manual_seed(0)
    model = nn.Sequential(CondConv2d(4, 6, 3, padding=1, strategy="fused"), CondConv2d(6, 4, 1, strategy="fused"))
    x = torch.randn(2, 4, 7, 7)
    exported = torch.export.export(model, (x,))
    targets = [str(node.target) for node in exported.graph.nodes if node.op == "call_function"]
    assert not [t for t in targets if "condconv_lightning" in t], targets
    for layer in model:
        layer.strategy = "auto"
    torch.testing.assert_close(exported.module()(x), model(x))


def test_cpu_tensor_without_interpreter_is_a_one_line_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    layer = CondConv2d(4, 6, 3, padding=1, strategy="fused")
    with pytest.raises(RuntimeError, match=r"CUDA tensor \(or TRITON_INTERPRET=1.*\).*got a cpu tensor") as info:
        layer(torch.randn(2, 4, 7, 7))
    assert "triton" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(RuntimeError, match="needs triton and a CUDA tensor"):
        condconv2d(torch.randn(2, 4, 7, 7), torch.randn(3, 6, 4, 3, 3), torch.rand(2, 3), strategy="fused")


@needs_triton
def test_depthwise_is_refused(interpret):
    layer = CondConv2d(4, 8, 3, padding=1, groups=4, strategy="fused")
    with pytest.raises(ValueError, match=r"depthwise.*use 'grouped'") as info:
        layer(torch.randn(2, 4, 7, 7))
    assert "\n" not in str(info.value)


@needs_triton
@pytest.mark.parametrize("kernel_size", [(3, 3), (1, 1), (5, 5)])
def test_autotune_configs_cap_warps_for_3x3_and_fit_registers(kernel_size):
    """Triton miscompiled 3x3 implicit-GEMM convolutions at num_warps=8: 3x3 configs must run at most 4 warps."""
    from condconv_lightning.functional import fused_kernels as fk

    kh, kw = kernel_size
    configs = fk._prune(fk._configs(fk._TILES), {}, KH=kh, KW=kw)
    assert configs and all(c.num_warps <= 4 for c in configs) == (kernel_size == (3, 3))
    for experts in (1, 8, 64):  # 64 experts fit no tile: the smallest one runs
        kept = fk._prune(fk._configs(fk._WEIGHT_GRAD_TILES), {"EXPERTS_POW2": experts}, KH=kh, KW=kw)
        sizes = [experts * c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] for c in kept]
        assert kept and (all(size <= fk._WEIGHT_GRAD_REGISTERS for size in sizes) or sizes == [16 * 16 * experts])


@needs_triton
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=needs_cuda)])
def test_gradients_are_deterministic(channels_last, device, compiled):
    """The expert gradient is reduced through per-chunk partial sums, not atomics: two backwards agree bit for bit."""
    layer, x, _ = build(dict(in_channels=16, out_channels=32, batch=16, size=(14, 14), num_experts=8), device)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    grads = []
    for _ in range(2):
        layer.zero_grad()
        layer(x).square().sum().backward()
        grads.append([p.grad.clone() for p in layer.parameters()])
    for first, second in zip(*grads):
        assert torch.equal(first, second)


@needs_triton
@pytest.mark.parametrize("kernel", ["_forward", "_input_grad", "_weight_grad"])
def test_kernels_compile_for_a_cuda_target(kernel):
    """The compiled (not interpreted) kernels build for Hopper; needs no GPU, only Triton's compiler and ptxas."""
    import inspect

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    from condconv_lightning.functional import fused_kernels as fk

    fn = getattr(fk, kernel)
    constexprs = dict(
        SH=2,
        SW=1,
        PH=1,
        PW=1,
        DH=1,
        DW=2,
        KH=3,
        KW=3,
        CHANNELS_INNER=True,
        PRECISION="tf32",
        INTERPRETER=False,
        HAS_BIAS=True,
        EXPERTS_POW2=8,
        BLOCK_M=32,
        BLOCK_N=64,
        BLOCK_K=32,
    )
    names = list(inspect.signature(fn).parameters)
    signature = {n: "constexpr" if n in constexprs else "*fp32" if n.endswith("_ptr") else "i32" for n in names}
    source = ASTSource(
        JITFunction(fn), signature, constexprs={(i,): constexprs[n] for i, n in enumerate(names) if n in constexprs}
    )
    compiled_kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    ptx = compiled_kernel.asm["ptx"]
    assert "mma" in ptx and "st.local" not in ptx  # tensor-core dots, no register spills


@needs_triton
def test_interpreter_leaves_triton_unpatched(interpret):
    """An interpreted call restores every language attribute it patched, so compiled kernels still build after it."""
    import triton.language as tl

    before = dict(vars(tl.core))
    layer, x, _ = build(CASES["k1"], "cpu")
    layer(x).sum().backward()
    changed = [name for name, value in vars(tl.core).items() if before.get(name) is not value]
    assert not changed


def test_float64_is_refused_rather_than_computed_at_float32_precision(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x, weight, r = (t.double() for t in (torch.randn(2, 4, 5, 5), torch.randn(3, 6, 4, 3, 3), torch.rand(2, 3)))
    with pytest.raises(ValueError, match=r"computes in float32, bfloat16 or float16, got torch.float64") as info:
        condconv2d(x, weight, r, padding=1, strategy="fused")
    assert "\n" not in str(info.value)
