"""The process group as the trainer sees it: rank, world size, and the few collectives it needs.

Data parallelism is plain DDP maths done explicitly: every worker holds the whole rollout batch
(rollouts are generated split across workers, then gathered), trains on its contiguous share of
each mini-batch with losses divided by counts over the *whole* mini-batch, and the gradients are
summed (not averaged) over workers before the optimiser step. The sum of the shares is then the
gradient of the whole mini-batch, so N workers take the same step as one process would. We do
not wrap the model in `DistributedDataParallel`: its hooks expect the module's `forward`, while
training calls `token_log_probs` and, for the exact diagnostics, `torch.autograd.grad`. The
process group itself comes from `accelerate` (`accelerate launch --multi_gpu`, or any
torchrun-style environment); with one process every collective is a no-op.

Sharded training (`parallel: fsdp`, FSDP2) is built in `mtprl.train.fsdp`; an accelerate FSDP
config selects it too (`Dist.parallel`). DeepSpeed and Megatron launches are refused with a message.
"""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as torch_dist
from torch import Tensor

UNSUPPORTED = ("DEEPSPEED", "MEGATRON_LM")  # accelerate modes mtprl does not train under


def _fsdp_plugin_problem(plugin) -> str | None:
    """What an accelerate FSDP config asks for that mtprl's own FSDP2 wrapping does not do, or None."""
    if plugin is None:
        return None
    if getattr(plugin, "cpu_offload", None) and getattr(plugin.cpu_offload, "offload_params", plugin.cpu_offload):
        return "CPU offload (fsdp_offload_params)"
    if getattr(plugin, "activation_checkpointing", False):
        return "activation checkpointing (fsdp_activation_checkpointing)"
    strategy = str(getattr(plugin, "sharding_strategy", None) or "")
    if getattr(plugin, "fsdp_version", 2) == 1 and strategy and "FULL_SHARD" not in strategy:
        return f"sharding strategy {strategy.split('.')[-1]}"
    if getattr(plugin, "fsdp_version", 1) == 2 and getattr(plugin, "reshard_after_forward", True) is False:
        return "reshard_after_forward: false"
    return None


class Dist:
    """Rank, world size, collectives and the parallelism (`ddp` / `fsdp`); built from an
    `accelerate.Accelerator` (or defaults: 1 process)."""

    def __init__(self, accelerator=None, parallel: str = "ddp"):
        kind = str(getattr(accelerator, "distributed_type", "NO")).split(".")[-1]
        if kind in UNSUPPORTED:
            raise RuntimeError(f"accelerate is configured for {kind}, which `mtprl train` does not support. For sharded "
                               "training launch with an FSDP config or `--parallel fsdp` (FSDP2); for data parallelism "
                               "`accelerate launch --multi_gpu --num_processes N`")
        if kind == "FSDP":  # an accelerate FSDP config: our own FSDP2 wrapping (mtprl.train.fsdp), not prepare()
            problem = _fsdp_plugin_problem(getattr(getattr(accelerator, "state", None), "fsdp_plugin", None))
            if problem:
                raise RuntimeError(f"the accelerate FSDP config asks for {problem}, which mtprl's FSDP2 wrapping does "
                                   "not do (it shards every decoder layer fully, parameters in GPU memory, mixed "
                                   "precision from --dtype); remove that setting from the config")
            parallel = "fsdp"
        self.parallel = parallel
        self.rank = accelerator.process_index if accelerator is not None else 0
        self.world = accelerator.num_processes if accelerator is not None else 1
        self.device = accelerator.device if accelerator is not None else torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch_dist.barrier()

    def broadcast_object(self, obj):
        """Rank 0's `obj` (any picklable value) on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        torch_dist.broadcast_object_list(box, src=0)
        return box[0]

    def share(self, n: int, rank: int | None = None) -> slice:
        """The contiguous rows of `n` that worker `rank` (default: this one) handles; sizes differ by <= 1."""
        rank = self.rank if rank is None else rank
        base, extra = divmod(n, self.world)
        start = rank * base + min(rank, extra)
        return slice(start, start + base + (1 if rank < extra else 0))

    def sum_(self, tensors: list[Tensor], bucket_elements: int = 1 << 26) -> None:
        """Sum each tensor over workers, in place, in flat buckets of at most ~`bucket_elements` per dtype."""
        if self.world == 1 or not tensors:
            return
        for dtype in sorted({t.dtype for t in tensors}, key=str):
            group = [t for t in tensors if t.dtype == dtype]
            while group:
                bucket, size = [], 0
                while group and (not bucket or size + group[0].numel() <= bucket_elements):
                    bucket.append(group.pop(0))
                    size += bucket[-1].numel()
                flat = torch.cat([t.reshape(-1) for t in bucket])
                torch_dist.all_reduce(flat, op=torch_dist.ReduceOp.SUM)
                offset = 0
                for t in bucket:
                    t.copy_(flat[offset: offset + t.numel()].view_as(t))
                    offset += t.numel()

    def mean_values(self, values: dict[str, float]) -> dict[str, float]:
        """Average a dict of floats over workers (every worker must hold the same keys)."""
        if self.world == 1 or not values:
            return values
        keys = sorted(values)
        vec = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.device)
        torch_dist.all_reduce(vec, op=torch_dist.ReduceOp.SUM)
        return dict(zip(keys, (vec / self.world).tolist()))

    def gather_rows(self, tensor: Tensor, pad_value: float | int = 0, pad_left: bool = False) -> Tensor:
        """Concatenate every worker's `tensor` along dim 0 in rank order.

        Workers may hold different numbers of rows and (for 2-D tensors) columns: columns are
        padded to the widest with `pad_value`, on the left when `pad_left` (left-padded prompts).
        """
        if self.world == 1:
            return tensor
        if tensor.dtype == torch.bool:  # gloo has no bool collectives
            return self.gather_rows(tensor.to(torch.uint8), int(pad_value), pad_left).bool()
        shape = torch.tensor(list(tensor.shape) + [0] * (2 - tensor.dim()), device=self.device)
        shapes = [torch.zeros_like(shape) for _ in range(self.world)]
        torch_dist.all_gather(shapes, shape)
        rows = [int(s[0]) for s in shapes]
        width = max(int(s[1]) for s in shapes)
        padded = torch.full((max(rows), *([width] if tensor.dim() == 2 else [])), pad_value,
                            dtype=tensor.dtype, device=self.device)
        if tensor.dim() == 2:
            cols = slice(width - tensor.shape[1], width) if pad_left else slice(0, tensor.shape[1])
            padded[: tensor.shape[0], cols] = tensor.to(self.device)
        else:
            padded[: tensor.shape[0]] = tensor.to(self.device)
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        torch_dist.all_gather(parts, padded)
        return torch.cat([p[:r] for p, r in zip(parts, rows)]).to(tensor.device)


def shutdown(wait: bool = True) -> None:
    """Tear down the process group at the end of a launched run, after every rank is done.

    Exiting with a live gloo/NCCL group can abort a rank ("terminate called without an active
    exception") and fail the whole launch after the work is finished. `wait=False` (after an error)
    skips the barrier, which ranks that already failed would never reach.
    """
    if torch_dist.is_available() and torch_dist.is_initialized():
        if wait:
            torch_dist.barrier()
        torch_dist.destroy_process_group()


def free_port() -> int:
    """A TCP port free on this host right now, for a launcher's rendezvous (`torchrun --master_port`)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def describe_launch(dist: Dist) -> str:
    """One line: processes, backend, device and CPU threads, as this run really has them."""
    backend = torch_dist.get_backend() if torch_dist.is_available() and torch_dist.is_initialized() else "none"
    processes = "1 process" if dist.world == 1 else f"{dist.world} processes"
    sharded = ", parameters, gradients and AdamW state sharded (FSDP2)" if dist.parallel == "fsdp" else ""
    return (f"{processes} (world size {dist.world}, process-group backend {backend}), device {dist.device}, "
            f"{torch.get_num_threads()} torch thread(s) per process{sharded}")


def launch_mismatch(world: int, env: dict[str, str] | None = None) -> str | None:
    """Why the launch environment asked for other than `world` processes, or None when it did not.

    `accelerate launch --num_processes N --cpu` (without --multi_gpu) starts one plain process with
    MASTER_ADDR/MASTER_PORT set and no WORLD_SIZE; a launcher that sets WORLD_SIZE=N while the group
    has another size is a mismatch too.
    """
    env = dict(os.environ) if env is None else env
    asked = env.get("WORLD_SIZE")
    if asked is not None and asked.isdigit() and int(asked) != world:
        return (f"the launcher set WORLD_SIZE={asked} but this run has {world} process(es); check the launch "
                "command and the accelerate config")
    if world == 1 and asked is None and ("MASTER_ADDR" in env or "MASTER_PORT" in env):
        return ("the environment is set up for a multi-process launch (MASTER_ADDR/MASTER_PORT are set) but only "
                "this one process runs: `accelerate launch --cpu --num_processes N` starts a single process. For N "
                "CPU processes use `accelerate launch --multi_gpu --num_processes N -m mtprl train ...` (each joins "
                "a gloo group on a machine without GPUs)")
    return None
