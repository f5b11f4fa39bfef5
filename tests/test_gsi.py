"""guided_self_improve.py: hard questions, hint prompts, hint-free training data, the sample
budget, the official grader, smoke runs."""
import dataclasses
import json
import os

import pytest

import guided_self_improve as gsi
import sft
from common import Completion, Example, byte_tokenizer, load_task

GOLD_RATIONALE = "2+3=5\n5*4=20\n20-6=14\nThe answer is 14"
EXAMPLES = [Example("(2+3)*4-6", "2+3=5\n5*4=20\n20-6=14", "14"), Example("7+8", "7+8=15", "15"),
            Example("9*9", "9*9=81", "81")]


def args_for(strategy, **overrides):
    return dataclasses.replace(gsi.Args(**gsi.TOY), strategy=strategy, **overrides)


def test_toy_preset_samples_questions_the_toy_sft_never_saw():
    # the toy SFT is right on 97% of its own questions: sampling them leaves no tail to narrow
    sft_task = sft.PRESETS["toy"]["task"]
    seen = {example.question for example in load_task(sft_task, "train")}
    sampled = load_task(gsi.TOY["task"], "train")
    assert len(sampled) == gsi.TOY["n_questions"]
    assert not seen & {example.question for example in sampled}
    assert load_task(gsi.TOY["task"], "test") == load_task(sft_task, "test")


def plain(example):
    return sft.prompt_for("self_explore", example.question)


def gold_rationale(example):
    return sft.target_for("self_explore", example)


def completion(text):
    return Completion(text, list(range(len(text))), True)  # one token per character


def pool(correct, wrong):
    right = dict(text="", correct=True, resampled=False)
    wrong_sample = dict(text="", correct=False, resampled=False)
    return [right] * correct + [wrong_sample] * wrong


def test_a_question_is_hard_while_fewer_than_min_correct_samples_are_right():
    pools = [pool(0, 8), pool(3, 5), pool(4, 4), pool(8, 0)]
    # 3 of 8 is hard (it need not have 0), 4 of 8 is not
    assert gsi.hard_questions(pools, 4) == [0, 1]
    assert gsi.hard_questions(pools, 1) == [0]


def test_state_reset_prefixes_advance_one_line_per_round_then_cycle():
    lines = GOLD_RATIONALE.split("\n")
    prefixes = [gsi.state_reset_prefix(GOLD_RATIONALE, r, "lines") for r in range(9)]
    # past the end: all lines but the last, then back to 1 (official get_state_reset)
    ks = [1, 2, 3, 3, 1, 2, 3, 3, 1]
    assert prefixes == ["\n".join(lines[:k]) + "\n" for k in ks]
    assert all(not prefix.endswith("The answer is 14\n") for prefix in prefixes)


GSI_RECORD = {"item_id": "gsm8k_0", "question": "q", "answer_value": "220",  # official data's form
              "answer_cot": "50 + 9 = 59\n1500 - 180 = 1320\n1320 / 6 = 220\nThe answer is 220"}
HUB_RECORD = {"question": "q",  # the hub's GSM8K
              "answer": "Sold 48/2 = <<48/2=24>>24.\nAll 48+24=<<48+24=72>>72.\n#### 72"}


def test_gold_solutions_carry_one_answer_line_and_no_calculator_annotations(tmp_path):
    """GSI's data (answer_cot ends in `The answer is x`), the hub's GSM8K (`<<a=b>>` annotations):
    one answer line, and the state-reset prefix (all lines but the last) never holds the answer."""
    path = tmp_path / "gsm8k.json"
    path.write_text(json.dumps([GSI_RECORD, HUB_RECORD]))
    gsi_example, hub_example = load_task(str(path))
    solution = gsi.gold_solution("gsi", gsi_example)
    assert solution.endswith("1320 / 6 = 220\nThe answer is 220")
    assert solution.count("The answer is") == 1
    for round_index in range(6):
        assert "The answer is" not in gsi.state_reset_prefix(solution, round_index, "lines")
    expected = "Sold 48/2 = 24.\nAll 48+24=72.\nThe answer is 72"
    assert gsi.gold_solution("gsi", hub_example) == expected


def test_state_reset_prefixes_by_token_proportion_use_the_policy_tokenizer():
    tokenizer = byte_tokenizer()  # one token per character here: proportions are easy to check
    cuts = [len(gsi.state_reset_prefix(GOLD_RATIONALE, r, "tokens", tokenizer)) for r in range(7)]
    n = len(GOLD_RATIONALE)
    assert cuts == [int(p * n) for p in (0.2, 0.4, 0.6, 0.8, 0.8, 0.2, 0.4)]
    prefix = gsi.state_reset_prefix(GOLD_RATIONALE, 3, "tokens", tokenizer)
    assert GOLD_RATIONALE.startswith(prefix)  # no BOS text


def test_each_hint_prompt_contains_what_it_should():
    example = EXAMPLES[0]
    assert gsi.answer_driven_prompt("self_explore", example) == "(2+3)*4-6 14\n"
    hinted = gsi.answer_driven_prompt("gsi", example)
    assert "### Question:\n(2+3)*4-6 14\n\n### Your step-by-step answer:\n" in hinted
    rationale = gsi.rationale_driven_prompt(example, GOLD_RATIONALE)
    assert f"### Question:\n(2+3)*4-6 \n\n### Reference Answer:\n{GOLD_RATIONALE}\n\n" in rationale
    assert rationale.endswith("### Your detailed, complete and step-by-step answer:\n")
    seen = []

    def teacher_fn(users):
        seen.extend(users)
        return [completion("Step 2 is wrong: 5*4 is 20.")]
    stats = gsi.Counter()
    wrong = "2+3=5\n5*4=21\nThe answer is 15"
    student, = gsi.interactive_prompts([example], [GOLD_RATIONALE], [wrong], teacher_fn, stats)
    assert "### Student's original wrong answer:\n2+3=5\n5*4=21\nThe answer is 15" in seen[0]
    # the rationale, not the value
    assert f"### Correct final answer:\n{GOLD_RATIONALE}\n\n### Your correction:\n" in seen[0]
    assert "### Correction and guidance:\nStep 2 is wrong: 5*4 is 20.\n\n" in student
    assert "### Your original wrong answer:\n2+3=5\n5*4=21\nThe answer is 15" in student
    critique_tokens = len("Step 2 is wrong: 5*4 is 20.")
    assert stats["teacher_samples"] == 1 and stats["teacher_tokens"] == critique_tokens
    chat = gsi.chat_prompt(byte_tokenizer(), gsi.TEACHER_SYSTEM, "hi")
    assert chat.startswith("You're a patient teacher")


def hint_only_sampler(calls):
    """Plain prompts always get a wrong answer; any other (hinted) prompt gets the right one."""
    plains = {plain(e): e for e in EXAMPLES}

    def sample_fn(prompts, n):
        calls.append((list(prompts), n))
        texts = []
        for prompt in prompts:
            right = f"The answer is {answer_of(prompt)}"
            texts += ["1+1=2\nThe answer is -1" if prompt in plains else right] * n
        return [completion(text) for text in texts]
    return sample_fn


def answer_of(prompt):
    return next(e.answer for e in EXAMPLES if e.question in prompt)


def teacher_fn(users):
    return [completion("Recheck the last step.") for _ in users]


@pytest.mark.parametrize("strategy",
                         ["answer_driven", "rationale_driven", "state_reset", "interactive"])
def test_training_data_never_contains_the_hint(strategy):
    calls = []
    args = args_for(strategy, n_samples=8, min_correct=4, guided_rounds=8)
    pools, stats = gsi.collect_samples(EXAMPLES, args, hint_only_sampler(calls), plain,
                                       gold_rationale, teacher_fn, byte_tokenizer())
    pairs = gsi.training_pairs(EXAMPLES, pools, plain)
    assert len(pairs) == 3 * 4  # every question reached 4 correct, only through hinted samples
    for prompt, target in pairs:
        # the plain prompt, whatever prompt produced the sample
        assert prompt in {plain(e) for e in EXAMPLES}
        assert target == target.strip() and "Reference" not in target and "Correction" not in target
        assert f"{answer_of(prompt)}\n" not in prompt and "Recheck" not in prompt
    for e, p in zip(EXAMPLES, pools):
        assert all(s["prompt"] != plain(e) for s in p if s["resampled"])
    if strategy == "state_reset":  # stored response = gold prefix + the model's continuation
        for example, question_pool in zip(EXAMPLES, pools):
            for round_index, sample in enumerate(s for s in question_pool if s["resampled"]):
                prefix = gsi.state_reset_prefix(gold_rationale(example), round_index, "lines")
                assert sample["prompt"] == plain(example) + prefix
                assert sample["text"] == prefix + f"The answer is {example.answer}"
        hinted_tokens = sum(len(f"The answer is {e.answer}") * 4 for e in EXAMPLES)
        assert stats["tokens"] == 24 * len("1+1=2\nThe answer is -1") + hinted_tokens  # no prefixes


def scripted_budget_sampler(right_plain):
    """Question i answers its first right_plain[i] plain samples correctly, then never again;
    hints always work."""
    given = gsi.Counter()

    def sample_fn(prompts, n):
        texts = []
        for prompt in prompts:
            i = next(j for j, e in enumerate(EXAMPLES) if e.question in prompt)
            for _ in range(n):
                right = given[i] < right_plain[i] if prompt == plain(EXAMPLES[i]) else True
                given[i] += prompt == plain(EXAMPLES[i])
                texts.append(f"The answer is {EXAMPLES[i].answer if right else -1}")
        return [completion(text) for text in texts]
    return sample_fn


@pytest.mark.parametrize("strategy, rounds, resampled", [
    ("none", 0, 0),  # vanilla: the 8 plain samples per question only
    ("brute_force", 5, 10),  # questions 1 and 2 stay hard in all 5 rounds: 2 samples per round
    # 3 -> 4 correct in one round; 0 -> 4 in four; then no hard question: stop
    ("answer_driven", 4, 1 + 4),
    ("interactive", 4, 1 + 4),
])
def test_the_sample_budget_is_counted(strategy, rounds, resampled):
    args = args_for(strategy, n_samples=8, min_correct=4, guided_rounds=8, brute_force_rounds=5,
                    teacher="self")
    sampler = scripted_budget_sampler([8, 3, 0])
    pools, stats = gsi.collect_samples(EXAMPLES, args, sampler, plain, gold_rationale, teacher_fn)
    assert stats["rounds"] == rounds and stats["resampled"] == resampled
    assert stats["samples"] == 3 * 8 + resampled == sum(len(p) for p in pools)
    assert stats["tokens"] == sum(len(s["text"]) for p in pools for s in p)
    assert stats["teacher_samples"] == (resampled if strategy == "interactive" else 0)
    expected = [8, 3, 0] if strategy in ("none", "brute_force") else [8, 4, 4]
    assert [gsi.n_correct(p) for p in pools] == expected
    pairs = gsi.training_pairs(EXAMPLES, pools, plain)
    metrics, bars = gsi.iteration_metrics(args, pools, [1, 2], [1, 2], pairs)
    assert metrics["hist"] == [1, 0, 0, 1, 0, 0, 0, 0, 1] and metrics["hard"] == 2
    hard_coverage = 0.5 if rounds in (0, 5) else 1.0
    assert metrics["hard_coverage_before"] == 0.5 and metrics["hard_coverage"] == hard_coverage
    assert len(bars.splitlines()) == 10


def test_a_fixed_training_budget_uses_every_pair_equally_often():
    pairs = [("a\n", "1"), ("b\n", "2"), ("c\n", "3")]
    drawn = gsi.fixed_budget(pairs, 8, seed=0)
    assert len(drawn) == 8 and sorted(gsi.Counter(drawn).values()) == [2, 3, 3]
    assert set(drawn[:3]) == set(pairs) and gsi.fixed_budget([], 8, seed=0) == []


def test_bad_flags_stop_before_any_work():
    cases = [(["--strategy", "magic"], "unknown --strategy"),
             (["--strategy", "interactive"], "--teacher"),
             (["--min_correct", "9"], "--min_correct"), (["--reset_by", "words"], "--reset_by")]
    for flags, message in cases:
        with pytest.raises(SystemExit, match=message):
            gsi.main(["--preset", "toy", "--task", "no-such-task.jsonl", *flags])


def run_main(tmp_path, strategy, *flags):
    out_dir = str(tmp_path / strategy)
    gsi.main(["--preset", "toy", "--model", "tiny", "--sft_model", "",
              "--task", "arith:steps=1,n_train=12,n_test=4", "--out_dir", out_dir,
              "--strategy", strategy, "--teacher", "self", "--n_samples", "4",
              "--min_correct", "2", "--guided_rounds", "2", "--brute_force_rounds", "3",
              "--train_sequences", "16", "--max_new_tokens", "12", *flags])
    metrics = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
    return out_dir, [m for m in metrics if m["step"].startswith("iter")]


@pytest.mark.parametrize("strategy", gsi.STRATEGIES)
def test_toy_smoke_run_of_one_iteration_per_strategy(tmp_path, strategy):
    out_dir, (metrics,) = run_main(tmp_path, strategy, "--iterations", "1")
    rounds = {"none": 0, "brute_force": 3}.get(strategy, 2)
    # a tiny model after one SFT step solves nothing: all 12 questions stay hard in every round
    assert metrics["rounds"] == rounds
    assert metrics["samples"] == 12 * 4 + rounds * 12 == metrics["total_samples"]
    assert metrics["teacher_samples"] == (rounds * 12 if strategy == "interactive" else 0)
    assert sum(metrics["hist"]) == 12 and 0 <= metrics["test_accuracy"] <= 1
    assert os.path.isfile(os.path.join(out_dir, "iter-0", "args.json"))
    rows = [json.loads(line) for line in open(os.path.join(out_dir, "samples-0.jsonl"))]
    assert len(rows) == 12 and sum(len(row["samples"]) for row in rows) == metrics["samples"]


def test_every_iteration_trains_the_base_model_on_hint_free_correct_samples(tmp_path, monkeypatch):
    examples = load_task("arith:steps=1,n_train=12,n_test=4", "train")
    easy = {e.question for e in examples[::2]}

    hinted = {gsi.answer_driven_prompt("self_explore", e): e.answer for e in examples}
    right_plain = {plain(e): e.answer for e in examples if e.question in easy}

    def scripted_generate(model, tokenizer, prompts, *, n=1, **kwargs):
        """Even questions: right without a hint."""
        answers = hinted | right_plain
        return [completion(f"The answer is {answers.get(prompt, -1)}") for prompt in prompts
                for _ in range(n)]
    loaded = []
    trained = []
    load_model = gsi.load_model
    monkeypatch.setattr(gsi, "generate", scripted_generate)

    def load_and_record(name, **kwargs):
        loaded.append(name)
        return load_model(name, **kwargs)

    def train_and_record(model, tokenizer, pairs, *args, **kwargs):
        trained.append(pairs)
    monkeypatch.setattr(gsi, "load_model", load_and_record)
    monkeypatch.setattr(gsi.sft, "train", train_and_record)
    _, metrics = run_main(tmp_path, "answer_driven", "--iterations", "2", "--train_sequences", "0",
                          "--epochs", "1")
    # the up-front context check's, then iteration 1 restarts from the base model, not iteration 0's
    assert loaded == ["tiny", "tiny", "tiny"]
    assert trained[0] == [(plain(e), gold_rationale(e)) for e in examples]  # D_0: gold rationales
    d_1 = [(plain(e), f"The answer is {e.answer}") for e in examples
           for _ in range(4 if e.question in easy else 2)]
    assert sorted(trained[1]) == sorted(d_1)  # D_1: plain prompts only
    assert [m["hard"] for m in metrics] == [6, 6] and metrics[0]["hard_resolved"] == 1.0


def test_state_reset_cuts_gsm8k_by_lines_and_other_sets_by_token_share_as_the_official_code():
    for task, unit in [("gsm8k", "lines"), ("data/inference/cot/gsm8k.json", "lines"),
                       ("arith:n_train=4", "lines"), ("math", "tokens"),
                       ("data/inference/cot/aqua_rat.json", "tokens")]:
        assert gsi.reset_unit(gsi.Args(task=task)) == unit
    assert gsi.reset_unit(gsi.Args(task="math", reset_by="lines")) == "lines"  # the flag wins


# The official verdicts (checked against src/eval_utils.py of Yiwen-Ding/Guided-Self-Improvement);
# "differs" marks the cases that common.extract_answer + common.is_equiv grades the other way.
OFFICIAL_VERDICTS = [
    ("The answer is 18 dollars.", "number", "18", True),  # differs: a unit word
    ("Therefore, the answer is 18.", "number", "18", True),
    ("The answer is $18", "number", "18", True),
    ("The answer is 1,000.", "number", "1000", True),
    ("The answer is 18.0", "number", "18", True),
    ("The answer is 18", "number", "18.0", False),  # differs: the gold is not cleaned
    ("The answer is 18\n\nThe answer is 20", "number", "20", False),  # differs: first block
    ("The answer is 18\nThe answer is 20", "number", "20", True),
    ("2+3=5\n5*4=20", "number", "20", True),  # differs: no trigger, the last number
    ("The answer is 1/2", "number", "0.5", True),
    ("The answer is 1/2", "number", "1/2", False),  # differs: 1/2 is cleaned to 0.5
    ("The answer is 12, not 7", "number", "12", True),  # differs: the first number
    ("THE ANSWER IS 7", "number", "7", True),
    ("The answer is: -3.", "number", "-3", True),
    ("The answer is 5 cm", "math", "5", True),  # differs: a unit word
    ("so \\boxed{\\frac12}.", "math", "\\frac{1}{2}", True),
    ("The answer is \\boxed{3/4}", "math", "0.75", False),  # differs: strings, not values
    ("The answer is 50\\%", "math", "50", True),
    ("The answer is (B).", "choice", "B", True),  # differs: the letter is picked out
]


@pytest.mark.parametrize("text, kind, gold, verdict", OFFICIAL_VERDICTS)
def test_samples_are_graded_by_the_official_rule(text, kind, gold, verdict):
    assert gsi.is_correct(text, gold, kind) is verdict


def test_the_official_cleaner_is_chosen_by_the_dataset_name():
    for task, kind in [("gsm8k", "number"), ("arith:n_train=4", "number"), ("math", "math"),
                       ("data/test/svamp.json", "number"), ("data/test/math.json", "math"),
                       ("data/test/aqua_rat.json", "choice"), ("data/test/mathqa.json", "choice")]:
        assert gsi.answer_kind(task) == kind
    assert gsi.official_answer("The answer is 2.50 and 3", "number") == "2.5"
    assert gsi.official_answer("no number here", "number") == ""
    assert gsi.official_number("07/2") == "07/2" and gsi.official_number("1e20") == "100.0"


def test_sampling_keeps_what_the_official_grader_accepts():
    def sample_fn(prompts, n):  # a unit word after the answer: officially correct
        return [completion(f"The answer is {answer_of(p)} dollars.") for p in prompts
                for _ in range(n)]
    args = args_for("none", n_samples=2, min_correct=1)
    pools, _ = gsi.collect_samples(EXAMPLES, args, sample_fn, plain, gold_rationale)
    assert [gsi.n_correct(p) for p in pools] == [2, 2, 2]
