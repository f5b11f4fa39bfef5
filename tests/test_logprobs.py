"""token_logprobs() and batch_sequences(): alignment, padding, temperature, memory-lean chunks."""
import pytest
import torch

from common import batch_sequences, token_logprobs

TEXTS = ["12+34=46", "(5+6)*7-80=-3 and a longer one", "x"]


def unpadded_logprobs(model, ids, temperature=1.0):
    """One sequence at a time, no padding: the reference."""
    logits = model(torch.tensor([ids])).logits[0, :-1] / temperature
    return logits.log_softmax(-1).gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)


def padded(tokenizer, side):
    enc = tokenizer(TEXTS, return_tensors="pt", padding=True, padding_side=side)
    return enc["input_ids"], enc["attention_mask"]


@pytest.mark.parametrize("fixture", ["llama", "gpt2"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_one_at_a_time(fixture, side, request):
    model, tokenizer = request.getfixturevalue(fixture)
    input_ids, attention_mask = padded(tokenizer, side)
    with torch.no_grad():
        batch = token_logprobs(model, input_ids, attention_mask)
        for row, text in enumerate(TEXTS):
            ids = tokenizer(text)["input_ids"]
            reference = unpadded_logprobs(model, ids)
            n = len(ids) - 1
            got = batch[row, -n:] if side == "left" else batch[row, :n]
            torch.testing.assert_close(got, reference, atol=1e-5, rtol=1e-5)
            assert batch[row].count_nonzero() <= n  # padding targets are zeroed


def test_sum_matches_the_models_own_loss(llama):
    model, tokenizer = llama
    ids = torch.tensor([tokenizer(TEXTS[1])["input_ids"]])
    with torch.no_grad():
        total = token_logprobs(model, ids, torch.ones_like(ids)).sum()
        loss = model(ids, labels=ids).loss
    torch.testing.assert_close(-total / (ids.shape[1] - 1), loss)


def test_temperature_divides_the_logits(llama):
    model, tokenizer = llama
    ids = tokenizer(TEXTS[0])["input_ids"]
    with torch.no_grad():
        mask = torch.ones(1, len(ids), dtype=torch.long)
        got = token_logprobs(model, torch.tensor([ids]), mask, temperature=0.7)
        torch.testing.assert_close(got[0], unpadded_logprobs(model, ids, temperature=0.7))
        assert not torch.allclose(got[0], unpadded_logprobs(model, ids))


def test_small_chunks_give_the_same_values_and_gradients(llama):
    model, tokenizer = llama
    input_ids, attention_mask = padded(tokenizer, "right")
    vocab = model.get_output_embeddings().out_features
    grads = []
    # one chunk vs chunks of 3 tokens, recomputed in backward
    for chunk_elements in (2 ** 30, 3 * vocab):
        model.zero_grad()
        values = token_logprobs(model, input_ids, attention_mask, chunk_elements=chunk_elements)
        values.sum().backward()
        grads.append((values.detach(), model.model.embed_tokens.weight.grad.clone()))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])
    assert grads[0][1].abs().sum() > 0
    model.zero_grad()


def test_response_mask_lines_up_with_response_tokens_even_when_pad_is_eos(llama):
    model, tokenizer = llama
    eos = tokenizer.eos_token_id
    prompts = [tokenizer("12+3=")["input_ids"], tokenizer("7*8=")["input_ids"]]
    responses = [tokenizer("15", add_special_tokens=False)["input_ids"] + [eos],
                 tokenizer("56 and more", add_special_tokens=False)["input_ids"] + [eos]]
    input_ids, attention_mask, response_mask = batch_sequences(prompts, responses, pad_id=eos,
                                                               device="cpu")
    # EOS counted although pad == EOS
    assert response_mask.sum(1).tolist() == [len(r) for r in responses]
    with torch.no_grad():
        masked = (token_logprobs(model, input_ids, attention_mask) * response_mask).sum(1)
        for row, (prompt, response) in enumerate(zip(prompts, responses)):
            every = unpadded_logprobs(model, prompt + response)
            torch.testing.assert_close(masked[row], every[len(prompt) - 1:].sum())


def test_empty_prompt_labels_every_predictable_token(tokenizer):
    ids = tokenizer("12+3=15")["input_ids"]
    _, _, response_mask = batch_sequences([[]], [ids], pad_id=tokenizer.pad_token_id, device="cpu")
    assert response_mask.tolist() == [[1.0] * (len(ids) - 1)]
