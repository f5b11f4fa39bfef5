"""Benchmark: common.generate vs model.generate throughput; token_logprobs vs naive peak memory.

    python tests/bench_sampler.py            # CPU here, or the GPU when there is one

Both sides run in the same process on the same randomly initialised model and batch and print a
ratio (ours / baseline). Throughput: generated tokens per second, greedy and sampled (T = 1).
Memory: the peak extra memory of one log-prob pass over 1k tokens with a 32k vocabulary, with and
without a backward pass; the baseline is the naive `model(ids).logits.log_softmax(-1).gather(...)`.
On CPU the peak is the growth of the resident set of a fresh subprocess (with glibc's mmap
threshold fixed, so freed tensors leave it); on CUDA it is torch.cuda.max_memory_allocated.
"""
import multiprocessing
import os
import resource
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TQDM_DISABLE", "1")
from common import byte_tokenizer, generate, token_logprobs  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_model(vocab_size, hidden_size, layers):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=layers,
                         num_attention_heads=hidden_size // 64, intermediate_size=4 * hidden_size,
                         max_position_embeddings=2048, bos_token_id=256, eos_token_id=257,
                         pad_token_id=258)
    return LlamaForCausalLM(config).to(DEVICE).eval()


def bench_throughput(batch, new_tokens):
    tokenizer = byte_tokenizer()
    on_cpu = DEVICE == "cpu"
    hidden_size = 256 if on_cpu else 1024
    model = make_model(len(tokenizer), hidden_size=hidden_size, layers=4 if on_cpu else 12)
    prompts = [f"question {i}: " + "(12+34)*5-6 " * (1 + i % 4) for i in range(batch)]
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left").to(DEVICE)
    for temperature in (0.0, 1.0):
        timings = {}
        for name in ("ours", "model.generate"):
            best = 0.0
            for _ in range(3):  # best of three: the first run also warms up
                torch.manual_seed(0)
                if DEVICE == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                if name == "ours":
                    out = generate(model, tokenizer, prompts, max_new_tokens=new_tokens,
                                   temperature=temperature)
                    count = sum(len(c.token_ids) for c in out)
                else:
                    sampling = dict(do_sample=False)
                    if temperature:
                        sampling = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
                    out = model.generate(**enc, max_new_tokens=new_tokens,
                                         pad_token_id=tokenizer.pad_token_id, **sampling)
                    generated = out[:, enc["input_ids"].shape[1]:]
                    count = int((generated != tokenizer.pad_token_id).sum())
                if DEVICE == "cuda":
                    torch.cuda.synchronize()
                best = max(best, count / (time.perf_counter() - start))
            timings[name] = best
        mode = "greedy" if temperature == 0 else "sampled"
        ours = timings["ours"]
        baseline = timings["model.generate"]
        print(f"throughput {mode:8s} batch {batch} x {new_tokens} new tokens: "
              f"ours {ours:.0f} tok/s, model.generate {baseline:.0f} tok/s, "
              f"ratio {ours / baseline:.2f}")


def logprob_pass(variant, backward, queue):
    model = make_model(32000, hidden_size=256, layers=2)
    ids = torch.randint(0, 32000, (1, 1024), device=DEVICE)
    mask = torch.ones_like(ids)
    torch.set_grad_enabled(backward)
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if variant == "ours":
        values = token_logprobs(model, ids, mask)
    else:
        logprobs = model(ids, attention_mask=mask).logits.float().log_softmax(-1)
        values = logprobs[0, :-1].gather(-1, ids[0, 1:, None])
    if backward:
        values.sum().backward()
    if DEVICE == "cuda":
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    queue.put(peak)


def bench_memory():
    # glibc otherwise raises its mmap threshold after the first large free and keeps freed buffers
    # in the heap, so the resident set would count dead tensors; a fixed threshold returns them.
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(2 ** 20)
    context = multiprocessing.get_context("spawn")
    for backward in (False, True):
        peaks = {}
        for variant in ("ours", "naive"):
            queue = context.Queue()
            process = context.Process(target=logprob_pass, args=(variant, backward, queue))
            process.start()
            peaks[variant] = queue.get()
            process.join()
        label = "forward+backward" if backward else "forward"
        ours = peaks["ours"]
        naive = peaks["naive"]
        print(f"token_logprobs peak memory ({label}, 1024 tokens, vocab 32000, {DEVICE}): "
              f"ours {ours / 2**20:.0f} MiB, naive {naive / 2**20:.0f} MiB, "
              f"ratio {ours / naive:.2f}")


if __name__ == "__main__":
    print(f"device: {DEVICE}, torch {torch.__version__}")
    if "--memory-only" not in sys.argv:
        bench_throughput(batch=16, new_tokens=64)
    bench_memory()
