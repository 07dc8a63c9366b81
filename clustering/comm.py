"""The one seam between one process and N workers: an injected all-reduce (docs/DESIGN.md §2).

In one process every collective is the identity; under Ray Train the job passes
`torch.distributed.all_reduce`, and the same code computes global statistics.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


def identity(t: torch.Tensor) -> torch.Tensor:
    return t


@dataclass
class Comm:
    rank: int = 0
    world: int = 1
    all_reduce_fn: Callable[[torch.Tensor], object] = identity  # sums in place

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            self.all_reduce_fn(t)
        return t

    def gather(self, rows: torch.Tensor, max_rows: int) -> torch.Tensor:
        """Concatenate up to `max_rows` rows from every rank, on every rank, with all-reduce alone."""
        n = min(len(rows), max_rows)
        counts = self.sum(torch.zeros(self.world, device=rows.device).index_fill_(0, torch.tensor(self.rank, device=rows.device), n))
        slots = torch.zeros(self.world, max_rows, *rows.shape[1:], device=rows.device, dtype=rows.dtype)
        slots[self.rank, :n] = rows[:n]
        slots = self.sum(slots)
        return torch.cat([slots[r, : int(c)] for r, c in enumerate(counts.tolist())])

    def average_gradients(self, module: torch.nn.Module) -> None:
        """Data-parallel step: mean of the workers' gradients, in one flat all-reduce."""
        if self.world == 1:
            return
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        if not grads:
            return
        flat = self.sum(torch.cat([g.reshape(-1) for g in grads])) / self.world
        offset = 0
        for g in grads:
            g.copy_(flat[offset: offset + g.numel()].view_as(g))
            offset += g.numel()
