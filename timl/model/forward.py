"""The training forward: the module that DDP or FSDP wraps and torch.compile compiles. It returns the loss that
timl.loss.select chose (a `TrainingLoss`), and scores evaluation batches without full logits where it can.

On a head path the loss goes from the decoder's last hidden states through the checked head, by the path's function
(`head_loss`); on the logits path it comes from the model's own logits, with the cross-entropy and the z-loss
computed in one pass over them."""

from __future__ import annotations

import dataclasses
import functools
from types import SimpleNamespace
from typing import Any

import torch

from timl.loss.chunked import chunked_linear_cross_entropy, chunked_token_losses
from timl.loss.cross_entropy import LossFunction, cross_entropy_and_z_loss, linear_cross_entropy, z_loss
from timl.loss.fused import cce_linear_cross_entropy, liger_linear_cross_entropy
from timl.model.build import real_vocab_size
from timl.model.head import Head, hidden_states, model_outputs, output_layer, without_cache
from timl.report.metrics import CrossEntropy

HEAD_PATHS = {
    "full": linear_cross_entropy,
    "chunked": chunked_linear_cross_entropy,
    "liger": liger_linear_cross_entropy,
    "cut_cross_entropy": cce_linear_cross_entropy,
}
"""The loss paths that go through the head, and the function of each; `logits` is the model's own forward."""


def head_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, path: str = "full",
              bias: torch.Tensor | None = None, scale: float = 1.0, softcap: float | None = None,
              vocab_size: int | None = None, z_loss_coefficient: float = 0.0,
              options: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy of the head's logits against labels (already shifted), over the first
    `vocab_size` rows of weight, and the summed z-loss, by the head path `path` (with its `options`: a chunk size,
    a fused kernel's arguments). All paths give the same values up to rounding."""
    if path not in HEAD_PATHS:
        raise ValueError(f"Unknown head loss path {path!r}; the paths through the head are {', '.join(HEAD_PATHS)}.")
    return HEAD_PATHS[path](hidden.flatten(0, -2), weight, labels.flatten(), bias=bias, scale=scale, softcap=softcap,
                            vocab_size=vocab_size or weight.shape[0], z_loss_coefficient=z_loss_coefficient,
                            **(options or {}))


@dataclasses.dataclass(frozen=True)
class TrainingLoss:
    """The loss the training forward computes, as `choose_training_loss` decided it.

    `path` is a LOSS_PATHS name; `head` the checked head a head path goes through (None on `logits`); `options`
    the fused kernel's arguments; `loss_function` a user's loss on the logits, as a share of the global mean (None:
    timl's next-token cross-entropy).
    """

    path: str
    head: Head | None = None
    z_loss_coefficient: float = 0.0
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    loss_function: LossFunction | None = None

    def describe(self) -> str:
        through = f" through the head ({self.head.describe()})" if self.head is not None else ""
        return f"loss: {self.path}{through}"

    def from_hidden_states(self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                           labels: torch.Tensor, vocab_size: int | None,
                           num_items_in_batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """On a head path: this micro-batch's share of the global loss (z-loss included), and of the z-loss."""
        cross_entropy, z = head_loss(hidden, weight, labels, path=self.path, bias=bias, scale=self.head.scale,
                                     softcap=self.head.softcap, vocab_size=vocab_size,
                                     z_loss_coefficient=self.z_loss_coefficient, options=self.options)
        return (cross_entropy + z) / num_items_in_batch, z / num_items_in_batch

    def from_logits(self, outputs: Any, inputs: dict[str, torch.Tensor],
                    num_items_in_batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """On the logits path: the same two shares, from the model's outputs (padding columns dropped). A user's
        loss function has only the z-loss added to it."""
        if self.loss_function is None:
            cross_entropy, z = cross_entropy_and_z_loss(outputs.logits, inputs["labels"], self.z_loss_coefficient)
            loss = cross_entropy / num_items_in_batch
        else:
            loss = self.loss_function(outputs, inputs, num_items_in_batch)
            z = z_loss(outputs.logits, inputs["labels"], self.z_loss_coefficient)
        z = z / num_items_in_batch
        return loss + z, z


class CausalLMForTraining(torch.nn.Module):
    """Wraps a causal LM so that one forward returns the training loss, compiled together with the model.

    On a head path (`loss.head` set), the decoder's last hidden states go through the checked head as `loss`
    says, and no logits are returned. On the logits path the model's own logits (padding columns dropped) make the
    loss, and the outputs come back for the train metrics when `return_outputs` is set.
    """

    def __init__(self, model: torch.nn.Module, loss: TrainingLoss, forward_kwargs: dict[str, Any],
                 return_outputs: bool, document_separator: int | None = None):
        super().__init__()
        self.model = model
        self.loss = loss
        self.forward_kwargs = without_cache(model, forward_kwargs)
        # --document_masking: the token that opens each document, from which the position ids restart.
        self.document_separator = document_separator
        self.return_outputs = return_outputs
        self.vocab_size = real_vocab_size(model)
        # FSDP (through Accelerate) wraps one unit per block class named here when its config names none.
        self._no_split_modules = list(getattr(model, "_no_split_modules", None) or [])

    def forward(self, inputs: dict[str, torch.Tensor], num_items_in_batch: torch.Tensor | None,
                metrics: list[Any] | None = None) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """Returns this micro-batch's share of the global loss (z-loss included), of the z-loss alone, and the
        outputs when asked for. With `metrics` (at evaluation), updates them instead and returns nothing: eval
        runs through here so that DDP and FSDP see the forward of the module they wrap."""
        if metrics is not None:
            return self.score(inputs, metrics)
        if self.loss.head is not None:
            weight, bias = output_layer(self.model)
            hidden = hidden_states(self.model, inputs["input_ids"], self.batch_kwargs(inputs))
            loss, z_loss = self.loss.from_hidden_states(hidden, weight, bias, inputs["labels"], self.vocab_size,
                                                        num_items_in_batch)
            return loss, z_loss.detach(), None
        outputs = model_outputs(self.model, inputs["input_ids"], self.batch_kwargs(inputs), self.vocab_size)
        loss, z_loss = self.loss.from_logits(outputs, inputs, num_items_in_batch)
        return loss, z_loss.detach(), outputs if self.return_outputs else None

    def batch_kwargs(self, inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
        """The forward's keyword arguments for this batch: with document masking, what keeps attention inside each
        document (document_kwargs), or the batch's own position ids when its loader gives them, from which
        transformers' mask builders do the same."""
        if "position_ids" in inputs:
            return {**self.forward_kwargs, "position_ids": inputs["position_ids"]}
        if self.document_separator is None:
            return self.forward_kwargs
        return {**self.forward_kwargs, **document_kwargs(self.model, inputs["input_ids"], self.document_separator)}

    def score(self, inputs: dict[str, torch.Tensor], metrics: list[Any]) -> None:
        """Updates the eval metrics on a batch. On a head path, the cross-entropy comes from the chunked head and
        metrics that need logits see them a chunk of tokens at a time, so full logits never exist."""
        if self.loss.head is None:
            outputs = model_outputs(self.model, inputs["input_ids"], self.batch_kwargs(inputs), self.vocab_size)
            for metric in metrics:
                metric.update(outputs, inputs)
            return None
        weight, bias = output_layer(self.model)
        labels = inputs["labels"].flatten()
        by_logits = [metric for metric in metrics if not isinstance(metric, CrossEntropy)]

        def update(logits: torch.Tensor, chunk_labels: torch.Tensor) -> None:
            for metric in by_logits:
                metric.update(SimpleNamespace(logits=logits), {"labels": chunk_labels})

        token_losses = chunked_token_losses(
            hidden_states(self.model, inputs["input_ids"], self.batch_kwargs(inputs)), weight, labels, bias=bias,
            scale=self.loss.head.scale, softcap=self.loss.head.softcap, vocab_size=self.vocab_size,
            logits_consumer=update if by_logits else None)
        for metric in metrics:
            if isinstance(metric, CrossEntropy):
                metric.add(token_losses, labels)
        return None


def document_positions(input_ids: torch.Tensor, separator: int) -> torch.Tensor:
    """Each token's position within its document in packed sequences [batch, length]: 0 at every `separator`,
    which opens a document (`timl tokenize` puts the end-of-text token before each one, as GPT-2's data did), and 0
    at the start of a row, which continues a document cut at the row before. Pointwise and a cumulative maximum: it
    compiles, and never leaves the device."""
    index = torch.arange(input_ids.shape[-1], device=input_ids.device).expand_as(input_ids)
    starts = torch.where(input_ids == separator, index, torch.zeros_like(index))
    return index - starts.cummax(dim=-1).values


def document_kwargs(model: torch.nn.Module, input_ids: torch.Tensor, separator: int) -> dict[str, torch.Tensor]:
    """What a packed batch's forward needs to keep attention inside each document: position ids that restart at
    each, from which transformers builds its packed-sequence mask; and, where the model attends by FlexAttention over
    full (not sliding-window) layers, the document-causal block mask itself, built once per batch by timl (the
    attention then skips every block between documents, and transformers takes a 4-D mask as given)."""
    kwargs = {"position_ids": document_positions(input_ids, separator)}
    if takes_document_block_mask(model):
        kwargs["attention_mask"] = document_block_mask(input_ids, separator)
    return kwargs


def takes_document_block_mask(model: torch.nn.Module) -> bool:
    """Whether the model attends by FlexAttention in every layer over the whole past: a given block mask then
    stands for all its layers (a sliding-window layer would need its own)."""
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None) == "flex_attention" and attends_whole_past(config)


def attends_whole_past(config: Any) -> bool:
    """Whether every attention layer sees the whole past: no sliding window, no layer of another kind."""
    layer_types = getattr(config, "layer_types", None) or ()
    sliding = getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True)
    return not sliding and all(kind == "full_attention" for kind in layer_types)


def use_flex_for_documents(model: torch.nn.Module) -> bool:
    """Switches a model on transformers' default attention (sdpa) to FlexAttention where timl's document block mask
    then serves every layer; returns whether it did. On one H100, Llama-1B with --document_masking ran at 1.15x
    sdpa's packed-sequence mask at 2048 tokens and 1.79x at 8192, and no slower than plain causal sdpa
    (benchmarks/RESULTS.md)."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa" or not attends_whole_past(config):
        return False
    try:
        model.set_attn_implementation("flex_attention")
    except (ValueError, ImportError):  # a model without FlexAttention keeps sdpa
        return False
    return takes_document_block_mask(model)


def document_block_mask(input_ids: torch.Tensor, separator: int) -> Any:
    """FlexAttention's block mask for packed sequences [batch, length]: a token attends to the tokens before it in
    its own document (each opened by `separator`; a row's first tokens continue the document cut before it)."""
    from torch.nn.attention.flex_attention import create_block_mask

    documents = (input_ids == separator).cumsum(dim=-1)

    def same_document_causal(batch: torch.Tensor, head: torch.Tensor, query: torch.Tensor,
                             key: torch.Tensor) -> torch.Tensor:
        return (query >= key) & (documents[batch, query] == documents[batch, key])

    batch, length = input_ids.shape
    # Compiled on a GPU, the mask is made block by block and never whole; eager (the CPU's check) it is made whole.
    create = _compiled_create_block_mask() if input_ids.is_cuda else create_block_mask
    return create(same_document_causal, batch, None, length, length, device=input_ids.device)


@functools.cache
def _compiled_create_block_mask() -> Any:
    from torch.nn.attention.flex_attention import create_block_mask

    return torch.compile(create_block_mask)


@torch.no_grad()
def check_document_masking(model: torch.nn.Module, separator: int, forward_kwargs: dict[str, Any],
                           tolerance: float = 1e-4) -> None:
    """Refuses --document_masking for a model whose attention does not stay inside each document given position
    ids that restart there: runs two packed documents and each alone, in fp32 and eval mode, and compares their
    logits."""
    vocab = real_vocab_size(model) or 2
    generator = torch.Generator().manual_seed(0)
    device = next(model.parameters()).device
    # Bodies without the separator, which would open a document of its own in the packed run alone.
    bodies = [torch.randint(0, vocab - 1, (length,), generator=generator) for length in (5, 8)]
    documents = [torch.cat([torch.tensor([separator]), body + (body >= separator).long()]) for body in bodies]
    packed = torch.cat(documents)[None].to(device)
    kwargs = without_cache(model, forward_kwargs)
    was_training = model.training
    model.eval()
    try:
        with torch.autocast(device.type, enabled=False):
            together = model_outputs(model, packed, {**kwargs, **document_kwargs(model, packed, separator)},
                                     vocab).logits[0].float()
            alone = torch.cat([model_outputs(model, document[None].to(device), kwargs, vocab).logits[0].float()
                               for document in documents])
    finally:
        model.train(was_training)
    error = ((together - alone).norm() / alone.norm().clamp(min=1e-30)).item()
    if not error <= tolerance:
        config = getattr(model, "config", None)
        raise ValueError(
            f"--document_masking: {getattr(config, 'model_type', type(model).__name__)} with attention "
            f"{getattr(config, '_attn_implementation', 'its own')} does not keep attention inside each document: "
            f"two packed documents are {error:.1e} off each run alone. transformers keeps packed documents apart "
            f"from position ids with sdpa, eager, flex_attention and flash_attention_2 in the models whose masks "
            f"it builds: try --attn_implementation sdpa, or train without --document_masking.")
