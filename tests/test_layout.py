"""The repository reads as a course: short lines, short functions in the recipe files, imports that run one
way, a README a newcomer finishes, and nothing that points outside the repository."""
import ast
import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tracked(*patterns):
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", *patterns], cwd=ROOT,
                         capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip("not a git checkout")
    return [p for p in out.stdout.split() if os.path.isfile(os.path.join(ROOT, p))]


def read(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


def test_no_line_of_code_is_over_120_characters():
    long = [f"{p}:{i}" for p in tracked("*.py", "*.cu", "*.cpp") for i, line in enumerate(read(p).splitlines(), 1)
            if len(line) > 120]
    assert not long, long


def test_nothing_points_outside_the_repository():
    pattern = re.compile(r"\.\./shared|REFERENCE\.md")
    found = [p for p in tracked("*.py", "*.md", "*.cu", "*.cpp", "*.txt", "*.ini") if pattern.search(read(p))]
    assert not found, found


@pytest.mark.parametrize("path", ["train.py", "eval.py", "parallel.py"])
def test_no_function_in_the_recipe_files_is_over_80_lines(path):
    tree = ast.parse(read(path))
    long = [f"{n.name}: {n.end_lineno - n.lineno + 1} lines" for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 80]
    assert not long, long


def imports_of(path):
    names = set()
    for node in ast.walk(ast.parse(read(path))):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("path, never", [
    ("vision.py", {"model", "data", "train", "eval", "parallel"}),  # it builds CuMo's MoE blocks from moe.py
    ("moe.py", {"model", "vision", "data", "train", "eval", "parallel"}),
    ("model.py", {"data", "train", "eval", "parallel"}),
    ("data.py", {"model", "moe", "vision", "train", "eval", "parallel"}),
    ("parallel.py", {"train", "eval", "data", "model"}),
    ("eval.py", {"train"}),
    ("weights.py", {"train", "eval", "parallel"}),
])
def test_imports_run_one_way(path, never):
    assert not imports_of(path) & never


def test_the_readme_is_short_and_runs_the_ci_test_command():
    readme = read("README.md")
    assert len(readme.splitlines()) <= 250
    ci_lines = [line.strip() for line in read(".ci/run").splitlines()]
    ci_command = next(line for line in ci_lines if line.startswith("python -m pytest"))
    assert ci_command in readme


def test_every_relative_link_in_the_docs_exists():
    missing = []
    for doc in tracked("*.md"):
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", read(doc)):
            if "://" not in target and not os.path.exists(os.path.join(ROOT, os.path.dirname(doc), target)):
                missing.append(f"{doc} -> {target}")
    assert not missing, missing
