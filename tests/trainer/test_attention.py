"""Packed attention: for every architecture the trainer packs, a packed row gives the logits and gradients of its
samples run one by one; the backend is chosen once from the device, dtype and architecture; what cannot be packed
is refused by name."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import torch
from kubetune_trainer import attention
from kubetune_trainer.data import IGNORE, Samples
from kubetune_trainer.errors import PermanentError
from kubetune_trainer.packing import collate_packed
from kubetune_trainer.train import token_loss_sum

pytestmark = pytest.mark.trainer

VOCAB = 97
SHAPE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
WINDOW = 4  # far below the longest sample, so a window that were ignored would change the logits
ALTERNATING = ["sliding_attention", "full_attention"] * 2


def architecture(name: str) -> Any:
    """A tiny random-weight config of each family, with its attention features switched on."""
    import transformers as t

    if name == "llama":
        return t.LlamaConfig(**SHAPE)
    if name == "mistral":  # Mistral v0.1: a sliding window on every layer
        return t.MistralConfig(**SHAPE, sliding_window=WINDOW)
    if name == "qwen2":  # the upper layers slide
        return t.Qwen2Config(**SHAPE, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2)
    if name == "qwen3":
        return t.Qwen3Config(**SHAPE, head_dim=16)
    if name == "gemma2":  # soft-capped attention logits (low, so that it bites), alternating local layers
        return t.Gemma2Config(
            **SHAPE,
            head_dim=16,
            sliding_window=WINDOW,
            attn_logit_softcapping=1.0,
            layer_types=ALTERNATING,
            initializer_range=0.2,
        )
    if name == "gemma3":
        return t.Gemma3TextConfig(**SHAPE, head_dim=16, sliding_window=WINDOW, layer_types=ALTERNATING)
    if name == "phi3":
        return t.Phi3Config(**SHAPE, sliding_window=WINDOW)
    if name == "olmo2":
        return t.Olmo2Config(**SHAPE)
    raise ValueError(name)


ARCHITECTURES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "olmo2"]
CPU = torch.device("cpu")


def make_samples(lengths: list[int], seed: int = 0) -> Samples:
    rng = np.random.default_rng(seed)
    ids = [rng.integers(3, VOCAB, size=n).astype(np.int32) for n in lengths]
    labels = []
    for s in ids:
        lab = np.full(len(s), IGNORE, dtype=np.int32)
        lab[:-1] = s[1:]
        labels.append(lab)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return Samples(np.concatenate(ids), np.concatenate(labels), offsets)


def models(name: str, backend: attention.Backend) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The same weights twice: with the packed attention, and with transformers' eager attention (which applies
    sliding windows and soft-capping itself) for the per-sample reference."""
    from transformers import AutoModelForCausalLM

    config = architecture(name)
    torch.manual_seed(0)
    packed = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=attention.register(backend))
    reference = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="eager")
    reference.load_state_dict(packed.state_dict())
    assert packed.config._attn_implementation == backend.name
    return packed, reference


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_packed_rows_equal_each_sample_run_alone_forward_and_backward(name: str) -> None:
    backend = attention.choose(architecture(name), CPU, None)
    assert backend == attention.Backend(attention.REFERENCE, False, backend.why)
    packed, reference = models(name, backend)
    lengths = [7, 19, 3, 12, 30, 1]
    samples = make_samples(lengths)
    batch = collate_packed(samples, [[0, 1, 2], [3, 4, 5]])

    logits = packed(**batch.model_inputs()).logits
    loss = token_loss_sum(logits, batch.labels)
    loss.backward()

    alone_logits, alone_loss = [], torch.zeros(())
    for i in range(len(lengths)):
        ids, labels = (torch.from_numpy(a).long()[None] for a in samples.get(i))
        out = reference(input_ids=ids).logits
        alone_logits.append(out.detach())
        alone_loss = alone_loss + token_loss_sum(out, labels)
    alone_loss.backward()

    expected = torch.cat(alone_logits, 1)
    assert logits.shape == expected.shape
    assert (logits.detach() - expected).abs().max().item() < 1e-5
    assert torch.allclose(loss, alone_loss, rtol=1e-6)
    for (param, a), b in zip(packed.named_parameters(), reference.parameters(), strict=True):
        assert a.grad is not None and b.grad is not None, param
        # fp32 sums in another order: equal to 1e-5 of the gradient's scale
        error = (a.grad - b.grad).abs().max().item()
        assert error <= 1e-5 * b.grad.abs().max().item() + 1e-8, (param, error)

    # The same packed row through the model's own attention with position_ids only: samples see each other.
    with torch.no_grad():
        leaky = reference(input_ids=batch.input_ids, position_ids=batch.position_ids).logits
    assert (leaky - expected).abs().max().item() > 1e-3


@pytest.mark.parametrize(
    ("name", "change"),
    [("mistral", {"sliding_window": None}), ("gemma2", {"attn_logit_softcapping": None})],
)
@torch.no_grad()
def test_the_window_and_the_soft_cap_change_the_result(name: str, change: dict[str, Any]) -> None:
    """The matrix above would pass vacuously if these tiny models never reached the window or the cap."""
    backend = attention.choose(architecture(name), CPU, None)
    packed, _ = models(name, backend)
    without = copy.deepcopy(packed)
    for key, value in change.items():
        setattr(without.config, key, value)
        for module in without.modules():
            for attr in ("sliding_window", "attn_logit_softcapping"):
                if attr in change and hasattr(module, attr) and getattr(module, attr) is not None:
                    setattr(module, attr, value)
    batch = collate_packed(make_samples([30, 25]), [[0, 1]])
    a = packed(**batch.model_inputs()).logits
    b = without(**batch.model_inputs()).logits
    assert (a - b).abs().max().item() > 1e-3


def test_per_sample_attention_matches_a_dense_masked_softmax() -> None:
    """The reference kernel on its own, against the textbook formula over the whole row with a block mask."""
    torch.manual_seed(0)
    lengths, heads, kv_heads, dim = [5, 11, 1, 9], 4, 2, 8
    total = sum(lengths)
    q = torch.randn(1, heads, total, dim)
    k, v = torch.randn(2, 1, kv_heads, total, dim)
    bounds = np.concatenate([[0], np.cumsum(lengths)]).tolist()
    seg = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    pos = torch.cat([torch.arange(n) for n in lengths])
    for window, softcap in [(None, None), (3, None), (None, 2.0), (3, 2.0)]:
        out = attention.per_sample_attention(q, k, v, bounds, dim**-0.5, window=window, softcap=softcap)
        scores = q @ k.repeat_interleave(2, 1).transpose(-1, -2) * dim**-0.5
        if softcap:
            scores = torch.tanh(scores / softcap) * softcap
        allowed = (seg[:, None] == seg[None, :]) & (pos[None, :] <= pos[:, None])
        if window:
            allowed &= pos[None, :] > pos[:, None] - window
        dense = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1) @ v.repeat_interleave(2, 1)
        assert (out - dense).abs().max().item() < 1e-5, (window, softcap)


def test_the_backend_is_chosen_once_from_device_dtype_and_architecture() -> None:
    cuda = torch.device("cuda", 0)
    llama = architecture("llama")
    assert attention.choose(llama, cuda, torch.bfloat16) == attention.Backend(
        "kubetune_varlen_bf16", True, "varlen flash attention on the GPU"
    )
    assert attention.choose(llama, cuda, torch.float16).name == "kubetune_varlen_fp16"
    # Sliding windows run in the varlen kernel too.
    assert attention.choose(architecture("mistral"), cuda, torch.bfloat16).bounds_on_device
    # fp32 compute, soft-capping and attention dropout take the per-sample backend, boundaries on the host.
    fp32 = attention.choose(llama, cuda, None)
    capped = attention.choose(architecture("gemma2"), cuda, torch.bfloat16)
    llama_dropout = copy.deepcopy(llama)
    llama_dropout.attention_dropout = 0.1
    dropout = attention.choose(llama_dropout, cuda, torch.bfloat16)
    for backend in (fp32, capped, dropout):
        assert (backend.name, backend.bounds_on_device) == (attention.REFERENCE, False)
    assert "gemma2 soft-caps attention logits" in capped.why


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            lambda t: t.Qwen3NextConfig(**SHAPE, layer_types=["linear_attention", "full_attention"] * 2),
            "model family qwen3_next has linear_attention layers",
        ),
        (
            lambda t: t.Llama4TextConfig(**SHAPE, attention_chunk_size=8),
            "model family llama4_text has chunked_attention layers",
        ),
    ],
)
def test_architectures_that_cannot_be_packed_are_refused_by_name(config: Any, message: str) -> None:
    import transformers

    with pytest.raises(PermanentError) as e:
        attention.choose(config(transformers), CPU, None)
    assert message in str(e.value) and "set dataset.packing: false" in str(e.value)


def test_an_attention_that_gets_no_boundaries_is_refused() -> None:
    q = torch.zeros(1, 2, 4, 8)
    with pytest.raises(PermanentError, match=r"Odd did not pass the sample boundaries .* dataset.packing: false"):
        attention.reference_forward(type("Odd", (torch.nn.Module,), {})(), q, q, q, None)


@pytest.mark.gpu
def test_varlen_kernel_matches_per_sample_attention_on_a_gpu_without_host_syncs() -> None:
    if not torch.cuda.is_available():
        pytest.skip("the varlen kernel runs on CUDA only")
    torch.manual_seed(0)
    lengths = [5, 17, 1, 40, 9]
    total, heads, kv_heads, dim = sum(lengths), 8, 2, 64
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    cu = torch.tensor(bounds, dtype=torch.int32, device="cuda")
    for window in (None, 6):
        # fp32 inputs, as RoPE leaves q and k under autocast: the backend casts them to its compute dtype.
        q = torch.randn(1, heads, total, dim, device="cuda", requires_grad=True)
        k = torch.randn(1, kv_heads, total, dim, device="cuda", requires_grad=True)
        v = torch.randn(1, kv_heads, total, dim, device="cuda", requires_grad=True)
        torch.cuda.set_sync_debug_mode("error")  # any device-to-host copy in the kernel path raises
        try:
            out, _ = attention.varlen_forward(
                torch.nn.Module(),
                q,
                k,
                v,
                None,
                scaling=dim**-0.5,
                sliding_window=window,
                compute_dtype=torch.bfloat16,
                cu_seq_lens_q=cu,
                max_length_q=max(lengths),
            )
            out.float().sum().backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        reference = attention.per_sample_attention(q, k, v, bounds.tolist(), dim**-0.5, window=window)
        assert out.dtype == torch.bfloat16 and out.shape == (1, total, heads, dim)
        assert (out.float() - reference.transpose(1, 2)).abs().max().item() < 2e-2, window
        assert q.grad is not None and torch.isfinite(q.grad).all()
