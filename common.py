"""Plumbing shared by every method script: arguments, models, tasks, sampling, log-probs, grading.

No method's maths lives here. The names below are the contract every script and test relies on
(see the README's map): parse_args, load_model, load_task, generate, token_logprobs,
extract_answer, is_equiv, evaluate, save, Logger.
"""
import argparse
import ast
import contextlib
import dataclasses
import inspect
import json
import math
import os
import random
import re
import resource
import subprocess
import sys
import tempfile
from collections import Counter
from fractions import Fraction

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

def fail(message):
    """Stop with one clear sentence (bad flag, missing file, malformed data...)."""
    raise SystemExit(f"error: {message}")

# ---------------------------------------------------------------- arguments
def _field_docs(cls):
    """The docstring under each dataclass field (CleanRL style), used as its --help text."""
    try:
        body = ast.parse(inspect.getsource(cls)).body[0].body
    except (OSError, TypeError):
        return {}
    return {node.target.id: doc.value.value for node, doc in zip(body, body[1:])
            if isinstance(node, ast.AnnAssign) and isinstance(doc, ast.Expr)
            and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str)}

def parse_args(cls, presets=None, argv=None):
    """argparse from a dataclass; `--preset NAME` applies presets[NAME] before explicit flags."""
    presets = presets or {}
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", choices=sorted(presets), help="a named set of overrides (see the script)")
    chosen, _ = pre.parse_known_args(argv)
    parser = argparse.ArgumentParser(parents=[pre], description=(cls.__doc__ or "").strip())
    docs, names = _field_docs(cls), [f.name for f in dataclasses.fields(cls)]
    for f in dataclasses.fields(cls):
        kind = f.type if isinstance(f.type, type) else {"int": int, "float": float, "str": str, "bool": bool}[f.type]
        how = dict(action=argparse.BooleanOptionalAction) if kind is bool else dict(type=kind)
        parser.add_argument(f"--{f.name}", default=f.default, help=docs.get(f.name), **how)
    if chosen.preset:
        unknown = set(presets[chosen.preset]) - set(names)
        if unknown:
            fail(f"preset {chosen.preset!r} sets unknown fields {sorted(unknown)}")
        parser.set_defaults(**presets[chosen.preset])
    namespace = parser.parse_args(argv)
    return cls(**{name: getattr(namespace, name) for name in names})

# ---------------------------------------------------------------- models
ALIASES = {  # the papers' base models
    "deepseek-math-7b": "deepseek-ai/deepseek-math-7b-base",
    "mistral-7b": "mistralai/Mistral-7B-v0.1",
    "llemma-7b": "EleutherAI/llemma_7b",
    "codellama-7b": "codellama/CodeLlama-7b-hf",
    "galactica-6.7b": "facebook/galactica-6.7b",
    "galactica-125m": "facebook/galactica-125m",
    "llama2-7b": "meta-llama/Llama-2-7b-hf",
    "llama3-8b": "meta-llama/Meta-Llama-3-8B",
    "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B",
}
TINY = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=384,
            max_position_embeddings=512, tie_word_embeddings=True)

def byte_tokenizer():
    """A byte-level tokenizer built in code: ids 0-255 are bytes, then <s>, </s>, <pad>."""
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast
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
    if source == "tiny":  # a freshly initialised Llama of about 1M parameters: no download
        from transformers import LlamaConfig, LlamaForCausalLM
        tokenizer = byte_tokenizer()
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), bos_token_id=256, eos_token_id=257,
                                             pad_token_id=258, **TINY)).to(dtype)
    elif os.path.isdir(source) or re.fullmatch(r"[\w.-]+/[\w.-]+", source):
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
        except OSError as error:
            fail(f"could not load model {name_or_path!r}: it is no local checkpoint and the hub gave "
                 f"{type(error).__name__} (for the toy pipeline, run `python sft.py --preset toy` first)")
    else:
        fail(f"unknown model {name_or_path!r}: use tiny, a local checkpoint folder, a hub id (owner/name) "
             f"or an alias: {', '.join(ALIASES)}")
    # A pad token that means nothing: masks come from lengths, but pad = EOS/BOS invites bugs (PAPERS 7.2).
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id in (tokenizer.eos_token_id, tokenizer.bos_token_id):
        if tokenizer.unk_token_id is not None and tokenizer.unk_token_id not in (tokenizer.eos_token_id, tokenizer.bos_token_id):
            tokenizer.pad_token = tokenizer.unk_token
        else:
            tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
            model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    tokenizer.padding_side = "left"
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if lora_rank > 0:
        add_lora(model, lora_rank)
    return model.to(device), tokenizer

class LoRALinear(nn.Module):
    """y = W x + (alpha / r) B A x with W frozen; B starts at zero so the wrapped layer starts as W."""

    def __init__(self, base, rank, alpha):
        super().__init__()
        self.base, self.scale, self.enabled = base, alpha / rank, True
        self.lora_A = nn.Parameter(torch.randn(rank, base.in_features, device=base.weight.device) / math.sqrt(base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))

    def forward(self, x):
        out = self.base(x)
        if not self.enabled:
            return out
        return out + (x.to(self.lora_A.dtype) @ self.lora_A.T @ self.lora_B.T * self.scale).to(out.dtype)

    def merged_weight(self):
        return (self.base.weight.float() + self.scale * self.lora_B @ self.lora_A).to(self.base.weight.dtype)

def add_lora(model, rank, alpha=None):
    """Wrap every linear layer of the trunk (not the output head); freeze everything but the adapters."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for module in list(model.base_model.modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.Linear):
                setattr(module, name, LoRALinear(child, rank, alpha or 2 * rank))  # fp32 adapters
    return model

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

# ---------------------------------------------------------------- tasks
@dataclasses.dataclass
class Example:
    question: str
    rationale: str
    answer: str

# The built-in task; `arith:steps=2,digits=3` overrides a knob. Tuned so toy SFT lands at 30-60%.
ARITH = dict(steps=3, digits=1, n_train=4000, n_test=200, seed=0)

def arith_example(rng, steps, digits):
    """A multi-step integer expression solved one calculation per line, like a GSM8K rationale."""
    low, high = 10 ** (digits - 1), 10 ** digits - 1
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
    return Example(expr, "\n".join(lines), str(value))

def arith_task(split, steps, digits, n_train, n_test, seed):
    """Seeded; the test questions come first from one stream and never reappear in train."""
    rng, seen, out = random.Random(seed), set(), {"test": [], "train": []}
    for name, size in (("test", n_test), ("train", n_train)):
        while len(out[name]) < size:
            example = arith_example(rng, steps, digits)
            if example.question not in seen:
                seen.add(example.question)
                out[name].append(example)
    return out[split]

HUB_TASKS = {"gsm8k": ("openai/gsm8k", "main"), "svamp": ("ChilleD/SVAMP", None),
             "math": ("DigitalLearningGmbH/MATH-lighteval", "default")}

def _record_to_example(record, where):
    """An Example from {question, rationale, answer}, GSM8K {question, answer: '...#### x'}, MATH {problem,
    solution}, SVAMP {Body, Question, Equation, Answer} or ReFT {question, answer_cot, answer_value}."""
    try:
        record = json.loads(record) if isinstance(record, str) else record
        if "problem" in record and "solution" in record:
            return Example(record["problem"], record["solution"], extract_answer(record["solution"]) or "")
        if "Body" in record:
            answer = f"{float(record['Answer']):g}"
            return Example(f"{record['Body'].strip()} {record['Question'].strip()}", f"{record['Equation'].strip()} = {answer}", answer)
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

def load_task(name_or_path, split="train"):
    """list[Example] from `arith`, a hub task (gsm8k, math, svamp), a .jsonl/.json file (used whatever the
    split), or a folder holding {split}.jsonl."""
    name, _, knobs = name_or_path.partition(":")
    if name == "arith":
        overrides = dict(knob.partition("=")[::2] for knob in knobs.split(",") if knob)
        if not set(overrides) <= set(ARITH) or not all(v.isdigit() for v in overrides.values()):
            fail(f"bad arith knobs {knobs!r}: write e.g. arith:steps=3,digits=1 with knobs from {sorted(ARITH)}")
        examples = arith_task(split, **(ARITH | {k: int(v) for k, v in overrides.items()}))
    elif name_or_path in HUB_TASKS:
        import datasets
        hub_id, config = HUB_TASKS[name_or_path]
        rows = datasets.load_dataset(hub_id, config, split=split)
        examples = [_record_to_example(row, f"{hub_id} row {i}") for i, row in enumerate(rows)]
    else:
        path = os.path.join(name_or_path, f"{split}.jsonl") if os.path.isdir(name_or_path) else name_or_path
        if not path.endswith((".jsonl", ".json")) or not os.path.isfile(path):
            fail(f"unknown task {name_or_path!r}: use arith, gsm8k, math, svamp, or an existing .jsonl/.json file")
        with open(path) as f:
            records = json.load(f) if path.endswith(".json") else f.readlines()
        if not isinstance(records, list):
            fail(f"{path}: expected a JSON list of records")
        examples = [_record_to_example(record, f"{path} line {i}") for i, record in enumerate(records, 1)
                    if not isinstance(record, str) or record.strip()]
    if not examples:
        fail(f"task {name_or_path!r} has no examples in split {split!r}")
    return examples

# ---------------------------------------------------------------- sampling and log-probs
@dataclasses.dataclass
class Completion:
    text: str  # decoded without special tokens, cut before a stop string
    token_ids: list  # generated tokens only, up to and including EOS when emitted
    finished: bool  # ended at EOS or a stop string (False: hit the length limit)

def positions_from_mask(attention_mask):
    """Per-row positions that skip left padding, as generate() and every training forward use."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)

def _next_tokens(logits, temperature, top_p):
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:  # nucleus: keep the smallest set of tokens whose mass reaches top_p
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        sorted_probs[sorted_probs.cumsum(-1) - sorted_probs > top_p] = 0
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1).squeeze(-1)

def _generate_batch(model, tokenizer, prompts, max_new_tokens, temperature, top_p, stop):
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left").to(model.device)
    input_ids, mask = enc["input_ids"], enc["attention_mask"]
    context = getattr(model.config, "max_position_embeddings", None) or math.inf
    if input_ids.shape[1] >= context:
        fail(f"a prompt has {input_ids.shape[1]} tokens but the model's context is {context}: shorten the prompts")
    max_new_tokens = int(min(max_new_tokens, context - input_ids.shape[1]))
    eos = model.generation_config.eos_token_id
    eos = torch.tensor([i for i in {tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])} if i is not None],
                       device=model.device)
    rows = len(prompts)
    generated, done, stopped = [[] for _ in range(rows)], [False] * rows, [False] * rows
    cache, positions, step_ids = DynamicCache(config=model.config), positions_from_mask(mask), input_ids
    for _ in range(max_new_tokens):
        logits = model(input_ids=step_ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                       use_cache=True, logits_to_keep=1).logits[:, -1].float()
        tokens = _next_tokens(logits, temperature, top_p)
        is_eos = torch.isin(tokens, eos).tolist()
        for row, token in enumerate(tokens.tolist()):
            if done[row]:
                continue
            generated[row].append(token)
            if is_eos[row]:
                done[row] = True
            elif stop:  # the newest few tokens hold any stop string that just completed
                tail = tokenizer.decode(generated[row][-max(map(len, stop)) - 4:])
                done[row] = stopped[row] = any(s in tail for s in stop)
        if all(done):
            break
        step_ids = torch.where(torch.tensor(done, device=model.device), tokenizer.pad_token_id, tokens)[:, None]
        mask = torch.cat([mask, mask.new_ones(rows, 1)], dim=1)
        positions = positions[:, -1:] + 1
    completions = []
    for row in range(rows):
        text = tokenizer.decode(generated[row], skip_special_tokens=True)
        if stopped[row]:
            text = text[:min(text.find(s) for s in stop if s in text)]
        completions.append(Completion(text, generated[row], done[row]))
    return completions

@torch.no_grad()
def generate(model, tokenizer, prompts, *, max_new_tokens, temperature=0.0, top_p=1.0, n=1, stop=None, batch_size=None):
    """Own decode loop with a KV cache; n completions per prompt, prompt-major. Greedy when temperature=0."""
    rows = [prompt for prompt in prompts for _ in range(n)]
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))  # batch similar lengths: less padding
    batch_size = batch_size or max(len(rows), 1)
    was_training, results = model.training, [None] * len(rows)
    model.eval()
    for start in tqdm(range(0, len(rows), batch_size), desc="generate", leave=False, disable=len(rows) <= batch_size):
        batch = order[start:start + batch_size]
        for i, completion in zip(batch, _generate_batch(model, tokenizer, [rows[i] for i in batch],
                                                        max_new_tokens, temperature, top_p, stop)):
            results[i] = completion
    model.train(was_training)
    return results

def _chunk_logprobs(head, hidden, targets, temperature):
    logits = head(hidden).float().div_(temperature)  # in place: one chunk-sized buffer less
    return logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)

def token_logprobs(model, input_ids, attention_mask, *, temperature=1.0, return_hidden=False, chunk_elements=2 ** 23):
    """log p(input_ids[:, t+1] | prefix) as [B, L-1]; 0 where the target or the token before it is padding.

    Positions come from the mask (left or right padding). Logits are made chunk by chunk from the last
    hidden state, each chunk recomputed in backward, so no float32 copy of all B*L*V logits ever exists
    (assumes logits = output_embeddings(hidden), true of the Llama, Mistral, GPT-2 and OPT families).
    return_hidden=True also returns the last hidden state [B, L, H], for a value head on the trunk."""
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                              position_ids=positions_from_mask(attention_mask), use_cache=False).last_hidden_state
    head = model.get_output_embeddings()
    flat_hidden, targets = hidden[:, :-1].reshape(-1, hidden.shape[-1]), input_ids[:, 1:].reshape(-1)
    step = max(1, chunk_elements // head.out_features)
    pieces = []
    for i in range(0, targets.numel(), step):
        args = (head, flat_hidden[i:i + step], targets[i:i + step], temperature)
        if torch.is_grad_enabled():
            pieces.append(torch.utils.checkpoint.checkpoint(_chunk_logprobs, *args, use_reentrant=False))
        else:
            pieces.append(_chunk_logprobs(*args))
    logprobs = torch.cat(pieces).view(input_ids.shape[0], -1) * attention_mask[:, 1:] * attention_mask[:, :-1]
    return (logprobs, hidden) if return_hidden else logprobs

def encode_pair(tokenizer, prompt, target):
    """(prompt_ids, target_ids): prompt with the tokenizer's defaults (its BOS), target + EOS.

    The target is cut from the joint tokenisation so its first token is the one the model sees
    after the prompt (sentencepiece would otherwise add a word-start marker)."""
    prompt_ids, joint = tokenizer(prompt)["input_ids"], tokenizer(prompt + target)["input_ids"]
    same_prefix = joint[:len(prompt_ids)] == prompt_ids
    target_ids = joint[len(prompt_ids):] if same_prefix else tokenizer(target, add_special_tokens=False)["input_ids"]
    return prompt_ids, target_ids + [tokenizer.eos_token_id]

def batch_sequences(prompts, responses, pad_id, device):
    """Right-padded prompt+response ids, the attention mask and the response mask, from lengths.

    response_mask[b, t] = 1 where input_ids[b, t+1] is a response token, so it lines up with
    token_logprobs(...)[b, t]. Never built from token values: pad may equal EOS (PAPERS 7.2)."""
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    width = max(lengths)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(len(prompts), width, dtype=torch.long)
    response_mask = torch.zeros(len(prompts), width - 1)
    for row, (prompt, response) in enumerate(zip(prompts, responses)):
        input_ids[row, :lengths[row]] = torch.tensor(list(prompt) + list(response))
        attention_mask[row, :lengths[row]] = 1
        response_mask[row, max(len(prompt) - 1, 0):lengths[row] - 1] = 1
    return input_ids.to(device), attention_mask.to(device), response_mask.to(device)

# ---------------------------------------------------------------- answers
_TRIGGER = re.compile(r"(?:####|answer is:?)[ \t]*([^\n]*)", re.IGNORECASE)

def _braced(text, start):
    """The content of the brace group opening at text[start], or None if it never closes."""
    depth = 0
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start + 1:i]
    return None

def extract_answer(text):
    """The final answer: `#### x`, `The answer is x`, `the answer is: x`, `\\boxed{x}` or
    `The final answer is $x$`, whichever comes last in the text; None when there is none."""
    if not text:
        return None
    found = []
    for match in _TRIGGER.finditer(text):
        answer = match.group(1).split("I hope it is correct")[0].strip()
        if answer.startswith("$") and answer.count("$") >= 2:
            answer = answer[1:answer.rindex("$")]
        found.append((match.start(), answer.strip().rstrip(".").strip()))
    for match in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        found.append((match.start(), (_braced(text, match.end() - 1) or "").strip()))
    found = [item for item in found if item[1]]
    return max(found)[1] if found else None

def normalize_answer(answer):
    """Hendrycks MATH normalisation, plus thousands separators and a trailing period."""
    s = str(answer).strip().replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac").replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "").replace("\\$", "").replace("$", "")
    s = re.sub(r"\\(?:text|mbox|mathrm)\{\s*[a-zA-Z ]*\}$", "", s).strip()  # trailing units
    s = s.replace("\\%", "").replace("%", "").replace(" .", " 0.").replace("{.", "{0.")
    s = ("0" + s if s.startswith(".") else s).rstrip(".")
    if len(s.split("=")) == 2 and len(s.split("=")[0].strip()) <= 2:
        s = s.split("=")[1]  # "k = 5" -> "5"
    s = re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s).replace(" ", "")
    s = re.sub(r"\\frac([^{\\])([^{\\])", r"\\frac{\1}{\2}", s)  # \frac12 -> \frac{1}{2}
    s = re.sub(r"\\frac([^{\\])\{", r"\\frac{\1}{", s)  # \frac1{2} -> \frac{1}{2}
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    return s

def _as_number(s):
    """An exact rational for an integer, decimal, a/b or \\frac{a}{b}; None for anything else."""
    number = r"-?\d+(?:\.\d+)?"
    match = re.fullmatch(rf"(-?)\\frac\{{({number})\}}\{{({number})\}}", s) or re.fullmatch(rf"()({number})/({number})", s)
    try:
        if match:
            value = Fraction(match.group(2)) / Fraction(match.group(3))
            return -value if match.group(1) else value
        return Fraction(s) if re.fullmatch(number, s) else None
    except ZeroDivisionError:
        return None

def is_equiv(pred, gold):
    """Numbers compared exactly as rationals (0.5 = 1/2 = \\frac12, 1,000 = 1000, 72.0 = 72),
    anything else as Hendrycks-normalised strings."""
    if pred is None or gold is None:
        return False
    a, b = normalize_answer(pred), normalize_answer(gold)
    x, y = _as_number(a), _as_number(b)
    if x is not None and y is not None:
        return x == y
    return bool(a) and a == b

def majority_answer(answers):
    """The most frequent answer (ties: the first seen), grouping equivalent spellings; None if none."""
    counts = Counter(normalize_answer(a) for a in answers if a is not None)
    return next((a for a in answers if a is not None and normalize_answer(a) == counts.most_common(1)[0][0]), None)

def evaluate(model, tokenizer, examples, prompt_fn, *, max_new_tokens=512, n=1, temperature=0.7,
             batch_size=64, stop=None):
    """Greedy accuracy; with n > 1 also maj@n over n samples at `temperature`. Returns metrics + records."""
    prompts = [prompt_fn(example) for example in examples]
    greedy = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, stop=stop)
    records = []
    for example, completion in zip(examples, greedy):
        pred = extract_answer(completion.text)
        records.append(dict(question=example.question, gold=example.answer, completion=completion.text,
                            pred=pred, correct=is_equiv(pred, example.answer)))
    metrics = {"accuracy": sum(r["correct"] for r in records) / len(records)}
    if n > 1:
        samples = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                           n=n, batch_size=batch_size, stop=stop)
        votes = [majority_answer([extract_answer(s.text) for s in samples[i * n:(i + 1) * n]]) for i in range(len(examples))]
        metrics[f"maj@{n}"] = sum(is_equiv(v, e.answer) for v, e in zip(votes, examples)) / len(examples)
    return metrics | {"records": records}

# ---------------------------------------------------------------- model-written programs
def run_sandboxed(code, *, timeout=10.0, memory_mb=1024):
    """(exited cleanly, stdout) of untrusted Python run in a separate isolated interpreter, in an empty
    folder with no environment, limited in wall time, CPU time, memory and file size."""
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

# ---------------------------------------------------------------- saving and logging
def save(model, tokenizer, out_dir, args=None):
    """save_pretrained (LoRA adapters merged into plain weights) + tokenizer + args.json."""
    os.makedirs(out_dir, exist_ok=True)
    state = model.state_dict()
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            for key in ("lora_A", "lora_B", "base.weight"):
                state.pop(f"{name}.{key}")
            state[f"{name}.weight"] = module.merged_weight()
            if module.base.bias is not None:
                state[f"{name}.bias"] = state.pop(f"{name}.base.bias")
    model.config.use_cache = True
    model.save_pretrained(out_dir, state_dict=state)
    tokenizer.save_pretrained(out_dir)
    if args is not None:
        with open(os.path.join(out_dir, "args.json"), "w") as f:
            json.dump(dataclasses.asdict(args), f, indent=2)

class Logger:
    """Metrics to stdout and out_dir/metrics.jsonl; samples to out_dir/samples.jsonl."""

    def __init__(self, out_dir):
        os.makedirs(out_dir, exist_ok=True)
        self.out_dir = out_dir

    def log(self, step, **metrics):
        print(f"[{step}] " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()), flush=True)
        with open(os.path.join(self.out_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")

    def samples(self, rows):
        with open(os.path.join(self.out_dir, "samples.jsonl"), "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
