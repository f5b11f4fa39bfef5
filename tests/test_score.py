"""score.py: shaped rewards, where each KL acts and its gradient, masks, Delta metrics, code
rewards, smoke runs."""
import json
import math
import os

import pytest
import torch

import score
from common import load_model, save, token_logprobs


def make_args(**overrides):
    return score.Args(**(dict(samples_per_prompt=2) | overrides))


def attempt(shift, prompt_junk=5.0):
    """(policy, reference, mask) for two rows of 3 tokens; token 0 is prompt (masked), rows differ
    by `shift`."""
    mask = torch.tensor([[0.0, 1.0, 1.0], [0.0, 1.0, 1.0]])
    ref = torch.full((2, 3), -1.0)
    offsets = torch.tensor([[prompt_junk, shift[0], shift[0]], [-prompt_junk, shift[1], shift[1]]])
    policy = (ref + offsets).requires_grad_()
    return policy, ref, mask


def grads(stage, r1, r2, shift1=(0.0, 0.0), shift2=(0.0, 0.0), **overrides):
    """d loss / d policy token log-prob of both attempts, for one group of two trajectories."""
    a1 = attempt(shift1)
    a2 = attempt(shift2)
    args = make_args(**overrides)
    losses, _ = score.score_loss(a1, a2, torch.tensor(r1), torch.tensor(r2), stage, args)
    losses.sum().backward()
    return a1[0].grad, a2[0].grad


def test_shaped_rewards_for_the_four_transitions():
    r1 = torch.tensor([0.0, 1.0, 1.0, 0.0])  # i->c, c->c, c->i, i->i
    r2 = torch.tensor([1.0, 1.0, 0.0, 0.0])
    assert score.shaped_reward(r1, r2, 10.0).tolist() == [11.0, 1.0, -10.0, 0.0]
    # the 'without shaping' ablation
    assert score.shaped_reward(r1, r2, 0.0).tolist() == r2.tolist()


def test_stage2_advantages_of_attempt_two_with_a_leave_one_out_baseline():
    policy = torch.zeros(4, 2, requires_grad=True)
    mask = torch.tensor([[0.0, 1.0]] * 4)
    r1 = torch.tensor([0.0, 1.0, 1.0, 0.0])
    r2 = torch.tensor([1.0, 1.0, 0.0, 0.0])
    attempt2 = (policy, torch.zeros(4, 2), mask)
    losses, _ = score.score_loss(None, attempt2, r1, r2, 2, make_args(samples_per_prompt=4))
    losses.sum().backward()
    # shaped [11, 1, -10, 0]; b_j = mean of the other three: [-3, 1/3, 4, 2/3]; the gradient is
    # -(R - b)
    torch.testing.assert_close(policy.grad[:, 1], -torch.tensor([14.0, 2 / 3, -14.0, -2 / 3]))
    assert policy.grad[:, 0].abs().sum() == 0  # the prompt position gets nothing


def test_stage1_pays_only_attempt_two_and_stage2_pays_both():
    g1, g2 = grads(1, r1=[1.0, 0.0], r2=[0.0, 1.0])
    # Stage I: attempt 1's reward is not optimised (and it sits at the reference)
    assert g1.abs().sum() == 0
    # leave-one-out in a group of two: A = R - R_other = -1 and +1; the gradient of -A log pi is
    # -A per token; the right attempt 2 goes up
    assert g2[1, 1:].tolist() == [-1.0, -1.0] and g2[0, 1:].tolist() == [1.0, 1.0]
    g1, _ = grads(2, r1=[1.0, 0.0], r2=[0.0, 1.0], alpha=0.0)
    # Stage II: attempt 1 is paid too
    assert g1[0, 1:].tolist() == [-1.0, -1.0] and g1[1, 1:].tolist() == [1.0, 1.0]


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_kl_acts_on_the_right_attempt_in_each_stage_and_pulls_towards_the_reference(estimator):
    zeros = [0.0, 0.0]
    # row 0 of the attempt is 0.5 nats per token more likely than the reference, row 1 sits on it
    for stage, beta_t1, beta_t2 in ((1, 0.1, 0.01), (2, 0.01, 0.01)):
        g1, g2 = grads(stage, zeros, zeros, shift1=(0.5, 0.0), kl_estimator=estimator)
        assert g2.abs().sum() == 0  # attempt 2 sits on the reference: no KL gradient there
        assert (g1[0, 1:] > 0).all()  # descent lowers the drifted attempt towards the reference
        assert g1[:, 0].abs().sum() == 0  # prompt positions are out of the KL
        # k1 in the reward: A = -beta (1 - 0) with the group baseline; k3 in the loss:
        # beta (1 - e^-0.5) per token
        expected = beta_t1 * (1.0 if estimator == "k1" else 1 - math.exp(-0.5))
        assert g1[0, 1].item() == pytest.approx(expected)
        _, g2 = grads(stage, zeros, zeros, shift2=(0.5, 0.0), kl_estimator=estimator)
        per_token = 1.0 if estimator == "k1" else 1 - math.exp(-0.5)
        assert g2[0, 1].item() == pytest.approx(beta_t2 * per_token)


def test_kl_is_pi_against_the_reference_summed_over_the_attempt_tokens():
    zeros = torch.zeros(2)
    _, stats = score.score_loss(attempt((0.5, -0.25)), None, zeros, zeros, 0, make_args())
    # summed over tokens and rows, not over the vocabulary
    assert stats["kl1"] == pytest.approx(2 * 0.5 + 2 * -0.25)

    def k3(d):
        return 2 * (math.exp(-d) - 1 + d)
    assert stats["kl1_k3"] == pytest.approx(k3(0.5) + k3(-0.25))


def test_single_turn_ablation_trains_attempt_one_only():
    a1 = attempt((0.0, 0.0))
    r1 = torch.tensor([1.0, 0.0])
    losses, stats = score.score_loss(a1, None, r1, torch.tensor([]), 0, make_args())
    losses.sum().backward()
    assert a1[0].grad[0, 1] < 0 < a1[0].grad[1, 1] and "kl2" not in stats


def test_delta_metrics_against_a_hand_made_table():
    correct1 = [1, 1, 1, 0, 0, 0, 1, 0, 0, 0]
    # c->c 3 times, c->i once (row 1), i->c twice (rows 3, 5)
    correct2 = [1, 0, 1, 1, 0, 1, 1, 0, 0, 0]
    metrics = score.delta_metrics(correct1, correct2)
    expected = dict(acc_t1=0.4, acc_t2=0.5, delta=0.1, delta_i2c=0.2, delta_c2i=0.1)
    assert metrics == pytest.approx(expected)


def test_masks_cover_the_sampled_attempt_only_never_the_prompt_or_the_instruction():
    model, tokenizer = load_model("tiny", seed=0)
    args = make_args(**(score.TOY | dict(max_new_tokens=8, samples_per_prompt=2)))
    problems = score.load_problems("arith", "test", args)[:2]
    torch.manual_seed(0)
    roll = score.rollout(model, tokenizer, problems, args)
    second = tokenizer.decode(roll["prompts2"][0])
    assert second.startswith("<s>" + problems[0].user)
    # --restate: the question again
    assert second.endswith("\n\n" + args.instruction + "\n" + problems[0].user)

    def reference_logprobs(ids, mask):
        return token_logprobs(model, ids, mask)
    pad_id = tokenizer.pad_token_id
    for i in (1, 2):
        prompts = roll[f"prompts{i}"]
        responses = roll[f"responses{i}"]
        policy, ref, mask = score.attempt_logprobs(model, reference_logprobs, prompts, responses,
                                                   pad_id, args)
        ids, _, _ = score.batch_sequences(prompts, responses, pad_id, "cpu")
        for row, response in enumerate(responses):
            # exactly the sampled tokens
            assert ids[row, 1:][mask[row].bool()].tolist() == response
        torch.testing.assert_close(policy, ref)  # the reference is the same model here


def test_stage1_update_makes_rewarded_second_attempts_more_likely(monkeypatch):
    """End to end through rollout, rewards, baseline, loss and optimiser: a sign error makes them
    less likely."""
    model, tokenizer = load_model("tiny", seed=0)
    args = make_args(**(score.TOY | dict(max_new_tokens=12, samples_per_prompt=4, lr=1e-3)))

    def odd_length(problem, text, args):  # an arbitrary split
        return float(len(text) % 2)
    monkeypatch.setattr(score, "reward", odd_length)
    reference = load_model("tiny", seed=0)[0]

    def reference_logprobs(ids, mask):
        return token_logprobs(reference, ids, mask)
    torch.manual_seed(0)
    roll = score.rollout(model, tokenizer, score.load_problems("arith", "train", args)[:8], args)
    rewarded = roll["r2"] == 1
    assert 0 < rewarded.sum() < len(rewarded)

    def attempt2_logprobs():
        with torch.no_grad():
            policy, _, mask = score.attempt_logprobs(model, reference_logprobs, roll["prompts2"],
                                                     roll["responses2"], tokenizer.pad_token_id,
                                                     args)
            return (policy * mask).sum(1)

    before = attempt2_logprobs()
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    for _ in range(3):
        stats = score.update(model, reference_logprobs, optimizer, roll, 1, args)
    change = attempt2_logprobs() - before
    assert change[rewarded].mean() > 0 > change[~rewarded].mean()
    assert stats["kl1"] != 0  # attempt 1 has moved and the KL sees it


MBPP = [dict(task_id=i, text=f"Write a function to add {i}.",
             code=f"def add_{i}(x):\n    return x + {i}",
             test_list=[f"assert add_{i}(1) == {1 + i}", f"assert add_{i}(0) == {i}"])
        for i in range(1, 5)]
HUMANEVAL = [dict(task_id="HumanEval/0", prompt='def double(x):\n    """Twice x."""\n',
                  canonical_solution="    return 2 * x\n",
                  test="def check(f):\n    assert f(2) == 4\n    assert f(0) == 0\n",
                  entry_point="double")]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_code_tasks_build_the_papers_prompts_and_reward_passing_programs_only(tmp_path):
    args = make_args()
    mbpp = score.load_problems(write_jsonl(tmp_path / "mbpp.jsonl", MBPP), "train", args)
    assert (len(mbpp) == 1 and mbpp[0].user.count("[BEGIN]") == 4
            and mbpp[0].user.count("[DONE]") == 3)  # 3 shots
    assert mbpp[0].user.startswith("You are an expert Python programmer, and here is your task: "
                                   "Write a function to add 1.")
    problem = mbpp[0]
    assert score.reward(problem, MBPP[3]["code"], args) == 1.0
    assert score.reward(problem, "def add_4(x):\n    return x + 3", args) == 0.0
    assert score.reward(problem, "```python\ndef add_4(x):\n    return 4 + x\n```", args) == 1.0
    endless = "def add_4(x):\n    while True:\n        pass"
    assert score.reward(problem, endless, make_args(program_timeout=1.0)) == 0.0
    second = score.second_prompt(None, problem, "def add_4(x): pass", args)
    expected = problem.user + "def add_4(x): pass\n\n" + score.CODE_INSTRUCTION + "\n[BEGIN]\n"
    assert second == expected
    humaneval_file = write_jsonl(tmp_path / "he.jsonl", HUMANEVAL)
    (humaneval,) = score.load_problems(humaneval_file, "test", make_args(test_task=humaneval_file))
    assert humaneval.stop == score.HUMANEVAL_STOP and humaneval.user == HUMANEVAL[0]["prompt"]
    # a continuation of the header
    assert score.reward(humaneval, "    return 2 * x\n", args) == 1.0
    assert score.reward(humaneval, "def double(x):\n    return x + x\n", args) == 1.0  # a rewrite
    assert score.reward(humaneval, "    return x\n", args) == 0.0
    bad = write_jsonl(tmp_path / "bad.jsonl", [dict(text="t", test_list=[])] * 4)
    with pytest.raises(SystemExit, match="lacks"):
        score.load_problems(bad, "train", args)


def test_math_prompts_default_to_the_papers_texts():
    args = make_args(task="arith")
    (problem,) = score.load_problems("arith", "test", args)[:1]
    assert problem.user.startswith(score.MATH_PROMPT) and problem.reopen == ""
    from common import byte_tokenizer
    tokenizer = byte_tokenizer()
    second = score.second_prompt(tokenizer, problem, "y1", args)
    assert second == problem.user + "y1\n\n" + score.MATH_INSTRUCTION + "\n"
    tokenizer.chat_template = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
                               "{% if add_generation_prompt %}<assistant>{% endif %}")
    second = score.second_prompt(tokenizer, problem, "y1", args)
    assert second == f"<user>{problem.user}<assistant>y1<user>{score.MATH_INSTRUCTION}<assistant>"


def test_bad_flags_stop_with_one_sentence():
    with pytest.raises(SystemExit, match="baseline"):
        score.main(["--preset", "toy", "--baseline", "mean"])
    with pytest.raises(SystemExit, match="multiple"):
        score.main(["--preset", "toy", "--batch_size", "10", "--samples_per_prompt", "4"])


def test_toy_smoke_run_of_both_stages_and_the_ablations(tmp_path):
    model, tokenizer = load_model("tiny", seed=0)
    save(model, tokenizer, str(tmp_path / "start"))
    out_dir = str(tmp_path / "score")
    common = ["--preset", "toy", "--model", str(tmp_path / "start"),
              "--task", "arith:n_train=16,n_test=4", "--batch_size", "8", "--max_new_tokens", "12",
              "--format_warmup_questions", "8"]
    score.main(common + ["--out_dir", out_dir, "--format_warmup_epochs", "1",
                         "--stage1_steps", "2", "--stage2_steps", "1"])
    metrics = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
    evals = {m["step"]: m for m in metrics if m["step"].startswith("eval")}
    assert list(evals) == ["eval start", "eval base", "eval stage1", "eval stage2"]
    for m in evals.values():
        assert m["delta"] == pytest.approx(m["acc_t2"] - m["acc_t1"]) == pytest.approx(
            m["delta_i2c"] - m["delta_c2i"])
    steps = [m for m in metrics if m["step"].startswith("stage")]
    assert [m["step"] for m in steps] == ["stage1 1", "stage1 2", "stage2 1"]
    for key in ("reward1", "reward2", "i2c", "c2i", "kl1", "kl2", "kl1_k3", "loss", "return2"):
        assert all(math.isfinite(m[key]) for m in steps)
    # the first rollout samples from the reference model itself
    assert steps[0]["kl1"] == pytest.approx(0.0, abs=1e-4)
    for name in ("base", "stage1", "stage2"):
        assert load_model(os.path.join(out_dir, name))[0].config.model_type == "llama"
    single = str(tmp_path / "single")
    score.main(common + ["--out_dir", single, "--format_warmup_epochs", "0", "--single_turn",
                         "--stage1_steps", "1", "--stage2_steps", "0", "--kl_estimator", "k3"])
    steps = [json.loads(line)["step"] for line in open(os.path.join(single, "metrics.jsonl"))]
    assert steps == ["eval start", "single_turn 1", "eval single_turn"]
    # the code path, sandboxed (a 3-shot MBPP prompt is beyond tiny's 512 positions)
    code = str(tmp_path / "code")
    humaneval_file = write_jsonl(tmp_path / "he.jsonl", HUMANEVAL * 2)
    score.main(common[:4] + ["--task", humaneval_file, "--test_task", humaneval_file,
                             "--out_dir", code, "--batch_size", "4",
                             "--max_new_tokens", "8", "--format_warmup_epochs", "0",
                             "--stage1_steps", "1", "--stage2_steps", "1",
                             "--program_timeout", "2"])
    evals = [json.loads(line) for line in open(os.path.join(code, "metrics.jsonl"))]
    eval_steps = [m["step"] for m in evals if m["step"].startswith("eval")]
    assert eval_steps == ["eval start", "eval stage1", "eval stage2"]


def test_edit_distance_by_hand():
    assert score.edit_distance("kitten", "sitting") == 3  # k->s, e->i, +g
    assert score.edit_distance("", "abc") == 3 and score.edit_distance("abc", "abc") == 0
