"""
train.py -- MoE-Tuning: the stages that turn a ViT and a small LLM into a sparse vision-language model.

    python train.py --stage all                 # stages 0 -> I -> II -> III on the built-in data (tiny preset)
    python train.py --stage 3                   # only stage III, from {out_dir}/stage2/
    python train.py --stage 2 --resume          # continue an interrupted stage II exactly where it stopped
    python train.py --stage 3 --moe.num_experts=8 --moe.top_k=1 --moe_layers=dense   # any config field
    python train.py --stage all --recipe=cumo   # CuMo: experts in the ViT and the projector, not the LLM
    python train.py --stage all --recipe=mole   # LLaVA-MoLE: LoRA experts on a frozen LLM in stage III
    python train.py --help                      # every option, with its default
    torchrun --standalone --nproc_per_node=8 train.py --stage all --preset small --global_batch=256   # 8 GPUs

The stages (MoE-LLaVA, arXiv 2401.15947, section 3.3 and Fig. 3; the formulas and their hyperparameters are in
docs/reference.md):
  stage 0   ours, because no pretrained weights can be downloaded here: pretrain the backbones from scratch --
            the ViT by captioning (a small decoder reads its patch features and writes the caption,
            vision.CaptionHead; --stage0_objective=contrastive for CLIP's loss, or both) and the LLM by
            next-token prediction on the built-in text. Captioning is the default because CLIP's loss can be won
            from colour and layout alone, and the tiny model then never sees shapes (docs/ablations.md). With
            real pretrained backbones it is skipped: --stage 1 --vision_from=CLIP_FOLDER --llm_from=LLM_FOLDER
            --preset=pretrained loads them with weights.py (docs/backbones.md), and the later stages follow.
  stage I   image-caption pairs, `plain` template, lr 1e-3: the LLM learns to read image features. MoE-LLaVA
            trains the projector alone here; ours trains the LLM too (--stage1_train_llm=false for theirs),
            because our LLM, young and never shown an image, could not learn to read colour or shape through
            the projector alone (docs/ablations.md). The ViT stays frozen.
  stage II  the LLM and the projector (ViT frozen) on instruction conversations, chat template.
  stage III each FFN of the chosen layers (default `sparse`: every other one) becomes an MoE layer whose 4 experts
            start as copies of it (sparse upcycling); the experts and routers train (and the projector, as in the
            official code; --train_projector_stage3=false freezes it). Loss = CE + 0.01 * sum of balancing losses.

--recipe=cumo trains CuMo (arXiv 2405.05949) through the same stages, with experts on the vision side instead:
  stage II  "pre-finetuning": the ViT trains too (at --vit_lr_scale x the lr), still dense.
  stage III every ViT MLP in use and the projector become MoE layers of copies of themselves (co-upcycling); the
            LLM stays dense; the whole model trains. Dropless top-2 of 4; loss = CE + 0.1 x (balancing losses,
            per image, averaged over the ViT's layers, + the projector's) + 0.01 x (their router z-losses).
  Departures: CuMo's stage II pre-finetunes on rich captions, ours on stage II's instructions (the built-in world
  has no second caption set); CuMo also runs the ViT block after the selected layer and trains its experts on
  the auxiliary losses alone, though its output is never read -- we leave that block out. A recipe only sets
  defaults (RECIPES): --recipe=cumo --moe_layers=sparse puts experts in the ViT, the projector and the LLM.

--recipe=mole trains LLaVA-MoLE (arXiv 2401.16160): stages 0-II as above; stage III freezes the whole model and
  trains LoRA alone: rank-8 LoRA on every block's attention projections (q, k and v share one A: our attention
  has one fused qkv matrix), and in every FFN 3 LoRA experts -- each a LoRA update of the gate, up and down
  matrices -- with a top-1 router; loss = CE + 0.01 x one balancing loss pooled over the layers. Plain LoRA is
  --recipe=mole --mole_layers= --lora_targets=attention,mlp, and model.merge_lora folds it into the weights.

stage 4 (optional; not part of --stage all) fine-tunes a trained stage-III model cheaply, on your own data:
  LoRA on every attention projection and, in each MoE layer, one LoRA adapter per expert (dense FFNs get plain
  LoRA); only the adapters train, the routers stay as they are. merge_lora folds the adapters into the weights.
      python train.py --stage 4 --data_path my.json --image_folder my_images/ --val_data_path my_val.json

Each stage reads {out_dir}/stage{N-1}/ckpt.pt and writes {out_dir}/stage{N}/: ckpt.pt (model, optimizer, RNG, and
the metadata as JSON), meta.json (a readable copy of the metadata), log.jsonl, and the tokenizer.
Devices: CUDA (bf16 autocast) when present, else CPU in fp32; --device=cpu forces the CPU. Under torchrun each
rank runs this same file; parallel.py says how (data parallel, expert parallel, signals), and every parallel.*
call below does nothing, or the obvious thing, in one process.

Read it top to bottom: configuration -> the stages (what each loads, builds and freezes, and its loss) -> setting
a stage up -> the loop -> validation -> checkpoints -> command line and main.
"""
import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn
from tqdm import tqdm

import data as D
import parallel as P
import weights as W
from model import (PRESETS, VLM, LLMConfig, VLMConfig, autocast, load_checkpoint, lm_loss,
                   param_counts, save_checkpoint, write_meta)
from moe import LoRA, LoRASwiGLUExperts, MoEConfig, MoELayer
from vision import PretrainHead, ViTConfig, build_projector

# ----------------------------------------------------------------------------------------------------------
# Configuration: every default lives here; the command line overrides any field


@dataclass(frozen=True)
class TrainConfig:
    preset: str = "tiny"  # tiny (CPU, 15 min), long (the tiny model, CPU, 1 hour), small (one GPU), pretrained
    out_dir: str = "out"  # stage N writes {out_dir}/stage{N}/
    data_dir: str = "data/builtin"  # the built-in data set; written there on first use
    data_path: str = ""  # a LLaVA-format JSON to train this stage on instead of the built-in data; a,b mixes files
    val_data_path: str = ""  # its validation file(s) (without one, validation is skipped for user data)
    image_folder: str = ""  # where the JSON's image paths are relative to (default: data_dir)
    tokenizer: str = "builtin"  # builtin (learned from the built-in corpus) or a tiktoken name: gpt2, cl100k_base
    chat_template: str = ""  # stages II-III: chat, chatml, llama3 (data.CHAT_FORMATS); "": as before or the folder's
    vision_from: str = ""  # stage I: start from this CLIP model folder instead of stage 0 (with llm_from; weights.py)
    llm_from: str = ""  # stage I: a Llama/Qwen2-family folder (config.json, *.safetensors, tokenizer.json)
    seed: int = 1337
    device: str = "auto"  # auto: cuda if available, else cpu
    compile: bool = False  # torch.compile the VLM's forward (stages I-III)
    batch_size: int = 16  # samples per micro-step on each rank
    grad_accum: int = 1  # micro-steps per optimizer step (set from global_batch when that is given)
    global_batch: int = 0  # samples per optimizer step over all ranks; 0: batch_size x grad_accum x world size
    clip_batch_size: int = 32  # stage 0: image-caption pairs per batch (the contrastive negatives come from it)
    stage0_objective: str = "caption"  # stage 0's ViT loss: caption, contrastive (CLIP), or both (summed)
    stage0_iters: int = 600  # optimizer steps per stage (MoE-LLaVA trains each stage for 1 epoch)
    stage1_iters: int = 1000  # with the LLM training in stage I, 300 steps left it unable to read colour or shape
    stage2_iters: int = 1200
    stage3_iters: int = 600
    stage4_iters: int = 300  # stage 4 (optional, not in --stage all): LoRA fine-tuning of the stage-III model
    stage0_lr: float = 1e-3
    stage1_lr: float = 1e-3  # MoE-LLaVA stage I
    stage2_lr: float = 1e-3  # MoE-LLaVA uses 2e-5 on pretrained billion-parameter LLMs; ours is small and young
    stage3_lr: float = 2e-4  # experts start trained, so a lower peak than stage II
    stage4_lr: float = 2e-4
    warmup_frac: float = 0.03  # linear warmup over this fraction of a stage, then cosine decay to 0 (MoE-LLaVA)
    weight_decay: float = 0.0  # MoE-LLaVA uses none
    grad_clip: float = 1.0
    max_iters: int = 0  # if > 0, caps every stage's steps (smoke runs)
    stop_after: int = 0  # if > 0, stop this run after that many steps of the stage, with a checkpoint; --resume goes on
    eval_interval: int = 200  # steps between validation passes (also at the first and the last step)
    eval_batches: int = 8  # batches per validation pass
    log_interval: int = 10  # steps between log.jsonl lines
    routing_interval: int = 50  # steps between per-expert token counts in stage III's log
    ckpt_interval: int = 200  # steps between checkpoints (also at the end)
    recipe: str = "moe-llava"  # moe-llava (experts in the LLM), cumo (in the ViT, projector) or mole (LoRA experts)
    moe_from_stage: int = 3  # the stage that upcycles: 3 (MoE-Tuning), or 2 (an ablation: no dense stage II)
    moe_layers: str = "sparse"  # stage III: which FFNs become MoE layers (sparse, dense, first_half, second_half, 0,2)
    vision_moe_layers: str = ""  # stage III: which ViT MLPs become MoE layers (CuMo: all; as moe_layers)
    projector_moe: bool = False  # stage III: the mlp2x_gelu projector becomes an MoE of its copies (CuMo)
    stage3_train: str = "moe"  # stage III trains: moe (MoE layers, projector: MoE-LLaVA), all (CuMo), lora (MoLE)
    lora_targets: str = ""  # stage III: plain LoRA on every LLM block's attention and/or mlp matrices
    mole_layers: str = ""  # stage III: LLM blocks whose FFN gets LoRA experts and a router (LLaVA-MoLE: all)
    lora_rank: int = 8  # stage III: rank of every LoRA update (LLaVA-MoLE: 32, for LLMs of billions)
    lora_alpha: float = 16.0  # stage III: LoRA updates are scaled by alpha / rank (LLaVA-MoLE: 64 / 32)
    lora_dropout: float = 0.0  # stage III: dropout on a LoRA update's input (LLaVA-MoLE: 0.05)
    ep_size: int = 1  # stage III: spread each MoE layer's experts over this many ranks (expert parallelism)
    train_projector_stage3: bool = True  # the official stage III leaves the projector trainable
    stage1_train_llm: bool = True  # departs from MoE-LLaVA (LLM frozen in stage I): our young LLM must learn to read
    stage2_train_vit: bool = False  # departs from MoE-LLaVA (ViT frozen after pretraining): stage II trains it too
    vit_lr_scale: float = 0.1  # the ViT's learning rate, as a fraction of the stage's, when a stage trains it
    max_bad_fraction: float = 0.05  # more bad samples than this stops at load time
    grad_checkpointing: bool = False  # recompute the LLM blocks' activations in the backward pass: less memory
    resume: bool = False  # continue the stage from its own checkpoint
    progress: bool = True  # show a progress bar


TRAIN_PRESETS = {
    "tiny": TrainConfig(),
    # the tiny model trained longer on 5 x the training scenes, each asked up to 12 questions in one conversation
    # (PRESET_DATA; cut at the 256-token context): on the tiny preset's 5000 scenes, longer training memorises them,
    # and with 1-3 questions the lookups ("What colour is the diamond?") were found late or never; stage II's 6000
    # steps find both lookups where 3500 found one (docs/ablations.md); within an hour on 2 cores
    "long": TrainConfig(preset="long", data_dir="data/builtin-long", stage0_iters=1500, stage1_iters=1500,
                        stage2_iters=6000, stage3_iters=1200, eval_interval=500, ckpt_interval=500),
    # sized for one GPU by arithmetic, not yet measured on one
    "small": TrainConfig(preset="small", batch_size=32, clip_batch_size=256, stage0_iters=3000, stage1_iters=500,
                         stage2_iters=3000, stage3_iters=1500, stage0_lr=6e-4, stage2_lr=3e-4, stage3_lr=1e-4,
                         eval_interval=500, ckpt_interval=500),
    # real backbones (--vision_from, --llm_from; no stage 0): MoE-LLaVA's stage I-III settings -- the projector
    # alone in stage I at 1e-3, then 2e-5, global batch 128 (its stage I uses 256), about one epoch of LLaVA-558K
    # (stage I) and LLaVA-665K (stages II, III) each
    "pretrained": TrainConfig(preset="pretrained", batch_size=16, global_batch=128, stage1_iters=4360,
                              stage2_iters=5200, stage3_iters=5200, stage1_lr=1e-3, stage2_lr=2e-5, stage3_lr=2e-5,
                              stage1_train_llm=False, eval_interval=500, ckpt_interval=500),
}
PRESET_MODEL = {"long": "tiny"}  # a training preset that reuses another's model (model.PRESETS)
# a training preset's built-in data set (data.BuiltinConfig)
PRESET_DATA = {"long": {"extra_train": 20000, "train_questions": 12}}
# A recipe is a set of defaults: where the experts go, what each stage trains, the MoE losses. Any piece can still
# be set on its own (--recipe=cumo --moe_layers=sparse puts experts in the ViT, the projector *and* the LLM).
RECIPES = {
    "moe-llava": {"train": {}, "moe": {}},  # the TrainConfig and MoEConfig defaults are MoE-LLaVA's
    # CuMo (arXiv 2405.05949): the LLM stays dense; every ViT MLP in use and the projector are co-upcycled; stage
    # II ("pre-finetuning") and stage III train the whole model, the ViT included; dropless top-2 of 4; loss =
    # CE + 0.1 x (balancing losses, per image, averaged over the ViT's layers) + 0.01 x (router z-losses).
    "cumo": {"train": {"moe_layers": "", "vision_moe_layers": "all", "projector_moe": True,
                       "stage2_train_vit": True, "stage3_train": "all"},
             "moe": {"aux_loss_coef": 0.1, "z_loss_coef": 0.01, "drop_tokens": False, "balance_per_sample": True,
                     "aux_over_layers": "mean"}},
    # LLaVA-MoLE (arXiv 2401.16160): stage III keeps the whole model frozen and trains LoRA alone: plain LoRA on
    # the attention projections, and in every block's FFN 3 LoRA experts with a top-1 router; the balancing loss
    # pools every layer's routing.
    "mole": {"train": {"moe_layers": "", "mole_layers": "all", "lora_targets": "attention", "stage3_train": "lora"},
             "moe": {"num_experts": 3, "top_k": 1, "drop_tokens": False, "aux_over_layers": "pooled"}},
}
STAGES = (0, 1, 2, 3)
# what decides the batches and the schedule: --resume continues a stage only if these are unchanged
RESUME_MUST_MATCH = ("iters", "seed", "batch_size", "global_batch", "clip_batch_size", "warmup_frac")

# ----------------------------------------------------------------------------------------------------------
# The stages: what each one loads, builds and freezes, and its loss (MoE-LLaVA Fig. 3)


def stage_dir(config, stage):
    return os.path.join(config.out_dir, f"stage{stage}")


def load_stage_data(stage, config, tokenizer, vlm_config, split):
    """The Examples a stage trains (split='train') or validates (split='val') on; None if there is no such set.

    stage 0: (image-caption pairs for CLIP, text for the LLM); stage I: captions, `plain`; II-III: instructions, chat.
    """
    user_file = config.data_path if split == "train" else config.val_data_path
    if config.data_path and not user_file:
        return None
    folder = config.image_folder or config.data_dir
    default = "captions" if stage <= 1 else "instruct"
    path = user_file or os.path.join(config.data_dir, f"{default}_{split}.json")
    max_len = vlm_config.llm.max_seq_len

    def load(paths, **kw):  # several files, comma-separated, are trained on as one mixed set
        return [example for path in paths.split(",") for example in D.load_examples(
            path, folder, tokenizer, max_len=max_len, max_bad_fraction=config.max_bad_fraction, log=P.print0, **kw)]
    if stage == 0:
        # CLIP reads the caption alone (the image goes to the ViT, not into the text): no image tokens
        pairs = load(path, template="plain", num_image_tokens=0)
        # the LLM learns language from every text of the stage II data (or the user's file), images left out
        text_path = user_file or os.path.join(config.data_dir, f"instruct_{split}.json")
        text = load(text_path, template=tokenizer.chat, num_image_tokens=0, supervise_all=True, keep_images=False)
        return pairs, text
    template = "plain" if stage == 1 else tokenizer.chat
    return load(path, template=template, num_image_tokens=vlm_config.vision.num_patches)


def build_model(stage, config, nested, own, prev, tokenizer):
    """Stage 0 builds the VLM (and CLIP's head) from the preset; stage N loads stage N-1's weights, and stage III
    then upcycles: each chosen FFN becomes an MoE layer whose experts are copies of it (moe.MoELayer.upcycle).
    Resuming loads the stage's own checkpoint into the same architecture."""
    try:
        if stage == 1 and prev is None and own is None:  # real backbones, from model folders (weights.py)
            return vlm_from_folders(config, nested, tokenizer), None
        if stage == 0 and own is None:
            base = PRESETS[PRESET_MODEL.get(config.preset, config.preset)]
            vlm_config = VLMConfig(vision=replace(base.vision, **nested["vision"]),
                                   llm=replace(base.llm, vocab_size=tokenizer.vocab_size, **nested["llm"]),
                                   projector=nested.get("projector", base.projector))
        else:
            vlm_config = VLMConfig.from_dict((own or prev)["meta"]["model_config"])
            asked = replace(vlm_config, llm=replace(vlm_config.llm, **nested["llm"]),
                            vision=replace(vlm_config.vision, **nested["vision"]),
                            projector=nested.get("projector", vlm_config.projector))
            if asked != vlm_config:  # (--stage all repeats stage 0's options, which then match)
                raise SystemExit("error: --llm.*, --vision.* and --projector shape the model at stage 0 only; "
                                 f"stage {stage} takes the architecture from its input checkpoint")
        vlm = VLM(vlm_config)
        head = PretrainHead(config.stage0_objective, tokenizer.vocab_size, vlm_config.llm.max_seq_len,
                            vlm_config.vision) if stage == 0 else None
        if own is None and prev is not None:
            vlm.load_state_dict(prev["model"])
            if stage == 4:  # LoRA on the trained model: attention, and one adapter per expert of each MoE FFN
                vlm.add_lora(config.lora_targets or "attention,mlp", "", vlm_config.llm.moe, config.lora_rank,
                             config.lora_alpha, config.lora_dropout)
            moe = replace(vlm_config.llm.moe, **nested["moe"])
            if config.moe_from_stage <= stage <= 3 and is_dense(vlm_config):  # (stage II: an ablation)
                vlm.upcycle_to_moe(config.moe_layers, moe, config.vision_moe_layers, config.projector_moe)
            elif stage == 3 and any(moe != vlm.moe_config(part) for part, _ in vlm.moe_layer_names()):
                raise SystemExit("error: this model became an MoE in stage II (--moe_from_stage=2); --moe.* options "
                                 "belong to that stage")
            if stage == 3:
                if config.lora_targets or config.mole_layers:
                    vlm.add_lora(config.lora_targets, config.mole_layers, moe, config.lora_rank, config.lora_alpha,
                                 config.lora_dropout)
    except ValueError as e:  # an impossible config: the dataclass says which field, and why
        raise SystemExit(f"error: {e}") from None
    if own is not None:
        vlm.load_state_dict(own["model"])
        if head is not None:
            was = own["meta"]["train_config"].get("stage0_objective", "contrastive")
            if "head" not in own:  # (written before stage 0 had a choice of objective)
                raise SystemExit(f"error: {stage_dir(config, 0)}/ckpt.pt comes from an older train.py; start "
                                 f"stage 0 again without --resume")
            if was != config.stage0_objective:
                raise SystemExit(f"error: {stage_dir(config, 0)} was trained with stage0_objective={was}; resume "
                                 f"with the same value")
            head.load_state_dict(own["head"])
    return vlm, head


def is_dense(vlm_config):
    return not (vlm_config.llm.moe_layers or vlm_config.vision.moe_layers or vlm_config.projector_moe)


def vlm_from_folders(config, nested, tokenizer):
    """Stage I's VLM from a CLIP folder and an LLM folder (weights.py): the ViT and the LLM as pretrained, a new
    projector between them. The folders fix the architecture: only how images are read (--vision.image_resize,
    --vision.select_layer) and the longest sequence (--llm.max_seq_len) may be chosen. The LLM's vocabulary must
    hold the chat format's end token, which ends every answer."""
    allowed = {"vision": ("image_resize", "select_layer"), "llm": ("max_seq_len",)}
    for part, names in allowed.items():
        for name in sorted(set(nested[part]) - set(names)):
            raise SystemExit(f"error: --{part}.{name} comes from the model folder (--{part}_from); of the "
                             f"{part} options only {', '.join(f'--{part}.{n}' for n in names)} may be given")
    vision_options, llm_options = nested["vision"], nested["llm"]
    try:
        vision = W.load_vit(config.vision_from, vision_options.get("select_layer", -2),
                            vision_options.get("image_resize", "pad"))
        llm = W.load_llm(config.llm_from, llm_options.get("max_seq_len", 2048))
    except (W.BadWeights, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    if tokenizer.eos_id >= llm.config.vocab_size:
        end = D.CHAT_FORMATS[tokenizer.chat].end
        raise SystemExit(f"error: the {tokenizer.chat!r} chat format ends answers with {end!r} (id "
                         f"{tokenizer.eos_id}), which lies outside {config.llm_from}'s vocabulary of "
                         f"{llm.config.vocab_size}: choose another --chat_template")
    vlm_config = VLMConfig(vision=vision.config, llm=llm.config, projector=nested.get("projector", "mlp2x_gelu"))
    with torch.device("meta"):  # the VLM's frame alone, without memory: its ViT and LLM are the loaded ones
        vlm = VLM(vlm_config)
    vlm.vision, vlm.llm = vision, llm
    vlm.projector = build_projector(vlm_config.projector, vision.config.width, llm.config.dim)
    return vlm


def set_trainable(stage, vlm, config):
    """Freeze everything, then unfreeze what this stage trains; the optimizer gets exactly these parameters.
    Stage III trains what upcycling made, the experts and the routers (MoE-LLaVA), everything the VLM runs
    (--stage3_train=all, CuMo), or LoRA alone (--stage3_train=lora, LLaVA-MoLE; and stage 4, LoRA fine-tuning
    of the stage-III model: the routers of its MoE layers stay as they are). Returns the trained names."""
    for p in vlm.parameters():
        p.requires_grad_(False)
    if stage == 0:  # the projector waits for stage I; captioning alone reads no ViT part past the selected layer
        trained = [vlm.llm] + ([vlm.vision] if config.stage0_objective != "caption" else vision_in_use(vlm.vision))
    elif stage == 1:
        trained = [vlm.projector] + ([vlm.llm] if config.stage1_train_llm else [])
    elif stage == 2:
        trained = [vlm.llm, vlm.projector] + (vision_in_use(vlm.vision) if config.stage2_train_vit else [])
    elif stage == 4 or config.stage3_train == "lora":  # LoRA alone: the updates, and MoLE's routers
        trained = [p for m in vlm.modules() if isinstance(m, LoRA) for p in (m.A, m.B)]
        trained += [p for m in vlm.modules() if isinstance(m, LoRASwiGLUExperts) for p in m.weights()]
        trained += [m.router.weight for m in vlm.modules() if isinstance(m, MoELayer)
                    and isinstance(m.experts, LoRASwiGLUExperts) and m.experts.shared]
    elif config.stage3_train == "all":
        trained = [vlm.llm, vlm.projector, *vision_in_use(vlm.vision)]
    else:
        trained = [m for m in vlm.modules() if isinstance(m, MoELayer)]  # experts and routers, wherever they are
        if config.train_projector_stage3:
            trained.append(vlm.projector)
    for part in trained:
        for p in part.parameters() if isinstance(part, nn.Module) else [part]:
            p.requires_grad_(True)
    return [n for n, p in vlm.named_parameters() if p.requires_grad]


def vision_in_use(vit):
    """The parts of the ViT the vision-language model runs: all but the blocks after the selected layer and the
    final norm (they serve only stage 0's contrastive head)."""
    return [vit.patch_embed, vit.norm_pre, *vit.blocks[:vit.config.layers_in_use], vit.cls_token, vit.pos_embed]


def stage0_loss(vlm, head, batch, device):
    """The ViT's image-caption loss (contrastive, captioning or both: vision.PretrainHead) + next-token loss for
    the LLM: the backbones, from scratch."""
    pairs, text = batch.pairs, batch.text
    with autocast(device):
        vision = head(vlm.vision, pairs.images, pairs.input_ids, pairs.attention_mask)
        lm = lm_loss(vlm.llm(text.input_ids, attention_mask=text.attention_mask).logits, text.labels)
    return {"loss": sum(vision.values()) + lm, **vision, "lm": lm}, None


def vlm_loss(vlm, batch, device):
    """Stages I-III: cross-entropy on the answers + the MoE layers' weighted balancing (and z-) losses (model.VLM:
    MoE-LLaVA 0.01 x their sum; CuMo 0.1 x and 0.01 x, per part). Every term is returned, to be logged."""
    with autocast(device):
        out = vlm(batch.input_ids, batch.images, batch.labels, batch.attention_mask)
    losses = {"loss": out.loss, "ce": out.ce_loss, "aux": out.aux_loss, "z": out.z_loss}
    return {k: losses.get(k, out.part_losses.get(k, torch.zeros(()))) for k in vlm_loss_names(vlm)}, out.routing


def vlm_loss_names(vlm):
    """The losses a stage I-III step logs: loss, ce, aux; z when a z-loss is weighted; each part's own when
    several parts (ViT, projector, LLM) hold MoE layers. (A batch without images has no vision-side terms: 0.)"""
    parts = list(dict.fromkeys(part for part, _ in vlm.moe_layer_names()))
    names = ["loss", "ce", "aux"] + (["z"] if any(vlm.moe_config(p).z_loss_coef for p in parts) else [])
    return tuple(names + ([f"{t}_{p}" for p in parts for t in ("aux", "z")] if len(parts) > 1 else []))


class StageModel(nn.Module):
    """What a training step runs, as one module so that DistributedDataParallel can wrap it: the VLM (and, in
    stage 0, the ViT's pretraining head). forward(batch) -> (losses, routing)."""

    def __init__(self, vlm, head=None):
        super().__init__()
        self.vlm, self.head = vlm, head

    def forward(self, batch):
        device = next(self.vlm.parameters()).device
        if self.head is not None:
            losses, routing = stage0_loss(self.vlm, self.head, batch, device)
        else:
            losses, routing = vlm_loss(self.vlm, batch, device)
        if torch.is_grad_enabled():  # the vision side joins every graph: see forget_vision_join
            losses["loss"] = losses["loss"] + sum(p.view(-1)[0] * 0.0 for p in self.vision_side() if p.requires_grad)
        return losses, routing

    def vision_side(self):
        return [*self.vlm.vision.parameters(), *self.vlm.projector.parameters()]

    def forget_vision_join(self):
        """A text-only batch leaves the projector and the ViT (the parts a batch can leave out) out of the graph.
        forward joins their trained parameters with a zero gradient all the same: DDP waits for every trained
        parameter, and stage I's loss would have nothing to backpropagate. A step with no image on any rank calls
        this to drop those zeros, so that AdamW skips them, as it would without the join."""
        for p in self.vision_side():
            p.grad = None


# ----------------------------------------------------------------------------------------------------------
# Setting a stage up: its input checkpoint, tokenizer, data, model, optimizer (and, resuming, its own state)


@dataclass
class Stage:
    """Everything one stage's loop needs (setup_stage makes it)."""

    number: int
    out: str  # {out_dir}/stage{number}: its checkpoint, meta.json and log.jsonl
    vlm: VLM
    head: nn.Module  # stage 0's pretraining head for the ViT (vision.PretrainHead), else None
    model: StageModel  # what a step runs
    train_model: nn.Module  # the same, wrapped for DDP / torch.compile where asked
    optimizer: torch.optim.Optimizer
    params: list  # the trained parameters, as the optimizer has them
    train: object  # D.Batches (stage 0: D.PairedBatches)
    val: object  # the same for validation, or None
    tokenizer: D.Tokenizer
    iters: int
    peak_lr: float
    meta: dict  # what the checkpoint records; meta["step"] is where the loop starts
    stage2_final_val_ce: float = None  # stage III: where stage II ended, which what stage III adds must not change
    resumed: bool = False
    flop_parts: dict = None  # stages I-III: flop_model(vlm), for MFU (stage 0's objectives are not counted)
    peak_flops: float = 0.0  # the device's FLOP/s that MFU divides by (device_peak_flops)

    @property
    def loss_names(self):
        return ("loss", *self.head.names, "lm") if self.number == 0 else vlm_loss_names(self.vlm)


def setup_stage(stage, config, nested, rt, log):
    """The Stage, ready for the loop: its input checkpoint, tokenizer, data, model (with what trains) and
    optimizer; resuming, also the optimizer state, RNG and step of its own checkpoint. Seeded first, so that the
    same command builds the same model."""
    torch.manual_seed(config.seed + stage)
    own, prev = stage_inputs(stage, config, rt, log)
    tokenizer, data_config = stage_tokenizer(stage, config, nested, own, prev, rt)
    vlm, head = build_model(stage, config, nested, own, prev, tokenizer)
    vlm.llm.grad_checkpointing = config.grad_checkpointing
    vlm.to(rt.device)
    if head is not None:
        head.to(rt.device)
    trained = set_trainable(stage, vlm, config)
    counts = param_counts(vlm)
    if head is not None:
        counts = {k: v + sum(p.numel() for p in head.parameters()) for k, v in counts.items()}
    log(f"stage {stage}: {counts['trainable'] / 1e6:.2f}M trainable / {counts['total'] / 1e6:.2f}M total / "
        f"{counts['active'] / 1e6:.2f}M active per token ({len(trained)} tensors trained)" +
        (f" -- including the ViT's pretraining head ({', '.join(head.names)})" if head is not None else ""))
    flop_parts = flop_model(vlm) if stage > 0 else None  # (the whole model's, before experts are spread)
    P.shard_experts(vlm, rt)
    global_batch = config.batch_size * config.grad_accum * rt.world
    if rt.distributed:
        log(f"stage {stage}: {rt.world} processes ({rt.backend}), global batch {global_batch}"
            f" = {config.batch_size} per micro-batch x {config.grad_accum} accumulation x {rt.world} ranks" +
            (f"; experts spread over groups of {config.ep_size}" if rt.ep_group is not None else ""))
    train, val = stage_batches(stage, config, tokenizer, vlm.config)

    params = [p for p in vlm.parameters() if p.requires_grad] + ([] if head is None else list(head.parameters()))
    vit_scaled = set(map(id, vlm.vision.parameters())) if stage > 0 else set()  # stage 0 trains it at full lr
    groups = [{"params": [p for p in params if id(p) not in vit_scaled], "lr_scale": 1.0},
              {"params": [p for p in params if id(p) in vit_scaled], "lr_scale": config.vit_lr_scale}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=0.0, weight_decay=config.weight_decay,
                                  betas=(0.9, 0.999))
    iters = getattr(config, f"stage{stage}_iters")
    iters = min(iters, config.max_iters) if config.max_iters > 0 else iters
    model = StageModel(vlm, head)
    train_model = P.data_parallel(model, rt)  # DDP averages the gradients over the ranks
    if config.compile and stage > 0:
        train_model = torch.compile(train_model)
    meta = {"stage": stage, "step": 0, "iters": iters, "done": False, "tokenizer": tokenizer.name,
            "chat_template": tokenizer.chat, "model_config": asdict(vlm.config), "train_config": asdict(config),
            "data_config": asdict(data_config),
            "counts": counts, "val": {}, "elapsed_s": 0.0, "world_size": rt.world, "global_batch": global_batch}
    st = Stage(number=stage, out=stage_dir(config, stage), vlm=vlm, head=head, model=model, train_model=train_model,
               optimizer=optimizer, params=params, train=train, val=val, tokenizer=tokenizer, iters=iters,
               peak_lr=getattr(config, f"stage{stage}_lr"), meta=meta,
               stage2_final_val_ce=prev["meta"]["val"].get("val_ce") if stage == 3 else None, flop_parts=flop_parts)
    if flop_parts is not None:
        st.peak_flops, source = device_peak_flops(rt.device)
        meta["peak_flops"], meta["peak_flops_source"] = st.peak_flops, source
        log(f"stage {stage}: MFU in the log is against {st.peak_flops / 1e12:.3g} TFLOP/s per device ({source})")
    if own is not None:
        resume(st, own, config, rt, log)
    return st


def stage_inputs(stage, config, rt, log):
    """(own, prev): the stage's own checkpoint when resuming (None if it has none yet), and the previous
    stage's, which stage N > 0 starts from."""
    out, previous = stage_dir(config, stage), stage_dir(config, stage - 1)
    P.seen_by_every_rank(os.path.join(out, "ckpt.pt"), rt)  # (a file system not shared between nodes shows here)
    if stage > 0:
        P.seen_by_every_rank(os.path.join(previous, "ckpt.pt"), rt)
    own = None
    if config.resume:
        if os.path.exists(os.path.join(out, "ckpt.pt")):
            own = load_checkpoint(out)
        else:
            log(f"stage {stage}: no checkpoint in {out} to resume from; starting the stage from the beginning")
    prev = None
    if stage > 0 and not (stage == 1 and config.llm_from):  # (stage I from model folders has no stage 0)
        prev = load_checkpoint(previous, f"stage {stage}'s input, the stage-{stage - 1} checkpoint",
                               f"python train.py --stage {stage - 1} --out_dir {config.out_dir}")
    return own, prev


def stage_tokenizer(stage, config, nested, own, prev, rt):
    """The tokenizer and the built-in data set's config: as the run began at stage 0, unless --data.* says
    otherwise. The built-in data set is drawn first where the stage needs it (its data or its tokenizer)."""
    start_meta = (own or prev or {"meta": {}})["meta"]
    tokenizer_name = start_meta.get("tokenizer", config.tokenizer)
    token_dir = stage_dir(config, stage) if own else stage_dir(config, stage - 1) if prev else config.data_dir
    try:
        data_config = D.BuiltinConfig(**{**start_meta.get("data_config", {}), **nested["data"]})
    except (TypeError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    if stage == 1 and config.llm_from and own is None:  # real backbones: the LLM folder's own tokenizer
        tokenizer_name, token_dir = "folder", config.llm_from
    if not config.data_path or (tokenizer_name == "builtin" and token_dir == config.data_dir):
        draw_builtin_data(config, data_config, rt)
    chat = config.chat_template or start_meta.get("chat_template", "")
    try:
        if tokenizer_name == "folder":
            return W.tokenizer_from_folder(token_dir, chat), data_config
        tokenizer = replace(D.load_tokenizer(tokenizer_name, token_dir), chat=chat or "chat")
        D.check_chat_format(tokenizer)
        return tokenizer, data_config
    except (FileNotFoundError, RuntimeError, ValueError, W.BadWeights) as e:
        raise SystemExit(f"error: {e}") from None


def draw_builtin_data(config, data_config, rt):
    """The built-in data set in --data_dir, drawn on first use: rank 0 draws, the others wait, then check that
    they see it (several nodes must share the file system)."""
    if rt.rank == 0:
        D.ensure_builtin(config.data_dir, data_config, progress=config.progress)
    rt.barrier()
    P.seen_by_every_rank(os.path.join(config.data_dir, D.BUILTIN_MARKER), rt)
    D.ensure_builtin(config.data_dir, data_config, progress=False)


def stage_batches(stage, config, tokenizer, vlm_config):
    """(training batches, validation batches or None). A validation set smaller than a batch is one short batch."""
    try:
        train = load_stage_data(stage, config, tokenizer, vlm_config, "train")
        val = load_stage_data(stage, config, tokenizer, vlm_config, "val")
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None

    def batches(examples, batch_size, shorten=False):
        size = min(batch_size, len(examples)) if shorten else batch_size
        try:
            return D.Batches(examples, size, vlm_config.vision.image_size, tokenizer.eos_id, seed=config.seed + stage,
                             cache_images=not config.data_path, image_resize=vlm_config.vision.image_resize)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
    if stage == 0:
        return (D.PairedBatches(batches(train[0], config.clip_batch_size), batches(train[1], config.batch_size)),
                None if val is None else D.PairedBatches(batches(val[0], config.clip_batch_size, shorten=True),
                                                         batches(val[1], config.batch_size, shorten=True)))
    return batches(train, config.batch_size), None if val is None else batches(val, config.batch_size, shorten=True)


# ----------------------------------------------------------------------------------------------------------
# The loop: one for every stage


class NonFiniteLoss(RuntimeError):
    pass


def lr_at(step, total, peak, warmup_frac):
    """Linear warmup, then cosine decay to 0 (MoE-LLaVA's schedule: warmup ratio 0.03, cosine)."""
    warmup = max(1, math.ceil(warmup_frac * total))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * progress))


def train_stage(st, config, rt=P.Runtime(), interrupt=None, log=P.print0):
    """Train st from st.meta["step"] to st.iters (or --stop_after steps): set the lr, accumulate the gradients,
    clip, step; log, validate and checkpoint on their intervals. SIGTERM/SIGINT (interrupt): a checkpoint, then
    an exit."""
    start, iters, main = st.meta["step"], st.iters, rt.rank == 0
    st.model.train()
    t_stage = time.time() - st.meta["elapsed_s"]
    if start == 0:
        validate_and_log(st, 0, config, rt, log)
    bar = tqdm(range(start, iters), desc=f"stage {st.number}", disable=not (config.progress and main),
               dynamic_ncols=True)
    say = bar.write if main else (lambda text: None)
    stop = iters if config.stop_after <= 0 else min(iters, start + config.stop_after)
    with interrupt or contextlib.nullcontext():
        for step in bar:
            if step >= stop:
                break
            if interrupt is not None and interrupt.requested(rt):
                bar.close()
                save_stage(st, step, config, rt)
                raise SystemExit(f"stage {st.number}: stopped by a signal before step {step}; the checkpoint in "
                                 f"{st.out} holds step {step}; continue with --resume" if main else 1)
            t0 = synchronized_time(rt.device)
            lr = lr_at(step, iters, st.peak_lr, config.warmup_frac)
            for group in st.optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)  # (a checkpoint from before the ViT group has none)
            losses, tokens, routing, pictured, flops = accumulate_gradients(st, step, config, rt, bar.write)
            if losses is None:  # no readable micro-batch on any rank: no step
                st.optimizer.zero_grad(set_to_none=True)
                update_balance_biases(st.vlm, rt, move=False)
                continue
            if not math.isfinite(losses["loss"]):
                bar.close()
                raise NonFiniteLoss(non_finite_message(st, step, losses["loss"]))
            if not pictured:  # no image anywhere in the step
                st.model.forget_vision_join()
            P.reduce_expert_grads(st.vlm, rt)
            P.clip_grad_norm(st.params, st.vlm, config.grad_clip, rt)
            st.optimizer.step()
            st.optimizer.zero_grad(set_to_none=True)
            update_balance_biases(st.vlm, rt, move=st.number != 4)

            completed = step + 1  # steps done: what the log, validation and checkpoints count
            seconds = synchronized_time(rt.device) - t0
            tok_s = tokens / max(seconds, 1e-9)
            mfu = {} if st.flop_parts is None else {"mfu": flops / max(seconds, 1e-9) / (rt.world * st.peak_flops)}
            bar.set_postfix({k: f"{v:.3f}" for k, v in losses.items()} | {"lr": f"{lr:.1e}", "tok/s": f"{tok_s:.0f}"}
                            | {k: f"{100 * v:.1f}%" for k, v in mfu.items()})
            if completed % config.log_interval == 0 or completed == iters:
                write_log(st, rt, {"step": completed, "lr": lr, "tok_per_s": round(tok_s),
                                   **{k: round(v, 5) for k, v in mfu.items()}, **losses})
            if routing is not None and (completed % config.routing_interval == 0 or completed in (1, iters)):
                write_log(st, rt, {"step": completed, "routing": routing_record(st.vlm, routing, rt)})
            if completed % config.eval_interval == 0 or completed == iters:
                validate_and_log(st, completed, config, rt, say)
            st.meta["elapsed_s"] = time.time() - t_stage
            if completed % config.ckpt_interval == 0 or completed == iters or completed == stop:
                save_stage(st, completed, config, rt, done=completed == iters)
    bar.close()


def accumulate_gradients(st, step, config, rt, warn=print):
    """Forward and backward over this rank's grad_accum micro-batches of optimizer step `step`.

    Returns the mean losses over every rank's micro-batches, the tokens over all ranks, this rank's routing
    counts summed over its micro-batches (routing_counts), and the number of micro-batches with images over all
    ranks; or (None, 0, None, 0) if no rank had a readable micro-batch. A micro-batch whose images are all
    unreadable is skipped (in a distributed run, a stand-in runs at weight 0: data.batch_or_stand_in).
    """
    names = st.loss_names
    sums, tokens, good, routed, pictured, flops = dict.fromkeys(names, 0.0), 0, 0, None, 0, 0.0
    where = f"stage {st.number} step {step}" + (f" (rank {rt.rank})" if rt.distributed else "")
    skipped = lambda reason: warn(f"{where}: {reason}; batch skipped")  # noqa: E731
    for micro in range(config.grad_accum):
        index = P.micro_index(step, micro, config.grad_accum, rt)
        batch, weight = D.batch_or_stand_in(lambda i: st.train[i].to(rt.device), index, st.train.per_epoch,
                                            stand_in=rt.distributed, warn=skipped)
        if batch is None:
            continue
        with P.no_sync(st.train_model, micro == config.grad_accum - 1, rt):
            losses, routing = st.train_model(batch)
            (weight * losses["loss"] / config.grad_accum).backward()
        if routing:  # (a stand-in counts zero: every rank then has counts to all-reduce)
            counts = routing_counts(routing, st.vlm) * int(weight)
            routed = counts if routed is None else routed + counts
        if weight:
            for k in names:
                sums[k] += float(losses[k].detach())
            tokens += batch.num_tokens
            good += 1
            pictured += batch.images is not None
            if st.flop_parts is not None:
                flops += batch_flops(st.flop_parts, batch, st.vlm.num_image_tokens)
    *totals, tokens, good, pictured, flops = rt.sum([sums[k] for k in names] + [tokens, good, pictured, flops])
    if good == 0:
        return None, 0, None, 0, 0.0
    return {k: v / good for k, v in zip(names, totals)}, int(tokens), routed, int(pictured), flops


def update_balance_biases(vlm, rt=P.Runtime(), move=True):
    """Aux-loss-free balancing (moe.BalanceBias, --moe.bias_update_rate): after each step every MoE layer's choice
    bias moves toward the experts that got fewer tokens, by the step's load summed over all ranks. move=False
    only clears the count (a skipped step; stage 4, where the routing stays as stage III left it). A stand-in
    batch at weight 0 (distributed runs) is counted: it repeats one of that rank's real batches."""
    for module in vlm.modules():
        if isinstance(module, MoELayer) and module.balance_bias is not None:
            bias = module.balance_bias
            if move:
                bias.update(torch.tensor(rt.sum(bias.load.tolist()), dtype=bias.load.dtype, device=bias.load.device))
            else:
                bias.load.zero_()


def non_finite_message(st, step, loss):
    kept = (f"{os.path.join(st.out, 'ckpt.pt')} still holds the last good state (step {st.meta['step']}); try a "
            f"lower --stage{st.number}_lr, then --resume" if st.meta["step"] > 0 or st.resumed else
            f"no checkpoint of this stage was written yet; try a lower --stage{st.number}_lr")
    return f"stage {st.number}: the loss became {loss} at step {step}; stopped without saving: {kept}"


def routing_counts(routing, vlm):
    """One micro-batch's RoutingStats as a (L, 4E + 1) tensor per MoE layer: top-k text, top-k image, top-1 text,
    top-1 image counts per expert, then the dropped assignments (summable over micro-batches and ranks). A layer
    that did not run (the vision side, on a batch without images) counts zeros."""
    return torch.stack([torch.zeros(1 + 4 * vlm.moe_config(part).num_experts, dtype=torch.long) if s is None else
                        torch.cat([s.expert_counts.flatten(), s.top1_counts.flatten(), s.dropped.view(1)]).cpu()
                        for (part, _), s in zip(vlm.moe_layer_names(), routing)])


def routing_record(vlm, counts, rt=P.Runtime()):
    """The log's routing record: per MoE layer (its part: vision, projector or llm, and its index there), the
    step's counts over all its micro-batches on every rank."""
    counts = torch.tensor(rt.sum(counts.flatten().tolist())).view(counts.shape).long()
    E = (counts.shape[1] - 1) // 4
    return [{"part": part, "layer": i, "topk_text_image": c[:2 * E].view(2, E).tolist(),
             "top1_text_image": c[2 * E:4 * E].view(2, E).tolist(), "dropped": int(c[-1])}
            for (part, i), c in zip(vlm.moe_layer_names(), counts)]


# ----------------------------------------------------------------------------------------------------------
# Model FLOPs utilisation (MFU): the arithmetic a step's model needs, over what the device can do (as nanoGPT's
# estimate_mfu, and the PaLM paper's definition: recomputation and padding are not counted as useful work)

KNOWN_PEAKS = {"H200": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "A100": 312e12,
               "L40S": 362e12, "L40": 181e12, "L4": 121e12}  # dense bf16 tensor-core FLOP/s, vendors' data sheets


def synchronized_time(device):
    """time.perf_counter() once the device has finished its queued work (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def device_peak_flops(device):
    """(FLOP/s, where the figure comes from): a named GPU's bf16 data-sheet peak; otherwise the rate this device
    reaches on square matmuls in the training dtype (bf16 on CUDA, fp32 on the CPU), measured here."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in sorted(KNOWN_PEAKS.items(), key=lambda kv: -len(kv[0])):  # "L40S" before "L40", "L4"
            if key in name:
                return peak, f"{name}, bf16 data-sheet peak"
    dtype, n = (torch.bfloat16, 4096) if device.type == "cuda" else (torch.float32, 1024)
    a = b = torch.full((n, n), 0.5, device=device, dtype=dtype)  # (not random: training's random stream stays)
    a @ b  # (warm-up)
    fastest = float("inf")
    for _ in range(5):  # the best of five: what the device reaches, not what a busy moment allowed
        t0 = synchronized_time(device)
        a @ b
        fastest = min(fastest, synchronized_time(device) - t0)
    return 2 * n ** 3 / fastest, f"measured: the fastest of five {str(dtype).replace('torch.', '')} {n}x{n} matmuls"


def flop_model(vlm):
    """What batch_flops needs from the VLM, computed once per stage: per part (vision, projector, llm) its active
    parameters that do matmuls, how many of those train, whether gradients flow through it (it, or a part before
    it, trains), and for the transformers their layers x width (the attention term). An MoE layer's experts count
    k / E of their parameters: a token runs k of its E experts."""
    share = {}
    for module in vlm.modules():
        if isinstance(module, MoELayer):
            own = getattr(module.experts, "expert_parameters", module.experts.parameters)  # (LoRA: not the base)
            share.update({id(p): module.config.top_k / module.config.num_experts for p in own()})
    vc, parts, flows = vlm.config.vision, {}, False
    used = vc.select_layer % (vc.layers + 1)  # ViT blocks after the selected layer never run
    blocks = [vlm.vision.blocks[i] for i in range(used)]
    for name, modules, attention in (("vision", blocks, used * vc.width), ("projector", [vlm.projector], 0),
                                     ("llm", [vlm.llm], vlm.config.llm.n_layer * vlm.config.llm.dim)):
        params = {id(p): p for m in modules for p in m.parameters()}.values()
        # an untied token embedding is a lookup, not a matmul (a tied one is also the output head, a matmul)
        lookup = set() if name != "llm" or vlm.config.llm.tie_embeddings else {id(vlm.llm.tok_emb.weight)}
        active = sum(p.numel() * share.get(id(p), 1.0) for p in params if id(p) not in lookup)
        trained = sum(p.numel() * share.get(id(p), 1.0) for p in params if p.requires_grad and id(p) not in lookup)
        flows = flows or trained > 0
        parts[name] = (active, trained, flows, attention)
    return parts


def batch_flops(parts, batch, num_patches):
    """A micro-batch's model FLOPs, forward and backward: per token, 2 per active parameter forward, 2 more for the
    activations' gradients where gradients flow, 2 per trained active parameter for the weights' gradients; and
    attention's 4 x layers x width x context per token forward (the scores and the weighted sum), twice that
    again backward where gradients flow. A whole-model estimate, as nanoGPT's estimate_mfu, not a kernel count."""
    images = 0 if batch.images is None else batch.images.shape[0]
    context = {"vision": num_patches + 1, "projector": 0, "llm": batch.num_tokens / batch.input_ids.shape[0]}
    tokens = {"vision": images * (num_patches + 1), "projector": images * num_patches, "llm": batch.num_tokens}
    total = 0.0
    for name, (active, trained, flows, attention) in parts.items():
        per_token = (2 + 2 * flows) * active + 2 * trained + (1 + 2 * flows) * 4 * attention * context[name]
        total += tokens[name] * per_token
    return total


# ----------------------------------------------------------------------------------------------------------
# Validation: losses on held-out batches, and a quick look at the answers


@torch.no_grad()
def validate(st, config, rt=P.Runtime()):
    """Mean losses over the first eval_batches validation batches, in eval mode (evaluation capacity). The
    batches are shared out over the ranks; every rank runs the same number of forwards (a rank short of one
    repeats its last batch at weight 0), because expert parallelism exchanges tokens inside each forward."""
    if st.val is None:
        return {}
    st.model.eval()
    n = min(config.eval_batches, st.val.per_epoch)
    totals, used = dict.fromkeys(st.loss_names, 0.0), 0.0
    # (i % per_epoch: the stand-in search looks past the last batch and wraps round to the first)
    load = lambda i: st.val.in_order(i % st.val.per_epoch).to(rt.device)  # noqa: E731
    for i in range(rt.rank, -(-n // rt.world) * rt.world, rt.world):
        batch, weight = D.batch_or_stand_in(load, min(i, n - 1), st.val.per_epoch, stand_in=rt.distributed)
        if batch is None:  # unreadable images: left out
            continue
        weight *= float(i < n)
        losses, _ = st.model(batch)
        used += weight
        for k in st.loss_names:
            totals[k] += weight * float(losses[k])
    summed = rt.sum([totals[k] for k in st.loss_names] + [used])
    st.model.train()
    return {f"val_{k}": v / summed[-1] for k, v in zip(st.loss_names, summed[:-1])} if summed[-1] else {}


def validate_and_log(st, step, config, rt, say):
    """Validate, record it in the metadata and the log, and say it. At stage III's step 0 the line also shows
    where stage II ended: upcycling does not change what the model computes, so the two must agree."""
    metrics = validate(st, config, rt)
    if not metrics:
        return
    st.meta["val"] = {"step": step, **metrics}
    write_log(st, rt, {"step": step, **metrics})
    line = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
    before = st.stage2_final_val_ce if step == 0 else None
    if before is not None:
        st.meta["stage2_final_val_ce"] = before
        line += f"  (stage II ended at val_ce {before:.4f}; what stage III adds (experts, LoRA) must not change it)"
    say(f"stage {st.number} step {step}: {line}")


@torch.no_grad()
def answer_check(vlm, tokenizer, config, path, device, n=96, show=3, max_new_tokens=16, log=P.print0,
                 rt=P.Runtime()):
    """A quick look at what the model answers: the first question of n validation conversations, greedy, with the
    exact-match rate (case and a final period ignored). eval.py measures properly; this shows a stage learned.
    Samples that cannot be asked (bad, unreadable image, prompt too long) are left out. Ranks share the prompts."""
    folder = config.image_folder or config.data_dir
    prompts, refs, questions = [], [], []
    files = path.split(",")  # several files: the first n // len(files) of each
    for sample in [sample for file in files for sample in D.read_json(file)[:n // len(files)]]:
        try:
            conv = D.check_conversation(sample, tokenizer.chat)
            image = None if sample.get("image") is None else D.load_image(
                os.path.join(folder, sample["image"]), vlm.config.vision.image_size, vlm.config.vision.image_resize)
        except (D.BadSample, OSError, ValueError, SyntaxError):
            continue
        question = conv[0]["value"].replace(D.IMAGE_PLACEHOLDER, "").strip()
        ids, _ = D.tokenize(D.chat_prompt(question, image is not None, tokenizer.chat), tokenizer, vlm.num_image_tokens)
        if len(ids) + max_new_tokens > vlm.config.llm.max_seq_len:
            continue
        prompts.append((ids, image))
        refs.append(conv[1]["value"])
        questions.append(question)
    if not prompts:
        return None
    vlm.eval()
    mine = rt.mine(list(range(len(prompts))))
    answers = {}
    for chunk in (mine[i:i + 32] for i in range(0, len(mine), 32)):  # generation is local to each rank
        ids, mask = D.prompt_batch([prompts[i][0] for i in chunk], tokenizer.eos_id)
        pixels = [prompts[i][1] for i in chunk if prompts[i][1] is not None]
        pixels = torch.stack(pixels).to(device) if pixels else None
        with autocast(device):
            out = vlm.generate(ids.to(device), pixels, mask.to(device), max_new_tokens=max_new_tokens,
                               eos_id=tokenizer.eos_id)
        for i, row in zip(chunk, out.tolist()):
            answers[i] = tokenizer.decode([t for t in row if t != tokenizer.eos_id]).strip()
    vlm.train()
    norm = lambda a: a.strip().lower().rstrip(".")  # noqa: E731
    right, total = rt.sum([sum(norm(answers[i]) == norm(refs[i]) for i in mine), len(mine)])
    for i in mine[:show]:
        log(f"  Q: {questions[i]}  A: {answers[i]!r}  (reference {refs[i]!r})")
    log(f"  exact match on the first question of {int(total)} validation conversations: {100 * right / total:.1f}%")
    return right / total


# ----------------------------------------------------------------------------------------------------------
# Checkpoints: model.save_checkpoint's file, with whole experts; the log; resuming exactly


def save_stage(st, step, config, rt, done=False):
    """Checkpoint the stage at `step`. Every rank takes part (expert shards are gathered); rank 0 writes."""
    st.meta.update(step=step, done=done,
                   data_position={"micro_batches_consumed": step * config.grad_accum * rt.world})
    model_state = P.whole_model_state(st.vlm, keep=rt.rank == 0)
    optimizer_state = P.whole_optimizer_state(st.optimizer, st.vlm, rt)
    if rt.rank == 0:
        extra = {"head": st.head.state_dict()} if st.head is not None else None
        save_checkpoint(st.out, model_state, optimizer_state, st.meta, extra)
    rt.barrier()  # the checkpoint is whole before any rank reads it (the next stage, a restart)


def resume(st, own, config, rt, log):
    """Continue from the stage's own checkpoint: its optimizer state, RNG and step. Only if what decides the
    batches and the schedule is unchanged (RESUME_MUST_MATCH), so the run continues exactly."""
    was = dict(own["meta"]["train_config"], iters=own["meta"]["iters"],
               global_batch=own["meta"].get("global_batch", own["meta"]["train_config"]["batch_size"] *
                                            own["meta"]["train_config"]["grad_accum"]))
    now = dict(asdict(config), iters=st.iters, global_batch=st.meta["global_batch"])
    differ = [k for k in RESUME_MUST_MATCH + (f"stage{st.number}_lr",) if was.get(k) != now[k]]
    if differ:
        raise SystemExit(f"error: {st.out} was trained with " + ", ".join(f"{k}={was.get(k)}" for k in differ)
                         + "; resume with the same values")
    st.optimizer.load_state_dict(P.sharded_optimizer_state(own["optimizer"], st.optimizer, st.vlm, rt))
    torch.set_rng_state(own["rng_cpu"])
    if "rng_cuda" in own and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(own["rng_cuda"])
    st.meta = dict(own["meta"], world_size=rt.world)
    st.resumed = True
    if not st.meta["done"]:
        log(f"stage {st.number}: resuming at step {st.meta['step']} of {st.iters}")


def prepare_output(st, rt):
    """The stage's folder with its tokenizer; a resumed log keeps only the lines up to the checkpoint."""
    if rt.rank == 0:
        os.makedirs(st.out, exist_ok=True)
        save_tokenizer(st.tokenizer, st.out)
        keep_log_lines(os.path.join(st.out, "log.jsonl"), st.meta["step"])


def save_tokenizer(tokenizer, directory):
    """A checkpoint folder is self-contained: the built-in BPE (the one this model reads) is written into it."""
    if tokenizer.name == "builtin":
        D.save_bpe(os.path.join(directory, D.BUILTIN_TOKENIZER_FILE), tokenizer.encoding._mergeable_ranks)
    source = os.path.join(tokenizer.folder, "tokenizer.json")
    if tokenizer.name == "folder" and os.path.abspath(source) != os.path.abspath(os.path.join(directory,
                                                                                                "tokenizer.json")):
        shutil.copyfile(source, os.path.join(directory, "tokenizer.json"))  # a model folder's, as it was


def write_log(st, rt, record):
    if rt.rank == 0:
        with open(os.path.join(st.out, "log.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")


def keep_log_lines(path, upto_step):
    """On resume, forget log lines written after the checkpoint, so the log reads as one uninterrupted run."""
    if not os.path.exists(path):
        return
    if upto_step == 0:
        os.remove(path)
        return

    def before(line):
        try:
            return json.loads(line)["step"] <= upto_step
        except (ValueError, KeyError, TypeError):  # a line cut short by the interruption
            return False
    with open(path) as f:
        lines = [ln for ln in f if before(ln)]
    with open(path + ".tmp", "w") as f:
        f.writelines(lines)
    os.replace(path + ".tmp", path)


# ----------------------------------------------------------------------------------------------------------
# Command line and main: --stage, then any TrainConfig field as --name=value, and --llm.X / --vision.X /
# --moe.X / --data.X for the model's and the built-in data set's config fields


NESTED = {"llm": LLMConfig, "vision": ViTConfig, "moe": MoEConfig, "data": D.BuiltinConfig}
NOT_OPTIONS = {"llm.vocab_size", "llm.moe_layers", "vision.moe_layers",  # the tokenizer; and set at stage III by
               "llm.lora_targets", "llm.mole_layers", "llm.lora_rank", "llm.lora_alpha", "llm.lora_dropout"}  # ours


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Options are type-checked; an unknown option is an error.")
    p.add_argument("--stage", required=True, choices=["0", "1", "2", "3", "4", "all"],
                   help="which stage to run; all: 0 to 3 (4, LoRA fine-tuning of stage III, is run on its own)")
    D.add_options(p, TrainConfig)
    p.add_argument("--projector", choices=["linear", "mlp2x_gelu"], default=None, help="stage 0: projector kind")
    for prefix, cls in NESTED.items():
        D.add_options(p, cls, prefix=f"{prefix}.", skip=NOT_OPTIONS)
    return p


def previous_stage_choice(out_dir, stage, name):
    """Without --preset (--recipe), stage N keeps the preset (recipe) stage N-1 was trained with."""
    path = os.path.join(out_dir, f"stage{stage - 1}", "meta.json")
    if stage == 0 or not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)["train_config"].get(name)


def parse_args(argv):
    """-> (stages to run, TrainConfig, {prefix: {field: value}} overrides of the nested configs)."""
    args = vars(build_parser().parse_args(argv))
    stage = args.pop("stage")
    stages = list(STAGES) if stage == "all" else [int(stage)]
    preset = args["preset"] or previous_stage_choice(args["out_dir"] or "out", stages[0], "preset") or "tiny"
    if preset not in TRAIN_PRESETS:
        raise SystemExit(f"error: --preset={preset} is not one of {sorted(TRAIN_PRESETS)}")
    given = {k: v for k, v in args.items() if v is not None and "." not in k and k != "projector"}
    recipe = args["recipe"] or previous_stage_choice(args["out_dir"] or "out", stages[0], "recipe") or "moe-llava"
    if recipe not in RECIPES:
        raise SystemExit(f"error: --recipe={recipe} is not one of {sorted(RECIPES)}")
    config = replace(TRAIN_PRESETS[preset], **{**RECIPES[recipe]["train"], "recipe": recipe, **given})  # given wins
    nested = {prefix: {} for prefix in NESTED}
    nested["moe"] = dict(RECIPES[recipe]["moe"])
    nested["data"] = dict(PRESET_DATA.get(preset, {}))
    for key, value in args.items():
        if "." in key and value is not None:
            prefix, name = key.split(".")
            nested[prefix][name] = value
    if args["projector"]:
        nested["projector"] = args["projector"]
    if config.moe_from_stage not in (2, 3) or (config.moe_from_stage == 2 and config.stage3_train == "lora"):
        raise SystemExit(f"error: --moe_from_stage={config.moe_from_stage} must be 3 (MoE-Tuning) or 2, and 2 "
                         "leaves no stage for LoRA experts (--recipe=mole)")
    if config.stage3_train not in ("moe", "all", "lora"):
        raise SystemExit(f"error: --stage3_train={config.stage3_train} must be moe, all or lora")
    if (config.vision_from or config.llm_from) and (stages != [1] or not (config.vision_from and config.llm_from)):
        raise SystemExit("error: --vision_from and --llm_from go together, with --stage 1 (real backbones start "
                         "at stage I; later stages read its checkpoint)")
    if config.preset == "pretrained" and 0 in stages:
        raise SystemExit("error: --preset=pretrained has no stage 0: run --stage 1 with --vision_from and --llm_from")
    if config.grad_checkpointing and config.ep_size > 1:
        raise SystemExit("error: --grad_checkpointing would repeat expert parallelism's exchanges in the backward "
                         "pass; use it with --ep_size=1")
    if config.data_path and len(stages) > 1:
        raise SystemExit("error: --data_path names one stage's data; run the stages one at a time with it")
    if config.global_batch and given.get("grad_accum") not in (None, 1):
        raise SystemExit("error: --global_batch sets the accumulation itself; give it or --grad_accum, not both")
    least_values = {"batch_size": 1, "clip_batch_size": 1, "grad_accum": 1, "global_batch": 0, "ep_size": 1,
                    "eval_batches": 1, "eval_interval": 1, "log_interval": 1, "routing_interval": 1, "ckpt_interval": 1}
    for name, least in least_values.items():
        if getattr(config, name) < least:
            raise SystemExit(f"error: --{name}={getattr(config, name)} must be at least {least}")
    return stages, config, nested


def run_stage(stage, config, nested, rt=P.Runtime(), interrupt=None, log=P.print0):
    """Set a stage up, train it, and (stages II-III) look at its answers; returns its final metadata. Raises
    SystemExit for user errors, NonFiniteLoss on a NaN/inf loss."""
    st = setup_stage(stage, config, nested, rt, log)
    if st.meta["done"]:
        log(f"stage {stage}: already complete in {st.out} ({st.meta['step']} steps); nothing to resume")
        return st.meta
    prepare_output(st, rt)
    train_stage(st, config, rt, interrupt, log)
    if st.meta["done"] and stage >= 2 and (config.val_data_path or not config.data_path):
        path = config.val_data_path or os.path.join(config.data_dir, "instruct_val.json")
        checker = P.whole_model_copy(st.vlm)  # (experts spread: generation is not in lockstep between ranks)
        st.meta["val_answer_match"] = answer_check(checker, st.tokenizer, config, path, rt.device, log=log, rt=rt)
        if rt.rank == 0:
            write_meta(st.out, st.meta)  # the readable copy also records the answer check
    if st.meta["step"] < st.iters:
        log(f"stage {stage}: stopped after step {st.meta['step']} of {st.iters} (--stop_after); continue with --resume")
    else:
        log(f"stage {stage}: done in {st.meta['elapsed_s']:.0f} s; checkpoint {os.path.join(st.out, 'ckpt.pt')}")
    return st.meta


def main(argv=None):
    stages, config, nested = parse_args(sys.argv[1:] if argv is None else argv)
    rt = P.compute_init(config.device, config.ep_size)
    interrupt = P.Interrupt() if argv is None else None  # signal handlers for the command line, not for callers
    summary = []
    try:
        if config.global_batch:  # the global batch fixes the accumulation for this world size
            per_step = config.batch_size * rt.world
            if config.global_batch % per_step:
                raise SystemExit(f"error: --global_batch={config.global_batch} is not a multiple of --batch_size="
                                 f"{config.batch_size} x {rt.world} processes")
            config = replace(config, grad_accum=config.global_batch // per_step)
        for stage in stages:
            try:
                meta = run_stage(stage, config, nested, rt=rt, interrupt=interrupt)
            except NonFiniteLoss as e:
                raise SystemExit(f"error: {e}") from None
            summary.append(meta)
            if not meta["done"]:
                break
    finally:
        P.compute_cleanup(rt)
    if len(summary) > 1:
        P.print0("\nstage  steps  time (s)  validation (answers: exact match on the first question)")
        for m in summary:
            val = ", ".join(f"{k} {v:.4f}" for k, v in m["val"].items() if k != "step")
            if m.get("val_answer_match") is not None:
                val += f", answers {100 * m['val_answer_match']:.1f}%"
            P.print0(f"{m['stage']:>5}  {m['step']:>5}  {m['elapsed_s']:>8.0f}  {val}")
    return summary


if __name__ == "__main__":
    main()
