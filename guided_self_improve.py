"""Mitigating Tail Narrowing in LLM Self-Improvement via Socratic-Guided Sampling (GSI).

Yiwen Ding, Zhiheng Xi, Wei He, Zhuoyuan Li, Yitao Zhai, Xiaowei Shi, Xunliang Cai, Tao Gui,
Qi Zhang, Xuanjing Huang (Fudan University, Meituan), NAACL 2025, arXiv 2411.00750. Official code:
Yiwen-Ding/Guided-Self-Improvement (commit 77ba9ed).

Self-improvement (sample, keep the correct solutions, fine-tune, repeat) over-samples the easy
questions: solutions to hard ones thin out of the training data ("tail narrowing"). GSI re-samples
only the hard questions, with a Socratic hint, and trains on the correct solutions without it:
- answer_driven: the gold value after the question;
- rationale_driven: the gold rationale as a reference answer;
- state_reset: the model continues a prefix of the gold rationale;
- interactive: a teacher critiques a wrong attempt, the student revises it;
- baselines: none (vanilla self-improvement) and brute_force (more plain samples, no hint).

Run:
    python guided_self_improve.py --model llama3-8b --task gsm8k    # state reset (default)
    python guided_self_improve.py --model llama3-8b --task gsm8k --strategy none
    python guided_self_improve.py --model llama3-8b --strategy interactive --teacher PATH
    python guided_self_improve.py --preset toy [--strategy none|brute_force|answer_driven]

Implements, per iteration t (official: inference*.py, src/utils.py, scripts/llama3/cot_train_*.sh):
1. M_t = SFT(base model, D_t), 1 epoch; D_0 = gold rationales, D_t = iteration t-1's samples.
2. Greedy test accuracy with the plain prompt.
3. n = 8 samples per training question at T = 0.7, plain prompt.
4. A question is hard while fewer than 4 of its samples are correct.
5. Up to 8 rounds: one hinted sample per still-hard question; stop when none is left.
6. D_{t+1} = every correct sample, with the plain prompt (correct: official src/eval_utils.py).

Deviations (README, Deviations from the papers):
- the official state-reset script never runs (a wrong keyword); here it does, with token prefixes
  from the policy's tokenizer, without special tokens (officially: Llama-3's, with the BOS text);
- the teacher sees the question's last wrong prediction (officially: the last one, maybe right);
- one base model for every strategy (the official scripts mix base and Instruct);
- one task to sample and, by default, for D_0 (officially MathInstruct: see --sft_task);
- the teacher is a local model or the policy itself (--teacher self), not a 70B model behind an API;
- the toy preset's changes are in the comment above it.
"""
import os
import random
import re
import time
from collections import Counter
from dataclasses import dataclass
from functools import partial

import torch
from tqdm.auto import tqdm

import sft
from common import (RANK, UNSEEN_TASK, WORLD, Logger, check_context, check_trained, evaluate, fail,
                    generate, load_model, load_state, load_task, parse_args, save, save_state,
                    start_run)
from common import check_args as check_common

STRATEGIES = ("none", "brute_force", "answer_driven", "rationale_driven", "state_reset",
              "interactive")


@dataclass
class Args:
    """Run GSI: sample, keep the correct answers, fine-tune, repeat; Socratic hints re-sample the
    questions the model rarely solves. Logs accuracy, cost and the tail per iteration."""
    model: str = "llama3-8b"  # paper: Llama3-8B (also Llama2-7B, DeepSeek-Math-7B, Mistral-7B)
    """base model every iteration starts from: an alias, a hub id, a local checkpoint, or tiny"""
    task: str = "gsm8k"  # paper: AQuA, GSM8K and MATH training questions
    """training questions to sample (and the test split): gsm8k, math, arith or a .jsonl/.json"""
    test_task: str = ""
    """test split: a .jsonl/.json file, a folder or a task ('' = --task's; a lone file has none)"""
    sft_task: str = ""  # paper: MathInstruct (CoT subset)
    """iteration-0 SFT data with gold rationales ('' = --task)"""
    sft_model: str = ""
    """an already trained iteration-0 model (SFT of --model on the gold rationales): skip that"""
    strategy: str = "state_reset"  # a third-party summary: works best (not in the paper text)
    """re-sampling of hard questions: none (vanilla), brute_force, answer_driven,
    rationale_driven, state_reset or interactive"""
    teacher: str = ""  # paper: Llama-3-70B-Instruct
    """interactive only: the teacher model (a path, alias or hub id), or `self` for the policy"""
    template: str = "gsi"  # paper: "Below is a math problem, please give a step-by-step answer."
    """plain prompt and gold target format: gsi (the paper), reft or self_explore; every training
    pair uses its plain prompt"""
    out_dir: str = "runs/gsi"
    """run folder: metrics.jsonl, each iteration's model (iter-t) and samples (samples-t.jsonl)"""
    resume: bool = False
    """continue the run in --out_dir after its last finished iteration (same settings)"""
    iterations: int = 4  # paper: t = 0..3
    """models trained: M_0 (SFT on gold rationales) up to M_{iterations-1}"""
    n_questions: int = 0
    """sample only the first n training questions each iteration (0: all)"""
    n_samples: int = 8  # paper
    """plain samples per question per iteration"""
    min_correct: int = 4  # paper: hard = fewer than 4 of 8 correct
    """a question is hard while fewer than this many of its samples are correct"""
    guided_rounds: int = 8  # paper
    """rounds of guided re-sampling (one sample per still-hard question per round)"""
    brute_force_rounds: int = 128  # paper: 128 (CoT), 32 (PoT)
    """rounds of plain re-sampling for --strategy brute_force"""
    reset_by: str = ""  # official code: lines for GSM8K, token proportions for every other set
    """state-reset prefix: lines (the first 1, 2, ... lines) or tokens (20/40/60/80/80% of the
    gold tokens); '' = by --task: lines for gsm8k, a *gsm8k* file and arith, tokens for others"""
    temperature: float = 0.7  # paper: top_p 1
    """sampling temperature of the policy"""
    teacher_temperature: float = 1.0  # official code
    """sampling temperature of the teacher"""
    teacher_top_p: float = 0.95  # official code
    """nucleus mass of the teacher"""
    max_new_tokens: int = 1024  # paper: sampling, teacher and evaluation
    """generation budget of sampling, teacher and greedy evaluation"""
    sample_batch_size: int = 64
    """sequences per generation batch"""
    epochs: int = 1  # paper: 1 epoch per iteration
    """SFT epochs per iteration"""
    train_sequences: int = 0
    """> 0: train every iteration on exactly this many sequences, drawn in shuffled passes over
    D_t, instead of --epochs passes (equal training compute for every strategy, whatever D_t)"""
    lr: float = 1e-5  # official: scripts/_template.sh
    """SFT learning rate (AdamW, linear warm-up then decay)"""
    warmup_ratio: float = 0.1  # paper
    """SFT warm-up fraction"""
    batch_size: int = 64  # official: 4 per GPU x 8 GPUs x accumulation 2
    """SFT sequences per optimiser step"""
    micro_batch_size: int = 4
    """SFT sequences per forward/backward (memory only)"""
    max_length: int = 1024  # paper
    """SFT prompt + target tokens kept"""
    lora_rank: int = 0
    """LoRA rank for every iteration's fine-tuning (0: full fine-tuning)"""
    seed: int = 42  # paper
    """seed for initialisation, shuffling and sampling"""


PRESETS = {
    # The toy world: iteration 0 is runs/toy-sft (`python sft.py --preset toy`); later iterations
    # fine-tune the toy base with toy SFT's lr. For a CPU: 3 iterations on 1500 questions the SFT
    # never saw (97% of its samples on its own 1000 are right: no tail to narrow), 24000 sequences
    # per iteration: the same training for every strategy, whatever the size of D_t.
    "toy": dict(model="runs/toy-base", sft_model="runs/toy-sft", task=UNSEEN_TASK,
                template="self_explore", out_dir="runs/toy-gsi", iterations=3, n_questions=1500,
                train_sequences=24000, lr=1e-3, batch_size=32, micro_batch_size=32,
                max_length=256, max_new_tokens=160, sample_batch_size=1024, seed=0),
}
TOY = PRESETS["toy"]

# The official prompt strings (src/utils.py); the plain and answer-driven ones: sft.TEMPLATES.
RATIONALE_DRIVEN = (
    "Below is a math problem with a reference answer. Using the reference answer as a guide, "
    "write your own answer.\n\n### Question:\n{question} \n\n### Reference Answer:\n{rationale}\n\n"
    "### Your detailed, complete and step-by-step answer:\n")
TEACHER_SYSTEM = (
    "You're a patient teacher who corrects mistakes and guides students, helping them find the "
    "correct answers on their own. For the following math problem, the original solution is "
    "incorrect. Please identify the incorrect step, explain why it is incorrect.\n")
TEACHER = ("### Question:\n{question}\n\n### Student's original wrong answer:\n{wrong}\n\n"
           "### Correct final answer:\n{rationale}\n\n### Your correction:\n")
STUDENT = (
    "Below is a correction to your previous solution. Review this carefully and use it to revise "
    "your solution. Ensure that it includes all necessary steps clearly and thoroughly.\n\n"
    "### Question:\n{question}\n\n### Your original wrong answer:\n{wrong}\n\n"
    "### Correction and guidance:\n{correction}\n\n"
    "### Your revised, complete step-by-step solution:\n")


# ALGO 5. the hints (official: src/utils.py, Query.generate_prompt and get_state_reset)
def gold_solution(template, example):
    """The gold rationale and the template's answer line, without GSM8K's `<<a=b>>` calculator
    annotations (the official data, data/inference/cot/gsm8k.json, has none)."""
    rationale = re.sub(r"<<[^<>]*>>", "", example.rationale)
    return sft.target_for(template, example._replace(rationale=rationale))


def answer_driven_prompt(template, example):
    """The plain prompt with the gold value after the question and one space, no label."""
    return sft.prompt_for(template, f"{example.question.strip()} {example.answer}")


def rationale_driven_prompt(example, gold_rationale):
    """The gold rationale (the whole reference solution) shown as a guide."""
    return RATIONALE_DRIVEN.format(question=example.question, rationale=gold_rationale)


def reset_unit(args):
    """--reset_by, or the official choice for --task: lines for GSM8K (and arith), else tokens."""
    if args.reset_by:
        return args.reset_by
    name = os.path.basename(args.task).lower()
    return "lines" if "gsm8k" in name or name.startswith("arith") else "tokens"


def state_reset_prefix(gold_rationale, round_index, reset_by, tokenizer=None):
    """The start of the gold rationale that round `round_index` (0-based) continues from.
    lines: the first k lines, k = 1, 2, ... per round; past the end, all lines but the last, then
    k = 1 again. tokens: the first 20, 40, 60, 80, 80, 20, ... % of its tokens (the official
    counter 0.2 + 0.2 + ... reaches 1.0 at round 5 and repeats 0.8)."""
    if reset_by == "lines":
        lines = gold_rationale.split("\n")
        k = min(round_index % len(lines) + 1, len(lines) - 1)
        return "\n".join(lines[:k]) + "\n"
    ids = tokenizer(gold_rationale, add_special_tokens=False)["input_ids"]
    proportion = (0.2, 0.4, 0.6, 0.8, 0.8)[round_index % 5]
    return tokenizer.decode(ids[:int(proportion * len(ids))])


def chat_prompt(tokenizer, system, user):
    """One fresh single-turn exchange, in the tokenizer's chat format if any (generate adds BOS)."""
    if not getattr(tokenizer, "chat_template", None):
        return f"{system}\n{user}"
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text.removeprefix(tokenizer.bos_token or "")


def interactive_prompts(examples, gold_rationales, wrongs, teacher_fn, stats):
    """The teacher critiques a wrong attempt against the gold rationale (the official `Correct
    final answer` holds the rationale, not the value); the student revises with the critique."""
    users = [TEACHER.format(question=e.question, wrong=w, rationale=r)
             for e, w, r in zip(examples, wrongs, gold_rationales)]
    critiques = teacher_fn(users)
    stats.update(teacher_samples=len(critiques),
                 teacher_tokens=sum(len(c.token_ids) for c in critiques))
    return [STUDENT.format(question=e.question, wrong=w, correction=c.text)
            for e, w, c in zip(examples, wrongs, critiques)]


# ALGO 6. correct = the official grader (official: src/eval_utils.py, get_answer -> answer_clean,
# compare_answer_with_groundtruth; MAmmoTH's cleaner), for sampling and evaluation alike
TRIGGERS = ("The answer is:", "The answer is", "the answer is")
CHOICE_SETS = ("aqua", "mathqa")
CHOICE_GOLDS = ("(a)", "(b)", "(c)", "(d)", "(e)", "(f)")


def answer_kind(task):
    """The official dataset name's cleaner: choice (AQuA, MathQA), math (MATH) or number (GSM8K,
    SVAMP; also arith and any other file). TheoremQA's cleaner (latex2sympy) is not implemented."""
    name = os.path.basename(task.rstrip("/")).lower()
    if any(choice in name for choice in CHOICE_SETS):
        return "choice"
    return "math" if name.startswith("math") else "number"


def python_number(text):
    """A number literal as Python's eval reads it (07 is a syntax error, 07.5 is not)."""
    if "." in text:
        return float(text)
    if re.fullmatch(r"-?0+[1-9]\d*", text):
        raise ValueError(f"{text} is no Python literal")
    return int(text)


def official_number(text):
    """delete_extra_zero: a number in its shortest float form (18.0 -> 18, 1/2 -> 0.5, and as
    officially 1e+20 -> 100.0); text that is no number (07/2, 5/0) is kept."""
    numerator, slash, denominator = text.partition("/")
    try:
        value = python_number(numerator) / python_number(denominator) if slash else float(text)
    except (ValueError, ZeroDivisionError, OverflowError):
        return text
    short = str(value).rstrip("0")
    return str(int(short[:-1])) if short.endswith(".") else str(float(short))


def boxed(text):
    """find_box: what follows the last `boxed`, to its closing brace, or up to a `$`."""
    rest = text.split("boxed")[-1]
    if not rest.startswith("{"):
        return rest.split("$")[0].strip()
    depth = 1
    for end, char in enumerate(rest[1:], 1):
        depth += {"{": 1, "}": -1}.get(char, 0)
        if depth == 0:
            return rest[1:end]
    return rest[1:]


def official_latex(text):
    """_strip_string (the Hendrycks MATH normaliser) with _fix_sqrt, _fix_fracs, _fix_a_slash_b."""
    replacements = (("\n", ""), ("\\!", ""), ("\\\\", "\\"), ("tfrac", "frac"), ("dfrac", "frac"),
                    ("\\left", ""), ("\\right", ""), ("^{\\circ}", ""), ("^\\circ", ""))
    for old, new in replacements:
        text = text.replace(old, new)
    text = text.strip("$").replace("\\$", "").split("\\text{ ")[0].replace("\\%", "")
    text = text.replace(" .", " 0.").replace("{.", "{0.")
    if text.startswith("."):
        text = "0" + text
    sides = text.split("=")
    if len(sides) == 2 and len(sides[0]) <= 2:  # "k = 5" -> "5"
        text = sides[1]
    first, *rest = text.split("\\sqrt")
    for piece in rest:  # \sqrt3 -> \sqrt{3}
        wrapped = piece[:1] not in ("", "{")
        first += "\\sqrt" + (f"{{{piece[0]}}}{piece[1:]}" if wrapped else piece)
    text = first.replace(" ", "")
    fixed, *rest = text.split("\\frac")
    for piece in rest:  # \frac12 -> \frac{1}{2}, \frac1{2} -> \frac{1}{2}
        if piece[:1] in ("", "{"):
            fixed += "\\frac" + piece
        elif len(piece) < 2:
            return text  # officially: the string as it was before the \frac fixes
        elif piece[1] == "{":
            fixed += f"\\frac{{{piece[0]}}}{piece[1:]}"
        else:
            fixed += f"\\frac{{{piece[0]}}}{{{piece[1]}}}{piece[2:]}"
    match = re.fullmatch(r"(-?\d+)/(-?\d+)", fixed)
    if match and fixed == f"{int(match[1])}/{int(match[2])}":  # 3/4 -> \frac{3}{4}, not 03/4
        return f"\\frac{{{int(match[1])}}}{{{int(match[2])}}}"
    return fixed


def math_answer(text, after_trigger):
    """extract_math_answer: a boxed answer; after a trigger, the right of the last `=` (a number
    and a unit word: the number); else the last number."""
    if "boxed" in text:
        return official_latex(boxed(text))
    if after_trigger:
        text = text.split("=")[-1].strip()
        with_unit = re.match(r"[\d.]+\s\D+$", text)
        return official_latex(text.split(" ")[0] if with_unit else text)
    numbers = re.findall(r"-?\d*\.?\d+", text)
    return official_latex(numbers[-1] if numbers else "")


def official_answer(text, kind="number"):
    """answer_clean: the text after the last trigger (a text that repeats a trigger is first cut
    at its first blank line), cleaned for `kind`; the first candidate after a trigger, else the
    last of the whole text; "" if none. `The answer is 18 dollars.` -> 18, `$1,000` -> 1000."""
    text = (text or "").strip("\n")
    if any(text.count(trigger) > 1 for trigger in TRIGGERS):  # officially: few-shot output
        text = text.split("\n\n")[0]
    pieces = re.split("|".join(TRIGGERS), text)
    after_trigger = len(pieces) > 1
    tail = pieces[-1].strip("\n").rstrip(".").rstrip("/").strip(" ")
    if kind == "choice":
        candidates = re.findall(r"\b([A-J])\b", tail.upper()) or [tail.strip().strip(".")]
    elif kind == "math":
        candidates = [math_answer(tail, after_trigger)]
    else:
        numbers = re.findall(r"-?\d+/?\.?\d*", tail.replace(",", ""))
        candidates = [official_number(number) for number in numbers]
    if not candidates:
        return ""
    chosen = candidates[0] if after_trigger else candidates[-1]
    return chosen.rstrip(".").rstrip("/")


def without_text_command(answer):
    """`\\text{cm}` -> `cm`, as compare_answer_with_groundtruth strips it."""
    if "\\text{" not in answer:
        return answer
    return answer.replace("\\text{", "").rstrip("}")


def official_same(answer, gold):
    """compare_answer_with_groundtruth without a numeric gold (as every official call): equal
    lower-cased strings (a choice gold such as `(b)` is looked up in the answer). The gold
    answer_value is not cleaned: a gold `18.0` matches no answer."""
    answer = without_text_command(answer or "").lower()
    gold = without_text_command(gold or "").lower()
    if gold in CHOICE_GOLDS:
        return gold in answer
    return answer == gold


def is_correct(text, answer, kind="number"):
    return official_same(official_answer(text, kind), answer)


# ALGO 3-5. sampling, the tail questions, guided re-sampling (official: inference*.py)
def n_correct(pool):
    return sum(sample["correct"] for sample in pool)


def hard_questions(pools, min_correct):
    """Step 4: fewer than min_correct of its samples are correct (it need not have 0)."""
    return [i for i, pool in enumerate(pools) if n_correct(pool) < min_correct]


def last_wrong(pool):
    """The question's last wrong prediction; a hard question has one since min_correct <= n."""
    return next(sample["text"] for sample in reversed(pool) if not sample["correct"])


def guided_prompts(args, examples, pools, round_index, plain, gold_rationale, teacher_fn,
                   tokenizer, stats):
    """One round of step 5: (prompt, prefix of the stored response) per hard question."""
    no_prefix = [""] * len(examples)
    if args.strategy == "brute_force":  # no hint: more plain samples
        return [plain(e) for e in examples], no_prefix
    if args.strategy == "answer_driven":
        return [answer_driven_prompt(args.template, e) for e in examples], no_prefix
    if args.strategy == "rationale_driven":
        prompts = [rationale_driven_prompt(e, gold_rationale(e)) for e in examples]
        return prompts, no_prefix
    if args.strategy == "state_reset":  # the model continues the gold prefix; both are stored
        unit = reset_unit(args)
        prefixes = [state_reset_prefix(gold_rationale(e), round_index, unit, tokenizer)
                    for e in examples]
        return [plain(e) + prefix for e, prefix in zip(examples, prefixes)], prefixes
    # interactive, a deviation: the last WRONG prediction (officially the last one)
    wrongs = [last_wrong(pool) for pool in pools]
    rationales = [gold_rationale(e) for e in examples]
    return interactive_prompts(examples, rationales, wrongs, teacher_fn, stats), no_prefix


def answer_in(text, answer):
    """The gold answer written in `text` as a whole number (not a part of a longer one)."""
    return re.search(rf"(?<![\d.]){re.escape(answer)}(?![\d.])", text) is not None


def repeat(items, n):
    """Each item n times in a row: the prompt-major order of sample_fn's completions."""
    return [item for item in items for _ in range(n)]


def collect_samples(examples, args, sample_fn, plain, gold_rationale, teacher_fn=None,
                    tokenizer=None):
    """Steps 3-5. sample_fn(prompts, n) -> n Completions per prompt, prompt-major. Returns each
    question's pool of {prompt, text, correct, resampled} and the costs: samples and generated
    tokens (a state-reset prefix is not generated, so not counted), the teacher's apart."""
    pools = [[] for _ in examples]
    stats = Counter()
    kind = answer_kind(args.task)

    def add(indices, prompts, completions, prefixes, resampled):
        for i, prompt, completion, prefix in zip(indices, prompts, completions, prefixes):
            text = prefix + completion.text
            answer = examples[i].answer
            correct = is_correct(text, answer, kind)
            pools[i].append(dict(prompt=prompt, text=text, correct=correct, resampled=resampled))
            # how often a correct state-reset sample had the answer in its gold prefix already
            stats["reset_copied"] += bool(prefix) and correct and answer_in(prefix, answer)
        stats.update(samples=len(completions), tokens=sum(len(c.token_ids) for c in completions))

    # ALGO 3. n samples per question with the plain prompt
    n = args.n_samples
    prompts = [plain(e) for e in examples]
    no_prefix = [""] * n * len(examples)
    add(repeat(range(len(examples)), n), repeat(prompts, n), sample_fn(prompts, n), no_prefix,
        False)
    # ALGO 4-5. one sample per hard question per round; the hard set is recomputed every round
    unguided_rounds = {"none": 0, "brute_force": args.brute_force_rounds}
    rounds = unguided_rounds.get(args.strategy, args.guided_rounds)
    for round_index in tqdm(range(rounds), desc="re-sample hard questions", leave=False):
        hard = hard_questions(pools, args.min_correct)
        if not hard:
            break
        hard_examples = [examples[i] for i in hard]
        hard_pools = [pools[i] for i in hard]
        prompts, prefixes = guided_prompts(args, hard_examples, hard_pools, round_index, plain,
                                           gold_rationale, teacher_fn, tokenizer, stats)
        add(hard, prompts, sample_fn(prompts, 1), prefixes, True)
        stats.update(rounds=1, resampled=len(hard))
    return pools, stats


def training_pairs(examples, pools, plain):
    """Step 6: every correct sample, no dedup, no cap, with the PLAIN prompt: the hint never
    reaches the training data. The official train.py strips the response."""
    pairs = []
    for example, pool in zip(examples, pools):
        pairs += [(plain(example), s["text"].strip()) for s in pool if s["correct"]]
    return pairs


# PLUMBING measurement
def fixed_budget(pairs, n_sequences, seed):
    """n_sequences pairs from shuffled passes over `pairs`: each used equally often, up to one."""
    rng = random.Random(seed)
    drawn = []
    while pairs and len(drawn) < n_sequences:
        drawn += rng.sample(pairs, len(pairs))
    return drawn[:n_sequences]


def histogram(initial, final, n):
    """Correct samples per question as text bars: plain samples, then the pool after re-sampling."""
    before = Counter(initial)
    after = Counter(final)
    scale = 40 / max(max(before.values()), 1)
    rows = [f"  {'correct':>7}  {'questions (plain samples)':<47} after re-sampling"]
    for k in range(n + 1):
        bar = "#" * round(before[k] * scale)
        rows.append(f"  {k:>5}/{n}  {before[k]:5d} {bar:<41} {after[k]:5d}")
    return "\n".join(rows)


def plain_counts(pools):
    """Correct samples per question among the n plain samples of step 3."""
    return [n_correct([s for s in pool if not s["resampled"]]) for pool in pools]


def share(flags):
    return sum(flags) / max(len(flags), 1)


def iteration_metrics(args, pools, hard_at_start, hard_at_iter0, pairs):
    """Coverage (the official "Pass@1 query": >= 1 correct sample), of all and of the hard
    questions, the histograms of correct counts, and where the next training set comes from."""
    n = args.n_samples
    initial = plain_counts(pools)
    final = [n_correct(pool) for pool in pools]
    resampled_correct = sum(s["correct"] for pool in pools for s in pool if s["resampled"])
    metrics = dict(
        sample_accuracy=sum(initial) / (n * len(pools)),
        coverage=share([c > 0 for c in initial]), coverage_after=share([c > 0 for c in final]),
        hard=len(hard_at_start),
        hard_coverage_before=share([initial[i] > 0 for i in hard_at_start]),
        hard_coverage=share([final[i] > 0 for i in hard_at_start]),
        hard_resolved=share([final[i] >= args.min_correct for i in hard_at_start]),
        resampled_correct=resampled_correct, data=len(pairs),
        data_from_hard=sum(final[i] for i in hard_at_start),
        data_from_iter0_hard=sum(final[i] for i in hard_at_iter0),
        hist=[Counter(initial)[k] for k in range(n + 1)],
        hist_after=[Counter(final)[k] for k in range(n + 1)],
    )
    return metrics, histogram(initial, final, n)


def check_args(args):
    """Bad flags stop before any work."""
    positive = ["n_samples", "temperature", "max_new_tokens", "sample_batch_size", "epochs", "lr",
                "batch_size", "micro_batch_size", "max_length"]
    at_least_zero = ["n_questions", "guided_rounds", "brute_force_rounds", "train_sequences",
                     "lora_rank"]
    check_common(args, positive=positive, at_least_zero=at_least_zero)
    if args.strategy not in STRATEGIES:
        fail(f"unknown --strategy {args.strategy!r}: use one of {', '.join(STRATEGIES)}")
    if args.template not in sft.TEMPLATES:
        fail(f"unknown --template {args.template!r}: use one of {', '.join(sft.TEMPLATES)}")
    if args.strategy == "interactive" and not args.teacher:
        fail("--strategy interactive needs --teacher: a model path, alias or hub id, or `self` "
             "for the policy")
    if args.reset_by not in ("", "lines", "tokens"):
        fail(f"unknown --reset_by {args.reset_by!r}: use lines or tokens ('' = by --task)")
    if not 1 <= args.min_correct <= args.n_samples:
        fail(f"--min_correct {args.min_correct} must lie in 1..--n_samples ({args.n_samples})")
    if args.iterations < 1:
        fail("--iterations must be at least 1 (iteration 0 is the SFT model)")
    if args.train_sequences and args.epochs != Args.epochs:
        fail(f"--epochs {args.epochs} has no effect with --train_sequences "
             f"{args.train_sequences} (the toy preset sets it): drop --epochs, or pass "
             f"--train_sequences 0 to use it")
    if args.sft_model:  # sampled from at once: it must already solve some questions
        check_trained(args.sft_model, "--sft_model")


def main(argv=None):
    args = parse_args(Args, PRESETS, argv)
    check_args(args)
    # PLUMBING data and the teacher first, so a bad name stops before any work
    questions = load_task(args.task, "train")
    test_set = load_task(args.task, "test", args.test_task)
    questions = questions[:args.n_questions] if args.n_questions else questions
    sft_set = [] if args.sft_model else load_task(args.sft_task or args.task, "train")
    if args.strategy == "interactive" and args.teacher != "self":
        teacher, teacher_tokenizer = load_model(args.teacher, seed=args.seed, frozen=True)

    def plain(example):
        return sft.prompt_for(args.template, example.question)

    # PLUMBING the first model, loaded once here, says whether prompts and lengths fit its context
    first, tokenizer = load_model(args.sft_model or args.model, seed=args.seed, frozen=True)
    prompts = {"test question": [plain(e) for e in test_set],
               "training question": [plain(e) for e in questions]}
    check_context(first, tokenizer, prompts, max_length=args.max_length)
    del first
    # PLUMBING one run per folder; --resume continues it
    state = start_run(args)
    logger = Logger(args.out_dir)
    extract_test = partial(official_answer, kind=answer_kind(args.test_task or args.task))

    def gold_rationale(example):  # ends in "The answer is x"
        return gold_solution(args.template, example)

    recipe = sft.Args(template=args.template, epochs=1 if args.train_sequences else args.epochs,
                      lr=args.lr, warmup_ratio=args.warmup_ratio, batch_size=args.batch_size,
                      micro_batch_size=args.micro_batch_size, max_length=args.max_length,
                      out_dir=args.out_dir, seed=args.seed)
    gold_pairs = [(plain(e), gold_rationale(e)) for e in sft_set]
    print(f"GSI ({args.strategy}): {len(questions)} training questions of {args.task}, "
          f"{len(test_set)} test questions")
    # PLUMBING a resumed run starts after its last finished iteration, with the data that one made
    fresh = dict(t=0, pairs=gold_pairs, totals=Counter(), hard_at_iter0=[])
    done = load_state(state) if state else fresh
    pairs = done["pairs"]
    totals = done["totals"]
    hard_at_iter0 = done["hard_at_iter0"]

    for t in range(done["t"], args.iterations):
        started = time.time()
        # ALGO 1. M_t = SFT(base model, D_t); every iteration restarts from the base model
        if t == 0 and args.sft_model:
            model, tokenizer = load_model(args.sft_model, seed=args.seed, frozen=True)  # sampled
        else:
            model, tokenizer = load_model(args.model, lora_rank=args.lora_rank, seed=args.seed)
            budget = pairs
            if args.train_sequences:
                budget = fixed_budget(pairs, args.train_sequences, args.seed + t)
            sft.train(model, tokenizer, budget, recipe, logger=logger)
            save(model, tokenizer, os.path.join(args.out_dir, f"iter-{t}"), args)
        # ALGO 2. greedy test accuracy with the plain prompt, graded officially
        result = evaluate(model, tokenizer, test_set, plain, max_new_tokens=args.max_new_tokens,
                          batch_size=args.sample_batch_size, extract=extract_test,
                          same=official_same)
        accuracy = result["accuracy"]

        # ALGO 3-5. sample, find the tail questions, re-sample them with the strategy
        def sample_fn(prompts, n):
            # each rank samples its share; every rank gets all the samples, so decides alike
            return generate(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens, n=n,
                            temperature=args.temperature, batch_size=args.sample_batch_size,
                            sharded=True)

        def teacher_fn(users):
            policy_teaches = args.teacher == "self"
            model_t = model if policy_teaches else teacher
            tokenizer_t = tokenizer if policy_teaches else teacher_tokenizer
            prompts = [chat_prompt(tokenizer_t, TEACHER_SYSTEM, u) for u in users]
            return generate(model_t, tokenizer_t, prompts, max_new_tokens=args.max_new_tokens,
                            temperature=args.teacher_temperature, top_p=args.teacher_top_p,
                            batch_size=args.sample_batch_size, sharded=True)
        torch.manual_seed((args.seed + t) * WORLD + RANK)  # a sampling stream per iteration, rank
        pools, stats = collect_samples(questions, args, sample_fn, plain, gold_rationale,
                                       teacher_fn, tokenizer)
        counts = plain_counts(pools)
        hard_at_start = [i for i, count in enumerate(counts) if count < args.min_correct]
        hard_at_iter0 = hard_at_iter0 if t else hard_at_start
        # ALGO 6. D_{t+1} = every correct sample, with the plain prompt
        pairs = training_pairs(questions, pools, plain)

        # PLUMBING measure, log, keep the samples
        rows = [dict(question=e.question, answer=e.answer, samples=pool)
                for e, pool in zip(questions, pools)]
        logger.samples(rows, f"samples-{t}.jsonl")
        metrics, bars = iteration_metrics(args, pools, hard_at_start, hard_at_iter0, pairs)
        totals.update(samples=stats["samples"], tokens=stats["tokens"],
                      teacher_samples=stats["teacher_samples"])
        print(f"iteration {t}: correct samples per question (tail narrowing: mass moves to 0 and "
              f"{args.n_samples})\n{bars}")
        logger.log(f"iter {t}", test_accuracy=accuracy, **metrics, rounds=stats["rounds"],
                   samples=stats["samples"], tokens=stats["tokens"], resampled=stats["resampled"],
                   teacher_samples=stats["teacher_samples"],
                   teacher_tokens=stats["teacher_tokens"], reset_copied=stats["reset_copied"],
                   total_samples=totals["samples"], total_tokens=totals["tokens"],
                   total_teacher_samples=totals["teacher_samples"],
                   seconds=round(time.time() - started, 1))
        save_state(os.path.join(args.out_dir, "state.pt"), t=t + 1, pairs=pairs, totals=totals,
                   hard_at_iter0=hard_at_iter0)


if __name__ == "__main__":
    main()
