"""Run by tests/test_distributed.py under torchrun (2 processes, gloo): checks that need several processes.

    torchrun --standalone --nproc_per_node=2 tests/distributed_worker.py expert_parallel_layer
"""
import copy
import sys

import torch
import torch.distributed as dist

from moe import GELUExperts, MoEConfig, MoELayer, SwiGLUExperts, expert_shard


def check_layer(config, make_experts, rank, rank1_input_grad=True):
    """An MoE layer with its experts spread over the 2 ranks computes what the whole layer computes on each rank's
    tokens: outputs, token and router gradients, and expert gradients summed over the ranks' tokens.
    rank1_input_grad=False: rank 1's tokens need no gradient (a text-only batch under a frozen LLM)."""
    torch.manual_seed(0)  # the same weights on both ranks (a new process's default seed is random)
    experts = make_experts()
    whole = MoELayer(config, experts)
    dim = experts.in_dim
    steer = torch.zeros(dim)
    steer[0] = 4.0
    with torch.no_grad():  # expert 3's router row points along -steer: rank 1's tokens (along +steer) avoid it
        whole.router.weight[3] = -steer
    torch.manual_seed(1 + rank)  # each rank its own tokens, padding included
    x = torch.randn(3, 7, dim) + (steer if rank == 1 else -steer)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1, 5:] = False
    grad_out = torch.randn(3, 7, experts.out_dim)

    needs_grad = rank1_input_grad or rank == 0
    x_whole = x.clone().requires_grad_(needs_grad)
    y_whole, stats_whole = whole(x_whole, token_mask=mask)
    (y_whole * grad_out).sum().backward()

    sharded = copy.deepcopy(whole)
    sharded.zero_grad(set_to_none=True)
    sharded.shard_experts(dist.group.WORLD)
    x_shard = x.clone().requires_grad_(needs_grad)
    y_shard, stats_shard = sharded(x_shard, token_mask=mask)
    (y_shard * grad_out).sum().backward()

    counts = stats_whole.expert_counts.sum(0)
    if rank == 1:
        assert counts[3] == 0, "the test needs an expert that gets no tokens from rank 1"
    torch.testing.assert_close(y_shard, y_whole, rtol=1e-5, atol=1e-6)
    if needs_grad:
        torch.testing.assert_close(x_shard.grad, x_whole.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sharded.router.weight.grad, whole.router.weight.grad, rtol=1e-5, atol=1e-6)
    assert torch.equal(stats_shard.expert_counts, stats_whole.expert_counts)
    assert int(stats_shard.dropped) == int(stats_whole.dropped)
    for name, p in whole.experts.named_parameters():
        summed = p.grad.clone()
        dist.all_reduce(summed)  # the whole layer's expert gradient over both ranks' tokens
        torch.testing.assert_close(getattr(sharded.experts, name).grad, expert_shard(summed, rank, 2),
                                   rtol=1e-5, atol=1e-6)
    return int(stats_whole.dropped)


def expert_parallel_layer():
    rank = dist.get_rank()
    dropped = check_layer(MoEConfig(num_experts=4, top_k=2, capacity_factor=1.0, min_capacity=1),
                          lambda: SwiGLUExperts(4, 16, 24), rank)
    dist.all_reduce(t := torch.tensor(dropped))
    assert t > 0, "the capacity should drop some assignments"
    check_layer(MoEConfig(num_experts=4, top_k=1, drop_tokens=False), lambda: GELUExperts(4, 16, 24, 12), rank)
    check_layer(MoEConfig(num_experts=4, top_k=2, drop_tokens=False), lambda: SwiGLUExperts(4, 16, 24), rank)
    check_layer(MoEConfig(num_experts=4, top_k=2), lambda: SwiGLUExperts(4, 16, 24), rank, rank1_input_grad=False)


if __name__ == "__main__":
    dist.init_process_group("gloo")
    try:
        {"expert_parallel_layer": expert_parallel_layer}[sys.argv[1]]()
        print(f"rank {dist.get_rank()}: ok", flush=True)
    finally:
        dist.destroy_process_group()
