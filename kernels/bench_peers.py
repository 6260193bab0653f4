"""
kernels/bench_peers.py -- our MoE layer beside the MoE layers a reader would otherwise use, in one run.

    python kernels/bench_peers.py                       # the default shapes, on CUDA if there is one, else the CPU
    python kernels/bench_peers.py --shapes 2048x256x512x4 --iters 5 --device cpu

For each shape (T tokens x H hidden x F expert hidden x E experts, top-k), forward and forward + backward:
  ours, loop      moe.MoELayer, SwiGLU experts, dropless: the readable per-expert loop
  ours, sorted    the same layer's default path: sort the assignments, grouped matmuls, gather-sum
  ours, cuda      the kernels/ extension (CUDA only, when it builds)
  HF eager        Hugging Face transformers' MixtralSparseMoeBlock, its per-expert loop
  HF grouped_mm   the same block with transformers' grouped-matmul experts (config._experts_implementation)
  DeepSpeed       deepspeed.moe.layer.MoE (GShard-style dispatch through dense one-hot tensors), dropless top-k
  dense           a SwiGLU FFN of hidden size k * F: the same matmul FLOPs per token, no routing
The peers are benchmark-only: the package never imports them, and a peer that is not installed is skipped with
a note. Hugging Face's block gets our weights and must compute our output (checked: its largest difference
from ours, relative to our largest output); DeepSpeed's top-2 gate adds noise to the second choice, so it is
timed, not compared. fp32 on the CPU, bf16 autocast on CUDA. The layers are timed round robin (each round
times each once; medians over the rounds), so a busy moment of a shared machine hits all of them alike: read
the ratios, not the absolute times.
"""
import argparse
import datetime
import os
import platform
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import kernels  # noqa: E402
import moe  # noqa: E402
from kernels.bench import timed  # noqa: E402
from model import MLP, LLMConfig  # noqa: E402

# the issue's three CPU shapes, then the tiny and small presets' FFNs at one batch (16 x 128, 32 x 128 tokens)
DEFAULT_SHAPES = ["2048x256x512x4", "4096x256x512x8", "2048x512x1024x4", "2048x128x384x4", "4096x512x1408x4"]


def shape(text):
    T, H, F, E = (int(v) for v in text.split("x"))
    return T, H, F, E


def hf_block(layer, k, implementation):
    """transformers' MixtralSparseMoeBlock holding our layer's router and experts; None if not installed."""
    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    except ImportError:
        return None
    E, F, H = layer.experts.gate_proj.shape
    config = MixtralConfig(hidden_size=H, intermediate_size=F, num_local_experts=E, num_experts_per_tok=k,
                           router_jitter_noise=0.0)
    config._experts_implementation = implementation
    block = MixtralSparseMoeBlock(config).to(layer.router.weight.device)
    with torch.no_grad():
        block.gate.weight.copy_(layer.router.weight)
        block.experts.gate_up_proj.copy_(torch.cat([layer.experts.gate_proj, layer.experts.up_proj], dim=1))
        block.experts.down_proj.copy_(layer.experts.down_proj)
    return block


def deepspeed_layer(base, E, k, device):
    """deepspeed.moe.layer.MoE with E copies of the dense FFN, dropless; None (and why) if it cannot be built."""
    try:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29517")
        for name, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
            os.environ.setdefault(name, value)
        import deepspeed
        from deepspeed.moe.layer import MoE
        if not torch.distributed.is_initialized():
            deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", verbose=False)
        layer = MoE(hidden_size=base.gate_proj.weight.shape[1], expert=base, num_experts=E, ep_size=1, k=k,
                    capacity_factor=1.0, eval_capacity_factor=1.0, min_capacity=0, drop_tokens=False,
                    use_rts=False)
        return layer.to(device), None
    except ImportError:
        return None, "not installed"
    except Exception as e:  # a peer that does not build here is reported, not fatal
        return None, f"{type(e).__name__}: {e}"


def run(fn, x, backward):
    def step():
        y = fn(x)
        if backward:
            y.float().sum().backward()
    return step


def bench_shape(T, H, F, E, k, device, dtype, iters, note):
    torch.manual_seed(0)
    base = MLP(LLMConfig(dim=H, ffn_dim=F)).to(device)
    x = torch.randn(1, T, H, device=device, requires_grad=True)
    auto = dict(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32)
    ours = moe.MoELayer.upcycle(base, moe.MoEConfig(num_experts=E, top_k=k, drop_tokens=False))
    with torch.no_grad():  # distinct experts and a real router, so that the peers' agreement means something
        for p in ours.experts.parameters():
            p.add_(0.02 * torch.randn_like(p))
        ours.router.weight.normal_(std=0.5)
    candidates = {}
    for mode in ["loop", "sorted"] + (["cuda"] if device.type == "cuda" and kernels.unavailable_reason() is None
                                      else []):
        layer = moe.MoELayer(moe.MoEConfig(num_experts=E, top_k=k, drop_tokens=False, dispatch=mode),
                             moe.SwiGLUExperts(E, H, F)).to(device)
        layer.load_state_dict(ours.state_dict())
        candidates[f"ours, {mode}"] = layer
    ours = candidates["ours, sorted"]
    for implementation in ("eager", "grouped_mm"):
        block = hf_block(ours, k, implementation)
        if block is None:
            note.add("HF: transformers is not installed")
            continue
        candidates[f"HF {implementation}"] = block
    ds, why = deepspeed_layer(MLP(LLMConfig(dim=H, ffn_dim=F)).to(device), E, k, device)
    if ds is None:
        note.add(f"DeepSpeed: {why}")
    else:
        candidates["DeepSpeed"] = ds
    candidates["dense"] = MLP(LLMConfig(dim=H, ffn_dim=k * F)).to(device)

    def forward(name, module):
        def f(inp):
            with torch.autocast(**auto):
                out = module(inp)
            return out[0] if isinstance(out, tuple) else out
        return f
    with torch.no_grad():
        reference = forward("ours", ours)(x).float()
        agreement = {}
        for name in [n for n in candidates if n.startswith("HF") or n.startswith("ours")]:
            try:
                diff = (forward(name, candidates[name])(x).float() - reference).abs().max()
                agreement[name] = (diff / reference.abs().max()).item()
            except Exception as e:  # e.g. an experts implementation this transformers does not offer on this device
                note.add(f"{name}: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
                agreement[name] = None
    # round robin: each round times every layer once, so a busy moment of a shared machine hits all of them alike
    steps = {name: (run(forward(name, m), x, False), run(forward(name, m), x, True))
             for name, m in candidates.items() if agreement.get(name, 0.0) is not None}
    times = {name: ([], []) for name in steps}
    for _ in range(iters + 2):  # (two warm-up rounds, dropped below)
        for name, (fwd, both) in steps.items():
            for i, step in enumerate((fwd, both)):
                times[name][i].append(timed(step, 1, device, warmup=0))
        for m in candidates.values():
            m.zero_grad(set_to_none=True)
        x.grad = None
    return {name: (statistics.median(f[2:]), statistics.median(b[2:]), agreement.get(name))
            for name, (f, b) in times.items()}


def versions():
    out = [f"torch {torch.__version__}"]
    for name in ("transformers", "deepspeed"):
        try:
            out.append(f"{name} {__import__(name).__version__}")
        except ImportError:
            out.append(f"{name} not installed")
    return "; ".join(out)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", type=shape, default=[shape(s) for s in DEFAULT_SHAPES],
                   help="TxHxFxE, e.g. 2048x256x512x4")
    p.add_argument("--k", type=int, default=2, help="experts per token")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--iters", type=int, default=10)
    args = p.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    print(f"# device: {name}; {versions()}; {datetime.datetime.now():%Y-%m-%d %H:%M}")
    print("# command: python " + " ".join(sys.argv))
    print(f"\n## MoE layer, top-{args.k}, dropless, {str(dtype).replace('torch.', '')}: median ms of {args.iters} "
          "(forward / forward + backward); its forward + backward time over ours (sorted): above 1, ours is faster\n")
    print("| T x H x F x E | layer | forward ms | fwd + bwd ms | its time / ours | max diff from ours / max output |")
    print("|---|---|---|---|---|---|")
    note = set()
    for T, H, F, E in args.shapes:
        rows = bench_shape(T, H, F, E, args.k, device, dtype, args.iters, note)
        mine = rows["ours, sorted"][1]
        for layer, (fwd, both, diff) in rows.items():
            agree = "—" if diff is None else f"{diff:.1e}"
            print(f"| {T}x{H}x{F}x{E} | {layer} | {fwd:.2f} | {both:.2f} | {both / mine:.2f} | {agree} |")
        sys.stdout.flush()
    for line in sorted(note):
        print(f"# skipped or failed: {line}")


if __name__ == "__main__":
    main()
