import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TQDM_DISABLE", "1")

from common import byte_tokenizer, load_model  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    return byte_tokenizer()


@pytest.fixture(scope="session")
def llama():
    """The built-in tiny Llama (rotary positions), randomly initialised."""
    model, tokenizer = load_model("tiny", seed=0)
    return model.eval(), tokenizer


@pytest.fixture(scope="session")
def gpt2(tokenizer):
    """A small GPT-2 (learned absolute positions): wrong position ids change its outputs."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4, n_positions=256,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    return GPT2LMHeadModel(config).eval(), tokenizer
