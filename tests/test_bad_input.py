"""Bad input on every script's command line: one clean sentence, within seconds, nothing written.

One table: each row runs a script's main(argv) with one bad argument on top of a valid toy command
and expects SystemExit with a message that names the problem. Every case must stop before any
expensive work (it is timed) and leave --out_dir as it was (it is never created).
"""
import json
import os
import re
import time

import pytest

import common
import guided_self_improve
import reft_ppo
import score
import sector
import self_explore
import sft
from test_style import INTERNAL

TASK = "arith:n_train=8,n_test=4"
SCRIPTS = {"sft": sft, "reft": reft_ppo, "explore": self_explore, "gsi": guided_self_improve,
           "score": score, "sector": sector}
# a valid toy command per script; {ckpt} is a saved model, {out} a folder that does not exist yet
BASE = {
    "sft": ["--preset", "toy", "--task", TASK, "--model", "tiny"],
    "reft": ["--preset", "toy", "--task", TASK, "--model", "{ckpt}"],
    "explore": ["--preset", "toy", "--task", TASK, "--n_val", "2", "--sft_model", "{ckpt}",
                "--model", "tiny"],
    "gsi": ["--preset", "toy", "--task", TASK, "--sft_model", "{ckpt}", "--model", "tiny"],
    "score": ["--preset", "toy", "--task", TASK, "--model", "{ckpt}"],
    "sector": ["--preset", "toy"],
}
OUT_DIR_IS_A_FILE = r"--out_dir '.*file\.txt' is a file, not a folder: pass a folder"
READ_ONLY = r"--out_dir '.*read-only.*' cannot be written .*: pass a folder you may write to"
LONG_QUESTION = r"test (question|problem) 2 takes \d+ tokens .* context is 512: shorten or drop it"
NO_HUB = r"no folder 'checkpoints/my-sft' in .*(out of reach|on the hub)"
UNTRAINED = r"tiny is an untrained model, but this needs a fine-tuned one: pass a checkpoint"
CASES = [  # (script, extra arguments, the message expected)
    *[(name, ["--out_dir", "{file}"], OUT_DIR_IS_A_FILE) for name in SCRIPTS],
    *[(name, ["--out_dir", "{read-only}/run"], READ_ONLY) for name in SCRIPTS],
    *[(name, ["--task", "{long}"], LONG_QUESTION)
      for name in ("sft", "reft", "explore", "gsi", "score")],
    ("sft", ["--max_length", "600"], r"--max_length 600 exceeds the model's context of 512 tokens"),
    ("explore", ["--max_length", "600"], r"--max_length 600 exceeds the model's context of 512"),
    ("gsi", ["--max_length", "600"], r"--max_length 600 exceeds the model's context of 512"),
    ("reft", ["--max_total_tokens", "600"], r"--max_total_tokens 600 exceeds the model's context"),
    ("sft", ["--epochs", "0"], r"--epochs is 0, but it must be above 0: pass a positive value"),
    ("sft", ["--epochs", "-1"], r"--epochs is -1, but it must be above 0"),
    ("reft", ["--epochs", "0"], r"--epochs is 0, but it must be above 0"),
    ("reft", ["--warmup_epochs", "-1"], r"--warmup_epochs is -1, but it cannot be negative"),
    ("explore", ["--sft_epochs", "0"], r"--sft_epochs is 0, but it must be above 0"),
    ("explore", ["--rft_epochs", "-2"], r"--rft_epochs is -2, but it must be above 0"),
    ("explore", ["--dpo_epochs", "0"], r"--dpo_epochs is 0, but it must be above 0"),
    ("gsi", ["--epochs", "0", "--train_sequences", "0"], r"--epochs is 0, but it must be above 0"),
    ("gsi", ["--epochs", "3"], r"--epochs 3 has no effect with --train_sequences 24000 .*toy"),
    ("score", ["--stage1_steps", "-1"], r"--stage1_steps is -1, but it cannot be negative"),
    ("score", ["--format_warmup_epochs", "-1"], r"--format_warmup_epochs is -1, but it cannot be"),
    ("sector", ["--max_rounds", "0"], r"--max_rounds is 0, but it must be above 0"),
    ("sector", ["--self_rounds", "0"], r"--self_rounds is 0, but it must be above 0"),
    ("sft", ["--lr", "0"], r"--lr is 0.0, but it must be above 0: pass a positive value"),
    ("sft", ["--lr=-1e-5"], r"--lr is -1e-05, but it must be above 0"),
    ("sft", ["--lr", "nan"], r"--lr is nan, but it must be above 0"),
    ("reft", ["--lr", "0"], r"--lr is 0.0, but it must be above 0"),
    ("reft", ["--warmup_lr", "-1"], r"--warmup_lr is -1.0, but it must be above 0"),
    ("explore", ["--sft_lr", "0"], r"--sft_lr is 0.0, but it must be above 0"),
    ("explore", ["--dpo_lr", "0"], r"--dpo_lr is 0.0, but it must be above 0"),
    ("gsi", ["--lr", "0"], r"--lr is 0.0, but it must be above 0"),
    ("score", ["--lr", "0"], r"--lr is 0.0, but it must be above 0"),
    ("score", ["--format_warmup_lr", "0"], r"--format_warmup_lr is 0.0, but it must be above 0"),
    ("sector", ["--lr", "0"], r"--lr is 0.0, but it must be above 0"),
    ("sft", ["--batch_size", "0"], r"--batch_size is 0, but it must be above 0"),
    ("sft", ["--micro_batch_size", "0"], r"--micro_batch_size is 0, but it must be above 0"),
    ("reft", ["--rollout_batch_size", "0"], r"--rollout_batch_size is 0, but it must be above 0"),
    ("explore", ["--sft_batch_size", "0"], r"--sft_batch_size is 0, but it must be above 0"),
    ("explore", ["--dpo_batch_size", "0"], r"--dpo_batch_size is 0, but it must be above 0"),
    ("gsi", ["--batch_size", "0"], r"--batch_size is 0, but it must be above 0"),
    ("score", ["--batch_size", "0"], r"--batch_size is 0, but it must be above 0"),
    ("score", ["--samples_per_prompt", "0"], r"--samples_per_prompt is 0, but it must be above 0"),
    ("sector", ["--batch_size", "0"], r"--batch_size is 0, but it must be above 0"),
    ("reft", ["--model", "tiny"], "--model " + UNTRAINED),
    ("score", ["--model", "tiny"], "--model " + UNTRAINED),
    ("explore", ["--sft_model", "tiny"], "--sft_model " + UNTRAINED),
    ("gsi", ["--sft_model", "tiny"], "--sft_model " + UNTRAINED),
    ("sft", ["--model", "checkpoints/my-sft"], NO_HUB),
    ("reft", ["--model", "checkpoints/my-sft"], NO_HUB),
    ("explore", ["--sft_model", "checkpoints/my-sft"], NO_HUB),
    ("gsi", ["--sft_model", "checkpoints/my-sft"], NO_HUB),
    ("score", ["--model", "checkpoints/my-sft"], NO_HUB),
    ("sector", ["--model", "checkpoints/my-sft"], NO_HUB),
    *[(name, ["--learning_rate", "1e-4"], r"argument '--learning_rate': did you mean --lr\?")
      for name in ("sft", "reft", "gsi", "score", "sector")],
    ("explore", ["--dpo_learning_rate", "1e-6"], r"'--dpo_learning_rate': did you mean --dpo_lr\?"),
    ("reft", ["--mode", "votes"], r"^error: unknown --mode 'votes': use train, vote or rerank$"),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A saved (untrained, but not `tiny`) checkpoint, a file, a read-only folder, and a task whose
    second test question is longer than tiny's 512 positions."""
    root = tmp_path_factory.mktemp("bad_input")
    model, tokenizer = common.load_model("tiny", seed=0)
    model.save_pretrained(root / "ckpt")
    tokenizer.save_pretrained(root / "ckpt")
    (root / "file.txt").write_text("keep me\n")
    (root / "read-only").mkdir()
    (root / "read-only").chmod(0o555)
    (root / "long").mkdir()
    rows = [dict(question=f"{i}+1", rationale=f"{i}+1={i + 1}", answer=str(i + 1))
            for i in range(4)]
    with open(root / "long" / "train.jsonl", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    rows[1] = dict(question="1" + "+1" * 300, rationale="", answer="301")
    with open(root / "long" / "test.jsonl", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return root


@pytest.mark.parametrize("script, extra, message", CASES,
                         ids=[f"{script}{' '.join(extra)}" for script, extra, _ in CASES])
def test_bad_argument_stops_at_once_with_one_sentence(files, tmp_path, monkeypatch, script, extra,
                                                      message):
    read_only = str(files / "read-only")
    real_access = os.access

    def access(path, mode):  # root may write anywhere: the read-only folder is read-only to all
        if os.path.abspath(path).startswith(read_only):
            return False
        return real_access(path, mode)

    monkeypatch.setattr(os, "access", access)
    places = {"{ckpt}": str(files / "ckpt"), "{file}": str(files / "file.txt"),
              "{read-only}": read_only, "{long}": str(files / "long")}
    argv = [*BASE[script], "--out_dir", str(tmp_path / "out"), *extra]
    for placeholder, path in places.items():
        argv = [arg.replace(placeholder, path) for arg in argv]
    start = time.perf_counter()
    with pytest.raises(SystemExit) as stop:
        SCRIPTS[script].main(argv)
    seconds = time.perf_counter() - start
    text = str(stop.value.code)
    assert text.startswith("error: ") and "\n" not in text
    assert re.search(message, text), text
    assert seconds < 5, f"{seconds:.1f} s before the message: it must come before any work"
    assert not os.path.exists(tmp_path / "out")  # nothing written
    assert not os.listdir(read_only)
    assert (files / "file.txt").read_text() == "keep me\n"


def test_help_opens_with_what_the_script_does_and_says_what_presets_need(capsys):
    for module in SCRIPTS.values():
        with pytest.raises(SystemExit):
            module.main(["--help"])
        text = capsys.readouterr().out
        description = text.split("\n\n")[1]
        assert not description.startswith("Args(")
        assert description.split()[0] in ("Fine-tune", "Train", "Run")
        assert "common." not in text and "docstring" not in text
        assert not any(name in text for name in INTERNAL)  # notes a clone does not have
        assert "examples:\n  python" in text
    with pytest.raises(SystemExit):
        reft_ppo.main(["--help"])
    preset_help = " ".join(capsys.readouterr().out.split())
    assert "toy: needs runs/toy-sft (`python sft.py --preset toy` writes it)" in preset_help
    with pytest.raises(SystemExit):
        guided_self_improve.main(["--help"])
    preset_help = " ".join(capsys.readouterr().out.split())
    assert "needs runs/toy-base (`python sft.py --preset toy_base` writes it)" in preset_help
