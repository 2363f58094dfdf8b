"""The training loss: summed cross-entropy over the target tokens, with no full-vocabulary fp32 logits.

Two things keep its memory and time down, and neither changes the math:

- Only target positions reach the LM head. The forward is called with `logits_to_keep` (the positions whose
  label is not -100), so the model projects only those hidden states onto the vocabulary: prompt, system and
  user tokens cost no LM-head matmul, no logits and no softmax. (Most transformers causal LMs take
  `logits_to_keep`; `accepts_logits_to_keep` tells.)
- `cross_entropy_sum` computes the loss AND its gradient in the forward, a few rows at a time in fp32, and keeps
  only the gradient, in the logits' dtype. Plain `F.cross_entropy(logits.float())` keeps an fp32 log-softmax of
  every row for the backward (4 bytes x rows x vocabulary) on top of the logits; here the fp32 copies live for
  one chunk only. The gradient is softmax - one_hot, exactly what autograd computes for the same loss, rounded
  once to the logits' dtype (where autograd's cast to the logits' dtype rounds it too).

A chunk is a few MiB (CHUNK_ELEMENTS): the allocator hands the same block back chunk after chunk, where chunks
of hundreds of MiB came fresh from the kernel each time and a CPU step spent more time faulting their pages in
than computing. Each logit is exponentiated once: the softmax reuses the exponentials of the log-sum-exp.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from .data import IGNORE

CHUNK_ELEMENTS = 1 << 21  # fp32 elements per chunk (8 MiB): bounds the transient copies of the logits


def accepts_logits_to_keep(model: Any) -> bool:
    """Whether the model's forward can project only some positions onto the vocabulary."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return "logits_to_keep" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False


class _CrossEntropySum(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        rows = max(1, CHUNK_ELEMENTS // logits.shape[-1])
        grad = torch.empty_like(logits) if logits.requires_grad else None
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        for start in range(0, logits.shape[0], rows):
            x = logits[start : start + rows].to(torch.float32, copy=True)  # never the caller's tensor
            y = labels[start : start + rows]
            valid = y != IGNORE
            safe = torch.where(valid, y, 0)[:, None]
            picked = x.gather(1, safe)
            peak = x.amax(dim=-1, keepdim=True)
            x.sub_(peak).exp_()  # in place over the chunk's fp32 copy
            norm = x.sum(dim=-1, keepdim=True)
            total += ((norm.log() + peak - picked)[:, 0] * valid).sum()  # log-sum-exp - picked logit
            if grad is not None:
                counts = valid[:, None].to(x.dtype)
                x.mul_(counts / norm)  # softmax, zero on ignored rows
                x.scatter_add_(1, safe, -counts)  # - one_hot on valid rows
                grad[start : start + rows] = x
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        (grad,) = ctx.saved_tensors
        if grad is None:
            return None, None
        return grad.mul_(grad_output.to(grad.dtype)), None  # in place: the loss is backpropagated once


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """sum over rows of -log softmax(logits)[label], in fp32; rows labelled -100 count nothing.
    logits: (N, V) in any float dtype; labels: (N,)."""
    return _CrossEntropySum.apply(logits, labels)  # type: ignore[no-any-return]
