"""train.py: the stages end to end, what each stage trains, exact resume, checkpoints, the command line."""
import json
import os
import re
import shutil

import pytest
import torch

import data as D
import train
from model import PRESETS, VLM, VLMConfig
from moe import MoEConfig

DATA = ["--data.n_train=48", "--data.n_val=16", "--data.n_test=8"]
SMALLER = ["--llm.dim=64", "--llm.ffn_dim=128", "--llm.max_seq_len=128", "--vision.image_size=32",
           "--vision.width=64", "--vision.layers=2"]  # 16 image tokens: seconds per stage
FAST = ["--batch_size=4", "--clip_batch_size=8", "--eval_batches=1", "--progress=false", "--routing_interval=1",
        "--log_interval=1", *DATA]
ARCH = SMALLER  # architecture options go to stage 0 only


def run(out, *args, data_dir):
    arch = ARCH if ("--stage", "0") == args[:2] or "all" in args else []
    return train.main(["--out_dir", str(out), "--data_dir", data_dir, *FAST, *arch, *args])


def load_state(out, stage):
    return torch.load(os.path.join(out, f"stage{stage}", "ckpt.pt"), weights_only=True)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """One tiny `--stage all` run (2 steps per stage) that the tests below read or continue from."""
    root = tmp_path_factory.mktemp("pipeline")
    data_dir = str(root / "data")
    summary = run(root / "out", "--stage", "all", "--max_iters=2", data_dir=data_dir)
    return root / "out", data_dir, summary


def changed(before, after):
    return {k for k in before if not torch.equal(before[k], after[k])}


def test_stage_all_writes_every_stage_and_upcycling_preserves_the_model(pipeline):
    out, _, summary = pipeline
    assert [m["stage"] for m in summary] == [0, 1, 2, 3] and all(m["done"] and m["step"] == 2 for m in summary)
    for stage in range(4):
        for name in ("ckpt.pt", "meta.json", "log.jsonl", D.BUILTIN_TOKENIZER_FILE):
            assert os.path.isfile(out / f"stage{stage}" / name)
    meta3 = summary[3]
    assert meta3["model_config"]["llm"]["moe_layers"] == "sparse"
    step0 = json.loads((out / "stage3" / "log.jsonl").read_text().splitlines()[0])
    assert step0["step"] == 0
    # stage III at step 0 computes what stage II ended with: the upcycled layers equal the dense FFNs
    assert step0["val_ce"] == pytest.approx(meta3["stage2_final_val_ce"], abs=1e-5)
    assert step0["val_aux"] > 0


def test_stage3_experts_start_as_copies_of_the_dense_ffn(pipeline, tmp_path):
    out, data_dir, _ = pipeline
    shutil.copytree(out / "stage2", tmp_path / "stage2")
    run(tmp_path, "--stage", "3", "--max_iters=1", "--stage3_lr=0", "--train_projector_stage3=false",
        data_dir=data_dir)  # lr 0: the checkpoint holds the model as upcycled
    dense, moe = load_state(tmp_path, 2)["model"], load_state(tmp_path, 3)["model"]
    moe_keys = [k for k in moe if ".experts." in k]
    assert {k.split(".")[2] for k in moe_keys} == {"0", "2"}  # `sparse`: blocks 0 and 2 of 4
    for k in moe_keys:
        block, name = k.split(".")[2], k.split(".")[-1]
        ffn = dense[f"llm.blocks.{block}.ffn.{name}.weight"]
        assert all(torch.equal(expert, ffn) for expert in moe[k])
    assert all(torch.equal(moe[k], dense[k]) for k in dense if k in moe)  # everything else unchanged


def initial_state(stage, out):
    """The model a stage starts from, rebuilt the way setup_stage builds it (same seed, same order)."""
    meta = json.loads((out / f"stage{stage}" / "meta.json").read_text())
    torch.manual_seed(meta["train_config"]["seed"] + stage)
    if stage == 0:
        return VLM(VLMConfig.from_dict(meta["model_config"])).state_dict()
    prev = json.loads((out / f"stage{stage - 1}" / "meta.json").read_text())
    vlm = VLM(VLMConfig.from_dict(prev["model_config"]))
    vlm.load_state_dict(load_state(out, stage - 1)["model"])
    if stage == 3:
        t, config = meta["train_config"], VLMConfig.from_dict(meta["model_config"])
        vlm.upcycle_to_moe(t["moe_layers"], config.vision.moe if t["vision_moe_layers"] else config.llm.moe,
                           t["vision_moe_layers"], t["projector_moe"])
        if t["lora_targets"] or t["mole_layers"]:
            vlm.add_lora(t["lora_targets"], t["mole_layers"], config.llm.moe, t["lora_rank"], t["lora_alpha"])
    if stage == 4:
        t = meta["train_config"]
        vlm.add_lora(t["lora_targets"] or "attention,mlp", "", vlm.config.llm.moe, t["lora_rank"], t["lora_alpha"])
    return vlm.state_dict()


@pytest.mark.parametrize("stage, extra, trained", [
    # captioning (the default) reads the selected layer (-2): the last block and the final norm are not trained
    (0, [], r"llm\.|vision\.(patch_embed|norm_pre|blocks\.0)\.|vision\.(cls|pos)"),  # the projector waits for stage I
    (0, ["--stage0_objective=contrastive"], r"(vision|llm)\."),
    (1, [], r"(projector|llm)\."),  # the LLM trains in stage I by default (a departure from MoE-LLaVA)
    (1, ["--stage1_train_llm=false"], r"projector\."),
    (2, [], r"(llm|projector)\."),
    (2, ["--stage2_train_vit=true"], r"(llm|projector)\.|vision\.(patch_embed|norm_pre|blocks\.0)\.|vision\.(cls|pos)"),
    (3, [], r"projector\.|llm\.blocks\.\d+\.ffn\.(experts|router)"),
    (3, ["--train_projector_stage3=false"], r"llm\.blocks\.\d+\.ffn\.(experts|router)"),
    (3, ["--recipe=cumo"], r"(llm|projector)\.|vision\.(patch_embed|norm_pre|blocks\.0)\.|vision\.(cls|pos)"),
    # LLaVA-MoLE: LoRA on the attention projections, LoRA experts and routers in every FFN; nothing else
    (3, ["--recipe=mole"], r"llm\.blocks\.\d\.(attn\.(qkv|o_proj)\.(A|B)|ffn\.(router\.|experts\.\w+_(A|B)))"),
    (3, ["--recipe=mole", "--mole_layers=", "--lora_targets=attention,mlp"],
     r"llm\.blocks\.\d\.(attn\.(qkv|o_proj)|ffn\.(gate|up|down)_proj)\.(A|B)"),  # plain LoRA
])
def test_each_stage_trains_exactly_its_parameters(pipeline, tmp_path, stage, extra, trained):
    out, data_dir, _ = pipeline
    if stage > 0:
        shutil.copytree(out / f"stage{stage - 1}", tmp_path / f"stage{stage - 1}")
    run(tmp_path, "--stage", str(stage), "--max_iters=2", *extra, data_dir=data_dir)
    before, after = initial_state(stage, tmp_path), load_state(tmp_path, stage)["model"]
    assert before.keys() == after.keys()
    moved = changed(before, after)
    for k in after:
        should = re.match(trained, k) is not None
        assert (k in moved) == should, f"stage {stage}: {k} {'did not change' if should else 'changed'}"


# stage III with router noise: then the restored RNG state matters too
@pytest.mark.parametrize("stage, extra", [(0, ["--stage0_objective=both"]), (2, ["--grad_accum=2"]),
                                          (3, ["--moe.router_noise=0.5"]), (3, ["--recipe=cumo"]),
                                          (3, ["--moe.bias_update_rate=0.01", "--moe.shared_expert=true"]),
                                          (3, ["--recipe=mole", "--lora_dropout=0.1"])])
def test_resume_after_k_steps_is_bit_identical(pipeline, tmp_path, stage, extra):
    out, data_dir, _ = pipeline
    for name in ("straight", "resumed"):
        if stage > 0:
            shutil.copytree(out / f"stage{stage - 1}", tmp_path / name / f"stage{stage - 1}")
    args = ["--stage", str(stage), f"--stage{stage}_iters=5", "--ckpt_interval=100", *extra]
    run(tmp_path / "straight", *args, data_dir=data_dir)
    run(tmp_path / "resumed", *args, "--stop_after=2", data_dir=data_dir)
    assert json.loads(load_state(tmp_path / "resumed", stage)["meta"])["step"] == 2
    run(tmp_path / "resumed", *args, "--resume", data_dir=data_dir)
    a, b = load_state(tmp_path / "straight", stage), load_state(tmp_path / "resumed", stage)
    for key in ("model", "head") if stage == 0 else ("model",):
        assert a[key].keys() == b[key].keys()
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    if "--moe.bias_update_rate=0.01" in extra:  # the choice biases moved, and were saved and restored
        biases = [v for k, v in a["model"].items() if k.endswith("balance_bias.bias")]
        assert len(biases) == 2 and all(v.abs().sum() > 0 for v in biases)
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    log = lambda p: [json.loads(x) for x in (p / f"stage{stage}" / "log.jsonl").read_text().splitlines()]  # noqa: E731
    strip = lambda records: [{k: v for k, v in r.items() if k not in ("tok_per_s", "mfu")}  # noqa: E731
                             for r in records]  # (the speed is the machine's, not the run's)
    assert strip(log(tmp_path / "straight")) == strip(log(tmp_path / "resumed"))  # the same losses, step by step


def test_resuming_stage0_with_another_objective_is_one_clear_error(pipeline, tmp_path):
    out, data_dir, _ = pipeline
    shutil.copytree(out / "stage0", tmp_path / "stage0")
    with pytest.raises(SystemExit, match="stage0_objective=caption; resume with the same value"):
        run(tmp_path, "--stage", "0", "--resume", "--stage0_objective=both", data_dir=data_dir)


def test_resume_with_different_batches_is_an_error(pipeline, tmp_path):
    out, data_dir, _ = pipeline
    shutil.copytree(out / "stage1", tmp_path / "stage1")
    run(tmp_path, "--stage", "2", "--stage2_iters=4", "--stop_after=1", data_dir=data_dir)
    with pytest.raises(SystemExit, match="was trained with batch_size=4, global_batch=4; resume with the same values"):
        run(tmp_path, "--stage", "2", "--stage2_iters=4", "--resume", "--batch_size=2", data_dir=data_dir)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(pipeline, tmp_path, monkeypatch):
    out, data_dir, _ = pipeline
    shutil.copytree(out / "stage1", tmp_path / "stage1")
    real = train.vlm_loss
    calls = []

    def poisoned(vlm, batch, device):
        losses, routing = real(vlm, batch, device)
        calls.append(vlm.training)
        if sum(calls) == 3:  # the third training step
            losses["loss"] = losses["loss"] * float("nan")
        return losses, routing

    monkeypatch.setattr(train, "vlm_loss", poisoned)
    with pytest.raises(SystemExit, match="loss became nan at step 2.*still holds the last good state"):
        run(tmp_path, "--stage", "2", "--stage2_iters=5", "--ckpt_interval=1", data_dir=data_dir)
    state = load_state(tmp_path, 2)
    meta = json.loads(state["meta"])
    assert meta["step"] == 2 and not meta["done"]
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_stage3_without_stage2_names_the_path_and_the_command(tmp_path, pipeline):
    _, data_dir, _ = pipeline
    with pytest.raises(SystemExit, match=r"stage2[/\\]ckpt.pt does not exist: run `python train.py --stage 2"):
        run(tmp_path, "--stage", "3", data_dir=data_dir)


@pytest.mark.parametrize("args, message", [
    (["--stage", "2", "--no_such_option=1"], "unrecognized arguments: --no_such_option=1"),
    (["--stage", "2", "--batch_size=many"], "argument --batch_size: invalid int value: 'many'"),
    (["--stage", "2", "--resume=perhaps"], "expected true or false"),
    (["--stage", "5"], "invalid choice: '5'"),
    (["--stage", "2", "--moe.top_kk=1"], "unrecognized arguments"),
])
def test_command_line_errors(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args(args)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_command_line_sets_nested_fields_with_types():
    stages, config, nested = train.parse_args(["--stage", "all", "--batch_size=3", "--moe.top_k", "1",
                                               "--moe.capacity_factor=2", "--llm.dim=64", "--progress=no"])
    assert stages == [0, 1, 2, 3] and config.batch_size == 3 and config.progress is False
    assert nested["moe"] == {"top_k": 1, "capacity_factor": 2.0} and nested["llm"] == {"dim": 64}
    with pytest.raises(SystemExit, match="--preset=huge is not one of"):
        train.parse_args(["--stage", "1", "--preset=huge"])


def test_architecture_options_after_stage0_are_an_error(pipeline, tmp_path):
    out, data_dir, _ = pipeline
    shutil.copytree(out / "stage1", tmp_path / "stage1")
    with pytest.raises(SystemExit, match="shape the model at stage 0 only"):
        run(tmp_path, "--stage", "2", "--max_iters=1", "--llm.dim=96", data_dir=data_dir)


def test_stage3_log_counts_every_real_token_k_times(pipeline):
    out, data_dir, _ = pipeline
    records = [json.loads(x) for x in (out / "stage3" / "log.jsonl").read_text().splitlines()]
    first = next(r for r in records if "routing" in r)
    assert first["step"] == 1 and [layer["layer"] for layer in first["routing"]] == [0, 2]
    # rebuild the batch of step 1 the way train.py does, and count its real tokens
    tok = D.load_tokenizer("builtin", str(out / "stage3"))
    examples = D.load_examples(os.path.join(data_dir, "instruct_train.json"), data_dir, tok, "chat", 16, 128)
    batch = D.Batches(examples, 4, 32, tok.eos_id, seed=1337 + 3)[0]
    n_image = int((batch.input_ids == D.IMAGE_TOKEN_INDEX).sum())
    n_text = int(batch.attention_mask.sum()) - n_image
    for layer in first["routing"]:
        (text, image), (top1_text, top1_image) = layer["topk_text_image"], layer["top1_text_image"]
        assert (sum(text), sum(image)) == (2 * n_text, 2 * n_image)  # k = 2 choices per real token, no padding
        assert (sum(top1_text), sum(top1_image)) == (n_text, n_image)


def test_mfu_counts_the_model_flops_of_each_part_and_is_logged(pipeline):
    """Stage II (ViT frozen, projector and LLM trained): the ViT forward only (2 per parameter per token), the
    projector and LLM forward and backward (6); attention adds 4 x layers x width x context per token forward,
    tripled where gradients flow. Stage III of MoE-LLaVA: an expert's parameters count k / E, and only the trained
    ones (experts, routers, projector) count their weight gradients."""
    vlm = VLM(PRESETS["tiny"])
    train.set_trainable(2, vlm, train.TrainConfig())
    parts = train.flop_model(vlm)
    vc, lc = vlm.config.vision, vlm.config.llm
    vit = sum(p.numel() for i in range(vc.layers - 1) for p in vlm.vision.blocks[i].parameters())  # (select -2)
    llm = sum(p.numel() for p in vlm.llm.parameters())
    assert parts["vision"] == (vit, 0, False, (vc.layers - 1) * vc.width)
    assert parts["llm"] == (llm, llm, True, lc.n_layer * lc.dim) and parts["projector"][2:] == (True, 0)
    P = vlm.num_image_tokens
    batch = D.Batch(input_ids=torch.zeros(2, 100, dtype=torch.long), labels=None,
                    attention_mask=torch.arange(100).expand(2, 100) < torch.tensor([[100], [60]]),
                    images=torch.zeros(2, 3, 64, 64))
    expected = (2 * (P + 1) * (2 * vit + 4 * (vc.layers - 1) * vc.width * (P + 1)) +  # 2 images, 65 tokens each
                2 * P * 6 * parts["projector"][0] +
                160 * (6 * llm + 3 * 4 * lc.n_layer * lc.dim * 80))  # 160 real tokens, 80 per sequence
    assert train.batch_flops(parts, batch, P) == pytest.approx(expected)
    vlm.upcycle_to_moe("sparse", MoEConfig())  # 4 experts, top-2: half of each MoE layer's experts run
    train.set_trainable(3, vlm, train.TrainConfig())
    experts = sum(p.numel() for b in vlm.llm.blocks if b.is_moe for p in b.ffn.experts.parameters())
    routers = sum(p.numel() for b in vlm.llm.blocks if b.is_moe for p in b.ffn.router.parameters())
    total = sum(p.numel() for p in vlm.llm.parameters())
    assert train.flop_model(vlm)["llm"][:3] == (total - experts / 2, routers + experts / 2, True)
    out, _, _ = pipeline
    for stage in (1, 2, 3):
        steps = [json.loads(x) for x in (out / f"stage{stage}" / "log.jsonl").read_text().splitlines()]
        assert all(r["mfu"] > 0 for r in steps if "lr" in r), stage
        assert json.loads((out / f"stage{stage}" / "meta.json").read_text())["peak_flops"] > 0


def test_set_trainable_marks_each_stage_s_parameters():
    vlm = VLM(PRESETS["tiny"])
    for stage, trained, llm_in_1 in ((0, ("vision.", "llm."), True), (1, ("projector.", "llm."), True),
                                     (1, ("projector.",), False), (2, ("llm.", "projector."), True)):
        train.set_trainable(stage, vlm, train.TrainConfig(stage0_objective="both", stage1_train_llm=llm_in_1))
        for name, p in vlm.named_parameters():
            assert p.requires_grad == name.startswith(trained), (stage, name)
    vlm.upcycle_to_moe("sparse", MoEConfig())
    for projector in (True, False):
        train.set_trainable(3, vlm, train.TrainConfig(train_projector_stage3=projector))
        for name, p in vlm.named_parameters():
            moe = ".ffn.experts." in name or ".ffn.router." in name
            assert p.requires_grad == (moe or (projector and name.startswith("projector."))), name


def test_stage3_of_cumo_trains_everything_the_vlm_runs():
    vlm = VLM(PRESETS["tiny"])
    vlm.upcycle_to_moe("", MoEConfig(), vision_moe_layers="all", projector_moe=True)
    train.set_trainable(3, vlm, train.TrainConfig(stage3_train="all"))
    unused = ("vision.blocks.3.", "vision.norm.")  # after the selected layer: they feed nothing
    for name, p in vlm.named_parameters():
        assert p.requires_grad == (not name.startswith(unused)), name
    train.set_trainable(3, vlm, train.TrainConfig(train_projector_stage3=False))  # "moe": the experts, anywhere
    for name, p in vlm.named_parameters():
        assert p.requires_grad == ("experts." in name or "router." in name), name  # ViT blocks', the projector's


def test_a_recipe_sets_its_defaults_the_command_line_overrides_them_and_later_stages_keep_it(tmp_path):
    _, config, nested = train.parse_args(["--stage", "all", "--recipe=cumo", "--moe_layers=sparse",
                                          "--moe.aux_loss_coef=0.05"])
    assert (config.recipe, config.vision_moe_layers, config.projector_moe, config.stage3_train) == \
        ("cumo", "all", True, "all")
    assert config.moe_layers == "sparse" and config.stage2_train_vit  # mixed: experts in the ViT and the LLM
    assert nested["moe"] == {"aux_loss_coef": 0.05, "z_loss_coef": 0.01, "drop_tokens": False,
                             "balance_per_sample": True, "aux_over_layers": "mean"}
    _, default, nested = train.parse_args(["--stage", "3"])
    assert (default.recipe, default.moe_layers, default.vision_moe_layers, nested["moe"]) == ("moe-llava", "sparse",
                                                                                             "", {})
    (tmp_path / "stage2").mkdir()
    (tmp_path / "stage2" / "meta.json").write_text(json.dumps({"train_config": {"preset": "tiny", "recipe": "cumo"}}))
    _, kept, _ = train.parse_args(["--stage", "3", "--out_dir", str(tmp_path)])
    assert kept.recipe == "cumo" and kept.vision_moe_layers == "all"
    _, mole, nested = train.parse_args(["--stage", "3", "--recipe=mole"])
    assert (mole.mole_layers, mole.lora_targets, mole.stage3_train, mole.moe_layers) == ("all", "attention", "lora", "")
    assert nested["moe"] == {"num_experts": 3, "top_k": 1, "drop_tokens": False, "aux_over_layers": "pooled"}
    with pytest.raises(SystemExit, match="--recipe=moe is not one of"):
        train.parse_args(["--stage", "3", "--recipe=moe"])
    with pytest.raises(SystemExit, match="--stage3_train=some must be moe, all or lora"):
        train.parse_args(["--stage", "3", "--stage3_train=some"])


def test_cumo_stage3_co_upcycles_the_vision_side_and_logs_each_loss(pipeline, tmp_path):
    out, data_dir, _ = pipeline
    shutil.copytree(out / "stage2", tmp_path / "stage2")
    run(tmp_path, "--stage", "3", "--recipe=cumo", "--max_iters=2", data_dir=data_dir)
    meta = json.loads((tmp_path / "stage3" / "meta.json").read_text())
    model = meta["model_config"]
    assert (model["llm"]["moe_layers"], model["vision"]["moe_layers"]) == ("", "all")
    assert model["projector_moe"]["aux_loss_coef"] == 0.1 and model["vision"]["moe"]["balance_per_sample"]
    log = [json.loads(line) for line in (tmp_path / "stage3" / "log.jsonl").read_text().splitlines()]
    # at step 0 the co-upcycled ViT and projector compute what stage II's dense ones did
    assert log[0]["val_ce"] == pytest.approx(meta["stage2_final_val_ce"], abs=1e-5)
    for name in ("aux_vision", "z_vision", "aux_projector", "z_projector"):
        assert log[0][f"val_{name}"] > 0 and any(name in r for r in log if "lr" in r), name
    routing = next(r for r in log if "routing" in r)["routing"]
    assert [(r["part"], r["layer"]) for r in routing] == [("vision", 0), ("projector", 0)]
    text, image = routing[0]["top1_text_image"]
    assert sum(image) > 0 and sum(text) == 0  # the ViT routes image tokens only


def test_the_long_preset_is_the_tiny_model_on_more_scenes_and_questions_in_its_own_data_folder():
    _, config, nested = train.parse_args(["--stage", "all", "--preset=long"])
    assert config.data_dir != train.TrainConfig().data_dir
    assert nested["data"] == {"extra_train": 20000, "train_questions": 12}
    assert config.stage2_iters > train.TrainConfig().stage2_iters
    assert train.PRESETS[train.PRESET_MODEL[config.preset]] == PRESETS["tiny"]
    _, _, nested = train.parse_args(["--stage", "all", "--preset=long", "--data.extra_train=5"])
    assert nested["data"] == {"extra_train": 5, "train_questions": 12}  # the command line wins


def test_moe_from_stage_2_upcycles_there_and_stage_3_goes_on_with_those_experts(pipeline, tmp_path):
    out, data_dir, _ = pipeline  # the ablation of MoE-Tuning: no dense stage II
    shutil.copytree(out / "stage1", tmp_path / "stage1")
    [two] = run(tmp_path, "--stage", "2", "--max_iters=2", "--moe_from_stage=2", "--moe.top_k=1", data_dir=data_dir)
    assert two["model_config"]["llm"]["moe_layers"] == "sparse" and two["model_config"]["llm"]["moe"]["top_k"] == 1
    log = [json.loads(line) for line in (tmp_path / "stage2" / "log.jsonl").read_text().splitlines()]
    assert any("routing" in r for r in log) and log[0]["val_aux"] > 0  # routed, and balanced, from stage II on
    experts = load_state(tmp_path, 2)["model"]["llm.blocks.0.ffn.experts.gate_proj"]
    assert not torch.equal(experts[0], experts[1])  # stage II trained the copies apart
    with pytest.raises(SystemExit, match="became an MoE in stage II"):
        run(tmp_path, "--stage", "3", "--max_iters=1", "--moe.top_k=2", data_dir=data_dir)
    [three] = run(tmp_path, "--stage", "3", "--max_iters=2", data_dir=data_dir)
    assert three["model_config"]["llm"] == two["model_config"]["llm"]
    assert three["val"]["val_ce"] > 0 and three["counts"]["trainable"] < three["counts"]["total"]
    with pytest.raises(SystemExit, match="--moe_from_stage=4 must be 3"):
        train.parse_args(["--stage", "2", "--moe_from_stage=4"])


def test_a_stage_that_trains_the_vit_gives_it_a_scaled_learning_rate(pipeline, tmp_path):
    out, data_dir, _ = pipeline
    shutil.copytree(out / "stage1", tmp_path / "stage1")
    run(tmp_path, "--stage", "2", "--max_iters=2", "--stage2_train_vit=true", "--vit_lr_scale=0.25", data_dir=data_dir)
    groups = load_state(tmp_path, 2)["optimizer"]["param_groups"]
    assert [g["lr_scale"] for g in groups] == [1.0, 0.25] and groups[1]["lr"] == 0.25 * groups[0]["lr"] > 0
    vit = VLM(VLMConfig.from_dict(json.loads(load_state(tmp_path, 2)["meta"])["model_config"])).vision
    assert len(groups[1]["params"]) == sum(1 for p in train.vision_in_use(vit) for _ in (
        p.parameters() if isinstance(p, torch.nn.Module) else [p]))


def test_a_validation_set_smaller_than_a_batch_is_one_short_batch(pipeline, tmp_path):
    _, data_dir, _ = pipeline  # 16 validation captions, batches of 24 (the contrastive loss needs 2 pairs or more)
    [meta] = run(tmp_path, "--stage", "0", "--max_iters=1", "--clip_batch_size=24", "--stage0_objective=both",
                 data_dir=data_dir)
    assert meta["done"] and meta["val"]["val_clip"] > 0 and meta["val"]["val_caption"] > 0


def test_user_data_with_bad_samples_trains_and_reports_them(pipeline, tmp_path, capsys):
    out, data_dir, _ = pipeline
    shutil.copytree(out / "stage1", tmp_path / "stage1")
    samples = D.read_json(os.path.join(data_dir, "instruct_train.json"))
    samples.append({"id": "gone", "image": "images/missing.png", "conversations": [
        {"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "A"}]})
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(samples))
    run(tmp_path, "--stage", "2", "--max_iters=1", f"--data_path={path}", f"--image_folder={data_dir}",
        data_dir=data_dir)
    captured = capsys.readouterr().out
    assert "skipped 1 of" in captured and "1 image file missing" in captured


def test_comma_separated_data_paths_are_trained_on_as_one_mixed_set(pipeline, tmp_path):
    out, data_dir, _ = pipeline
    files = [os.path.join(data_dir, f"{name}_train.json") for name in ("instruct", "arithmetic")]
    config = train.TrainConfig(data_dir=data_dir, data_path=",".join(files), val_data_path=files[1])
    vlm_config = VLMConfig.from_dict(json.loads((out / "stage2" / "meta.json").read_text())["model_config"])
    tok = D.load_tokenizer("builtin", data_dir)
    mixed = train.load_stage_data(2, config, tok, vlm_config, "train")
    assert len(mixed) == sum(len(D.read_json(f)) for f in files)
    assert len(train.load_stage_data(2, config, tok, vlm_config, "val")) == len(D.read_json(files[1]))
    shutil.copytree(out / "stage2", tmp_path / "stage2")
    [meta] = run(tmp_path, "--stage", "3", "--max_iters=1", f"--data_path={config.data_path}",
                 f"--val_data_path={config.data_path}", data_dir=data_dir)
    assert meta["done"] and meta["val"]["val_ce"] > 0


def test_a_folder_as_data_path_is_one_clear_error(pipeline, tmp_path):
    out, data_dir, _ = pipeline
    shutil.copytree(out / "stage1", tmp_path / "stage1")
    with pytest.raises(SystemExit, match="is a folder; expected a LLaVA-format JSON file"):
        run(tmp_path, "--stage", "2", "--max_iters=1", f"--data_path={tmp_path}", data_dir=data_dir)


def test_stage4_fine_tunes_the_moe_model_on_your_data_with_lora_alone(pipeline, tmp_path):
    """MoE-LLaVA's users asked for LoRA on an MoE model: stage 4 reads stage III, gives the attention and each
    expert its own LoRA adapter, and trains those alone on a LLaVA-format file; the routers stay as they are."""
    out, data_dir, _ = pipeline
    shutil.copytree(out / "stage3", tmp_path / "stage3")
    mine = os.path.join(data_dir, "instruct_val.json")  # stands in for a user's own file
    run(tmp_path, "--stage", "4", "--max_iters=2", "--data_path", mine, "--val_data_path", mine, "--image_folder",
        data_dir, data_dir=data_dir)
    before, after = initial_state(4, tmp_path), load_state(tmp_path, 4)["model"]
    assert before.keys() == after.keys()
    lora = r"llm\.blocks\.\d\.((attn\.(qkv|o_proj)|ffn\.(gate|up|down)_proj)\.(A|B)|ffn\.experts\.\w+_(A|B))$"
    moved = changed(before, after)
    assert moved and all(re.match(lora, k) for k in moved), sorted(moved)
    assert any(".ffn.experts.gate_proj_B" in k for k in moved)  # the experts' own adapters learned
    meta = json.loads((tmp_path / "stage4" / "meta.json").read_text())
    assert meta["model_config"]["llm"]["lora_targets"] == "attention,mlp" and meta["counts"]["trainable"] < \
        meta["counts"]["total"] / 5
