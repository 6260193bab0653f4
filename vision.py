"""
vision.py -- pixels to tokens: a CLIP-style Vision Transformer and the projector into the LLM's space.

The ViT cuts an image into patches, embeds each as a vector, prepends a class token, adds learned position
embeddings and runs pre-norm transformer blocks over the sequence (ViT, arXiv 2010.11929; CLIP, arXiv
2103.00020). Like LLaVA, the vision-language model does not take the ViT's final output but the patch features
of an earlier layer -- the second-to-last by default -- with the class token dropped: the last layer is shaped
by CLIP's contrastive objective, the one before it keeps more local detail (LLaVA-1.5, arXiv 2310.03744).

The projector maps those features into the LLM's embedding space: `linear` (LLaVA) or `mlp2x_gelu`
(Linear -> GELU -> Linear; LLaVA-1.5 and MoE-LLaVA).

CuMo (arXiv 2405.05949) puts its experts here, on the vision side: every MLP of the ViT that the VLM runs, and
the mlp2x_gelu projector, become top-k MoE layers (moe.MoELayer with GELU-MLP experts), each expert a copy of
the trained dense MLP ("co-upcycling": ViT.upcycle_to_moe, upcycle_projector). Such a ViT returns, beside its
features, the RoutingStats of its MoE blocks (ViT.features), and an MoE projector returns its own.

Classes bottom-up: ViTConfig, Attention, MLP, conv_stem, Block, ViT; then build_projector; then what pretrains
the ViT from scratch (train.py stage 0, because no CLIP weights can be downloaded here): a small text tower and
CLIP's contrastive loss; a small captioner (CaptionHead); and PretrainHead, which picks one or both.

Two departures from CLIP, both for the ViT we pretrain ourselves and both chosen by measurement
(docs/ablations.md): both presets embed patches with a small convolutional stem instead of one strided
convolution, and stage 0 can teach the ViT by captioning instead of (or beside) the contrastive loss. A CLIP
ViT loaded from elsewhere uses the plain patch embedding (`stem="patch"`, the ViTConfig default).
"""
import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from moe import ACTIVATIONS, GELUExperts, MoEConfig, MoELayer, moe_layer_indices


@dataclass(frozen=True)
class ViTConfig:
    image_size: int = 64  # input images are image_size x image_size RGB
    patch_size: int = 8  # (image_size / patch_size)^2 patch tokens
    width: int = 128  # hidden size
    layers: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0  # MLP hidden size = mlp_ratio * width
    select_layer: int = -2  # which hidden state the VLM takes (LLaVA: -2, the second-to-last layer's output)
    stem: str = "patch"  # patch: one strided convolution (ViT, CLIP); conv: stride-2 3x3 convolutions (ours)
    norm_eps: float = 1e-5
    act: str = "gelu"  # the MLP's activation: gelu, or quick_gelu (OpenAI's CLIP; weights.py sets it from the folder)
    image_resize: str = "stretch"  # how an image is made square: stretch, crop (CLIP), pad (MoE-LLaVA; data.py)
    moe_layers: str = ""  # "" = dense; else which blocks' MLPs are MoE layers (CuMo: all), as the LLM's moe_layers
    moe: MoEConfig = field(default_factory=MoEConfig)

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"ViTConfig: image_size={self.image_size} is not a multiple of "
                             f"patch_size={self.patch_size}")
        if self.width % self.heads:
            raise ValueError(f"ViTConfig: width={self.width} is not a multiple of heads={self.heads}")
        if self.image_resize not in ("stretch", "crop", "pad"):
            raise ValueError(f"ViTConfig: image_resize={self.image_resize!r} must be stretch, crop or pad")
        if self.stem not in ("patch", "conv") or (self.stem == "conv" and self.patch_size & (self.patch_size - 1)):
            raise ValueError(f"ViTConfig: stem={self.stem!r} must be 'patch', or 'conv' with a power-of-two "
                             f"patch_size (got {self.patch_size})")
        if not -(self.layers + 1) <= self.select_layer <= self.layers:  # hidden states 0..layers
            raise ValueError(f"ViTConfig: select_layer={self.select_layer} is outside the "
                             f"{self.layers + 1} hidden states")
        if self.act not in ACTIVATIONS:
            raise ValueError(f"ViTConfig: act={self.act!r}: choose one of {sorted(ACTIVATIONS)}")
        if self.moe_layers:
            moe_layer_indices(self.moe_layers, self.layers_in_use)  # fail early on a bad placement

    @property
    def layers_in_use(self):
        """The blocks the vision-language model runs: those up to the selected layer (LLaVA takes the
        second-to-last layer's output, so the last block serves only CLIP pretraining)."""
        return self.select_layer % (self.layers + 1)

    @property
    def moe_blocks(self):
        """Indices of the blocks whose MLP is an MoE layer. Placement counts only the blocks in use: CuMo's code
        also runs the last block and trains its experts on the balancing losses alone, though its output is
        never read; we leave that block dense."""
        return moe_layer_indices(self.moe_layers, self.layers_in_use) if self.moe_layers else []

    @property
    def num_patches(self):
        return (self.image_size // self.patch_size) ** 2


# Size presets. `tiny` trains on a 2-core CPU in minutes; `small` (ViT-S-like width and heads) is meant for one GPU.
VIT_PRESETS = {
    "tiny": ViTConfig(image_size=64, patch_size=8, width=128, layers=4, heads=4, stem="conv"),
    "small": ViTConfig(image_size=128, patch_size=16, width=384, layers=8, heads=6, stem="conv"),
}


class Attention(nn.Module):
    """Bidirectional multi-head self-attention: every patch sees every patch."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.heads = config.heads
        self.qkv = nn.Linear(config.width, 3 * config.width)
        self.proj = nn.Linear(config.width, config.width)

    def forward(self, x, attn_mask=None):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, nh, T, hd)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, nh, T, hd); images need no mask
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    """fc2(gelu(fc1(x))): the ViT's feed-forward network, and also the mlp2x_gelu projector.

    moe.GELUExperts is the expert form of this module (CuMo upcycles both into MoE blocks).
    """

    def __init__(self, in_dim, hidden_dim, out_dim, act="gelu"):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, out_dim)
        self.act, self.act_fn = act, ACTIVATIONS[act]

    def forward(self, x):
        return self.fc2(self.act_fn(self.fc1(x)))


def conv_stem(config: ViTConfig):
    """A convolutional stem in place of the patch embedding (Xiao et al., "Early convolutions help transformers
    see better", arXiv 2106.14881): log2(patch_size) 3x3 convolutions of stride 2, widening to `width`, with GELU
    between them; the output grid is the patch grid, so the ViT after it is unchanged. Each token then sees its
    patch and a margin around it through overlapping, non-linear filters: edges and corners -- what tells a
    square from a circle -- are found before the first attention layer."""
    n = config.patch_size.bit_length() - 1
    widths = [3] + [max(config.width >> (n - i), 16) for i in range(1, n)] + [config.width]
    layers = []
    for i in range(n):
        layers += [nn.Conv2d(widths[i], widths[i + 1], kernel_size=3, stride=2, padding=1, bias=i < n - 1)]
        layers += [nn.GELU()] if i < n - 1 else []
    return nn.Sequential(*layers)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x)); the MLP is dense or, in CuMo, an
    MoE layer of GELU-MLP experts (forward_routed returns its RoutingStats too)."""

    def __init__(self, config: ViTConfig, use_moe=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.width, eps=config.norm_eps)
        self.attn = Attention(config)
        self.norm2 = nn.LayerNorm(config.width, eps=config.norm_eps)
        hidden = int(config.mlp_ratio * config.width)
        if use_moe:
            experts = GELUExperts(config.moe.num_experts, config.width, hidden, config.width, config.act)
            self.mlp = MoELayer(config.moe, experts)
        else:
            self.mlp = MLP(config.width, hidden, config.width, config.act)

    @property
    def is_moe(self):
        return isinstance(self.mlp, MoELayer)

    def forward_routed(self, x, attn_mask=None, dropless=False):
        """-> (x, RoutingStats or None). Every patch (and the class token) is a real token: nothing is padding."""
        x = x + self.attn(self.norm1(x), attn_mask)
        if not self.is_moe:
            return x + self.mlp(self.norm2(x)), None
        out, stats = self.mlp(self.norm2(x), image_mask=torch.ones(x.shape[:2], dtype=torch.bool, device=x.device),
                              dropless=dropless)
        return x + out, stats

    def forward(self, x, attn_mask=None):
        return self.forward_routed(x, attn_mask)[0]


class ViT(nn.Module):
    """A CLIP-style Vision Transformer.

    forward(pixels)  -> (B, num_patches, width): patch features of hidden state `select_layer`, class token
                        dropped -- what the projector receives.
    features(pixels) -> the same, and the RoutingStats of each MoE block (CuMo), in block order.
    embed(pixels)    -> (B, width): the final-normed class token of the last layer -- CLIP's image embedding,
                        used to pretrain the ViT contrastively (train.py, stage 0).
    Hidden states are numbered as in CLIP/LLaVA: 0 is the embeddings (after the pre-norm), i the output of block
    i, so -2 is the output of the second-to-last block.
    """

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = config
        # A patch embedding is a strided convolution: one linear map applied to each non-overlapping patch.
        self.patch_embed = nn.Conv2d(3, config.width, kernel_size=config.patch_size, stride=config.patch_size,
                                     bias=False) if config.stem == "patch" else conv_stem(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + config.num_patches, config.width))
        self.norm_pre = nn.LayerNorm(config.width, eps=config.norm_eps)  # CLIP's ln_pre
        moe_blocks = set(config.moe_blocks)
        self.blocks = nn.ModuleList(Block(config, i in moe_blocks) for i in range(config.layers))
        self.norm = nn.LayerNorm(config.width, eps=config.norm_eps)  # CLIP's ln_post, on the class token
        self.apply(self._init_weights)
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.02)
        for conv in self.patch_embed.modules() if config.stem == "conv" else ():
            if isinstance(conv, nn.Conv2d):  # He init: the signal keeps its size through the GELUs
                nn.init.normal_(conv.weight, std=(2 / conv.weight[0].numel()) ** 0.5)

    @staticmethod
    def _init_weights(module):
        """Linear and patch weights ~ N(0, 0.02), biases 0, LayerNorm (1, 0) -- the usual ViT init (timm)."""
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def hidden_states(self, pixels, upto, dropless=False):
        """Run the embeddings and the first `upto` blocks; returns hidden state `upto` (B, 1 + P, width) and the
        RoutingStats of the MoE blocks among them."""
        B, C, H, W = pixels.shape
        size = self.config.image_size
        if (C, H, W) != (3, size, size):
            raise ValueError(f"ViT expects images of shape (B, 3, {size}, {size}), got {tuple(pixels.shape)}")
        x = self.patch_embed(pixels).flatten(2).transpose(1, 2)  # (B, P, width), patches in raster order
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1) + self.pos_embed  # (B, 1 + P, width)
        x = self.norm_pre(x)
        routing = []
        for block in self.blocks[:upto]:
            x, stats = block.forward_routed(x, dropless=dropless)
            if stats is not None:
                routing.append(stats)
        return x, routing

    def features(self, pixels, select_layer=None, dropless=False):
        layer = self.config.select_layer if select_layer is None else select_layer
        n_states = self.config.layers + 1
        if not -n_states <= layer < n_states:
            raise ValueError(f"select_layer={layer}: this ViT has hidden states 0..{n_states - 1} (or -1..-{n_states})")
        upto = layer % n_states  # blocks after the selected layer are never run
        x, routing = self.hidden_states(pixels, upto, dropless)
        return x[:, 1:], routing  # drop the class token

    def forward(self, pixels, select_layer=None):
        return self.features(pixels, select_layer)[0]

    def embed(self, pixels):
        return self.norm(self.hidden_states(pixels, self.config.layers)[0][:, 0])

    def upcycle_to_moe(self, moe_layers, moe_config: MoEConfig):
        """CuMo's co-upcycling in the ViT: each chosen block's MLP becomes an MoE layer whose GELU experts are
        copies of it (moe.MoELayer.upcycle), so the upcycled ViT computes exactly what the dense one did."""
        config = replace(self.config, moe_layers=moe_layers, moe=moe_config)  # checks the placement
        already = [i for i in config.moe_blocks if self.blocks[i].is_moe]
        if already:
            raise ValueError(f"ViT blocks {already} already have an MoE MLP; upcycle a dense ViT")
        for i in config.moe_blocks:
            self.blocks[i].mlp = MoELayer.upcycle(self.blocks[i].mlp, moe_config, GELUExperts)
        self.config = config


def build_projector(kind, vision_dim, llm_dim, moe: MoEConfig = None):
    """The vision-to-language projector: `linear` (LLaVA) or `mlp2x_gelu` (LLaVA-1.5, MoE-LLaVA); with a
    MoEConfig, an MoE layer of mlp2x_gelu experts (CuMo's MoE connector). An MoE projector returns
    (features, RoutingStats), a dense one the features alone (model.VLM.project takes either)."""
    if kind not in ("linear", "mlp2x_gelu"):
        raise ValueError(f"unknown projector {kind!r}: choose 'linear' or 'mlp2x_gelu'")
    if moe is not None:
        if kind != "mlp2x_gelu":
            raise ValueError("an MoE projector needs projector='mlp2x_gelu': its experts are GELU MLPs")
        return MoELayer(moe, GELUExperts(moe.num_experts, vision_dim, llm_dim, llm_dim))
    return nn.Linear(vision_dim, llm_dim) if kind == "linear" else MLP(vision_dim, llm_dim, llm_dim)


def upcycle_projector(projector, moe_config: MoEConfig):
    """CuMo's co-upcycling of the connector: an MoE layer whose experts are copies of the trained mlp2x_gelu."""
    if not isinstance(projector, MLP):
        raise ValueError("only an mlp2x_gelu projector can be upcycled into an MoE (its experts are GELU MLPs)")
    return MoELayer.upcycle(projector, moe_config, GELUExperts)


# ----------------------------------------------------------------------------------------------------------
# CLIP pretraining (train.py stage 0). With a real pretrained CLIP ViT this part is not needed.


class TextTower(nn.Module):
    """CLIP's text encoder in miniature: token + position embeddings, pre-norm blocks over the real tokens, then
    the mean of the final-normed real tokens (CLIP takes the end-of-text token under a causal mask instead)."""

    def __init__(self, vocab_size, max_len, config: ViTConfig, layers=2):
        super().__init__()
        self.tok_embed = nn.Embedding(vocab_size, config.width)
        self.pos_embed = nn.Parameter(torch.zeros(1, max_len, config.width))
        self.blocks = nn.ModuleList(Block(config) for _ in range(layers))
        self.norm = nn.LayerNorm(config.width, eps=config.norm_eps)
        self.apply(ViT._init_weights)
        nn.init.normal_(self.tok_embed.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.01)

    def forward(self, ids, mask):
        """ids (B, T) with mask (B, T) True at real tokens -> (B, width)."""
        T = ids.shape[1]
        x = self.tok_embed(ids) + self.pos_embed[:, :T]  # (B, T, width)
        attn_mask = mask[:, None, None, :]  # (B, 1, 1, T): every token attends to the real tokens only
        for block in self.blocks:
            x = block(x, attn_mask)
        x = self.norm(x)
        m = mask.unsqueeze(-1).to(x.dtype)
        return (x * m).sum(1) / m.sum(1)


def contrastive_loss(image_emb, text_emb, logit_scale):
    """CLIP's symmetric InfoNCE (arXiv 2103.00020, Fig. 3): in a batch of n matching (image, text) pairs, each
    image must pick its own text among the n, and each text its own image. Embeddings are L2-normalised."""
    image_emb = F.normalize(image_emb.float(), dim=-1)
    text_emb = F.normalize(text_emb.float(), dim=-1)
    logits = logit_scale.exp().clamp(max=100) * image_emb @ text_emb.t()  # (n, n), the diagonal is the truth
    target = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


class CLIPHead(nn.Module):
    """Everything CLIP pretraining adds around a ViT: the text tower, both projections, the temperature."""

    def __init__(self, vocab_size, max_len, config: ViTConfig, embed_dim=128, text_layers=2):
        super().__init__()
        self.text = TextTower(vocab_size, max_len, config, text_layers)
        self.image_proj = nn.Linear(config.width, embed_dim, bias=False)
        self.text_proj = nn.Linear(config.width, embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature 0.07

    def forward(self, vit, pixels, ids, mask):
        """The contrastive loss of a batch of images (B, 3, H, W) and their captions ids/mask (B, T)."""
        return contrastive_loss(self.image_proj(vit.embed(pixels)), self.text_proj(self.text(ids, mask)),
                                self.logit_scale)


# ----------------------------------------------------------------------------------------------------------
# Captioning pretraining (train.py stage 0, --stage0_objective): the ViT learns by describing its images.


class CrossAttention(nn.Module):
    """Multi-head attention from text positions (queries) to image patches (keys and values)."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.heads = config.heads
        self.q = nn.Linear(config.width, config.width)
        self.kv = nn.Linear(config.width, 2 * config.width)
        self.proj = nn.Linear(config.width, config.width)

    def forward(self, x, memory):
        (B, T, C), S = x.shape, memory.shape[1]
        q = self.q(x).view(B, T, self.heads, C // self.heads).transpose(1, 2)  # (B, nh, T, hd)
        k, v = self.kv(memory).view(B, S, 2, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)  # 2 x (B, nh, S, hd)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, nh, T, hd)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class DecoderBlock(nn.Module):
    """A text decoder block: causal self-attention, cross-attention to the image patches, MLP (pre-norm)."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.width, eps=config.norm_eps)
        self.attn = Attention(config)
        self.norm2 = nn.LayerNorm(config.width, eps=config.norm_eps)
        self.cross = CrossAttention(config)
        self.norm3 = nn.LayerNorm(config.width, eps=config.norm_eps)
        self.mlp = MLP(config.width, int(config.mlp_ratio * config.width), config.width)

    def forward(self, x, memory, causal):
        x = x + self.attn(self.norm1(x), causal)
        x = x + self.cross(self.norm2(x), memory)
        return x + self.mlp(self.norm3(x))


class CaptionHead(nn.Module):
    """A small captioner on top of the ViT: a text decoder reads the patch features the vision-language model
    will read (hidden state `select_layer`, class token dropped) and predicts the caption token by token, after
    a learned start vector. In the built-in world a caption names every object's size, colour, shape and place,
    so the patch features must hold all four -- a contrastive loss can be won on colour and layout alone (image
    captioning as pretraining: CapPa, arXiv 2306.07915; with locations in the text, LocCa, arXiv 2403.19596)."""

    def __init__(self, vocab_size, max_len, config: ViTConfig, layers=2):
        super().__init__()
        self.tok_embed = nn.Embedding(vocab_size, config.width)
        self.start = nn.Parameter(torch.zeros(1, 1, config.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, max_len, config.width))
        self.blocks = nn.ModuleList(DecoderBlock(config) for _ in range(layers))
        self.norm = nn.LayerNorm(config.width, eps=config.norm_eps)
        self.head = nn.Linear(config.width, vocab_size, bias=False)
        self.apply(ViT._init_weights)
        for p in (self.tok_embed.weight, self.start, self.pos_embed):
            nn.init.normal_(p, std=0.02)

    def logits(self, vit, pixels, ids):
        """(B, T, vocab): position t predicts ids[:, t] from the image and ids[:, :t] (teacher forcing)."""
        memory = vit(pixels)  # (B, P, width): what the projector will receive
        B, T = ids.shape
        x = torch.cat([self.start.expand(B, -1, -1), self.tok_embed(ids[:, :-1])], 1) + self.pos_embed[:, :T]
        causal = torch.ones(T, T, dtype=torch.bool, device=ids.device).tril()
        for block in self.blocks:
            x = block(x, memory, causal)
        return self.head(self.norm(x)).float()

    def forward(self, vit, pixels, ids, mask):
        """Next-token cross-entropy of the captions ids/mask (B, T) given the images (B, 3, H, W)."""
        logits = self.logits(vit, pixels, ids)
        return F.cross_entropy(logits[mask], ids[mask])


OBJECTIVES = ("contrastive", "caption", "both")


class PretrainHead(nn.Module):
    """What stage 0 trains the ViT with: CLIP's contrastive loss, captioning, or both summed (as CoCa does,
    arXiv 2205.01917). forward -> {loss name: loss}; `names` lists them."""

    def __init__(self, objective, vocab_size, max_len, config: ViTConfig):
        super().__init__()
        if objective not in OBJECTIVES:
            raise ValueError(f"stage0_objective={objective!r}: choose one of {', '.join(OBJECTIVES)}")
        self.clip = CLIPHead(vocab_size, max_len, config) if objective != "caption" else None
        self.caption = CaptionHead(vocab_size, max_len, config) if objective != "contrastive" else None
        self.names = tuple(n for n in ("clip", "caption") if getattr(self, n) is not None)

    def forward(self, vit, pixels, ids, mask):
        return {n: getattr(self, n)(vit, pixels, ids, mask) for n in self.names}
