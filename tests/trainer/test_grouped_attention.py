"""Packed attention on the CPU: samples grouped by length, one padded call per group, equal to one call per
sample (outputs and gradients)."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from kubetune_trainer import attention

pytestmark = pytest.mark.trainer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lengths", [[70, 88, 103, 75, 91, 99, 1, 84], [12, 900, 230, 41, 160, 600, 3, 200]])
def test_grouped_attention_equals_one_call_per_sample(lengths: list[int], dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    bounds = np.concatenate([[0], np.cumsum(lengths)]).tolist()
    t = bounds[-1]
    inputs = [torch.randn(1, h, t, 16).to(dtype) for h in (6, 2, 2)]  # grouped-query heads: 3 queries per key
    a = [x.clone().requires_grad_() for x in inputs]
    b = [x.clone().requires_grad_() for x in inputs]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        ours = attention.per_sample_attention(*a, bounds, scale=0.25)
    ref = torch.cat(
        [
            F.scaled_dot_product_attention(
                b[0][:, :, s:e].float(),
                b[1][:, :, s:e].float(),
                b[2][:, :, s:e].float(),
                is_causal=True,
                scale=0.25,
                enable_gqa=True,
            )
            for s, e in pairwise(bounds)
        ],
        dim=2,
    )
    assert ours.shape == (1, 6, t, 16) and ours.dtype == dtype
    weight = torch.randn_like(ref)
    (ours.float() * weight).sum().backward()
    (ref * weight).sum().backward()
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: one rounding of the output and of each gradient
    assert (ours.float() - ref).abs().max() < tol
    for x, y in zip(a, b, strict=True):
        assert x.grad is not None and y.grad is not None
        assert torch.allclose(x.grad.float(), y.grad.float(), atol=tol, rtol=tol)


def test_length_groups_cover_every_token_once_and_bound_the_padding() -> None:
    lengths = [12, 900, 230, 41, 160, 600, 3, 200, 205, 198]
    bounds = tuple(np.concatenate([[0], np.cumsum(lengths)]).tolist())
    groups, inverse = attention.length_groups(bounds, torch.device("cpu"))
    tokens = torch.cat([g.tokens for g in groups])
    assert sorted(tokens.tolist()) == list(range(bounds[-1]))
    assert torch.equal(tokens[inverse], torch.arange(bounds[-1]))
    for g in groups:
        own = np.diff(bounds)[[i for i in range(len(lengths)) if bounds[i] in set(g.tokens.tolist())]]
        assert g.longest == own.max() and g.samples == len(own)
        assert g.samples == 1 or g.samples * g.longest**2 <= attention.GROUP_SLACK * (own**2).sum()
        assert g.slots.max() < g.samples * g.longest
    # Similar lengths share one call (160, 198, 200 and 205 tokens); the outliers go alone.
    assert [(g.samples, g.longest) for g in groups] == [
        (1, 3),
        (1, 12),
        (1, 41),
        (4, 205),
        (1, 230),
        (1, 600),
        (1, 900),
    ]
