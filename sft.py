"""SFT baseline: supervised fine-tuning on gold rationales.

Not a paper of its own: the supervised stage that three of the papers build on and compare
against. Each paper's recipe (template, loss mask, schedule, batch) is a preset:
- ReFT's warm-up and SFT baseline (Luong et al., 2024, arXiv 2401.08967; official:
  lqtrung1998/mwp_ReFT, train_sft_model.py): the defaults;
- Self-Explore's SFT and RFT stages (Hwang et al., 2024, arXiv 2404.10346; official:
  hbin0701/Self-Explore, sft/train_generator.py): `--preset self_explore`;
- GSI's per-iteration fine-tuning (Ding et al., 2024, arXiv 2411.00750; official:
  Yiwen-Ding/Guided-Self-Improvement, train.py): `--preset gsi`.
Other methods import `train` for their supervised stages, `TEMPLATES`/`prompt_for`/`target_for`
for their prompts and `encode_pair` (prompt | target + EOS tokenisation) for DPO pairs.

    python sft.py --model codellama-7b --task gsm8k            # ReFT's SFT baseline (the defaults)
    python sft.py --preset self_explore --model deepseek-math-7b
    python sft.py --preset gsi --model llama3-8b
    python sft.py --preset toy_base                  # the toy base, CPU -> runs/toy-base
    python sft.py --preset toy                       # SFT of it on the toy task -> runs/toy-sft
    torchrun --nproc_per_node 8 sft.py --model codellama-7b    # 8 GPUs (README, One GPU, many GPUs)

Implements the three papers' SFT, as these steps (the ALGO tags below cite them):
1. render prompt and target with the paper's template;
2. tokenise prompt + target + EOS; labels on the target and EOS (on the prompt too with
   --loss_on_prompt, as Self-Explore's sft/train_generator.py does);
3. L = -(1/N) sum_t log p(y_t | y_<t) over the N labelled tokens of an optimiser step (no paper
   states the normalisation under gradient accumulation: ours);
4. AdamW, linear warm-up then linear decay to 0, gradient clipping;
5. greedy test accuracy after each epoch, with the same template.

Deviations (README, Deviations from the papers):
- every template's prompt gets the tokenizer's default BOS (ReFT's code adds none), so that
  training and generate() see the same prompt tokens;
- the last epoch is the result (ReFT picks the best epoch on the test set);
- fp32 master weights, never pure bf16 (Self-Explore casts the model to bf16);
- common.extract_answer/is_equiv grade every preset (reft_ppo.py and self_explore.py grade by
  their papers' official rules, which can differ on the same outputs).
"""
import math
import random
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from common import (TOY_TASK, WORLD, Logger, all_reduce, batch_sequences, check_args,
                    check_context, evaluate, fail, gradient_checkpointing, linear_schedule,
                    load_model, load_task, parse_args, save, shard, token_logprobs, wrap_model)

# ALGO 1. (prompt, target) as each paper's official SFT code writes them; the target gets EOS
# appended at tokenisation
TEMPLATES = {
    "reft": ("Question:\n{question}\nAnswer reasoning:\n",
             "{rationale}\nTherefore, the answer is: {answer}"),
    # program-of-thought: the rationale is the program
    "reft_program": ("Question:\n{question}\nAnswer reasoning:\n", "{rationale}"),
    "self_explore": ("{question}\n", "{rationale}\nThe answer is {answer}"),
    # pretraining text (the toy base): no prompt, the whole piece is the target
    "plain": ("", "{rationale}"),
    "gsi": ("Below is a math problem, please give a step-by-step answer.\n\n"
            "### Question:\n{question}\n\n### Your step-by-step answer:\n",
            "{rationale}\nThe answer is {answer}"),
}


def prompt_for(template, question):
    return TEMPLATES[template][0].format(question=question.strip())


def target_for(template, example):
    return TEMPLATES[template][1].format(rationale=example.rationale.strip(), answer=example.answer)


@dataclass
class Args:
    """Fine-tune a model on gold rationales (SFT); report greedy test accuracy after each epoch."""
    model: str = "codellama-7b"
    """base model: a paper's (codellama-7b, deepseek-math-7b, llama3-8b, mistral-7b, ...), a hub id,
    a local checkpoint folder, or tiny (built in, untrained)"""
    task: str = "gsm8k"
    """arith, gsm8k, math, svamp, or a .jsonl/.json file"""
    test_task: str = ""
    """test split: a .jsonl/.json file, a folder or a task ('' = --task's; a lone file has none)"""
    template: str = "reft"
    """prompt/target format: reft, self_explore or gsi (each paper's own); plain for a corpus"""
    loss_on_prompt: bool = False
    """also train on the prompt tokens (Self-Explore's loss_on_prefix)"""
    out_dir: str = "runs/sft"
    """where the checkpoint, args.json, metrics.jsonl and samples.jsonl go"""
    epochs: int = 40  # paper: ReFT SFT baseline, 40 epochs
    """epochs to run"""
    schedule_epochs: int = 0
    """epochs the LR schedule is computed for (0: --epochs); ReFT's warm-up stops at epoch 2
    of 40"""
    lr: float = 1e-5  # paper: all three recipes
    """peak learning rate"""
    warmup_ratio: float = 0.1  # paper: ReFT, GSI
    """fraction of the schedule spent in linear warm-up; linear decay to 0 after it"""
    batch_size: int = 48  # paper: ReFT 3/GPU x 8 GPUs x accumulation 2
    """sequences per optimiser step"""
    micro_batch_size: int = 4
    """sequences per forward/backward; batch_size / micro_batch_size steps of gradient
    accumulation"""
    max_length: int = 1024  # paper: ReFT, GSI
    """longer prompt+target sequences are cut to this many tokens"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    adam_eps: float = 1e-8
    """AdamW epsilon"""
    grad_clip: float = 1.0
    """maximum gradient norm"""
    eval_max_new_tokens: int = 512
    """generation budget when evaluating on the test split"""
    eval_batch_size: int = 32
    """prompts per generation batch when evaluating"""
    n_eval: int = 0
    """evaluate on the first n test questions (0: all)"""
    test_each_epoch: bool = True
    """greedy test accuracy after each epoch (off for a corpus, which has no test split)"""
    save_every_epoch: bool = False
    """also save out_dir/epoch-K after every epoch (the papers keep every epoch)"""
    gradient_checkpointing: bool = True
    """recompute activations in backward on GPU (non-reentrant)"""
    lora_rank: int = 0
    """LoRA rank (0: full fine-tuning)"""
    seed: int = 42  # paper: ReFT, GSI
    """seed for initialisation, shuffling and sampling"""


PRESETS = {
    # Self-Explore SFT: loss on the prompt too, no warm-up, batch 64, 2 epochs of a linear decay
    # computed for 5 (official code: scripts/gsm8k/sft/run_ft.sh).
    "self_explore": dict(template="self_explore", loss_on_prompt=True, warmup_ratio=0.0,
                         batch_size=64, epochs=2, schedule_epochs=5),
    # GSI, one iteration: batch 64, 1 epoch.
    "gsi": dict(template="gsi", batch_size=64, epochs=1),
    # The toy world: SFT of the toy base on TOY_TASK, on a CPU, 40 epochs as ReFT's SFT baseline:
    # validation accuracy stops rising by epoch 25-28; lr 1e-3 tied 3e-3 on toy world v2 (README,
    # The toy world). The other methods' toy presets start from runs/toy-sft, with its template.
    "toy": dict(model="runs/toy-base", task=TOY_TASK, template="self_explore",
                out_dir="runs/toy-sft", epochs=40, lr=1e-3, batch_size=32, micro_batch_size=32,
                max_length=256, eval_max_new_tokens=200, eval_batch_size=200, seed=0),
    # The toy base model (README, The toy world): tiny pretrained with next-token loss on the
    # built-in arithmetic corpus, one pass, about 13 minutes on 2 CPU cores.
    "toy_base": dict(model="tiny", task="toy_corpus", template="plain", loss_on_prompt=True,
                     test_each_epoch=False, out_dir="runs/toy-base", epochs=1, lr=3e-3,
                     warmup_ratio=0.02, batch_size=32, micro_batch_size=32, max_length=256,
                     seed=0),
}
TOY = PRESETS["toy"]


def encode_pair(tokenizer, prompt, target):
    """ALGO 2. (prompt_ids, target_ids + [EOS]), the prompt with the tokenizer's defaults (its
    BOS). The target is cut from the joint tokenisation: its first token is the one the model sees
    after the prompt (not a word-start variant)."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    joint = tokenizer(prompt + target)["input_ids"]
    if joint[:len(prompt_ids)] == prompt_ids:
        target_ids = joint[len(prompt_ids):]
    else:
        target_ids = tokenizer(target, add_special_tokens=False)["input_ids"]
    return prompt_ids, target_ids + [tokenizer.eos_token_id]


def tokenize_pairs(tokenizer, pairs, loss_on_prompt, max_length):
    """ALGO 2. (unlabelled ids, labelled ids) per pair: prompt | target + EOS, or nothing |
    everything with loss_on_prompt; cut to max_length tokens in all."""
    data = []
    for prompt, target in pairs:
        prompt_ids, target_ids = encode_pair(tokenizer, prompt, target)
        if loss_on_prompt:
            target_ids = prompt_ids + target_ids
            prompt_ids = []
        room = max(0, max_length - len(prompt_ids))  # what the prompt leaves of max_length
        data.append((prompt_ids[:max_length], target_ids[:room]))
    return data


def train(model, tokenizer, pairs, args, eval_fn=None, logger=None):
    """Fine-tune `model` in place on (prompt, target) string pairs; returns the per-epoch metrics.

    Reads from `args`: loss_on_prompt, epochs, schedule_epochs, lr, warmup_ratio, batch_size,
    micro_batch_size, max_length, weight_decay, adam_eps, grad_clip, gradient_checkpointing,
    save_every_epoch, out_dir, seed. `eval_fn(model) -> dict` runs after each epoch."""
    if not pairs:
        fail("no training examples: the data set (or the filtered set of samples) is empty")
    data = tokenize_pairs(tokenizer, pairs, args.loss_on_prompt, args.max_length)
    steps_per_epoch = math.ceil(len(data) / args.batch_size)
    total_steps = steps_per_epoch * (args.schedule_epochs or args.epochs)
    warmup_steps = int(args.warmup_ratio * total_steps)
    wrapped = wrap_model(model)  # DDP or FSDP2 under torchrun, else the model
    # ALGO 4. AdamW, linear warm-up then linear decay to 0
    trainable = [p for p in wrapped.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, eps=args.adam_eps,
                                  weight_decay=args.weight_decay)
    schedule = linear_schedule(optimizer, warmup_steps, total_steps)
    gradient_checkpointing(model, args.gradient_checkpointing and model.device.type == "cuda")
    rng = random.Random(args.seed)
    history = []
    for epoch in range(1, args.epochs + 1):
        model.train()
        order = rng.sample(range(len(data)), len(data))
        losses = []
        for step in tqdm(range(steps_per_epoch), desc=f"sft epoch {epoch}", leave=False):
            indices = order[step * args.batch_size:(step + 1) * args.batch_size]
            batch = shard([data[i] for i in indices])  # this rank's share
            micro_batches = []
            for i in range(0, len(batch), args.micro_batch_size):
                micro = batch[i:i + args.micro_batch_size]
                prompts = [p for p, _ in micro]
                targets = [t for _, t in micro]
                sequences = batch_sequences(prompts, targets, tokenizer.pad_token_id, model.device)
                micro_batches.append(sequences)
            # ALGO 3. N counts the labelled tokens of the whole step, over every rank
            n_tokens = all_reduce(sum(target_mask.sum() for *_, target_mask in micro_batches))
            step_loss = 0.0
            for input_ids, attention_mask, target_mask in micro_batches:
                logprobs = token_logprobs(wrapped, input_ids, attention_mask)
                # ALGO 3. L = -(1/N) sum_t log p(y_t | y_<t); times WORLD as ranks average gradients
                loss = -(logprobs * target_mask).sum() / n_tokens * WORLD
                if not torch.isfinite(loss):
                    fail(f"non-finite loss at epoch {epoch} step {step}: lower --lr "
                         f"(the last saved checkpoint is kept)")
                loss.backward()
                step_loss += loss.item()
            torch.nn.utils.clip_grad_norm_(wrapped.parameters(), args.grad_clip)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(step_loss)
        epoch_loss = torch.tensor(sum(losses) / len(losses), device=model.device)
        loss = all_reduce(epoch_loss, mean=True).item()
        metrics = {"epoch": epoch, "loss": loss, "lr": schedule.get_last_lr()[0]}
        if eval_fn is not None:
            metrics |= eval_fn(model)
        if logger is not None:
            logger.log(f"sft {epoch}", **metrics)
        if args.save_every_epoch:
            save(model, tokenizer, f"{args.out_dir}/epoch-{epoch}", args)
        history.append(metrics)
    gradient_checkpointing(model, False)
    return history


def main(argv=None):
    args = parse_args(Args, PRESETS, argv)
    if args.template not in TEMPLATES:
        fail(f"unknown template {args.template!r}: use one of {', '.join(TEMPLATES)}")
    check_args(args, positive=["epochs", "lr", "batch_size", "micro_batch_size", "max_length",
                               "eval_max_new_tokens", "eval_batch_size"],
               at_least_zero=["schedule_epochs", "n_eval", "lora_rank"])
    random.seed(args.seed)
    # PLUMBING data and model first, so a bad name stops before any work
    train_set = load_task(args.task, "train")
    test_set = load_task(args.task, "test", args.test_task) if args.test_each_epoch else []
    test_set = test_set[:args.n_eval] if args.n_eval else test_set
    model, tokenizer = load_model(args.model, lora_rank=args.lora_rank, seed=args.seed)
    test_prompts = [prompt_for(args.template, ex.question) for ex in test_set]
    check_context(model, tokenizer, {"test question": test_prompts}, max_length=args.max_length)
    logger = Logger(args.out_dir)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.model}: {n_params / 1e6:.2f}M parameters; "
          f"{len(train_set)} train / {len(test_set)} test examples of {args.task}")

    def question_prompt(example):
        return prompt_for(args.template, example.question)

    def eval_fn(model):
        # ALGO 5. greedy test accuracy, the training template
        result = evaluate(model, tokenizer, test_set, question_prompt,
                          max_new_tokens=args.eval_max_new_tokens, batch_size=args.eval_batch_size)
        logger.samples(result.pop("records")[:20])
        return {"test_accuracy": result["accuracy"]}

    # ALGO 1. the gold rationales rendered with the paper's template, then SFT
    pairs = [(prompt_for(args.template, ex.question), target_for(args.template, ex))
             for ex in train_set]
    train(model, tokenizer, pairs, args, eval_fn if args.test_each_epoch else None, logger)
    save(model, tokenizer, args.out_dir, args)
    print(f"saved {args.out_dir}")


if __name__ == "__main__":
    main()
