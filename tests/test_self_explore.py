"""self_explore.py: step split, first-pit search, D_g-pair, RFT filter, DPO loss and log-probs,
resume, smoke run."""
import json
import math
import os
from collections import Counter

import pytest
import torch

import self_explore
from common import Completion, Logger, load_model, load_task, save, token_logprobs

GOLD = "2+3=5\n5*4=20\n20-6=14\nThe answer is 14"


def test_step_split_keeps_non_empty_lines_each_ending_in_a_newline():
    steps = self_explore.split_steps(" 2+3=5 \n\n5*4=20\nThe answer is 14\n")
    assert steps == ["2+3=5\n", "5*4=20\n", "The answer is 14\n"]
    assert self_explore.split_steps("") == []


def scripted_sampler(script):
    """sample_fn whose k completions of a prefix are script[number of steps in the prefix]; records
    its calls."""
    calls = []

    def sample_fn(prompts, n):
        calls.append(list(prompts))
        return [text for prompt in prompts for text in script[prompt.count("\n") - 1][:n]]
    return sample_fn, calls


SELF_EXPLORE_GRADER = [  # (completion, gold, correct by the official eval/gsm8k/utils_ans.py)
    ("48+24=72\nThe answer is 72", "72", True),
    ("The answer is 18 dollars.", "18", True),  # the number after the trigger
    ("The answer is: 18", "18", True),
    ("The answer is 1,000", "1000", True),
    ("The answer is 1000", "1,000", True),
    ("The answer is 18.00", "18", True),
    ("The answer is 18.", "18", True),
    ("The answer is .5", "0.5", True),
    ("The answer is -3", "-3", True),
    ("The answer is 18\nThe answer is 20", "18", True),  # the first one counts
    ("The answer is 20\nThe answer is 18", "18", False),
    ("The answer is 18.5", "18", False),
    ("The answer is $18", "18", False),  # no number right after the trigger
    ("the answer is 18", "18", False),  # case-sensitive
    ("Therefore, the answer is: 18", "18", False),
    ("#### 18", "18", False),
    ("The answer is \\boxed{18}", "18", False),
    ("The answer is 1.2.3", "1.2", False),  # not a number: invalid
    ("", "18", False),
]


@pytest.mark.parametrize("completion, gold, correct", SELF_EXPLORE_GRADER)
def test_answers_are_graded_by_the_official_rule(completion, gold, correct):
    assert self_explore.is_correct(completion, gold) is correct


RIGHT, WRONG = "...\nThe answer is 14", "...\nThe answer is 13"


@pytest.mark.parametrize("script, pit", [
    ({1: [WRONG] * 4}, 1),  # a pit at step 1
    ({1: [WRONG, RIGHT, WRONG, WRONG], 2: [RIGHT] + [WRONG] * 3, 3: [WRONG] * 4}, 3),  # mid-way
    ({1: [RIGHT] * 4, 2: [WRONG, RIGHT] * 2, 3: [RIGHT] * 4, 4: [RIGHT] * 4}, None),  # none at all
])
def test_first_pit_is_the_first_prefix_with_no_correct_completion(script, pit):
    steps = self_explore.split_steps(GOLD)
    sample_fn, calls = scripted_sampler(script)
    pits, explored = self_explore.find_first_pits(["q\n"], [steps], ["14"], sample_fn, k=4,
                                                  max_steps=20)
    assert pits == [pit]
    assert len(calls) == len(explored[0]) == (pit or len(steps))  # the search stops at the pit
    assert calls[-1] == ["q\n" + "".join(steps[:len(calls)])]  # prefix j = prompt + steps 1..j


def test_first_pit_search_batches_by_depth_and_respects_max_steps():
    script = {1: [RIGHT] * 4, 2: [WRONG] * 4, 3: [RIGHT] * 4, 4: [RIGHT] * 4}
    sample_fn, calls = scripted_sampler(script)
    steps = self_explore.split_steps(GOLD)
    pits, _ = self_explore.find_first_pits(["a\n", "b\n", "c\n"], [steps, steps[:1], steps],
                                           ["14"] * 3, sample_fn, 4, 3)
    assert pits == [2, None, 2]
    # one call per depth, only rationales still searching
    assert [len(prompts) for prompts in calls] == [3, 2]
    pits, _ = self_explore.find_first_pits(["a\n"], [steps], ["14"], sample_fn, 4, max_steps=1)
    assert pits == [None]


def test_g_pairs_for_a_pit_at_step_one_in_the_middle_and_none():
    rejected = "2+3=5\n5*4=21\n21-6=15\nThe answer is 15"
    pair = dict(prompt="q\n", answer="14", chosen=GOLD, rejected=rejected)
    short, long = "5*4=20\n20-6=14\nThe answer is 14", "5*4=20\n20-6=14\n14=14\nThe answer is 14"
    completions = [[long, short, "5*4=21\n21-6=14\nThe answer is 14", WRONG], [WRONG] * 4]
    counts = Counter()
    first = self_explore.step_pairs([pair], [1], [completions[:1]], True, counts)
    assert first == [dict(prompt="q\n", answer="14", chosen=GOLD, rejected="2+3=5\n", pit=1)]
    middle = self_explore.step_pairs([pair], [2], [completions], True, counts)
    # rejected = the pit step only; chosen = the shortest correct completion from the step before
    expected = dict(prompt="q\n2+3=5\n", answer="14", chosen=short, rejected="5*4=21\n", pit=2)
    assert middle == [expected]
    no_pit = self_explore.step_pairs([pair], [None], [completions], True, counts)
    assert no_pit == [] and counts["no_pit"] == 1
    # without the (intended) filter, a candidate that contains the rejected step can win when it is
    # the shortest
    tricky = [["5*4=21\nThe answer is 14", long], [WRONG] * 4]
    assert self_explore.step_pairs([pair], [2], [tricky], True, counts)[0]["chosen"] == long
    unfiltered = self_explore.step_pairs([pair], [2], [tricky], False, counts)
    assert unfiltered[0]["chosen"] == tricky[0][0]


def test_g_pairs_never_reuse_a_chosen_or_repeat_a_text_within_a_question():
    pair = dict(prompt="q\n", answer="14", chosen=GOLD, rejected="2+3=5\n5*4=21\nThe answer is 21")
    other = dict(pair, rejected="2+3=5\n5*4=22\nThe answer is 22")
    correct = ["5*4=20\n20-6=14\nThe answer is 14", "5*4=20\n20-6=14\n14\nThe answer is 14"]
    completions = [correct, [WRONG] * 4]
    fresh = [["5*4=20\n20-6=14\n14=14\nThe answer is 14"], [WRONG] * 4]
    counts = Counter()
    explored = [completions, completions, completions, fresh]
    pairs = self_explore.step_pairs([pair, other, pair, pair], [2, 2, 2, 2], explored, True, counts)
    assert [p["chosen"] for p in pairs] == completions[0]  # the second pair takes the next shortest
    # nothing left for the third; the fourth repeats a rejected step
    assert counts == Counter(no_chosen=1, duplicate=1)


def test_rft_set_filters_dedups_and_caps():
    wrong_equation = "2+3=6\n6*4=20\n20-6=14\nThe answer is 14"
    wrong_answer = "2+3=5\n5*4=20\n20-6=13\nThe answer is 13"
    samples = [GOLD, GOLD, wrong_equation, wrong_answer, "3+2=5\n5*4=20\n20-6=14\nThe answer is 14"]
    assert self_explore.rft_rationales(samples, "14", 8) == sorted({GOLD, samples[-1]})
    assert len(self_explore.rft_rationales(samples, "14", 1)) == 1
    annotated = "She has 2+3 = <<2+3=5>>5 apples.\nThe answer is 5"
    assert self_explore.equations(annotated) == ["2+3=5"] and self_explore.equations_hold(annotated)
    assert not self_explore.equations_hold("<<2+3=6>>")
    assert self_explore.safe_eval("__import__('os').system('true')") is None  # never eval()
    assert self_explore.safe_eval("(2+3)*4/8-1") == 1.5 and self_explore.safe_eval("1/0") is None


def test_edit_distance_matches_the_dynamic_programme():
    def levenshtein(a, b):
        row = list(range(len(b) + 1))
        for i, x in enumerate(a, 1):
            previous, row[0] = row[0], i
            for j, y in enumerate(b, 1):
                previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (x != y))
        return row[-1]
    rng = torch.Generator().manual_seed(0)
    for _ in range(300):
        a, b = ("".join("ab=\n1"[i] for i in torch.randint(5, (int(n),), generator=rng))
                for n in torch.randint(0, 70, (2,), generator=rng))
        assert self_explore.edit_distance(a, b) == levenshtein(a, b)


def test_outcome_pairs_take_the_farthest_wrong_sample_once():
    near, far = "2+3=5\n5*4=20\n20-6=15\nThe answer is 15", "9*9=81\nThe answer is 81"
    pairs = self_explore.outcome_pairs("q\n", [GOLD, GOLD + " "], [near, far, far, GOLD], "14")
    # deduplicated pool, each wrong sample used once
    assert [p["rejected"] for p in pairs] == [far, near]
    assert self_explore.outcome_pairs("q\n", [GOLD], [GOLD], "14") == []


def test_answer_line_is_cut_from_multi_line_rejected_texts_only():
    assert self_explore.cut_answer_line("2+3=5\n5*4=21\nThe answer is 21") == "2+3=5\n5*4=21"
    # a pit on the answer line: dropped in main
    assert self_explore.cut_answer_line("The answer is 21\n") == ""
    assert self_explore.cut_answer_line("5*4=21\n") == "5*4=21\n"
    assert self_explore.cut_answer_line("The answer is 21") == "The answer is 21"


def test_eos_on_chosen_only_and_trl_truncation(tokenizer):
    args = self_explore.Args()
    prompt_ids, chosen_ids, rejected_ids = self_explore.tokenize_dpo_pair(
        tokenizer, dict(prompt="q\n\n", chosen="ab", rejected="cd"), args)
    assert tokenizer.decode(prompt_ids) == "<s>q\n" and tokenizer.decode(chosen_ids) == "ab</s>"
    assert tokenizer.decode(rejected_ids) == "cd"  # the quirk: no EOS on rejected
    args.eos_on_rejected = True
    rejected_ids = self_explore.tokenize_dpo_pair(
        tokenizer, dict(prompt="q", chosen="ab", rejected="cd"), args)[2]
    assert rejected_ids[-1] == tokenizer.eos_token_id
    args.max_length, args.max_prompt_length = 8, 3
    prompt_ids, chosen_ids, rejected_ids = self_explore.tokenize_dpo_pair(
        tokenizer, dict(prompt="question", chosen="abcdefgh", rejected="x"), args)
    # keep_end, then cut
    assert tokenizer.decode(prompt_ids) == "on\n" and tokenizer.decode(chosen_ids) == "abcde"


def test_dpo_loss_and_gradient_signs_match_hand_computed_values():
    policy = torch.tensor([[-10.0, -12.0]], requires_grad=True)
    reference = torch.tensor([[-11.0, -11.0]])
    losses, rewards = self_explore.dpo_loss(policy, reference, beta=0.1)
    z = 0.1 * ((-10 + 11) - (-12 + 11))  # 0.2
    assert losses.item() == pytest.approx(math.log1p(math.exp(-z)))
    assert rewards.tolist() == [[pytest.approx(0.1), pytest.approx(-0.1)]]
    losses.sum().backward()
    slope = 0.1 * (1 - 1 / (1 + math.exp(-z)))  # beta * sigmoid(-z)
    # descent raises chosen, lowers rejected
    assert policy.grad.tolist() == [[pytest.approx(-slope), pytest.approx(slope)]]


def test_pair_logprobs_are_sums_over_response_tokens(llama):
    model, tokenizer = llama
    rows = [([256, 49, 10], [50, 51, 52, 257], [53]), ([256, 49, 50, 51, 10], [52, 257], [54, 55])]
    logprobs = self_explore.pair_logprobs(model, rows, tokenizer.pad_token_id)
    for b, (prompt, chosen, rejected) in enumerate(rows):
        for column, response in enumerate((chosen, rejected)):
            ids = torch.tensor([prompt + response])
            per_token = token_logprobs(model, ids, torch.ones_like(ids))[0, len(prompt) - 1:]
            assert len(per_token) == len(response)
            summed = pytest.approx(per_token.sum().item(), abs=1e-4)
            assert logprobs[b, column].item() == summed  # a sum, not a mean


def test_dpo_switches_dropout_off_starts_at_log_2_and_raises_the_margin(tmp_path):
    model, tokenizer = load_model("tiny", seed=0)
    attention = [m for m in model.modules() if hasattr(m, "attention_dropout")]
    for module in attention:
        # with dropout on, policy and reference would differ at the first step
        module.attention_dropout = 0.5
    args = self_explore.Args(dpo_lr=1e-3, dpo_epochs=4, dpo_batch_size=4, micro_batch_size=2,
                             seed=0)
    pairs = [dict(prompt=f"{a}+{a}\n", chosen=f"{2 * a}", rejected=f"{2 * a + 1}\n")
             for a in range(1, 5)]
    data = [self_explore.tokenize_dpo_pair(tokenizer, pair, args) for pair in pairs]
    logger = self_explore.Logger(str(tmp_path))
    self_explore.train_dpo(model, tokenizer, data, args, logger)
    log = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    # the first batch sees policy = reference
    assert log[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert log[-1]["margin"] > 0.1 and log[-1]["accuracy"] == 1.0
    assert attention and all(module.attention_dropout == 0.0 for module in attention)


def scripted_generate(examples):
    """A stand-in for common.generate on arith: from a prefix that follows the gold steps, sample i
    finishes correctly when i is even and otherwise writes a wrong number a few steps later (how
    many depends on the question, so that pits fall at different steps); a wrong prefix stays
    wrong."""
    gold = {ex.question: ex.rationale.split("\n") + [f"The answer is {ex.answer}"]
            for ex in examples}

    def generate(model, tokenizer, prompts, *, n=1, **kwargs):
        texts = []
        for prompt in prompts:
            question, *done = prompt.rstrip("\n").split("\n")
            steps = gold[question]
            for i in range(n):
                rest = steps[len(done):]
                if done != steps[:len(done)]:
                    rest = ["1=1", "The answer is -1"]
                elif i % 2:
                    cut = (i // 2 + len(question)) % max(1, len(rest) - 1)
                    rest = rest[:cut] + [rest[cut].split("=")[0] + "=-1", "The answer is -1"]
                texts.append("\n".join(rest))
        return [Completion(text, [], True) for text in texts]
    return generate


TASK = "arith:n_train=24,n_test=4"


def run_main(tmp_path, *flags):
    out_dir = str(tmp_path / "run")
    self_explore.main(["--preset", "toy", "--model", "tiny", "--task", TASK, "--out_dir", out_dir,
                       "--n_val", "4", "--n_samples", "4", "--rft_epochs", "1", "--sft_epochs", "1",
                       "--dpo_epochs", "2", "--max_new_tokens", "8", *flags])
    return out_dir


def test_toy_smoke_run_and_resume(tmp_path, monkeypatch):
    monkeypatch.setattr(self_explore, "generate", scripted_generate(load_task(TASK, "train")))
    out_dir = run_main(tmp_path, "--sft_model", "")  # every stage, SFT included
    for name in ("sft", "samples.jsonl", "rft.jsonl", "pairs.jsonl", "rft", "explore.jsonl",
                 "gpairs.jsonl", "dpo-gpair"):
        assert os.path.exists(os.path.join(out_dir, name)), name
    metrics = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
    steps = {m["step"]: m for m in metrics}
    assert steps["data"]["sample_accuracy"] == 0.5 and steps["data"]["d_pair"] > 0
    explore = steps["explore"]
    assert explore["g_pair"] > 0 and explore["pit_1"] > 0 and explore["pit_2"] > 0
    for key in ("loss", "chosen_reward", "rejected_reward", "margin", "accuracy"):
        assert math.isfinite(steps["dpo 2"][key])
    assert {"eval sft", "eval rft", "eval dpo-gpair"} <= set(steps)
    assert "test_accuracy" in steps["eval rft"]
    for pair in map(json.loads, open(os.path.join(out_dir, "gpairs.jsonl"))):
        # the wrong step is the pit
        assert pair["prompt"].count("\n") == pair["pit"] and "-1" in pair["rejected"]

    # resume: the baseline reuses stages 1-3 and trains DPO on D_pair; nothing is sampled or
    # fine-tuned again
    def refuse(*args, **kwargs):
        raise AssertionError("a finished stage ran again")
    monkeypatch.setattr(self_explore, "generate", refuse)
    monkeypatch.setattr(self_explore.sft, "train", refuse)
    run_main(tmp_path, "--sft_model", "", "--pairs", "outcome")
    steps = [json.loads(line)["step"] for line in open(os.path.join(out_dir, "metrics.jsonl"))]
    # the cached result is logged again
    assert steps[-1] == "eval dpo-outcome" and steps.count("eval rft") == 2
    assert load_model(os.path.join(out_dir, "dpo-outcome"))[0].config.model_type == "llama"


def test_resume_after_an_interrupted_stage(tmp_path, monkeypatch):
    monkeypatch.setattr(self_explore, "generate", scripted_generate(load_task(TASK, "train")))
    model, tokenizer = load_model("tiny", seed=0)
    save(model, tokenizer, str(tmp_path / "start"))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(self_explore, "find_first_pits", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_main(tmp_path, "--sft_model", str(tmp_path / "start"))
    out_dir = str(tmp_path / "run")
    assert os.path.exists(os.path.join(out_dir, "rft", "args.json"))
    assert not os.path.exists(os.path.join(out_dir, "explore.jsonl"))
    before = open(os.path.join(out_dir, "pairs.jsonl")).read()
    monkeypatch.undo()
    calls = Counter()
    monkeypatch.setattr(self_explore.sft, "train", lambda *a, **k: calls.update(["sft"]))
    monkeypatch.setattr(self_explore, "generate", scripted_generate(load_task(TASK, "train")))
    run_main(tmp_path, "--sft_model", str(tmp_path / "start"))
    assert calls["sft"] == 0 and open(os.path.join(out_dir, "pairs.jsonl")).read() == before
    assert os.path.exists(os.path.join(out_dir, "dpo-gpair", "args.json"))


def test_sft_and_rft_decay_over_the_official_five_epochs(tmp_path):
    """The official run_ft.sh and run_rft.sh compute the linear decay for 5 epochs and the paper
    reports an early epoch: after 1 epoch of one step the LR is 4/5 of its peak, not 0."""
    args = self_explore.Args(sft_batch_size=4, micro_batch_size=4, seed=0)
    pairs = [(f"{a}+{a}\n", f"{a}+{a}={2 * a}\nThe answer is {2 * a}") for a in range(1, 5)]
    logger = self_explore.Logger(str(tmp_path))
    self_explore.supervised_stage(args, "tiny", pairs, 1, str(tmp_path / "rft"), logger)
    last = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")][-1]
    assert last["lr"] == pytest.approx(0.8 * args.sft_lr)
    assert self_explore.sft.PRESETS["self_explore"]["schedule_epochs"] == args.sft_schedule_epochs
    with pytest.raises(SystemExit, match="--sft_schedule_epochs 1 ends the LR decay"):
        self_explore.main(["--sft_schedule_epochs", "1", "--out_dir", str(tmp_path / "run")])


def test_sft_and_rft_take_the_official_adam_eps_and_drop_1024_token_examples(tmp_path,
                                                                             monkeypatch):
    seen = {}

    def train(model, tokenizer, pairs, recipe, logger=None):
        seen.update(pairs=pairs, recipe=recipe)

    monkeypatch.setattr(self_explore.sft, "train", train)
    monkeypatch.setattr(self_explore, "save", lambda *args: None)
    tokenizer = load_model("tiny")[1]
    prompt, short = "1+2\n", "1+2=3\nThe answer is 3"
    room = 1024 - len(tokenizer(prompt)["input_ids"]) - 1  # target bytes: 1024 tokens with EOS
    pairs = [(prompt, short), (prompt, "1" * room), (prompt, "1" * (room + 1))]
    out_dir = str(tmp_path / "sft")
    self_explore.supervised_stage(self_explore.Args(), "tiny", pairs, 1, out_dir, Logger(out_dir))
    assert seen["pairs"] == pairs[:2]  # official: len(question) + len(answer) >= 1024 is dropped
    assert seen["recipe"].adam_eps == 1e-6  # official: transformers' AdamW default
