"""In-memory volatile tier: semantics, capacity, overflow policies and target fill."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from embeddings.tier import TableSpec
from embeddings.volatile import VolatileTier, partition_of


def make(partitions=1, capacity=10, policy="evict_oldest", target=0.5, dim=2):
    tier = VolatileTier(partitions, capacity, policy, target)
    tier.create_table(TableSpec("t", dim, torch.full((dim,), -1.0)))
    return tier


def rows(keys, dim=2):
    return torch.as_tensor(keys, dtype=torch.float32)[:, None].repeat(1, dim)


def test_insert_lookup_update_evict():
    tier = make(partitions=4, capacity=100)
    tier.insert("t", torch.tensor([1, 2, 3, 2]), torch.tensor([[1.0, 1], [2, 2], [3, 3], [9, 9]]))
    vectors, found = tier.lookup("t", torch.tensor([2, 4, 1, 2]))
    assert found.tolist() == [True, False, True, True]
    assert vectors.tolist() == [[9, 9], [-1, -1], [1, 1], [9, 9]]  # last duplicate wins; default for 4
    assert tier.update("t", torch.tensor([1, 5]), torch.zeros(2, 2)) == 1
    assert tier.lookup("t", torch.tensor([1, 5]))[1].tolist() == [True, False]
    assert tier.evict("t", torch.tensor([1, 1, 7])) == 1
    assert tier.keys("t").tolist() == [2, 3]
    assert tier.counters()["hits"] == 4 and tier.counters()["misses"] == 2


def test_partitions_split_the_keys():
    tier = make(partitions=8, capacity=1000)
    keys = np.arange(800)
    tier.insert("t", torch.from_numpy(keys), rows(keys))
    assert tier.fill("t") == np.bincount(partition_of(keys, 8), minlength=8).tolist()
    assert min(tier.fill("t")) > 60  # sequential keys spread


@pytest.mark.parametrize("policy", ["evict_random", "evict_least_used", "evict_oldest"])
def test_fill_never_exceeds_capacity_and_drops_to_target(policy):
    tier = make(partitions=4, capacity=50, policy=policy, target=0.6)
    rng = np.random.default_rng(1)
    for _ in range(40):
        keys = rng.integers(0, 10_000, size=int(rng.integers(1, 120)))
        tier.insert("t", torch.from_numpy(keys), rows(keys))
        assert max(tier.fill("t")) <= 50
        tier.lookup("t", torch.from_numpy(rng.integers(0, 10_000, 50)))
    assert tier.counters()["evictions"] > 0
    # every held row still reads back its own value
    held = tier.keys("t")
    vectors, found = tier.lookup("t", torch.from_numpy(held))
    assert found.all() and torch.equal(vectors, rows(held))


def test_overflow_evicts_down_to_the_target_fill():
    tier = make(capacity=10, target=0.5)
    tier.insert("t", torch.arange(10), rows(range(10)))
    tier.insert("t", torch.tensor([100]), rows([100]))
    assert tier.fill("t") == [6]  # down to 5, then the new row
    assert tier.counters()["evictions"] == 5


def test_evict_oldest_drops_the_least_recently_used():
    tier = make(capacity=4, target=0.5)
    tier.insert("t", torch.tensor([1, 2, 3, 4]), rows([1, 2, 3, 4]))
    tier.lookup("t", torch.tensor([1]))
    tier.lookup("t", torch.tensor([3]))
    tier.insert("t", torch.tensor([5]), rows([5]))  # 2 and 4 are the oldest: evicted (fill 4 -> 2, then +1)
    assert tier.keys("t").tolist() == [1, 3, 5]


def test_evict_least_used_drops_the_fewest_hits():
    tier = make(capacity=4, policy="evict_least_used", target=0.5)
    tier.insert("t", torch.tensor([1, 2, 3, 4]), rows([1, 2, 3, 4]))
    for _ in range(3):
        tier.lookup("t", torch.tensor([4, 2]))
    tier.lookup("t", torch.tensor([1]))  # 1 is the most recent, but used once
    tier.lookup("t", torch.tensor([3, 3]))  # one use (a batch counts once per key)... and 3 is recent too
    tier.insert("t", torch.tensor([5]), rows([5]))
    assert tier.keys("t").tolist() == [2, 4, 5]


def test_evict_random_is_seeded_and_keeps_the_batch():
    kept = []
    for _ in range(2):
        tier = make(capacity=20, policy="evict_random", target=0.5)
        tier.insert("t", torch.arange(20), rows(range(20)))
        tier.insert("t", torch.tensor([3, 100]), rows([3, 100]))  # 3 is rewritten by this batch: never its victim
        held = tier.keys("t").tolist()
        assert 3 in held and 100 in held and len(held) == 11
        kept.append(held)
    assert kept[0] == kept[1]


def test_a_batch_larger_than_a_partition_keeps_its_last_rows():
    tier = make(capacity=5)
    tier.insert("t", torch.arange(12), rows(range(12)))
    assert tier.keys("t").tolist() == [7, 8, 9, 10, 11]


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="overflow_policy"):
        VolatileTier(overflow_policy="evict_all")
    tier = make()
    with pytest.raises(ValueError, match="shape"):
        tier.insert("t", torch.tensor([1]), torch.zeros(1, 3))
    with pytest.raises(KeyError, match="nope"):
        tier.lookup("nope", torch.tensor([1]))
