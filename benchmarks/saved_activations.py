"""What the compiled training step keeps for its backward, tensor by tensor, with and without an activation memory
budget: a small Llama shape on the CPU, under bf16 autocast, through timl's own training module.

    python benchmarks/saved_activations.py [--budgets none,0.9] [--hidden 256] [--layers 2] [--tokens 256]

The partitioner's budget plan is chosen with a FLOP-count runtime estimate by default, not by timing kernels, so the
plan at these shapes shows what it recomputes at larger ones; the bytes scale with the shapes. Saved tensors are
seen through autograd's saved-tensor hooks and counted once per storage.
"""

from __future__ import annotations

import argparse
import collections

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from timl.model.forward import TrainingLoss
from timl.model.forward import CausalLMForTraining
from timl.model.head import read_head


SavedTensor = tuple[tuple[int, ...], str, int, bool]
"""shape, dtype, bytes of its storage, whether that storage is a parameter's"""


def saved_tensors(budget: float | None, options: argparse.Namespace) -> dict[int, SavedTensor]:
    import torch._functorch.config as functorch_config

    torch._dynamo.reset()
    functorch_config.activation_memory_budget = 1.0 if budget is None else budget
    for ban in ("used_far_apart", "long_fusible_chains", "materialized_backward"):
        setattr(functorch_config, f"ban_recompute_{ban}", ban not in options.lift)
    torch.manual_seed(0)
    hidden = options.hidden
    config = LlamaConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_attention_heads=hidden // 32,
                         num_key_value_heads=hidden // 128, num_hidden_layers=options.layers, vocab_size=1024,
                         tie_word_embeddings=True, max_position_embeddings=options.tokens)
    model = LlamaForCausalLM(config)
    training = CausalLMForTraining(model, TrainingLoss("full", read_head(model)), {}, return_outputs=False)
    step = torch.compile(training)
    tokens = torch.randint(0, 1024, (2, options.tokens + 1))
    inputs = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}
    saved: dict[int, SavedTensor] = {}
    parameters = {parameter.untyped_storage().data_ptr() for parameter in model.parameters()}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        saved[storage.data_ptr()] = (tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."), storage.nbytes(),
                                     storage.data_ptr() in parameters)
        return tensor

    with torch.autocast("cpu", torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step(inputs, torch.tensor(2.0 * options.tokens))[0]
    loss.backward()
    return saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", default="none,0.9", help="comma-separated; none is the compiler's default")
    parser.add_argument("--hidden", type=int, default=256, help="width (heads of 32, a KV head per 4 heads)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=256, help="tokens per sequence; two sequences")
    parser.add_argument("--lift", default="", help="comma-separated partitioner bans to lift (used_far_apart, "
                                                   "long_fusible_chains, materialized_backward), for every budget")
    options = parser.parse_args()
    options.lift = [ban for ban in options.lift.split(",") if ban]
    for name in options.budgets.split(","):
        budget = None if name == "none" else float(name)
        saved = saved_tensors(budget, options)
        counts = collections.Counter((shape, dtype, parameter) for shape, dtype, _, parameter in saved.values())
        sizes = {(shape, dtype, parameter): size for shape, dtype, size, parameter in saved.values()}
        extra = sum(size for _, _, size, parameter in saved.values() if not parameter)
        lifted = f", bans lifted: {', '.join(options.lift)}" if options.lift else ""
        print(f"\nbudget {name}{lifted}: {extra / 2**20:.2f} MiB saved besides the parameters (kept anyway)")
        print("| count | shape | dtype | MiB each | a parameter |\n|---:|---|---|---:|---|")
        for key, count in sorted(counts.items(), key=lambda item: (item[0][2], -item[1] * sizes[item[0]])):
            shape, dtype, parameter = key
            print(f"| {count} | {shape} | {dtype} | {sizes[key] / 2**20:.3f} | {'yes' if parameter else ''} |")


if __name__ == "__main__":
    main()
