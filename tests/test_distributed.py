"""torchrun on CPU: 2 processes (gloo) give the losses of 1 process on the same data; only rank 0
writes.

The same file is the driver: `python tests/test_distributed.py DIR` runs sft.py, one PPO iteration
of reft_ppo.py, two short GSI iterations, a short SCoRe run and a short SECToR run with DDP, then
SFT, PPO and SCoRe again with FSDP2, each rank in its own folder DIR/rank-R, so that a file any rank
but 0 writes shows up there. Samples come from a scripted sampler that depends on the prompt only,
so that both runs train on the same data (sampling itself draws from a different stream on each
rank); every batch is split between the ranks, so a whitening, a loss normalisation or a decision
that is not global shows.
"""
import functools
import json
import os
import socket
import subprocess
import sys
import zlib
from collections import Counter

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASK = "arith:n_train=8,n_test=4"
STAGES = ("sft", "reft", "gsi", "score", "sector", "sft-fsdp", "reft-fsdp", "score-fsdp")
SAMPLED = Counter()  # prompts each script's sampler got on this rank


def scripted_generate(answers, script, model, tokenizer, prompts, *, n=1, **kwargs):
    """A stand-in for common.generate: the answer to the question on the prompt's last line, right
    or off by one as a hash of the prompt and of the sample's index among this call's samples of
    that prompt (a group never spans ranks)."""
    from common import Completion
    completions = []
    seen = Counter()
    SAMPLED[script] += len(prompts)
    for prompt in (prompt for prompt in prompts for _ in range(n)):
        seen[prompt] += 1
        wrong = zlib.crc32(f"{seen[prompt]} {prompt}".encode()) % 2
        # a line of working first: ReFT's official grader reads the answer after "\n" + its trigger
        question = prompt.strip().splitlines()[-1]
        text = f"1+1=2\nThe answer is {int(answers[question]) + wrong}"
        token_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        token_ids += [tokenizer.eos_token_id]
        completions.append(Completion(text, token_ids, True))
    return completions


def sector_oracle(model, tokenizer, prompts, **kwargs):
    """A stand-in for common.generate in sector.py: the true fast or slow answer of `a+b+c=` or
    `a+b+c>`."""
    import sector
    from common import Completion
    SAMPLED["sector"] += len(prompts)
    completions = []
    for prompt in prompts:
        target = sector.fast_target if prompt.endswith(sector.FAST) else sector.slow_target
        operands = (int(x[::-1]) for x in prompt[:-1].split("+"))
        completions.append(Completion(target(*operands), [], True))
    return completions


def sharding(fake):
    """A stand-in made to honour generate's sharded=True as common.generate does: decode this rank's
    share, gather."""
    def generate(model, tokenizer, prompts, *, sharded=False, n=1, **kwargs):
        from common import gather, shard
        mine = fake(model, tokenizer, shard(prompts) if sharded else prompts, n=n, **kwargs)
        return gather(mine, len(prompts), n) if sharded else mine
    return generate


def driver(folder):
    sys.path.insert(0, ROOT)
    import common
    import guided_self_improve
    import reft_ppo
    import score
    import sector
    import sft
    os.makedirs(f"{folder}/rank-{os.environ.get('RANK', 0)}")
    os.chdir(f"{folder}/rank-{os.environ.get('RANK', 0)}")
    start = os.path.abspath("../rank-0/sft")  # what rank 0 saved: every rank loads it
    sft.main(["--preset", "toy", "--model", "tiny", "--task", TASK, "--epochs", "2",
              "--batch_size", "4", "--micro_batch_size", "1", "--out_dir", "sft",
              "--eval_max_new_tokens", "4"])
    examples = common.load_task(TASK, "train") + common.load_task(TASK, "test")
    answers = {ex.question: ex.answer for ex in examples}
    for script in (reft_ppo, guided_self_improve, score):
        script.generate = sharding(functools.partial(scripted_generate, answers, script.__name__))
    reft_ppo.main(["--preset", "toy", "--model", start, "--task", TASK, "--out_dir", "reft",
                   "--epochs", "1", "--rollout_batch_size", "8", "--micro_batch_size", "2",
                   "--lr", "1e-3"])
    guided_self_improve.main(["--preset", "toy", "--model", "tiny", "--sft_model", "",
                              "--task", TASK, "--out_dir", "gsi", "--iterations", "2",
                              "--strategy", "brute_force", "--brute_force_rounds", "2",
                              "--n_samples", "3", "--min_correct", "2", "--n_questions", "7",
                              "--train_sequences", "8", "--batch_size", "4",
                              "--micro_batch_size", "2", "--max_new_tokens", "4"])
    score_run = ["--preset", "toy", "--model", start, "--task", TASK, "--batch_size", "16",
                 "--micro_batch_size", "4", "--format_warmup_questions", "4", "--stage1_steps", "1",
                 "--stage2_steps", "1", "--lr", "1e-3"]
    # every rank reloads the references rank 0 saves: a shared out_dir
    shared = os.path.abspath("../rank-0/score")
    score.main(score_run + ["--out_dir", shared, "--format_warmup_epochs", "1"])
    sector.generate = sharding(sector_oracle)
    sector.main(["--preset", "toy", "--n0", "1", "--max_digits", "2", "--max_rounds", "1",
                 "--sup_problems", "32", "--n_problems", "9", "--replay", "8", "--n_eval", "5",
                 "--batch_size", "8", "--micro_batch_size", "2", "--agreement", "1.01",
                 "--self_rounds", "1", "--out_dir", "sector"])  # a self-training fine-tune too
    fsdp = functools.partial(common.wrap_model, fsdp=True)  # as past 1B parameters
    sft.wrap_model = fsdp
    reft_ppo.wrap_model = fsdp
    score.wrap_model = fsdp
    sft.main(["--preset", "toy", "--model", "tiny", "--task", TASK, "--epochs", "1",
              "--batch_size", "8", "--micro_batch_size", "2", "--out_dir", "sft-fsdp",
              "--eval_max_new_tokens", "4"])
    reft_ppo.main(["--preset", "toy", "--model", start, "--task", TASK, "--out_dir", "reft-fsdp",
                   "--epochs", "1", "--rollout_batch_size", "8", "--micro_batch_size", "2",
                   "--lr", "1e-3"])
    score.main(score_run + ["--out_dir", "score-fsdp", "--format_warmup_epochs", "0",
                            "--stage1_steps", "0"])
    sampled = common.gather([dict(SAMPLED)], common.WORLD)  # every rank's counts
    if common.RANK == 0:
        with open("sampled.json", "w") as f:
            json.dump(sampled, f)


def launch(folder, processes):
    """The driver in `processes` processes: plain python for one, torchrun (free port) for more."""
    command = [sys.executable, __file__, folder]
    if processes > 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        command[1:1] = ["-m", "torch.distributed.run", f"--nproc_per_node={processes}",
                        f"--master_port={port}"]
    environment = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    return subprocess.Popen(command, env=environment,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("distributed"))
    counts = (("one", 1), ("two", 2))
    processes = {name: launch(f"{folder}/{name}", count) for name, count in counts}  # concurrently
    metrics = {}
    for name, process in processes.items():
        output = process.communicate(timeout=300)[0]
        assert process.returncode == 0, output[-5000:]
        metrics[name] = {}
        for stage in STAGES:
            lines = open(f"{folder}/{name}/rank-0/{stage}/metrics.jsonl")
            metrics[name][stage] = [json.loads(line) for line in lines]
    return metrics["one"], metrics["two"], folder


def weights(path):
    from common import load_model
    return load_model(path)[0].state_dict()


def rollout_1(metrics):
    return next(m for m in metrics if m["step"] == "rollout 1")


def test_two_processes_match_one_on_sft_and_ppo(runs):
    one, two, folder = runs
    losses_one = [m["loss"] for m in one["sft"]]
    assert [m["loss"] for m in two["sft"]] == pytest.approx(losses_one, rel=1e-5)
    for key in ("reward", "accuracy", "policy_loss", "value_loss", "clip_fraction", "kl_k1"):
        expected = pytest.approx(rollout_1(one["reft"])[key], rel=1e-4, abs=1e-6)
        assert rollout_1(two["reft"])[key] == expected, key
    for name, lr, steps in (("sft", 3e-3, 4), ("reft", 1e-3, 2)):  # each run's lr, optimiser steps
        same_weights(f"{folder}/one/rank-0/{name}", f"{folder}/two/rank-0/{name}", lr, steps)


def same_weights(path_one, path_two, lr, steps):
    """The weights of 2 processes against 1, within what float32 rounding allows AdamW.

    The 2 ranks' gradients are all-reduced and averaged; 1 process sums the same terms in another
    order, so the gradients agree to about 1e-7 relative. AdamW divides each gradient by the root of
    its running square, so a weight whose gradient sums to about 0 can take any step up to about lr,
    either way, in each run: such a weight may differ by up to 2 * lr per step. Every other weight
    follows its gradient's rounding error: well within 1e-5. Hence: at most 0.1% of the weights
    differ by more than 1e-5, and none by more than 2 * lr * steps.
    """
    a = weights(path_one)
    b = weights(path_two)
    far = 0
    total = 0
    for key in a:
        gap = (b[key].float() - a[key].float()).abs()
        assert gap.max().item() <= 2 * lr * steps, key
        far += (gap > 1e-5).sum().item()
        total += gap.numel()
    assert far <= 1e-3 * total, (far, total)


def same(two, one, rel, skip=("seconds",)):
    """Metrics of 2 processes against 1: the same steps, every number within rel."""
    assert [m["step"] for m in two] == [m["step"] for m in one]
    for a, b in zip(two, one):
        assert set(a) == set(b), b["step"]
        for key in set(b) - set(skip):
            if isinstance(b[key], (int, float)) and not isinstance(b[key], bool):
                assert a[key] == pytest.approx(b[key], rel=rel, abs=1e-6), (b["step"], key)
            else:  # a step name, a histogram, a flag: equal as they are
                assert a[key] == b[key], (b["step"], key)


def test_two_processes_match_one_on_gsi_score_and_sector(runs):
    one, two, folder = runs
    # curriculum losses, S&G labels kept, per-length accuracy
    same(two["sector"], one["sector"], rel=1e-5)
    # SFT losses, test accuracy, samples, hard questions, D_t, histograms
    same(two["gsi"], one["gsi"], rel=1e-5)
    # something to train on in iteration 1
    assert [m["data"] for m in one["gsi"] if "data" in m] != [0, 0]
    # rewards, KL, losses and gradient norms of Stage I and II; Acc@t1/t2
    same(two["score"], one["score"], rel=1e-4)
    step = next(m for m in one["score"] if m["step"] == "stage2 1")
    # the reference: the base model
    assert step["grad_norm"] > 0 and 0 < step["reward2"] < 1 and step["kl1"] != 0
    # sector: fine-tunes at lr 1e-3, the last self-taught
    for name, atol in (("gsi/iter-1", 1e-5), ("sector", 1e-4)):
        a = weights(f"{folder}/one/rank-0/{name}")
        b = weights(f"{folder}/two/rank-0/{name}")
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=atol)


def test_each_rank_samples_its_share(runs):
    one, two, folder = runs
    (alone,) = json.load(open(f"{folder}/one/rank-0/sampled.json"))
    ranks = json.load(open(f"{folder}/two/rank-0/sampled.json"))
    for script, count in alone.items():  # about half each (shard's wrapping around adds a few)
        assert all(0 < rank[script] <= 0.6 * count for rank in ranks), script


def test_fsdp2_trains_with_the_losses_of_one_process(runs):
    one, two, folder = runs
    # bf16 compute under FSDP2 against fp32 on one process (for SCoRe: a KL of bf16 noise against
    # the fp32 reference)
    assert two["sft-fsdp"][0]["loss"] == pytest.approx(one["sft-fsdp"][0]["loss"], rel=2e-2)
    for key in ("policy_loss", "value_loss"):
        expected = pytest.approx(rollout_1(one["reft-fsdp"])[key], rel=5e-2)
        assert rollout_1(two["reft-fsdp"])[key] == expected, key
    embeddings = weights(f"{folder}/two/rank-0/sft-fsdp")["model.embed_tokens.weight"]
    assert embeddings.dtype == torch.float32  # fp32 master weights
    noisy = ("seconds", "loss", "kl1", "kl1_k3", "kl2", "kl2_k3")
    same(two["score-fsdp"], one["score-fsdp"], rel=5e-2, skip=noisy)


def test_only_rank_0_writes(runs):
    one, two, folder = runs
    assert os.listdir(f"{folder}/two/rank-1") == []
    assert sorted(os.listdir(f"{folder}/two/rank-0")) == sorted(STAGES + ("sampled.json",))
    steps = [m["step"] for m in two["reft"]]
    assert steps == [m["step"] for m in one["reft"]]
    assert len(steps) == len(set(steps))  # logged once
    for stage, files in [("gsi", ["iter-0", "iter-1", "samples-0.jsonl", "samples-1.jsonl"]),
                         ("score", ["base", "stage1", "stage2", "samples.jsonl"])]:
        assert set(files) <= set(os.listdir(f"{folder}/two/rank-0/{stage}")), stage
    samples = open(f"{folder}/two/rank-0/gsi/samples-0.jsonl").readlines()
    assert len(samples) == 7  # one row per question, once


if __name__ == "__main__":
    driver(sys.argv[1])
