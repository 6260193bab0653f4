"""
weights.py -- real backbones: read a model folder's safetensors, and map its weights onto our modules.

MoE-LLaVA never trains its backbones; it starts from a pretrained CLIP ViT and a pretrained LLM. A model folder
as people keep them on disk holds `config.json` (the architecture), the weights as `*.safetensors` (one file, or
shards listed in `model.safetensors.index.json`) and the tokenizer. Our LLM was written in LLaMA's shape, so
those weights load into it once three things agree:

  1. the file format   safetensors: 8 bytes (little-endian u64) giving the header's length, a JSON header
                        {name: {dtype, shape, data_offsets: [begin, end]}}, then the raw little-endian tensor
                        bytes. Read here from scratch and trusted in nothing: a bad header, offsets outside the
                        data or overlapping, an unknown dtype or a byte count that does not match the shape is
                        rejected with one sentence. Nothing is unpickled or executed (unlike a torch .bin file).
  2. the config         the folder's config.json -> our LLMConfig: grouped-query attention (n_kv_head), q/k/v
                        biases (Qwen2), rope_theta, the RMSNorm eps, tied or untied embeddings. What our model
                        cannot compute exactly (scaled rotary tables, sliding windows, other activations) is
                        refused by name rather than loaded approximately.
  3. the names          one table per family, from the folder's parameter names to ours; q, k and v are fused
                        into our one qkv matrix. A missing, unexpected or mis-shaped tensor stops the load and is
                        named.

  4. the tokenizer      the folder's byte-level BPE (tokenizer.json) as a tiktoken Encoding, plus `<image>`, and
                        the chat format its special tokens name (ChatML for Qwen2 and SmolLM2, Llama 3's, or
                        ours); data.CHAT_FORMATS writes the conversations in it.
  5. the pixels         CLIP's mean and std (a folder that says otherwise is refused); non-square images padded
                        to a square as MoE-LLaVA does (ViTConfig.image_resize, data.image_tensor).

tests/test_weights.py builds tiny random models with Hugging Face transformers (a test-only peer), saves them as
folders, loads them here and checks that the logits and the greedy generations match.
"""
import json
import os
import re
import struct
from dataclasses import replace

import torch

import data as D
from model import LLM, LLMConfig
from vision import ViT, ViTConfig

# ----------------------------------------------------------------------------------------------------------
# 1. The safetensors format

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
MAX_HEADER = 100_000_000  # bytes; the format's own limit


class BadWeights(ValueError):
    """A weights file or folder that cannot be loaded as it stands; the message says why in one sentence."""


def read_safetensors(path):
    """{name: tensor} from one .safetensors file, each tensor in the dtype it was stored in (a copy: the file is
    not kept open). Checks everything the header claims against the file before any tensor is made."""
    try:
        with open(path, "rb") as f:
            blob = f.read()
    except OSError as e:
        raise BadWeights(f"{path} cannot be read ({e.strerror})") from None
    if len(blob) < 8:
        raise BadWeights(f"{path} is not a safetensors file: it is shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", blob[:8])
    if n > min(MAX_HEADER, len(blob) - 8):
        raise BadWeights(f"{path}: its header claims {n} bytes, more than the file holds")
    try:
        header = json.loads(blob[8:8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise BadWeights(f"{path}: its header is not valid JSON") from None
    if not isinstance(header, dict):
        raise BadWeights(f"{path}: its header is not a JSON object")
    header.pop("__metadata__", None)
    data = memoryview(blob)[8 + n:]
    tensors, spans = {}, []
    for name, entry in header.items():
        begin, end = check_entry(path, name, entry, len(data))
        spans.append((begin, end, name))
        dtype, shape = DTYPES[entry["dtype"]], entry["shape"]
        raw = bytearray(data[begin:end])  # (a copy: torch.frombuffer needs a writable buffer it may keep)
        tensors[name] = torch.frombuffer(raw, dtype=dtype).reshape(shape) if raw else torch.empty(shape, dtype=dtype)
    spans.sort()
    for (_, end, a), (begin, _, b) in zip(spans, spans[1:]):
        if begin < end:
            raise BadWeights(f"{path}: tensors {a!r} and {b!r} overlap in the file")
    return tensors


def check_entry(path, name, entry, data_len):
    """(begin, end) of one header entry's bytes, after checking its dtype, shape and offsets."""
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise BadWeights(f"{path}: tensor {name!r} lacks a dtype, shape or data_offsets")
    if entry["dtype"] not in DTYPES:
        raise BadWeights(f"{path}: tensor {name!r} has an unknown dtype {entry['dtype']!r}")
    shape, offsets = entry["shape"], entry["data_offsets"]
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise BadWeights(f"{path}: tensor {name!r} has a malformed shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
        raise BadWeights(f"{path}: tensor {name!r} has malformed data_offsets {offsets!r}")
    begin, end = offsets
    if not 0 <= begin <= end <= data_len:
        raise BadWeights(f"{path}: tensor {name!r} lies outside the file's data ({begin}..{end} of {data_len} bytes)")
    numel = 1
    for d in shape:
        numel *= d
    itemsize = torch.empty((), dtype=DTYPES[entry["dtype"]]).element_size()
    if numel * itemsize != end - begin:
        raise BadWeights(f"{path}: tensor {name!r} of shape {shape} and dtype {entry['dtype']} needs "
                         f"{numel * itemsize} bytes but has {end - begin}")
    return begin, end


def read_folder_weights(folder):
    """Every tensor of a model folder: model.safetensors, or the shards its model.safetensors.index.json lists."""
    index = os.path.join(folder, "model.safetensors.index.json")
    single = os.path.join(folder, "model.safetensors")
    if os.path.exists(index):
        with open(index) as f:
            try:
                weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise BadWeights(f"{index} is not a safetensors index (a JSON object with a weight_map)") from None
        tensors = {}
        for shard in sorted(set(weight_map.values())):
            if os.path.basename(shard) != shard:
                raise BadWeights(f"{index} names a shard outside the folder: {shard!r}")
            tensors.update(read_safetensors(os.path.join(folder, shard)))
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise BadWeights(f"{index} lists {missing[0]!r}, which its shard does not hold")
        return tensors
    if os.path.exists(single):
        return read_safetensors(single)
    raise BadWeights(f"{folder} holds no model.safetensors or model.safetensors.index.json (a .bin checkpoint "
                     "would have to be unpickled; convert it to safetensors first)")


def read_config(folder):
    path = os.path.join(folder, "config.json")
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise BadWeights(f"{folder} is not a model folder: it has no config.json") from None
    except json.JSONDecodeError:
        raise BadWeights(f"{path} is not valid JSON") from None


# ----------------------------------------------------------------------------------------------------------
# 2. The LLM's config: Llama, Qwen2 and the models built like them (SmolLM, TinyLlama, Mistral without a window)

LLM_FAMILIES = ("llama", "qwen2", "mistral")


def llm_config_from_folder(cfg, max_seq_len=2048):
    """Our LLMConfig for a folder's config.json, or BadWeights naming what our LLM cannot compute exactly."""
    family = cfg.get("model_type")
    if family not in LLM_FAMILIES:
        raise BadWeights(f"model_type {family!r} is not a supported LLM family ({', '.join(LLM_FAMILIES)})")
    dim, n_head = cfg["hidden_size"], cfg["num_attention_heads"]
    rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}  # (older and newer spellings)
    refuse = [
        (cfg.get("hidden_act", "silu") != "silu", f"hidden_act={cfg.get('hidden_act')!r} (our FFN is SwiGLU)"),
        (rope.get("rope_type", rope.get("type", "default")) != "default",
         f"scaled rotary positions ({rope}); our rotary table is unscaled"),
        (cfg.get("head_dim", dim // n_head) != dim // n_head, f"head_dim={cfg.get('head_dim')} != hidden/heads"),
        (cfg.get("attention_bias", False) or cfg.get("mlp_bias", False), "attention_bias/mlp_bias on LLaMA "
         "(only Qwen2's q/k/v biases are built in)"),
        (cfg.get("use_sliding_window", False) or family == "mistral" and cfg.get("sliding_window") or
         any(t != "full_attention" for t in cfg.get("layer_types") or []),
         "a sliding attention window"),
    ]
    for bad, what in refuse:
        if bad:
            raise BadWeights(f"this {family} model uses {what}, which our LLM does not compute")
    theta = cfg.get("rope_theta") or rope.get("rope_theta") or 10000.0
    return LLMConfig(vocab_size=cfg["vocab_size"], dim=dim, n_layer=cfg["num_hidden_layers"], n_head=n_head,
                     n_kv_head=cfg.get("num_key_value_heads") or n_head, qkv_bias=family == "qwen2",
                     ffn_dim=cfg["intermediate_size"], rope_theta=float(theta), norm_eps=cfg.get("rms_norm_eps", 1e-6),
                     tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                     max_seq_len=min(max_seq_len, cfg.get("max_position_embeddings", max_seq_len)))


def vit_config_from_folder(cfg, select_layer=-2):
    """Our ViTConfig for a CLIP folder's config.json: a CLIPVisionModel's, or a whole CLIPModel's (its vision
    tower). LLaVA reads the second-to-last layer (select_layer=-2)."""
    if cfg.get("model_type") == "clip":
        cfg = cfg.get("vision_config", {})
    if cfg.get("model_type") != "clip_vision_model":
        raise BadWeights(f"model_type {cfg.get('model_type')!r} is not a CLIP vision model (clip_vision_model)")
    width, act = cfg["hidden_size"], cfg.get("hidden_act", "quick_gelu")
    if act not in ("gelu", "quick_gelu"):
        raise BadWeights(f"this CLIP model uses hidden_act={act!r}, which our ViT does not compute")
    config = ViTConfig(image_size=cfg["image_size"], patch_size=cfg["patch_size"], width=width,
                       layers=cfg["num_hidden_layers"], heads=cfg["num_attention_heads"],
                       mlp_ratio=cfg["intermediate_size"] / width, select_layer=select_layer, stem="patch",
                       norm_eps=cfg.get("layer_norm_eps", 1e-5), act=act)
    if int(config.mlp_ratio * width) != cfg["intermediate_size"]:
        raise BadWeights(f"intermediate_size={cfg['intermediate_size']} is not a whole multiple of hidden_size")
    return config


# ----------------------------------------------------------------------------------------------------------
# 3. Names: the folder's parameter names -> ours

# (their name, as a regex; our name). Each block's q, k and v projections are fused into attn.qkv afterwards.
LLAMA_NAMES = [
    (r"model\.embed_tokens\.weight", "tok_emb.weight"),
    (r"model\.norm\.weight", "norm.weight"),
    (r"lm_head\.weight", "lm_head.weight"),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", r"blocks.\1.attn_norm.weight"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", r"blocks.\1.ffn_norm.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", r"blocks.\1.attn.\2.\3"),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight", r"blocks.\1.attn.o_proj.weight"),
    (r"model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight", r"blocks.\1.ffn.\2_proj.weight"),
]
IGNORED = (r".*rotary_emb\.inv_freq",)  # buffers some older folders saved; we compute them

V = r"(?:vision_model\.)?"  # a whole CLIPModel's names start with it; a CLIPVisionModel saved on its own may not
CLIP_NAMES = [
    (V + r"embeddings\.class_embedding", "cls_token"),
    (V + r"embeddings\.patch_embedding\.weight", "patch_embed.weight"),
    (V + r"embeddings\.position_embedding\.weight", "pos_embed"),
    (V + r"pre_layrnorm\.(weight|bias)", r"norm_pre.\1"),  # (sic: CLIP's own spelling)
    (V + r"post_layernorm\.(weight|bias)", r"norm.\1"),
    (V + r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", r"blocks.\1.attn.\2.\3"),
    (V + r"encoder\.layers\.(\d+)\.self_attn\.out_proj\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (V + r"encoder\.layers\.(\d+)\.layer_norm([12])\.(weight|bias)", r"blocks.\1.norm\2.\3"),
    (V + r"encoder\.layers\.(\d+)\.mlp\.(fc[12])\.(weight|bias)", r"blocks.\1.mlp.\2.\3"),
]
# a whole CLIPModel folder also holds the text tower and the contrastive heads, which LLaVA does not use
CLIP_IGNORED = IGNORED + (r"text_model\..*", r"logit_scale", r"(visual|text)_projection\.weight", r".*position_ids")


def rename(tensors, table, ignored=IGNORED):
    """{our name: tensor}; a name that matches no row (and is not known to be ignorable) is an error."""
    out = {}
    for name, tensor in tensors.items():
        for pattern, ours in table:
            if re.fullmatch(pattern, name):
                out[re.sub(pattern, ours, name)] = tensor
                break
        else:
            if not any(re.fullmatch(p, name) for p in ignored):
                raise BadWeights(f"unexpected tensor {name!r}: no row of the name table matches it")
    return out


def fuse_qkv(state, n_layer):
    """Each block's separate q, k, v (weights and, with Qwen2, biases) -> our fused attn.qkv, rows [q; k; v]."""
    for i in range(n_layer):
        for kind in ("weight", "bias"):
            parts = [state.pop(f"blocks.{i}.attn.{x}.{kind}", None) for x in "qkv"]
            if all(p is not None for p in parts):
                state[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat(parts, dim=0)
            elif any(p is not None for p in parts):
                raise BadWeights(f"block {i} has only some of its q/k/v {kind}s")
    return state


def load_into(module, state, what):
    """Copy state into module's parameters, in the module's dtype; every parameter must be given, in its shape."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    if missing:
        raise BadWeights(f"{what}: the folder has no tensor for our {missing[0]!r}")
    unexpected = [k for k in state if k not in own]
    if unexpected:
        raise BadWeights(f"{what}: the folder's tensor for {unexpected[0]!r} has no place in our model")
    for name, mine in own.items():  # (in our order: the first mismatch named is the first one a reader meets)
        if tuple(state[name].shape) != tuple(mine.shape):
            raise BadWeights(f"{what}: {name!r} has shape {tuple(state[name].shape)} in the folder, "
                             f"{tuple(mine.shape)} in our model")
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})


def load_llm(folder, max_seq_len=2048):
    """An LLM with a Llama/Qwen2-family folder's weights (fp32), computing what the folder's model computes."""
    config = llm_config_from_folder(read_config(folder), max_seq_len)
    state = fuse_qkv(rename(read_folder_weights(folder), LLAMA_NAMES), config.n_layer)
    if config.tie_embeddings and "tok_emb.weight" in state:
        state["lm_head.weight"] = state["tok_emb.weight"]  # one matrix (some tied folders store a copy too)
    llm = LLM(config)  # (its random initialisation is overwritten below)
    load_into(llm, state, folder)
    return llm


def load_vit(folder, select_layer=-2, image_resize="pad"):
    """A ViT with a CLIP folder's vision weights (fp32), computing the hidden states CLIP's vision model does.
    Images are padded to a square (image_resize="pad", as MoE-LLaVA does; "crop" is CLIP's own way) and
    normalised with CLIP's mean and std; a folder whose preprocessor_config.json says other values is refused."""
    config = replace(vit_config_from_folder(read_config(folder), select_layer), image_resize=image_resize)
    check_preprocessing(folder)
    state = fuse_qkv(rename(read_folder_weights(folder), CLIP_NAMES, CLIP_IGNORED), config.layers)
    for name in ("cls_token", "pos_embed"):  # CLIP stores them without our leading (1, 1) / (1,) dimensions
        if name in state:
            state[name] = state[name].reshape(1, -1, config.width)
    vit = ViT(config)
    load_into(vit, state, folder)
    return vit


def check_preprocessing(folder):
    """Raise BadWeights if the folder's image processor normalises pixels otherwise than data.py does (CLIP's)."""
    path = os.path.join(folder, "preprocessor_config.json")
    if not os.path.exists(path):
        return
    try:
        with open(path, encoding="utf-8") as f:
            spec = json.load(f)
    except json.JSONDecodeError:
        raise BadWeights(f"{path} is not valid JSON") from None
    for key, ours in (("image_mean", D.CLIP_MEAN), ("image_std", D.CLIP_STD)):
        theirs = spec.get(key, ours)
        if len(theirs) != 3 or max(abs(a - b) for a, b in zip(theirs, ours)) > 1e-6:
            raise BadWeights(f"{path}: {key} {theirs} is not CLIP's {list(ours)}, the only one data.py applies")


# ----------------------------------------------------------------------------------------------------------
# 4. The tokenizer: a folder's byte-level BPE (tokenizer.json) as a tiktoken Encoding

# GPT-2's pre-tokenisation pattern, which a ByteLevel pre-tokenizer with use_regex=true applies
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def byte_to_unicode():
    """GPT-2's table from the 256 bytes to printable characters, in which byte-level vocabularies are written:
    printable ASCII and Latin-1 bytes stand for themselves, the other 68 become the characters from U+0100 on."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
            *range(ord("\u00ae"), ord("\u00ff") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def pre_tokenization(pre, path):
    """(regex, digits) for a tokenizer.json pre_tokenizer: the regex that cuts text into pieces before the BPE, and
    whether digits are first split off ("each": every digit alone, SmolLM's; "runs": runs of digits; "": no).
    Three byte-level layouts are reproduced exactly; anything else raises BadWeights saying what it is."""
    steps = pre.get("pretokenizers", [pre]) if pre and pre.get("type") == "Sequence" else [pre] if pre else []
    kinds = [step.get("type") for step in steps]
    if "ByteLevel" not in kinds:
        raise BadWeights(f"{path} is not a byte-level BPE (a SentencePiece-style tokenizer, as Llama 2's, cannot be "
                         "converted exactly)")
    last = steps[-1]
    if kinds[-1] != "ByteLevel" or last.get("add_prefix_space", False):
        raise BadWeights(f"{path}: a pre-tokenizer {kinds} with add_prefix_space={last.get('add_prefix_space')} is "
                         "not one of the layouts converted exactly")
    regex = last.get("use_regex", True)
    if kinds == ["ByteLevel"] and regex:  # GPT-2
        return GPT2_PATTERN, ""
    if kinds == ["Split", "ByteLevel"] and not regex and "Regex" in steps[0].get("pattern", {}) and \
            steps[0].get("behavior", "").lower() == "isolated" and not steps[0].get("invert", False):  # Qwen2, Llama 3
        return steps[0]["pattern"]["Regex"], ""
    if kinds == ["Digits", "ByteLevel"] and regex:  # SmolLM, StarCoder
        return GPT2_PATTERN, "each" if steps[0].get("individual_digits", False) else "runs"
    raise BadWeights(f"{path}: the pre-tokenizer steps {kinds} are not one of the layouts converted exactly "
                     "(ByteLevel; Split then ByteLevel; Digits then ByteLevel)")


def tokenizer_from_folder(folder, chat=""):
    """A data.Tokenizer computing the same ids as the folder's tokenizer.json (byte-level BPE: GPT-2, Qwen2,
    SmolLM, Llama 3), with its added tokens as special tokens and `<image>` appended; its chat format is `chat`, or
    the one its special tokens name (chat_format_of). tiktoken merges the pair whose merged token has the lowest
    id; for these vocabularies, whose ids follow the merge order, that is the same as merging by the merge list's
    order (the tests compare the two on many texts)."""
    path = os.path.join(folder, "tokenizer.json")
    try:
        with open(path, encoding="utf-8") as f:
            spec = json.load(f)
    except FileNotFoundError:
        raise BadWeights(f"{folder} has no tokenizer.json") from None
    except json.JSONDecodeError:
        raise BadWeights(f"{path} is not valid JSON") from None
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise BadWeights(f"{path} is not a BPE tokenizer (its model is {model.get('type')!r})")
    pattern, digits = pre_tokenization(spec.get("pre_tokenizer"), path)
    normalizer = (spec.get("normalizer") or {}).get("type")
    if normalizer not in (None, "NFC"):
        raise BadWeights(f"{path} uses a {normalizer} normalizer, which the conversion does not reproduce")
    to_byte = {c: b for b, c in byte_to_unicode().items()}
    try:
        ranks = {bytes(to_byte[c] for c in token): i for token, i in model["vocab"].items()}
    except KeyError:
        raise BadWeights(f"{path}: a vocabulary entry is not written in byte-level characters") from None
    added = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}  # matched whole, never built by merges
    ranks = {token: i for token, i in ranks.items() if i not in set(added.values())}
    encoding = D.with_special_tokens(os.path.basename(os.path.normpath(folder)), pattern, ranks, added)
    # text may hold the folder's own special tokens and <image>; an <|endoftext|> appended for a folder that has
    # none (Llama 3) lies outside the LLM's vocabulary and stays plain text, as the folder's tokenizer reads it
    tokenizer = D.Tokenizer(encoding, "folder", specials=(*added, D.IMAGE_PLACEHOLDER), nfc=normalizer == "NFC",
                            digits=digits, folder=folder, chat=chat or chat_format_of(added, path))
    try:
        D.check_chat_format(tokenizer)
    except ValueError as e:
        raise BadWeights(f"{path}: {e}") from None
    return tokenizer


def chat_format_of(added, path):
    """The chat format (data.CHAT_FORMATS) a folder's added tokens say its LLM was tuned on: ChatML (Qwen2,
    SmolLM2), Llama 3's, or else our `chat` with <|endoftext|> ending each answer."""
    if {"<|im_start|>", "<|im_end|>"} <= set(added):
        return "chatml"
    if {"<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"} <= set(added):
        return "llama3"
    if D.END_OF_TEXT in added:
        return "chat"
    raise BadWeights(f"{path}: its special tokens fit none of the chat formats ({', '.join(D.CHAT_FORMATS)}): "
                     f"choose one with --chat_template")
