"""FSDP2 sharding of `MTPCausalLM` (`parallel: fsdp`), and what the trainer needs around it.

Units (`shard_model`): each trunk decoder layer, each MTP layer's decoder block, and the root. The
root's group holds the token embedding, the output head (one tensor when tied, so the tie holds),
the trunk's final norm and each MTP layer's two input norms, its 2d→d projection and its final
norm: those are called outside any decoder layer's `forward` (by `token_log_probs`, the rollout
engine and the MTP head path), so they must be whole whenever the root is. `token_log_probs` is
registered as a forward method of the root (`register_fsdp_forward_method`): the root's
parameters are all-gathered before it, the decoder layers' around their own `forward`s.

Gradients are *summed* over ranks (gradient divide factor 1): every loss is already divided by
counts over the whole mini-batch on all workers (`mtprl.train.update`), exactly as in the DDP
maths, so N ranks take the step one process takes.

Precision: on GPU the sharded parameters, gradients and AdamW state are float32 and the forward
runs in bfloat16 (`MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`) when the config
says `dtype: bfloat16`; on CPU everything is float32.

Rollouts (`gathered`): our engine makes calls of its own (trunk, head, MTP drafting) and ranks
decode different numbers of steps, so during generation every unit is all-gathered once and kept
whole (no collective per decoding step; peak memory: the whole model in the compute dtype on every
rank, with no gradients or activations alive), then resharded.

Loading (`mtprl.train.loop`): with several ranks only rank 0 reads the checkpoint; the others build the
model on the meta device, and `shard_model(..., full_state=...)` gives every rank its shards from rank 0's
tensors (`distribute_tensor` from rank 0, one parameter at a time), so host memory holds one whole model, not
one per rank.

`iter_full_state(model)` yields (name, full tensor) one parameter at a time — the seam for pushing
weights to vLLM and for the streaming HF export (`mtprl.train.export`); every rank must iterate
it together (each step is a collective), rank 0 consumes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as torch_dist
from torch import Tensor, nn

FSDP_METHODS = ("token_log_probs",)  # methods of MTPCausalLM that run as forwards of the root


def _fsdp():
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    return FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method


def is_sharded(model: nn.Module) -> bool:
    """Whether `model` is the root of an FSDP2-sharded module tree."""
    return isinstance(model, _fsdp()[0])


def units(model) -> list[nn.Module]:
    """The modules `shard_model` shards on their own, in forward order (trunk layers, MTP blocks)."""
    return list(model.base.get_decoder().layers) + [layer.block for layer in model.mtp_layers]


def shard_model(model, device: torch.device, bf16_compute: bool, full_state: dict | None = None):
    """Shard `model` in place over the default process group (every rank calls it with the same model).

    With `full_state` (rank 0's whole tensors, `model_state_from_rank0`) only rank 0 holds the weights: the
    other ranks pass a model built on the meta device (and `full_state={}`), whose shards are allocated here
    and filled from rank 0's tensors, one at a time, before FSDP's initialisation."""
    FSDPModule, MixedPrecisionPolicy, fully_shard, register = _fsdp()
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (torch_dist.get_world_size(),))
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16_compute
              else MixedPrecisionPolicy())
    for module in units(model):
        fully_shard(module, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    for name in FSDP_METHODS:
        register(model, name)
    for module in [model] + units(model):
        module.set_gradient_divide_factor(1.0)  # sum over ranks: losses are normalised globally
        module.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no PREMUL_SUM)
    if full_state is not None:
        _fill_from_rank0(model, full_state, device)
    # The first FSDP state to run a forward becomes the root: make it the model's, whatever runs first.
    model._get_fsdp_state()._lazy_init()
    return model


def model_state_from_rank0(model) -> dict[str, Tensor]:
    """Rank 0's whole tensors to shard from (its state dict before `fully_shard`; {} on the other ranks)."""
    return dict(model.state_dict()) if torch_dist.get_rank() == 0 else {}


def _fill_from_rank0(model, full_state: dict[str, Tensor], device: torch.device) -> None:
    """Every rank's shards (and buffers) from rank 0's whole tensors, one parameter at a time; the other ranks'
    model is on meta. Rank 0 lets go of each whole tensor once scattered (`full_state` is emptied)."""
    from torch.distributed.tensor import distribute_tensor

    rank0 = torch_dist.get_rank() == 0
    if not rank0:
        model.to_empty(device=device)
    with torch.no_grad():
        for name, param in model.named_parameters():  # DTensors; a tied tensor comes once
            whole = (full_state.pop(name).to(device) if rank0
                     else torch.empty(param.shape, dtype=param.dtype, device=device))  # content unused off rank 0
            local(param).copy_(distribute_tensor(whole, param.device_mesh, param.placements,
                                                 src_data_rank=0).to_local())
            del whole
        for _, buffer in model.named_buffers():  # the non-persistent ones too (rotary inv_freq)
            torch_dist.broadcast(buffer, src=0)
    full_state.clear()


@contextlib.contextmanager
def gathered(model):
    """Every unit of a sharded `model` whole (all-gathered once) inside the block; a no-op unsharded."""
    if not is_sharded(model):
        yield model
        return
    inner = units(model)
    for module in inner:
        module.set_reshard_after_forward(False, recurse=False)
    try:
        for module in [model] + inner:
            module.unshard()
        yield model
    finally:
        for module in [model] + inner:
            module.reshard()
        for module in inner:
            module.set_reshard_after_forward(True, recurse=False)


def local(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor (the tensor itself otherwise)."""
    return t.to_local() if hasattr(t, "to_local") else t


def full(t: Tensor) -> Tensor:
    """The whole tensor of a DTensor (a collective: every rank calls it), the tensor itself otherwise."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def global_sum(values: Tensor, sharded: bool) -> Tensor:
    """Sum a float64 vector of per-shard partial sums over ranks (unchanged when not sharded)."""
    if sharded and torch_dist.is_initialized() and torch_dist.get_world_size() > 1:
        torch_dist.all_reduce(values, op=torch_dist.ReduceOp.SUM)
    return values


@torch.no_grad()
def clip_grad_norm_(params: list[Tensor], max_norm: float) -> float:
    """`torch.nn.utils.clip_grad_norm_` (2-norm, same clip rule) over gradients that may be sharded DTensors.

    The norm is the square root of the sum over ranks of each shard's sum of squares (float64).
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    sharded = any(hasattr(g, "to_local") for g in grads)
    local_sq = torch.stack([local(g).double().pow(2).sum() for g in grads]).sum().reshape(1)
    total = float(global_sum(local_sq, sharded).sqrt())
    coef = min(max_norm / (total + 1e-6), 1.0)
    if coef < 1.0:
        for g in grads:
            local(g).mul_(coef)
    return total


def iter_full_state(model) -> Iterator[tuple[str, Tensor]]:
    """(name, whole tensor) of every parameter and persistent buffer of `model`, one at a time.

    Names are the model's own (`base.model.layers.0.…`, `mtp_layers.0.…`); a tied tensor comes once,
    under its first name. For a sharded model each tensor is all-gathered as it is reached (every rank
    must consume the iterator in step); only one whole parameter is alive at a time unless the consumer
    keeps them.
    """
    for name, param in model.named_parameters():
        yield name, full(param.detach())
    persistent = set(model.state_dict().keys())
    for name, buffer in model.named_buffers():
        if name in persistent:
            yield name, full(buffer.detach())


_OWN_GROUP = []  # the one-process group ensure_process_group formed, if it did


def ensure_process_group(device: torch.device) -> None:
    """A one-process group when no launcher formed one (FSDP2 needs a mesh even for one shard)."""
    if torch_dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    torch_dist.init_process_group(backend, store=torch_dist.HashStore(), rank=0, world_size=1)
    _OWN_GROUP.append(True)


def release_process_group() -> None:
    """Destroy the group `ensure_process_group` formed (a launcher's own group is left alone)."""
    if _OWN_GROUP and torch_dist.is_initialized():
        torch_dist.destroy_process_group()
    _OWN_GROUP.clear()


def check_sharded_run(cfg, world: int, device: torch.device) -> str | None:
    """Why `cfg` cannot train sharded on `world` processes on `device`, or None."""
    rows = cfg.prompts_per_step * cfg.group_size // cfg.mini_batches
    if rows % world:
        return (f"parallel: fsdp needs every worker to run the same number of forward and backward passes, so the "
                f"rows per mini-batch (prompts_per_step × group_size / mini_batches = {rows}) must divide by the "
                f"{world} workers; change prompts_per_step, group_size or mini_batches, or use parallel: ddp")
    if cfg.dtype == "bfloat16" and device.type != "cuda":
        return ("parallel: fsdp trains in float32 on CPU (its bfloat16 mixed-precision policy is for GPUs); use "
                "dtype: float32, or parallel: ddp for bfloat16 weights on CPU")
    return None
