"""Exact attention for packed rows: every sample attends only to itself.

`position_ids` alone do not stop sdpa or eager attention from looking across sample boundaries. The trainer
registers its own transformers attention functions, which receive the boundaries (`cu_seq_lens_q`,
`max_length_q`, passed by the forward call) and compute causal attention per sample, honouring what the
architecture asks of each layer: a sliding window (Mistral, Qwen2/3 and Phi-3 configs with `sliding_window`, the
local layers of Gemma 2/3) and soft-capped attention logits (Gemma 2).

The backend is chosen once, when the model is built, from the device, the compute dtype and the architecture
(`choose`), never per call:

- varlen: CUDA with a bf16/fp16 compute dtype, no logit soft-capping, no attention dropout.
  `torch.nn.attention.varlen.varlen_attn`, PyTorch's variable-length flash attention (no flash-attn wheel
  needed); causal with an optional sliding window through `window_size`, grouped-query heads natively. q, k and v
  are cast to the compute dtype (under autocast RoPE leaves q and k in fp32). The boundaries stay on the GPU: no
  host sync.
- reference: everything else (CPU, fp32, soft-capping, attention dropout). One attention call per sample:
  scaled_dot_product_attention (is_causal, or a banded mask for a sliding window), or the explicit softmax for
  soft-capped logits. Cost is sum(l^2) like varlen, and no block-diagonal mask over the whole row is ever built.
  It slices by the boundaries on the host, so the trainer keeps `cu_seq_lens` on the CPU for this backend
  (`Backend.bounds_on_device`): a GPU run never waits on a device-to-host copy in every layer.

Architectures whose attention cannot be packed this way (linear or chunked attention layers, attention sinks)
are refused with a PermanentError naming the model family and the `dataset.packing: false` alternative, at
build time where the config tells, else at the first forward.

No mask function is registered for these names, so transformers builds no mask and passes None.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .errors import PermanentError

VARLEN = "kubetune_varlen"
REFERENCE = "kubetune_reference"
HALF = (torch.bfloat16, torch.float16)
PACKABLE_LAYERS = {"full_attention", "sliding_attention"}
PACKING_OFF = "set dataset.packing: false to train it unpacked (padded batches)"


@dataclass(frozen=True)
class Backend:
    """The packed attention a model was built with."""

    name: str  # the registered attn_implementation
    bounds_on_device: bool  # where the trainer puts cu_seq_lens: the varlen kernel reads them on the GPU
    why: str  # for the log


def _text_config(config: Any) -> Any:
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def family(config: Any) -> str:
    return str(getattr(config, "model_type", None) or type(config).__name__)


def refusal(config: Any, what: str) -> PermanentError:
    return PermanentError(f"packed attention: model family {family(config)} {what}; {PACKING_OFF}")


def check_packable(config: Any) -> None:
    """Refuse architectures whose attention layers are not (sliding-window) softmax attention."""
    text = _text_config(config)
    kinds = set(getattr(text, "layer_types", None) or []) - PACKABLE_LAYERS
    if kinds:
        raise refusal(config, f"has {', '.join(sorted(kinds))} layers, which packed rows cannot keep apart")


def choose(config: Any, device: torch.device, dtype: torch.dtype | None) -> Backend:
    """The packed attention for this model on this device, decided once (see the module docstring)."""
    check_packable(config)
    text = _text_config(config)
    softcap = getattr(text, "attn_logit_softcapping", None)
    dropout = float(getattr(text, "attention_dropout", 0.0) or 0.0)
    if device.type != "cuda":
        return Backend(REFERENCE, False, "per-sample attention on the CPU")
    if dtype not in HALF:
        return Backend(REFERENCE, False, "per-sample attention: the varlen kernel needs a bf16/fp16 compute dtype")
    if softcap:
        why = f"per-sample attention: {family(config)} soft-caps attention logits, which the varlen kernel cannot"
        return Backend(REFERENCE, False, why)
    if dropout:
        return Backend(
            REFERENCE, False, f"per-sample attention: attention dropout {dropout} (the varlen kernel has none)"
        )
    name = f"{VARLEN}_{'bf16' if dtype == torch.bfloat16 else 'fp16'}"
    return Backend(name, True, "varlen flash attention on the GPU")


def _banded(n: int, window: int | None, device: torch.device) -> torch.Tensor:
    """Causal mask of one sample, limited to the last `window` keys (the query's own included) when given."""
    i = torch.arange(n, device=device)
    allowed = i[None, :] <= i[:, None]
    if window is not None:
        allowed &= i[None, :] > i[:, None] - window
    return allowed


def _softcapped(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float, softcap: float, dropout: float
) -> torch.Tensor:
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.tanh(q @ k.transpose(-1, -2) * (scale / softcap)) * softcap
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    if dropout:
        probs = F.dropout(probs, p=dropout)
    return probs @ v


GROUP_SLACK = 1.25  # a group padded to its longest sample may cost this much more attention than its samples alone


@dataclass(frozen=True)
class _Group:
    tokens: torch.Tensor  # positions in the packed row of the group's tokens, sample after sample
    slots: torch.Tensor  # where those tokens sit in the group's (samples x longest) padded buffer
    samples: int
    longest: int


@functools.lru_cache(maxsize=8)  # every layer of one forward asks for the same boundaries
def length_groups(bounds: tuple[int, ...], device: torch.device) -> tuple[tuple[_Group, ...], torch.Tensor]:
    """Samples grouped by length (shortest first; a group grows while padding all of it to its longest costs at
    most GROUP_SLACK x the attention of its samples alone), and the permutation that puts the groups' outputs,
    concatenated, back in packed-row order."""
    b = np.asarray(bounds, dtype=np.int64)
    lengths = np.diff(b)
    members: list[list[int]] = [[]]
    for i in np.argsort(lengths, kind="stable").tolist():
        trial = [*members[-1], i]
        if members[-1] and len(trial) * lengths[i] ** 2 > GROUP_SLACK * float((lengths[trial] ** 2).sum()):
            members.append([i])
        else:
            members[-1] = trial
    groups, order = [], []
    for m in members:
        n = lengths[m]
        tokens = np.concatenate([np.arange(b[i], b[i + 1]) for i in m])
        starts = np.repeat(np.cumsum(n) - n, n)
        slots = np.repeat(np.arange(len(m)) * n.max(), n) + np.arange(n.sum()) - starts
        groups.append(
            _Group(torch.from_numpy(tokens).to(device), torch.from_numpy(slots).to(device), len(m), int(n.max()))
        )
        order.append(tokens)
    inverse = torch.from_numpy(np.argsort(np.concatenate(order), kind="stable")).to(device)
    return tuple(groups), inverse


def grouped_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bounds: list[int], scale: float, dropout: float = 0.0
) -> torch.Tensor:
    """Causal attention of every sample to itself with one call per group of samples of similar length (see
    length_groups), each sample padded at its end: causality keeps real queries off the padding, whose own rows
    are dropped. Slicing a sample at a time costs, in the backward, a zero-filled gradient of the whole row per
    sample; this costs gathers and one scatter per group. On the CPU it runs in fp32, which this kernel does faster
    than bf16 there (and more exactly); the result comes back in the query's dtype.
    (1, H, T, D) in and out."""
    groups, inverse = length_groups(tuple(bounds), query.device)
    work = torch.float32 if query.device.type == "cpu" else query.dtype
    outs = []
    with torch.autocast(query.device.type, enabled=False):
        q, k, v = (t[0].transpose(0, 1).to(work) for t in (query, key, value))  # (T, H, D)
        for g in groups:

            def pad(x: torch.Tensor, g: _Group = g) -> torch.Tensor:
                buf = x.new_zeros(g.samples * g.longest, *x.shape[1:]).index_copy(
                    0, g.slots, x.index_select(0, g.tokens)
                )
                return buf.view(g.samples, g.longest, *x.shape[1:]).transpose(1, 2)

            out = F.scaled_dot_product_attention(
                pad(q), pad(k), pad(v), is_causal=True, dropout_p=dropout, scale=scale, enable_gqa=True
            )
            outs.append(out.transpose(1, 2).reshape(-1, *out.shape[1::2]).index_select(0, g.slots))
    return torch.cat(outs).index_select(0, inverse).to(query.dtype).transpose(0, 1)[None]


@torch.compiler.disable  # a Python loop over samples: tracing it would recompile for every sample count
def per_sample_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    bounds: list[int],
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """(1, H, T, D) in and out; sample i spans [bounds[i], bounds[i+1]) of T."""
    longest = max(e - s for s, e in pairwise(bounds))
    if not softcap and (window is None or window >= longest):
        return grouped_attention(query, key, value, bounds, scale, dropout)
    outs = []
    for s, e in pairwise(bounds):
        q, k, v = query[:, :, s:e], key[:, :, s:e], value[:, :, s:e]
        n = e - s
        banded = window is not None and window < n
        if softcap:
            out = _softcapped(q, k, v, _banded(n, window, q.device), scale, softcap, dropout)
        elif banded:
            mask = _banded(n, window, q.device)
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale, enable_gqa=True
            )
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, dropout_p=dropout, scale=scale, enable_gqa=True
            )
        outs.append(out)
    return torch.cat(outs, dim=2)


def _boundaries(module: torch.nn.Module, query: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None or query.shape[0] != 1:
        raise PermanentError(
            f"packed attention: {type(module).__name__} did not pass the sample boundaries (cu_seq_lens) to its "
            f"attention, so packed samples would see each other; {PACKING_OFF}"
        )
    if kwargs.get("s_aux") is not None:
        raise PermanentError(
            f"packed attention: {type(module).__name__} uses attention sinks, which the packed attention does not "
            f"implement; {PACKING_OFF}"
        )
    return cu


def _scale(query: torch.Tensor, scaling: float | None) -> float:
    return scaling if scaling is not None else query.shape[-1] ** -0.5


def reference_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The transformers attention interface: (1, H, T, D) in, (1, T, H, D) out."""
    cu = _boundaries(module, query, kwargs)
    out = per_sample_attention(
        query,
        key,
        value,
        cu.tolist(),  # a host tensor for this backend: no device sync
        _scale(query, scaling),
        window=sliding_window,
        softcap=softcap,
        dropout=dropout,
    )
    return out.transpose(1, 2).contiguous(), None


def varlen_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    *,
    compute_dtype: torch.dtype,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    from torch.nn.attention.varlen import varlen_attn

    cu = _boundaries(module, query, kwargs)
    if softcap or dropout:  # `choose` rules both out for this backend; a model that still sends them is refused
        raise PermanentError(
            f"packed attention: {type(module).__name__} asks for soft-capping or dropout, which the varlen kernel "
            f"cannot do; {PACKING_OFF}"
        )
    # (1, H, T, D) -> (T, H, D), in the compute dtype whatever autocast and RoPE left them in.
    q, k, v = (t[0].transpose(0, 1).to(compute_dtype).contiguous() for t in (query, key, value))
    window = (sliding_window - 1, 0) if sliding_window else (-1, 0)
    max_len = int(kwargs["max_length_q"])
    out = varlen_attn(
        q, k, v, cu, cu, max_len, max_len, scale=_scale(query, scaling), window_size=window, enable_gqa=True
    )
    return out[None], None


def register(backend: Backend) -> str:
    """Make the backend's attention function known to transformers; returns its attn_implementation name."""
    from functools import partial

    from transformers import AttentionInterface

    if backend.name == REFERENCE:
        AttentionInterface.register(REFERENCE, reference_forward)
    else:
        dtype = torch.bfloat16 if backend.name.endswith("bf16") else torch.float16
        AttentionInterface.register(backend.name, partial(varlen_forward, compute_dtype=dtype))
    return backend.name
