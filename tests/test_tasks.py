"""load_task() on written files and the built-in arith task; parse_args(); clear errors on bad
input."""
import json
import re
import time
from dataclasses import dataclass

import pytest

import common
import guided_self_improve
import reft_ppo
import score
import self_explore
import sft
from common import Example, load_model, load_task, parse_args


def write_lines(path, records):
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def test_gsm8k_schema(tmp_path):
    rationale = "She sold 48/2 = <<48/2=24>>24 in May."
    record = {"question": "Natalia sold 48 clips...", "answer": rationale + "\n#### 1,072"}
    path = write_lines(tmp_path / "gsm.jsonl", [record])
    assert load_task(path) == [Example("Natalia sold 48 clips...", rationale, "1072")]


def test_question_rationale_answer_schema_and_json_list(tmp_path):
    records = [{"question": "1+1", "rationale": "1+1=2", "answer": 2},
               {"question": "2*3", "rationale": "2*3=6", "answer": "6"}]
    from_jsonl = load_task(write_lines(tmp_path / "data.jsonl", records))
    (tmp_path / "data.json").write_text(json.dumps(records))
    expected = [Example("1+1", "1+1=2", "2"), Example("2*3", "2*3=6", "6")]
    assert from_jsonl == load_task(str(tmp_path / "data.json")) == expected


def test_folder_with_split_files(tmp_path):
    write_lines(tmp_path / "train.jsonl", [{"question": "q1", "rationale": "r", "answer": "1"}])
    write_lines(tmp_path / "test.jsonl", [{"question": "q2", "rationale": "r", "answer": "2"}])
    assert load_task(str(tmp_path), "test")[0].question == "q2"


def test_math_and_svamp_records(tmp_path):
    path = write_lines(tmp_path / "mixed.jsonl", [
        {"problem": "Half of 1?", "solution": "It is $\\boxed{\\frac{1}{2}}$."},
        {"Body": "Tom has 3 apples.", "Question": "How many after 2 more?",
         "Equation": "( 3.0 + 2.0 )", "Answer": 5.0}])
    math_example, svamp_example = load_task(path)
    assert math_example.answer == "\\frac{1}{2}"
    question = "Tom has 3 apples. How many after 2 more?"
    assert svamp_example == Example(question, "( 3.0 + 2.0 ) = 5", "5")


@pytest.mark.parametrize("bad_line, problem", [
    ({"question": "q", "answer": "no final marker"}, "missing or bad field"),
    ({"rationale": "r", "answer": "1"}, "missing or bad field"),
    ("{not json", "not valid JSON"),
])
def test_malformed_line_names_the_file_and_line(tmp_path, bad_line, problem):
    good_line = {"question": "q", "rationale": "r", "answer": "1"}
    path = write_lines(tmp_path / "bad.jsonl", [good_line, bad_line])
    with pytest.raises(SystemExit, match=rf"bad\.jsonl line 2: {problem}"):
        load_task(path)


def test_empty_file_and_unknown_names_stop_clearly(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(SystemExit, match="has no examples"):
        load_task(str(tmp_path / "empty.jsonl"))
    with pytest.raises(SystemExit, match="unknown task 'gsm9k'"):
        load_task("gsm9k")
    with pytest.raises(SystemExit, match="bad knobs in 'arith:depth=3'.*steps"):
        load_task("arith:depth=3")


REFT_TRAIN = {"item_id": "gsm8k_0", "question": "q1",
              "answer_cot": "2 + 3 = 5\nTherefore, the answer is <5>.", "answer_value": "5.0"}
REFT_TEST = {"item_id": "gsm8k_0", "question": "q2", "answer_value": "18"}
GSI_TRAIN = {"item_id": "gsm8k_0", "question": "q3",
             "answer_cot": "50 + 9 = 59\n59 * 2 = 118\nThe answer is 118", "answer_value": "118"}
GSI_MATH = {"item_id": "math_1", "question": "q4", "answer_value": "40,320",
            "answer_cot": "So $8! = \\boxed{40,\\!320}$. The answer is 40,320"}
SELF_EXPLORE = {"query": "q5", "response": "Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 1,072"}


def test_official_reft_gsi_and_self_explore_files_train_and_test(tmp_path):
    """ReFT's data/*_nl.json and *_test_set.json, GSI's data/inference and data/test files (the same
    keys), Self-Explore's data/GSM8K_{train,test}.jsonl ({query, response})."""
    train = tmp_path / "train.json"
    train.write_text(json.dumps([REFT_TRAIN, GSI_TRAIN, GSI_MATH]))
    test = write_lines(tmp_path / "test_set.jsonl", [REFT_TEST])
    self_explore_file = write_lines(tmp_path / "GSM8K_train.jsonl", [SELF_EXPLORE])
    assert load_task(str(train)) == [
        Example("q1", "2 + 3 = 5\nTherefore, the answer is <5>.", "5.0"),  # ReFT's own line stays
        Example("q3", "50 + 9 = 59\n59 * 2 = 118", "118"),  # the template appends the answer line
        Example("q4", "So $8! = \\boxed{40,\\!320}$.", "40,320")]
    assert load_task(str(train), "test", test) == [Example("q2", "", "18")]
    expected = Example("q5", "Natalia sold 48/2 = <<48/2=24>>24 clips.", "1072")
    assert load_task(self_explore_file) == [expected]


def test_a_lone_file_is_one_split_and_the_test_split_comes_from_test_task(tmp_path):
    train = write_lines(tmp_path / "train.jsonl", [{"question": "q1", "answer": "#### 1"}])
    test = write_lines(tmp_path / "test.jsonl", [{"question": "q2", "answer": "#### 2"}])
    assert [e.question for e in load_task(train, "train", test)] == ["q1"]
    assert [e.question for e in load_task(train, "test", test)] == ["q2"]
    assert [e.question for e in load_task(str(tmp_path), "test")] == ["q2"]  # a folder
    assert load_task("arith:n_train=8,n_test=4", "test", test)[0].question == "q2"
    with pytest.raises(SystemExit, match=r"train\.jsonl is one split .*folder.*--test_task"):
        load_task(train, "test")


class ModelReached(Exception):
    pass


@pytest.mark.parametrize("script", [sft, reft_ppo, self_explore, guided_self_improve, score])
def test_every_script_takes_its_test_split_from_test_task(tmp_path, monkeypatch, script):
    train = write_lines(tmp_path / "train.jsonl", [{"question": "1+1", "answer": "#### 2"}])
    test = write_lines(tmp_path / "test.jsonl", [{"question": "2+2", "answer": "#### 4"}])
    out = ["--out_dir", str(tmp_path / "run"), "--model", "tiny"]
    if hasattr(script, "check_trained"):  # `tiny` stands in for a trained start here
        monkeypatch.setattr(script, "check_trained", lambda name, flag: None)
    with pytest.raises(SystemExit, match="is one split"):
        script.main(["--task", train] + out)

    def reached(*args, **kwargs):
        raise ModelReached
    monkeypatch.setattr(script, "load_model", reached)
    with pytest.raises(ModelReached):  # the data loaded: the model comes next
        script.main(["--task", train, "--test_task", test] + out)


BAD_TASK_FILES = [  # (file name, its bytes, what the sentence must say)
    ("latin1.jsonl", b'{"question": "caf\xe9", "answer": "#### 1"}\n', r"latin1\.jsonl is not UTF"),
    ("bad.json", b'[{"question": "q", "answer": "#### 1"},]', r"bad\.json is not valid JSON"),
    ("bad.jsonl", b'{"question": "q", "rationale": "r", "answer": "1"}\n\n{"question": "q",\n',
     r"bad\.jsonl line 3: not valid JSON"),
    ("mbpp.jsonl", b'{"text": "t", "code": "c", "test_list": []}\n{"text": "t", \n',
     r"mbpp\.jsonl line 2: not valid JSON"),
    (None, None, r"no such file '.*missing\.jsonl'"),
]


@pytest.mark.parametrize("name, content, message", BAD_TASK_FILES)
def test_a_bad_task_file_stops_with_one_sentence(tmp_path, name, content, message):
    path = tmp_path / (name or "missing.jsonl")
    if content is not None:
        path.write_bytes(content)

    def load(filename):
        if name and name.startswith("mbpp"):  # score.py reads MBPP/HumanEval records
            return score.code_rows(filename, "train")
        return common.load_task(filename)
    with pytest.raises(SystemExit, match=message) as stop:
        load(str(path))
    assert "\n" not in str(stop.value)


def test_an_unreachable_hub_stops_at_the_first_failed_request(tmp_path, monkeypatch):
    import datasets
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "ENDPOINT", "https://hub.invalid")  # never resolves (RFC 2606)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # nothing cached
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", constants.HF_HUB_OFFLINE)  # restored after
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", datasets.config.HF_HUB_OFFLINE)
    start = time.time()
    with pytest.raises(SystemExit, match="could not load 'gsm8k' .*out of reach"):
        load_task("gsm8k")
    assert time.time() - start < 10  # not half a minute of retries


def test_unknown_model_name_stops_before_any_download():
    with pytest.raises(SystemExit, match="unknown model 'llama-9000'.*deepseek-math-7b"):
        load_model("llama-9000")


def test_missing_checkpoint_folder_stops_at_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    start = time.time()
    message = "no checkpoint folder 'runs/no-such-run'.*sft.py --preset toy"
    with pytest.raises(SystemExit, match=message):
        load_model("runs/no-such-run")
    assert time.time() - start < 5  # no hub retries
    with pytest.raises(SystemExit, match="`python sft.py --preset toy_base` writes runs/toy-base"):
        load_model("runs/toy-base")  # the toy world's starts name the command that builds them


def test_arith_is_seeded_disjoint_and_correct():
    train = load_task("arith", "train")
    test = load_task("arith", "test")
    assert train == load_task("arith", "train")
    assert not {e.question for e in train} & {e.question for e in test}
    for example in train[:300] + test:
        # the expression means what the rationale computes
        assert eval(example.question) == int(example.answer)
        lines = example.rationale.split("\n")
        for line in lines:
            lhs, rhs = line.split("=")
            assert eval(lhs) == int(rhs)
        assert lines[-1].endswith("=" + example.answer)


def test_arith_knobs():
    examples = load_task("arith:steps=2,digits=3,n_train=50", "train")
    assert len(examples) == 50
    assert all(len(e.rationale.split("\n")) == 2 for e in examples)


def test_arith_validation_split_and_step_spread():
    name = "arith:min_steps=2,steps=5,n_train=300,n_val=50,n_test=60"
    splits = {split: load_task(name, split) for split in ("train", "val", "test")}
    assert [len(splits[s]) for s in ("train", "val", "test")] == [300, 50, 60]
    questions = [{e.question for e in examples} for examples in splits.values()]
    assert len(set.union(*questions)) == 410  # disjoint
    assert load_task(name + ",validate=1", "test") == splits["val"]  # choosing on validation
    assert load_task(name + ",validate=1", "train") == splits["train"]
    n_steps = {len(e.rationale.split("\n")) for e in splits["train"]}
    assert n_steps == {2, 3, 4, 5}
    # train_from: the next training questions, with the same validation and test questions
    later = load_task(name + ",n_train=100,train_from=200", "train")
    assert later == load_task(name, "train")[200:300]
    assert load_task(name + ",train_from=200", "test") == splits["test"]
    # the default task is the one the README's numbers were measured on
    assert load_task("arith", "test")[0] == Example("7-1+9-7", "7-1=6\n6+9=15\n15-7=8", "8")


def test_toy_corpus_is_seeded_right_and_holds_no_held_out_question(monkeypatch):
    # two-step held-out questions: dense enough that an unfiltered corpus meets a dozen of them
    monkeypatch.setattr(common, "ARITH", common.ARITH | dict(steps=2, n_train=100, n_val=100))
    monkeypatch.setattr(common, "TOY_TASK", "arith:n_train=100,n_val=100,n_test=100,seed=1")
    pieces = [e.rationale for e in load_task("toy_corpus:n_docs=3000", "train")]
    assert pieces == [e.rationale for e in load_task("toy_corpus:n_docs=3000", "train")]
    assert max(map(len, pieces)) <= 250
    text = "\n".join(pieces)
    toy_val = load_task(f"{common.TOY_TASK},validate=1", "test")
    toy_held_out = [e.question for e in load_task(common.TOY_TASK, "test") + toy_val]
    held_out = [e.question for split in ("val", "test")
                for e in common.arith_task(split, **common.ARITH)] + toy_held_out
    lines = text.split("\n")
    # what a line is about: the expression that opens it (Compute 6+4., 6+4=10, So 6+4=10.)
    heads = {re.sub(r"^(Compute|Work out|What is|Evaluate|So) ", "", line).rstrip(".?")
             for line in lines}
    assert not {head.split("=")[0] for head in heads} & set(held_out)
    # every written calculation is right, apart from the slips a document corrects at once
    for i, line in enumerate(lines):
        if "=" in line and not lines[min(i + 1, len(lines) - 1)].startswith("wait,"):
            sides = line.removeprefix("So ").rstrip(".").split("=")
            assert len({eval(side) for side in sides}) == 1, line
    assert "wait," in text and "multiply by" in text and "=10*" in text  # the other ways
    with pytest.raises(SystemExit, match="no examples in split 'test'"):
        load_task("toy_corpus:n_docs=10", "test")


def test_tiny_knobs_resize_the_model_and_bad_ones_stop_clearly():
    plain, _ = load_model("tiny")
    wide, _ = load_model("tiny:hidden_size=64,num_attention_heads=2,num_hidden_layers=2")
    config = wide.config
    assert (config.hidden_size, config.num_attention_heads, config.num_hidden_layers) == (64, 2, 2)
    # knobs left out keep tiny's values
    assert config.intermediate_size == plain.config.intermediate_size
    assert sum(p.numel() for p in wide.parameters()) < sum(p.numel() for p in plain.parameters())
    for bad in ("tiny:hidden=64", "tiny:hidden_size=wide"):
        with pytest.raises(SystemExit, match="bad knobs in .*hidden_size"):
            load_model(bad)


@dataclass
class Args:
    lr: float = 1e-5
    """peak learning rate"""
    name: str = "base"
    """a name"""
    steps: int = 3
    flag: bool = False


def test_parse_args_preset_then_explicit_flags():
    presets = {"toy": dict(lr=3e-3, name="toy", flag=True)}
    assert parse_args(Args, presets, []) == Args()
    assert parse_args(Args, presets, ["--preset", "toy"]) == Args(lr=3e-3, name="toy", flag=True)
    argv = ["--preset", "toy", "--lr", "0.5", "--no-flag", "--steps", "7"]
    assert parse_args(Args, presets, argv) == Args(lr=0.5, name="toy", steps=7, flag=False)


def test_parse_args_help_uses_field_docstrings(capsys):
    with pytest.raises(SystemExit):
        parse_args(Args, {}, ["--help"])
    assert "peak learning rate" in capsys.readouterr().out


def test_parse_args_rejects_bad_flags_and_presets():
    with pytest.raises(SystemExit):
        parse_args(Args, {"toy": {}}, ["--preset", "tyo"])
    with pytest.raises(SystemExit, match="unknown fields"):
        parse_args(Args, {"toy": {"epochs": 3}}, ["--preset", "toy"])
    with pytest.raises(SystemExit):
        parse_args(Args, {}, ["--steps", "three"])
