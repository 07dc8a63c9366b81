"""Clustering heads with scikit-learn's verbs (fit, predict, predict_proba); fitted state ends in `_`.

Statistics over the dataset go through `Comm` (docs/DESIGN.md §2), so `fit` on N workers, each holding
its own rows, gives the same centres as `fit` in one process on all rows.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..comm import Comm
from .losses import sq_distances, student_t_assign


def kmeans_pp(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding on one (gathered) sample: (N, D) -> (K, D)."""
    first = torch.randint(len(x), (1,), generator=generator, device="cpu").item()
    centers = [x[first]]
    d2 = sq_distances(x, x[first:first + 1])[:, 0]
    for _ in range(1, k):
        probs = (d2 / d2.sum()).cpu() if d2.sum() > 0 else torch.full((len(x),), 1.0 / len(x))
        nxt = torch.multinomial(probs, 1, generator=generator).item()
        centers.append(x[nxt])
        d2 = torch.minimum(d2, sq_distances(x, x[nxt:nxt + 1])[:, 0])
    return torch.stack(centers)


def lloyd(x: torch.Tensor, centers: torch.Tensor, sample: torch.Tensor, comm: Comm, iters: int, tol: float):
    """Lloyd steps from `centers`; returns (centres, global inertia, empty clusters re-seeded)."""
    k, reseeded = len(centers), 0
    for _ in range(iters):
        assign = sq_distances(x, centers).argmin(1)  # (N,)
        sums = comm.sum(torch.zeros_like(centers).index_add_(0, assign, x))
        counts = comm.sum(torch.zeros(k, device=x.device).index_add_(0, assign, torch.ones(len(x), device=x.device)))
        new = sums / counts.clamp_min(1)[:, None]
        empty = (counts == 0).nonzero().flatten()
        if len(empty):  # an empty cluster moves to the sample point worst served by the others
            far = sq_distances(sample, new).min(1).values.argsort(descending=True)
            new[empty] = sample[far[: len(empty)]]
            reseeded += len(empty)
        shift = (new - centers).pow(2).sum().item()
        centers = new
        if shift < tol:
            break
    inertia = comm.sum(sq_distances(x, centers).min(1).values.sum().reshape(1)).item()
    return centers, inertia, reseeded


def kmeans(x: torch.Tensor, k: int, comm: Comm = Comm(), iters: int = 100, seed: int = 0, n_init: int = 10,
           sample_per_rank: int = 20_000, tol: float = 1e-6) -> tuple[torch.Tensor, int]:
    """Distributed k-means over every rank's rows. Returns (centres (K, D), empty clusters re-seeded).

    Seeding: k-means++ on a sample gathered from all ranks, with the same generator everywhere,
    so every rank starts from the same centres. Each Lloyd step all-reduces per-cluster sums and
    counts. Of `n_init` runs the one with the lowest global inertia wins (as scikit-learn).
    """
    x = x.float()
    gen = torch.Generator().manual_seed(seed)
    local = x[torch.randperm(len(x), generator=gen)[:sample_per_rank].to(x.device)]
    sample = comm.gather(local, sample_per_rank)
    total = int(comm.sum(torch.tensor([float(len(x))], device=x.device)).item())
    if total < k:
        raise ValueError(f"k={k} clusters but only {total} samples: lower k or add data")
    best = None
    for _ in range(n_init):
        run = lloyd(x, kmeans_pp(sample, k, gen), sample, comm, iters, tol)
        if best is None or run[1] < best[1]:
            best = run
    return best[0], best[2]


class KMeansHead(nn.Module):
    """Hard k-means on codes; predict_proba is the Student-t soft assignment to the centres."""

    def __init__(self, k: int, dim: int):
        super().__init__()
        self.k = k
        self.register_buffer("centers_", torch.zeros(k, dim))
        self.reseeded_ = 0

    def fit(self, z: torch.Tensor, comm: Comm = Comm(), seed: int = 0) -> "KMeansHead":
        centers, self.reseeded_ = kmeans(z.detach(), self.k, comm, seed=seed)
        with torch.no_grad():
            self.centers_.copy_(centers)
        return self

    def predict_proba(self, z: torch.Tensor) -> torch.Tensor:
        return student_t_assign(z, self.centers_)

    def predict(self, z: torch.Tensor) -> torch.Tensor:
        return sq_distances(z, self.centers_).argmin(1)


class StudentTHead(KMeansHead):
    """DEC/CAH head: the same centres, but trainable, so the clustering loss moves them (seed 001)."""

    def __init__(self, k: int, dim: int):
        super().__init__(k, dim)
        del self.centers_
        self.centers_ = nn.Parameter(torch.zeros(k, dim))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.predict_proba(z)  # (B, K)


class MixtureHead(nn.Module):
    """NMM head (seed 002): posteriors from the network's K outputs, mixture weights π and, for batch-free
    prediction, each component's normaliser over the whole dataset (log Z_k, so g_k(x) = exp(l_k(x)) / Z_k).

    With several sub-heads (K outputs each, trained side by side), π is kept per sub-head and `choice_` names the
    one that labels; the normaliser is that one's."""

    def __init__(self, k: int, heads: int = 1):
        super().__init__()
        self.k = k
        self.register_buffer("log_pi_", torch.full((heads, k), -math.log(k)))
        self.register_buffer("log_norm_", torch.zeros(k))
        self.register_buffer("choice_", torch.zeros((), dtype=torch.long))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints written before sub-heads hold one π of shape (K,) and no choice: read them as one sub-head.
        log_pi = state_dict.get(prefix + "log_pi_")
        if log_pi is not None and log_pi.dim() == 1:
            state_dict[prefix + "log_pi_"] = log_pi[None]
            state_dict.setdefault(prefix + "choice_", torch.zeros((), dtype=torch.long))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def set_weights(self, resp_sum: torch.Tensor, momentum: float) -> None:
        """π tracks the mean responsibility; resp_sum (heads, K) is Σ_i γ_i over the whole corpus (all-reduced)."""
        share = resp_sum / resp_sum.sum(-1, keepdim=True).clamp_min(1e-12)
        pi = momentum * self.log_pi_.exp() + (1 - momentum) * share
        self.log_pi_.copy_(pi.clamp_min(1e-6).log())

    @torch.no_grad()
    def fit(self, logits: torch.Tensor, comm: Comm = Comm(), seed: int = 0) -> "MixtureHead":
        """log Z_k = logsumexp over every rank's rows of output k (of the chosen sub-head)."""
        logits = logits.float()
        local_max = logits.max(0).values if len(logits) else torch.full((self.k,), -1e30, device=logits.device)
        top = comm.gather(local_max[None], 1).max(0).values  # (K,) the same on every rank
        self.log_norm_.copy_(top + comm.sum((logits - top).exp().sum(0)).clamp_min(1e-30).log())
        return self

    def predict_proba(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits.float() - self.log_norm_ + self.log_pi_[self.choice_], dim=1)  # (B, K)

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        return self.predict_proba(logits).argmax(1)


class SoftmaxHead(nn.Module):
    """Posteriors straight from a network's cluster logits (VC's q(y|x)); nothing to fit."""

    def fit(self, logits: torch.Tensor, comm: Comm = Comm(), seed: int = 0) -> "SoftmaxHead":
        return self

    def predict_proba(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits.float(), 1)

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(1)
