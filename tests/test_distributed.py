"""torchrun on CPU: 2 processes (gloo) give the losses of 1 process on the same data, and only rank 0 writes.

The same file is the driver: `python tests/test_distributed.py DIR` runs sft.py and one PPO iteration of
reft_ppo.py with DDP, then both again with FSDP2, each rank in its own folder DIR/rank-R, so that a file any
rank but 0 writes shows up there. PPO rollouts come from a scripted sampler that depends on the prompt only,
so that both runs train on the same data (sampling itself draws from a different stream on each rank); the
rollout batch is split between the ranks, so a whitening or a loss normalisation that is not global shows.
"""
import functools
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASK = "arith:n_train=8,n_test=4"


def scripted_generate(answers, model, tokenizer, prompts, *, n=1, **kwargs):
    """A stand-in for common.generate: the right answer for about half of the questions, off by one otherwise."""
    from common import Completion
    completions = []
    for prompt in prompts:
        text = f"The answer is {int(answers[prompt.strip()]) + sum(map(ord, prompt)) % 2}"
        token_ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        completions += [Completion(text, token_ids, True)] * n
    return completions


def driver(folder):
    sys.path.insert(0, ROOT)
    import common
    import reft_ppo
    import sft
    os.makedirs(f"{folder}/rank-{os.environ.get('RANK', 0)}")
    os.chdir(f"{folder}/rank-{os.environ.get('RANK', 0)}")
    start = os.path.abspath("../rank-0/sft")  # what rank 0 saved: every rank loads it
    sft.main(["--preset", "toy", "--task", TASK, "--epochs", "2", "--batch_size", "4", "--micro_batch_size", "1",
              "--out_dir", "sft", "--eval_max_new_tokens", "4"])
    answers = {ex.question: ex.answer for split in ("train", "test") for ex in common.load_task(TASK, split)}
    reft_ppo.generate = functools.partial(scripted_generate, answers)
    reft_ppo.main(["--preset", "toy", "--model", start, "--task", TASK, "--out_dir", "reft", "--epochs", "1",
                   "--rollout_batch_size", "8", "--micro_batch_size", "2", "--lr", "1e-3"])
    sft.wrap_model = reft_ppo.wrap_model = functools.partial(common.wrap_model, fsdp=True)  # as past 1B parameters
    sft.main(["--preset", "toy", "--task", TASK, "--epochs", "1", "--batch_size", "8", "--micro_batch_size", "2",
              "--out_dir", "sft-fsdp", "--eval_max_new_tokens", "4"])
    reft_ppo.main(["--preset", "toy", "--model", start, "--task", TASK, "--out_dir", "reft-fsdp", "--epochs", "1",
                   "--rollout_batch_size", "8", "--micro_batch_size", "2", "--lr", "1e-3"])


def launch(folder, processes):
    """The driver in `processes` processes: plain python for one, torchrun (a free port) for more."""
    command = [sys.executable, __file__, folder]
    if processes > 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        command[1:1] = ["-m", "torch.distributed.run", f"--nproc_per_node={processes}", f"--master_port={port}"]
    return subprocess.Popen(command, env=dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("distributed"))
    processes = {name: launch(f"{folder}/{name}", count) for name, count in (("one", 1), ("two", 2))}  # concurrently
    metrics = {}
    for name, process in processes.items():
        output = process.communicate(timeout=300)[0]
        assert process.returncode == 0, output[-5000:]
        metrics[name] = {stage: [json.loads(line) for line in open(f"{folder}/{name}/rank-0/{stage}/metrics.jsonl")]
                         for stage in ("sft", "reft", "sft-fsdp", "reft-fsdp")}
    return metrics["one"], metrics["two"], folder


def weights(path):
    from common import load_model
    return load_model(path)[0].state_dict()


def rollout_1(metrics):
    return next(m for m in metrics if m["step"] == "rollout 1")


def test_two_processes_match_one_on_sft_and_ppo(runs):
    one, two, folder = runs
    assert [m["loss"] for m in two["sft"]] == pytest.approx([m["loss"] for m in one["sft"]], rel=1e-5)
    for key in ("reward", "accuracy", "policy_loss", "value_loss", "clip_fraction", "kl_k1"):
        assert rollout_1(two["reft"])[key] == pytest.approx(rollout_1(one["reft"])[key], rel=1e-4, abs=1e-6), key
    for name in ("sft", "reft"):
        a, b = weights(f"{folder}/one/rank-0/{name}"), weights(f"{folder}/two/rank-0/{name}")
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5)


def test_fsdp2_trains_with_the_losses_of_one_process(runs):
    one, two, folder = runs
    # bf16 compute under FSDP2 against fp32 on one process
    assert two["sft-fsdp"][0]["loss"] == pytest.approx(one["sft-fsdp"][0]["loss"], rel=2e-2)
    for key in ("policy_loss", "value_loss"):
        assert rollout_1(two["reft-fsdp"])[key] == pytest.approx(rollout_1(one["reft-fsdp"])[key], rel=5e-2), key
    assert weights(f"{folder}/two/rank-0/sft-fsdp")["model.embed_tokens.weight"].dtype == torch.float32  # fp32 master


def test_only_rank_0_writes(runs):
    one, two, folder = runs
    assert os.listdir(f"{folder}/two/rank-1") == []
    assert sorted(os.listdir(f"{folder}/two/rank-0")) == ["reft", "reft-fsdp", "sft", "sft-fsdp"]
    steps = [m["step"] for m in two["reft"]]
    assert steps == [m["step"] for m in one["reft"]] and len(steps) == len(set(steps))  # logged once


if __name__ == "__main__":
    driver(sys.argv[1])
