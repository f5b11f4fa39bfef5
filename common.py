"""Plumbing shared by every method script (no method's maths); its public names are a contract: see README's map."""
import argparse
import contextlib
import dataclasses
import functools
import inspect
import json
import math
import os
import random
import re
import resource
import shutil
import subprocess
import sys
import tempfile
from collections import namedtuple
from fractions import Fraction

import torch
import torch.distributed as dist
from tokenizers import Tokenizer, decoders, models, processors
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_state_dict, set_state_dict)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, DynamicCache, PreTrainedTokenizerFast
from transformers.modeling_layers import GradientCheckpointingLayer

RANK, WORLD = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))  # set by torchrun
if WORLD > 1 and not dist.is_initialized():  # under torchrun, join the group: NCCL with a GPU per rank, or gloo
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if RANK > 0:  # one voice: rank 0 prints (warnings and errors still show)
        sys.stdout = open(os.devnull, "w")

def fail(message):
    """Stop with one clear sentence (bad flag, missing file, malformed data...)."""
    raise SystemExit(f"error: {message}")

def parse_args(cls, presets=None, argv=None):
    """argparse from a dataclass, field docstrings as --help; explicit flags override `--preset NAME`'s values."""
    presets, fields = presets or {}, dataclasses.fields(cls)
    docs = {}  # a field's help: the string literal on the lines under it
    with contextlib.suppress(OSError, TypeError):  # no source code (a class typed into a notebook): no help
        docs = dict(re.findall(r'^ +(\w+):[^\n]*\n +"""(.*?)"""', inspect.getsource(cls), re.MULTILINE | re.DOTALL))
    parser = argparse.ArgumentParser(description=(cls.__doc__ or "").strip())
    parser.add_argument("--preset", choices=sorted(presets), help="a named set of overrides (see the script)")
    for f in fields:
        how = dict(action=argparse.BooleanOptionalAction) if f.type is bool else dict(type=f.type)
        parser.add_argument(f"--{f.name}", default=f.default, help=docs.get(f.name, "").replace("%", "%%"), **how)
    preset = parser.parse_known_args(argv)[0].preset
    if unknown := set(presets.get(preset, {})) - {f.name for f in fields}:
        fail(f"preset {preset!r} sets unknown fields {sorted(unknown)}")
    parser.set_defaults(**presets.get(preset, {}))
    return cls(**{name: value for name, value in vars(parser.parse_args(argv)).items() if name != "preset"})

ALIASES = {  # the papers' base models
    "deepseek-math-7b": "deepseek-ai/deepseek-math-7b-base", "mistral-7b": "mistralai/Mistral-7B-v0.1",
    "llemma-7b": "EleutherAI/llemma_7b", "llama2-7b": "meta-llama/Llama-2-7b-hf", "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B",
    "codellama-7b": "codellama/CodeLlama-7b-hf", "llama3-8b": "meta-llama/Meta-Llama-3-8B",
    "galactica-6.7b": "facebook/galactica-6.7b", "galactica-125m": "facebook/galactica-125m"}
TINY = dict(vocab_size=259, hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=384,
            max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=256, eos_token_id=257, pad_token_id=258)

def byte_tokenizer():
    """A byte-level tokenizer built in code: ids 0-255 are bytes, then <s>, </s>, <pad> (TINY's 259 ids)."""
    vocab = {f"<0x{b:02X}>": b for b in range(256)} | {"<s>": 256, "</s>": 257, "<pad>": 258}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True))
    backend.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 256)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")

def load_model(name_or_path, *, dtype=None, device=None, lora_rank=0, seed=0):
    """(model, tokenizer) from `tiny`, a paper alias, a local checkpoint or a hub id; see DESIGN.md."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    torch.manual_seed(seed)
    source = ALIASES.get(name_or_path, name_or_path)
    if source.partition(":")[0] == "tiny":  # a fresh ~1M-parameter Llama, no download; `tiny:key=value,...` resizes it
        config = AutoConfig.for_model("llama", **with_knobs(source, TINY, "tiny:hidden_size=256,num_attention_heads=8"))
        tokenizer, model = byte_tokenizer(), AutoModelForCausalLM.from_config(config).to(dtype)
    elif source.startswith((".", "/", "~", "runs/")) and not os.path.isdir(source):  # a path: fail now, not at the hub
        fail(f"no checkpoint folder {name_or_path!r} (`python sft.py --preset toy` writes runs/toy-sft)")
    elif os.path.isdir(source) or re.fullmatch(r"[\w.-]+/[\w.-]+", source):
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
        except OSError as error:
            fail(f"could not load model {name_or_path!r}: no such folder, and the hub gave {type(error).__name__}")
    else:
        fail(f"unknown model {name_or_path!r}: use tiny, a folder, a hub id (owner/name) or {', '.join(ALIASES)}")
    meaningless = (None, tokenizer.eos_token_id, tokenizer.bos_token_id)  # pad = EOS/BOS invites bugs (PAPERS 7.2)
    if tokenizer.pad_token_id in meaningless and tokenizer.unk_token_id not in meaningless:
        tokenizer.pad_token = tokenizer.unk_token
    elif tokenizer.pad_token_id in meaningless:
        tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
        model.resize_token_embeddings(max(len(tokenizer), model.get_input_embeddings().num_embeddings))
    tokenizer.padding_side = "left"
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if lora_rank > 0:  # every linear layer of the trunk (not the output head) gets an adapter; only adapters train
        model.requires_grad_(False)
        for module in list(model.base_model.modules()):
            for name, child in module.named_children():
                if isinstance(child, nn.Linear):
                    setattr(module, name, LoRALinear(child, lora_rank, 2 * lora_rank))  # fp32 adapters
    return model.to(device), tokenizer

class LoRALinear(nn.Module):
    """y = W x + (alpha / r) B A x with W frozen; B starts at zero so the wrapped layer starts as W."""
    def __init__(self, base, rank, alpha):
        super().__init__()
        self.base, self.scale, self.enabled = base, alpha / rank, True
        init = torch.randn(rank, base.in_features, device=base.weight.device) / math.sqrt(base.in_features)
        self.lora_A, self.lora_B = nn.Parameter(init), nn.Parameter(init.new_zeros(base.out_features, rank))

    def forward(self, x):
        if not self.enabled:
            return self.base(x)
        return self.base(x) + (x.to(self.lora_A.dtype) @ self.lora_A.T @ self.lora_B.T * self.scale).to(x.dtype)

@contextlib.contextmanager
def adapters_disabled(model):
    """The base model without adapters: the frozen reference policy, with no second copy of the weights."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for layer in layers:
        layer.enabled = False
    try:
        yield model
    finally:
        for layer in layers:
            layer.enabled = True

def _recomputed(fn, *args, **kwargs):
    """fn(*args, **kwargs), its activations recomputed in backward (non-reentrant); a plain call without grad."""
    return checkpoint(fn, *args, use_reentrant=False, **kwargs) if torch.is_grad_enabled() else fn(*args, **kwargs)

def gradient_checkpointing(model, enable=True):
    """Recompute each decoder layer in backward, also in eval() (RL, DPO) where HF's switch is off (PAPERS 7.9)."""
    for layer in [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]:
        layer.__dict__.pop("forward", None)  # an instance attribute: FSDP's module hooks stay outside the checkpoint
        if enable:
            layer.forward = functools.partial(_recomputed, type(layer).forward, layer)

def shard(items):
    """This rank's share, items[rank::world], wrapped around so that every rank gets as many (DDP, FSDP need all)."""
    return [items[i % len(items)] for i in range(RANK, -(-len(items) // WORLD) * WORLD, WORLD)]

def gather(items, total, n=1):
    """shard's inverse: every rank's results for its share (n per item, item-major), in order, on every rank."""
    parts = [items]
    if WORLD > 1:
        dist.all_gather_object(parts := [None] * WORLD, items)
    return [result for i in range(total) for result in parts[i % WORLD][i // WORLD * n:(i // WORLD + 1) * n]]

def all_reduce(tensor, mean=False):
    """The sum (or mean) over ranks of a tensor, in place; the tensor itself on one process."""
    if WORLD > 1:
        dist.all_reduce(tensor)
    return tensor / WORLD if mean else tensor

def wrap_model(model, fsdp=None):
    """The model to train: itself on one process; under torchrun DDP (LoRA, small models) or FSDP2 (past 1B params)."""
    if WORLD == 1 or isinstance(model, FSDPModule):
        return model
    if not (sum(p.numel() for p in model.parameters() if p.requires_grad) > 1e9 if fsdp is None else fsdp):
        return nn.parallel.DistributedDataParallel(model)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)  # fp32 master shards
    for module in [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)] + [model]:
        fully_shard(module.float(), mp_policy=policy, reshard_after_forward=False)  # stays gathered through sampling
    return model

Example = namedtuple("Example", ["question", "rationale", "answer"])
ARITH = dict(steps=3, digits=1, n_train=4000, n_test=200, seed=0)  # toy SFT lands at 30-60%
HUB_TASKS = {"gsm8k": ("openai/gsm8k", "main"), "svamp": ("ChilleD/SVAMP", None),
             "math": ("DigitalLearningGmbH/MATH-lighteval", "default")}

def arith_task(split, steps, digits, n_train, n_test, seed):
    """Multi-step integer expressions, one calculation per rationale line; seeded, test questions never in train."""
    rng, low, high, unique = random.Random(seed), 10 ** (digits - 1), 10 ** digits - 1, {}
    while len(unique) < n_test + n_train:
        value = rng.randint(low, high)
        expr, lines, last_op = str(value), [], None
        for _ in range(steps):
            op = rng.choice("+-*")
            operand = rng.randint(2, 9) if op == "*" else rng.randint(low, high)
            if op == "-" and operand > value:
                op = "+"  # every intermediate result stays non-negative
            result = value + operand if op == "+" else value - operand if op == "-" else value * operand
            lines.append(f"{value}{op}{operand}={result}")
            expr = f"({expr}){op}{operand}" if op == "*" and last_op in ("+", "-") else f"{expr}{op}{operand}"
            value, last_op = result, op
        unique.setdefault(expr, Example(expr, "\n".join(lines), str(value)))
    examples = list(unique.values())  # the first n_test are the test split
    return {"test": examples[:n_test], "train": examples[n_test:]}[split]

def _record_to_example(record, where):
    """An Example from a {question, rationale, answer}, GSM8K, MATH, SVAMP or ReFT record (the branches below)."""
    try:
        record = json.loads(record) if isinstance(record, str) else record
        if "problem" in record and "solution" in record:
            return Example(record["problem"], record["solution"], extract_answer(record["solution"]) or "")
        if "Body" in record:
            answer = f"{float(record['Answer']):g}"
            question = f"{record['Body'].strip()} {record['Question'].strip()}"
            return Example(question, f"{record['Equation'].strip()} = {answer}", answer)
        if "answer_cot" in record:
            return Example(record["question"], record["answer_cot"], str(record["answer_value"]))
        if "rationale" in record:
            return Example(record["question"], record["rationale"], str(record["answer"]))
        rationale, final = record["answer"].rsplit("####", 1)
        return Example(record["question"], rationale.strip(), final.strip().replace(",", ""))
    except json.JSONDecodeError:
        fail(f"{where}: not valid JSON")
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        fail(f"{where}: missing or bad field {error}; each record needs question, rationale and answer, "
             f"or GSM8K's question and answer ending in '#### x'")

def with_knobs(name, defaults, example):
    """defaults updated by the integer knobs of `name:key=value,...` (arith:steps=2, tiny:num_hidden_layers=8)."""
    overrides = dict(knob.partition("=")[::2] for knob in name.partition(":")[2].split(",") if knob)
    if not set(overrides) <= set(defaults) or not all(v.isdigit() for v in overrides.values()):
        fail(f"bad knobs in {name!r}: write e.g. {example} with knobs from {sorted(defaults)}")
    return defaults | {k: int(v) for k, v in overrides.items()}

def load_task(name_or_path, split="train"):
    """list[Example] from `arith[:knob=value,...]`, a hub task, a .jsonl/.json file or a folder of {split}.jsonl."""
    if name_or_path.partition(":")[0] == "arith":
        examples = arith_task(split, **with_knobs(name_or_path, ARITH, "arith:steps=3,digits=1"))
    elif name_or_path in HUB_TASKS:
        import datasets
        try:
            rows = datasets.load_dataset(*HUB_TASKS[name_or_path], split=split)
        except Exception as error:  # offline, unknown split, ...: one sentence, not a traceback
            fail(f"could not load {name_or_path!r} ({split}) from the hub: {type(error).__name__}; check the network")
        examples = [_record_to_example(row, f"{name_or_path} row {i}") for i, row in enumerate(rows)]
    else:
        path = os.path.join(name_or_path, f"{split}.jsonl") if os.path.isdir(name_or_path) else name_or_path
        if not path.endswith((".jsonl", ".json")) or not os.path.isfile(path):
            fail(f"unknown task {name_or_path!r}: use arith, gsm8k, math, svamp, or an existing .jsonl/.json file")
        with open(path) as f:
            records = json.load(f) if path.endswith(".json") else f.readlines()
        records = records if isinstance(records, list) else [records]  # a .json of one record
        examples = [_record_to_example(record, f"{path} line {i}") for i, record in enumerate(records, 1)
                    if not isinstance(record, str) or record.strip()]
    if not examples:
        fail(f"task {name_or_path!r} has no examples in split {split!r}")
    return examples

# text (decoded, cut before a stop string), token_ids (generated only, EOS included), finished (not by the length cap)
Completion = namedtuple("Completion", ["text", "token_ids", "finished"])

def _generate_batch(model, tokenizer, prompts, max_new_tokens, temperature, top_p, stop):
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left").to(model.device)
    step_ids, mask = enc["input_ids"], enc["attention_mask"]
    context = getattr(model.config, "max_position_embeddings", None) or math.inf
    if mask.shape[1] >= context:
        fail(f"a prompt has {mask.shape[1]} tokens but the model's context is {context}: shorten the prompts")
    eos = model.generation_config.eos_token_id  # None, one id or a list of ids
    eos = {tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])}
    generated, done, stopped = [[] for _ in prompts], [False] * len(prompts), [False] * len(prompts)
    cache, positions = DynamicCache(config=model.config), (mask.cumsum(-1) - 1).clamp(min=0)  # skip left padding
    for _ in range(int(min(max_new_tokens, context - mask.shape[1]))):
        logits = model(input_ids=step_ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                       use_cache=True, logits_to_keep=1).logits[:, -1].float()
        if temperature > 0:
            probs = torch.softmax(logits / temperature, dim=-1)
            if top_p < 1.0:  # nucleus: keep the smallest set of tokens whose mass reaches top_p
                sorted_probs, order = probs.sort(dim=-1, descending=True)
                sorted_probs[sorted_probs.cumsum(-1) - sorted_probs > top_p] = 0
                probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        tokens = torch.multinomial(probs, 1).squeeze(-1) if temperature > 0 else logits.argmax(-1)
        for row, token in enumerate(tokens.tolist()):
            if not done[row]:
                generated[row].append(token)
                if stop and token not in eos:  # the newest few tokens hold any stop string that just completed
                    tail = tokenizer.decode(generated[row][-max(map(len, stop)) - 4:], skip_special_tokens=True)
                    stopped[row] = any(s in tail for s in stop)
                done[row] = token in eos or stopped[row]
        if all(done):
            break
        step_ids = torch.where(torch.tensor(done, device=model.device), tokenizer.pad_token_id, tokens)[:, None]
        mask = torch.cat([mask, mask.new_ones(len(prompts), 1)], dim=1)
        positions = positions[:, -1:] + 1
    texts = tokenizer.batch_decode(generated, skip_special_tokens=True)
    # a window can start inside a multi-byte character and show a stop string the full text lacks: keep it whole
    texts = [text[:min((text.find(s) for s in stop if s in text), default=len(text))] if cut else text
             for text, cut in zip(texts, stopped)]
    return [Completion(*row) for row in zip(texts, generated, done)]

@torch.no_grad()
def generate(model, tokenizer, prompts, *, max_new_tokens, temperature=0.0, top_p=1.0, n=1, stop=None, batch_size=None,
             sharded=False):
    """Own decode loop with a KV cache; n completions per prompt, prompt-major. Greedy when temperature=0.
    sharded=True (torchrun): each rank decodes its share of the prompts, and every rank gets all the completions."""
    rows = [prompt for prompt in (shard(prompts) if sharded else prompts) for _ in range(n)]
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))  # batch similar lengths: less padding
    was_training, completions, batch_size = model.training, [], batch_size or max(len(rows), 1)
    model.eval()
    for start in tqdm(range(0, len(rows), batch_size), desc="generate", leave=False, disable=len(rows) <= batch_size or None):
        batch = [rows[i] for i in order[start:start + batch_size]]
        completions += _generate_batch(model, tokenizer, batch, max_new_tokens, temperature, top_p, stop)
    model.train(was_training)
    completions = [completion for _, completion in sorted(zip(order, completions), key=lambda pair: pair[0])]
    return gather(completions, len(prompts), n) if sharded else completions  # prompt order

def _chunk_logprobs(head, hidden, targets, temperature):  # div_ in place: one chunk-sized buffer less
    return head(hidden).float().div_(temperature).log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)

def token_logprobs(model, input_ids, attention_mask, *, temperature=1.0, return_hidden=False, chunk_elements=2 ** 23):
    """log p(input_ids[:, t+1] | prefix) as [B, L-1], 0 at padding; return_hidden=True adds the last hidden state.
    The wrapper's (DDP, FSDP2) forward keeps one logit; the head runs in chunks, recomputed in backward: memory-lean."""
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # left or right padding: as in generate
    hidden = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                   use_cache=False, output_hidden_states=True, logits_to_keep=1).hidden_states[-1]
    head, pieces = getattr(model, "module", model).get_output_embeddings(), []  # Llama, Mistral, GPT-2, OPT
    step = max(1, chunk_elements // head.out_features)
    for chunk in zip(hidden[:, :-1].flatten(0, 1).split(step), input_ids[:, 1:].flatten().split(step)):
        pieces.append(_recomputed(_chunk_logprobs, head, *chunk, temperature))
    logprobs = torch.cat(pieces).view(input_ids.shape[0], -1) * attention_mask[:, 1:] * attention_mask[:, :-1]
    return (logprobs, hidden) if return_hidden else logprobs

def batch_sequences(prompts, responses, pad_id, device):
    """Right-padded prompt+response ids, attention mask and response mask, from lengths, never from token values
    (pad may equal EOS, PAPERS 7.2). response_mask[b, t] = 1 where token_logprobs[b, t] scores a response token."""
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    input_ids = torch.full((len(prompts), max(lengths)), pad_id, dtype=torch.long)
    attention_mask = (torch.arange(max(lengths)) < torch.tensor(lengths)[:, None]).long()
    response_mask = torch.zeros(len(prompts), max(lengths) - 1)
    for row, (prompt, response) in enumerate(zip(prompts, responses)):
        input_ids[row, :lengths[row]] = torch.tensor(list(prompt) + list(response))
        response_mask[row, max(len(prompt) - 1, 0):lengths[row] - 1] = 1
    return input_ids.to(device), attention_mask.to(device), response_mask.to(device)

def extract_answer(text):
    """The last of `#### x`, `The answer is x`, `the answer is: x`, `\\boxed{x}`, `The final answer is $x$`; or None."""
    text, found = text or "", []
    for match in re.finditer(r"(?:####|answer is:?)[ \t]*([^\n]*)", text, re.IGNORECASE):
        answer = re.sub(r"^\$(.*)\$.*", r"\1", match.group(1).split("I hope it is correct")[0].strip())  # "$x$." -> "x"
        found.append((match.start(), answer.strip().rstrip(".").strip()))
    for match in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        depth = 1  # the boxed answer runs to the matching brace
        for end in range(match.end(), len(text)):
            depth += {"{": 1, "}": -1}.get(text[end], 0)
            if depth == 0:
                found.append((match.start(), text[match.end():end].strip()))
                break
    return max((item for item in found if item[1]), default=(0, None))[1]

def normalize_answer(answer):
    """Hendrycks MATH normalisation, plus thousands separators and a trailing period."""
    s = str(answer).strip().replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac").replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "").replace("\\$", "").replace("$", "")
    s = re.sub(r"\\(?:text|mbox|mathrm)\{\s*[a-zA-Z ]*\}$", "", s).strip()  # trailing units
    s = s.replace("\\%", "").replace("%", "").replace(" .", " 0.").replace("{.", "{0.")
    s = ("0" + s if s.startswith(".") else s).rstrip(".")
    s = s.split("=")[1] if len(s.split("=")) == 2 and len(s.split("=")[0].strip()) <= 2 else s  # "k = 5" -> "5"
    s = re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s).replace(" ", "")
    s = re.sub(r"\\frac([^{\\])([^{\\])", r"\\frac{\1}{\2}", s)  # \frac12 -> \frac{1}{2}
    s = re.sub(r"\\frac([^{\\])\{", r"\\frac{\1}{", s)  # \frac1{2} -> \frac{1}{2}
    return s.replace(",", "") if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s) else s  # 1,000 -> 1000

def _as_number(s):
    """An exact rational for an integer, decimal, a/b or \\frac{a}{b}; None for anything else."""
    num = r"-?\d+(?:\.\d+)?"
    match = re.fullmatch(rf"(-?)\\frac\{{({num})\}}\{{({num})\}}", s) or re.fullmatch(rf"()({num})/({num})", s)
    if match and Fraction(match.group(3)) != 0:
        value = Fraction(match.group(2)) / Fraction(match.group(3))
        return -value if match.group(1) else value
    return Fraction(s) if re.fullmatch(num, s) else None

def is_equiv(pred, gold):
    """Numbers compared exactly as rationals (0.5 = 1/2 = \\frac12, 1,000 = 1000), else Hendrycks-normalised strings."""
    if pred is None or gold is None:
        return False
    a, b = normalize_answer(pred), normalize_answer(gold)
    x, y = _as_number(a), _as_number(b)
    return x == y if x is not None and y is not None else bool(a) and a == b

def majority_answer(answers):
    """The most frequent answer (ties: the first seen), grouping equivalent spellings; None if none."""
    keys = [normalize_answer(a) for a in answers if a is not None]
    return max((a for a in answers if a is not None), key=lambda a: keys.count(normalize_answer(a)), default=None)

def evaluate(model, tokenizer, examples, prompt_fn, *, max_new_tokens=512, n=1, temperature=0.7, batch_size=64,
             stop=None):
    """Greedy accuracy; with n > 1 also maj@n over n samples at `temperature`. Returns metrics + records."""
    prompts = [prompt_fn(example) for example in examples]
    settings = dict(max_new_tokens=max_new_tokens, batch_size=batch_size, stop=stop, sharded=True)  # torchrun: shares
    greedy = generate(model, tokenizer, prompts, **settings)
    preds = [extract_answer(completion.text) for completion in greedy]
    records = [dict(question=e.question, gold=e.answer, completion=c.text, pred=p, correct=is_equiv(p, e.answer))
               for e, c, p in zip(examples, greedy, preds)]
    metrics = {"accuracy": sum(r["correct"] for r in records) / len(records)}
    if n > 1:
        samples = generate(model, tokenizer, prompts, temperature=temperature, n=n, **settings)
        votes = [majority_answer([extract_answer(s.text) for s in samples[i:i + n]]) for i in range(0, len(samples), n)]
        metrics[f"maj@{n}"] = sum(is_equiv(v, e.answer) for v, e in zip(votes, examples)) / len(examples)
    return metrics | {"records": records}

def run_sandboxed(code, *, timeout=10.0, memory_mb=1024):
    """(exited cleanly, stdout) of untrusted Python in an isolated interpreter: empty folder, no environment, limits."""
    def limits():
        resource.setrlimit(resource.RLIMIT_AS, (memory_mb * 2 ** 20, memory_mb * 2 ** 20))
        resource.setrlimit(resource.RLIMIT_CPU, (math.ceil(timeout), math.ceil(timeout)))
        resource.setrlimit(resource.RLIMIT_FSIZE, (2 ** 20, 2 ** 20))
    with tempfile.TemporaryDirectory() as folder:
        try:
            done = subprocess.run([sys.executable, "-I", "-c", code], cwd=folder, env={}, capture_output=True,
                                  text=True, timeout=timeout, preexec_fn=limits)
        except subprocess.TimeoutExpired:
            return False, ""
    return done.returncode == 0, done.stdout

def save(model, tokenizer, out_dir, args=None):
    """save_pretrained (LoRA merged into plain weights) + tokenizer + args.json; all ranks call it,
    rank 0 writes into a folder next to out_dir, then renames it: a kill never leaves one that looks
    finished."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if RANK == 0:
        for name, module in model.named_modules():
            if isinstance(module, LoRALinear):  # W + (alpha / r) B A under the plain layer's name
                weight, lora_a, lora_b = (state.pop(f"{name}.{key}") for key in ("base.weight", "lora_A", "lora_B"))
                state[f"{name}.weight"] = (weight.float() + module.scale * lora_b @ lora_a).to(weight.dtype)
                if module.base.bias is not None:
                    state[f"{name}.bias"] = state.pop(f"{name}.base.bias")
        temporary = out_dir.rstrip("/") + ".saving"  # a kill leaves this unfinished, never out_dir
        shutil.rmtree(temporary, ignore_errors=True)  # what a killed save left
        model.save_pretrained(temporary, state_dict=state)
        tokenizer.save_pretrained(temporary)
        if args is not None:
            with open(os.path.join(temporary, "args.json"), "w") as f:
                json.dump(dataclasses.asdict(args), f, indent=2)
        if not os.path.isdir(out_dir):
            os.replace(temporary, out_dir)
        else:  # a run folder (logs, stages) or an older save: swap the files, args.json last
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(out_dir, "args.json"))
            for name in sorted(os.listdir(temporary), key=lambda name: name == "args.json"):
                os.replace(os.path.join(temporary, name), os.path.join(out_dir, name))
            os.rmdir(temporary)
    if WORLD > 1:
        dist.barrier()

def start_run(args):
    """Never two runs in one out_dir. A fresh run needs a folder without one (its settings go to
    run.json); --resume needs the recorded settings and returns out_dir/state.pt to continue from
    (None: no state saved yet, so the logs are cleared and the run starts over)."""
    record, state = (os.path.join(args.out_dir, name) for name in ("run.json", "state.pt"))
    settings = {key: value for key, value in dataclasses.asdict(args).items() if key != "resume"}
    earlier = [os.path.join(args.out_dir, name) for name in ("run.json", "metrics.jsonl")]
    if not args.resume and any(map(os.path.exists, earlier)):
        fail(f"{args.out_dir} holds an earlier run: add --resume to continue it, or start afresh "
             f"in another --out_dir")
    if args.resume and not os.path.isfile(record):
        fail(f"{args.out_dir} holds no run to resume (no run.json): drop --resume to start one")
    recorded = json.load(open(record)) if args.resume else settings
    differ = [f"--{key} {recorded.get(key)!r} (now {value!r})" for key, value in settings.items()
              if recorded.get(key) != value]
    if differ:
        fail(f"{args.out_dir} was run with {', '.join(differ)}: resume with those, or start afresh "
             f"in another --out_dir")
    if WORLD > 1:
        dist.barrier()  # every rank has looked before rank 0 writes
    resumable = args.resume and os.path.isfile(state)
    if RANK == 0 and not args.resume:
        os.makedirs(args.out_dir, exist_ok=True)
        with open(record, "w") as f:
            json.dump(settings, f, indent=2)
    elif RANK == 0 and not resumable:
        _cut_logs(args.out_dir, {})  # killed before its first state: start over
    return state if resumable else None

def _cut_logs(folder, sizes):
    """The logs (*.jsonl) back to their sizes at a saved state; one begun after it is removed."""
    for name in [name for name in os.listdir(folder) if name.endswith(".jsonl")]:
        if name in sizes:
            os.truncate(os.path.join(folder, name), sizes[name])
        else:
            os.remove(os.path.join(folder, name))

def save_state(path, model=None, optimizer=None, **extra):
    """A resumable state at path, in the run folder: full weights and optimiser (plain/DDP/FSDP2),
    every rank's RNG streams, the logs' sizes and `extra` (step, generators...). All ranks call it;
    rank 0 writes, to a temporary file then renamed (one node: every rank reads it back)."""
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights, moments = {}, {}
    if model is not None:
        weights, moments = get_state_dict(model, optimizer or [], options=full)
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    rngs = [(random.getstate(), torch.get_rng_state(), cuda)]
    if WORLD > 1:
        dist.all_gather_object(rngs := [None] * WORLD, rngs[0])
    if RANK == 0:
        folder = os.path.dirname(path) or "."
        logs = {name: os.path.getsize(os.path.join(folder, name)) for name in os.listdir(folder)
                if name.endswith(".jsonl")}
        state = dict(weights=weights, optimizer=moments, rngs=rngs, logs=logs, extra=extra)
        torch.save(state, path + ".tmp")
        os.replace(path + ".tmp", path)
    if WORLD > 1:
        dist.barrier()

def load_state(path, model=None, optimizer=None):
    """save_state's extra values, after loading the weights and optimiser into model and optimizer,
    restoring this rank's RNG streams and cutting the logs back to that moment."""
    state = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    if model is not None:
        full = StateDictOptions(full_state_dict=True)
        set_state_dict(model, optimizer or [], model_state_dict=state["weights"],
                       optim_state_dict=state["optimizer"], options=full)
    python, cpu, cuda = state["rngs"][RANK]
    random.setstate(python)
    torch.set_rng_state(cpu.clone())
    if cuda:
        torch.cuda.set_rng_state_all(cuda)
    if RANK == 0:
        _cut_logs(os.path.dirname(path) or ".", state["logs"])
    return state["extra"]

class Logger:
    """Metrics to stdout and out_dir/metrics.jsonl; samples to out_dir/samples.jsonl. Rank 0 only: the others no-op."""
    def __init__(self, out_dir):
        self.out_dir = out_dir
        if RANK == 0:
            os.makedirs(out_dir, exist_ok=True)

    def log(self, step, **metrics):
        print(f"[{step}]", *(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()),
              flush=True)
        self.samples([{"step": step, **metrics}], "metrics.jsonl")

    def samples(self, rows, name="samples.jsonl"):
        if RANK == 0:
            with open(os.path.join(self.out_dir, name), "a") as f:
                f.writelines(json.dumps(row) + "\n" for row in rows)
