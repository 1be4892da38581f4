"""The chunked linear cross-entropy against plain F.cross_entropy on the full logits, eager and compiled."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import timl.loss.chunked as chunked_loss
from timl.loss.chunked import (chunked_linear_cross_entropy, chunked_token_losses, default_chunk_rows,
                               training_chunk_rows)
from timl.loss.cross_entropy import IGNORE_INDEX

BATCH, SEQUENCE, WIDTH, ROWS = 2, 19, 16, 64
"""38 tokens: not a multiple of the chunk size 8 used below."""

HEADS = {
    "plain": {},
    "bias": {"bias": True},
    "small_scale": {"scale": 0.0625},
    "large_scale": {"scale": 8.0},
    "softcap": {"scale": 8.0, "softcap": 30.0},
    "padded_vocab": {"vocab_size": 50},
    "combined": {"bias": True, "scale": 0.5, "softcap": 30.0, "vocab_size": 50},
}


def make_inputs(head: dict, dtype: torch.dtype = torch.float32, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    vocab = head.get("vocab_size", ROWS)
    hidden = torch.randn(BATCH, SEQUENCE, WIDTH, generator=generator)
    weight = torch.randn(ROWS, WIDTH, generator=generator) * 0.5
    labels = torch.randint(0, vocab, (BATCH, SEQUENCE), generator=generator)
    flat = labels.view(-1)
    flat[8:16] = IGNORE_INDEX  # a whole chunk of 8 without targets
    flat[[3, 21, 37]] = IGNORE_INDEX
    inputs = {"hidden": hidden, "weight": weight, "labels": labels}
    if head.get("bias"):
        inputs["bias"] = torch.randn(ROWS, generator=generator)
    for name in ("hidden", "weight", "bias"):
        if name in inputs:
            inputs[name] = inputs[name].to(dtype).requires_grad_()
    return inputs


def head_options(head: dict) -> dict:
    return {key: value for key, value in head.items() if key != "bias"}


def reference_logits(hidden, weight, bias=None, scale=1.0, softcap=None, vocab_size=None) -> torch.Tensor:
    """The full fp32 logits, padding at -inf as the model would see it."""
    logits = hidden.float().reshape(-1, hidden.shape[-1]) @ weight.float().T
    if bias is not None:
        logits = logits + bias.float()
    logits = logits * scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    if vocab_size is not None:
        padding = torch.arange(weight.shape[0]) >= vocab_size
        logits = logits.masked_fill(padding, float("-inf"))
    return logits


def reference_losses(hidden, weight, labels, bias=None, z_loss_coefficient=0.0, **head) -> tuple[torch.Tensor, ...]:
    logits = reference_logits(hidden, weight, bias, **head)
    labels = labels.reshape(-1)
    ce = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    lse = logits.logsumexp(-1)[labels != IGNORE_INDEX]
    return ce, z_loss_coefficient * lse.square().sum()


def values_and_grads(loss_function, inputs: dict, weights=(1.0, 1.0), **options) -> list[torch.Tensor]:
    """The two outputs and the gradients of `weights[0] * ce + weights[1] * z` with respect to each input."""
    differentiable = [inputs[name] for name in ("hidden", "weight", "bias") if name in inputs]
    ce, z = loss_function(**inputs, **options)
    grads = torch.autograd.grad(ce * weights[0] + z * weights[1], differentiable)
    return [ce.detach(), z.detach(), *grads]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5) -> None:
    # Gradient entries near zero carry no relative precision, so the absolute slack scales with the largest entry.
    atol = rtol * float(expected.abs().max())
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.float() - expected.float()).norm() / expected.float().norm())


@pytest.mark.parametrize("chunk_size", [8, 1, 100, None])
@pytest.mark.parametrize("head", list(HEADS))
def test_loss_and_gradients_match_full_logits(head, chunk_size):
    inputs = make_inputs(HEADS[head])
    options = head_options(HEADS[head])
    expected = values_and_grads(reference_losses, inputs, **options)
    actual = values_and_grads(chunked_linear_cross_entropy, inputs, chunk_size=chunk_size, **options)
    for got, want in zip(actual, expected):
        assert got.dtype == want.dtype
        assert_close(got, want)
    if "vocab_size" in options:
        vocab = options["vocab_size"]
        assert torch.equal(actual[3][vocab:], torch.zeros_like(actual[3][vocab:]))
        if "bias" in inputs:
            assert torch.equal(actual[4][vocab:], torch.zeros_like(actual[4][vocab:]))


@pytest.mark.parametrize("weights", [(0.3, 2.0), (1.0, 0.0), (0.0, 1.0)])
def test_z_loss_and_cross_entropy_carry_their_own_gradients(weights):
    head = HEADS["combined"]
    inputs = make_inputs(head)
    options = {**head_options(head), "z_loss_coefficient": 0.05}
    expected = values_and_grads(reference_losses, inputs, weights, **options)
    actual = values_and_grads(chunked_linear_cross_entropy, inputs, weights, chunk_size=8, **options)
    assert float(expected[1]) > 0.01 * float(expected[0])  # the z-loss is large enough to matter
    for got, want in zip(actual, expected):
        assert_close(got, want)


@pytest.mark.parametrize("head", ["plain", "combined"])
def test_bf16_inputs_stay_close_to_the_fp32_reference(head):
    head = HEADS[head]
    inputs = make_inputs(head, dtype=torch.bfloat16)
    options = {**head_options(head), "z_loss_coefficient": 0.05}
    expected = values_and_grads(reference_losses, inputs, (0.3, 2.0), **options)
    actual = values_and_grads(chunked_linear_cross_entropy, inputs, (0.3, 2.0), chunk_size=8, **options)
    assert actual[0].dtype == actual[1].dtype == torch.float32
    assert all(grad.dtype == torch.bfloat16 for grad in actual[2:])
    for got, want in zip(actual[:2], expected[:2]):
        assert abs(float(got) - float(want)) <= 1e-3 * abs(float(want))
    for got, want in zip(actual[2:], expected[2:]):
        assert relative_error(got, want) < 1e-2


def compiled_matches_eager(backend: str, chunk_size: int | None) -> None:
    torch._dynamo.reset()
    head = HEADS["combined"]
    inputs = make_inputs(head)
    options = {**head_options(head), "z_loss_coefficient": 0.05, "chunk_size": chunk_size}
    compiled = torch.compile(chunked_linear_cross_entropy, backend=backend, fullgraph=True)
    expected = values_and_grads(chunked_linear_cross_entropy, inputs, (0.3, 2.0), **options)
    actual = values_and_grads(compiled, inputs, (0.3, 2.0), **options)
    for got, want in zip(actual, expected):
        assert_close(got, want)


def test_compiles_without_graph_breaks_and_matches_eager():
    compiled_matches_eager("aot_eager", chunk_size=16)


def test_inductor_matches_eager():
    # One chunk: inductor's CPU compile time grows with every unrolled chunk, and the chunk loop is already
    # covered by the aot_eager test above.
    compiled_matches_eager("inductor", chunk_size=None)


def test_without_grad_mode_no_gradient_work_is_done(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("gradient maths ran without grad mode")

    head = HEADS["combined"]
    inputs = make_inputs(head)
    options = {**head_options(head), "z_loss_coefficient": 0.05}
    expected = reference_losses(**inputs, **options)
    monkeypatch.setattr(chunked_loss, "_chunk_maths", refuse)
    with torch.no_grad():
        actual = chunked_linear_cross_entropy(**inputs, chunk_size=8, **options)
    frozen = {**inputs, "hidden": inputs["hidden"].detach(), "weight": inputs["weight"].detach(),
              "bias": inputs["bias"].detach()}
    frozen_actual = chunked_linear_cross_entropy(**frozen, chunk_size=8, **options)
    for outputs in (actual, frozen_actual):
        for got, want in zip(outputs, expected):
            assert not got.requires_grad
            assert_close(got, want.detach())


def test_frozen_weight_still_gives_the_hidden_gradient():
    head = HEADS["combined"]
    inputs = make_inputs(head)
    inputs["weight"] = inputs["weight"].detach()
    inputs["bias"] = inputs["bias"].detach()
    options = head_options(head)
    ce, _ = chunked_linear_cross_entropy(**inputs, chunk_size=8, **options)
    (grad,) = torch.autograd.grad(ce, inputs["hidden"])
    (expected,) = torch.autograd.grad(reference_losses(**inputs, **options)[0], inputs["hidden"])
    assert_close(grad, expected)


@pytest.mark.parametrize("chunk_size", [8, None])
def test_token_losses_and_logits_consumer_see_every_row_once(chunk_size):
    head = HEADS["combined"]
    inputs = make_inputs(head)
    options = head_options(head)
    seen_logits, seen_labels = [], []

    def consume(logits: torch.Tensor, labels: torch.Tensor) -> None:
        seen_logits.append(logits)
        seen_labels.append(labels)

    losses = chunked_token_losses(**inputs, chunk_size=chunk_size, logits_consumer=consume, **options)
    logits = reference_logits(inputs["hidden"], inputs["weight"], inputs["bias"], **options).detach()
    labels = inputs["labels"].reshape(-1)
    expected = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="none")
    assert losses.shape == (BATCH * SEQUENCE,) and losses.dtype == torch.float32
    assert not losses.requires_grad
    assert_close(losses, expected)
    assert torch.equal(losses[labels == IGNORE_INDEX], torch.zeros(int((labels == IGNORE_INDEX).sum())))
    assert len(seen_logits) == (5 if chunk_size == 8 else 1)
    assert all(chunk.dtype == torch.float32 and chunk.shape[1] == options["vocab_size"] for chunk in seen_logits)
    assert torch.equal(torch.cat(seen_labels), labels)
    assert_close(torch.cat(seen_logits), logits[:, :options["vocab_size"]])


def test_default_chunk_keeps_a_chunks_logits_near_256_mib():
    assert default_chunk_rows(50257) == 1328
    assert default_chunk_rows(2**17) == 512
    assert default_chunk_rows(2**26 // 5) == 5
    assert default_chunk_rows(2**28) == 1
    for vocab in (1000, 32000, 50257, 151936, 262144):
        assert default_chunk_rows(vocab) * vocab * 4 <= 2**28


def test_training_chunks_are_the_fewest_equal_ones_within_the_byte_budget():
    # Llama-1B's 8 × 2048 tokens at a 128256 vocab in bf16 (3.9 GiB of logits): eight chunks of 2048 rows.
    assert training_chunk_rows(16384, 128256, 2) == 2048
    # GPT-2's 32 × 1024 tokens at 50304: 3.1 GiB, at least seven chunks; eight split them exactly.
    assert training_chunk_rows(32768, 50304, 2) == 4096
    # 3004 tokens (4 × 751) at 150k: 0.84 GiB, and no split into 2 to 4 equal chunks of a multiple of 8: two
    # chunks, the last one shorter.
    assert training_chunk_rows(3004, 150000, 2) == 1504
    assert training_chunk_rows(100, 64, 4) == 100  # one chunk when everything fits
    for tokens, vocab in ((16384, 128256), (32768, 50304), (4000, 262144), (12288, 151936), (3004, 150000)):
        rows = training_chunk_rows(tokens, vocab, 2)
        chunks = -(-tokens // rows)
        assert rows % 8 == 0 and rows * vocab * 2 <= 2**29
        assert chunks <= 2 * -(-tokens * vocab * 2 // 2**29)


def test_under_autocast_the_head_multiplies_in_bf16_once_and_returns_fp32_gradients():
    """Under autocast the chunked head multiplies in bf16, as the model's own head would, and the gradients come
    back in the inputs' fp32: within bf16 rounding of the fp32 reference, and as close to it as the one-piece
    head under the same autocast."""
    from timl.loss.cross_entropy import linear_cross_entropy as one_piece_head

    head = HEADS["combined"]
    inputs = make_inputs(head)
    options = {**head_options(head), "z_loss_coefficient": 0.05}
    expected = values_and_grads(reference_losses, inputs, (0.3, 2.0), **options)
    with torch.autocast("cpu", torch.bfloat16):
        actual = values_and_grads(chunked_linear_cross_entropy, inputs, (0.3, 2.0), chunk_size=8, **options)
        one_piece = values_and_grads(one_piece_head, inputs, (0.3, 2.0), **options)
    assert all(grad.dtype == torch.float32 for grad in actual[2:])
    for got, piece, want in zip(actual, one_piece, expected):
        assert relative_error(got, want) < 2e-2
        assert relative_error(got, want) <= 1.5 * relative_error(piece, want) + 1e-6
    assert relative_error(actual[0], expected[0]) > 0  # it did multiply in bf16


def test_a_second_backward_through_the_same_loss_is_refused():
    inputs = make_inputs(HEADS["plain"])
    ce, _ = chunked_linear_cross_entropy(**inputs, chunk_size=8)
    ce.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward per forward"):
        ce.backward()
