"""Pre-train a self-written GPT through timl: any torch.nn.Module can be trained, not only Hugging Face models.

    python recipes/custom_gpt.py --train_file_pattern "data/python_docs/train_*.bin" --output_dir runs/custom \
        --block_size 128 --train_batch_size 16 --per_device_train_batch_size 16 --optim muon --report_to none

What a model must provide (see timl.model.head):
  forward(input_ids) -> logits [batch, block, vocab] (a tensor, or an object with .logits)
  and, to use the fused losses (no logits in training), hidden_states(input_ids) -> [batch, block, hidden] and an
  `output_weight` [vocab, hidden]. A `config` dict is saved as config.json; the weights as model.safetensors,
  which timl.checkpoint.manager.load_weights(model, folder) reads back.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from timl.config import TrainingArguments, parse_args
from timl.train.pretrain import recipe_process
from timl.train.trainer import Trainer


@dataclass
class GPTConfig:
    vocab_size: int = field(default=50257, metadata={"help": "Vocabulary size (GPT-2's by default)."})
    n_layer: int = field(default=4, metadata={"help": "Transformer blocks."})
    n_head: int = field(default=4, metadata={"help": "Attention heads."})
    n_embd: int = field(default=128, metadata={"help": "Width."})
    max_positions: int = field(default=1024, metadata={"help": "Longest sequence."})


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        # Named *_norm, as the Hugging Face Trainer's rule knows norms by name: their weights get no weight decay.
        self.attn_norm, self.mlp_norm = nn.RMSNorm(config.n_embd), nn.RMSNorm(config.n_embd)
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.up = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.down = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(batch, length, 3, self.n_head, -1).transpose(1, 3).unbind(2)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(batch, length, width))
        return x + self.down(F.gelu(self.up(self.mlp_norm(x))))


class GPT(nn.Module):
    """A small GPT: learned positions, pre-norm blocks, an output head tied to the input embedding."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = asdict(config)
        self.embed = nn.Embedding(config.vocab_size, config.n_embd)
        self.positions = nn.Embedding(config.max_positions, config.n_embd)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = nn.RMSNorm(config.n_embd)
        for parameter in self.parameters():
            if parameter.ndim == 2:
                nn.init.normal_(parameter, std=0.02)

    @property
    def output_weight(self) -> torch.Tensor:
        return self.embed.weight

    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids) + self.positions(torch.arange(input_ids.shape[1], device=input_ids.device))
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.hidden_states(input_ids) @ self.output_weight.T


if __name__ == "__main__":
    model_config, training_args = parse_args(GPTConfig, TrainingArguments)
    torch.manual_seed(training_args.seed)
    with recipe_process():
        Trainer(GPT(model_config), training_args, model_info=asdict(model_config)).train()
