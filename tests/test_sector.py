"""sector.py: the fast and slow formats, simplify-then-guess voting, the commutativity filter, the
firewall between self-made labels and the true sum, and a toy run end to end."""
import json
import os
import random

import pytest

import sector
from common import load_model


def parse(prompt):
    """(a, b, c) from a prompt: operands written last digit first, then the carry-in."""
    a, b, c = prompt[:-1].split("+")
    return int(a[::-1]), int(b[::-1]), int(c)


def oracle():
    """A perfect solver built from the ground-truth targets (tests only)."""
    def solve(prompts):
        answers = []
        for p in prompts:
            target = sector.fast_target if p.endswith(sector.FAST) else sector.slow_target
            answers.append(target(*parse(p)))
        return answers
    return solve


def scripted(answers):
    """A solver that answers from a table and records every prompt it was asked."""
    def solve(prompts):
        solve.asked += prompts
        return [answers[p] for p in prompts]
    solve.asked = []
    return solve


def test_numbers_are_written_last_digit_first_and_the_carry_in_always():
    assert sector.supervised_pairs((57, 68, 0))[0] == ("75+86+0=", "521")  # 57 + 68 = 125
    assert sector.supervised_pairs((57, 68, 1))[0] == ("75+86+1=", "621")  # 57 + 68 + 1 = 126
    assert sector.fast_target(999, 999, 1) == "9991"  # 1999
    assert sector.problem_text(120, 305, 0) == "021+503+0"  # a zero digit is never dropped
    assert parse(sector.problem_text(120, 305, 1) + sector.FAST) == (120, 305, 1)


def test_supervised_prompts_zero_pad_both_operands_and_the_fast_answer():
    padded = [("7500+8600+1=", "6210"), ("7500+8600+1>", "1;6")]
    assert sector.supervised_pairs((57, 68, 1), width=4) == padded
    unpadded = [("75+86+0=", "521"), ("75+86+0>", "1;5")]
    assert sector.supervised_pairs((57, 68, 0), width=1) == unpadded  # width 1 cuts no digit
    # 199: no digit beyond the width
    assert sector.supervised_pairs((99, 99, 1), width=3)[0] == ("990+990+1=", "991")
    # the carry-out past the width stays
    assert sector.supervised_pairs((99, 99, 1), width=2)[0] == ("99+99+1=", "991")


def test_slow_form_emits_the_carry_and_the_last_digit():
    assert sector.supervised_pairs((52, 41, 0))[1] == ("25+14+0>", "0;3")  # no carry
    assert sector.slow_target(57, 68, 0) == "1;5"  # 7+8 = 15
    assert sector.slow_target(59, 30, 1) == "1;0"  # the carry-in makes the carry: 9+0+1 = 10
    assert sector.slow_target(58, 30, 1) == "0;9"  # 8+0+1 = 9: no carry
    assert sector.slow_target(7, 5, 1) == "1;3"  # 1-digit problems too
    assert sector.slow_target(4, 3, 0) == "0;7"


def test_a_slow_step_leaves_the_shorter_problem():
    assert sector.shorten("321+654+0", "0") == "21+54+0"  # 123+456: 3+6 = 9, 12+45 is left
    assert sector.shorten("321+654+0", "1") == "21+54+1"  # the step's carry, whatever it is
    assert sector.shorten("321+654+1", "0") == "21+54+0"  # the old carry-in is consumed by the step
    assert sector.shorten("21+54+0", "0") == "1+4+0"
    assert sector.shorten("7+5+1", "1") is None  # nothing is left of 1-digit operands


def test_every_candidate_of_a_perfect_solver_is_the_sum():
    rng = random.Random(0)
    problems = [sector.sample_problem(rng, n) for n in (1, 2, 3, 5, 7) for _ in range(20)]
    texts = [sector.problem_text(*p) for p in problems]
    candidates, first_slow = sector.simplify_then_guess(oracle(), texts, 5)
    for p, cands, slow in zip(problems, candidates, first_slow):
        n = len(str(p[0]))
        assert cands == [sector.fast_target(*p)] * min(5, n + 1)
        assert slow == sector.slow_target(*p)


def test_candidate_k_takes_k_slow_steps_then_guesses():
    solve = scripted({"21+93+0=": "99", "21+93+0>": "1;1", "1+3+1=": "5", "1+3+1>": "0;6"})  # 12+39
    (candidates,), (first,) = sector.simplify_then_guess(solve, ["21+93+0"], 5)
    # k=0 fast, k=1 slow+guess (51), k=2 the complete slow chain (61)
    assert candidates == ["99", "15", "16"]
    assert first == "1;1"
    assert solve.asked == ["21+93+0=", "21+93+0>", "1+3+1=", "1+3+1>"]


def test_vote_takes_the_strict_majority():
    assert sector.majority(["9", "7", "7", "3", "7"]) == "7"  # not the first nor the last answer
    assert sector.majority([None, "5", "5", None, "5"]) == "5"
    assert sector.majority(["5", "5", "6", "7", None]) is None  # 2 of 5 is no majority
    assert sector.majority(["5", "5", None, None]) is None
    assert sector.majority([]) is None


def test_malformed_slow_step_ends_the_chain_and_its_unmade_candidates_vote_invalid():
    solve = scripted({"21+93+0=": "15", "21+93+0>": "1:1"})
    (candidates,), (first,) = sector.simplify_then_guess(solve, ["21+93+0"], 5)
    assert candidates == ["15", None, None] and first is None  # 2 digits: 3 candidates when whole
    assert sector.majority(candidates) is None  # 1 of 3, not 1 of the 1 survivor


def test_a_broken_slow_mode_keeps_no_label_from_a_consistent_fast_guess():
    answers = {f"{text}{mode}": output for text in ("5432+1876+0", "1876+5432+0")
               for mode, output in ((sector.FAST, "99999"), (sector.SLOW, "?"))}
    pairs, labels, _ = sector.label_problems(scripted(answers), [(2345, 6781, 0)], 5)
    assert labels == [None] and pairs == []  # 1 valid vote of K = 5 in each order


def chain_answers(text, fast, slow, guess):
    """Scripted outputs of a 2-digit problem: the fast answer, the first slow step, the guess of the
    1-digit rest, and the rest's slow step (which agrees with the guess)."""
    rest = sector.shorten(text, slow.split(";")[0])
    rest_slow = f"{len(guess) - 1};{guess[0]}"
    return {f"{text}=": fast, f"{text}>": slow, f"{rest}=": guess, f"{rest}>": rest_slow}


def test_commutativity_filter_drops_disagreeing_orders():
    forward = chain_answers("21+93+0", "15", "1;1", "5")
    answers = forward | chain_answers("93+21+0", "16", "1;1", "6")
    pairs, labels, _ = sector.label_problems(scripted(answers), [(12, 39, 0)], 3)
    assert labels == [None] and pairs == []  # 51 one way, 61 the other


def test_agreeing_orders_give_fast_pairs_in_both_orders_and_their_slow_steps():
    forward = chain_answers("21+93+0", "15", "1;1", "5")
    answers = forward | chain_answers("93+21+0", "15", "1;1", "5")
    pairs, labels, _ = sector.label_problems(scripted(answers), [(12, 39, 0)], 3)
    assert labels == ["15"]
    fast_pairs = [("21+93+0=", "15"), ("93+21+0=", "15")]
    assert pairs == fast_pairs + [("21+93+0>", "1;1"), ("93+21+0>", "1;1")]


def test_slow_pairs_need_the_answer_after_the_first_step_to_match_in_both_orders():
    # b+a votes 51 (fast, and the full slow chain) but its k=1 candidate says 41: its first step
    # is suspect
    answers = chain_answers("21+93+0", "15", "1;1", "5") | {
        "93+21+0=": "15", "93+21+0>": "1;1", "3+1+1=": "4", "3+1+1>": "0;5"}
    pairs, labels, _ = sector.label_problems(scripted(answers), [(12, 39, 0)], 3)
    assert labels == ["15"] and pairs == [("21+93+0=", "15"), ("93+21+0=", "15")]


class Untouchable(int):
    """An operand that may be written out but never used in arithmetic."""
    def _refuse(self, *_):
        raise AssertionError("the labelling path did arithmetic on an operand")
    __add__ = __radd__ = __sub__ = __rsub__ = _refuse
    __mod__ = __floordiv__ = __mul__ = __divmod__ = _refuse


def test_firewall_labels_come_from_the_solver_never_the_sum(monkeypatch):
    def forbidden(*_):
        raise AssertionError("the labelling path reached the true sum")
    for name in ("true_sum", "fast_target", "slow_target", "supervised_pairs"):
        monkeypatch.setattr(sector, name, forbidden)
    # A consistent but wrong solver: 12+39 is 51, but the labels must say what the solver says.
    forward = chain_answers("21+93+0", "25", "1;2", "5")
    answers = forward | chain_answers("93+21+0", "25", "1;2", "5")
    untouchable = [(Untouchable(12), Untouchable(39), 0)]
    pairs, labels, _ = sector.label_problems(scripted(answers), untouchable, 3)
    assert labels == ["25"] and ("21+93+0=", "25") in pairs
    # The same path with a real (untrained) model as the solver also never reaches the sum.
    model, tokenizer = load_model("tiny", seed=0)
    problems = [(Untouchable(123), Untouchable(456), 1), (Untouchable(905), Untouchable(317), 0)]
    sector.label_problems(sector.model_solver(model, tokenizer, 8), problems, 5)


def test_toy_run_supervised_phase_and_one_self_training_step(tmp_path):
    out_dir = str(tmp_path / "run")
    argv = ["--preset", "toy", "--n0", "1", "--max_digits", "2", "--max_rounds", "2",
            "--sup_problems", "64", "--n_problems", "32", "--replay", "32", "--n_eval", "16",
            "--out_dir", out_dir]
    sector.main(argv)
    rows = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
    assert rows[0]["step"] == "supervised 1.1" and {"fast_acc", "slow_acc", "loss"} <= set(rows[0])
    steps = [row["step"] for row in rows]
    # the precondition, logged
    assert "supervised" in steps and "slow_acc_next" in rows[steps.index("supervised")]
    assert {"kept", "label_error", "fast_agreement"} <= set(rows[steps.index("self-train 2.1")])
    last = rows[-1]
    assert last["step"] == "self-train 2" and steps.count("self-train 2") == 1
    assert all(0.0 <= last[f"acc_{n}"] <= 1.0 for n in (1, 2, 3))
    assert load_model(out_dir)[0].config.model_type == "llama"
    again = str(tmp_path / "again")
    sector.main(argv[:-1] + [again])  # same seed on CPU, same numbers

    def timeless(rows):
        return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]
    rerun = [json.loads(line) for line in open(os.path.join(again, "metrics.jsonl"))]
    assert timeless(rerun) == timeless(rows)


def test_bad_lengths_stop_with_one_sentence(tmp_path):
    with pytest.raises(SystemExit, match="n0"):
        sector.main(["--n0", "5", "--max_digits", "3", "--out_dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="unknown model"):
        sector.main(["--model", "no-such-model", "--out_dir", str(tmp_path)])
