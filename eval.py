"""
eval.py -- what the model answers, how often it is right, and where its tokens go.

    python eval.py --ckpt out/stage3                          # the built-in test split: VQA, POPE, losses, routing
    python eval.py --ckpt out/stage3 --compare out/stage2     # two checkpoints side by side (MoE III vs dense II)
    python eval.py --ckpt out/stage3 --data_path my.json --image_folder my_images/   # your LLaVA-format data
    python eval.py --ckpt out/stage3 --image some.png --prompt "What colour is the circle?"   # one answer
    python eval.py --ckpt out/stage0 --probe=true            # what the ViT alone encodes (linear probes)
    python eval.py --help                                     # every option, with its default
    torchrun --standalone --nproc_per_node=8 eval.py --ckpt out/stage3   # questions and batches shared by 8 ranks

What it measures (definitions and sources in docs/reference.md):
  VQA      every question of the test conversations, asked with the image and the conversation so far (earlier
           turns with their reference answers), answered greedily; exact match after normalize_answer, by
           question type. A "description" is scored by the objects it names (described_objects).
  blind    VQA and POPE asked again with images the model cannot use (--blind: one grey picture for every
           question, or each question shown another question's image): how much the answers depend on looking.
  POPE     the object-hallucination probe (Li et al. 2023, arXiv 2305.10355) on the built-in scenes: "Is there a
           {colour} {shape} in the image?" for objects present and, as negatives, absent objects drawn three ways
           (random, popular, adversarial); accuracy, precision, recall, F1 and yes-ratio per split.
  probe    (--probe, instead of the rest) logistic regression on the ViT's patch features and on raw pixels:
           per scene attribute (occupied cells, colours, shapes, colour-shape kinds), how well a linear reader
           recovers it; and, for a stage-0 checkpoint with a captioner, how many of its size, colour, shape and
           position words are right. It tells a ViT that never learned shapes from an LLM that cannot read them.
  losses   answer and caption cross-entropy on the test split (teacher forcing); on the captions, also how
           many size, colour, shape and position words the model predicts right: can it read them off the image?
  routing  from the answer-loss pass, in eval mode (the evaluation capacity): per MoE layer and expert, top-1 and
           top-k assignments of text and image tokens; load balance; dropped assignments; top-1 pathways. Plots
           as PNG with the numbers beside them (JSON, CSV), and the load over training time from the log.
           The capacity is a share of one forward's tokens, so what is dropped depends on --batch_size.
           MoE layers on the vision side (CuMo: ViT blocks, projector) are a second group, counted over the image
           patches, with the same files prefixed vision_ and a patch-level routing map: each patch of a few test
           images coloured by its first-choice expert, layer by layer (vision_patch_routing.png).

Everything lands in --out (default {ckpt}/eval/): metrics.json, answers.jsonl (every question, answer and
verdict), pope_answers.jsonl, routing.json, routing.csv, routing_training.csv and the PNG plots; with
--compare, the second checkpoint's files go to {out}/compare/ and the side-by-side table to {out}/compare.txt.

Under torchrun every rank loads the whole model and takes every world-th generation batch and loss batch
(the same batches as one process); the answers and counts are gathered, and rank 0 prints and writes
(parallel.Runtime: mine, gather).

Read it top to bottom, the measurement path first: loading -> asking (batched generation) -> VQA -> POPE ->
the linear probe -> losses and routing counts -> one checkpoint's evaluation and the report; then the routing
summary and its plots, and the command line.
"""
import collections
import dataclasses
import json
import os
import random
import re
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import data as D
import parallel as P
import weights as W
from model import IMAGE_TOKEN_INDEX, VLM, VLMConfig, autocast, load_checkpoint
from vision import PretrainHead

# ----------------------------------------------------------------------------------------------------------
# Configuration: every default lives here; the command line overrides any field


@dataclass(frozen=True)
class EvalConfig:
    ckpt: str = ""  # the checkpoint folder to evaluate, e.g. out/stage3 (any stage's works)
    compare: str = ""  # a second checkpoint folder, evaluated the same way and shown beside the first
    out: str = ""  # where metrics.json, answers.jsonl and the plots go (default {ckpt}/eval)
    data_dir: str = ""  # the built-in data set (default: the one the checkpoint was trained on)
    split: str = "test"  # the built-in split to evaluate: test or val
    data_path: str = ""  # your own LLaVA-format JSON with reference answers, instead of the built-in split
    image_folder: str = ""  # where data_path's image paths are relative to
    image: str = ""  # single-image chat: the image to ask about (with --prompt)
    prompt: str = ""  # single-image chat: the question (without --image: a text-only question)
    limit: int = 0  # if > 0, evaluate only the first that many conversations and scenes (a quick look)
    batch_size: int = 64  # prompts per generation batch
    max_new_tokens: int = 16  # tokens generated per answer (longer references than this cannot match)
    description_tokens: int = 64  # tokens generated for a description (a caption)
    pope_per_image: int = 3  # POPE: objects present asked per image, and as many absent ones per split
    seed: int = 0  # POPE's random negatives
    blind: str = "blank"  # the blind control: VQA and POPE again with blank or shuffled images; none: skip it
    plots: bool = True  # write the routing plots
    probe: bool = False  # instead: linear probes of the ViT's features and of raw pixels, per scene attribute
    probe_scenes: int = 2000  # the probe's training scenes (from the train split; scored on --split)
    device: str = "auto"  # auto: cuda if available, else cpu
    progress: bool = True  # show progress bars


# ----------------------------------------------------------------------------------------------------------
# 1. Loading a checkpoint: the model, its tokenizer, and the metadata train.py wrote


def load_model(ckpt_dir, device):
    """-> (VLM in eval mode on device, Tokenizer, meta). Stops with one sentence if the folder is not usable."""
    state = load_checkpoint(ckpt_dir, "checkpoint", make="python train.py --stage all")
    meta = state["meta"]
    vlm = VLM(VLMConfig.from_dict(meta["model_config"]))
    vlm.load_state_dict(state["model"])
    try:
        chat = meta.get("chat_template", "chat")  # (checkpoints from before the chat formats: chat)
        tokenizer = W.tokenizer_from_folder(ckpt_dir, chat) if meta["tokenizer"] == "folder" else \
            dataclasses.replace(D.load_tokenizer(meta["tokenizer"], ckpt_dir), chat=chat)
    except (FileNotFoundError, RuntimeError, W.BadWeights) as e:
        raise SystemExit(f"error: {e}") from None
    meta["checkpoint"] = ckpt_dir
    return vlm.to(device).eval(), tokenizer, meta


# ----------------------------------------------------------------------------------------------------------
# 2. Asking: batched greedy generation with the KV cache


@dataclass
class Question:
    prompt: np.ndarray  # token ids ending where the answer starts ("... ASSISTANT:")
    image: str  # path of the image file, or None
    answer: str  # the reference answer
    qtype: str  # question type: colour, shape, ..., "pope", or "untyped" for data without types
    text: str  # the question as asked, for answers.jsonl
    max_new_tokens: int


BLIND_CONTROLS = ("blank", "shuffled", "none")


def image_loader(images, paths, size, resize="stretch"):
    """path -> the pixels a question is asked with: its own image (real); one grey picture, the same for every
    question (blank); or another question's image (shuffled: each of the distinct `paths` replaced by the next
    one in sorted order, so every question sees a different scene and the set of pictures stays the same)."""
    if images == "blank":
        grey = D.image_tensor(Image.new("RGB", (size, size), (128, 128, 128)), size)
        return lambda path: grey
    if images == "shuffled":
        distinct = sorted(set(paths))
        other = dict(zip(distinct, distinct[1:] + distinct[:1]))
        return lambda path: D.load_image(other[path], size, resize)
    return lambda path: D.load_image(path, size, resize)


def generate_answers(vlm, tokenizer, questions, device, batch_size, progress=True, desc="answers",
                     rt=P.Runtime(), images="real", dropless=True):
    """Greedy answers to Questions, in their order; None for a question whose image cannot be read.

    Prompts are sorted by length so a batch holds similar lengths (little left padding), then answered
    batch_size at a time by VLM.generate, which decodes with the KV cache and routes dropless. Under torchrun
    each rank answers every world-th batch, and all answers are gathered on every rank. images: real, or a
    blind control (image_loader). dropless=False: the MoE layers keep their evaluation capacity (LLM.generate).
    """
    answers = [None] * len(questions)
    size, resize = vlm.config.vision.image_size, vlm.config.vision.image_resize
    picture = image_loader(images, [q.image for q in questions if q.image is not None], size, resize)
    chunks = []  # a chunk never mixes answer lengths: each question was checked to fit with its own
    for new in sorted({q.max_new_tokens for q in questions}):
        group = sorted((i for i, q in enumerate(questions) if q.max_new_tokens == new),
                       key=lambda i: len(questions[i].prompt))
        chunks += [group[i:i + batch_size] for i in range(0, len(group), batch_size)]
    for chunk in tqdm(rt.mine(chunks), desc=desc, disable=not progress, dynamic_ncols=True, leave=False):
        kept, pixels, loaded = [], [], {}
        for i in chunk:
            q = questions[i]
            if q.image is not None:
                try:
                    if q.image not in loaded:
                        loaded[q.image] = picture(q.image)
                except (OSError, ValueError, SyntaxError) as e:
                    print(f"skipping a question: its image {q.image} cannot be read ({e})", file=sys.stderr)
                    continue
                pixels.append(loaded[q.image])
            kept.append(i)
        if not kept:
            continue
        ids, mask = D.prompt_batch([questions[i].prompt for i in kept], tokenizer.eos_id)
        images = torch.stack(pixels).to(device) if pixels else None
        with autocast(device):
            out = vlm.generate(ids.to(device), images, mask.to(device), eos_id=tokenizer.eos_id,
                               max_new_tokens=questions[kept[0]].max_new_tokens, dropless=dropless)
        for i, row in zip(kept, out.tolist()):
            answers[i] = tokenizer.decode([t for t in row if t != tokenizer.eos_id]).strip()
    if rt.distributed:  # each question was asked by exactly one rank
        for theirs in rt.gather({i: answers[i] for chunk in rt.mine(chunks) for i in chunk}):
            for i, answer in theirs.items():
                answers[i] = answer
    return answers


def chat(vlm, tokenizer, prompt, image_path, device, max_new_tokens):
    """Single-image chat: the model's answer to one question about one image (or none)."""
    prompt = prompt.replace(D.IMAGE_PLACEHOLDER, "").strip()  # LLaVA-style prompts may carry it; chat_prompt adds it
    pixels = None
    if image_path:
        try:
            vision = vlm.config.vision
            pixels = D.load_image(image_path, vision.image_size, vision.image_resize)[None].to(device)
        except (OSError, ValueError, SyntaxError) as e:
            raise SystemExit(f"error: the image {image_path} cannot be read ({e})") from None
    ids, _ = D.tokenize(D.chat_prompt(prompt, pixels is not None, tokenizer.chat), tokenizer, vlm.num_image_tokens)
    room = vlm.config.llm.max_seq_len - len(ids)
    if room < 1:
        raise SystemExit(f"error: the prompt takes {len(ids)} tokens, the model reads at most "
                         f"{vlm.config.llm.max_seq_len}; ask a shorter question")
    ids = torch.as_tensor(ids.astype(np.int64))[None].to(device)
    with autocast(device):
        out = vlm.generate(ids, pixels, max_new_tokens=min(max_new_tokens, room), eos_id=tokenizer.eos_id)
    return tokenizer.decode([t for t in out[0].tolist() if t != tokenizer.eos_id]).strip()


# ----------------------------------------------------------------------------------------------------------
# 3. VQA: every question of a conversation, scored by exact match after normalisation

NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}


def normalize_answer(text):
    """The answer normalisation, after VQAv2's evaluation script (simplified): lower case; a comma inside a number
    removed ("1,000" -> "1000"); other punctuation removed, except a period between digits ("3.5"); number words up
    to ten as digits; the articles a/an/the dropped; spaces collapsed. "The Red." -> "red", "Two" -> "2",
    "bottom-right" -> "bottom right". (VQAv2 also maps contractions and keeps ".5"; our answers have neither.)"""
    text = re.sub(r"(?<=\d),(?=\d)", "", text.lower())
    text = re.sub(r"(?<!\d)\.|\.(?!\d)", " ", text)
    text = re.sub(r"[^\w\s.]", " ", text)
    return " ".join(NUMBER_WORDS.get(w, w) for w in text.split() if w not in ARTICLES)


def described_objects(text):
    """The multiset of objects a description names, as "size colour shape" (captions say "a small red circle")."""
    pattern = rf"\b({'|'.join(D.SIZES)}) ({'|'.join(D.COLOURS)}) ({'|'.join(D.SHAPES)})\b"
    return collections.Counter(" ".join(m) for m in re.findall(pattern, text.lower()))


def is_correct(answer, reference, qtype):
    """A description is right when it names exactly the reference's objects (where they are and the background
    are not scored); any other answer when it equals the reference after normalize_answer."""
    if qtype == "description":
        return described_objects(answer) == described_objects(reference)
    return normalize_answer(answer) == normalize_answer(reference)


def turn_prompt(conv, turn, template="chat"):
    """The chat prompt for turn `turn` of a conversation: the earlier turns with their reference answers, then
    the question, ending where the answer begins ("ASSISTANT:" in the `chat` format)."""
    return D.prompt_pieces(conv[:2 * turn + 2], template)


def vqa_questions(samples, image_folder, tokenizer, vlm, config, log=print):
    """Questions from LLaVA-format samples: each turn of each usable conversation; bad samples, missing images
    and prompts too long for the model are skipped and counted in one line."""
    questions, bad = [], collections.Counter()
    max_len = vlm.config.llm.max_seq_len
    for sample in samples:
        try:
            conv = D.check_conversation(sample, tokenizer.chat)
        except D.BadSample as e:
            bad[str(e)] += 1
            continue
        image = sample.get("image")
        if image is not None:
            image = os.path.join(image_folder, image)
            if not os.path.isfile(image):
                bad["image file missing"] += 1
                continue
        types = sample.get("question_types")
        types = types if isinstance(types, list) else []  # our own field; user data has none
        for turn in range(len(conv) // 2):
            qtype = types[turn] if turn < len(types) and isinstance(types[turn], str) else "untyped"
            new = config.description_tokens if qtype == "description" else config.max_new_tokens
            ids, _ = D.tokenize(turn_prompt(conv, turn, tokenizer.chat), tokenizer, vlm.num_image_tokens)
            if len(ids) + new > max_len:
                bad["prompt too long"] += 1
                continue
            text = conv[2 * turn]["value"].replace(D.IMAGE_PLACEHOLDER, "").strip()
            questions.append(Question(ids, image, conv[2 * turn + 1]["value"], qtype, text, new))
    if bad:
        log("VQA: skipped " + ", ".join(f"{n} × {reason}" for reason, n in bad.most_common()))
    return questions, dict(bad)


def vqa_scores(questions, answers):
    """{type: {"accuracy", "n"}} plus "overall"; questions without an answer (unreadable image) are left out."""
    right, total = collections.Counter(), collections.Counter()
    for q, a in zip(questions, answers):
        if a is None:
            continue
        for key in (q.qtype, "overall"):
            total[key] += 1
            right[key] += is_correct(a, q.answer, q.qtype)
    return {k: {"accuracy": right[k] / total[k], "n": total[k]}
            for k in sorted(total, key=lambda k: (k == "overall", k))}


# ----------------------------------------------------------------------------------------------------------
# 4. POPE on the built-in scenes: an object is a (colour, shape) kind, as in the training existence questions

POPE_SPLITS = ("random", "popular", "adversarial")
ALL_KINDS = tuple((c, s) for c in D.COLOURS for s in D.SHAPES)


def kinds_in(scene):
    return sorted({(o["colour"], o["shape"]) for o in scene["objects"]})


def object_statistics(scenes):
    """How many scenes hold each kind, and how many hold both of two kinds (co-occurrence), over a scene set."""
    frequency, together = collections.Counter(), collections.Counter()
    for scene in scenes:
        kinds = kinds_in(scene)
        frequency.update(kinds)
        together.update((a, b) for a in kinds for b in kinds if a != b)
    return frequency, together


def pope_negatives(present, rule, n, frequency, together, rng):
    """n kinds absent from an image, chosen by POPE's rule:
    random: uniformly among the absent; popular: the most frequent in the training scenes; adversarial: those that
    co-occur most with the present kinds (summed over them). Ties go to the alphabetically first."""
    absent = [k for k in ALL_KINDS if k not in present]
    if rule == "random":
        return rng.sample(absent, n)
    if rule == "popular":
        score = {k: frequency[k] for k in absent}
    elif rule == "adversarial":
        score = {k: sum(together[(p, k)] for p in present) for k in absent}
    else:
        raise ValueError(f"unknown POPE split {rule!r}: choose one of {POPE_SPLITS}")
    return sorted(absent, key=lambda k: (-score[k], k))[:n]


def pope_probe(scenes, train_scenes, per_image, seed):
    """{split: [(scene, (colour, shape), present?)]}: per image up to per_image present kinds and as many absent
    ones, so each split is balanced yes/no as in POPE. Frequencies come from the training scenes."""
    frequency, together = object_statistics(train_scenes)
    rng = random.Random(seed)
    probe = {split: [] for split in POPE_SPLITS}
    for scene in scenes:
        present = kinds_in(scene)
        positives = rng.sample(present, min(per_image, len(present)))
        for split in POPE_SPLITS:
            negatives = pope_negatives(present, split, len(positives), frequency, together, rng)
            probe[split] += [(scene, k, True) for k in positives] + [(scene, k, False) for k in negatives]
    return probe


def pope_question(kind):
    return f"Is there a {kind[0]} {kind[1]} in the image?"  # data.questions' existence question


def pope_says_yes(answer):
    """POPE's parsing, as in its evaluation code: the first sentence, commas deleted, split at spaces; the word
    "No", "no" or "not" means no, anything else yes (so, as there, "Not" and "NO" count as yes)."""
    words = answer.split(".")[0].replace(",", "").split(" ")
    return not ("No" in words or "no" in words or "not" in words)


def pope_metrics(said_yes, is_present):
    """Accuracy, precision, recall, F1 and yes-ratio with "yes" the positive class (POPE's table)."""
    pairs = list(zip(said_yes, is_present))
    tp = sum(y and p for y, p in pairs)
    fp = sum(y and not p for y, p in pairs)
    fn = sum(p and not y for y, p in pairs)
    n = len(pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {"accuracy": sum(y == p for y, p in pairs) / n if n else 0.0, "precision": precision, "recall": recall,
            "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
            "yes_ratio": sum(said_yes) / n if n else 0.0, "n": n}


def pope_questions(probe, image_folder, tokenizer, vlm, config):
    """One Question per distinct (image, kind): the splits share their positives, and greedy answers repeat."""
    unique = {}
    for items in probe.values():
        for scene, kind, present in items:
            key = (scene["image"], kind)
            if key not in unique:
                prompt = D.chat_prompt(pope_question(kind), template=tokenizer.chat)
                ids, _ = D.tokenize(prompt, tokenizer, vlm.num_image_tokens)
                unique[key] = Question(ids, os.path.join(image_folder, scene["image"]), "yes" if present else "no",
                                       "pope", pope_question(kind), config.max_new_tokens)
    return unique


# ----------------------------------------------------------------------------------------------------------
# 5. The linear probe: what the ViT's features say about a scene, before any LLM reads them

PROBE_GROUPS = ("cells", "colours", "shapes", "kinds")  # kinds: is there a (colour, shape), POPE's question


def probe_targets(scenes):
    """(N, K) 0/1 targets, one column per attribute value, and each column's group: is grid cell i occupied,
    is there something <colour>, is there a <shape>, is there a <colour> <shape>."""
    columns = [("cells", lambda s, i=i: any(o["cell"] == i for o in s["objects"])) for i in range(9)]
    columns += [("colours", lambda s, c=c: any(o["colour"] == c for o in s["objects"])) for c in D.COLOURS]
    columns += [("shapes", lambda s, h=h: any(o["shape"] == h for o in s["objects"])) for h in D.SHAPES]
    columns += [("kinds", lambda s, k=k: k in kinds_in(s)) for k in ALL_KINDS]
    y = torch.tensor([[float(test(s)) for _, test in columns] for s in scenes])
    return y, [group for group, _ in columns]


@torch.no_grad()
def probe_features(vit, scenes, folder, batch_size=100):
    """-> (ViT features, pixels): each scene's patch features as the projector receives them (the selected
    layer, class token dropped), flattened to one vector, and its raw pixels flattened the same way."""
    device = next(vit.parameters()).device
    feats, pixels = [], []
    for i in range(0, len(scenes), batch_size):
        x = torch.stack([D.load_image(os.path.join(folder, s["image"]), vit.config.image_size, vit.config.image_resize)
                         for s in scenes[i:i + batch_size]])
        feats.append(vit(x.to(device)).float().flatten(1).cpu())
        pixels.append(x.flatten(1))
    return torch.cat(feats), torch.cat(pixels)


def balanced_accuracy(said, truth):
    """Per column, the mean of the accuracy on the scenes with the attribute and on those without: 0.5 for any
    constant answer, however rare the attribute (a red cross is in few scenes; "no" is not knowledge)."""
    right = (said == truth).float()
    return (right * truth).sum(0) / truth.sum(0).clamp(min=1) / 2 + \
        (right * (1 - truth)).sum(0) / (1 - truth).sum(0).clamp(min=1) / 2


def fit_probe(x, y, x_test, y_test, steps=200, weight_decay=1e-2, seed=0):
    """Logistic regression, one binary classifier per column of y, on standardised features (full-batch AdamW,
    fixed steps and decay: the same instrument for every feature set). -> balanced accuracy per column on the
    test set."""
    mean, std = x.mean(0), x.std(0) + 1e-6
    x, x_test = (x - mean) / std, (x_test - mean) / std
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(x.shape[1], y.shape[1], generator=g) * 1e-3).requires_grad_()
    b = torch.zeros(y.shape[1], requires_grad=True)
    opt = torch.optim.AdamW([w, b], lr=1e-2, weight_decay=weight_decay)
    for _ in range(steps):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return balanced_accuracy((x_test @ w + b > 0).float(), y_test)


def linear_probe(vit, folder, train_scenes, test_scenes):
    """Per attribute group, the mean balanced test accuracy of linear probes on the ViT's features and on raw
    pixels (50 % = no information): how much of each attribute the features make easy to read."""
    y, groups = probe_targets(train_scenes)
    y_test, _ = probe_targets(test_scenes)
    feats, pixels = probe_features(vit, train_scenes, folder)
    feats_test, pixels_test = probe_features(vit, test_scenes, folder)
    per_column = {"vit": fit_probe(feats, y, feats_test, y_test), "pixels": fit_probe(pixels, y, pixels_test, y_test)}
    return {name: {g: float(acc[[c == g for c in groups]].mean()) for g in PROBE_GROUPS}
            for name, acc in per_column.items()}


CAPTION_WORDS = {"size": tuple(D.SIZES), "colour": tuple(D.COLOURS), "shape": D.SHAPES,
                 "position": ("top", "bottom", "left", "right", "center")}


class WordTally:
    """How often a model, teacher-forced on the reference captions, predicts each kind of word that only the image
    can tell -- size, colour, shape (also per shape) and position. One tally per model; `add` per batch."""

    def __init__(self, tokenizer):
        self.word_of = {}
        for kind, words in CAPTION_WORDS.items():
            for w in words:
                ids = tokenizer.encode(" " + w)
                if len(ids) == 1:  # (a word split into several tokens is left out)
                    self.word_of[ids[0]] = (kind, w)
        self.right, self.total = collections.Counter(), collections.Counter()

    def add(self, said, target):
        """said, target: (B, T) token ids, aligned (said[b, t] is the prediction of target[b, t])."""
        for token, (kind, w) in self.word_of.items():
            at = target == token
            hits = int((said[at] == token).sum())
            for key in (kind, f"shape: {w}") if kind == "shape" else (kind,):
                self.total[key] += int(at.sum())
                self.right[key] += hits

    def accuracy(self):
        return {k: self.right[k] / self.total[k] for k in sorted(self.total) if self.total[k]}


@torch.no_grad()
def caption_word_accuracy(vit, captioner, tokenizer, captions, folder, batch_size=50):
    """WordTally of stage 0's captioner (vision.CaptionHead) on the captions."""
    tally = WordTally(tokenizer)
    device = next(vit.parameters()).device
    for i in range(0, len(captions), batch_size):
        chunk = captions[i:i + batch_size]
        texts = [tokenizer.encode(c["conversations"][1]["value"] + "\n") for c in chunk]
        ids = torch.full((len(texts), max(map(len, texts))), -1, dtype=torch.long)
        for row, t in enumerate(texts):
            ids[row, :len(t)] = torch.tensor(t)
        pixels = torch.stack([D.load_image(os.path.join(folder, c["image"]), vit.config.image_size,
                                           vit.config.image_resize) for c in chunk])
        said = captioner.logits(vit, pixels.to(device), ids.clamp(min=0).to(device)).argmax(-1).cpu()
        tally.add(said, ids)
    return tally.accuracy()


def run_probe(config, model, data, out, log):
    """The linear probe of one checkpoint's ViT: a table, and probe.json in out."""
    vlm = model[0]
    train_scenes = data.train_scenes[:config.probe_scenes]
    log(f"linear probes on {len(train_scenes)} training scenes, scored on {len(data.scenes)} {config.split} scenes")
    result = linear_probe(vlm.vision, data.folder, train_scenes, data.scenes)
    lines = ["features".ljust(10) + "".join(f"{g:>10}" for g in PROBE_GROUPS)]
    lines += [name.ljust(10) + "".join(f"{100 * acc[g]:10.1f}" for g in PROBE_GROUPS) for name, acc in result.items()]
    log("\n".join(lines))
    written = {"checkpoint": config.ckpt, "train_scenes": len(train_scenes), "test_scenes": len(data.scenes),
               "accuracy": result}
    meta = model[2]
    has_captioner = meta.get("stage") == 0 and meta["train_config"].get("stage0_objective") in ("caption", "both")
    state = load_checkpoint(config.ckpt) if has_captioner else {}  # (load_model kept only the VLM's weights)
    if "head" in state:
        head = PretrainHead(meta["train_config"]["stage0_objective"], model[1].vocab_size,
                            vlm.config.llm.max_seq_len, vlm.vision.config)
        head.load_state_dict(state["head"])
        words = caption_word_accuracy(vlm.vision, head.caption.to(next(vlm.parameters()).device).eval(),
                                      model[1], data.captions, data.folder)
        log("the captioner's words right (teacher-forced, %): " +
            ", ".join(f"{k} {100 * v:.1f}" for k, v in words.items()))
        written["captioner_words"] = words
    os.makedirs(out, exist_ok=True)
    D.write_json(os.path.join(out, "probe.json"), written)
    log(f"\nwrote into {out}: probe.json")
    return result


# ----------------------------------------------------------------------------------------------------------
# 6. Losses and routing counts: one teacher-forced pass in eval mode


@dataclass
class RoutingCounts:
    """What one group of MoE layers did over an evaluation set, per MoE layer and expert (padding excluded).
    Two groups: the LLM's layers (text and image tokens), and the vision side's (CuMo: the ViT's blocks and the
    projector, over the image patches -- the ViT's class token is routed too but not counted here)."""

    layers: list  # each MoE layer: the LLM block index, or "ViT 0", "ViT 1", ..., "projector"
    top_k: int
    capacity_factor: float  # the evaluation capacity factor the counts were taken at
    topk_counts: torch.Tensor  # (L, 2, E) top-k assignments (before dropping) of text (row 0) and image (row 1) tokens
    top1_counts: torch.Tensor  # (L, 2, E) first choices
    dropped: torch.Tensor  # (L,) assignments dropped for lack of capacity
    tokens: torch.Tensor  # (2,) text and image tokens routed
    pathways: list  # [Counter(tuple of top-1 experts across the MoE layers -> tokens)] for text, image
    prob_sums: torch.Tensor  # (L, E) each expert's router probability summed over the routed tokens (LLM layers)

    @classmethod
    def zeros(cls, layers, top_k, num_experts, capacity_factor):
        L = len(layers)
        return cls(layers=layers, top_k=top_k, capacity_factor=capacity_factor,
                   topk_counts=torch.zeros(L, 2, num_experts, dtype=torch.long),
                   top1_counts=torch.zeros(L, 2, num_experts, dtype=torch.long),
                   dropped=torch.zeros(L, dtype=torch.long), tokens=torch.zeros(2, dtype=torch.long),
                   pathways=[collections.Counter(), collections.Counter()],
                   prob_sums=torch.zeros(L, num_experts, dtype=torch.float64))


def routing_groups(vlm):
    """{"llm": RoutingCounts, "vision": RoutingCounts} for the groups of MoE layers this VLM has (maybe none)."""
    groups = {}
    names = vlm.moe_layer_names()
    for group, parts in ROUTING_GROUPS.items():
        mine = [(part, i) for part, i in names if part in parts]
        if mine:
            moe = vlm.moe_config(mine[0][0])
            groups[group] = RoutingCounts.zeros([routing_layer(part, i) for part, i in mine], moe.top_k,
                                                moe.num_experts, moe.eval_capacity_factor)
    return groups


ROUTING_GROUPS = {"llm": ("llm",), "vision": ("vision", "projector")}  # group -> the VLM parts it holds


def routing_layer(part, i):
    """How a MoE layer is named in the counts: the LLM's block index, "ViT i", or "projector"."""
    return i if part == "llm" else f"ViT {i}" if part == "vision" else "projector"


def layer_label(layer):
    """A MoE layer's name in tables and plots: "layer 2" for the LLM's block 2, "ViT 1", "projector"."""
    return f"layer {layer}" if isinstance(layer, int) else layer


@torch.no_grad()
def loss_and_routing(vlm, examples, tokenizer, batch_size, device, progress=True, desc="losses", rt=P.Runtime(),
                     words=None):
    """Token-weighted answer cross-entropy over all examples (None if there are none), and the RoutingCounts of
    each group of MoE layers ({} for a dense model; routing_groups). Under torchrun each rank runs every
    world-th batch; the sums are gathered. A WordTally as `words` also counts the image words the model predicts
    right (gathered like the sums).

    Runs in eval mode, so the MoE layers use the evaluation capacity (eval_capacity_factor) and may drop. The
    capacity is a share of one forward's tokens: what is dropped depends on batch_size."""
    vlm.eval()
    groups = routing_groups(vlm)
    n_vision = len(groups["vision"].layers) if "vision" in groups else 0
    if not examples:
        return None, {}
    batches = D.Batches(examples, min(batch_size, len(examples)), vlm.config.vision.image_size, tokenizer.eos_id,
                        image_resize=vlm.config.vision.image_resize)
    ce_sum, ce_tokens = 0.0, 0
    starts = rt.mine(range(0, len(examples), batch_size))
    for start in tqdm(starts, desc=desc, disable=not progress, dynamic_ncols=True, leave=False):
        try:
            batch = batches.collate(examples[start:start + batch_size]).to(device)
        except D.EmptyBatch:
            continue
        with autocast(device):
            out = vlm(batch.input_ids, batch.images, batch.labels, batch.attention_mask)
        n = int((batch.labels[:, 1:] != D.IGNORE_INDEX).sum())  # lm_loss's count of supervised targets
        ce_sum += float(out.ce_loss) * n
        ce_tokens += n
        if words is not None:
            words.add(out.logits[:, :-1].argmax(-1).cpu(), batch.labels[:, 1:].cpu())
        if "llm" in groups:
            add_routing(groups["llm"], out.routing[n_vision:], batch.input_ids == IMAGE_TOKEN_INDEX,
                        batch.attention_mask)
        if "vision" in groups and batch.images is not None:
            add_vision_routing(groups["vision"], out.routing[:n_vision], vlm.num_image_tokens)
    if rt.distributed:  # the sums over every rank's batches, on every rank
        gathered = rt.gather((ce_sum, ce_tokens, groups, None if words is None else (words.right, words.total)))
        ce_sum, ce_tokens = sum(g[0] for g in gathered), sum(g[1] for g in gathered)
        if words is not None:
            words.right = sum((g[3][0] for g in gathered), collections.Counter())
            words.total = sum((g[3][1] for g in gathered), collections.Counter())
        groups = gathered[0][2]
        for _, _, theirs, _ in gathered[1:]:
            for name, counts in groups.items():
                add_counts(counts, theirs[name])
    return (ce_sum / ce_tokens if ce_tokens else None), groups


def add_counts(counts, other):
    """Add another RoutingCounts (of the same model) into counts."""
    for name in ("topk_counts", "top1_counts", "dropped", "tokens", "prob_sums"):
        getattr(counts, name).add_(getattr(other, name))
    for mine, theirs in zip(counts.pathways, other.pathways):
        mine.update(theirs)


def add_vision_routing(counts, routing, patches):
    """Add one batch's vision-side RoutingStats (ViT blocks, then the projector) to the counts: every patch of
    every image is an image token; the ViT's class token (its first position) is left out, so that a patch's
    top-1 pathway runs through the ViT and on into the projector."""
    index = [s.expert_index[:, -patches:].reshape(-1, s.expert_index.shape[-1]).cpu() for s in routing]  # (n*P, k)
    E = counts.topk_counts.shape[-1]
    for i, (stats, chosen) in enumerate(zip(routing, index)):
        counts.topk_counts[i, 1] += torch.bincount(chosen.reshape(-1), minlength=E)
        counts.top1_counts[i, 1] += torch.bincount(chosen[:, 0], minlength=E)
        counts.dropped[i] += int(stats.dropped)
    counts.tokens[1] += index[0].shape[0]
    rows, n = torch.unique(torch.stack([c[:, 0] for c in index], dim=-1), dim=0, return_counts=True)
    counts.pathways[1].update({tuple(r): int(c) for r, c in zip(rows.tolist(), n.tolist())})


def add_routing(counts, routing, image_mask, attention_mask):
    """Add one batch's RoutingStats (a list over MoE layers) to the counts, and its tokens' top-1 pathways."""
    for i, stats in enumerate(routing):
        counts.topk_counts[i] += stats.expert_counts.cpu()
        counts.top1_counts[i] += stats.top1_counts.cpu()
        counts.dropped[i] += int(stats.dropped)
        counts.prob_sums[i] += stats.prob_mean.detach().double().cpu() * int(stats.top1_counts.sum())
    real = attention_mask.bool()
    is_image = image_mask[real].cpu()
    counts.tokens += torch.stack([(~is_image).sum(), is_image.sum()])
    paths = torch.stack([s.expert_index[..., 0][real] for s in routing], dim=-1).cpu()  # (N, L) top-1 per layer
    for modality in (0, 1):
        rows, n = torch.unique(paths[is_image == bool(modality)], dim=0, return_counts=True)
        counts.pathways[modality].update({tuple(r): int(c) for r, c in zip(rows.tolist(), n.tolist())})


# ----------------------------------------------------------------------------------------------------------
# 7. One checkpoint's evaluation, and the report


@dataclass
class EvalData:
    """What is evaluated: the same for every checkpoint of a --compare."""

    folder: str  # image paths are relative to it
    answer_file: str  # the conversations (VQA and the answer loss)
    samples: list  # their samples (after --limit)
    caption_file: str = None  # the captions (caption loss); built-in data only
    captions: list = None
    scenes: list = None  # each test image's objects (POPE); built-in data only
    train_scenes: list = None  # the training scenes, for POPE's frequencies


def resolve_data(config, meta, log=print):
    """The user's file, or the built-in split of the data set the checkpoint was trained on (drawn if missing)."""
    cut = slice(config.limit) if config.limit > 0 else slice(None)
    try:
        if config.data_path:
            log("POPE: skipped for --data_path (it needs each image's object list: the built-in scenes)")
            return EvalData(config.image_folder or os.path.dirname(config.data_path), config.data_path,
                            D.read_json(config.data_path)[cut])
        folder = config.data_dir or meta["train_config"]["data_dir"]
        D.ensure_builtin(folder, D.BuiltinConfig(**meta["data_config"]), progress=config.progress)
        path = lambda name: os.path.join(folder, f"{name}_{config.split}.json")  # noqa: E731
        return EvalData(folder, path("instruct"), D.read_json(path("instruct"))[cut], path("captions"),
                        D.read_json(path("captions"))[cut], D.read_json(path("scenes"))[cut],
                        D.read_json(os.path.join(folder, "scenes_train.json")))
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None


def write_jsonl(path, records):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def run_vqa(vlm, tokenizer, data, config, device, out, log, rt=P.Runtime(), images="real"):
    """VQA scores by type, the skipped counts, and answers.jsonl (every question, answer and verdict; real
    images only)."""
    questions, skipped = vqa_questions(data.samples, data.folder, tokenizer, vlm, config, log)
    if not questions:
        raise SystemExit(f"error: {data.answer_file} has no question the model can be asked; see the skipped "
                         f"counts above")
    answers = generate_answers(vlm, tokenizer, questions, device, config.batch_size, config.progress,
                               "VQA" if images == "real" else f"VQA, {images} images", rt, images)
    if rt.rank == 0 and images == "real":
        write_jsonl(os.path.join(out, "answers.jsonl"), (
            {"image": q.image, "type": q.qtype, "question": q.text, "reference": q.answer, "answer": a,
             "correct": None if a is None else is_correct(a, q.answer, q.qtype)} for q, a in zip(questions, answers)))
    return vqa_scores(questions, answers), {**skipped, "unreadable image": sum(a is None for a in answers)}


def run_pope(vlm, tokenizer, data, config, device, out, rt=P.Runtime(), images="real"):
    """POPE metrics per split and their mean, and pope_answers.jsonl (real images only)."""
    probe = pope_probe(data.scenes, data.train_scenes, config.pope_per_image, config.seed)
    unique = pope_questions(probe, data.folder, tokenizer, vlm, config)
    said = dict(zip(unique, generate_answers(vlm, tokenizer, list(unique.values()), device, config.batch_size,
                                             config.progress, "POPE" if images == "real" else f"POPE, {images} images",
                                             rt, images)))
    metrics, records = {}, []
    for split, items in probe.items():
        asked = [(scene, kind, present, said[(scene["image"], kind)]) for scene, kind, present in items]
        asked = [x for x in asked if x[3] is not None]  # an unreadable image has no answer
        metrics[split] = pope_metrics([pope_says_yes(a) for *_, a in asked], [present for _, _, present, _ in asked])
        records += [{"split": split, "image": scene["image"], "question": pope_question(kind), "present": present,
                     "answer": a, "said_yes": pope_says_yes(a)} for scene, kind, present, a in asked]
    if rt.rank == 0 and images == "real":
        write_jsonl(os.path.join(out, "pope_answers.jsonl"), records)
    # one figure per checkpoint: the mean over the three splits
    metrics["average"] = {k: float(np.mean([metrics[s][k] for s in POPE_SPLITS]))
                          for k in ("accuracy", "precision", "recall", "f1", "yes_ratio")}
    metrics["average"]["n"] = sum(metrics[s]["n"] for s in POPE_SPLITS)
    return metrics


def examples_of(samples, path, template, folder, tokenizer, vlm, log):
    """Teacher-forcing Examples of samples (bad ones skipped and counted), for the losses."""
    return D.load_examples(path, folder, tokenizer, template, vlm.num_image_tokens, vlm.config.llm.max_seq_len,
                           max_bad_fraction=1.0, log=log, samples=samples)


def evaluate(config, model, data, out, log=print, rt=P.Runtime()):
    """Evaluate one loaded checkpoint (load_model's triple) on data: VQA, POPE (built-in data), losses, routing.
    Writes metrics.json, answers.jsonl, pope_answers.jsonl and the routing files into out (rank 0 alone, under
    torchrun); returns the metrics (on every rank)."""
    t_start = time.time()
    vlm, tokenizer, meta = model
    device = next(vlm.parameters()).device
    writer = rt.rank == 0
    if writer:
        os.makedirs(out, exist_ok=True)
    moe_layers = [layer_label(routing_layer(part, i)) for part, i in vlm.moe_layer_names()]
    log(f"{meta['checkpoint']}: stage {meta.get('stage')}, step {meta.get('step')}, "
        + (f"MoE layers: {', '.join(moe_layers)}" if moe_layers else "dense"))
    metrics = {"checkpoint": meta["checkpoint"], "stage": meta.get("stage"), "step": meta.get("step"),
               "data": data.answer_file, "params": meta.get("counts"), "eval_config": asdict(config), "seconds": {}}

    def timed(name, what, *args, **kwargs):
        t0 = time.time()
        result = what(*args, **kwargs)
        metrics["seconds"][name] = round(time.time() - t0, 1)
        log(f"  {name}: {metrics['seconds'][name]:.1f} s")
        return result

    metrics["vqa"], metrics["skipped"] = timed("VQA", run_vqa, vlm, tokenizer, data, config, device, out, log, rt)
    if data.scenes is not None:
        metrics["pope"] = timed("POPE", run_pope, vlm, tokenizer, data, config, device, out, rt)
    if config.blind != "none":  # the same questions, with images that show nothing useful
        blind = metrics["blind"] = {"images": config.blind}
        blind["vqa"], _ = timed(f"VQA, {config.blind} images", run_vqa, vlm, tokenizer, data, config, device, out,
                                lambda *a, **k: None, rt, images=config.blind)
        if data.scenes is not None:
            blind["pope"] = timed(f"POPE, {config.blind} images", run_pope, vlm, tokenizer, data, config, device,
                                  out, rt, images=config.blind)
    answers = examples_of(data.samples, data.answer_file, tokenizer.chat, data.folder, tokenizer, vlm, log)
    answer_ce, groups = timed("answer loss and routing", loss_and_routing, vlm, answers, tokenizer,
                              config.batch_size, device, config.progress, "answer loss", rt)
    metrics["loss"] = {"answer_ce": answer_ce}
    if data.captions is not None:  # the stage-I objective (`plain` template): how well the model reads images
        captions = examples_of(data.captions, data.caption_file, "plain", data.folder, tokenizer, vlm, log)
        words = WordTally(tokenizer)
        metrics["loss"]["caption_ce"], _ = timed("caption loss", loss_and_routing, vlm, captions, tokenizer,
                                                 config.batch_size, device, config.progress, "caption loss", rt,
                                                 words)
        metrics["caption_words"] = words.accuracy()  # teacher-forced: can it read each kind of word off the image?
    metrics["routing"] = metrics["vision_routing"] = None  # the LLM's MoE layers; the vision side's (CuMo)
    records = training_routing(os.path.join(meta["checkpoint"], "log.jsonl"))
    for group, counts in groups.items():
        summary = routing_summary(counts)
        key, prefix = ("routing", "") if group == "llm" else ("vision_routing", "vision_")
        metrics[key] = {k: summary[k] for k in ("layers", "tokens", "max_over_mean_load", "cv_load", "balance_loss",
                                                "capacity_factor", "dropped_fraction")}
        metrics[key]["files"] = write_routing_outputs(summary, records[group], out, config.plots, prefix) \
            if writer else []
    if "vision" in groups and data.scenes is not None:  # the patch-level map, and how much place decides
        images = [os.path.join(data.folder, scene["image"]) for scene in data.scenes[:200]]
        maps = torch.cat([patch_routing_maps(vlm, images[i:i + 50], device) for i in range(0, len(images), 50)], 1)
        metrics["vision_routing"]["by_place"] = routed_by_place(maps)
        if writer and config.plots:
            plot_patch_routing(maps[:, :4], images[:4], groups["vision"].layers,
                               groups["vision"].topk_counts.shape[-1], os.path.join(out, "vision_patch_routing.png"))
            metrics["vision_routing"]["files"].append("vision_patch_routing.png")
    metrics["seconds"]["total"] = round(time.time() - t_start, 1)
    if writer:
        D.write_json(os.path.join(out, "metrics.json"), metrics)
    return metrics


def metric_rows(m):
    """(label, value text) rows of one checkpoint's metrics, in the table's order."""
    rows = score_rows(m["vqa"], m.get("pope"))
    if m.get("blind"):
        rows += score_rows(m["blind"]["vqa"], m["blind"].get("pope"), f", {m['blind']['images']} images")
    rows += [(name.replace("_", " "), "-" if v is None else f"{v:.4f}") for name, v in m["loss"].items()]
    if m.get("caption_words"):
        w = m["caption_words"]
        rows.append(("caption words right: size / colour / shape / position",
                     " / ".join(f"{100 * w[k]:.1f}" if k in w else "-" for k in CAPTION_WORDS)))
    for r in (m.get("vision_routing"), m.get("routing")):
        for i, layer in enumerate(r["layers"] if r else []):
            rows.append((f"{layer_label(layer)}: max/mean load, CV, dropped", f"{r['max_over_mean_load'][i]:.2f}, "
                         f"{r['cv_load'][i]:.2f}, {100 * r['dropped_fraction'][i]:.2f}%"))
        if r and r.get("balance_loss"):
            b = r["balance_loss"]
            rows.append(("balancing loss: DeepSpeed's (per layer, 1.0 even) / Hugging Face's (pooled, k even)",
                         f"{' + '.join(f'{v:.3f}' for v in b['deepspeed'])} / {b['hf']:.3f}"))
    if (m.get("vision_routing") or {}).get("by_place"):  # 1 / E: the place says nothing; 100: it alone decides
        rows.append(("patches on their place's commonest expert, per vision MoE layer",
                     " / ".join(f"{100 * v:.1f}" for v in m["vision_routing"]["by_place"])))
    return rows


def score_rows(vqa, pope, images=""):
    """The VQA and POPE rows of the table; `images` names a blind control's images."""
    rows = [(f"VQA {t}{images} (n={v['n']})", f"{100 * v['accuracy']:.1f}") for t, v in vqa.items()]
    for split, p in (pope or {}).items():
        rows.append((f"POPE {split}{images} (n={p['n']}): acc / prec / rec / F1 / yes", " / ".join(
            f"{100 * p[k]:.1f}" for k in ("accuracy", "precision", "recall", "f1", "yes_ratio"))))
    return rows


def format_table(results):
    """A text table: one row per metric, one column per checkpoint (percentages unless a loss)."""
    names = [m["checkpoint"] for m in results]
    columns = [dict(metric_rows(m)) for m in results]
    labels = list(dict.fromkeys(label for c in columns for label in c))
    width = max(len(x) for x in labels + ["metric"])
    cols = [max(len(n), *(len(c.get(label, "-")) for label in labels)) for n, c in zip(names, columns)]
    lines = ["metric".ljust(width) + "".join(f"  {n:>{w}}" for n, w in zip(names, cols))]
    lines.append("-" * len(lines[0]))
    for label in labels:
        lines.append(label.ljust(width) + "".join(f"  {c.get(label, '-'):>{w}}" for c, w in zip(columns, cols)))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# 8. The routing summary: shares, modality split, balance, dropped, pathways


def shares(counts):
    """Counts (..., E) as fractions of their row: each expert's share of a layer's assignments."""
    counts = counts.double()
    return counts / counts.sum(-1, keepdim=True).clamp(min=1)


def image_share_rescaled(counts):
    """(L, 2, E) text/image counts -> (L, E): the image part of each expert's traffic after rescaling each modality
    by its own total (MoE-LLaVA's modality plot), so 0.5 means the expert takes both modalities alike."""
    per_modality = shares(counts)  # (L, 2, E): an expert's share of its layer's text, and of its image tokens
    return per_modality[:, 1] / (per_modality[:, 0] + per_modality[:, 1]).clamp(min=1e-12)


def routing_summary(counts, top_paths=10):
    """The numbers behind the plots, as plain lists (JSON-able). Shares are fractions of a layer's assignments."""
    load = shares(counts.topk_counts.sum(1))  # (L, E), text and image together
    balance_cv = load.std(-1, unbiased=False) / load.mean(-1).clamp(min=1e-12)
    assignments = max(int(counts.tokens.sum()) * counts.top_k, 1)
    pathways = {}
    for name, counter in zip(("text", "image"), counts.pathways):
        total = sum(counter.values()) or 1
        top = sorted(counter.items(), key=lambda item: (-item[1], item[0]))[:top_paths]  # ties: by the path itself
        pathways[name] = [{"experts": list(p), "share": n / total} for p, n in top]
    return {
        "layers": counts.layers, "num_experts": counts.topk_counts.shape[-1], "top_k": counts.top_k,
        "capacity_factor": counts.capacity_factor,
        "tokens": {"text": int(counts.tokens[0]), "image": int(counts.tokens[1])},
        "topk_counts": counts.topk_counts.tolist(),  # [layer][text, image][expert]
        "top1_counts": counts.top1_counts.tolist(),
        "topk_share": load.tolist(), "top1_share": shares(counts.top1_counts.sum(1)).tolist(),
        "topk_share_text": shares(counts.topk_counts[:, 0]).tolist(),
        "topk_share_image": shares(counts.topk_counts[:, 1]).tolist(),
        "top1_share_text": shares(counts.top1_counts[:, 0]).tolist(),
        "top1_share_image": shares(counts.top1_counts[:, 1]).tolist(),
        "image_share_rescaled": image_share_rescaled(counts.topk_counts).tolist(),
        "image_share_rescaled_top1": image_share_rescaled(counts.top1_counts).tolist(),
        "image_share_raw": shares(counts.topk_counts.transpose(1, 2))[..., 1].tolist(),  # no rescaling
        "max_over_mean_load": (load.max(-1).values * load.shape[-1]).tolist(),  # 1.0 = perfectly balanced
        "cv_load": balance_cv.tolist(),  # coefficient of variation of the experts' loads; 0 = balanced
        "dropped_fraction": (counts.dropped.double() / assignments).tolist(),
        "pathways": pathways,
        "balance_loss": balance_conventions(counts),
    }


def balance_conventions(counts):
    """The balancing loss of this routing as two code bases write it, so that either's logs can be read beside
    ours: {"deepspeed": per layer, E * sum_e P_e * (share of first choices) -- MoE-LLaVA's, and ours, 1.0 when
    even; "hf": Hugging Face transformers' Mixtral formula, E * sum_e P_e * (share of all k choices), pooled over
    the layers, k when even}. P_e: the expert's mean router probability. None where no probabilities were kept
    (the vision side)."""
    tokens = counts.top1_counts.sum((1, 2)).double()  # (L,) every routed token makes one first choice
    if not counts.prob_sums.any() or not tokens.all():
        return None
    E = counts.prob_sums.shape[-1]
    probs = counts.prob_sums / tokens[:, None]
    deepspeed = E * (probs * counts.top1_counts.sum(1) / tokens[:, None]).sum(-1)
    pooled_probs = counts.prob_sums.sum(0) / tokens.sum()
    pooled_topk = counts.topk_counts.sum((0, 1)) / tokens.sum()
    return {"deepspeed": deepspeed.tolist(), "hf": float(E * (pooled_probs * pooled_topk).sum())}


def write_routing_csv(summary, path):
    """One row per (MoE layer, expert): the counts and shares behind the plots."""
    rows = ["layer,expert,topk_text,topk_image,top1_text,top1_image,topk_share,top1_share,image_share_rescaled"]
    for i, layer in enumerate(summary["layers"]):
        for e in range(summary["num_experts"]):
            tk, t1 = summary["topk_counts"][i], summary["top1_counts"][i]
            rows.append(f"{layer},{e},{tk[0][e]},{tk[1][e]},{t1[0][e]},{t1[1][e]},{summary['topk_share'][i][e]:.6f},"
                        f"{summary['top1_share'][i][e]:.6f},{summary['image_share_rescaled'][i][e]:.6f}")
    with open(path, "w") as f:
        f.write("\n".join(rows) + "\n")


def training_routing(log_path):
    """The per-expert counts train.py logged during stage III, per routing group: {"llm": [(step, [{layer,
    topk_text_image, ...}])], "vision": [...]}, each layer named as in the RoutingCounts (routing_layer)."""
    records = {group: [] for group in ROUTING_GROUPS}
    if not os.path.exists(log_path):
        return records
    with open(log_path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            for group, parts in ROUTING_GROUPS.items() if "routing" in record else ():
                layers = [dict(r, layer=routing_layer(r.get("part", "llm"), r["layer"])) for r in record["routing"]
                          if r.get("part", "llm") in parts]  # (a log from before CuMo has no part: the LLM)
                if layers:
                    records[group].append((record["step"], layers))
    return records


def write_training_csv(records, path):
    rows = ["step,layer,expert,topk_text,topk_image,top1_text,top1_image"]
    for step, layers in records:
        for r in layers:
            for e, (kt, ki, t1t, t1i) in enumerate(zip(*r["topk_text_image"], *r["top1_text_image"])):
                rows.append(f"{step},{r['layer']},{e},{kt},{ki},{t1t},{t1i}")
    with open(path, "w") as f:
        f.write("\n".join(rows) + "\n")


# ----------------------------------------------------------------------------------------------------------
# 9. Plots: matplotlib's object API (Figure, no pyplot), so nothing needs a display and no global state changes

def new_figure(ncols, nrows=1, width=4.2, height=3.4):
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def expert_colours(n):
    from matplotlib import colormaps
    return [colormaps["tab10"](e % 10) for e in range(n)]


def plot_expert_load(summary, path):
    """Per MoE layer, each expert's share of the assignments: grouped bars, top-1 and top-k side by side."""
    fig, axes = new_figure(2, width=max(4.2, 1.2 * len(summary["layers"]) + 2))
    E, L = summary["num_experts"], len(summary["layers"])
    colours, width = expert_colours(E), 0.8 / E
    for ax, key, title in zip(axes[0], ("top1_share", "topk_share"),
                              ("first choice (top-1)", f"all top-{summary['top_k']} choices")):
        for e in range(E):
            ax.bar([i + (e - (E - 1) / 2) * width for i in range(L)], [summary[key][i][e] for i in range(L)],
                   width, color=colours[e], label=f"expert {e}")
        ax.axhline(1 / E, color="black", linestyle="--", linewidth=1, label="balanced (1/E)")
        ax.set_xticks(range(L), [layer_label(i) for i in summary["layers"]])
        ax.set_ylabel("share of the layer's assignments")
        ax.set_title(f"Expert load per MoE layer: {title}")
    axes[0][1].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.savefig(path, dpi=120)


def plot_modality_split(summary, path):
    """Per expert (one panel per layer), how its traffic splits between image and text tokens, each modality
    rescaled by its own token count (MoE-LLaVA's modality plot: 50% = no preference); top-k and top-1 rows."""
    L, E = len(summary["layers"]), summary["num_experts"]
    fig, axes = new_figure(L, nrows=2, width=3.2, height=3.0)
    for row, (key, which) in enumerate((("image_share_rescaled", f"top-{summary['top_k']}"),
                                        ("image_share_rescaled_top1", "top-1"))):
        for i, ax in enumerate(axes[row]):
            image = summary[key][i]
            ax.bar(range(E), image, color="tab:orange", label="image")
            ax.bar(range(E), [1 - v for v in image], bottom=image, color="tab:blue", label="text")
            ax.axhline(0.5, color="black", linestyle="--", linewidth=1)
            ax.set_xticks(range(E), [f"e{e}" for e in range(E)])
            ax.set_ylim(0, 1)
            ax.set_title(f"{layer_label(summary['layers'][i])}, {which}")
        axes[row][0].set_ylabel("share of the expert's tokens\n(each modality rescaled)")
    axes[0][-1].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle("Modality split per expert: image vs text")
    fig.savefig(path, dpi=120)


def plot_load_heatmap(summary, path):
    """Layer x expert share of the assignments: all tokens, text tokens, image tokens; top-k and top-1 rows."""
    E, L = summary["num_experts"], len(summary["layers"])
    fig, axes = new_figure(3, nrows=2, width=3.6, height=0.5 * L + 1.8)
    for row, which in enumerate(("topk", "top1")):
        label = f"top-{summary['top_k']}" if which == "topk" else "top-1"
        for ax, part, title in zip(axes[row], ("", "_text", "_image"), ("all tokens", "text tokens", "image tokens")):
            grid = np.array(summary[f"{which}_share{part}"])
            im = ax.imshow(grid, cmap="viridis", vmin=0, vmax=max(2 / E, float(grid.max())), aspect="auto")
            for (i, e), v in np.ndenumerate(grid):
                ax.text(e, i, f"{v:.2f}", ha="center", va="center", fontsize="small",
                        color="white" if v < grid.max() * 0.6 else "black")
            ax.set_xticks(range(E), [f"e{e}" for e in range(E)])
            ax.set_yticks(range(L), [layer_label(i) for i in summary["layers"]])
            ax.set_title(f"{label} share: {title}")
        fig.colorbar(im, ax=axes[row].tolist(), shrink=0.8, label="share of the layer's assignments")
    fig.savefig(path, dpi=120)


def plot_balance(summary, path):
    """Per MoE layer: max/mean expert load and its coefficient of variation, and the dropped assignments."""
    fig, axes = new_figure(2, width=max(3.6, 0.9 * len(summary["layers"]) + 2.4))
    names = [layer_label(i) for i in summary["layers"]]
    x = np.arange(len(names))
    ax = axes[0][0]
    ax.bar(x - 0.2, summary["max_over_mean_load"], 0.4, color="tab:purple", label="max / mean load")
    ax.bar(x + 0.2, summary["cv_load"], 0.4, color="tab:gray", label="coefficient of variation")
    ax.axhline(1.0, color="black", linestyle="--", linewidth=1)
    ax.set_xticks(x, names)
    ax.set_title("Load balance (top-k; balanced: 1 and 0)")
    ax.legend(fontsize="small")
    ax = axes[0][1]
    dropped = [100 * d for d in summary["dropped_fraction"]]
    bars = ax.bar(x, dropped, 0.5, color="tab:red")
    ax.bar_label(bars, [f"{d:.2f}%" for d in dropped])
    ax.set_ylim(0, max(1.0, 1.2 * max(dropped)))
    ax.set_xticks(x, names)
    ax.set_ylabel("% of top-k assignments")
    ax.set_title(f"Dropped at the evaluation capacity (cf {summary['capacity_factor']})")
    fig.savefig(path, dpi=120)


def plot_training_load(records, num_experts, path):
    """Each expert's share of the top-k assignments (text + image) per MoE layer over stage III's steps."""
    layers = [r["layer"] for r in records[0][1]]
    fig, axes = new_figure(len(layers), width=3.8)
    colours = expert_colours(num_experts)
    steps = [step for step, _ in records]
    for i, ax in enumerate(axes[0]):
        counts = np.array([np.array(rec[i]["topk_text_image"]).sum(0) for _, rec in records], dtype=float)
        shares = counts / np.maximum(counts.sum(1, keepdims=True), 1)
        for e in range(num_experts):
            ax.plot(steps, shares[:, e], color=colours[e], label=f"expert {e}")
        ax.axhline(1 / num_experts, color="black", linestyle="--", linewidth=1)
        ax.set_title(layer_label(layers[i]))
        ax.set_xlabel("stage III step")
    axes[0][0].set_ylabel("share of top-k assignments (training batch)")
    axes[0][-1].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle("Expert load over training time")
    fig.savefig(path, dpi=120)


def plot_pathways(summary, path):
    """The most frequent top-1 pathways (the expert a token picks at each MoE layer), for text and image tokens;
    line width follows the share of tokens that take the path."""
    fig, axes = new_figure(2, width=5.0, height=3.8)
    E, layers = summary["num_experts"], summary["layers"]
    for ax, name in zip(axes[0], ("text", "image")):
        paths = summary["pathways"][name]
        for rank, p in enumerate(paths):
            jitter = (rank - len(paths) / 2) * 0.02  # so paths sharing a segment stay visible
            ax.plot(range(len(layers)), [e + jitter for e in p["experts"]], marker="o",
                    linewidth=1 + 12 * p["share"], alpha=0.7, label=f"{p['share']:.1%}")
        ax.set_xticks(range(len(layers)), [layer_label(i) for i in layers])
        ax.set_yticks(range(E), [f"expert {e}" for e in range(E)])
        ax.set_ylim(-0.5, E - 0.5)
        ax.set_title(f"top-1 pathways of {name} tokens (top {len(paths)})" if paths else f"no {name} tokens")
        if paths:
            ax.legend(fontsize="x-small", title="share of tokens", title_fontsize="x-small", loc="center left",
                      bbox_to_anchor=(1.0, 0.5))
    fig.savefig(path, dpi=120)


def write_routing_outputs(summary, records, out, plots=True, prefix=""):
    """{prefix}routing.json, routing.csv, routing_training.csv and (plots=True) the PNGs; returns the files
    written. The vision side (prefix "vision_") has image tokens only, so no modality split."""
    files = [prefix + name for name in ("routing.json", "routing.csv")]
    D.write_json(os.path.join(out, files[0]), summary)
    write_routing_csv(summary, os.path.join(out, files[1]))
    if records:
        files.append(f"{prefix}routing_training.csv")
        write_training_csv(records, os.path.join(out, files[-1]))
    if plots:
        both = summary["tokens"]["text"] > 0 and summary["tokens"]["image"] > 0
        for name, plot in (("expert_load.png", plot_expert_load), ("modality_split.png", plot_modality_split),
                           ("load_heatmap.png", plot_load_heatmap), ("balance.png", plot_balance),
                           ("pathways.png", plot_pathways)):
            if name != "modality_split.png" or both or not prefix:
                files.append(prefix + name)
                plot(summary, os.path.join(out, files[-1]))
        if records:
            files.append(f"{prefix}load_over_training.png")
            plot_training_load(records, summary["num_experts"], os.path.join(out, files[-1]))
    return files


@torch.no_grad()
def patch_routing_maps(vlm, image_paths, device):
    """The first choice of every patch at each vision-side MoE layer (ViT blocks, then the projector), for a few
    images: (layers, images, side, side) expert indices, patches in raster order as the ViT cuts them."""
    size, patches = vlm.config.vision.image_size, vlm.num_image_tokens
    pixels = torch.stack([D.load_image(p, size, vlm.config.vision.image_resize) for p in image_paths]).to(device)
    with autocast(device):
        features, routing = vlm.vision.features(pixels, dropless=True)
        _, projector_routing = vlm.project(features, dropless=True)
    side = int(patches ** 0.5)
    return torch.stack([s.expert_index[:, -patches:, 0].reshape(-1, side, side)
                        for s in routing + projector_routing]).cpu()


def routed_by_place(maps):
    """Per vision-side MoE layer, the share of patches whose first choice is the expert most often chosen at their
    place (grid position) over these images: 1 / E if the place says nothing, 1.0 if it alone decides."""
    flat = maps.flatten(2)  # (layers, images, patches)
    commonest = flat.mode(dim=1).values  # (layers, patches)
    return (flat == commonest[:, None]).double().mean((1, 2)).tolist()


def plot_patch_routing(maps, image_paths, layers, num_experts, path):
    """Patch-level routing map: each image, then one panel per vision-side MoE layer with every patch coloured
    by the expert its first choice went to, drawn over the image. Where the experts split the picture --
    objects against background, edges, one shape or colour against another -- shows what they specialise in."""
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch
    n_layers, n_images = maps.shape[:2]
    fig, axes = new_figure(n_layers + 1, nrows=n_images, width=2.2, height=2.2)
    colours = expert_colours(num_experts)
    for row, image_path in enumerate(image_paths):
        with Image.open(image_path) as im:
            picture = np.asarray(im.convert("RGB"))
        h, w = picture.shape[:2]
        for col, ax in enumerate(axes[row]):
            ax.imshow(picture)
            if col:
                ax.imshow(maps[col - 1, row].numpy(), cmap=ListedColormap(colours), vmin=-0.5,
                          vmax=num_experts - 0.5, alpha=0.55, extent=(0, w, h, 0), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title("image" if col == 0 else layer_label(layers[col - 1]))
    fig.legend(handles=[Patch(color=c, label=f"expert {e}") for e, c in enumerate(colours)], loc="outside right")
    fig.suptitle("Top-1 expert of every patch, per vision MoE layer")
    fig.savefig(path, dpi=120)


# ----------------------------------------------------------------------------------------------------------
# 10. Command line


def parse_args(argv):
    import argparse
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Options are type-checked; an unknown option is an error.")
    D.add_options(p, EvalConfig)
    given = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
    config = EvalConfig(**given)
    chat_only = [name for name in ("compare", "out", "data_path", "image_folder", "data_dir", "limit", "blind", "probe")
                 if name in given]
    problems = [
        (not config.ckpt, "--ckpt is required: the checkpoint folder to evaluate, e.g. out/stage3"),
        (config.split not in ("test", "val"), f"--split={config.split}: choose test or val"),
        (config.blind not in BLIND_CONTROLS, f"--blind={config.blind}: choose one of {', '.join(BLIND_CONTROLS)}"),
        (config.image and not config.prompt, "--image needs --prompt: the question to ask about it"),
        (config.prompt and chat_only, f"--prompt answers one question; --{', --'.join(chat_only)} belong to a "
                                      f"full evaluation"),
        (config.image_folder and not config.data_path, "--image_folder goes with --data_path (the built-in data "
                                                       "set knows its images)"),
        (config.data_path and config.data_dir, "--data_dir is the built-in data set; --data_path replaces it"),
        (config.probe and (config.data_path or config.compare), "--probe reads the built-in scenes of one checkpoint: "
                                                               "leave out --data_path and --compare"),
        (config.limit < 0, "--limit must be 0 (everything) or a positive count"),
    ] + [(getattr(config, name) < 1, f"--{name} must be at least 1")
         for name in ("batch_size", "max_new_tokens", "description_tokens", "pope_per_image")]
    for bad, message in problems:
        if bad:
            p.error(message)
    return config


def main(argv=None):
    config = parse_args(sys.argv[1:] if argv is None else argv)
    if config.prompt and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise SystemExit("error: --prompt answers one question: run it with python, not torchrun")
    rt = P.compute_init(config.device)
    try:
        return evaluate_all(config, rt)
    finally:
        P.compute_cleanup(rt)


def evaluate_all(config, rt):
    """The single-image chat, or the full evaluation of --ckpt (and --compare) with its table and files."""
    log = print if rt.rank == 0 else (lambda *args, **kwargs: None)  # under torchrun rank 0 alone speaks
    config = dataclasses.replace(config, progress=config.progress and rt.rank == 0)
    device = rt.device
    model = load_model(config.ckpt, device)
    if config.prompt:  # single-image chat
        answer = chat(*model[:2], config.prompt, config.image, device, config.max_new_tokens)
        print(answer)
        return answer
    out = config.out or os.path.join(config.ckpt, "eval")
    data = rt.first(resolve_data, config, model[2], log)
    if config.probe:
        return run_probe(config, model, data, out, log) if rt.rank == 0 else None
    results = [evaluate(config, model, data, out, log, rt)]
    if config.compare:  # the second checkpoint answers the same questions
        trained_on = model[2].get("data_config")
        del model
        second = load_model(config.compare, device)
        if not config.data_path and second[2].get("data_config") != trained_on:
            log(f"note: {config.compare} was trained on a different built-in data set than {config.ckpt}; both "
                f"are evaluated on {data.folder}")
        results.append(evaluate(config, second, data, os.path.join(out, "compare"), log, rt))
    table = format_table(results)
    log("\n" + table)
    if config.compare and rt.rank == 0:
        with open(os.path.join(out, "compare.txt"), "w") as f:
            f.write(table + "\n")
    written = ["metrics.json", "answers.jsonl"] + (["pope_answers.jsonl"] if data.scenes is not None else []) + \
        (results[0]["routing"] or {}).get("files", []) + (results[0]["vision_routing"] or {}).get("files", []) + \
        (["compare.txt", "compare/"] if config.compare else [])
    log(f"\nwrote into {out}: {', '.join(written)}")
    return results


if __name__ == "__main__":
    main()
