"""Benchmark on one GPU: the sampler against model.generate; SFT, DPO and PPO steps, full and LoRA.

    python tests/bench_gpu.py            # a CUDA GPU (about 20 GB); on a CPU it says so and exits

The model is a randomly initialised Llama of 1.1B parameters with TinyLlama's shape, built from a
config (nothing is downloaded), in bf16 as the scripts load it on a GPU.
- Sampling: generated tokens per second of common.generate and of model.generate on the same
  prompts, greedy and at T = 1, and their ratio; a random model rarely emits EOS, so both run to
  the token limit.
- Training: the mean time of one optimiser step and the peak of torch.cuda.max_memory_allocated
  (weights, gradients, optimiser state and activations) for the steps the scripts take: SFT
  (sft.py: token_logprobs, AdamW), DPO (self_explore.py: pair_logprobs, RMSprop) and PPO
  (reft_ppo.py: policy_forward with the value head, clipped losses, AdamW); each with full
  fine-tuning and with LoRA rank 16, with gradient checkpointing (as the scripts run on a GPU) and
  without.
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TQDM_DISABLE", "1")
import reft_ppo  # noqa: E402
import self_explore  # noqa: E402
from common import (LoRALinear, batch_sequences, byte_tokenizer, generate,  # noqa: E402
                    gradient_checkpointing, token_logprobs)

# TinyLlama-1.1B's shape (grouped-query attention); byte-level token ids: nothing to download
CONFIG = dict(vocab_size=32000, hidden_size=2048, num_hidden_layers=22, num_attention_heads=32,
              num_key_value_heads=4, intermediate_size=5632, max_position_embeddings=2048,
              bos_token_id=256, eos_token_id=257, pad_token_id=258)
PAD = 258


def make_model(config, device, lora_rank=0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**config))
    model = model.to(device, torch.bfloat16).eval()  # eval: dropout off, as in RL
    if lora_rank:  # fp32 adapters on the frozen bf16 trunk, as load_model(lora_rank=...) adds them
        model.requires_grad_(False)
        for module in list(model.model.modules()):
            for name, child in module.named_children():
                if isinstance(child, torch.nn.Linear):
                    setattr(module, name, LoRALinear(child, lora_rank, 2 * lora_rank))
    return model


def timed(step, device, repeats=5):
    """(seconds per call, peak GiB) of step(), after one warm-up call (kernels, allocator, optimiser
    state)."""
    step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device == "cuda" else float("nan")
    return (time.perf_counter() - start) / repeats, peak


def bench_sampler(model, device, batch=32, new_tokens=256):
    tokenizer = byte_tokenizer()
    prompts = [f"Question {i}: what is " + "(12+34)*5-6 and " * (1 + i % 4) + "?\n"
               for i in range(batch)]
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left").to(device)
    for temperature in (0.0, 1.0):
        rates = {}
        for name in ("ours", "ours, checkpointing on", "model.generate"):
            # a PPO rollout samples with checkpointing on
            gradient_checkpointing(model, name == "ours, checkpointing on")
            counted = []

            def run():
                torch.manual_seed(0)
                if name == "model.generate":
                    sampling = dict(temperature=1.0, top_k=0, top_p=1.0) if temperature else {}
                    out = model.generate(**enc, max_new_tokens=new_tokens,
                                         min_new_tokens=new_tokens, pad_token_id=PAD,
                                         do_sample=bool(temperature), **sampling)
                    counted.append(out[:, enc["input_ids"].shape[1]:].numel())
                else:
                    out = generate(model, tokenizer, prompts, max_new_tokens=new_tokens,
                                   temperature=temperature)
                    counted.append(sum(len(c.token_ids) for c in out))
            seconds, _ = timed(run, device, repeats=3)
            rates[name] = counted[-1] / seconds
        gradient_checkpointing(model, False)
        mode = "greedy" if temperature == 0 else "T = 1"
        listed = ", ".join(f"{name} {rate:.0f} tok/s" for name, rate in rates.items())
        ratio = rates["ours"] / rates["model.generate"]
        print(f"sampler, {mode}, {batch} prompts x {new_tokens} tokens: {listed}; "
              f"ours / model.generate {ratio:.2f}", flush=True)


def training_steps(model, device, batch=8, prompt_length=128, response_length=384):
    """(name, forward_backward, parameters, optimiser class) of each script's step on a fixed random
    batch of token ids."""
    # prompt, chosen (and SFT target), rejected
    lengths = (prompt_length, response_length, response_length)
    rows = [tuple(torch.randint(0, 256, (length,)).tolist() for length in lengths)
            for _ in range(batch)]
    prompts = [p for p, _, _ in rows]
    targets = [c for _, c, _ in rows]
    input_ids, attention_mask, mask = batch_sequences(prompts, targets, PAD, device)
    pairs = rows[:batch // 2]  # DPO: chosen and rejected of batch // 2 pairs in one forward
    with torch.no_grad():
        reference = self_explore.pair_logprobs(model, pairs, PAD)
    rollout = dict(input_ids=input_ids, attention_mask=attention_mask, mask=mask,
                   old_logprobs=torch.zeros_like(mask), old_values=torch.zeros_like(mask),
                   advantages=torch.randn_like(mask) * mask, returns=mask.clone())
    value_head = torch.nn.Linear(model.config.hidden_size, 1).to(device)

    def sft():  # sft.train: the mean log-loss of the labelled tokens
        (-(token_logprobs(model, input_ids, attention_mask) * mask).sum() / mask.sum()).backward()

    def dpo():
        policy_logprobs = self_explore.pair_logprobs(model, pairs, PAD)
        losses, _ = self_explore.dpo_loss(policy_logprobs, reference, 0.1)
        losses.mean().backward()

    def ppo():  # the value head on the shared trunk
        logprobs, values = reft_ppo.policy_forward(model, value_head, input_ids,
                                                   attention_mask, 1.0)
        policy_loss, value_loss, _ = reft_ppo.ppo_losses(logprobs, values, rollout, 0.2, 0.2)
        (policy_loss.mean() + 5.0 * value_loss.mean()).backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    with_value_head = trainable + list(value_head.parameters())
    return [("SFT", sft, trainable, torch.optim.AdamW),
            ("DPO", dpo, trainable, torch.optim.RMSprop),
            ("PPO", ppo, with_value_head, torch.optim.AdamW)]


def time_step(forward_backward, parameters, optimizer_class, device):
    """One optimiser step's time and peak memory; its optimiser state is freed on return."""
    optimizer = optimizer_class(parameters, lr=1e-6)

    def step():
        forward_backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    try:
        seconds, peak = timed(step, device)
        return f"{1000 * seconds:.0f} ms, peak {peak:.1f} GiB"
    except torch.cuda.OutOfMemoryError:
        return "out of memory"


def bench_training(config, device):
    print("training steps on 8 sequences of 128 + 384 tokens (DPO: 4 pairs), bf16 weights",
          flush=True)
    for lora_rank in (0, 16):
        model = make_model(config, device, lora_rank)
        for name, forward_backward, parameters, optimizer_class in training_steps(model, device):
            results = []
            for checkpointing in (True, False):
                gradient_checkpointing(model, checkpointing)
                results.append(time_step(forward_backward, parameters, optimizer_class, device))
                model.zero_grad(set_to_none=True)
                if device == "cuda":
                    torch.cuda.empty_cache()
            mode = f"LoRA r={lora_rank}" if lora_rank else "full"
            with_checkpointing, without = results
            print(f"  {name} {mode}: with gradient checkpointing {with_checkpointing}; "
                  f"without {without}", flush=True)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()


def main(config=CONFIG, device="cuda"):
    model = make_model(config, device)
    name = torch.cuda.get_device_name() if device == "cuda" else device
    billions = sum(p.numel() for p in model.parameters()) / 1e9
    print(f"device: {name}, torch {torch.__version__}, {billions:.2f}B parameters", flush=True)
    bench_sampler(model, device)
    del model
    bench_training(config, device)


if __name__ == "__main__":
    if not torch.cuda.is_available():
        print("bench_gpu.py measures a GPU and none is here: run it on a machine with CUDA "
              "(nothing to do on CPU)")
        sys.exit(0)
    main()
