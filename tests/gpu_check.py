"""One GPU check in one call (issue 20): bench_gpu.py, the paper-scale paths, a fast sampler.

    python tests/gpu_check.py                 # a CUDA GPU; starts no new run after --budget s
    python tests/gpu_check.py --tiny          # toy sizes on a CPU: checks that the script runs
    python tests/gpu_check.py --sections fast # some sections (paper, bench, fast); --out DIR

Writes summary.json and summary.md into --out (default $OUT, else ./gpu-check) after every
section, so that a run stopped at its time limit still leaves what it measured; a section or
run left out for time is marked skipped (rerun it with --sections).

1. paper: a random Llama with deepseek-math-7b's shape (SHAPE_7B), cut to --layers (1 and 2),
   saved as a local folder with common.byte_tokenizer() (the vocabulary stays 102400; the head
   favours printable ASCII, see byte_head), then each script's main() for a few steps on the
   arith task, loaded by load_model as a hub checkpoint is: bf16 on CUDA, --lora_rank 64,
   gradient checkpointing (every script turns it on on CUDA), the reference. sft.py runs first;
   the others start from its output. A random model answers nothing right, so the RL scripts are
   graded by `judge` (half the texts right, as tests/test_resume.py does), or their pairs and
   advantages would be empty. Per run: wall time, peak torch.cuda.max_memory_allocated, ok or
   the error's last line. The 7B row is a straight line through the peaks at the two layer
   counts, extrapolated to 30 layers: an extrapolation, not a measurement.
2. bench: tests/bench_gpu.py's measurements on its 1.1B random model, as its main() runs them,
   the sampler runs cut to --bench_tokens new tokens (128; its own default is 256).
3. fast: a sampler with a static KV cache (transformers StaticCache), its one-token decode step
   compiled (torch.compile, mode "reduce-overhead": CUDA graphs), one prefill shared by the n
   samples of a prompt; tokens/s against model.generate and common.generate at batch 64 on
   bench_gpu's 1.1B model, greedy and T = 1, and greedy parity with model.generate.
"""
import argparse
import contextlib
import gc
import io
import json
import math
import os
import shutil
import sys
import tempfile
import time
import traceback
import zlib

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TQDM_DISABLE", "1")
import bench_gpu  # noqa: E402
import common  # noqa: E402
import guided_self_improve  # noqa: E402
import reft_ppo  # noqa: E402
import score  # noqa: E402
import self_explore  # noqa: E402
import sft  # noqa: E402
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, StaticCache  # noqa: E402

# deepseek-ai/deepseek-math-7b-base's config.json: Llama, no grouped-query attention, untied head
SHAPE_7B = dict(vocab_size=102400, hidden_size=4096, intermediate_size=11008, num_hidden_layers=30,
                num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)
# the same kind of model at toy size, for --tiny: still more ids than the byte tokenizer uses
SHAPE_TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=172, num_hidden_layers=30,
                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                  rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)
BYTE_IDS = dict(bos_token_id=256, eos_token_id=257, pad_token_id=258)  # common.byte_tokenizer()
TINY_BENCH = dict(bench_gpu.CONFIG, vocab_size=512, hidden_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, intermediate_size=172,
                  initializer_range=0.2)  # sharp attention: a wrong cache slot shows
TASK = "arith:n_train=16,n_test=8"
TINY_TASK = "arith:n_train=8,n_test=2"  # --tiny: as small as every script accepts


def cuda():
    return torch.cuda.is_available()


def peak_gib():
    return torch.cuda.max_memory_allocated() / 2 ** 30 if cuda() else float("nan")


def free_memory():
    gc.collect()
    if cuda():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def last_line(error):
    lines = traceback.format_exception(error)
    return "".join(lines).strip().splitlines()[-1][:300]


# -- 1. bench_gpu.py, as its main() runs it ----------------------------------------------------

def run_bench(tiny, new_tokens):
    """bench_gpu's sampler and training measurements; their printed lines are the results."""
    config = TINY_BENCH if tiny else bench_gpu.CONFIG
    device = "cuda" if cuda() else "cpu"
    captured = io.StringIO()
    started = time.perf_counter()

    class Tee(io.TextIOBase):
        def write(self, text):
            sys.__stdout__.write(text)
            return captured.write(text)
    try:
        with contextlib.redirect_stdout(Tee()):
            model = bench_gpu.make_model(config, device)
            if tiny:
                bench_gpu.bench_sampler(model, device, batch=4, new_tokens=8)
            else:
                bench_gpu.bench_sampler(model, device, new_tokens=new_tokens)
            del model
            free_memory()
            bench_gpu.bench_training(config, device)
        error = None
    except Exception as exception:  # noqa: BLE001  one section's failure must not stop the others
        error = last_line(exception)
    free_memory()
    return dict(lines=captured.getvalue().splitlines(), error=error,
                seconds=round(time.perf_counter() - started, 1))


# -- 2. each script's paper-scale path ---------------------------------------------------------

def build_checkpoint(path, shape, layers):
    """A random Llama of `shape` with `layers` layers, saved as a hub checkpoint is (bf16)."""
    config = LlamaConfig(**dict(shape, num_hidden_layers=layers), **BYTE_IDS)
    torch.manual_seed(0)
    with torch.device("cuda" if cuda() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    with torch.no_grad():  # samples of byte text, as a trained model's are text (see byte_head)
        byte_head(model.lm_head.weight, config.hidden_size)
    model.save_pretrained(path)
    common.byte_tokenizer().save_pretrained(path)
    parameters = sum(p.numel() for p in model.parameters())
    del model
    free_memory()
    return parameters


def byte_head(weight, hidden_size):
    """Only printable ASCII and newline get logits (of standard deviation about 5, so that samples
    of one prompt differ); every other id gets 0, far below. An untouched random head samples ids
    the byte tokenizer lacks (>= 259, decoded to nothing) 99.7% of the time at 102400 ids, and
    bytes >= 128 decode to U+FFFD: every text would be empty or unreadable."""
    text_ids = [ord("\n"), *range(32, 127)]
    rows = weight[text_ids].normal_(0, 5 / hidden_size ** 0.5)  # final RMSNorm: hidden rms ~1
    weight.zero_()
    weight[text_ids] = rows


def judge(text, answer, kind="number"):
    """A grade for models that solve nothing: right for half the texts (as test_resume.py)."""
    return zlib.crc32(text.encode()) % 2 == 0


def judged_reward(problem, text, args):
    """score.reward graded by `judge`."""
    return float(judge(text, problem.answer))


def script_runs(start, trained, root, tiny):
    """(name, module, argv) of each script; `trained` is sft.py's output (the others' start)."""
    lora = ["--lora_rank", "8" if tiny else "64"]
    common_flags = ["--preset", "toy", "--task", TINY_TASK if tiny else TASK, *lora]
    tokens = "8" if tiny else "32"
    n_eval = "2" if tiny else "8"
    return [
        ("sft", sft, [*common_flags, "--model", start, "--epochs", "1", "--batch_size", "8",
                      "--micro_batch_size", "4", "--max_length", "128", "--n_eval", n_eval,
                      "--eval_max_new_tokens", tokens, "--eval_batch_size", n_eval,
                      "--out_dir", trained]),
        ("reft_ppo", reft_ppo, [*common_flags, "--model", trained, "--warmup_epochs", "1",
                                "--warmup_batch_size", "8", "--epochs", "1", "--n_train", "8",
                                "--rollout_batch_size", "8", "--micro_batch_size", "4",
                                "--max_total_tokens", "96", "--eval_max_total_tokens", "96",
                                "--n_eval", n_eval, "--out_dir", f"{root}/reft_ppo"]),
        ("self_explore", self_explore, [*common_flags, "--model", start, "--sft_model", trained,
                                        "--n_val", "2", "--n_samples", "2", "--explore_k", "1",
                                        "--rft_epochs", "1", "--dpo_epochs", "1",
                                        "--sft_batch_size", "8", "--dpo_batch_size", "4",
                                        "--micro_batch_size", "4", "--max_new_tokens", tokens,
                                        "--out_dir", f"{root}/self_explore"]),
        ("guided_self_improve", guided_self_improve,
         [*common_flags, "--model", start, "--sft_model", trained, "--iterations", "2",
          "--n_questions", "8", "--n_samples", "2", "--min_correct", "1", "--guided_rounds", "1",
          "--train_sequences", "8", "--batch_size", "8", "--micro_batch_size", "4",
          "--max_new_tokens", tokens, "--out_dir", f"{root}/guided_self_improve"]),
        ("score", score, [*common_flags, "--model", trained, "--format_warmup_epochs", "1",
                          "--format_warmup_questions", "8", "--n_train", "8", "--n_eval", n_eval,
                          "--stage1_steps", "2", "--stage2_steps", "2", "--batch_size", "4",
                          "--samples_per_prompt", "2", "--micro_batch_size", "4",
                          "--max_new_tokens", tokens, "--out_dir", f"{root}/score"]),
    ]


def run_script(module, argv):
    """One script's main(argv): ok, wall seconds, peak GiB; an error is kept, never raised."""
    free_memory()
    patched = [m for m in (self_explore, guided_self_improve) if hasattr(m, "is_correct")]
    originals = [m.is_correct for m in patched]
    original_reward = getattr(score, "reward", None)
    for m in patched:
        m.is_correct = judge
    if original_reward is not None:
        score.reward = judged_reward
    started = time.perf_counter()
    try:
        module.main(argv)
        error = None
    except (Exception, SystemExit) as exception:  # noqa: BLE001  fail() raises SystemExit
        error = last_line(exception)
    finally:
        for m, original in zip(patched, originals):
            m.is_correct = original
        if original_reward is not None:
            score.reward = original_reward
    if cuda():
        torch.cuda.synchronize()
    result = dict(ok=error is None, error=error, seconds=round(time.perf_counter() - started, 1),
                  peak_gib=round(peak_gib(), 2))
    free_memory()
    return result


def run_paper(tiny, layer_counts, deadline, root):
    """Every script at each layer count; rows of (layers, script, result), then the 7B line."""
    shape = SHAPE_TINY if tiny else SHAPE_7B
    rows = []
    for layers in layer_counts:
        folder = os.path.join(root, f"layers-{layers}")
        start = os.path.join(folder, "random")
        parameters = build_checkpoint(start, shape, layers)
        trained = os.path.join(folder, "sft")
        for name, module, argv in script_runs(start, trained, folder, tiny):
            if time.time() > deadline:
                skipped = dict(ok=False, error="skipped: out of time")
                rows.append(dict(layers=layers, script=name, **skipped))
                continue
            if name != "sft" and not os.path.isfile(os.path.join(trained, "config.json")):
                argv = [start if arg == trained else arg for arg in argv]  # sft failed: start raw
            result = run_script(module, argv)
            rows.append(dict(layers=layers, script=name, parameters=parameters, **result))
            print(f"paper-scale {name}, {layers} layers: {result}", flush=True)
            out_dir = argv[argv.index("--out_dir") + 1]
            if out_dir != trained:
                shutil.rmtree(out_dir, ignore_errors=True)  # several GB of checkpoints each
        shutil.rmtree(folder, ignore_errors=True)
    task = TINY_TASK if tiny else TASK
    return dict(shape=shape, task=task, rows=rows, extrapolated=extrapolate(rows, layer_counts))


def extrapolate(rows, layer_counts, target=30):
    """Per script: peak = fixed + per_layer * layers through the two smallest layer counts."""
    if len(layer_counts) < 2:
        return {}
    low, high = sorted(layer_counts)[:2]
    lines = {}
    for script in dict.fromkeys(row["script"] for row in rows):
        peaks = {row["layers"]: row.get("peak_gib") for row in rows
                 if row["script"] == script and row.get("ok")}
        if low in peaks and high in peaks and not math.isnan(peaks[low]):
            per_layer = (peaks[high] - peaks[low]) / (high - low)
            at_target = round(peaks[low] + per_layer * (target - low), 1)
            lines[script] = dict(per_layer_gib=round(per_layer, 3), layers=target,
                                 peak_gib_extrapolated=at_target)
    return lines


# -- 3. a fast sampler: static KV cache, compiled decode step, shared prefill ------------------

def decode_slot(prompt_length, step):
    """The cache slot (and the attention-mask column) of the token fed at decode step `step`."""
    return prompt_length + step


def decode_step(model, tokens, positions, mask, cache):
    """One token per row through the static cache: fixed shapes, so CUDA graphs can replay it."""
    with common.autocast(model):
        logits = model(input_ids=tokens[:, None], position_ids=positions[:, None],
                       attention_mask=mask, cache=cache, use_cache=True).logits
    return logits[:, -1].float()


def compile_step(kind, fullgraph=True):
    """decode_step as run: eager, or compiled (reduce-overhead on CUDA: CUDA graphs)."""
    if kind == "eager":
        return decode_step
    if kind == "compiled-eager-backend":  # Dynamo's tracing only: cheap on a CPU
        return torch.compile(decode_step, backend="eager", dynamic=False, fullgraph=fullgraph)
    mode = "reduce-overhead" if cuda() else "default"
    return torch.compile(decode_step, mode=mode, dynamic=False, fullgraph=fullgraph)


def working_step(kind, probe):
    """(step, error): the step compiled as one graph; where Dynamo (another torch) cannot trace
    one, the error, and the step compiled with graph breaks allowed. probe(step) runs it once
    at the measured shapes, which also compiles it there."""
    step = compile_step(kind)
    if kind == "eager":
        return step, None
    try:
        probe(step)
        return step, None
    except Exception as exception:  # noqa: BLE001
        torch._dynamo.reset()
        return compile_step(kind, fullgraph=False), last_line(exception)


CACHES = {}  # one StaticCache per shape, reused: a CUDA graph replays at fixed addresses


def static_cache(model, rows, slots):
    key = (id(model), rows, slots)
    if key in CACHES:
        CACHES[key].reset()  # zeros in place: the addresses stay
    else:
        CACHES.clear()  # a new shape: let the old caches go
        CACHES[key] = StaticCache(config=model.config, max_cache_len=slots)
    return CACHES[key]


@torch.no_grad()
def fast_generate(model, input_ids, attention_mask, max_new_tokens, *, temperature=0.0, n=1,
                  eos_id, pad_id, step=decode_step):
    """[B * n, max_new_tokens] token ids (prompt-major, pad after EOS) of left-padded prompts.
    One prefill of the B prompts; its keys and values are copied n times into a StaticCache
    of B * n rows and prompt + max_new_tokens slots; then every decode step has one shape."""
    model.eval()
    prompt_length = input_ids.shape[1]
    positions = common.positions_from_mask(attention_mask)
    prefill = DynamicCache(config=model.config)
    with common.autocast(model):
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                       cache=prefill, use_cache=True, logits_to_keep=1).logits[:, -1].float()
    rows = input_ids.shape[0] * n
    cache = static_cache(model, rows, prompt_length + max_new_tokens)
    for layer, computed in zip(cache.layers, prefill.layers):  # the shared prefill, n copies
        layer.update(computed.keys.repeat_interleave(n, 0), computed.values.repeat_interleave(n, 0))
    del prefill
    logits = logits.repeat_interleave(n, 0)
    mask = attention_mask.new_zeros(rows, prompt_length + max_new_tokens)
    mask[:, :prompt_length] = attention_mask.repeat_interleave(n, 0)
    position = positions[:, -1].repeat_interleave(n, 0)
    done = torch.zeros(rows, dtype=torch.bool, device=input_ids.device)
    out = torch.full((rows, max_new_tokens), pad_id, dtype=torch.long, device=input_ids.device)
    for t in range(max_new_tokens):
        if temperature > 0:
            tokens = torch.multinomial(torch.softmax(logits / temperature, -1), 1).squeeze(-1)
        else:
            tokens = logits.argmax(-1)
        tokens = torch.where(done, pad_id, tokens)
        out[:, t] = tokens
        done = done | (tokens == eos_id)
        if t == max_new_tokens - 1 or (t % 8 == 7 and bool(done.all())):
            break
        mask[:, decode_slot(prompt_length, t)] = 1
        position = position + 1
        # clone: a CUDA graph's replay overwrites its output
        logits = step(model, tokens, position, mask, cache).clone()
    return out


def hf_greedy(model, enc, max_new_tokens, pad_id):
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id)
    return out[:, enc["input_ids"].shape[1]:]


def parity(ours, theirs, pad_id):
    """Greedy rows token-for-token: HF stops when every row is done, the rest of ours is pad."""
    length = theirs.shape[1]
    equal = ours[:, :length] == theirs
    rest_pad = bool((ours[:, length:] == pad_id).all())
    rows_equal = equal.all(-1)
    first = [int((~row).nonzero()[0]) if not row.all() else None for row in equal]
    return dict(equal=bool(rows_equal.all()) and rest_pad, rows_equal=int(rows_equal.sum()),
                rows=len(rows_equal), token_agreement=round(float(equal.float().mean()), 4),
                first_mismatch=first[:8])


def prompts_for(batch):
    return [f"Question {i}: what is " + "(12+34)*5-6 and " * (1 + i % 4) + "?\n"
            for i in range(batch)]


def check_parity(model, batch, new_tokens, step=decode_step):
    tokenizer = common.byte_tokenizer()
    device = next(model.parameters()).device
    enc = tokenizer(prompts_for(batch), return_tensors="pt", padding=True,
                    padding_side="left").to(device)
    ours = fast_generate(model, enc["input_ids"], enc["attention_mask"], new_tokens,
                         eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id, step=step)
    theirs = hf_greedy(model, enc, new_tokens, tokenizer.pad_token_id)
    return parity(ours, theirs, tokenizer.pad_token_id)


def tokens_per_second(run, repeats):
    run()  # warm-up: kernels, allocator, compilation, CUDA graph capture
    if cuda():
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        counted = run()
    if cuda():
        torch.cuda.synchronize()
    return counted * repeats / (time.perf_counter() - started)


def run_fast(tiny, deadline, new_tokens):
    """Tokens/s of model.generate, common.generate and the fast sampler; greedy parity."""
    device = "cuda" if cuda() else "cpu"
    config = TINY_BENCH if tiny else bench_gpu.CONFIG
    batch = 4 if tiny else 64
    repeats = 1  # after a warm-up call: a GPU times steadily, and device time is short
    model = bench_gpu.make_model(config, device)
    if tiny:
        model = model.float()  # fp32 on a CPU: no near-ties from bf16 rounding
    tokenizer = common.byte_tokenizer()
    pad = tokenizer.pad_token_id
    enc = tokenizer(prompts_for(batch), return_tensors="pt", padding=True,
                    padding_side="left").to(device)
    kinds = ["eager", "compiled-eager-backend" if tiny else "compiled"]
    result = dict(batch=batch, new_tokens=new_tokens, device=device, config=config, rates={},
                  parity={}, errors={})

    def probe(step):
        fast_generate(model, enc["input_ids"], enc["attention_mask"], new_tokens, eos_id=-1,
                      pad_id=pad, step=step)
    steps = {}
    for kind in kinds:
        steps[kind], error = working_step(kind, probe)
        if error:
            result["errors"][f"{kind} as one graph (now with graph breaks)"] = error
    for temperature in (0.0, 1.0):
        label = "greedy" if temperature == 0 else "T=1"
        sampling = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0) if temperature else {}

        def hf():
            torch.manual_seed(0)
            out = model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 pad_token_id=pad, **sampling)
            return out[:, enc["input_ids"].shape[1]:].numel()

        def ours():
            torch.manual_seed(0)
            out = common.generate(model, tokenizer, prompts_for(batch),
                                  max_new_tokens=new_tokens, temperature=temperature)
            return sum(len(c.token_ids) for c in out)
        runs = [("model.generate", hf), ("common.generate", ours)]
        for kind in kinds:
            for n in (1, 2 if tiny else 8):
                def fast(step=steps[kind], n=n):
                    rows = batch // n
                    ids = enc["input_ids"][:rows]
                    out = fast_generate(model, ids, enc["attention_mask"][:rows], new_tokens,
                                        temperature=temperature, n=n, eos_id=-1, pad_id=pad,
                                        step=step)
                    return out.numel()
                runs.append((f"fast {kind}" + (f", {batch // n} prompts x n={n}" if n > 1 else ""),
                             fast))
        for name, run in runs:
            if time.time() > deadline:
                result["errors"][f"{label}, {name}"] = "skipped: out of time"
                continue
            try:
                rate = tokens_per_second(run, repeats)
                result["rates"][f"{label}, {name}"] = round(rate)
            except Exception as exception:  # noqa: BLE001
                result["errors"][f"{label}, {name}"] = last_line(exception)
            print(f"fast sampler, {label}, {name}: {result['rates'].get(f'{label}, {name}')} tok/s",
                  flush=True)
        base = result["rates"].get(f"{label}, model.generate")
        if base:
            result[f"{label} ratios to model.generate"] = {
                name.split(", ", 1)[1]: round(rate / base, 2)
                for name, rate in result["rates"].items() if name.startswith(label)}
    for kind in kinds:
        try:
            result["parity"][kind] = check_parity(model, batch, new_tokens, steps[kind])
        except Exception as exception:  # noqa: BLE001
            result["errors"][f"parity {kind}"] = last_line(exception)
    CACHES.clear()
    torch._dynamo.reset()  # the compiled step and its CUDA graphs go
    free_memory()
    return result


# -- the summary -------------------------------------------------------------------------------

def markdown(summary):
    lines = [f"# GPU check ({summary['device']}, torch {summary['torch']}, "
             f"transformers {summary['transformers']})", ""]
    bench = summary.get("bench")
    if bench:
        lines += ["## bench_gpu.py", "", *[f"    {line}" for line in bench["lines"]]]
        lines += [f"error: {bench['error']}" if bench["error"] else "", ""]
    paper = summary.get("paper")
    if paper:
        lines += ["## Paper-scale paths (random deepseek-math-7b shape, fewer layers)", "",
                  "| layers | script | ok | seconds | peak GiB | error |", "|---" * 6 + "|"]
        for row in paper["rows"]:
            lines.append(f"| {row['layers']} | {row['script']} | {row.get('ok')} | "
                         f"{row.get('seconds', '')} | {row.get('peak_gib', '')} | "
                         f"{row.get('error') or ''} |")
        lines += ["", "7B (30 layers), EXTRAPOLATED from the two layer counts:", ""]
        for script, line in paper["extrapolated"].items():
            lines.append(f"- {script}: {line['per_layer_gib']} GiB per layer, "
                         f"{line['peak_gib_extrapolated']} GiB at 30 layers (extrapolation)")
        lines.append("")
    fast = summary.get("fast")
    if fast:
        lines += [f"## Fast sampler (batch {fast['batch']}, {fast['new_tokens']} new tokens)", ""]
        lines += [f"- {name}: {rate} tok/s" for name, rate in fast["rates"].items()]
        for label in ("greedy", "T=1"):
            ratios = fast.get(f"{label} ratios to model.generate")
            if ratios:
                lines.append(f"- {label}, ratio to model.generate: {ratios}")
        lines += [f"- greedy parity, {kind}: {check}" for kind, check in fast["parity"].items()]
        lines += [f"- error, {name}: {error}" for name, error in fast["errors"].items()]
    return "\n".join(lines) + "\n"


def write(summary, out):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, default=str)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(markdown(summary))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="toy sizes, for a CPU")
    parser.add_argument("--out", default=os.environ.get("OUT") or "gpu-check")
    parser.add_argument("--sections", default="paper,bench,fast",
                        help="comma-separated, run in this order: paper, bench, fast")
    parser.add_argument("--layers", default="1,2", help="layer counts of the paper-scale model")
    parser.add_argument("--bench_tokens", type=int, default=128,
                        help="new tokens per sampler run of bench_gpu.py (its default: 256)")
    parser.add_argument("--fast_tokens", type=int, default=128,
                        help="new tokens per run of the fast-sampler section")
    parser.add_argument("--budget", type=float, default=540.0,
                        help="seconds; later runs are skipped (and said so) once it is spent")
    args = parser.parse_args(argv)
    deadline = time.time() + args.budget
    if args.tiny and not cuda():
        torch.set_num_threads(1)  # toy sizes gain nothing from threads that wait for each other
    import transformers
    summary = dict(device=torch.cuda.get_device_name() if cuda() else "cpu",
                   torch=torch.__version__, transformers=transformers.__version__,
                   tiny=args.tiny, argv=sys.argv[1:] if argv is None else argv)
    write(summary, args.out)
    for section in args.sections.split(","):
        started = time.perf_counter()
        if time.time() > deadline:
            summary[section] = None
            summary.setdefault("skipped", []).append(section)
            continue
        if section == "paper":
            layer_counts = [int(layers) for layers in args.layers.split(",")]
            with tempfile.TemporaryDirectory(prefix="gpu-check-") as root:
                summary["paper"] = run_paper(args.tiny, layer_counts, deadline, root)
        elif section == "fast":
            new_tokens = 16 if args.tiny else args.fast_tokens
            summary["fast"] = run_fast(args.tiny, deadline, new_tokens)
        elif section == "bench":
            summary["bench"] = run_bench(args.tiny, args.bench_tokens)
        else:
            raise SystemExit(f"error: unknown section {section!r}: use paper, fast or bench")
        summary.setdefault("section_seconds", {})[section] = round(time.perf_counter() - started)
        free_memory()
        write(summary, args.out)
    print(markdown(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
