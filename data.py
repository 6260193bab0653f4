"""
data.py -- the data: a built-in data set, LLaVA-format loading, the tokenizer, conversation templates, batching.

Nothing here knows the model. What goes in is LLaVA's JSON format; what comes out is a batch of token ids with
IMAGE_TOKEN_INDEX placeholders, labels, a padding mask and the images as tensors.

Read it top to bottom:
  1. the built-in world      procedurally drawn scenes of shapes (pillow), each with a caption, instruction
                              conversations and a text-only subset, and a second domain (arithmetic, text
                              only) to mix in, written to disk in LLaVA's JSON format
  2. the tokenizer           a tiktoken Encoding: by default a byte-level BPE learned from the built-in corpus
                              (no download); or a named tiktoken encoding (gpt2, cl100k_base, ...) where it loads
  3. templates               `plain` (stage I) and a chat format (stages II-III): MoE-LLaVA's `chat`, or ChatML or
                              Llama 3's for real LLMs (CHAT_FORMATS); labels only on the answers
  4. loading                 LLaVA JSON -> checked, tokenized samples; bad samples counted and skipped
  5. batching                images made square (stretch, crop or pad) and normalised; a deterministic,
                              resumable order; padding, padding mask, labels, images; stage 0's
                              paired batches; what a run does with a batch whose images are all unreadable
  6. command-line options    any config dataclass as typed --name=value options, its comments as the help

`python data.py` writes the built-in data set (it is also written on first use by train.py). The same loader
reads real LLaVA files: LLaVA-558K (blip_laion_cc_sbu_558k.json, stage I) and LLaVA-665K (llava_v1_5_mix665k.json,
stages II-III) with their image folders.
"""
import argparse
import base64
import collections
import inspect
import json
import os
import random
import re
import sys
import unicodedata
from dataclasses import MISSING, asdict, dataclass, fields

import numpy as np
import tiktoken
import torch
from PIL import Image, ImageDraw

IGNORE_INDEX = -100  # label of unsupervised positions; equals model.IGNORE_INDEX (data.py imports no model)
IMAGE_TOKEN_INDEX = -200  # one per image patch position; equals model.IMAGE_TOKEN_INDEX
IMAGE_PLACEHOLDER = "<image>"  # where the image goes in LLaVA's text
END_OF_TEXT = "<|endoftext|>"
SPECIAL_TOKENS = (END_OF_TEXT, IMAGE_PLACEHOLDER)  # the tokenizer's two special tokens

# ----------------------------------------------------------------------------------------------------------
# 1. The built-in world: scenes of coloured shapes on a 3 x 3 grid

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
SHAPE_POPULARITY = (5, 4, 3, 2, 1)  # some shapes are common, some rare: POPE's "popular" negatives need that
THEMES = (("circle", "cross"), ("square", "triangle"), ("diamond", "circle"))  # shapes that tend to co-occur
THEME_BOOST = 3  # a theme's shapes are this many times likelier: POPE's "adversarial" negatives need that
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (50, 90, 230), "yellow": (240, 220, 40),
           "purple": (150, 60, 190), "orange": (245, 140, 30), "white": (245, 245, 245)}
SIZES = {"small": 0.09, "large": 0.16}  # radius as a fraction of the image side
BACKGROUNDS = {"dark": (35, 35, 45), "gray": (110, 110, 115), "brown": (95, 75, 55)}
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
BUILTIN_VERSION = 3  # raise when the drawing, the texts or the templates change: old data sets are redrawn
BUILTIN_MARKER = "builtin.json"  # the config the set was drawn with; written last, so it means "complete"
CAPTION_PROMPTS = ("Describe the image briefly.", "What is in this picture?", "Give a short caption for the image.")


@dataclass(frozen=True)
class BuiltinConfig:
    seed: int = 0
    n_train: int = 5000  # scenes per split; each scene gives one caption sample and one instruction sample
    extra_train: int = 0  # more training scenes, drawn after test: val, test and the tokenizer stay the same
    train_negatives: str = "uniform"  # training's "no" existence questions: uniform (any absent kind) or pope
    train_questions: int = 0  # questions per training conversation: 0 draws 1-3 (as val, test); N asks up to N
    train_giveaways: bool = True  # False: no training turn asks what an earlier turn of its conversation has said
    n_val: int = 250
    n_test: int = 500
    text_only_fraction: float = 0.1  # text-only instruction samples, as a fraction of a split's scenes
    image_size: int = 128  # stored size; the loader resizes to the model's image size
    max_objects: int = 4  # at most 9, one per grid cell
    bpe_vocab_size: int = 1024  # at most; learning stops when no pair of tokens repeats

    def __post_init__(self):
        if min(self.n_train, self.n_val, self.n_test) < 1 or min(self.extra_train, self.train_questions) < 0 or \
                not 1 <= self.max_objects <= 9:
            raise ValueError("BuiltinConfig: every split needs at least one scene, extra_train and train_questions "
                             "cannot be negative, and max_objects must be 1..9")
        if self.train_negatives not in ("uniform", "pope"):
            raise ValueError(f"BuiltinConfig: train_negatives={self.train_negatives!r} must be uniform or pope")
        if self.bpe_vocab_size < 256 + len(SPECIAL_TOKENS):
            raise ValueError(f"BuiltinConfig: bpe_vocab_size must be at least {256 + len(SPECIAL_TOKENS)} (the bytes)")


def make_scene(rng, max_objects=4):
    """A scene: a background and 1..max_objects objects (shape, colour, size) in distinct cells of a 3 x 3 grid."""
    theme = rng.choice(THEMES)
    shape_weights = [p * (THEME_BOOST if s in theme else 1) for s, p in zip(SHAPES, SHAPE_POPULARITY)]
    cells = rng.sample(range(9), rng.randint(1, max_objects))
    objects = [{"shape": rng.choices(SHAPES, shape_weights)[0], "colour": rng.choice(list(COLOURS)),
                "size": rng.choice(list(SIZES)), "position": POSITIONS[cell], "cell": cell,
                "jitter": [rng.uniform(-0.04, 0.04), rng.uniform(-0.04, 0.04)]} for cell in sorted(cells)]
    return {"background": rng.choice(list(BACKGROUNDS)), "objects": objects}


def scene_signature(scene):
    return (scene["background"], tuple((o["shape"], o["colour"], o["size"], o["cell"]) for o in scene["objects"]))


def draw_scene(scene, size):
    image = Image.new("RGB", (size, size), BACKGROUNDS[scene["background"]])
    draw = ImageDraw.Draw(image)
    for o in scene["objects"]:
        row, col = divmod(o["cell"], 3)
        cx = (col + 0.5 + 3 * o["jitter"][0]) * size / 3
        cy = (row + 0.5 + 3 * o["jitter"][1]) * size / 3
        r = SIZES[o["size"]] * size
        fill = COLOURS[o["colour"]]
        if o["shape"] == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif o["shape"] == "square":
            draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif o["shape"] == "triangle":
            draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
        elif o["shape"] == "diamond":
            draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
        else:  # cross
            w = r / 3
            draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
            draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    return image


def describe(o):
    return f"{o['size']} {o['colour']} {o['shape']}"


def plural(noun):
    return noun + "es" if noun.endswith("s") else noun + "s"


def where(position):
    return "in the center" if position == "center" else f"at the {position}"


def caption(scene):
    parts = [f"a {describe(o)} {where(o['position'])}" for o in scene["objects"]]
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return text[0].upper() + text[1:] + f", on a {scene['background']} background."


def questions(scene, rng, about=False):
    """Every question this scene can answer unambiguously, as (type, question, answer); about=True adds a fourth
    item, the index of the object the question names (None: counts, descriptions, absent kinds)."""
    objs = scene["objects"]
    shape_n = collections.Counter(o["shape"] for o in objs)
    colour_n = collections.Counter(o["colour"] for o in objs)
    kind_n = collections.Counter((o["colour"], o["shape"]) for o in objs)
    qa = [("count", "How many objects are there?", str(len(objs)), None),
          ("description", rng.choice(CAPTION_PROMPTS), caption(scene), None)]
    shape = rng.choice(SHAPES)
    qa.append(("count", f"How many {plural(shape)} are there?", str(shape_n[shape]), None))
    for i, o in enumerate(objs):
        if shape_n[o["shape"]] == 1:
            qa.append(("colour", f"What colour is the {o['shape']}?", o["colour"], i))
            qa.append(("size", f"Is the {o['shape']} large or small?", o["size"], i))
        if colour_n[o["colour"]] == 1:
            qa.append(("shape", f"What shape is the {o['colour']} object?", o["shape"], i))
        if kind_n[(o["colour"], o["shape"])] == 1:
            qa.append(("position", f"Where is the {o['colour']} {o['shape']}?", o["position"], i))
    present = rng.choice(objs)
    absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in kind_n]
    c, s = rng.choice(absent)
    qa.append(("existence", f"Is there a {present['colour']} {present['shape']} in the image?", "yes",
               objs.index(present)))
    qa.append(("existence", f"Is there a {c} {s} in the image?", "no", None))
    return qa if about else [q[:3] for q in qa]


def without_giveaways(qa):
    """The turns of questions(..., about=True) in their order, the description moved last, less every turn whose
    answer an earlier one has said: once a turn has put an object's colour and shape side by side ("What colour
    is the square?" "red", "Where is the red square?", "Is there a red square?" "yes"), no later turn asks for
    that object's colour or shape or whether it is there. With many questions per conversation, 70 % of the
    colour and shape questions could otherwise be answered from the text above them."""
    qa = [q for q in qa if q[0] != "description"] + [q for q in qa if q[0] == "description"]
    named, kept = set(), []
    for kind, question, answer, obj in qa:
        if kind in ("colour", "shape") or (kind == "existence" and obj is not None):
            if obj in named:
                continue
            named.add(obj)
        elif kind == "position":
            named.add(obj)
        kept.append((kind, question, answer))
    return kept


def pope_negative(scene, rng):
    """An absent kind drawn as POPE draws its hard negatives: half the time one attribute away from an object in
    the picture (its shape in another colour, or its colour in another shape), otherwise by how common the shape
    is. Uniform negatives let a model answer "Is there a red square?" from how common red squares are."""
    present = {(o["colour"], o["shape"]) for o in scene["objects"]}
    if rng.random() < 0.5:
        o = rng.choice(scene["objects"])
        near = [k for k in [(c, o["shape"]) for c in COLOURS] + [(o["colour"], s) for s in SHAPES] if k not in present]
        if near:
            return rng.choice(near)
    absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
    return rng.choices(absent, [SHAPE_POPULARITY[SHAPES.index(s)] for _, s in absent])[0]


def with_pope_negatives(sample, scene, rng):
    """The sample with each "no" existence question asking for a pope_negative instead."""
    conversations = [dict(turn) for turn in sample["conversations"]]
    for i, kind in enumerate(sample["question_types"]):
        if kind == "existence" and conversations[2 * i + 1]["value"] == "no":
            c, s = pope_negative(scene, rng)
            lead = f"{IMAGE_PLACEHOLDER}\n" if i == 0 else ""
            conversations[2 * i]["value"] = f"{lead}Is there a {c} {s} in the image?"
    return {**sample, "conversations": conversations}


def instruction_sample(scene, rng, sample_id, image, n_questions=0, giveaways=True):
    """A 1-3 turn conversation about the scene (n_questions > 0: up to that many turns); `<image>` leads the first
    question, as in LLaVA-665K. giveaways=False: no turn asks what an earlier one has said (without_giveaways)."""
    if giveaways:
        qa = questions(scene, rng)
        qa = rng.sample(qa, min(n_questions, len(qa)) if n_questions else rng.randint(1, 3))
    else:
        qa = questions(scene, rng, about=True)
        rng.shuffle(qa)
        qa = without_giveaways(qa)[:n_questions or rng.randint(1, 3)]
    conversations = []
    for i, (_, q, a) in enumerate(qa):
        conversations.append({"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{q}" if i == 0 else q})
        conversations.append({"from": "gpt", "value": a})
    return {"id": sample_id, "image": image, "conversations": conversations, "question_types": [t for t, _, _ in qa]}


def text_only_sample(rng, sample_id):
    """Image-free instructions, the built-in counterpart of the official text-only instruction data."""
    kind = rng.randrange(5)
    if kind == 0:
        shape = rng.choice(["triangle", "square", "diamond"])
        q, a = f"How many sides does a {shape} have?", {"triangle": "3", "square": "4", "diamond": "4"}[shape]
    elif kind == 1:
        x, y = rng.randint(0, 5), rng.randint(0, 4)
        q, a = f"What is {x} plus {y}?", str(x + y)
    elif kind == 2:
        (c1, c2), a = rng.choice([(("blue", "yellow"), "green"), (("red", "yellow"), "orange"),
                                  (("red", "blue"), "purple"), (("red", "white"), "pink")])
        q = f"What colour do you get when you mix {c1} and {c2}?"
    elif kind == 3:
        n = rng.randint(0, 8)
        q, a = f"What number comes after {n}?", str(n + 1)
    else:
        x, y = rng.sample(range(10), 2)
        q, a = f"Which is bigger, {x} or {y}?", str(max(x, y))
    return {"id": sample_id, "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}],
            "question_types": ["text"]}


ARITHMETIC_STREAM = 1_000_003  # added to the data seed: the second domain draws from its own random stream


def arithmetic_sample(rng, sample_id, seen):
    """A second instruction domain, text only and clearly unlike the scenes: two-digit sums and differences, and
    the one-digit multiplication table. It lets a run mix two instruction domains, the situation LLaVA-MoLE's LoRA
    experts are for (docs/results.md measures it). A sum or difference is never asked twice in the whole set
    (`seen` spans the splits), so the test split asks ones never trained on; the table has 64 facts and repeats."""
    kind = rng.choice(("add", "subtract", "multiply"))
    while True:
        if kind == "add":
            x, y = rng.randint(10, 69), rng.randint(10, 69)
            q, a = f"What is {x} plus {y}?", x + y
        elif kind == "subtract":
            x = rng.randint(20, 99)
            y = rng.randint(10, x - 1)
            q, a = f"What is {x} minus {y}?", x - y
        else:
            x, y = rng.randint(2, 9), rng.randint(2, 9)
            q, a = f"What is {x} times {y}?", x * y
        if kind == "multiply" or q not in seen:
            break
    seen.add(q)
    return {"id": sample_id, "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": str(a)}],
            "question_types": [kind]}


def write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=None if isinstance(obj, list) else 1)
    os.replace(tmp, path)


def generate_builtin(data_dir, config=BuiltinConfig(), progress=True):
    """Draw the built-in data set into data_dir: images/, {captions,instruct,scenes,arithmetic}_{split}.json, the
    tokenizer.

    Splits are drawn from one seeded stream; a scene identical to one already drawn (in any split) is redrawn,
    so no scene is shared between train, val and test. `extra_train` scenes are drawn last and appended to the
    training split, so a larger set keeps the same validation and test scenes and the same tokenizer.
    """
    from tqdm import tqdm
    rng = random.Random(config.seed)
    os.makedirs(os.path.join(data_dir, "images"), exist_ok=True)
    seen = set()
    corpus = []
    splits = {"train": config.n_train, "val": config.n_val, "test": config.n_test}
    parts = [(split, 0, n) for split, n in splits.items()]
    if config.extra_train:
        parts.append(("train", config.n_train, config.extra_train))
    bar = tqdm(total=sum(n for _, _, n in parts), desc="drawing the built-in data set", disable=not progress)
    files = {}
    for split, first, n in parts:
        captions, instruct, scenes = [], [], []
        for i in range(first, first + n):
            scene = make_scene(rng, config.max_objects)
            while scene_signature(scene) in seen:
                scene = make_scene(rng, config.max_objects)
            seen.add(scene_signature(scene))
            image = f"images/{split}_{i:05d}.png"
            draw_scene(scene, config.image_size).save(os.path.join(data_dir, image))
            sid = f"{split}-{i:05d}"
            captions.append({"id": sid, "image": image, "conversations": [
                {"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{rng.choice(CAPTION_PROMPTS)}"},
                {"from": "gpt", "value": caption(scene)}]})
            instruct.append(instruction_sample(scene, rng, sid, image))
            scenes.append({"id": sid, "image": image, **scene})
            bar.update()
        n_text = round(n * config.text_only_fraction)
        instruct += [text_only_sample(rng, f"{split}-text-{i:05d}") for i in range(first, first + n_text)]
        rng.shuffle(instruct)
        if split == "train" and first == 0:  # the BPE learns from the texts exactly as the templates render them
            corpus = [text for s in captions for text, _ in render(s["conversations"], "plain")]
            corpus += [text for s in instruct for text, _ in render(s["conversations"], "chat")]
        by_id = {s["id"]: s for s in scenes}
        if split == "train" and (config.train_questions or not config.train_giveaways):
            stream = "questions" if config.train_giveaways else "noleak"  # (each its own stream: all else stays)
            instruct = [instruction_sample(by_id[s["id"]], random.Random(f"{config.seed}-{stream}-{s['id']}"),
                                           s["id"], s["image"], config.train_questions, config.train_giveaways)
                        if s["id"] in by_id else s for s in instruct]
        if split == "train" and config.train_negatives == "pope":
            instruct = [with_pope_negatives(s, by_id[s["id"]], random.Random(f"{config.seed}-{s['id']}"))
                        if s["id"] in by_id else s for s in instruct]
        for name, samples in (("captions", captions), ("instruct", instruct), ("scenes", scenes)):
            files.setdefault(f"{name}_{split}.json", []).extend(samples)
    bar.close()
    for name, samples in files.items():
        write_json(os.path.join(data_dir, name), samples)
    # the second domain, half as many samples as scenes per split; not in the BPE's corpus (digits are single
    # tokens and its words are spelled in bytes), so the scenes, their texts and the tokenizer stay as they were
    rng, seen = random.Random(config.seed + ARITHMETIC_STREAM), set()
    for split, n in splits.items():
        arithmetic = [arithmetic_sample(rng, f"{split}-arithmetic-{i:05d}", seen) for i in range(max(1, n // 2))]
        write_json(os.path.join(data_dir, f"arithmetic_{split}.json"), arithmetic)
    ranks = train_bpe(corpus, config.bpe_vocab_size - len(SPECIAL_TOKENS))
    save_bpe(os.path.join(data_dir, BUILTIN_TOKENIZER_FILE), ranks)
    marker = {**asdict(config), "version": BUILTIN_VERSION}
    write_json(os.path.join(data_dir, BUILTIN_MARKER), marker)  # written last: marks the set complete


def ensure_builtin(data_dir, config=BuiltinConfig(), progress=True):
    """Generate the built-in data set unless data_dir already holds it for this exact config."""
    marker = os.path.join(data_dir, BUILTIN_MARKER)
    if os.path.exists(marker):
        with open(marker) as f:  # an option added since the set was drawn is at its default, which draws as before
            if {**asdict(BuiltinConfig()), **json.load(f)} == {**asdict(config), "version": BUILTIN_VERSION}:
                return
    generate_builtin(data_dir, config, progress)


# ----------------------------------------------------------------------------------------------------------
# 2. The tokenizer: a tiktoken Encoding

# The pre-tokenisation split (GPT-2's idea in ASCII form): words with their leading space, single digits (so
# numbers are read digit by digit), runs of punctuation, whitespace. Valid for Python's re and tiktoken alike.
PAT_STR = r"""'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+"""
BUILTIN_TOKENIZER_FILE = "tokenizer.tiktoken"


def train_bpe(texts, vocab_size):
    """Learn byte-level BPE merges (Sennrich et al. 2016; GPT-2's byte-level form) from a list of texts.

    Returns tiktoken's `mergeable_ranks`: the 256 single bytes get ranks 0..255, then each merge, in the order
    learned, the next rank. Greedy and deterministic: the most frequent adjacent pair wins, ties broken by the
    smaller pair; learning stops at vocab_size or when no pair occurs twice.
    """
    words = collections.Counter()
    for text in texts:
        words.update(re.findall(PAT_STR, text))
    pieces = {w: [bytes([b]) for b in w.encode("utf-8")] for w in words}
    ranks = {bytes([b]): b for b in range(256)}
    while len(ranks) < vocab_size:
        pairs = collections.Counter()
        for w, n in words.items():
            p = pieces[w]
            for a, b in zip(p, p[1:]):
                pairs[a, b] += n
        if not pairs:
            break
        (a, b), n = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        if n < 2:
            break
        merged = a + b
        ranks.setdefault(merged, len(ranks))
        for w in words:
            p, out, i = pieces[w], [], 0
            while i < len(p):
                if i + 1 < len(p) and p[i] == a and p[i + 1] == b:
                    out.append(merged)
                    i += 2
                else:
                    out.append(p[i])
                    i += 1
            pieces[w] = out
    return ranks


def save_bpe(path, ranks):
    """Write tiktoken's own file format, one `base64(token) rank` line per token (tiktoken.load reads it too)."""
    with open(path + ".tmp", "w") as f:
        for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(f"{base64.b64encode(token).decode()} {rank}\n")
    os.replace(path + ".tmp", path)


def load_bpe(path):
    ranks = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
    return ranks


@dataclass
class Tokenizer:
    """A tiktoken Encoding plus the ids the pipeline needs: end-of-text (also used as padding) and `<image>`."""
    encoding: tiktoken.Encoding
    name: str
    specials: tuple = SPECIAL_TOKENS  # the special tokens that text may contain (a model folder's: all it added)
    nfc: bool = False  # NFC-normalise text before encoding (some model folders' tokenizers do)
    digits: str = ""  # split digits off first: "each" alone (SmolLM's tokenizer does), "runs" of them, "": no
    folder: str = ""  # name "folder": the folder whose tokenizer.json it was read from (weights.py)
    chat: str = "chat"  # the chat format of stages II-III (CHAT_FORMATS); its end token is eos_id

    @property
    def vocab_size(self):
        return self.encoding.n_vocab

    @property
    def eos_id(self):  # the token that ends an answer in the chat format; also the padding
        return self.encoding.encode_single_token(CHAT_FORMATS[self.chat].end)

    @property
    def image_id(self):
        return self.encoding.encode_single_token(IMAGE_PLACEHOLDER)

    def encode(self, text):
        # our two special tokens are read as such; any other special token of a named encoding is plain text
        text = unicodedata.normalize("NFC", text) if self.nfc else text
        if not self.digits:
            return self.encoding.encode(text, allowed_special=set(self.specials), disallowed_special=())
        ids = []  # special tokens first, then digits split off, then the regex and the BPE on each piece
        for piece in re.split("(" + "|".join(map(re.escape, self.specials)) + ")", text):
            if piece in self.specials:
                ids.append(self.encoding.encode_single_token(piece))
            else:
                ids += [i for part in split_digits(piece, self.digits) for i in self.encoding.encode_ordinary(part)]
        return ids

    def decode(self, ids):
        return self.encoding.decode([i for i in ids if 0 <= i < self.vocab_size])


def split_digits(text, how):
    """Text cut where numeric characters (Unicode category N) begin and end; with how="each", one per digit."""
    parts, kind = [], None
    for c in text:
        numeric = unicodedata.category(c)[0] == "N"
        if parts and numeric == kind and not (numeric and how == "each"):
            parts[-1] += c
        else:
            parts.append(c)
        kind = numeric
    return parts


def with_special_tokens(name, pat_str, ranks, special_tokens):
    """An Encoding that has our two special tokens, appended after the existing ones where missing."""
    special = dict(special_tokens)
    next_id = max([*ranks.values(), *special.values()]) + 1
    for token in SPECIAL_TOKENS:
        if token not in special:
            special[token] = next_id
            next_id += 1
    return tiktoken.Encoding(name, pat_str=pat_str, mergeable_ranks=ranks, special_tokens=special)


def load_tokenizer(name, builtin_dir=None):
    """`builtin`: the BPE stored in builtin_dir (no download). Any other name: tiktoken.get_encoding(name)."""
    if name == "builtin":
        path = os.path.join(builtin_dir or "", BUILTIN_TOKENIZER_FILE)
        if not os.path.exists(path):
            raise FileNotFoundError(f"no built-in tokenizer at {path}: run `python data.py --out {builtin_dir}` "
                                    f"to write the data set and its tokenizer")
        return Tokenizer(with_special_tokens("builtin", PAT_STR, load_bpe(path), {}), "builtin")
    try:
        base = tiktoken.get_encoding(name)
    except Exception as e:  # unknown name, or the BPE file cannot be downloaded (offline, no cache)
        raise RuntimeError(f"tiktoken encoding {name!r} could not be loaded ({type(e).__name__}: {e}); it is "
                           f"downloaded on first use, so set TIKTOKEN_CACHE_DIR to a cached copy or use "
                           f"--tokenizer=builtin") from None
    return Tokenizer(with_special_tokens(name, base._pat_str, base._mergeable_ranks, base._special_tokens), name)


# ----------------------------------------------------------------------------------------------------------
# 3. Conversation templates: the text the model reads, and which of its tokens are supervised

CHAT_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
               "helpful, detailed, and polite answers to the user's questions.")


@dataclass(frozen=True)
class ChatFormat:
    """How a conversation is written out for the LLM in stages II-III: an opening with the system prompt, then per
    turn the question, the answer (supervised, ending with `end`, where generation stops) and what follows it."""
    opening: str  # {system} is replaced by CHAT_SYSTEM
    question: str  # {q} is replaced by the question; ends where the answer begins
    answer: str  # {a} is replaced by the answer
    end: str  # the special token that ends an answer: its id stops generation (and pads batches)
    after: str = ""  # unsupervised text after the end token


CHAT_FORMATS = {
    # MoE-LLaVA's own (its `phi` style), the format of the built-in tokenizer and of any folder that has <|endoftext|>
    "chat": ChatFormat("{system} ", "USER: {q} ASSISTANT:", " {a}" + END_OF_TEXT, END_OF_TEXT),
    # ChatML, the format Qwen2 and SmolLM2 were tuned on
    "chatml": ChatFormat("<|im_start|>system\n{system}<|im_end|>\n",
                         "<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n", "{a}<|im_end|>", "<|im_end|>",
                         after="\n"),
    # Llama 3's
    "llama3": ChatFormat("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>",
                         "<|start_header_id|>user<|end_header_id|>\n\n{q}<|eot_id|>"
                         "<|start_header_id|>assistant<|end_header_id|>\n\n", "{a}<|eot_id|>", "<|eot_id|>"),
}
TEMPLATES = ("plain", *CHAT_FORMATS)  # plain: stage I; a chat format: stages II-III


def render(conversations, template):
    """Turn LLaVA turns into text pieces (text, supervised?) -- MoE-LLaVA's `plain` style, or a chat format.

    plain (stage I):  <image> caption \n            -- the human turn is replaced by the image alone
    chat (II, III):   {system} USER: <image>\n{q} ASSISTANT: {a}<|endoftext|>USER: {q2} ASSISTANT: {a2}<|endoftext|>
    Only the answers (with their end marker) are supervised. The `chat` answer piece starts with the space after
    "ASSISTANT:", so a prompt ending in "ASSISTANT:" is exactly what generation starts from.
    """
    if template == "plain":
        return [(IMAGE_PLACEHOLDER, False), (conversations[1]["value"] + "\n", True)]
    form = CHAT_FORMATS[template]
    pieces = [(form.opening.replace("{system}", CHAT_SYSTEM), False)]
    for human, gpt in zip(conversations[0::2], conversations[1::2]):
        pieces.append((form.question.replace("{q}", human["value"]), False))
        pieces.append((form.answer.replace("{a}", gpt["value"]), True))
        if form.after:
            pieces.append((form.after, False))
    return pieces


def prompt_pieces(conversations, template):
    """The pieces of a rendered conversation up to where its last answer begins: what generation starts from."""
    pieces = render(conversations, template)
    last_answer = max(i for i, (_, supervised) in enumerate(pieces) if supervised)
    return pieces[:last_answer]


def chat_prompt(question, with_image=True, template="chat"):
    """The prompt for one question, ending where the assistant's answer begins (for generation)."""
    question = f"{IMAGE_PLACEHOLDER}\n{question}" if with_image else question
    return prompt_pieces([{"from": "human", "value": question}, {"from": "gpt", "value": ""}], template)


def check_chat_format(tokenizer):
    """Raise ValueError unless every special marker of the tokenizer's chat format is one of its special tokens."""
    if tokenizer.chat not in CHAT_FORMATS:
        raise ValueError(f"unknown chat format {tokenizer.chat!r}: choose one of {', '.join(CHAT_FORMATS)}")
    form = CHAT_FORMATS[tokenizer.chat]
    markers = set(re.findall(r"<\|[a-z_]+\|>", form.opening + form.question + form.answer))
    missing = sorted(markers - set(tokenizer.specials))
    if missing:
        raise ValueError(f"the {tokenizer.chat!r} chat format needs the special token(s) {', '.join(missing)}, "
                         f"which the {tokenizer.name} tokenizer does not have")


def tokenize(pieces, tokenizer, num_image_tokens, supervise_all=False):
    """Pieces -> (ids, supervised) int32 / bool arrays; each <image> becomes num_image_tokens IMAGE_TOKEN_INDEX ids."""
    ids, sup = [], []
    for text, supervised in pieces:
        for i, chunk in enumerate(text.split(IMAGE_PLACEHOLDER)):
            if i:  # an image: never supervised
                ids += [IMAGE_TOKEN_INDEX] * num_image_tokens
                sup += [False] * num_image_tokens
            chunk_ids = tokenizer.encode(chunk)
            ids += chunk_ids
            sup += [supervised or supervise_all] * len(chunk_ids)
    return np.array(ids, dtype=np.int32), np.array(sup, dtype=bool)


# ----------------------------------------------------------------------------------------------------------
# 4. Loading LLaVA JSON: check every sample, tokenize the good ones, count the bad ones

class BadSample(ValueError):
    pass


class EmptyBatch(RuntimeError):
    """Every sample of a batch had an unreadable image (see batch_or_stand_in)."""


def check_conversation(sample, template):
    """Raise BadSample(reason) if a sample cannot be trained on; returns its conversations."""
    conv = sample.get("conversations") if isinstance(sample, dict) else None
    if not isinstance(conv, list) or not conv:
        raise BadSample("no conversations")
    if not all(isinstance(t, dict) and isinstance(t.get("value"), str) for t in conv):
        raise BadSample("malformed turn")
    if [t.get("from") for t in conv] != ["human", "gpt"] * (len(conv) // 2) or len(conv) % 2:
        raise BadSample("turns do not alternate human/gpt" if len(conv) > 1 else "no answer")
    if not all(t["value"].strip() for t in conv[1::2]):
        raise BadSample("empty answer")
    n_images = sum(t["value"].count(IMAGE_PLACEHOLDER) for t in conv)
    image = sample.get("image")
    has_image = image is not None
    if has_image and not isinstance(image, str):
        raise BadSample("image is not a file name")
    if n_images > 1 or any(IMAGE_PLACEHOLDER in t["value"] for t in conv[1:]):
        raise BadSample("<image> outside the first question, or more than once")
    if has_image:  # LLaVA moves the placeholder to the front of the first question (or adds it there)
        question = conv[0]["value"].replace(IMAGE_PLACEHOLDER, "").strip()
        conv = [{**conv[0], "value": f"{IMAGE_PLACEHOLDER}\n{question}"}, *conv[1:]]
    if not has_image and n_images:
        raise BadSample("<image> in the text but no image file")
    if template == "plain" and (not has_image or len(conv) != 2):
        raise BadSample("the plain template needs an image and exactly one answer")
    return conv


def truncate(ids, sup, max_len):
    """Cut to max_len tokens, but never inside an image; a sample left with no answer is rejected."""
    if len(ids) <= max_len:
        return ids, sup
    if (ids[:max_len] == IMAGE_TOKEN_INDEX).sum() != (ids == IMAGE_TOKEN_INDEX).sum():
        raise BadSample(f"too long ({len(ids)} tokens): a cut at {max_len} would cut into the image")
    ids, sup = ids[:max_len], sup[:max_len]
    if not sup.any():
        raise BadSample(f"too long: no answer left within {max_len} tokens")
    return ids, sup


@dataclass
class Example:
    ids: np.ndarray  # (T,) int32, IMAGE_TOKEN_INDEX at image positions
    supervised: np.ndarray  # (T,) bool: which positions are labels
    image: str = None  # path of the image file, or None for text-only


def read_json(path):
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"data file {path} does not exist") from None
    except IsADirectoryError:
        raise ValueError(f"{path} is a folder; expected a LLaVA-format JSON file (images go in --image_folder)") \
            from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); expected a LLaVA-format list of samples") from None
    if not isinstance(data, list):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}; expected a LLaVA-format list of samples")
    return data


def load_examples(path, image_folder, tokenizer, template, num_image_tokens, max_len, max_bad_fraction=0.05,
                  supervise_all=False, keep_images=True, log=print, samples=None):
    """Read a LLaVA-format JSON file into Examples, skipping bad samples with one summary line.

    keep_images=False drops each image placeholder and its file (text-only language modelling, stage 0).
    samples: the file's samples already read (or a subset of them); path then only names them in messages.
    Raises ValueError when more than max_bad_fraction of the samples are bad: that is a wrong path or format.
    """
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}: choose one of {TEMPLATES}")
    samples = read_json(path) if samples is None else samples
    examples, bad = [], collections.Counter()
    for sample in samples:
        try:
            conv = check_conversation(sample, template)
            image = sample.get("image") if keep_images else None
            if image is not None:
                image = os.path.join(image_folder, image)
                if not os.path.isfile(image):
                    raise BadSample("image file missing")
            pieces = render(conv, template)
            if not keep_images:
                pieces = [(text.replace(IMAGE_PLACEHOLDER + "\n", "").replace(IMAGE_PLACEHOLDER, ""), s)
                          for text, s in pieces]
            ids, sup = truncate(*tokenize(pieces, tokenizer, num_image_tokens, supervise_all), max_len)
            examples.append(Example(ids, sup, image))
        except BadSample as e:
            bad[str(e).split(" (")[0].split(":")[0]] += 1
    n_bad = sum(bad.values())
    if n_bad:
        log(f"{path}: skipped {n_bad} of {len(samples)} samples ("
            + ", ".join(f"{n} {reason}" for reason, n in bad.most_common()) + ")")
    if not samples or n_bad > max_bad_fraction * len(samples):
        reasons = ", ".join(f"{n} {reason}" for reason, n in bad.most_common(3))
        raise ValueError(f"{path}: {n_bad} of {len(samples)} samples are unusable for the {template!r} template "
                         f"({reasons}), more than max_bad_fraction={max_bad_fraction}; check the file, its "
                         f"stage, and --image_folder")
    return examples


# ----------------------------------------------------------------------------------------------------------
# 5. Batching

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's pixel normalisation, used by LLaVA's image processor
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def load_image(path, size, resize="stretch"):
    """RGB, made size x size (image_tensor), normalised: (3, size, size) float32. Raises OSError if unreadable."""
    with Image.open(path) as im:
        return image_tensor(im, size, resize)


IMAGE_RESIZES = ("stretch", "crop", "pad")


def image_tensor(im, size, resize="stretch"):
    """A PIL image as the model reads it: RGB, size x size, normalised with CLIP's mean and std (3, size, size).

    How a non-square image becomes square (ViTConfig.image_resize): stretch (our scenes are square, so nothing is
    lost); crop (CLIP's own preprocessing: the shorter side to size, then the centre, so the edges of a wide
    picture are cut off); pad (MoE-LLaVA and LLaVA-1.5: the picture in the middle of a square of the mean colour,
    which normalises to 0, then resized, so nothing is cut off).
    """
    im = im.convert("RGB")
    w, h = im.size
    if resize == "crop" and w != h:
        scale = size / min(w, h)
        im = im.resize((max(size, int(w * scale)), max(size, int(h * scale))), Image.BICUBIC)
        left, top = (im.width - size) // 2, (im.height - size) // 2
        im = im.crop((left, top, left + size, top + size))
    elif resize == "pad" and w != h:
        square = Image.new("RGB", (max(w, h),) * 2, tuple(int(255 * m) for m in CLIP_MEAN))
        square.paste(im, ((max(w, h) - w) // 2, (max(w, h) - h) // 2))
        im = square
    elif resize not in IMAGE_RESIZES:
        raise ValueError(f"unknown image resize {resize!r}: choose one of {', '.join(IMAGE_RESIZES)}")
    if im.size != (size, size):
        im = im.resize((size, size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) int64, padded with the pad id; IMAGE_TOKEN_INDEX at image positions
    labels: torch.Tensor  # (B, T) int64, IGNORE_INDEX where unsupervised (prompt, image, padding)
    attention_mask: torch.Tensor  # (B, T) bool, False at padding (right-padded)
    images: torch.Tensor = None  # (n, 3, H, W) in the order the images appear, or None
    skipped: int = 0  # samples dropped from this batch because their image could not be read

    def to(self, device):
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(move(self.input_ids), move(self.labels), move(self.attention_mask), move(self.images),
                     self.skipped)

    @property
    def num_tokens(self):
        return int(self.attention_mask.sum())


class Batches:
    """A deterministic, resumable stream of batches over a list of Examples.

    Epoch e visits the examples in the order of torch.randperm with seed (seed, e); batch b of the epoch is the
    b-th slice of batch_size (a final incomplete slice is dropped). So the data position is just the number of
    batches consumed, and resuming at step s reproduces exactly the batches an uninterrupted run would see.
    An image that cannot be read drops its sample from the batch, counted in Batch.skipped (never a crash).
    """

    def __init__(self, examples, batch_size, image_size, pad_id, seed=0, cache_images=False, image_resize="stretch"):
        if len(examples) < batch_size:
            raise ValueError(f"{len(examples)} examples are fewer than one batch of {batch_size}")
        self.examples, self.batch_size, self.image_size = examples, batch_size, image_size
        self.image_resize = image_resize
        self.pad_id, self.seed = pad_id, seed
        self.cache = {} if cache_images else None
        self.per_epoch = len(examples) // batch_size
        self._order = None  # (epoch, permutation): a cache, so a 665K-sample epoch is shuffled once, not per step

    def indices(self, step):
        epoch, b = divmod(step, self.per_epoch)
        return self.epoch_order(epoch)[b * self.batch_size:(b + 1) * self.batch_size].tolist()

    def epoch_order(self, epoch):
        """The permutation of epoch e, drawn once per epoch (a function of seed and epoch, so resumable)."""
        if self._order is None or self._order[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1000003 + epoch)
            self._order = (epoch, torch.randperm(len(self.examples), generator=g))
        return self._order[1]

    def image(self, path):
        if self.cache is not None and path in self.cache:
            return self.cache[path]
        x = load_image(path, self.image_size, self.image_resize)
        if self.cache is not None:
            self.cache[path] = x
        return x

    def in_order(self, b):
        """Batch b in the file's order (validation: always the same batches)."""
        return self.collate(self.examples[b * self.batch_size:(b + 1) * self.batch_size])

    def __getitem__(self, step):
        return self.collate([self.examples[i] for i in self.indices(step)])

    def collate(self, examples):
        kept, images, skipped = [], [], 0
        for ex in examples:
            if ex.image is not None:
                try:
                    images.append(self.image(ex.image))
                except (OSError, ValueError, SyntaxError) as e:
                    print(f"skipping a sample: its image {ex.image} cannot be read ({e})", file=sys.stderr)
                    skipped += 1
                    continue
            kept.append(ex)
        if not kept:
            raise EmptyBatch(f"all {len(examples)} images of a batch were unreadable; check --image_folder")
        T = max(len(ex.ids) for ex in kept)
        input_ids = torch.full((len(kept), T), self.pad_id, dtype=torch.long)
        labels = torch.full((len(kept), T), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros(len(kept), T, dtype=torch.bool)
        for row, ex in enumerate(kept):
            n = len(ex.ids)
            ids = torch.from_numpy(ex.ids.astype(np.int64))
            input_ids[row, :n] = ids
            labels[row, :n] = ids.masked_fill(~torch.from_numpy(ex.supervised), IGNORE_INDEX)
            mask[row, :n] = True
        return Batch(input_ids, labels, mask, torch.stack(images) if images else None, skipped)


@dataclass
class PairedBatch:
    """Stage 0's batch: image-caption pairs for the ViT (contrastive loss) and text for the LLM (next token)."""

    pairs: Batch
    text: Batch

    def to(self, device):
        return PairedBatch(self.pairs.to(device), self.text.to(device))

    @property
    def images(self):
        return self.pairs.images

    @property
    def num_tokens(self):  # tokens/s counts what the LLM reads
        return self.text.num_tokens


class PairedBatches:
    """Two streams read at the same index, as one stream of PairedBatch (stage 0)."""

    def __init__(self, pairs: Batches, text: Batches):
        self.pairs, self.text = pairs, text
        self.per_epoch = min(pairs.per_epoch, text.per_epoch)

    def __getitem__(self, index):
        return PairedBatch(self.pairs[index], self.text[index])

    def in_order(self, b):
        return PairedBatch(self.pairs.in_order(b), self.text.in_order(b))


def batch_or_stand_in(load, index, search, stand_in=False, warn=None):
    """(load(index), 1.0), or, when every image of that batch is unreadable (EmptyBatch; warn(reason) is told):
    (None, 0.0), the batch skipped -- or with stand_in=True the first readable batch of the `search` after it,
    at weight 0.0. A distributed run needs the stand-in: every rank must join each step's collectives
    (DDP's all-reduce, the experts' token exchange) even when its own batch is unusable, and at weight 0 it
    changes nothing."""
    try:
        return load(index), 1.0
    except EmptyBatch as e:
        if warn is not None:
            warn(str(e))
        if not stand_in:
            return None, 0.0
    for i in range(index + 1, index + 1 + search):
        try:
            return load(i), 0.0
        except EmptyBatch:
            pass
    raise SystemExit("error: no batch of the data set has a readable image; check --image_folder")


def prompt_batch(prompts, pad_id):
    """Left-pad token-id prompts for batched generation: (B, T) ids and a (B, T) bool mask of real tokens."""
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.bool)
    for row, p in enumerate(prompts):
        ids[row, T - len(p):] = torch.as_tensor(np.asarray(p, dtype=np.int64))
        mask[row, T - len(p):] = True
    return ids, mask


# ----------------------------------------------------------------------------------------------------------
# 6. Command-line options: every field of a config dataclass as --name=value (train.py, eval.py, data.py)


def parse_bool(text):
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def field_help(cls):
    """Each field's help text is the comment beside it in the dataclass: one place documents a default."""
    lines = inspect.getsource(cls).splitlines()
    found = (re.match(r"\s+(\w+): \w+ = .*?#\s*(.*)$", line) for line in lines)
    return {m.group(1): m.group(2) for m in found if m}


def add_options(parser, cls, prefix="", skip=()):
    """--{prefix}{field}=value for each field of cls with the field's type and its comment as help (default None,
    so that what was given can be told from what was not); a bool may also be a bare flag (--resume)."""
    helps = field_help(cls)
    for f in fields(cls):
        name = prefix + f.name
        if name in skip or f.default is MISSING:
            continue
        kind = type(f.default)
        extra = {"nargs": "?", "const": True} if kind is bool else {}
        parser.add_argument(f"--{name}", type=parse_bool if kind is bool else kind, default=None, dest=name,
                            metavar=kind.__name__.upper(), help=f"{helps.get(f.name, cls.__name__ if prefix else '')} "
                            f"(default {f.default!r})", **extra)


def main():
    parser = argparse.ArgumentParser(description="Write the built-in data set (scenes, LLaVA-format JSON, tokenizer).",
                                     allow_abbrev=False)
    parser.add_argument("--out", default="data/builtin", help="folder to write into (default: data/builtin)")
    add_options(parser, BuiltinConfig)
    args = parser.parse_args()
    try:
        config = BuiltinConfig(**{k: v for k, v in vars(args).items() if v is not None and k != "out"})
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    generate_builtin(args.out, config)
    tok = load_tokenizer("builtin", args.out)
    sizes = {s: len(read_json(os.path.join(args.out, f"instruct_{s}.json"))) for s in ("train", "val", "test")}
    print(f"wrote {args.out}: instruction samples {sizes}, tokenizer vocabulary {tok.vocab_size}")
    sample = read_json(os.path.join(args.out, "instruct_train.json"))[0]
    print("example:", json.dumps(sample)[:300])


if __name__ == "__main__":
    main()
