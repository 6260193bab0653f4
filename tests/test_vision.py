"""The specification of vision.py: the ViT's patch features, layer selection, the projectors, and the heads
that pretrain the ViT (contrastive, captioning)."""
import pytest
import torch

from moe import MoEConfig, MoELayer
from vision import MLP, VIT_PRESETS, CaptionHead, PretrainHead, ViT, ViTConfig, build_projector, upcycle_projector

CFG = ViTConfig(image_size=32, patch_size=8, width=32, layers=3, heads=4)


def vit(seed=0, **overrides):
    torch.manual_seed(seed)
    return ViT(ViTConfig(**{**CFG.__dict__, **overrides})).eval()


def test_vit_returns_one_feature_per_patch_without_class_token():
    model = vit()
    feats = model(torch.randn(2, 3, 32, 32))
    assert feats.shape == (2, (32 // 8) ** 2, 32)
    assert model.config.num_patches == 16


def test_default_features_come_from_the_second_to_last_layer():
    model = vit()
    pixels = torch.randn(2, 3, 32, 32)
    # run every block by hand and keep each hidden state (0 = embeddings after the pre-norm)
    x = model.patch_embed(pixels).flatten(2).transpose(1, 2)
    x = model.norm_pre(torch.cat([model.cls_token.expand(2, -1, -1), x], dim=1) + model.pos_embed)
    hidden = [x]
    for block in model.blocks:
        hidden.append(block(hidden[-1]))
    torch.testing.assert_close(model(pixels), hidden[-2][:, 1:])
    torch.testing.assert_close(model(pixels, select_layer=-1), hidden[-1][:, 1:])
    torch.testing.assert_close(model(pixels, select_layer=1), hidden[1][:, 1:])
    torch.testing.assert_close(model.embed(pixels), model.norm(hidden[-1][:, 0]))


def test_patches_are_in_raster_order_and_local():
    # changing one pixel changes the patch embedding of the patch that holds it, and no other
    model = vit()
    pixels = torch.randn(1, 3, 32, 32)
    changed = pixels.clone()
    changed[0, :, 9, 20] += 1.0  # row 9 -> patch row 1; column 20 -> patch column 2; raster index 1*4 + 2 = 6
    a = model.patch_embed(pixels).flatten(2).transpose(1, 2)
    b = model.patch_embed(changed).flatten(2).transpose(1, 2)
    differs = (a - b).abs().sum(-1)[0] > 0
    assert differs.nonzero().flatten().tolist() == [6]


def test_attention_mixes_all_patches():
    model = vit(select_layer=-1)
    pixels = torch.randn(1, 3, 32, 32)
    changed = pixels.clone()
    changed[0, :, :8, :8] += 1.0  # only patch 0 changes
    diff = (model(pixels) - model(changed)).abs().sum(-1)[0]
    assert (diff > 0).all()  # every patch's feature sees it


def test_the_conv_stem_gives_the_same_token_grid_and_each_token_sees_past_its_patch():
    model = vit(stem="conv")
    pixels = torch.randn(1, 3, 32, 32)
    assert model(pixels).shape == vit()(pixels).shape  # the same 16 tokens of width 32
    changed = pixels.clone()
    changed[0, :, 8, 12] += 1.0  # in patch (1, 1) = raster index 5
    a, b = model.patch_embed(pixels).flatten(2)[0].T, model.patch_embed(changed).flatten(2)[0].T
    differs = ((a - b).abs().sum(-1) > 0).nonzero().flatten().tolist()
    assert differs == [5, 6]  # its own token and its right-hand neighbour, whose filters overlap it; no other
    with pytest.raises(ValueError, match="power-of-two"):
        ViTConfig(image_size=36, patch_size=12, stem="conv")


def test_vit_rejects_images_of_the_wrong_size():
    with pytest.raises(ValueError, match="expects images of shape"):
        vit()(torch.randn(1, 3, 64, 64))


@pytest.mark.parametrize("kind", ["linear", "mlp2x_gelu"])
def test_projector_maps_vision_features_to_llm_width(kind):
    projector = build_projector(kind, vision_dim=32, llm_dim=48)
    assert projector(torch.randn(2, 16, 32)).shape == (2, 16, 48)


def test_mlp2x_gelu_is_linear_gelu_linear():
    torch.manual_seed(0)
    projector = build_projector("mlp2x_gelu", 8, 12)
    x = torch.randn(5, 8)
    expected = projector.fc2(torch.nn.functional.gelu(projector.fc1(x)))
    torch.testing.assert_close(projector(x), expected)
    assert projector.fc1.weight.shape == (12, 8) and projector.fc2.weight.shape == (12, 12)


def test_unknown_projector_and_bad_config_are_rejected():
    with pytest.raises(ValueError, match="unknown projector"):
        build_projector("mlp3x_relu", 8, 8)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        ViTConfig(image_size=30, patch_size=8)
    with pytest.raises(ValueError, match="select_layer"):
        ViTConfig(layers=2, select_layer=-5)
    with pytest.raises(ValueError, match="select_layer=4"):
        vit()(torch.randn(1, 3, 32, 32), select_layer=4)  # 3 blocks: hidden states 0..3


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_presets_build_and_run(name):
    cfg = VIT_PRESETS[name]
    model = ViT(cfg)
    assert model(torch.randn(1, 3, cfg.image_size, cfg.image_size)).shape == (1, cfg.num_patches, cfg.width)


def captioner(seed=0):
    torch.manual_seed(seed)
    return CaptionHead(vocab_size=50, max_len=12, config=CFG)


def test_the_captioner_predicts_each_token_from_the_image_and_the_tokens_before_it():
    model, head = vit(), captioner()
    pixels, ids = torch.randn(2, 3, 32, 32), torch.randint(0, 50, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.bool)
    only_first = torch.zeros_like(mask)
    only_first[:, :4] = True  # the loss of the first 4 tokens ...
    changed = ids.clone()
    changed[:, 4:] = (changed[:, 4:] + 1) % 50  # ... does not depend on the tokens after them
    torch.testing.assert_close(head(model, pixels, ids, only_first), head(model, pixels, changed, only_first))
    assert head(model, pixels, ids, only_first) != head(model, pixels + 1.0, ids, only_first)  # it reads the image


def test_the_captioner_trains_the_features_the_projector_receives():
    model, head = vit(), captioner()
    head(model, torch.randn(2, 3, 32, 32), torch.randint(0, 50, (2, 6)), torch.ones(2, 6, dtype=torch.bool)).backward()
    # blocks up to the selected layer (-2: blocks 0 and 1 of 3) learn; the last block is not read
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.blocks[1].parameters())
    assert all(p.grad is None for p in model.blocks[2].parameters())


@pytest.mark.parametrize("objective, names", [("contrastive", ("clip",)), ("caption", ("caption",)),
                                              ("both", ("clip", "caption"))])
def test_the_pretraining_head_returns_one_loss_per_objective(objective, names):
    torch.manual_seed(0)
    head = PretrainHead(objective, vocab_size=50, max_len=12, config=CFG)
    losses = head(vit(), torch.randn(3, 3, 32, 32), torch.randint(0, 50, (3, 6)), torch.ones(3, 6, dtype=torch.bool))
    assert head.names == names and tuple(losses) == names and all(v.ndim == 0 for v in losses.values())
    with pytest.raises(ValueError, match="choose one of contrastive, caption, both"):
        PretrainHead("masked", 50, 12, CFG)


# ---------------------------------------------------------------------------------------------------------
# CuMo: MoE blocks in the ViT and the projector, co-upcycled


def test_vit_moe_placement_counts_only_the_blocks_in_use():
    assert ViTConfig(layers=4, select_layer=-2, moe_layers="all").moe_blocks == [0, 1, 2]  # block 3 feeds nothing
    assert ViTConfig(layers=4, select_layer=-1, moe_layers="sparse").moe_blocks == [0, 2]
    assert ViTConfig(layers=4).moe_blocks == []
    with pytest.raises(ValueError, match="0..2"):
        ViTConfig(layers=4, select_layer=-2, moe_layers="3")


def test_upcycled_vit_computes_what_the_dense_vit_computed():
    model = vit(stem="conv")
    pixels = torch.randn(3, 3, 32, 32)
    before = model(pixels)
    model.upcycle_to_moe("all", MoEConfig(drop_tokens=False, balance_per_sample=True))
    assert [b.is_moe for b in model.blocks] == [True, True, False]  # blocks 0 and 1 of 3 are in use
    after, routing = model.features(pixels)
    torch.testing.assert_close(after, before, atol=1e-6, rtol=1e-5)  # fp32: exactly the dense ViT
    assert len(routing) == 2 and routing[0].expert_index.shape == (3, 1 + 16, 2)  # the class token is routed too
    assert routing[0].top1_counts[1].sum() == 3 * 17  # every token of the ViT counts as an image token
    with pytest.raises(ValueError, match="already have an MoE MLP"):
        model.upcycle_to_moe("0", MoEConfig())


def test_upcycled_projector_computes_what_the_dense_projector_computed():
    torch.manual_seed(0)
    dense = build_projector("mlp2x_gelu", 32, 48)
    moe = upcycle_projector(dense, MoEConfig(drop_tokens=False))
    features = torch.randn(2, 16, 32)
    out, stats = moe(features)
    torch.testing.assert_close(out, dense(features), atol=1e-6, rtol=1e-5)
    assert isinstance(moe, MoELayer) and all(torch.equal(w, dense.fc1.weight) for w in moe.experts.fc1_weight)
    with pytest.raises(ValueError, match="mlp2x_gelu"):
        upcycle_projector(build_projector("linear", 32, 48), MoEConfig())
    with pytest.raises(ValueError, match="mlp2x_gelu"):
        build_projector("linear", 32, 48, MoEConfig())
    assert isinstance(build_projector("mlp2x_gelu", 32, 48, MoEConfig()), MoELayer)
    assert isinstance(build_projector("mlp2x_gelu", 32, 48), MLP)
