"""The compiled RMSNorm and SiLU-gate kernels compute what the modules they replace compute (outputs and every
gradient, fp32 and bf16 autocast, Llama and Qwen2); only modules with exactly Llama's formula are swapped; the
trainer uses them when asked, and by default only where the one-off compile pays."""

from __future__ import annotations

import copy
import importlib
import inspect
from pathlib import Path
from typing import Any

import pytest
import torch
from kubetune_trainer import fused_ops
from kubetune_trainer.config import TrainerConfig
from kubetune_trainer.modeling import build, load_tokenizer
from trainer_assets import cpu_runtime, make_model_dir, model_config, rows, trainer_config, write_jsonl

pytestmark = pytest.mark.trainer

CPU = torch.device("cpu")


def module_class(name: str) -> type:
    family = {"Llama": "llama", "Mistral": "mistral", "Qwen2": "qwen2", "Qwen3": "qwen3", "Granite": "granite"}
    prefix = next((p for p in sorted(family, key=len, reverse=True) if name.startswith(p)), None)
    module = importlib.import_module(
        f"transformers.models.{family[prefix]}.modeling_{family[prefix]}"
        if prefix
        else "transformers.models.smollm3.modeling_smollm3"
    )
    return getattr(module, name)  # type: ignore[no-any-return]


@pytest.mark.parametrize("name", sorted(fused_ops.NORMS | fused_ops.GATED_MLPS))
def test_every_swapped_class_has_exactly_llamas_forward(name: str) -> None:
    llama = module_class("LlamaRMSNorm" if name.endswith("RMSNorm") else "LlamaMLP")
    assert inspect.getsource(module_class(name).forward) == inspect.getsource(llama.forward)


def forward_backward(model: Any, ids: torch.Tensor, autocast: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(input_ids=ids).logits
    (logits.float() * torch.linspace(-1, 1, logits.shape[-1])).sum().backward()
    return logits.detach().float(), {n: p.grad.float().clone() for n, p in model.named_parameters()}


def relative(got: torch.Tensor, exact: torch.Tensor) -> float:
    return float((got - exact).norm() / exact.norm())


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fused_model_equals_eager_in_fp32_and_bf16(arch: str) -> None:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    eager = AutoModelForCausalLM.from_config(copy.deepcopy(model_config(arch, 97)))
    with torch.no_grad():  # norm weights start at one, which would hide a mistake in their gradient's path
        for name, p in eager.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    fused = copy.deepcopy(eager)
    assert fused_ops.fuse(fused) == 2 * 2 + 1 + 2  # two norms and an MLP per layer, the final norm
    for sequence in (24, 37):  # a second length: the kernels take any length without a new model
        ids = torch.randint(3, 97, (2, sequence))
        out_e, grads_e = forward_backward(eager, ids, autocast=False)
        out_f, grads_f = forward_backward(fused, ids, autocast=False)
        assert relative(out_f, out_e) < 1e-5
        assert grads_f.keys() == grads_e.keys()
        for name, g in grads_e.items():
            assert relative(grads_f[name], g) < 1e-4, name
    # bf16: as close to the fp32 result as eager bf16 is
    ids = torch.randint(3, 97, (2, 24))
    exact, exact_grads = forward_backward(eager, ids, autocast=False)
    out_e, grads_e = forward_backward(eager, ids, autocast=True)
    out_f, grads_f = forward_backward(fused, ids, autocast=True)
    assert relative(out_f, exact) <= 1.25 * relative(out_e, exact) + 1e-3
    for name, g in exact_grads.items():
        assert relative(grads_f[name], g) <= 1.25 * relative(grads_e[name], g) + 1e-3, name


def test_other_formulas_keep_their_forward() -> None:
    from transformers import GemmaConfig
    from transformers.models.gemma.modeling_gemma import GemmaForCausalLM

    config = GemmaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16,
    )  # fmt: skip
    assert fused_ops.fuse(GemmaForCausalLM(config)) == 0  # (1 + weight) norms and a tanh-GELU gate


def test_default_is_on_for_large_models_with_a_compiler_and_no_whole_block_compile() -> None:
    big, small = fused_ops.AUTO_MIN_PARAMETERS, fused_ops.AUTO_MIN_PARAMETERS - 1
    assert fused_ops.has_compiler(CPU)  # this machine builds the tests' kernels
    assert fused_ops.wanted(None, False, big, CPU)
    assert not fused_ops.wanted(None, False, small, CPU)  # a tiny model: the compile would cost more than it saves
    assert not fused_ops.wanted(None, True, big, CPU)  # the blocks are compiled whole already
    assert fused_ops.wanted(True, False, small, CPU) and not fused_ops.wanted(False, False, big, CPU)


def test_trainer_builds_with_fused_kernels_when_asked(tmp_path: Path) -> None:
    model_dir = make_model_dir(tmp_path / "model")
    data = write_jsonl(tmp_path / "data.jsonl", rows(8, "prompt_completion"))
    doc = trainer_config(tmp_path, model_dir, data)
    for setting, swapped in ((True, True), (None, False)):  # the tiny model stays eager by default
        doc["training"] = {**doc["training"], "fusedKernels": setting}
        cfg = TrainerConfig.model_validate(doc)
        model = build(cfg, load_tokenizer(cfg.model), cpu_runtime(), packed=True).model
        norms = [m for m in model.modules() if type(m).__name__ == "LlamaRMSNorm"]
        assert norms and all(("forward" in m.__dict__) == swapped for m in norms)
