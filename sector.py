"""SECToR: Self-Education via Chain-of-Thought Reasoning, on multi-digit addition.

"Chain-of-Thought Reasoning is a Policy Improvement Operator", Hugh Zhang and David C. Parkes,
arXiv 2309.08589 (2023); no official code (PAPERS.md section 6).

A model learns addition of 1..N0-digit numbers from ground truth in two modes: fast (the sum
directly) and slow (one chain-of-thought step that emits the last digit of the sum and leaves a
problem one digit shorter). Then it teaches itself longer numbers with no ground-truth answer (only
their prompt width was supervised, with zeros; see the padding below): for N = N0+1, N0+2, ...,
it labels fresh N-digit problems with simplify-then-guess (k slow steps, then a fast guess of what
is left, for k = 0..K-1; majority vote), keeps a label only when a+b and b+a agree, and is
fine-tuned to give those answers fast. Slow thinking plus the vote is a policy improvement
operator: the slow policy of one model becomes the fast policy of the next. It stops when fast
accuracy at the new length collapses (error avalanching).

    python sector.py                    # the paper's schedule: ground truth on 1..6 digits, self-taught up to 30
    python sector.py --preset toy       # CPU: ground truth on 1..3 digits, self-taught 4..8 (see README)

Implements PAPERS 6.1 steps 1-9: the task (a+b and a+b+1), the fast and slow forms, the supervised
curriculum, simplify-then-guess, the commutativity check, fine-tuning on the new length with
replay, fast-mode greedy evaluation on 100 problems per length, and the stop on collapse.

Our choices, where the paper's are unknown (PAPERS 6.2-6.3):
- Formats: numbers are written least-significant digit first, the way a slow step reads them, and
  the carry-in is always written: fast `321+654+0=` -> `975` (123+456 = 579) and `321+654+1=` ->
  `085` (580); slow `321+654+0>` -> `0;9` (3+6 = 9): the step's carry, then the emitted digit. The
  problem the step leaves, `21+54+0` (12+45), is written by string surgery on the prompt
  (`shorten`: drop both operands' first digits, write the new carry-in), not by the model: copying
  digits is not the skill under study, and it keeps a slow step's output three characters long at
  any length. `>` ("simplifies to") tells a slow prompt from a fast one. Base case: a slow step
  on 1-digit operands leaves nothing; its carry is the sum's leading digit. n-digit operands are
  uniform in [10^(n-1), 10^n); the carry-in c of a+b+c is 0 or 1. Why this order: written
  most-significant digit first (`123+456=` -> `579`), `tiny`'s fast mode learnt 3-digit sums to
  only 61% in 50 curriculum rounds and a self-taught length to 14% in 10 rounds. Reversed, digit i
  of the sum depends on digit i of each operand, at the same distance back for every i, which is
  learnt several times faster; writing `+0` keeps that distance the same with and without a
  carry-in.
- Prompts of the supervised phase, fast and slow, write both operands zero-padded to a random width
  up to `pad_width` (`7500+8600+1=` -> `6210`, `7500+8600+1>` -> `1;6`). The values still have at
  most N0 digits: no digit beyond the N0-th is ever nonzero in a ground-truth example, and fast
  accuracy at N0+1 digits stays 0 until self-training (see README). So the firewall holds for
  answers, not for widths: the replayed supervised pairs keep their padding, a self-taught length
  up to `pad_width` has been seen as a prompt width (zeros in the high digits), and what is
  self-taught is the arithmetic on nonzero digits beyond the N0-th. At the toy's 7-digit step
  (`pad_width` 8), 12.5% of the replayed pairs (a quarter of the replayed ground-truth ones) are
  written 7 or 8 digits wide. Why, for `tiny`:
  unpadded (and most-significant digit first), the slow step was right on 34% of 4-digit problems
  after training on 1..3 digits (it found the digits to add by their distance from the end, new at a
  new length) and S&G labels were 27% wrong, which the commutativity check cannot catch (the misread
  positions are the same in both orders); padding slow prompts made it 95%. With only slow prompts
  padded, the fast mode learnt 4, 5 and 6 digits in 10, 3 and 4 fine-tunes and never 7: on 7-digit
  prompts its 2nd and 3rd answer digits stayed a uniform guess (loss ln 10, also after 6000
  ground-truth pairs) while the others were right, so what it had learnt was tied to the widths it
  had been trained on. With fast prompts padded too, each new length takes one or two fine-tunes.
- Curriculum: rounds of `sup_problems` fresh problems (half at the new length n, half at a length
  drawn from 1..n), one fast and one slow pair each; move on once fast and slow exact match on 100
  fresh n-digit problems both reach `threshold` (95%), or after `max_rounds`.
- Simplify-then-guess: candidate k (k = 0..K-1) takes k greedy slow steps, then a greedy fast guess
  of the remaining problem, and writes the guess after the emitted digits (the answer's lowest). The slow steps are
  shared (greedy decoding makes candidate k's first steps those of candidate k+1). A chain that
  reaches the base case gives its complete answer as its last candidate. Malformed outputs are
  invalid votes, and so are the candidates a malformed slow step leaves unmade; the label needs a
  strict majority of all the candidates (K, or n+1 for n-digit operands when n < K).
- Commutativity: the labels of a+b and b+a must agree, and then both fast pairs are kept. The slow
  pairs (each order's first slow step) are kept when the answer derived after that step (candidate
  k=1) equals the label in both orders.
- Replay: each fine-tune mixes `replay` pairs drawn evenly over the earlier lengths from a buffer of
  what was trained on: the supervised phase's ground-truth pairs (lengths <= N0) and the self-made
  pairs of lengths N0+1..N-1. No ground truth is made after the supervised phase. Replay has to
  outweigh the new length: with two replayed pairs per new problem (half as many as the new pairs),
  `tiny` learnt each new length in one or two fine-tunes but forgot the ones before (after 5 digits:
  13% on 3, 1% on 4, 93% on 5); with six or eight (1.5 or 2 times the new pairs) it kept them.
- Evaluation: a fixed set of `n_eval` = 100 `a+b` problems per length (its own seed), fast mode,
  greedy, exact match, for lengths 1..N+1 (N+1 shows that fast mode cannot yet do the next length).
  Collapse means fast accuracy at the new length below `collapse_below`. The error rate of the kept
  labels is measured against the truth and logged (`label_error`, PAPERS 6.4 Figure 5): evaluation
  only, it never changes a label.
- Self-training rounds: a length is labelled and fine-tuned on in rounds (fresh problems each) until
  the fast answers agree with the S&G labels on `agreement` of them, or `self_rounds` rounds; the
  paper's one step per length is `--self_rounds 1`. The stop test uses only the model's own labels.
- Fine-tuning: `sft.train` (AdamW, warm-up then linear decay to 0 within every call), one call per
  curriculum round and per self-training round.
Deviation (PAPERS 6.3): a decoder-only causal LM (`tiny`, trained from scratch, by default) in place
of the paper's 582M ByT5 encoder-decoder, so the script shares common.py; any causal LM name works.
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

FAST, SLOW = "=", ">"  # the prompt's last character picks the mode


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
    threshold: float = 0.95  # our choice (PAPERS 6.3)
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
    replay: int = 24000  # our choice: 6 pairs per new problem (see docstring)
    """pairs of earlier lengths mixed into each self-training fine-tune"""
    agreement: float = 0.9  # our choice
    """leave a self-taught length once this fraction of fresh problems gets fast answers equal to its label"""
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


TOY = dict(n0=3, max_digits=8, pad_width=8, out_dir="runs/toy-sector", batch_size=32, micro_batch_size=32, sup_problems=2000,
           n_problems=1000, replay=8000, self_rounds=20)


# ---------------------------------------------------------------- the task (PAPERS 6.1 step 1, 6.2)
def sample_problem(rng, n, carry=None):
    """(a, b, c): two n-digit operands and a carry-in c in {0, 1}; the task is a + b + c."""
    low = 10 ** (n - 1)
    c = rng.randint(0, 1) if carry is None else carry
    return rng.randrange(low, 10 * low), rng.randrange(low, 10 * low), c


def digits(x, width=0):  # our format: least-significant digit first (see docstring)
    return f"{x:0{width}d}"[::-1]


def problem_text(a, b, c, width=0):  # the carry-in always written, so that it moves no digit
    return f"{digits(a, width)}+{digits(b, width)}+{c}"


def true_sum(a, b, c):
    """Ground truth: the supervised phase and evaluation only, never a self-training label."""
    return a + b + c


def fast_target(a, b, c, width=0):  # 6.2, fast form: the sum directly (at least `width` digits)
    return digits(true_sum(a, b, c), width)


def slow_target(a, b, c):  # 6.1 step 2: one simplification step, d = (a0+b0+c) mod 10, carry c'
    column = a % 10 + b % 10 + c
    return f"{column // 10};{column % 10}"


def shorten(text, carry):  # 6.1 step 2: the problem a slow step leaves, (a // 10) + (b // 10) + c'
    """Drops the operands' last (written first) digits and writes the step's carry; None when nothing
    is left (1-digit operands). Pure string surgery on the problem text: no sum is ever computed."""
    a, b = text.split("+")[:2]
    return f"{a[1:]}+{b[1:]}+{carry}" if len(a) > 1 else None


def supervised_pairs(problem, width=0):
    """The ground-truth fast and slow (prompt, target) pairs of one problem (6.1 step 3), both operands
    zero-padded to `width` digits (our augmentation, see the docstring)."""
    text = problem_text(*problem, width)
    return [(text + FAST, fast_target(*problem, width)), (text + SLOW, slow_target(*problem))]


# ---------------------------------------------------------------- self-labelling (the firewall)
# Everything from here to label_problems sees problems only as text and answers only from `solve`
# (prompts -> completions of the model): no function that knows the sum is reachable. (Prompt widths
# up to pad_width were supervised with zero high digits; see the module docstring.)
SLOW_OUTPUT = re.compile(r"([01]);(\d)")


def simplify_then_guess(solve, texts, k):
    """6.1 step 6: for each problem text, the K candidate answers and its first slow output.

    Candidate j runs j slow steps, then fast-guesses the rest; the answer is the digits the slow steps
    emitted (the sum's lowest, written first) followed by the guess."""
    candidates, first_slow = [[] for _ in texts], [None] * len(texts)
    rests, tails, active = list(texts), [""] * len(texts), list(range(len(texts)))
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
            tails[i], rests[i] = tails[i] + digit, shorten(rests[i], carry)
            if rests[i] is not None:
                still.append(i)
            else:  # nothing is left: the carry is the leading digit and the chain has the complete answer
                candidates[i].append(tails[i] + ("1" if carry == "1" else ""))
        active = still
    for text, answers in zip(texts, candidates):
        # a broken chain's unmade candidates vote invalid: the majority stays one of all K (or of
        # n+1 for n-digit operands, n < K), so a lone fast guess cannot win the vote by default
        answers += [None] * (min(k, len(text.split("+")[0]) + 1) - len(answers))
    return candidates, first_slow


def majority(candidates):  # 6.1 step 6: the vote over the K answers
    """The answer of more than half of the candidates; None when no answer has a strict majority."""
    votes = Counter(c for c in candidates if c is not None)
    if not votes:
        return None
    answer, count = votes.most_common(1)[0]
    return answer if count > len(candidates) / 2 else None


def commutative_label(label_ab, label_ba):  # 6.1 step 7: keep only if a+b and b+a agree
    return label_ab if label_ab is not None and label_ab == label_ba else None


def label_problems(solve, problems, k):
    """6.1 steps 5-7: self-made fast and slow pairs for problems (a, b, c), labelled by `solve`
    alone. Returns the pairs, each problem's label (None: dropped) and the fraction of problems
    whose fast answers (candidate k=0, both orders) already equal their label."""
    texts = [problem_text(a, b, c) for a, b, c in problems] + [problem_text(b, a, c) for a, b, c in problems]
    candidates, first_slow = simplify_then_guess(solve, texts, k)
    m, pairs, labels, agree = len(problems), [], [], 0
    for i in range(m):
        label = commutative_label(majority(candidates[i]), majority(candidates[i + m]))
        labels.append(label)
        if label is None:
            continue
        agree += candidates[i][0] == label == candidates[i + m][0]
        pairs += [(texts[i] + FAST, label), (texts[i + m] + FAST, label)]
        if candidates[i][1:2] == [label] and candidates[i + m][1:2] == [label]:
            pairs += [(texts[i] + SLOW, first_slow[i]), (texts[i + m] + SLOW, first_slow[i + m])]
    return pairs, labels, agree / m


# ---------------------------------------------------------------- plumbing: model, training, evaluation
def model_solver(model, tokenizer, batch_size):
    """prompts -> greedy completions of the model: the only source of self-training answers."""
    def solve(prompts):
        budget = max(map(len, prompts), default=0) + 4  # every answer is shorter than its prompt
        completions = generate(model, tokenizer, prompts, max_new_tokens=budget, batch_size=batch_size, sharded=True)
        return [c.text for c in completions]  # each rank decodes a share, every rank gets all
    return solve


def accuracy(solve, problems, mode):
    """Exact match of greedy fast (`=`) or slow (`>`) outputs against the ground truth."""
    answers = solve([problem_text(*p) + mode for p in problems])
    truth = [(fast_target if mode == FAST else slow_target)(*p) for p in problems]
    return sum(x == y for x, y in zip(answers, truth)) / len(problems)


def replay_pairs(rng, buffer, total, below):
    """`total` pairs drawn evenly over the buffer's lengths under `below` (ground truth <= N0, self-made above)."""
    lengths = [n for n in buffer if n < below]
    return [pair for n in lengths for pair in rng.choices(buffer[n], k=total // len(lengths))]


def finetune(model, tokenizer, pairs, args, epochs, seed):
    """sft.train with this run's optimiser settings: labels on target + EOS, fresh AdamW per call."""
    train_args = sft.Args(model=args.model, out_dir=args.out_dir, epochs=epochs, lr=args.lr,
                          warmup_ratio=args.warmup_ratio, batch_size=args.batch_size,
                          micro_batch_size=args.micro_batch_size, seed=seed)
    return sft.train(model, tokenizer, pairs, train_args)[-1]["loss"]


def format_table(rows):
    """The per-length fast accuracy table: one row per stage, one column per digit length."""
    lengths = sorted({n for _, accs in rows for n in accs})
    lines = ["stage        " + "".join(f"{n:>6}" for n in lengths)]
    for stage, accs in rows:
        lines.append(f"{stage:<13}" + "".join(f"{accs[n]:>6.2f}" if n in accs else "     -" for n in lengths))
    return "\n".join(lines)


def check_args(args, model):
    if args.n0 < 1 or args.max_digits < args.n0:
        fail(f"need 1 <= n0 <= max_digits, got n0={args.n0} and max_digits={args.max_digits}")
    if min(args.candidates, args.n_eval, args.sup_problems, args.n_problems, args.pad_width) < 1:
        fail("candidates, n_eval, sup_problems, n_problems and pad_width must be at least 1")
    longest = 2 * (2 * args.max_digits + 4) + 2  # a slow prompt, its output and BOS/EOS, in bytes
    context = getattr(model.config, "max_position_embeddings", None) or longest
    if longest > context:
        fail(f"{args.max_digits}-digit problems need {longest} tokens but {args.model} has {context}: lower --max_digits")


def main(argv=None):
    args = parse_args(Args, {"toy": TOY}, argv)
    check_common(args, positive=["max_rounds", "self_rounds", "lr", "batch_size",
                                 "micro_batch_size", "gen_batch_size"],
                 at_least_zero=["replay", "warmup_ratio"])
    # PLUMBING: model, logger, the fixed evaluation sets
    model, tokenizer = load_model(args.model, seed=args.seed)
    check_args(args, model)
    logger, rng, runs = Logger(args.out_dir), random.Random(args.seed), iter(range(args.seed, 10 ** 9))
    solve = model_solver(model, tokenizer, args.gen_batch_size)
    eval_rngs = {n: random.Random(f"{args.seed}/eval/{n}") for n in range(1, args.max_digits + 2)}
    eval_sets = {n: [sample_problem(rng_n, n, carry=0) for _ in range(args.n_eval)] for n, rng_n in eval_rngs.items()}
    evaluate_lengths = lambda last: {n: accuracy(solve, eval_sets[n], FAST) for n in range(1, last + 1)}
    print(f"{args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; "
          f"ground truth on 1..{args.n0} digits, self-training up to {args.max_digits}")
    buffer, table, start = {}, [], time.time()
    # PLUMBING: one run per folder; --resume goes on after the last length finished, from its state
    state, path = start_run(args), os.path.join(args.out_dir, "state.pt")
    fresh = dict(next=args.n0 + 1, buffer=buffer, table=table, rng=rng, runs=runs)
    done = load_state(state, model) if state else fresh
    buffer, table, rng, runs = done["buffer"], done["table"], done["rng"], done["runs"]

    # 1. Supervised phase: a curriculum over 1..N0 digits with ground-truth fast and slow pairs
    if state is None:  # resumed: the state saved after it holds its model and data
        for n in range(1, args.n0 + 1):
            for round_ in range(1, args.max_rounds + 1):
                # ALGO: fresh problems, half at length n, half at a shorter or equal length
                problems = [sample_problem(rng, n if rng.random() < 0.5 else rng.randint(1, n))
                            for _ in range(args.sup_problems)]
                pairs = [supervised_pairs(p, rng.randint(1, args.pad_width)) for p in problems]
                flat = [pair for two in pairs for pair in two]
                loss = finetune(model, tokenizer, flat, args, 1, next(runs))
                for p, two in zip(problems, pairs):
                    buffer.setdefault(len(str(p[0])), []).extend(two)
                checks = [sample_problem(rng, n) for _ in range(args.n_eval)]
                fast, slow = accuracy(solve, checks, FAST), accuracy(solve, checks, SLOW)
                logger.log(f"supervised {n}.{round_}", loss=loss, fast_acc=fast, slow_acc=slow)
                if min(fast, slow) >= args.threshold:
                    break
        table.append(("supervised", evaluate_lengths(args.n0 + 1)))
        # PLUMBING: the precondition of 6.1 step 4, slow (CoT) steps already work one digit past N0
        slow_next = accuracy(solve, eval_sets[args.n0 + 1], SLOW)
        logger.log("supervised", slow_acc_next=slow_next, seconds=round(time.time() - start))
        print(format_table(table), flush=True)
        save(model, tokenizer, args.out_dir, args)
        save_state(path, model, next=args.n0 + 1, buffer=buffer, table=table, rng=rng, runs=runs)

    # 2. Self-training: N = N0+1, N0+2, ... with no new ground truth
    for n in range(done["next"], args.max_digits + 1):
        for round_ in range(1, args.self_rounds + 1):
            # ALGO 2a. fresh n-digit problems, labelled by simplify-then-guess + commutativity
            problems = [sample_problem(rng, n) for _ in range(args.n_problems)]
            pairs, labels, agreement = label_problems(solve, problems, args.candidates)
            buffer.setdefault(n, []).extend(pairs)
            # PLUMBING: the labels' true error rate, for the log only (PAPERS 6.4, Figure 5)
            kept = [(p, label) for p, label in zip(problems, labels) if label is not None]
            label_error = sum(label != fast_target(*p) for p, label in kept) / max(len(kept), 1)
            logger.log(f"self-train {n}.{round_}", kept=len(kept) / len(problems), label_error=label_error,
                       fast_agreement=agreement)
            # ALGO 2b. the length is learned once fast answers equal the slow labels (no ground truth)
            if agreement >= args.agreement or not kept:
                break
            # ALGO 2c. fine-tune on the new length's fast and slow pairs plus a replay of earlier lengths
            finetune(model, tokenizer, pairs + replay_pairs(rng, buffer, args.replay, n), args, 1, next(runs))
        # PLUMBING 2d. evaluate (ground truth allowed here only), log the table, save
        accs = evaluate_lengths(n + 1)
        table.append((f"self-train {n}", accs))
        logger.log(f"self-train {n}", **{f"acc_{m}": acc for m, acc in accs.items()}, seconds=round(time.time() - start))
        print(format_table(table), flush=True)
        save(model, tokenizer, args.out_dir, args)
        after = n + 1 if accs[n] >= args.collapse_below else args.max_digits + 1  # collapsed: done
        save_state(path, model, next=after, buffer=buffer, table=table, rng=rng, runs=runs)
        # ALGO 2e. stop when the fast accuracy at the new length collapses (error avalanching)
        if accs[n] < args.collapse_below:
            print(f"accuracy at {n} digits collapsed to {accs[n]:.2f}: stopping")
            break
    save(model, tokenizer, args.out_dir, args)
    print(f"saved {args.out_dir}")


if __name__ == "__main__":
    main()
