"""--document_masking: packed documents train as if each ran alone, in every architecture of the matrix; a model
that cannot keep them apart is refused at start-up."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from architectures import ARCHITECTURES, tiny_model
from conftest import TINY_GPT2, tiny_tokenizer_folder, write_learnable_shards
from timl.config import TrainingArguments
from timl.model.build import build_config, build_model
from timl.model.forward import CausalLMForTraining, TrainingLoss, check_document_masking, document_positions
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


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_packed_documents_give_each_documents_own_losses_and_gradients(model_type):
    input_ids, labels, spans = packed_documents()
    count = torch.tensor(float(labels.numel()))

    def run(inputs: torch.Tensor, targets: torch.Tensor, separator: int | None, model: torch.nn.Module):
        module = CausalLMForTraining(model, TrainingLoss("logits"), {}, return_outputs=True,
                                     document_separator=separator)
        loss, _, outputs = module({"input_ids": inputs, "labels": targets}, count)
        per_token = F.cross_entropy(outputs.logits.flatten(0, 1), targets.flatten(), reduction="none")
        loss.backward()
        return per_token.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    packed_model = tiny_model(model_type)
    packed, packed_grads = run(input_ids, labels, SEPARATOR, packed_model)
    alone_model = tiny_model(model_type)
    flat_inputs, flat_labels = input_ids.flatten(), labels.flatten()
    alone = torch.cat([run(flat_inputs[span][None], flat_labels[span][None], None, alone_model)[0]
                       for span in spans])
    alone_grads = {name: p.grad for name, p in alone_model.named_parameters() if p.grad is not None}
    assert torch.allclose(packed, alone, rtol=1e-5, atol=1e-6)
    for name, grad in alone_grads.items():
        assert torch.allclose(packed_grads[name], grad, rtol=1e-4, atol=1e-6), name

    unmasked, _ = run(input_ids, labels, None, tiny_model(model_type))
    assert not torch.allclose(unmasked, alone, rtol=1e-3)  # without masking, documents see each other


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
