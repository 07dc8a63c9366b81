"""The training input of one rank: its images held on the device, or streamed from its shards. No Ray here.

Both kinds give the engine one seam: `batches(epoch, steps, batch, seed, rank)` yields (uint8 (B, C, H, W) on the
device, row indices or None), exactly `steps` times, so every rank steps the same number of times whatever its
share of the data; and `sample`, uint8 (M, C, H, W) on the device, which the dataset-level statistics read.

- memory (`MemoryInput`): decoded once, held on the device; a batch is an index gather. `sample` is every image
  of the rank, so the statistics are exact. The fast path for data that fits.
- stream (`StreamInput`): an endless stream per rank. Loader processes take the rank's shards in a seeded order,
  pass after pass (resampled, so a rank with a shard fewer repeats some images instead of running dry), decode
  them on the CPU and mix them through a seeded shuffle buffer; batches are copied to the device one step ahead.
  Memory is one shard and the buffer per loader process, whatever the corpus' size.
  `sample` is a seeded uniform sample of the rank's images (`train.stats_sample` over all ranks), drawn once.
  The statistics on it are sound because each is an average or a fit over the data, which a uniform sample
  estimates without bias: k-means (the init of DCEC/IDEC/DEC, the end-of-run fit of DCEC/AE+k-means/k-means) is
  fitted on it, as sampled k-means is; the CAH/DEC frequencies f_j enter P only up to a common scale, which
  cancels; NMM's normalisers log Z_k over the sample differ from the corpus' by the same log(N/M) for every k,
  which the softmax over k cancels. NMM's π comes from the streamed batches themselves, as in memory.
- train.sample=N: either kind over a seeded uniform sample of N images across all shards (`sample_members`).

A resumed streaming run starts a fresh stream seeded by the epoch it resumes at: the same distribution of
batches, not the same order (the in-memory path resumes exactly).
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from . import features, shards
from ..comm import Comm
from ..config import TrainConfig


def device_images(images: np.ndarray, device: torch.device | str) -> torch.Tensor:
    """uint8 (N, H, W, C) images as the (N, C, H, W) uint8 tensor on the device that training and scoring read."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(device)
    return x.contiguous(memory_format=torch.channels_last) if x.is_cuda else x


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return seed * 100_003 + epoch * 1_009 + rank


class MemoryInput:
    """A rank's images decoded once and held on the device."""

    streamed = False

    def __init__(self, images: np.ndarray, device: torch.device | str, labels: np.ndarray | None = None):
        n, h, w, c = images.shape
        if h != w:
            raise ValueError(f"images must be square, got {h}x{w}; the shards' input policy crops them square")
        self.n, self.channels, self.side = n, c, h
        self.sample = device_images(images, device)  # (N, C, H, W): every image, so statistics are exact
        self.sample_labels = labels if labels is not None else np.full(n, -1, np.int64)
        self.image_shape = (c, h)  # (channels, side) of the images the model takes (features: of their images)

    @classmethod
    def of_features(cls, features: np.ndarray, image_shape: tuple[int, int], device: torch.device | str,
                    labels: np.ndarray | None = None) -> "MemoryInput":
        """A backbone's features (N, D) of images of `image_shape` (channels, side), held as (N, D, 1, 1)."""
        data = cls(features[:, None, None, :], device, labels)
        data.image_shape = image_shape
        return data

    def batches(self, epoch: int, steps: int, batch: int, seed: int, rank: int) -> Iterator[tuple]:
        gen = torch.Generator().manual_seed(epoch_seed(seed, epoch, rank))
        order = torch.randperm(self.n, generator=gen).to(self.sample.device)
        for step in range(steps):  # cycling through the shuffled rows
            idx = order[(step * batch + torch.arange(batch, device=order.device)) % self.n]
            yield self.sample[idx], idx

    def close(self) -> None:
        pass


class ShardStream(torch.utils.data.IterableDataset):
    """Endless uint8 (B, C, H, W) batches of a rank's shards. Pass p orders the shards by a permutation seeded by
    (seed, p); loader process w of W takes every W-th of them, decodes each whole and mixes its images through its
    own seeded shuffle buffer."""

    def __init__(self, uris: list[str], names: list[str], members: dict | None, checks: dict[str, str | dict],
                 mode: str, side: int, batch: int, buffer: int, seed: int):
        self.uris, self.names, self.members, self.checks, self.mode, self.side = uris, names, members, checks, mode, side
        self.batch, self.buffer, self.seed = batch, buffer, seed

    def shard_images(self, worker: int, workers: int) -> Iterator[np.ndarray]:
        for p in itertools.count():  # endless; the engine takes `steps` batches an epoch
            order = np.random.default_rng([self.seed, p]).permutation(len(self.uris))
            for i in order[worker::workers]:
                uri, name = self.uris[i], self.names[i]
                picks = None if self.members is None else self.members[name]
                yield shards.load_shard(uri, self.mode, self.side, picks, self.checks[name], name).images

    def __iter__(self) -> Iterator[torch.Tensor]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        rng = np.random.default_rng([self.seed, 7919, worker])
        pool, out = [], []
        for images in self.shard_images(worker, workers):
            for img in images:
                img = img.copy()  # a view would keep its whole shard's array alive in the buffer
                if len(pool) < self.buffer:
                    pool.append(img)
                    continue
                j = int(rng.integers(len(pool)))
                out.append(pool[j])
                pool[j] = img
                if len(out) == self.batch:
                    yield torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()
                    out = []


def ahead(batches: Iterator[torch.Tensor], device: torch.device) -> Iterator[torch.Tensor]:
    """The batches on the device, each copy started one step before it is needed."""
    def move(x):
        x = x.to(device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if x.is_cuda else x
    nxt = move(next(batches))
    while True:
        cur, nxt = nxt, move(next(batches))
        yield cur


@dataclass
class RankPlan:
    """What one rank trains on: its shards (round-robin) and, under train.sample, the chosen members of each."""
    uris: list[str]
    names: list[str]  # the manifest's name of each shard
    members: dict[str, np.ndarray] | None  # {shard name: positions}; None = whole shards
    sizes: dict[str, int]  # images the rank trains on, per shard name
    checks: dict[str, str | dict]  # per shard name, what the manifest recorded to check it by (shards.check_of)
    global_n: int
    mode: str
    side: int

    @property
    def local_n(self) -> int:
        return sum(self.sizes.values())

    @property
    def decoded_bytes(self) -> int:
        return self.local_n * (1 if self.mode == "L" else 3) * self.side ** 2


def plan_rank(cfg: TrainConfig, manifest: dict, rank: int, world: int) -> RankPlan:
    entries = shards.rank_shards(manifest["shards"], rank, world)
    members = shards.sample_members(manifest, cfg.sample, cfg.sample_seed) if cfg.sample else None
    sizes = ({s["name"]: s["samples"] for s in manifest["shards"]} if members is None
             else {name: len(m) for name, m in members.items()})
    mine = {s["name"]: sizes[s["name"]] for s in entries if sizes.get(s["name"])}
    entries = [s for s in entries if s["name"] in mine]  # under train.sample, a shard may hold none
    mode, side = shards.image_spec(manifest, cfg.side_for(shards.corpus_side(manifest)))
    return RankPlan([shards.shard_uri(cfg.shards, s) for s in entries], [s["name"] for s in entries], members, mine,
                    {s["name"]: shards.check_of(s) for s in entries}, sum(sizes.values()), mode, side)


def rank_sample(plan: RankPlan, n: int, seed: int) -> dict[str, np.ndarray]:
    """A seeded uniform sample of n of the images the rank trains on: {shard name: positions in the shard}."""
    picked = shards.sample_members({"shards": [{"name": k, "samples": v} for k, v in plan.sizes.items()]}, n, seed)
    return picked if plan.members is None else {name: plan.members[name][pos] for name, pos in picked.items()}


class StreamInput:
    """A rank's shards streamed through loader processes; a seeded sample of them held for the statistics."""

    streamed = True

    def __init__(self, plan: RankPlan, sample: shards.Decoded, device: torch.device, workers: int, buffer: int):
        self.plan, self.device = plan, device
        self.workers = min(workers, len(plan.uris))
        self.buffer = max(1, min(buffer // max(1, self.workers), plan.local_n // max(1, self.workers)))
        self.n, self.channels, self.side = plan.local_n, sample.images.shape[-1], plan.side
        self.image_shape = (self.channels, self.side)
        self.sample = device_images(sample.images, device)
        self.sample_labels = sample.labels
        self.stream, self.key = None, None

    def batches(self, epoch: int, steps: int, batch: int, seed: int, rank: int) -> Iterator[tuple]:
        if self.stream is None or self.key != (seed, batch):  # a new run (or start): a new stream from this epoch
            self.close()
            seed_now = epoch_seed(seed, epoch, rank)
            plan = self.plan
            data = ShardStream(plan.uris, plan.names, plan.members, plan.checks, plan.mode, plan.side, batch, self.buffer, seed_now)
            loader = torch.utils.data.DataLoader(
                data, batch_size=None, num_workers=self.workers, pin_memory=self.device.type == "cuda",
                prefetch_factor=4 if self.workers else None, generator=torch.Generator().manual_seed(seed_now),
                multiprocessing_context="forkserver" if self.workers else None)  # forkserver: safe beside threads
            self.stream, self.key = ahead(iter(loader), self.device), (seed, batch)
        for _ in range(steps):
            yield next(self.stream), None

    def close(self) -> None:
        self.stream = None  # the loader's processes end with their iterator


TrainInput = MemoryInput | StreamInput


def memory_budget(cfg: TrainConfig, device: torch.device, ranks_on_host: int) -> int:
    """Bytes of decoded images one rank may hold: train.memory_budget_gb, else a quarter of the host's memory
    shared by the ranks on it (and at most a quarter of the GPU's, where the images would sit)."""
    if cfg.memory_budget_gb:
        return int(cfg.memory_budget_gb * 2**30)
    budget = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4 // max(1, ranks_on_host)
    if device.type == "cuda":
        budget = min(budget, torch.cuda.get_device_properties(device).total_memory // 4)
    return budget


def loader_workers(cfg: TrainConfig) -> int:
    return cfg.loader_workers if cfg.loader_workers is not None else max(1, cfg.cpus_per_worker - 1)


def open_input(cfg: TrainConfig, manifest: dict, comm: Comm, device: torch.device | str, ranks_on_host: int = 1,
               log: Callable[[str], None] = print) -> TrainInput:
    """The rank's input by train.input. Under `auto` every rank streams when any rank's decoded images would
    exceed the budget, so that all ranks run the same code."""
    device = torch.device(device)
    if cfg.frozen_backbone:
        return open_features(cfg, comm, device, log)
    plan = plan_rank(cfg, manifest, comm.rank, comm.world)
    if plan.local_n == 0:
        raise ValueError(f"rank {comm.rank} has no images: use at least as many shards as workers"
                         + (" (or a larger train.sample)" if cfg.sample else ""))
    over = float(plan.decoded_bytes > memory_budget(cfg, device, ranks_on_host))
    stream = cfg.input == "stream" or (cfg.input == "auto" and comm.sum(torch.tensor([over], device=device)).item() > 0)
    workers = loader_workers(cfg)
    what = f"{plan.local_n:,} of {plan.global_n:,} images ({plan.decoded_bytes / 2**30:.2f} GB decoded) " \
           f"from {len(plan.uris)} shards at {plan.side}x{plan.side}"
    if plan.side > (corpus := shards.corpus_side(manifest)) and not cfg.image_size:
        what += f" (the corpus' {corpus}, enlarged to {cfg.method.name}'s least side)"
    if not stream:
        data = shards.load_shards(plan.uris, manifest, plan.side, workers=cfg.cpus_per_worker, members=plan.members)
        log(f"[rank {comm.rank}/{comm.world}] input memory: {what}")
        return MemoryInput(data.images, device, data.labels)
    m = max(1, cfg.stats_sample // comm.world)
    sample = shards.load_shards(plan.uris, manifest, plan.side, workers=cfg.cpus_per_worker,
                                members=rank_sample(plan, m, cfg.sample_seed + 1))
    log(f"[rank {comm.rank}/{comm.world}] input stream: {what}; {workers} loader processes, statistics on "
        f"{len(sample.keys):,} sampled images")
    return StreamInput(plan, sample, device, workers, cfg.shuffle_buffer)


def open_features(cfg: TrainConfig, comm: Comm, device: torch.device, log: Callable[[str], None]) -> MemoryInput:
    """A frozen backbone's run: the rank's features from the feature cache (checked against the run's backbone by
    the job's driver, `jobs.features.check_cache`), held on the device."""
    cache = features.read_manifest(cfg.feature_cache)
    if cache is None:
        raise features.CacheMismatch(f"no feature cache at {cfg.feature_cache}: run `dicl features` first")
    x = features.load_rank(cfg.feature_cache, cache, comm.rank, comm.world, cfg.sample, cfg.sample_seed)
    log(f"[rank {comm.rank}/{comm.world}] input features: {len(x):,} of {cache['rows']:,} images x {cache['dim']} "
        f"from the cache {cfg.feature_cache}")
    return MemoryInput.of_features(x, (cache["channels"], cache["side"]), device)


def as_input(data, device: torch.device | str) -> TrainInput:
    """Images (N, H, W, C) uint8 as a MemoryInput; an input as it is."""
    return data if isinstance(data, (MemoryInput, StreamInput)) else MemoryInput(data, device)
