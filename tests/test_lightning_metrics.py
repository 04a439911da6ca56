"""RoutingEntropy and routing_entropy against a float64 per-sample loop, and under two-process DDP."""

from __future__ import annotations

import math
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from condconv_lightning.metrics import RoutingEntropy, routing_entropy


def reference(routing: torch.Tensor) -> dict[str, float | list[float]]:
    """Plain float64 loops over samples and experts, straight from the definitions."""
    rows = routing.reshape(-1, routing.shape[-1]).double().tolist()
    k = len(rows[0])
    scale = math.log(k) if k > 1 else 1.0

    def entropy(p: list[float]) -> float:
        return -sum(v * math.log(v) for v in p if v > 0) / scale

    per_sample = []
    for row in rows:
        total = sum(row)
        per_sample.append(entropy([v / total for v in row]) if total > 0 else 0.0)
    mean = [sum(row[j] for row in rows) / len(rows) for j in range(k)]
    usage = [m / sum(mean) for m in mean]
    return {"entropy": sum(per_sample) / len(rows), "usage_entropy": entropy(usage), "expert_mean": mean}


def assert_matches(stats: dict[str, torch.Tensor], expected: dict, atol: float = 1e-6) -> None:
    assert float(stats["entropy"]) == pytest.approx(expected["entropy"], abs=atol)
    assert float(stats["usage_entropy"]) == pytest.approx(expected["usage_entropy"], abs=atol)
    assert stats["expert_mean"].tolist() == pytest.approx(expected["expert_mean"], abs=atol)


def draw(kind: str, batch: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(batch, k, generator=g)
    if kind == "sigmoid":
        return torch.sigmoid(logits)
    if kind == "softmax":
        return torch.softmax(logits, dim=-1)
    r = torch.sigmoid(logits)  # "sparse": exact zeros, one all-zero sample, one one-hot sample
    r[r < 0.5] = 0.0
    r[0] = 0.0
    r[1] = torch.nn.functional.one_hot(torch.tensor(k - 1), k).float()
    return r


@pytest.mark.parametrize("k", [1, 2, 4, 8])
@pytest.mark.parametrize("kind", ["sigmoid", "softmax", "sparse"])
def test_functional_matches_float64_loop(kind: str, k: int) -> None:
    routing = draw(kind, 37, k)
    before = routing.clone()
    assert_matches(routing_entropy(routing), reference(routing))
    assert torch.equal(routing, before), "the input must not be modified"


def test_extremes_and_single_expert() -> None:
    one_hot = torch.eye(4)[torch.tensor([2, 2, 2])]
    uniform = torch.full((5, 4), 0.3)
    assert float(routing_entropy(one_hot)["entropy"]) == 0.0
    assert float(routing_entropy(one_hot)["usage_entropy"]) == 0.0
    assert float(routing_entropy(uniform)["entropy"]) == pytest.approx(1.0, abs=1e-6)
    assert float(routing_entropy(uniform)["usage_entropy"]) == pytest.approx(1.0, abs=1e-6)
    single = routing_entropy(torch.rand(6, 1))
    assert float(single["entropy"]) == 0.0 and float(single["usage_entropy"]) == 0.0  # K = 1 is defined as 0


def test_modular_accumulates_like_concatenation_and_resets() -> None:
    batches = [draw("sigmoid", n, 4, seed=n) for n in (3, 10, 1)]
    metric = RoutingEntropy(num_experts=4)
    for batch in batches:
        metric.update(batch)
    assert_matches(metric.compute(), reference(torch.cat(batches)))
    metric.reset()
    metric.update(batches[0])
    assert_matches(metric.compute(), reference(batches[0]))


def test_leading_dimensions_and_half_precision() -> None:
    routing = draw("softmax", 24, 4)
    assert_matches(routing_entropy(routing.reshape(2, 3, 4, 4)), reference(routing))
    metric = RoutingEntropy(num_experts=4)
    metric.update(routing.bfloat16())
    stats = metric.compute()
    assert stats["entropy"].dtype == torch.float32
    assert_matches(stats, reference(routing.bfloat16().float()), atol=1e-5)


@pytest.mark.parametrize(
    ("routing", "message"),
    [
        (torch.rand(4), r"shape \[B, K\]"),
        (torch.rand(3, 5), "5 experts"),
        (-torch.rand(3, 4), "non-negative"),
        (torch.tensor([[float("nan"), 1.0, 0.0, 0.0]]), "finite"),
        (torch.ones(3, 4, dtype=torch.long), "floating-point"),
    ],
)
def test_bad_routing_weights_are_rejected(routing: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RoutingEntropy(num_experts=4).update(routing)


@pytest.mark.parametrize("k", [0, -1, 2.0, True])
def test_bad_num_experts(k: object) -> None:
    with pytest.raises(ValueError, match="num_experts"):
        RoutingEntropy(num_experts=k)  # type: ignore[arg-type]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world_size: int, port: int, chunks: list[torch.Tensor], out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        metric = RoutingEntropy(num_experts=chunks[0].shape[-1])
        metric.update(chunks[rank])
        stats = metric.compute()  # sums the states over both processes
        torch.save({k: v.clone() for k, v in stats.items()}, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_value_equals_single_process_value_on_the_full_batch(tmp_path: Path) -> None:
    # Unequal shards with different routing: averaging per-rank entropies would be wrong.
    chunks = [draw("sigmoid", 3, 4, seed=1), torch.softmax(5 * torch.randn(13, 4), dim=-1)]
    mp.spawn(_ddp_worker, args=(2, _free_port(), chunks, str(tmp_path)), nprocs=2, join=True)
    full = torch.cat(chunks)
    single = RoutingEntropy(num_experts=4)
    single.update(full)
    expected = single.compute()
    assert_matches(expected, reference(full))
    naive = sum(float(routing_entropy(c)["usage_entropy"]) for c in chunks) / 2
    assert abs(naive - float(expected["usage_entropy"])) > 1e-3, "the shards must be chosen so averaging is wrong"
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("routing", [[[1.0, 0.0, 0.0]] * 2, [[0.3]], [[1e-30, 1.0]]], ids=["one-hot", "K1", "nearly"])
def test_entropies_are_never_negative_zero_or_below_zero(routing: list) -> None:
    """A collapsed layer's usage entropy printed as '-0.000' in the collapse warning."""
    stats = routing_entropy(torch.tensor(routing))
    for key in ("entropy", "usage_entropy"):
        assert not torch.signbit(stats[key]) and f"{float(stats[key]):.3f}" == "0.000"
