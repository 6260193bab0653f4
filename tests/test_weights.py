"""weights.py: the safetensors reader trusts nothing in a file, and Llama/Qwen2-family model folders load into
our LLM so that it computes what the reference implementation (Hugging Face transformers, a test-only peer)
computes."""
import json
import os
import struct
import unicodedata

import pytest
import torch

import data as D
import weights as W


def write_safetensors(path, header, data):
    """A file built by hand, byte by byte, so the reader is tested without any peer library."""
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return str(path)


def entries(tensors):
    """(header, data) for {name: tensor}, tensors laid out one after another."""
    header, data = {}, b""
    names = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64"}
    for name, t in tensors.items():
        raw = t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape),
                        "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    return header, data


TENSORS = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
           "b": torch.tensor([1.5, -2.0], dtype=torch.bfloat16), "c": torch.tensor([[7, -8]], dtype=torch.int64),
           "empty": torch.zeros(0, 4, dtype=torch.float16)}


def test_the_reader_reads_what_was_written(tmp_path):
    header, data = entries(TENSORS)
    got = W.read_safetensors(write_safetensors(tmp_path / "w.safetensors", {"__metadata__": {"x": "y"}, **header},
                                               data))
    assert got.keys() == TENSORS.keys()
    for name, t in TENSORS.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t)


def corrupt(kind):
    header, data = entries(TENSORS)
    if kind == "unknown dtype":
        header["a"]["dtype"] = "F8_E9"
    elif kind == "outside":
        header["c"]["data_offsets"] = [len(data) - 8, len(data) + 8]
    elif kind == "overlap":
        header["b"]["data_offsets"] = [20, 24]  # inside a's 24 bytes
    elif kind == "wrong size":
        header["a"]["shape"] = [3, 3]
    elif kind == "bad shape":
        header["a"]["shape"] = [2, -3]
    return header, data


@pytest.mark.parametrize("kind, says", [("unknown dtype", "unknown dtype 'F8_E9'"), ("outside", "outside the file"),
                                        ("overlap", "overlap"), ("wrong size", "needs 36 bytes but has 24"),
                                        ("bad shape", "malformed shape")])
def test_a_header_that_lies_is_rejected_in_one_sentence(tmp_path, kind, says):
    path = write_safetensors(tmp_path / "w.safetensors", *corrupt(kind))
    with pytest.raises(W.BadWeights, match=says):
        W.read_safetensors(path)


def test_a_truncated_or_garbage_file_is_rejected(tmp_path):
    header, data = entries(TENSORS)
    whole = write_safetensors(tmp_path / "w.safetensors", header, data)
    blob = open(whole, "rb").read()
    (tmp_path / "short").write_bytes(blob[:40])
    (tmp_path / "tiny").write_bytes(b"abc")
    (tmp_path / "notjson").write_bytes(struct.pack("<Q", 4) + b"{{{{")
    for name, says in (("short", "more than the file holds"), ("tiny", "not a safetensors file"),
                       ("notjson", "not valid JSON")):
        with pytest.raises(W.BadWeights, match=says):
            W.read_safetensors(str(tmp_path / name))


def test_the_reader_agrees_with_the_safetensors_library(tmp_path):
    st = pytest.importorskip("safetensors.torch", reason="safetensors is a test-only peer; .ci/run installs it")
    tensors = {n: t for n, t in TENSORS.items() if t.numel()}
    tensors["h"] = torch.randn(3, 5).half()
    st.save_file(tensors, str(tmp_path / "w.safetensors"))
    got = W.read_safetensors(str(tmp_path / "w.safetensors"))
    assert all(torch.equal(got[n], t) and got[n].dtype == t.dtype for n, t in tensors.items())


# --- whole folders, against the reference implementation

def reference_folder(tmp_path, family, kv_heads, tied, seed=0):
    """A tiny random Llama or Qwen2 saved as a model folder (config.json + model.safetensors); every weight, the
    norms and Qwen2's q/k/v biases included, drawn at random so that a misplaced tensor cannot go unnoticed."""
    transformers = pytest.importorskip("transformers", reason="transformers is a test-only peer; .ci/run installs it")
    make = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
            "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[family]
    config = make[0](vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=kv_heads, max_position_embeddings=64, rope_theta=5e5, rms_norm_eps=1e-5,
                     tie_word_embeddings=tied, pad_token_id=0, eos_token_id=None, bos_token_id=None)
    torch.manual_seed(seed)
    ref = make[1](config).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
    folder = tmp_path / family
    ref.save_pretrained(str(folder))
    return ref, str(folder)


@pytest.mark.parametrize("family, kv_heads, tied", [("llama", 2, False), ("llama", 4, True), ("qwen2", 2, True),
                                                    ("qwen2", 1, False)])
def test_a_model_folder_loads_into_our_llm_exactly(tmp_path, family, kv_heads, tied):
    ref, folder = reference_folder(tmp_path, family, kv_heads, tied)
    ours = W.load_llm(folder).eval()
    assert ours.config.kv_heads == kv_heads and ours.config.qkv_bias == (family == "qwen2")
    assert (ours.lm_head.weight is ours.tok_emb.weight) == tied
    ids = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = ref(ids).logits, ours(ids).logits
    assert (got - expected).abs().max() < 1e-5 * expected.abs().max()
    with torch.no_grad():
        theirs = ref.generate(ids, max_new_tokens=12, do_sample=False, attention_mask=torch.ones_like(ids))[:, 20:]
    assert torch.equal(ours.generate(ids, max_new_tokens=12), theirs)


def test_a_folder_that_does_not_match_is_named(tmp_path):
    _, folder = reference_folder(tmp_path, "llama", 2, False)
    cfg = json.loads(open(f"{folder}/config.json").read())
    cfg["intermediate_size"] = 128
    open(f"{folder}/config.json", "w").write(json.dumps(cfg))
    with pytest.raises(W.BadWeights, match=r"'blocks\.0\.ffn\.gate_proj\.weight' has shape \(96, 64\) in the folder"):
        W.load_llm(folder)
    cfg.update(intermediate_size=96, rope_scaling={"rope_type": "llama3", "factor": 8.0})
    open(f"{folder}/config.json", "w").write(json.dumps(cfg))
    with pytest.raises(W.BadWeights, match="scaled rotary positions"):
        W.load_llm(folder)
    cfg.update(rope_scaling=None, model_type="gpt2")
    open(f"{folder}/config.json", "w").write(json.dumps(cfg))
    with pytest.raises(W.BadWeights, match="not a supported LLM family"):
        W.load_llm(folder)
    with pytest.raises(W.BadWeights, match="has no config.json"):
        W.load_llm(str(tmp_path))


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_a_clip_folder_loads_into_our_vit_exactly(tmp_path, act):
    transformers = pytest.importorskip("transformers", reason="transformers is a test-only peer; .ci/run installs it")
    config = transformers.CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                           num_attention_heads=4, image_size=32, patch_size=8, hidden_act=act)
    torch.manual_seed(0)
    ref = transformers.CLIPVisionModel(config).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name and name.endswith("weight")
                    else 0.2 * torch.randn_like(p))
    ref.save_pretrained(str(tmp_path / "clip"))
    ours = W.load_vit(str(tmp_path / "clip")).eval()
    assert ours.config.act == act and ours.config.num_patches == 16
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = ref(pixel_values=pixels, output_hidden_states=True)
        for layer in (-2, -1, 1):  # LLaVA's choice, the last layer, an early one: patch features, class token dropped
            expected = out.hidden_states[layer][:, 1:]
            assert (ours.features(pixels, select_layer=layer)[0] - expected).abs().max() < 1e-5
        assert (ours.embed(pixels) - out.pooler_output).abs().max() < 1e-5  # post-norm class token
    assert ours.config.image_resize == "pad"  # MoE-LLaVA pads images to a square; CLIP's own mean and std
    (tmp_path / "clip" / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3}))
    with pytest.raises(W.BadWeights, match=r"image_mean \[0.5, 0.5, 0.5\] is not CLIP's"):
        W.load_vit(str(tmp_path / "clip"))


QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
                 r"\s+(?!\S)|\s+")
TEXTS = ["Hello world", "  leading spaces and   runs of them ", "digits 1234567, 3.14 and -42%",
         "unicode: café naïve Straße 東京 😀, and a decomposed e\u0301",
         "<|im_start|>user\nWhat is it?<|im_end|>\n", "tabs\tand\nnewlines\r\n\n",
         "What's the colour? It'll be RED; they've said so.", "", "<|endoftext|>x<|endoftext|>"]


@pytest.mark.parametrize("style", ["qwen2", "gpt2", "smollm"])
def test_a_folder_tokenizer_converts_to_the_same_ids(tmp_path, style):
    """A byte-level BPE trained with the `tokenizers` library (the one model folders' tokenizer.json comes from),
    in Qwen2's form (NFC, a Split regex, then ByteLevel), GPT-2's (ByteLevel with its own regex) and SmolLM's
    (every digit split off, then GPT-2's)."""
    tk = pytest.importorskip("tokenizers", reason="tokenizers is a test-only peer; .ci/run installs transformers")
    bpe = tk.Tokenizer(tk.models.BPE())
    if style == "qwen2":
        bpe.normalizer = tk.normalizers.NFC()
        bpe.pre_tokenizer = tk.pre_tokenizers.Sequence([
            tk.pre_tokenizers.Split(tk.Regex(QWEN2_PATTERN), behavior="isolated"),
            tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    elif style == "smollm":
        bpe.pre_tokenizer = tk.pre_tokenizers.Sequence([tk.pre_tokenizers.Digits(individual_digits=True),
                                                        tk.pre_tokenizers.ByteLevel(add_prefix_space=False)])
    else:
        bpe.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tk.decoders.ByteLevel()
    corpus = [t * 3 for t in TEXTS] + ["the quick brown fox jumps over the lazy dog " * 5, "0123456789 " * 9]
    bpe.train_from_iterator(corpus, tk.trainers.BpeTrainer(
        vocab_size=420, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet()))
    bpe.save(str(tmp_path / "tokenizer.json"))
    ours = W.tokenizer_from_folder(str(tmp_path))
    for text in TEXTS + ["an unseen sentence: Zürich, 987 + 65 = 1052!", "a  1 b\t 22  \n 3x4", "١٢ and ½ 2²"]:
        assert ours.encode(text) == bpe.encode(text).ids, text
        assert ours.decode(ours.encode(text)) == (text if style != "qwen2" else unicodedata.normalize("NFC", text))
    assert ours.chat == "chatml" and ours.eos_id == bpe.token_to_id("<|im_end|>")  # ChatML's tokens: its format
    assert W.tokenizer_from_folder(str(tmp_path), "chat").eos_id == bpe.token_to_id("<|endoftext|>")
    assert ours.image_id == bpe.get_vocab_size()  # appended after the folder's own ids


def test_a_folder_s_special_tokens_choose_its_chat_format(tmp_path):
    tk = pytest.importorskip("tokenizers", reason="tokenizers is a test-only peer; .ci/run installs transformers")
    llama3 = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    for name, specials in (("llama3", llama3), ("none", ["<|end_of_text|>"])):
        bpe = tk.Tokenizer(tk.models.BPE())
        bpe.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.train_from_iterator(["a tiny corpus"], tk.trainers.BpeTrainer(
            vocab_size=300, special_tokens=specials, initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet()))
        os.makedirs(tmp_path / name)
        bpe.save(str(tmp_path / name / "tokenizer.json"))
    ours = W.tokenizer_from_folder(str(tmp_path / "llama3"))
    assert ours.chat == "llama3" and ours.eos_id == 4  # <|eot_id|>: where a Llama 3 answer ends
    ids, supervised = D.tokenize(D.render([{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}],
                                          ours.chat), ours, num_image_tokens=0)
    assert ids[0] == 0 and ids[-1] == 4 and supervised[-1] and not supervised[0]  # <|begin_of_text|> ... <|eot_id|>
    with pytest.raises(W.BadWeights, match="fit none of the chat formats .* --chat_template"):
        W.tokenizer_from_folder(str(tmp_path / "none"))
    with pytest.raises(W.BadWeights, match="'chatml' chat format needs the special token"):
        W.tokenizer_from_folder(str(tmp_path / "llama3"), "chatml")
    with pytest.raises(W.BadWeights, match="'chat' chat format needs the special token.*<|endoftext|>"):
        W.tokenizer_from_folder(str(tmp_path / "llama3"), "chat")  # Llama 3 has no <|endoftext|>
    text = "a <|endoftext|> tiny <|eot_id|>"  # ours appends <|endoftext|> past the vocabulary: it stays plain text
    assert ours.encode(text) == bpe.from_file(str(tmp_path / "llama3" / "tokenizer.json")).encode(text).ids


def test_a_tokenizer_that_cannot_convert_exactly_is_refused(tmp_path):
    spec = {"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}, "pre_tokenizer": {"type": "Metaspace"}}
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(W.BadWeights, match="not a byte-level BPE"):
        W.tokenizer_from_folder(str(tmp_path))
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [{"type": "Punctuation"}, {"type": "ByteLevel"}]}
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(W.BadWeights, match=r"steps \['Punctuation', 'ByteLevel'\] are not one of the layouts"):
        W.tokenizer_from_folder(str(tmp_path))
    with pytest.raises(W.BadWeights, match="has no tokenizer.json"):
        W.tokenizer_from_folder(str(tmp_path / "nowhere"))


def test_moe_tuning_runs_from_model_folders(tmp_path):
    """Stage I from a CLIP folder and a Qwen2 folder (its tokenizer.json too), then II and III, then eval.py: every
    stage folder carries the tokenizer and its chat format (ChatML, as the folder's tokens say), and stage I
    leaves the pretrained ViT and LLM as they were loaded."""
    transformers = pytest.importorskip("transformers", reason="transformers is a test-only peer; .ci/run installs it")
    tk = pytest.importorskip("tokenizers", reason="tokenizers is a test-only peer; .ci/run installs transformers")
    import eval as E
    import train
    data_dir = str(tmp_path / "data")
    D.generate_builtin(data_dir, D.BuiltinConfig(n_train=32, n_val=8, n_test=8), progress=False)
    texts = [t["value"] for name in ("captions_train", "instruct_train")
             for s in D.read_json(f"{data_dir}/{name}.json") for t in s["conversations"]]
    bpe = tk.Tokenizer(tk.models.BPE())
    bpe.pre_tokenizer, bpe.decoder = tk.pre_tokenizers.ByteLevel(add_prefix_space=False), tk.decoders.ByteLevel()
    bpe.train_from_iterator(texts, tk.trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet()))
    torch.manual_seed(0)
    llm = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True))
    llm.save_pretrained(str(tmp_path / "llm"))
    bpe.save(str(tmp_path / "llm" / "tokenizer.json"))
    transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
        patch_size=8)).save_pretrained(str(tmp_path / "clip"))
    out = tmp_path / "out"
    common = ["--out_dir", str(out), "--data_dir", data_dir, "--max_iters=2", "--batch_size=4", "--global_batch=4",
              "--eval_batches=1", "--progress=false"]
    train.main(["--stage", "1", "--preset=pretrained", "--vision_from", str(tmp_path / "clip"), "--llm_from",
                str(tmp_path / "llm"), *common])
    state = torch.load(out / "stage1" / "ckpt.pt", weights_only=True)["model"]
    loaded = W.load_llm(str(tmp_path / "llm")).state_dict()
    assert all(torch.equal(state[f"llm.{k}"], v) for k, v in loaded.items())  # stage I trains the projector alone
    for stage in ("2", "3"):
        train.main(["--stage", stage, *common])
    assert all((out / f"stage{s}" / "tokenizer.json").exists() for s in (1, 2, 3))
    meta = json.loads((out / "stage3" / "meta.json").read_text())
    assert meta["chat_template"] == "chatml" and meta["model_config"]["vision"]["image_resize"] == "pad"
    metrics = E.main(["--ckpt", str(out / "stage3"), "--limit=4", "--blind=none", "--plots=false",
                      "--progress=false"])
    assert metrics is not None
    with pytest.raises(SystemExit, match="go together"):
        train.main(["--stage", "1", "--llm_from", str(tmp_path / "llm"), *common])
    with pytest.raises(SystemExit, match="--llm.dim comes from the model folder"):
        train.main(["--stage", "1", "--preset=pretrained", "--vision_from", str(tmp_path / "clip"), "--llm_from",
                    str(tmp_path / "llm"), "--llm.dim=64", "--out_dir", str(tmp_path / "other"), *common[2:]])
