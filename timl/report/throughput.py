"""Model FLOPs and MFU.

FLOPs per trained token = 6·N + 12·L·H·Q·T, the PaLM paper's appendix B formula (also nanoGPT's estimate_mfu):
  N  parameters that take part in matrix multiplies (embedding lookups excluded, the output projection included),
  L  layers, H  attention heads, Q  head dimension, T  sequence length.
6·N counts the forward (2·N) and backward (4·N) matmuls; 12·L·H·Q·T the attention scores and their weighted sum.
MFU = achieved FLOP/s per device ÷ the device's dense bf16 peak.
"""

from __future__ import annotations

import torch

# Dense (not sparse) bf16 tensor-core peaks from the vendors' datasheets, in FLOP/s, matched against the device name.
BF16_PEAK_FLOPS = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
    ("V100", 125e12),
)


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak, or None where it is unknown (the CPU, an unlisted GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in BF16_PEAK_FLOPS if key in name), None)


def matmul_parameters(model: torch.nn.Module) -> int:
    """Parameters used in matrix multiplies: all, counted once, minus embedding lookups other than the output head."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    output_weight = output.weight if output is not None else None
    unique = {id(p): p for p in model.parameters()}
    lookups = {
        id(m.weight)
        for m in model.modules()
        if isinstance(m, torch.nn.Embedding) and m.weight is not output_weight
    }
    return sum(p.numel() for key, p in unique.items() if key not in lookups)


def flops_per_token(model: torch.nn.Module, sequence_length: int) -> float:
    """6·N + 12·L·H·Q·T; see the module docstring. Without a config, the attention term is left out."""
    n = matmul_parameters(model)
    config = getattr(model, "config", None)
    try:
        layers, heads = config.num_hidden_layers, config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    except AttributeError:
        return 6.0 * n
    return 6.0 * n + 12.0 * layers * heads * head_dim * sequence_length
