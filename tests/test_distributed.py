"""Distributed training, as torchrun runs it (2 processes, gloo, CPU): data parallel trains what one process
trains, expert parallel what data parallel trains; rank 0 alone writes; a signal leaves a checkpoint."""
import json
import os
import shutil
import signal
import time

import pytest
import torch

import data as D
import parallel as P
import train
from conftest import launch, stop
ARCH = ["--llm.dim=64", "--llm.ffn_dim=128", "--llm.max_seq_len=128", "--vision.image_size=32",
        "--vision.width=64", "--vision.layers=2"]
COMMON = ["--batch_size=2", "--clip_batch_size=8", "--eval_batches=2", "--progress=false", "--routing_interval=1",
          "--log_interval=1", "--data.n_train=48", "--data.n_val=16", "--data.n_test=8", "--max_iters=3",
          "--global_batch=8", "--grad_clip=0.05"]  # one process: 4 micro-batches of 2 per step; two ranks: 2 each


def params(out, stage):
    return torch.load(os.path.join(out, f"stage{stage}", "ckpt.pt"), weights_only=True)


def assert_same_model(a, b, atol=1e-5):
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=atol, msg=k)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, torchrun):
    """`--stage all` (3 steps per stage, global batch 8) in one process and as 2 torchrun ranks."""
    root = tmp_path_factory.mktemp("distributed")
    data = str(root / "data")
    train.main(["--stage", "all", "--out_dir", str(root / "one"), "--data_dir", data, *ARCH, *COMMON])
    stdout = torchrun("train.py", "--stage", "all", "--out_dir", str(root / "two"), "--data_dir", data, *ARCH, *COMMON)
    return root, data, stdout


def test_two_ranks_train_what_one_process_trains(runs):
    root, _, _ = runs
    for stage in range(4):
        one, two = params(root / "one", stage), params(root / "two", stage)
        assert_same_model(one, two)  # fp32 rounding apart: the same micro-batches, the same averaged gradient
        m1, m2 = json.loads(one["meta"]), json.loads(two["meta"])
        assert (m1["world_size"], m2["world_size"], m1["global_batch"], m2["global_batch"]) == (1, 2, 8, 8)
        for k, v in m1["val"].items():  # validation is shared out over the ranks and all-reduced
            assert m2["val"][k] == pytest.approx(v, abs=1e-4), k


def test_only_rank_0_prints_and_writes(runs):
    root, _, stdout = runs
    for stage in range(4):
        one, two = root / "one" / f"stage{stage}", root / "two" / f"stage{stage}"
        assert sorted(os.listdir(one)) == sorted(os.listdir(two))  # one checkpoint, one log, nothing per rank
        log1 = [json.loads(line) for line in (one / "log.jsonl").read_text().splitlines()]
        log2 = [json.loads(line) for line in (two / "log.jsonl").read_text().splitlines()]
        assert [r["step"] for r in log1] == [r["step"] for r in log2]
        # the routing counts are the global batch's, summed over the ranks
        assert [r["routing"] for r in log1 if "routing" in r] == [r["routing"] for r in log2 if "routing" in r]
    assert stdout.count("stage 3: done") == 1 and stdout.count("2 processes (gloo)") == 4


def test_expert_parallel_trains_what_data_parallel_trains_and_resumes_anywhere(runs, tmp_path, torchrun):
    root, data, _ = runs
    for name in ("ep", "stopped", "four"):
        shutil.copytree(root / "two" / "stage2", tmp_path / name / "stage2")
    torchrun("train.py", "--stage", "3", "--ep_size=2", "--out_dir", str(tmp_path / "ep"), "--data_dir", data, *COMMON)
    dp, ep = params(root / "two", 3), params(tmp_path / "ep", 3)
    assert_same_model(dp, ep)  # the checkpoint holds whole experts, gathered from both ranks
    for i, state in dp["optimizer"]["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(ep["optimizer"]["state"][i][key], value, rtol=0, atol=1e-6)
    # 4 ranks, 2 expert-parallel groups of 2: each expert shard's gradient is also averaged over its 2 holders
    torchrun("train.py", "--stage", "3", "--ep_size=2", "--out_dir", str(tmp_path / "four"), "--data_dir", data,
             *COMMON, nproc=4)
    assert_same_model(dp, params(tmp_path / "four", 3))
    # stopped after 1 step with experts spread over 2 ranks, resumed there for 1 more (each rank slices the whole
    # experts' optimizer state), then in 1 process: the same model as the uninterrupted run
    for resume in ([], ["--resume"]):
        torchrun("train.py", "--stage", "3", "--ep_size=2", "--stop_after=1", *resume, "--out_dir",
                 str(tmp_path / "stopped"), "--data_dir", data, *COMMON)
    assert json.loads(params(tmp_path / "stopped", 3)["meta"])["step"] == 2
    train.main(["--stage", "3", "--resume", "--out_dir", str(tmp_path / "stopped"), "--data_dir", data, *COMMON])
    assert_same_model(ep, params(tmp_path / "stopped", 3))


def test_text_only_and_unreadable_batches_on_one_rank_neither_hang_nor_change_training(runs, tmp_path, torchrun):
    """A text-only micro-batch leaves the projector without a gradient, and in stage III (frozen LLM) its tokens
    need none: DDP must still all-reduce, and expert parallelism must still exchange them in the backward. A
    micro-batch whose image is unreadable is skipped by one process; a rank runs a stand-in at weight 0 instead,
    in training and in validation, so that the other rank is not left waiting."""
    root, data, _ = runs
    pictured = [s for s in D.read_json(os.path.join(data, "instruct_train.json")) if s.get("image")][:10]
    samples = [{"id": f"text{i}", "conversations": [dict(turn, value=turn["value"].replace("<image>", "").strip())
                                                    for turn in s["conversations"]]} for i, s in enumerate(pictured)]
    # 10 micro-batches of 1 sample, 5 steps of 2 ranks: one epoch. Step s of stage N reads positions 2s (rank 0)
    # and 2s + 1 (rank 1) of the epoch's permutation (data.Batches, seed 1337 + N). Put the one readable image
    # where its step partner is text-only in stages II and III, and a corrupt image anywhere else.
    def partner(stage, i):
        order = D.Batches(list(range(10)), 1, 32, 0, seed=1337 + stage).epoch_order(0).tolist()
        return order[order.index(i) ^ 1]
    image = 0
    corrupt = next(c for c in range(1, 10) if c not in (partner(2, image), partner(3, image)))
    (tmp_path / "corrupt.png").write_bytes(b"not a png")
    samples[image] = pictured[image]
    samples[corrupt] = dict(pictured[corrupt], image=str(tmp_path / "corrupt.png"))
    D.write_json(str(tmp_path / "mixed.json"), samples)
    user = ["--data_path", str(tmp_path / "mixed.json"), "--val_data_path", str(tmp_path / "mixed.json"),
            "--image_folder", data, "--batch_size=1", "--global_batch=2", "--max_iters=5", "--eval_batches=10",
            "--progress=false"]
    for name in ("one", "two"):
        shutil.copytree(root / "one" / "stage1", tmp_path / name / "stage1")
    out = []
    for stage, spread in ((2, []), (3, ["--ep_size=2"])):
        train.main(["--stage", str(stage), "--out_dir", str(tmp_path / "one"), *user])
        out.append(torchrun("train.py", "--stage", str(stage), *spread, "--out_dir", str(tmp_path / "two"), *user,
                            timeout=120))
        one, two = params(tmp_path / "one", stage), params(tmp_path / "two", stage)
        assert_same_model(one, two)
        m1, m2 = json.loads(one["meta"]), json.loads(two["meta"])
        assert m1["val"].keys() == m2["val"].keys() and "val_ce" in m1["val"]
        for k, v in m1["val"].items():
            assert m2["val"][k] == pytest.approx(v, abs=1e-4), k
        assert f"(rank {corrupt % 2}): " in out[-1] and "batch skipped" in out[-1]  # the stand-in ran
    # CuMo's experts sit in the ViT and the projector. Spread over the ranks, they exchange patches in every
    # forward: a rank whose batch has no image runs them on none, so the other is not left waiting
    for name in ("one", "two"):
        shutil.copytree(tmp_path / name / "stage2", tmp_path / f"cumo_{name}" / "stage2")
    train.main(["--stage", "3", "--recipe=cumo", "--out_dir", str(tmp_path / "cumo_one"), *user])
    torchrun("train.py", "--stage", "3", "--recipe=cumo", "--ep_size=2", "--out_dir", str(tmp_path / "cumo_two"),
             *user, timeout=120)
    one, two = params(tmp_path / "cumo_one", 3), params(tmp_path / "cumo_two", 3)
    assert any(".mlp.experts." in k for k in one["model"]) and any("projector.experts." in k for k in one["model"])
    assert_same_model(one, two)


def test_expert_parallel_layer_equals_the_whole_layer(torchrun):
    """Outputs and every gradient, with drops, k = 1 and 2, SwiGLU and GELU experts, and an expert that gets
    no tokens from one rank (tests/distributed_worker.py asserts, on each rank)."""
    out = torchrun("tests/distributed_worker.py", "expert_parallel_layer", timeout=120)
    assert "rank 0: ok" in out and "rank 1: ok" in out


def test_a_signal_to_torchrun_checkpoints_the_step_and_resume_goes_on(runs, tmp_path):
    """SIGTERM to torchrun (a scheduler's preemption) reaches every rank: they agree on the step to stop at,
    write one checkpoint and exit; --resume continues from it, here in one process."""
    root, data, _ = runs
    shutil.copytree(root / "one" / "stage1", tmp_path / "stage1")
    endless = ["--stage", "2", "--stage2_iters=100000", "--eval_interval=100000", "--ckpt_interval=100000",
               "--out_dir", str(tmp_path), "--data_dir", data, *[a for a in COMMON if "max_iters" not in a]]
    proc = launch("train.py", *endless, shutdown_timeout=60)
    try:
        log = tmp_path / "stage2" / "log.jsonl"
        deadline = time.time() + 120
        while time.time() < deadline and (not log.exists() or log.read_text().count('"lr"') < 2):
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        stop(proc)
    assert proc.returncode != 0 and err.count("stopped by a signal") == 1  # said once, by rank 0
    meta = json.loads(params(tmp_path, 2)["meta"])
    assert meta["step"] >= 2 and not meta["done"]  # the checkpoint of the step it stopped at
    train.main([*endless, "--resume", "--stop_after=1"])
    assert json.loads(params(tmp_path, 2)["meta"])["step"] == meta["step"] + 1


def test_impossible_distributed_settings_are_one_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="--ep_size=2 needs that many processes"):
        train.main(["--stage", "3", "--ep_size=2", "--out_dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="global_batch=10 is not a multiple of --batch_size=4"):
        train.main(["--stage", "3", "--global_batch=10", "--batch_size=4", "--out_dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="give it or --grad_accum, not both"):
        train.main(["--stage", "3", "--global_batch=16", "--grad_accum=2", "--out_dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="--ep_size=0 must be at least 1"):
        train.main(["--stage", "3", "--ep_size=0", "--out_dir", str(tmp_path)])


def test_a_step_without_images_leaves_the_projector_alone(runs, tmp_path):
    """A text-only step gives the projector a zero gradient only to keep DDP's ranks in step; the step then
    drops it, so that AdamW skips the projector (momentum would otherwise move it on text)."""
    root, data, _ = runs
    pictured = [s for s in D.read_json(os.path.join(data, "instruct_train.json")) if s.get("image")][:4]
    samples = [{"id": f"text{i}", "conversations": [dict(turn, value=turn["value"].replace("<image>", "").strip())
                                                    for turn in s["conversations"]]} for i, s in enumerate(pictured)]
    first = D.Batches(list(range(4)), 1, 32, 0, seed=1337 + 2).epoch_order(0)[0].item()  # step 0's sample
    samples[first] = pictured[first]  # the only image: in step 0, and never again
    D.write_json(str(tmp_path / "once.json"), samples)
    shutil.copytree(root / "one" / "stage1", tmp_path / "stage1")
    user = ["--stage", "2", "--out_dir", str(tmp_path), "--data_path", str(tmp_path / "once.json"), "--image_folder",
            data, "--batch_size=1", "--global_batch=1", "--max_iters=4", "--progress=false"]
    train.main([*user, "--stop_after=1"])
    after_image = params(tmp_path, 2)["model"]
    train.main([*user, "--resume"])
    final = params(tmp_path, 2)["model"]
    projector = [k for k in final if k.startswith("projector.")]
    assert projector and all(torch.equal(final[k], after_image[k]) for k in projector)
    assert not torch.equal(final["llm.tok_emb.weight"], after_image["llm.tok_emb.weight"])  # the LLM trained on


def test_in_one_process_the_runtime_is_the_obvious_thing():
    """parallel.py's calls cost nothing in one process, so train.py's loop reads the same for 1 and N ranks."""
    rt = P.compute_init("cpu")
    assert (rt.rank, rt.world, rt.distributed, rt.device) == (0, 1, False, torch.device("cpu"))
    assert rt.sum([1.5, 2]) == [1.5, 2] and rt.gather("x") == ["x"] and rt.mine([1, 2, 3]) == [1, 2, 3]
    assert rt.first(lambda a: a + 1, 1) == 2
    model = torch.nn.Linear(2, 2)
    assert P.data_parallel(model, rt) is model and P.whole_model_copy(model) is model
    assert [P.micro_index(step, micro, 3, rt) for step in range(2) for micro in range(3)] == list(range(6))
    with P.no_sync(model, last=False, rt=rt):
        pass


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_asking_for_cuda_without_a_gpu_is_one_sentence(tmp_path):
    with pytest.raises(SystemExit, match="--device=cuda but this machine has no CUDA GPU; use --device=cpu"):
        train.main(["--stage", "3", "--device=cuda", "--out_dir", str(tmp_path)])
