"""
kernels/bench.py -- how fast is expert dispatch? Prints two tables (with the device, date and command):

  1. permute and combine alone: time and bandwidth (GB/s, bytes read + written) for the extension's kernels
     and for their PyTorch equivalents (index_select; gather, multiply, sum);
  2. a whole MoE layer (SwiGLU experts, dropless, bf16 autocast), forward + backward: time and TFLOP/s for
     (a) the per-expert loop (moe.dispatch_loop, Hugging Face Mixtral style), (b) the PyTorch sort + grouped
     path (moe.dispatch_sorted), (c) the extension (kernels.dispatch_cuda), and a dense SwiGLU FFN with the
     same active FLOPs (hidden size k * F) as the yardstick.

    python kernels/bench.py                                   # the full grid of the kernels issue, on CUDA
    python kernels/bench.py --T 4096 --H 1024 --E 8 --k 2     # one point
    python kernels/bench.py --device cpu --T 512 --H 64 --dtype fp32 --iters 2   # a smoke run of the script

FLOPs count the three expert matmuls only (2 * T * k * 3 * H * F forward, twice that backward); the router and
the dispatch are the overhead the comparison is about.
"""
import argparse
import datetime
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import kernels  # noqa: E402
import moe  # noqa: E402
from model import MLP, LLMConfig  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def ints(text):
    return [int(v) for v in text.split(",")]


def timed(fn, iters, device, warmup=2):
    """Median wall time of fn() in ms (CUDA events on a GPU), after `warmup` warm-up calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def dropless_routing(T, E, k, device):
    logits = torch.randn(T, E, device=device)
    idx = logits.topk(k, dim=-1).indices
    weights = torch.softmax(logits, -1).gather(1, idx)
    return idx, torch.ones_like(idx, dtype=torch.bool), weights / weights.sum(-1, keepdim=True)


def bench_copy_kernels(T, H, E, k, dtype, device, iters, ext):
    """Permute and combine: the extension vs the same data movement in PyTorch."""
    idx, keep, weights = dropless_routing(T, E, k, device)
    dest, src, _ = kernels.TorchReference.build_index(idx, keep, E)
    x = torch.randn(T, H, device=device, dtype=dtype)
    rows = torch.randn(T * k, H, device=device, dtype=dtype)
    b = x.element_size()
    permute_bytes = T * k * H * b * 2  # each kept row read once (from x) and written once
    combine_bytes = T * k * H * b + T * H * 4  # k rows read per token, one fp32 row written
    impls = {"pytorch": kernels.TorchReference}
    if ext is not None:
        impls["extension"] = ext
    out = []
    for name, impl in impls.items():
        ms_p = timed(lambda: impl.permute(x, src, k), iters, device)
        ms_c = timed(lambda: impl.combine(rows, weights, dest), iters, device)
        out.append((name, ms_p, permute_bytes / ms_p / 1e6, ms_c, combine_bytes / ms_c / 1e6))
    return out


def bench_layer(T, H, E, k, F, dtype, device, iters, modes):
    """MoE layer forward + backward under autocast, per dispatch mode; and the dense yardstick."""
    torch.manual_seed(0)
    base = MLP(LLMConfig(dim=H, ffn_dim=F)).to(device)
    x = torch.randn(T, H, device=device, requires_grad=True)
    autocast = dict(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32)
    flops = 3 * (2 * T * k * 3 * H * F)  # forward + backward (2x) of the experts' three matmuls
    results = {}
    for mode in modes:
        layer = moe.MoELayer.upcycle(base, moe.MoEConfig(num_experts=E, top_k=k, drop_tokens=False, dispatch=mode))
        layer.to(device)

        def step():
            with torch.autocast(**autocast):
                y, _ = layer(x)
            y.float().sum().backward()
        results[mode] = timed(step, iters, device)
    dense = MLP(LLMConfig(dim=H, ffn_dim=k * F)).to(device)  # the same active FLOPs, no routing

    def dense_step():
        with torch.autocast(**autocast):
            y = dense(x)
        y.float().sum().backward()
    results["dense"] = timed(dense_step, iters, device)
    return {mode: (ms, flops / ms / 1e9) for mode, ms in results.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--T", type=ints, default=[4096, 16384, 65536], help="tokens, comma-separated")
    p.add_argument("--H", type=ints, default=[1024, 2048], help="hidden sizes")
    p.add_argument("--E", type=ints, default=[4, 8], help="experts")
    p.add_argument("--k", type=ints, default=[1, 2], help="experts per token")
    p.add_argument("--ffn_mult", type=float, default=2.0, help="expert hidden size F = ffn_mult * H")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--device", default="cuda")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--skip_loop_above", type=int, default=65536, help="skip the slow per-expert loop above this T")
    args = p.parse_args()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("kernels/bench.py: CUDA is not available (use --device cpu for a smoke run of the script)")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"# device: {name}; torch {torch.__version__}; {datetime.datetime.now():%Y-%m-%d %H:%M}")
    print("# command: python " + " ".join(sys.argv))
    reason = kernels.unavailable_reason() if device.type == "cuda" else "not on CUDA"
    ext = kernels.load_extension() if reason is None else None
    if ext is None:
        print(f"# the extension is not used: {reason}")

    print("\n## permute and combine (GB/s counts bytes read + written)\n")
    print("| T | H | k | impl | permute ms | permute GB/s | combine ms | combine GB/s |")
    print("|---|---|---|---|---|---|---|---|")
    for T in args.T:
        for H in args.H:
            for k in args.k:
                for impl, ms_p, gb_p, ms_c, gb_c in bench_copy_kernels(T, H, max(args.E), k, dtype, device,
                                                                       args.iters, ext):
                    print(f"| {T} | {H} | {k} | {impl} | {ms_p:.3f} | {gb_p:.0f} | {ms_c:.3f} | {gb_c:.0f} |")

    print(f"\n## MoE layer forward + backward, {args.dtype}, dropless, F = {args.ffn_mult:g} H "
          "(ms, and TFLOP/s of the expert matmuls)\n")
    print("| T | H | E | k | loop | sorted | extension | dense same FLOPs | ext vs loop | ext vs sorted "
          "| ext / dense |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for T in args.T:
        for H in args.H:
            for E in args.E:
                for k in args.k:
                    modes = (["loop"] if T <= args.skip_loop_above else []) + ["sorted"] + (["cuda"] if ext else [])
                    r = bench_layer(T, H, E, k, int(args.ffn_mult * H), dtype, device, args.iters, modes)
                    cell = lambda m: f"{r[m][0]:.2f} ({r[m][1]:.0f})" if m in r else "—"  # noqa: E731
                    ratio = lambda a, b: f"{r[b][0] / r[a][0]:.2f}x" if a in r and b in r else "—"  # noqa: E731
                    print(f"| {T} | {H} | {E} | {k} | {cell('loop')} | {cell('sorted')} | {cell('cuda')} | "
                          f"{cell('dense')} | {ratio('cuda', 'loop')} | {ratio('cuda', 'sorted')} | "
                          f"{ratio('cuda', 'dense')} |")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
