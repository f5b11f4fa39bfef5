"""extract_answer() and is_equiv(): a golden table of endings, LaTeX, numbers and non-matches."""
import pytest

from common import extract_answer, is_equiv, majority_answer

EXTRACT = [
    ("Natalia sold 48/2 = 24 clips.\n#### 72", "72"),  # GSM8K gold
    ("so 5+7=12\n#### 1,000", "1,000"),
    ("48+24=72\nThe answer is 72", "72"),  # Self-Explore
    ("The answer is 72.", "72"),
    ("She pays $18.\nThe answer is $18.", "$18"),
    ("3*4=12\nTherefore, the answer is: 12", "12"),  # ReFT trigger
    ("Therefore, the answer is: -3.5", "-3.5"),
    ("the answer is 5\nwait, no.\nThe answer is 6", "6"),  # the last one wins
    ("#### 4\nThe answer is 5", "5"),
    ("We get $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
    ("So $\\boxed{\\frac{\\sqrt{3}}{2}}$ and done", "\\frac{\\sqrt{3}}{2}"),  # nested braces
    ("first \\boxed{1} then \\boxed{2}", "2"),
    ("\\fbox{7}", "7"),
    # SCoRe's and Minerva's answer line
    ("Final Answer: The final answer is $\\frac{3}{4}$. I hope it is correct.", "\\frac{3}{4}"),
    ("Final Answer: The final answer is 12. I hope it is correct.", "12"),
    ("Final Answer: The final answer is $\\boxed{5}$. I hope it is correct.", "5"),
    ("The answer is \\boxed{x^{2}+1}", "x^{2}+1"),
    ("no answer here, just 42", None),
    ("The answer is", None),  # a trigger with nothing after it
    ("\\boxed{unclosed", None),
    ("", None),
    (None, None),
]


@pytest.mark.parametrize("text, expected", EXTRACT)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


EQUIV = [  # (prediction, gold, equivalent?)
    ("72", "72", True),
    ("1,000", "1000", True),
    ("$18", "18", True),
    ("72.0", "72", True),
    ("72.00", "72", True),
    ("-3", "-3", True),
    ("-3.5", "-3.50", True),
    ("0.5", "\\frac{1}{2}", True),
    (".5", "0.5", True),
    ("\\frac12", "\\frac{1}{2}", True),
    ("\\dfrac{1}{2}", "\\frac{1}{2}", True),
    ("\\tfrac{3}{4}", "0.75", True),
    ("1/2", "\\frac{1}{2}", True),
    ("-\\frac{1}{2}", "-0.5", True),
    ("10\\%", "10", True),
    ("10%", "10", True),
    ("5\\text{ cm}", "5", True),
    ("90^\\circ", "90", True),
    ("\\left(1,2\\right)", "(1,2)", True),
    ("\\sqrt3", "\\sqrt{3}", True),
    ("x = 5", "5", True),
    ("\\frac{\\sqrt{3}}{2}", "\\frac{\\sqrt3}{2}", True),
    ("2\\sqrt{2}", "2 \\sqrt{2}", True),
    ("1,234,567", "1234567", True),
    ("72", "73", False),  # must NOT match
    ("1234567", "1234568", False),  # no relative tolerance on large integers
    ("0.333", "\\frac{1}{3}", False),
    ("-3", "3", False),
    ("(1,2)", "12", False),  # a tuple is not a thousands separator
    ("12", "1,2", False),
    ("\\frac{1}{2}", "\\frac{1}{3}", False),
    ("x^2", "x^3", False),
    ("", "", False),
    (None, "5", False),
    ("5", None, False),
    ("1/0", "1/0", True),  # same string, not a number
    ("1/0", "2/0", False),
]


@pytest.mark.parametrize("pred, gold, expected", EQUIV)
def test_is_equiv(pred, gold, expected):
    assert is_equiv(pred, gold) is expected


def test_extract_then_grade_round_trip():
    assert is_equiv(extract_answer("The answer is 1,000."), "1000")
    minerva = "Final Answer: The final answer is $\\dfrac{1}{2}$. I hope it is correct."
    assert is_equiv(extract_answer(minerva), "0.5")
    assert not is_equiv(extract_answer("no answer"), "0")


def test_majority_groups_equivalent_spellings():
    assert majority_answer(["1,000", "7", "1000", None, "7.0", "1000.0"]) == "1,000"
    assert majority_answer([None, None]) is None
