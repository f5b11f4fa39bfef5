"""SCoRe: Training Language Models to Self-Correct via Reinforcement Learning.

Aviral Kumar, Vincent Zhuang, Rishabh Agarwal, Yi Su, John D. Co-Reyes, Avi Singh, et al. (Google
DeepMind), ICLR 2025, arXiv 2409.12917v2 (v1 numbers its tables differently). No official code.

The model answers (attempt 1), reads its answer and an instruction saying there might be an error,
and answers again (attempt 2); the reward is 1 for a right final answer (math) or a program that
passes its tests (code), else 0.
- Stage I trains attempt 2 by REINFORCE while a strong KL pins attempt 1 to the base model, so that
  attempt 2 learns to act on the first attempts the base model writes (no collapse to one answer).
- Stage II, from Stage I, trains both attempts (gamma = 0: each is paid its own reward) with a bonus
  alpha (r2 - r1) on the second.

    python score.py --model deepseek-ai/deepseek-math-7b-instruct --task math   # Table 5, MATH
    python score.py --preset code --model deepseek-ai/deepseek-coder-6.7b-instruct   # MBPP
    python score.py --preset toy   # tiny, arith, from runs/toy-sft, CPU -> runs/toy-score

Implements (where the paper is silent, the arguments say `# our choice`):
- Stage I, SCoRe §5.1 (Eq. 3); Stage II, §5.2 (Eq. 4 and the shaped bonus); single-turn RL
  (Eq. 2); each as REINFORCE with gamma = 0. The prompts of Appendix C; Table 5's settings.
- Table 2's metrics (Acc@t1, Acc@t2, Delta, Delta i->c, Delta c->i) and the edit-distance ratio
  (Figure 4), greedy, at the start and after each stage; Table 4's ablations (--stage1_steps 0,
  --alpha 0, --single_turn).

Deviations (README, Deviations from the papers):
- Each stage reports its last step (the paper: the highest training reward); fixed beta2; one pass
  Stage I -> II; no coverage trick; no MBPP-R; MATH trains on its train split only.
- Programs run in a sandbox and pass only if their tests ran to the end (README, Security).
- An attempt cut at --max_new_tokens is graded as it stands and attempt 2 reads it as cut; a stop
  string (MBPP's `[DONE]`, HumanEval's `\\ndef`, ...) is cut from the graded text, but its tokens
  stay in the scored attempt, as EOS does: the action that ended it.
- Toy only: the format warm-up, --restate and a short instruction (see format_warmup).
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
from common import (RANK, TOY_TASK, Logger, adapters_disabled, batch_sequences, check_args,
                    check_context, check_trained, extract_answer, fail, gather, generate,
                    gradient_checkpointing, hub_rows, is_equiv, load_model, load_state, load_task,
                    mean_over_ranks, not_a_test_set, parse_args, read_records, run_sandboxed, save,
                    save_state, shard, start_run, token_logprobs, wrap_model)

# paper: Appendix C, the zero-shot MATH prompt and the correction instructions p1
MATH_PROMPT = ("You are a math expert. When you respond, respond only with the Solution of the "
               "final Problem, thinking step by step. At the end of the Solution, when you give "
               "your final answer, write it in the form \"Final Answer: The final answer is "
               "$answer$. I hope it is correct.\"")
MATH_INSTRUCTION = ("There might be an error in the solution above because of lack of "
                    "understanding of the question. Please correct the error, if any, and rewrite "
                    "the solution. Only output the final solution! At the end of the Solution, "
                    "when you give your final answer, write it in the form \"Final Answer: The "
                    "final answer is $answer$. I hope it is correct.\"")
CODE_INSTRUCTION = ("There might be an error in the code above because of lack of understanding of "
                    "the question. Please correct the error, if any, and rewrite the solution. "
                    "Only output the final correct Python program!")
CODE_TASKS = {"mbpp": ("google-research-datasets/mbpp", "full"),
              "humaneval": ("openai/openai_humaneval", None)}
HUMANEVAL_STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")  # the Codex paper's stop sequences


@dataclass
class Args:
    """Train a model with SCoRe to correct its own first answer in a second attempt (Stage I, then
    Stage II), and report both attempts' greedy accuracy at the start and after each stage."""
    model: str = "deepseek-ai/deepseek-math-7b-instruct"  # paper: Gemini 1.5 Flash (closed)
    """starting model: an instruction-following model, or an SFT checkpoint (--template)"""
    task: str = "math"  # paper: MATH; --preset code: MBPP
    """training task: math, gsm8k, arith, a .jsonl/.json file, or mbpp / MBPP or HumanEval .jsonl"""
    test_task: str = ""  # paper: MATH500; --preset code: HumanEval
    """test split: a .jsonl/.json file, a folder or a task ('' = --task's; a lone file has none)"""
    template: str = "score"
    """first-turn prompt: score (the paper's), or a starting SFT model's: reft, self_explore, gsi"""
    instruction: str = ""  # paper: Appendix C
    """correction instruction p1 ('' = the paper's, for math or for code)"""
    restate: bool = False  # toy only, a deviation
    """repeat the question after the instruction (the tiny model cannot solve one 50 tokens back)"""
    chat_template: bool = True  # our choice: the paper's model is a chat model
    """render the turns with the tokenizer's chat template if any (else {x1}{y1}\\n\\n{p1}\\n)"""
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
    """ablation: single-turn RL (Eq. 2, attempt 1 only) for stage1_steps + stage2_steps steps"""
    batch_size: int = 512  # paper: Table 5 (MATH)
    """trajectories (attempt 1 + attempt 2) per optimiser step"""
    samples_per_prompt: int = 4  # our choice
    """first attempts per problem in a step, one second attempt each; the baseline's group"""
    micro_batch_size: int = 8
    """trajectories per forward/backward (whole groups; gradients add up per optimiser step)"""
    lr: float = 5e-6  # paper: Table 5 (MATH), Adam
    """learning rate (Adam, constant)"""
    temperature: float = 1.0  # paper: Table 5
    """sampling temperature of both attempts in training (and of every log-prob in loss and KL)"""
    alpha: float = 10.0  # paper: Table 5
    """shaping weight: Stage II's attempt 2 gets r2 + alpha (r2 - r1) (0: 'without shaping')"""
    beta1: float = 0.01  # paper: Table 5
    """KL weight on both attempts in Stage II (and on attempt 1 in single-turn RL)"""
    beta2: float = 0.1  # paper: Table 5, MATH (0.25 for code)
    """the strong Stage I KL weight, on attempt 1 only"""
    stage1_beta_t2: float = 0.01  # our choice: the paper's "relatively small weight" is not given
    """Stage I KL weight on attempt 2 (= beta1)"""
    baseline: str = "loo"  # our choice
    """loo: leave-one-out mean reward of the problem's group, per attempt; none: no baseline"""
    kl_estimator: str = "k1"  # our choice
    """k1: the attempt's sum of log pi - log pi_ref, off its reward; k3: per-token k3 in the loss"""
    stage2_reference: str = "base"  # our choice: the paper says "a fixed model"
    """KL reference of Stage II: base (the starting model) or stage1 (the Stage I result)"""
    grad_clip: float = 1.0  # our choice: not given
    """maximum gradient norm"""
    max_new_tokens: int = 1024  # our choice: not given
    """tokens per attempt"""
    sample_batch_size: int = 64
    """sequences per generation batch (training and greedy evaluation)"""
    program_timeout: float = 10.0
    """seconds a model-written program and its tests may run"""
    no_sandbox: bool = False
    """where bubblewrap is missing: resource limits alone for programs (unsafe: README, Security)"""
    lora_rank: int = 0
    """LoRA rank (0: full fine-tuning); the reference model is then the model with adapters off"""
    seed: int = 0
    """seed for sampling and the order of the problems"""


PRESETS = {
    # paper: Table 5, MBPP -> HumanEval: Adam 1e-5, 1500 steps, batch 128, beta2 0.25
    "code": dict(task="mbpp", test_task="humaneval", lr=1e-5, stage1_steps=500, stage2_steps=1000,
                 batch_size=128, beta2=0.25, max_new_tokens=512, out_dir="runs/score-code"),
    # The toy world, from runs/toy-sft (template self_explore). A short instruction keeps turn 2
    # within what the tiny model can read; format_warmup explains the warm-up and --restate.
    "toy": dict(model="runs/toy-sft", task=TOY_TASK, template="self_explore",
                out_dir="runs/toy-score",
                instruction="There might be an error. Correct it, if any.", restate=True,
                format_warmup_epochs=2, stage1_steps=80, stage2_steps=80, batch_size=32,
                micro_batch_size=32, lr=5e-5, max_new_tokens=160, sample_batch_size=256),
}
TOY = PRESETS["toy"]


# PLUMBING problems, prompts, rewards
@dataclass
class Problem:
    user: str  # the first-turn input, before any chat template
    answer: str = ""  # math: the gold answer
    target: str = ""  # a gold solution (the format warm-up keeps attempt 1 on it)
    tests: str = ""  # code: test code run after the program
    prefix: str = ""  # HumanEval: the function header that the completion continues
    entry: str = ""  # HumanEval: the function the tests call
    reopen: str = ""  # opens attempt 2 after the instruction (MBPP: [BEGIN]; HumanEval: the header)
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


def first_turn(question, args):
    """score: our rendering around the paper's prompt text; else the starting SFT model's format."""
    if args.template == "score":
        return f"{MATH_PROMPT}\n\nProblem:\n{question.strip()}\nSolution:\n"
    return sft.prompt_for(args.template, question)


def gold_solution(example, args):
    if args.template in sft.TEMPLATES:
        return sft.target_for(args.template, example)
    final = f"Final Answer: The final answer is ${example.answer}$. I hope it is correct."
    return f"{example.rationale.strip()}\n{final}"


def math_problems(name, split, args):
    """A math task through common.load_task: the final answer is checked."""
    problems = []
    for example in load_task(name, split, args.test_task):
        prompt = first_turn(example.question, args)
        target = gold_solution(example, args)
        reopen = prompt if args.restate else ""
        problems.append(Problem(prompt, example.answer, target, reopen=reopen))
    return problems


def code_rows(name, split, test_task=""):
    """Records of a code task: from the hub (mbpp, humaneval) or a local .jsonl file."""
    if name in CODE_TASKS:
        return list(hub_rows(name, split, CODE_TASKS))
    records = read_records(name)
    if split == "test" and name != test_task:  # a lone file is one split
        not_a_test_set(name)
    return [record for _, record in records]


def mbpp_block(row):
    return (f"You are an expert Python programmer, and here is your task: {row['text']} Your code "
            "should pass these tests:\n\n" + "\n".join(row["test_list"]) + "\n[BEGIN]\n")


def mbpp_problems(name, rows):
    """MBPP, 3-shot (paper): the shots are the prompt split's tasks 2-4, or a file's first three."""
    if name in CODE_TASKS:
        shots = [row for row in code_rows(name, "prompt") if row["task_id"] in (2, 3, 4)]
    else:
        shots = rows[:3]
        rows = rows[3:]
    context = "".join(mbpp_block(shot) + f"{shot['code']}\n[DONE]\n" for shot in shots)
    problems = []
    for row in rows:
        user = context + mbpp_block(row)
        target = row["code"]
        tests = "\n".join([row.get("test_setup_code") or ""] + row["test_list"])
        problems.append(Problem(user, target=target, reopen="[BEGIN]\n", stop=("[DONE]",),
                                tests=tests))
    return problems


def humaneval_problem(row):
    """HumanEval, zero-shot (paper): the model continues the function header."""
    prompt = row["prompt"]
    target = row["canonical_solution"]
    tests = f"{row['test']}\ncheck({row['entry_point']})\n"
    return Problem(prompt, target=target, tests=tests, prefix=prompt, entry=row["entry_point"],
                   reopen=prompt, stop=HUMANEVAL_STOP)


def load_problems(name, split, args):
    """Math problems (the answer is checked) or code problems (MBPP, HumanEval: tests are run)."""
    head = ""
    if name.endswith(".jsonl") and os.path.isfile(name):  # read_records says what is wrong with it
        with open(name, encoding="utf-8", errors="replace") as file:
            head = file.readline()
    if name not in CODE_TASKS and "test_list" not in head and "entry_point" not in head:
        return math_problems(name, split, args)
    rows = code_rows(name, split, args.test_task)
    try:
        if rows and "entry_point" in rows[0]:
            return [humaneval_problem(row) for row in rows]
        return mbpp_problems(name, rows)
    except KeyError as error:
        fail(f"{name}: a record lacks {error}; MBPP needs text, code, test_list; HumanEval prompt, "
             f"canonical_solution, test, entry_point")


def chat(tokenizer, args):
    return args.chat_template and bool(getattr(tokenizer, "chat_template", None))


def render(tokenizer, turns, args):
    """Turns [user, assistant, user] in the tokenizer's chat template, else (our choice) the plain
    {x1}{y1}\\n\\n{p1}\\n."""
    if chat(tokenizer, args):
        roles = ["user", "assistant", "user"]
        messages = [dict(role=role, content=text) for role, text in zip(roles, turns)]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text.removeprefix(tokenizer.bos_token or "")  # generate() adds the BOS itself
    return turns[0] + "".join(f"{y}\n\n{p}\n" for y, p in zip(turns[1::2], turns[2::2]))


def second_prompt(tokenizer, problem, attempt1, args):
    """x2 = [x1, y1, p1] (paper), then what opens an attempt in this format (problem.reopen)."""
    instruction = args.instruction or (CODE_INSTRUCTION if problem.tests else MATH_INSTRUCTION)
    return render(tokenizer, [problem.user, attempt1, instruction], args) + problem.reopen


def attempts(model, tokenizer, prompts, problem, args, temperature, **options):
    """generate() with the setting's token budget and stop strings."""
    stop = problem.stop or None
    if chat(tokenizer, args):
        stop = None  # a chat model fences its program: a stop string would cut it
    return generate(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens, stop=stop,
                    temperature=temperature, batch_size=args.sample_batch_size, **options)


def program_of(problem, text):
    """An attempt's fenced block, or itself; a HumanEval continuation gets the function header."""
    fenced = re.search(r"```(?:python)?\n(.*?)(?:```|$)", text, re.DOTALL)
    code = fenced.group(1) if fenced else text
    if not problem.prefix or f"def {problem.entry}(" in code:
        return code
    return problem.prefix + code


def reward(problem, text, args):
    """r(y, y*) in {0, 1}: a right final answer (math), or a program passing every test (code)."""
    if not problem.tests:
        return float(is_equiv(extract_answer(text), problem.answer))
    token = secrets.token_hex(16)  # fresh: printed only when the harness got past its last test
    program = program_of(problem, text) + "\n\n" + problem.tests + f"\nprint({token!r})\n"
    ok, out = run_sandboxed(program, timeout=args.program_timeout, no_sandbox=args.no_sandbox)
    return float(ok and out.endswith(token + "\n"))


def rewards(problems, texts, args, device=None):
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:  # programs run side by side
        values = list(pool.map(reward, problems, texts, [args] * len(texts)))
    return torch.tensor(values, device=device)


# ALGO Eq. 2-4. shaped rewards, the baseline, the SCoRe loss
def shaped_reward(r1, r2, alpha):
    """Stage II reward of attempt 2: r2 + b, b = alpha (r2 - r1) (SCoRe §5.2).
    alpha = 10: i->c 11, c->c 1, c->i -10, i->i 0."""
    return r2 + alpha * (r2 - r1)


def leave_one_out(rewards, k):
    """R - b, b the mean reward of the other k - 1 samples of the same problem (our choice)."""
    groups = rewards.view(-1, k)  # [B / k, k]
    others = (groups.sum(1, keepdim=True) - groups) / (k - 1)
    return (groups - others).flatten()


def score_loss(attempt1, attempt2, r1, r2, stage, args):
    """REINFORCE with gamma = 0, per trajectory: L = -sum_i (R_i - b_i) log pi(y_i | x_i), with
    log pi summed over attempt i's tokens.
    - attempt_i = (policy log-probs, reference log-probs, mask of attempt i's own tokens), [B, L-1]
      each; attempt2 is None in single-turn RL. Rows come in groups of samples_per_prompt.
    - stage 1: Eq. 3 (Stage I); 2: Eq. 4 with the shaped bonus (Stage II); 0: Eq. 2."""
    if stage == 1:
        # ALGO Eq. 3. attempt 2's reward only; the strong KL (beta2) on attempt 1, a small one on 2
        task_rewards = (torch.zeros_like(r1), r2)
        betas = (args.beta2, args.stage1_beta_t2)
    elif stage == 2:
        # ALGO Eq. 4. both attempts, each its own reward, attempt 2's shaped; beta1 on both
        task_rewards = (r1, shaped_reward(r1, r2, args.alpha))
        betas = (args.beta1, args.beta1)
    else:
        # ALGO Eq. 2. attempt 1 alone (Table 4's single-turn ablation)
        task_rewards = (r1, None)
        betas = (args.beta1, None)
    loss = 0.0
    stats = {}
    both = (attempt1, attempt2)
    for i, (attempt, reward_i, beta) in enumerate(zip(both, task_rewards, betas), 1):
        if attempt is None:
            continue
        logprobs, ref_logprobs, mask = attempt
        log_ratio = (logprobs - ref_logprobs) * mask  # [B, L-1], 0 on prompt and instruction
        # k1: a one-sample estimate of KL(pi || pi_ref) of the whole attempt (Eq. 3, 4's direction)
        kl = log_ratio.sum(1)  # [B]
        # per-token k3 = r - 1 - log r, r = pi_ref / pi; 0 off the mask
        k3 = ((-log_ratio).exp() - 1 + log_ratio).sum(1)  # [B]
        if args.kl_estimator == "k1":  # in the reward, detached: its gradient flows through log pi
            reward_i = reward_i - beta * kl.detach()
        advantage = reward_i
        if args.baseline == "loo":
            advantage = leave_one_out(reward_i, args.samples_per_prompt)
        loss = loss - advantage.detach() * (logprobs * mask).sum(1)
        if args.kl_estimator == "k3":  # in the loss: its gradient flows through each token's log pi
            loss = loss + beta * k3
        nll = -(logprobs * mask).sum(1) / mask.sum(1).clamp(min=1)  # [B], per token: the entropy
        stats[f"kl{i}"] = kl.sum().item()
        stats[f"kl{i}_k3"] = k3.sum().item()
        stats[f"return{i}"] = reward_i.sum().item()
        stats[f"nll{i}"] = nll.sum().item()
    return loss, stats


def delta_metrics(correct1, correct2):
    """Table 2's metrics, each a fraction of all problems: Acc@t1, Acc@t2,
    Delta = Acc@t2 - Acc@t1 = Delta i->c - Delta c->i."""
    n = len(correct1)
    pairs = list(zip(correct1, correct2))
    i2c = sum(not a and b for a, b in pairs)
    c2i = sum(a and not b for a, b in pairs)
    return {"acc_t1": sum(correct1) / n, "acc_t2": sum(correct2) / n,
            "delta": (sum(correct2) - sum(correct1)) / n,
            "delta_i2c": i2c / n, "delta_c2i": c2i / n}


# PLUMBING rollouts, log-probs, the update, evaluation
def rollout(model, tokenizer, problems, args, two_turns=True):
    """k first attempts per problem at T = 1, one second attempt each, token ids, rewards."""
    group = [p for p in problems for _ in range(args.samples_per_prompt)]
    x1 = [render(tokenizer, [p.user], args) for p in group]
    y1 = attempts(model, tokenizer, x1, group[0], args, args.temperature)
    x2 = []
    y2 = []
    if two_turns:
        x2 = [second_prompt(tokenizer, p, y.text, args) for p, y in zip(group, y1)]
        y2 = attempts(model, tokenizer, x2, group[0], args, args.temperature)
    samples = []  # two trajectories a step for samples.jsonl
    for i, problem in enumerate(group[:2]):
        attempt2 = y2[i].text if y2 else None
        samples.append(dict(question=problem.user, attempt1=y1[i].text, attempt2=attempt2))
    roll = dict(pad_id=tokenizer.pad_token_id, samples=samples)
    for i, (x, y) in enumerate(((x1, y1), (x2, y2)), 1):
        roll[f"prompts{i}"] = [tokenizer(text)["input_ids"] for text in x]
        roll[f"responses{i}"] = [c.token_ids for c in y]
        roll[f"r{i}"] = rewards(group, [c.text for c in y], args, model.device)
    return roll


def attempt_logprobs(model, reference_logprobs, prompts, responses, pad_id, args):
    """Policy (with grad) and reference log-probs at the sampling T; the mask of the attempt."""
    input_ids, attention_mask, mask = batch_sequences(prompts, responses, pad_id, model.device)
    with torch.no_grad():
        ref_logprobs = reference_logprobs(input_ids, attention_mask)
    logprobs = token_logprobs(model, input_ids, attention_mask, temperature=args.temperature)
    return logprobs, ref_logprobs, mask


def update(policy, reference_logprobs, optimizer, roll, stage, args):
    """One REINFORCE step on this rank's rollout, in micro-batches of whole groups."""
    n = len(roll["r1"])
    k = args.samples_per_prompt
    micro_batch = max(1, args.micro_batch_size // k) * k
    totals = Counter()
    for start in range(0, n, micro_batch):
        rows = slice(start, start + micro_batch)
        parts = [None, None]  # per attempt: (policy, reference, mask); single-turn has no attempt 2
        for i in (1, 2):
            if roll[f"prompts{i}"]:
                prompts = roll[f"prompts{i}"][rows]
                responses = roll[f"responses{i}"][rows]
                parts[i - 1] = attempt_logprobs(policy, reference_logprobs, prompts, responses,
                                                roll["pad_id"], args)
        losses, stats = score_loss(*parts, roll["r1"][rows], roll["r2"][rows], stage, args)
        # ranks have n each (shard) and average gradients: the mean over all trajectories
        loss = losses.sum() / n
        if not torch.isfinite(loss):
            fail(f"non-finite loss in stage {stage}: lower --lr (the checkpoints already saved "
                 f"are kept)")
        loss.backward()
        totals.update(stats | {"loss": loss.item() * n})
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(parameters, args.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    means = {key: value / n for key, value in totals.items()}
    return means | {"grad_norm": grad_norm.item()}


def evaluate_two_turns(model, tokenizer, problems, args):
    """Greedy attempts 1 and 2 (paper), each rank its share: Table 2's metrics, the fraction of
    changed answers and the edit-distance ratio (Figure 4)."""
    mine = shard(problems)
    first_turns = [render(tokenizer, [p.user], args) for p in mine]
    first = attempts(model, tokenizer, first_turns, problems[0], args, temperature=0.0)
    second_turns = [second_prompt(tokenizer, p, y.text, args) for p, y in zip(mine, first)]
    second = attempts(model, tokenizer, second_turns, problems[0], args, temperature=0.0)
    correct1 = rewards(mine, [y.text for y in first], args).bool().tolist()
    correct2 = rewards(mine, [y.text for y in second], args).bool().tolist()
    rows = [dict(question=p.user, attempt1=a.text, correct1=c1, attempt2=b.text, correct2=c2)
            for p, a, b, c1, c2 in zip(mine, first, second, correct1, correct2)]
    records = gather(rows, len(problems))
    edits = []
    for record in records:
        distance = edit_distance(record["attempt1"], record["attempt2"])
        edits.append(distance / max(1, len(record["attempt1"] + record["attempt2"])))
    metrics = delta_metrics([r["correct1"] for r in records], [r["correct2"] for r in records])
    metrics["edit_ratio"] = sum(edits) / len(edits)
    metrics["changed"] = sum(e > 0 for e in edits) / len(edits)
    return metrics, records


def format_warmup(model, tokenizer, problems, args, logger):
    """Toy only, a deviation: the toy's SFT model never saw a second turn and writes no answer after
    the instruction (Acc@t2 = 0: no reward for REINFORCE). This teaches the format, not correction:
    SFT on [x1, y1, p1] -> y2, y1 and y2 independent samples at T = 1, 1:1 with gold targets."""
    problems = problems[:args.format_warmup_questions]
    first_turns = [render(tokenizer, [p.user], args) for p in problems]
    samples = attempts(model, tokenizer, first_turns, problems[0], args, args.temperature, n=2,
                       sharded=True)  # each rank samples its share, every rank gets all
    pairs = [(second_prompt(tokenizer, p, a.text, args), b.text)
             for p, a, b in zip(problems, samples[::2], samples[1::2])]
    pairs += [(render(tokenizer, [p.user], args), p.target) for p in problems]
    # sft.py's toy batch; linear warm-up and decay
    warmup_args = sft.Args(epochs=args.format_warmup_epochs, lr=args.format_warmup_lr,
                           batch_size=32, micro_batch_size=32, out_dir=args.out_dir, seed=args.seed)
    sft.train(model, tokenizer, pairs, warmup_args, logger=logger)


def reference_logprobs_of(model, args, path=None):
    """pi_ref as a function (ids, mask) -> log-probs at the sampling T: the model with its LoRA
    adapters off, or the reference model reloaded from `path` (FSDP2 cannot copy a model)."""
    if path is None:
        def adapters_off(input_ids, attention_mask):
            with adapters_disabled(model):
                return token_logprobs(model, input_ids, attention_mask,
                                      temperature=args.temperature)
        return adapters_off
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        reference = load_model(path, seed=args.seed, frozen=True)[0]  # it reseeds; sampling goes on
        reference.eval().requires_grad_(False)

    def reloaded(input_ids, attention_mask):
        return token_logprobs(reference, input_ids, attention_mask, temperature=args.temperature)
    return reloaded


def train_stage(model, policy, reference_logprobs, tokenizer, problems, stage, steps, args, logger,
                name, state=None):
    """`steps` optimiser steps of one stage: sample batch_size trajectories, score them, update."""
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=args.lr)  # paper: Table 5, Adam
    per_step = args.batch_size // args.samples_per_prompt
    # PLUMBING from a saved state (save_state's file) the stage goes on: weights, Adam, RNG, order
    if state:
        done = load_state(state, policy, optimizer)
    else:
        done = dict(step=0, rng=random.Random(f"{args.seed}-{stage}"), order=[])
    rng = done["rng"]
    order = done["order"]
    for step in range(done["step"] + 1, steps + 1):
        if len(order) < per_step:  # epochs over the problems, each in a new seeded order
            order += rng.sample(range(len(problems)), len(problems))
        batch = [problems[i] for i in order[:per_step]]
        order = order[per_step:]
        started = time.time()
        # ALGO Eq. 1. this rank's share: attempt 1, then (two turns) attempt 2, at T = 1; rewards
        roll = rollout(model, tokenizer, shard(batch), args, two_turns=stage != 0)
        stats = {}
        for i in (1, 2)[:1 + (stage != 0)]:
            stats[f"reward{i}"] = roll[f"r{i}"].mean().item()
            stats[f"length{i}"] = sum(map(len, roll[f"responses{i}"])) / len(roll["r1"])
        if stage != 0:  # the sampled transitions, as fractions of all trajectories
            stats["i2c"] = ((roll["r1"] == 0) & (roll["r2"] == 1)).float().mean().item()
            stats["c2i"] = ((roll["r1"] == 1) & (roll["r2"] == 0)).float().mean().item()
        # ALGO Eq. 2-4. KL, baseline and the REINFORCE loss (score_loss), one optimiser step
        stats |= update(policy, reference_logprobs, optimizer, roll, stage, args)
        stats = mean_over_ranks(stats, model.device)
        logger.log(f"{name} {step}", **stats, seconds=time.time() - started)
        logger.samples([dict(step=f"{name} {step}", **row) for row in roll["samples"]])
        if args.save_every and step % args.save_every == 0:
            # PLUMBING a state to resume from
            path = os.path.join(args.out_dir, "state.pt")
            save_state(path, policy, optimizer, stage=name, step=step, rng=rng, order=order)


def main(argv=None):
    args = parse_args(Args, PRESETS, argv)
    if (args.baseline not in ("loo", "none") or args.kl_estimator not in ("k1", "k3")
            or args.stage2_reference not in ("base", "stage1")):
        fail("bad --baseline, --kl_estimator or --stage2_reference: use loo|none, k1|k3, "
             "base|stage1")
    if args.template != "score" and args.template not in sft.TEMPLATES:
        templates = ", ".join(sft.TEMPLATES)
        fail(f"unknown --template {args.template!r}: use score or one of {templates}")
    check_args(args, positive=["format_warmup_lr", "format_warmup_questions", "batch_size",
                               "samples_per_prompt", "micro_batch_size", "lr", "max_new_tokens",
                               "sample_batch_size"],
               at_least_zero=["format_warmup_epochs", "n_train", "n_eval", "stage1_steps",
                              "stage2_steps", "lora_rank"])
    check_trained(args.model, "--model")  # the paper starts from an instruction-following model
    group_too_small = args.baseline == "loo" and args.samples_per_prompt < 2
    if args.batch_size % args.samples_per_prompt or group_too_small:
        fail("--batch_size must be a multiple of --samples_per_prompt, which must be at least 2 "
             "with --baseline loo")
    random.seed(args.seed)
    # PLUMBING data, then the model, before any work
    test_name = args.test_task or args.task
    train_set = load_problems(args.task, "train", args)[:args.n_train or None]
    test_set = load_problems(test_name, "test", args)[:args.n_eval or None]
    if not train_set or not test_set:
        fail(f"no problems in {args.task!r} (train) or {test_name!r} (test)")
    if any(problem.tests for problem in train_set + test_set):
        run_sandboxed("", no_sandbox=args.no_sandbox)  # stops here if programs cannot be sandboxed
    model, tokenizer = load_model(args.model, lora_rank=args.lora_rank, seed=args.seed,
                                  reference=True)  # seeds torch
    first_turns = [render(tokenizer, [p.user], args) for p in test_set]
    check_context(model, tokenizer, {"test problem": first_turns})
    if RANK > 0:  # each rank its own sampling stream (ReFT's code: seed + rank)
        torch.manual_seed(args.seed + RANK)
    # PLUMBING one run per folder; --resume goes on from its last state
    state = start_run(args)
    resumed = load_state(state)["stage"] if state else None  # the stage it was saved in
    logger = Logger(args.out_dir)

    def report(name):
        metrics, records = evaluate_two_turns(model, tokenizer, test_set, args)
        logger.log(f"eval {name}", **metrics)
        logger.samples([dict(step=f"eval {name}", **row) for row in records[:10]])

    # PLUMBING the starting model, greedy: Acc@t1, Acc@t2, Delta, Delta i->c, Delta c->i
    if not resumed:
        report("start")
    # PLUMBING toy only: teach the two-turn format; its result is the base and reference model
    if args.format_warmup_epochs > 0 and not resumed:  # resumed: out_dir/base is saved
        format_warmup(model, tokenizer, train_set, args, logger)
        save(model, tokenizer, os.path.join(args.out_dir, "base"), args)
        report("base")
    base = os.path.join(args.out_dir, "base") if args.format_warmup_epochs > 0 else args.model
    # LoRA on the starting model: the reference model is the model with its adapters off
    reference_path = None if args.lora_rank > 0 and base == args.model else base
    reference_logprobs = reference_logprobs_of(model, args, reference_path)
    # dropout off during RL; on GPU, activations are recomputed in backward (also in eval mode)
    model.eval()
    gradient_checkpointing(model, model.device.type == "cuda")
    policy = wrap_model(model)  # DDP or FSDP2 under torchrun
    if args.single_turn:
        stages = [(0, "single_turn", args.stage1_steps + args.stage2_steps)]
    else:
        stages = [(1, "stage1", args.stage1_steps), (2, "stage2", args.stage2_steps)]
    names = [name for _, name, _ in stages]
    for stage, name, steps in stages:
        if steps <= 0:
            continue
        if resumed and names.index(name) < names.index(resumed):
            continue  # finished (saved and reported) before the state was saved
        if stage == 2 and args.stage2_reference == "stage1" and args.stage1_steps > 0:
            stage1_path = os.path.join(args.out_dir, "stage1")
            reference_logprobs = reference_logprobs_of(model, args, stage1_path)
        # ALGO §5. Stage I (Eq. 3), then Stage II (Eq. 4) from its result, or single-turn (Eq. 2)
        resume_from = state if name == resumed else None
        train_stage(model, policy, reference_logprobs, tokenizer, train_set, stage, steps, args,
                    logger, name, resume_from)
        save(model, tokenizer, os.path.join(args.out_dir, name), args)
        # PLUMBING greedy evaluation after each stage
        report(name)
    print(f"saved {args.out_dir}")


if __name__ == "__main__":
    main()
