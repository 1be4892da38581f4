"""FLOPs per token against hand computations of 6·N + 12·L·H·Q·T, and the GPU peaks MFU divides by."""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from timl.report.throughput import flops_per_token, matmul_parameters, peak_flops

D, LAYERS, VOCAB, T = 32, 2, 64, 16  # width, layers, vocab, sequence length


def test_gpt2_counts_its_tied_head_once_and_no_position_embeddings():
    model = GPT2LMHeadModel(GPT2Config(n_layer=LAYERS, n_embd=D, n_head=2, vocab_size=VOCAB, n_positions=64))
    attention = (D * 3 * D + 3 * D) + (D * D + D)  # c_attn (q, k, v) and c_proj, with biases
    mlp = (D * 4 * D + 4 * D) + (4 * D * D + D)
    norms = 2 * (2 * D)  # two LayerNorms, weight and bias
    # The head is the token embedding (tied): counted once, as the head. The position embedding is a lookup.
    n = LAYERS * (attention + mlp + norms) + 2 * D + VOCAB * D
    assert n == 27_520
    assert matmul_parameters(model) == n
    assert flops_per_token(model, T) == 6 * n + 12 * LAYERS * 2 * (D // 2) * T


def test_llama_counts_its_untied_head_but_not_its_embedding():
    config = LlamaConfig(hidden_size=D, intermediate_size=2 * D, num_hidden_layers=LAYERS, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    head_dim = D // 4
    attention = D * 4 * head_dim + 2 * (D * 2 * head_dim) + 4 * head_dim * D  # q; k and v for 2 kv heads; o
    mlp = 3 * D * 2 * D  # gate, up and down, no biases
    n = LAYERS * (attention + mlp + 2 * D) + D + VOCAB * D  # two RMSNorms per layer and a final one; the head
    assert n == 20_640
    assert matmul_parameters(model) == n
    assert flops_per_token(model, T) == 6 * n + 12 * LAYERS * 4 * head_dim * T


def test_llama_with_a_tied_head_and_its_own_head_dim():
    config = LlamaConfig(hidden_size=D, intermediate_size=2 * D, num_hidden_layers=LAYERS, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, max_position_embeddings=64,
                         tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    attention = D * 4 * 16 + 2 * (D * 2 * 16) + 4 * 16 * D  # q and o are 4 × 16 = 64 wide, wider than the model
    n = LAYERS * (attention + 3 * D * 2 * D + 2 * D) + D + VOCAB * D  # the tied head, once
    assert n == 26_784
    assert matmul_parameters(model) == n
    assert flops_per_token(model, T) == 6 * n + 12 * LAYERS * 4 * 16 * T


def test_a_model_without_a_config_counts_its_matmuls_only():
    model = torch.nn.Sequential(torch.nn.Embedding(VOCAB, D), torch.nn.Linear(D, VOCAB))
    assert flops_per_token(model, T) == 6 * (D * VOCAB + VOCAB)


def test_peak_flops_by_device_name(monkeypatch):
    assert peak_flops(torch.device("cpu")) is None
    for name, peak in (("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
                       ("NVIDIA A100-SXM4-80GB", 312e12), ("Some Future GPU", None)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device, name=name: name)
        assert peak_flops(torch.device("cuda")) == peak, name
