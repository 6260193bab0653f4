"""
moe.py -- Mixture-of-Experts: router, balancing losses, experts, capacity, dispatch and sparse upcycling.

An MoE layer replaces one dense feed-forward network (FFN) by E expert FFNs and a router. The router scores
every token against every expert; the token goes to its k best experts, and the layer's output is the
gate-weighted sum of what those k experts compute. Parameters grow E-fold, compute per token only k-fold.

Read it top to bottom:
  1. MoEConfig                       every knob, with MoE-LLaVA's values as defaults
  2. routing                         router_logits -> top_k_routing -> expert_capacity / keep_within_capacity
                                     -> gate_weights
  1b. placement                      moe_layer_indices: which blocks of a stack get an MoE FFN
  3. the auxiliary losses            load_balancing_loss (MoE-LLaVA / DeepSpeed), its per-sample form (CuMo),
                                     router_z_loss (ST-MoE); BalanceBias: balancing without a loss (DeepSeek-V3)
  4. the experts                     stacked weights, one small class per expert form (SwiGLU, GELU MLP,
                                     LoRA updates of one frozen FFN); each computes one expert (readable) or
                                     all experts at once (grouped); LoRA itself, the form's building block
  5. dispatch                        dispatch_loop (the reference) and dispatch_sorted (sort + grouped matmul);
                                     kernels/ holds the same as an optional CUDA extension (dispatch="cuda");
                                     dispatch_expert_parallel: the experts spread over ranks (all_to_all)
  6. MoELayer                        the pieces joined, returning (output, RoutingStats); optionally a shared
                                     expert every token goes through (DeepSeekMoE)
  7. upcycling                       MoELayer.upcycle: every expert a copy of a trained dense FFN

Sources: MoE-LLaVA (arXiv 2401.15947) and DeepSpeed's `top2gating`; Switch Transformer (arXiv 2101.03961);
CuMo (arXiv 2405.05949) for the per-image balancing loss; LoRA (arXiv 2106.09685) and LLaVA-MoLE (2401.16160);
ST-MoE (arXiv 2202.08906) for the z-loss; DeepSeekMoE (2401.06066) for the shared expert and DeepSeek-V3
(2412.19437) for balancing without a loss; MegaBlocks (arXiv 2211.15841) for sort + grouped GEMM; sparse
upcycling (arXiv 2212.05055). The formulas and hyperparameters we rely on, in our words: docs/reference.md.
"""
import copy
import math
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

DISPATCH_MODES = ("loop", "sorted", "cuda", "auto")  # "cuda": the kernels/ extension; "auto": it when it serves


# ----------------------------------------------------------------------------------------------------------
# 1. Configuration


@dataclass(frozen=True)
class MoEConfig:
    num_experts: int = 4  # E; MoE-LLaVA uses 4
    top_k: int = 2  # k experts per token; MoE-LLaVA uses top-2
    capacity_factor: float = 1.5  # slots per expert in training, as a multiple of a fair share (MoE-LLaVA 1.5)
    eval_capacity_factor: float = 2.0  # the same at evaluation (MoE-LLaVA 2.0)
    min_capacity: int = 4  # floor on the slots per expert (DeepSpeed's default)
    drop_tokens: bool = True  # False = dropless: every token reaches all k of its experts (MegaBlocks)
    renormalize: bool = True  # the k chosen gates are rescaled to sum to 1 (MoE-LLaVA, CuMo)
    router_noise: float = 0.0  # std of Gaussian noise on the router logits when *choosing* experts, training only
    aux_loss_coef: float = 0.01  # weight of the balancing loss (MoE-LLaVA 0.01; CuMo 0.1)
    z_loss_coef: float = 0.0  # weight of the router z-loss (ST-MoE 1e-3; CuMo 0.01; MoE-LLaVA none)
    balance_per_sample: bool = False  # balancing loss per sample (image), then averaged (CuMo); else batch-wide
    aux_over_layers: str = "sum"  # a part's MoE layers' losses: sum (MoE-LLaVA), mean (CuMo) or pooled (MoLE)
    dispatch: str = "sorted"  # "loop": the readable reference; "sorted": sort + grouped matmul; "cuda"/"auto": kernels/
    shared_expert: bool = False  # one more expert that every token goes through, beside the k routed (DeepSeekMoE)
    bias_update_rate: float = 0.0  # > 0: aux-loss-free balancing (DeepSeek-V3: 0.001), see BalanceBias
    upcycle_noise: float = 0.0  # > 0: upcycled experts start as perturbed copies (an ablation), see MoELayer.upcycle

    def __post_init__(self):
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"MoEConfig: top_k={self.top_k} must be between 1 and num_experts={self.num_experts}")
        if self.dispatch not in DISPATCH_MODES:
            raise ValueError(f"MoEConfig: dispatch={self.dispatch!r} is not one of {DISPATCH_MODES}")
        if self.capacity_factor <= 0 or self.eval_capacity_factor <= 0:
            raise ValueError("MoEConfig: capacity factors must be > 0 (set drop_tokens=False for a dropless MoE)")
        if self.aux_over_layers not in ("sum", "mean", "pooled"):
            raise ValueError(f"MoEConfig: aux_over_layers={self.aux_over_layers!r} must be sum, mean or pooled")
        if self.bias_update_rate < 0:
            raise ValueError(f"MoEConfig: bias_update_rate={self.bias_update_rate} must be >= 0")
        if self.upcycle_noise < 0:
            raise ValueError(f"MoEConfig: upcycle_noise={self.upcycle_noise} must be >= 0")


def moe_layer_indices(moe_layers, n_layer):
    """Which of n_layer blocks get an MoE FFN, by MoE-LLaVA's moe_mode (their train script) or an explicit list.

    sparse: every other layer from 0 (MoE-LLaVA's choice) | dense or all: every layer (CuMo's, in the ViT) |
    first_half | second_half | "0,2,5" | "": none.
    """
    modes = {"sparse": range(0, n_layer, 2), "dense": range(n_layer), "all": range(n_layer),
             "first_half": range(n_layer // 2), "second_half": range(n_layer // 2, n_layer)}
    if moe_layers == "":
        return []
    if moe_layers in modes:
        indices = list(modes[moe_layers])
    else:
        try:
            indices = sorted({int(i) for i in moe_layers.split(",")})
        except ValueError:
            raise ValueError(f"moe_layers={moe_layers!r}: use one of {tuple(modes)} or a comma-separated list of "
                             f"layer indices such as '0,2'") from None
    if not indices or indices[0] < 0 or indices[-1] >= n_layer:
        raise ValueError(f"moe_layers={moe_layers!r} selects {indices}: with {n_layer} layers it must select at "
                         f"least one layer in 0..{n_layer - 1}")
    return indices


# ----------------------------------------------------------------------------------------------------------
# 2. Routing: which k experts each token goes to, and with what weight


def router_logits(x, router_weight):
    """Score every token against every expert: (N, H) @ (E, H)^T -> (N, E), always in fp32.

    The router is kept in fp32 even under bf16 autocast: a softmax over a handful of experts is sensitive to
    rounding, and bf16 router logits make the expert choice noisy (Switch Transformer §2.4; MoE-LLaVA/DeepSpeed
    run their gate in fp32 too).
    """
    with torch.autocast(device_type=x.device.type, enabled=False):
        return F.linear(x.float(), router_weight.float())


def top_k_routing(logits, k, noise_std=0.0, choice_bias=None):
    """softmax over experts, then each token's k most probable experts.

    Returns probs (N, E), expert_index (N, k) with column 0 the first choice, and expert_prob (N, k), the
    softmax probability of each chosen expert. With noise_std > 0, Gaussian noise is added to the logits for
    the *choice* only (exploration, in the spirit of Shazeer et al. 2017's noisy top-k); the probabilities, and so
    the gates and the gradients, stay noise-free. The caller passes noise_std=0 at evaluation, so evaluation
    routing is deterministic (DeepSpeed adds Gumbel noise even at eval; we do not). choice_bias (E,), if given,
    is added to the probabilities for the choice alone, too (aux-loss-free balancing: BalanceBias).
    """
    probs = logits.softmax(dim=-1)
    scores = logits if noise_std == 0 else logits + noise_std * torch.randn_like(logits)
    if choice_bias is not None:
        scores = scores.softmax(dim=-1) + choice_bias  # (the order of the logits is that of the probabilities)
    expert_index = scores.topk(k, dim=-1).indices  # sorted: column 0 is the top-1 choice
    expert_prob = probs.gather(-1, expert_index)
    return probs, expert_index, expert_prob


def expert_capacity(num_tokens, num_experts, k, capacity_factor, min_capacity):
    """Slots per expert: C = ceil(k * cf * S / E), at least min_capacity (DeepSpeed top2gating, top-1 has k=1).

    k*S/E is an expert's fair share of the k*S assignments; cf > 1 leaves room for imbalance. Note that with
    MoE-LLaVA's eval setting (E=4, k=2, cf=2.0) C >= S: every expert could take every token, so nothing is
    ever dropped at evaluation.
    """
    return max(math.ceil(k * capacity_factor * num_tokens / num_experts), min_capacity)


def keep_within_capacity(expert_index, num_experts, capacity):
    """Which assignments get one of their expert's `capacity` slots: a (N, k) bool mask.

    Slots are filled in token order, all top-1 choices before any top-2 choice (DeepSpeed top2gating adds the
    top-1 counts to the top-2 positions), so a token loses its second choice before another token loses its
    first. Assignments past the capacity are dropped.
    """
    n, k = expert_index.shape
    # Lay the assignments out slot-major: all top-1 choices (in token order), then all top-2 choices, ...
    one_hot = F.one_hot(expert_index.t().reshape(-1), num_experts)  # (k*N, E)
    # An assignment's place in its expert's queue = how many earlier assignments chose the same expert.
    position = ((one_hot.cumsum(dim=0) - 1) * one_hot).sum(dim=-1)  # (k*N,)
    return (position < capacity).view(k, n).t()


def gate_weights(expert_prob, keep, renormalize):
    """The weight of each (token, choice) in the output: its probability, 0 if dropped, optionally rescaled.

    With renormalize the kept gates of a token sum to 1 (MoE-LLaVA/DeepSpeed renormalise after dropping), which
    is what makes an upcycled MoE compute exactly its dense FFN. A token with every choice dropped gets all-zero
    gates: its FFN output is 0 and the residual stream carries it. With k=1 renormalising makes every gate 1,
    so the router then learns from the balancing loss alone; Switch Transformer keeps the raw probability.
    """
    weights = expert_prob * keep
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(weights.dtype).eps)
    return weights


# ----------------------------------------------------------------------------------------------------------
# 3. Auxiliary losses


def load_balancing_loss(probs, top1_index, num_experts):
    """l_aux = E * sum_e me_e * ce_e   (MoE-LLaVA's balancing loss, DeepSpeed's l_aux; Switch Transformer eq. 4).

    me_e = mean over tokens of the router probability of expert e (differentiable),
    ce_e = fraction of tokens whose first choice is e, counted before dropping (a constant).
    Uniform routing gives 1.0; all tokens on one expert with probability 1 gives E. Minimising it pushes
    probability away from the experts that already get the most tokens.
    """
    if probs.shape[0] == 0:  # a batch of padding only
        return probs.sum()
    me = probs.mean(dim=0)
    ce = torch.bincount(top1_index, minlength=num_experts).to(probs.dtype) / probs.shape[0]
    return num_experts * (me * ce).sum()


def load_balancing_loss_per_sample(probs, top1_index, sample, num_experts):
    """CuMo's form of the balancing loss: load_balancing_loss of each sample's own tokens, averaged over the
    samples (sample: (N,) the sample each token belongs to). CuMo uses it in the ViT and the projector, where a
    sample is one image: every image must spread its patches, not only the batch as a whole."""
    if probs.shape[0] == 0:
        return probs.sum()
    samples, sample = torch.unique(sample, return_inverse=True)  # only samples that have tokens
    S = samples.shape[0]
    n = torch.bincount(sample, minlength=S).to(probs.dtype).unsqueeze(-1)  # (S, 1) tokens per sample
    me = probs.new_zeros(S, num_experts).index_add(0, sample, probs) / n  # (S, E)
    ce = probs.new_zeros(S, num_experts).index_add(0, sample, F.one_hot(top1_index, num_experts).to(probs.dtype)) / n
    return (num_experts * (me * ce).sum(-1)).mean()


def router_z_loss(logits):
    """Router z-loss (ST-MoE eq. 5): mean over tokens of logsumexp(logits)^2; keeps router logits small."""
    if logits.shape[0] == 0:
        return logits.sum()
    return torch.logsumexp(logits, dim=-1).square().mean()


class BalanceBias(nn.Module):
    """Aux-loss-free balancing (DeepSeek-V3, arXiv 2412.19437 §2.1.2): balance the experts' loads without a
    balancing loss, so that no gradient pulls the router away from what the task wants.

    Each expert has a bias b_e that is added to its score when the k experts are *chosen*, never to the gate
    weights. After every optimizer step, b_e moves by `rate` toward balance: down for an expert that got more than
    the mean load in that step, up for one that got less (b_e += rate * sign(mean load - load_e)). An overloaded
    expert is then chosen a little less often next step, until the loads even out. The bias is a buffer (saved in
    checkpoints), not a parameter: no optimizer touches it. DeepSeek-V3 adds it to sigmoid affinities; our scores
    are softmax probabilities, on the same [0, 1] scale.
    """

    def __init__(self, num_experts, rate):
        super().__init__()
        self.rate = rate
        self.register_buffer("bias", torch.zeros(num_experts))
        self.register_buffer("load", torch.zeros(num_experts), persistent=False)  # this step's top-k assignments

    def count(self, expert_index):
        """Add a training forward's choices to this step's load."""
        self.load += torch.bincount(expert_index.reshape(-1), minlength=self.bias.shape[0]).to(self.load)

    @torch.no_grad()
    def update(self, load=None):
        """The step is over: move the bias toward balance and start the next step's count. `load`: the step's
        load summed over every rank, so that all ranks move their biases alike (one process: self.load)."""
        load = self.load if load is None else load
        if load.sum() > 0:
            self.bias += self.rate * torch.sign(load.mean() - load)
        self.load.zero_()


# ----------------------------------------------------------------------------------------------------------
# 4. The experts: E FFNs of one form, stored as stacked weights
#
# Every matrix is one Parameter of shape (E, out, in), Linear-style. So all experts can run as one grouped
# operation, and every expert parameter takes part in every step (an expert that got no tokens gets a zero
# gradient rather than none, which DistributedDataParallel needs). The expert's *form* is the only thing that
# differs between SwiGLU experts (the LLM), GELU-MLP experts (CuMo's ViT and projector) and, later, LoRA experts
# on a frozen FFN (LLaVA-MoLE): each form is one small class with
#   forward_one(e, x)                         expert e on its rows -- the readable form
#   forward_grouped(x, group_sizes, ...)      every expert on its contiguous block of expert-sorted rows
#   upcycle(dense, num_experts)               E copies of a trained dense FFN of the same form
# Routing, losses, capacity and dispatch are written once, in MoELayer.


def grouped_linear(x, weight, group_sizes, use_grouped_mm=False, bias=None):
    """A Linear per expert over expert-sorted rows: rows of group e are multiplied by weight[e]^T (+ bias[e]).

    x: (M, in) with the rows of expert 0 first, then expert 1, ...; weight: (E, out, in); group_sizes: (E,);
    bias: (E, out) or None. The plain form is a loop over contiguous slices. torch.nn.functional.grouped_mm
    (PyTorch >= 2.10) does all groups in one call: int32 cumulative end offsets, 16-byte-aligned strides; a fused
    CUTLASS kernel in bf16 on Hopper/Blackwell (SM90/SM100), a loop inside PyTorch elsewhere.
    """
    if use_grouped_mm:
        dtype = matmul_dtype(x)  # grouped_mm is not on autocast's list: cast as autocast would for a matmul
        offsets = group_sizes.cumsum(0).to(torch.int32)
        out = F.grouped_mm(x.to(dtype), weight.to(dtype).transpose(-2, -1), offs=offsets)
        return out if bias is None else out + bias.repeat_interleave(group_sizes, dim=0, output_size=x.shape[0])
    slices = x.split(group_sizes.tolist())  # .tolist() waits for the device
    # (the bias goes in per slice: a gathered bias's backward accumulates with index_put, whose order under CPU
    # threads varies from run to run, and exact resume would break)
    biases = [None] * len(slices) if bias is None else bias
    return torch.cat([F.linear(x_e, w_e, b_e) for x_e, w_e, b_e in zip(slices, weight, biases)])


def expert_by_expert(experts, x, group_sizes):
    """forward_grouped without a fused grouped matmul: each expert's whole FFN on its block of expert-sorted rows,
    one expert after the other. The same arithmetic as one grouped_linear per matrix, but an expert's rows and
    hidden activations are still in cache for its next matrix: on a 2-core CPU (fp32, forward + backward of the
    whole layer, round robin) 1.05-1.29x faster at the shapes of kernels/bench_peers.py."""
    return torch.cat([experts.forward_one(e, x_e) for e, x_e in enumerate(x.split(group_sizes.tolist()))])


def matmul_dtype(x):
    """The dtype a matmul on x runs in: autocast's when autocast is on for x's device, else x's own."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def grouped_mm_serves(x, *weights):
    """Whether F.grouped_mm's fused kernel applies: CUDA, bf16, every weight row a multiple of 16 bytes."""
    return (hasattr(F, "grouped_mm") and x.is_cuda and matmul_dtype(x) == torch.bfloat16
            and all(w.shape[-1] % 8 == 0 and w.shape[-2] % 8 == 0 for w in weights))


class SwiGLUExperts(nn.Module):
    """E SwiGLU FFNs, the expert form of model.py's MLP: down(silu(gate(x)) * up(x)) (Shazeer 2020; LLaMA)."""

    def __init__(self, num_experts, dim, hidden_dim):
        super().__init__()
        self.num_experts, self.in_dim, self.out_dim = num_experts, dim, dim
        self.gate_proj = nn.Parameter(torch.randn(num_experts, hidden_dim, dim) * 0.02)  # (E, F, H)
        self.up_proj = nn.Parameter(torch.randn(num_experts, hidden_dim, dim) * 0.02)  # (E, F, H)
        self.down_proj = nn.Parameter(torch.randn(num_experts, dim, hidden_dim) * 0.02)  # (E, H, F)

    def forward_one(self, e, x):
        return F.linear(F.silu(F.linear(x, self.gate_proj[e])) * F.linear(x, self.up_proj[e]), self.down_proj[e])

    def forward_grouped(self, x, group_sizes, use_grouped_mm=False):
        if not use_grouped_mm:  # no fused kernel (the CPU, fp32): one expert's whole FFN after the other
            return expert_by_expert(self, x, group_sizes)
        gate = grouped_linear(x, self.gate_proj, group_sizes, use_grouped_mm)
        up = grouped_linear(x, self.up_proj, group_sizes, use_grouped_mm)
        return grouped_linear(F.silu(gate) * up, self.down_proj, group_sizes, use_grouped_mm)

    def weights(self):
        """The stacked matrices, for grouped_mm_serves' alignment check."""
        return self.gate_proj, self.up_proj, self.down_proj

    def scale_output_(self, factor):
        """Multiply every expert's output by factor, in place (upcycling beside a shared expert)."""
        self.down_proj.data.mul_(factor)

    @classmethod
    def upcycle(cls, mlp, num_experts):
        """E copies of a dense SwiGLU MLP with nn.Linear `gate_proj`, `up_proj`, `down_proj` (model.MLP)."""
        hidden_dim, dim = mlp.gate_proj.weight.shape
        experts = cls(num_experts, dim, hidden_dim).to(mlp.gate_proj.weight)
        with torch.no_grad():
            for name in ("gate_proj", "up_proj", "down_proj"):
                getattr(experts, name).copy_(getattr(mlp, name).weight.expand(num_experts, -1, -1))
        return experts


def quick_gelu(x):
    """x * sigmoid(1.702 x): the sigmoid approximation of GELU that OpenAI's CLIP was trained with."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"gelu": F.gelu, "quick_gelu": quick_gelu}


class GELUExperts(nn.Module):
    """E two-layer GELU MLPs with biases, the expert form of vision.py's MLP: fc2(gelu(fc1(x))).

    This is the form CuMo upcycles in the CLIP encoder and the mlp2x_gelu projector. `act` names the GELU
    (ACTIVATIONS): a CLIP ViT loaded from its weights may use quick_gelu, and its experts must too.
    """

    def __init__(self, num_experts, in_dim, hidden_dim, out_dim, act="gelu"):
        super().__init__()
        self.num_experts, self.in_dim, self.out_dim = num_experts, in_dim, out_dim
        self.act, self.act_fn = act, ACTIVATIONS[act]
        self.fc1_weight = nn.Parameter(torch.randn(num_experts, hidden_dim, in_dim) * 0.02)  # (E, F, in)
        self.fc1_bias = nn.Parameter(torch.zeros(num_experts, hidden_dim))  # (E, F)
        self.fc2_weight = nn.Parameter(torch.randn(num_experts, out_dim, hidden_dim) * 0.02)  # (E, out, F)
        self.fc2_bias = nn.Parameter(torch.zeros(num_experts, out_dim))  # (E, out)

    def forward_one(self, e, x):
        h = self.act_fn(F.linear(x, self.fc1_weight[e], self.fc1_bias[e]))
        return F.linear(h, self.fc2_weight[e], self.fc2_bias[e])

    def forward_grouped(self, x, group_sizes, use_grouped_mm=False):
        h = grouped_linear(x, self.fc1_weight, group_sizes, use_grouped_mm, self.fc1_bias)
        return grouped_linear(self.act_fn(h), self.fc2_weight, group_sizes, use_grouped_mm, self.fc2_bias)

    def weights(self):
        """The stacked matrices, for grouped_mm_serves' alignment check."""
        return self.fc1_weight, self.fc2_weight

    def scale_output_(self, factor):
        """Multiply every expert's output by factor, in place (upcycling beside a shared expert)."""
        self.fc2_weight.data.mul_(factor)
        self.fc2_bias.data.mul_(factor)

    @classmethod
    def upcycle(cls, mlp, num_experts):
        """E copies of a dense GELU MLP with nn.Linear `fc1`, `fc2` (vision.MLP)."""
        hidden_dim, in_dim = mlp.fc1.weight.shape
        out_dim = mlp.fc2.weight.shape[0]
        experts = cls(num_experts, in_dim, hidden_dim, out_dim, getattr(mlp, "act", "gelu")).to(mlp.fc1.weight)
        with torch.no_grad():
            for name in ("fc1", "fc2"):
                linear = getattr(mlp, name)
                getattr(experts, f"{name}_weight").copy_(linear.weight.expand(num_experts, -1, -1))
                getattr(experts, f"{name}_bias").copy_(linear.bias.expand(num_experts, -1))
        return experts


# LoRA (Hu et al., arXiv 2106.09685): a frozen matrix W and a trainable low-rank update, W x + (alpha / r) B A x,
# A random and B zero, so that training starts exactly at the base model. LLaVA-MoLE (arXiv 2401.16160) makes the
# update an expert: K LoRA updates of one frozen FFN, and a router that picks one per token.


def lora_pair(num, rank, in_dim, out_dim):
    """num stacked LoRA pairs: A (num, r, in) as nn.Linear initialises a weight (Kaiming-uniform), B (num, out, r)
    zero -- so B A = 0 at the start (Hu et al. §4.1)."""
    A = torch.empty(num, rank, in_dim)
    for a in A:
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    return nn.Parameter(A), nn.Parameter(torch.zeros(num, out_dim, rank))


class LoRA(nn.Module):
    """A frozen nn.Linear with one LoRA update: base(x) + (alpha / r) B A dropout(x). merge() folds it back."""

    def __init__(self, base: nn.Linear, rank=8, alpha=16.0, dropout=0.0):
        super().__init__()
        self.base, self.scale, self.dropout = base, alpha / rank, nn.Dropout(dropout)
        A, B = lora_pair(1, rank, base.in_features, base.out_features)
        self.A, self.B = nn.Parameter(A[0].to(base.weight)), nn.Parameter(B[0].to(base.weight))  # (r, in), (out, r)
        base.weight.requires_grad_(False)

    def forward(self, x):
        return self.base(x) + self.scale * F.linear(F.linear(self.dropout(x), self.A), self.B)

    @torch.no_grad()
    def merge(self):
        """The plain nn.Linear this computes at inference: W + (alpha / r) B A (dropout is off at inference)."""
        merged = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None)
        merged.to(self.base.weight)
        merged.weight.copy_(self.base.weight + self.scale * self.B @ self.A)
        if self.base.bias is not None:
            merged.bias.copy_(self.base.bias)
        return merged


class LoRASwiGLUExperts(nn.Module):
    """E LoRA experts on a frozen SwiGLU FFN: expert e is the FFN with each of its three matrices W replaced by
    W + (alpha / r) B_e A_e, so the down update acts on silu(gate_e(x)) * up_e(x), as LLaVA-MoLE's code does.
    Only the stacked A's (E, r, in) and B's (E, out, r) train. Two kinds of base:
    - one dense FFN (model.MLP), shared by all experts: LLaVA-MoLE. A MoLE layer is MoELayer(config,
      LoRASwiGLUExperts(ffn, E)): routing, balancing loss and statistics are MoELayer's. With top-1 and
      renormalised gates the chosen expert's output is not scaled by its probability, as in MoLE's top-1 path.
      It cannot be merged into the base weights: which update applies depends on the token.
    - the experts of a trained MoE layer (SwiGLUExperts), one adapter per expert: LoRA fine-tuning of an MoE
      model. Each expert's update is its own, whatever the token, so merge() folds them into the experts."""

    MATRICES = ("gate_proj", "up_proj", "down_proj")

    def __init__(self, base, num_experts, rank=8, alpha=16.0, dropout=0.0):
        super().__init__()
        self.base = base  # model.MLP (nn.Linear gate_proj, up_proj, down_proj) or SwiGLUExperts ((E, out, in) each)
        self.shared = not isinstance(base, SwiGLUExperts)
        for name in self.MATRICES:
            weight = getattr(base, name).weight if self.shared else getattr(base, name)
            weight.requires_grad_(False)
            out_dim, in_dim = weight.shape[-2:]
            A, B = lora_pair(num_experts, rank, in_dim, out_dim)
            setattr(self, f"{name}_A", nn.Parameter(A.to(weight)))
            setattr(self, f"{name}_B", nn.Parameter(B.to(weight)))
        self.num_experts = num_experts
        self.in_dim = self.out_dim = self.gate_proj_A.shape[-1]  # the model's width (gate_proj's input)
        self.scale, self.dropout = alpha / rank, nn.Dropout(dropout)

    def base_linear(self, name, x, e=None, group_sizes=None, use_grouped_mm=False):
        if self.shared:
            return getattr(self.base, name)(x)
        W = getattr(self.base, name)  # (E, out, in): expert e's own matrix
        return F.linear(x, W[e]) if e is not None else grouped_linear(x, W, group_sizes, use_grouped_mm)

    def linear(self, name, x, e=None, group_sizes=None, use_grouped_mm=False):
        """One matrix with its LoRA update: of expert e on all rows, or of each expert on its group of rows."""
        A, B, h = getattr(self, f"{name}_A"), getattr(self, f"{name}_B"), self.dropout(x)
        if e is not None:
            delta = F.linear(F.linear(h, A[e]), B[e])
        else:
            delta = grouped_linear(grouped_linear(h, A, group_sizes, use_grouped_mm), B, group_sizes, use_grouped_mm)
        return self.base_linear(name, x, e, group_sizes, use_grouped_mm) + self.scale * delta

    def forward_one(self, e, x):
        h = F.silu(self.linear("gate_proj", x, e)) * self.linear("up_proj", x, e)
        return self.linear("down_proj", h, e)

    def forward_grouped(self, x, group_sizes, use_grouped_mm=False):
        h = F.silu(self.linear("gate_proj", x, None, group_sizes, use_grouped_mm)) * \
            self.linear("up_proj", x, None, group_sizes, use_grouped_mm)
        return self.linear("down_proj", h, None, group_sizes, use_grouped_mm)

    def weights(self):
        """The stacked matrices, for grouped_mm_serves' alignment check."""
        return tuple(getattr(self, f"{name}_{ab}") for name in self.MATRICES for ab in "AB")

    def expert_parameters(self):
        """The experts' own parameters (a shared base FFN is not one of them): what param_counts counts as
        expert parameters, of which k of E are active per token."""
        return list(self.weights()) + ([] if self.shared else list(self.base.parameters()))

    @torch.no_grad()
    def merge(self):
        """One adapter per expert of an MoE layer: the SwiGLUExperts with each expert's update folded in."""
        if self.shared:
            raise ValueError("LoRA experts on one shared FFN (LLaVA-MoLE) cannot be merged: which expert's update "
                             "applies depends on the token")
        merged = SwiGLUExperts(self.num_experts, self.in_dim, self.base.gate_proj.shape[1]).to(self.base.gate_proj)
        for name in self.MATRICES:
            update = self.scale * getattr(self, f"{name}_B") @ getattr(self, f"{name}_A")  # (E, out, in)
            getattr(merged, name).copy_(getattr(self.base, name) + update)
        return merged


# ----------------------------------------------------------------------------------------------------------
# 5. Dispatch: run each token through its chosen experts and combine. Two paths, one interface:
#    (x (N, in), experts, expert_index (N, k), weights (N, k), keep (N, k)) -> (N, out)


def dispatch_loop(x, experts, expert_index, weights, keep):
    """The reference: for each expert, gather its tokens, run it, add its weighted output back.

    This is how Hugging Face's Mixtral reads. About a dozen small kernels and a host sync per expert, so it is
    slow for many experts; it stays here as the specification dispatch_sorted must match.
    """
    out = torch.zeros(x.shape[0], experts.out_dim, device=x.device, dtype=weights.dtype)
    for e in range(experts.num_experts):  # every expert, even one with no tokens: its parameters stay in the graph
        token, slot = torch.where((expert_index == e) & keep)
        y = experts.forward_one(e, x[token])  # (n_e, out)
        out = out.index_add(0, token, y * weights[token, slot].unsqueeze(-1))
    return out


def dispatch_sorted(x, experts, expert_index, weights, keep, use_grouped_mm=False):
    """Sort -> grouped matmul -> combine (MegaBlocks, ScatterMoE, TransformerEngine).

    1. Sort the N*k assignments by expert (stable, so each expert sees its tokens in token order); dropped
       assignments get the pseudo-expert E and sort to the end, where they are cut off.
    2. Permute: gather each kept assignment's token row into expert-contiguous order.
    3. Run every expert on its contiguous block in one grouped operation.
    4. Combine: put each output row back at its (token, slot) place and take each token's gate-weighted sum
       over its k slots -- a per-token gather-sum, no atomics, so the result is deterministic.
    """
    n, k = expert_index.shape
    num_experts = experts.num_experts
    flat_expert = expert_index.masked_fill(~keep, num_experts).reshape(-1)  # (N*k,), assignment a = token*k + slot
    order = flat_expert.argsort(stable=True)
    group_sizes = torch.bincount(flat_expert, minlength=num_experts + 1)[:num_experts]  # (E,)
    order = order[: int(group_sizes.sum())]  # the kept assignments, grouped by expert (int() waits for the device)

    x_sorted = x[order // k]  # (M, in); assignment a belongs to token a // k
    y_sorted = experts.forward_grouped(x_sorted, group_sizes, use_grouped_mm)  # (M, out)

    y = y_sorted.new_zeros(n * k, experts.out_dim).index_copy(0, order, y_sorted)  # dropped slots stay 0
    return (y.view(n, k, experts.out_dim) * weights.unsqueeze(-1)).sum(dim=1)  # (N, out)


def extension_serves(x, mode):
    """Whether the kernels/ CUDA extension dispatches this call (dispatch="cuda", or "auto" on a CUDA device).

    When it cannot -- CPU tensors, no nvcc, a failed build -- the layer uses dispatch_sorted and, for "cuda",
    says why in one line (Python shows a given warning once). "auto" on the CPU falls back silently.
    """
    if mode == "auto" and not x.is_cuda:
        return False
    reason = "the tokens are not on a CUDA device" if not x.is_cuda else None
    if reason is None:
        try:
            from kernels import unavailable_reason  # optional: imported only when asked for
            reason = unavailable_reason()
        except ImportError as e:
            reason = f"kernels/ cannot be imported ({e})"
    if reason is not None:
        warnings.warn(f"MoE dispatch={mode!r}: using the PyTorch sort path (dispatch_sorted) because {reason}",
                      stacklevel=3)
    return reason is None


# ----------------------------------------------------------------------------------------------------------
# 5b. Expert parallelism: each rank of an expert-parallel group holds E / ep of the experts
#
# dispatch_sorted with a journey in the middle: the expert-sorted rows are cut by the rank that holds their
# expert and exchanged with all_to_all; each rank runs its experts on what it received (from every rank of the
# group) and sends the results back the same way. The sizes travel first, so every rank knows what it receives.
# GShard (arXiv 2006.16668) and DeepSpeed-MoE do this; here it is torch.distributed's all_to_all_single.


class Exchange(torch.autograd.Function):
    """all_to_all of rows: send_sizes[r] rows go to rank r, recv_sizes[r] rows arrive from it, in rank order.
    Its backward is the same exchange in reverse: the gradient of each row goes home."""

    @staticmethod
    def forward(ctx, rows, send_sizes, recv_sizes, group):
        ctx.send_sizes, ctx.recv_sizes, ctx.group = send_sizes, recv_sizes, group
        out = rows.new_empty(sum(recv_sizes), *rows.shape[1:])
        dist.all_to_all_single(out, rows.contiguous(), recv_sizes, send_sizes, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        back = grad.new_empty(sum(ctx.send_sizes), *grad.shape[1:])
        dist.all_to_all_single(back, grad.contiguous(), ctx.send_sizes, ctx.recv_sizes, group=ctx.group)
        return back, None, None, None


@torch.compiler.disable  # collectives whose sizes are data: eager code (compile would break the graph anyway)
def dispatch_expert_parallel(x, experts, expert_index, weights, keep, group, num_experts, use_grouped_mm=False):
    """dispatch_sorted over an expert-parallel group: this rank holds experts [rank * L, (rank + 1) * L) of
    num_experts, L = experts.num_experts; x, expert_index, weights, keep are this rank's own tokens.

    1. Sort this rank's kept assignments by (global) expert, as dispatch_sorted does; since experts are laid out
       rank by rank, the rows bound for each rank are then contiguous.
    2. Exchange the per-expert counts (all_to_all of E numbers), so each rank knows how many rows arrive.
    3. Send the rows to their experts' ranks; regroup what arrived (by source rank, then expert) by local
       expert, run the local experts, put the results back in arrival order.
    4. Send the results home and combine each token's k slots, as dispatch_sorted does.
    An expert that receives no rows from a rank simply gets an empty block; its parameters stay in the graph.
    """
    n, k = expert_index.shape
    ep, local = dist.get_world_size(group), experts.num_experts
    flat_expert = expert_index.masked_fill(~keep, num_experts).reshape(-1)  # (N*k,); dropped -> E, cut off
    order = flat_expert.argsort(stable=True)
    counts = torch.bincount(flat_expert, minlength=num_experts + 1)[:num_experts]  # (E,) rows for each expert
    order = order[: int(counts.sum())]

    arriving = torch.empty_like(counts)  # (ep * L,): [source rank s, local expert j] rows from s for my expert j
    dist.all_to_all_single(arriving, counts, group=group)
    send_sizes = counts.view(ep, local).sum(1).tolist()  # rows for each rank
    recv_sizes = arriving.view(ep, local).sum(1).tolist()  # rows from each rank
    rows = x[order // k]
    if torch.is_grad_enabled() and not rows.requires_grad:
        # the backward exchanges too, and every rank must join it: a rank whose tokens need no gradient (a
        # text-only batch under a frozen LLM) still sends its gradient home, which is then dropped
        rows = rows.detach().requires_grad_(True)
    x_arrived = Exchange.apply(rows, send_sizes, recv_sizes, group)  # (M_in, in)

    local_expert = torch.arange(local, device=x.device).repeat(ep)  # the local expert of each [s, j] block
    row_expert = torch.repeat_interleave(local_expert, arriving, output_size=x_arrived.shape[0])
    regroup = row_expert.argsort(stable=True)  # by local expert, each expert's rows in source-rank order
    y = experts.forward_grouped(x_arrived[regroup], arriving.view(ep, local).sum(0), use_grouped_mm)
    y_arrived = y.new_empty(y.shape).index_copy(0, regroup, y)  # back in arrival order

    y_sorted = Exchange.apply(y_arrived, recv_sizes, send_sizes, group)  # home: (M, out), in `order`
    y_slots = y_sorted.new_zeros(n * k, experts.out_dim).index_copy(0, order, y_sorted)  # dropped slots stay 0
    return (y_slots.view(n, k, experts.out_dim) * weights.unsqueeze(-1)).sum(dim=1)  # (N, out)


def gather_experts(shard, group):
    """The full (E, ...) stack of an expert tensor from each rank's (E / ep, ...) shard, on every rank."""
    parts = [torch.empty_like(shard) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, shard.contiguous(), group=group)
    return torch.cat(parts)


def one_expert_like(experts):
    """A one-expert stack of the same form (its first expert's weights): the shared expert beside the routed."""
    one = copy.deepcopy(experts)
    for name, p in list(one.named_parameters()):
        setattr(one, name, nn.Parameter(p.detach()[:1].clone(), requires_grad=p.requires_grad))
    one.num_experts = 1
    return one


def expert_shard(full, rank, ep_size):
    """This rank's slice of a full (E, ...) expert tensor: experts [rank * E / ep, (rank + 1) * E / ep)."""
    local = full.shape[0] // ep_size
    return full[rank * local:(rank + 1) * local]


# ----------------------------------------------------------------------------------------------------------
# 6. The MoE layer


@dataclass
class RoutingStats:
    """What one MoE layer did in its last forward: returned by forward, not kept on the module."""

    balance_loss: torch.Tensor  # scalar, differentiable (load_balancing_loss)
    z_loss: torch.Tensor  # scalar, differentiable (router_z_loss)
    expert_counts: torch.Tensor  # (2, E) top-k assignments per expert, before dropping; row 0 text, row 1 image
    top1_counts: torch.Tensor  # (2, E) first choices per expert; row 0 text, row 1 image
    dropped: torch.Tensor  # scalar: assignments dropped for lack of capacity
    expert_index: torch.Tensor  # (..., k) the chosen experts at every position, -1 at padding (for pathway plots)
    prob_mean: torch.Tensor = None  # (E,) mean router probability per expert over the real tokens (differentiable)
    top1_share: torch.Tensor = None  # (E,) share of the real tokens whose first choice is each expert


class MoELayer(nn.Module):
    """A top-k routed Mixture-of-Experts FFN: a fresh fp32 router and E experts of one form.

    forward(x (..., in), token_mask=None, image_mask=None, dropless=False) -> (y (..., out), RoutingStats)
      token_mask: True at real tokens. Padding is never routed: it takes no slot, enters neither the balancing
                  loss nor the counts, and its output is 0. (DeepSpeed routes padding; MoE-LLaVA inherits that.)
      image_mask: True at image tokens; only used to split the counts into text and image.
      dropless:   ignore the capacity for this call (generation: see LLM.generate).

    Mixed precision means autocast: the router then still runs in fp32. Casting the whole model with
    .to(torch.bfloat16) casts the router's weight too, and router_logits can only upcast the rounded values.
    """

    def __init__(self, config: MoEConfig, experts: nn.Module):
        super().__init__()
        if experts.num_experts != config.num_experts:
            raise ValueError(f"MoELayer: {experts.num_experts} experts given, config says {config.num_experts}")
        self.config = config
        self.experts = experts
        self.router = nn.Linear(experts.in_dim, config.num_experts, bias=False)  # bias-free, as MoE-LLaVA/CuMo
        nn.init.normal_(self.router.weight, std=0.02)
        self.router.to(device=next(experts.parameters()).device)
        self.ep_group = None  # set by shard_experts: the expert-parallel process group
        self.shared = None
        if config.shared_expert:  # DeepSeekMoE (arXiv 2401.06066): common knowledge in one always-on expert
            if isinstance(experts, LoRASwiGLUExperts):
                raise ValueError("MoELayer: a shared expert beside LoRA experts is not supported (their base FFN "
                                 "already runs for every token)")
            self.shared = one_expert_like(experts)
        self.balance_bias = BalanceBias(config.num_experts, config.bias_update_rate).to(
            device=next(experts.parameters()).device) if config.bias_update_rate > 0 else None

    def shard_experts(self, group):
        """Keep only this rank's E / ep experts (expert parallelism over `group`); the router stays whole."""
        if isinstance(self.experts, LoRASwiGLUExperts):
            raise ValueError("LoRA experts are not spread over ranks (--ep_size): their adapters are small enough to "
                             "sit whole on every rank (MoLE's share one frozen FFN); train them with data parallelism")
        ep, rank = dist.get_world_size(group), dist.get_rank(group)
        if self.config.num_experts % ep:
            raise ValueError(f"ep_size={ep} must divide num_experts={self.config.num_experts}")
        for name, p in list(self.experts.named_parameters()):
            setattr(self.experts, name, nn.Parameter(expert_shard(p.detach(), rank, ep).clone(),
                                                     requires_grad=p.requires_grad))
        self.experts.num_experts = self.config.num_experts // ep
        self.ep_group = group

    def route(self, tokens, dropless=False):
        """Routing for (N, in) real tokens: router logits (N, E), probabilities (N, E), the chosen experts
        (N, k), their gate weights (N, k) and which choices kept a slot (N, k)."""
        cfg = self.config
        logits = router_logits(tokens, self.router.weight)
        bias = None if self.balance_bias is None else self.balance_bias.bias
        probs, expert_index, expert_prob = top_k_routing(
            logits, cfg.top_k, noise_std=cfg.router_noise if self.training else 0.0, choice_bias=bias)
        if self.balance_bias is not None and self.training:
            self.balance_bias.count(expert_index)
        if cfg.drop_tokens and not dropless:
            cf = cfg.capacity_factor if self.training else cfg.eval_capacity_factor
            capacity = expert_capacity(tokens.shape[0], cfg.num_experts, cfg.top_k, cf, cfg.min_capacity)
            keep = keep_within_capacity(expert_index, cfg.num_experts, capacity)
        else:
            keep = torch.ones_like(expert_index, dtype=torch.bool)
        return logits, probs, expert_index, gate_weights(expert_prob, keep, cfg.renormalize), keep

    def forward(self, x, token_mask=None, image_mask=None, dropless=False):
        cfg = self.config
        lead_shape, x = x.shape[:-1], x.reshape(-1, x.shape[-1])  # (B*T, in)
        real = torch.ones(x.shape[0], dtype=torch.bool, device=x.device) if token_mask is None \
            else token_mask.reshape(-1).bool()
        is_image = torch.zeros_like(real) if image_mask is None else image_mask.reshape(-1).bool()
        tokens = x[real]  # (N, in): only real tokens are routed

        logits, probs, expert_index, weights, keep = self.route(tokens, dropless)
        use_grouped_mm = grouped_mm_serves(tokens, *self.experts.weights())
        if self.ep_group is not None:
            y_tokens = dispatch_expert_parallel(tokens, self.experts, expert_index, weights, keep, self.ep_group,
                                                cfg.num_experts, use_grouped_mm)
        elif cfg.dispatch == "loop":
            y_tokens = dispatch_loop(tokens, self.experts, expert_index, weights, keep)
        elif cfg.dispatch in ("cuda", "auto") and extension_serves(tokens, cfg.dispatch):
            from kernels import dispatch_cuda
            y_tokens = dispatch_cuda(tokens, self.experts, expert_index, weights, keep, use_grouped_mm)
        else:
            y_tokens = dispatch_sorted(tokens, self.experts, expert_index, weights, keep, use_grouped_mm)
        if self.shared is not None:  # every real token also goes through the shared expert, at weight 1
            y_tokens = y_tokens + self.shared.forward_one(0, tokens).to(y_tokens.dtype)
        y = x.new_zeros(x.shape[0], self.experts.out_dim)
        y[real] = y_tokens.to(y.dtype)  # padding positions stay 0

        chosen = expert_index.new_full((x.shape[0], cfg.top_k), -1)
        chosen[real] = expert_index
        if cfg.balance_per_sample:  # the sample of each token: the leading dimension of x
            sample = torch.arange(lead_shape[0], device=x.device).repeat_interleave(x.shape[0] // max(lead_shape[0], 1))
            balance = load_balancing_loss_per_sample(probs, expert_index[:, 0], sample[real], cfg.num_experts)
        else:
            balance = load_balancing_loss(probs, expert_index[:, 0], cfg.num_experts)
        stats = RoutingStats(
            balance_loss=balance,
            z_loss=router_z_loss(logits),
            expert_counts=self._count_by_modality(expert_index, is_image[real]),
            top1_counts=self._count_by_modality(expert_index[:, :1], is_image[real]),
            dropped=(~keep).sum(),
            expert_index=chosen.view(*lead_shape, cfg.top_k),
            prob_mean=probs.mean(0) if probs.shape[0] else probs.sum(0),
            top1_share=torch.bincount(expert_index[:, 0], minlength=cfg.num_experts).to(probs.dtype) /
            max(probs.shape[0], 1),
        )
        return y.view(*lead_shape, self.experts.out_dim), stats

    def _count_by_modality(self, expert_index, token_image):
        """(2, E): how many of the given assignments each expert got from text tokens (row 0) and image (row 1)."""
        e = self.config.num_experts
        return torch.stack([torch.bincount(expert_index[~token_image].reshape(-1), minlength=e),
                            torch.bincount(expert_index[token_image].reshape(-1), minlength=e)])

    # ------------------------------------------------------------------------------------------------------
    # 7. Sparse upcycling

    @classmethod
    def upcycle(cls, dense_ffn, config: MoEConfig, expert_form=SwiGLUExperts):
        """Build an MoE layer from a trained dense FFN: every expert an exact copy, a fresh router.

        Sparse upcycling (Komatsuzaki et al. 2022), MoE-LLaVA stage III. With renormalised gates and nothing
        dropped, each token's output is sum_i w_i * FFN(x) with sum_i w_i = 1, i.e. exactly the dense FFN's:
        training starts from the dense model, and only the router and the experts' divergence are new.

        config.upcycle_noise > 0 (an ablation, not MoE-LLaVA's recipe) adds to every expert weight Gaussian noise
        of that many times its matrix's standard deviation, independently per expert. Exact copies give the router
        no reason to prefer one expert: their outputs are equal, so renormalised top-k gates make the loss flat in
        the router at the start. Perturbed copies differ from step 0, which lets a router without a balancing loss
        start to favour the experts it already picks (the rich-get-richer loop behind a router collapse).
        """
        layer = cls(config, expert_form.upcycle(dense_ffn, config.num_experts))
        if layer.shared is not None:  # shared + routed would be twice the FFN: each copy's output is halved
            with torch.no_grad():
                layer.shared.load_state_dict(one_expert_like(layer.experts).state_dict())
                for half in (layer.shared, layer.experts):
                    half.scale_output_(0.5)
        if config.upcycle_noise > 0:
            with torch.no_grad():
                for w in layer.experts.parameters():  # (E, ...) stacked: each expert's slice gets its own noise
                    w.add_(torch.randn_like(w) * config.upcycle_noise * w[0].std())
        return layer
