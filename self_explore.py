"""Self-Explore: Enhancing Mathematical Reasoning in Language Models with Fine-grained Rewards.

Hyeonbin Hwang, Doyoung Kim, Seungone Kim, Seonghyeon Ye, Minjoon Seo (KAIST AI, CMU), EMNLP 2024,
arXiv 2404.10346. Official code: hbin0701/Self-Explore (commit 54b8ba9).

From each step prefix of a wrong rationale the model samples k continuations; the first prefix
from which none reaches the answer is the "first pit" (the paper's Figure 1). DPO then trains on
step-level pairs: the question and the steps before the pit, the pit step rejected, chosen a
correct continuation from the step before.

    python self_explore.py --model deepseek-math-7b                  # GSM8K, the paper's settings
    python self_explore.py --model deepseek-math-7b --pairs outcome  # the DPO baseline on D_pair
    python self_explore.py --preset toy [--pairs outcome]  # from runs/toy-base and toy-sft, CPU

Implements one round on GSM8K; the `# ALGO <step>.` tags number these steps (official files):
    1. SFT on the gold rationales (scripts/gsm8k/sft/run_ft.sh)
    2. sample N = 100 rationales per training question from the SFT model (gen/gen_rft_data.py)
    3. the RFT set: correct, equation-checked, one per equation signature, <= 8 (get_rft_data.py)
    4. RFT: the base model fine-tuned on the RFT set (scripts/gsm8k/sft/run_rft.sh)
    5. D_pair: each RFT rationale with the farthest wrong sample (gen/get_dpo_data.py)
    6. the steps of each rejected rationale: its non-empty lines (gen/utils_others.py)
    7. explore: the first pit, the first prefix whose k = 4 completions fail (gen_step_explore.py)
    8. D_g-pair from the pits (gen/utils_others.py, form_gpair)
    9. DPO from the RFT model, also the frozen reference (dpo/custom_trainer.py)
    10. greedy evaluation of the SFT, RFT and DPO models (eval/gsm8k/utils_ans.py)

Deviations (README, Deviations from the papers), besides the official code's bugs not copied:
- exploration is graded by the official GSM8K rule (the official code compares raw strings);
- samples sorted after deduplication (official: set order); an empty rejected text is dropped;
- GSM8K's step split only (arith: `lhs=rhs` lines as equations); one round; last epochs reported.
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
from tqdm.auto import tqdm

import sft
from common import (RANK, TOY_TASK, Logger, all_reduce, batch_sequences, check_args,
                    check_context, check_trained, evaluate, fail, gather, generate,
                    gradient_checkpointing, linear_schedule, load_model, load_task, parse_args,
                    save, shard, token_logprobs, wrap_model)


@dataclass
class Args:
    """Run Self-Explore: SFT, sample, RFT, find each wrong rationale's first pit, step-level DPO."""
    model: str = "deepseek-math-7b"  # paper: Mistral-7B, Llemma-7B, DeepSeek-Math-7B-base
    """base model that SFT starts from: an alias, a hub id, a local checkpoint, or tiny"""
    task: str = "gsm8k"  # paper: GSM8K (MATH's step split is not implemented)
    """gsm8k, arith, or a .jsonl/.json file with question, rationale and answer"""
    test_task: str = ""
    """test split: a .jsonl/.json file, a folder or a task ('' = --task's; a lone file has none)"""
    out_dir: str = "runs/self-explore"
    """run folder: every stage's JSONL and checkpoint; a rerun resumes from it"""
    sft_model: str = ""
    """an already fine-tuned model: skip step 1 (SFT) and sample from it"""
    base_model: str = ""  # official code: RFT from the base model
    """model that RFT starts from ('' = --model)"""
    pairs: str = "gpair"
    """DPO data: gpair (Self-Explore's D_g-pair) or outcome (D_pair: the paper's DPO baseline)"""
    n_val: int = 0
    """hold out the last n training questions from every stage and report accuracy on them"""
    loss_on_prompt: bool = True  # official code: loss_on_prefix=True
    """SFT and RFT also train on the question tokens"""
    sft_epochs: int = 2  # paper, as quoted in hbin0701/Self-Explore issue #1
    """SFT epochs"""
    rft_epochs: int = 1  # paper, as quoted in hbin0701/Self-Explore issue #1
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
    """temperature of sampling (stopped at `Problem:`, as the paper) and exploration (no stop)"""
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
    """SFT/RFT sequences or DPO pairs per forward/backward (gradients add up per optimiser step)"""
    max_length: int = 384  # paper: GSM8K
    """DPO prompt + response tokens"""
    max_prompt_length: int = 128  # paper: GSM8K
    """DPO prompt tokens kept (from the end) when prompt + response is too long"""
    lora_rank: int = 0
    """LoRA rank for every training stage (0: full fine-tuning)"""
    seed: int = 42  # paper: DPO seed
    """seed for initialisation, sampling and shuffling (each stage reseeds)"""


# The toy world: samples from runs/toy-sft (`python sft.py --preset toy`), RFT from the toy base
# with toy SFT's recipe (40 epochs at 1e-3); DPO lr 1e-5, chosen on toy world v1 (README).
TOY = dict(model="runs/toy-base", sft_model="runs/toy-sft", task=TOY_TASK,
           out_dir="runs/toy-self-explore", loss_on_prompt=False, rft_epochs=40,
           sft_schedule_epochs=0, sft_lr=1e-3, sft_warmup_ratio=0.1, sft_batch_size=32,
           micro_batch_size=32, n_samples=8, max_new_tokens=160, sample_batch_size=512,
           dpo_lr=1e-5, seed=0)


# ALGO 3, 7 and 10. the official GSM8K grader (eval/gsm8k/utils_ans.py) grades every stage
def standard_number(text):
    """The official normal form (utils_ans.py, standardize_value_str): no commas, no trailing zeros
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


# ALGO 3. the RFT set: correct samples whose calculator annotations hold, one per signature
ARITHMETIC = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
              ast.Div: operator.truediv, ast.USub: operator.neg, ast.UAdd: operator.pos}


def safe_eval(expression):
    """An arithmetic expression's value (numbers, + - * /, brackets), else None; never eval()."""
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
    """The `<<lhs=rhs>>` calculator annotations; without any, the whole lines `lhs=rhs` (arith)."""
    annotations = re.findall(r"<<([^>]*)>>", text)
    return annotations or re.findall(r"^[\d .+\-*/()]+=[\d .\-]+$", text, re.MULTILINE)


def equations_hold(text):
    """Every equation satisfies |lhs - rhs| < 1e-3 (official: get_rft_data.py, check_equation)."""
    for equation in equations(text):
        left, right = map(safe_eval, equation.partition("=")[::2])
        if left is None or right is None or not abs(left - right) < 1e-3:
            return False
    return True


def edit_distance(a, b):
    """Character-level Levenshtein distance, bit-parallel (Hyyro 2001): DP columns as bit sets."""
    if not a or not b:
        return len(a) + len(b)
    match_bits = {char: sum(1 << i for i, x in enumerate(a) if x == char) for char in set(a)}
    all_bits = (1 << len(a)) - 1
    top = 1 << (len(a) - 1)
    plus = all_bits
    minus = 0
    distance = len(a)
    for char in b:
        eq = match_bits.get(char, 0)
        x_vertical = eq | minus
        x_horizontal = (((eq & plus) + plus) ^ plus) | eq
        h_plus = minus | ~(x_horizontal | plus)
        h_minus = plus & x_horizontal
        distance += bool(h_plus & top) - bool(h_minus & top)
        h_plus = (h_plus << 1) | 1
        h_minus = h_minus << 1
        plus = (h_minus | ~(x_vertical | h_plus)) & all_bits
        minus = h_plus & x_vertical
    return distance


def rft_rationales(samples, gold, max_per_question):
    """Exact dedup (then sorted), correct answer, equations hold, one per equation signature (among
    duplicates the one farthest, in summed edit distance, from the other kept ones), at most 8."""
    kept = {}  # equation signature -> rationale
    for text in sorted(set(samples)):
        if not (is_correct(text, gold) and equations_hold(text)):
            continue
        signature = "|".join(equations(text)).replace(" ", "")
        if signature in kept:
            others = [other for key, other in kept.items() if key != signature]
            spread = sum(edit_distance(text, other) for other in others)
            kept_spread = sum(edit_distance(kept[signature], other) for other in others)
            if spread <= kept_spread:
                continue
        kept[signature] = text
    return list(kept.values())[:max_per_question]


# ALGO 5. D_pair: each correct rationale with the wrong sample farthest from it
def outcome_pairs(prompt, chosen_texts, samples, gold):
    """Each chosen text with the wrong sample farthest from it by edit distance; the pool holds
    every distinct wrong sample (unparsable ones included) and each is used once."""
    pool = sorted({text for text in samples if not is_correct(text, gold)})
    pairs = []
    for chosen in chosen_texts[:len(pool)]:  # the pool loses one text per pair
        rejected = max(pool, key=lambda text: edit_distance(chosen, text))
        pool.remove(rejected)
        pairs.append(dict(prompt=prompt, answer=gold, chosen=chosen, rejected=rejected))
    return pairs


# ALGO 6 and 7. the steps of a rejected rationale, explored for its first pit
def split_steps(rationale):
    """GSM8K's split: the non-empty lines, each `strip() + "\\n"`."""
    return [line.strip() + "\n" for line in rationale.split("\n") if line.strip()]


def find_first_pits(prompts, steps, golds, sample_fn, k, max_steps):
    """Each rationale's first pit, the first j whose k completions from prompt + steps[:j] all miss
    the gold answer (None: none), with one sample_fn call per j; and the completions explored."""
    pits = [None] * len(prompts)
    explored = [[] for _ in prompts]
    searching = list(range(len(prompts)))
    for depth in range(1, max_steps + 1):
        searching = [i for i in searching if pits[i] is None and depth <= len(steps[i])]
        if not searching:
            break
        prefixes = [prompts[i] + "".join(steps[i][:depth]) for i in searching]
        texts = sample_fn(prefixes, k)
        for row, i in enumerate(searching):
            explored[i].append(texts[row * k:(row + 1) * k])
            if not any(is_correct(text, golds[i]) for text in explored[i][-1]):
                pits[i] = depth
    return pits, explored


# ALGO 8. D_g-pair: the pit step rejected, a correct continuation from the step before chosen
def step_pairs(pairs, pits, explored, drop_chosen_with_rejected_step, counts):
    """form_gpair. No pit: dropped. Pit w = 1: rejected = step 1, chosen = the pair's chosen. w > 1:
    prompt + steps 1..w-1, rejected = step w, chosen = the shortest correct completion from prefix
    w-1 not yet chosen for the question. Kept if its chosen and rejected are both new for it."""
    used_chosen = defaultdict(set)
    seen_chosen = defaultdict(set)
    seen_rejected = defaultdict(set)
    out = []
    for pair, pit, completions in zip(pairs, pits, explored):
        question = pair["prompt"]
        if pit is None:
            counts["no_pit"] += 1
            continue
        steps = split_steps(pair["rejected"])
        prompt = question + "".join(steps[:pit - 1])
        rejected = steps[pit - 1]
        chosen = pair["chosen"]
        if pit > 1:
            candidates = [text for text in completions[pit - 2]
                          if is_correct(text, pair["answer"]) and text not in used_chosen[question]]
            if drop_chosen_with_rejected_step:
                candidates = [text for text in candidates if rejected.strip() not in text]
            if not candidates:
                counts["no_chosen"] += 1
                continue
            chosen = min(candidates, key=len)  # the first of the shortest
            used_chosen[question].add(chosen)
        if chosen in seen_chosen[question] or rejected in seen_rejected[question]:
            counts["duplicate"] += 1
            continue
        seen_chosen[question].add(chosen)
        seen_rejected[question].add(rejected)
        out.append(dict(prompt=prompt, answer=pair["answer"], chosen=chosen, rejected=rejected,
                        pit=pit))
    return out


# ALGO 9. DPO on the pairs, the official tokenisation and the sigmoid loss
def cut_answer_line(rejected):
    """Official prepare_dataset.py: a rejected text of 2+ lines loses `The answer is`, stripped."""
    if "The answer is" in rejected and len(rejected.split("\n")) > 1:
        return rejected[:rejected.index("The answer is")].strip()
    return rejected


def tokenize_dpo_pair(tokenizer, pair, args):
    """Official prepare_dataset.py: BOS + prompt.rstrip("\\n") + "\\n", EOS on chosen only; trl 0.7
    truncation: a prompt + response too long keeps the prompt's end, then the responses are cut."""
    prompt = pair["prompt"].rstrip("\n") + "\n"
    prompt_ids, chosen_ids = sft.encode_pair(tokenizer, prompt, pair["chosen"])
    rejected_ids = sft.encode_pair(tokenizer, prompt, pair["rejected"])[1]
    if not args.eos_on_rejected:
        rejected_ids = rejected_ids[:-1]
    longer = max(len(chosen_ids), len(rejected_ids))
    if len(prompt_ids) + longer > args.max_length:
        prompt_ids = prompt_ids[-args.max_prompt_length:]
    if len(prompt_ids) + longer > args.max_length:
        room = args.max_length - args.max_prompt_length
        chosen_ids = chosen_ids[:room]
        rejected_ids = rejected_ids[:room]
    return prompt_ids, chosen_ids, rejected_ids


def pair_logprobs(model, rows, pad_id):
    """[B, 2]: log pi(y+|x) and log pi(y-|x) of each (prompt, chosen, rejected) row in one forward,
    each the SUM of its response-token log-probs, as custom_trainer.py (never a mean)."""
    prompts, chosen, rejected = zip(*rows)
    input_ids, attention_mask, response_mask = batch_sequences(
        prompts * 2, chosen + rejected, pad_id, model.device)
    sums = (token_logprobs(model, input_ids, attention_mask) * response_mask).sum(-1)  # [2B]
    return torch.stack(sums.split(len(rows)), dim=1)


def dpo_loss(policy, reference, beta):
    """The sigmoid DPO loss of custom_trainer.py from [B, 2] log-probs of policy and reference:
    L = -log sigmoid(beta [(log pi(y+|x) - log ref(y+|x)) - (log pi(y-|x) - log ref(y-|x))]),
    per pair, and the implicit rewards beta (log pi - log ref) of chosen and rejected."""
    rewards = beta * (policy - reference)
    return -torch.nn.functional.logsigmoid(rewards[:, 0] - rewards[:, 1]), rewards.detach()


def train_dpo(model, tokenizer, data, args, logger):
    """Official scripts/gsm8k/dpo/config.yaml: RMSprop, 10% warm-up, linear decay, no dropout."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout) or hasattr(module, "attention_dropout"):
            module.p = 0.0
            module.attention_dropout = 0.0
    gradient_checkpointing(model, model.device.type == "cuda")  # left on: saved next
    pad_id = tokenizer.pad_token_id
    micro = args.micro_batch_size
    mine = shard(data)  # each rank scores its share of the reference log-probs
    # ALGO 9. the reference log-probs: the starting (RFT) model's, scored once before any update
    with torch.no_grad():
        chunks = [pair_logprobs(model, mine[i:i + micro], pad_id)
                  for i in range(0, len(mine), micro)]
        scored = torch.cat(chunks).tolist()
        reference = torch.tensor(gather(scored, len(data)), device=model.device)
    policy = wrap_model(model)  # DDP or FSDP2 under torchrun
    trained = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.RMSprop(trained, lr=args.dpo_lr)
    total = math.ceil(len(data) / args.dpo_batch_size) * args.dpo_epochs
    warmup = math.ceil(0.1 * total)  # paper: warm-up ratio 0.1, rounded up as the Trainer does
    schedule = linear_schedule(optimizer, warmup, total)
    rng = random.Random(args.seed)
    for epoch in range(1, args.dpo_epochs + 1):
        order = rng.sample(range(len(data)), len(data))
        sums = torch.zeros(4, device=model.device)  # loss, chosen and rejected reward, accuracy
        batches = range(0, len(data), args.dpo_batch_size)
        for start in tqdm(batches, desc=f"dpo epoch {epoch}", leave=False):
            batch = shard(order[start:start + args.dpo_batch_size])  # this rank's share
            for i in range(0, len(batch), micro):
                rows = batch[i:i + micro]
                logprobs = pair_logprobs(policy, [data[j] for j in rows], pad_id)
                losses, rewards = dpo_loss(logprobs, reference[rows], args.beta)
                if not torch.isfinite(losses).all():
                    fail(f"non-finite DPO loss in epoch {epoch}: lower --dpo_lr")
                (losses.sum() / len(batch)).backward()
                wins = (rewards[:, 0] > rewards[:, 1]).sum()
                sums += torch.stack([losses.detach().sum(), *rewards.sum(0), wins])
            torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)  # the Trainer's default
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
        names = ["loss", "chosen_reward", "rejected_reward", "accuracy"]
        means = dict(zip(names, all_reduce(sums / len(data)).tolist()))
        margin = means["chosen_reward"] - means["rejected_reward"]
        logger.log(f"dpo {epoch}", **means, margin=margin, lr=schedule.get_last_lr()[0])


# PLUMBING stages and resume
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
    (eval-X.jsonl: X's and max_new_tokens). Batch sizes only split the work: they are left out."""
    if stage.startswith("eval-"):
        parent = stage.removeprefix("eval-").removesuffix(".jsonl")
        own = "max_new_tokens"
    else:
        parent, own = STAGES[stage]
    inherited = settings(parent, args) if parent else {}
    return inherited | {key: getattr(args, key) for key in own.split()}


def finished(run, stage, args):
    """Whether run/stage is finished with these settings (stages.json); others stop the run."""
    path = os.path.join(run, stage)
    records = os.path.join(run, "stages.json")
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


def cached_rows(run, stage, args, build, *inputs):
    """run/stage's rows if finished with these settings, else build(*inputs)'s, saved atomically."""
    path = os.path.join(run, stage)
    if finished(run, stage, args):
        return [json.loads(line) for line in open(path)]
    torch.manual_seed(args.seed)  # each stage samples reproducibly, resumed or not
    rows = build(*inputs)
    if RANK == 0:
        with open(path + ".tmp", "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        os.replace(path + ".tmp", path)
    record(run, stage, args)
    return rows


def prompt_of(question):
    return sft.prompt_for("self_explore", question)  # `{question}\n`


def supervised_stage(args, start, pairs, epochs, out_dir, logger):
    """ALGO 1 and 4: sft.train from `start` on (prompt, target) pairs (official recipe); saved."""
    model, tokenizer = load_model(start, lora_rank=args.lora_rank, seed=args.seed)
    recipe = sft.Args(template="self_explore", loss_on_prompt=args.loss_on_prompt, epochs=epochs,
                      lr=args.sft_lr, warmup_ratio=args.sft_warmup_ratio, out_dir=out_dir,
                      batch_size=args.sft_batch_size, micro_batch_size=args.micro_batch_size,
                      seed=args.seed, adam_eps=1e-6,  # official sft/utils/optim.py: AdamW's eps
                      schedule_epochs=args.sft_schedule_epochs)  # an early epoch of a 5-epoch decay
    # official sft/sft_datasets.py drops (never cuts) an example of 1024+ tokens before EOS
    lengths = [sum(map(len, sft.encode_pair(tokenizer, *pair))) for pair in pairs]  # EOS included
    kept = [pair for pair, n in zip(pairs, lengths) if n <= recipe.max_length]
    name = os.path.basename(out_dir)
    logger.log(f"{name} data", examples=len(kept), dropped_long=len(pairs) - len(kept))
    sft.train(model, tokenizer, kept, recipe, logger=logger)
    save(model, tokenizer, out_dir, args)


def sampler(path, args, stop=None):
    """sample_fn(prompts, n) -> n texts per prompt (prompt-major) from the model at `path`."""
    model, tokenizer = load_model(path, seed=args.seed, frozen=True)
    def sample_fn(prompts, n):
        completions = generate(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens,
                               temperature=args.temperature, top_p=1.0, n=n, stop=stop,
                               batch_size=args.sample_batch_size, sharded=True)
        return [completion.text for completion in completions]
    return sample_fn


def main(argv=None):
    args = parse_args(Args, {"toy": TOY}, argv)
    # PLUMBING the flags and the data first, so that a bad one stops before any work
    if args.pairs not in ("gpair", "outcome"):
        fail(f"unknown --pairs {args.pairs!r}: use gpair (Self-Explore) or outcome (the DPO "
             f"baseline)")
    if 0 < args.sft_schedule_epochs < max(args.sft_epochs, args.rft_epochs):
        fail(f"--sft_schedule_epochs {args.sft_schedule_epochs} ends the LR decay before the last "
             f"SFT or RFT epoch: raise it, or pass 0 to decay over the epochs run")
    positive = ("sft_epochs rft_epochs sft_lr sft_batch_size n_samples max_new_tokens "
                "sample_batch_size max_rft_per_question explore_k beta dpo_lr dpo_epochs "
                "dpo_batch_size micro_batch_size max_length max_prompt_length").split()
    check_args(args, positive=positive, at_least_zero=["n_val", "lora_rank"])
    if args.sft_model:  # sampled from at once: it must already solve some questions
        check_trained(args.sft_model, "--sft_model")
    train_set = load_task(args.task, "train")
    test_set = load_task(args.task, "test", args.test_task)
    if args.n_val >= len(train_set):
        fail(f"--n_val {args.n_val} leaves none of the {len(train_set)} training questions: "
             f"lower it")
    n_train = len(train_set) - args.n_val
    splits = {"val": train_set[n_train:], "test": test_set}  # the validation slice is held out
    train_set = train_set[:n_train]
    # PLUMBING the first model, loaded once here, says whether prompts and lengths fit its context
    first, tokenizer = load_model(args.sft_model or args.model, seed=args.seed, frozen=True)
    prompts = {"test question": [prompt_of(ex.question) for ex in test_set],
               "training question": [prompt_of(ex.question) for ex in train_set]}
    check_context(first, tokenizer, prompts, max_length=args.max_length)
    del first
    run = args.out_dir
    logger = Logger(run)

    # ALGO 10. the greedy accuracy of a stage's model by the official rule, once per run folder
    def report(name, path):
        def measure():
            model, tokenizer = load_model(path, seed=args.seed, frozen=True)
            accuracies = {}
            for split, examples in splits.items():
                if examples:
                    result = evaluate(model, tokenizer, examples, lambda ex: prompt_of(ex.question),
                                      max_new_tokens=args.max_new_tokens, extract=official_answer,
                                      batch_size=args.sample_batch_size, same=same_answer)
                    accuracies[f"{split}_accuracy"] = result["accuracy"]
            return [accuracies]
        rows = cached_rows(run, f"eval-{name}.jsonl", args, measure)
        logger.log(f"eval {name}", **rows[0])

    # ALGO 1. SFT on the gold rationales (or --sft_model)
    sft_path = args.sft_model or os.path.join(run, "sft")
    if not args.sft_model and not finished(run, "sft", args):
        gold = [(prompt_of(ex.question), sft.target_for("self_explore", ex)) for ex in train_set]
        supervised_stage(args, args.model, gold, args.sft_epochs, sft_path, logger)
        record(run, "sft", args)
    report("sft", sft_path)

    # ALGO 2. n_samples rationales per training question from the SFT model
    def sample_all():
        n = args.n_samples
        questions = [prompt_of(ex.question) for ex in train_set]
        texts = sampler(sft_path, args, stop=["Problem:"])(questions, n)
        stripped = [text.strip() for text in texts]
        return [dict(question=ex.question, answer=ex.answer, samples=stripped[i * n:(i + 1) * n])
                for i, ex in enumerate(train_set)]
    samples = cached_rows(run, "samples.jsonl", args, sample_all)

    # ALGO 3. the RFT set of each question
    def rft_set():
        cap = args.max_rft_per_question
        kept = [rft_rationales(row["samples"], row["answer"], cap) for row in samples]
        return [dict(question=row["question"], rationales=k) for row, k in zip(samples, kept)]
    rft = cached_rows(run, "rft.jsonl", args, rft_set)

    # ALGO 5. D_pair, before RFT trains: it needs only the samples and the RFT set
    def outcome_set():
        pairs = []
        for row, kept in zip(samples, rft):
            prompt = prompt_of(row["question"])
            pairs += outcome_pairs(prompt, kept["rationales"], row["samples"], row["answer"])
        return pairs
    d_pair = cached_rows(run, "pairs.jsonl", args, outcome_set)
    correct = [is_correct(text, row["answer"]) for row in samples for text in row["samples"]]
    logger.log("data", samples=len(correct), sample_accuracy=sum(correct) / len(correct),
               d_pair=len(d_pair), rft_set=sum(len(row["rationales"]) for row in rft),
               rft_questions=sum(bool(row["rationales"]) for row in rft))
    if not d_pair:
        fail("D_pair is empty: no training question got both a correct and a wrong sample; raise "
             "--n_samples")

    # ALGO 4. RFT: the base model on the RFT set; it explores, starts DPO and is its reference
    rft_path = os.path.join(run, "rft")
    if not finished(run, "rft", args):
        rft_pairs = [(prompt_of(row["question"]), text)
                     for row in rft for text in row["rationales"]]
        start = args.base_model or args.model
        supervised_stage(args, start, rft_pairs, args.rft_epochs, rft_path, logger)
        record(run, "rft", args)
    report("rft", rft_path)

    # ALGO 6 and 7. the steps of each rejected rationale, explored by the RFT model for a first pit
    def explore():
        prompts = [pair["prompt"] for pair in d_pair]
        steps = [split_steps(pair["rejected"]) for pair in d_pair]
        golds = [pair["answer"] for pair in d_pair]
        sample_fn = sampler(rft_path, args)
        pits, explored = find_first_pits(prompts, steps, golds, sample_fn, args.explore_k,
                                         max_steps=20)  # official gen/gen_step_explore.py
        return [dict(pit=pit, completions=completions) for pit, completions in zip(pits, explored)]

    dpo_pairs = d_pair
    if args.pairs == "gpair":
        explored = cached_rows(run, "explore.jsonl", args, explore)
        pits = [row["pit"] for row in explored]
        completions = [row["completions"] for row in explored]
        # ALGO 8. D_g-pair from the pits
        counts = Counter()  # filled when D_g-pair is built, not when it is reused
        dpo_pairs = cached_rows(run, "gpairs.jsonl", args, step_pairs, d_pair, pits, completions,
                                args.drop_chosen_with_rejected_step, counts)
        found = Counter(pit or "none" for pit in pits)
        pit_counts = {f"pit_{w}": found[w] for w in sorted(found, key=str)}
        logger.log("explore", **pit_counts, **counts, g_pair=len(dpo_pairs))

    # ALGO 9. DPO from the RFT model on D_g-pair (or D_pair: --pairs outcome)
    stage = f"dpo-{args.pairs}"
    dpo_path = os.path.join(run, stage)
    if not finished(run, stage, args):
        if args.cut_rejected_answer:
            dpo_pairs = [dict(pair, rejected=cut_answer_line(pair["rejected"]))
                         for pair in dpo_pairs]
        kept = [pair for pair in dpo_pairs if pair["rejected"]]
        dropped = len(dpo_pairs) - len(kept)
        logger.log(f"{stage} data", pairs=len(kept), dropped_empty_rejected=dropped)
        if not kept:
            fail(f"no {args.pairs} pairs to train DPO on (see the counts above): raise --n_samples")
        model, tokenizer = load_model(rft_path, lora_rank=args.lora_rank, seed=args.seed)
        data = [tokenize_dpo_pair(tokenizer, pair, args) for pair in kept]
        train_dpo(model, tokenizer, data, args, logger)
        save(model, tokenizer, dpo_path, args)
        record(run, stage, args)
    report(stage, dpo_path)


if __name__ == "__main__":
    main()
