"""The architecture matrix that several tests train on: every family timl supports, each as a tiny config that makes
the parts of its head beyond a matmul (a bias, a logit scale, a softcap) large."""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from timl.model.head import output_layer

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=64, pad_token_id=None, bos_token_id=0,
            eos_token_id=0)
ARCHITECTURES = {
    "gpt2": dict(n_layer=2, n_embd=32, n_head=2, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    "llama": {}, "mistral": {}, "qwen2": {}, "qwen3": {}, "gemma": {},
    "gemma2": dict(final_logit_softcapping=2.0, sliding_window=16),
    "gemma3_text": dict(final_logit_softcapping=2.0, sliding_window=16),
    "phi": dict(partial_rotary_factor=0.5),
    "phi3": {}, "olmo": {}, "olmo2": {}, "olmo3": {}, "gpt_neox": dict(rotary_pct=0.5),
    "cohere": dict(logit_scale=0.25), "cohere2": dict(logit_scale=0.25, sliding_window=16),
    "granite": dict(logits_scaling=4.0), "starcoder2": {}, "stablelm": dict(partial_rotary_factor=0.5),
    "smollm3": {}, "glm4": {}, "exaone4": {}, "nemotron": {}, "helium": {}, "ministral": {},
    "seed_oss": dict(attention_dropout=0.0, residual_dropout=0.0),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
}


def tiny_values(model_type: str) -> dict[str, Any]:
    values = {**TINY, **ARCHITECTURES[model_type]}
    if model_type == "gpt2":
        values = {k: v for k, v in values.items() if k not in ("hidden_size", "num_hidden_layers", "head_dim",
                                                               "num_attention_heads", "max_position_embeddings")}
    return values


def tiny_config(model_type: str):
    return AutoConfig.for_model(model_type, **tiny_values(model_type))


def tiny_model(model_type: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type))
    _, bias = output_layer(model)
    if bias is not None:  # initialised to zero, where ignoring it would go unnoticed
        torch.nn.init.normal_(bias, std=1.0)
    return model
