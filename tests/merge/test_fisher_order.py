"""The merge shard sums the ranks' Fisher shards in rank order, whatever order they arrive in."""

from __future__ import annotations

import itertools

import torch

from pm_ray.core.fisher import FisherShard
from pm_ray.merge.actor import MergeShard


def test_fisher_shards_are_summed_in_rank_order_not_arrival_order(tmp_path) -> None:
    # float32 addition is not associative: (1 + -1) + 1e-8 = 1e-8, but (1 + 1e-8) + -1 = 0
    sums = {0: torch.tensor([1.0]), 1: torch.tensor([-1.0]), 2: torch.tensor([1e-8])}
    naive = {sum(sums[r] for r in order).item() for order in itertools.permutations(sums)}
    assert len(naive) == 2  # an arrival-order sum depends on the order
    delta = {"m": torch.tensor([0.5])}
    results = set()
    for order in itertools.permutations(sums):
        shard = MergeShard("pm", {}, 0, 1, str(tmp_path))
        for rank in order:
            shard.add_fisher(1, {"m": sums[rank]}, count=1, rank=rank)
        fisher = shard._update(1, delta).fisher
        assert fisher is not None
        results.add(fisher["m"].item())
    expected = FisherShard.reduce(FisherShard({"m": sums[r]}, 1) for r in (0, 1, 2)).mean()["m"].item()
    assert results == {expected} and expected != 0.0


def test_a_resent_shard_replaces_the_earlier_one_and_a_new_task_starts_afresh(tmp_path) -> None:
    shard = MergeShard("pm", {}, 0, 1, str(tmp_path))
    shard.add_fisher(1, {"m": torch.tensor([2.0])}, count=1, rank=0)
    shard.add_fisher(1, {"m": torch.tensor([4.0])}, count=1, rank=0)  # a retried rank sends again
    shard.add_fisher(1, {"m": torch.tensor([6.0])}, count=1, rank=1)
    fisher = shard._update(1, {"m": torch.tensor([1.0])}).fisher
    assert fisher is not None and fisher["m"].item() == 5.0  # (4 + 6) / 2, not (2 + 4 + 6) / 3
    shard.add_fisher(2, {"m": torch.tensor([8.0])}, count=2, rank=1)
    fisher = shard._update(2, {"m": torch.tensor([1.0])}).fisher
    assert fisher is not None and fisher["m"].item() == 4.0


def test_the_fisher_mean_is_written_into_last_tasks_tensors_bit_for_bit(tmp_path) -> None:
    """F_t = (Σ_r S_r) / N into the previous task's F tensors: FisherShard.reduce(...).mean()'s
    bits, with 1, 2 and 3 ranks, and the ranks' sums are left as they were."""
    shard = MergeShard("pm", {}, 0, 1, str(tmp_path))
    gen = torch.Generator().manual_seed(0)
    delta = {"m": torch.randn(3, 4, generator=gen), "n": torch.randn(5, generator=gen)}
    storage = None
    for task, ranks in enumerate((1, 2, 3, 1), start=1):
        sums = [{k: torch.rand(v.shape, generator=gen) * 7 for k, v in delta.items()} for _ in range(ranks)]
        kept = [{k: v.clone() for k, v in s.items()} for s in sums]
        for rank, s in enumerate(sums):
            shard.add_fisher(task, s, count=3 + rank, rank=rank)
        fisher = shard._update(task, delta).fisher
        assert fisher is not None
        expected = FisherShard.reduce(FisherShard(s, 3 + r) for r, s in enumerate(kept)).mean()
        assert all(torch.equal(fisher[k], expected[k]) for k in delta)
        assert all(torch.equal(s[k], c[k]) for s, c in zip(sums, kept) for k in delta)
        pointers = {k: v.data_ptr() for k, v in fisher.items()}
        assert storage is None or pointers == storage  # the same memory every task
        storage = pointers
        shard.strategy.merge(shard._update(task, delta), alpha=None)


def test_the_shard_merges_in_place_with_the_bits_of_a_fresh_strategy(tmp_path) -> None:
    """The shard lets its strategy write θ̂ in place (it hands out no merge result): the state after
    three tasks is bit for bit a strategy's that allocates every θ̂_t anew."""
    from pm_ray.core.strategies import TaskUpdate, build_strategy

    shard, reference = MergeShard("pm", {}, 0, 1, str(tmp_path)), build_strategy("pm")
    assert shard.strategy.in_place and not reference.in_place
    gen = torch.Generator().manual_seed(3)
    for task in (1, 2, 3):
        delta = {"m": torch.randn(3, 4, generator=gen)}
        sums = {"m": torch.rand(3, 4, generator=gen)}
        shard.add_fisher(task, sums, count=2, rank=0)
        info = shard.merge(task, delta, alpha=None)
        expected = reference.merge(TaskUpdate(task=task, delta=delta, fisher={"m": sums["m"] / 2}))
        assert info["alpha"] == expected.alpha
        assert torch.equal(shard.strategy.merged["m"], expected.merged["m"])
        assert torch.equal(shard.strategy.accumulator.psi["m"], reference.accumulator.psi["m"])
