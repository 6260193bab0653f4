"""kernels/: the CUDA dispatch extension against its PyTorch specification.

On the CPU: the extension's contract in plain PyTorch (kernels.TorchReference) drives dispatch_cuda's autograd
and zero-tail-row logic and must equal moe.dispatch_sorted; dispatch="cuda" falls back with one line. With a
GPU: the compiled kernels must equal that contract, and a whole MoE layer must equal the sorted path.
"""
import dataclasses
import warnings

import pytest
import torch

import kernels
import moe
from moe import MoEConfig, MoELayer

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the extension is CUDA-only)")


def routing(n, k, num_experts, drop=0.3, empty_expert=None, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    experts = [e for e in range(num_experts) if e != empty_expert]
    idx = torch.stack([torch.tensor(experts)[torch.randperm(len(experts), generator=g)[:k]] for _ in range(n)])
    keep = torch.rand(n, k, generator=g) >= drop
    weights = torch.rand(n, k, generator=g)
    return idx.to(device), keep.to(device), weights.to(device)


def make_experts(form, num_experts, dim, hidden, seed=0):
    torch.manual_seed(seed)
    ex = moe.SwiGLUExperts(num_experts, dim, hidden) if form == "swiglu" else moe.GELUExperts(num_experts, dim,
                                                                                               hidden, dim)
    for p in ex.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return ex


def grads(fn, x, weights, experts):
    x, weights = x.clone().requires_grad_(), weights.clone().requires_grad_()
    y = fn(x, weights)
    return [y.detach(), *torch.autograd.grad((y * torch.linspace(-1, 1, y.numel(), device=y.device).view_as(y)).sum(),
                                             [x, weights, *experts.parameters()])]


@pytest.mark.parametrize("form", ["swiglu", "gelu"])
@pytest.mark.parametrize("k", [1, 2])
def test_dispatch_cuda_logic_equals_sorted_dispatch_on_cpu(form, k):
    num_experts, n, dim = 4, 41, 16
    experts = make_experts(form, num_experts, dim, 24)
    idx, keep, weights = routing(n, k, num_experts, empty_expert=3)  # an expert with no tokens, and drops
    x = torch.randn(n, dim)
    want = grads(lambda x, w: moe.dispatch_sorted(x, experts, idx, w, keep), x, weights, experts)
    got = grads(lambda x, w: kernels.dispatch_cuda(x, experts, idx, w, keep, ext=kernels.TorchReference),
                x, weights, experts)
    for a, b in zip(want, got):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_index_reference_is_a_stable_sort_by_expert():
    idx, keep, _ = routing(30, 2, 4, empty_expert=1)
    dest, src, counts = kernels.index_reference(idx, keep, 4)
    assert counts.tolist() == [int(((idx == e) & keep).sum()) for e in range(4)] and counts[1] == 0
    kept = int(counts.sum())
    assert (src[kept:] == -1).all() and (dest[~keep] == -1).all()
    flat_expert = idx.reshape(-1)[src[:kept].long()]
    assert (flat_expert.diff() >= 0).all()  # grouped by expert
    for e in range(4):  # in assignment order within an expert
        assert (src[:kept][flat_expert == e].diff() > 0).all()
    assert (src[dest[keep].long()] == torch.nonzero(keep.reshape(-1)).squeeze(1)).all()  # inverse maps


@pytest.mark.parametrize("mode, warns", [("cuda", True), ("auto", False)])
def test_cuda_dispatch_falls_back_to_sorted_on_cpu(mode, warns):
    torch.manual_seed(0)
    layer = MoELayer.upcycle(moe_ffn(), MoEConfig(dispatch="sorted"))
    x = torch.randn(2, 7, 16)
    want, _ = layer(x)
    layer.config = MoEConfig(dispatch=mode)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got, _ = layer(x)
    messages = [str(w.message) for w in caught]
    assert torch.equal(got, want)
    assert (messages == ["MoE dispatch='cuda': using the PyTorch sort path (dispatch_sorted) because the tokens "
                         "are not on a CUDA device"]) if warns else messages == []


def moe_ffn():
    from model import MLP, LLMConfig
    return MLP(LLMConfig(dim=16, ffn_dim=24))


# --- on a GPU: the compiled kernels


@cuda
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim", [64, 40, 13])  # 16-byte packs, and the scalar path for rows that do not fit them
def test_kernels_equal_their_pytorch_contract(k, dtype, dim):
    ext = kernels.load_extension()
    num_experts, n = 8, 300
    idx, keep, weights = routing(n, k, num_experts, empty_expert=5, device="cuda")
    ref = kernels.TorchReference
    got, want = ext.build_index(idx, keep, num_experts), ref.build_index(idx, keep, num_experts)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    dest, src, _ = want
    x = torch.randn(n, dim, device="cuda", dtype=dtype)
    assert torch.equal(ext.permute(x, src, k), ref.permute(x, src, k))  # a copy: exact
    rows = torch.randn(n * k, dim, device="cuda", dtype=dtype)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(ext.combine(rows, weights, dest), ref.combine(rows, weights, dest), **tol)
    torch.testing.assert_close(ext.combine(rows, None, dest), ref.combine(rows, None, dest), **tol)
    dy = torch.randn(n, dim, device="cuda")
    for a, b in zip(ext.combine_backward(dy, rows, weights, dest, src), ref.combine_backward(dy, rows, weights, dest,
                                                                                             src)):
        torch.testing.assert_close(a, b, **tol)


@cuda
@pytest.mark.parametrize("k, capacity_factor", [(1, 1.0), (2, 1.5), (2, 100.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_layer_with_the_extension_equals_the_sorted_path(k, capacity_factor, dtype):
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=8, top_k=k, capacity_factor=capacity_factor, min_capacity=1)
    layer = MoELayer.upcycle(moe_ffn(), cfg).cuda()
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(4, 50, 16, device="cuda")
    results = {}
    for mode in ("sorted", "cuda"):
        layer.config = dataclasses.replace(cfg, dispatch=mode)
        xi = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            y, stats = layer(xi)
        y.float().pow(2).sum().backward()
        results[mode] = [y.detach().float(), xi.grad, *[p.grad.clone() for p in layer.parameters()]]
        layer.zero_grad()
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for a, b in zip(results["sorted"], results["cuda"]):
        torch.testing.assert_close(b, a, **tol)


@cuda
def test_extension_dispatch_is_bitwise_deterministic():
    torch.manual_seed(0)
    experts = make_experts("swiglu", 8, 64, 128).cuda()
    idx, keep, weights = routing(2000, 2, 8, device="cuda")
    x = torch.randn(2000, 64, device="cuda")
    runs = [grads(lambda x, w: kernels.dispatch_cuda(x, experts, idx, w, keep), x, weights, experts) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))
