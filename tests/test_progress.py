"""What a run shows while it works: progress bars on long phases, log lines never glued to a bar,
TQDM_DISABLE obeyed, and no deprecation warning from the model calls."""
import io
import sys
import warnings
from collections import Counter

import torch
from tqdm.auto import tqdm

import guided_self_improve as gsi
import self_explore
from common import Completion, Example, Logger, generate, token_logprobs


class Terminal(io.StringIO):
    """stdout and stderr of a terminal: tqdm draws its bars on it."""
    def isatty(self):
        return True


def on_a_terminal(monkeypatch):
    screen = Terminal()
    monkeypatch.setattr(sys, "stdout", screen)
    monkeypatch.setattr(sys, "stderr", screen)
    return screen


def bars_of(module, monkeypatch):
    """(description, other options) of each progress bar `module` opens."""
    opened = []

    def bar(iterable, desc=None, **options):
        opened.append((desc, options))
        return iterable

    monkeypatch.setattr(module, "tqdm", bar)
    return opened


def test_generate_and_token_logprobs_raise_no_deprecation_warning(llama):
    model, tokenizer = llama
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # `past_key_values` is deprecated in 5.x
        generate(model, tokenizer, ["1+1", "2*3"], max_new_tokens=3)
        batch = tokenizer(["1+1", "2*3=6"], return_tensors="pt", padding=True)
        token_logprobs(model, batch["input_ids"], batch["attention_mask"])


def test_generate_leaves_its_bar_to_tqdm_disable(llama, monkeypatch):
    """tqdm applies TQDM_DISABLE (read at import) only to the arguments a bar does not pass: a
    several-batch generate() must not pass `disable`; a one-batch call has no bar at all."""
    import common
    model, tokenizer = llama
    opened = bars_of(common, monkeypatch)
    generate(model, tokenizer, ["1+1", "2*3", "4-2"], max_new_tokens=2, batch_size=1)
    generate(model, tokenizer, ["1+1", "2*3", "4-2"], max_new_tokens=2)
    several, one = opened
    assert several == ("generate", {"leave": False})
    assert one == ("generate", {"leave": False, "disable": True})


def test_a_log_line_starts_its_own_line_under_a_progress_bar(tmp_path, monkeypatch):
    screen = on_a_terminal(monkeypatch)
    logger = Logger(str(tmp_path))
    for step in tqdm(range(3), desc="ppo epoch 1", mininterval=0, disable=False):
        logger.log(f"rollout {step}", reward=0.5)
    text = screen.getvalue()
    for step in range(3):
        where = text.index(f"[rollout {step}] reward=0.5")
        assert text[where - 1] in "\r\n"  # cleared bar or new line, never after the bar's text
        assert text[where:].split("\n")[0] == f"[rollout {step}] reward=0.5"


def test_gsi_re_sampling_rounds_show_a_progress_bar(monkeypatch):
    opened = bars_of(gsi, monkeypatch)
    examples = [Example("1+1", "1+1=2", "2")]
    args = gsi.Args(strategy="brute_force", n_samples=2, min_correct=1, brute_force_rounds=3)

    def sample_fn(prompts, n):  # always wrong: every round re-samples
        return [Completion("The answer is 3", [1, 2], True)] * (len(prompts) * n)

    _, stats = gsi.collect_samples(examples, args, sample_fn, lambda e: e.question, lambda e: "")
    assert stats["rounds"] == 3 and isinstance(stats, Counter)
    assert [desc for desc, _ in opened] == ["re-sample hard questions"]


def test_self_explore_dpo_shows_a_progress_bar(monkeypatch, llama):
    opened = bars_of(self_explore, monkeypatch)
    model, tokenizer = llama
    model = type(model)(model.config)  # a fresh copy: the session's model stays untouched
    pair = ([256, 49], [50, 257], [51])
    args = self_explore.Args(dpo_epochs=1, dpo_batch_size=1, micro_batch_size=1)

    class Quiet:
        def log(self, *args, **kwargs):
            pass

    torch.manual_seed(0)
    self_explore.train_dpo(model, tokenizer, [pair, pair], args, Quiet())
    assert [desc for desc, _ in opened] == ["dpo epoch 1"]
