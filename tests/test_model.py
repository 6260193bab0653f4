"""The specification of model.py: the LLM (causality, rotary, KV cache, MoE placement) and the VLM."""
from dataclasses import asdict, replace

import pytest
import torch

from model import (IGNORE_INDEX, IMAGE_TOKEN_INDEX, LLM, PRESETS, VLM, LLMConfig, VLMConfig, apply_rotary,
                   merge_lora, moe_layer_indices, param_counts, rotary_tables)
from moe import LoRASwiGLUExperts, MoEConfig, SwiGLUExperts
from vision import ViTConfig

VOCAB = 97


def dropping_llm(seed=0, expert_std=0.2):
    """An MoE LLM (8 experts, top-1) with so little evaluation capacity (C = ceil(0.5 * S / 8)) that it drops."""
    model = llm(seed, moe_layers="dense",
                moe=MoEConfig(num_experts=8, top_k=1, eval_capacity_factor=0.5, min_capacity=0))
    with torch.no_grad():
        for block in model.blocks:
            block.ffn.experts.down_proj.normal_(std=expert_std)  # experts that matter
    return model


def llm(seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = LLMConfig(vocab_size=VOCAB, dim=32, n_layer=4, n_head=4, ffn_dim=64, max_seq_len=64, **overrides)
    return LLM(cfg).eval()


def vlm(seed=0, moe_layers="", vit_layers=2, **moe):
    torch.manual_seed(seed)
    cfg = VLMConfig(vision=ViTConfig(image_size=16, patch_size=8, width=16, layers=vit_layers, heads=2),
                    llm=LLMConfig(vocab_size=VOCAB, dim=32, n_layer=4, n_head=4, ffn_dim=64, max_seq_len=64,
                                  moe_layers=moe_layers, moe=MoEConfig(**moe)))
    return VLM(cfg)


def vlm_batch(n_text=(6, 9), seed=1):
    """Two samples: a few prompt tokens, 4 image placeholders (16 px / 8 px patches), then answer tokens."""
    torch.manual_seed(seed)
    rows, labels = [], []
    for n in n_text:
        prompt, answer = torch.randint(0, VOCAB, (3,)), torch.randint(0, VOCAB, (n,))
        ids = torch.cat([prompt[:1], torch.full((4,), IMAGE_TOKEN_INDEX), prompt[1:], answer])
        rows.append(ids)
        labels.append(torch.cat([torch.full((7,), IGNORE_INDEX), answer]))
    T = max(len(r) for r in rows)
    input_ids = torch.stack([torch.cat([r, torch.zeros(T - len(r), dtype=torch.long)]) for r in rows])
    label_ids = torch.stack([torch.cat([r, torch.full((T - len(r),), IGNORE_INDEX)]) for r in labels])
    mask = torch.stack([torch.arange(T) < len(r) for r in rows])
    return input_ids, torch.randn(2, 3, 16, 16), label_ids, mask


# ---------------------------------------------------------------------------------------------------------
# LLM


def test_moe_placement_modes_follow_moe_llava():
    assert moe_layer_indices("sparse", 6) == [0, 2, 4]
    assert moe_layer_indices("dense", 3) == [0, 1, 2]
    assert moe_layer_indices("first_half", 6) == [0, 1, 2]
    assert moe_layer_indices("second_half", 6) == [3, 4, 5]
    assert moe_layer_indices("1,3", 6) == [1, 3]
    assert moe_layer_indices("", 6) == []
    with pytest.raises(ValueError, match="moe_layers"):
        moe_layer_indices("every_third", 6)
    with pytest.raises(ValueError, match="0..5"):
        moe_layer_indices("2,6", 6)
    with pytest.raises(ValueError, match="at least one layer"):
        moe_layer_indices("first_half", 1)


def test_blocks_get_moe_ffns_where_placed():
    model = llm(moe_layers="sparse")
    assert [b.is_moe for b in model.blocks] == [True, False, True, False]


def test_attention_is_causal():
    model = llm(moe_layers="sparse", moe=MoEConfig(drop_tokens=False))
    ids = torch.randint(0, VOCAB, (2, 20))
    changed = ids.clone()
    changed[:, 12:] = (changed[:, 12:] + 1) % VOCAB  # change the future
    a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :12], b[:, :12])  # the past does not see it
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_rotary_scores_depend_only_on_relative_position():
    cos, sin = rotary_tables(32, 8, 10000.0)
    q, k = torch.randn(8), torch.randn(8)

    def score(i, j):
        rq = apply_rotary(q.view(1, 1, 1, 8), cos[i].view(1, 1, 1, 4), sin[i].view(1, 1, 1, 4))
        rk = apply_rotary(k.view(1, 1, 1, 8), cos[j].view(1, 1, 1, 4), sin[j].view(1, 1, 1, 4))
        return (rq * rk).sum()

    torch.testing.assert_close(score(5, 2), score(13, 10))
    assert not torch.allclose(score(5, 2), score(5, 4))


@pytest.mark.parametrize("moe_layers", ["", "sparse"])
def test_kv_cache_generation_equals_no_cache_generation(moe_layers):
    model = llm(moe_layers=moe_layers)
    prompt = torch.randint(0, VOCAB, (3, 7))
    greedy = model.generate(prompt, max_new_tokens=12)
    assert greedy.shape == (3, 12)
    assert torch.equal(greedy, model.generate(prompt, max_new_tokens=12, use_cache=False))
    sampled = [model.generate(prompt, max_new_tokens=12, temperature=1.0, top_k=5, use_cache=use_cache,
                              generator=torch.Generator().manual_seed(0)) for use_cache in (True, False)]
    assert torch.equal(*sampled)


@pytest.mark.parametrize("make", [lambda: llm(moe_layers="dense"), dropping_llm])
def test_cached_logits_equal_full_forward_logits_when_routing_dropless(make):
    model = make()
    ids = torch.randint(0, VOCAB, (2, 15))
    full = model(ids, dropless=True).logits
    cache = model.new_cache(2, 15)
    parts = [model(ids[:, :9], cache=cache, dropless=True).logits]
    parts += [model(ids[:, t:t + 1], cache=cache, dropless=True).logits for t in range(9, 15)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


def test_generation_is_exact_even_for_a_model_whose_eval_capacity_drops():
    for seed in range(4):
        model = dropping_llm(seed)
        ids = torch.randint(0, VOCAB, (2, 15))
        assert sum(s.dropped for s in model(ids).routing) > 0  # this model does drop at evaluation capacity

        sampled = [model.generate(ids, max_new_tokens=10, temperature=1.0, use_cache=use_cache,
                                  generator=torch.Generator().manual_seed(seed)) for use_cache in (True, False)]
        assert torch.equal(*sampled)  # sampling is sensitive to any change of the logits
        greedy = model.generate(ids, max_new_tokens=10)  # an answer does not depend on the rest of its batch
        assert torch.equal(greedy[1:], model.generate(ids[1:], max_new_tokens=10))


def test_generation_that_keeps_the_capacity_answers_differently_beside_other_prompts():
    """dropless=False (DeepSpeed's inference): the same prompt, alone or beside others, loses different
    assignments to the capacity, so its logits -- and here its answer -- change with the rest of its batch."""
    changed = 0
    for seed in range(4):
        model = dropping_llm(seed, expert_std=1.0)  # experts that decide the answer
        ids = torch.randint(0, VOCAB, (4, 15))
        alone = model.generate(ids[:1], max_new_tokens=10, dropless=False)
        beside = model.generate(ids, max_new_tokens=10, dropless=False)[:1]
        changed += not torch.equal(alone, beside)
        assert torch.equal(model.generate(ids[:1], max_new_tokens=10),  # dropless: the same either way
                           model.generate(ids, max_new_tokens=10)[:1])
    assert changed >= 2


def test_left_padded_batch_generates_what_each_prompt_generates_alone():
    model = llm(moe_layers="sparse")
    prompts = [torch.randint(0, VOCAB, (n,)) for n in (4, 9)]
    alone = [model.generate(p[None], max_new_tokens=8) for p in prompts]
    batch = torch.zeros(2, 9, dtype=torch.long)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    for i, p in enumerate(prompts):
        batch[i, 9 - len(p):], mask[i, 9 - len(p):] = p, True
    together = model.generate(batch, attention_mask=mask, max_new_tokens=8)
    assert torch.equal(together, torch.cat(alone))


def test_zero_new_tokens_gives_an_empty_answer():
    assert llm().generate(torch.zeros(3, 4, dtype=torch.long), max_new_tokens=0).shape == (3, 0)


def test_generation_stops_after_eos():
    model = llm()
    prompt = torch.randint(0, VOCAB, (1, 5))
    first = model.generate(prompt, max_new_tokens=1)[0, 0].item()
    out = model.generate(prompt, max_new_tokens=10, eos_id=first)
    assert out.tolist() == [[first]]


def test_sequence_longer_than_max_seq_len_is_rejected():
    with pytest.raises(ValueError, match="max_seq_len"):
        llm()(torch.zeros(1, 65, dtype=torch.long))


def test_upcycled_llm_computes_what_the_dense_llm_computed():
    model = llm()
    ids = torch.randint(0, VOCAB, (2, 20))
    before = model(ids).logits
    model.upcycle_to_moe("sparse", MoEConfig(drop_tokens=False))
    assert [b.is_moe for b in model.blocks] == [True, False, True, False]
    after = model(ids)
    torch.testing.assert_close(after.logits, before, atol=1e-5, rtol=1e-5)
    assert len(after.routing) == 2
    assert model.config.moe_layers == "sparse"
    assert LLMConfig().moe_layers == ""  # the shared default config is untouched
    with pytest.raises(ValueError, match="already have an MoE FFN"):
        model.upcycle_to_moe("dense", MoEConfig())
    assert [b.is_moe for b in model.blocks] == [True, False, True, False]  # nothing half-converted


def test_param_counts_count_only_k_of_e_experts_as_active():
    dense = param_counts(llm())
    model = llm()
    model.upcycle_to_moe("sparse", MoEConfig(num_experts=4, top_k=2))
    counts = param_counts(model)
    expert = 3 * 32 * 64  # one SwiGLU FFN: gate, up, down
    router = 4 * 32
    assert counts["total"] == dense["total"] + 2 * (3 * expert + router)  # 2 layers gain 3 experts and a router
    assert counts["active"] == dense["total"] + 2 * (expert + router)  # ... of which 1 extra expert is active
    model.tok_emb.weight.requires_grad_(False)
    assert param_counts(model)["trainable"] == counts["total"] - VOCAB * 32


def test_init_scales_residual_projections_down():
    model = llm()
    std = model.blocks[0].attn.o_proj.weight.std().item()
    assert std == pytest.approx(0.02 / (2 * 4) ** 0.5, rel=0.15)
    assert model.blocks[0].attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.15)
    assert torch.all(model.norm.weight == 1)


# ---------------------------------------------------------------------------------------------------------
# VLM


def test_image_features_replace_the_placeholder_positions():
    model = vlm()
    input_ids, images, _, _ = vlm_batch()
    embeds, image_mask, _ = model.embed(input_ids, images)
    features = model.projector(model.vision(images))  # (2, 4, 32)
    torch.testing.assert_close(embeds[image_mask].view(2, 4, -1), features)
    text = ~image_mask
    torch.testing.assert_close(embeds[text], model.llm.tok_emb(input_ids[text]))
    assert image_mask[:, 1:5].all() and image_mask.sum() == 8


def test_image_count_must_match_placeholders():
    model = vlm()
    input_ids, images, _, _ = vlm_batch()
    with pytest.raises(ValueError, match="image positions"):
        model(input_ids, images[:1])
    with pytest.raises(ValueError, match="image positions"):
        model(input_ids, None)
    split = input_ids.clone()  # 8 placeholders for 2 images, but 6 + 2: an image would straddle two rows
    split[0, 5:7] = IMAGE_TOKEN_INDEX
    split[1, 1:3] = 5
    with pytest.raises(ValueError, match="in one row"):
        model(split, images)


def test_loss_is_cross_entropy_plus_weighted_moe_losses():
    model = vlm(moe_layers="sparse", z_loss_coef=0.001)
    out = model(*vlm_batch())
    assert len(out.routing) == 2
    torch.testing.assert_close(out.aux_loss, out.routing[0].balance_loss + out.routing[1].balance_loss)
    torch.testing.assert_close(out.loss, out.ce_loss + 0.01 * out.aux_loss + 0.001 * out.z_loss)
    assert out.aux_loss > 0 and out.z_loss > 0


def cumo_vlm(seed=0, llm_moe=""):
    """A VLM with CuMo's MoE: both ViT blocks in use (3 layers, the second-to-last selected) and the projector."""
    model = vlm(seed, vit_layers=3)
    cumo = MoEConfig(aux_loss_coef=0.1, z_loss_coef=0.01, drop_tokens=False, balance_per_sample=True,
                     aux_over_layers="mean")
    model.upcycle_to_moe(llm_moe, cumo, vision_moe_layers="all", projector_moe=True)
    return model


def test_cumo_loss_weights_each_part_and_averages_over_the_vit_s_layers():
    model = cumo_vlm(llm_moe="sparse")
    assert model.moe_layer_names() == [("vision", 0), ("vision", 1), ("projector", 0), ("llm", 0), ("llm", 2)]
    out = model(*vlm_batch())
    vit_bal = (out.routing[0].balance_loss + out.routing[1].balance_loss) / 2
    vit_z = (out.routing[0].z_loss + out.routing[1].z_loss) / 2
    llm_bal = (out.routing[3].balance_loss + out.routing[4].balance_loss) / 2
    torch.testing.assert_close(out.part_losses["aux_vision"], vit_bal)
    torch.testing.assert_close(out.part_losses["z_vision"], vit_z)
    torch.testing.assert_close(out.part_losses["aux_projector"], out.routing[2].balance_loss)
    torch.testing.assert_close(out.part_losses["aux_llm"], llm_bal)
    aux = vit_bal + out.routing[2].balance_loss + llm_bal
    z = vit_z + out.routing[2].z_loss + (out.routing[3].z_loss + out.routing[4].z_loss) / 2
    torch.testing.assert_close(out.loss, out.ce_loss + 0.1 * aux + 0.01 * z)  # CuMo's eq. 5, part by part
    assert out.routing[0].expert_index.shape == (2, 5, 2) and out.routing[2].expert_index.shape == (2, 4, 2)


def test_co_upcycled_vlm_computes_what_the_dense_vlm_computed_and_its_config_round_trips():
    model = vlm(vit_layers=3)
    batch = vlm_batch()
    before = model(*batch).ce_loss
    model.upcycle_to_moe("", MoEConfig(drop_tokens=False), vision_moe_layers="all", projector_moe=True)
    assert [p for p, _ in model.moe_layer_names()] == ["vision", "vision", "projector"]
    torch.testing.assert_close(model(*batch).ce_loss, before, atol=1e-6, rtol=1e-6)  # CuMo's co-upcycling, fp32
    rebuilt = VLM(VLMConfig.from_dict(asdict(model.config)))  # as a checkpoint's metadata rebuilds it
    assert rebuilt.config == model.config
    rebuilt.load_state_dict(model.state_dict())


def test_a_batch_without_images_runs_no_vision_moe_and_says_so():
    model = cumo_vlm(llm_moe="sparse")
    ids = torch.randint(0, VOCAB, (2, 9))
    out = model(ids, None, ids.clone())
    assert out.routing[:3] == [None, None, None] and len(out.routing) == 5
    assert set(out.part_losses) == {"aux_llm", "z_llm"} and torch.isfinite(out.loss)


def test_lora_and_mole_start_at_the_base_model_and_plain_lora_merges_into_it():
    model = vlm()
    batch = vlm_batch()
    before = model(*batch).ce_loss
    mole = MoEConfig(num_experts=3, top_k=1, drop_tokens=False, aux_over_layers="pooled")
    model.add_lora("attention", "all", mole, rank=4, alpha=8.0)
    out = model(*batch)
    torch.testing.assert_close(out.ce_loss, before, atol=1e-6, rtol=1e-6)  # B = 0 everywhere: the base model
    assert [p for p, _ in model.moe_layer_names()] == ["llm"] * 4 and len(out.routing) == 4
    # LLaVA-MoLE's balancing loss pools the layers: E * sum_e (mean over layers of me_e) (mean of ce_e)
    me = sum(s.prob_mean for s in out.routing) / 4
    ce = sum(s.top1_share for s in out.routing) / 4
    torch.testing.assert_close(out.aux_loss, 3 * (me * ce).sum())
    assert all(int(s.top1_counts.sum()) == int(batch[3].sum()) for s in out.routing)  # every real token, once
    rebuilt = VLM(VLMConfig.from_dict(asdict(model.config)))
    rebuilt.load_state_dict(model.state_dict())
    # plain LoRA on attention and FFN, trained a little (B != 0), then merged: the same outputs, plain Linears
    plain = vlm()
    plain.add_lora("attention,mlp", "", MoEConfig(), rank=4, alpha=8.0)
    with torch.no_grad():
        for name, p in plain.named_parameters():
            if name.endswith(".B"):
                p.normal_(std=0.1)
    plain.eval()
    unmerged = plain(*batch).logits
    assert merge_lora(plain) == 4 * 5  # per block: qkv, o_proj, gate, up, down
    torch.testing.assert_close(plain(*batch).logits, unmerged, atol=1e-5, rtol=1e-5)
    assert not any(name.endswith((".A", ".B")) for name, _ in plain.named_parameters())
    assert merge_lora(model) == 4 * 2  # MoLE's FFN experts stay: which update applies depends on the token
    with pytest.raises(ValueError, match="cannot also be an MoE FFN"):
        LLMConfig(n_layer=2, moe_layers="dense", mole_layers="all")


def test_lora_on_an_moe_model_gives_each_expert_its_own_adapter_and_merges_into_the_experts():
    model = vlm(moe_layers="sparse", drop_tokens=False)
    batch = vlm_batch()
    model.eval()
    before = model(*batch).logits
    model.add_lora("attention,mlp", "", model.config.llm.moe, rank=4, alpha=8.0)
    experts = model.llm.blocks[0].ffn.experts
    assert isinstance(experts, LoRASwiGLUExperts) and not experts.shared and experts.gate_proj_A.shape[0] == 4
    torch.testing.assert_close(model(*batch).logits, before, atol=1e-6, rtol=1e-6)  # B = 0: the MoE model
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith((".B", "_B")):
                p.normal_(std=0.1)
    tuned = model(*batch).logits
    rebuilt = VLM(VLMConfig.from_dict(asdict(model.config)))
    rebuilt.load_state_dict(model.state_dict())
    assert merge_lora(model) == 4 * 2 + 2 * 3 + 2  # qkv and o_proj of 4 blocks, the dense FFNs' 3 matrices
    #                                                  (blocks 1, 3), and the expert stacks of blocks 0 and 2
    torch.testing.assert_close(model(*batch).logits, tuned, atol=1e-5, rtol=1e-5)
    assert isinstance(model.llm.blocks[0].ffn.experts, SwiGLUExperts)


def test_config_needs_room_for_text_after_the_image():
    with pytest.raises(ValueError, match="no room for text"):
        VLMConfig(vision=ViTConfig(image_size=64, patch_size=8), llm=LLMConfig(max_seq_len=64))


def test_dense_vlm_has_no_moe_terms_and_loss_equals_ce():
    out = vlm()(*vlm_batch())
    assert out.routing == [] and out.aux_loss.item() == 0
    torch.testing.assert_close(out.loss, out.ce_loss)


def test_image_and_padding_positions_are_never_supervised():
    model = vlm()
    input_ids, images, labels, mask = vlm_batch()
    base = model(input_ids, images, labels, mask).ce_loss
    # labels put on image positions are ignored by the model
    labelled_images = labels.clone()
    labelled_images[input_ids == IMAGE_TOKEN_INDEX] = 3
    torch.testing.assert_close(model(input_ids, images, labelled_images, mask).ce_loss, base)
    # labels put on padding positions are ignored too
    labelled_padding = labels.clone()
    labelled_padding[~mask] = 3
    torch.testing.assert_close(model(input_ids, images, labelled_padding, mask).ce_loss, base)
    # the loss equals the mean token cross-entropy over the answer positions only
    logits = model(input_ids, images, labels, mask).logits
    targets = labels[:, 1:]
    picked = targets != IGNORE_INDEX
    manual = torch.nn.functional.cross_entropy(logits[:, :-1][picked], targets[picked])
    torch.testing.assert_close(base, manual)


def test_gradients_reach_vision_projector_llm_and_router():
    model = vlm(moe_layers="sparse")
    model(*vlm_batch()).loss.backward()
    for name in ("vision.patch_embed.weight", "projector.fc1.weight", "llm.tok_emb.weight",
                 "llm.blocks.0.ffn.router.weight", "llm.blocks.0.ffn.experts.gate_proj"):
        assert dict(model.named_parameters())[name].grad.abs().sum() > 0, name


@pytest.mark.parametrize("moe_layers", ["", "sparse"])
def test_gradient_checkpointing_changes_neither_the_loss_nor_the_gradients(moe_layers, monkeypatch):
    calls = []
    checkpoint = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or checkpoint(*a, **k))
    grads = []
    for checkpointing in (False, True):
        model = vlm(moe_layers=moe_layers)
        model.llm.grad_checkpointing = checkpointing
        out = model(*vlm_batch())
        out.loss.backward()
        grads.append((out.loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    assert len(calls) == 4  # the second model checkpointed each of its 4 blocks, the first none
    (loss, plain), (loss_ckpt, ckpt) = grads
    torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=0)
    assert plain.keys() == ckpt.keys() and len(plain) > 10
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-6, atol=1e-7, msg=name)


def test_padding_changes_neither_the_loss_nor_the_counts():
    model = vlm(moe_layers="sparse", capacity_factor=1.0)  # tight capacity: padding taking slots would show
    input_ids, images, labels, mask = vlm_batch()
    more_pad = 5
    ids_p = torch.cat([input_ids, torch.randint(0, VOCAB, (2, more_pad))], dim=1)
    labels_p = torch.cat([labels, torch.full((2, more_pad), IGNORE_INDEX)], dim=1)
    mask_p = torch.cat([mask, torch.zeros(2, more_pad, dtype=torch.bool)], dim=1)
    a = model(input_ids, images, labels, mask)
    b = model(ids_p, images, labels_p, mask_p)
    torch.testing.assert_close(b.ce_loss, a.ce_loss)
    torch.testing.assert_close(b.aux_loss, a.aux_loss)
    torch.testing.assert_close(b.loss, a.loss)
    for sa, sb in zip(a.routing, b.routing):
        assert torch.equal(sa.expert_counts, sb.expert_counts)
        assert torch.equal(sa.dropped, sb.dropped)
    image_tokens = sum(s.expert_counts[1].sum() for s in a.routing)
    assert image_tokens == 2 * 8 * 2  # 2 layers x 8 image tokens x k=2


def test_upcycled_vlm_keeps_the_stage_two_loss():
    model = vlm().eval()
    batch = vlm_batch()
    dense = model(*batch)
    model.upcycle_to_moe("sparse", MoEConfig())  # eval capacity 2.0 with E=4, k=2: nothing can drop
    moe = model(*batch)
    torch.testing.assert_close(moe.ce_loss, dense.ce_loss, atol=1e-5, rtol=1e-5)
    assert moe.loss > moe.ce_loss  # plus 0.01 x the balancing losses
    assert model.config.llm.moe_layers == "sparse"


def test_vlm_generation_with_cache_equals_without():
    model = vlm(moe_layers="sparse").eval()
    input_ids, images, _, _ = vlm_batch(n_text=(2, 2))
    a = model.generate(input_ids, images, max_new_tokens=6)
    b = model.generate(input_ids, images, max_new_tokens=6, use_cache=False)
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_presets_build(name):
    cfg = PRESETS[name]
    model = VLM(replace(cfg, llm=replace(cfg.llm, vocab_size=VOCAB)))
    assert model.num_image_tokens == cfg.vision.num_patches
    assert cfg.vision.num_patches < cfg.llm.max_seq_len


def test_generation_longer_than_max_seq_len_is_rejected_before_it_starts():
    with pytest.raises(ValueError, match="max_new_tokens"):
        llm().generate(torch.zeros(1, 60, dtype=torch.long), max_new_tokens=10)


def test_a_batch_with_nothing_supervised_has_zero_loss_not_nan():
    input_ids, images, labels, mask = vlm_batch()
    out = vlm()(input_ids, images, torch.full_like(labels, IGNORE_INDEX), mask)
    assert out.ce_loss.item() == 0 and torch.isfinite(out.loss)
