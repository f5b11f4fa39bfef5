"""One GPU: the minimal LoRA of common.py (a no-op at start, only adapters train, merge on save,
adapters off = base) and gradient checkpointing that also works in eval()."""
import torch

from common import (LoRALinear, adapters_disabled, gradient_checkpointing, load_model, save,
                    token_logprobs)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_lora_starts_as_the_base_trains_only_adapters_and_merges_on_save(tmp_path):
    base, tokenizer = load_model("tiny", seed=0)
    model, _ = load_model("tiny", seed=0, lora_rank=4)
    ids = torch.tensor([tokenizer("(1+2)*3\n1+2=3")["input_ids"]])
    # B = 0: the adapter adds nothing
    torch.testing.assert_close(logits(model, ids), logits(base, ids))
    assert any(isinstance(m, LoRALinear) for m in model.modules())
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)

    frozen = [(name, p) for name, p in model.named_parameters() if not p.requires_grad]
    frozen_before = {name: p.detach().clone() for name, p in frozen}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(torch.equal(p, frozen_before[name]) for name, p in frozen)
    adapted = logits(model, ids)
    assert not torch.allclose(adapted, logits(base, ids))

    with adapters_disabled(model):
        torch.testing.assert_close(logits(model, ids), logits(base, ids))  # the reference policy
    torch.testing.assert_close(logits(model, ids), adapted)  # adapters back on afterwards

    save(model, tokenizer, str(tmp_path / "merged"))
    merged, _ = load_model(str(tmp_path / "merged"))
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    torch.testing.assert_close(logits(merged, ids), adapted, atol=1e-5, rtol=1e-4)


def test_gradient_checkpointing_recomputes_in_eval_mode_with_the_same_gradients():
    """RL and DPO train in eval() (dropout off): checkpointing must work there, reach the LoRA
    adapters behind frozen embeddings (reentrant checkpointing leaves them no gradient: transformers
    PR #43203), and leave no-grad forwards (sampling) alone."""
    model, tokenizer = load_model("tiny", seed=0, lora_rank=4)
    model.eval()
    mlp = model.model.layers[0].mlp
    torch.nn.init.normal_(mlp.up_proj.lora_B)  # B = 0 would give A no gradient
    ids = torch.tensor([tokenizer("(1+2)*3\n1+2=3")["input_ids"]] * 2)
    calls = []  # whether grad was on, at each call of the first layer's MLP
    grads = []
    forward = mlp.forward

    def counted_forward(*args):
        calls.append(torch.is_grad_enabled())
        return forward(*args)
    mlp.forward = counted_forward
    for enable in (False, True):
        gradient_checkpointing(model, enable)
        calls.clear()
        token_logprobs(model, ids, torch.ones_like(ids)).sum().backward()
        assert len(calls) == 1 + enable  # the layer runs again in backward
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
        model.zero_grad()
    for plain, recomputed in zip(*grads):
        torch.testing.assert_close(recomputed, plain)
    assert any(g.abs().sum() > 0 for g in grads[1][:2])  # lora_A and lora_B of the first adapter
    calls.clear()
    with torch.no_grad():
        token_logprobs(model, ids, torch.ones_like(ids))
    assert calls == [False]  # no checkpoint without grad
    gradient_checkpointing(model, False)
    assert not any("forward" in vars(layer) for layer in model.model.layers)
