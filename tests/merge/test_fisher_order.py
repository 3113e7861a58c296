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
