"""Self-Explore: Enhancing Mathematical Reasoning in Language Models with Fine-grained Rewards.

Hyeonbin Hwang, Doyoung Kim, Seungone Kim, Seonghyeon Ye, Minjoon Seo (KAIST AI, CMU), EMNLP 2024,
arXiv 2404.10346. Official code: hbin0701/Self-Explore (commit 54b8ba9). PAPERS.md section 3.

An outcome-level pair (a correct against a wrong rationale) says that the wrong one is worse, not
where it went wrong. Self-Explore lets the model find that place itself: from every step prefix of
a wrong rationale it samples k continuations, and the first prefix from which none reaches the
right answer marks the "first pit". DPO then trains on step-level pairs: prompt = question + the
steps before the pit, rejected = the pit step, chosen = a correct continuation from the step before.

    python self_explore.py --model deepseek-math-7b                   # GSM8K, the paper's settings
    python self_explore.py --model deepseek-math-7b --pairs outcome   # the DPO baseline on D_pair
    python self_explore.py --preset toy [--pairs outcome]   # tiny on arith from runs/toy-sft, CPU

Implements 3.1 steps 1-10 (GSM8K) and Eq. (DPO) of 3.2 with its tokenisation; every stage saves its
output under --out_dir, and a rerun reuses every finished stage made with the same settings.
Quirks of the official code reproduced by default: EOS on chosen, not on rejected (--eos_on_rejected);
a rejected text of several lines is cut before `The answer is` and stripped (--cut_rejected_answer).
SFT and RFT as the official sft/: AdamW eps 1e-6, examples of 1024+ tokens dropped (not cut).
Bugs not reproduced: the filter meant to drop chosen candidates that contain the rejected step tests
list membership and never fires (here it tests the text: --drop_chosen_with_rejected_step); eval()
of calculator annotations (here an AST evaluator of + - * /); the plumbing (1000 samples per process,
hard-coded GPU shards, sample count switched by `temperature == 0.7`, results indexed by the wrong counter).
Deviations (PAPERS 3.6, 3.7): the official GSM8K grader (official_answer: the first `The answer is`
number) also grades the exploration (the code compares raw strings there); samples are sorted after
dedup (the code: set order); a pit on the answer line (empty rejected after the cut) is dropped and
counted; a text without `<<lhs=rhs>>` annotations (arith) uses its `lhs=rhs` lines as equations; the
reference is the RFT model before its first DPO update, its log-probs computed once (no second
copy); GSM8K's step split only (not MATH's, 3.3); one round; the last epoch of each stage is the
result (SFT 2, RFT 1, DPO 3 epochs, 3.7), SFT's and RFT's linear decay computed for 5
epochs as in the official run_ft.sh and run_rft.sh (an early checkpoint of that schedule); --n_val holds out training questions to tune the toy
without the test split.
"""
import ast
import json
import math
import operator
import os
import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass

import torch

import sft
from tqdm.auto import tqdm

from common import (RANK, Logger, all_reduce, batch_sequences, check_args, check_context,
                    check_trained, evaluate, fail, gather, generate, gradient_checkpointing,
                    linear_schedule, load_model, load_task, parse_args, save, shard, token_logprobs, wrap_model)


@dataclass
class Args:
    """Run Self-Explore: SFT, sample, RFT, find each wrong rationale's first pit, step-level DPO;
    logs each stage's greedy accuracy, and a rerun resumes after the last finished stage."""
    model: str = "deepseek-math-7b"  # paper: Mistral-7B, Llemma-7B, DeepSeek-Math-7B-base
    """base model that SFT starts from: an alias, a hub id, a local checkpoint, or tiny"""
    task: str = "gsm8k"  # paper: GSM8K (MATH's step split is not implemented)
    """gsm8k, arith, or a .jsonl/.json file with question, rationale and answer"""
    test_task: str = ""
    """test split: a .jsonl/.json file, a folder or a task ('' = --task's; a lone file has none)"""
    out_dir: str = "runs/self-explore"
    """run folder: every stage's JSONL and checkpoint; a rerun resumes from it"""
    sft_model: str = ""
    """an already fine-tuned model: skip stage 1 and sample from it"""
    base_model: str = ""  # official code: RFT from the base model
    """model that RFT starts from ('' = --model)"""
    pairs: str = "gpair"
    """DPO data: gpair (Self-Explore's D_g-pair) or outcome (D_pair: the paper's DPO baseline)"""
    n_val: int = 0
    """hold out the last n training questions from every stage and report accuracy on them"""
    loss_on_prompt: bool = True  # official code: loss_on_prefix=True
    """SFT and RFT also train on the question tokens"""
    sft_epochs: int = 2  # paper: SFT 2 epochs (PAPERS 3.7)
    """SFT epochs"""
    rft_epochs: int = 1  # paper: RFT 1 epoch (PAPERS 3.7)
    """RFT epochs"""
    sft_schedule_epochs: int = 5  # official code: scripts/gsm8k/sft/run_ft.sh and run_rft.sh
    """epochs the SFT and RFT LR schedules are computed for (0: the epochs run)"""
    sft_lr: float = 1e-5  # paper: 1e-5 (1e-6 for Mistral)
    """SFT and RFT learning rate (AdamW, linear decay)"""
    sft_warmup_ratio: float = 0.0  # paper: no warm-up
    """SFT and RFT warm-up fraction"""
    sft_batch_size: int = 64  # paper: 16 x 4 GPUs
    """SFT and RFT sequences per optimiser step"""
    n_samples: int = 100  # paper: N = 100
    """rationales sampled per training question for RFT and D_pair"""
    temperature: float = 0.7  # paper: sampling and exploration, top_p 1
    """sampling temperature of stage 2 (stopped at `Problem:`, as the paper) and of exploration (no stop)"""
    max_new_tokens: int = 512  # paper: GSM8K
    """generation budget of sampling, exploration and greedy evaluation"""
    sample_batch_size: int = 64
    """sequences per generation batch (sampling, exploration, evaluation)"""
    max_rft_per_question: int = 8  # paper
    """distinct correct rationales kept per question"""
    explore_k: int = 4  # paper: k = 4
    """completions sampled from each step prefix"""
    drop_chosen_with_rejected_step: bool = True  # official code: intended, never fires (a bug)
    """drop chosen candidates whose text contains the rejected step"""
    cut_rejected_answer: bool = True  # official code: deliberate
    """cut a multi-line rejected text before `The answer is`"""
    eos_on_rejected: bool = False  # official code: deliberate, EOS on chosen only
    """append EOS to the rejected text too"""
    beta: float = 0.1  # paper
    """DPO beta"""
    dpo_lr: float = 1e-6  # paper: 1e-6 (1e-7 for Mistral)
    """DPO learning rate (RMSprop)"""
    dpo_epochs: int = 3  # paper
    """DPO epochs"""
    dpo_batch_size: int = 32  # paper: 8 x 4 GPUs
    """DPO pairs per optimiser step"""
    micro_batch_size: int = 8  # paper: DPO 8 per GPU
    """SFT/RFT sequences or DPO pairs per forward/backward (memory only: gradients add up per optimiser step)"""
    max_length: int = 384  # paper: GSM8K
    """DPO prompt + response tokens"""
    max_prompt_length: int = 128  # paper: GSM8K
    """DPO prompt tokens kept (from the end) when prompt + response is too long"""
    lora_rank: int = 0
    """LoRA rank for every training stage (0: full fine-tuning)"""
    seed: int = 42  # paper: DPO seed
    """seed for initialisation, sampling and shuffling (each stage reseeds)"""


# The toy world, from runs/toy-sft (`python sft.py --preset toy`): RFT trains a fresh tiny with toy SFT's recipe
# (8 epochs ~ its 750 steps, decaying over all 8); DPO lr 1e-5: of 1e-6..1e-4 the smallest whose
# reward margins clearly grow.
TOY = dict(model="tiny", sft_model="runs/toy-sft", task="arith", out_dir="runs/toy-self-explore", n_val=200,
           loss_on_prompt=False, rft_epochs=8, sft_schedule_epochs=0, sft_lr=3e-3,
           sft_warmup_ratio=0.1, sft_batch_size=32, micro_batch_size=32, n_samples=8,
           max_new_tokens=96, sample_batch_size=512, dpo_lr=1e-5, seed=0)


# ---------------------------------------------------------------- ALGO: RFT set and D_pair (3.1 steps 3, 5)
ARITHMETIC = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
              ast.USub: operator.neg, ast.UAdd: operator.pos}


def safe_eval(expression):
    """The value of an arithmetic expression (numbers, + - * /, parentheses) from its AST; None otherwise."""
    def walk(node):
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, (ast.BinOp, ast.UnaryOp)) and type(node.op) in ARITHMETIC:
            operands = (node.left, node.right) if isinstance(node, ast.BinOp) else (node.operand,)
            return ARITHMETIC[type(node.op)](*map(walk, operands))
        raise ValueError(f"not arithmetic: {ast.dump(node)}")
    try:
        return float(walk(ast.parse(expression.strip(), mode="eval").body))
    except (SyntaxError, ValueError, TypeError, ZeroDivisionError, OverflowError):
        return None


def equations(text):
    """Step 3: the `<<lhs=rhs>>` calculator annotations; without any, the whole lines `lhs=rhs` (arith)."""
    return re.findall(r"<<([^>]*)>>", text) or re.findall(r"^[\d .+\-*/()]+=[\d .\-]+$", text, re.MULTILINE)


def equations_hold(text):
    """Step 3: every equation satisfies |lhs - rhs| < 1e-3 (get_rft_data.py check_equation)."""
    values = [[safe_eval(side) for side in equation.partition("=")[::2]] for equation in equations(text)]
    return all(None not in pair and abs(pair[0] - pair[1]) < 1e-3 for pair in values)


def edit_distance(a, b):
    """Character-level Levenshtein distance (PAPERS 3.7), bit-parallel (Hyyro 2001): DP columns as integer bits."""
    if not a or not b:
        return len(a) + len(b)
    match_bits = {char: sum(1 << i for i, other in enumerate(a) if other == char) for char in set(a)}
    all_bits, top = (1 << len(a)) - 1, 1 << (len(a) - 1)
    plus, minus, distance = all_bits, 0, len(a)  # vertical +1 / -1 differences of the current column
    for char in b:
        eq = match_bits.get(char, 0)
        x_vertical, x_horizontal = eq | minus, (((eq & plus) + plus) ^ plus) | eq
        h_plus, h_minus = minus | ~(x_horizontal | plus), plus & x_horizontal
        distance += bool(h_plus & top) - bool(h_minus & top)
        h_plus, h_minus = (h_plus << 1) | 1, h_minus << 1
        plus, minus = (h_minus | ~(x_vertical | h_plus)) & all_bits, h_plus & x_vertical
    return distance


def standard_number(text):
    """The official normal form (utils_ans.py standardize_value_str): no commas, no trailing zeros
    after a decimal point nor a trailing point, `.5` as `0.5`; None if it is not a number."""
    value = text.replace(",", "")
    if "." in value:
        value = value.rstrip("0")
    value = "0" + value if value.startswith(".") else value
    value = value.rstrip(".")
    return value if value and safe_eval(value) is not None else None


def official_answer(text):
    """The official GSM8K answer (eval/gsm8k/utils_ans.py): the FIRST `The answer is` (colon
    optional) and a number, in standard form; `The answer is 18 dollars.` gives 18, `$18` none."""
    match = re.search(r"The answer is:?\s*(-?[0-9.,]+)", text or "")
    return standard_number(match.group(1)) if match else None


def same_answer(answer, gold):
    """The official comparison: equal strings in standard form."""
    return answer is not None and answer == standard_number(gold)


def is_correct(text, gold):
    return same_answer(official_answer(text), gold)


def rft_rationales(samples, gold, max_per_question):
    """Step 3: exact dedup (then sorted), correct answer, equations hold, one per equation signature (among
    duplicates the one farthest, in summed edit distance, from the other kept ones), at most 8."""
    kept = {}
    for text in (text for text in sorted(set(samples)) if is_correct(text, gold) and equations_hold(text)):
        signature = "|".join(equations(text)).replace(" ", "")
        others = [other for key, other in kept.items() if key != signature]
        if signature not in kept or (sum(edit_distance(text, o) for o in others)
                                     > sum(edit_distance(kept[signature], o) for o in others)):
            kept[signature] = text
    return list(kept.values())[:max_per_question]


def outcome_pairs(prompt, chosen_texts, samples, gold):
    """Step 5 (D_pair): each chosen text with the wrong sample farthest from it by edit distance; the pool holds
    every distinct wrong sample (unparsable ones included) and each is used once."""
    pool, pairs = sorted({text for text in samples if not is_correct(text, gold)}), []
    for chosen in chosen_texts[:len(pool)]:  # the pool loses one text per pair
        rejected = max(pool, key=lambda text: edit_distance(chosen, text))
        pool.remove(rejected)
        pairs.append(dict(prompt=prompt, answer=gold, chosen=chosen, rejected=rejected))
    return pairs


# ---------------------------------------------------------------- ALGO: first pit and D_g-pair (steps 6-8)
def split_steps(rationale):
    """Step 6 (GSM8K): the non-empty lines, each `strip() + "\\n"`."""
    return [line.strip() + "\n" for line in rationale.split("\n") if line.strip()]


def find_first_pits(prompts, steps, golds, sample_fn, k, max_steps):
    """Step 7: for j = 1, 2, ... sample k completions from prompt + steps[:j]; the first j where none reaches the
    gold answer is the pit w (None: no pit). Batched by depth: one sample_fn(prefixes, k) call per j, over the
    rationales still searching. Returns the pits and, per rationale, the k completions of each explored prefix."""
    pits, explored, searching = [None] * len(prompts), [[] for _ in prompts], list(range(len(prompts)))
    for depth in range(1, max_steps + 1):
        searching = [i for i in searching if pits[i] is None and depth <= len(steps[i])]
        if not searching:
            break
        texts = sample_fn([prompts[i] + "".join(steps[i][:depth]) for i in searching], k)
        for row, i in enumerate(searching):
            explored[i].append(texts[row * k:(row + 1) * k])
            if not any(is_correct(text, golds[i]) for text in explored[i][-1]):
                pits[i] = depth
    return pits, explored


def step_pairs(pairs, pits, explored, drop_chosen_with_rejected_step, counts):
    """Step 8 (form_gpair) on the explored D_pair pairs. No pit: dropped. w = 1: prompt = question, rejected =
    step 1, chosen = the pair's correct rationale. w > 1: prompt = question + steps 1..w-1, rejected = step w,
    chosen = the shortest correct completion from prefix w-1 not yet used as chosen for this question. A pair is
    kept only if its chosen and its rejected texts are both new for its question (the prompt of the D_pair pair)."""
    used_chosen, seen_chosen, seen_rejected, out = defaultdict(set), defaultdict(set), defaultdict(set), []
    for pair, pit, completions in zip(pairs, pits, explored):
        question = pair["prompt"]
        if pit is None:
            counts["no_pit"] += 1
            continue
        steps = split_steps(pair["rejected"])
        prompt, rejected, chosen = pair["prompt"] + "".join(steps[:pit - 1]), steps[pit - 1], pair["chosen"]
        if pit > 1:
            candidates = sorted((text for text in completions[pit - 2] if is_correct(text, pair["answer"])
                                 and text not in used_chosen[question]
                                 and not (drop_chosen_with_rejected_step and rejected.strip() in text)), key=len)
            if not candidates:
                counts["no_chosen"] += 1
                continue
            chosen = candidates[0]
            used_chosen[question].add(chosen)
        if chosen in seen_chosen[question] or rejected in seen_rejected[question]:
            counts["duplicate"] += 1
            continue
        seen_chosen[question].add(chosen)
        seen_rejected[question].add(rejected)
        out.append(dict(prompt=prompt, answer=pair["answer"], chosen=chosen, rejected=rejected, pit=pit))
    return out


# ---------------------------------------------------------------- ALGO: DPO (3.2, step 9)
def cut_answer_line(rejected):
    """3.2 quirk (prepare_dataset.py): a rejected text of several lines loses `The answer is ...`, then is stripped."""
    if "The answer is" in rejected and len(rejected.split("\n")) > 1:
        return rejected[:rejected.index("The answer is")].strip()
    return rejected


def tokenize_dpo_pair(tokenizer, pair, args):
    """3.2: BOS + prompt.rstrip("\\n") + "\\n"; EOS on chosen only (quirk); trl 0.7 truncation: the prompt keeps its
    last max_prompt_length tokens if prompt + longer response is too long, then the responses are cut."""
    prompt = pair["prompt"].rstrip("\n") + "\n"
    prompt_ids, chosen_ids = sft.encode_pair(tokenizer, prompt, pair["chosen"])
    rejected_ids = sft.encode_pair(tokenizer, prompt, pair["rejected"])[1][:None if args.eos_on_rejected else -1]
    longer = max(len(chosen_ids), len(rejected_ids))
    if len(prompt_ids) + longer > args.max_length:
        prompt_ids = prompt_ids[-args.max_prompt_length:]
    if len(prompt_ids) + longer > args.max_length:
        room = args.max_length - args.max_prompt_length
        chosen_ids, rejected_ids = chosen_ids[:room], rejected_ids[:room]
    return prompt_ids, chosen_ids, rejected_ids


def pair_logprobs(model, rows, pad_id):
    """[B, 2] log pi(y+|x), log pi(y-|x) in one forward, each the SUM of its response-token log-probs (PAPERS 7.8)."""
    prompts, chosen, rejected = zip(*rows)
    input_ids, attention_mask, response_mask = batch_sequences(prompts * 2, chosen + rejected, pad_id, model.device)
    sums = (token_logprobs(model, input_ids, attention_mask) * response_mask).sum(-1)
    return torch.stack(sums.split(len(rows)), dim=1)


def dpo_loss(policy, reference, beta):
    """Eq. (DPO) 3.2: L = -log sigmoid(beta [(log pi(y+|x) - log ref(y+|x)) - (log pi(y-|x) - log ref(y-|x))]) per
    pair, with the implicit rewards beta (log pi - log ref) of chosen and rejected ([B, 2] inputs)."""
    rewards = beta * (policy - reference)
    return -torch.nn.functional.logsigmoid(rewards[:, 0] - rewards[:, 1]), rewards.detach()


def train_dpo(model, tokenizer, data, args, logger):
    """Step 9 with 3.5's recipe: RMSprop, linear schedule with 10% warm-up, gradient clipping, dropout off."""
    for module in model.modules():  # dropout off, module by module (3.5)
        if isinstance(module, torch.nn.Dropout) or hasattr(module, "attention_dropout"):
            module.p = module.attention_dropout = 0.0
    gradient_checkpointing(model, model.device.type == "cuda")  # left on: saved next
    size, mine = args.micro_batch_size, shard(data)
    with torch.no_grad():  # the reference: the starting (RFT) model, scored once; each rank scores its share
        reference = torch.cat([pair_logprobs(model, mine[i:i + size], tokenizer.pad_token_id) for i in range(0, len(mine), size)])
        reference = torch.tensor(gather(reference.tolist(), len(data)), device=model.device)
    policy = wrap_model(model)  # DDP or FSDP2 under torchrun
    optimizer = torch.optim.RMSprop([p for p in policy.parameters() if p.requires_grad], lr=args.dpo_lr)
    total = math.ceil(len(data) / args.dpo_batch_size) * args.dpo_epochs
    warmup = math.ceil(0.1 * total)  # paper: warm-up ratio 0.1, rounded up as the Trainer does
    schedule = linear_schedule(optimizer, warmup, total)
    rng = random.Random(args.seed)
    for epoch in range(1, args.dpo_epochs + 1):
        order, sums = rng.sample(range(len(data)), len(data)), torch.zeros(4, device=model.device)
        batches = range(0, len(data), args.dpo_batch_size)
        for start in tqdm(batches, desc=f"dpo epoch {epoch}", leave=False):
            batch = shard(order[start:start + args.dpo_batch_size])  # this rank's share
            for rows in (batch[i:i + size] for i in range(0, len(batch), size)):
                losses, rewards = dpo_loss(pair_logprobs(policy, [data[i] for i in rows], tokenizer.pad_token_id),
                                           reference[rows], args.beta)
                if not torch.isfinite(losses).all():
                    fail(f"non-finite DPO loss in epoch {epoch}: lower --dpo_lr")
                (losses.sum() / len(batch)).backward()
                sums += torch.stack([losses.detach().sum(), *rewards.sum(0), (rewards[:, 0] > rewards[:, 1]).sum()])
            torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)  # the Trainer's default
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
        names = ["loss", "chosen_reward", "rejected_reward", "accuracy"]
        means = dict(zip(names, all_reduce(sums / len(data)).tolist()))
        logger.log(f"dpo {epoch}", **means, margin=means["chosen_reward"] - means["rejected_reward"], lr=schedule.get_last_lr()[0])


# ---------------------------------------------------------------- PLUMBING: stages and resume
DPO_SETTINGS = ("cut_rejected_answer eos_on_rejected beta dpo_lr dpo_epochs dpo_batch_size "
                "max_length max_prompt_length")
STAGES = {  # a stage's output (in --out_dir): the stage it is made from, the settings it adds
    "sft": (None, "task n_val seed model sft_model loss_on_prompt sft_epochs sft_lr "
            "sft_warmup_ratio sft_batch_size lora_rank"),
    "samples.jsonl": ("sft", "n_samples temperature max_new_tokens"),
    "rft.jsonl": ("samples.jsonl", "max_rft_per_question"),
    "pairs.jsonl": ("rft.jsonl", ""),
    "rft": ("rft.jsonl", "base_model rft_epochs"),
    "explore.jsonl": ("rft", "explore_k"),  # explores pairs.jsonl, whose settings rft.jsonl has
    "gpairs.jsonl": ("explore.jsonl", "drop_chosen_with_rejected_step"),
    "dpo-gpair": ("gpairs.jsonl", DPO_SETTINGS),
    "dpo-outcome": ("rft", DPO_SETTINGS),
}


def settings(stage, args):
    """What a stage's output depends on: its settings and those of every stage it is made from
    (eval-X.jsonl: X's and the generation budget). The batch sizes that only split the work are left
    out: they change the rounding and which random numbers a row draws, not what is computed."""
    if stage.startswith("eval-"):
        parent, own = stage.removeprefix("eval-").removesuffix(".jsonl"), "max_new_tokens"
    else:
        parent, own = STAGES[stage]
    inherited = settings(parent, args) if parent else {}
    return inherited | {key: getattr(args, key) for key in own.split()}


def finished(run, stage, args):
    """Resume: whether run/stage was finished, with this run's settings (stages.json records them);
    a stage made with other settings stops the run, naming them."""
    path, records = os.path.join(run, stage), os.path.join(run, "stages.json")
    made = json.load(open(records)).get(stage) if os.path.isfile(records) else None
    if made is None or not os.path.exists(path):
        return False  # never finished, or killed before its record: made again
    wanted = settings(stage, args)
    differ = [f"--{key} {made.get(key)!r} (now {value!r})" for key, value in wanted.items()
              if made.get(key) != value]
    if differ:
        fail(f"{path} was made with {', '.join(differ)}: delete it and the stages after it to make "
             f"them again, or start afresh in another --out_dir")
    print(f"resume: {path} is finished with these settings, skipping its stage")
    return True


def record(run, stage, args):
    """Mark run/stage finished, with the settings it was made with (rank 0 replaces stages.json)."""
    if RANK == 0:
        path = os.path.join(run, "stages.json")
        made = json.load(open(path)) if os.path.isfile(path) else {}
        with open(path + ".tmp", "w") as f:
            json.dump(made | {stage: settings(stage, args)}, f, indent=1)
        os.replace(path + ".tmp", path)


def cached_rows(run, stage, build, args):
    """Resume: the rows of run/stage if finished with these settings, else build()'s, saved
    atomically."""
    path = os.path.join(run, stage)
    if finished(run, stage, args):
        return [json.loads(line) for line in open(path)]
    torch.manual_seed(args.seed)  # each stage samples reproducibly, resumed or not
    rows = build()
    if RANK == 0:
        with open(path + ".tmp", "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        os.replace(path + ".tmp", path)
    record(run, stage, args)
    return rows


def supervised_stage(args, start, pairs, epochs, out_dir, logger):
    """3.1 steps 1 and 4: sft.train from `start` on (prompt, target) pairs with the paper's SFT/RFT recipe, saved."""
    model, tokenizer = load_model(start, lora_rank=args.lora_rank, seed=args.seed)
    recipe = sft.Args(template="self_explore", loss_on_prompt=args.loss_on_prompt, epochs=epochs, lr=args.sft_lr,
                      warmup_ratio=args.sft_warmup_ratio, batch_size=args.sft_batch_size, out_dir=out_dir,
                      micro_batch_size=args.micro_batch_size, seed=args.seed,
                      adam_eps=1e-6,  # official: transformers' AdamW, whose eps is 1e-6
                      schedule_epochs=args.sft_schedule_epochs)  # an early epoch of a 5-epoch decay
    # official: an example of 1024+ tokens (question + answer, before EOS) is dropped, not cut
    lengths = [sum(map(len, sft.encode_pair(tokenizer, *pair))) for pair in pairs]  # EOS included
    kept = [pair for pair, n in zip(pairs, lengths) if n <= recipe.max_length]
    name = os.path.basename(out_dir)
    logger.log(f"{name} data", examples=len(kept), dropped_long=len(pairs) - len(kept))
    sft.train(model, tokenizer, kept, recipe, logger=logger)
    save(model, tokenizer, out_dir, args)


def sampler(path, args, stop=None):
    """sample_fn(prompts, n) -> n texts per prompt (prompt-major) from the model at `path`, T = 0.7, top_p 1."""
    model, tokenizer = load_model(path, seed=args.seed, frozen=True)  # each rank samples its share
    return lambda prompts, n: [c.text for c in generate(
        model, tokenizer, prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=1.0,
        n=n, stop=stop, batch_size=args.sample_batch_size, sharded=True)]


def main(argv=None):
    args = parse_args(Args, {"toy": TOY}, argv)
    if args.pairs not in ("gpair", "outcome"):
        fail(f"unknown --pairs {args.pairs!r}: use gpair (Self-Explore) or outcome (the DPO baseline)")
    if 0 < args.sft_schedule_epochs < max(args.sft_epochs, args.rft_epochs):
        fail(f"--sft_schedule_epochs {args.sft_schedule_epochs} ends the LR decay before the last "
             f"SFT or RFT epoch: raise it, or pass 0 to decay over the epochs run")
    check_args(args, positive=["sft_epochs", "rft_epochs", "sft_lr", "sft_batch_size", "n_samples",
                               "max_new_tokens", "sample_batch_size", "max_rft_per_question",
                               "explore_k", "beta", "dpo_lr", "dpo_epochs", "dpo_batch_size",
                               "micro_batch_size", "max_length", "max_prompt_length"],
               at_least_zero=["n_val", "lora_rank"])
    if args.sft_model:  # sampled from at once: it must already solve some questions
        check_trained(args.sft_model, "--sft_model")
    # PLUMBING: the data first, so a bad name stops before any work; the validation slice is held out
    train_set = load_task(args.task, "train")
    test_set = load_task(args.task, "test", args.test_task)
    if args.n_val >= len(train_set):
        fail(f"--n_val {args.n_val} leaves none of the {len(train_set)} training questions: lower it")
    train_set, val_set = train_set[:len(train_set) - args.n_val], train_set[len(train_set) - args.n_val:]
    prompt_of = lambda question: sft.prompt_for("self_explore", question)  # `{question}\n`
    # PLUMBING: the first model, loaded once here, says whether prompts and lengths fit its context
    first, tokenizer = load_model(args.sft_model or args.model, seed=args.seed, frozen=True)
    prompts = {"test question": [prompt_of(ex.question) for ex in test_set],
               "training question": [prompt_of(ex.question) for ex in train_set]}
    check_context(first, tokenizer, prompts, max_length=args.max_length)
    del first
    run, logger = args.out_dir, Logger(args.out_dir)

    def report(name, path):  # greedy accuracy of a stage's model, measured once per run folder
        def measure():
            model, tokenizer = load_model(path, seed=args.seed, frozen=True)
            accuracies = {}
            for split, examples in (("val", val_set), ("test", test_set)):
                if examples:  # graded by the official rule
                    result = evaluate(model, tokenizer, examples, lambda ex: prompt_of(ex.question),
                                      max_new_tokens=args.max_new_tokens,
                                      batch_size=args.sample_batch_size,
                                      extract=official_answer, same=same_answer)
                    accuracies[f"{split}_accuracy"] = result["accuracy"]
            return [accuracies]
        rows = cached_rows(run, f"eval-{name}.jsonl", measure, args)
        logger.log(f"eval {name}", **rows[0])

    # 1. ALGO: SFT on the gold rationales (or --sft_model)
    sft_path = args.sft_model or os.path.join(run, "sft")
    if not args.sft_model and not finished(run, "sft", args):
        gold = [(prompt_of(ex.question), sft.target_for("self_explore", ex)) for ex in train_set]
        supervised_stage(args, args.model, gold, args.sft_epochs, sft_path, logger)
        record(run, "sft", args)
    report("sft", sft_path)

    # 2. N samples per question from the SFT model (PLUMBING); the RFT set and D_pair (ALGO)
    def sample_stage():
        n, prompts = args.n_samples, [prompt_of(ex.question) for ex in train_set]
        texts = sampler(sft_path, args, stop=["Problem:"])(prompts, n)
        return [dict(question=ex.question, answer=ex.answer, samples=[t.strip() for t in texts[i * n:(i + 1) * n]])
                for i, ex in enumerate(train_set)]
    samples = cached_rows(run, "samples.jsonl", sample_stage, args)
    rft = cached_rows(run, "rft.jsonl", lambda: [dict(
        question=row["question"], rationales=rft_rationales(row["samples"], row["answer"], args.max_rft_per_question))
        for row in samples], args)
    d_pair = cached_rows(run, "pairs.jsonl", lambda: [
        pair for row, kept in zip(samples, rft)
        for pair in outcome_pairs(prompt_of(row["question"]), kept["rationales"], row["samples"], row["answer"])],
        args)
    correct = [is_correct(text, row["answer"]) for row in samples for text in row["samples"]]
    logger.log("data", samples=len(correct), sample_accuracy=sum(correct) / len(correct), d_pair=len(d_pair),
               rft_set=sum(len(row["rationales"]) for row in rft), rft_questions=sum(bool(r["rationales"]) for r in rft))
    if not d_pair:
        fail("D_pair is empty: no training question got both a correct and a wrong sample; raise --n_samples")

    # 3. ALGO: RFT, the base model fine-tuned on the RFT set, explores, starts DPO and is its reference
    rft_path = os.path.join(run, "rft")
    if not finished(run, "rft", args):
        rft_pairs = [(prompt_of(row["question"]), text) for row in rft for text in row["rationales"]]
        supervised_stage(args, args.base_model or args.model, rft_pairs, args.rft_epochs, rft_path, logger)
        record(run, "rft", args)
    report("rft", rft_path)

    # 4. explore: the first pit of each rejected rationale (ALGO in find_first_pits), then D_g-pair
    dpo_pairs = d_pair
    if args.pairs == "gpair":
        explored = cached_rows(run, "explore.jsonl", lambda: [
            dict(pit=pit, completions=completions) for pit, completions in zip(*find_first_pits(
                [p["prompt"] for p in d_pair], [split_steps(p["rejected"]) for p in d_pair], [p["answer"] for p in d_pair],
                sampler(rft_path, args), args.explore_k, max_steps=20))], args)  # official: <= 20
        counts = Counter()  # ALGO: D_g-pair (the counts are logged when it is built)
        dpo_pairs = cached_rows(run, "gpairs.jsonl", lambda: step_pairs(
            d_pair, [row["pit"] for row in explored], [row["completions"] for row in explored],
            args.drop_chosen_with_rejected_step, counts), args)
        pits = Counter(row["pit"] or "none" for row in explored)
        logger.log("explore", **{f"pit_{w}": pits[w] for w in sorted(pits, key=str)}, **counts, g_pair=len(dpo_pairs))

    # 5. ALGO: DPO from the RFT model on D_g-pair (or D_pair: --pairs outcome), after the quirks of 3.2
    dpo_path = os.path.join(run, f"dpo-{args.pairs}")
    if not finished(run, f"dpo-{args.pairs}", args):
        cut = [dict(p, rejected=cut_answer_line(p["rejected"])) if args.cut_rejected_answer else p for p in dpo_pairs]
        kept = [pair for pair in cut if pair["rejected"]]
        logger.log(f"dpo-{args.pairs} data", pairs=len(kept), dropped_empty_rejected=len(cut) - len(kept))
        if not kept:
            fail(f"no {args.pairs} pairs to train DPO on (see the counts above): raise --n_samples")
        model, tokenizer = load_model(rft_path, lora_rank=args.lora_rank, seed=args.seed)
        train_dpo(model, tokenizer, [tokenize_dpo_pair(tokenizer, pair, args) for pair in kept], args, logger)
        save(model, tokenizer, dpo_path, args)
        record(run, f"dpo-{args.pairs}", args)
    # 6. PLUMBING: greedy evaluation (SFT and RFT above, DPO here)
    report(f"dpo-{args.pairs}", dpo_path)


if __name__ == "__main__":
    main()
