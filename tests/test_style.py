"""The project's rules, checked on every tracked file; a failure lists each "file:line: what".

- every line of Python at most 100 columns; the scripts within their line budgets;
- no reference to notes that are not in the repository;
- no method script imports another (sft.py, the SFT stage they start from, is shared);
- no named lambda, no comprehension of more than two `for`s, no chained `a if x else b if y else c`.
"""
import ast
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("sft", "reft_ppo", "self_explore", "guided_self_improve", "score", "sector")
BUDGETS = {"common.py": 650, "sft.py": 300, **{f"{name}.py": 650 for name in METHODS[1:]}}
INTERNAL = ("PAPERS", "DESIGN.md", "STYLE.md", "../shared")  # notes a clone does not have


def tracked_files():
    """Paths relative to ROOT: `git ls-files` in a checkout, else every file under ROOT."""
    if shutil.which("git") and os.path.exists(f"{ROOT}/.git"):
        command = ["git", "-C", ROOT, "ls-files"]
        listing = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        return [path for path in listing.splitlines() if os.path.isfile(f"{ROOT}/{path}")]
    paths = []
    for folder, subfolders, files in os.walk(ROOT):
        subfolders[:] = [name for name in subfolders if not name.startswith((".", "__"))]
        paths += [os.path.relpath(os.path.join(folder, name), ROOT) for name in files]
    return paths


def read(path):
    with open(os.path.join(ROOT, path), encoding="utf-8", errors="replace") as f:
        return f.read()


def wide_lines(path):
    lines = enumerate(read(path).splitlines(), 1)
    return [f"{path}:{i}: {len(line)} columns" for i, line in lines if len(line) > 100]


def over_budget(path, budget):
    count = read(path).count("\n")  # as `wc -l` counts
    return [f"{path}:{count}: {count} lines, budget {budget}"] if count > budget else []


def internal_references(path):
    lines = enumerate(read(path).splitlines(), 1)
    found = [(i, name) for i, line in lines for name in INTERNAL if name in line]
    return [f"{path}:{i}: cites {name}, which is not in the repository" for i, name in found]


def method_imports(path):
    found = []
    for node in ast.walk(ast.parse(read(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        if isinstance(node, ast.ImportFrom):
            found.append((node.lineno, node.module))
    return [f"{path}:{i}: imports {name}" for i, name in found if name in METHODS[1:]]


def dense_code(path):
    found = []
    for node in ast.walk(ast.parse(read(path))):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Lambda):
            found.append(f"{path}:{node.lineno}: a named lambda (write a def)")
        comprehensions = (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)
        if isinstance(node, comprehensions) and len(node.generators) > 2:
            found.append(f"{path}:{node.lineno}: a comprehension of more than two fors")
        if isinstance(node, ast.IfExp) and ast.IfExp in (type(node.body), type(node.orelse)):
            found.append(f"{path}:{node.lineno}: a chained conditional expression")
    return found


def report(problems):
    assert not problems, "\n" + "\n".join(problems)


def test_lines_fit_in_100_columns():
    python = [path for path in tracked_files() if path.endswith(".py")]
    report([problem for path in python for problem in wide_lines(path)])


# common.py holds 929 lines after the 100-column pass; cutting it to 650 is open work. A strict
# xfail: it turns into a failure once the budget holds, so that the mark goes then.
OVER_BUDGET = pytest.mark.xfail(strict=True, reason="common.py is over its 650-line budget")


def budget_case(path):
    if path == "common.py":
        return pytest.param(path, marks=OVER_BUDGET)
    return path


@pytest.mark.parametrize("path", [budget_case(path) for path in BUDGETS])
def test_line_budgets(path):
    report(over_budget(path, BUDGETS[path]))


def test_no_reference_to_notes_outside_the_repository():
    others = [path for path in tracked_files() if path != "tests/test_style.py"]  # it names them
    report([problem for path in others for problem in internal_references(path)])


def test_method_scripts_do_not_import_each_other():
    report([problem for name in METHODS for problem in method_imports(f"{name}.py")])


def test_scripts_read_one_idea_at_a_time():
    scripts = [f"{name}.py" for name in METHODS] + ["common.py"]
    report([problem for path in scripts for problem in dense_code(path)])
