"""--document_masking: packed documents train as if each ran alone, in every architecture of the matrix; a model
that cannot keep them apart is refused at start-up."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from architectures import ARCHITECTURES, tiny_model
from conftest import TINY_GPT2, tiny_tokenizer_folder, write_learnable_shards
from timl.config import TrainingArguments
from timl.model.build import build_config, build_model
from timl.model.forward import (CausalLMForTraining, TrainingLoss, check_document_masking, document_positions,
                                takes_document_block_mask, use_flex_for_documents)
from timl.train.trainer import Trainer

SEPARATOR = 0  # the tiny configs' EOS


def packed_documents(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[slice]]:
    """Two rows of packed documents, each opened by SEPARATOR, the first row starting mid-document; labels
    shifted; the slices of each document (or fragment) in the flattened batch."""
    generator = torch.Generator().manual_seed(seed)
    rows, spans = [], []
    for row, lengths in enumerate(((4, 7, 5), (6, 3, 7))):
        tokens, start = [], row * 16  # each row holds 16 tokens
        for index, length in enumerate(lengths):
            body = torch.randint(1, 64, (length,), generator=generator).tolist()
            document = body if row == 0 and index == 0 else [SEPARATOR, *body[1:]]
            spans.append(slice(start, start + len(document)))
            tokens += document
            start += len(document)
        rows.append(tokens + [int(torch.randint(1, 64, (1,), generator=generator))])  # the next row's first token
    stream = torch.tensor(rows)
    return stream[:, :-1], stream[:, 1:], spans


def test_positions_restart_at_each_separator_and_at_the_row_start():
    input_ids = torch.tensor([[5, 6, 0, 7, 8, 0, 0, 9]])
    assert document_positions(input_ids, 0).tolist() == [[0, 1, 0, 1, 2, 0, 0, 1]]


def document_runs(make_model, device: str = "cpu", gradients: bool = True) -> dict[str, Any]:
    """Per-token losses (and gradients) of packed documents with masking, of each document run alone, and of the
    packed batch without masking; each from a fresh model that `make_model` builds."""
    input_ids, labels, spans = (tensor.to(device) if isinstance(tensor, torch.Tensor) else tensor
                                for tensor in packed_documents())
    count = torch.tensor(float(labels.numel()), device=device)

    def run(inputs: torch.Tensor, targets: torch.Tensor, separator: int | None, model: torch.nn.Module):
        module = CausalLMForTraining(model, TrainingLoss("logits"), {}, return_outputs=True,
                                     document_separator=separator)
        with torch.set_grad_enabled(gradients):
            loss, _, outputs = module({"input_ids": inputs, "labels": targets}, count)
        per_token = F.cross_entropy(outputs.logits.flatten(0, 1), targets.flatten(), reduction="none")
        if gradients:
            loss.backward()
        return per_token.detach()

    packed_model, alone_model = make_model().to(device), make_model().to(device)
    flat_inputs, flat_labels = input_ids.flatten(), labels.flatten()
    return {"packed": run(input_ids, labels, SEPARATOR, packed_model),
            "alone": torch.cat([run(flat_inputs[span][None], flat_labels[span][None], None, alone_model)
                                for span in spans]),
            "unmasked": run(input_ids, labels, None, make_model().to(device)),
            "packed_grads": {name: p.grad for name, p in packed_model.named_parameters() if p.grad is not None},
            "alone_grads": {name: p.grad for name, p in alone_model.named_parameters() if p.grad is not None}}


def assert_each_documents_own(runs: dict[str, Any]) -> None:
    assert torch.allclose(runs["packed"], runs["alone"], rtol=1e-5, atol=1e-6)
    assert runs["packed_grads"].keys() == runs["alone_grads"].keys()
    for name, grad in runs["alone_grads"].items():
        assert torch.allclose(runs["packed_grads"][name], grad, rtol=1e-4, atol=1e-6), name
    assert not torch.allclose(runs["unmasked"], runs["alone"], rtol=1e-3)  # unmasked, documents see each other


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_packed_documents_give_each_documents_own_losses_and_gradients(model_type):
    """The model's own attention (sdpa or eager): transformers' packed-sequence mask from the position ids."""
    runs = document_runs(lambda: tiny_model(model_type))
    assert runs["alone_grads"]
    assert_each_documents_own(runs)


WITHOUT_FLEX_DOCUMENTS = {  # the families that keep their attention under --document_masking on a GPU, and why
    "cohere2": "sliding-window layers", "exaone4": "sliding-window layers", "gemma2": "sliding-window layers",
    "gemma3_text": "sliding-window layers", "ministral": "sliding-window layers", "mistral": "a sliding window",
    "olmo3": "sliding-window layers", "gpt2": "no FlexAttention", "stablelm": "no FlexAttention"}


def flex_model(model_type: str) -> torch.nn.Module:
    """The tiny model as `timl train` builds it for --document_masking on a GPU."""
    model = tiny_model(model_type)
    assert use_flex_for_documents(model) == (model_type not in WITHOUT_FLEX_DOCUMENTS), model_type
    assert takes_document_block_mask(model) == (model_type not in WITHOUT_FLEX_DOCUMENTS)
    return model


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_flex_attention_with_timls_block_mask_gives_each_documents_own_losses(model_type):
    """FlexAttention has no backward on the CPU: its gradients are checked on the GPU below."""
    model = flex_model(model_type)
    if model_type in WITHOUT_FLEX_DOCUMENTS:
        assert model.config._attn_implementation != "flex_attention"
        return
    assert_each_documents_own(document_runs(lambda: flex_model(model_type), gradients=False))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("model_type", ["llama", "qwen3", "gpt_neox"])
def test_flex_attention_with_timls_block_mask_gives_each_documents_own_gradients_on_the_gpu(model_type):
    runs = document_runs(lambda: flex_model(model_type), device="cuda")
    assert runs["alone_grads"]
    assert_each_documents_own(runs)


def test_a_model_that_ignores_position_ids_is_refused_naming_its_type():
    model = build_model(build_config("gpt2", TINY_GPT2))
    forward = model.forward

    def without_positions(*args, position_ids=None, **kwargs):
        return forward(*args, **kwargs)

    model.forward = without_positions
    with pytest.raises(ValueError, match="--document_masking: gpt2 with attention .* does not keep attention inside"):
        check_document_masking(model, SEPARATOR, {})
    check_document_masking(build_model(build_config("gpt2", TINY_GPT2)), SEPARATOR, {})


def test_the_trainer_masks_documents_at_the_tokenizers_eos_and_says_so(tmp_path, caplog):
    write_learnable_shards(tmp_path, 2048, "train")
    values = dict(output_dir=str(tmp_path / "run"), train_file_pattern=str(tmp_path / "train_*.bin"), block_size=16,
                  train_batch_size=4, per_device_train_batch_size=4, max_train_steps=2, report_to="none",
                  optim="adamw_torch", save_every_steps=0, document_masking=True)
    with pytest.raises(ValueError, match="--document_masking needs the end-of-text token.*--tokenizer_name"):
        Trainer(build_model(build_config("gpt2", TINY_GPT2)), TrainingArguments(**values))
    args = TrainingArguments(**values, tokenizer_name=tiny_tokenizer_folder(tmp_path / "tokenizer"))
    with caplog.at_level(logging.INFO):
        trainer = Trainer(build_model(build_config("gpt2", TINY_GPT2)), args)
    assert trainer.training_model.document_separator == 0
    assert any("document masking: attention and positions restart at each token 0" in record.message
               for record in caplog.records)
    trainer.train()
