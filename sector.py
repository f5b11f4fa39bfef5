"""SECToR: Self-Education via Chain-of-Thought Reasoning, on multi-digit addition.

"Chain-of-Thought Reasoning is a Policy Improvement Operator", Hugh Zhang and David C. Parkes,
arXiv 2309.08589 (2023); no official code.

A model learns to add numbers of 1..N0 digits from ground truth in two modes: fast (the sum
directly) and slow (one chain-of-thought step that emits the sum's last digit and leaves a problem
one digit shorter). Then, for N = N0+1, N0+2, ..., it labels fresh N-digit problems itself with
simplify-then-guess and a commutativity check, with no ground-truth answer, and is fine-tuned to
give those labels fast. Slow thinking plus the vote is a policy improvement operator: the slow
policy of one model becomes the fast policy of the next. It stops when fast accuracy at the new
length collapses (error avalanching).

    python sector.py                   # the paper's schedule: ground truth on 1..6 digits, up to 30
    python sector.py --preset toy      # CPU: ground truth on 1..3 digits, self-taught 4..8
    python sector.py --preset toy --resume   # go on after the last finished length

Implements the paper's pipeline, as these steps (the ALGO tags below cite them):
1. the task: a+b and a+b+1, written a+b+c with the carry-in c;
2. the fast form and the slow form (one simplification step);
3. the supervised curriculum on 1..N0 digits, one length after the other;
4. the precondition: slow steps already work one digit past N0 (logged);
5. self-training at each new length: fresh problems, self-made labels, fine-tuning;
6. Simplify-then-Guess: K candidates (0..K-1 slow steps, then a fast guess), majority vote;
7. the commutativity check: a+b and b+a must agree;
8. evaluation: fast mode, greedy, exact match on 100 problems per length (the paper's Table 1);
9. the stop when accuracy at the new length collapses.

Deviations and our choices (README, Deviations from the papers; the measurements behind them are
in README, Results):
- a decoder-only causal LM (`tiny` from scratch by default) instead of the paper's 582M ByT5
  encoder-decoder, so that the script shares common.py; any causal LM name works;
- the formats are ours: numbers least-significant digit first and the carry-in always written, so
  that digit i of the sum sits at one distance from digit i of each operand: fast `321+654+0=` ->
  `975` (123+456 = 579), slow `321+654+0>` -> `0;9` (the step's carry, then its digit);
- a slow step outputs only its carry and digit; the problem it leaves (`21+54+0`) is written by
  string surgery (`shorten`), not by the model: copying digits is not the skill under study;
- ground-truth prompts, fast and slow, zero-pad both operands to a random width up to
  `--pad_width`: no answer past N0 digits is supervised, but prompt widths up to pad_width are;
- the curriculum moves on once fast and slow accuracy reach `--threshold` (or `--max_rounds`);
- a new length gets up to `--self_rounds` rounds of labelling and fine-tuning, until fast answers
  equal the labels on `--agreement` of the problems (the paper's single step: `--self_rounds 1`);
- every fine-tune replays `--replay` pairs of earlier lengths, which outweigh the new pairs;
- a chain broken by a malformed slow step counts its unmade candidates as invalid votes;
- slow pairs are kept when the answer after the first step (candidate k=1) equals the label in
  both orders;
- the labels' true error rate is logged (`label_error`, the paper's Figure 5), never used.
"""
import os
import random
import re
import time
from collections import Counter
from dataclasses import dataclass

import sft
from common import (Logger, fail, generate, load_model, load_state, parse_args, save, save_state,
                    start_run)
from common import check_args as check_common

FAST = "="  # the prompt's last character picks the mode
SLOW = ">"  # "simplifies to"


@dataclass
class Args:
    """Run SECToR: learn short additions from ground truth, then teach longer ones to itself with
    chain-of-thought and no ground truth; logs fast-mode accuracy per length."""
    model: str = "tiny"
    """a causal LM: tiny (from scratch), a local checkpoint, a hub id or an alias"""
    out_dir: str = "runs/sector"
    """where the model, args.json and metrics.jsonl go"""
    resume: bool = False
    """continue the run in --out_dir after its last finished length (same settings)"""
    n0: int = 6  # paper: supervised on numbers of 6 or fewer digits
    """longest length with ground-truth examples (the curriculum covers 1..n0)"""
    max_digits: int = 30  # paper: self-taught up to 29 digits, accuracy falls at about 30
    """last length to self-train on"""
    threshold: float = 0.95  # our choice: the paper's threshold is not in its main text
    """move to the next length once fast and slow accuracy on 100 problems reach this"""
    max_rounds: int = 50  # our choice
    """most curriculum rounds at one length"""
    sup_problems: int = 4000  # our choice
    """fresh ground-truth problems per curriculum round"""
    pad_width: int = 32  # our choice
    """zero-pad both operands of ground-truth prompts to a random width up to this (1: none);
    it lets the fast mode use what it learnt at new lengths"""
    candidates: int = 5  # paper: K = 5
    """K, the simplify-then-guess candidates (0..K-1 slow steps each)"""
    n_problems: int = 4000  # our choice
    """fresh problems labelled per self-training step (each in both orders)"""
    replay: int = 24000  # our choice: 6 pairs per new problem (README, Results: forgetting)
    """pairs of earlier lengths mixed into each self-training fine-tune"""
    agreement: float = 0.9  # our choice
    """leave a self-taught length once this fraction of fresh problems gets fast answers equal
    to its label"""
    self_rounds: int = 10  # our choice
    """most self-training rounds (label, fine-tune) at one length"""
    n_eval: int = 100  # paper: 100 test problems per length
    """evaluation problems per length"""
    collapse_below: float = 0.5  # our choice
    """stop when fast accuracy at the new length falls below this"""
    lr: float = 1e-3  # our choice
    """peak learning rate of every fine-tune"""
    warmup_ratio: float = 0.1  # our choice
    """linear warm-up fraction of every fine-tune"""
    batch_size: int = 64  # our choice
    """sequences per optimiser step"""
    micro_batch_size: int = 64
    """sequences per forward/backward (gradient accumulation up to batch_size)"""
    gen_batch_size: int = 256
    """prompts per generation batch"""
    seed: int = 0
    """seed for initialisation, problems and shuffling"""


TOY = dict(n0=3, max_digits=8, pad_width=8, out_dir="runs/toy-sector", batch_size=32,
           micro_batch_size=32, sup_problems=2000, n_problems=1000, replay=8000, self_rounds=20)


# ---------------------------------------------------------------- the task (steps 1 and 2)
def sample_problem(rng, n, carry=None):
    """(a, b, c): two n-digit operands, uniform in [10^(n-1), 10^n), and a carry-in c in {0, 1};
    the task is a + b + c."""
    low = 10 ** (n - 1)
    c = rng.randint(0, 1) if carry is None else carry
    a = rng.randrange(low, 10 * low)
    b = rng.randrange(low, 10 * low)
    return a, b, c


def digits(x, width=0):
    """x written least-significant digit first, zero-padded to `width` digits."""
    return f"{x:0{width}d}"[::-1]


def problem_text(a, b, c, width=0):
    """`a+b+c`: the carry-in is always written, so that it moves no digit."""
    return f"{digits(a, width)}+{digits(b, width)}+{c}"


def true_sum(a, b, c):
    """Ground truth: the supervised phase and evaluation only, never a self-training label."""
    return a + b + c


def fast_target(a, b, c, width=0):
    """ALGO 2. the fast form: the sum directly (at least `width` digits)."""
    return digits(true_sum(a, b, c), width)


def slow_target(a, b, c):
    """ALGO 2. one simplification step: the carry c' and the digit d of a0 + b0 + c, as `c';d`."""
    column = a % 10 + b % 10 + c
    return f"{column // 10};{column % 10}"


def shorten(text, carry):
    """ALGO 2. the problem a slow step leaves, (a // 10) + (b // 10) + c': drops the operands' last
    (written first) digits and writes the step's carry; None when nothing is left (1-digit
    operands). Pure string surgery on the problem text: no sum is ever computed."""
    a, b = text.split("+")[:2]
    return f"{a[1:]}+{b[1:]}+{carry}" if len(a) > 1 else None


def supervised_pairs(problem, width=0):
    """ALGO 3. the ground-truth fast and slow (prompt, target) pairs of one problem, both operands
    zero-padded to `width` digits (our augmentation: --pad_width)."""
    text = problem_text(*problem, width)
    return [(text + FAST, fast_target(*problem, width)), (text + SLOW, slow_target(*problem))]


def curriculum_problems(rng, n, count):
    """ALGO 3. fresh problems for a curriculum round, half at length n, half at a length drawn
    from 1..n."""
    problems = []
    for _ in range(count):
        length = n if rng.random() < 0.5 else rng.randint(1, n)
        problems.append(sample_problem(rng, length))
    return problems


# ---------------------------------------------------------------- self-labelling (the firewall)
# Everything from here to label_problems sees problems only as text and answers only from `solve`
# (prompts -> completions of the model): no function that knows the sum is reachable. (Prompt
# widths up to pad_width were supervised with zero high digits; see the module docstring.)
SLOW_OUTPUT = re.compile(r"([01]);(\d)")


def simplify_then_guess(solve, texts, k):
    """ALGO 6. for each problem text, the K candidate answers and its first slow output.

    Candidate j runs j slow steps, then fast-guesses the rest; the answer is the digits the slow
    steps emitted (the sum's lowest, written first) followed by the guess. Greedy decoding makes
    candidate j's slow steps the first ones of candidate j+1, so the chains share them."""
    candidates = [[] for _ in texts]
    first_slow = [None] * len(texts)
    rests = list(texts)  # what is left of each problem
    tails = [""] * len(texts)  # the digits its slow steps emitted
    active = list(range(len(texts)))
    for step in range(k):
        for i, guess in zip(active, solve([rests[i] + FAST for i in active])):
            candidates[i].append(tails[i] + guess if guess.isdigit() else None)
        if step == k - 1:
            break
        still = []
        for i, out in zip(active, solve([rests[i] + SLOW for i in active])):
            match = SLOW_OUTPUT.fullmatch(out)
            if match is None:  # a malformed step ends the chain: its later candidates vote invalid
                continue
            if step == 0:
                first_slow[i] = out
            carry, digit = match.groups()
            tails[i] = tails[i] + digit
            rests[i] = shorten(rests[i], carry)
            if rests[i] is not None:
                still.append(i)
            else:
                # nothing is left: the carry is the leading digit, the chain has the whole answer
                candidates[i].append(tails[i] + ("1" if carry == "1" else ""))
        active = still
    for text, answers in zip(texts, candidates):
        # a broken chain's unmade candidates vote invalid: the majority stays one of all K (or of
        # n+1 for n-digit operands, n < K), so a lone fast guess cannot win the vote by default
        n_digits = len(text.split("+")[0])
        whole = min(k, n_digits + 1)
        answers += [None] * (whole - len(answers))
    return candidates, first_slow


def majority(candidates):
    """ALGO 6. the vote: the answer of more than half of the candidates; None when no answer has
    a strict majority."""
    votes = Counter(c for c in candidates if c is not None)
    if not votes:
        return None
    answer, count = votes.most_common(1)[0]
    return answer if count > len(candidates) / 2 else None


def commutative_label(label_ab, label_ba):
    """ALGO 7. the label only if a+b and b+a agree."""
    return label_ab if label_ab is not None and label_ab == label_ba else None


def label_problems(solve, problems, k):
    """ALGO 5-7. self-made fast and slow pairs for problems (a, b, c), labelled by `solve` alone.

    Returns the pairs, each problem's label (None: dropped) and the fraction of problems whose
    fast answers (candidate k=0, both orders) already equal their label."""
    forward = [problem_text(a, b, c) for a, b, c in problems]
    backward = [problem_text(b, a, c) for a, b, c in problems]
    texts = forward + backward
    candidates, first_slow = simplify_then_guess(solve, texts, k)
    m = len(problems)  # problem i is texts[i] one way round and texts[i + m] the other
    pairs = []
    labels = []
    agree = 0
    for i in range(m):
        label = commutative_label(majority(candidates[i]), majority(candidates[i + m]))
        labels.append(label)
        if label is None:
            continue
        agree += candidates[i][0] == label == candidates[i + m][0]
        pairs += [(texts[i] + FAST, label), (texts[i + m] + FAST, label)]
        # slow pairs: the answer after the first step (candidate k=1) is the label both ways
        if candidates[i][1:2] == [label] and candidates[i + m][1:2] == [label]:
            pairs += [(texts[i] + SLOW, first_slow[i]), (texts[i + m] + SLOW, first_slow[i + m])]
    return pairs, labels, agree / m


# ---------------------------------------------------------------- model, training, evaluation
def model_solver(model, tokenizer, batch_size):
    """prompts -> greedy completions of the model: the only source of self-training answers."""
    def solve(prompts):
        budget = max(map(len, prompts), default=0) + 4  # every answer is shorter than its prompt
        # each rank decodes a share, every rank gets all
        completions = generate(model, tokenizer, prompts, max_new_tokens=budget,
                               batch_size=batch_size, sharded=True)
        return [c.text for c in completions]
    return solve


def accuracy(solve, problems, mode):
    """Exact match of greedy fast (`=`) or slow (`>`) outputs against the ground truth."""
    answers = solve([problem_text(*p) + mode for p in problems])
    target = fast_target if mode == FAST else slow_target
    truth = [target(*p) for p in problems]
    return sum(x == y for x, y in zip(answers, truth)) / len(problems)


def replay_pairs(rng, buffer, total, below):
    """`total` pairs drawn evenly over the buffer's lengths under `below` (ground truth up to N0,
    self-made above)."""
    lengths = [n for n in buffer if n < below]
    pairs = []
    for n in lengths:
        pairs += rng.choices(buffer[n], k=total // len(lengths))
    return pairs


def finetune(model, tokenizer, pairs, args, epochs, seed):
    """sft.train with this run's optimiser settings: labels on target + EOS, fresh AdamW per call
    (warm-up, then linear decay to 0 within the call)."""
    train_args = sft.Args(model=args.model, out_dir=args.out_dir, epochs=epochs, lr=args.lr,
                          warmup_ratio=args.warmup_ratio, batch_size=args.batch_size,
                          micro_batch_size=args.micro_batch_size, seed=seed)
    return sft.train(model, tokenizer, pairs, train_args)[-1]["loss"]


def format_table(rows):
    """The per-length fast accuracy table: one row per stage, one column per digit length."""
    lengths = sorted({n for _, accs in rows for n in accs})
    lines = ["stage        " + "".join(f"{n:>6}" for n in lengths)]
    for stage, accs in rows:
        cells = [f"{accs[n]:>6.2f}" if n in accs else "     -" for n in lengths]
        lines.append(f"{stage:<13}" + "".join(cells))
    return "\n".join(lines)


def check_args(args, model):
    if args.n0 < 1 or args.max_digits < args.n0:
        fail(f"need 1 <= n0 <= max_digits, got n0={args.n0} and max_digits={args.max_digits}")
    if min(args.candidates, args.n_eval, args.sup_problems, args.n_problems, args.pad_width) < 1:
        fail("candidates, n_eval, sup_problems, n_problems and pad_width must be at least 1")
    longest = 2 * (2 * args.max_digits + 4) + 2  # a slow prompt, its output and BOS/EOS, in bytes
    context = getattr(model.config, "max_position_embeddings", None) or longest
    if longest > context:
        fail(f"{args.max_digits}-digit problems need {longest} tokens but {args.model} has "
             f"{context}: lower --max_digits")


def main(argv=None):
    args = parse_args(Args, {"toy": TOY}, argv)
    check_common(args, positive=["max_rounds", "self_rounds", "lr", "batch_size",
                                 "micro_batch_size", "gen_batch_size"],
                 at_least_zero=["replay", "warmup_ratio"])
    # PLUMBING model, logger, the fixed evaluation sets
    model, tokenizer = load_model(args.model, seed=args.seed)
    check_args(args, model)
    logger = Logger(args.out_dir)
    rng = random.Random(args.seed)
    runs = iter(range(args.seed, 10 ** 9))  # the seed of each fine-tune
    solve = model_solver(model, tokenizer, args.gen_batch_size)
    # ALGO 8. a fixed set of a+b problems per length, each with its own seed
    eval_sets = {}
    for n in range(1, args.max_digits + 2):
        eval_rng = random.Random(f"{args.seed}/eval/{n}")
        eval_sets[n] = [sample_problem(eval_rng, n, carry=0) for _ in range(args.n_eval)]

    def evaluate_lengths(last):
        """ALGO 8. fast accuracy on lengths 1..last (ground truth allowed here only)."""
        return {n: accuracy(solve, eval_sets[n], FAST) for n in range(1, last + 1)}

    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.model}: {n_params / 1e6:.2f}M parameters; "
          f"ground truth on 1..{args.n0} digits, self-training up to {args.max_digits}")
    start = time.time()
    # PLUMBING one run per folder; --resume goes on after the last length finished, from its state
    state = start_run(args)
    path = os.path.join(args.out_dir, "state.pt")
    fresh = dict(next=args.n0 + 1, buffer={}, table=[], rng=rng, runs=runs)
    done = load_state(state, model) if state else fresh
    buffer = done["buffer"]  # length -> the pairs trained on, for replay
    table = done["table"]
    rng = done["rng"]
    runs = done["runs"]

    # ALGO 3. the supervised phase: a curriculum over 1..N0 digits, ground-truth fast and slow pairs
    if state is None:  # skipped on --resume: the state saved after it holds its model and data
        for n in range(1, args.n0 + 1):
            for round_ in range(1, args.max_rounds + 1):
                problems = curriculum_problems(rng, n, args.sup_problems)
                pairs = [supervised_pairs(p, rng.randint(1, args.pad_width)) for p in problems]
                flat = [pair for two in pairs for pair in two]
                loss = finetune(model, tokenizer, flat, args, 1, next(runs))
                for p, two in zip(problems, pairs):
                    buffer.setdefault(len(str(p[0])), []).extend(two)
                checks = [sample_problem(rng, n) for _ in range(args.n_eval)]
                fast = accuracy(solve, checks, FAST)
                slow = accuracy(solve, checks, SLOW)
                logger.log(f"supervised {n}.{round_}", loss=loss, fast_acc=fast, slow_acc=slow)
                if min(fast, slow) >= args.threshold:
                    break
        table.append(("supervised", evaluate_lengths(args.n0 + 1)))
        # PLUMBING the precondition of step 4: slow (CoT) steps already work one digit past N0
        slow_next = accuracy(solve, eval_sets[args.n0 + 1], SLOW)
        logger.log("supervised", slow_acc_next=slow_next, seconds=round(time.time() - start))
        print(format_table(table), flush=True)
        save(model, tokenizer, args.out_dir, args)
        save_state(path, model, next=args.n0 + 1, buffer=buffer, table=table, rng=rng, runs=runs)

    # ALGO 5. self-training: N = N0+1, N0+2, ... with no new ground truth
    for n in range(done["next"], args.max_digits + 1):
        for round_ in range(1, args.self_rounds + 1):
            # ALGO 5-7. fresh n-digit problems, labelled by simplify-then-guess + commutativity
            problems = [sample_problem(rng, n) for _ in range(args.n_problems)]
            pairs, labels, agreement = label_problems(solve, problems, args.candidates)
            buffer.setdefault(n, []).extend(pairs)
            # PLUMBING the labels' true error rate, for the log only (the paper's Figure 5)
            kept = [(p, label) for p, label in zip(problems, labels) if label is not None]
            wrong = sum(label != fast_target(*p) for p, label in kept)
            logger.log(f"self-train {n}.{round_}", kept=len(kept) / len(problems),
                       label_error=wrong / max(len(kept), 1), fast_agreement=agreement)
            # ALGO 5. the length is learnt once fast answers equal the slow labels (no ground truth)
            if agreement >= args.agreement or not kept:
                break
            # ALGO 5. fine-tune on the new length's pairs plus a replay of earlier lengths
            replayed = replay_pairs(rng, buffer, args.replay, n)
            finetune(model, tokenizer, pairs + replayed, args, 1, next(runs))
        # PLUMBING evaluate (step 8), log the table, save
        accs = evaluate_lengths(n + 1)  # n+1 shows that fast mode cannot do the next length yet
        table.append((f"self-train {n}", accs))
        per_length = {f"acc_{m}": acc for m, acc in accs.items()}
        logger.log(f"self-train {n}", **per_length, seconds=round(time.time() - start))
        print(format_table(table), flush=True)
        save(model, tokenizer, args.out_dir, args)
        collapsed = accs[n] < args.collapse_below
        after = args.max_digits + 1 if collapsed else n + 1  # a collapsed run is done
        save_state(path, model, next=after, buffer=buffer, table=table, rng=rng, runs=runs)
        # ALGO 9. stop when the fast accuracy at the new length collapses (error avalanching)
        if collapsed:
            print(f"accuracy at {n} digits collapsed to {accs[n]:.2f}: stopping")
            break
    save(model, tokenizer, args.out_dir, args)
    print(f"saved {args.out_dir}")


if __name__ == "__main__":
    main()
