"""generate(): equality with model.generate, seeded sampling, EOS / stop strings / length limit."""
import pytest
import torch
from transformers import LlamaForCausalLM

from common import generate

PROMPTS = ["12+34=", "(5+6)*7-80 is a longer prompt", "x"]  # different lengths: real left padding


@pytest.mark.parametrize("fixture", ["llama", "gpt2"])
def test_greedy_matches_hf_generate_on_left_padded_batch(fixture, request):
    model, tokenizer = request.getfixturevalue(fixture)
    ours = generate(model, tokenizer, PROMPTS, max_new_tokens=24)
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True, padding_side="left")
    reference = model.generate(**enc, do_sample=False, max_new_tokens=24,
                               pad_token_id=tokenizer.pad_token_id)
    for row, completion in enumerate(ours):
        expected = reference[row, enc["input_ids"].shape[1]:].tolist()
        assert len(completion.token_ids) > 0
        assert completion.token_ids == expected[:len(completion.token_ids)]


def test_greedy_does_not_depend_on_batch_padding(llama):
    model, tokenizer = llama
    alone = generate(model, tokenizer, PROMPTS[:1], max_new_tokens=16)[0]
    batched = generate(model, tokenizer, PROMPTS, max_new_tokens=16, batch_size=3)[0]
    assert alone.token_ids == batched.token_ids


def test_sampling_is_reproducible_under_a_seed(llama):
    model, tokenizer = llama
    draws = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        completions = generate(model, tokenizer, PROMPTS, max_new_tokens=16, temperature=1.0, n=2)
        draws.append([c.token_ids for c in completions])
    assert draws[0] == draws[1]
    assert draws[0] != draws[2]


def test_tiny_top_p_keeps_only_the_argmax(llama):
    model, tokenizer = llama
    greedy = generate(model, tokenizer, PROMPTS, max_new_tokens=12)
    torch.manual_seed(0)
    nucleus = generate(model, tokenizer, PROMPTS, max_new_tokens=12, temperature=1.0, top_p=1e-6)
    assert [c.token_ids for c in nucleus] == [c.token_ids for c in greedy]


class ScriptedLlama(LlamaForCausalLM):
    """A real tiny Llama (real cache, real config) whose logits spell a fixed script per prompt."""

    def setup(self, tokenizer, scripts):
        self.tokenizer = tokenizer
        self.scripts = scripts
        self.calls = 0
        return self

    def forward(self, input_ids=None, **kwargs):
        out = super().forward(input_ids=input_ids, **kwargs)
        if input_ids.shape[1] > 1:  # prefill: remember which script each row follows
            prompts = [self.tokenizer.decode(row, skip_special_tokens=True) for row in input_ids]
            self.rows = [self.scripts[prompt] for prompt in prompts]
            self.step = 0
        logits = torch.full((input_ids.shape[0], 1, self.config.vocab_size), -1e4)
        for row, script in enumerate(self.rows):
            logits[row, 0, script[min(self.step, len(script) - 1)]] = 0.0
        self.step += 1
        self.calls += 1
        out.logits = logits
        return out


@pytest.fixture
def scripted(llama):
    base, tokenizer = llama
    eos = tokenizer.eos_token_id

    def ids(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    scripts = {"a": ids("12+3=15\n") + [eos] + ids("zzz"),  # stops at EOS
               "bb": ids("abcdefghijklmnopqrstuvwxyz"),  # never stops: hits the length limit
               "ccc": ids("x STOP y") + [eos],  # stops at a stop string
               "dddd": ids("\u00e9yyyyyyyyyy")}  # a 2-byte character, then ASCII
    model = ScriptedLlama(base.config).eval().setup(tokenizer, scripts)
    return model, tokenizer, ids


def test_rows_stop_at_eos_keep_it_and_report_finished(scripted):
    model, tokenizer, ids = scripted
    eos = tokenizer.eos_token_id
    a, bb, ccc = generate(model, tokenizer, ["a", "bb", "ccc"], max_new_tokens=10)
    assert a.token_ids == ids("12+3=15\n") + [eos] and a.finished and a.text == "12+3=15\n"
    assert bb.token_ids == ids("abcdefghij") and not bb.finished and bb.text == "abcdefghij"
    assert ccc.token_ids == ids("x STOP y") + [eos] and ccc.finished


def test_stop_strings_cut_the_text_and_finish_the_row(scripted):
    model, tokenizer, ids = scripted
    ccc, a = generate(model, tokenizer, ["ccc", "a"], max_new_tokens=20, stop=["STOP", "=1"])
    assert ccc.text == "x " and ccc.finished and ccc.token_ids == ids("x STOP")
    assert a.text == "12+3" and a.finished and a.token_ids == ids("12+3=1")


def test_stop_window_inside_a_multibyte_character_does_not_crash(scripted):
    model, tokenizer, _ = scripted
    # the 6-token window [0xA9, y, y, y, y, y] starts inside "\u00e9": byte fallback renders all six
    # as \ufffd, which the whole text does not contain
    out, = generate(model, tokenizer, ["dddd"], max_new_tokens=20, stop=["\ufffd\ufffd"])
    assert out.finished and out.text == "\u00e9yyyyy"


def test_loop_exits_when_every_row_is_done(scripted):
    model, tokenizer, _ = scripted
    generate(model, tokenizer, ["a", "ccc"], max_new_tokens=200)
    assert model.calls == 9  # the longest script is 8 tokens + EOS, not 200 steps


def test_n_samples_are_prompt_major(scripted):
    model, tokenizer, _ = scripted
    out = generate(model, tokenizer, ["bb", "a"], max_new_tokens=4, n=2, batch_size=3)
    assert [c.text for c in out] == ["abcd", "abcd", "12+3", "12+3"]


def test_prompt_longer_than_the_context_stops_clearly(llama):
    model, tokenizer = llama
    with pytest.raises(SystemExit, match="context"):
        generate(model, tokenizer, ["1" * 600], max_new_tokens=4)
