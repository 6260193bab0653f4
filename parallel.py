"""
parallel.py -- from one GPU to many: the runtime, data parallel, expert-parallel bookkeeping, signals.

    python train.py --stage all --preset small                                    # one GPU (or the CPU)
    torchrun --standalone --nproc_per_node=8 train.py --stage all --preset small --global_batch=256   # 8 GPUs
    torchrun --nnodes=2 --node_rank=$NODE_RANK --nproc_per_node=8 --rdzv_backend=c10d \
        --rdzv_endpoint=$HEAD_NODE:29500 --rdzv_id=moe-llava --max-restarts=3 \
        train.py --stage all --preset small --global_batch=512 --resume          # 2 nodes: run on each node
    torchrun --standalone --nproc_per_node=4 train.py --stage 3 --ep_size=4      # experts spread over 4 ranks
    torchrun --standalone --nproc_per_node=8 eval.py --ckpt out/stage3           # evaluation shared by 8 ranks

torchrun starts one process per device and tells each its RANK, LOCAL_RANK and WORLD_SIZE; compute_init turns
them into a Runtime (NCCL on CUDA, gloo on the CPU). `python train.py` is simply the case world = 1, and every
function below is then a no-op or the obvious thing, so train.py's loop reads the same for 1 and N ranks.

Data parallel. Every rank holds the whole model, wrapped in DistributedDataParallel, which averages the
gradients during backward; with gradient accumulation only the last micro-step's backward needs to (no_sync
before it). Step s takes the next grad_accum x world micro-batches of the per-epoch shuffled stream and rank r
the r-th of every world of them (micro_index): the ranks read disjoint data, and a global batch is made of the
same micro-batches whatever the number of ranks, so 2 ranks train what 1 process trains. Only rank 0 prints
and writes; what it logs is first summed over the ranks (Runtime.sum).

Expert parallel (--ep_size, stage III). The ranks of an expert-parallel group hold E / ep of each MoE layer's
experts (shard_experts) and exchange tokens with all_to_all -- that is MoE material and lives in moe.py
(dispatch_expert_parallel). DDP leaves the shards alone: reduce_expert_grads averages each shard's gradient
over the ranks that hold the same shard, and clip_grad_norm sums the shards' squares over the group, so every
rank clips alike. Checkpoints hold whole experts (whole_model_state, whole_optimizer_state), so a checkpoint
written with experts spread loads in one process, or spread again (sharded_optimizer_state).
When does it pay? It divides the experts' parameters, gradients and optimizer state by ep, which lets the
number or size of experts grow past one GPU's memory; the compute per token does not change. Its price is two
all_to_alls per MoE layer forward and two backward, each moving about k x tokens x hidden values per rank, plus
waiting for the busiest rank. So it pays when experts dominate memory and the ranks share a fast link (NVLink
within a node); not for models whose experts fit on every GPU (our tiny and small presets), across slow links
between nodes, or with few tokens per rank.

Faults. SIGTERM or Ctrl-C (Interrupt) stops training at the end of the current step with a checkpoint; the same
command with --resume continues from it. Sent to torchrun, a signal goes on to every rank, and torchrun kills
them after --shutdown-timeout seconds. torchrun --max-restarts relaunches after a *failed* rank; --resume then
continues from the last periodic checkpoint. Several nodes must share one file system for --out_dir and
--data_dir (seen_by_every_rank stops the run with one sentence if they do not). More in docs/distributed.md.

Read it top to bottom:
  1. the runtime       Runtime (rank, world, device, process groups; sum, gather, mine, barrier, first), print0,
                       pick_device, compute_init / compute_cleanup, seen_by_every_rank
  2. data parallel     data_parallel (DDP), no_sync, micro_index
  3. expert parallel   shard_experts, reduce_expert_grads, clip_grad_norm
  4. checkpoints       whole_model_state, whole_optimizer_state, sharded_optimizer_state, whole_model_copy
  5. signals           Interrupt
"""
import contextlib
import os
import signal
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from moe import MoELayer, expert_shard, gather_experts

# ----------------------------------------------------------------------------------------------------------
# 1. The runtime: where this process runs


@dataclass
class Runtime:
    """Rank `rank` of `world` processes, its device, and (expert parallel) its process groups."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    backend: str = ""  # nccl or gloo under torchrun
    ep_group: object = None  # ep_size consecutive ranks that hold one copy of every expert between them
    edp_group: object = None  # the ranks that hold the same expert shard (every ep_size-th): they average its grads

    @property
    def distributed(self):
        return self.world > 1

    def sum(self, values):
        """A list of numbers summed over all ranks (one all_reduce)."""
        if not self.distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def gather(self, obj):
        """[rank 0's obj, rank 1's obj, ...] on every rank (any picklable value)."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def mine(self, items):
        """This rank's share of a list: every world-th item, from the rank-th."""
        return items[self.rank::self.world]

    def barrier(self):
        if self.distributed:
            dist.barrier()

    def first(self, what, *args):
        """what(*args) on rank 0 first (it may write files, e.g. draw the data set), then on the others."""
        if self.rank == 0:
            result = what(*args)
        self.barrier()
        return result if self.rank == 0 else what(*args)


def print0(*args, **kwargs):
    """print on rank 0 only (torchrun sets RANK; a plain `python train.py` is rank 0)."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


def pick_device(name):
    """--device: auto (CUDA when present, else the CPU), cpu, cuda, cuda:N; one sentence if it cannot be had."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise SystemExit(f"error: --device={name} is not a device ({e})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device={name} but this machine has no CUDA GPU; use --device=cpu")
    return device


def compute_init(device="auto", ep_size=1):
    """The Runtime: under torchrun, start torch.distributed (NCCL on CUDA, gloo on the CPU) and the
    expert-parallel groups; under plain python, one process on the chosen device. Under torchrun each rank takes
    GPU number LOCAL_RANK of its node, so --device=cuda:N only says "CUDA": its index is not used."""
    device = pick_device(device)
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        if ep_size > 1:
            raise SystemExit(f"error: --ep_size={ep_size} needs that many processes: launch with torchrun "
                             f"--nproc_per_node={ep_size} (see parallel.py)")
        return Runtime(device=device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if world % ep_size:
        raise SystemExit(f"error: --ep_size={ep_size} must divide the number of processes ({world})")
    cuda = device.type == "cuda"
    if cuda and local_rank >= torch.cuda.device_count():
        raise SystemExit(f"error: rank {rank} wants GPU {local_rank}, but this node has {torch.cuda.device_count()}: "
                         f"use at most that many --nproc_per_node, or --device=cpu")
    if cuda:
        torch.cuda.set_device(local_rank)
    backend = "nccl" if cuda else "gloo"
    dist.init_process_group(backend)
    rt = Runtime(rank=rank, world=world, device=torch.device("cuda", local_rank) if cuda else torch.device("cpu"),
                 backend=backend)
    if ep_size > 1:  # every rank creates every group, in the same order (torch.distributed's rule)
        for first in range(0, world, ep_size):
            group = dist.new_group(list(range(first, first + ep_size)))
            if first <= rank < first + ep_size:
                rt.ep_group = group
        for offset in range(ep_size):
            group = dist.new_group(list(range(offset, world, ep_size)))
            if rank % ep_size == offset:
                rt.edp_group = group
    return rt


def compute_cleanup(rt):
    if rt.distributed:
        dist.destroy_process_group()


def seen_by_every_rank(path, rt):
    """Several nodes must share one file system for --out_dir and --data_dir: one clear error (on every rank,
    so that none waits for the others) if some ranks see `path` and others do not."""
    seen = rt.sum([float(os.path.exists(path))])[0]
    if 0 < seen < rt.world:
        raise SystemExit(f"error: {path} exists for {seen:.0f} of {rt.world} ranks: on several nodes, --out_dir "
                         "and --data_dir must be on a file system that every node shares" if rt.rank == 0 else 1)


# ----------------------------------------------------------------------------------------------------------
# 2. Data parallel: every rank the whole model, its own micro-batches, gradients averaged


def data_parallel(model, rt):
    """The model wrapped in DistributedDataParallel (the model itself in one process). Expert shards differ
    between ranks: DDP leaves them alone, and reduce_expert_grads averages them instead."""
    if not rt.distributed:
        return model
    shards = expert_params(model)
    DDP._set_params_and_buffers_to_ignore_for_model(model, [n for n, p in model.named_parameters() if p in shards])
    return DDP(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)


def no_sync(train_model, last, rt):
    """DDP all-reduces the gradients in every backward; accumulating, only the last micro-step's needs to."""
    return train_model.no_sync() if rt.distributed and not last else contextlib.nullcontext()


def micro_index(step, micro, grad_accum, rt):
    """The global index of a rank's micro-batch: step s takes the next grad_accum x world micro-batches of the
    (per-epoch shuffled) stream, rank r the r-th of every world of them. So the ranks read disjoint data, and
    the same global batch is made of the same micro-batches whatever the world size."""
    return (step * grad_accum + micro) * rt.world + rt.rank


# ----------------------------------------------------------------------------------------------------------
# 3. Expert parallel: each rank E / ep of every MoE layer's experts


def expert_layers(model):
    """The MoE layers whose experts are sharded over an expert-parallel group."""
    return [m for m in model.modules() if isinstance(m, MoELayer) and m.ep_group is not None]


def expert_params(model):
    """{expert-shard parameter: its expert-parallel group}."""
    return {p: m.ep_group for m in expert_layers(model) for p in m.experts.parameters()}


def shard_experts(vlm, rt):
    """Keep this rank's share of each MoE layer's experts (nothing to do without --ep_size)."""
    if rt.ep_group is None:
        return
    for layer in (m for m in vlm.modules() if isinstance(m, MoELayer)):
        try:
            layer.shard_experts(rt.ep_group)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None


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
    experts = expert_params(vlm)
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


# ----------------------------------------------------------------------------------------------------------
# 4. Checkpoints hold whole experts, so they load anywhere


def whole_model_state(vlm, keep=True):
    """The model's state dict with every expert whole (gathered from the expert-parallel group). Every rank must
    call it (all_gather); keep=False takes part and keeps nothing. The whole experts go to the CPU: the device
    holds one gathered tensor at a time beside its shard."""
    state = vlm.state_dict() if keep else {}
    for name, module in vlm.named_modules():
        if isinstance(module, MoELayer) and module.ep_group is not None:
            for pname, p in module.experts.named_parameters():
                whole = gather_experts(p.detach(), module.ep_group)
                if keep:
                    state[f"{name}.experts.{pname}"] = whole.cpu()
    return state


def convert_optimizer_state(state, optimizer, vlm, convert):
    """A copy of an optimizer state dict with every expert-shaped state tensor converted (gathered or sliced)."""
    groups = expert_params(vlm)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state = {**state, "state": dict(state["state"])}
    for i, p in enumerate(params):
        if p in groups and i in state["state"]:
            state["state"][i] = {key: convert(t, groups[p]) if torch.is_tensor(t) and t.dim() > 0 else t
                                 for key, t in state["state"][i].items()}
    return state


def whole_optimizer_state(optimizer, vlm, rt):
    """optimizer.state_dict() with the expert shards' moments gathered whole (rank 0 keeps them, on the CPU)."""
    if rt.ep_group is None:
        return optimizer.state_dict()

    def whole(t, group):  # every rank takes part in the gather; rank 0 alone keeps the result
        gathered = gather_experts(t, group)
        return gathered.cpu() if rt.rank == 0 else None
    return convert_optimizer_state(optimizer.state_dict(), optimizer, vlm, whole)


def sharded_optimizer_state(state, optimizer, vlm, rt):
    """A whole-expert optimizer state (from a checkpoint) cut to this rank's expert shards."""
    if rt.ep_group is None:
        return state
    ep_rank, ep = dist.get_rank(rt.ep_group), dist.get_world_size(rt.ep_group)
    return convert_optimizer_state(state, optimizer, vlm, lambda t, group: expert_shard(t, ep_rank, ep).clone())


def whole_model_copy(vlm):
    """The model itself, or (experts spread) a copy with every expert whole on every rank: for work that is not
    in lockstep between ranks, like generation, which stops at a different step on each."""
    if not expert_layers(vlm):
        return vlm
    copy = type(vlm)(vlm.config).to(next(vlm.parameters()).device)
    copy.load_state_dict(whole_model_state(vlm))
    return copy


# ----------------------------------------------------------------------------------------------------------
# 5. Signals: a checkpoint, then an exit


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
        return rt.sum([float(self.signal is not None)])[0] > 0
