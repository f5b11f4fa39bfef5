"""tests/gpu_check.py at toy sizes on a CPU: every script's paper-scale path runs, and the fast
sampler's greedy tokens equal model.generate's (a static cache also runs on a CPU)."""
import json
import math

import pytest
import torch

import bench_gpu
import gpu_check

@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread: toy-sized matrix products gain nothing from two, and on a shared machine
    two threads that wait for each other run 10 to 60 times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SCRIPTS = ("sft", "reft_ppo", "self_explore", "guided_self_improve", "score")


@pytest.fixture(scope="module")
def paper(tmp_path_factory):
    """Each script's main() once, on a saved random model of the 7B's kind at toy size."""
    root = str(tmp_path_factory.mktemp("gpu_check"))
    return gpu_check.run_paper(True, [1], math.inf, root)


@pytest.mark.parametrize("script", SCRIPTS)
def test_each_scripts_paper_scale_path_runs_without_error(paper, script):
    row, = [row for row in paper["rows"] if row["script"] == script]
    assert row["ok"], row["error"]
    assert row["seconds"] > 0 and row["parameters"] > 0


def test_the_7b_row_is_a_line_through_two_layer_counts():
    rows = [dict(script="sft", layers=2, ok=True, peak_gib=10.0),
            dict(script="sft", layers=4, ok=True, peak_gib=11.0),
            dict(script="score", layers=2, ok=False, peak_gib=3.0)]
    line = gpu_check.extrapolate(rows, [2, 4])
    assert line == {"sft": dict(per_layer_gib=0.5, layers=30, peak_gib_extrapolated=24.0)}


def test_the_random_head_samples_printable_text():
    weight = torch.randn(600, 16)
    gpu_check.byte_head(weight, 16)
    text_ids = [10, *range(32, 127)]
    assert weight[text_ids].abs().sum(-1).min() > 0
    assert weight.abs().sum(-1).count_nonzero() == len(text_ids)


@pytest.fixture(scope="module")
def model():
    return bench_gpu.make_model(gpu_check.TINY_BENCH, "cpu").float()


def test_fast_sampler_greedy_equals_model_generate(model):
    check = gpu_check.check_parity(model, batch=4, new_tokens=16)
    assert check["equal"], check


@pytest.mark.parametrize("shift", [1, -1])
def test_the_parity_check_fails_when_the_cache_slot_is_off_by_one(model, monkeypatch, shift):
    def off_by_one(prompt_length, step):
        return prompt_length + step + shift
    monkeypatch.setattr(gpu_check, "decode_slot", off_by_one)
    assert not gpu_check.check_parity(model, batch=4, new_tokens=16)["equal"]


def test_one_shared_prefill_gives_n_copies_of_each_prompts_greedy_tokens(model):
    tokenizer = gpu_check.common.byte_tokenizer()
    enc = tokenizer(gpu_check.prompts_for(2), return_tensors="pt", padding=True,
                    padding_side="left")
    ids = dict(eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id)
    once = gpu_check.fast_generate(model, enc["input_ids"], enc["attention_mask"], 8, **ids)
    shared = gpu_check.fast_generate(model, enc["input_ids"], enc["attention_mask"], 8, n=3,
                                     **ids)
    assert torch.equal(shared, once.repeat_interleave(3, 0))


def test_the_summary_is_written_after_a_section(paper, tmp_path):
    summary = dict(device="cpu", torch=torch.__version__, transformers="x", paper=paper)
    gpu_check.write(summary, str(tmp_path))
    assert json.load(open(tmp_path / "summary.json"))["paper"]["task"] == paper["task"]
    assert "| 1 | score | True |" in (tmp_path / "summary.md").read_text()
