"""Compiled kernels for the elementwise work of Llama-family decoder layers: RMSNorm and the MLP's SiLU gate.

In eager mode each RMSNorm is six passes over the hidden states forward (cast, square, mean, rsqrt, scale, cast
back) and more backward; the gated MLP's `silu(gate) * up` three, each keeping its own output for the backward.
On SmolLM2-135M with LoRA (CPU) the norms and the gate are ~15% of a training step. Compiled (torch.compile,
dynamic sequence length: one kernel per shape family, built once per process), each is one pass forward and one
backward: same formula, same dtypes, so the results match eager to rounding.

Only classes whose forward is exactly Llama's formula are swapped (NORMS, GATED_MLPS: transformers' copies of
Llama's modules); Gemma's (1 + weight) norm, Phi-3's fused gate_up projection and anything else keep theirs.

`wanted` decides when: `training.fusedKernels` when set; by default for models of 100M parameters or more (the
one-off compile, seconds, is paid back within the first steps) when the device has a compiler (a C++ compiler on
the CPU, Triton on CUDA) and the decoder blocks are not compiled whole anyway (`training.compile`).
"""

from __future__ import annotations

import functools
import os
import shutil
import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

NORMS = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "GraniteRMSNorm", "SmolLM3RMSNorm"}
GATED_MLPS = {"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "GraniteMLP", "SmolLM3MLP"}
AUTO_MIN_PARAMETERS = 100_000_000


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm: normalised in fp32, cast back to the input dtype, then scaled."""
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def silu_gate(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


@functools.cache
def compiled() -> tuple[Any, Any]:
    return torch.compile(rms_norm, dynamic=True), torch.compile(silu_gate, dynamic=True)


def _norm_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    return compiled()[0](hidden_states, self.weight, self.variance_epsilon)  # type: ignore[no-any-return]


def _mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(compiled()[1](self.gate_proj(x), self.up_proj(x)))  # type: ignore[no-any-return]


def has_compiler(device: torch.device) -> bool:
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        return bool(has_triton())
    return device.type == "cpu" and any(shutil.which(c) for c in (os.environ.get("CXX", "c++"), "g++", "clang++"))


def wanted(setting: bool | None, whole_blocks_compiled: bool, parameters: int, device: torch.device) -> bool:
    if setting is not None:
        return setting
    return not whole_blocks_compiled and parameters >= AUTO_MIN_PARAMETERS and has_compiler(device)


def apply(model: nn.Module, training: Any, parameters: int, device: torch.device) -> int:
    """Fuse when `wanted` for this training config (`fusedKernels`, `compile`); returns how many modules run fused."""
    if not wanted(training.fused_kernels, training.compile, parameters, device):
        return 0
    return fuse(model)


def _silu_gated(module: nn.Module) -> bool:
    act = getattr(module, "act_fn", None)
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"


def fuse(model: nn.Module) -> int:
    """Swap the forward of every Llama-formula RMSNorm and SiLU-gated MLP for the compiled one; returns how many."""
    swapped = 0
    for module in model.modules():
        name = type(module).__name__
        if name in NORMS and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(_norm_forward, module)
        elif name in GATED_MLPS and _silu_gated(module):
            module.forward = types.MethodType(_mlp_forward, module)
        else:
            continue
        swapped += 1
    return swapped
