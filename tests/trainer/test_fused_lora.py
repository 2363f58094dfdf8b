"""The fused LoRA forward computes what peft's does: outputs and every gradient, in fp32 and under bf16 autocast,
with and without dropout; layers it cannot fuse keep peft's forward; the trainer builds LoRA models with it."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from kubetune_trainer import fused_lora
from kubetune_trainer.config import TrainerConfig
from kubetune_trainer.modeling import build, load_tokenizer
from peft.tuners.lora.layer import Linear as LoraLinear
from trainer_assets import cpu_runtime, make_model_dir, model_config, rows, trainer_config, write_jsonl

pytestmark = pytest.mark.trainer

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_model(dropout: float = 0.0, use_dora: bool = False) -> Any:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(copy.deepcopy(model_config("llama", 97)))
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=TARGETS, use_dora=use_dora)
    model = peft.get_peft_model(base, config)
    with torch.no_grad():  # B starts at zero, which would hide any mistake on the update's path
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return model


def forward_backward(model: Any, ids: torch.Tensor, autocast: bool, seed: int = 1) -> tuple[torch.Tensor, dict]:
    torch.manual_seed(seed)  # the same dropout masks in both models
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(input_ids=ids).logits
    (logits.float() * torch.linspace(-1, 1, logits.shape[-1])).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return logits.detach().float(), grads


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / max(1.0, b.abs().max().item()))


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fused_forward_equals_peft_in_fp32(dropout: float) -> None:
    reference = lora_model(dropout)
    fused = copy.deepcopy(reference)
    assert fused_lora.fuse(fused) == 2 * len(TARGETS)  # 7 projections x 2 layers
    ids = torch.randint(3, 97, (2, 24))
    out_f, grads_f = forward_backward(fused, ids, autocast=False)
    out_r, grads_r = forward_backward(reference, ids, autocast=False)
    assert max_error(out_f, out_r) < 1e-5
    assert grads_f.keys() == grads_r.keys() and any("lora_A" in n for n in grads_f)
    for name, g in grads_r.items():
        assert max_error(grads_f[name], g) < 1e-5, name


def relative_l2(got: dict[str, torch.Tensor], exact: dict[str, torch.Tensor]) -> float:
    error = sum(float((got[n].float() - g).pow(2).sum()) for n, g in exact.items())
    return (error / sum(float(g.pow(2).sum()) for g in exact.values())) ** 0.5


def test_fused_forward_under_bf16_autocast_is_as_close_to_fp32_as_peft() -> None:
    """bf16 rounds differently in the two (the fused sum rounds once, peft's twice): each is judged by its
    distance to the fp32 result, over all the outputs and over all the gradients."""
    reference = lora_model()
    fused = copy.deepcopy(reference)
    fused_lora.fuse(fused)
    ids = torch.randint(3, 97, (2, 24))
    exact_out, exact = forward_backward(reference, ids, autocast=False)
    out_f, grads_f = forward_backward(fused, ids, autocast=True)
    out_r, grads_r = forward_backward(reference, ids, autocast=True)
    out_error_f, out_error_r = (relative_l2({"o": o}, {"o": exact_out}) for o in (out_f, out_r))
    grad_error_f, grad_error_r = relative_l2(grads_f, exact), relative_l2(grads_r, exact)
    assert 0 < out_error_f <= 1.25 * out_error_r and out_error_f < 0.02
    assert 0 < grad_error_f <= 1.25 * grad_error_r and grad_error_f < 0.05


def test_layers_it_cannot_fuse_keep_peft_forward() -> None:
    dora = lora_model(use_dora=True)
    reference = copy.deepcopy(dora)
    fused_lora.fuse(dora)  # DoRA layers are plain lora.Linear with a variant: they fall back per call
    ids = torch.randint(3, 97, (1, 16))
    assert torch.equal(forward_backward(dora, ids, False)[0], forward_backward(reference, ids, False)[0])

    merged = lora_model()
    fused_lora.fuse(merged)
    before = forward_backward(merged, ids, False)[0]
    merged.merge_adapter()  # a merged adapter is inside the base weights: the fused path must not add it again
    with torch.no_grad():
        after = merged(input_ids=ids).logits.float()
    assert torch.allclose(before, after, atol=1e-4)
    with merged.disable_adapter(), torch.no_grad():
        off = merged(input_ids=ids).logits.float()
    assert not torch.allclose(off, after, atol=1e-3)


def test_trainer_builds_lora_models_fused(tmp_path: Path) -> None:
    model_dir = make_model_dir(tmp_path / "model")
    data = write_jsonl(tmp_path / "data.jsonl", rows(8, "prompt_completion"))
    cfg = TrainerConfig.model_validate(trainer_config(tmp_path, model_dir, data))
    prepared = build(cfg, load_tokenizer(cfg.model), cpu_runtime(), packed=True)
    lora = [m for m in prepared.model.modules() if isinstance(m, LoraLinear)]
    assert lora and all(type(m) is fused_lora.fused_class() for m in lora)
