"""
kernels -- an optional CUDA extension for expert dispatch (dispatch.cu), and the autograd around it.

moe.dispatch_sorted is the readable PyTorch form of sort -> grouped matmul -> combine; dispatch_cuda below does
the same with the four kernels of dispatch.cu, so that nothing waits for the GPU and the permute and combine
run at memory speed. Select it with MoEConfig(dispatch="cuda") (or "auto"); when the extension cannot be
built or used, moe.py falls back to dispatch_sorted and says why in one line.

The extension is compiled on first use with torch.utils.cpp_extension (ninja and nvcc, nothing else: no
Triton, no CUTLASS download) and cached by PyTorch in ~/.cache/torch_extensions. CPU users never build it.

  build_index(expert_index, keep, E) -> dest (N, k) slot of each assignment (-1 dropped),
                                        src (N*k,) assignment of each slot (-1 for a zero tail row),
                                        counts (E,) kept assignments per expert
  Permute.apply(x, src, dest, k)      -> rows (N*k, H)        backward: unweighted combine
  Combine.apply(rows, w, dest, src)   -> (N, H) fp32          backward: combine_backward (rows and gates)
"""
import functools
import os

import torch
from torch.autograd.function import once_differentiable

_HERE = os.path.dirname(os.path.abspath(__file__))


@functools.lru_cache(maxsize=None)  # build once per process; a failure is remembered too, not retried per call
def _build():
    """(module, None) or (None, the reason in one line)."""
    if not torch.cuda.is_available():
        return None, "CUDA is not available"
    from torch.utils import cpp_extension
    if cpp_extension.CUDA_HOME is None:
        return None, "no CUDA toolkit (nvcc) was found to compile kernels/dispatch.cu"
    try:
        return cpp_extension.load(name="moe_llava_dispatch", sources=[os.path.join(_HERE, "dispatch.cpp"),
                                                                      os.path.join(_HERE, "dispatch.cu")],
                                  extra_cuda_cflags=["-O3"], verbose=False), None
    except Exception as e:  # a build log is long: keep its first error line
        lines = str(e).strip().splitlines() or [type(e).__name__]
        first = next((line for line in lines if "error" in line.lower()), lines[0]).strip()
        return None, f"kernels/dispatch.cu failed to build ({first})"


def load_extension():
    """The compiled extension module. Raises RuntimeError with a one-line reason when it cannot be had."""
    module, reason = _build()
    if module is None:
        raise RuntimeError(reason)
    return module


def unavailable_reason():
    """None when the extension is usable, else why not (one line)."""
    return _build()[1]


# ----------------------------------------------------------------------------------------------------------
# The extension's contract in plain PyTorch: the specification the kernels are tested against on a GPU, and
# a stand-in that lets the CPU tests check everything around the kernels (the autograd, the zero tail rows).


def index_reference(expert_index, keep, num_experts):
    """build_index in plain PyTorch."""
    n, k = expert_index.shape
    flat = expert_index.masked_fill(~keep, num_experts).reshape(-1)
    order = flat.argsort(stable=True)  # kept assignments by expert, in assignment order; dropped ones last
    counts = torch.bincount(flat, minlength=num_experts + 1)[:num_experts]
    kept = int(counts.sum())
    src = torch.full((n * k,), -1, dtype=torch.int32, device=expert_index.device)
    src[:kept] = order[:kept].to(torch.int32)
    dest = torch.full((n * k,), -1, dtype=torch.int32, device=expert_index.device)
    dest[order[:kept]] = torch.arange(kept, dtype=torch.int32, device=expert_index.device)
    return dest.view(n, k), src, counts.to(torch.int32)


class TorchReference:
    """The four extension functions in plain PyTorch, with the extension's signatures."""

    build_index = staticmethod(index_reference)

    @staticmethod
    def permute(x, src, k):
        rows = x[(src.clamp(min=0) // k).long()]
        return rows.masked_fill((src < 0).unsqueeze(-1), 0)

    @staticmethod
    def combine(rows, weights, dest):
        picked = rows[dest.clamp(min=0).long()].float()  # (N, k, H)
        w = torch.ones(dest.shape, device=rows.device) if weights is None else weights.float()
        out = (picked * (w * (dest >= 0)).unsqueeze(-1)).sum(dim=1)
        return out if weights is not None else out.to(rows.dtype)

    @staticmethod
    def combine_backward(dy, rows, weights, dest, src):
        k = dest.shape[1]
        a = src.clamp(min=0).long()
        d_rows = (weights.reshape(-1)[a].unsqueeze(-1) * dy[a // k].float()).masked_fill((src < 0).unsqueeze(-1), 0)
        picked = rows[dest.clamp(min=0).long()].float()  # (N, k, H)
        d_weights = (picked * dy.float().unsqueeze(1)).sum(-1).masked_fill(dest < 0, 0)
        return d_rows.to(rows.dtype), d_weights


class Permute(torch.autograd.Function):
    """rows[r] = x[src[r] // k] (zeros where src[r] < 0). Backward: dx[t] = sum over kept slots of d_rows."""

    @staticmethod
    def forward(ctx, x, src, dest, k, ext):
        ctx.save_for_backward(dest)
        ctx.ext = ext
        return ext.permute(x.contiguous(), src, k)

    @staticmethod
    @once_differentiable  # the kernels' backward is not itself differentiable
    def backward(ctx, d_rows):
        (dest,) = ctx.saved_tensors
        return ctx.ext.combine(d_rows.contiguous(), None, dest), None, None, None, None


class Combine(torch.autograd.Function):
    """y[t] = sum_s w[t, s] * rows[dest[t, s]], in fp32. Backward: d_rows[dest[t, s]] = w[t, s] * dy[t] and
    dw[t, s] = <dy[t], rows[dest[t, s]]> (docs/reference.md, "Dispatch": needs rows saved)."""

    @staticmethod
    def forward(ctx, rows, weights, dest, src, ext):
        rows, weights = rows.contiguous(), weights.float().contiguous()
        ctx.save_for_backward(rows, weights, dest, src)
        ctx.ext = ext
        return ext.combine(rows, weights, dest)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        rows, weights, dest, src = ctx.saved_tensors
        d_rows, d_weights = ctx.ext.combine_backward(dy.contiguous(), rows, weights, dest, src)
        return d_rows, d_weights, None, None, None


def dispatch_cuda(x, experts, expert_index, weights, keep, use_grouped_mm=False, ext=None):
    """moe.dispatch_sorted's contract, with the extension's kernels and no host synchronisation.

    The sorted buffer has N*k rows whatever the routing; rows no kept assignment uses are zero and are counted
    into the last expert's group, where a zero row gets a zero gradient (so no size is read back from the GPU).
    ext: the compiled extension (default), or TorchReference to run the same steps in plain PyTorch.
    """
    n, k = expert_index.shape
    ext = ext or load_extension()
    dest, src, counts = ext.build_index(expert_index.contiguous(), keep.contiguous(), experts.num_experts)
    group_sizes = counts.to(torch.int64)
    group_sizes[-1] += n * k - group_sizes.sum()  # the zero tail rows join the last group (on the device)
    rows = Permute.apply(x, src, dest, k, ext)  # (N*k, in)
    rows_out = experts.forward_grouped(rows, group_sizes, use_grouped_mm)  # (N*k, out)
    return Combine.apply(rows_out, weights, dest, src, ext)  # (N, out) fp32
