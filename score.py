"""SCoRe: Training Language Models to Self-Correct via Reinforcement Learning.

Aviral Kumar, Vincent Zhuang, Rishabh Agarwal, Yi Su, John D. Co-Reyes, Avi Singh, et al. (Google DeepMind),
ICLR 2025, arXiv 2409.12917. No official code. PAPERS.md section 5.

The model answers (attempt 1), reads its answer and an instruction saying there might be an error, and answers again
(attempt 2); the reward is 1 for a right final answer (math) or a program that passes its tests (code), else 0.
Stage I trains attempt 2 by REINFORCE while a strong KL pins attempt 1 to the base model, so that attempt 2 learns to
act on first attempts the base model would write (instead of both collapsing to one answer). Stage II, from Stage I,
trains both attempts (gamma = 0: each is paid its own reward) with a bonus alpha (r2 - r1) on the second.

    python score.py --model deepseek-ai/deepseek-math-7b-instruct --task math   # MATH, Table 5's settings
    python score.py --preset code --model deepseek-ai/deepseek-coder-6.7b-instruct   # train on MBPP, test HumanEval
    python score.py --preset toy                             # tiny on arith from runs/toy-sft, CPU -> runs/toy-score
    python score.py --preset toy --model runs/toy-score/base --format_warmup_epochs 0 --stage1_steps 0 --stage2_steps 160

Implements Eq. 3 (Stage I), Eq. 4 + the shaped bonus (Stage II), Eq. 2 (single-turn RL) as REINFORCE with gamma = 0,
the metrics of 5.4 for the starting model and after each stage, and the ablations of Table 4 (--stage1_steps 0,
--alpha 0, --single_turn). Where the paper is silent (5.6) the arguments say `# our choice`. Deviations: each stage
reports its last step (the paper: the highest training reward); fixed beta2; one pass I -> II; no coverage trick;
MATH trains on its train split (the paper adds 4500 test problems, tests on MATH500); no MBPP-R; programs run in a
sandboxed subprocess. Toy only: the format warm-up and --restate (see format_warmup).
Two more of our choices (the paper is silent): an attempt cut at --max_new_tokens is graded as it
stands (usually no final answer: reward 0), with no other penalty, all its tokens scored, and
attempt 2 reads it as cut; an attempt ended by a stop string (plain format: MBPP's `[DONE]`,
HumanEval's `\\ndef`, ...) is graded without it, but the stop string's tokens stay in the scored
attempt: they are the action that ended it, as EOS is, so log pi(y|x) includes the choice to stop.
"""
import os
import random
import re
import secrets
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

import sft
from common import (RANK, Logger, adapters_disabled, batch_sequences, check_args, check_context,
                    check_trained, extract_answer, fail, gather, generate, gradient_checkpointing,
                    hub_rows, is_equiv, load_model, load_state, load_task, mean_over_ranks,
                    not_a_test_set, parse_args, read_records, run_sandboxed, save, save_state,
                    shard, start_run, token_logprobs, wrap_model)

MATH_PROMPT = ("You are a math expert. When you respond, respond only with the Solution of the final Problem, thinking "
               "step by step. At the end of the Solution, when you give your final answer, write it in the form "
               "\"Final Answer: The final answer is $answer$. I hope it is correct.\"")  # paper: Appendix C
MATH_INSTRUCTION = ("There might be an error in the solution above because of lack of understanding of the question. "
                    "Please correct the error, if any, and rewrite the solution. Only output the final solution! At the "
                    "end of the Solution, when you give your final answer, write it in the form \"Final Answer: The "
                    "final answer is $answer$. I hope it is correct.\"")  # paper: p1 for MATH
CODE_INSTRUCTION = ("There might be an error in the code above because of lack of understanding of the question. Please "
                    "correct the error, if any, and rewrite the solution. Only output the final correct Python program!")
CODE_TASKS = {"mbpp": ("google-research-datasets/mbpp", "full"), "humaneval": ("openai/openai_humaneval", None)}
HUMANEVAL_STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")  # the Codex paper's stop sequences


@dataclass
class Args:
    """Train a model with SCoRe to correct its own first answer in a second attempt (Stage I, then
    Stage II), and report both attempts' greedy accuracy at the start and after each stage."""
    model: str = "deepseek-ai/deepseek-math-7b-instruct"  # paper: Gemini 1.5 Flash (closed)
    """starting model: an instruction-following model, or an SFT checkpoint (the format of --template)"""
    task: str = "math"  # paper: MATH; --preset code: MBPP
    """training task: math, gsm8k, arith, a .jsonl/.json file, or mbpp / a .jsonl file in MBPP's or HumanEval's schema"""
    test_task: str = ""  # paper: MATH500; --preset code: HumanEval
    """test split: a .jsonl/.json file, a folder or a task ('' = --task's; a lone file has none)"""
    template: str = "score"
    """first-turn prompt: score (the paper's zero-shot MATH prompt), or the format a starting SFT
    model was trained with: reft, self_explore (the toy) or gsi"""
    instruction: str = ""  # paper: Appendix C
    """correction instruction p1 ('' = the paper's, for math or for code)"""
    restate: bool = False  # toy only, a deviation
    """repeat the first-turn prompt after the instruction (the tiny model cannot solve a question 50 tokens back)"""
    chat_template: bool = True  # our choice (5.6): the paper's model is a chat model
    """render the turns with the tokenizer's chat template when it has one (else {x1}{y1}\\n\\n{p1}\\n)"""
    out_dir: str = "runs/score"
    """where the checkpoints of each stage, metrics.jsonl and samples.jsonl go"""
    save_every: int = 50  # our choice: 60 states over Table 5's 3000 steps
    """save a resumable state (out_dir/state.pt) every this many RL steps (0: never)"""
    resume: bool = False
    """continue the run in --out_dir from its last state (same settings) instead of a fresh one"""
    format_warmup_epochs: int = 0  # toy only, a deviation
    """SFT epochs teaching the two-turn format before RL, on self-generated second attempts
    (0: none; the toy's SFT model has never seen a second turn)"""
    format_warmup_lr: float = 3e-4
    """learning rate of the format warm-up"""
    format_warmup_questions: int = 2000
    """training questions used by the format warm-up"""
    n_train: int = 0
    """use the first n training problems (0: all)"""
    n_eval: int = 0
    """evaluate on the first n test problems (0: all)"""
    stage1_steps: int = 1000  # our choice: a third of Table 5's 3000 steps (the split is not given)
    """Stage I optimiser steps (0: the 'without Stage I' ablation)"""
    stage2_steps: int = 2000  # our choice: the other two thirds
    """Stage II optimiser steps"""
    single_turn: bool = False
    """ablation: single-turn RL (Eq. 2 on attempt 1 only) for stage1_steps + stage2_steps steps, instead of SCoRe"""
    batch_size: int = 512  # paper: Table 5 (MATH)
    """trajectories (attempt 1 + attempt 2) per optimiser step"""
    samples_per_prompt: int = 4  # our choice (5.6)
    """first attempts per problem in a step, one second attempt each; the baseline's group"""
    micro_batch_size: int = 8
    """trajectories per forward/backward (rounded to whole groups; gradients add up per optimiser step)"""
    lr: float = 5e-6  # paper: Table 5 (MATH), Adam
    """learning rate (Adam, constant)"""
    temperature: float = 1.0  # paper
    """sampling temperature of both attempts in training (and of every log-prob in the loss and the KL)"""
    alpha: float = 10.0  # paper
    """reward-shaping weight: attempt 2 of Stage II gets r2 + alpha (r2 - r1) (0: the 'without shaping' ablation)"""
    beta1: float = 0.01  # paper
    """KL weight on both attempts in Stage II (and on attempt 1 in single-turn RL)"""
    beta2: float = 0.1  # paper: MATH (0.25 for code)
    """the strong Stage I KL weight, on attempt 1 only"""
    stage1_beta_t2: float = 0.01  # our choice (5.6): the paper's "relatively small weight" is not given; = beta1
    """Stage I KL weight on attempt 2"""
    baseline: str = "loo"  # our choice (5.6)
    """loo: leave-one-out mean reward of the problem's group, per attempt; none: no baseline"""
    kl_estimator: str = "k1"  # our choice (5.6)
    """k1: sum of log pi - log pi_ref over the attempt, subtracted from its reward; k3: sum of per-token k3 in the loss"""
    stage2_reference: str = "base"  # our choice (5.6): the paper says "a fixed model"
    """KL reference of Stage II: base (the starting model) or stage1 (the Stage I result)"""
    grad_clip: float = 1.0  # our choice: not given
    """maximum gradient norm"""
    max_new_tokens: int = 1024  # our choice (5.6)
    """tokens per attempt"""
    sample_batch_size: int = 64
    """sequences per generation batch (training and greedy evaluation)"""
    program_timeout: float = 10.0
    """seconds a model-written program and its tests may run"""
    no_sandbox: bool = False
    """where bubblewrap is missing: resource limits alone for programs (unsafe: README, Security)"""
    lora_rank: int = 0
    """LoRA rank (0: full fine-tuning); the reference is then the model with adapters off"""
    seed: int = 0
    """seed for sampling and the order of the problems"""


PRESETS = {
    # paper: Table 5, MBPP -> HumanEval: Adam 1e-5, 1500 steps, batch 128, beta2 0.25
    "code": dict(task="mbpp", test_task="humaneval", lr=1e-5, stage1_steps=500, stage2_steps=1000,
                 batch_size=128, beta2=0.25, max_new_tokens=512, out_dir="runs/score-code"),
    # The toy world, from runs/toy-sft (template self_explore). A short instruction keeps turn 2 within what the tiny
    # model can read; the format warm-up and --restate are the toy deviations explained in format_warmup.
    "toy": dict(model="runs/toy-sft", task="arith", template="self_explore", out_dir="runs/toy-score",
                instruction="There might be an error. Correct it, if any.", restate=True, format_warmup_epochs=2,
                stage1_steps=80, stage2_steps=80, batch_size=32, micro_batch_size=32, lr=5e-5, max_new_tokens=64,
                sample_batch_size=256),
}
TOY = PRESETS["toy"]


# ---------------------------------------------------------------- PLUMBING: problems, prompts, rewards
@dataclass
class Problem:
    user: str  # the first-turn input, before any chat template
    answer: str = ""  # math: the gold answer
    target: str = ""  # a gold solution (the format warm-up keeps attempt 1 on it)
    tests: str = ""  # code: test code run after the program
    prefix: str = ""  # HumanEval: the function header that the completion continues
    entry: str = ""  # HumanEval: the function the tests call
    reopen: str = ""  # text after the instruction that opens attempt 2 (MBPP: [BEGIN]; HumanEval: the header)
    stop: tuple = ()


def edit_distance(a, b):
    """Character-level Levenshtein distance between two attempts (SCoRe's edit-distance ratio)."""
    previous = list(range(len(b) + 1))  # distances from a[:0] to each prefix of b
    for i, char_a in enumerate(a, 1):
        current = [i]
        for j, char_b in enumerate(b, 1):
            substitute = previous[j - 1] + (char_a != char_b)
            current.append(min(previous[j] + 1, current[j - 1] + 1, substitute))
        previous = current
    return previous[-1]


def code_rows(name, split, test_task=""):
    """Records of a code task from the hub (mbpp, humaneval: through `datasets`) or a local .jsonl file."""
    if name in CODE_TASKS:
        return list(hub_rows(name, split, CODE_TASKS))
    records = read_records(name)
    if split == "test" and name != test_task:  # a lone file is one split
        not_a_test_set(name)
    return [record for _, record in records]


def mbpp_block(row):
    return (f"You are an expert Python programmer, and here is your task: {row['text']} Your code should pass these "
            "tests:\n\n" + "\n".join(row["test_list"]) + "\n[BEGIN]\n")


def load_problems(name, split, args):
    """Math (common.load_task: the answer is checked) or code (MBPP 3-shot, HumanEval zero-shot: the tests are run)."""
    head = ""
    if name.endswith(".jsonl") and os.path.isfile(name):  # read_records says what is wrong with it
        head = open(name, encoding="utf-8", errors="replace").readline()
    if name not in CODE_TASKS and "test_list" not in head and "entry_point" not in head:
        prompt = (lambda q: f"{MATH_PROMPT}\n\nProblem:\n{q.strip()}\nSolution:\n") if args.template == "score" else (
            lambda q: sft.prompt_for(args.template, q))  # score: our rendering around the paper's prompt text
        target = (lambda ex: sft.target_for(args.template, ex)) if args.template in sft.TEMPLATES else (
            lambda ex: f"{ex.rationale.strip()}\nFinal Answer: The final answer is ${ex.answer}$. I hope it is correct.")
        return [Problem(prompt(ex.question), ex.answer, target(ex), reopen=prompt(ex.question) if args.restate else "")
                for ex in load_task(name, split, args.test_task)]
    rows = code_rows(name, split, args.test_task)
    try:
        if rows and "entry_point" in rows[0]:  # HumanEval (paper: zero-shot)
            return [Problem(r["prompt"], target=r["canonical_solution"], tests=f"{r['test']}\ncheck({r['entry_point']})\n",
                            prefix=r["prompt"], entry=r["entry_point"], reopen=r["prompt"], stop=HUMANEVAL_STOP)
                    for r in rows]
        # MBPP (paper: the standard 3-shot prompt): the shots are tasks 2-4 of the prompt split, or a file's first three
        shots = [r for r in code_rows(name, "prompt") if r["task_id"] in (2, 3, 4)] if name in CODE_TASKS else rows[:3]
        rows = rows if name in CODE_TASKS else rows[3:]
        context = "".join(mbpp_block(s) + f"{s['code']}\n[DONE]\n" for s in shots)
        return [Problem(context + mbpp_block(r), target=r["code"], reopen="[BEGIN]\n", stop=("[DONE]",),
                        tests="\n".join([r.get("test_setup_code") or ""] + r["test_list"])) for r in rows]
    except KeyError as error:
        fail(f"{name}: a record lacks {error}; MBPP needs text, code, test_list; HumanEval prompt, canonical_solution, "
             f"test, entry_point")


def chat(tokenizer, args):
    return args.chat_template and bool(getattr(tokenizer, "chat_template", None))


def render(tokenizer, turns, args):
    """Turns [user, assistant, user] as the tokenizer's chat template, or (none) the plain {x1}{y1}\\n\\n{p1}\\n of 5.6."""
    if chat(tokenizer, args):
        messages = [dict(role=role, content=text) for role, text in zip(["user", "assistant", "user"], turns)]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text.removeprefix(tokenizer.bos_token or "")  # generate() adds the BOS itself
    return turns[0] + "".join(f"{y}\n\n{p}\n" for y, p in zip(turns[1::2], turns[2::2]))


def second_prompt(tokenizer, problem, attempt1, args):
    """x2 = [x1, y1, p1] (the paper), then what opens an attempt in this format (problem.reopen)."""
    instruction = args.instruction or (CODE_INSTRUCTION if problem.tests else MATH_INSTRUCTION)
    return render(tokenizer, [problem.user, attempt1, instruction], args) + problem.reopen


def attempts(model, tokenizer, prompts, problem, args, temperature, **options):
    """generate() with the setting's budget and stop strings (none for a chat model: they would cut a fenced program)."""
    return generate(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens, temperature=temperature, **options,
                    stop=None if chat(tokenizer, args) else problem.stop or None, batch_size=args.sample_batch_size)


def program_of(problem, text):
    """An attempt's program: its fenced block, or itself; a HumanEval continuation (no `def entry(`) gets the header."""
    fenced = re.search(r"```(?:python)?\n(.*?)(?:```|$)", text, re.DOTALL)
    code = fenced.group(1) if fenced else text
    return code if not problem.prefix or f"def {problem.entry}(" in code else problem.prefix + code


def reward(problem, text, args):
    """r(y, y*) in {0, 1}: the final answer is right (math), or the program passes every test in the sandbox (code)."""
    if not problem.tests:
        return float(is_equiv(extract_answer(text), problem.answer))
    token = secrets.token_hex(16)  # fresh: printed only when the harness got past its last test
    program = program_of(problem, text) + "\n\n" + problem.tests + f"\nprint({token!r})\n"
    ok, out = run_sandboxed(program, timeout=args.program_timeout, no_sandbox=args.no_sandbox)
    return float(ok and out.endswith(token + "\n"))


def rewards(problems, texts, args, device=None):
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:  # programs run side by side, each in its own process
        return torch.tensor(list(pool.map(lambda pair: reward(*pair, args), zip(problems, texts))), device=device)


# ---------------------------------------------------------------- ALGO: shaped rewards, baseline, the SCoRe loss
def shaped_reward(r1, r2, alpha):
    """Stage II reward of attempt 2: r2 + b, b = alpha (r2 - r1); alpha = 10: i->c 11, c->c 1, c->i -10, i->i 0."""
    return r2 + alpha * (r2 - r1)


def leave_one_out(rewards, k):
    """R - b with b the mean reward of the other k - 1 samples of the same problem (our choice, 5.6)."""
    groups = rewards.view(-1, k)
    return (groups - (groups.sum(1, keepdim=True) - groups) / (k - 1)).flatten()


def score_loss(attempt1, attempt2, r1, r2, stage, args):
    """REINFORCE with gamma = 0 per trajectory: L = -sum_i (R_i - b_i) log pi(y_i | x_i), log pi summed over attempt i's
    tokens. attempt_i = (policy, reference token log-probs, mask of attempt i's own tokens), [B, L-1] each (attempt2 None:
    single-turn); rows in groups of samples_per_prompt (one problem). stage 1: Eq. 3; 2: Eq. 4 + shaping; 0: Eq. 2."""
    if stage == 1:  # Eq. 3: attempt 2's reward only; the strong KL (beta2) on attempt 1, a small one on attempt 2
        task, betas = (torch.zeros_like(r1), r2), (args.beta2, args.stage1_beta_t2)
    elif stage == 2:  # Eq. 4: both attempts, each its own reward, attempt 2's shaped; beta1 on both
        task, betas = (r1, shaped_reward(r1, r2, args.alpha)), (args.beta1, args.beta1)
    else:  # Eq. 2 on attempt 1 alone (the single-turn ablation)
        task, betas = (r1, None), (args.beta1, None)
    loss, stats = 0.0, {}
    for i, (attempt, reward_i, beta) in enumerate(zip((attempt1, attempt2), task, betas), 1):
        if attempt is None:
            continue
        logprobs, ref_logprobs, mask = attempt
        log_ratio = (logprobs - ref_logprobs) * mask  # only the attempt's sampled tokens: never prompt or instruction
        kl = log_ratio.sum(1)  # k1: a one-sample estimate of KL(pi || pi_ref) of the whole attempt (5.5: this direction)
        k3 = ((-log_ratio).exp() - 1 + log_ratio).sum(1)  # per-token k3 = r - 1 - log r, r = pi_ref / pi; 0 off the mask
        if args.kl_estimator == "k1":  # folded into the reward, detached: its gradient flows through log pi below
            reward_i = reward_i - beta * kl.detach()
        advantage = leave_one_out(reward_i, args.samples_per_prompt) if args.baseline == "loo" else reward_i
        loss = loss - advantage.detach() * (logprobs * mask).sum(1)
        if args.kl_estimator == "k3":  # in the loss: its gradient flows through log pi of every token
            loss = loss + beta * k3
        nll = -(logprobs * mask).sum(1) / mask.sum(1).clamp(min=1)  # per token: the sampled policy's entropy
        stats |= {f"kl{i}": kl.sum().item(), f"kl{i}_k3": k3.sum().item(), f"return{i}": reward_i.sum().item(),
                  f"nll{i}": nll.sum().item()}
    return loss, stats


def delta_metrics(correct1, correct2):
    """Sec. 5.4, each a fraction of all problems: Acc@t1, Acc@t2, Delta = Acc@t2 - Acc@t1 = Delta i->c - Delta c->i."""
    n = len(correct1)
    return {"acc_t1": sum(correct1) / n, "acc_t2": sum(correct2) / n, "delta": (sum(correct2) - sum(correct1)) / n,
            "delta_i2c": sum(not a and b for a, b in zip(correct1, correct2)) / n,
            "delta_c2i": sum(a and not b for a, b in zip(correct1, correct2)) / n}


# ---------------------------------------------------------------- PLUMBING: rollouts, log-probs, update, evaluation
def rollout(model, tokenizer, problems, args, two_turns=True):
    """k first attempts per problem at T = 1, one second attempt each, binary rewards; token ids as the sampler saw."""
    group = [p for p in problems for _ in range(args.samples_per_prompt)]
    sample = lambda prompts: attempts(model, tokenizer, prompts, group[0], args, args.temperature)
    x1 = [render(tokenizer, [p.user], args) for p in group]
    y1 = sample(x1)
    x2 = [second_prompt(tokenizer, p, y.text, args) for p, y in zip(group, y1)] if two_turns else []
    y2 = sample(x2) if two_turns else []
    roll = dict(pad_id=tokenizer.pad_token_id, samples=[dict(question=p.user, attempt1=a.text, attempt2=b and b.text)
                                                        for p, a, b in zip(group[:2], y1, y2 or [None] * 2)])
    for i, (x, y) in enumerate(((x1, y1), (x2, y2)), 1):
        roll[f"prompts{i}"] = [tokenizer(text)["input_ids"] for text in x]
        roll[f"responses{i}"] = [c.token_ids for c in y]
        roll[f"r{i}"] = rewards(group, [c.text for c in y], args, model.device)
    return roll


def attempt_logprobs(model, reference, prompts, responses, pad_id, args):
    """Policy (with grad), reference log-probs at the sampling T; the mask of the attempt's own tokens (from lengths)."""
    input_ids, attention_mask, mask = batch_sequences(prompts, responses, pad_id, model.device)
    with torch.no_grad():
        ref_logprobs = reference(input_ids, attention_mask)
    return token_logprobs(model, input_ids, attention_mask, temperature=args.temperature), ref_logprobs, mask


def update(policy, reference, optimizer, roll, stage, args):
    """One REINFORCE step on this rank's rollout: micro-batches of whole groups, loss = the mean over trajectories."""
    n, k = len(roll["r1"]), args.samples_per_prompt
    size, totals = max(1, args.micro_batch_size // k) * k, Counter()
    for start in range(0, n, size):
        rows = slice(start, start + size)
        parts = [attempt_logprobs(policy, reference, roll[f"prompts{i}"][rows], roll[f"responses{i}"][rows], roll["pad_id"],
                                  args) if roll[f"prompts{i}"] else None for i in (1, 2)]
        losses, stats = score_loss(*parts, *(roll[f"r{i}"][rows] for i in (1, 2)), stage, args)
        loss = losses.sum() / n  # ranks have n each (shard) and average gradients: the mean over all trajectories
        if not torch.isfinite(loss):
            fail(f"non-finite loss in stage {stage}: lower --lr (the checkpoints already saved are kept)")
        loss.backward()
        totals.update(stats | {"loss": loss.item() * n})
    grad_norm = torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], args.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {key: value / n for key, value in totals.items()} | {"grad_norm": grad_norm.item()}


def evaluate_two_turns(model, tokenizer, problems, args):
    """Greedy attempts 1 and 2 (paper), each rank its share: the metrics of 5.4, changes, the edit ratio (Fig. 4)."""
    mine, greedy = shard(problems), lambda prompts: attempts(model, tokenizer, prompts, problems[0], args, temperature=0.0)
    first = greedy([render(tokenizer, [p.user], args) for p in mine])
    second = greedy([second_prompt(tokenizer, p, y.text, args) for p, y in zip(mine, first)])
    correct1, correct2 = (rewards(mine, [y.text for y in ys], args).bool().tolist() for ys in (first, second))
    records = gather([dict(question=p.user, attempt1=a.text, correct1=c1, attempt2=b.text, correct2=c2)
                      for p, a, b, c1, c2 in zip(mine, first, second, correct1, correct2)], len(problems))
    edits = [edit_distance(r["attempt1"], r["attempt2"]) / max(1, len(r["attempt1"] + r["attempt2"])) for r in records]
    metrics = delta_metrics([r["correct1"] for r in records], [r["correct2"] for r in records])
    return metrics | {"edit_ratio": sum(edits) / len(edits), "changed": sum(e > 0 for e in edits) / len(edits)}, records


def format_warmup(model, tokenizer, problems, args, logger):
    """Toy only, a deviation. The paper's base model already answers a second turn; toy SFT never saw one and writes no
    answer after the instruction (Acc@t2 = 0): REINFORCE would see no reward. This teaches the format, not correction:
    SFT on [x1, y1, p1] -> y2, y1 and y2 independent samples at T = 1 (no reward looked at), 1:1 with gold targets."""
    problems = problems[:args.format_warmup_questions]
    samples = attempts(model, tokenizer, [render(tokenizer, [p.user], args) for p in problems], problems[0], args,
                       args.temperature, n=2, sharded=True)  # each rank samples its share, every rank gets all
    pairs = [(second_prompt(tokenizer, p, a.text, args), b.text) for p, a, b in zip(problems, samples[::2], samples[1::2])]
    pairs += [(render(tokenizer, [p.user], args), p.target) for p in problems]
    sft.train(model, tokenizer, pairs, sft.Args(epochs=args.format_warmup_epochs, lr=args.format_warmup_lr,
                                                batch_size=32, micro_batch_size=32, out_dir=args.out_dir, seed=args.seed),
              logger=logger)  # sft.py's toy batch; linear warm-up and decay


def reference_of(model, args, path=None):
    """pi_ref(ids, mask) -> log-probs at the sampling T: the model with LoRA off, or `path` reloaded (FSDP2 can't copy)."""
    if path is None:
        def reference(input_ids, attention_mask):
            with adapters_disabled(model):
                return token_logprobs(model, input_ids, attention_mask, temperature=args.temperature)
        return reference
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
        frozen = load_model(path, seed=args.seed, frozen=True)[0]  # it reseeds; sampling goes on
        frozen.eval().requires_grad_(False)
    return lambda input_ids, attention_mask: token_logprobs(frozen, input_ids, attention_mask, temperature=args.temperature)


def train_stage(model, policy, reference, tokenizer, problems, stage, steps, args, logger, name,
                state=None):
    """steps optimiser steps of one stage: sample batch_size trajectories (each rank its share), score, one update."""
    optimizer = torch.optim.Adam([p for p in policy.parameters() if p.requires_grad], lr=args.lr)  # paper: Adam
    rng, order, per_step = random.Random(f"{args.seed}-{stage}"), [], args.batch_size // args.samples_per_prompt
    # PLUMBING: from a saved state (save_state's file) the stage goes on: weights, Adam, RNG, order
    done = load_state(state, policy, optimizer) if state else dict(step=0, rng=rng, order=order)
    rng, order = done["rng"], done["order"]
    for step in range(done["step"] + 1, steps + 1):
        if len(order) < per_step:  # epochs over the problems, each in a new seeded order
            order += rng.sample(range(len(problems)), len(problems))
        batch, order = [problems[i] for i in order[:per_step]], order[per_step:]
        start = time.time()
        # 1. sample attempt 1 and (multi-turn) attempt 2 at T = 1; 2. binary rewards
        roll = rollout(model, tokenizer, shard(batch), args, two_turns=stage != 0)  # this rank's share
        r1, r2 = roll["r1"], roll["r2"]
        stats = {f"{key}{i}": value for i in (1, 2)[:1 + (stage != 0)] for key, value in (
            ("reward", roll[f"r{i}"].mean().item()), ("length", sum(map(len, roll[f"responses{i}"])) / len(r1)))}
        if stage != 0:  # the sampled transitions, as fractions of all trajectories
            stats |= {"i2c": ((r1 == 0) & (r2 == 1)).float().mean().item(), "c2i": ((r1 == 1) & (r2 == 0)).float().mean().item()}
        # 3. rewards with KL, baseline, REINFORCE loss (score_loss), one optimiser step
        stats |= update(policy, reference, optimizer, roll, stage, args)
        stats = mean_over_ranks(stats, model.device)
        logger.log(f"{name} {step}", **stats, seconds=time.time() - start)
        logger.samples([dict(step=f"{name} {step}", **row) for row in roll["samples"]])
        if args.save_every and step % args.save_every == 0:  # PLUMBING: a state to resume from
            path = os.path.join(args.out_dir, "state.pt")
            save_state(path, policy, optimizer, stage=name, step=step, rng=rng, order=order)


def main(argv=None):
    args = parse_args(Args, PRESETS, argv)
    if (args.baseline, args.kl_estimator, args.stage2_reference) not in [(b, k, r) for b in ("loo", "none")
                                                                          for k in ("k1", "k3") for r in ("base", "stage1")]:
        fail("bad --baseline, --kl_estimator or --stage2_reference: use loo|none, k1|k3, base|stage1")
    if args.template != "score" and args.template not in sft.TEMPLATES:
        fail(f"unknown --template {args.template!r}: use score or one of {', '.join(sft.TEMPLATES)}")
    check_args(args, positive=["format_warmup_lr", "format_warmup_questions", "batch_size",
                               "samples_per_prompt", "micro_batch_size", "lr", "max_new_tokens",
                               "sample_batch_size"],
               at_least_zero=["format_warmup_epochs", "n_train", "n_eval", "stage1_steps",
                              "stage2_steps", "lora_rank"])
    check_trained(args.model, "--model")  # the paper starts from an instruction-following model
    if args.batch_size % args.samples_per_prompt or (args.baseline == "loo" and args.samples_per_prompt < 2):
        fail("--batch_size must be a multiple of --samples_per_prompt, which must be at least 2 with --baseline loo")
    random.seed(args.seed)
    # PLUMBING: data, then the model, before any work
    train_set = load_problems(args.task, "train", args)[:args.n_train or None]
    test_set = load_problems(args.test_task or args.task, "test", args)[:args.n_eval or None]
    if not train_set or not test_set:
        fail(f"no problems in {args.task!r} (train) or {args.test_task or args.task!r} (test)")
    if any(problem.tests for problem in train_set + test_set):
        run_sandboxed("", no_sandbox=args.no_sandbox)  # stops here if programs cannot be sandboxed
    model, tokenizer = load_model(args.model, lora_rank=args.lora_rank, seed=args.seed,
                                  reference=True)  # seeds torch
    first_turns = [render(tokenizer, [p.user], args) for p in test_set]
    check_context(model, tokenizer, {"test problem": first_turns})
    if RANK > 0:  # each rank its own sampling stream (ReFT's code: seed + rank)
        torch.manual_seed(args.seed + RANK)
    state = start_run(args)  # PLUMBING: one run per folder; --resume goes on from its last state
    resumed = load_state(state)["stage"] if state else None  # the stage it was saved in
    logger = Logger(args.out_dir)

    def report(name):
        metrics, records = evaluate_two_turns(model, tokenizer, test_set, args)
        logger.log(f"eval {name}", **metrics)
        logger.samples([dict(step=f"eval {name}", **row) for row in records[:10]])

    # 1. PLUMBING: the starting model, greedy: Acc@t1, Acc@t2, Delta, Delta i->c, Delta c->i
    if not resumed:
        report("start")
    # 2. toy only: teach the two-turn format (format_warmup); its result is the base model and the KL reference
    if args.format_warmup_epochs > 0 and not resumed:  # resumed: out_dir/base is saved
        format_warmup(model, tokenizer, train_set, args, logger)
        save(model, tokenizer, os.path.join(args.out_dir, "base"), args)
        report("base")
    start = os.path.join(args.out_dir, "base") if args.format_warmup_epochs > 0 else args.model
    reference = reference_of(model, args, None if args.lora_rank > 0 and start == args.model else start)
    model.eval()  # dropout off during RL; on GPU, activations are recomputed in backward (also in eval mode)
    gradient_checkpointing(model, model.device.type == "cuda")
    policy = wrap_model(model)  # DDP or FSDP2 under torchrun
    stages = [(0, "single_turn", args.stage1_steps + args.stage2_steps)] if args.single_turn else \
        [(1, "stage1", args.stage1_steps), (2, "stage2", args.stage2_steps)]
    names = [name for _, name, _ in stages]
    for stage, name, steps in [s for s in stages if s[2] > 0]:
        if resumed and names.index(name) < names.index(resumed):
            continue  # finished (saved and reported) before the state was saved
        if stage == 2 and args.stage2_reference == "stage1" and args.stage1_steps > 0:
            reference = reference_of(model, args, os.path.join(args.out_dir, "stage1"))
        # 3. ALGO: Stage I (Eq. 3), then Stage II (Eq. 4) from its result; or single-turn RL (Eq. 2)
        resume_from = state if name == resumed else None
        train_stage(model, policy, reference, tokenizer, train_set, stage, steps, args, logger,
                    name, resume_from)
        save(model, tokenizer, os.path.join(args.out_dir, name), args)
        # 4. PLUMBING: greedy evaluation after each stage
        report(name)
    print(f"saved {args.out_dir}")


if __name__ == "__main__":
    main()
