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
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from .data import IGNORE

CHUNK_ELEMENTS = 1 << 25  # fp32 elements per chunk (128 MiB): bounds the transient copies of the logits


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
            x = logits[start : start + rows].float()
            y = labels[start : start + rows]
            valid = y != IGNORE
            safe = torch.where(valid, y, 0)[:, None]
            lse = torch.logsumexp(x, dim=-1, keepdim=True)
            picked = x.gather(1, safe)
            total += ((lse - picked)[:, 0] * valid).sum()
            if grad is not None:
                x.sub_(lse).exp_()  # softmax, in place over the chunk's fp32 copy
                x.scatter_add_(1, safe, torch.full_like(picked, -1.0))
                x.mul_(valid[:, None])
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
