"""eval.py: answer normalisation, POPE's metrics, parsing and negative sampling, batched answers, routing counts,
the plots and the command line, on hand-made inputs and a tiny trained checkpoint."""
import collections
import dataclasses
import json
import os
import random
import shutil
import types

import numpy as np
import pytest
import torch
from PIL import Image

import data as D
import eval as E
import parallel as P
import train

SMALL = ["--llm.dim=64", "--llm.ffn_dim=128", "--llm.max_seq_len=128", "--vision.image_size=32",
         "--vision.width=64", "--vision.layers=2", "--data.n_train=48", "--data.n_val=16", "--data.n_test=8",
         "--batch_size=4", "--clip_batch_size=8", "--eval_batches=1", "--progress=false", "--routing_interval=1",
         "--log_interval=1"]
QUIET = ["--progress=false", "--batch_size=3", "--max_new_tokens=4", "--description_tokens=8"]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A tiny `--stage all` run (2 steps per stage): stage2 is dense, stage3 has MoE layers 0 and 2."""
    root = tmp_path_factory.mktemp("eval_pipeline")
    data_dir = str(root / "data")
    train.main(["--out_dir", str(root / "out"), "--data_dir", data_dir, "--stage", "all", "--max_iters=2", *SMALL])
    return root / "out", data_dir


# ----------------------------------------------------------------------------------------------------------
# answers


def test_normalize_answer_follows_the_stated_rules():
    assert E.normalize_answer("The Red.") == "red"
    assert E.normalize_answer("Two") == E.normalize_answer("2") == "2"
    assert E.normalize_answer("bottom-right") == "bottom right"
    assert E.normalize_answer("  A   large\ncircle! ") == "large circle"
    assert E.normalize_answer("3.5") == "3.5"  # a period inside a number stays
    assert E.normalize_answer("blue") != E.normalize_answer("blue circle")


def test_descriptions_are_scored_by_the_objects_they_name():
    ref = "A small red circle at the top and a large blue square in the center, on a dark background."
    assert E.is_correct("A large blue square at the left and a small red circle at the top.", ref, "description")
    assert not E.is_correct("A small red circle at the top.", ref, "description")  # one object missing
    assert not E.is_correct("A small green circle and a large blue square.", ref, "description")  # wrong colour
    assert E.described_objects("two: a small red circle, a small red circle") == collections.Counter(
        {"small red circle": 2})
    assert not E.is_correct("red circle", "red", "colour") and E.is_correct("Red.", "red", "colour")


def test_each_turn_is_asked_with_the_conversation_so_far():
    conv = [{"from": "human", "value": "<image>\nWhat colour is the circle?"}, {"from": "gpt", "value": "red"},
            {"from": "human", "value": "How many objects are there?"}, {"from": "gpt", "value": "2"}]
    text = "".join(t for t, _ in E.turn_prompt(conv, 1))
    assert text.endswith("USER: How many objects are there? ASSISTANT:")
    assert " red<|endoftext|>USER: How many" in text and "<image>\nWhat colour" in text
    first = "".join(t for t, _ in E.turn_prompt(conv, 0))
    assert first == "".join(t for t, _ in D.chat_prompt("What colour is the circle?"))


# ----------------------------------------------------------------------------------------------------------
# POPE


def test_pope_metrics_on_hand_made_predictions():
    said = [True, True, True, False, False, False, True, False]
    present = [True, True, False, True, False, False, True, False]  # TP 3, FP 1, FN 1, TN 3
    m = E.pope_metrics(said, present)
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["precision"] == pytest.approx(3 / 4) and m["recall"] == pytest.approx(3 / 4)
    assert m["f1"] == pytest.approx(3 / 4)
    assert m["yes_ratio"] == pytest.approx(4 / 8) and m["n"] == 8
    always_no = E.pope_metrics([False] * 4, [True, False, True, False])
    assert always_no == {"accuracy": 0.5, "precision": 0.0, "recall": 0.0, "f1": 0.0, "yes_ratio": 0.0, "n": 4}
    always_yes = E.pope_metrics([True] * 4, [True, False, True, False])
    assert always_yes["recall"] == 1.0 and always_yes["precision"] == 0.5 and always_yes["yes_ratio"] == 1.0


def test_pope_parsing_reads_the_first_sentence_for_no_or_not():
    assert E.pope_says_yes("Yes") and E.pope_says_yes("yes, there is.")
    assert not E.pope_says_yes("no") and not E.pope_says_yes("No, there is not.")
    assert not E.pope_says_yes("There is not a red circle in the image.")
    assert E.pope_says_yes("Yes. There is no other object.")  # only the first sentence counts
    assert E.pope_says_yes("Nothing looks wrong") and E.pope_says_yes("")  # not the words "no"/"not": yes
    assert not E.pope_says_yes("no, none")  # commas are deleted before the split, as in POPE's code
    assert E.pope_says_yes("Not really") and E.pope_says_yes("NO")  # POPE's code is case-sensitive; so are we


def world(n, seed):
    rng = random.Random(seed)
    return [dict(D.make_scene(rng), image=f"img_{seed}_{i}.png") for i in range(n)]


def test_negative_sampling_obeys_each_splits_rule():
    train_scenes, scenes = world(600, 1), world(60, 2)
    frequency, together = E.object_statistics(train_scenes)
    probe = E.pope_probe(scenes, train_scenes, per_image=3, seed=0)
    for split, items in probe.items():
        assert sum(p for *_, p in items) * 2 == len(items)  # balanced yes / no
        for scene in scenes:
            present = E.kinds_in(scene)
            mine = [(k, p) for s, k, p in items if s is scene]
            positives, negatives = [k for k, p in mine if p], [k for k, p in mine if not p]
            assert set(positives) <= set(present) and len(positives) == min(3, len(present))
            assert not set(negatives) & set(present) and len(set(negatives)) == len(negatives)
            rest = [k for k in E.ALL_KINDS if k not in present and k not in negatives]
            if split == "popular":  # the most frequent absent kinds
                assert min(frequency[k] for k in negatives) >= max(frequency[k] for k in rest)
            if split == "adversarial":  # the absent kinds that co-occur most with the present ones
                score = lambda k: sum(together[(p, k)] for p in present)  # noqa: E731
                assert min(score(k) for k in negatives) >= max(score(k) for k in rest)

    def mean_over(split, f):
        return np.mean([f(s, k) for s, k, p in probe[split] if not p])
    popularity = lambda s, k: frequency[k]  # noqa: E731
    cooccurrence = lambda s, k: sum(together[(p, k)] for p in E.kinds_in(s))  # noqa: E731
    # the built-in world's skew and themes make the harder splits differ from random
    assert mean_over("popular", popularity) > 1.5 * mean_over("random", popularity)
    assert mean_over("adversarial", cooccurrence) > 1.5 * mean_over("random", cooccurrence)


def test_random_negatives_change_with_the_seed_only():
    train_scenes, scenes = world(100, 1), world(20, 2)
    a = E.pope_probe(scenes, train_scenes, 3, seed=0)["random"]
    b = E.pope_probe(scenes, train_scenes, 3, seed=0)["random"]
    c = E.pope_probe(scenes, train_scenes, 3, seed=1)["random"]
    key = lambda items: [(s["image"], k, p) for s, k, p in items]  # noqa: E731
    assert key(a) == key(b) and key(a) != key(c)


# ----------------------------------------------------------------------------------------------------------
# generation and routing counts on a tiny trained checkpoint


def test_vqa_scores_by_type_leave_out_unanswered_questions():
    q = lambda qtype, answer: E.Question(np.zeros(3, np.int32), None, answer, qtype, "?", 4)  # noqa: E731
    questions = [q("colour", "red"), q("colour", "blue"), q("count", "2"), q("count", "3"), q("shape", "circle")]
    scores = E.vqa_scores(questions, ["Red.", "green", "two", None, "circle"])
    assert scores["colour"] == {"accuracy": 0.5, "n": 2}
    assert scores["count"] == {"accuracy": 1.0, "n": 1}  # the unanswered one is not counted
    assert scores["overall"] == {"accuracy": 0.75, "n": 4} and list(scores)[-1] == "overall"


class EchoLengthVLM:
    """A stand-in whose 'answer' to each prompt is the prompt's length: any misalignment of answers shows."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.config = types.SimpleNamespace(vision=types.SimpleNamespace(image_size=8, image_resize="stretch"))
        self.calls = []

    def generate(self, ids, images, mask, eos_id, max_new_tokens, dropless=True):
        self.calls.append(max_new_tokens)
        rows = [self.tokenizer.encode(str(int(m.sum()))) for m in mask]
        out = torch.full((len(rows), max_new_tokens), eos_id)
        for r, toks in enumerate(rows):
            out[r, :len(toks)] = torch.tensor(toks)
        return out


def test_answers_come_back_in_question_order_and_batches_do_not_mix_lengths(pipeline):
    _, data_dir = pipeline
    tok = D.load_tokenizer("builtin", data_dir)
    rng = np.random.default_rng(0)
    lengths = rng.permutation(np.arange(3, 40))
    questions = [E.Question(np.ones(n, np.int32), None, "", "t", "?", 9 if n % 3 else 4) for n in lengths]
    vlm = EchoLengthVLM(tok)
    answers = E.generate_answers(vlm, tok, questions, torch.device("cpu"), batch_size=5, progress=False)
    assert answers == [str(n) for n in lengths]
    assert sorted(vlm.calls) == [4] * 3 + [9] * 5  # 13 and 24 questions in chunks of 5, never mixed


def test_batched_answers_equal_one_at_a_time(pipeline):
    out, data_dir = pipeline
    vlm, tok, _ = E.load_model(str(out / "stage3"), torch.device("cpu"))
    config = E.EvalConfig(max_new_tokens=5, description_tokens=9)
    questions, _ = E.vqa_questions(D.read_json(os.path.join(data_dir, "instruct_test.json"))[:5], data_dir, tok, vlm,
                                   config)
    assert len(questions) > 5 and len({len(q.prompt) for q in questions}) > 1  # left padding is exercised
    batched = E.generate_answers(vlm, tok, questions, torch.device("cpu"), batch_size=4, progress=False)
    alone = [E.generate_answers(vlm, tok, [q], torch.device("cpu"), batch_size=1, progress=False)[0]
             for q in questions]
    assert batched == alone and all(isinstance(a, str) for a in batched)


def test_the_blind_control_shows_pictures_that_carry_no_answer(pipeline):
    """blank: one grey picture for every question; shuffled: every question another scene's image, the same set
    of pictures overall (so what differs is only which image goes with which question)."""
    _, data_dir = pipeline
    paths = [os.path.join(data_dir, s["image"]) for s in D.read_json(os.path.join(data_dir, "scenes_test.json"))[:5]]
    real = {p: D.load_image(p, 32) for p in paths}
    blank = E.image_loader("blank", paths, 32)
    assert all(torch.equal(blank(p), blank(paths[0])) and not torch.equal(blank(p), real[p]) for p in paths)
    shuffled = E.image_loader("shuffled", paths + paths[:2], 32)  # a path asked about twice moves once
    shown = [shuffled(p) for p in paths]
    assert not any(torch.equal(x, real[p]) for x, p in zip(shown, paths))
    assert sorted(x.sum().item() for x in shown) == sorted(x.sum().item() for x in real.values())
    assert torch.equal(E.image_loader("real", paths, 32)(paths[0]), real[paths[0]])


def test_the_probe_targets_say_what_is_in_each_scene():
    scene = {"objects": [{"shape": "circle", "colour": "red", "cell": 0},
                         {"shape": "cross", "colour": "blue", "cell": 8}]}
    y, groups = E.probe_targets([scene])
    truth = dict(zip([(g, i) for i, g in enumerate(groups)], y[0].tolist()))
    yes = {col for col, v in truth.items() if v == 1.0}
    cells = sorted(i for (g, i) in yes if g == "cells")
    assert cells == [0, 8]
    assert sum(g == "colours" for g, _ in yes) == 2 and sum(g == "shapes" for g, _ in yes) == 2
    kinds = [E.ALL_KINDS[i - groups.index("kinds")] for g, i in yes if g == "kinds"]
    assert sorted(kinds) == [("blue", "cross"), ("red", "circle")]


def test_the_linear_probe_reads_what_the_features_hold_and_nothing_else():
    g = torch.Generator().manual_seed(0)
    y = (torch.rand(600, 6, generator=g) < 0.2).float()  # rare attributes: "always no" is 80 % accurate
    holds = y @ torch.randn(6, 40, generator=g) + 0.3 * torch.randn(600, 40, generator=g)
    noise = torch.randn(600, 40, generator=g)
    assert E.fit_probe(holds[:400], y[:400], holds[400:], y[400:]).min() > 0.9
    assert (E.fit_probe(noise[:400], y[:400], noise[400:], y[400:]) - 0.5).abs().max() < 0.1
    assert torch.equal(E.balanced_accuracy(torch.zeros_like(y), y), torch.full((6,), 0.5))  # "no" knows nothing


def test_the_probe_option_scores_a_checkpoints_vit_against_raw_pixels(pipeline, tmp_path):
    out, data_dir = pipeline
    result = E.main(["--ckpt", str(out / "stage0"), "--data_dir", data_dir, "--out", str(tmp_path), "--probe=true",
                     "--probe_scenes=40", "--progress=false"])
    assert set(result) == {"vit", "pixels"} and all(set(v) == set(E.PROBE_GROUPS) for v in result.values())
    written = json.loads((tmp_path / "probe.json").read_text())
    assert written["train_scenes"] == 40 and written["test_scenes"] == 8 and written["accuracy"] == result
    words = written["captioner_words"]  # stage 0 trained a captioner (the default objective): its words, scored
    assert {"size", "colour", "shape", "position"} <= set(words) and all(0 <= v <= 1 for v in words.values())
    assert any(k.startswith("shape: ") for k in words)


def test_the_captioner_word_score_counts_only_the_words_the_image_tells(pipeline):
    out, data_dir = pipeline
    vlm, tokenizer, _ = E.load_model(str(out / "stage0"), "cpu")
    captions = D.read_json(os.path.join(data_dir, "captions_test.json"))

    class Echo:  # "predicts" the reference token itself, or (off=1) always another one
        def __init__(self, off):
            self.off = off

        def logits(self, vit, pixels, ids):
            return torch.nn.functional.one_hot((ids + self.off) % tokenizer.vocab_size, tokenizer.vocab_size).float()

    right = E.caption_word_accuracy(vlm.vision, Echo(0), tokenizer, captions, data_dir, batch_size=3)
    wrong = E.caption_word_accuracy(vlm.vision, Echo(1), tokenizer, captions, data_dir, batch_size=3)
    assert set(right) == set(wrong) and {"size", "colour", "shape", "position"} <= set(right)
    assert all(v == 1.0 for v in right.values()) and all(v == 0.0 for v in wrong.values())


def test_the_vlms_word_score_compares_each_prediction_with_the_next_token(pipeline):
    out, data_dir = pipeline
    vlm, tok, _ = E.load_model(str(out / "stage2"), torch.device("cpu"))
    captions = D.load_examples(os.path.join(data_dir, "captions_test.json"), data_dir, tok, "plain",
                               vlm.num_image_tokens, vlm.config.llm.max_seq_len)

    class Echo(torch.nn.Module):  # the VLM, but its logits "predict" the next label (off=1: always another token)
        def __init__(self, off):
            super().__init__()
            self.vlm, self.off, self.llm, self.config = vlm, off, vlm.llm, vlm.config
            self.moe_layer_names, self.moe_config = vlm.moe_layer_names, vlm.moe_config

        def forward(self, ids, images, labels, mask):
            out = self.vlm(ids, images, labels, mask)
            nxt = (labels.roll(-1, dims=1).clamp(min=0) + self.off) % tok.vocab_size
            out.logits = torch.nn.functional.one_hot(nxt, tok.vocab_size).float()
            return out

    scores = []
    for off in (0, 1):
        words = E.WordTally(tok)
        E.loss_and_routing(Echo(off), captions, tok, batch_size=3, device=torch.device("cpu"), progress=False,
                           words=words)
        scores.append(words.accuracy())
    single = [w for kind, w in words.word_of.values() if kind == "colour"]  # (a word of two tokens is left out)
    n_colour = sum(c["conversations"][1]["value"].count(f" {w} ") for c in D.read_json(
        os.path.join(data_dir, "captions_test.json")) for w in single)
    assert words.total["colour"] == n_colour > 0  # every colour word of the captions, counted once
    assert {"size", "colour", "shape", "position"} <= set(scores[0])
    assert all(v == 1.0 for v in scores[0].values()) and all(v == 0.0 for v in scores[1].values())


def test_a_long_prompt_and_a_long_answer_share_no_batch(pipeline):
    out, data_dir = pipeline
    vlm, tok, _ = E.load_model(str(out / "stage3"), torch.device("cpu"))
    room = vlm.config.llm.max_seq_len
    questions = [E.Question(np.full(room - 4, 5, np.int32), None, "", "t", "?", 4),
                 E.Question(np.full(10, 5, np.int32), None, "", "t", "?", room - 10)]
    answers = E.generate_answers(vlm, tok, questions, torch.device("cpu"), batch_size=8, progress=False)
    assert all(isinstance(a, str) for a in answers)  # together they would need room + 26 positions


def test_routing_counts_sum_to_real_tokens_times_k(pipeline):
    out, data_dir = pipeline
    vlm, tok, _ = E.load_model(str(out / "stage3"), torch.device("cpu"))
    examples = D.load_examples(os.path.join(data_dir, "instruct_test.json"), data_dir, tok, "chat",
                               vlm.num_image_tokens, vlm.config.llm.max_seq_len)
    assert len({len(ex.ids) for ex in examples}) > 1  # batches are padded
    ce, groups = E.loss_and_routing(vlm, examples, tok, batch_size=3, device=torch.device("cpu"), progress=False)
    counts = groups["llm"]
    real = sum(len(ex.ids) for ex in examples)
    image = sum(int((ex.ids == D.IMAGE_TOKEN_INDEX).sum()) for ex in examples)
    k = vlm.llm.config.moe.top_k
    assert counts.layers == [0, 2] and np.isfinite(ce)
    assert counts.tokens.tolist() == [real - image, image]
    for layer in range(2):
        assert int(counts.topk_counts[layer].sum()) == real * k
        assert int(counts.top1_counts[layer].sum()) == real
        assert counts.topk_counts[layer][1].sum() == image * k  # image row counts image tokens only
    for modality, n in ((0, real - image), (1, image)):
        assert sum(counts.pathways[modality].values()) == n
    summary = E.routing_summary(counts)
    assert np.allclose(np.sum(summary["topk_share"], axis=1), 1.0)
    assert np.allclose(np.sum(summary["top1_share_image"], axis=1), 1.0)
    assert all(x >= 1.0 for x in summary["max_over_mean_load"]) and all(0 <= d <= 1 for d in
                                                                         summary["dropped_fraction"])


def test_the_balancing_loss_is_reported_in_deepspeeds_and_hugging_faces_conventions():
    torch.manual_seed(0)
    from moe import MoEConfig, MoELayer, SwiGLUExperts, router_logits
    layers = [MoELayer(MoEConfig(num_experts=4, top_k=2), SwiGLUExperts(4, 16, 32)).eval() for _ in range(2)]
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 5:] = 0  # padding: routed by neither
    xs = [torch.randn(3, 7, 16) for _ in layers]
    stats = [layer(x, mask.bool(), torch.zeros(3, 7, dtype=torch.bool))[1] for layer, x in zip(layers, xs)]
    counts = E.RoutingCounts.zeros([0, 2], 2, 4, 2.0)
    E.add_routing(counts, stats, torch.zeros(3, 7, dtype=torch.bool), mask)
    b = E.balance_conventions(counts)
    ours = [float(s.balance_loss.detach()) for s in stats]
    assert b["deepspeed"] == pytest.approx(ours, abs=1e-6)  # our balancing loss, per layer
    mixtral = pytest.importorskip("transformers.models.mixtral.modeling_mixtral", reason="transformers is a peer")
    logits = tuple(router_logits(x, layer.router.weight).detach().reshape(-1, 4) for layer, x in zip(layers, xs))
    assert b["hf"] == pytest.approx(float(mixtral.load_balancing_loss_func(logits, 4, 2, mask)), abs=1e-6)
    even = E.RoutingCounts.zeros([0], 2, 4, 2.0)  # every expert equally loaded and equally likely
    even.top1_counts[0, 0], even.topk_counts[0, 0], even.prob_sums[0] = 10, 20, 40 * 0.25
    assert E.balance_conventions(even) == {"deepspeed": [1.0], "hf": 2.0}


def test_the_modality_split_rescales_each_modality_by_its_own_total():
    counts = E.RoutingCounts.zeros([0], top_k=1, num_experts=2, capacity_factor=2.0)
    counts.topk_counts[0] = torch.tensor([[50, 50], [150, 150]])  # 100 text and 300 image tokens, spread alike
    counts.top1_counts[0] = torch.tensor([[100, 0], [0, 300]])  # expert 0 all text, expert 1 all image
    counts.tokens[:] = torch.tensor([100, 300])
    s = E.routing_summary(counts)
    assert s["image_share_rescaled"] == [[0.5, 0.5]]  # no preference, although 3/4 of the traffic is image
    assert s["image_share_raw"] == [[0.75, 0.75]]
    assert s["image_share_rescaled_top1"] == [[0.0, 1.0]]
    assert s["max_over_mean_load"] == [1.0] and s["cv_load"] == [0.0]


def test_a_tight_evaluation_capacity_drops_and_reports_it(pipeline):
    out, data_dir = pipeline
    vlm, tok, _ = E.load_model(str(out / "stage3"), torch.device("cpu"))
    examples = D.load_examples(os.path.join(data_dir, "instruct_test.json"), data_dir, tok, "chat",
                               vlm.num_image_tokens, vlm.config.llm.max_seq_len)
    for block in vlm.llm.blocks:
        if block.is_moe:
            block.ffn.config = dataclasses.replace(block.ffn.config, eval_capacity_factor=0.25, min_capacity=1)
    _, groups = E.loss_and_routing(vlm, examples, tok, batch_size=8, device=torch.device("cpu"), progress=False)
    counts = groups["llm"]
    summary = E.routing_summary(counts)
    assert all(0.3 < d < 1 for d in summary["dropped_fraction"])  # at most a quarter of the choices fit
    assert int(counts.topk_counts[0].sum()) == counts.tokens.sum() * 2  # counts are before dropping


# ----------------------------------------------------------------------------------------------------------
# the command line: the full evaluation, plots, compare, chat, user data


def is_png(path):
    with open(path, "rb") as f:
        if f.read(8) != b"\x89PNG\r\n\x1a\n":
            return False
    with Image.open(path) as im:
        return im.size[0] > 100 and im.size[1] > 100


def test_eval_writes_metrics_answers_and_valid_png_plots(pipeline, tmp_path):
    out, data_dir = pipeline
    result = E.main(["--ckpt", str(out / "stage3"), "--data_dir", data_dir, "--out", str(tmp_path), *QUIET])[0]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["vqa"] == json.loads(json.dumps(result["vqa"]))
    assert set(metrics["pope"]) == {"random", "popular", "adversarial", "average"}
    assert set(metrics["loss"]) == {"answer_ce", "caption_ce"}
    assert {"size", "colour", "shape", "position"} <= set(metrics["caption_words"])
    assert metrics["routing"]["layers"] == [0, 2]
    blind = metrics["blind"]  # the same questions with one grey picture: the default blind control
    assert blind["images"] == "blank" and set(blind["pope"]) == set(metrics["pope"])
    assert {t: v["n"] for t, v in blind["vqa"].items()} == {t: v["n"] for t, v in metrics["vqa"].items()}
    plots = ["expert_load.png", "modality_split.png", "load_heatmap.png", "balance.png", "pathways.png",
             "load_over_training.png"]
    for name in plots:
        assert is_png(tmp_path / name), name
    for name in ("routing.json", "routing.csv", "routing_training.csv", "answers.jsonl", "pope_answers.jsonl"):
        assert (tmp_path / name).stat().st_size > 0
    answers = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == metrics["vqa"]["overall"]["n"]
    right = sum(a["correct"] for a in answers)
    assert right == round(metrics["vqa"]["overall"]["accuracy"] * len(answers))
    rows = (tmp_path / "routing.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * 4  # a header, then 2 layers x 4 experts


def test_a_cumo_checkpoint_gets_vision_routing_plots_and_a_patch_level_map(pipeline, tmp_path):
    """eval.py finds MoE layers wherever they are: CuMo's ViT blocks and projector are counted over the image
    patches, plotted with a vision_ prefix, and drawn patch by patch over test images."""
    out, data_dir = pipeline
    shutil.copytree(out / "stage2", tmp_path / "run" / "stage2")
    train.main(["--stage", "3", "--recipe=cumo", "--max_iters=2", "--out_dir", str(tmp_path / "run"), "--data_dir",
                data_dir, *SMALL])
    E.main(["--ckpt", str(tmp_path / "run" / "stage3"), "--out", str(tmp_path / "eval"), "--blind=none", *QUIET])
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["routing"] is None  # the LLM stays dense
    vision = metrics["vision_routing"]
    assert vision["layers"] == ["ViT 0", "projector"]  # 2 ViT blocks, the second-to-last selected: block 0 in use
    samples = [s for s in D.read_json(os.path.join(data_dir, "instruct_test.json")) if s.get("image")]
    assert vision["tokens"] == {"text": 0, "image": len(samples) * 16}  # every patch of every image, once
    for name in ("vision_expert_load.png", "vision_load_heatmap.png", "vision_balance.png", "vision_pathways.png",
                 "vision_load_over_training.png", "vision_patch_routing.png"):
        assert is_png(tmp_path / "eval" / name) and name in vision["files"], name
    assert not (tmp_path / "eval" / "vision_modality_split.png").exists()  # no text tokens to split from
    vlm, _, _ = E.load_model(str(tmp_path / "run" / "stage3"), torch.device("cpu"))
    paths = [os.path.join(data_dir, s["image"]) for s in samples[:3]]
    maps = E.patch_routing_maps(vlm, paths, torch.device("cpu"))
    assert maps.shape == (2, 3, 4, 4) and 0 <= int(maps.min()) and int(maps.max()) < 4
    assert len(vision["by_place"]) == 2 and all(0.25 <= v <= 1 for v in vision["by_place"])
    same = torch.zeros(1, 5, 2, 2, dtype=torch.long)  # every image routes alike: the place decides everything
    same[0, :, 0, 1] = 3
    image, place = torch.arange(5).view(5, 1), torch.arange(4).view(1, 4)
    varied = ((image + place) % 4).view(1, 5, 2, 2)  # each place cycles through the experts over the 5 images...
    varied[0, :, 0, 0] = 1  # ...but the first place, always expert 1
    assert E.routed_by_place(same) == [1.0] and E.routed_by_place(varied) == [(5 + 3 * 2) / 20]


def test_compare_puts_two_checkpoints_side_by_side(pipeline, tmp_path):
    out, data_dir = pipeline
    a, b = tmp_path / "stage3", tmp_path / "stage2"
    shutil.copytree(out / "stage3", a)
    shutil.copytree(out / "stage2", b)
    results = E.main(["--ckpt", str(a), "--compare", str(b), "--data_dir", data_dir, "--plots=false", *QUIET])
    assert [r["stage"] for r in results] == [3, 2]
    assert results[1]["routing"] is None  # stage II is dense
    assert results[0]["vqa"]["overall"]["n"] == results[1]["vqa"]["overall"]["n"]  # the same questions
    table = (a / "eval" / "compare.txt").read_text()
    assert str(a) in table and str(b) in table and "POPE adversarial" in table
    assert (a / "eval" / "compare" / "metrics.json").exists()
    assert (a / "eval" / "routing.csv").exists() and not (a / "eval" / "expert_load.png").exists()


def test_single_image_chat_prints_an_answer(pipeline, capsys):
    out, data_dir = pipeline
    image = os.path.join(data_dir, "images", "test_00000.png")
    answer = E.main(["--ckpt", str(out / "stage3"), "--image", image, "--prompt", "What colour is the circle?",
                     "--max_new_tokens=4", "--progress=false"])
    assert isinstance(answer, str) and capsys.readouterr().out.strip() == answer
    assert E.main(["--ckpt", str(out / "stage3"), "--image", image, "--prompt", "<image>\nWhat colour is the circle?",
                   "--max_new_tokens=4"]) == answer  # a LLaVA-style placeholder in the prompt is not doubled
    capsys.readouterr()
    with pytest.raises(SystemExit, match="cannot be read"):
        E.main(["--ckpt", str(out / "stage3"), "--image", str(out / "stage3" / "meta.json"), "--prompt", "Hi?"])
    with pytest.raises(SystemExit):
        E.main(["--ckpt", str(out / "stage3"), "--image", image])  # an image needs a question


def test_user_data_is_evaluated_and_bad_samples_are_skipped(pipeline, tmp_path):
    out, data_dir = pipeline
    samples = D.read_json(os.path.join(data_dir, "instruct_test.json"))
    for s in samples:
        s.pop("question_types")  # a user's file has no types
    samples += [{"id": "gone", "image": "images/missing.png", "conversations": samples[0]["conversations"]},
                {"id": "mute", "conversations": [{"from": "human", "value": "Hello?"}]}]
    (tmp_path / "mine.json").write_text(json.dumps(samples))
    metrics = E.main(["--ckpt", str(out / "stage3"), "--data_path", str(tmp_path / "mine.json"), "--image_folder",
                      data_dir, "--out", str(tmp_path / "eval"), *QUIET])[0]
    assert set(metrics["vqa"]) == {"untyped", "overall"} and "pope" not in metrics
    assert metrics["skipped"]["image file missing"] == 1 and metrics["skipped"]["no answer"] == 1
    assert set(metrics["loss"]) == {"answer_ce"}


def test_a_missing_checkpoint_or_bad_option_is_one_clear_error(pipeline, tmp_path, capsys):
    out, _ = pipeline
    with pytest.raises(SystemExit, match="does not exist.*train.py"):
        E.main(["--ckpt", str(tmp_path / "nothing")])
    bad = {"--no_such_option=1": "unrecognized arguments", "--batch_size=0": "at least 1",
           "--pope_per_image=-1": "at least 1", "--image_folder=x": "goes with --data_path",
           "--compare=x --prompt=hi": "--compare belong", "--split=train": "choose test or val",
           "--blind=dark": "choose one of blank, shuffled, none"}
    for args, message in bad.items():
        with pytest.raises(SystemExit) as stop:
            E.main(["--ckpt", str(out / "stage3"), *args.split()])
        assert stop.value.code == 2 and message in capsys.readouterr().err, args
    with pytest.raises(SystemExit, match="no CUDA GPU" if not torch.cuda.is_available() else "not a device"):
        E.main(["--ckpt", str(out / "stage3"), "--device=cuda" if not torch.cuda.is_available() else "--device=gpu"])


def test_two_ranks_evaluate_what_one_process_evaluates(pipeline, tmp_path, torchrun):
    """Under torchrun each rank answers and scores its share of the batches; rank 0 writes what one process
    writes (the same answers, POPE records, losses to rounding, and routing counts)."""
    out, data_dir = pipeline
    args = ["--ckpt", str(out / "stage3"), "--compare", str(out / "stage2"), "--data_dir", data_dir, *QUIET,
            "--plots=false"]
    E.main([*args, "--out", str(tmp_path / "one")])
    stdout = torchrun("eval.py", *args, "--out", str(tmp_path / "two"))
    assert stdout.count("wrote into") == 1  # rank 0 alone speaks
    for sub in ("", "compare"):
        one, two = tmp_path / "one" / sub, tmp_path / "two" / sub
        assert sorted(os.listdir(one)) == sorted(os.listdir(two))
        for name in ("answers.jsonl", "pope_answers.jsonl"):
            assert (one / name).read_text() == (two / name).read_text(), name
        m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
        for key in ("vqa", "pope", "blind", "skipped", "routing"):
            assert m1[key] == m2[key], key
        for key, value in m1["loss"].items():
            assert m2["loss"][key] == pytest.approx(value, rel=1e-5), key
        assert m1["caption_words"] == pytest.approx(m2["caption_words"], abs=0.01)  # (an argmax may flip on a tie)
    routing = [json.loads((tmp_path / d / "routing.json").read_text()) for d in ("one", "two")]
    assert routing[0] == routing[1] and routing[0]["tokens"]


def test_ranks_share_the_work_and_merged_counts_do_not_depend_on_the_order():
    ranks = [P.Runtime(rank=r, world=3) for r in range(3)]
    shares = [r.mine(list(range(8))) for r in ranks]
    assert sorted(sum(shares, [])) == list(range(8)) and all(shares)  # each item once, every rank some
    def counts(paths):
        c = E.RoutingCounts.zeros([0, 2], 2, 4, 2.0)
        c.topk_counts += 1
        c.pathways[0].update(paths)
        return c
    a, b = {(0, 1): 2, (1, 0): 1}, {(1, 0): 1, (2, 3): 2}
    ab, ba = counts(a), counts(b)
    E.add_counts(ab, counts(b))
    E.add_counts(ba, counts(a))
    assert torch.equal(ab.topk_counts, ba.topk_counts) and int(ab.topk_counts.sum()) == 2 * 2 * 2 * 4
    # (0, 1), (1, 0) and (2, 3) all have 2 tokens: the top paths are ordered by count, then by the path
    assert E.routing_summary(ab)["pathways"] == E.routing_summary(ba)["pathways"]
