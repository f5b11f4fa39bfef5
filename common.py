"""Plumbing shared by every method script (no method's maths). The scripts and tests import its
public names: README, Map of the files."""
import argparse
import contextlib
import dataclasses
import difflib
import errno
import functools
import inspect
import json
import math
import operator
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
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, DynamicCache,
                          PreTrainedTokenizerFast)
from transformers.modeling_layers import GradientCheckpointingLayer

RANK = int(os.environ.get("RANK", 0))  # set by torchrun
WORLD = int(os.environ.get("WORLD_SIZE", 1))
if WORLD > 1 and not dist.is_initialized():  # under torchrun: NCCL with a GPU per rank, or gloo
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
        needs = "".join(f"needs {p} (`{TOY_RUNS.get(p, 'python sft.py --preset toy')}` writes it) "
                        "and " for p in starts)
        settings = ", ".join(f"{key}={value}" for key, value in values.items())
        sentences.append(f"{name}: {needs}sets {settings}.")
    return " ".join(sentences).replace("%", "%%")

def _flag_meant(flag, names):
    """The field an unknown flag most likely meant (--learning_rate: lr, --seeds: seed), or None."""
    parts = flag.lstrip("-").partition("=")[0].split("_")
    for k in range(len(parts) - 1):  # the last parts by their initials: --dpo_learning_rate: dpo_lr
        initials = "".join(part[:1] for part in parts[k:])
        short = "_".join(parts[:k] + [initials])
        if short in names:
            return short
    close = difflib.get_close_matches("_".join(parts), names, n=1)
    return close[0] if close else None

def parse_args(cls, presets=None, argv=None):
    """argparse from a dataclass, field docstrings as --help; explicit flags beat --preset's."""
    presets = presets or {}
    fields = dataclasses.fields(cls)
    docs = {}  # a field's help: the string literal on the lines under it
    with contextlib.suppress(OSError, TypeError):  # no source (a class typed into a notebook)
        source = inspect.getsource(cls)
        docs = dict(re.findall(r'^ +(\w+):[^\n]*\n +"""(.*?)"""', source, re.MULTILINE | re.DOTALL))
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
        field_help = docs.get(f.name, "").replace("%", "%%")
        parser.add_argument(f"--{f.name}", default=f.default, help=field_help, **how)
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
    "deepseek-math-7b": "deepseek-ai/deepseek-math-7b-base",
    "mistral-7b": "mistralai/Mistral-7B-v0.1", "llemma-7b": "EleutherAI/llemma_7b",
    "llama2-7b": "meta-llama/Llama-2-7b-hf", "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B",
    "codellama-7b": "codellama/CodeLlama-7b-hf", "llama3-8b": "meta-llama/Meta-Llama-3-8B",
    "galactica-6.7b": "facebook/galactica-6.7b", "galactica-125m": "facebook/galactica-125m"}
TINY = dict(vocab_size=259, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
            intermediate_size=384, max_position_embeddings=512, tie_word_embeddings=True,
            bos_token_id=256, eos_token_id=257, pad_token_id=258)

def byte_tokenizer():
    """Built in code: ids 0-255 are bytes, then <s>, </s>, <pad> (TINY's 259 ids)."""
    vocab = {f"<0x{b:02X}>": b for b in range(256)} | {"<s>": 256, "</s>": 257, "<pad>": 258}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True))
    backend.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    bos = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 256)])
    backend.post_processor = bos
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")

def load_model(name_or_path, *, dtype=None, device=None, lora_rank=0, seed=0, frozen=False,
               reference=False):
    """(model, tokenizer) from `tiny[:knob=value,...]`, a paper alias, a folder or a hub id.
    Forwards run in `dtype` (bf16 on CUDA) under autocast(model); the weights that train are fp32:
    all of them, or with lora_rank > 0 the adapters over a trunk in dtype. frozen=True (a sampler,
    a reference policy) keeps every weight in dtype; reference=True tells check_memory that a bf16
    reference copy sits beside a full fine-tune."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    full = lora_rank == 0 and not frozen  # all weights train: fp32 masters (bf16 loses small steps)
    storage = torch.float32 if full else dtype
    bytes_per_param = full * (16 + 2 * reference)
    torch.manual_seed(seed)
    source = ALIASES.get(name_or_path, name_or_path)
    is_path = source.startswith((".", "/", "~", "runs/"))
    if source.partition(":")[0] == "tiny":  # a fresh ~1M-parameter Llama, no download
        knobs = with_knobs(source, TINY, "tiny:hidden_size=256,num_attention_heads=8")
        config = AutoConfig.for_model("llama", **knobs)
        check_memory(config, device, bytes_per_param)
        tokenizer = byte_tokenizer()
        model = AutoModelForCausalLM.from_config(config).to(storage)
    elif is_path and not os.path.isdir(source):  # fail now, not at the hub
        folder = source.rstrip("/") if source.rstrip("/") in TOY_RUNS else "runs/toy-sft"
        fail(f"no checkpoint folder {name_or_path!r} (`{TOY_RUNS[folder]}` writes {folder})")
    elif os.path.isdir(source) or re.fullmatch(r"[\w.-]+/[\w.-]+", source):
        if not os.path.isdir(source):
            _check_hub(source, name_or_path)
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
            check_memory(AutoConfig.from_pretrained(source), device, bytes_per_param)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=storage)
        except OSError as error:
            fail(f"could not load model {name_or_path!r}: no such folder, and the hub gave "
                 f"{type(error).__name__}")
    else:
        fail(f"unknown model {name_or_path!r}: use tiny, a folder, a hub id (owner/name) or "
             f"{', '.join(ALIASES)}")
    # pad = EOS (or BOS) hides the real EOS from masks built from token ids (huggingface/trl#1623)
    meaningless = (None, tokenizer.eos_token_id, tokenizer.bos_token_id)
    if tokenizer.pad_token_id in meaningless and tokenizer.unk_token_id not in meaningless:
        tokenizer.pad_token = tokenizer.unk_token
    elif tokenizer.pad_token_id in meaningless:
        tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
        n_embeddings = model.get_input_embeddings().num_embeddings
        model.resize_token_embeddings(max(len(tokenizer), n_embeddings))
    tokenizer.padding_side = "left"
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if lora_rank > 0:  # adapters on the trunk's linear layers (not the head); only they train
        model.requires_grad_(False)
        for module in list(model.base_model.modules()):
            for name, child in module.named_children():
                if isinstance(child, nn.Linear):
                    setattr(module, name, LoRALinear(child, lora_rank, 2 * lora_rank))
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
    """Every forward in load_model's compute dtype (bf16 on CUDA) over fp32 weights; off at fp32."""
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
    """y = W x + (alpha / r) B A x, W frozen, A and B fp32; B starts at 0: the layer starts as W."""
    def __init__(self, base, rank, alpha):
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        self.enabled = True
        init = torch.randn(rank, base.in_features, device=base.weight.device)
        init = init / math.sqrt(base.in_features)
        self.lora_A = nn.Parameter(init)
        self.lora_B = nn.Parameter(init.new_zeros(base.out_features, rank))

    def forward(self, x):
        if not self.enabled:
            return self.base(x)
        update = x.to(self.lora_A.dtype) @ self.lora_A.T @ self.lora_B.T * self.scale
        return self.base(x) + update.to(x.dtype)

@contextlib.contextmanager
def adapters_disabled(model):
    """The base model without adapters: the frozen reference policy, with no copy of the weights."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for layer in layers:
        layer.enabled = False
    try:
        yield model
    finally:
        for layer in layers:
            layer.enabled = True

def _recomputed(fn, *args, **kwargs):
    """fn(*args, **kwargs), its activations recomputed in backward; a plain call without grad."""
    if torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False, **kwargs)
    return fn(*args, **kwargs)

def gradient_checkpointing(model, enable=True):
    """Recompute each decoder layer in backward, also in eval() (RL, DPO) where HF's switch is off.
    Non-reentrant, so frozen embeddings (LoRA) still pass gradients (transformers PR #43203)."""
    for layer in [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]:
        # an instance attribute: FSDP's module hooks stay outside the checkpoint
        layer.__dict__.pop("forward", None)
        if enable:
            layer.forward = functools.partial(_recomputed, type(layer).forward, layer)

def shard(items):
    """This rank's items[rank::world], wrapped around so every rank gets as many (DDP, FSDP)."""
    per_rank = math.ceil(len(items) / WORLD)
    return [items[i % len(items)] for i in range(RANK, per_rank * WORLD, WORLD)]

def gather(items, total, n=1):
    """shard's inverse: every rank's results (n per item, item-major), in order, on every rank."""
    parts = [items]
    if WORLD > 1:
        parts = [None] * WORLD
        dist.all_gather_object(parts, items)
    results = []
    for i in range(total):  # item i is on rank i % WORLD, at position i // WORLD
        start = i // WORLD * n
        results += parts[i % WORLD][start:start + n]
    return results

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
    """transformers' get_linear_schedule_with_warmup."""
    def factor(step):
        if step < warmup_steps:  # 1) rise linearly over warmup_steps
            return step / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))  # 2) fall to 0
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

def positions_from_mask(attention_mask):
    """Position ids that skip padding on either side: a prompt starts at 0 wherever it sits."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)

def wrap_model(model, fsdp=None):
    """The model to train: itself on one process; under torchrun DDP (LoRA, small models) or FSDP2
    (fsdp=None: past 1B trainable parameters)."""
    if WORLD == 1 or isinstance(model, FSDPModule):
        return model
    if fsdp is None:
        fsdp = sum(p.numel() for p in model.parameters() if p.requires_grad) > 1e9
    if not fsdp:
        return nn.parallel.DistributedDataParallel(model)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for module in layers + [model]:  # fp32 master shards, gathered all through sampling
        fully_shard(module.float(), mp_policy=policy, reshard_after_forward=False)
    return model

Example = namedtuple("Example", ["question", "rationale", "answer"])
# steps per question: min_steps to steps (0: all `steps`); n_val questions held out of train for
# choosing settings, which validate=1 puts in place of the test split (--test_task arith:validate=1)
# and train_from skips that many training questions, leaving ones a model trained on those never saw
ARITH = dict(steps=3, min_steps=0, digits=1, n_train=4000, n_val=0, n_test=200, seed=0,
             validate=0, train_from=0)
APPLY = {"+": operator.add, "-": operator.sub, "*": operator.mul}
HUB_TASKS = {"gsm8k": ("openai/gsm8k", "main"), "svamp": ("ChilleD/SVAMP", None),
             "math": ("DigitalLearningGmbH/MATH-lighteval", "default")}

def arith_chain(rng, n_steps, low, high, operand_high=None):
    """One seeded calculation: (expression, [(a, op, b, result) per step], value); + and -
    operands up to operand_high (default: high), * operands 2-9."""
    value = rng.randint(low, high)
    steps = []
    for _ in range(n_steps):
        op = rng.choice("+-*")
        operand = rng.randint(2, 9) if op == "*" else rng.randint(low, operand_high or high)
        if op == "-" and operand > value:
            op = "+"  # every intermediate result stays non-negative
        result = APPLY[op](value, operand)
        steps.append((value, op, operand, result))
        value = result
    return expression(steps[0][0], steps), steps, value

def expression(start, steps):
    """`start`, then each step's operator and operand, bracketed where * follows + or -."""
    expr = str(start)
    last_op = None
    for _, op, operand, _ in steps:
        if op == "*" and last_op in ("+", "-"):
            expr = f"({expr}){op}{operand}"
        else:
            expr = f"{expr}{op}{operand}"
        last_op = op
    return expr

def arith_task(split, steps, min_steps, digits, n_train, n_val, n_test, seed, validate,
               train_from):
    """Seeded multi-step integer expressions, one calculation per rationale line; the test,
    validation (val) and train questions are disjoint."""
    rng = random.Random(seed)
    low = 10 ** (digits - 1)
    high = 10 ** digits - 1
    unique = {}
    while len(unique) < n_test + n_val + train_from + n_train:
        n_steps = rng.randint(min_steps, steps) if 0 < min_steps < steps else steps
        expr, chain, value = arith_chain(rng, n_steps, low, high)
        rationale = "\n".join(written(*step) for step in chain)
        unique.setdefault(expr, Example(expr, rationale, str(value)))
    examples = list(unique.values())
    splits = {"test": examples[:n_test], "val": examples[n_test:n_test + n_val],
              "train": examples[n_test + n_val + train_from:]}
    return splits["val" if validate and split == "test" else split]

CORPUS = dict(n_docs=100000, seed=1)
# The toy world (README, The toy world): its task, and the command that writes each of its starts.
# 1000 training questions leave the toy SFT 7 points below its best of 8 samples (4000: 2.7)
TOY_TASK = "arith:min_steps=2,steps=8,n_val=300,n_test=600,n_train=1000"
# the same validation and test questions, and the next 1500 training questions (a repeated knob:
# the last wins), which the toy SFT never saw
UNSEEN_TASK = TOY_TASK + ",train_from=1000,n_train=1500"
TOY_RUNS = {"runs/toy-base": "python sft.py --preset toy_base",
            "runs/toy-sft": "python sft.py --preset toy"}
WORDS = {"+": "add", "-": "subtract", "*": "multiply by"}

def written(a, op, b, result):
    return f"{a}{op}{b}={result}"

def worked_another_way(rng, a, op, b, result):
    """One step as lines: by place value where it can be (47*6=40*6+7*6), or with the terms
    swapped (4+6 as 6+4), or as it is."""
    tens = a - a % 10
    ones = a % 10
    if op == "*" and a >= 20 and ones:
        return [f"{a}*{b}={tens}*{b}+{ones}*{b}", written(tens, "*", b, tens * b),
                written(ones, "*", b, ones * b), written(tens * b, "+", ones * b, result)]
    if op == "+" and rng.random() < 0.5:
        return [written(b, "+", a, result)]
    return [written(a, op, b, result)]

def corpus_document(rng):
    """(question or None, text): a list of facts, or a calculation of 1-9 steps written one of
    four ways, 5% of those with a slip that is noticed and corrected."""
    if rng.random() < 0.25:  # facts over the operand sizes the calculations meet
        facts = []
        for _ in range(rng.randint(4, 10)):  # a number up to 9, 99 or 999 and a one-digit one
            _, steps, _ = arith_chain(rng, 1, 1, 10 ** rng.randint(1, 3) - 1, operand_high=9)
            facts.append(written(*steps[0]))
        return None, "\n".join(facts)
    n_steps = rng.randint(7, 9) if rng.random() < 0.1 else rng.randint(1, 6)  # a hard tail
    expr, steps, value = arith_chain(rng, n_steps, 1, 99 if rng.random() < 0.1 else 9)
    style = rng.random()
    if style < 0.35:  # one calculation per line, as the task writes it
        lines = [written(*step) for step in steps]
        if rng.random() < 0.05:
            i = rng.randrange(len(steps))
            a, op, b, result = steps[i]
            wrong = result + rng.choice([-10, -1, 1, 10]) if result >= 10 else result + 1
            lines.insert(i, f"{a}{op}{b}={wrong}\nwait, {a}{op}{b} is {result}, not {wrong}")
    elif style < 0.55:  # each result put back into the expression: (6+4)*9=10*9=90
        rest = [expression(step[3], steps[i + 1:]) for i, step in enumerate(steps)]
        lines = [f"{expr}={'='.join(rest)}"]
    elif style < 0.75:  # about half the steps worked another way
        lines = []
        for step in steps:
            lines += worked_another_way(rng, *step) if rng.random() < 0.5 else [written(*step)]
    else:
        lines = [f"start with {steps[0][0]}"]
        lines += [f"{WORDS[op]} {b} to get {result}" for _, op, b, result in steps]
    opening = rng.choice(["Compute {}.", "Work out {}.", "What is {}?", "{}", "Evaluate {}."])
    ending = rng.choice(["So {}={}.", "{}={}", "The result is {1}.", "Answer: {1}"])
    return expr, "\n".join([opening.format(expr), *lines, ending.format(expr, value)])

def toy_corpus(split, n_docs, seed, size=250):
    """The toy base model's pretraining text (README, The toy world) in pieces of whole documents
    and at most `size` characters: n_docs seeded documents, less those about a validation or test
    question of arith (its defaults, and TOY_TASK) and the few longer than `size`."""
    if split != "train":
        return []
    held_out = set()
    for knobs in (ARITH, with_knobs(TOY_TASK, ARITH, TOY_TASK)):
        held_out |= {e.question for part in ("val", "test") for e in arith_task(part, **knobs)}
    rng = random.Random(seed)
    pieces = [""]
    for _ in range(n_docs):
        question, document = corpus_document(rng)
        if question in held_out or len(document) > size:
            continue
        if len(pieces[-1]) + len(document) + 2 > size:
            pieces.append("")
        pieces[-1] = f"{pieces[-1]}\n\n{document}" if pieces[-1] else document
    return [Example("", piece, "") for piece in pieces]

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
            answer = extract_answer(record["solution"]) or ""
            return Example(record["problem"], record["solution"], answer)
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
        fail(f"{where}: missing or bad field {error}; each record needs question, rationale and "
             f"answer, or GSM8K's question and answer ending in '#### x'")

def with_knobs(name, defaults, example):
    """defaults updated by the integer knobs of `name:key=value,...` (arith:steps=2)."""
    knobs = [knob for knob in name.partition(":")[2].split(",") if knob]
    overrides = dict(knob.partition("=")[::2] for knob in knobs)
    if not set(overrides) <= set(defaults) or not all(v.isdigit() for v in overrides.values()):
        fail(f"bad knobs in {name!r}: write e.g. {example} with knobs from {sorted(defaults)}")
    return defaults | {k: int(v) for k, v in overrides.items()}

def load_task(name_or_path, split="train", test_task=""):
    """list[Example] from `arith[:knob=value,...]`, a hub task, a folder of {split}.jsonl, or a
    .jsonl/.json file, which is one split: a lone file's test split is only ever `test_task`."""
    given = split == "test" and bool(test_task)  # an explicit test set: a lone file is that split
    name_or_path = test_task if given else name_or_path
    if name_or_path.partition(":")[0] == "arith":
        knobs = with_knobs(name_or_path, ARITH, "arith:steps=3,digits=1")
        examples = arith_task(split, **knobs)
    elif name_or_path.partition(":")[0] == "toy_corpus":
        knobs = with_knobs(name_or_path, CORPUS, "toy_corpus:n_docs=1000")
        examples = toy_corpus(split, **knobs)
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

# text: decoded, cut before a stop string; token_ids: the generated ones, EOS included;
# finished: ended by EOS or a stop string, not by the length cap
Completion = namedtuple("Completion", ["text", "token_ids", "finished"])

def _generate_batch(model, tokenizer, prompts, max_new_tokens, temperature, top_p, stop,
                    max_total_tokens):
    """One left-padded batch, decoded a token at a time with a KV cache."""
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    enc = enc.to(model.device)
    step_ids = enc["input_ids"]
    mask = enc["attention_mask"]
    context = getattr(model.config, "max_position_embeddings", None) or math.inf
    if mask.shape[1] >= context:
        fail(f"a prompt has {mask.shape[1]} tokens but the model's context is {context}: "
             f"shorten the prompts")
    eos = model.generation_config.eos_token_id  # None, one id or a list of ids
    eos = {tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])}
    generated = [[] for _ in prompts]
    done = [False] * len(prompts)
    stopped = [False] * len(prompts)
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
            tokens = torch.multinomial(probs, 1).squeeze(-1)
        else:
            tokens = logits.argmax(-1)
        for row, token in enumerate(tokens.tolist()):
            if done[row]:
                continue
            generated[row].append(token)
            if stop and token not in eos:  # a stop string just completed lies in the newest tokens
                newest = generated[row][-max(map(len, stop)) - 4:]
                tail = tokenizer.decode(newest, skip_special_tokens=True)
                stopped[row] = any(s in tail for s in stop)
            done[row] = token in eos or stopped[row]
        if all(done):
            break
        finished = torch.tensor(done, device=model.device)
        step_ids = torch.where(finished, tokenizer.pad_token_id, tokens)[:, None]
        mask = torch.cat([mask, mask.new_ones(len(prompts), 1)], dim=1)
        positions = positions[:, -1:] + 1
    texts = tokenizer.batch_decode(generated, skip_special_tokens=True)
    for row, text in enumerate(texts):
        # a window may start inside a multi-byte character and show a stop string the full text
        # lacks: such a text stays whole
        ends = [text.find(s) for s in stop if s in text] if stopped[row] else []
        texts[row] = text[:min(ends, default=len(text))]
    return [Completion(*row) for row in zip(texts, generated, done)]

@torch.no_grad()
def generate(model, tokenizer, prompts, *, max_new_tokens, temperature=0.0, top_p=1.0, n=1,
             stop=None, batch_size=None, sharded=False, max_total_tokens=None):
    """n completions per prompt, prompt-major, from our own decode loop (greedy at temperature 0).
    sharded=True (torchrun): each rank decodes its share, every rank gets all the completions.
    max_total_tokens caps each batch's padded prompt + response (HF's max_length)."""
    rows = [prompt for prompt in (shard(prompts) if sharded else prompts) for _ in range(n)]
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))  # similar lengths: less padding
    batch_size = batch_size or max(len(rows), 1)
    was_training = model.training
    model.eval()
    completions = []
    one_batch = dict(disable=True) if len(rows) <= batch_size else {}  # else TQDM_DISABLE decides
    for start in tqdm(range(0, len(rows), batch_size), desc="generate", leave=False, **one_batch):
        batch = [rows[i] for i in order[start:start + batch_size]]
        completions += _generate_batch(model, tokenizer, batch, max_new_tokens, temperature, top_p,
                                       stop, max_total_tokens)
    model.train(was_training)
    by_row = dict(zip(order, completions))
    completions = [by_row[i] for i in range(len(rows))]
    return gather(completions, len(prompts), n) if sharded else completions

def _chunk_logprobs(head, hidden, targets, temperature):
    """log p(targets) from a chunk of hidden states; div_ in place spares a chunk-sized buffer."""
    logits = head(hidden).float().div_(temperature)
    return logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)

def token_logprobs(model, input_ids, attention_mask, *, temperature=1.0, return_hidden=False,
                   chunk_elements=2 ** 23):
    """log p(input_ids[:, t+1] | prefix) as [B, L-1], 0 at padding; return_hidden=True adds the
    last hidden state. Memory-lean: the wrapped (DDP, FSDP2) forward keeps one logit, and the head
    runs in chunks recomputed in backward."""
    positions = positions_from_mask(attention_mask)  # the positions generate used
    with autocast(model):  # bf16 compute on CUDA (recomputed alike); the log-softmax is fp32
        hidden = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                       use_cache=False, output_hidden_states=True,
                       logits_to_keep=1).hidden_states[-1]  # the other layers' states are freed
        head = getattr(model, "module", model).get_output_embeddings()  # Llama, Mistral, GPT-2, OPT
        step = max(1, chunk_elements // head.out_features)
        hidden_chunks = hidden[:, :-1].flatten(0, 1).split(step)
        target_chunks = input_ids[:, 1:].flatten().split(step)
        pieces = []
        for chunk in zip(hidden_chunks, target_chunks):
            pieces.append(_recomputed(_chunk_logprobs, head, *chunk, temperature))
    logprobs = torch.cat(pieces).view(input_ids.shape[0], -1)  # [B, L-1]
    logprobs = logprobs * attention_mask[:, 1:] * attention_mask[:, :-1]
    return (logprobs, hidden) if return_hidden else logprobs

def batch_sequences(prompts, responses, pad_id, device):
    """Right-padded prompt+response ids, attention mask and response mask, built from lengths and
    never from token values (pad may equal EOS: huggingface/trl#1623). response_mask[b, t] = 1
    where token_logprobs[b, t] scores a response token."""
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    input_ids = torch.full((len(prompts), max(lengths)), pad_id, dtype=torch.long)
    attention_mask = (torch.arange(max(lengths)) < torch.tensor(lengths)[:, None]).long()
    response_mask = torch.zeros(len(prompts), max(lengths) - 1)
    for row, (prompt, response) in enumerate(zip(prompts, responses)):
        input_ids[row, :lengths[row]] = torch.tensor(list(prompt) + list(response))
        response_mask[row, max(len(prompt) - 1, 0):lengths[row] - 1] = 1
    return input_ids.to(device), attention_mask.to(device), response_mask.to(device)

def extract_answer(text):
    """The last of `#### x`, `The answer is x`, `the answer is: x`, `\\boxed{x}`, or None."""
    text = text or ""
    found = []  # (where, answer)
    for match in re.finditer(r"(?:####|answer is:?)[ \t]*([^\n]*)", text, re.IGNORECASE):
        answer = match.group(1).split("I hope it is correct")[0].strip()
        answer = re.sub(r"^\$(.*)\$.*", r"\1", answer)  # "$x$." -> "x"
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
    s = s.replace("tfrac", "frac").replace("dfrac", "frac").replace("\\left", "")
    s = s.replace("\\right", "").replace("^{\\circ}", "").replace("^\\circ", "")
    s = s.replace("\\$", "").replace("$", "")
    s = re.sub(r"\\(?:text|mbox|mathrm)\{\s*[a-zA-Z ]*\}$", "", s).strip()  # trailing units
    s = s.replace("\\%", "").replace("%", "").replace(" .", " 0.").replace("{.", "{0.")
    s = ("0" + s if s.startswith(".") else s).rstrip(".")
    sides = s.split("=")
    if len(sides) == 2 and len(sides[0].strip()) <= 2:  # "k = 5" -> "5"
        s = sides[1]
    s = re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s).replace(" ", "")
    s = re.sub(r"\\frac([^{\\])([^{\\])", r"\\frac{\1}{\2}", s)  # \frac12 -> \frac{1}{2}
    s = re.sub(r"\\frac([^{\\])\{", r"\\frac{\1}{", s)  # \frac1{2} -> \frac{1}{2}
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):  # 1,000 -> 1000
        s = s.replace(",", "")
    return s

def _as_number(s):
    """An exact rational for an integer, decimal, a/b or \\frac{a}{b}; None for anything else."""
    num = r"-?\d+(?:\.\d+)?"
    match = re.fullmatch(rf"(-?)\\frac\{{({num})\}}\{{({num})\}}", s)
    match = match or re.fullmatch(rf"()({num})/({num})", s)
    if match and Fraction(match.group(3)) != 0:
        value = Fraction(match.group(2)) / Fraction(match.group(3))
        return -value if match.group(1) else value
    return Fraction(s) if re.fullmatch(num, s) else None

def is_equiv(pred, gold):
    """Numbers equal as rationals (0.5 = 1/2 = \\frac12), else Hendrycks-normalised strings."""
    if pred is None or gold is None:
        return False
    a = normalize_answer(pred)
    b = normalize_answer(gold)
    x = _as_number(a)
    y = _as_number(b)
    return x == y if x is not None and y is not None else bool(a) and a == b

def majority_answer(answers):
    """The most frequent answer (ties: the first seen), equivalent spellings grouped; or None."""
    answers = [a for a in answers if a is not None]
    keys = [normalize_answer(a) for a in answers]
    return max(answers, key=lambda a: keys.count(normalize_answer(a)), default=None)

def evaluate(model, tokenizer, examples, prompt_fn, *, max_new_tokens=512, n=1, temperature=0.7,
             batch_size=64, stop=None, extract=extract_answer, same=is_equiv):
    """Greedy accuracy; with n > 1 also maj@n over n samples at `temperature`. Returns metrics and
    records. A paper's own grader: extract(text) -> answer or None, same(answer, gold) -> bool."""
    prompts = [prompt_fn(example) for example in examples]
    # sharded: under torchrun each rank decodes its share
    settings = dict(max_new_tokens=max_new_tokens, batch_size=batch_size, stop=stop, sharded=True)
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
ISOLATED = ["--unshare-all", "--unshare-user", "--disable-userns"]  # and none made inside

def no_fork_filter():
    """seccomp BPF: a new process fails (EAGAIN), a thread (clone with CLONE_THREAD) may start."""
    abi, clone, forks = NO_FORK[platform.machine()]
    allow = 0x7FFF0000  # SECCOMP_RET_ALLOW
    eagain = 0x50000 | errno.EAGAIN  # SECCOMP_RET_ERRNO
    enosys = 0x50000 | errno.ENOSYS
    load = 0x20  # BPF_LD | BPF_W | BPF_ABS: the word at offset k of seccomp_data
    equal = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
    bits = 0x45  # BPF_JMP | BPF_JSET | BPF_K
    give = 0x06  # BPF_RET | BPF_K

    def op(code, k, jump_true=0, jump_false=0):
        return struct.pack("=HBBI", code, jump_true, jump_false, k)
    # seccomp_data: the syscall number at offset 0, the ABI at 4, the first argument at 16
    program = [op(load, 4), op(equal, abi, 1), op(give, enosys)]  # another ABI (i386 on x86-64)
    program += [op(load, 0), op(equal, 435, 0, 1), op(give, enosys)]  # clone3 hides its flags
    for number in forks:
        program += [op(equal, number, 0, 1), op(give, eagain)]
    # clone without CLONE_THREAD (0x10000) in its flags
    program += [op(equal, clone, 0, 3), op(load, 16), op(bits, 0x10000, 1), op(give, eagain)]
    return b"".join(program + [op(give, allow)])

@functools.cache
def sandbox_tool():
    """bwrap's path if bubblewrap runs with user namespaces (x86-64 or aarch64 Linux), else None."""
    bwrap = shutil.which("bwrap")
    if not bwrap or platform.machine() not in NO_FORK:
        return None
    probe = subprocess.run([bwrap, *ISOLATED, "--ro-bind", "/", "/", "true"], env={},
                           capture_output=True)
    return bwrap if probe.returncode == 0 else None

def run_sandboxed(code, *, timeout=10.0, memory_mb=1024, max_output=2 ** 20, no_sandbox=False):
    """(exited with 0, stdout up to max_output bytes) of untrusted Python: README, Security."""
    bwrap = sandbox_tool()
    if bwrap is None and not no_sandbox:
        fail("model-written code needs bubblewrap with user namespaces (x86-64 or aarch64 Linux): "
             "apt-get install bubblewrap, or pass --no_sandbox to accept resource limits alone")
    # set inside the sandbox, so they bind the program and not bwrap
    limits = dict(AS=memory_mb << 20, CPU=math.ceil(timeout), FSIZE=2 ** 24, NOFILE=64, NPROC=64,
                  CORE=0)
    launcher = ["import os, resource, sys"]
    for name, value in limits.items():
        launcher.append(f"resource.setrlimit(resource.RLIMIT_{name}, ({value}, {value}))")
    launcher.append("os.execv(sys.executable, [sys.executable, '-I', '-c', sys.argv[1]])")
    command = [sys.executable, "-I", "-c", "\n".join(launcher), code]
    filter_in, filter_out = os.pipe()
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as folder, open(filter_in, "rb"):
        with os.fdopen(filter_out, "wb") as f:
            f.write(no_fork_filter() if bwrap else b"")
        if bwrap:
            # new user, PID, network, mount, IPC and UTS namespaces, no capabilities
            isolation = [*ISOLATED, "--cap-drop", "ALL", "--new-session", "--die-with-parent"]
            devices = ["--proc", "/proc", "--dev", "/dev"]
            # what the interpreter needs, read-only (-try: a folder this system lacks is skipped)
            system = sorted({"/usr", "/lib", "/lib64", os.path.realpath(sys.prefix),
                             sys.base_prefix})
            read_only = [arg for path in system for arg in ("--ro-bind-try", path, path)]
            scratch = ["--size", str(2 ** 24), "--tmpfs", "/tmp", "--chdir", "/tmp"]  # 16 MB
            sealed = ["--remount-ro", "/dev", "--remount-ro", "/", "--seccomp", str(filter_in)]
            command = [bwrap, *isolation, *devices, *read_only, *scratch, *sealed, *command]
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
    exited = status == 0 and len(output) <= max_output
    return exited, output[:max_output].decode(errors="replace")

def save(model, tokenizer, out_dir, args=None):
    """save_pretrained (LoRA merged into plain weights), the tokenizer and args.json. All ranks call
    it; rank 0 writes a temporary folder, then renames it (README, Stopping and resuming)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    if RANK == 0:
        for name, module in model.named_modules():
            if isinstance(module, LoRALinear):  # W + (alpha / r) B A under the plain layer's name
                weight = state.pop(f"{name}.base.weight")
                lora_a = state.pop(f"{name}.lora_A")
                lora_b = state.pop(f"{name}.lora_B")
                merged = weight.float() + module.scale * lora_b @ lora_a
                state[f"{name}.weight"] = merged.to(weight.dtype)
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
    run.json); --resume needs the same settings and returns out_dir/state.pt to continue from, or
    None when no state was saved yet (the logs are cleared and the run starts over)."""
    record = os.path.join(args.out_dir, "run.json")
    state = os.path.join(args.out_dir, "state.pt")
    settings = {key: value for key, value in dataclasses.asdict(args).items() if key != "resume"}
    earlier = [record, os.path.join(args.out_dir, "metrics.jsonl")]
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
    """A resumable state at path, in the run folder: full weights and optimiser (plain, DDP, FSDP2),
    every rank's RNG streams, the logs' sizes and `extra`. All ranks call it; rank 0 writes (one
    node: every rank reads that file back)."""
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = {}
    moments = {}
    if model is not None:
        weights, moments = get_state_dict(model, optimizer or [], options=full)
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    mine = (random.getstate(), torch.get_rng_state(), cuda)
    rngs = [mine]
    if WORLD > 1:
        rngs = [None] * WORLD
        dist.all_gather_object(rngs, mine)
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
    """Metrics to stdout and out_dir/metrics.jsonl, samples to out_dir/samples.jsonl (rank 0)."""
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
