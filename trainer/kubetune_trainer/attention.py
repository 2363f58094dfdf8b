"""Exact attention for packed rows: every sample attends only to itself.

`position_ids` alone do not stop sdpa or eager attention from looking across sample boundaries. The trainer
registers its own transformers attention function, `kubetune_packed`, which receives the boundaries
(`cu_seq_lens_q/k`, `max_length_q/k`, passed by the forward call) and computes causal attention per sample:

- CUDA with bf16/fp16: `torch.nn.attention.varlen.varlen_attn`, PyTorch's own variable-length flash
  attention (no flash-attn wheel needed), causal via window (-1, 0), grouped-query heads natively.
- otherwise (CPU, fp32, attention dropout): scaled_dot_product_attention with is_causal on each sample's
  slice, which costs sum(l^2) like varlen and never materialises a block-diagonal mask.

No mask function is registered for the name, so transformers builds no mask and passes None.
"""

from __future__ import annotations

from itertools import pairwise
from typing import Any

import torch
import torch.nn.functional as F

PACKED_ATTENTION = "kubetune_packed"


@torch.compiler.disable  # a Python loop over samples: tracing it would recompile for every sample count
def _segments(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bounds: list[int], **kw: Any
) -> torch.Tensor:
    outs = [
        F.scaled_dot_product_attention(
            query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], is_causal=True, enable_gqa=True, **kw
        )
        for s, e in pairwise(bounds)
    ]
    return torch.cat(outs, dim=2)


def _varlen(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu: torch.Tensor, max_len: int, scale: float | None
) -> torch.Tensor:
    from torch.nn.attention.varlen import varlen_attn

    # (1, H, T, D) -> (T, H, D)
    q, k, v = (t[0].transpose(0, 1).contiguous() for t in (query, key, value))
    out = varlen_attn(q, k, v, cu, cu, max_len, max_len, scale=scale, window_size=(-1, 0), enable_gqa=True)
    return out.transpose(0, 1)[None]


def packed_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The transformers attention interface: (B, H, T, D) in, (B, T, H, D) out; B is 1 for packed rows."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None or query.shape[0] != 1:
        raise ValueError(
            f"{PACKED_ATTENTION} attention needs one packed row and its cu_seq_lens; this model's attention did not "
            "receive them (set dataset.packing to false for this architecture)"
        )
    use_varlen = query.is_cuda and query.dtype in (torch.bfloat16, torch.float16) and dropout == 0.0
    if use_varlen:
        out = _varlen(query, key, value, cu.to(torch.int32), int(kwargs["max_length_q"]), scaling)
    else:
        out = _segments(query, key, value, cu.tolist(), scale=scaling, dropout_p=dropout)
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    from transformers import AttentionInterface

    AttentionInterface.register(PACKED_ATTENTION, packed_attention_forward)
    return PACKED_ATTENTION
