"""Where a timl training step's GPU time goes: torch.profiler over timl's compiled loss path, GPT-2 124M, one GPU.

    python benchmarks/profile_step.py [--batch 32] [--steps 5]

It runs the module timl trains (timl.model.forward.CausalLMForTraining, vocab padded to 64, compiled with bf16 autocast,
fused AdamW, clipping) and prints the kernels that take the most GPU time, grouped into matmuls, attention, and
everything else.
"""

from __future__ import annotations

import argparse

import torch
from transformers import set_seed

from timl.model.forward import TrainingLoss
from timl.model.build import build_config, build_model, pad_vocab
from timl.model.forward import CausalLMForTraining
from timl.model.head import read_head


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32, help="sequences of 1024 tokens a step")
    parser.add_argument("--steps", type=int, default=5, help="profiled steps, after 8 warm-up steps")
    options = parser.parse_args()
    set_seed(0)
    model = build_model(build_config("gpt2")).cuda()
    pad_vocab(model, 64)
    training = CausalLMForTraining(model, TrainingLoss("full", read_head(model)), {}, return_outputs=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=6e-4, fused=True)

    @torch.compile
    def loss_of(inputs, count):
        with torch.autocast("cuda", torch.bfloat16):
            return training(inputs, count)[0]

    tokens = torch.randint(0, 50257, (options.batch, 1025), device="cuda")
    inputs = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}
    count = torch.tensor(float(options.batch * 1024), device="cuda")

    def step():
        loss_of(inputs, count).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(8):
        step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        for _ in range(options.steps):
            step()
        torch.cuda.synchronize()
    events = [e for e in profile.key_averages() if e.device_time_total > 0]
    total = sum(e.self_device_time_total for e in events)
    groups = {"matmul (gemm)": 0.0, "attention (flash/sdpa)": 0.0, "other": 0.0}
    for event in events:
        name = event.key.lower()
        # Attention first: cuDNN's SDPA kernels also carry "sm90" in their names.
        key = "attention (flash/sdpa)" if any(k in name for k in ("sdpa", "flash", "attention", "fmha")) else \
            "matmul (gemm)" if any(k in name for k in ("gemm", "matmul", "nvjet", "cutlass", "sm90")) else "other"
        groups[key] += event.self_device_time_total
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, batch {options.batch} x 1024")
    print(f"GPU time per step: {total / options.steps / 1000:.1f} ms")
    for key, value in groups.items():
        print(f"  {key}: {value / total:.1%}")
    print(profile.key_averages().table(sort_by="self_cuda_time_total", row_limit=15, max_name_column_width=70))


if __name__ == "__main__":
    main()
