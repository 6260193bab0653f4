"""Tokens/s of training in one process and as torchrun ranks: data parallel, and expert parallel at stage III.

    python tests/bench_distributed.py                       # CPU (gloo), from the checkpoints in out/
    python tests/bench_distributed.py --steps 40 --nproc 2  # more steps; ranks per torchrun run

It trains stage II (dense) and stage III (MoE) for --steps steps from out/stage1 and out/stage2 (run
`python train.py --stage all` first) in a scratch folder, with the same global batch in every row, and prints
the median tokens/s of the steps after the first five, read from each run's log.jsonl. On a machine without
GPUs every rank is a CPU process with one thread (torchrun sets OMP_NUM_THREADS=1), so the 1-process row is
given the same number of threads as all ranks together.
"""
import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(args, nproc, threads, scratch, stage):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS=str(threads))
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    f"--nproc_per_node={nproc}"]
    cmd = launcher + [os.path.join(ROOT, "train.py"), "--stage", str(stage), "--out_dir", scratch, *args]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{result.stderr[-3000:]}")
    with open(os.path.join(scratch, f"stage{stage}", "log.jsonl")) as f:
        speeds = [r["tok_per_s"] for r in map(json.loads, f) if "tok_per_s" in r and r["step"] > 5]
    return statistics.median(speeds)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out_dir", default="out", help="where stage1/ and stage2/ checkpoints are (default out)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--nproc", type=int, default=2, help="ranks per torchrun run (default 2)")
    p.add_argument("--global_batch", type=int, default=32)
    p.add_argument("--device", default="", help="train.py's --device (default: cuda if there is a GPU per rank, "
                                                  "else cpu for every row)")
    args = p.parse_args()
    device = args.device or ("auto" if torch.cuda.device_count() >= args.nproc else "cpu")
    for stage in (1, 2):
        if not os.path.exists(os.path.join(args.out_dir, f"stage{stage}", "ckpt.pt")):
            raise SystemExit(f"error: {args.out_dir}/stage{stage}/ckpt.pt is missing: run `python train.py --stage "
                             f"all` first (or pass --out_dir)")
    n = args.nproc
    per_rank = args.global_batch // n
    common = [f"--max_iters={args.steps}", f"--global_batch={args.global_batch}", f"--batch_size={per_rank}",
              "--eval_batches=1", "--log_interval=1", "--progress=false", "--stage2_iters=100000",
              "--stage3_iters=100000", f"--device={device}"]
    rows = [("II (dense)", 2, 1, n, []), ("II (dense)", 2, n, 1, []),
            ("III (MoE)", 3, 1, n, []), ("III (MoE)", 3, n, 1, []),
            (f"III (MoE), experts over {n} ranks", 3, n, 1, [f"--ep_size={n}"])]
    results = []
    for name, stage, nproc, threads, extra in rows:
        with tempfile.TemporaryDirectory() as scratch:
            shutil.copytree(os.path.join(args.out_dir, f"stage{stage - 1}"), os.path.join(scratch, f"stage{stage - 1}"))
            results.append((name, nproc, threads, run(common + extra, nproc, threads, scratch, stage)))
    device = torch.cuda.get_device_name() if device != "cpu" else f"CPU ({os.cpu_count()} cores, {platform.machine()})"
    print(f"# {datetime.date.today()}, torch {torch.__version__}, {device}, "
          f"`python tests/bench_distributed.py {' '.join(sys.argv[1:])}`".rstrip())
    print(f"# global batch {args.global_batch}, {args.steps} steps, median over steps 6..{args.steps}")
    print("| stage | processes | threads each | tokens/s | vs 1 process |")
    print("|---|---|---|---|---|")
    base = {}
    for name, nproc, threads, speed in results:
        base.setdefault(name.split(",")[0], speed)
        print(f"| {name} | {nproc} | {threads} | {speed:,.0f} | {speed / base[name.split(',')[0]]:.2f}x |")


if __name__ == "__main__":
    main()
