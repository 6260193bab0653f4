"""
train.py -- MoE-Tuning: the stages that turn a ViT and a small LLM into a sparse vision-language model.

    python train.py --stage all                 # stages 0 -> I -> II -> III on the built-in data (tiny preset)
    python train.py --stage 3                   # only stage III, from {out_dir}/stage2/
    python train.py --stage 2 --resume          # continue an interrupted stage II exactly where it stopped
    python train.py --stage 3 --moe.num_experts=8 --moe.top_k=1 --moe_layers=dense   # any config field
    python train.py --help                      # every option, with its default

The stages (MoE-LLaVA, arXiv 2401.15947, section 3.2 and Fig. 3; their table is in ../shared/REFERENCE.md):
  stage 0   ours, because no pretrained weights can be downloaded here: pretrain the backbones from scratch --
            the ViT CLIP-style (contrastive image-caption loss against a small text tower, vision.CLIPHead) and
            the LLM by next-token prediction on the built-in text. With real pretrained backbones (a CLIP ViT,
            Phi-2 or Qwen) this stage is skipped.
  stage I   the projector only (ViT and LLM frozen) on image-caption pairs, `plain` template, lr 1e-3:
            the LLM learns to read image features.
  stage II  the LLM and the projector (ViT frozen) on instruction conversations, chat template.
  stage III each FFN of the chosen layers (default `sparse`: every other one) becomes an MoE layer whose 4 experts
            start as copies of it (sparse upcycling); the experts and routers train (and the projector, as in the
            official code; --train_projector_stage3=false freezes it). Loss = CE + 0.01 * sum of balancing losses.

Each stage reads {out_dir}/stage{N-1}/ckpt.pt and writes {out_dir}/stage{N}/: ckpt.pt (model, optimizer, RNG, and
the metadata as JSON), meta.json (a readable copy of the metadata), log.jsonl, and the tokenizer.
Devices: CUDA (bf16 autocast) when present, else CPU in fp32; --device=cpu forces the CPU.

From one GPU to many (torch.distributed; NCCL on CUDA, gloo on CPU, chosen automatically):
    python train.py --stage all --preset small                                     # one GPU (or the CPU)
    torchrun --standalone --nproc_per_node=8 train.py --stage all --preset small --global_batch=256   # 8 GPUs
    torchrun --nnodes=2 --node_rank=$NODE_RANK --nproc_per_node=8 --rdzv_backend=c10d \
        --rdzv_endpoint=$HEAD_NODE:29500 --rdzv_id=moe-llava --max-restarts=3 \
        train.py --stage all --preset small --global_batch=512 --resume          # 2 nodes: run on each node
    torchrun --standalone --nproc_per_node=4 train.py --stage 3 --ep_size=4       # experts spread over 4 ranks
Each rank reads its own micro-batches; the global batch (--global_batch = batch_size x grad_accum x ranks) fixes
the accumulation, and the same global batch trains the same model whatever the number of ranks. Only rank 0
prints and writes; several nodes must share one file system for --out_dir and --data_dir. SIGTERM / SIGINT
(to torchrun, which passes them on) write a checkpoint at the end of the step and exit: the same command with
--resume continues from it. torchrun --max-restarts relaunches after a failed rank, and --resume then continues
from the last periodic checkpoint (a stage without a checkpoint starts from its beginning).

Structure: configuration -> command line -> data per stage -> model per stage (which parameters train) ->
checkpoints -> the loop (one for all stages) -> main.
"""
import argparse
import contextlib
import dataclasses
import json
import inspect
import math
import os
import re
import signal
import sys
import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

import data as D
from model import PRESETS, VLM, LLMConfig, VLMConfig, lm_loss, moe_layer_indices, param_counts
from moe import MoEConfig, MoELayer, expert_shard, gather_experts
from vision import CLIPHead, ViTConfig

# ----------------------------------------------------------------------------------------------------------
# Configuration: every default lives here; the command line overrides any field


@dataclass(frozen=True)
class TrainConfig:
    preset: str = "tiny"  # model size: tiny (CPU, minutes) or small (one GPU)
    out_dir: str = "out"  # stage N writes {out_dir}/stage{N}/
    data_dir: str = "data/builtin"  # the built-in data set; written there on first use
    data_path: str = ""  # a LLaVA-format JSON to train this stage on instead of the built-in data
    val_data_path: str = ""  # its validation file (without one, validation is skipped for user data)
    image_folder: str = ""  # where the JSON's image paths are relative to (default: data_dir)
    tokenizer: str = "builtin"  # builtin (learned from the built-in corpus) or a tiktoken name: gpt2, cl100k_base
    seed: int = 1337
    device: str = "auto"  # auto: cuda if available, else cpu
    compile: bool = False  # torch.compile the VLM's forward (stages I-III)
    batch_size: int = 16  # samples per micro-step on each rank
    grad_accum: int = 1  # micro-steps per optimizer step (set from global_batch when that is given)
    global_batch: int = 0  # samples per optimizer step over all ranks; 0: batch_size x grad_accum x world size
    clip_batch_size: int = 32  # stage 0: image-caption pairs per contrastive batch (negatives come from the batch)
    stage0_iters: int = 600  # optimizer steps per stage (MoE-LLaVA trains each stage for 1 epoch)
    stage1_iters: int = 300
    stage2_iters: int = 1500
    stage3_iters: int = 600
    stage0_lr: float = 1e-3
    stage1_lr: float = 1e-3  # MoE-LLaVA stage I
    stage2_lr: float = 1e-3  # MoE-LLaVA uses 2e-5 on pretrained billion-parameter LLMs; ours is small and young
    stage3_lr: float = 2e-4  # experts start trained, so a lower peak than stage II
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
    moe_layers: str = "sparse"  # stage III: which FFNs become MoE layers (sparse, dense, first_half, second_half, 0,2)
    ep_size: int = 1  # stage III: spread each MoE layer's experts over this many ranks (expert parallelism)
    train_projector_stage3: bool = True  # the official stage III leaves the projector trainable
    max_bad_fraction: float = 0.05  # more bad samples than this stops at load time
    resume: bool = False  # continue the stage from its own checkpoint
    progress: bool = True  # show a progress bar


TRAIN_PRESETS = {
    "tiny": TrainConfig(),
    # sized for one GPU by arithmetic, not yet measured on one
    "small": TrainConfig(preset="small", batch_size=32, clip_batch_size=256, stage0_iters=3000, stage1_iters=500,
                         stage2_iters=3000, stage3_iters=1500, stage0_lr=6e-4, stage2_lr=3e-4, stage3_lr=1e-4,
                         eval_interval=500, ckpt_interval=500),
}
STAGES = (0, 1, 2, 3)
# what decides the batches and the schedule: --resume continues a stage only if these are unchanged
RESUME_MUST_MATCH = ("iters", "seed", "batch_size", "global_batch", "clip_batch_size", "warmup_frac")

# ----------------------------------------------------------------------------------------------------------
# Command line: --stage, then any TrainConfig field as --name=value, and --llm.X / --vision.X / --moe.X /
# --data.X for the model's and the built-in data set's config fields.

NESTED = {"llm": LLMConfig, "vision": ViTConfig, "moe": MoEConfig, "data": D.BuiltinConfig}
NOT_OPTIONS = {"llm.vocab_size", "llm.moe_layers"}  # set by the tokenizer, and by --moe_layers at stage III


def parse_bool(text):
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_field(parser, name, f, help):
    """--name=value with the field's type; a bool may also be given as a bare flag (--resume)."""
    kind = type(f.default)
    extra = {"nargs": "?", "const": True} if kind is bool else {}
    parser.add_argument(f"--{name}", type=parse_bool if kind is bool else kind, default=None, dest=name,
                        metavar=kind.__name__.upper(), help=help, **extra)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Options are type-checked; an unknown option is an error.")
    p.add_argument("--stage", required=True, choices=["0", "1", "2", "3", "all"], help="which stage to run")
    helps = field_help(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        add_field(p, f.name, f, f"{helps.get(f.name, '')} (default {f.default!r})")
    p.add_argument("--projector", choices=["linear", "mlp2x_gelu"], default=None, help="stage 0: projector kind")
    for prefix, cls in NESTED.items():
        helps = field_help(cls)
        for f in dataclasses.fields(cls):
            if f"{prefix}.{f.name}" in NOT_OPTIONS or f.default_factory is not dataclasses.MISSING:
                continue
            add_field(p, f"{prefix}.{f.name}", f, f"{helps.get(f.name, cls.__name__)} (default {f.default!r})")
    return p


def preset_of_previous_stage(out_dir, stage):
    """Without --preset, stage N keeps the preset stage N-1 was trained with (its steps, batch and lr sizes)."""
    path = os.path.join(out_dir, f"stage{stage - 1}", "meta.json")
    if stage == 0 or not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)["train_config"]["preset"]


def field_help(cls):
    """Each field's help text is the comment beside it in the dataclass: one place documents a default."""
    lines = inspect.getsource(cls).splitlines()
    found = (re.match(r"\s+(\w+): \w+ = .*?#\s*(.*)$", line) for line in lines)
    return {m.group(1): m.group(2) for m in found if m}


def parse_args(argv):
    """-> (stages to run, TrainConfig, {prefix: {field: value}} overrides of the nested configs)."""
    args = vars(build_parser().parse_args(argv))
    stage = args.pop("stage")
    stages = list(STAGES) if stage == "all" else [int(stage)]
    preset = args["preset"] or preset_of_previous_stage(args["out_dir"] or "out", stages[0]) or "tiny"
    if preset not in TRAIN_PRESETS:
        raise SystemExit(f"error: --preset={preset} is not one of {sorted(TRAIN_PRESETS)}")
    given = {k: v for k, v in args.items() if v is not None and "." not in k and k != "projector"}
    config = replace(TRAIN_PRESETS[preset], **given)
    nested = {prefix: {} for prefix in NESTED}
    for key, value in args.items():
        if "." in key and value is not None:
            prefix, name = key.split(".")
            nested[prefix][name] = value
    if args["projector"]:
        nested["projector"] = args["projector"]
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


# ----------------------------------------------------------------------------------------------------------
# Distributed: one process per device under torchrun; `python train.py` is the case world = 1
#
# Data parallel: every rank holds the whole model (DistributedDataParallel averages the gradients) and reads its
# own micro-batches. Expert parallel (--ep_size, stage III): the ranks of an expert-parallel group hold E / ep
# experts each and exchange tokens (moe.dispatch_expert_parallel); an expert's gradient is averaged only over the
# ranks that hold the same shard.


@dataclass
class Runtime:
    """Where this process runs: rank `rank` of `world` processes, its device, and the expert-parallel groups."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    ep_group: object = None  # ep_size consecutive ranks that hold one copy of every expert between them
    edp_group: object = None  # the ranks that hold the same expert shard (every ep_size-th): they average its grads

    @property
    def distributed(self):
        return self.world > 1


def print0(*args, **kwargs):
    """print on rank 0 only (torchrun sets RANK; a plain `python train.py` is rank 0)."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


def compute_init(config):
    """Start torch.distributed when launched by torchrun (NCCL on CUDA, gloo on CPU); else a 1-process Runtime."""
    cuda = torch.cuda.is_available() and config.device in ("auto", "cuda")
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        if config.ep_size > 1:
            raise SystemExit(f"error: --ep_size={config.ep_size} needs that many processes: launch with torchrun "
                             f"--nproc_per_node={config.ep_size} (see the docstring)")
        device = torch.device("cuda" if cuda else "cpu") if config.device == "auto" else torch.device(config.device)
        return Runtime(device=device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if world % config.ep_size:
        raise SystemExit(f"error: --ep_size={config.ep_size} must divide the number of processes ({world})")
    if cuda and local_rank >= torch.cuda.device_count():
        raise SystemExit(f"error: rank {rank} wants GPU {local_rank}, but this node has {torch.cuda.device_count()}: "
                         f"use at most that many --nproc_per_node, or --device=cpu")
    if cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    dist.init_process_group("nccl" if cuda else "gloo")
    rt = Runtime(rank=rank, world=world, device=device)
    if config.ep_size > 1:  # every rank creates every group, in the same order (torch.distributed's rule)
        ep = config.ep_size
        for first in range(0, world, ep):
            group = dist.new_group(list(range(first, first + ep)))
            if first <= rank < first + ep:
                rt.ep_group = group
        for offset in range(ep):
            group = dist.new_group(list(range(offset, world, ep)))
            if rank % ep == offset:
                rt.edp_group = group
    return rt


def seen_by_every_rank(path, rt):
    """Several nodes must share one file system for --out_dir and --data_dir: one clear error (on every rank,
    so that none waits for the others) if some ranks see `path` and others do not."""
    seen = all_reduce_sum([float(os.path.exists(path))], rt)[0]
    if 0 < seen < rt.world:
        raise SystemExit(f"error: {path} exists for {seen:.0f} of {rt.world} ranks: on several nodes, --out_dir "
                         "and --data_dir must be on a file system that every node shares" if rt.rank == 0 else 1)


def all_reduce_sum(values, rt):
    """Sum a list of numbers over all ranks (one all_reduce); unchanged in a single process."""
    if not rt.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=rt.device)
    dist.all_reduce(t)
    return t.tolist()


def expert_layers(vlm):
    """The MoE layers whose experts are sharded over an expert-parallel group."""
    return [m for m in vlm.modules() if isinstance(m, MoELayer) and m.ep_group is not None]


def full_model_state(vlm, keep=True):
    """The model's state dict with every expert whole (gathered from the expert-parallel group): a checkpoint
    written with --ep_size loads anywhere. Every rank must call it (all_gather); keep=False takes part and keeps
    nothing. The whole experts go to the CPU: the device holds one gathered tensor at a time beside its shard."""
    state = vlm.state_dict() if keep else {}
    for name, module in vlm.named_modules():
        if isinstance(module, MoELayer) and module.ep_group is not None:
            for pname, p in module.experts.named_parameters():
                whole = gather_experts(p.detach(), module.ep_group)
                if keep:
                    state[f"{name}.experts.{pname}"] = whole.cpu()
    return state


def expert_param_groups(vlm):
    return {p: m.ep_group for m in expert_layers(vlm) for p in m.experts.parameters()}


def convert_optimizer_state(state, optimizer, vlm, convert):
    """A copy of an optimizer state dict with every expert-shaped state tensor converted (gathered or sliced)."""
    groups = expert_param_groups(vlm)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state = {**state, "state": dict(state["state"])}
    for i, p in enumerate(params):
        if p in groups and i in state["state"]:
            state["state"][i] = {key: convert(t, groups[p]) if torch.is_tensor(t) and t.dim() > 0 else t
                                 for key, t in state["state"][i].items()}
    return state


def reduce_expert_grads(vlm, rt):
    """DDP averages every other gradient over all ranks. An expert shard's gradient already sums the tokens its
    expert-parallel group sent it; summed over the ranks holding the same shard and divided by the world size,
    it is the same average."""
    for module in expert_layers(vlm):
        for p in module.experts.parameters():
            if p.grad is not None:
                if rt.edp_group is not None and dist.get_world_size(rt.edp_group) > 1:
                    dist.all_reduce(p.grad, group=rt.edp_group)
                p.grad.div_(rt.world)


def clip_grad_norm(params, vlm, max_norm, rt):
    """torch.nn.utils.clip_grad_norm_, with the expert shards' squares summed over their group, so that every
    rank computes the same global norm and the replicated parameters stay identical."""
    experts = expert_param_groups(vlm)
    if not experts:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    grads = [p.grad for p in params if p.grad is not None and p not in experts]
    shard = [p.grad for p in params if p.grad is not None and p in experts]
    replicated_sq = sum((g.float().pow(2).sum() for g in grads), torch.zeros((), device=rt.device))
    shard_sq = sum((g.float().pow(2).sum() for g in shard), torch.zeros((), device=rt.device))
    dist.all_reduce(shard_sq, group=rt.ep_group)
    norm = (replicated_sq + shard_sq).sqrt()
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for p in params:
        if p.grad is not None:
            p.grad.mul_(scale)
    return norm


class Interrupt:
    """SIGTERM / SIGINT ask for a checkpoint at the end of the current step, then an exit (a second SIGINT
    stops at once); --resume continues from that checkpoint. Under torchrun the signal goes to torchrun, which
    passes it on to every rank and kills them after --shutdown-timeout seconds."""

    def __init__(self):
        self.signal, self.previous = None, {}

    def __enter__(self):  # armed during the training loop only: elsewhere Ctrl-C stops at once, as usual
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def handle(self, signum, frame):
        if self.signal == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum

    def requested(self, rt):
        """Whether any rank was signalled (all ranks must stop at the same step)."""
        return all_reduce_sum([float(self.signal is not None)], rt)[0] > 0


# ----------------------------------------------------------------------------------------------------------
# Data per stage


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
    load = lambda path, **kw: D.load_examples(path, folder, tokenizer, max_len=max_len,  # noqa: E731
                                              max_bad_fraction=config.max_bad_fraction, log=print0, **kw)
    if stage == 0:
        # CLIP reads the caption alone (the image goes to the ViT, not into the text): no image tokens
        pairs = load(path, template="plain", num_image_tokens=0)
        # the LLM learns language from every text of the stage II data (or the user's file), images left out
        text_path = user_file or os.path.join(config.data_dir, f"instruct_{split}.json")
        text = load(text_path, template="chat", num_image_tokens=0, supervise_all=True, keep_images=False)
        return pairs, text
    template = "plain" if stage == 1 else "chat"
    return load(path, template=template, num_image_tokens=vlm_config.vision.num_patches)


# ----------------------------------------------------------------------------------------------------------
# Model per stage, and which of its parameters train: MoE-Tuning is mostly a matter of freezing


def vlm_config_from_dict(d):
    llm = dict(d["llm"], moe=MoEConfig(**d["llm"]["moe"]))
    return VLMConfig(vision=ViTConfig(**d["vision"]), llm=LLMConfig(**llm), projector=d["projector"])


def initial_vlm_config(config, nested, tokenizer):
    """Stage 0 builds the model from the preset, the tokenizer's vocabulary and any --llm./--vision. overrides."""
    base = PRESETS[config.preset]
    try:
        return VLMConfig(vision=replace(base.vision, **nested["vision"]),
                         llm=replace(base.llm, vocab_size=tokenizer.vocab_size, **nested["llm"]),
                         projector=nested.get("projector", base.projector))
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def set_trainable(stage, vlm, config):
    """Freeze everything, then unfreeze what this stage trains (MoE-LLaVA Fig. 3). Returns the trained names."""
    for p in vlm.parameters():
        p.requires_grad_(False)
    if stage == 0:
        trained = [vlm.vision, vlm.llm]  # the projector waits for stage I
    elif stage == 1:
        trained = [vlm.projector]
    elif stage == 2:
        trained = [vlm.llm, vlm.projector]
    else:
        trained = [m for m in vlm.llm.modules() if isinstance(m, MoELayer)]  # experts and routers
        if config.train_projector_stage3:
            trained.append(vlm.projector)
    for module in trained:
        for p in module.parameters():
            p.requires_grad_(True)
    return [n for n, p in vlm.named_parameters() if p.requires_grad]


# ----------------------------------------------------------------------------------------------------------
# Checkpoints: one file, written atomically; the metadata inside it is the truth, meta.json a readable copy


def save_checkpoint(directory, model_state, optimizer_state, meta, extra=None):
    os.makedirs(directory, exist_ok=True)
    state = {"model": model_state, "optimizer": optimizer_state, "meta": json.dumps(meta),
             "rng_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["rng_cuda"] = torch.cuda.get_rng_state_all()
    if extra:
        state.update(extra)
    path = os.path.join(directory, "ckpt.pt")
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)  # a crash mid-write leaves the previous checkpoint whole
    D.write_json(os.path.join(directory, "meta.json"), meta)


def load_checkpoint(directory, what="checkpoint", make=None):
    """The checkpoint dict (meta parsed). A missing file stops with the command that makes it."""
    path = os.path.join(directory, "ckpt.pt")
    if not os.path.exists(path):
        hint = f": run `{make}` first" if make else ""
        raise SystemExit(f"error: {what} {path} does not exist{hint}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SystemExit(f"error: {path} cannot be read ({type(e).__name__}: {e}); it may be truncated") from None
    state["meta"] = json.loads(state["meta"])
    return state


def save_tokenizer(tokenizer, directory):
    """A checkpoint folder is self-contained: the built-in BPE (the one this model reads) is written into it."""
    if tokenizer.name == "builtin":
        D.save_bpe(os.path.join(directory, D.BUILTIN_TOKENIZER_FILE), tokenizer.encoding._mergeable_ranks)


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


def autocast(device):
    """bf16 autocast on CUDA (the routers stay fp32: moe.router_logits); plain fp32 on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def stage0_loss(vlm, clip, pairs, text, device):
    """Contrastive image-caption loss for the ViT + next-token loss for the LLM: the backbones, from scratch."""
    with autocast(device):
        contrastive = clip(vlm.vision, pairs.images, pairs.input_ids, pairs.attention_mask)
        lm = lm_loss(vlm.llm(text.input_ids, attention_mask=text.attention_mask).logits, text.labels)
    return {"loss": contrastive + lm, "clip": contrastive, "lm": lm}, None


def vlm_loss(vlm, batch, device):
    with autocast(device):
        out = vlm(batch.input_ids, batch.images, batch.labels, batch.attention_mask)
    return {"loss": out.loss, "ce": out.ce_loss, "aux": out.aux_loss}, out.routing


class StageModel(nn.Module):
    """What a training step runs, as one module so that DistributedDataParallel can wrap it: the VLM (and, in
    stage 0, CLIP's head). forward(batch) -> (losses, routing); in stage 0 the batch is (pairs, text)."""

    def __init__(self, vlm, clip=None):
        super().__init__()
        self.vlm, self.clip = vlm, clip

    def forward(self, batch):
        device = next(self.vlm.parameters()).device
        if self.clip is not None:
            losses, routing = stage0_loss(self.vlm, self.clip, *batch, device)
        else:
            losses, routing = vlm_loss(self.vlm, batch, device)
        if torch.is_grad_enabled():
            # A text-only batch leaves the projector (the one part a batch can leave out) out of the graph. It
            # joins with a zero gradient all the same: DDP waits for every trained parameter, and stage I's
            # loss would have nothing to train. (A step with no image on any rank then drops these zeros, so
            # that AdamW skips the projector as it always did: see run_stage.)
            losses["loss"] = losses["loss"] + sum(p.view(-1)[0] * 0.0 for p in self.vlm.projector.parameters()
                                                  if p.requires_grad)
        return losses, routing


def micro_batch(batches, stage, index, device):
    """Micro-batch `index` of the stream(s); stage 0 reads the pairs and the text stream at the same index."""
    if stage == 0:
        return tuple(b[index].to(device) for b in batches)
    return batches[index].to(device)


def batch_tokens(batch):
    return batch[1].num_tokens if isinstance(batch, tuple) else batch.num_tokens


def readable_batch(load, indices, what):
    """load(i) for the first i of `indices` whose batch has a readable image. In a distributed run a rank whose
    own batch is unreadable runs this stand-in at weight 0: every rank must join each step's collectives."""
    for i in indices:
        try:
            return load(i)
        except D.EmptyBatch:
            pass
    raise SystemExit(f"error: no {what} batch has a readable image")


def micro_index(step, micro, config, rt):
    """The global index of a rank's micro-batch: step s takes the next grad_accum x world micro-batches of the
    (per-epoch shuffled) stream, rank r the r-th of every world of them. So the ranks read disjoint data, and
    the same global batch is made of the same micro-batches whatever the world size."""
    return (step * config.grad_accum + micro) * rt.world + rt.rank


def accumulate_gradients(train_model, batches, stage, step, config, rt, warn=print):
    """Forward and backward over this rank's grad_accum micro-batches of optimizer step `step`.

    Returns the mean losses over every rank's micro-batches, the tokens over all ranks, this rank's routing
    counts summed over its micro-batches (routing_counts), and the number of micro-batches with images over all
    ranks; or (None, 0, None, 0) if no rank had a readable micro-batch. DDP all-reduces the gradients during
    the last micro-step's backward only (no_sync before it).
    A micro-batch whose images are all unreadable is skipped; in a distributed run a stand-in batch runs at
    weight 0 instead, because the other ranks still all-reduce gradients and exchange tokens, and every rank
    must take part.
    """
    names = ("loss", "clip", "lm") if stage == 0 else ("loss", "ce", "aux")
    raw, tokens, good, routed, pictured = dict.fromkeys(names, 0.0), 0, 0, None, 0
    load = lambda i: micro_batch(batches, stage, i, rt.device)  # noqa: E731
    per_epoch = min(b.per_epoch for b in (batches if stage == 0 else (batches,)))
    for micro in range(config.grad_accum):
        weight, index = 1.0, micro_index(step, micro, config, rt)
        try:
            batch = load(index)
        except D.EmptyBatch as e:  # every image of the batch unreadable: skip it, never crash the run
            warn(f"stage {stage} step {step}" + (f" (rank {rt.rank})" if rt.distributed else "") +
                 f": {e}; batch skipped")
            if not rt.distributed:
                continue
            weight, batch = 0.0, readable_batch(load, range(index + 1, index + 1 + per_epoch), "training")
        last = micro == config.grad_accum - 1
        with train_model.no_sync() if rt.distributed and not last else contextlib.nullcontext():
            losses, routing = train_model(batch)
            (weight * losses["loss"] / config.grad_accum).backward()
        if routing:  # (a stand-in counts zero: every rank then has counts to all-reduce)
            counts = routing_counts(routing) * int(weight)
            routed = counts if routed is None else routed + counts
        if weight:
            for k in names:
                raw[k] += float(losses[k].detach())
            tokens += batch_tokens(batch)
            good += 1
            pictured += stage == 0 or batch.images is not None
    *totals, tokens, good, pictured = all_reduce_sum([raw[k] for k in names] + [tokens, good, pictured], rt)
    if good == 0:
        return None, 0, None, 0
    return {k: v / good for k, v in zip(names, totals)}, int(tokens), routed, int(pictured)


@torch.no_grad()
def validate(stage, model, val_batches, config, rt):
    """Mean losses over the first eval_batches validation batches, in eval mode (evaluation capacity). The
    batches are shared out over the ranks; every rank runs the same number of forwards (a rank short of one
    repeats its last batch at weight 0), because expert parallelism exchanges tokens inside each forward."""
    if val_batches is None:
        return {}
    model.eval()
    sets = val_batches if stage == 0 else (val_batches,)
    n = min(config.eval_batches, *(s.per_epoch for s in sets))
    names = ("loss", "clip", "lm") if stage == 0 else ("loss", "ce", "aux")
    totals, used = dict.fromkeys(names, 0.0), 0.0
    load = lambda i: tuple(s.in_order(i).to(rt.device) for s in sets)  # noqa: E731
    for i in range(rt.rank, -(-n // rt.world) * rt.world, rt.world):
        weight = float(i < n)
        try:
            batch = load(min(i, n - 1))
        except D.EmptyBatch:  # unreadable images: left out (a stand-in at weight 0 keeps the ranks in step)
            if not rt.distributed:
                continue
            weight, batch = 0.0, readable_batch(load, range(min(s.per_epoch for s in sets)), "validation")
        losses, _ = model(batch if stage == 0 else batch[0])
        used += weight
        for k in names:
            totals[k] += weight * float(losses[k])
    summed = all_reduce_sum([totals[k] for k in names] + [used], rt)
    model.train()
    return {f"val_{k}": v / summed[-1] for k, v in zip(names, summed[:-1])} if summed[-1] else {}


@torch.no_grad()
def answer_check(vlm, tokenizer, config, path, device, n=96, show=3, max_new_tokens=16, log=print0, rt=Runtime()):
    """A quick look at what the model answers: the first question of n validation conversations, greedy, with the
    exact-match rate (case and a final period ignored). eval.py measures properly; this shows a stage learned.
    Samples that cannot be asked (bad, unreadable image, prompt too long) are left out. Ranks share the prompts."""
    folder = config.image_folder or config.data_dir
    prompts, refs, questions = [], [], []
    for sample in D.read_json(path)[:n]:
        try:
            conv = D.check_conversation(sample, "chat")
            image = None if sample.get("image") is None else D.load_image(os.path.join(folder, sample["image"]),
                                                                           vlm.config.vision.image_size)
        except (D.BadSample, OSError, ValueError, SyntaxError):
            continue
        question = conv[0]["value"].replace(D.IMAGE_PLACEHOLDER, "").strip()
        ids, _ = D.tokenize(D.chat_prompt(question, image is not None), tokenizer, vlm.num_image_tokens)
        if len(ids) + max_new_tokens > vlm.config.llm.max_seq_len:
            continue
        prompts.append((ids, image))
        refs.append(conv[1]["value"])
        questions.append(question)
    if not prompts:
        return None
    vlm.eval()
    mine = list(range(rt.rank, len(prompts), rt.world))
    chunks = [mine[i:i + 32] for i in range(0, len(mine), 32)]  # generation is local to each rank (no collectives)
    answers = {}
    for chunk in chunks:
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
    right, total = all_reduce_sum([sum(norm(answers[i]) == norm(refs[i]) for i in mine), len(mine)], rt)
    for i in mine[:show]:
        log(f"  Q: {questions[i]}  A: {answers[i]!r}  (reference {refs[i]!r})")
    log(f"  exact match on the first question of {int(total)} validation conversations: {100 * right / total:.1f}%")
    return right / total


def routing_counts(routing):
    """One micro-batch's RoutingStats as a (L, 4E + 1) tensor per MoE layer: top-k text, top-k image, top-1 text,
    top-1 image counts per expert, then the dropped assignments (summable over micro-batches and ranks)."""
    return torch.stack([torch.cat([s.expert_counts.flatten(), s.top1_counts.flatten(), s.dropped.view(1)])
                        for s in routing]).cpu()


def routing_record(vlm, counts, rt=Runtime()):
    """The log's routing record: per MoE layer, the step's counts over all its micro-batches on every rank."""
    layers = moe_layer_indices(vlm.llm.config.moe_layers, vlm.llm.config.n_layer)
    counts = torch.tensor(all_reduce_sum(counts.flatten().tolist(), rt)).view(counts.shape).long()
    E = (counts.shape[1] - 1) // 4
    return [{"layer": i, "topk_text_image": c[:2 * E].view(2, E).tolist(),
             "top1_text_image": c[2 * E:4 * E].view(2, E).tolist(), "dropped": int(c[-1])}
            for i, c in zip(layers, counts)]


def build_model(stage, config, nested, own, prev, tokenizer):
    """Stage 0 builds the VLM (and CLIP's head) from the preset; stage N loads stage N-1's weights, and stage III
    then upcycles; resuming loads the stage's own checkpoint into the same architecture."""
    try:
        if stage == 0 and own is None:
            vlm_config = initial_vlm_config(config, nested, tokenizer)
        else:
            vlm_config = vlm_config_from_dict((own or prev)["meta"]["model_config"])
            asked = replace(vlm_config, llm=replace(vlm_config.llm, **nested["llm"]),
                            vision=replace(vlm_config.vision, **nested["vision"]),
                            projector=nested.get("projector", vlm_config.projector))
            if asked != vlm_config:  # (--stage all repeats stage 0's options, which then match)
                raise SystemExit("error: --llm.*, --vision.* and --projector shape the model at stage 0 only; "
                                 f"stage {stage} takes the architecture from its input checkpoint")
        vlm = VLM(vlm_config)
        clip = CLIPHead(tokenizer.vocab_size, vlm_config.llm.max_seq_len, vlm_config.vision) if stage == 0 else None
        if own is None and prev is not None:
            vlm.load_state_dict(prev["model"])
            if stage == 3:
                vlm.upcycle_to_moe(config.moe_layers, replace(vlm_config.llm.moe, **nested["moe"]))
    except ValueError as e:  # an impossible config: the dataclass says which field, and why
        raise SystemExit(f"error: {e}") from None
    if own is not None:
        vlm.load_state_dict(own["model"])
        if clip is not None:
            clip.load_state_dict(own["clip"])
    return vlm, clip


def run_stage(stage, config, nested, log=print0, rt=Runtime(), interrupt=None):
    """Train one stage; returns its final metadata. Raises SystemExit for user errors, NonFiniteLoss on NaN/inf."""
    torch.manual_seed(config.seed + stage)
    device = rt.device
    main_rank = rt.rank == 0
    out = stage_dir(config, stage)
    previous = stage_dir(config, stage - 1)
    make_previous = f"python train.py --stage {stage - 1} --out_dir {config.out_dir}"

    # 1. where the stage starts: the previous stage's checkpoint, or (resuming) its own
    if rt.distributed:  # (a file system not shared between nodes would show here)
        seen_by_every_rank(os.path.join(out, "ckpt.pt"), rt)
        if stage > 0:
            seen_by_every_rank(os.path.join(previous, "ckpt.pt"), rt)
    own = None
    if config.resume:
        if os.path.exists(os.path.join(out, "ckpt.pt")):
            own = load_checkpoint(out)
        else:
            log(f"stage {stage}: no checkpoint in {out} to resume from; starting the stage from the beginning")
    prev = None
    if stage > 0:
        prev = load_checkpoint(previous, f"stage {stage}'s input, the stage-{stage - 1} checkpoint", make_previous)
    start_meta = (own or prev or {"meta": {}})["meta"]

    # 2. the tokenizer and the built-in data: as the run began at stage 0, unless --data.* says otherwise
    tokenizer_name = start_meta.get("tokenizer", config.tokenizer)
    token_dir = out if own else previous if prev else config.data_dir
    try:
        data_config = D.BuiltinConfig(**{**start_meta.get("data_config", {}), **nested["data"]})
    except (TypeError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    if not config.data_path or (tokenizer_name == "builtin" and token_dir == config.data_dir):
        if main_rank:  # rank 0 draws the data set; the others wait, then find it drawn
            D.ensure_builtin(config.data_dir, data_config, progress=config.progress)
        if rt.distributed:
            dist.barrier()
            seen_by_every_rank(os.path.join(config.data_dir, D.BUILTIN_MARKER), rt)
        D.ensure_builtin(config.data_dir, data_config, progress=False)
    try:
        tokenizer = D.load_tokenizer(tokenizer_name, token_dir)
    except (FileNotFoundError, RuntimeError) as e:
        raise SystemExit(f"error: {e}") from None

    # 3. the model, and which of its parameters this stage trains
    vlm, clip = build_model(stage, config, nested, own, prev, tokenizer)
    vlm_config = vlm.config
    vlm.to(device)
    clip is not None and clip.to(device)
    trained = set_trainable(stage, vlm, config)
    counts = param_counts(vlm)
    if clip is not None:
        counts = {k: v + sum(p.numel() for p in clip.parameters()) for k, v in counts.items()}
    log(f"stage {stage}: {counts['trainable'] / 1e6:.2f}M trainable / {counts['total'] / 1e6:.2f}M total / "
        f"{counts['active'] / 1e6:.2f}M active per token ({len(trained)} tensors trained)" +
        (" -- including CLIP's text tower" if clip is not None else ""))
    if rt.ep_group is not None:  # expert parallelism: keep this rank's share of each MoE layer's experts
        for layer in (m for m in vlm.modules() if isinstance(m, MoELayer)):
            try:
                layer.shard_experts(rt.ep_group)
            except ValueError as e:
                raise SystemExit(f"error: {e}") from None
    if rt.distributed:
        log(f"stage {stage}: {rt.world} processes ({dist.get_backend()}), global batch "
            f"{config.batch_size * config.grad_accum * rt.world} = {config.batch_size} per micro-batch x "
            f"{config.grad_accum} accumulation x {rt.world} ranks" +
            (f"; experts spread over groups of {config.ep_size}" if rt.ep_group is not None else ""))

    # 4. the data
    try:
        train = load_stage_data(stage, config, tokenizer, vlm_config, "train")
        val = load_stage_data(stage, config, tokenizer, vlm_config, "val")
        make = lambda ex, bs: D.Batches(ex, bs, vlm_config.vision.image_size, tokenizer.eos_id,  # noqa: E731
                                        seed=config.seed + stage, cache_images=not config.data_path)
        make_val = lambda ex, bs: make(ex, min(bs, len(ex)))  # noqa: E731  (a small set is one short batch)
        if stage == 0:
            train_batches = (make(train[0], config.clip_batch_size), make(train[1], config.batch_size))
            val_batches = None if val is None else (make_val(val[0], config.clip_batch_size),
                                                    make_val(val[1], config.batch_size))
        else:
            train_batches = make(train, config.batch_size)
            val_batches = None if val is None else make_val(val, config.batch_size)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None

    # 5. the optimizer gets exactly the parameters this stage trains; DDP averages their gradients
    params = [p for p in vlm.parameters() if p.requires_grad]
    if clip is not None:
        params += list(clip.parameters())
    optimizer = torch.optim.AdamW(params, lr=0.0, weight_decay=config.weight_decay, betas=(0.9, 0.999))
    iters = getattr(config, f"stage{stage}_iters")
    if config.max_iters > 0:
        iters = min(iters, config.max_iters)
    peak_lr = getattr(config, f"stage{stage}_lr")
    model = StageModel(vlm, clip)
    train_model = model
    if rt.distributed:
        # the expert shards differ between ranks: DDP leaves them alone, reduce_expert_grads averages them
        sharded = [f"vlm.{name}" for name, p in vlm.named_parameters() if p in expert_param_groups(vlm)]
        DDP._set_params_and_buffers_to_ignore_for_model(model, sharded)
        train_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if config.compile and stage > 0:
        train_model = torch.compile(train_model)

    global_batch = config.batch_size * config.grad_accum * rt.world
    meta = {"stage": stage, "step": 0, "iters": iters, "done": False, "tokenizer": tokenizer.name,
            "model_config": asdict(vlm_config), "train_config": asdict(config), "data_config": asdict(data_config),
            "counts": counts, "val": {}, "elapsed_s": 0.0, "world_size": rt.world, "global_batch": global_batch}
    start = 0
    log_path = os.path.join(out, "log.jsonl")
    if own is not None:
        was = dict(own["meta"]["train_config"], iters=own["meta"]["iters"],
                   global_batch=own["meta"].get("global_batch", own["meta"]["train_config"]["batch_size"] *
                                                own["meta"]["train_config"]["grad_accum"]))
        now = dict(asdict(config), iters=iters, global_batch=global_batch)
        differ = [k for k in RESUME_MUST_MATCH + (f"stage{stage}_lr",) if was.get(k) != now[k]]
        if differ:  # the batches and the schedule would not continue the interrupted run
            raise SystemExit(f"error: {out} was trained with " + ", ".join(f"{k}={was.get(k)}" for k in differ)
                             + "; resume with the same values")
        optimizer_state = own["optimizer"]
        if rt.ep_group is not None:  # the checkpoint holds whole experts: keep this rank's slices
            ep_rank, ep = dist.get_rank(rt.ep_group), dist.get_world_size(rt.ep_group)
            optimizer_state = convert_optimizer_state(optimizer_state, optimizer, vlm,
                                                      lambda t, group: expert_shard(t, ep_rank, ep).clone())
        optimizer.load_state_dict(optimizer_state)
        torch.set_rng_state(own["rng_cpu"])
        if "rng_cuda" in own and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(own["rng_cuda"])
        meta = dict(own["meta"], world_size=rt.world)
        start = meta["step"]
        if meta["done"]:
            log(f"stage {stage}: already complete in {out} ({start} steps); nothing to resume")
            return meta
        log(f"stage {stage}: resuming at step {start} of {iters}")
    if main_rank:
        os.makedirs(out, exist_ok=True)
        save_tokenizer(tokenizer, out)
        keep_log_lines(log_path, start)

    def write_log(record):
        if main_rank:
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def checkpoint(step, done=False):
        """Every rank takes part (expert shards are gathered); rank 0 writes."""
        meta.update(step=step, done=done, data_position={"micro_batches_consumed": step * config.grad_accum * rt.world})
        state = full_model_state(vlm, keep=main_rank)
        optimizer_state = optimizer.state_dict()
        if rt.ep_group is not None:
            def whole(t, group):  # every rank takes part in the gather; rank 0 alone keeps the result
                gathered = gather_experts(t, group)
                return gathered.cpu() if main_rank else None
            optimizer_state = convert_optimizer_state(optimizer_state, optimizer, vlm, whole)
        if main_rank:
            extra = {"clip": clip.state_dict()} if clip is not None else None
            save_checkpoint(out, state, optimizer_state, meta, extra)
        if rt.distributed:
            dist.barrier()  # the checkpoint is whole before any rank reads it (the next stage, a restart)

    # 6. the loop
    from tqdm import tqdm
    model.train()
    t_stage = time.time() - meta["elapsed_s"]
    if start == 0:
        metrics = validate(stage, model, val_batches, config, rt)
        if metrics:
            meta["val"] = {"step": 0, **metrics}
            write_log({"step": 0, **metrics})
            line = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
            before = prev["meta"]["val"].get("val_ce") if stage == 3 else None
            if before is not None:
                meta["stage2_final_val_ce"] = before
                line += f"  (stage II ended at val_ce {before:.4f}; upcycling must not change it)"
            log(f"stage {stage} step 0: {line}")
    bar = tqdm(range(start, iters), desc=f"stage {stage}", disable=not (config.progress and main_rank),
               dynamic_ncols=True)
    stop = iters if config.stop_after <= 0 else min(iters, start + config.stop_after)
    with interrupt or contextlib.nullcontext():  # SIGTERM/SIGINT: a checkpoint, then exit
        for step in bar:
            if step >= stop:
                break
            if interrupt is not None and interrupt.requested(rt):
                bar.close()
                checkpoint(step)
                raise SystemExit(f"stage {stage}: stopped by a signal before step {step}; the checkpoint in {out} "
                                 f"holds step {step}; continue with --resume" if main_rank else 1)
            t0 = time.time()
            lr = lr_at(step, iters, peak_lr, config.warmup_frac)
            for group in optimizer.param_groups:
                group["lr"] = lr
            sums, tokens, routing, pictured = accumulate_gradients(train_model, train_batches, stage, step, config,
                                                                   rt, bar.write)
            if sums is None:  # no readable micro-batch on any rank: no step
                optimizer.zero_grad(set_to_none=True)
                continue
            if not math.isfinite(sums["loss"]):
                bar.close()
                kept = (f"{os.path.join(out, 'ckpt.pt')} still holds the last good state (step {meta['step']}); "
                        f"try a lower --stage{stage}_lr, then --resume" if meta["step"] > 0 or own is not None else
                        f"no checkpoint of this stage was written yet; try a lower --stage{stage}_lr")
                raise NonFiniteLoss(f"stage {stage}: the loss became {sums['loss']} at step {step}; stopped without "
                                    f"saving: {kept}")
            if not pictured:  # no image anywhere in the step: the projector's zero gradient is no gradient
                for p in vlm.projector.parameters():
                    p.grad = None
            reduce_expert_grads(vlm, rt)
            clip_grad_norm(params, vlm, config.grad_clip, rt)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

            done = step + 1
            tok_s = tokens / max(time.time() - t0, 1e-9)
            bar.set_postfix({k: f"{v:.3f}" for k, v in sums.items()} |
                            {"lr": f"{lr:.1e}", "tok/s": f"{tok_s:.0f}"})
            if done % config.log_interval == 0 or done == iters:
                write_log({"step": done, "lr": lr, "tok_per_s": round(tok_s), **sums})
            if routing is not None and (done % config.routing_interval == 0 or done == 1 or done == iters):
                write_log({"step": done, "routing": routing_record(vlm, routing, rt)})
            if done % config.eval_interval == 0 or done == iters:
                metrics = validate(stage, model, val_batches, config, rt)
                if metrics:
                    meta["val"] = {"step": done, **metrics}
                    write_log({"step": done, **metrics})
                    if main_rank:
                        bar.write(f"stage {stage} step {done}: " +
                                  ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
            meta["elapsed_s"] = time.time() - t_stage
            if done % config.ckpt_interval == 0 or done == iters or done == stop:
                checkpoint(done, done=done == iters)
    bar.close()
    if meta["done"] and stage >= 2 and (config.val_data_path or not config.data_path):
        path = config.val_data_path or os.path.join(config.data_dir, "instruct_val.json")
        checker = vlm
        if expert_layers(vlm):  # generation stops at different steps per rank: check with a whole-expert copy
            checker = VLM(vlm.config).to(device)
            checker.load_state_dict(full_model_state(vlm))
        meta["val_answer_match"] = answer_check(checker, tokenizer, config, path, device, log=log, rt=rt)
        if main_rank:
            D.write_json(os.path.join(out, "meta.json"), meta)  # the readable copy also records the answer check
    if meta["step"] < iters:
        log(f"stage {stage}: stopped after step {meta['step']} of {iters} (--stop_after); continue with --resume")
    else:
        log(f"stage {stage}: done in {meta['elapsed_s']:.0f} s; checkpoint {os.path.join(out, 'ckpt.pt')}")
    return meta


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


def main(argv=None):
    stages, config, nested = parse_args(sys.argv[1:] if argv is None else argv)
    rt = compute_init(config)
    interrupt = Interrupt() if argv is None else None  # signal handlers for the command line, not for callers
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
        if rt.distributed:
            dist.destroy_process_group()
    if len(summary) > 1:
        print0("\nstage  steps  time (s)  validation (answers: exact match on the first question)")
        for m in summary:
            val = ", ".join(f"{k} {v:.4f}" for k, v in m["val"].items() if k != "step")
            if m.get("val_answer_match") is not None:
                val += f", answers {100 * m['val_answer_match']:.1f}%"
            print0(f"{m['stage']:>5}  {m['step']:>5}  {m['elapsed_s']:>8.0f}  {val}")
    return summary


if __name__ == "__main__":
    main()
