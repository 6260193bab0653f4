"""Time per stage-III training step of the recipes, side by side: MoE-LLaVA, CuMo, LLaVA-MoLE, plain LoRA, dense.

    python tests/bench_recipes.py                       # tiny preset, CPU (or the GPU if there is one)
    python tests/bench_recipes.py --preset small --steps 50 --batch_size 32

Each model is the preset's, set up as stage III sets it up (train.py: upcycling, set_trainable, AdamW, the
ViT's learning-rate scale), and trained on the same synthetic batches: every sample an image (its patch
tokens) followed by --text_tokens supervised tokens, the length of a built-in conversation. The rounds
interleave the models, so that a noisy machine slows them alike; the table gives the median time per step
over the rounds after the first, and each model's parameters (total and active per token).
"""
import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from dataclasses import replace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402
from model import IGNORE_INDEX, IMAGE_TOKEN_INDEX, PRESETS, VLM, autocast, param_counts  # noqa: E402
from moe import MoEConfig  # noqa: E402

RECIPES = {  # name: the train.py options that make its stage III
    "MoE-LLaVA (experts in the LLM)": [],
    "CuMo (experts in the ViT and projector)": ["--recipe=cumo"],
    "LLaVA-MoLE (LoRA experts, frozen model)": ["--recipe=mole"],
    "plain LoRA (frozen model)": ["--recipe=mole", "--mole_layers=", "--lora_targets=attention,mlp"],
    "dense (CuMo's recipe, no experts)": ["--recipe=cumo", "--vision_moe_layers=", "--projector_moe=false"],
}


def stage3_model(preset, options, device):
    """The preset's VLM upcycled and frozen as train.py's stage III would, with its optimizer."""
    _, config, nested = train.parse_args(["--stage", "3", f"--preset={preset}", "--out_dir=/nonexistent", *options])
    torch.manual_seed(0)
    vlm = VLM(PRESETS[preset]).to(device)
    moe = replace(MoEConfig(), **nested["moe"])
    vlm.upcycle_to_moe(config.moe_layers, moe, config.vision_moe_layers, config.projector_moe)
    if config.lora_targets or config.mole_layers:
        vlm.add_lora(config.lora_targets, config.mole_layers, moe, config.lora_rank, config.lora_alpha)
    vlm.to(device)
    train.set_trainable(3, vlm, config)
    vision = set(map(id, vlm.vision.parameters()))
    params = [p for p in vlm.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if id(p) not in vision], "lr": config.stage3_lr},
              {"params": [p for p in params if id(p) in vision], "lr": config.stage3_lr * config.vit_lr_scale}]
    return vlm, torch.optim.AdamW([g for g in groups if g["params"]])


def synthetic_batch(vlm, batch_size, text_tokens, device, seed):
    g = torch.Generator().manual_seed(seed)
    P, size = vlm.num_image_tokens, vlm.config.vision.image_size
    text = torch.randint(0, vlm.config.llm.vocab_size, (batch_size, text_tokens), generator=g)
    ids = torch.cat([text[:, :2], torch.full((batch_size, P), IMAGE_TOKEN_INDEX), text[:, 2:]], dim=1)
    labels = ids.masked_fill(ids == IMAGE_TOKEN_INDEX, IGNORE_INDEX)
    images = torch.randn(batch_size, 3, size, size, generator=g)
    return ids.to(device), images.to(device), labels.to(device)


def step(vlm, optimizer, batch, device):
    with autocast(device):
        loss = vlm(*batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--steps", type=int, default=20, help="rounds; each runs one step of every model (default 20)")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--text_tokens", type=int, default=40)
    p.add_argument("--device", default="auto", help="auto: cuda if available, else cpu")
    args = p.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    models = {name: stage3_model(args.preset, options, device) for name, options in RECIPES.items()}
    batch = synthetic_batch(next(iter(models.values()))[0], args.batch_size, args.text_tokens, device, 0)
    times = {name: [] for name in models}
    for _ in range(args.steps):
        for name, (vlm, optimizer) in models.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step(vlm, optimizer, batch, device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    where = torch.cuda.get_device_name() if device.type == "cuda" else \
        f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads, {platform.machine()})"
    print(f"# {datetime.date.today()}, torch {torch.__version__}, {where}, "
          f"`python tests/bench_recipes.py {' '.join(sys.argv[1:])}`".rstrip())
    image_tokens = next(iter(models.values()))[0].num_image_tokens
    print(f"# preset {args.preset}, stage III, batch {args.batch_size} x ({image_tokens} image + {args.text_tokens} "
          f"text tokens), median of rounds 2..{args.steps}")
    print("| recipe | parameters: total / active per token / trained | ms per step | vs dense |")
    print("|---|---|---|---|")
    medians = {name: statistics.median(t[1:]) for name, t in times.items()}
    dense = medians[list(RECIPES)[-1]]
    for name, (vlm, _) in models.items():
        c = param_counts(vlm)
        print(f"| {name} | {c['total'] / 1e6:.2f}M / {c['active'] / 1e6:.2f}M / {c['trainable'] / 1e6:.2f}M | "
              f"{1000 * medians[name]:.0f} | {medians[name] / dense:.2f}x |")


if __name__ == "__main__":
    main()
