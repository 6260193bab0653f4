"""ablate.py: the sweep shares what variants share, skips what is done, resumes, and writes its tables."""
import os
import re
import shlex
from dataclasses import replace

import pytest

import ablate as A
from test_train import FAST, SMALLER

TWO = {"balance": A.Ablation("Does balancing matter?", "A paper says it does.",
                             {"aux 0.01": A.DEFAULT, "no balancing": A.Variant(("--moe.aux_loss_coef=0",))}),
       "where": A.Ablation("Where?", "Elsewhere.",
                           {"sparse": A.DEFAULT, "cumo": A.Variant(("--recipe=cumo",), ("--recipe=cumo",))})}


def test_the_plan_runs_each_shared_stage_once_and_in_order(tmp_path):
    steps = A.plan(TWO.values(), [1, 2], str(tmp_path), [], [])
    done_files = [s.done_file for s in steps]
    assert len(done_files) == len(set(done_files))
    # per seed: stages 0 and I, two stage IIs (default, cumo), three stage IIIs (the default is shared), 3 evals
    assert len(steps) == 2 * (2 + 2 + 3 + 3)
    for seed in (1, 2):
        mine = [s for s in steps if f"seed{seed}" in s.done_file]
        assert sum("stage3/eval/metrics.json" in s.done_file for s in mine) == 3
    for i, step in enumerate(steps):  # every link points at a stage that an earlier step trains
        for target in step.links.values():
            assert any(s.done_file == os.path.join(target, "meta.json") for s in steps[:i]), (step.what, target)
    cumo = [s for s in steps if "--recipe=cumo" in s.command and "--stage" in s.command]
    assert [s.command[s.command.index("--stage") + 1] for s in cumo] == ["2", "3", "2", "3"]


def test_spread_is_mean_and_standard_deviation():
    assert A.spread([50.0]) == "50.0"
    assert A.spread([50.0, 52.0, 54.0]) == "52.0 ± 2.0"
    assert A.spread([float("nan")]) == "-"


def test_unknown_ablation_is_one_sentence(capsys):
    with pytest.raises(SystemExit, match="no ablation called 'nope'"):
        A.main(["nope"], TWO)
    A.main(["--list"], TWO)
    assert "Does balancing matter?" in capsys.readouterr().out


def test_a_sweep_writes_its_table_and_continues_where_it_stopped(tmp_path, capsys):
    at_eval = A.Extra("at_eval", lambda ckpt, seed: A.capacity_at_evaluation(ckpt, seed, (1.0,), n=6, batch_size=4),
                      A.capacity_report)
    one = {"balance": replace(TWO["balance"], extra=at_eval)}
    train_args = [f"--data_dir={tmp_path / 'data'}", "--max_iters=2", *FAST, *SMALLER]
    args = ["balance", "--seeds=3", f"--work={tmp_path / 'work'}", f"--docs={tmp_path / 'docs'}",
            f"--train_args={shlex.join(train_args)}", "--eval_args=--limit=4 --batch_size=8 --pope_per_image=1"]
    A.main(args, one)
    report = (tmp_path / "docs" / "balance.md").read_text()
    assert "Does balancing matter?" in report and "A paper says it does." in report
    rows = [line for line in report.splitlines() if line.startswith("| aux 0.01") or line.startswith("| no bal")]
    assert len(rows) == 2 and all(len(r.split("|")) == len(rows[0].split("|")) for r in rows)
    assert (tmp_path / "docs" / "balance_load.png").stat().st_size > 0
    at_eval_rows = {line.split(" | ")[0]: line.split(" | ")[1:] for line in report.splitlines()
                    if line.startswith("| dropless") or line.startswith("| capacity factor")}
    assert set(at_eval_rows) == {"| dropless (eval.py)", "| capacity factor 1"}
    assert at_eval_rows["| dropless (eval.py)"][3:] == ["0.0", "0.0 |"]  # dropless: no answer depends on its batch
    capsys.readouterr()
    A.main([*args, "--dry_run=true"], one)
    assert capsys.readouterr().out.strip() == ""  # nothing left to run

    # stopped during an evaluation (before its record was written): only that evaluation runs again
    variant = one["balance"].variants["no balancing"]
    metrics = os.path.join(A.variant_folder(str(tmp_path / "work"), 3, variant), "stage3", "eval", "metrics.json")
    os.remove(metrics)
    os.remove(A.record_path(str(tmp_path / "docs" / "runs"), 3, variant))
    A.main([*args, "--dry_run=true"], one)
    todo = capsys.readouterr().out.strip().splitlines()
    assert len(todo) == 1 and "eval.py" in todo[0]
    A.main(args, one)
    assert os.path.exists(metrics)
    assert (tmp_path / "docs" / "balance.md").read_text().split("**Measured**")[1].split("runs logged")[0] == \
        report.split("**Measured**")[1].split("runs logged")[0]

    # the work folder gone (another day, another machine): the records still make the table, and a new seed
    # runs only its own stages
    os.rename(tmp_path / "work", tmp_path / "old_work")
    A.main(args, one)
    table = (tmp_path / "docs" / "balance.md").read_text().split("![")[0]
    minutes = re.compile(r"runs logged \d+ min")  # the evaluation run again adds its time (a minute on a busy CPU)
    assert minutes.sub("", table) == minutes.sub("", report.split("![")[0])
    assert not os.path.exists(tmp_path / "work" / "seed3")
    capsys.readouterr()
    A.main([*args, "--seeds=3,4", "--dry_run=true"], one)
    todo = capsys.readouterr().out.strip().splitlines()
    assert todo and all("seed4" in line for line in todo)
    # records are tied to the options they were made with
    A.main([*args[:-1], "--eval_args=--limit=5 --batch_size=8 --pope_per_image=1", "--dry_run=true"], one)
    assert any("seed3" in line for line in capsys.readouterr().out.splitlines())
