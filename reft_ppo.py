"""ReFT: Reasoning with Reinforced Fine-Tuning.

Trung Quoc Luong, Xinbo Zhang, Zhanming Jie, Peng Sun, Xiaoran Jin, Hang Li (ByteDance Research),
ACL 2024, arXiv 2401.08967. Official code: lqtrung1998/mwp_ReFT (train_rl_reft.py).

A short supervised warm-up, then PPO on the same training questions: the policy samples its own
reasoning paths, rewarded by comparing their final answer with the gold one (no reward model).
Natural-language CoT, or program CoT, where the model writes a Python solution() that runs in a
sandboxed subprocess.

Run:
    python reft_ppo.py --model codellama-7b --task gsm8k                  # N-CoT, paper settings
    python reft_ppo.py --preset program --model codellama-7b --task gsm8k_python_sdp.json
    python reft_ppo.py --preset toy                               # from runs/toy-sft on arith, CPU
    python reft_ppo.py --preset toy --mode vote --model runs/toy-reft         # Voting@k
    python reft_ppo.py --preset toy --mode rerank --model runs/toy-reft       # Rerank@k
    torchrun --nproc_per_node 8 reft_ppo.py --model codellama-7b --task gsm8k  # the paper's 8 GPUs

Implements ReFT §3.1 (warm-up, then PPO), in the steps that the `# ALGO` tags number:
  1. warm-up SFT; its checkpoint initialises the policy and is frozen as the reference
  2. a scalar value head on the policy's last hidden state (shared trunk)
  3. sample one path per question (T = 1, no top-k or top-p, prompt + response <= 700 tokens)
  4. the terminal reward R: 1 right, 0.1 a wrong number, 0 no number (official grader)
  5. without grad: log pi_old, log pi_ref and V_old of every response token
  6. the per-token reward r_t = R * 1[t = T] - beta * (log pi_old - log pi_ref), T the last token
  7. GAE (gamma 1, lambda 0.95) with V = 0 after the last token; returns R_t = A_t + V_old(s_t)
  8. whiten the advantages over the rollout batch of every rank (official src/utils.py)
  9. clipped PPO: policy loss + 5 * value loss, ppo_epochs optimiser steps per rollout
  10. greedy test accuracy after every epoch
and the inference extensions of ReFT §4.4, "Majority Voting and Reranking Benefit ReFT" (Table 4):
Voting@k (official sampling.py) and Rerank@k (§4.3's reward model, official train_reward_model.py).

Deviations (README, Deviations from the papers):
- The value head starts at zero (the OpenAI convention); the official code uses the library's
  random init (`--value_head_init default`).
- `--truncation_penalty` (0 = the paper) lowers the reward of a response cut at the length limit;
  like the official code, the reward sits on the last generated token.
- Prompts longer than --max_prompt_tokens are dropped (counted), not cut.
- Programs run in a bubblewrap sandbox (README, Security; the official code uses exec), and the
  answer counts only when the harness printed it and the program exited normally.
- The reported checkpoint is the last one (the official `best/` is the best epoch on the test set).
- Rerank's classifier learns from the samples of --rerank_sampler, by default --model (the official
  data: the epoch-2 warm-up model's samples; name that checkpoint to match).
- Prompts carry the tokenizer's BOS, as in sft.py.
- `--detach_critic` (off = the paper) keeps the value loss out of the shared trunk.
"""
import copy
import math
import os
import random
import secrets
import time
from collections import Counter
from dataclasses import dataclass
from itertools import takewhile

import torch
from torch import nn
from tqdm.auto import tqdm

import sft
from common import (RANK, TOY_TASK, Logger, adapters_disabled, all_reduce, autocast,
                    batch_sequences, check_args, check_context, check_trained, fail, gather,
                    generate, gradient_checkpointing, linear_schedule, load_model, load_state,
                    load_task, mean_over_ranks, parse_args, run_sandboxed, save, save_state,
                    shard, start_run, token_logprobs, wrap_model)


@dataclass
class Args:
    """Train a model with ReFT (SFT warm-up, then PPO on its own sampled answers), or score one with
    Voting@k or Rerank@k."""
    model: str = "codellama-7b"  # paper: CodeLlama-7B and Galactica-6.7B
    """base model (or an already warmed-up checkpoint with --warmup_epochs 0)"""
    task: str = "gsm8k"
    """gsm8k, svamp, arith, or a .jsonl/.json file (ReFT's {question, answer_cot, answer_value})"""
    test_task: str = ""
    """test split: a .jsonl/.json file, a folder or a task ('' = --task's; a lone file has none)"""
    cot: str = "nl"
    """nl: natural-language CoT with an answer trigger; program: the model writes def solution()"""
    template: str = "reft"
    """prompt template: reft (the paper), self_explore or gsi"""
    mode: str = "train"
    """train: warm-up + PPO; vote: Voting@k of --model; rerank: Rerank@k of --model"""
    out_dir: str = "runs/reft"
    """where checkpoints, metrics.jsonl and samples.jsonl go"""
    save_every: int = 1
    """save a resumable state (out_dir/state.pt) after every this many PPO epochs (0: never)"""
    resume: bool = False
    """continue the run in --out_dir from its last state (same settings) instead of a fresh one"""
    warmup_epochs: int = 2  # paper: the epoch-2 checkpoint of a 40-epoch SFT schedule
    """warm-up SFT epochs (0: --model is already warmed up)"""
    warmup_schedule_epochs: int = 40  # paper
    """epochs the warm-up LR schedule is computed for"""
    warmup_lr: float = 1e-5  # paper
    """warm-up SFT learning rate"""
    warmup_batch_size: int = 48  # paper
    """warm-up SFT sequences per optimiser step"""
    epochs: int = 300  # paper
    """PPO epochs over the training questions"""
    n_train: int = 0
    """use the first n training questions (0: all)"""
    rollout_batch_size: int = 32  # paper: 4 per GPU x 8 GPUs
    """questions per rollout, one sampled path each"""
    micro_batch_size: int = 4  # paper: 4 per GPU
    """sequences per forward/backward in the PPO update"""
    ppo_epochs: int = 2  # paper
    """passes over each rollout batch; each pass is one optimiser step"""
    lr: float = 3e-7  # paper: constant, no warm-up
    """PPO learning rate"""
    kl_coef: float = 0.05  # paper: 0.05 N-CoT, 0.01 P-CoT (--preset program)
    """beta of the per-token KL penalty in the reward"""
    gamma: float = 1.0  # paper
    """GAE discount"""
    lam: float = 0.95  # paper
    """GAE lambda"""
    clip_range: float = 0.2  # official train_rl_reft.py: hard-coded
    """PPO ratio clip"""
    value_clip_range: float = 0.2  # official train_rl_reft.py: hard-coded
    """value clip, in reward units"""
    vf_coef: float = 5.0  # paper
    """weight of the value loss"""
    detach_critic: bool = False  # our flag; the paper: the value loss also trains the trunk
    """the value loss trains the value head only, not the shared trunk (a diagnostic: README)"""
    partial_reward: float = 0.1  # paper
    """reward for a wrong but extractable numeric answer"""
    truncation_penalty: float = 0.0  # our flag; 0 = the paper
    """subtracted from the reward of a response that hit the length limit"""
    temperature: float = 1.0  # paper: the model default, with top_k 0 and top_p 1
    """sampling temperature of rollouts (and of every log-prob in the ratio and the KL)"""
    max_prompt_tokens: int = 300  # paper
    """longer prompts are dropped"""
    max_total_tokens: int = 700  # paper: prompt + response
    """length limit of prompt + response"""
    value_head_init: str = "zero"
    """zero (first values are 0) or default (the library's random init, as the official code)"""
    program_timeout: float = 10.0  # paper
    """seconds a model-written program may run"""
    no_sandbox: bool = False
    """where bubblewrap is missing: resource limits alone for programs (unsafe: README, Security)"""
    eval_max_total_tokens: int = 700  # official train_rl_reft.py: max_gen_length
    """length limit of prompt + response at greedy evaluation (each batch's padded prompt)"""
    vote_max_total_tokens: int = 1024  # official sampling.py: max_length
    """length limit of prompt + response of the samples of --mode vote and rerank"""
    n_eval: int = 0
    """evaluate on the first n test questions (0: all)"""
    vote_k: int = 100  # paper: Voting@100, Rerank@100
    """samples per test question for --mode vote and rerank (temperature 1.0)"""
    rerank_sampler: str = ""
    """rerank: the warm-up model whose training samples teach the classifier (default: --model)"""
    rerank_samples: int = 100  # paper
    """rerank: samples per training question for the classifier's data"""
    rerank_lr: float = 1e-6  # paper
    """rerank: classifier learning rate (linear schedule, 10% warm-up)"""
    rerank_epochs: int = 3  # paper
    """rerank: classifier epochs"""
    rerank_batch_size: int = 24  # paper: 3 x 8 GPUs
    """rerank: classifier batch size"""
    rerank_max_tokens: int = 700  # official train_reward_model.py: max_input_length
    """rerank: classifier inputs are cut to their first this many tokens"""
    lora_rank: int = 0
    """LoRA rank (0: full fine-tuning); the reference is then the model with adapters off"""
    seed: int = 42  # paper: 42 + rank
    """seed for sampling and shuffling"""


PRESETS = {
    "program": dict(cot="program", kl_coef=0.01),  # paper: P-CoT
    # The toy world: start from runs/toy-sft (already warmed up) and share its template.
    "toy": dict(model="runs/toy-sft", task=TOY_TASK, template="self_explore",
                out_dir="runs/toy-reft", warmup_epochs=0, epochs=5, micro_batch_size=32, lr=2e-5,
                max_total_tokens=200, eval_max_total_tokens=200, vote_max_total_tokens=200,
                vote_k=16, rerank_samples=8, rerank_lr=1e-4, rerank_batch_size=32, seed=0),
}
TOY = PRESETS["toy"]


# ALGO 4. the terminal reward: the answer, by the official grader (train_rl_reft.py)
def answer_trigger(template):
    """What the template writes before the answer: the official `\nTherefore, the answer is: `
    (reft), `\nThe answer is ` (self_explore, gsi)."""
    return sft.TEMPLATES[template][1].partition("{rationale}")[2].partition("{answer}")[0]


def numeric_answer(text, trigger):
    """N-CoT by the official rule (train_rl_reft.py): the text after the last trigger as a float;
    None if it is not a plain number (`18 dollars`, `1,000`, a second answer line) or no trigger."""
    tail = text.strip().split(trigger)[-1] if trigger else text
    try:
        return float(tail.strip())
    except ValueError:
        return None


def gold_number(answer):
    """The gold answer as the official code reads it: float(answer without commas)."""
    return float(answer.replace(",", ""))


def check_golds(examples):
    """ReFT's reward compares numbers: a gold answer that is not one stops the run up front."""
    for example in examples:
        try:
            gold_number(example.answer)
        except ValueError:
            fail(f"the gold answer {example.answer!r} is not a number, and ReFT's reward compares "
                 f"numbers: use a numeric task (gsm8k, svamp, arith) or fix that record")


def program_answer(prompt, completion, timeout, no_sandbox=False):
    """P-CoT: `def solution` up to the first blank line, run in a sandbox; float(solution()) or
    None (official train_rl_reft.py and src/python_engine.py: same preamble and cut)."""
    program = prompt[prompt.rindex("def solution():"):] + completion
    lines = takewhile(str.strip, program.split("\n"))  # up to the first blank line
    preamble = "import math\ntry:\n    import sympy\nexcept ImportError:\n    pass\n"
    code = preamble + "\n".join(lines).replace("sys.exit", "print")
    token = secrets.token_hex(16)  # fresh: only the harness's own last line carries it
    harness = f"\nprint({token!r}, float(solution()))"
    ok, out = run_sandboxed(code + harness, timeout=timeout, no_sandbox=no_sandbox)
    _, found, value = out.rpartition(token + " ")
    try:
        return float(value) if ok and found else None  # exited normally after the harness printed
    except ValueError:
        return None


def terminal_reward(pred, gold, partial_reward):
    """R: 1 if |pred - gold| <= 1e-2 (official train_rl_reft.py), partial_reward if a number was
    extracted but is wrong, else 0."""
    if pred is None:
        return 0.0
    return 1.0 if abs(pred - gold_number(gold)) <= 1e-2 else partial_reward


# ALGO 6.-9. the KL-shaped reward, GAE, whitening and the clipped losses (ReFT §3.1)
def kl_shaped_rewards(scores, old_logprobs, ref_logprobs, mask, kl_coef):
    """r_t = R * 1[t = T] - beta * (log pi_old - log pi_ref), T = the last response token (EOS
    when emitted). All tensors [B, L-1]; scores [B]."""
    kl = (old_logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    last = mask.cumsum(1).argmax(1)  # the first index where the running count peaks
    rewards[torch.arange(len(scores)), last] += scores
    return rewards, kl


def gae(rewards, values, mask, gamma, lam):
    """delta_t = r_t + gamma V(s_t+1) - V(s_t), A_t = sum_l (gamma lam)^l delta_t+l, with V = 0
    after the last action; returns R_t = A_t + V(s_t). All tensors [B, L-1]."""
    values = values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])  # [B]
    length = rewards.shape[1]
    for t in reversed(range(length)):
        next_value = values[:, t + 1] if t + 1 < length else 0.0
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, advantages + values


def whiten(advantages, mask):
    """(A - mean) / sqrt(var + 1e-8) over every response token of the rollout batch of all ranks;
    the mean is not restored (official src/utils.py)."""
    count, total = all_reduce(torch.stack([mask.sum(), (advantages * mask).sum()]))
    if count < 2:
        fail("a rollout batch has fewer than 2 response tokens: raise --max_total_tokens")
    mean = total / count
    variance = all_reduce(((advantages - mean) ** 2 * mask).sum()) / (count - 1)
    return (advantages - mean) * torch.rsqrt(variance + 1e-8) * mask


def ppo_losses(logprobs, values, batch, clip_range, value_clip_range):
    """Per sequence (token mean): max(-A rho, -A clip(rho, 1-eps, 1+eps)) and
    1/2 max((V - R)^2, (V_clip - R)^2) with V_clip = V_old + clip(V - V_old, -eps_v, eps_v)."""
    mask = batch["mask"]
    advantages = batch["advantages"]
    returns = batch["returns"]
    old_values = batch["old_values"]
    ratio = torch.exp(logprobs - batch["old_logprobs"])
    clipped_ratio = ratio.clamp(1 - clip_range, 1 + clip_range)
    policy_loss = torch.max(-advantages * ratio, -advantages * clipped_ratio)
    values_clipped = old_values + (values - old_values).clamp(-value_clip_range, value_clip_range)
    value_loss = 0.5 * torch.max((values - returns) ** 2, (values_clipped - returns) ** 2)
    clipped = ((ratio - 1).abs() > clip_range).float()
    per_sequence = [(x * mask).sum(1) / mask.sum(1) for x in (policy_loss, value_loss, clipped)]
    return tuple(per_sequence)  # each [B]


# PLUMBING the policy's forward, prompts, and the answer of one completion
def policy_forward(model, value_head, input_ids, attention_mask, temperature, detach=False):
    """Log-probs of each token at the sampling temperature, and V(s_t) from the state before it
    (shared trunk; detach: no value gradient reaches it). Both [B, L-1]."""
    logprobs, hidden = token_logprobs(model, input_ids, attention_mask, temperature=temperature,
                                      return_hidden=True)
    states = hidden[:, :-1].to(value_head.weight.dtype)  # bf16 under FSDP2
    states = states.detach() if detach else states
    values = value_head(states).float().squeeze(-1)
    return logprobs, values


def make_prompt(args, question):
    prompt = sft.prompt_for(args.template, question)
    if args.cot == "program":  # P-CoT: the policy writes only the body (official train_rl_reft.py)
        return prompt + f'def solution():\n    """{question.strip()}"""\n'
    return prompt


def answer_of(args, prompt, completion_text):
    if args.cot == "program":
        return program_answer(prompt, completion_text, args.program_timeout, args.no_sandbox)
    return numeric_answer(completion_text, answer_trigger(args.template))


def rollout(model, value_head, reference_logprobs, tokenizer, questions, args):
    """ALGO 3.-8. for one batch of questions: sample, score, old quantities, KL-shaped rewards,
    GAE, whitening. reference_logprobs(input_ids, attention_mask) gives log pi_ref."""
    prompts = [make_prompt(args, ex.question) for ex in questions]
    prompt_ids = [tokenizer(p)["input_ids"] for p in prompts]
    # ALGO 3. one path per question at T = 1 (no top-k or top-p); prompt + response within the cap
    start = time.time()
    max_new_tokens = args.max_total_tokens - max(map(len, prompt_ids))
    completions = generate(model, tokenizer, prompts, temperature=args.temperature, top_p=1.0,
                           max_new_tokens=max_new_tokens)
    seconds = time.time() - start
    # ALGO 4. the terminal reward R (minus our truncation penalty, 0 by default)
    preds = [answer_of(args, p, c.text) for p, c in zip(prompts, completions)]
    terminal = []
    for pred, ex, completion in zip(preds, questions, completions):
        penalty = 0 if completion.finished else args.truncation_penalty
        terminal.append(terminal_reward(pred, ex.answer, args.partial_reward) - penalty)
    scores = torch.tensor(terminal, device=model.device)  # [B]
    response_ids = [c.token_ids for c in completions]
    input_ids, attention_mask, mask = batch_sequences(prompt_ids, response_ids,
                                                      tokenizer.pad_token_id, model.device)
    # ALGO 5. log pi_old, V_old and log pi_ref of every response token, without grad
    with torch.no_grad():
        old_logprobs, old_values = policy_forward(model, value_head, input_ids, attention_mask,
                                                  args.temperature)
        ref_logprobs = reference_logprobs(input_ids, attention_mask)
    # ALGO 6. the KL to the reference, folded into the per-token reward
    rewards, kl = kl_shaped_rewards(scores, old_logprobs, ref_logprobs, mask, args.kl_coef)
    # ALGO 7. GAE; the returns use the raw advantages
    advantages, returns = gae(rewards, old_values, mask, args.gamma, args.lam)
    # ALGO 8. whitened advantages
    advantages = whiten(advantages, mask)
    batch = dict(input_ids=input_ids, attention_mask=attention_mask, mask=mask,
                 old_logprobs=old_logprobs, old_values=old_values, advantages=advantages,
                 returns=returns)
    # PLUMBING statistics: the k1 and k3 estimates of the KL to the reference, both always logged
    log_ratio = (ref_logprobs - old_logprobs) * mask
    k3 = ((log_ratio.exp() - 1 - log_ratio) * mask).sum().item()
    n_tokens = mask.sum()
    stats = dict(reward=scores.mean().item(),
                 accuracy=(scores >= 1).float().mean().item(),
                 kl_k1=(kl.sum() / n_tokens).item(),
                 kl_k3=k3 / n_tokens.item(),
                 entropy=(-(old_logprobs * mask).sum() / n_tokens).item(),
                 response_length=n_tokens.item() / len(prompts),
                 eos_rate=sum(c.finished for c in completions) / len(prompts),
                 tokens_per_s=n_tokens.item() / seconds)
    samples = [dict(question=ex.question, gold=ex.answer, completion=c.text, pred=pred, reward=s)
               for ex, c, pred, s in zip(questions, completions, preds, scores.tolist())]
    return batch, stats, samples


def ppo_update(model, value_head, optimizer, batch, args):
    """ALGO 9. ppo_epochs passes, each one optimiser step over the whole rollout batch
    (micro-batches accumulate); the loss is the batch mean of the sequences' token means."""
    n_rows = len(batch["input_ids"])
    totals = Counter()
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    for _ in range(args.ppo_epochs):
        for rows in torch.randperm(n_rows).split(args.micro_batch_size):
            micro = {k: v[rows] for k, v in batch.items()}
            logprobs, values = policy_forward(model, value_head, micro["input_ids"],
                                              micro["attention_mask"], args.temperature,
                                              args.detach_critic)
            losses = ppo_losses(logprobs, values, micro, args.clip_range, args.value_clip_range)
            policy_loss, value_loss, clip_fraction = losses
            loss = (policy_loss.sum() + args.vf_coef * value_loss.sum()) / n_rows
            if not torch.isfinite(loss):
                fail("non-finite PPO loss: lower --lr")
            loss.backward()
            totals.update(policy_loss=policy_loss.sum().item(), value_loss=value_loss.sum().item(),
                          clip_fraction=clip_fraction.sum().item())
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)  # official _template.sh: clip_grad_norm 1
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {k: v / (n_rows * args.ppo_epochs) for k, v in totals.items()}


# ALGO 10. greedy evaluation, and the samples of Voting@k and Rerank@k
def sample_answers(model, tokenizer, examples, args, n=1, temperature=0.0):
    """(prompts, completions, answers), n per question (greedy when temperature is 0); each rank
    does its share. Prompt + response stay within the official length limits (max_length)."""
    prompts = shard([make_prompt(args, ex.question) for ex in examples])
    greedy = temperature == 0  # official: greedy in train_rl_reft.py, samples in sampling.py
    max_total = args.eval_max_total_tokens if greedy else args.vote_max_total_tokens
    completions = generate(model, tokenizer, prompts, max_new_tokens=max_total,
                           max_total_tokens=max_total, n=n, temperature=temperature, top_p=1.0,
                           batch_size=256)
    rows = [(prompts[i // n], completion, answer_of(args, prompts[i // n], completion.text))
            for i, completion in enumerate(completions)]
    return tuple(zip(*gather(rows, len(examples), n)))


def accuracy(preds, examples):
    """The share of predictions within 1e-2 of the gold number."""
    return sum(terminal_reward(p, ex.answer, 0.0) for p, ex in zip(preds, examples)) / len(examples)


# ALGO §4.4. the inference extensions: Voting@k, and Rerank@k (a classifier picks among k samples)
def vote_accuracy(model, tokenizer, examples, args):
    """Voting@k: majority over the non-empty answers of k samples at T = 1."""
    k = args.vote_k
    _, _, preds = sample_answers(model, tokenizer, examples, args, n=k, temperature=1.0)
    votes = []
    for i in range(len(examples)):
        answers = [p for p in preds[i * k:(i + 1) * k] if p is not None]
        majority = Counter(answers).most_common(1)[0][0] if answers else None
        votes.append(majority)
    return accuracy(votes, examples)


def last_token_hidden(model, input_ids, attention_mask):
    with autocast(model):
        output = model.base_model(input_ids, attention_mask=attention_mask, use_cache=False)
    hidden = output.last_hidden_state
    return hidden[torch.arange(len(input_ids)), attention_mask.sum(1) - 1].float()


def classifier_logits(classifier, head, tokenizer, ids):
    """The two logits (incorrect, correct) of each list of token ids, from its last token."""
    input_ids, attention_mask, _ = batch_sequences(ids, [[]] * len(ids), tokenizer.pad_token_id,
                                                   classifier.device)
    return head(last_token_hidden(classifier, input_ids, attention_mask))


def rerank_data(sampler, tokenizer, train_set, args):
    """(token ids, label) of the deduplicated samples of the training questions; label 1 = right.
    Inputs are cut to --rerank_max_tokens (official train_reward_model.py: max_input_length)."""
    n = args.rerank_samples
    prompts, completions, preds = sample_answers(sampler, tokenizer, train_set, args, n=n,
                                                 temperature=1.0)
    labelled = {}
    for i, (prompt, completion, pred) in enumerate(zip(prompts, completions, preds)):
        right = terminal_reward(pred, train_set[i // n].answer, 0.0) == 1.0
        labelled[(prompt, completion.text)] = int(right)
    cut = args.rerank_max_tokens
    return [(tokenizer(p + text)["input_ids"][:cut], y) for (p, text), y in labelled.items()]


def train_classifier(model, tokenizer, data, args):
    """A copy of --model with a 2-class head, trained with cross-entropy as the official
    train_reward_model.py: AdamW, transformers' linear schedule with 10% warm-up, clip 1."""
    classifier = copy.deepcopy(model)
    head = nn.Linear(classifier.config.hidden_size, 2).to(classifier.device)
    parameters = [p for p in classifier.parameters() if p.requires_grad] + list(head.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=args.rerank_lr, eps=1e-8, weight_decay=0.0)
    total_steps = args.rerank_epochs * math.ceil(len(data) / args.rerank_batch_size)
    schedule = linear_schedule(optimizer, int(0.1 * total_steps), total_steps)
    classifier.train()  # dropout on while it trains, as the official loop
    for _ in tqdm(range(args.rerank_epochs), desc="rerank classifier", leave=False):
        random.shuffle(data)
        for start in range(0, len(data), args.rerank_batch_size):
            chunk = data[start:start + args.rerank_batch_size]
            logits = classifier_logits(classifier, head, tokenizer, [ids for ids, _ in chunk])
            labels = torch.tensor([y for _, y in chunk], device=classifier.device)
            loss = nn.functional.cross_entropy(logits, labels)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)  # official: clip_grad_norm 1
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
    classifier.eval()
    return classifier, head


def rerank_accuracy(model, tokenizer, train_set, test_set, args):
    """Rerank@k: a classifier, initialised from --model and trained on the samples of
    --rerank_sampler (the paper: the warm-up model; default: --model) on the training questions,
    scores k test samples; the best-scored one with a valid answer wins."""
    sampler = model
    if args.rerank_sampler:
        sampler = load_model(args.rerank_sampler, seed=args.seed, frozen=True)[0]
    data = rerank_data(sampler, tokenizer, train_set, args)
    classifier, head = train_classifier(model, tokenizer, data, args)
    k = args.vote_k
    prompts, completions, preds = sample_answers(model, tokenizer, test_set, args, n=k,
                                                 temperature=1.0)
    picks = []
    with torch.no_grad():
        for i in range(len(test_set)):
            rows = [j for j in range(i * k, (i + 1) * k) if preds[j] is not None]
            if not rows:
                picks.append(None)
                continue
            texts = [prompts[j] + completions[j].text for j in rows]
            ids = [tokenizer(text)["input_ids"][:args.rerank_max_tokens] for text in texts]
            p_right = classifier_logits(classifier, head, tokenizer, ids).softmax(-1)[:, 1]
            picks.append(preds[rows[p_right.argmax().item()]])
    return accuracy(picks, test_set), len(data)


# PLUMBING flags, the reference, and the run
def check_flags(args):
    """Stops with one sentence on a flag that cannot work, before anything loads."""
    if args.cot not in ("nl", "program"):
        fail(f"unknown --cot {args.cot!r}: use nl or program")
    if args.mode not in ("train", "vote", "rerank"):
        fail(f"unknown --mode {args.mode!r}: use train, vote or rerank")
    if args.template not in sft.TEMPLATES:
        fail(f"unknown --template {args.template!r}: use one of {', '.join(sft.TEMPLATES)}")
    if args.value_head_init not in ("zero", "default"):
        fail(f"unknown --value_head_init {args.value_head_init!r}: use zero or default")
    positive = ["warmup_lr", "warmup_batch_size", "epochs", "rollout_batch_size",
                "micro_batch_size", "ppo_epochs", "lr", "max_prompt_tokens", "max_total_tokens",
                "eval_max_total_tokens", "vote_max_total_tokens", "vote_k", "rerank_samples",
                "rerank_max_tokens", "rerank_lr", "rerank_epochs", "rerank_batch_size"]
    at_least_zero = ["warmup_epochs", "warmup_schedule_epochs", "n_train", "n_eval", "lora_rank"]
    check_args(args, positive=positive, at_least_zero=at_least_zero)
    if args.mode != "train" or args.warmup_epochs == 0:  # PPO, Voting, Rerank need a trained start
        check_trained(args.model, "--model")
    if args.cot == "program":
        run_sandboxed("", no_sandbox=args.no_sandbox)  # stops here if programs cannot be sandboxed


def load_reference(model, args):
    """ALGO 1. the frozen warm-up model, as a function (input_ids, attention_mask) -> its token
    log-probs at the sampling temperature. Under LoRA it is the policy with its adapters off (the
    warm-up sits in the trunk); otherwise it is reloaded from out_dir/warmup (or --model)."""
    if args.lora_rank > 0:
        def reference_logprobs(input_ids, attention_mask):
            with adapters_disabled(model):
                return token_logprobs(model, input_ids, attention_mask,
                                      temperature=args.temperature)
        return reference_logprobs
    warm_start = f"{args.out_dir}/warmup" if args.warmup_epochs > 0 else args.model
    reference = load_model(warm_start, seed=args.seed, frozen=True)[0].eval().requires_grad_(False)

    def reference_logprobs(input_ids, attention_mask):
        return token_logprobs(reference, input_ids, attention_mask, temperature=args.temperature)
    return reference_logprobs


def main(argv=None):
    args = parse_args(Args, PRESETS, argv)
    check_flags(args)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    # PLUMBING data, then the model, before any work
    train_set = load_task(args.task, "train")[:args.n_train or None]
    test_set = load_task(args.task, "test", args.test_task)[:args.n_eval or None]
    check_golds(train_set + test_set)
    model, tokenizer = load_model(args.model, lora_rank=args.lora_rank, seed=args.seed,
                                  reference=args.mode == "train")  # PPO keeps a frozen reference
    test_prompts = [make_prompt(args, ex.question) for ex in test_set]
    check_context(model, tokenizer, {"test question": test_prompts},
                  max_total_tokens=args.max_total_tokens)

    def prompt_length(example):
        return len(tokenizer(make_prompt(args, example.question))["input_ids"])
    kept = [ex for ex in train_set if prompt_length(ex) <= args.max_prompt_tokens]
    print(f"{len(kept)} training questions ({len(train_set) - len(kept)} dropped: prompt over "
          f"{args.max_prompt_tokens} tokens), {len(test_set)} test questions")
    logger = Logger(args.out_dir)
    if args.mode == "vote":
        greedy_accuracy = accuracy(sample_answers(model, tokenizer, test_set, args)[2], test_set)
        voted = vote_accuracy(model, tokenizer, test_set, args)
        logger.log("vote", test_accuracy=greedy_accuracy, **{f"vote@{args.vote_k}": voted})
        return
    if args.mode == "rerank":
        reranked, n_data = rerank_accuracy(model, tokenizer, kept, test_set, args)
        logger.log("rerank", classifier_examples=n_data, **{f"rerank@{args.vote_k}": reranked})
        return

    # PLUMBING one run per folder; --resume continues from its state
    resume_from = start_run(args)
    # ALGO 1. warm-up SFT from the base model (a resumed run has it in out_dir/warmup already)
    if args.warmup_epochs > 0 and not resume_from:
        template = "reft_program" if args.cot == "program" else args.template
        pairs = [(sft.prompt_for(template, ex.question), sft.target_for(template, ex))
                 for ex in kept]
        warmup_args = sft.Args(template=template, epochs=args.warmup_epochs, lr=args.warmup_lr,
                               schedule_epochs=args.warmup_schedule_epochs, out_dir=args.out_dir,
                               batch_size=args.warmup_batch_size, seed=args.seed)
        sft.train(model, tokenizer, pairs, warmup_args, logger=logger)
        save(model, tokenizer, f"{args.out_dir}/warmup", args)  # reloaded: FSDP2 cannot copy
        if args.lora_rank > 0:  # warm-up merged in the trunk, new adapters: adapters off = warm-up
            del model  # one copy in memory at a time
            model, tokenizer = load_model(f"{args.out_dir}/warmup", lora_rank=args.lora_rank,
                                          seed=args.seed)
    reference_logprobs = load_reference(model, args)

    # ALGO 2. the value head on the policy's last hidden state (shared trunk)
    value_head = nn.Linear(model.config.hidden_size, 1).to(model.device)
    if args.value_head_init == "zero":
        nn.init.zeros_(value_head.weight)
        nn.init.zeros_(value_head.bias)
    model.value_head = value_head  # a submodule, so that DDP or FSDP2 treats it with the trunk
    model.eval()  # dropout off everywhere during RL (the official update forward runs in eval mode)
    gradient_checkpointing(model, model.device.type == "cuda")
    policy = wrap_model(model)  # DDP or FSDP2 under torchrun
    if RANK > 0:  # paper: seed 42 + rank, so that each rank samples its own stream
        torch.manual_seed(args.seed + RANK)
    parameters = [p for p in policy.parameters() if p.requires_grad]  # the value head's too
    optimizer = torch.optim.AdamW(parameters, lr=args.lr, eps=1e-8, weight_decay=0.0)  # constant

    # ALGO 10. greedy test accuracy, before PPO and after every epoch
    def log_test_accuracy(step):
        _, completions, preds = sample_answers(model, tokenizer, test_set, args)
        shown = list(zip(test_set, completions, preds))[:10]
        logger.samples([dict(step=step, question=ex.question, gold=ex.answer, completion=c.text,
                             pred=p) for ex, c, p in shown])
        logger.log(step, test_accuracy=accuracy(preds, test_set))

    # PLUMBING a resumed run goes on from its last state (weights, value head, AdamW, RNG streams)
    done = load_state(resume_from, policy, optimizer) if resume_from else dict(epoch=0, step=0)
    if not resume_from:
        log_test_accuracy("ppo 0")
    step = done["step"]
    for epoch in range(done["epoch"] + 1, args.epochs + 1):
        order = random.sample(kept, len(kept))
        starts = range(0, len(order), args.rollout_batch_size)
        for start in tqdm(starts, desc=f"ppo epoch {epoch}", leave=False):
            questions = shard(order[start:start + args.rollout_batch_size])  # this rank's share
            # ALGO 3.-8. sample one path per question, score it, whiten its advantages
            batch, stats, samples = rollout(model, value_head, reference_logprobs, tokenizer,
                                            questions, args)
            # ALGO 9. the clipped PPO update
            stats |= ppo_update(policy, value_head, optimizer, batch, args)
            stats = mean_over_ranks(stats, model.device)
            step += 1
            logger.log(f"rollout {step}", epoch=epoch, **stats)
            logger.samples([dict(step=step, **s) for s in samples[:2]])
        log_test_accuracy(f"ppo {epoch}")
        # PLUMBING a resumable state every save_every epochs
        if args.save_every and epoch % args.save_every == 0:
            state = os.path.join(args.out_dir, "state.pt")
            save_state(state, policy, optimizer, epoch=epoch, step=step)
    del model.value_head  # not part of the saved policy
    save(model, tokenizer, args.out_dir, args)
    print(f"saved {args.out_dir}")


if __name__ == "__main__":
    main()
