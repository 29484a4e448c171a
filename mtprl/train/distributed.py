"""The process group as the trainer sees it: rank, world size, and the few collectives it needs.

Data parallelism is plain DDP maths done explicitly: every worker holds the whole rollout batch
(rollouts are generated split across workers, then gathered), trains on its contiguous share of
each mini-batch with losses divided by counts over the *whole* mini-batch, and the gradients are
summed (not averaged) over workers before the optimiser step. The sum of the shares is then the
gradient of the whole mini-batch, so N workers take the same step as one process would. We do
not wrap the model in `DistributedDataParallel`: its hooks expect the module's `forward`, while
training calls `token_log_probs` and, for the exact diagnostics, `torch.autograd.grad`. The
process group itself comes from `accelerate` (`accelerate launch`, or any torchrun-style
environment); with one process every collective is a no-op.
"""

from __future__ import annotations

import torch
import torch.distributed as torch_dist
from torch import Tensor


class Dist:
    """Rank, world size and collectives; built from an `accelerate.Accelerator` (or defaults: 1 process)."""

    def __init__(self, accelerator=None):
        self.rank = accelerator.process_index if accelerator is not None else 0
        self.world = accelerator.num_processes if accelerator is not None else 1
        self.device = accelerator.device if accelerator is not None else torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch_dist.barrier()

    def share(self, n: int, rank: int | None = None) -> slice:
        """The contiguous rows of `n` that worker `rank` (default: this one) handles; sizes differ by <= 1."""
        rank = self.rank if rank is None else rank
        base, extra = divmod(n, self.world)
        start = rank * base + min(rank, extra)
        return slice(start, start + base + (1 if rank < extra else 0))

    def sum_(self, tensors: list[Tensor]) -> None:
        """Sum each tensor over workers, in place, with one collective per dtype."""
        if self.world == 1 or not tensors:
            return
        for dtype in {t.dtype for t in tensors}:
            group = [t for t in tensors if t.dtype == dtype]
            flat = torch.cat([t.reshape(-1) for t in group])
            torch_dist.all_reduce(flat, op=torch_dist.ReduceOp.SUM)
            offset = 0
            for t in group:
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
