"""Kill and resume: a run stopped mid-stage, then resumed, ends with the numbers and weights of a
run never stopped; a stage or a state is reused only with the settings it was made with; saves are
atomic."""
import json
import os
import zlib
from collections import Counter

import pytest
import torch

import common
import guided_self_improve as gsi
import reft_ppo
import score
import sector
import self_explore
import sft
from common import load_model, load_task, save

TIMING = ("seconds", "tokens_per_s")  # wall-clock readings: the only numbers a resume may change


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    """A toy start: tiny after 8 SFT steps on arith (the RL scripts start from a trained model); it
    writes varied ASCII, so that the samples differ."""
    model, tokenizer = load_model("tiny", seed=0)
    pairs = [(sft.prompt_for("self_explore", e.question), sft.target_for("self_explore", e))
             for e in load_task("arith:n_train=8,n_test=4", "train")]
    recipe = sft.Args(template="self_explore", epochs=8, lr=3e-3, warmup_ratio=0.0, batch_size=8,
                      micro_batch_size=8, seed=0)
    sft.train(model, tokenizer, pairs, recipe)
    path = str(tmp_path_factory.mktemp("start") / "sft")
    save(model, tokenizer, path, recipe)
    return path


def judge(text, answer, kind="number"):
    """A grade for toy models that solve nothing: right for half the texts, as they come."""
    return zlib.crc32(text.encode()) % 2 == 0


def kill_on_call(monkeypatch, module, name, call):
    """module.name raises KeyboardInterrupt on its call-th call: a kill at that point of the run."""
    original = getattr(module, name)
    calls = Counter()

    def dying(*args, **kwargs):
        calls[name] += 1
        if calls[name] == call:
            raise KeyboardInterrupt
        return original(*args, **kwargs)
    monkeypatch.setattr(module, name, dying)


def count_calls(monkeypatch, module, name):
    original = getattr(module, name)
    calls = Counter()

    def counted(*args, **kwargs):
        calls[name] += 1
        return original(*args, **kwargs)
    monkeypatch.setattr(module, name, counted)
    return calls


def rows(out_dir, name="metrics.jsonl"):
    with open(os.path.join(out_dir, name)) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in f]


def assert_same_weights(path_a, path_b):
    a, b = (load_model(path)[0].state_dict() for path in (path_a, path_b))
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def test_reft_killed_mid_epoch_resumes_to_the_numbers_and_weights_of_an_unbroken_run(
        tmp_path, start, monkeypatch):
    flags = ["--preset", "toy", "--model", start, "--task", "arith:n_train=8,n_test=4",
             "--epochs", "2", "--rollout_batch_size", "4", "--micro_batch_size", "4",
             "--max_total_tokens", "32", "--eval_max_total_tokens", "32"]
    whole = str(tmp_path / "whole")
    killed = str(tmp_path / "killed")
    reft_ppo.main(flags + ["--out_dir", whole])
    kill_on_call(monkeypatch, reft_ppo, "rollout", 4)  # epoch 2, after its first rollout was logged
    with pytest.raises(KeyboardInterrupt):
        reft_ppo.main(flags + ["--out_dir", killed])
    monkeypatch.undo()
    with pytest.raises(SystemExit, match="add --resume"):  # a fresh run never joins a killed one
        reft_ppo.main(flags + ["--out_dir", killed])
    with pytest.raises(SystemExit, match="--lr 2e-05 .now 0.001."):  # nor one with another lr
        reft_ppo.main(flags + ["--out_dir", killed, "--resume", "--lr", "1e-3"])
    calls = count_calls(monkeypatch, reft_ppo, "rollout")
    reft_ppo.main(flags + ["--out_dir", killed, "--resume"])
    assert calls["rollout"] == 2  # epoch 2 only: epoch 1 comes from the state
    assert rows(killed) == rows(whole)
    assert rows(killed, "samples.jsonl") == rows(whole, "samples.jsonl")
    assert [row["step"] for row in rows(killed)].count("rollout 3") == 1
    assert_same_weights(whole, killed)


def test_a_save_killed_midway_never_leaves_a_folder_that_looks_finished(tmp_path, monkeypatch):
    model, tokenizer = load_model("tiny", seed=0)
    out_dir = str(tmp_path / "checkpoint")
    args = sft.Args()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt
    # while args.json (saved = finished) is written
    monkeypatch.setattr(common.json, "dump", killed)
    with pytest.raises(KeyboardInterrupt):
        save(model, tokenizer, out_dir, args)
    assert not os.path.exists(os.path.join(out_dir, "args.json"))
    monkeypatch.undo()
    save(model, tokenizer, out_dir, args)
    before = load_model(out_dir)[0].state_dict()
    with torch.no_grad():
        model.get_input_embeddings().weight.add_(1.0)
    monkeypatch.setattr(tokenizer, "save_pretrained", killed)  # after the new weights are written
    with pytest.raises(KeyboardInterrupt):
        save(model, tokenizer, out_dir, args)
    assert os.path.isfile(os.path.join(out_dir, "args.json"))  # the earlier checkpoint, unchanged
    after = load_model(out_dir)[0].state_dict()
    assert all(torch.equal(value, after[key]) for key, value in before.items())
    monkeypatch.undo()
    save(model, tokenizer, out_dir, args)
    assert os.listdir(tmp_path) == ["checkpoint"]  # no temporary folder left behind
    saved = load_model(out_dir)[0].get_input_embeddings().weight
    assert torch.equal(saved, model.get_input_embeddings().weight)


def test_score_killed_in_stage_two_resumes_to_the_numbers_and_weights_of_an_unbroken_run(
        tmp_path, start, monkeypatch):
    flags = ["--preset", "toy", "--model", start, "--task", "arith:n_train=8,n_test=4",
             "--batch_size", "4", "--samples_per_prompt", "2", "--max_new_tokens", "6",
             "--format_warmup_epochs", "0", "--stage1_steps", "3", "--stage2_steps", "2",
             "--save_every", "2"]
    whole = str(tmp_path / "whole")
    killed = str(tmp_path / "killed")
    score.main(flags + ["--out_dir", whole])
    kill_on_call(monkeypatch, score, "rollout", 4)  # stage 2, step 1; last state: stage 1, step 2
    with pytest.raises(KeyboardInterrupt):
        score.main(flags + ["--out_dir", killed])
    monkeypatch.undo()
    with pytest.raises(SystemExit, match="add --resume"):
        score.main(flags + ["--out_dir", killed])
    calls = count_calls(monkeypatch, score, "rollout")
    score.main(flags + ["--out_dir", killed, "--resume"])
    assert calls["rollout"] == 3  # stage 1's step 3 (its log and evaluation redone once), stage 2
    assert rows(killed) == rows(whole)
    assert rows(killed, "samples.jsonl") == rows(whole, "samples.jsonl")
    for stage in ("stage1", "stage2"):
        assert_same_weights(os.path.join(whole, stage), os.path.join(killed, stage))


def test_gsi_killed_in_an_iteration_resumes_to_the_numbers_and_weights_of_an_unbroken_run(
        tmp_path, start, monkeypatch):
    flags = ["--preset", "toy", "--model", "tiny", "--sft_model", start,
             "--task", "arith:n_train=8,n_test=4", "--iterations", "2", "--n_samples", "2",
             "--min_correct", "1", "--guided_rounds", "1", "--train_sequences", "8",
             "--max_new_tokens", "8"]
    whole = str(tmp_path / "whole")
    killed = str(tmp_path / "killed")
    monkeypatch.setattr(gsi, "is_correct", judge)
    gsi.main(flags + ["--out_dir", whole])
    with monkeypatch.context() as patch:
        kill_on_call(patch, gsi, "iteration_metrics", 2)  # iteration 1, its samples written
        with pytest.raises(KeyboardInterrupt):
            gsi.main(flags + ["--out_dir", killed])
    with pytest.raises(SystemExit, match="add --resume"):  # never a second run's rows in its files
        gsi.main(flags + ["--out_dir", killed])
    calls = count_calls(monkeypatch, gsi, "collect_samples")
    gsi.main(flags + ["--out_dir", killed, "--resume"])
    assert calls["collect_samples"] == 1  # iteration 1 only
    assert rows(killed) == rows(whole)
    for name in ("samples-0.jsonl", "samples-1.jsonl"):
        assert rows(killed, name) == rows(whole, name) and len(rows(killed, name)) == 8
    assert_same_weights(os.path.join(whole, "iter-1"), os.path.join(killed, "iter-1"))


def test_sector_killed_in_a_length_resumes_to_the_numbers_and_weights_of_an_unbroken_run(
        tmp_path, monkeypatch):
    flags = ["--preset", "toy", "--n0", "1", "--max_digits", "3", "--max_rounds", "1",
             "--sup_problems", "32", "--n_problems", "16", "--replay", "16", "--n_eval", "8",
             "--self_rounds", "1", "--collapse_below", "0"]
    whole = str(tmp_path / "whole")
    killed = str(tmp_path / "killed")
    sector.main(flags + ["--out_dir", whole])
    with monkeypatch.context() as patch:
        kill_on_call(patch, sector, "format_table", 3)  # length 3 logged, not yet saved
        with pytest.raises(KeyboardInterrupt):
            sector.main(flags + ["--out_dir", killed])
    with pytest.raises(SystemExit, match="add --resume"):
        sector.main(flags + ["--out_dir", killed])
    calls = count_calls(monkeypatch, sector, "label_problems")
    sector.main(flags + ["--out_dir", killed, "--resume"])
    assert calls["label_problems"] == 1  # length 3 only
    assert rows(killed) == rows(whole)
    assert_same_weights(whole, killed)


SELF_EXPLORE = ["--preset", "toy", "--model", "tiny", "--task", "arith:n_train=10,n_test=2",
                "--n_val", "2", "--n_samples", "4", "--explore_k", "1", "--rft_epochs", "1",
                "--dpo_epochs", "2", "--dpo_batch_size", "4", "--max_new_tokens", "8"]
STAGE_FILES = ("eval-sft.jsonl", "samples.jsonl", "rft.jsonl", "pairs.jsonl", "eval-rft.jsonl",
               "explore.jsonl", "gpairs.jsonl", "eval-dpo-gpair.jsonl")


@pytest.fixture
def self_explore_run(tmp_path, start, monkeypatch):
    """An unbroken Self-Explore run from the toy start, graded by `judge`."""
    monkeypatch.setattr(self_explore, "is_correct", judge)
    whole = str(tmp_path / "whole")
    self_explore.main(SELF_EXPLORE + ["--sft_model", start, "--out_dir", whole])
    return whole


def test_self_explore_killed_in_dpo_resumes_to_the_files_and_weights_of_an_unbroken_run(
        self_explore_run, tmp_path, start, monkeypatch):
    whole = self_explore_run
    killed = str(tmp_path / "killed")
    flags = SELF_EXPLORE + ["--sft_model", start, "--out_dir", killed]
    with monkeypatch.context() as patch:
        kill_on_call(patch, self_explore, "dpo_loss", 2)  # DPO's second step
        with pytest.raises(KeyboardInterrupt):
            self_explore.main(flags)
    evaluated = count_calls(monkeypatch, self_explore, "evaluate")
    sampled = count_calls(monkeypatch, self_explore, "sampler")
    self_explore.main(flags)
    assert evaluated["evaluate"] == 2 and not sampled  # the DPO model's evaluation only
    for name in STAGE_FILES:
        assert rows(killed, name) == rows(whole, name), name
    last = {row["step"]: row for row in rows(killed)}  # the resumed run's rows come last
    assert [last[step] for step in ("dpo 1", "dpo 2", "eval dpo-gpair")] == [
        row for row in rows(whole) if row["step"] in ("dpo 1", "dpo 2", "eval dpo-gpair")]
    for stage in ("rft", "dpo-gpair"):
        assert_same_weights(os.path.join(whole, stage), os.path.join(killed, stage))


def test_self_explore_reuses_a_stage_only_with_the_settings_it_was_made_with(
        self_explore_run, tmp_path, start, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("work started before the mismatch was found")
    monkeypatch.setattr(self_explore, "generate", refuse)
    monkeypatch.setattr(self_explore.sft, "train", refuse)
    other = str(tmp_path / "other-sft")
    save(*load_model("tiny", seed=1), other)
    flags = SELF_EXPLORE + ["--out_dir", self_explore_run]
    for changed, message in [
            (["--n_samples", "6"], r"samples.jsonl was made with --n_samples 4 \(now 6\)"),
            (["--rft_epochs", "2"], r"rft was made with --rft_epochs 1 \(now 2\)"),
            (["--dpo_lr", "1e-4"], r"dpo-gpair was made with --dpo_lr 1e-05 \(now 0.0001\)"),
            (["--sft_model", other], "eval-sft.jsonl was made with --sft_model .*delete it")]:
        with pytest.raises(SystemExit, match=message):
            self_explore.main(flags + ["--sft_model", start] + changed)
