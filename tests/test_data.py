"""data.py: the built-in data set, the tokenizer, templates, loading with bad samples, batching."""
import dataclasses
import filecmp
import json
import os
import random
import re
import shutil

import numpy as np
import pytest
import tiktoken
import tiktoken.load
import torch
from PIL import Image

import data as D
import model

SMALL = D.BuiltinConfig(n_train=40, n_val=12, n_test=12)


@pytest.fixture(scope="module")
def builtin(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("builtin"))
    D.generate_builtin(path, SMALL, progress=False)
    return path


@pytest.fixture(scope="module")
def tok(builtin):
    return D.load_tokenizer("builtin", builtin)


def write(tmp_path, name, obj):
    path = tmp_path / name
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return str(path)


def test_sentinels_agree_with_the_model():
    assert D.IMAGE_TOKEN_INDEX == model.IMAGE_TOKEN_INDEX and D.IGNORE_INDEX == model.IGNORE_INDEX


# --- the built-in data set


def test_builtin_data_is_deterministic_for_a_seed(builtin, tmp_path):
    D.generate_builtin(str(tmp_path / "again"), SMALL, progress=False)
    names = ["instruct_train.json", "captions_val.json", "scenes_test.json", "arithmetic_test.json",
             D.BUILTIN_TOKENIZER_FILE, "images/train_00003.png"]
    match, mismatch, errors = filecmp.cmpfiles(builtin, tmp_path / "again", names, shallow=False)
    assert match == names, (mismatch, errors)
    other = D.BuiltinConfig(seed=1, n_train=40, n_val=12, n_test=12)
    D.generate_builtin(str(tmp_path / "other"), other, progress=False)
    assert not filecmp.cmp(os.path.join(builtin, "instruct_train.json"), tmp_path / "other" / "instruct_train.json",
                           shallow=False)


def test_splits_share_no_scene(builtin):
    scenes = {s: D.read_json(os.path.join(builtin, f"scenes_{s}.json")) for s in ("train", "val", "test")}
    assert [len(v) for v in scenes.values()] == [SMALL.n_train, SMALL.n_val, SMALL.n_test]
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        for key in (lambda s: s["id"], lambda s: s["image"], D.scene_signature):
            assert not {key(s) for s in scenes[a]} & {key(s) for s in scenes[b]}


def test_extra_training_scenes_leave_validation_test_and_tokenizer_as_they_were(builtin, tmp_path):
    more = dataclasses.replace(SMALL, extra_train=30)
    D.generate_builtin(str(tmp_path / "more"), more, progress=False)
    same = ["instruct_val.json", "captions_test.json", "scenes_test.json", D.BUILTIN_TOKENIZER_FILE]
    match, mismatch, errors = filecmp.cmpfiles(builtin, tmp_path / "more", same, shallow=False)
    assert match == same, (mismatch, errors)
    scenes = D.read_json(str(tmp_path / "more" / "scenes_train.json"))
    assert len(scenes) == SMALL.n_train + 30 and scenes[:SMALL.n_train] == D.read_json(
        os.path.join(builtin, "scenes_train.json"))
    held_out = {D.scene_signature(s) for split in ("val", "test")
                for s in D.read_json(str(tmp_path / "more" / f"scenes_{split}.json"))}
    assert len({D.scene_signature(s) for s in scenes}) == len(scenes) and not held_out & {
        D.scene_signature(s) for s in scenes}
    texts = [s for s in D.read_json(str(tmp_path / "more" / "instruct_train.json")) if "image" not in s]
    assert len(texts) == len({s["id"] for s in texts}) == round(SMALL.n_train * 0.1) + 3


def test_train_questions_asks_up_to_n_true_questions_and_changes_nothing_else(builtin, tmp_path):
    many = dataclasses.replace(SMALL, n_train=200, train_questions=6)
    D.generate_builtin(str(tmp_path / "many"), many, progress=False)
    D.generate_builtin(str(tmp_path / "default"), dataclasses.replace(many, train_questions=0), progress=False)
    same = ["instruct_val.json", "instruct_test.json", "scenes_train.json", "captions_train.json",
            D.BUILTIN_TOKENIZER_FILE]
    match, mismatch, errors = filecmp.cmpfiles(tmp_path / "many", tmp_path / "default", same, shallow=False)
    assert match == same, (mismatch, errors)
    scenes = {s["id"]: s for s in D.read_json(str(tmp_path / "many" / "scenes_train.json"))}
    mine = D.read_json(str(tmp_path / "many" / "instruct_train.json"))
    theirs = D.read_json(str(tmp_path / "default" / "instruct_train.json"))
    assert [s["id"] for s in mine] == [s["id"] for s in theirs]  # the same samples in the same order
    turns = []
    for sample, default in zip(mine, theirs):
        if sample["id"] not in scenes:
            assert sample == default  # text-only samples stay
            continue
        scene, conv = scenes[sample["id"]], sample["conversations"]
        assert conv[0]["value"].startswith(D.IMAGE_PLACEHOLDER + "\n") and not any(
            D.IMAGE_PLACEHOLDER in t["value"] for t in conv[1:])
        asked = [(q["value"].removeprefix(D.IMAGE_PLACEHOLDER + "\n"), a["value"])
                 for q, a in zip(conv[::2], conv[1::2])]
        assert len(set(asked)) == len(asked)
        kinds = {(o["colour"], o["shape"]) for o in scene["objects"]}
        fixed = {(q, a) for t, q, a in D.questions(scene, random.Random(0)) if t not in ("existence", "description")}
        for q, a in asked:  # every turn is true of the scene
            if m := re.fullmatch(r"Is there a (\w+) (\w+) in the image\?", q):
                assert a == ("yes" if m.groups() in kinds else "no")
            elif shape := {f"How many {D.plural(s)} are there?": s for s in D.SHAPES}.get(q):
                assert a == str(sum(o["shape"] == shape for o in scene["objects"])), (q, a)
            elif q in D.CAPTION_PROMPTS:
                assert a == D.caption(scene)
            else:
                assert (q, a) in fixed, (q, a)
        turns.append(len(asked))
    assert max(turns) == 6 and min(turns) >= 4 and sum(turns) / len(turns) > 5  # default: 1-3
    assert max(len(s["conversations"]) // 2 for s in theirs) == 3


def given_away(scene, sample):
    """Turns (by index) that ask an object's colour or shape, or whether it is there, after an earlier turn has put
    that object's colour and shape side by side in its question and answer."""
    conv, found = sample["conversations"], []
    turns = [(q["value"] + " " + a["value"]).replace("?", " ").split() for q, a in zip(conv[::2], conv[1::2])]
    for i, (kind, words) in enumerate(zip(sample["question_types"], turns)):
        if kind in ("colour", "shape") or (kind == "existence" and words[-1] == "yes"):
            named = [o for o in scene["objects"] if o["shape"] in words and (kind == "colour" or o["colour"] in words)]
            if any(o["colour"] in w and o["shape"] in w for o in named for w in turns[:i]):
                found.append(i)
    return found


def test_without_giveaways_no_turn_asks_what_an_earlier_turn_said(tmp_path):
    rng = random.Random(0)
    scenes = [D.make_scene(rng) for _ in range(300)]
    plain = [D.instruction_sample(sc, random.Random(i), str(i), "x.png", 12) for i, sc in enumerate(scenes)]
    hidden = [D.instruction_sample(sc, random.Random(i), str(i), "x.png", 12, giveaways=False)
              for i, sc in enumerate(scenes)]
    assert sum(len(given_away(sc, s)) for sc, s in zip(scenes, plain)) > 300  # the check finds them where they are
    for i, (sc, s) in enumerate(zip(scenes, hidden)):
        assert given_away(sc, s) == []
        kinds, conv = s["question_types"], s["conversations"]
        assert 1 <= len(kinds) <= 12 and "description" not in kinds[:-1]  # the description comes last
        asked = {(q["value"].removeprefix(D.IMAGE_PLACEHOLDER + "\n"), a["value"])
                 for q, a in zip(conv[::2], conv[1::2])}
        assert asked <= {(q, a) for _, q, a in D.questions(sc, random.Random(i))}  # the scene's own questions
    assert sum(len(s["question_types"]) for s in hidden) / len(hidden) > 8
    # only the training conversations change
    config = dataclasses.replace(SMALL, train_questions=12)
    D.generate_builtin(str(tmp_path / "plain"), config, progress=False)
    D.generate_builtin(str(tmp_path / "hidden"), dataclasses.replace(config, train_giveaways=False), progress=False)
    same = ["instruct_val.json", "instruct_test.json", "scenes_train.json", "captions_train.json",
            D.BUILTIN_TOKENIZER_FILE]
    match, mismatch, errors = filecmp.cmpfiles(tmp_path / "plain", tmp_path / "hidden", same, shallow=False)
    assert match == same, (mismatch, errors)


def test_pope_negatives_are_absent_often_one_attribute_away_and_change_nothing_else(builtin, tmp_path):
    pope = dataclasses.replace(SMALL, n_train=400, train_negatives="pope")
    uniform = dataclasses.replace(pope, train_negatives="uniform")
    for name, config in (("pope", pope), ("uniform", uniform)):
        D.generate_builtin(str(tmp_path / name), config, progress=False)
    same = ["instruct_val.json", "instruct_test.json", "scenes_train.json", "captions_train.json",
            D.BUILTIN_TOKENIZER_FILE]
    match, mismatch, errors = filecmp.cmpfiles(tmp_path / "pope", tmp_path / "uniform", same, shallow=False)
    assert match == same, (mismatch, errors)
    scenes = {s["id"]: s for s in D.read_json(str(tmp_path / "pope" / "scenes_train.json"))}
    changed, near, n = 0, 0, 0
    pairs = zip(D.read_json(str(tmp_path / "pope" / "instruct_train.json")),
                D.read_json(str(tmp_path / "uniform" / "instruct_train.json")))
    for mine, theirs in pairs:
        assert mine["id"] == theirs["id"] and len(mine["conversations"]) == len(theirs["conversations"])
        for i, (q, a) in enumerate(zip(mine["conversations"][::2], mine["conversations"][1::2])):
            if mine["question_types"][i] != "existence" or a["value"] != "no":
                assert q == theirs["conversations"][2 * i]  # only the "no" questions change
                continue
            colour, shape = re.fullmatch(r"(?:<image>\n)?Is there a (\w+) (\w+) in the image\?", q["value"]).groups()
            objects = scenes[mine["id"]]["objects"]
            assert (colour, shape) not in {(o["colour"], o["shape"]) for o in objects}
            near += any(o["colour"] == colour or o["shape"] == shape for o in objects)
            changed += q != theirs["conversations"][2 * i]
            n += 1
    assert n > 30 and changed > n / 2 and near > 0.6 * n  # uniform negatives share an attribute less often


def test_builtin_files_are_llava_format(builtin):
    for name in ("captions_train.json", "instruct_train.json"):
        samples = D.read_json(os.path.join(builtin, name))
        for s in samples:
            conv = s["conversations"]
            assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
            assert ("image" in s) == conv[0]["value"].startswith("<image>\n")
            assert all("<image>" not in t["value"] for t in conv[1:])
            if "image" in s:
                assert os.path.isfile(os.path.join(builtin, s["image"]))
    instruct = D.read_json(os.path.join(builtin, "instruct_train.json"))
    text_only = [s for s in instruct if "image" not in s]
    assert len(text_only) == round(SMALL.n_train * SMALL.text_only_fraction)
    types = {t for s in instruct for t in s["question_types"]}
    assert {"colour", "shape", "count", "position", "existence", "description", "text"} <= types
    assert any(len(s["conversations"]) > 2 for s in instruct)  # some multi-turn


def test_answers_describe_the_drawn_scene(builtin):
    scene = D.read_json(os.path.join(builtin, "scenes_train.json"))[0]
    image = np.asarray(D.Image.open(os.path.join(builtin, scene["image"])).convert("RGB"))
    size = image.shape[0]
    for o in scene["objects"]:  # the pixel at each object's centre has the object's colour
        row, col = divmod(o["cell"], 3)
        x = int((col + 0.5 + 3 * o["jitter"][0]) * size / 3)
        y = int((row + 0.5 + 3 * o["jitter"][1]) * size / 3)
        assert tuple(image[y, x]) == D.COLOURS[o["colour"]]
    qa = D.questions(scene, D.random.Random(0))
    assert ("count", "How many objects are there?", str(len(scene["objects"]))) in qa


def test_the_arithmetic_domain_is_right_and_never_asks_a_sum_twice(builtin, tok):
    ops = {"plus": lambda x, y: x + y, "minus": lambda x, y: x - y, "times": lambda x, y: x * y}
    asked = {}
    for split in ("train", "val", "test"):
        samples = D.read_json(os.path.join(builtin, f"arithmetic_{split}.json"))
        assert len(samples) == {"train": SMALL.n_train, "val": SMALL.n_val, "test": SMALL.n_test}[split] // 2
        for s in samples:
            [(human, gpt)] = [(s["conversations"][0]["value"], s["conversations"][1]["value"])]
            x, op, y = re.fullmatch(r"What is (\d+) (plus|minus|times) (\d+)\?", human).groups()
            assert "image" not in s and int(gpt) == ops[op](int(x), int(y)) >= 0
            assert s["question_types"] == [{"plus": "add", "minus": "subtract", "times": "multiply"}[op]]
            if op != "times":
                assert human not in asked, (human, split, asked[human])
                asked[human] = split
            assert tok.decode(tok.encode(human)) == human
    assert set(asked.values()) == {"train", "val", "test"}


def test_ensure_builtin_regenerates_only_for_a_different_config(builtin, tmp_path):
    marker = os.path.join(builtin, "builtin.json")
    before = os.path.getmtime(marker)
    D.ensure_builtin(builtin, SMALL, progress=False)
    assert os.path.getmtime(marker) == before
    copy = tmp_path / "copy"
    shutil.copytree(builtin, copy)
    D.ensure_builtin(str(copy), D.BuiltinConfig(n_train=20, n_val=12, n_test=12), progress=False)
    assert len(D.read_json(str(copy / "scenes_train.json"))) == 20
    assert json.loads((copy / "builtin.json").read_text())["n_train"] == 20
    older = json.loads((copy / "builtin.json").read_text())  # a set drawn before an option existed is kept
    del older["train_giveaways"]
    (copy / "builtin.json").write_text(json.dumps(older))
    before = os.path.getmtime(copy / "scenes_train.json")
    D.ensure_builtin(str(copy), D.BuiltinConfig(n_train=20, n_val=12, n_test=12), progress=False)
    assert os.path.getmtime(copy / "scenes_train.json") == before
    D.ensure_builtin(str(copy), D.BuiltinConfig(n_train=20, n_val=12, n_test=12, train_giveaways=False),
                     progress=False)
    assert json.loads((copy / "builtin.json").read_text())["train_giveaways"] is False


# --- tokenizer


def test_builtin_tokenizer_round_trips_and_has_the_special_tokens(builtin, tok):
    text = D.CHAT_SYSTEM + " USER: What colour is the circle? ASSISTANT: red<|endoftext|>"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert ids[-1] == tok.eos_id and tok.encode("<image>") == [tok.image_id]
    assert len(tok.encode(" circle")) == 1  # frequent words became single tokens
    assert len(tok.encode(D.CHAT_SYSTEM)) < 40  # the system prompt, seen in every sample, is compact
    assert tok.decode(tok.encode("zebra ünïcode 12")) == "zebra ünïcode 12"  # unseen text still encodes (bytes)
    # the file is in tiktoken's own format
    ranks = tiktoken.load.load_tiktoken_bpe(os.path.join(builtin, D.BUILTIN_TOKENIZER_FILE))
    assert ranks == D.load_bpe(os.path.join(builtin, D.BUILTIN_TOKENIZER_FILE))
    assert tok.vocab_size == len(ranks) + 2


def test_train_bpe_merges_the_most_frequent_pair_first():
    ranks = D.train_bpe(["ab ab ab cd"], vocab_size=257)
    assert len(ranks) == 257 and ranks[b"ab"] == 256
    assert D.train_bpe(["abc"], vocab_size=1000).keys() == {bytes([b]) for b in range(256)}  # nothing repeats


def test_named_encoding_that_cannot_load_fails_in_one_sentence(monkeypatch):
    def offline(name):
        raise ConnectionError("no network")
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(RuntimeError, match="tiktoken encoding 'gpt2' could not be loaded.*--tokenizer=builtin"):
        D.load_tokenizer("gpt2")


def test_named_encoding_gets_the_image_placeholder(monkeypatch):
    base = tiktoken.Encoding("fake", pat_str=D.PAT_STR, mergeable_ranks={bytes([b]): b for b in range(256)},
                             special_tokens={"<|endoftext|>": 256, "<|fim_prefix|>": 257})
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: base)
    tok = D.load_tokenizer("fake")
    assert tok.eos_id == 256 and tok.image_id == 258 and tok.vocab_size == 259
    assert len(tok.encode("<|fim_prefix|>")) > 1  # another special token in user text is read as plain text


def test_missing_builtin_tokenizer_names_the_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="python data.py"):
        D.load_tokenizer("builtin", str(tmp_path))


# --- templates


def conv(q, a, image=True):
    return [{"from": "human", "value": ("<image>\n" if image else "") + q}, {"from": "gpt", "value": a}]


def test_chat_template_supervises_only_the_answers(tok):
    turns = conv("What colour is the circle?", "red") + [{"from": "human", "value": "How many?"},
                                                        {"from": "gpt", "value": "2"}]
    ids, sup = D.tokenize(D.render(turns, "chat"), tok, num_image_tokens=5)
    official = (D.CHAT_SYSTEM + " USER: \nWhat colour is the circle? ASSISTANT: red<|endoftext|>"
                "USER: How many? ASSISTANT: 2<|endoftext|>")  # the separators of MoE-LLaVA's conv_phi
    assert tok.decode(ids.tolist()) == official
    assert tok.decode(ids[sup].tolist()) == " red<|endoftext|> 2<|endoftext|>"
    assert (ids == D.IMAGE_TOKEN_INDEX).sum() == 5 and not sup[ids == D.IMAGE_TOKEN_INDEX].any()
    assert tok.decode(ids.tolist()).startswith(D.CHAT_SYSTEM + " USER: \nWhat colour")
    prompt, _ = D.tokenize(D.chat_prompt("What colour is the circle?"), tok, num_image_tokens=5)
    assert np.array_equal(ids[:len(prompt)], prompt)  # generation starts exactly where the answer begins
    assert not sup[:len(prompt)].any() and sup[len(prompt)]


def test_chat_formats_of_real_llms_are_written_as_they_were_tuned_on(tok):
    """ChatML (Qwen2, SmolLM2) and Llama 3's format: the text around the answers, the answers (with the format's
    end token) the only supervised text, and a prompt that stops exactly where the second answer begins."""
    turns = conv("Q1?", "a1", image=False) + conv("Q2?", "a2", image=False)
    expected = {
        "chatml": (f"<|im_start|>system\n{D.CHAT_SYSTEM}<|im_end|>\n<|im_start|>user\nQ1?<|im_end|>\n"
                   "<|im_start|>assistant\na1<|im_end|>\n<|im_start|>user\nQ2?<|im_end|>\n<|im_start|>assistant\n"
                   "a2<|im_end|>\n", "a1<|im_end|>a2<|im_end|>"),
        "llama3": (f"<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{D.CHAT_SYSTEM}<|eot_id|>"
                   "<|start_header_id|>user<|end_header_id|>\n\nQ1?<|eot_id|><|start_header_id|>assistant"
                   "<|end_header_id|>\n\na1<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nQ2?<|eot_id|>"
                   "<|start_header_id|>assistant<|end_header_id|>\n\na2<|eot_id|>", "a1<|eot_id|>a2<|eot_id|>")}
    for name, (text, answers) in expected.items():
        pieces = D.render(turns, name)
        assert "".join(t for t, _ in pieces) == text
        assert "".join(t for t, sup in pieces if sup) == answers
        prompt = "".join(t for t, _ in D.prompt_pieces(turns, name))
        assert text.startswith(prompt) and text[len(prompt):].startswith("a2" + D.CHAT_FORMATS[name].end)
    with pytest.raises(ValueError, match="'chatml' chat format needs the special token.*<|im_end|>.*builtin"):
        D.check_chat_format(dataclasses.replace(tok, chat="chatml"))  # the built-in BPE knows only <|endoftext|>
    D.check_chat_format(tok)


def test_images_are_made_square_by_stretching_cropping_or_padding():
    """A wide picture, red | green | blue in thirds: crop keeps the green centre, pad keeps all three bands with
    CLIP's mean colour (0 after normalisation) above and below, stretch keeps all three and fills the square."""
    im = Image.new("RGB", (96, 32))
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        im.paste(colour, (32 * i, 0, 32 * (i + 1), 32))
    channel = lambda x, row, col: int(x[:, row, col].argmax())  # noqa: E731  (0 red, 1 green, 2 blue)
    crop = D.image_tensor(im, 16, "crop")
    assert {channel(crop, 8, c) for c in range(16)} == {1}
    pad, stretch = D.image_tensor(im, 18, "pad"), D.image_tensor(im, 18, "stretch")
    assert [channel(pad, 9, c) for c in (1, 9, 16)] == [0, 1, 2] and pad[:, 0].abs().max() < 0.02
    assert [channel(stretch, r, c) for r, c in ((0, 1), (17, 9), (9, 16))] == [0, 1, 2]
    square = Image.new("RGB", (20, 20), (10, 200, 30))
    assert all(torch.equal(D.image_tensor(square, 16, r), D.image_tensor(square, 16)) for r in D.IMAGE_RESIZES)
    with pytest.raises(ValueError, match="unknown image resize 'squash'"):
        D.image_tensor(im, 16, "squash")


def test_plain_template_is_image_then_caption(tok):
    ids, sup = D.tokenize(D.render(conv("Describe.", "A red circle."), "plain"), tok, num_image_tokens=4)
    assert (ids[:4] == D.IMAGE_TOKEN_INDEX).all()
    assert tok.decode(ids[4:].tolist()) == "A red circle.\n" and sup[4:].all() and not sup[:4].any()


def test_truncation_never_cuts_an_image(tok):
    ids, sup = D.tokenize(D.render(conv("Q?", "yes"), "chat"), tok, num_image_tokens=8)
    start = int(np.argmax(ids == D.IMAGE_TOKEN_INDEX))
    with pytest.raises(D.BadSample, match="cut into the image"):
        D.truncate(ids, sup, start + 3)
    with pytest.raises(D.BadSample, match="no answer left"):
        D.truncate(ids, sup, start + 8 + 2)
    short_ids, short_sup = D.truncate(ids, sup, len(ids) - 1)  # loses the end marker, keeps the answer
    assert len(short_ids) == len(ids) - 1 and short_sup.any()


# --- loading with bad samples


def test_bad_samples_are_skipped_with_one_summary_line(builtin, tok, tmp_path):
    good = D.read_json(os.path.join(builtin, "instruct_train.json"))[:20]
    bad = [
        {"id": "a", "image": "images/nope.png", "conversations": conv("Q?", "A")},  # missing image
        {"id": "b", "conversations": [{"from": "human", "value": "Q?"}]},  # no answer
        {"id": "c", "conversations": [{"from": "gpt", "value": "A"}, {"from": "human", "value": "Q"}]},
        {"id": "d", "conversations": "not a list"},
        {"id": "e", "conversations": conv("Q?", "   ", image=False)},  # empty answer
        {"id": "g", "image": ["a.png"], "conversations": conv("Q?", "A")},  # not a file name
        {"id": "f", "image": good[0].get("image") or "images/train_00000.png",
         "conversations": conv("Q " * 400, "A")},  # too long
    ]
    lines = []
    examples = D.load_examples(write(tmp_path, "mixed.json", good + bad), builtin, tok, "chat", 16, 128,
                               max_bad_fraction=0.5, log=lines.append)
    assert len(examples) == 20 and len(lines) == 1
    assert "skipped 7 of 27 samples" in lines[0]
    for reason in ("image file missing", "no answer", "turns do not alternate", "no conversations", "empty answer",
                   "too long", "image is not a file name"):
        assert reason in lines[0]
    with pytest.raises(ValueError, match="unusable for the 'chat' template .* more than max_bad_fraction"):
        D.load_examples(write(tmp_path, "bad.json", good[:5] + bad), builtin, tok, "chat", 16, 128, log=lines.append)


def test_malformed_files_stop_at_load_time(builtin, tok, tmp_path):
    with pytest.raises(ValueError, match=r"broken.json is not valid JSON"):
        D.load_examples(write(tmp_path, "broken.json", '[{"id": 1,'), builtin, tok, "chat", 16, 128)
    with pytest.raises(ValueError, match="holds a JSON dict; expected a LLaVA-format list"):
        D.load_examples(write(tmp_path, "dict.json", {"id": 1}), builtin, tok, "chat", 16, 128)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        D.load_examples(str(tmp_path / "absent.json"), builtin, tok, "chat", 16, 128)


@pytest.mark.parametrize("question", ["Q?", "Q?\n<image>", "<image>\nQ?"])
def test_image_placeholder_goes_to_the_front_of_the_first_question(builtin, tok, tmp_path, question):
    sample = {"id": "x", "image": "images/train_00000.png",
              "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": "A"}]}
    [ex] = D.load_examples(write(tmp_path, "s.json", [sample]), builtin, tok, "chat", 16, 128)
    start = int(np.argmax(ex.ids == D.IMAGE_TOKEN_INDEX))
    assert tok.decode(ex.ids[:start].tolist()) == D.CHAT_SYSTEM + " USER: "
    assert (ex.ids[start:start + 16] == D.IMAGE_TOKEN_INDEX).all() and (ex.ids == D.IMAGE_TOKEN_INDEX).sum() == 16
    assert tok.decode(ex.ids[start + 16:].tolist()).startswith("\nQ? ASSISTANT:")


# --- batching


def test_batches_pad_mask_and_label(builtin, tok):
    examples = D.load_examples(os.path.join(builtin, "instruct_train.json"), builtin, tok, "chat", 16, 256)
    batches = D.Batches(examples, 6, 32, tok.eos_id, seed=3)
    b = batches[0]
    lengths = b.attention_mask.sum(1)
    assert b.input_ids.shape == (6, int(lengths.max()))
    for row, i in enumerate(batches.indices(0)):
        n = len(examples[i].ids)
        assert lengths[row] == n and b.attention_mask[row, :n].all()  # right padding
        assert (b.labels[row, n:] == D.IGNORE_INDEX).all() and (b.input_ids[row, n:] == tok.eos_id).all()
        expected = np.where(examples[i].supervised, examples[i].ids, D.IGNORE_INDEX)
        assert torch.equal(b.labels[row, :n], torch.from_numpy(expected.astype(np.int64)))
    n_images = sum(examples[i].image is not None for i in batches.indices(0))
    assert (0 if b.images is None else b.images.shape[0]) == n_images
    assert (b.input_ids == D.IMAGE_TOKEN_INDEX).sum() == 16 * n_images


def test_batch_order_is_deterministic_and_each_epoch_a_permutation(builtin, tok):
    examples = D.load_examples(os.path.join(builtin, "captions_train.json"), builtin, tok, "plain", 4, 64)
    a, b = D.Batches(examples, 8, 16, 0, seed=1), D.Batches(examples, 8, 16, 0, seed=1)
    assert torch.equal(a[7].input_ids, b[7].input_ids)  # a fresh stream at step 7 = the same data position
    epoch = sum((a.indices(s) for s in range(a.per_epoch)), [])
    assert len(set(epoch)) == len(epoch) == a.per_epoch * 8  # no example twice within an epoch
    assert a.indices(0) != a.indices(a.per_epoch)  # reshuffled each epoch


def test_an_unreadable_image_drops_its_sample_not_the_run(builtin, tok, tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "corrupt.png").write_bytes(b"not a png")
    good = D.read_json(os.path.join(builtin, "captions_train.json"))[:3]
    for s in good:
        os.link(os.path.join(builtin, s["image"]), tmp_path / s["image"].replace("images/", "images/g_"))
        s["image"] = s["image"].replace("images/", "images/g_")
    samples = good + [{"id": "bad", "image": "images/corrupt.png", "conversations": conv("Describe.", "Noise.")}]
    examples = D.load_examples(write(tmp_path, "c.json", samples), str(tmp_path), tok, "plain", 4, 64,
                               max_bad_fraction=0.5)
    batch = D.Batches(examples, 4, 16, 0).in_order(0)
    assert batch.skipped == 1 and batch.input_ids.shape[0] == 3 and batch.images.shape == (3, 3, 16, 16)
    with pytest.raises(D.EmptyBatch):  # the training loop skips such a batch
        D.Batches(examples[3:], 1, 16, 0).in_order(0)


def test_an_unreadable_batch_is_skipped_or_stood_in_for_at_weight_0():
    """data.batch_or_stand_in: one process skips a batch whose images are all unreadable; a distributed rank runs
    the next readable batch at weight 0 instead (it must join the step's collectives)."""
    def load(i):
        if i in (1, 2):
            raise D.EmptyBatch(f"batch {i}: all images unreadable")
        return f"batch {i}"
    warned = []
    assert D.batch_or_stand_in(load, 0, 4) == ("batch 0", 1.0)
    assert D.batch_or_stand_in(load, 1, 4, warn=warned.append) == (None, 0.0)
    assert warned == ["batch 1: all images unreadable"]
    assert D.batch_or_stand_in(load, 1, 4, stand_in=True) == ("batch 3", 0.0)
    with pytest.raises(SystemExit, match="no batch of the data set has a readable image"):
        D.batch_or_stand_in(lambda i: load(1), 1, 4, stand_in=True)


def test_a_folder_given_as_a_json_file_is_one_sentence(tmp_path):
    with pytest.raises(ValueError, match="is a folder; expected a LLaVA-format JSON file"):
        D.read_json(str(tmp_path))
