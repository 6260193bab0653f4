"""The specification of moe.py: routing, capacity, losses, both dispatch paths, upcycling, padding, counts."""
import math

import pytest
import torch
import torch.nn.functional as F

from model import LLMConfig, MLP as SwiGLUMLP
from moe import (GELUExperts, LoRA, LoRASwiGLUExperts, MoEConfig, MoELayer, SwiGLUExperts, dispatch_loop,
                 dispatch_sorted, expert_capacity, gate_weights, grouped_linear, keep_within_capacity,
                 load_balancing_loss, load_balancing_loss_per_sample, router_logits, router_z_loss, top_k_routing)
from vision import MLP as GELUMLP

DIM, HIDDEN = 16, 24


def make_layer(form="swiglu", seed=0, **cfg):
    torch.manual_seed(seed)
    config = MoEConfig(**cfg)
    if form == "swiglu":
        experts = SwiGLUExperts(config.num_experts, DIM, HIDDEN)
    else:
        experts = GELUExperts(config.num_experts, DIM, HIDDEN, DIM + 8)
        with torch.no_grad():  # non-zero biases, so the bias path is exercised
            experts.fc1_bias.normal_()
            experts.fc2_bias.normal_()
    return MoELayer(config, experts)


def starve_expert(layer, e):
    """Make expert e everyone's last choice for inputs from `inputs` (whose feature 0 is always 1)."""
    with torch.no_grad():
        layer.router.weight[e] = 0.0
        layer.router.weight[e, 0] = -100.0


def inputs(*shape, seed=1):
    torch.manual_seed(seed)
    x = torch.randn(*shape, DIM)
    x[..., 0] = 1.0
    return x


def keep_reference(expert_index, num_experts, capacity):
    """The capacity rule written as plainly as possible: fill slots choice by choice, token by token."""
    n, k = expert_index.shape
    used = [0] * num_experts
    keep = torch.zeros(n, k, dtype=torch.bool)
    for slot in range(k):
        for t in range(n):
            e = int(expert_index[t, slot])
            if used[e] < capacity:
                keep[t, slot] = True
                used[e] += 1
    return keep


# ---------------------------------------------------------------------------------------------------------
# Router


def test_router_logits_are_fp32_under_bf16_autocast():
    x, w = torch.randn(5, DIM), torch.randn(4, DIM)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.mm(x, w.t()).dtype == torch.bfloat16  # autocast is really on
        logits = router_logits(x, w)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, x @ w.t())


def test_top_k_routing_takes_the_most_probable_experts_first_choice_first():
    logits = torch.tensor([[0.1, 2.0, -1.0, 1.0], [3.0, 0.0, 0.5, 0.2]])
    probs, index, prob = top_k_routing(logits, 2)
    torch.testing.assert_close(probs, logits.softmax(-1))
    assert index.tolist() == [[1, 3], [0, 2]]
    torch.testing.assert_close(prob, probs.gather(1, index))


def test_gates_of_kept_choices_are_renormalised_to_one_and_dropped_ones_are_zero():
    prob = torch.tensor([[0.5, 0.3], [0.4, 0.2], [0.6, 0.1]])
    keep = torch.tensor([[True, True], [True, False], [False, False]])
    w = gate_weights(prob, keep, renormalize=True)
    torch.testing.assert_close(w, torch.tensor([[0.625, 0.375], [1.0, 0.0], [0.0, 0.0]]))
    torch.testing.assert_close(gate_weights(prob, keep, renormalize=False), prob * keep)


def test_noisy_gating_changes_routing_in_training_only():
    layer = make_layer(router_noise=5.0, drop_tokens=False)
    x = torch.randn(64, DIM)
    layer.eval()
    a, b = layer(x)[1].expert_index, layer(x)[1].expert_index
    assert torch.equal(a, b)  # evaluation routing is deterministic
    torch.testing.assert_close(a, top_k_routing(router_logits(x, layer.router.weight), 2)[1])
    layer.train()
    assert not torch.equal(layer(x)[1].expert_index, layer(x)[1].expert_index)


# ---------------------------------------------------------------------------------------------------------
# Balancing loss and z-loss


def test_balance_loss_is_one_for_perfectly_uniform_routing():
    E, N = 4, 32
    probs = torch.full((N, E), 1 / E)
    top1 = torch.arange(N) % E  # every expert is first choice equally often
    assert load_balancing_loss(probs, top1, E).item() == pytest.approx(1.0)


def test_balance_loss_grows_under_collapse():
    E, N = 4, 32
    uniform = load_balancing_loss(torch.full((N, E), 1 / E), torch.arange(N) % E, E)
    skewed_probs = torch.tensor([0.7, 0.1, 0.1, 0.1]).expand(N, E)
    skewed = load_balancing_loss(skewed_probs, torch.where(torch.arange(N) < 24, 0, torch.arange(N) % E), E)
    collapsed = load_balancing_loss(F.one_hot(torch.zeros(N, dtype=torch.long), E).float(),
                                    torch.zeros(N, dtype=torch.long), E)
    assert uniform < skewed < collapsed
    assert collapsed.item() == pytest.approx(E)  # everything on one expert with probability 1


def test_balance_loss_matches_a_hand_computed_example():
    # 4 tokens, 2 experts. First choices: 0, 0, 0, 1 -> ce = (3/4, 1/4).
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.8, 0.2], [0.3, 0.7]])
    top1 = torch.tensor([0, 0, 0, 1])
    # me = (0.65, 0.35); l = E * (0.65 * 0.75 + 0.35 * 0.25) = 2 * 0.575 = 1.15
    assert load_balancing_loss(probs, top1, 2).item() == pytest.approx(1.15)


def test_balance_loss_gradient_pushes_probability_away_from_busy_experts():
    # d l_aux / d p[t, e] = E * ce_e / N: the more tokens an expert already has, the harder it is pushed down
    probs = torch.rand(8, 4).softmax(-1).requires_grad_()
    top1 = torch.tensor([0, 0, 0, 0, 0, 1, 1, 2])
    load_balancing_loss(probs, top1, 4).backward()
    ce = torch.tensor([5, 2, 1, 0]) / 8
    torch.testing.assert_close(probs.grad, (4 * ce / 8).expand(8, 4))


def test_per_sample_balance_loss_is_the_mean_of_each_sample_s_own_loss():
    """CuMo's form: each image's patches balanced on their own, then averaged over the images."""
    torch.manual_seed(0)
    probs, top1 = torch.rand(12, 4).softmax(-1), torch.randint(0, 4, (12,))
    sample = torch.tensor([0] * 5 + [2] * 7)  # sample 1 has no tokens (all padding): it is left out
    expected = (load_balancing_loss(probs[:5], top1[:5], 4) + load_balancing_loss(probs[5:], top1[5:], 4)) / 2
    torch.testing.assert_close(load_balancing_loss_per_sample(probs, top1, sample, 4), expected)
    # one sample: the batch-wide loss; per-sample balance is stricter than the batch's
    torch.testing.assert_close(load_balancing_loss_per_sample(probs, top1, torch.zeros(12, dtype=torch.long), 4),
                               load_balancing_loss(probs, top1, 4))
    halves = torch.tensor([0] * 6 + [1] * 6)
    split = F.one_hot(torch.tensor([0] * 6 + [1] * 6), 4).float()  # each sample on one expert, the batch balanced
    assert load_balancing_loss(split, halves, 4) < load_balancing_loss_per_sample(split, halves, halves, 4)


def test_moe_layer_balances_per_sample_when_asked():
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(balance_per_sample=True, drop_tokens=False), GELUExperts(4, DIM, HIDDEN, DIM))
    x, mask = torch.randn(3, 7, DIM), torch.ones(3, 7, dtype=torch.bool)
    mask[1, 4:] = False
    _, stats = layer(x, token_mask=mask)
    logits = layer.router(x).float()
    per = [load_balancing_loss(logits[b][mask[b]].softmax(-1), logits[b][mask[b]].argmax(-1), 4) for b in range(3)]
    torch.testing.assert_close(stats.balance_loss, sum(per) / 3)


def test_router_z_loss_is_mean_squared_logsumexp():
    logits = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    expected = (math.log(2) ** 2 + math.log(math.e + math.e ** 2) ** 2) / 2
    assert router_z_loss(logits).item() == pytest.approx(expected)


# ---------------------------------------------------------------------------------------------------------
# Capacity


def test_expert_capacity_formula():
    assert expert_capacity(num_tokens=10, num_experts=4, k=2, capacity_factor=1.5, min_capacity=0) == 8  # ceil(7.5)
    assert expert_capacity(10, 4, 1, 1.0, 0) == 3
    assert expert_capacity(2, 4, 2, 1.5, min_capacity=4) == 4


def test_capacity_drops_past_capacity_in_token_order_top1_before_top2():
    expert_index = torch.tensor([[0, 1], [0, 1], [1, 0], [0, 1]])
    keep = keep_within_capacity(expert_index, num_experts=2, capacity=2)
    # Expert 0: first choices of tokens 0 and 1 take its 2 slots; token 3's first choice and token 2's second are
    # dropped. Expert 1: token 2's first choice, then token 0's second choice; token 1's and 3's second dropped.
    assert keep.tolist() == [[True, True], [True, False], [True, False], [False, False]]


@pytest.mark.parametrize("k", [1, 2, 3])
def test_capacity_matches_the_slot_filling_rule_on_random_routing(k):
    torch.manual_seed(k)
    for capacity in [0, 1, 3, 7, 100]:
        expert_index = torch.rand(40, 5).topk(k, dim=-1).indices
        assert torch.equal(keep_within_capacity(expert_index, 5, capacity), keep_reference(expert_index, 5, capacity))


def test_layer_reports_dropped_assignments_and_dropped_tokens_output_zero():
    layer = make_layer(capacity_factor=0.25, min_capacity=0, dispatch="loop")
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0, 0] = 10.0  # every token with x[0] > 0 prefers expert 0
    x = torch.randn(32, DIM)
    x[:, 0] = x[:, 0].abs() + 1.0
    y, stats = layer(x)
    capacity = expert_capacity(32, 4, 2, 0.25, 0)  # 4 slots per expert
    _, index, _ = top_k_routing(router_logits(x, layer.router.weight), 2)
    keep = keep_reference(index, 4, capacity)
    assert stats.dropped.item() == (~keep).sum().item() > 0
    fully_dropped = ~keep.any(dim=1)
    assert fully_dropped.any()
    assert torch.all(y[fully_dropped] == 0)


@pytest.mark.parametrize("dispatch", ["loop", "sorted"])
def test_dropless_mode_never_drops(dispatch):
    dropping, dropless = make_layer(dispatch=dispatch), make_layer(dispatch=dispatch, drop_tokens=False)
    x = inputs(64)
    for layer in (dropping, dropless):
        with torch.no_grad():
            layer.router.weight[0, 0] = 5.0  # expert 0 is everyone's first choice
    y_drop, s_drop = dropping(x)
    y, s = dropless(x)
    assert s_drop.dropped.item() > 0 and s.dropped.item() == 0
    # the same layer called with dropless=True ignores its capacity too
    y_override, s_override = dropping(x, dropless=True)
    assert s_override.dropped.item() == 0
    torch.testing.assert_close(y_override, y)


# ---------------------------------------------------------------------------------------------------------
# Dispatch: the fast path equals the reference loop


@pytest.mark.parametrize("form", ["swiglu", "gelu"])
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("drop_tokens", [True, False])
def test_sorted_dispatch_equals_reference_loop(form, k, drop_tokens):
    layers = {d: make_layer(form, seed=k, top_k=k, dispatch=d, drop_tokens=drop_tokens, capacity_factor=1.0)
              for d in ("loop", "sorted")}
    for layer in layers.values():
        starve_expert(layer, 3)  # expert 3 never receives a token
        with torch.no_grad():
            layer.router.weight[0, 0] = 0.5  # expert 0 overloaded, so capacity drops some
    x = inputs(2, 37)
    grads, outs = {}, {}
    for name, layer in layers.items():
        xi = x.clone().requires_grad_()
        y, stats = layer(xi)
        assert stats.expert_counts[:, 3].sum() == 0
        (y.square().sum() + stats.balance_loss).backward()
        outs[name] = (y, stats.dropped)
        grads[name] = [xi.grad] + [p.grad for p in layer.parameters()]
    if drop_tokens:
        assert outs["loop"][1] > 0  # the case with drops really is exercised
    torch.testing.assert_close(outs["sorted"][0], outs["loop"][0], atol=1e-5, rtol=1e-5)
    for g_sorted, g_loop in zip(grads["sorted"], grads["loop"]):
        torch.testing.assert_close(g_sorted, g_loop, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not hasattr(F, "grouped_mm"), reason="torch.nn.functional.grouped_mm needs PyTorch >= 2.10")
def test_grouped_mm_equals_loop_over_slices_including_empty_groups():
    torch.manual_seed(0)
    w = torch.randn(4, 24, 16, requires_grad=True)  # (E, out, in); strides are multiples of 16 bytes
    x = torch.randn(20, 16, requires_grad=True)
    sizes = torch.tensor([7, 0, 13, 0])
    dy = torch.randn(20, 24)
    results = []
    for use_grouped_mm in (False, True):
        x.grad, w.grad = None, None
        y = grouped_linear(x, w, sizes, use_grouped_mm)
        y.backward(dy)
        results.append((y, x.grad.clone(), w.grad.clone()))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)
    assert torch.all(results[1][2][[1, 3]] == 0)  # empty groups get zero weight gradients


@pytest.mark.skipif(not hasattr(F, "grouped_mm"), reason="torch.nn.functional.grouped_mm needs PyTorch >= 2.10")
def test_grouped_mm_under_autocast_computes_in_the_autocast_dtype_like_the_loop():
    torch.manual_seed(0)
    w, x, sizes = torch.randn(4, 24, 16), torch.randn(20, 16), torch.tensor([5, 0, 9, 6])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused, loop = grouped_linear(x, w, sizes, True), grouped_linear(x, w, sizes, False)
    assert fused.dtype == loop.dtype == torch.bfloat16
    torch.testing.assert_close(fused, loop, atol=0.05, rtol=0.02)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="atomics (and so non-determinism) only arise on CUDA")
def test_sorted_dispatch_is_bitwise_deterministic_on_cuda():
    layer = make_layer(num_experts=8).cuda()
    x = torch.randn(4096, DIM, device="cuda", requires_grad=True)
    runs = []
    for _ in range(2):
        x.grad = None
        layer.zero_grad()
        y, _ = layer(x)
        y.sum().backward()
        runs.append((y, x.grad.clone(), layer.experts.up_proj.grad.clone()))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_dispatch_functions_agree_when_called_directly():
    torch.manual_seed(0)
    experts = SwiGLUExperts(4, DIM, HIDDEN)
    x = torch.randn(10, DIM)
    index = torch.tensor([[0, 1]] * 5 + [[1, 2]] * 5)
    keep = torch.ones(10, 2, dtype=torch.bool)
    keep[3, 1] = keep[7, 0] = False
    w = torch.rand(10, 2) * keep
    torch.testing.assert_close(dispatch_sorted(x, experts, index, w, keep), dispatch_loop(x, experts, index, w, keep))


# ---------------------------------------------------------------------------------------------------------
# Sparse upcycling


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("dispatch", ["loop", "sorted"])
def test_upcycled_moe_equals_dense_ffn(k, dispatch):
    torch.manual_seed(k)
    dense = SwiGLUMLP(LLMConfig(dim=DIM, n_head=2, ffn_dim=HIDDEN))
    config = MoEConfig(num_experts=4, top_k=k, drop_tokens=False, dispatch=dispatch)
    moe = MoELayer.upcycle(dense, config, SwiGLUExperts)
    for seed in range(3):  # any input
        torch.manual_seed(100 + seed)
        x = torch.randn(3, 11, DIM) * (seed + 1)
        torch.testing.assert_close(moe(x)[0], dense(x), atol=1e-6, rtol=1e-5)


def test_upcycled_gelu_moe_equals_dense_vit_mlp():
    torch.manual_seed(0)
    dense = GELUMLP(DIM, HIDDEN, DIM + 8)
    moe = MoELayer.upcycle(dense, MoEConfig(drop_tokens=False), GELUExperts)
    x = torch.randn(50, DIM)
    torch.testing.assert_close(moe(x)[0], dense(x), atol=1e-6, rtol=1e-5)


def test_upcycled_experts_are_copies_and_router_is_fresh():
    dense = SwiGLUMLP(LLMConfig(dim=DIM, n_head=2, ffn_dim=HIDDEN))
    moe = MoELayer.upcycle(dense, MoEConfig(), SwiGLUExperts)
    for e in range(4):
        assert torch.equal(moe.experts.down_proj[e], dense.down_proj.weight)
    assert moe.router.weight.shape == (4, DIM) and moe.router.bias is None
    moe.experts.up_proj.data[0] += 1  # copies, not views of the dense weight
    assert not torch.equal(moe.experts.up_proj[0], dense.up_proj.weight)


@pytest.mark.parametrize("shared", [False, True])
def test_upcycle_noise_makes_experts_differ_by_about_that_much(shared):
    """--moe.upcycle_noise (the balancing ablation's perturbed copies): each expert its own noise, of about the
    asked size relative to the dense weight; a shared expert stays the exact (halved) copy; 0 is exact copies."""
    torch.manual_seed(0)
    dense = SwiGLUMLP(LLMConfig(dim=DIM, n_head=2, ffn_dim=HIDDEN))
    moe = MoELayer.upcycle(dense, MoEConfig(upcycle_noise=0.1, shared_expert=shared), SwiGLUExperts)
    scale = 0.5 if shared else 1.0
    for name in ("gate_proj", "up_proj", "down_proj"):
        w, ref = getattr(moe.experts, name), getattr(dense, name).weight * (scale if name == "down_proj" else 1)
        for e in range(4):
            relative = (w[e] - ref).std() / ref.std()
            assert 0.08 < relative < 0.12, (name, e, relative)
            for other in range(e):
                assert not torch.allclose(w[e], w[other])
    if shared:
        assert torch.equal(moe.shared.down_proj[0], dense.down_proj.weight * 0.5)
    x = torch.randn(2, 9, DIM)
    assert not torch.allclose(moe(x)[0], dense(x), atol=1e-6)  # no longer exactly the dense FFN
    with pytest.raises(ValueError, match="upcycle_noise"):
        MoEConfig(upcycle_noise=-1)


def test_upcycled_moe_with_eval_capacity_never_drops_at_moe_llava_settings():
    # E=4, k=2, eval cf=2.0 gives C >= S: no expert can overflow, so eval of an upcycled layer is exact.
    dense = SwiGLUMLP(LLMConfig(dim=DIM, n_head=2, ffn_dim=HIDDEN))
    moe = MoELayer.upcycle(dense, MoEConfig(), SwiGLUExperts).eval()
    with torch.no_grad():
        moe.router.weight[1] += 3.0  # strongly imbalanced
    x = torch.randn(64, DIM)
    y, stats = moe(x)
    assert stats.dropped.item() == 0
    torch.testing.assert_close(y, dense(x), atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Gradients, padding and counts


@pytest.mark.parametrize("form", ["swiglu", "gelu"])
def test_gradients_reach_router_and_every_expert(form):
    layer = make_layer(form, num_experts=4, top_k=2, drop_tokens=False)
    y, stats = layer(torch.randn(4, 32, DIM))
    assert (stats.expert_counts.sum(0) > 0).all()  # every expert got tokens
    (y.square().mean() + 0.01 * stats.balance_loss).backward()
    assert layer.router.weight.grad.abs().sum() > 0
    for p in layer.experts.parameters():
        for e in range(4):
            assert p.grad[e].abs().sum() > 0


def test_expert_without_tokens_gets_zero_gradient_not_none():
    layer = make_layer()
    starve_expert(layer, 2)
    y, _ = layer(inputs(20))
    y.sum().backward()
    for p in layer.experts.parameters():
        assert p.grad is not None and torch.all(p.grad[2] == 0)


@pytest.mark.parametrize("dispatch", ["loop", "sorted"])
def test_padding_changes_neither_output_loss_nor_counts(dispatch):
    layer = make_layer(dispatch=dispatch, capacity_factor=1.0, min_capacity=0)
    torch.manual_seed(3)
    real = torch.randn(2, 10, DIM)
    padded = torch.cat([real, 100 * torch.randn(2, 6, DIM)], dim=1)  # 6 loud padding positions per row
    mask = torch.cat([torch.ones(2, 10, dtype=torch.bool), torch.zeros(2, 6, dtype=torch.bool)], dim=1)
    y_real, s_real = layer(real)
    y_pad, s_pad = layer(padded, token_mask=mask)
    torch.testing.assert_close(y_pad[:, :10], y_real)
    assert torch.all(y_pad[:, 10:] == 0)
    torch.testing.assert_close(s_pad.balance_loss, s_real.balance_loss)
    torch.testing.assert_close(s_pad.z_loss, s_real.z_loss)
    assert torch.equal(s_pad.expert_counts, s_real.expert_counts)
    assert torch.equal(s_pad.top1_counts, s_real.top1_counts)
    assert torch.equal(s_pad.dropped, s_real.dropped)
    assert torch.all(s_pad.expert_index[:, 10:] == -1)


def test_counts_split_by_modality_and_sum_to_real_tokens_times_k():
    layer = make_layer(top_k=2)
    x = torch.randn(3, 20, DIM)
    token_mask = torch.ones(3, 20, dtype=torch.bool)
    token_mask[1, 15:] = token_mask[2, 8:] = False
    image_mask = torch.zeros(3, 20, dtype=torch.bool)
    image_mask[:, 2:6] = True
    _, stats = layer(x, token_mask=token_mask, image_mask=image_mask)
    n_image = (image_mask & token_mask).sum().item()
    n_text = (~image_mask & token_mask).sum().item()
    assert stats.expert_counts.shape == (2, 4)
    assert stats.expert_counts[0].sum().item() == 2 * n_text
    assert stats.expert_counts[1].sum().item() == 2 * n_image
    assert stats.top1_counts.sum().item() == n_text + n_image
    # counts agree with the per-position choices
    chosen = stats.expert_index[image_mask & token_mask]
    assert torch.equal(stats.expert_counts[1], torch.bincount(chosen.reshape(-1), minlength=4))


def test_config_rejects_impossible_settings():
    with pytest.raises(ValueError, match="top_k"):
        MoEConfig(num_experts=2, top_k=3)
    with pytest.raises(ValueError, match="dispatch"):
        MoEConfig(dispatch="fast")
    with pytest.raises(ValueError, match="experts given"):
        MoELayer(MoEConfig(num_experts=4), SwiGLUExperts(2, DIM, HIDDEN))


@pytest.mark.parametrize("dispatch", ["loop", "sorted"])
def test_a_batch_of_padding_only_routes_nothing_and_does_not_crash(dispatch):
    layer = make_layer(dispatch=dispatch)
    x = torch.randn(2, 5, DIM, requires_grad=True)
    y, stats = layer(x, token_mask=torch.zeros(2, 5, dtype=torch.bool))
    (y.sum() + stats.balance_loss + stats.z_loss).backward()
    assert torch.all(y == 0) and stats.balance_loss.item() == 0 and stats.expert_counts.sum() == 0
    assert torch.all(stats.expert_index == -1)


def test_integer_masks_mean_the_same_as_boolean_masks():
    layer = make_layer()
    x = inputs(2, 8)
    token_mask = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])
    image_mask = torch.tensor([[0, 1, 1, 0, 0, 0, 0, 0]] * 2)
    y_int, s_int = layer(x, token_mask, image_mask)
    y_bool, s_bool = layer(x, token_mask.bool(), image_mask.bool())
    torch.testing.assert_close(y_int, y_bool)
    assert torch.equal(s_int.expert_counts, s_bool.expert_counts)


# ---------------------------------------------------------------------------------------------------------
# LoRA, and LoRA experts on one frozen FFN (LLaVA-MoLE)


def test_lora_starts_at_the_base_and_merges_into_what_it_computes():
    torch.manual_seed(0)
    base = torch.nn.Linear(DIM, HIDDEN)
    lora = LoRA(base, rank=4, alpha=8.0)
    x = torch.randn(5, DIM)
    torch.testing.assert_close(lora(x), base(x))  # B = 0: exactly the base model
    assert not base.weight.requires_grad and lora.A.requires_grad and lora.B.requires_grad
    with torch.no_grad():
        lora.B.normal_()  # as after training
    merged = lora.merge()
    torch.testing.assert_close(merged(x), lora(x), atol=1e-5, rtol=1e-5)
    assert isinstance(merged, torch.nn.Linear) and not torch.allclose(merged(x), base(x))


def mole_layer(seed=0, k=1, dispatch="sorted", trained=True):
    torch.manual_seed(seed)
    ffn = SwiGLUMLP(LLMConfig(dim=DIM, n_head=2, ffn_dim=HIDDEN))
    layer = MoELayer(MoEConfig(num_experts=3, top_k=k, drop_tokens=False, dispatch=dispatch),
                     LoRASwiGLUExperts(ffn, 3, rank=4, alpha=8.0))
    if trained:
        with torch.no_grad():
            for B in (layer.experts.gate_proj_B, layer.experts.up_proj_B, layer.experts.down_proj_B):
                B.normal_(std=0.3)  # experts that differ, as after training
    return ffn, layer


def test_a_mole_layer_starts_at_its_frozen_ffn():
    ffn, layer = mole_layer(trained=False)
    x = inputs(2, 7)
    torch.testing.assert_close(layer(x)[0], ffn(x), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("k", [1, 2])
def test_lora_experts_sorted_dispatch_equals_the_loop_and_expert_e_is_the_ffn_with_e_s_updates(k):
    _, loop = mole_layer(k=k, dispatch="loop")
    _, fast = mole_layer(k=k, dispatch="sorted")
    x = inputs(3, 5)
    torch.testing.assert_close(fast(x)[0], loop(x)[0], atol=1e-6, rtol=1e-5)
    ex = loop.experts
    e = 1
    by_hand = SwiGLUMLP(LLMConfig(dim=DIM, n_head=2, ffn_dim=HIDDEN))
    with torch.no_grad():
        for name in ex.MATRICES:
            W = getattr(ex.base, name).weight + ex.scale * getattr(ex, f"{name}_B")[e] @ getattr(ex, f"{name}_A")[e]
            getattr(by_hand, name).weight.copy_(W)
    torch.testing.assert_close(ex.forward_one(e, x[0]), by_hand(x[0]), atol=1e-5, rtol=1e-5)


def test_only_lora_and_router_parameters_learn_and_top1_gates_are_one():
    ffn, layer = mole_layer(k=1)
    x = inputs(2, 6)
    out, stats = layer(x)
    (out.sum() + stats.balance_loss).backward()
    assert all(p.grad is None for p in ffn.parameters())  # the base FFN is frozen
    assert all(p.grad is not None for p in layer.experts.expert_parameters()) and layer.router.weight.grad is not None
    assert int(stats.top1_counts.sum()) == 12 and int(stats.expert_counts.sum()) == 12  # every real token, k = 1
    total = sum(p.numel() for p in layer.experts.expert_parameters())
    assert total == 3 * 3 * 4 * (DIM + HIDDEN)  # 3 experts x 3 matrices x r (in + out)


def test_lora_experts_are_not_spread_over_ranks_and_say_why():
    _, layer = mole_layer()
    with pytest.raises(ValueError, match="LoRA experts are not spread over ranks"):
        layer.shard_experts(group=None)


# --- variants: a shared expert (DeepSeekMoE), aux-loss-free balancing (DeepSeek-V3)


@pytest.mark.parametrize("form", ["swiglu", "gelu"])
def test_a_shared_expert_upcycles_exactly_and_runs_for_every_token(form):
    """Shared + routed copies would give twice the FFN: upcycling halves each copy's output, so the layer starts
    as the dense FFN; then the shared expert gets every real token (a gradient), the routed ones their share."""
    torch.manual_seed(0)
    dense = SwiGLUMLP(LLMConfig(dim=DIM, n_head=2, ffn_dim=HIDDEN)) if form == "swiglu" else \
        GELUMLP(DIM, HIDDEN, DIM + 8)
    config = MoEConfig(num_experts=4, top_k=2, drop_tokens=False, shared_expert=True)
    moe = MoELayer.upcycle(dense, config, SwiGLUExperts if form == "swiglu" else GELUExperts)
    assert moe.shared.num_experts == 1 and moe.experts.num_experts == 4
    x = torch.randn(2, 9, DIM)
    torch.testing.assert_close(moe(x)[0], dense(x), atol=1e-6, rtol=1e-5)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 5:] = False
    y, _ = moe(x, token_mask=mask)
    assert (y[1, 5:] == 0).all()  # padding goes through no expert, the shared one included
    y.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in moe.shared.parameters())


def test_aux_loss_free_bias_changes_the_choice_and_never_the_gates():
    layer = make_layer(num_experts=4, top_k=2, drop_tokens=False, bias_update_rate=0.001)
    x = inputs(40)
    plain_logits, plain_probs, plain_index, plain_weights, _ = layer.route(x)
    layer.balance_bias.bias[3] = 1.0  # larger than any probability difference: expert 3 is always chosen
    logits, probs, index, weights, _ = layer.route(x)
    assert (index == 3).any(dim=-1).all() and not (plain_index == 3).any(dim=-1).all()
    torch.testing.assert_close(probs, plain_probs)  # the router's probabilities are untouched
    chosen = probs.gather(-1, index)
    torch.testing.assert_close(weights, chosen / chosen.sum(-1, keepdim=True))  # gates from the probabilities alone


def test_aux_loss_free_bias_moves_toward_the_under_loaded_experts_after_each_step():
    layer = make_layer(num_experts=4, top_k=1, drop_tokens=False, bias_update_rate=0.01).train()
    layer.balance_bias.load.copy_(torch.tensor([10.0, 2.0, 2.0, 2.0]))  # mean 4: expert 0 over, the rest under
    layer.balance_bias.update()
    torch.testing.assert_close(layer.balance_bias.bias, torch.tensor([-0.01, 0.01, 0.01, 0.01]))
    assert layer.balance_bias.load.sum() == 0  # the next step counts afresh
    assert "balance_bias.bias" in layer.state_dict() and "balance_bias.load" not in layer.state_dict()
    layer(inputs(30))  # a training forward counts its choices; evaluation does not
    assert layer.balance_bias.load.sum() == 30
    layer.eval()(inputs(30))
    assert layer.balance_bias.load.sum() == 30


def test_aux_loss_free_balancing_undoes_a_collapsed_router_without_any_loss():
    """A router that sends almost every token to expert 0, never trained: the bias updates alone even the load."""
    layer = make_layer(num_experts=4, top_k=1, drop_tokens=False, bias_update_rate=0.005)
    with torch.no_grad():
        layer.router.weight[0, 0] = 3.0  # feature 0 of `inputs` is always 1: expert 0 wins nearly always
    x = inputs(400)

    def max_over_mean_load():
        counts = torch.bincount(layer.eval().route(x)[2][:, 0], minlength=4).float()
        return (counts.max() / counts.mean()).item()
    before = max_over_mean_load()
    for _ in range(150):
        layer.train().route(x)  # a training step's choices (the experts' arithmetic plays no part)
        layer.balance_bias.update()
    # from every token on one expert (4.0) to near balance; the sign rule then cycles around it (same tokens
    # every step here), which is why DeepSeek-V3 keeps the rate small
    assert before == 4.0 and max_over_mean_load() < 1.7
