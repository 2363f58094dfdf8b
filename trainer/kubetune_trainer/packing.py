"""Packing samples into sequences, the order they are visited in, and the batches the model sees.

Packing: samples are placed into bins of at most maxSeqLength tokens by best-fit decreasing (deterministic,
close to optimal, O(n log n)). A micro-batch of `batchSizePerDevice` bins is flattened into ONE row with no
padding at all; `position_ids` restart at 0 for every sample and `cu_seq_lens` marks where each sample
begins, which the packed attention (attention.py) uses to keep samples from attending to each other (on the
device for the varlen kernel, on the host for the per-sample backend).
Without packing every bin holds one sample and a micro-batch is padded to its longest sample.

Order: epoch e visits the bins in a permutation seeded by (seed, e). Optimizer step i of an epoch takes
G = world_size x gradientAccumulationSteps x batchSizePerDevice consecutive bins of that order (the order is
extended cyclically when the epoch does not divide evenly, as DistributedSampler does), so the position in
the data is a pure function of the global step: resuming needs only the step number.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

import numpy as np
import torch

from .data import IGNORE, Samples


def pack_bins(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Best-fit decreasing: each sample (longest first) goes to the fullest bin it still fits in."""
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin index), kept sorted
    for i in order:
        n = int(lengths[i])
        pos = bisect.bisect_left(free, (n, -1))
        if pos == len(free):
            bins.append([i])
            bisect.insort(free, (capacity - n, len(bins) - 1))
            continue
        room, b = free.pop(pos)
        bins[b].append(i)
        bisect.insort(free, (room - n, b))
    return bins


def single_bins(n: int) -> list[list[int]]:
    return [[i] for i in range(n)]


@dataclass(frozen=True)
class Plan:
    """Which bins each rank trains on at each optimizer step."""

    num_bins: int
    world_size: int
    accumulation: int
    batch_size: int
    seed: int
    shuffle: bool
    total_steps: int

    @property
    def bins_per_step(self) -> int:
        return self.world_size * self.accumulation * self.batch_size

    @property
    def steps_per_epoch(self) -> int:
        return steps_per_epoch(self.num_bins, self.bins_per_step)

    def epoch_of(self, step: int) -> float:
        """Epochs completed after `step` optimizer steps, as a fraction."""
        return step / self.steps_per_epoch

    def order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_bins)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_bins)

    def micro_batches(self, step: int, rank: int) -> list[list[int]]:
        """The bin indices of each of this rank's micro-batches at a 0-based global step."""
        epoch, i = divmod(step, self.steps_per_epoch)
        order = self.order(epoch)
        g = self.bins_per_step
        positions = np.arange(i * g, (i + 1) * g) % self.num_bins
        chosen = order[positions]
        out = []
        for m in range(self.accumulation):
            first = (m * self.world_size + rank) * self.batch_size
            out.append([int(b) for b in chosen[first : first + self.batch_size]])
        return out


def steps_per_epoch(num_bins: int, bins_per_step: int) -> int:
    return max(1, math.ceil(num_bins / bins_per_step))


def total_steps(num_bins: int, bins_per_step: int, epochs: float | None, max_steps: int | None) -> int:
    if max_steps is not None:
        return max_steps
    assert epochs is not None
    return max(1, math.ceil(epochs * steps_per_epoch(num_bins, bins_per_step)))


def eval_micro_batches(num_bins: int, world_size: int, rank: int, batch_size: int) -> list[tuple[list[int], bool]]:
    """Every rank gets the same number of micro-batches (FSDP needs each forward on every rank); the padding
    ones repeat bin 0 and are flagged not to count."""
    mine = list(range(rank, num_bins, world_size))
    per_rank = math.ceil(math.ceil(num_bins / world_size) / batch_size)
    out = []
    for k in range(per_rank):
        chunk = mine[k * batch_size : (k + 1) * batch_size]
        out.append((chunk, True) if chunk else ([0], False))
    return out


@dataclass
class Batch:
    """One micro-batch, ready for the model. `model_inputs()` are the forward's keyword arguments."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor | None  # packed batches only (padded ones let the model count, as at inference)
    attention_mask: torch.Tensor | None  # padded batches only
    cu_seq_lens: torch.Tensor | None  # packed batches only: sample boundaries, int32
    max_length: int
    num_tokens: int  # real tokens (no padding)
    num_targets: int  # tokens that carry the loss
    sum_squared_lengths: int  # for the attention FLOPs of varlen batches
    # Only the target positions reach the LM head (loss.py): the forward's `logits_to_keep` (positions in a packed
    # row, a mask over a padded batch) and the labels of those positions, in order.
    keep: torch.Tensor | None = None
    target_labels: torch.Tensor | None = None

    def to(self, device: torch.device, bounds_on_device: bool = True) -> Batch:
        """On `device`; the sample boundaries stay on the host when the attention slices by them there."""

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)

        return Batch(
            self.input_ids.to(device, non_blocking=True),
            self.labels.to(device, non_blocking=True),
            move(self.position_ids),
            move(self.attention_mask),
            move(self.cu_seq_lens) if bounds_on_device else self.cu_seq_lens,
            self.max_length,
            self.num_tokens,
            self.num_targets,
            self.sum_squared_lengths,
            move(self.keep),
            move(self.target_labels),
        )

    @property
    def loss_labels(self) -> torch.Tensor:
        """The labels of the logits the forward returns: of the kept positions only, when some are kept."""
        return self.labels if self.target_labels is None else self.target_labels

    def model_inputs(self) -> dict[str, object]:
        inputs: dict[str, object] = {"input_ids": self.input_ids}
        if self.position_ids is not None:
            inputs["position_ids"] = self.position_ids
        if self.attention_mask is not None:
            inputs["attention_mask"] = self.attention_mask
        if self.cu_seq_lens is not None:
            inputs.update(
                cu_seq_lens_q=self.cu_seq_lens,
                cu_seq_lens_k=self.cu_seq_lens,
                max_length_q=self.max_length,
                max_length_k=self.max_length,
            )
        if self.keep is not None:
            inputs["logits_to_keep"] = self.keep
        return inputs


def collate_packed(samples: Samples, bins: list[list[int]], only_targets: bool = False) -> Batch:
    """Flatten every sample of the given bins into one padding-free row."""
    order = np.fromiter((i for b in bins for i in b), dtype=np.int64)
    starts, ends = samples.offsets[order], samples.offsets[order + 1]
    lengths = ends - starts
    cu = np.zeros(len(order) + 1, dtype=np.int32)
    np.cumsum(lengths, out=cu[1:])
    gather = np.concatenate([np.arange(s, e) for s, e in zip(starts, ends, strict=True)])
    flat_labels = samples.labels[gather].astype(np.int64)
    targets = np.flatnonzero(flat_labels != IGNORE)
    return Batch(
        input_ids=torch.from_numpy(samples.ids[gather].astype(np.int64))[None],
        labels=torch.from_numpy(flat_labels)[None],
        position_ids=torch.from_numpy(np.arange(int(cu[-1])) - np.repeat(cu[:-1].astype(np.int64), lengths))[None],
        attention_mask=None,
        cu_seq_lens=torch.from_numpy(cu),
        max_length=int(lengths.max()),
        num_tokens=int(cu[-1]),
        num_targets=len(targets),
        sum_squared_lengths=int((lengths * lengths).sum()),
        keep=torch.from_numpy(targets) if only_targets else None,
        target_labels=torch.from_numpy(flat_labels[targets]) if only_targets else None,
    )


def collate_padded(samples: Samples, bins: list[list[int]], pad_id: int, only_targets: bool = False) -> Batch:
    """One sample per row, right-padded to the longest (the path for prefix and prompt tuning)."""
    rows = [samples.get(i) for b in bins for i in b]
    width = max(len(r[0]) for r in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    labels = np.full((len(rows), width), IGNORE, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for k, (r_ids, r_labels) in enumerate(rows):
        ids[k, : len(r_ids)] = r_ids
        labels[k, : len(r_ids)] = r_labels
        mask[k, : len(r_ids)] = 1
    lengths = [len(r[0]) for r in rows]
    is_target = labels != IGNORE
    return Batch(
        input_ids=torch.from_numpy(ids),
        labels=torch.from_numpy(labels),
        position_ids=None,
        attention_mask=torch.from_numpy(mask),
        cu_seq_lens=None,
        max_length=width,
        num_tokens=int(mask.sum()),
        num_targets=int(is_target.sum()),
        sum_squared_lengths=sum(n * n for n in lengths),
        keep=torch.from_numpy(is_target) if only_targets else None,
        target_labels=torch.from_numpy(labels[is_target]) if only_targets else None,
    )
