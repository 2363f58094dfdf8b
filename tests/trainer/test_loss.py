"""The training loss: chunked cross-entropy with its gradient made in the forward, on the target positions only,
equals the plain full-logits loss and gradients."""

from __future__ import annotations

import copy

import numpy as np
import peft
import pytest
import torch
import torch.nn.functional as F
from kubetune_trainer import loss
from kubetune_trainer.data import IGNORE, Samples
from kubetune_trainer.loss import accepts_logits_to_keep, cross_entropy_sum
from kubetune_trainer.packing import collate_packed, collate_padded
from kubetune_trainer.train import token_loss_sum

pytestmark = pytest.mark.trainer


def reference(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE, reduction="sum")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_sum_equals_the_plain_loss_and_gradient(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(loss, "CHUNK_ELEMENTS", 3 * 97)  # 3 rows a chunk: 13 rows make 5 chunks, the last short
    torch.manual_seed(0)
    base = (torch.randn(13, 97) * 4).to(dtype)
    labels = torch.randint(0, 97, (13,))
    labels[[2, 7, 12]] = IGNORE
    a = base.clone().requires_grad_()
    b = base.clone().requires_grad_()
    ours = cross_entropy_sum(a, labels)
    assert torch.equal(a.detach(), base)  # the logits are read, never overwritten
    ref = reference(b, labels)
    (ours * 0.37).backward()
    (ref * 0.37).backward()
    assert ours.dtype == torch.float32
    assert torch.allclose(ours, ref, rtol=1e-6, atol=1e-5)
    assert a.grad is not None and b.grad is not None and a.grad.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 4e-3  # bf16: one rounding of softmax - one_hot, then of the scale
    assert torch.allclose(a.grad.float(), b.grad.float(), atol=tol, rtol=0), (a.grad - b.grad).abs().max()
    assert a.grad[[2, 7, 12]].abs().max() == 0  # ignored rows get no gradient


def test_cross_entropy_sum_without_gradient_keeps_nothing() -> None:
    logits = torch.randn(4, 11)
    labels = torch.tensor([1, IGNORE, 3, 10])
    assert torch.allclose(cross_entropy_sum(logits, labels), reference(logits, labels))


def make_samples(lengths: list[int], vocab: int, seed: int) -> Samples:
    """Samples whose first third of tokens is prompt (no loss), like chat rows."""
    rng = np.random.default_rng(seed)
    ids, labels = [], []
    for n in lengths:
        s = rng.integers(3, vocab, size=n).astype(np.int32)
        lab = np.full(n, IGNORE, dtype=np.int32)
        lab[n // 3 : -1] = s[n // 3 + 1 :]
        ids.append(s)
        labels.append(lab)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return Samples(np.concatenate(ids), np.concatenate(labels), offsets)


@pytest.mark.parametrize("packed", [True, False])
def test_target_only_logits_give_the_full_logits_loss_and_gradients(llama_dir: object, packed: bool) -> None:
    from kubetune_trainer import attention
    from transformers import AutoConfig, AutoModelForCausalLM

    cpu = attention.choose(AutoConfig.from_pretrained(llama_dir), torch.device("cpu"), None)
    attn = attention.register(cpu) if packed else "sdpa"
    base = AutoModelForCausalLM.from_pretrained(llama_dir, attn_implementation=attn)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    model = peft.get_peft_model(base, lora)
    twin = copy.deepcopy(model)
    assert accepts_logits_to_keep(model)
    samples = make_samples([9, 21, 5, 14], model.config.vocab_size, seed=3)
    bins = [[0, 1], [2, 3]] if packed else [[0], [1], [2], [3]]

    def collate(only: bool) -> object:
        return collate_packed(samples, bins, only) if packed else collate_padded(samples, bins, 0, only)

    full, kept = collate(False), collate(True)
    assert kept.keep is not None and kept.target_labels is not None and len(kept.target_labels) == kept.num_targets
    logits = model(**kept.model_inputs()).logits
    assert logits.shape[-2] == kept.num_targets  # the LM head saw the target positions only
    ours = token_loss_sum(logits, kept.loss_labels)
    ref = reference(twin(**full.model_inputs()).logits.reshape(-1, logits.shape[-1]), full.labels.reshape(-1))
    ours.backward()
    ref.backward()
    assert torch.allclose(ours, ref, rtol=1e-5)
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads
    for name, p in twin.named_parameters():
        if p.requires_grad:
            assert torch.allclose(grads[name], p.grad, atol=1e-6, rtol=1e-4), name
