"""The loss head alone on one GPU: time and memory of a forward + backward through the output layer and the
cross-entropy, for each way timl can compute it, at the shapes of the throughput benchmark.

    python benchmarks/loss_head.py [--shapes llama-1b,gpt2] [--chunk-mib 512,1024,2048]

Inputs are made as the model makes them: fp32 last hidden states that need a gradient, an fp32 output weight (the
optimizer's copy), labels with a few ignored positions, all under bf16 autocast. `extra GiB` is the peak above the
inputs, their gradients excluded; `ms` is the mean of 10 timed steps after 3 warm-up steps.
"""

from __future__ import annotations

import argparse
import time

import torch

import timl.loss.chunked as chunked_loss
from timl.loss.chunked import chunked_linear_cross_entropy
from timl.loss.cross_entropy import linear_cross_entropy
from timl.model.forward import head_loss

SHAPES = {  # tokens, width, weight rows, vocab
    "llama-1b": (8 * 2048, 2048, 128256, 128256),
    "gpt2": (32 * 1024, 768, 50304, 50257),
}


def full_compiled() -> callable:
    compiled = torch.compile(linear_cross_entropy)
    return lambda hidden, weight, labels, vocab: compiled(hidden, weight, labels, vocab_size=vocab)


def chunked(mib: int) -> callable:
    def run(hidden, weight, labels, vocab):
        chunked_loss.CHUNK_BYTES = mib * 2**20
        return chunked_linear_cross_entropy(hidden, weight, labels, vocab_size=vocab)
    return run


def liger() -> callable:
    return lambda hidden, weight, labels, vocab: head_loss(hidden, weight, labels, vocab_size=vocab, path="liger")


def measure(function, shape: tuple[int, int, int, int]) -> tuple[float, float, float]:
    tokens, width, rows, vocab = shape
    torch.manual_seed(0)
    hidden = torch.randn(tokens, width, device="cuda").requires_grad_()
    weight = (torch.randn(rows, width, device="cuda") * 0.02).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), device="cuda")
    labels[::97] = -100

    def step() -> torch.Tensor:
        hidden.grad = weight.grad = None
        with torch.autocast("cuda", torch.bfloat16):
            loss, _ = function(hidden, weight, labels, vocab)
        (loss / tokens).backward()
        return loss

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    hidden.grad = weight.grad = None
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(10):
        loss = step()
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / 10
    grads = hidden.grad.numel() * hidden.grad.element_size() + weight.grad.numel() * weight.grad.element_size()
    extra = (torch.cuda.max_memory_allocated() - base - grads) / 2**30
    return seconds * 1000, extra, loss.item() / tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="llama-1b,gpt2")
    parser.add_argument("--chunk-mib", default="512,1024,2048")
    parser.add_argument("--liger", action="store_true", help="also Liger's fused linear cross-entropy")
    options = parser.parse_args()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    for name in options.shapes.split(","):
        shape = SHAPES[name]
        paths = {"full, compiled": full_compiled()}
        paths.update({f"chunked, {mib} MiB chunks": chunked(int(mib)) for mib in options.chunk_mib.split(",")})
        if options.liger:
            paths["liger"] = liger()
        print(f"\n{name}: {shape[0]} tokens, width {shape[1]}, {shape[2]} weight rows, vocab {shape[3]}")
        print("| path | ms | extra GiB | loss |\n|---|---:|---:|---:|")
        for label, function in paths.items():
            try:
                ms, extra, loss = measure(function, shape)
                print(f"| {label} | {ms:.2f} | {extra:.2f} | {loss:.4f} |", flush=True)
            except Exception as error:  # one path's failure is a row of the table
                print(f"| {label} | failed: {type(error).__name__}: {str(error)[:200]} | | |", flush=True)
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
