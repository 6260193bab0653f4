"""
model.py -- the small LLM, and the vision-language model that joins ViT -> projector -> LLM.

The LLM is a decoder-only transformer in the modern (LLaMA) style: RMSNorm, rotary position embeddings,
causal attention through F.scaled_dot_product_attention with a KV cache for generation, and a SwiGLU FFN.
Any block's FFN can instead be an MoE layer (moe.py); which ones follows MoE-LLaVA's `moe_mode`.

The vision-language model (VLM) follows LLaVA: the text tokens are embedded, and the projected ViT patch
features are written in at the image's place; the LLM then runs on that mixed sequence. Only assistant answers
are supervised. LLaVA puts one sentinel id per image in the token ids and expands it into the patch features
inside the model; we let the data pipeline write one sentinel per patch instead, so that a sample's true length
is known before the model runs (padding, truncation that never cuts an image, batching) and the splice is a
single masked_scatter.

MoE layers can sit in three parts of the VLM: the LLM's FFNs (MoE-LLaVA; or LoRA experts on a frozen FFN,
LLaVA-MoLE, with plain LoRA on the attention: add_lora, merge_lora), the ViT's MLPs and the projector (CuMo).
Each part has its own MoEConfig; the loss adds each part's balancing and z-losses, summed, averaged or pooled
over its layers (part_moe_losses), and VLMOutput.routing lists every MoE layer's RoutingStats in the order
VLM.moe_layer_names() gives.

Classes bottom-up: configs -> RMSNorm -> rotary -> KVCache -> Attention -> MLP -> Block -> LLM -> VLM, then the
checkpoint file that train.py writes and eval.py reads (save_checkpoint, load_checkpoint).
"""
import contextlib
import json
import os
from dataclasses import dataclass, field, replace

import torch
import torch.utils.checkpoint
import torch.nn as nn
import torch.nn.functional as F

from moe import LoRA, LoRASwiGLUExperts, MoEConfig, MoELayer, SwiGLUExperts, moe_layer_indices
from vision import VIT_PRESETS, ViT, ViTConfig, build_projector, upcycle_projector

IGNORE_INDEX = -100  # label of positions that are not supervised (image, prompt, padding): F.cross_entropy skips it
IMAGE_TOKEN_INDEX = -200  # LLaVA's sentinel id, here one per image patch position; it is never embedded


# ----------------------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class LLMConfig:
    vocab_size: int = 2048
    dim: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 0  # key/value heads; 0 = n_head. Fewer: grouped-query attention, each shared by n_head / it
    qkv_bias: bool = False  # biases on the query, key and value projections (Qwen2 has them, LLaMA does not)
    ffn_dim: int = 384  # SwiGLU hidden size, about 8/3 * dim as in LLaMA
    max_seq_len: int = 256  # longest sequence (prompt + image tokens + answer) the rotary table covers
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True  # the output head shares the token embedding matrix (GPT-2)
    moe_layers: str = ""  # "" = dense model; else a MoE-LLaVA moe_mode or an explicit list such as "0,2,5"
    moe: MoEConfig = field(default_factory=MoEConfig)
    lora_targets: str = ""  # plain LoRA on every block's "attention" and/or "mlp" matrices (frozen base)
    mole_layers: str = ""  # blocks whose FFN is a MoLE layer: moe.num_experts LoRA experts on it (LLaVA-MoLE)
    lora_rank: int = 8  # the rank r of every LoRA update (LLaVA-MoLE: 32)
    lora_alpha: float = 16.0  # updates are scaled by alpha / r (LLaVA-MoLE: 64 / 32)
    lora_dropout: float = 0.0  # dropout on a LoRA update's input (LLaVA-MoLE: 0.05)

    def __post_init__(self):
        if self.dim % self.n_head or (self.dim // self.n_head) % 2:
            raise ValueError(f"LLMConfig: dim={self.dim} must split into n_head={self.n_head} heads of even size")
        if self.n_kv_head < 0 or self.n_head % self.kv_heads:
            raise ValueError(f"LLMConfig: n_kv_head={self.n_kv_head} must divide n_head={self.n_head}")
        moe_layer_indices(self.moe_layers, self.n_layer)  # fail early on a bad placement
        mole = moe_layer_indices(self.mole_layers, self.n_layer)
        targets = self.lora_target_set
        if not targets <= {"attention", "mlp"}:
            raise ValueError(f"LLMConfig: lora_targets={self.lora_targets!r}: choose attention, mlp or attention,mlp")
        if mole and (self.moe_layers or "mlp" in targets):
            raise ValueError("LLMConfig: a MoLE FFN (mole_layers) cannot also be an MoE FFN (moe_layers) or carry "
                             "plain LoRA (lora_targets=mlp)")  # (an MoE FFN with lora_targets=mlp: one per expert)
        if (mole or targets) and self.lora_rank < 1:
            raise ValueError(f"LLMConfig: lora_rank={self.lora_rank} must be at least 1")

    @property
    def kv_heads(self):
        return self.n_kv_head or self.n_head

    @property
    def lora_target_set(self):
        return {t.strip() for t in self.lora_targets.split(",") if t.strip()}

    @property
    def routed_layers(self):
        """The blocks whose FFN has a router: MoE layers and MoLE layers."""
        return sorted(set(moe_layer_indices(self.moe_layers, self.n_layer)) |
                      set(moe_layer_indices(self.mole_layers, self.n_layer)))


# ----------------------------------------------------------------------------------------------------------
# Building blocks


class RMSNorm(nn.Module):
    """x / rms(x) * g, computed in fp32 (Zhang & Sennrich 2019; LLaMA): LayerNorm without centring or bias."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rotary_tables(max_len, head_dim, theta):
    """cos and sin of position * frequency, (max_len, head_dim / 2), frequencies theta^(-2i/d) (RoFormer)."""
    freqs = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), freqs)
    return angles.cos(), angles.sin()


def apply_rotary(x, cos, sin):
    """Rotate each pair (x[i], x[i + d/2]) by its position's angle. x: (B, nh, T, hd); cos, sin: (B, 1, T, hd/2).

    Queries and keys rotated this way have dot products that depend only on their relative position.
    """
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


class KVCache:
    """Every layer's keys and values of the tokens seen so far, so that each generated token costs O(T), not O(T^2).

    Preallocated for max_len positions; `length` is how many are filled. The LLM's forward appends and then
    calls advance() once all layers have stored the new positions.
    """

    def __init__(self, n_layer, batch_size, n_head, head_dim, max_len, device, dtype):
        shape = (n_layer, batch_size, n_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0

    def update(self, layer, k, v):
        """Store (B, nh, T, hd) new keys/values of `layer`; return all keys/values so far."""
        end = self.length + k.shape[2]
        if end > self.k.shape[3]:
            raise ValueError(f"KVCache: {end} positions exceed its size {self.k.shape[3]}")
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, n):
        self.length += n


class Attention(nn.Module):
    """Causal multi-head self-attention with rotary positions and an optional KV cache.

    One fused matrix computes the queries (n_head heads), then the keys and the values (n_kv heads each). With
    n_kv < n_head (grouped-query attention, Ainslie et al. 2023; Llama 2 70B, Qwen2) each key/value head serves
    n_head / n_kv query heads: a smaller KV cache for the same number of query heads.
    """

    def __init__(self, config: LLMConfig):
        super().__init__()
        self.n_head, self.n_kv, self.head_dim = config.n_head, config.kv_heads, config.dim // config.n_head
        self.qkv = nn.Linear(config.dim, (self.n_head + 2 * self.n_kv) * self.head_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(config.dim, config.dim, bias=False)

    def forward(self, x, cos, sin, attn_mask=None, cache=None, layer=None):
        """attn_mask: None for plain causal attention, else a (B, 1, T, T_past + T) bool mask, True = may attend."""
        B, T, C = x.shape
        heads = self.qkv(x).view(B, T, self.n_head + 2 * self.n_kv, self.head_dim).transpose(1, 2)
        q, k, v = heads.split([self.n_head, self.n_kv, self.n_kv], dim=1)  # (B, nh, T, hd), 2 x (B, n_kv, T, hd)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, n_kv, T_past + T, hd)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None,
                                           enable_gqa=self.n_kv != self.n_head)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, C))  # (B, T, C)


class MLP(nn.Module):
    """SwiGLU feed-forward network: down(silu(gate(x)) * up(x)) (Shazeer 2020, "GLU Variants"; LLaMA).

    moe.SwiGLUExperts is its expert form; MoE-LLaVA's stage III upcycles this module into an MoE layer.
    """

    def __init__(self, config: LLMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.dim, config.ffn_dim, bias=False)
        self.up_proj = nn.Linear(config.dim, config.ffn_dim, bias=False)
        self.down_proj = nn.Linear(config.ffn_dim, config.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm decoder block: x + attn(norm(x)), then x + ffn(norm(x)); the FFN is dense or MoE."""

    def __init__(self, config: LLMConfig, use_moe: bool):
        super().__init__()
        self.attn_norm = RMSNorm(config.dim, config.norm_eps)
        self.attn = Attention(config)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        if use_moe:
            self.ffn = MoELayer(config.moe, SwiGLUExperts(config.moe.num_experts, config.dim, config.ffn_dim))
        else:
            self.ffn = MLP(config)

    @property
    def is_moe(self):
        return isinstance(self.ffn, MoELayer)

    def forward(self, x, cos, sin, attn_mask, token_mask, image_mask, cache, layer, dropless):
        """Returns the new residual stream (B, T, C) and this block's RoutingStats (None for a dense FFN)."""
        x = x + self.attn(self.attn_norm(x), cos, sin, attn_mask, cache, layer)
        h = self.ffn_norm(x)
        if self.is_moe:
            out, stats = self.ffn(h, token_mask, image_mask, dropless)
        else:
            out, stats = self.ffn(h), None
        return x + out, stats


def add_lora(block, config: LLMConfig, mole: bool):
    """Give a block its LoRA (Hu et al., arXiv 2106.09685; LLaVA-MoLE, arXiv 2401.16160): plain LoRA on the
    attention projections and/or the FFN's matrices, and, if `mole`, an FFN of LoRA experts with a router. The
    base weights stay and are frozen; B starts at zero, so the block still computes what it did."""
    lora = lambda linear: LoRA(linear, config.lora_rank, config.lora_alpha, config.lora_dropout)  # noqa: E731
    if "attention" in config.lora_target_set:
        block.attn.qkv, block.attn.o_proj = lora(block.attn.qkv), lora(block.attn.o_proj)  # (q, k, v share A)
    if mole:
        experts = LoRASwiGLUExperts(block.ffn, config.moe.num_experts, config.lora_rank, config.lora_alpha,
                                    config.lora_dropout)
        block.ffn = MoELayer(config.moe, experts)
    elif "mlp" in config.lora_target_set and block.is_moe:  # an MoE FFN: one adapter per expert, router as it is
        block.ffn.experts = LoRASwiGLUExperts(block.ffn.experts, block.ffn.config.num_experts, config.lora_rank,
                                              config.lora_alpha, config.lora_dropout)
    elif "mlp" in config.lora_target_set:
        for name in ("gate_proj", "up_proj", "down_proj"):
            setattr(block.ffn, name, lora(getattr(block.ffn, name)))


def merge_lora(module):
    """Fold every plain LoRA inside module into its base nn.Linear (W + (alpha / r) B A), and every per-expert
    adapter into its expert, for inference: the merged model computes what the unmerged one did. A MoLE layer
    cannot be merged -- which expert's update applies depends on the token -- and stays as it is; returns how
    many LoRAs (or expert stacks) were merged."""
    merged = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRA) or isinstance(child, LoRASwiGLUExperts) and not child.shared:
                setattr(parent, name, child.merge())
                merged += 1
    return merged


# ----------------------------------------------------------------------------------------------------------
# The LLM


@dataclass
class LLMOutput:
    logits: torch.Tensor  # (B, T, vocab)
    routing: list  # RoutingStats of each MoE block, in layer order


def init_weights(model):
    """All of the LLM's initialisation, in one place (GPT-2 / nanoGPT):
    - token embeddings, attention and FFN matrices, stacked expert matrices and routers ~ N(0, 0.02);
    - the matrices that write into the residual stream (attention o_proj, FFN down_proj, each expert's down_proj)
      ~ N(0, 0.02 / sqrt(2 * n_layer)), so the residual stream's variance does not grow with depth;
    - RMSNorm gains 1, biases (q, k, v, where the config has them) 0.
    """
    std_residual = 0.02 / (2 * model.config.n_layer) ** 0.5
    for name, p in model.named_parameters():
        if name.endswith(".bias"):
            nn.init.zeros_(p)
        elif p.dim() == 1:
            nn.init.ones_(p)  # the other vectors in the LLM are RMSNorm gains
        elif name.endswith(("o_proj.weight", "down_proj.weight", "experts.down_proj")):
            nn.init.normal_(p, std=std_residual)
        else:
            nn.init.normal_(p, std=0.02)


def lm_loss(logits, labels):
    """Next-token cross-entropy: position t predicts labels[t + 1], averaged over the supervised positions.

    IGNORE_INDEX positions are skipped; a batch with none supervised gives 0 rather than F.cross_entropy's NaN.
    """
    targets = labels[:, 1:].flatten()
    total = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (targets != IGNORE_INDEX).sum().clamp(min=1)


def sample_next(logits, temperature=0.0, top_k=None, generator=None):
    """Pick the next token from (B, vocab) logits: greedy at temperature 0, else sample from the top_k."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


def token_positions(attention_mask, past, B, T, device):
    """Rotary position of each new token (B, T): its index among its row's real tokens, so left padding
    (batched generation) does not shift a prompt's positions."""
    if attention_mask is None:
        return torch.arange(past, past + T, device=device).expand(B, T)
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]


def causal_padding_mask(attention_mask, past, B, T, device):
    """(B, 1, T, T_past + T) bool, True where a new token may attend: real keys at or before it, and always
    itself, so that a padding row is never fully masked (a softmax over nothing is NaN)."""
    key_real = torch.ones(B, past + T, dtype=torch.bool, device=device) if attention_mask is None \
        else attention_mask.bool()
    query_pos = torch.arange(past, past + T, device=device)[:, None]  # (T, 1)
    key_pos = torch.arange(past + T, device=device)[None, :]  # (1, T_past + T)
    allowed = (key_pos <= query_pos) & (key_real[:, None, :] | (key_pos == query_pos))  # (B, T, T_past + T)
    return allowed.unsqueeze(1)


class LLM(nn.Module):
    """Decoder-only transformer: token embedding -> n_layer blocks (dense or MoE FFN) -> RMSNorm -> output head."""

    def __init__(self, config: LLMConfig):
        super().__init__()
        self.config = config
        moe_blocks = set(moe_layer_indices(config.moe_layers, config.n_layer))
        self.tok_emb = nn.Embedding(config.vocab_size, config.dim)
        self.blocks = nn.ModuleList(Block(config, i in moe_blocks) for i in range(config.n_layer))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        cos, sin = rotary_tables(config.max_seq_len, config.dim // config.n_head, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        init_weights(self)
        self.grad_checkpointing = False  # train.py --grad_checkpointing: less memory, one more forward per block
        mole_blocks = set(moe_layer_indices(config.mole_layers, config.n_layer))
        for i, block in enumerate(self.blocks):  # after init_weights: LoRA's B must stay zero
            if config.lora_targets or i in mole_blocks:
                add_lora(block, config, i in mole_blocks)

    def forward(self, input_ids=None, *, inputs_embeds=None, attention_mask=None, image_mask=None, cache=None,
                dropless=False):
        """Logits for every position, and the routing statistics of every MoE block.

        input_ids (B, T) or inputs_embeds (B, T, C): the new tokens.
        attention_mask (B, T_past + T) bool, True at real tokens, covering the cached positions too. Padding may
            be on the right (training batches) or the left (batched generation); positions count real tokens only.
        image_mask (B, T) bool, True at image positions: lets the MoE layers count image and text separately.
        cache: a KVCache to read the past from and append to (generation).
        dropless: MoE layers ignore their capacity for this call (generation does this).
        """
        x = self.tok_emb(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        B, T, _ = x.shape
        past = 0 if cache is None else cache.length
        if past + T > self.config.max_seq_len:
            raise ValueError(f"sequence of {past + T} tokens is longer than max_seq_len={self.config.max_seq_len}")

        positions = token_positions(attention_mask, past, B, T, x.device)  # (B, T)
        cos, sin = self.rope_cos[positions].unsqueeze(1), self.rope_sin[positions].unsqueeze(1)  # (B, 1, T, hd/2)
        attn_mask = None  # plain causal attention (SDPA's fast path) when there is neither padding nor a cache
        if attention_mask is not None or cache is not None:
            attn_mask = causal_padding_mask(attention_mask, past, B, T, x.device)  # (B, 1, T, T_past + T)
        token_mask = None if attention_mask is None else attention_mask[:, past:].bool()

        routing = []
        for i, block in enumerate(self.blocks):
            if self.grad_checkpointing and self.training and cache is None and torch.is_grad_enabled():
                # keep only each block's input; its activations are recomputed in the backward pass
                x, stats = torch.utils.checkpoint.checkpoint(block, x, cos, sin, attn_mask, token_mask, image_mask,
                                                             None, i, dropless, use_reentrant=False)
            else:
                x, stats = block(x, cos, sin, attn_mask, token_mask, image_mask, cache, i, dropless)
            if stats is not None:
                routing.append(stats)
        if cache is not None:
            cache.advance(T)
        return LLMOutput(logits=self.lm_head(self.norm(x)), routing=routing)

    def new_cache(self, batch_size, max_len, dtype=None):
        c = self.config
        return KVCache(c.n_layer, batch_size, c.kv_heads, c.dim // c.n_head, max_len,
                       self.tok_emb.weight.device, dtype or self.tok_emb.weight.dtype)

    @torch.no_grad()
    def generate(self, input_ids=None, *, inputs_embeds=None, attention_mask=None, max_new_tokens=32,
                 temperature=0.0, top_k=None, eos_id=None, use_cache=True, generator=None, dropless=True):
        """Continue a batch of prompts; returns the new tokens (B, n <= max_new_tokens).

        Prompts of different lengths are left-padded, with attention_mask marking the real tokens. With the KV
        cache each step feeds only the newest token; without it the whole sequence is recomputed each step --
        slower, and the reference the cached path must match. After a row emits eos_id it repeats eos_id.
        Call model.eval() first, as for any inference: in training mode router noise would apply.

        MoE layers route dropless here. An expert's capacity is a share of the tokens in one forward call, and
        the prefill, each cached step and each uncached step see different numbers of tokens -- with a capacity,
        they would drop different assignments, and an answer would depend on the rest of its batch.
        dropless=False keeps the evaluation capacity (as DeepSpeed's MoE does at inference), to show just that
        (ablate.py's capacity ablation).
        """
        x = self.tok_emb(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T0, C)
        B, T0, _ = x.shape
        if T0 + max_new_tokens > self.config.max_seq_len:
            raise ValueError(f"prompt ({T0} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                             f"max_seq_len={self.config.max_seq_len}")
        mask = torch.ones(B, T0, dtype=torch.bool, device=x.device) if attention_mask is None else attention_mask.bool()
        cache = self.new_cache(B, T0 + max_new_tokens, x.dtype) if use_cache else None
        finished = torch.zeros(B, dtype=torch.bool, device=x.device)
        new_tokens = [torch.zeros(B, 0, dtype=torch.long, device=x.device)]  # so max_new_tokens=0 gives (B, 0)
        for _ in range(max_new_tokens):
            logits = self(inputs_embeds=x, attention_mask=mask, cache=cache, dropless=dropless).logits[:, -1]  # (B, V)
            token = sample_next(logits, temperature, top_k, generator)
            if eos_id is not None:
                token = token.masked_fill(finished, eos_id)
                finished |= token == eos_id
            new_tokens.append(token[:, None])
            if eos_id is not None and finished.all():
                break
            token_emb = self.tok_emb(token)[:, None]  # (B, 1, C)
            x = token_emb if use_cache else torch.cat([x, token_emb], dim=1)
            mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
        return torch.cat(new_tokens, dim=1)

    def upcycle_to_moe(self, moe_layers, moe_config: MoEConfig):
        """Turn the dense FFNs of the chosen blocks into MoE layers whose experts copy them (MoE-LLaVA stage III)."""
        indices = moe_layer_indices(moe_layers, self.config.n_layer)
        already = [i for i in indices if self.blocks[i].is_moe]
        if already:
            raise ValueError(f"blocks {already} already have an MoE FFN; upcycle a dense (stage II) model")
        for i in indices:
            self.blocks[i].ffn = MoELayer.upcycle(self.blocks[i].ffn, moe_config, SwiGLUExperts)
        self.config = replace(self.config, moe_layers=moe_layers, moe=moe_config)

    def add_lora(self, lora_targets, mole_layers, moe_config: MoEConfig, rank=8, alpha=16.0, dropout=0.0):
        """Plain LoRA on lora_targets (on an MoE FFN, "mlp" gives each expert its own adapter: stage 4) and LoRA
        experts (moe_config: how many, top-k) on the FFNs of mole_layers (LLaVA-MoLE's stage III), on this frozen
        model. At the start it computes exactly what it computed before."""
        if self.config.lora_targets or self.config.mole_layers:
            raise ValueError("this LLM already has LoRA; add it to a model without")
        config = replace(self.config, lora_targets=lora_targets, mole_layers=mole_layers, lora_rank=rank,
                         lora_alpha=alpha, lora_dropout=dropout, moe=moe_config if mole_layers else self.config.moe)
        mole = set(moe_layer_indices(mole_layers, config.n_layer))
        for i, block in enumerate(self.blocks):
            add_lora(block, config, i in mole)
        self.config = config


def param_counts(model):
    """Total, trainable, and active-per-token parameters (an MoE layer only runs k of its E experts per token)."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    inactive = 0
    for module in model.modules():
        if isinstance(module, MoELayer):
            cfg = module.config
            own = getattr(module.experts, "expert_parameters", module.experts.parameters)  # LoRA experts: not the base
            expert_params = sum(p.numel() for p in own())
            inactive += expert_params * (cfg.num_experts - cfg.top_k) // cfg.num_experts
    return {"total": total, "trainable": trainable, "active": total - inactive}


# ----------------------------------------------------------------------------------------------------------
# The vision-language model


@dataclass(frozen=True)
class VLMConfig:
    vision: ViTConfig = field(default_factory=ViTConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    projector: str = "mlp2x_gelu"
    projector_moe: MoEConfig = None  # None: a dense projector; else an MoE of mlp2x_gelu experts (CuMo)

    def __post_init__(self):
        if self.vision.num_patches >= self.llm.max_seq_len:
            raise ValueError(f"VLMConfig: an image takes {self.vision.num_patches} tokens, which leaves no room for "
                             f"text in max_seq_len={self.llm.max_seq_len}")
        if self.projector_moe is not None and self.projector != "mlp2x_gelu":
            raise ValueError("VLMConfig: an MoE projector needs projector='mlp2x_gelu' (its experts are GELU MLPs)")

    @classmethod
    def from_dict(cls, d):
        """The config back from dataclasses.asdict(config), as a checkpoint's metadata stores it."""
        llm = dict(d["llm"], moe=MoEConfig(**d["llm"]["moe"]))
        vision = dict(d["vision"], moe=MoEConfig(**d["vision"].get("moe", {})))
        projector_moe = d.get("projector_moe")
        return cls(vision=ViTConfig(**vision), llm=LLMConfig(**llm), projector=d["projector"],
                   projector_moe=None if projector_moe is None else MoEConfig(**projector_moe))


PRESETS = {
    "tiny": VLMConfig(vision=VIT_PRESETS["tiny"],
                      llm=LLMConfig(dim=128, n_layer=4, n_head=4, ffn_dim=384, max_seq_len=256)),
    "small": VLMConfig(vision=VIT_PRESETS["small"],
                       llm=LLMConfig(dim=512, n_layer=8, n_head=8, ffn_dim=1408, max_seq_len=512)),
}


@dataclass
class VLMOutput:
    logits: torch.Tensor  # (B, T, vocab)
    loss: torch.Tensor = None  # ce_loss + each part's aux_loss_coef * aux + z_loss_coef * z (None without labels)
    ce_loss: torch.Tensor = None  # next-token cross-entropy on the supervised positions
    aux_loss: torch.Tensor = None  # the parts' balancing losses, summed (0 for a dense model)
    z_loss: torch.Tensor = None  # the parts' router z-losses, summed
    part_losses: dict = field(default_factory=dict)  # {"aux_vision": .., "z_vision": .., "aux_llm": ..}: per part
    routing: list = field(default_factory=list)  # RoutingStats per MoE layer, in VLM.moe_layer_names() order;
    #                                               None for the vision side's layers when the batch has no image


def part_moe_losses(routing, config: MoEConfig):
    """One part's balancing and z-losses from its MoE layers' RoutingStats: summed over the layers (MoE-LLaVA),
    averaged (CuMo: the ViT's layers are averaged, so its weight does not grow with its depth), or pooled
    (LLaVA-MoLE: one balancing loss of every layer's routing decisions together, E * sum_e mean_l(me) mean_l(ce);
    a layer may then lean on an expert that another layer leaves idle)."""
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    z = (mean if config.aux_over_layers != "sum" else sum)([s.z_loss for s in routing])
    if config.aux_over_layers == "pooled":
        me, ce = mean([s.prob_mean for s in routing]), mean([s.top1_share for s in routing])
        return config.num_experts * (me * ce).sum(), z
    return (mean if config.aux_over_layers == "mean" else sum)([s.balance_loss for s in routing]), z


class VLM(nn.Module):
    """LLaVA-style vision-language model: ViT -> projector -> LLM, with image features spliced into the text."""

    def __init__(self, config: VLMConfig):
        super().__init__()
        self.config = config
        self.vision = ViT(config.vision)
        self.projector = build_projector(config.projector, config.vision.width, config.llm.dim, config.projector_moe)
        self.llm = LLM(config.llm)

    @property
    def num_image_tokens(self):
        return self.config.vision.num_patches

    def moe_layer_names(self):
        """(part, layer) of every MoE layer, in the order VLMOutput.routing lists them: the ViT's blocks, the
        projector (layer 0), the LLM's blocks."""
        return ([("vision", i) for i in self.config.vision.moe_blocks]
                + ([("projector", 0)] if isinstance(self.projector, MoELayer) else [])
                + [("llm", i) for i in self.config.llm.routed_layers])

    def moe_config(self, part):
        return {"vision": self.config.vision.moe, "projector": self.config.projector_moe,
                "llm": self.config.llm.moe}[part]

    def project(self, features, dropless=False):
        """The projector on (n, P, width) patch features -> ((n, P, C), [RoutingStats] if it is an MoE)."""
        if isinstance(self.projector, MoELayer):
            out, stats = self.projector(features, dropless=dropless)
            return out, [stats]
        return self.projector(features), []

    def vision_side_sharded(self):
        """Whether the ViT or the projector has experts spread over ranks (expert parallelism)."""
        return any(isinstance(m, MoELayer) and m.ep_group is not None
                   for part in (self.vision, self.projector) for m in part.modules())

    def embed(self, input_ids, images=None, dropless=False):
        """Token embeddings with the projected image patches written over the IMAGE_TOKEN_INDEX positions.

        input_ids (B, T) hold num_image_tokens consecutive IMAGE_TOKEN_INDEX ids per image; images (n, 3, H, W)
        are the batch's images in the order they appear. Returns embeddings (B, T, C), the image mask (B, T) and
        the RoutingStats of the vision side's MoE layers (ViT blocks, then the projector; [] when dense).
        """
        image_mask = input_ids == IMAGE_TOKEN_INDEX
        embeds = self.llm.tok_emb(input_ids.masked_fill(image_mask, 0))  # (B, T, C); image rows overwritten below
        n_images = 0 if images is None else images.shape[0]
        per_row = image_mask.sum(dim=1)
        if int(per_row.sum()) != n_images * self.num_image_tokens or bool((per_row % self.num_image_tokens).any()):
            raise ValueError(f"the batch has {per_row.tolist()} image positions per row for {n_images} images: each "
                             f"image needs exactly {self.num_image_tokens} placeholder ids in one row")
        routing = []
        if n_images or self.vision_side_sharded():
            if n_images == 0:  # experts spread over ranks exchange tokens in every forward, and every rank must
                size = self.config.vision.image_size  # take part: a rank without images runs the ViT on none
                images = embeds.new_zeros(0, 3, size, size)
            features, routing = self.vision.features(images, dropless=dropless)  # (n, P, width)
            features, projector_routing = self.project(features, dropless)  # (n, P, C)
            routing += projector_routing
            embeds = embeds.masked_scatter(image_mask.unsqueeze(-1), features.to(embeds.dtype))
        return embeds, image_mask, routing

    def forward(self, input_ids, images=None, labels=None, attention_mask=None):
        embeds, image_mask, vision_routing = self.embed(input_ids, images)
        out = self.llm(inputs_embeds=embeds, attention_mask=attention_mask, image_mask=image_mask)
        names = self.moe_layer_names()
        vision_routing = vision_routing or [None] * (len(names) - len(out.routing))  # None: not run (no images)
        result = VLMOutput(logits=out.logits, routing=vision_routing + out.routing)
        if labels is not None:
            labels = labels.masked_fill(image_mask, IGNORE_INDEX)  # image positions are never supervised
            if attention_mask is not None:
                labels = labels.masked_fill(~attention_mask.bool(), IGNORE_INDEX)  # nor is padding
            result.ce_loss = lm_loss(out.logits, labels)
            zero = torch.zeros((), device=embeds.device)
            result.loss, result.aux_loss, result.z_loss = result.ce_loss, zero, zero
            by_part = {}
            for (part, _), stats in zip(names, result.routing):
                if stats is not None:
                    by_part.setdefault(part, []).append(stats)
            for part, routing in by_part.items():
                cfg = self.moe_config(part)
                aux, z = part_moe_losses(routing, cfg)
                result.part_losses.update({f"aux_{part}": aux, f"z_{part}": z})
                result.aux_loss, result.z_loss = result.aux_loss + aux, result.z_loss + z
                result.loss = result.loss + cfg.aux_loss_coef * aux + cfg.z_loss_coef * z
        return result

    def upcycle_to_moe(self, moe_layers, moe_config: MoEConfig, vision_moe_layers="", projector_moe=False):
        """Stage III: upcycle the LLM's chosen FFNs into MoE layers (see LLM.upcycle_to_moe) and, for CuMo, the
        ViT's chosen MLPs (ViT.upcycle_to_moe) and the projector (vision.upcycle_projector): co-upcycling."""
        if moe_layers:
            self.llm.upcycle_to_moe(moe_layers, moe_config)
        if vision_moe_layers:
            self.vision.upcycle_to_moe(vision_moe_layers, moe_config)
        if projector_moe:
            self.projector = upcycle_projector(self.projector, moe_config)
        self.config = replace(self.config, llm=self.llm.config, vision=self.vision.config,
                              projector_moe=moe_config if projector_moe else self.config.projector_moe)

    def add_lora(self, lora_targets, mole_layers, moe_config: MoEConfig, rank=8, alpha=16.0, dropout=0.0):
        """LLaVA-MoLE's stage: LoRA on the frozen LLM (see LLM.add_lora)."""
        self.llm.add_lora(lora_targets, mole_layers, moe_config, rank, alpha, dropout)
        self.config = replace(self.config, llm=self.llm.config)

    @torch.no_grad()
    def generate(self, input_ids, images=None, attention_mask=None, dropless=True, **kwargs):
        """Answer a batch of (left-padded) prompts with images; kwargs as LLM.generate. Every MoE layer routes
        dropless, the vision side's too (see LLM.generate), unless dropless=False."""
        embeds, _, _ = self.embed(input_ids, images, dropless=dropless)
        return self.llm.generate(inputs_embeds=embeds, attention_mask=attention_mask, dropless=dropless, **kwargs)


def autocast(device):
    """Mixed precision where it pays: bf16 autocast on CUDA (the routers stay fp32: moe.router_logits); plain
    fp32 on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------------------
# Checkpoints: one file, written atomically; the metadata inside it is the truth, meta.json a readable copy


def save_checkpoint(directory, model_state, optimizer_state, meta, extra=None):
    """{directory}/ckpt.pt: model and optimizer state, the metadata as JSON (configs, step, data position), and
    the RNG states, so that a resumed run continues exactly; and {directory}/meta.json, the metadata readable."""
    os.makedirs(directory, exist_ok=True)
    state = {"model": model_state, "optimizer": optimizer_state, "meta": json.dumps(meta),
             "rng_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["rng_cuda"] = torch.cuda.get_rng_state_all()
    if extra:
        state.update(extra)
    path = os.path.join(directory, "ckpt.pt")
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)  # a crash mid-write leaves the previous checkpoint whole
    write_meta(directory, meta)


def write_meta(directory, meta):
    """meta.json, written atomically (as data.write_json does; model.py imports nothing from data.py)."""
    path = os.path.join(directory, "meta.json")
    with open(path + ".tmp", "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(path + ".tmp", path)


def load_checkpoint(directory, what="checkpoint", make=None):
    """The checkpoint dict, its metadata parsed. A missing or unreadable file stops with one sentence (and the
    command that makes it, if given). torch.load(weights_only=True): tensors only, nothing is unpickled."""
    path = os.path.join(directory, "ckpt.pt")
    if not os.path.exists(path):
        hint = f": run `{make}` first" if make else ""
        raise SystemExit(f"error: {what} {path} does not exist{hint}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SystemExit(f"error: {path} cannot be read ({type(e).__name__}: {e}); it may be truncated") from None
    state["meta"] = json.loads(state["meta"])
    return state
