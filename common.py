"""Plumbing shared by every method script (no method's maths); its public names are a contract: see README's map."""
import argparse
import contextlib
import dataclasses
import difflib
import errno
import functools
import inspect
import json
import math
import os
import platform
import random
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.parse
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

def _preset_help(presets):
    """What each preset sets, and the checkpoint it starts from (a runs/ folder of a former run)."""
    sentences = []
    for name, values in sorted(presets.items()):
        starts = [v for k, v in values.items() if k != "out_dir" and str(v).startswith("runs/")]
        needs = "".join(f"needs {p} (`python sft.py --preset toy` writes it) and " for p in starts)
        settings = ", ".join(f"{key}={value}" for key, value in values.items())
        sentences.append(f"{name}: {needs}sets {settings}.")
    return " ".join(sentences).replace("%", "%%")

def _flag_meant(flag, names):
    """The field an unknown flag most likely meant: one it abbreviates (--learning_rate: lr), or one
    spelled alike (--seeds: seed); None if nothing is close."""
    parts = flag.lstrip("-").partition("=")[0].split("_")
    for k in range(len(parts) - 1):  # the last parts by their initials: --dpo_learning_rate: dpo_lr
        short = "_".join(parts[:k] + ["".join(part[:1] for part in parts[k:])])
        if short in names:
            return short
    return next(iter(difflib.get_close_matches("_".join(parts), names, n=1)), None)

def parse_args(cls, presets=None, argv=None):
    """argparse from a dataclass, field docstrings as --help; explicit flags override `--preset NAME`'s values."""
    presets, fields = presets or {}, dataclasses.fields(cls)
    docs = {}  # a field's help: the string literal on the lines under it
    with contextlib.suppress(OSError, TypeError):  # no source code (a class typed into a notebook): no help
        docs = dict(re.findall(r'^ +(\w+):[^\n]*\n +"""(.*?)"""', inspect.getsource(cls), re.MULTILINE | re.DOTALL))
    # --help: what the script does (not the generated `Args(...)`), then its docstring's run lines
    about = inspect.cleandoc(cls.__doc__ or "")
    about = "" if about.startswith(f"{cls.__name__}(") else about
    module_doc = getattr(sys.modules.get(cls.__module__), "__doc__", None) or ""
    runs = re.findall(r"^ {4}((?:python|torchrun) .*)$", module_doc, re.MULTILINE)
    epilog = "examples:\n" + "\n".join(f"  {line}" for line in runs) if runs else None
    parser = argparse.ArgumentParser(usage="%(prog)s [-h] [--preset NAME] [--FLAG VALUE ...]",
                                     description=about, epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(presets), help=_preset_help(presets))
    for f in fields:
        how = dict(action=argparse.BooleanOptionalAction) if f.type is bool else dict(type=f.type)
        parser.add_argument(f"--{f.name}", default=f.default, help=docs.get(f.name, "").replace("%", "%%"), **how)
    preset = parser.parse_known_args(argv)[0].preset
    if unknown := set(presets.get(preset, {})) - {f.name for f in fields}:
        fail(f"preset {preset!r} sets unknown fields {sorted(unknown)}")
    parser.set_defaults(**presets.get(preset, {}))
    values, extra = parser.parse_known_args(argv)
    if extra:
        meant = _flag_meant(extra[0], [f.name for f in fields])
        fix = f"did you mean --{meant}?" if meant else "see --help for the flags"
        fail(f"unknown argument {extra[0]!r}: {fix}")
    return cls(**{name: value for name, value in vars(values).items() if name != "preset"})

def check_args(args, positive=(), at_least_zero=()):
    """Before any work: the named fields are > 0 (or >= 0), and --out_dir is writable."""
    for name in positive:
        if not getattr(args, name) > 0:  # also catches nan
            fail(f"--{name} is {getattr(args, name)}, but it must be above 0: "
                 f"pass a positive value (the default is {getattr(type(args), name)})")
    for name in at_least_zero:
        if not getattr(args, name) >= 0:
            fail(f"--{name} is {getattr(args, name)}, but it cannot be negative: pass 0 or more")
    out_dir = args.out_dir
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        fail(f"--out_dir {out_dir!r} is a file, not a folder: pass a folder (new or existing)")
    existing = os.path.abspath(out_dir)
    while not os.path.isdir(existing):  # a new folder is created inside its nearest existing parent
        existing = os.path.dirname(existing)
    if not os.access(existing, os.W_OK | os.X_OK):
        fail(f"--out_dir {out_dir!r} cannot be written ({existing} is read-only to this user): "
             f"pass a folder you may write to")

def check_context(model, tokenizer, prompts=None, **lengths):
    """Stop before any work when a length flag (name=value) or a prompt does not fit the model's
    context; `prompts` maps what they are ("test question") to the prompt texts."""
    context = getattr(model.config, "max_position_embeddings", None) or math.inf
    for flag, value in lengths.items():
        if value > context:
            fail(f"--{flag} {value} exceeds the model's context of {context} tokens: "
                 f"lower it to {context} or less")
    for what, texts in (prompts or {}).items():
        sizes = [len(ids) for ids in tokenizer(list(texts))["input_ids"]] if texts else []
        if sizes and max(sizes) >= context:  # generate() needs room for at least one new token
            longest = sizes.index(max(sizes))
            fail(f"{what} {longest + 1} takes {max(sizes)} tokens with its prompt, but the model's "
                 f"context is {context}: shorten or drop it, or use a model with a longer context")

def check_trained(name, flag):
    """Stop when `flag` names the freshly initialised `tiny` where a trained start is needed."""
    if name.partition(":")[0] == "tiny":
        fail(f"{flag} {name} is an untrained model, but this needs a fine-tuned one: pass a "
             f"checkpoint folder such as runs/toy-sft (`python sft.py --preset toy` writes it)")

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

def load_model(name_or_path, *, dtype=None, device=None, lora_rank=0, seed=0, frozen=False,
               reference=False):
    """(model, tokenizer) from `tiny`, a paper alias, a local checkpoint or a hub id.
    dtype is the compute dtype (bf16 on CUDA) of forwards under autocast(model). The weights that
    train are fp32: all of them, or with lora_rank > 0 the adapters over a trunk in dtype.
    frozen=True (a sampler, a reference policy) keeps every weight in dtype; reference=True counts
    a bf16 reference copy beside a full fine-tune when checking that it fits one GPU."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    full = lora_rank == 0 and not frozen  # all weights train: fp32 masters (bf16 loses small steps)
    storage = torch.float32 if full else dtype
    torch.manual_seed(seed)
    source = ALIASES.get(name_or_path, name_or_path)
    if source.partition(":")[0] == "tiny":  # a fresh ~1M-parameter Llama, no download; `tiny:key=value,...` resizes it
        config = AutoConfig.for_model("llama", **with_knobs(source, TINY, "tiny:hidden_size=256,num_attention_heads=8"))
        check_memory(config, device, full * (16 + 2 * reference))
        tokenizer = byte_tokenizer()
        model = AutoModelForCausalLM.from_config(config).to(storage)
    elif source.startswith((".", "/", "~", "runs/")) and not os.path.isdir(source):  # a path: fail now, not at the hub
        fail(f"no checkpoint folder {name_or_path!r} (`python sft.py --preset toy` writes runs/toy-sft)")
    elif os.path.isdir(source) or re.fullmatch(r"[\w.-]+/[\w.-]+", source):
        if not os.path.isdir(source):
            _check_hub(source, name_or_path)
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
            check_memory(AutoConfig.from_pretrained(source), device, full * (16 + 2 * reference))
            model = AutoModelForCausalLM.from_pretrained(source, dtype=storage)
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
    model.compute_dtype = dtype  # read by autocast(model)
    return model.to(device), tokenizer

def check_memory(config, device, bytes_per_param):
    """Stop before loading a full fine-tune that cannot fit one GPU (16 bytes a parameter in fp32
    with AdamW, a bf16 reference 2 more); not on CPU, nor under torchrun (FSDP2 shards it)."""
    if device.type != "cuda" or WORLD > 1 or not bytes_per_param:
        return
    with torch.device("meta"):  # the parameter count without allocating
        n = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    need = n * bytes_per_param
    have = torch.cuda.get_device_properties(device).total_memory
    if need > have:
        fail(f"full fine-tuning of {n / 1e9:.1f}B parameters needs {need / 2 ** 30:.0f} GiB (fp32 "
             f"weights, gradients, optimiser state) but the GPU has {have / 2 ** 30:.0f} GiB: pass "
             f"--lora_rank 64, or shard it over several GPUs with torchrun (FSDP2)")

def autocast(model):
    """Every forward of a model in the compute dtype given to load_model (bf16 on CUDA) over its
    fp32 weights; off at fp32."""
    unwrapped = getattr(model, "module", model)  # DDP keeps the model in .module
    dtype = getattr(unwrapped, "compute_dtype", torch.float32)
    return torch.autocast(unwrapped.device.type, dtype=dtype, enabled=dtype != torch.float32)

def _check_hub(repo, name):
    """One quick request for a hub id with no local folder: a typo or no network stops at once."""
    from huggingface_hub import constants, errors, model_info, try_to_load_from_cache
    if constants.HF_HUB_OFFLINE or try_to_load_from_cache(repo, "config.json"):
        return
    try:
        model_info(repo, timeout=10)
    except errors.RepositoryNotFoundError:
        fail(f"no folder {name!r} in {os.getcwd()} and no model {repo!r} on the hub: fix the name")
    except errors.HfHubHTTPError:
        return  # gated or rate-limited: from_pretrained says what the hub wants
    except Exception as error:  # no network
        fail(f"no folder {name!r} in {os.getcwd()}, and the hub is out of reach "
             f"({type(error).__name__}): check the path, or the network for a hub model")

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

def mean_over_ranks(stats, device):
    """A dict of numbers averaged over ranks (the same dict on one process)."""
    values = all_reduce(torch.tensor(list(stats.values()), device=device), mean=True)
    return dict(zip(stats, values.tolist()))

def linear_schedule(optimizer, warmup_steps, total_steps):
    """The learning rate rises linearly over warmup_steps, then falls linearly to 0 at total_steps
    (transformers' get_linear_schedule_with_warmup)."""
    def factor(step):
        if step < warmup_steps:
            return step / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

def positions_from_mask(attention_mask):
    """Position ids that skip padding on either side: a prompt starts at 0 wherever it sits."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)

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

def read_records(path):
    """(where, record) for each record of a .jsonl file or a .json file (a list, or one record)."""
    if not os.path.isfile(path):
        fail(f"no such file {path!r}: name an existing .jsonl/.json file or a folder of splits")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as error:
        fail(f"{path} is not UTF-8 text (byte {error.start}): convert it to UTF-8")
    if path.endswith(".json"):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as error:
            fail(f"{path} is not valid JSON ({error.msg}, line {error.lineno}): fix it")
        records = records if isinstance(records, list) else [records]
        return [(f"{path} record {i}", record) for i, record in enumerate(records, 1)]
    rows = []
    for number, line in enumerate(text.split("\n"), 1):  # numbered as an editor numbers them
        if not line.strip():
            continue
        try:
            rows.append((f"{path} line {number}", json.loads(line)))
        except json.JSONDecodeError as error:
            fail(f"{path} line {number}: not valid JSON ({error.msg}); fix or delete that line")
    return rows

def _without_answer_line(rationale, answer):
    """The rationale without a closing `The answer is x`, `Therefore, the answer is: x` or `#### x`
    (GSI's answer_cot has one): the template appends it. ReFT's `... is <x>.` stays (official)."""
    trigger = r"(?:####|(?:Therefore, )?the answer is:?)"
    return re.sub(rf"\s*{trigger}\s*{re.escape(answer)}\.?\s*$", "", rationale, flags=re.IGNORECASE)

def _record_to_example(record, where):
    """An Example from a {question, rationale, answer}, GSM8K, MATH, SVAMP, ReFT or GSI record
    ({question, answer_cot, answer_value}; no answer_cot in test files) or Self-Explore's {query,
    response} (GSM8K's rationale and `#### x`)."""
    try:
        if "problem" in record and "solution" in record:
            return Example(record["problem"], record["solution"], extract_answer(record["solution"]) or "")
        if "Body" in record:
            answer = f"{float(record['Answer']):g}"
            question = f"{record['Body'].strip()} {record['Question'].strip()}"
            return Example(question, f"{record['Equation'].strip()} = {answer}", answer)
        if "answer_value" in record:
            answer = str(record["answer_value"])
            rationale = _without_answer_line(record.get("answer_cot", ""), answer)
            return Example(record["question"], rationale, answer)
        if "rationale" in record:
            answer = str(record["answer"])
            rationale = _without_answer_line(record["rationale"], answer)
            return Example(record["question"], rationale, answer)
        question = record["query"] if "query" in record else record["question"]
        solution = record["response"] if "response" in record else record["answer"]
        rationale, final = solution.rsplit("####", 1)
        return Example(question, rationale.strip(), final.strip().replace(",", ""))
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        fail(f"{where}: missing or bad field {error}; each record needs question, rationale and answer, "
             f"or GSM8K's question and answer ending in '#### x'")

def with_knobs(name, defaults, example):
    """defaults updated by the integer knobs of `name:key=value,...` (arith:steps=2, tiny:num_hidden_layers=8)."""
    overrides = dict(knob.partition("=")[::2] for knob in name.partition(":")[2].split(",") if knob)
    if not set(overrides) <= set(defaults) or not all(v.isdigit() for v in overrides.values()):
        fail(f"bad knobs in {name!r}: write e.g. {example} with knobs from {sorted(defaults)}")
    return defaults | {k: int(v) for k, v in overrides.items()}

def load_task(name_or_path, split="train", test_task=""):
    """list[Example] from `arith[:knob=value,...]`, a hub task, a folder of {split}.jsonl, or a
    .jsonl/.json file, which is one split: a lone file's test split is only ever `test_task`."""
    given = split == "test" and bool(test_task)  # an explicit test set: a lone file is that split
    name_or_path = test_task if given else name_or_path
    if name_or_path.partition(":")[0] == "arith":
        examples = arith_task(split, **with_knobs(name_or_path, ARITH, "arith:steps=3,digits=1"))
    elif name_or_path in HUB_TASKS:
        examples = [_record_to_example(row, f"{name_or_path} row {i}")
                    for i, row in enumerate(hub_rows(name_or_path, split))]
    elif os.path.isdir(name_or_path):
        path = os.path.join(name_or_path, f"{split}.jsonl")
        examples = [_record_to_example(record, where) for where, record in read_records(path)]
    elif name_or_path.endswith((".jsonl", ".json")):
        records = read_records(name_or_path)
        if split == "test" and not given:
            not_a_test_set(name_or_path)
        examples = [_record_to_example(record, where) for where, record in records]
    else:
        fail(f"unknown task {name_or_path!r}: use arith, gsm8k, math, svamp, a .jsonl/.json file "
             f"or a folder")
    if not examples:
        fail(f"task {name_or_path!r} has no examples in split {split!r}")
    return examples

def not_a_test_set(path):
    fail(f"{path} is one split (train), not a test set: give a folder with train.jsonl and "
         f"test.jsonl, or the test file with --test_task")

def hub_rows(name, split, tasks=HUB_TASKS):
    """Rows of tasks[name] through `datasets`; with the hub out of reach, from its cache only."""
    import datasets
    from huggingface_hub import constants
    host = urllib.parse.urlparse(constants.ENDPOINT).hostname
    try:  # one quick request first: datasets retries an unreachable hub for half a minute
        socket.create_connection((host, 443), timeout=3).close()
    except OSError:  # offline mode: a cached copy still loads, a missing one fails at once
        constants.HF_HUB_OFFLINE = True
        datasets.config.HF_HUB_OFFLINE = True
    try:
        return datasets.load_dataset(*tasks[name], split=split)
    except Exception as error:  # offline, unknown split, ...: one sentence, not a traceback
        where = "its cache (the hub is out of reach)" if constants.HF_HUB_OFFLINE else "the hub"
        fail(f"could not load {name!r} ({split}) from {where}: {type(error).__name__}; "
             f"check the network")


# text (decoded, cut before a stop string), token_ids (generated only, EOS included), finished (not by the length cap)
Completion = namedtuple("Completion", ["text", "token_ids", "finished"])

def _generate_batch(model, tokenizer, prompts, max_new_tokens, temperature, top_p, stop,
                    max_total_tokens):
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left").to(model.device)
    step_ids, mask = enc["input_ids"], enc["attention_mask"]
    context = getattr(model.config, "max_position_embeddings", None) or math.inf
    if mask.shape[1] >= context:
        fail(f"a prompt has {mask.shape[1]} tokens but the model's context is {context}: shorten the prompts")
    eos = model.generation_config.eos_token_id  # None, one id or a list of ids
    eos = {tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])}
    generated, done, stopped = [[] for _ in prompts], [False] * len(prompts), [False] * len(prompts)
    cache = DynamicCache(config=model.config)
    positions = positions_from_mask(mask)
    limit = min(context, max_total_tokens or math.inf)  # prompt + response, the batch padded as one
    for _ in range(int(max(0, min(max_new_tokens, limit - mask.shape[1])))):
        with autocast(model):
            logits = model(input_ids=step_ids, attention_mask=mask, position_ids=positions,
                           cache=cache, use_cache=True,
                           logits_to_keep=1).logits[:, -1].float()
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
def generate(model, tokenizer, prompts, *, max_new_tokens, temperature=0.0, top_p=1.0, n=1,
             stop=None, batch_size=None, sharded=False, max_total_tokens=None):
    """Own decode loop with a KV cache; n completions per prompt, prompt-major. Greedy when temperature=0.
    sharded=True (torchrun): each rank decodes its share of the prompts, and every rank gets all the
    completions. max_total_tokens caps each batch's padded prompt + response (HF's max_length)."""
    rows = [prompt for prompt in (shard(prompts) if sharded else prompts) for _ in range(n)]
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))  # batch similar lengths: less padding
    was_training, completions, batch_size = model.training, [], batch_size or max(len(rows), 1)
    model.eval()
    one_batch = dict(disable=True) if len(rows) <= batch_size else {}  # else TQDM_DISABLE decides
    for start in tqdm(range(0, len(rows), batch_size), desc="generate", leave=False, **one_batch):
        batch = [rows[i] for i in order[start:start + batch_size]]
        completions += _generate_batch(model, tokenizer, batch, max_new_tokens, temperature, top_p,
                                       stop, max_total_tokens)
    model.train(was_training)
    completions = [completion for _, completion in sorted(zip(order, completions), key=lambda pair: pair[0])]
    return gather(completions, len(prompts), n) if sharded else completions  # prompt order

def _chunk_logprobs(head, hidden, targets, temperature):  # div_ in place: one chunk-sized buffer less
    return head(hidden).float().div_(temperature).log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)

def token_logprobs(model, input_ids, attention_mask, *, temperature=1.0, return_hidden=False, chunk_elements=2 ** 23):
    """log p(input_ids[:, t+1] | prefix) as [B, L-1], 0 at padding; return_hidden=True adds the last hidden state.
    The wrapper's (DDP, FSDP2) forward keeps one logit; the head runs in chunks, recomputed in backward: memory-lean."""
    positions = positions_from_mask(attention_mask)  # the positions generate used
    with autocast(model):  # bf16 compute on CUDA (recomputed alike); the log-softmax is fp32
        hidden = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                       use_cache=False, output_hidden_states=True,
                       logits_to_keep=1).hidden_states[-1]  # the other layers' states are freed
        head = getattr(model, "module", model).get_output_embeddings()  # Llama, Mistral, GPT-2, OPT
        pieces = []
        step = max(1, chunk_elements // head.out_features)
        targets = input_ids[:, 1:].flatten().split(step)
        for chunk in zip(hidden[:, :-1].flatten(0, 1).split(step), targets):
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
             stop=None, extract=extract_answer, same=is_equiv):
    """Greedy accuracy; with n > 1 also maj@n over n samples at `temperature`. Returns metrics +
    records. A paper's own grader: extract(text) -> answer or None, same(answer, gold) -> bool."""
    prompts = [prompt_fn(example) for example in examples]
    settings = dict(max_new_tokens=max_new_tokens, batch_size=batch_size, stop=stop, sharded=True)  # torchrun: shares
    greedy = generate(model, tokenizer, prompts, **settings)
    preds = [extract(completion.text) for completion in greedy]
    records = [dict(question=e.question, gold=e.answer, completion=c.text, pred=p,
                    correct=same(p, e.answer)) for e, c, p in zip(examples, greedy, preds)]
    metrics = {"accuracy": sum(r["correct"] for r in records) / len(records)}
    if n > 1:
        samples = generate(model, tokenizer, prompts, temperature=temperature, n=n, **settings)
        answers = [extract(sample.text) for sample in samples]
        votes = [majority_answer(answers[i:i + n]) for i in range(0, len(samples), n)]
        n_right = sum(same(vote, example.answer) for vote, example in zip(votes, examples))
        metrics[f"maj@{n}"] = n_right / len(examples)
    return metrics | {"records": records}

NO_FORK = {"x86_64": (0xC000003E, 56, (57, 58)),  # seccomp ABI, clone, fork and vfork
           "aarch64": (0xC00000B7, 220, ())}

def no_fork_filter():
    """seccomp BPF: a new process fails (EAGAIN), a thread (clone with CLONE_THREAD) may start."""
    abi, clone, forks = NO_FORK[platform.machine()]
    allow, eagain, enosys = 0x7FFF0000, 0x50000 | errno.EAGAIN, 0x50000 | errno.ENOSYS
    load, equal, bits, give = 0x20, 0x15, 0x45, 0x06  # BPF_LD|W|ABS, JMP|JEQ|K, JMP|JSET|K, RET|K

    def op(code, k, jump_true=0, jump_false=0):
        return struct.pack("=HBBI", code, jump_true, jump_false, k)
    program = [op(load, 4), op(equal, abi, 1), op(give, enosys)]  # another ABI (i386 on x86-64)
    program += [op(load, 0), op(equal, 435, 0, 1), op(give, enosys)]  # clone3 hides its flags
    for number in forks:
        program += [op(equal, number, 0, 1), op(give, eagain)]
    program += [op(equal, clone, 0, 3), op(load, 16), op(bits, 0x10000, 1), op(give, eagain)]
    return b"".join(program + [op(give, allow)])

@functools.cache
def sandbox_tool():
    """bwrap's path if bubblewrap runs with user namespaces (x86-64 or aarch64 Linux), else None."""
    bwrap = shutil.which("bwrap")
    probe = [bwrap, "--unshare-all", "--unshare-user", "--disable-userns", "--ro-bind", "/", "/"]
    works = bwrap and platform.machine() in NO_FORK and subprocess.run(probe + ["true"], env={},
                                                                      capture_output=True)
    return bwrap if works and works.returncode == 0 else None

def run_sandboxed(code, *, timeout=10.0, memory_mb=1024, max_output=2 ** 20, no_sandbox=False):
    """(exited with 0, stdout up to max_output bytes) of untrusted Python: README, Security."""
    bwrap = sandbox_tool()
    if bwrap is None and not no_sandbox:
        fail("model-written code needs bubblewrap with user namespaces (x86-64 or aarch64 Linux): "
             "apt-get install bubblewrap, or pass --no_sandbox to accept resource limits alone")
    limits = dict(AS=memory_mb << 20, CPU=math.ceil(timeout), FSIZE=2 ** 24, NOFILE=64, NPROC=64,
                  CORE=0)  # set inside the sandbox: they bind the program, not bwrap
    launch = "".join(f"resource.setrlimit(resource.RLIMIT_{name}, ({value}, {value}))\n"
                     for name, value in limits.items())
    command = [sys.executable, "-I", "-c", "import os, resource, sys\n" + launch
               + "os.execv(sys.executable, [sys.executable, '-I', '-c', sys.argv[1]])", code]
    filter_in, filter_out = os.pipe()
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as folder, open(filter_in, "rb"):
        with os.fdopen(filter_out, "wb") as f:
            f.write(no_fork_filter() if bwrap else b"")
        if bwrap:  # namespaces: user, PID, network, mount, IPC, UTS; read-only system, private /tmp
            system = sorted({"/usr", "/lib", "/lib64", os.path.realpath(sys.prefix),
                             sys.base_prefix})  # what the interpreter needs
            command = [bwrap, "--unshare-all", "--unshare-user", "--disable-userns", "--cap-drop",
                       "ALL", "--new-session", "--die-with-parent", "--proc", "/proc",
                       "--dev", "/dev",
                       *(arg for path in system for arg in ("--ro-bind-try", path, path)),
                       "--size", str(2 ** 24), "--tmpfs", "/tmp", "--chdir", "/tmp", "--remount-ro",
                       "/dev", "--remount-ro", "/", "--seccomp", str(filter_in), *command]
        with subprocess.Popen(command, cwd=folder, env={}, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              start_new_session=True, pass_fds=[filter_in]) as run:
            output = b""
            deadline = time.monotonic() + timeout

            def left():
                return max(deadline - time.monotonic(), 0)
            ready = select.poll()  # not select(): a trainer may hold file descriptors past 1024
            ready.register(run.stdout, select.POLLIN)
            while len(output) <= max_output and ready.poll(left() * 1e3):  # a flood stops at a cap
                chunk = os.read(run.stdout.fileno(), 2 ** 16)
                if not chunk:
                    break
                output += chunk
            with contextlib.suppress(subprocess.TimeoutExpired):
                run.wait(left() if len(output) <= max_output else 0)
            status = run.poll()
            with contextlib.suppress(OSError):  # bwrap's death kills all inside (--die-with-parent)
                os.killpg(run.pid, signal.SIGKILL)
    return status == 0 and len(output) <= max_output, output[:max_output].decode(errors="replace")

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
        values = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                  for k, v in metrics.items()]
        tqdm.write(" ".join([f"[{step}]", *values]))  # above any open progress bar, not glued to it
        self.samples([{"step": step, **metrics}], "metrics.jsonl")

    def samples(self, rows, name="samples.jsonl"):
        if RANK == 0:
            with open(os.path.join(self.out_dir, name), "a") as f:
                f.writelines(json.dumps(row) + "\n" for row in rows)
