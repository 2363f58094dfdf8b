"""Model FLOPs utilisation: useful training FLOPs per second over the card's dense bf16 peak.

FLOPs per token (no causal discount; recomputation from gradient checkpointing is not counted):

- full fine-tuning:  6 N + 12 L d T
- PEFT (frozen base): 4 N + 6 N_adapter + 12 L d T   (forward 2N, activation gradients 2N, no weight
  gradients for frozen weights; the adapter's own forward+backward is 6 N_adapter)

N: parameters taking part in matmuls per token, i.e. all but the input embedding, the LM head included even
when it is tied to the embedding. L: layers. d: attention width (heads x head dim). T: the attention span;
for packed rows each sample attends only to itself, so T is the token-weighted mean sample length,
sum(l^2) / sum(l).

Peaks are dense bf16 figures (never the "with sparsity" ones). An unknown card or the CPU has no peak and
reports an MFU of 0.
"""

from __future__ import annotations

# Dense bf16 TFLOPS; more specific names first.
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("h200 nvl", 836.0),
    ("h200", 989.0),
    ("h100 nvl", 835.0),
    ("h100 pcie", 756.0),
    ("h100", 989.0),
    ("b200", 2250.0),
    ("a100", 312.0),
    ("l40s", 362.0),
)


def peak_flops(device_name: str) -> float | None:
    """Dense bf16 FLOP/s of a GPU from its name (as torch.cuda.get_device_name reports it), or None."""
    name = device_name.lower()
    for key, tflops in PEAK_TFLOPS:
        if key in name:
            return tflops * 1e12
    return None


def flops_per_token(
    matmul_params: int, layers: int, attention_width: int, span: float, *, peft: bool, adapter_params: int = 0
) -> float:
    linear = 4 * matmul_params + 6 * adapter_params if peft else 6 * matmul_params
    return linear + 12 * layers * attention_width * span


def mfu(flops_token: float, tokens_per_second_per_device: float, peak: float | None) -> float:
    if not peak:
        return 0.0
    return flops_token * tokens_per_second_per_device / peak
