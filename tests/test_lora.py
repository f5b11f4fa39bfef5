"""The minimal LoRA of common.py: a no-op at start, only adapters train, merge on save, adapters off = base."""
import torch

from common import LoRALinear, adapters_disabled, load_model, save


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_lora_starts_as_the_base_trains_only_adapters_and_merges_on_save(tmp_path):
    base, tokenizer = load_model("tiny", seed=0)
    model, _ = load_model("tiny", seed=0, lora_rank=4)
    ids = torch.tensor([tokenizer("(1+2)*3\n1+2=3")["input_ids"]])
    torch.testing.assert_close(logits(model, ids), logits(base, ids))  # B = 0: the adapter adds nothing
    assert any(isinstance(m, LoRALinear) for m in model.modules())
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)

    frozen_before = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(torch.equal(p, frozen_before[name]) for name, p in model.named_parameters() if not p.requires_grad)
    adapted = logits(model, ids)
    assert not torch.allclose(adapted, logits(base, ids))

    with adapters_disabled(model):
        torch.testing.assert_close(logits(model, ids), logits(base, ids))  # the reference policy
    torch.testing.assert_close(logits(model, ids), adapted)  # adapters back on afterwards

    save(model, tokenizer, str(tmp_path / "merged"))
    merged, _ = load_model(str(tmp_path / "merged"))
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    torch.testing.assert_close(logits(merged, ids), adapted, atol=1e-5, rtol=1e-4)
