"""Nearest neighbours in a representation, mined over every worker's images through `Comm` (SCAN's second step:
an image and its neighbours in a learnt feature space mostly share a class, where pixel neighbours do not).

Global ids run rank by rank: rank 0's images first, in their order, then rank 1's, and so on."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..comm import Comm


def counts(n: int, comm: Comm, device: torch.device) -> torch.Tensor:
    """(world,) how many images each rank holds."""
    return comm.sum(torch.zeros(comm.world, device=device).index_fill_(0, torch.tensor(comm.rank, device=device), n))


def gather_all(rows: torch.Tensor, comm: Comm) -> torch.Tensor:
    """Every rank's rows, rank by rank, on every rank."""
    return comm.gather(rows, int(counts(len(rows), comm, rows.device).max().item()))


@torch.no_grad()
def mine(features: torch.Tensor, comm: Comm, n: int, chunk: int = 2048) -> torch.Tensor:
    """(N_local, n) global ids of each local image's n nearest images over all ranks by cosine similarity, nearest
    first, itself excluded. features: (N_local, D) of this rank's images."""
    mine_ = F.normalize(features.float(), dim=1)
    held = counts(len(mine_), comm, mine_.device)
    everyone = comm.gather(mine_, int(held.max().item()))  # (N, D): small beside the images (50,000 x 512: 100 MB)
    first = int(held[:comm.rank].sum().item())
    n = min(n, len(everyone) - 1)
    out = []
    for i in range(0, len(mine_), chunk):
        sim = mine_[i:i + chunk] @ everyone.T  # (c, N)
        rows = torch.arange(len(sim), device=sim.device)
        sim[rows, rows + first + i] = -float("inf")  # not itself
        out.append(sim.topk(n, dim=1).indices)
    return torch.cat(out) if out else torch.zeros(0, n, dtype=torch.long, device=mine_.device)


def purity(neighbours: np.ndarray, labels: np.ndarray) -> float:
    """The fraction of an image's neighbours that share its class (labels for information only; -1 unknown rows
    are left out). About 1/classes for neighbours that ignore class, 1 for a perfect representation."""
    known = labels >= 0
    if not known.any():
        return float("nan")
    return float((labels[neighbours[known]] == labels[known, None]).mean())
