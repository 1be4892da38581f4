"""The output head: what a causal LM does to its last hidden states to make its logits, read from the model and
checked against its own logits; and the two ways training reads the model (its hidden states, its own outputs).

The head is the one place where causal LMs differ in ways a fused loss must copy. Most compute `hidden @ W.T`; some
add a bias (Phi), scale the logits (Cohere, Granite, Falcon-H1) or softcap them (Gemma-2 and 3). timl reads what it
can from the model, then checks at start-up, on a probe, that the head it will train through gives the model's own
logits. When it does not, training runs on the model's own logits and says so (timl.loss.select): never on a
different loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch

from timl.loss.cross_entropy import head_logits


@dataclass(frozen=True)
class Head:
    """What the model does to `hidden @ weight.T` to make its logits: add `bias`, multiply by `scale`, then
    softcap (`softcap · tanh(z / softcap)`)."""

    scale: float = 1.0
    softcap: float | None = None
    has_bias: bool = False

    def describe(self) -> str:
        parts = ["bias"] if self.has_bias else []
        if self.scale != 1.0:
            parts.append(f"scale {self.scale:g}")
        if self.softcap is not None:
            parts.append(f"softcap {self.softcap:g}")
        return "matmul" + "".join(f" + {part}" for part in parts)


def output_layer(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """The output projection's weight [vocab rows, hidden] and bias, or None if the model does not expose them."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and isinstance(getattr(head, "weight", None), torch.Tensor):
        return head.weight, getattr(head, "bias", None)
    if isinstance(getattr(model, "output_weight", None), torch.Tensor):
        return model.output_weight, None
    return None


def read_head(model: torch.nn.Module) -> Head | None:
    """The head as the model's attributes describe it, or None where the model has no hidden states and output
    weight to fuse. `check_head` confirms it against the model's own logits."""
    layer = output_layer(model)
    if layer is None or not (hasattr(model, "base_model") or hasattr(model, "hidden_states")):
        return None
    config = getattr(model, "config", None)
    scale = float(getattr(model, "logit_scale", None) or 1.0)  # Cohere keeps it on the model
    if getattr(config, "logits_scaling", None):  # Granite divides
        scale /= float(config.logits_scaling)
    inner = getattr(model, "base_model", None)
    if getattr(inner, "lm_head_multiplier", None):  # Falcon-H1 multiplies
        scale *= float(inner.lm_head_multiplier)
    softcap = getattr(config, "final_logit_softcapping", None)
    return Head(scale=scale, softcap=float(softcap) if softcap else None, has_bias=layer[1] is not None)


def hidden_states(model: torch.nn.Module, input_ids: torch.Tensor, forward_kwargs: dict[str, Any]) -> torch.Tensor:
    """The decoder's last hidden states: a custom model's `hidden_states(input_ids)`, or a Hugging Face model's
    base model output."""
    if hasattr(model, "hidden_states"):
        return model.hidden_states(input_ids, **forward_kwargs)
    return model.base_model(input_ids=input_ids, **forward_kwargs).last_hidden_state


def model_outputs(model: torch.nn.Module, input_ids: torch.Tensor, forward_kwargs: dict[str, Any],
                  vocab_size: int | None) -> Any:
    """The model's own outputs (with `.logits`), with the logits of padded vocab rows dropped."""
    outputs = model(input_ids=input_ids, **forward_kwargs)
    if isinstance(outputs, torch.Tensor):  # a custom model that returns its logits
        outputs = SimpleNamespace(logits=outputs)
    if vocab_size is not None and outputs.logits.shape[-1] > vocab_size:
        outputs.logits = outputs.logits[..., :vocab_size]
    return outputs


def without_cache(model: torch.nn.Module, forward_kwargs: dict[str, Any]) -> dict[str, Any]:
    """The forward's keyword arguments with the key-value cache off where the model has one: training never
    reuses past keys and values, so building the cache would only cost memory."""
    if hasattr(getattr(model, "config", None), "use_cache"):
        return {"use_cache": False, **forward_kwargs}
    return dict(forward_kwargs)


@torch.no_grad()
def check_head(model: torch.nn.Module, head: Head, forward_kwargs: dict[str, Any], vocab_size: int | None,
               length: int = 16, tolerance: float = 1e-4) -> str | None:
    """Runs the model once on a fixed probe, in fp32 and eval mode, and compares its own logits with the head's
    from its hidden states. Returns None when they agree, else what differs."""
    forward_kwargs = without_cache(model, forward_kwargs)
    weight, bias = output_layer(model)
    rows = vocab_size or weight.shape[0]
    probe = torch.randint(0, rows, (1, length), generator=torch.Generator().manual_seed(0)).to(weight.device)
    was_training = model.training
    model.eval()
    try:
        with torch.autocast(weight.device.type, enabled=False):
            own = model_outputs(model, probe, forward_kwargs, vocab_size).logits.float()
            ours = head_logits(hidden_states(model, probe, forward_kwargs), weight, bias, head.scale,
                               head.softcap)[..., :rows]
    finally:
        model.train(was_training)
    if own.shape != ours.shape:
        return f"the model's logits have shape {tuple(own.shape)}, the head's {tuple(ours.shape)}"
    error = ((own - ours).norm() / own.norm().clamp(min=1e-30)).item()
    if not math.isfinite(error) or error > tolerance:
        return f"the head ({head.describe()}) is {error:.2e} off the model's own logits"
    return None
