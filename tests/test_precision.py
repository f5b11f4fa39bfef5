"""fp32 master weights: a model loaded the way a GPU run loads it (dtype=bf16) trains every weight
even at ReFT's lr of 3e-7, its forwards run in bf16 autocast, and a full fine-tune too big for the
GPU stops before loading."""
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoConfig

import reft_ppo
import self_explore
import sft
from common import TINY, Logger, check_memory, generate, load_model, load_task, token_logprobs

LR = 3e-7  # ReFT's PPO lr: in bf16 weights AdamW changes about 0.5% of them


def trainable(model):
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def changed_share(before, *modules):
    """The share of the weights in `before` that differ now."""
    now = {name: p.detach() for module in modules for name, p in module.named_parameters()}
    changed = sum((now[name] != old).sum().item() for name, old in before.items())
    return changed / sum(old.numel() for old in before.values())


def test_weights_that_train_are_fp32_and_frozen_ones_stay_in_the_compute_dtype():
    full = load_model("tiny", dtype=torch.bfloat16, seed=0)[0]
    assert {p.dtype for p in full.parameters()} == {torch.float32}
    lora = load_model("tiny", dtype=torch.bfloat16, seed=0, lora_rank=4)[0]
    assert {p.dtype for p in lora.parameters() if p.requires_grad} == {torch.float32}
    assert {p.dtype for p in lora.parameters() if not p.requires_grad} == {torch.bfloat16}
    frozen = load_model("tiny", dtype=torch.bfloat16, seed=0, frozen=True)[0]
    assert {p.dtype for p in frozen.parameters()} == {torch.bfloat16}


def test_forwards_run_in_bf16_autocast_over_fp32_weights():
    """On CUDA the compute dtype is bf16; asking for it on CPU runs the same autocast code."""
    model, tokenizer = load_model("tiny", dtype=torch.bfloat16, seed=0)
    seen = []
    layer = model.model.layers[0].mlp.down_proj
    layer.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    ids = torch.tensor([tokenizer("(1+2)*3\n1+2=3")["input_ids"]])
    logprobs = token_logprobs(model, ids, torch.ones_like(ids))
    generate(model, tokenizer, ["1+2\n"], max_new_tokens=2)
    assert seen and set(seen) == {torch.bfloat16} and logprobs.dtype == torch.float32
    fp32 = token_logprobs(load_model("tiny", seed=0)[0], ids, torch.ones_like(ids))
    torch.testing.assert_close(logprobs, fp32, atol=0.05, rtol=0.0)  # the same model, rounded


def test_sft_step_at_3e_7_changes_every_weight(tmp_path):
    model, tokenizer = load_model("tiny", dtype=torch.bfloat16, seed=0)
    before = trainable(model)
    pairs = [(f"{a}+{a}\n", f"{a}+{a}={2 * a}\nThe answer is {2 * a}") for a in range(1, 5)]
    args = sft.Args(epochs=1, lr=LR, warmup_ratio=0.0, batch_size=4, micro_batch_size=4,
                    out_dir=str(tmp_path))  # one optimiser step at the full lr
    sft.train(model, tokenizer, pairs, args)
    assert changed_share(before, model) >= 0.99


def test_dpo_step_at_3e_7_changes_every_weight(tmp_path):
    model, tokenizer = load_model("tiny", dtype=torch.bfloat16, seed=0)
    before = trainable(model)
    args = self_explore.Args(dpo_lr=LR, dpo_epochs=1, dpo_batch_size=1, micro_batch_size=1, seed=0)
    pairs = [dict(prompt=f"{a}+{a}\n", chosen=f"{2 * a}", rejected=f"{2 * a + 1}\n")
             for a in (1, 2)]
    data = [self_explore.tokenize_dpo_pair(tokenizer, pair, args) for pair in pairs]
    self_explore.train_dpo(model, tokenizer, data, args, Logger(str(tmp_path)))  # 2 steps: lr 0, lr
    assert changed_share(before, model) >= 0.99


def test_ppo_step_at_3e_7_changes_every_weight_and_the_value_head(monkeypatch):
    model, tokenizer = load_model("tiny", dtype=torch.bfloat16, seed=0)
    args = reft_ppo.Args(**(reft_ppo.TOY | dict(lr=LR, ppo_epochs=1, max_total_tokens=16)))
    monkeypatch.setattr(reft_ppo, "answer_of", lambda args, prompt, text: float(len(text) % 2))
    monkeypatch.setattr(reft_ppo, "terminal_reward", lambda pred, gold, partial: pred)  # 0 or 1
    value_head = torch.nn.Linear(model.config.hidden_size, 1)
    torch.nn.init.zeros_(value_head.weight)
    torch.nn.init.zeros_(value_head.bias)
    before = trainable(model) | {f"value.{k}": v for k, v in trainable(value_head).items()}
    parameters = [p for p in model.parameters() if p.requires_grad] + list(value_head.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=args.lr, eps=1e-8, weight_decay=0.0)  # as main()
    torch.manual_seed(0)

    def reference(ids, mask):
        return token_logprobs(model, ids, mask)
    batch, _, _ = reft_ppo.rollout(model, value_head, reference, tokenizer,
                                   load_task("arith:n_train=8,n_test=4", "train"), args)
    reft_ppo.ppo_update(model, value_head, optimizer, batch, args)
    value = torch.nn.ModuleDict({"value": value_head})
    assert changed_share(before, model, value) >= 0.99


def test_a_full_fine_tune_that_cannot_fit_the_gpu_stops_before_loading(monkeypatch):
    """16 bytes a parameter (fp32 weights, gradients, AdamW m and v), 2 more for a reference."""
    config = AutoConfig.for_model("llama", **TINY)
    n = sum(p.numel() for p in load_model("tiny", seed=0)[0].parameters())
    gpu = SimpleNamespace(total_memory=17 * n)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: gpu)
    check_memory(config, torch.device("cuda"), 16)  # fits
    check_memory(config, torch.device("cpu"), 18)  # never on CPU
    with pytest.raises(SystemExit, match="--lora_rank.*torchrun"):
        check_memory(config, torch.device("cuda"), 18)
    gpu.total_memory = 2 ** 20
    with pytest.raises(SystemExit, match="full fine-tuning of 0.0B parameters needs 0 GiB"):
        load_model("tiny", device="cuda")  # stops before any weight reaches the (absent) GPU
