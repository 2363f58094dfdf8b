"""Packing: bins, the visiting order, and exact per-sample attention in packed rows."""

from __future__ import annotations

import copy
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from kubetune_trainer import attention
from kubetune_trainer.data import IGNORE, Samples
from kubetune_trainer.packing import Plan, collate_packed, collate_padded, eval_micro_batches, pack_bins
from kubetune_trainer.train import token_loss_sum

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


@pytest.fixture(params=["llama_dir", "qwen2_dir"])
def model_pair(request: pytest.FixtureRequest) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The same weights twice: with the packed attention, and with plain sdpa."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path: Path = request.getfixturevalue(request.param)
    config = AutoConfig.from_pretrained(path)
    packed = AutoModelForCausalLM.from_pretrained(
        path, config=copy.deepcopy(config), attn_implementation=attention.register()
    ).eval()
    plain = AutoModelForCausalLM.from_pretrained(path, config=copy.deepcopy(config), attn_implementation="sdpa").eval()
    assert packed.config._attn_implementation == attention.PACKED_ATTENTION
    assert plain.config._attn_implementation == "sdpa"
    return packed, plain


@torch.no_grad()
def test_packed_logits_equal_each_sample_run_alone(model_pair: tuple[torch.nn.Module, torch.nn.Module]) -> None:
    packed, plain = model_pair
    samples = make_samples([7, 19, 3, 12, 30], packed.config.vocab_size)
    batch = collate_packed(samples, [[0, 1, 2], [3, 4]])
    logits = packed(**batch.model_inputs()).logits
    alone = torch.cat([plain(input_ids=torch.from_numpy(samples.get(i)[0]).long()[None]).logits for i in range(5)], 1)
    assert logits.shape == alone.shape
    assert (logits - alone).abs().max().item() < 1e-5
    # The same packed row through plain sdpa with position_ids only: samples see each other.
    leaky = plain(input_ids=batch.input_ids, position_ids=batch.position_ids).logits
    assert (leaky - alone).abs().max().item() > 1e-2


def test_packed_and_padded_losses_and_gradients_agree(model_pair: tuple[torch.nn.Module, torch.nn.Module]) -> None:
    packed, plain = model_pair
    samples = make_samples([9, 4, 15], packed.config.vocab_size, seed=1)
    packed_batch = collate_packed(samples, [[0, 1, 2]])
    padded_batch = collate_padded(samples, [[0], [1], [2]], pad_id=0)
    assert packed_batch.num_targets == padded_batch.num_targets
    loss_a = token_loss_sum(packed(**packed_batch.model_inputs()).logits, packed_batch.labels)
    loss_b = token_loss_sum(plain(**padded_batch.model_inputs()).logits, padded_batch.labels)
    loss_a.backward()
    loss_b.backward()
    assert torch.allclose(loss_a, loss_b, rtol=1e-5)
    for (name, a), b in zip(packed.named_parameters(), plain.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-5, rtol=1e-4), name


@pytest.mark.gpu
def test_varlen_kernel_matches_per_sample_attention_on_a_gpu() -> None:
    if not torch.cuda.is_available():
        pytest.skip("the varlen kernel runs on CUDA only")
    torch.manual_seed(0)
    lengths = [5, 17, 1, 40, 9]
    total, heads, kv_heads, dim = sum(lengths), 8, 2, 64
    q = torch.randn(1, heads, total, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, kv_heads, total, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, kv_heads, total, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32, device="cuda")
    out, _ = attention.packed_attention_forward(
        torch.nn.Module(), q, k, v, None, scaling=dim**-0.5, cu_seq_lens_q=cu, max_length_q=max(lengths)
    )
    reference = attention._segments(q.float(), k.float(), v.float(), cu.tolist(), scale=dim**-0.5).transpose(1, 2)
    assert out.shape == (1, total, heads, dim)
    assert (out.float() - reference).abs().max().item() < 2e-2
    out.float().sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
