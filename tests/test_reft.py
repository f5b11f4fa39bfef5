"""reft_ppo.py: rewards, KL placement, GAE, whitening, clipped losses, the sandbox, a smoke run."""
import copy
import json
import math
import os
import time

import pytest
import torch

import reft_ppo
from common import batch_sequences, load_model, load_task, run_sandboxed, save, token_logprobs


def test_gae_matches_a_hand_computed_example():
    rewards = torch.tensor([[0.0, 0.0, -0.1, 1.0, 0.0]])
    # position 4 is padding: V = 0 after the last action
    values = torch.tensor([[5.0, 0.2, 0.4, 0.6, 100.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0, 0.0]])
    advantages, returns = reft_ppo.gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # A3 = 1 - 0.6; A2 = (-0.1 + 0.6 - 0.4) + 0.5 A3; A1 = (0 + 0.4 - 0.2) + 0.5 A2
    torch.testing.assert_close(advantages, torch.tensor([[0.0, 0.35, 0.3, 0.4, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([[0.0, 0.55, 0.7, 1.0, 0.0]]))


def test_gamma_discounts_the_next_value():
    rewards = torch.tensor([[0.0, 1.0]])
    values = torch.tensor([[0.5, 0.25]])
    advantages, _ = reft_ppo.gae(rewards, values, torch.ones(1, 2), gamma=0.5, lam=1.0)
    expected = torch.tensor([[0.0 + 0.5 * 0.25 - 0.5 + 0.5 * 0.75, 0.75]])
    torch.testing.assert_close(advantages, expected)


def test_terminal_reward_sits_on_the_eos_token_even_when_pad_is_eos(tokenizer):
    eos = tokenizer.eos_token_id
    prompts = [[256, 49, 10], [256, 50, 51, 52, 10]]
    responses = [[49, 50, eos], [53, eos]]
    _, _, mask = batch_sequences(prompts, responses, pad_id=eos, device="cpu")
    zeros = torch.zeros_like(mask)
    scores = torch.tensor([1.0, 0.1])
    rewards, kl = reft_ppo.kl_shaped_rewards(scores, zeros, zeros, mask, kl_coef=0.05)
    # row 0: response targets are input positions 3, 4, 5, i.e. log-prob indices 2, 3, 4;
    # EOS is index 4
    assert rewards[0].tolist() == [0, 0, 0, 0, 1.0, 0]
    assert rewards[1].tolist() == pytest.approx([0, 0, 0, 0, 0, 0.1])  # EOS is the last input token
    assert mask.sum(1).tolist() == [3, 2]


def test_kl_penalty_sign_and_placement():
    mask = torch.tensor([[0.0, 1.0, 1.0]])
    old = torch.tensor([[-3.0, -1.0, -1.0]])
    ref = torch.tensor([[-9.0, -2.0, -0.5]])  # the prompt position must not be penalised
    rewards, kl = reft_ppo.kl_shaped_rewards(torch.tensor([0.0]), old, ref, mask, kl_coef=0.1)
    torch.testing.assert_close(kl, torch.tensor([[0.0, 1.0, -0.5]]))
    # more likely than the reference: penalised
    torch.testing.assert_close(rewards, torch.tensor([[0.0, -0.1, 0.05]]))


REFT_GRADER = [  # (template, completion, gold, reward by the official train_rl_reft.py)
    ("reft", "3*4=12\nTherefore, the answer is: 12", "12", 1.0),
    ("reft", "12+3=15\nTherefore, the answer is: 15.", "15", 1.0),  # float("15.") parses
    ("reft", "x\nTherefore, the answer is: -2.5", "-2.5", 1.0),
    ("reft", "x\nTherefore, the answer is: 15.005", "15", 1.0),  # |pred - gold| <= 1e-2
    ("reft", "x\nTherefore, the answer is: 16", "15", 0.1),  # a wrong number: partial reward
    ("reft", "x\nTherefore, the answer is: 1000", "1,000", 1.0),  # commas leave the gold only
    ("reft", "x\nTherefore, the answer is: 1,000", "1000", 0.0),
    ("reft", "x\nTherefore, the answer is 18.", "18", 0.0),  # not the trigger (no colon)
    ("reft", "x\nTherefore, the answer is: 18 dollars", "18", 0.0),
    ("reft", "x\nTherefore, the answer is: $18", "18", 0.0),
    ("reft", "x\nTherefore, the answer is: 18\nTherefore, the answer is 20", "18", 0.0),
    ("reft", "x\nTherefore, the answer is: 7\nTherefore, the answer is: 8", "8", 1.0),  # the last
    ("reft", "Therefore, the answer is: 18", "18", 0.0),  # the trigger starts with a newline
    ("reft", "no answer", "18", 0.0),
    ("self_explore", "1+1=2\nThe answer is 2", "2", 1.0),  # the toy template's own trigger
    ("self_explore", "1+1=2\nThe answer is 3", "2", 0.1),
    ("self_explore", "1+1=2\nThe answer is x+1", "2", 0.0),
]


@pytest.mark.parametrize("template, completion, gold, reward", REFT_GRADER)
def test_rewards_follow_the_official_grader(template, completion, gold, reward):
    answer = reft_ppo.numeric_answer(completion, reft_ppo.answer_trigger(template))
    assert reft_ppo.terminal_reward(answer, gold, 0.1) == reward


def test_a_non_numeric_gold_answer_stops_before_the_model_loads(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"question": "q", "rationale": "r", "answer": "x+1"}) + "\n")
    with pytest.raises(SystemExit, match="not a number"):
        reft_ppo.main(["--task", str(path), "--test_task", str(path), "--model", "tiny",
                       "--out_dir", str(tmp_path / "run")])


def test_whitening_over_response_tokens_only():
    advantages = torch.tensor([[9.0, 1.0, 2.0], [9.0, 3.0, 9.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0], [0.0, 1.0, 0.0]])
    white = reft_ppo.whiten(advantages, mask)
    kept = white[mask.bool()]
    assert kept.mean().abs() < 1e-6 and kept.std().item() == pytest.approx(1.0, abs=1e-4)
    assert white[~mask.bool()].abs().sum() == 0


def test_clipped_losses_match_hand_computed_values():
    batch = dict(mask=torch.ones(1, 2), advantages=torch.tensor([[1.0, -1.0]]),
                 returns=torch.tensor([[1.0, 0.0]]), old_logprobs=torch.zeros(1, 2),
                 old_values=torch.zeros(1, 2))
    logprobs = torch.log(torch.tensor([[1.5, 0.5]]))  # ratios 1.5 and 0.5
    values = torch.tensor([[0.5, -0.1]])
    policy_loss, value_loss, clip_fraction = reft_ppo.ppo_losses(logprobs, values, batch, 0.2, 0.2)
    # policy: max(-1.5, -1.2) = -1.2 and max(0.5, 0.8) = 0.8; value: max(0.25, 0.64)/2 and 0.01/2
    torch.testing.assert_close(policy_loss, torch.tensor([(-1.2 + 0.8) / 2]))
    torch.testing.assert_close(value_loss, torch.tensor([(0.32 + 0.005) / 2]))
    assert clip_fraction.item() == 1.0


def test_policy_gradient_raises_the_probability_of_positive_advantage_tokens():
    logprobs = torch.tensor([[-1.0, -1.0]], requires_grad=True)
    batch = dict(mask=torch.ones(1, 2), advantages=torch.tensor([[1.0, -1.0]]),
                 returns=torch.zeros(1, 2), old_logprobs=torch.tensor([[-1.0, -1.0]]),
                 old_values=torch.zeros(1, 2))
    policy_loss, _, _ = reft_ppo.ppo_losses(logprobs, torch.zeros(1, 2), batch, 0.2, 0.2)
    policy_loss.sum().backward()
    assert logprobs.grad[0, 0] < 0 < logprobs.grad[0, 1]  # descent raises token 0, lowers token 1


@pytest.mark.parametrize("detach", [False, True])
def test_only_the_shared_trunk_critic_sends_value_gradients_into_the_trunk(detach):
    model, tokenizer = load_model("tiny", seed=0)
    value_head = torch.nn.Linear(model.config.hidden_size, 1)
    input_ids = torch.tensor([tokenizer("1+2=3")["input_ids"]])
    attention_mask = torch.ones_like(input_ids)
    _, values = reft_ppo.policy_forward(model, value_head, input_ids, attention_mask, 1.0, detach)
    values.sum().backward()
    trunk_grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert value_head.weight.grad.abs().sum() > 0
    assert (len(trunk_grads) == 0) == detach


def test_ppo_update_makes_rewarded_responses_more_likely(monkeypatch):
    """End to end through rollout, rewards, GAE, whitening, the losses and the optimiser: a sign
    error anywhere makes the rewarded responses less likely."""
    model, tokenizer = load_model("tiny", seed=0)
    args = reft_ppo.Args(**(reft_ppo.TOY | dict(lr=1e-3, max_total_tokens=16)))

    def parity_answer(args, prompt, text):  # an arbitrary split
        return float(len(text) % 2)

    def answer_is_reward(pred, gold, partial):
        return pred

    monkeypatch.setattr(reft_ppo, "answer_of", parity_answer)
    monkeypatch.setattr(reft_ppo, "terminal_reward", answer_is_reward)
    reference = copy.deepcopy(model)
    value_head = torch.nn.Linear(model.config.hidden_size, 1)
    torch.nn.init.zeros_(value_head.weight)
    torch.nn.init.zeros_(value_head.bias)
    parameters = list(model.parameters()) + list(value_head.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=args.lr)

    def reference_logprobs(ids, mask):
        return token_logprobs(reference, ids, mask)

    questions = load_task("arith", "train")[:32]
    torch.manual_seed(0)
    batch, _, samples = reft_ppo.rollout(model, value_head, reference_logprobs, tokenizer,
                                         questions, args)
    rewarded = torch.tensor([s["reward"] == 1.0 for s in samples])
    assert 0 < rewarded.sum() < len(samples)

    def sequence_logprobs():
        with torch.no_grad():
            logprobs = token_logprobs(model, batch["input_ids"], batch["attention_mask"])
            return (logprobs * batch["mask"]).sum(1)

    before = sequence_logprobs()
    for _ in range(3):
        reft_ppo.ppo_update(model, value_head, optimizer, batch, args)
    change = sequence_logprobs() - before
    assert change[rewarded].mean() > 0 > change[~rewarded].mean()


def test_sandbox_stops_infinite_loops_memory_bombs_and_crashes():
    start = time.time()
    assert run_sandboxed("while True:\n    pass", timeout=1.0) == (False, "")
    assert time.time() - start < 5
    memory_bomb = "blocks = []\nwhile True:\n    blocks.append(bytearray(10 ** 8))"
    assert run_sandboxed(memory_bomb, timeout=10.0, memory_mb=512)[0] is False
    no_environment = run_sandboxed("import os\nprint(os.environ.get('HOME'))")[1]
    assert no_environment.strip() == "None"
    prompt = reft_ppo.make_prompt(reft_ppo.Args(cot="program"), "What is 6 times 7?")
    body = "    a = 6\n    b = 7\n    return a * b\n\nprint('ignored')"
    assert reft_ppo.program_answer(prompt, body, 10.0) == 42.0
    assert reft_ppo.program_answer(prompt, "    return 1 / 0\n", 10.0) is None
    assert reft_ppo.program_answer(prompt, "    while True:\n        pass\n", 1.0) is None
    raised = reft_ppo.program_answer(prompt, "    raise ValueError\n", 10.0)
    assert reft_ppo.terminal_reward(raised, "42", 0.1) == 0.0


def test_toy_smoke_run(tmp_path):
    model, tokenizer = load_model("tiny", seed=0)
    save(model, tokenizer, str(tmp_path / "start"))
    out_dir = str(tmp_path / "reft")
    flags = ["--preset", "toy", "--model", str(tmp_path / "start"), "--out_dir", out_dir,
             "--task", "arith:n_train=16,n_test=4", "--max_total_tokens", "48",
             "--eval_max_total_tokens", "48"]
    reft_ppo.main(flags + ["--epochs", "1", "--rollout_batch_size", "8", "--micro_batch_size", "4"])
    metrics = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
    rollouts = [m for m in metrics if m["step"].startswith("rollout")]
    assert len(rollouts) == 2
    for key in ("reward", "accuracy", "kl_k1", "kl_k3", "clip_fraction", "value_loss", "entropy",
                "response_length", "eos_rate", "tokens_per_s"):
        assert math.isfinite(rollouts[0][key])
    assert rollouts[0]["kl_k1"] == 0.0  # the first rollout samples from the reference itself
    assert [m["step"] for m in metrics if "test_accuracy" in m] == ["ppo 0", "ppo 1"]
    assert load_model(out_dir)[0].config.model_type == "llama"
    reft_ppo.main(flags + ["--mode", "vote", "--vote_k", "3"])
    reft_ppo.main(flags + ["--mode", "rerank", "--vote_k", "3", "--rerank_samples", "2",
                           "--rerank_epochs", "1"])
    steps = [json.loads(line)["step"] for line in open(os.path.join(out_dir, "metrics.jsonl"))]
    assert steps[-2:] == ["vote", "rerank"]


def test_under_lora_the_reference_is_the_warm_up_model(tmp_path):
    """The paper's reference is the warm-up checkpoint. With --lora_rank it is the model with
    adapters off, so the warm-up must sit in the trunk: the first rollout then samples from the
    reference itself, and its KL is exactly 0 (as with full fine-tuning)."""
    out_dir = str(tmp_path / "reft")
    reft_ppo.main(["--preset", "toy", "--model", "tiny", "--task", "arith:n_train=8,n_test=2",
                   "--out_dir", out_dir, "--lora_rank", "4", "--warmup_epochs", "1",
                   "--warmup_schedule_epochs", "1", "--warmup_lr", "1e-2",
                   "--warmup_batch_size", "8",
                   "--epochs", "1", "--rollout_batch_size", "8", "--max_total_tokens", "40",
                   "--eval_max_total_tokens", "40"])
    metrics = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
    assert [m for m in metrics if m["step"] == "sft 1"]  # the warm-up ran
    first = next(m for m in metrics if m["step"].startswith("rollout"))
    assert first["kl_k1"] == 0.0 and first["kl_k3"] == 0.0


def test_greedy_evaluation_and_samples_keep_the_official_total_length_limits(llama):
    model, tokenizer = llama  # random: it rarely emits EOS, so completions run to the limit
    examples = load_task("arith:n_train=4,n_test=4", "test")
    args = reft_ppo.Args(template="self_explore", eval_max_total_tokens=20,
                         vote_max_total_tokens=26)
    for n, temperature, total in ((1, 0.0, 20), (2, 1.0, 26)):  # official: 700 greedy, 1024 sampled
        prompts, completions, _ = reft_ppo.sample_answers(model, tokenizer, examples, args, n,
                                                          temperature)
        longest = max(len(tokenizer(p)["input_ids"]) for p in prompts)
        assert max(len(c.token_ids) for c in completions) == total - longest


def test_rerank_classifier_trains_with_dropout_on_clipped_and_on_cut_inputs(llama, monkeypatch):
    model, tokenizer = llama
    calls, clips = [], []
    forward = reft_ppo.last_token_hidden

    def recorded(classifier, input_ids, attention_mask):
        calls.append((classifier.training, input_ids.shape[1]))
        return forward(classifier, input_ids, attention_mask)

    def clip(parameters, max_norm):
        clips.append(max_norm)
        return torch.tensor(0.0)

    monkeypatch.setattr(reft_ppo, "last_token_hidden", recorded)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    train = load_task("arith:n_train=4,n_test=2", "train")
    test = load_task("arith:n_train=4,n_test=2", "test")
    args = reft_ppo.Args(template="self_explore", rerank_samples=2, vote_k=2, rerank_epochs=1,
                         rerank_batch_size=4, rerank_max_tokens=12, vote_max_total_tokens=40,
                         rerank_lr=1e-4)
    reft_ppo.rerank_accuracy(model, tokenizer, train, test, args)
    training = [length for mode, length in calls if mode]
    # official: clip 1, model.train()
    assert training and len(clips) == len(training) and set(clips) == {1.0}
    modes = [True] * len(training) + [False] * (len(calls) - len(training))
    assert [mode for mode, _ in calls] == modes
    assert max(length for _, length in calls) == 12  # official: max_input_length 700
