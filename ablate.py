"""
ablate.py -- the papers' ablations in miniature: re-run them on the CPU, with error bars over seeds.

    python ablate.py --list                      # the ablations and the question each answers
    python ablate.py balancing                   # one ablation: every variant on 3 seeds, a table and a plot
    python ablate.py all                         # every ablation (hours on a CPU: see docs/ablate/README.md)
    python ablate.py balancing --seeds=1337      # one seed: a first look, no error bars
    python ablate.py balancing --dry_run=true    # print the commands still to run, run nothing

Each variant is a stage-III (or stage-II and stage-III) change to the tiny pipeline. The runs are ordinary
train.py and eval.py commands, each in its own folder under --work, and they share what they can: per seed one
stage 0 and one stage I; one stage II for every variant that leaves stage II alone; one stage III for every
ablation's default variant. A finished run is not run again and an interrupted one resumes (train.py --resume),
so an interrupted sweep continues where it stopped.

What comes out, in --docs (default docs/ablate/): {ablation}.md, a table per ablation (mean +- standard deviation
over the seeds of VQA overall and by type, POPE F1, answer loss, parameters, stage-III time), the paper's own
finding beside it, and {ablation}_load.png, each variant's expert load over stage III. The tables are drawn from
runs/, one small record per finished variant and seed: they outlive the work folder, so a later sweep (another
day, another machine) adds seeds without re-running the recorded ones. Delete a record to run its variant again.
"""
import argparse
import importlib.metadata
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))


@dataclass(frozen=True)
class Variant:
    stage3: tuple = ()  # train.py options for stage III
    stage2: tuple = ()  # train.py options for stage II, and stage III (a variant that starts earlier)


@dataclass(frozen=True)
class Ablation:
    question: str
    paper: str  # what the paper found, in our words, and where
    variants: dict = field(default_factory=dict)  # label -> Variant; the first is the reference row
    extra: object = None  # an Extra: a further measurement on the default variant's checkpoint, or None


@dataclass(frozen=True)
class Extra:
    name: str  # its record's file name
    measure: object  # (stage-III checkpoint folder, seed) -> a JSON-able dict: one seed's measurement
    report: object  # [one dict per seed] -> Markdown, printed under the ablation's table


DEFAULT = Variant()  # the tiny preset's stage III: MoE-LLaVA's 4 experts, top-2, every other LLM layer
# The dense control at equal active parameters: a "MoE" of one expert is the FFN itself (its router's softmax is
# always 1), trained in the same layers, with the same parameters and steps as the MoE: top-1 of E has as many
# active parameters
ONE_EXPERT = Variant(("--moe.num_experts=1", "--moe.top_k=1"))
ABLATIONS = {
    "moe-tuning": Ablation(
        question="Should the experts come after a dense stage II (MoE-Tuning), or train from stage II on?",
        paper="MoE-LLaVA (arXiv 2401.15947, Table 6): a MoE trained directly in stage II scored GQA 58.4, "
              "ScienceQA-IMG 58.1, POPE 81.9; MoE-Tuning (dense stage II, then experts) 61.5, 63.1, 87.0.",
        variants={"MoE-Tuning (MoE-LLaVA)": DEFAULT,
                  "MoE from stage II": Variant((), ("--moe_from_stage=2",))}),
    "dense-control": Ablation(
        question="Is stage III's gain from the experts, or from training longer?",
        paper="MoE-LLaVA (Table 5b) holds the active parameters equal: 2 experts beat 1 (a dense model) by 1.1 POPE "
              "and 0.6 ScienceQA-IMG points. Here: the same extra steps dense (LLM and projector trained), and "
              "one expert (the MoE's own parameters trained; as many active parameters as top-1 of E).",
        variants={"MoE (MoE-LLaVA)": DEFAULT,
                  "dense, same steps": Variant(("--moe_layers=", "--stage3_train=all", "--vit_lr_scale=0")),
                  "one expert, same parameters trained": ONE_EXPERT}),
    "placement": Ablation(
        question="Which LLM layers should become MoE layers?",
        paper="MoE-LLaVA (Table 5d; VQAv2 / GQA): first half 75.9 / 61.3, second half 76.3 / 61.2, every other "
              "layer 76.2 / 61.5, all layers 74.5 / 61.5 at 1.6 x the training time; it uses every other layer.",
        variants={"sparse (MoE-LLaVA)": DEFAULT,
                  "every layer (MoE-LLaVA's 'dense')": Variant(("--moe_layers=dense",)),
                  "first half": Variant(("--moe_layers=first_half",)),
                  "second half": Variant(("--moe_layers=second_half",))}),
    "experts": Ablation(
        question="How many experts, and how many per token?",
        paper="MoE-LLaVA (Table 5c): top-2 of 4 beat top-1 of 4 on every benchmark (GQA 61.5 against 58.4); "
              "it reports no run with other numbers of experts at top-2. CuMo: top-2 of 8 no better than of 4.",
        variants={"E4 k2 (MoE-LLaVA)": DEFAULT,
                  "E1 (dense)": ONE_EXPERT,
                  "E4 k1": Variant(("--moe.top_k=1",)),
                  "E2 k1": Variant(("--moe.num_experts=2", "--moe.top_k=1")),
                  "E2 k2": Variant(("--moe.num_experts=2", "--moe.top_k=2")),
                  "E8 k1": Variant(("--moe.num_experts=8", "--moe.top_k=1")),
                  "E8 k2": Variant(("--moe.num_experts=8",))}),
    "balancing": Ablation(
        question="Does the balancing loss keep every expert in use, and what does it cost? Can a bias on the "
                 "choice alone (no loss) do the same?",
        paper="MoE-LLaVA uses 0.01 and CuMo 0.1; neither reports a run without. OLMoE (arXiv 2409.02060): without "
              "the loss one expert takes nearly all tokens of a layer and the loss is worse. DeepSeek-V3 (arXiv "
              "2412.19437, Table 5): the bias instead of the loss, better on most of its benchmarks.",
        variants={"aux 0.01 (MoE-LLaVA)": DEFAULT,
                  "no balancing": Variant(("--moe.aux_loss_coef=0",)),
                  # at stage III's lr the routers hardly move: does stage II's let them collapse? (measured: no)
                  "no balancing, stage II's lr 1e-3": Variant(("--moe.aux_loss_coef=0", "--stage3_lr=1e-3")),
                  "aux 0.01, stage II's lr 1e-3": Variant(("--stage3_lr=1e-3",)),
                  "aux 0.1 (CuMo)": Variant(("--moe.aux_loss_coef=0.1",)),
                  "bias, no loss (DeepSeek-V3)": Variant(("--moe.aux_loss_coef=0", "--moe.bias_update_rate=0.001"))}),
    "shared": Ablation(
        question="Does an expert that every token goes through, beside the routed ones, help?",
        paper="DeepSeekMoE (arXiv 2401.06066): without its shared expert the Pile loss rose from 1.808 to 2.414 "
              "at equal compute. OLMoE: a shared expert was slightly worse, so it has none.",
        variants={"routed only (MoE-LLaVA)": DEFAULT,
                  "with a shared expert": Variant(("--moe.shared_expert=true",))}),
    "capacity": Ablation(
        question="Does dropping tokens past an expert's capacity cost accuracy?",
        paper="MoE-LLaVA (Table 11, the mean of 9 benchmarks): capacity factor 1.5 beat 1.0 by 0.7 to 0.9 points "
              "in all three models tried; it evaluates at 2.0. Dropless MoEs (MegaBlocks, OLMoE) drop nothing.",
        variants={"cf 1.5 (MoE-LLaVA)": DEFAULT,
                  "cf 1.0": Variant(("--moe.capacity_factor=1.0",)),
                  "dropless": Variant(("--moe.drop_tokens=false",))},
        extra=Extra("capacity_at_evaluation",  # (lambdas: the two functions are defined further down)
                    lambda ckpt, seed: capacity_at_evaluation(ckpt, seed), lambda measured: capacity_report(measured))),
    "systems": Ablation(
        question="Where should the experts go: the LLM, the ViT and projector, or LoRA experts on a frozen LLM?",
        paper="MoE-LLaVA: experts in the LLM. CuMo (arXiv 2405.05949, Table 3): upcycled projector experts beat "
              "ones trained from scratch (ScienceQA 73.7 against 68.1), upcycled ViT experts help most. "
              "LLaVA-MoLE (arXiv 2401.16160): LoRA experts keep a frozen LLM's skills across mixed domains.",
        variants={"MoE-LLaVA": DEFAULT,
                  "CuMo": Variant(("--recipe=cumo",), ("--recipe=cumo",)),
                  "LLaVA-MoLE": Variant(("--recipe=mole",))}),
}
TYPES = ("colour", "shape", "position", "existence", "count")  # the VQA types in the tables, beside overall


def slug(args):
    """A folder name for a list of options ('' for none)."""
    text = "_".join(a.lstrip("-").replace("=", "-").replace(".", "-").replace(",", "-") for a in args)
    return text or "default"


# ----------------------------------------------------------------------------------------------------------
# The plan: which commands a seed's variants need, in order; each is skipped when its output is complete


@dataclass
class Step:
    what: str  # shown in the progress lines
    command: list
    done_file: str  # the step is complete when this file exists (and, for training, says "done")
    links: dict = field(default_factory=dict)  # symlinks to make first: {link path: target}


def stage_done(folder):
    path = os.path.join(folder, "meta.json")
    if not os.path.exists(path):
        return False
    with open(path) as f:
        return bool(json.load(f).get("done"))


def step_done(step):
    if step.done_file.endswith("meta.json"):
        return stage_done(os.path.dirname(step.done_file))
    return os.path.exists(step.done_file)


def train_step(stage, out_dir, seed, options, extra, links=None):
    command = [sys.executable, os.path.join(HERE, "train.py"), "--stage", str(stage), f"--out_dir={out_dir}",
               f"--seed={seed}", "--resume=true", "--progress=false", *options, *extra]
    return Step(f"stage {stage} in {out_dir}", command, os.path.join(out_dir, f"stage{stage}", "meta.json"),
                links or {})


def variant_folder(work, seed, variant):
    """Where a variant's stage III lives: shared by every ablation that has the same variant."""
    return os.path.join(work, f"seed{seed}", f"ii-{slug(variant.stage2)}", f"iii-{slug(variant.stage3)}")


def plan(ablations, seeds, work, extra, eval_extra, recorded=lambda seed, what: False):
    """Every step the ablations need, each once, in an order that runs what a step needs before it. A variant
    (or an Extra) that recorded(seed, it) says is already recorded needs nothing; an Extra needs the default
    variant's checkpoint."""
    steps, seen = [], set()

    def add(step):
        if step.done_file not in seen:
            seen.add(step.done_file)
            steps.append(step)

    for seed in seeds:
        base = os.path.join(work, f"seed{seed}")
        needed = [v for a in ablations for v in a.variants.values() if not recorded(seed, v)]
        needed += [DEFAULT for a in ablations if a.extra is not None and not recorded(seed, a.extra)]
        if not needed:
            continue
        add(train_step(0, base, seed, [], extra))
        add(train_step(1, base, seed, [], extra))
        for variant in needed:
            two = os.path.join(base, f"ii-{slug(variant.stage2)}")
            add(train_step(2, two, seed, variant.stage2, extra,
                           {os.path.join(two, "stage1"): os.path.join(base, "stage1")}))
            three = variant_folder(work, seed, variant)
            add(train_step(3, three, seed, variant.stage3, extra,
                           {os.path.join(three, "stage2"): os.path.join(two, "stage2")}))
            ckpt = os.path.join(three, "stage3")
            add(Step(f"eval of {ckpt}", [sys.executable, os.path.join(HERE, "eval.py"), f"--ckpt={ckpt}",
                                        "--blind=none", "--progress=false", *eval_extra],
                     os.path.join(ckpt, "eval", "metrics.json")))
    return steps


def run(steps, log_path):
    """Run the steps not yet complete; each command's output goes to the sweep's log."""
    todo = [s for s in steps if not step_done(s)]
    print(f"{len(steps) - len(todo)} of {len(steps)} runs already complete; {len(todo)} to go")
    t_start = time.time()
    for i, step in enumerate(todo, 1):
        for link, target in step.links.items():
            os.makedirs(os.path.dirname(link), exist_ok=True)
            if not os.path.lexists(link):
                os.symlink(os.path.abspath(target), link)
        print(f"[{i}/{len(todo)}, {(time.time() - t_start) / 60:.0f} min] {step.what}", flush=True)
        with open(log_path, "a") as log:
            log.write(f"\n$ {shlex.join(step.command)}\n")
            log.flush()
            try:
                code = subprocess.run(step.command, stdout=log, stderr=subprocess.STDOUT, cwd=HERE).returncode
            except KeyboardInterrupt:  # (the run got the Ctrl-C too, and train.py leaves a checkpoint)
                raise SystemExit("\nstopped; the same command continues where this sweep stopped") from None
        if code != 0:
            raise SystemExit(f"error: this run failed (exit {code}); its output is at the end of {log_path}:\n"
                             f"  {shlex.join(step.command)}\nfix it and run ablate.py again: it continues here")


# ----------------------------------------------------------------------------------------------------------
# Records: what a table needs from one finished variant of one seed, a small JSON file in {docs}/runs/. The
# tables are drawn from the records alone, so they outlive the work folder: a later sweep (another day, another
# machine) adds a seed without re-running the ones recorded.


def read_json(path):
    with open(path) as f:
        return json.load(f)


def record_path(records, seed, what):
    """A Variant's record mirrors its run folder; an Extra's sits beside the seed's variants."""
    if isinstance(what, Extra):
        return os.path.join(records, f"seed{seed}", f"{what.name}.json")
    return os.path.join(records, f"seed{seed}", f"ii-{slug(what.stage2)}", f"iii-{slug(what.stage3)}.json")


def read_record(records, seed, what, args):
    """The record, or None if there is none or it was made with other --train_args / --eval_args."""
    path = record_path(records, seed, what)
    if not os.path.exists(path):
        return None
    record = read_json(path)
    return record if record.get("args") == args else None


def write_record(records, seed, what, args, record):
    path = record_path(records, seed, what)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    record = {"seed": seed, "date": time.strftime("%Y-%m-%d"), "torch": importlib.metadata.version("torch"),
              "args": args, **record}
    with open(path + ".tmp", "w") as f:
        json.dump(record, f, indent=1)
    os.replace(path + ".tmp", path)


def load_curve(log_path):
    """{MoE layer: [[stage-III step, max/mean expert load]]} from train.py's log: a router that collapses onto
    few experts climbs toward E / k."""
    from eval import layer_label, training_routing  # (eval.py imports torch: only when a record is made)
    curve = {}
    for step, layers in [r for group in training_routing(log_path).values() for r in group]:
        for layer in layers:
            text, image = layer["topk_text_image"]  # each expert's top-k assignments: text, image tokens
            load = [t + i for t, i in zip(text, image)]
            if sum(load):
                curve.setdefault(layer_label(layer["layer"]), []).append([step, max(load) / (sum(load) / len(load))])
    return curve


def variant_record(work, seed, variant):
    """A finished variant's record from its run folders: its table row, its load curve, and the seconds that
    each run it relied on logged (shared runs under the same name, so that a table counts them once)."""
    three = variant_folder(work, seed, variant)
    two, base = os.path.dirname(three), os.path.dirname(os.path.dirname(three))
    m, meta = read_json(os.path.join(three, "stage3", "eval", "metrics.json")), \
        read_json(os.path.join(three, "stage3", "meta.json"))
    routing = m.get("routing") or m.get("vision_routing") or {}
    values = {"overall": 100 * m["vqa"]["overall"]["accuracy"],
              **{t: 100 * m["vqa"][t]["accuracy"] for t in TYPES if t in m["vqa"]},
              "pope_f1": 100 * m["pope"]["average"]["f1"] if "pope" in m else float("nan"),
              "answer_ce": m["loss"]["answer_ce"],
              "active_m": m["params"]["active"] / 1e6, "total_m": m["params"]["total"] / 1e6,
              "max_load": max(routing.get("max_over_mean_load") or [float("nan")]),
              "seconds": meta["elapsed_s"]}
    ii, iii = os.path.basename(two), os.path.basename(three)
    logged = {"stage 0": read_json(os.path.join(base, "stage0", "meta.json"))["elapsed_s"],
              "stage 1": read_json(os.path.join(base, "stage1", "meta.json"))["elapsed_s"],
              f"stage 2 {ii}": read_json(os.path.join(two, "stage2", "meta.json"))["elapsed_s"],
              f"stage 3 {ii}/{iii}": meta["elapsed_s"], f"eval {ii}/{iii}": m["seconds"]["total"]}
    return {"stage2": list(variant.stage2), "stage3": list(variant.stage3), "values": values,
            "load": load_curve(os.path.join(three, "stage3", "log.jsonl")), "logged_s": logged}


def save_records(ablations, seeds, work, records, args):
    """Record every variant that has finished in the work folder and has no record yet."""
    for seed in seeds:
        for variant in {v for a in ablations for v in a.variants.values()}:
            three = variant_folder(work, seed, variant)
            if read_record(records, seed, variant, args) is None and stage_done(os.path.join(three, "stage3")) \
                    and os.path.exists(os.path.join(three, "stage3", "eval", "metrics.json")):
                write_record(records, seed, variant, args, variant_record(work, seed, variant))


# ----------------------------------------------------------------------------------------------------------
# The tables: one row per variant, mean +- standard deviation over the seeds


def spread(values, digits=1):
    if any(v != v for v in values):  # NaN: not measured for this variant (a dense model has no load)
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def table(ablation, recorded):
    """recorded: {label: [one record per seed]}."""
    head = ["variant", "VQA overall", *TYPES, "POPE F1", "answer CE", "max/mean load", "active / total (M)",
            "stage III (s)"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label in ablation.variants:
        r = {k: [rec["values"].get(k, float("nan")) for rec in recorded[label]] for k in recorded[label][0]["values"]}
        cells = [label, spread(r["overall"]), *[spread(r[t]) if t in r else "-" for t in TYPES], spread(r["pope_f1"]),
                 spread(r["answer_ce"], 4), spread(r["max_load"], 2),
                 f"{r['active_m'][0]:.2f} / {r['total_m'][0]:.2f}", f"{statistics.mean(r['seconds']):.0f}"]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def capacity_at_evaluation(ckpt, seed, factors=(2.0, 1.5, 1.0), n=300, batch_size=32):
    """Does an answer depend on the other questions in its batch? The checkpoint answers n short test questions
    alone, in batches of batch_size, and in batches of the same size with other companions (the questions
    shuffled first), routing dropless (as eval.py does) or keeping an evaluation capacity: C = ceil(k * cf * S / E)
    slots per expert for the S real tokens of one forward, so what is dropped depends on the batch."""
    import random
    from dataclasses import replace

    import torch

    import eval as E
    from moe import MoELayer
    t0 = time.time()
    vlm, tokenizer, meta = E.load_model(ckpt, torch.device("cpu"))
    config = E.EvalConfig(ckpt=ckpt, progress=False)
    data = E.resolve_data(config, meta, log=lambda *a: None)
    questions, _ = E.vqa_questions(data.samples, data.folder, tokenizer, vlm, config, log=lambda *a: None)
    questions = [q for q in questions if q.qtype != "description"][:n]  # (a description is 64 tokens long)
    order = list(range(len(questions)))
    random.Random(seed).shuffle(order)
    layers = [m for m in vlm.modules() if isinstance(m, MoELayer)]
    trained = [m.config for m in layers]
    rows = {}
    for cf in (None, *factors):  # None: dropless
        for m, c in zip(layers, trained):
            m.config = replace(c, eval_capacity_factor=cf or c.eval_capacity_factor)

        def answers(qs, size, dropless=cf is None):
            return E.generate_answers(vlm, tokenizer, qs, torch.device("cpu"), size, progress=False,
                                      dropless=dropless)
        alone, batched = answers(questions, 1), answers(questions, batch_size)
        mixed = [None] * len(questions)
        for i, a in zip(order, answers([questions[i] for i in order], batch_size)):
            mixed[i] = a
        rows["dropless" if cf is None else f"{cf:g}"] = {
            "accuracy": [100 * E.vqa_scores(questions, a)["overall"]["accuracy"] for a in (alone, batched, mixed)],
            "changed": [100 * sum(x != y for x, y in zip(a, b)) / len(questions)
                        for a, b in ((alone, batched), (batched, mixed))]}
    return {"questions": len(questions), "batch_size": batch_size, "num_experts": trained[0].num_experts,
            "top_k": trained[0].top_k, "seconds": time.time() - t0, "rows": rows}


def capacity_report(measured):
    """capacity_at_evaluation's table: one row per routing, mean +- standard deviation over the seeds."""
    first = measured[0]
    b, e, k = first["batch_size"], first["num_experts"], first["top_k"]
    head = ["routing at evaluation", "VQA alone", f"VQA in batches of {b}", "… other companions",
            f"answers changed: alone → {b}", "… other companions"]
    text = [f"**At evaluation** (`capacity_at_evaluation` in ablate.py: the default variant's stage III of each "
            f"seed answers its first {first['questions']} short test questions three ways; "
            f"{sum(m['seconds'] for m in measured) / 60:.0f} min). An expert's capacity is a share of the tokens "
            "of one forward pass, so with a capacity an answer can depend on which questions share its batch. "
            "`eval.py` generates dropless, where it cannot. MoE-LLaVA evaluates at capacity factor 2.0, which for "
            f"top-{k} of {e} experts gives every expert k × 2.0 / E = {k * 2.0 / e:g} × the batch's tokens as slots.",
            "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in first["rows"]:
        values = [m["rows"][key]["accuracy"] + m["rows"][key]["changed"] for m in measured]
        label = "dropless (eval.py)" if key == "dropless" else f"capacity factor {key}"
        text.append("| " + " | ".join([label] + [spread([v[j] for v in values]) for j in range(5)]) + " |")
    return "\n".join(text)


def load_plot(ablation, recorded, path):
    """Each variant's max/mean expert load over stage III (the first seed), one line per MoE layer."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(ablation.variants), figsize=(3.2 * len(ablation.variants), 2.8), sharey=True,
                             squeeze=False)
    for ax, label in zip(axes[0], ablation.variants):
        curve = recorded[label][0]["load"]
        for name, points in curve.items():
            ax.plot(*zip(*points), label=name)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("stage III step")
        if curve:
            ax.legend(fontsize=7)
    axes[0][0].set_ylabel("max / mean expert load")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def logged_minutes(recorded):
    """The training and evaluation time the runs behind a table logged, however many sweeps they took: what
    the table cost, the runs it shares with other ablations included (each counted once)."""
    seconds = {(r["seed"], what): s for records in recorded.values() for r in records
               for what, s in r["logged_s"].items()}
    return sum(seconds.values()) / 60


def write_report(name, ablation, recorded, extra, docs, command):
    """recorded: {label: [one record per seed]}; extra: the Extra's records, one per seed ([] for none)."""
    records = [r for rs in recorded.values() for r in rs]
    seeds = [r["seed"] for r in recorded[next(iter(ablation.variants))]]
    dates = sorted({r["date"] for r in records})
    torches = sorted({r["torch"] for r in records})
    os.makedirs(docs, exist_ok=True)
    plot = f"{name}_load.png"
    load_plot(ablation, recorded, os.path.join(docs, plot))
    text = [f"# Ablation: {name}", "", f"**The question.** {ablation.question}", "",
            f"**What the papers say.** {ablation.paper}", "",
            f"**Measured** by `{command}`: runs of {' to '.join(dict.fromkeys([dates[0], dates[-1]]))}, "
            f"{platform.machine()} CPU, Python {platform.python_version()}, torch {', '.join(torches)}; seeds "
            f"{', '.join(map(str, seeds))} (mean ± standard deviation); its runs logged "
            f"{logged_minutes(recorded):.0f} min of training and evaluation (the stages it shares with other "
            "ablations included). "
            "Test split of the built-in data set; POPE F1 is the mean over its three splits; the load column is the "
            "highest max/mean expert load of any MoE layer at evaluation (1.0 is even).", "",
            table(ablation, recorded), "", f"![expert load over stage III (seed {seeds[0]})]({plot})", ""]
    if extra:
        text += [ablation.extra.report(extra), ""]
    with open(os.path.join(docs, f"{name}.md"), "w") as f:
        f.write("\n".join(text))
    return os.path.join(docs, f"{name}.md")


# ----------------------------------------------------------------------------------------------------------
# Command line


def main(argv=None, ablations=ABLATIONS):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", nargs="?", help=f"an ablation ({', '.join(ablations)}) or all")
    p.add_argument("--list", action="store_true", help="list the ablations and their questions")
    p.add_argument("--seeds", default="1337,1,2", help="training seeds, comma-separated")
    p.add_argument("--work", default="out/ablate", help="where the runs go (reused by a later sweep)")
    p.add_argument("--docs", default="docs/ablate", help="where the tables and plots go")
    p.add_argument("--train_args", default="", help="options added to every train.py command (e.g. --max_iters=5)")
    p.add_argument("--eval_args", default="", help="options added to every eval.py command (e.g. --limit=50)")
    p.add_argument("--dry_run", default="false", choices=["true", "false"], help="print what would run, run nothing")
    args = p.parse_args(argv)
    if args.list or not args.name:
        for name, a in ablations.items():
            print(f"{name:14} {a.question}\n{'':14} variants: {', '.join(a.variants)}")
        return
    if args.name != "all" and args.name not in ablations:
        raise SystemExit(f"error: no ablation called {args.name!r}; one of: {', '.join(ablations)}, all")
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        raise SystemExit(f"error: --seeds={args.seeds!r} must be integers separated by commas") from None
    chosen = dict(ablations) if args.name == "all" else {args.name: ablations[args.name]}
    work, records = os.path.abspath(args.work), os.path.join(args.docs, "runs")
    key = {"train_args": args.train_args, "eval_args": args.eval_args}  # a record counts for these options only
    steps = plan(chosen.values(), seeds, work, shlex.split(args.train_args), shlex.split(args.eval_args),
                 lambda seed, what: read_record(records, seed, what, key) is not None)
    if args.dry_run == "true":
        for step in steps:
            if not step_done(step):
                print(shlex.join(step.command))
        return
    os.makedirs(work, exist_ok=True)
    t0 = time.time()
    try:
        run(steps, os.path.join(work, "sweep.log"))
    finally:  # what finished is recorded, even when the sweep stopped half-way
        save_records(chosen.values(), seeds, work, records, key)
    for ablation in chosen.values():
        for seed in seeds if ablation.extra is not None else ():
            if read_record(records, seed, ablation.extra, key) is None:
                print(f"{ablation.extra.name}, seed {seed}", flush=True)
                ckpt = os.path.join(variant_folder(work, seed, DEFAULT), "stage3")
                write_record(records, seed, ablation.extra, key, ablation.extra.measure(ckpt, seed))
    print(f"the sweep took {(time.time() - t0) / 60:.0f} min")
    for name, ablation in chosen.items():
        command = shlex.join(["python", "ablate.py", name, f"--seeds={args.seeds}"] +
                             [f"--{k}={getattr(args, k)}" for k in ("train_args", "eval_args") if getattr(args, k)])
        recorded = {label: [read_record(records, seed, v, key) for seed in seeds]
                    for label, v in ablation.variants.items()}
        extra = [read_record(records, seed, ablation.extra, key) for seed in seeds] if ablation.extra else []
        print(f"wrote {write_report(name, ablation, recorded, extra, args.docs, command)}")

if __name__ == "__main__":
    main()
