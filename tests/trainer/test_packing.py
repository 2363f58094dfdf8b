"""Packing: bins, the visiting order and the batches (the attention in packed rows: test_attention.py)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from kubetune_trainer.data import IGNORE, Samples
from kubetune_trainer.packing import Plan, collate_packed, eval_micro_batches, pack_bins

pytestmark = pytest.mark.trainer


def test_pack_bins_places_every_sample_once_within_capacity() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 100, size=500)
    bins = pack_bins(lengths, 128)
    placed = sorted(i for b in bins for i in b)
    assert placed == list(range(500))
    assert all(lengths[b].sum() <= 128 for b in bins)
    # Best-fit decreasing on this mix wastes little: within 5% of the lower bound.
    assert len(bins) <= 1.05 * lengths.sum() / 128 + 1
    assert bins == pack_bins(lengths, 128)


def test_pack_bins_perfect_fit() -> None:
    assert sorted(sorted(b) for b in pack_bins(np.array([3, 5, 2, 6, 4, 4]), 8)) == [[0, 1], [2, 3], [4, 5]]


def test_plan_covers_each_bin_once_per_epoch_across_ranks() -> None:
    plan = Plan(num_bins=24, world_size=2, accumulation=3, batch_size=2, seed=1, shuffle=True, total_steps=4)
    assert plan.steps_per_epoch == 2
    for epoch in range(2):
        seen = Counter()
        for step in range(epoch * 2, epoch * 2 + 2):
            for rank in range(2):
                for micro in plan.micro_batches(step, rank):
                    assert len(micro) == 2
                    seen.update(micro)
        assert sorted(seen) == list(range(24)) and set(seen.values()) == {1}
    # A new permutation each epoch, the same one for the same seed.
    assert not np.array_equal(plan.order(0), plan.order(1))
    assert np.array_equal(plan.order(1), Plan(24, 1, 1, 1, 1, True, 9).order(1))


def test_plan_wraps_around_an_uneven_epoch() -> None:
    plan = Plan(num_bins=5, world_size=2, accumulation=1, batch_size=2, seed=0, shuffle=False, total_steps=2)
    assert plan.steps_per_epoch == 2
    assert plan.micro_batches(0, 0) == [[0, 1]] and plan.micro_batches(0, 1) == [[2, 3]]
    assert plan.micro_batches(1, 0) == [[4, 0]] and plan.micro_batches(1, 1) == [[1, 2]]


def test_eval_batches_are_even_across_ranks_and_count_each_bin_once() -> None:
    per_rank = [eval_micro_batches(7, 3, r, 2) for r in range(3)]
    assert {len(p) for p in per_rank} == {2}
    counted = sorted(b for p in per_rank for bins, real in p if real for b in bins)
    assert counted == list(range(7))


def make_samples(lengths: list[int], vocab: int, seed: int = 0) -> Samples:
    rng = np.random.default_rng(seed)
    ids = [rng.integers(3, vocab, size=n).astype(np.int32) for n in lengths]
    labels = []
    for s in ids:
        lab = np.full(len(s), IGNORE, dtype=np.int32)
        lab[:-1] = s[1:]
        labels.append(lab)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return Samples(np.concatenate(ids), np.concatenate(labels), offsets)


def test_collate_packed_restarts_positions_per_sample() -> None:
    samples = make_samples([3, 5, 2], 50)
    batch = collate_packed(samples, [[0, 2], [1]])
    assert batch.input_ids.shape == (1, 10) and batch.attention_mask is None
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3, 4]]
    assert batch.cu_seq_lens.tolist() == [0, 3, 5, 10] and batch.max_length == 5
    assert batch.num_tokens == 10 and batch.num_targets == 7 and batch.sum_squared_lengths == 9 + 4 + 25
