"""sft.py: label masks, the schedule, and the toy preset end to end (loss falls, checkpoint
reloads)."""
import dataclasses
import json
import os

import torch

import sft
from common import load_model, load_task, token_logprobs


def test_prompt_is_unlabelled_and_eos_is_a_target(tokenizer):
    pairs = [("12+3\n", "12+3=15")]
    (prompt_ids, target_ids), = sft.tokenize_pairs(tokenizer, pairs, loss_on_prompt=False,
                                                   max_length=64)
    assert tokenizer.decode(prompt_ids) == "<s>12+3\n"
    assert tokenizer.decode(target_ids) == "12+3=15</s>"


def test_loss_on_prompt_labels_the_question_too(tokenizer):
    pairs = [("12+3\n", "12+3=15")]
    (prompt_ids, target_ids), = sft.tokenize_pairs(tokenizer, pairs, loss_on_prompt=True,
                                                   max_length=64)
    assert prompt_ids == [] and tokenizer.decode(target_ids) == "<s>12+3\n12+3=15</s>"


def test_max_length_cuts_the_whole_sequence(tokenizer):
    (prompt_ids, target_ids), = sft.tokenize_pairs(tokenizer, [("abcd", "efghij")],
                                                   loss_on_prompt=False, max_length=7)
    assert len(prompt_ids) + len(target_ids) == 7 and tokenizer.decode(target_ids) == "ef"


def test_templates_render_the_papers_strings():
    example = load_task("arith", "test")[0]
    assert sft.prompt_for("reft", "2+2") == "Question:\n2+2\nAnswer reasoning:\n"
    assert sft.target_for("reft", example).endswith(f"\nTherefore, the answer is: {example.answer}")
    assert sft.prompt_for("self_explore", " 2+2 ") == "2+2\n"
    gsi_end = "### Question:\n2+2\n\n### Your step-by-step answer:\n"
    assert sft.prompt_for("gsi", "2+2").endswith(gsi_end)


def small_args(tmp_path, **overrides):
    settings = dict(out_dir=str(tmp_path / "run"), epochs=3, batch_size=16, micro_batch_size=8)
    settings |= overrides
    return dataclasses.replace(sft.Args(**sft.TOY), **settings)


def test_train_lowers_the_loss_and_the_checkpoint_reloads(tmp_path):
    model, tokenizer = load_model("tiny", seed=0)
    examples = load_task("arith:n_train=64,n_test=4", "train")
    pairs = [(sft.prompt_for("self_explore", e.question), sft.target_for("self_explore", e))
             for e in examples]
    args = small_args(tmp_path)
    history = sft.train(model, tokenizer, pairs, args)
    assert history[-1]["loss"] < 0.8 * history[0]["loss"]
    assert history[-1]["lr"] == 0.0  # linear decay ends at zero
    sft.save(model, tokenizer, args.out_dir, args)
    reloaded, reloaded_tokenizer = load_model(args.out_dir)
    ids = torch.tensor([tokenizer("(12+34)*5\n")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model.eval()(ids).logits)
    assert reloaded_tokenizer("12+3")["input_ids"] == tokenizer("12+3")["input_ids"]
    assert json.load(open(os.path.join(args.out_dir, "args.json")))["lr"] == args.lr


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    pairs = [("1+1\n", "1+1=2\nThe answer is 2"), ("2*3\n", "2*3=6\nThe answer is 6"),
             ("9-4\n", "9-4=5\nThe answer is 5")]
    weights = []
    for micro in (3, 1):
        model, tokenizer = load_model("tiny", seed=0)
        args = small_args(tmp_path, epochs=1, batch_size=3, micro_batch_size=micro,
                          warmup_ratio=0.0)
        sft.train(model, tokenizer, pairs, args)
        weights.append(model.model.embed_tokens.weight.detach().clone())
    torch.testing.assert_close(weights[0], weights[1], atol=1e-5, rtol=1e-4)


def test_toy_cli_end_to_end(tmp_path):
    out_dir = str(tmp_path / "cli")
    sft.main(["--preset", "toy", "--model", "tiny", "--task", "arith:n_train=96,n_test=8",
              "--epochs", "2", "--batch_size", "16", "--out_dir", out_dir,
              "--eval_max_new_tokens", "16"])
    metrics = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert metrics[1]["loss"] < metrics[0]["loss"]
    assert 0.0 <= metrics[1]["test_accuracy"] <= 1.0
    samples = [json.loads(line) for line in open(os.path.join(out_dir, "samples.jsonl"))]
    assert {"question", "gold", "completion", "pred", "correct"} <= set(samples[0])
    assert load_model(out_dir)[0].config.model_type == "llama"


def test_toy_base_preset_pretrains_on_the_corpus_without_a_test_split(tmp_path):
    out_dir = str(tmp_path / "base")
    sft.main(["--preset", "toy_base", "--task", "toy_corpus:n_docs=400", "--out_dir", out_dir])
    metrics = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
    assert [set(m) for m in metrics] == [{"step", "epoch", "loss", "lr"}]  # nothing evaluated
    model, tokenizer = load_model(out_dir)
    # one pass over the corpus already makes its facts likelier than under the untrained model
    fresh, _ = load_model("tiny")
    ids = tokenizer(["3+4=7\n6*2=12\n9-5=4"], return_tensors="pt")
    trained = token_logprobs(model, ids["input_ids"], ids["attention_mask"]).sum()
    untrained = token_logprobs(fresh, ids["input_ids"], ids["attention_mask"]).sum()
    assert trained > untrained + 10


def test_bad_template_stops_before_training(tmp_path):
    import pytest
    with pytest.raises(SystemExit, match="unknown template"):
        sft.main(["--preset", "toy", "--template", "cot", "--out_dir", str(tmp_path)])
