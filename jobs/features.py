"""Feature job: a frozen backbone's features of every image, computed once into the feature cache
(clustering/data/features.py). Ray Data decodes the shards in CPU tasks and an actor pool holding the backbone (a GPU
each, where there are GPUs; the label job's pool settings) writes one part per shard; features.json last.

Train, tune and label then read the cache: a trial on it trains a small net on vectors, in seconds.
"""
from __future__ import annotations

import functools
import json
import time

import numpy as np
import ray
import torch

from clustering import lease
from clustering.config import LabelConfig, TrainConfig
from clustering.data import features, shards, storage
from clustering.data.inputs import device_images
from clustering.model.backbones import pretrained
from clustering.model.methods import embed_all

from .decode import decode_memory, decode_shard, shard_rows
from .progress import pool_bar
from .runtime import check_pool, want_gpu


def image_policy(cfg: TrainConfig, manifest: dict) -> tuple[str, int, int]:
    """(mode, side, channels) at which the shards' images reach the backbone: train.image_size by the input policy."""
    mode, side = shards.image_spec(manifest, cfg.image_size)
    return mode, side, 1 if mode == "L" else 3


def fingerprint(cfg: TrainConfig, manifest: dict) -> tuple[str, int]:
    """(the fingerprint of the run's backbone, its weights loaded as a run loads them, at the shards' input policy;
    its feature width)."""
    _, side, channels = image_policy(cfg, manifest)
    return backbone_fingerprint(cfg.encoder, cfg.backbone_size, cfg.weights, channels, side)


@functools.lru_cache(maxsize=8)
def backbone_fingerprint(encoder: str, size: int, weights: str, channels: int, side: int) -> tuple[str, int]:
    """Once per process for each backbone: the tune job checks every trial's before any starts."""
    backbone = pretrained(encoder, size, weights)
    return backbone.fingerprint(channels, side), backbone.out_dim


def check_cache(cfg: TrainConfig, manifest: dict) -> dict:
    """The run's feature cache, or CacheMismatch naming what differs; on the driver, before any worker starts."""
    base = cfg.feature_cache
    return features.check(base, features.read_manifest(base), fingerprint(cfg, manifest)[0], manifest)


class FeatureWriter:
    """One actor of the pool: loads the backbone once, then writes each decoded shard's features as one part."""

    def __init__(self, cfg: dict, base: str, gpu: bool, batch_size: int, threads: int):
        self.cfg, self.base, self.batch_size = TrainConfig(**cfg), base, batch_size
        self.device = "cuda" if gpu and torch.cuda.is_available() else "cpu"
        if self.device == "cpu":
            torch.set_num_threads(threads)
        self.backbone = pretrained(self.cfg.encoder, self.cfg.backbone_size, self.cfg.weights).to(self.device).eval()

    def __call__(self, batch: dict) -> dict:
        rows, skips = [], []
        for index, keys, sources, skipped, images in zip(batch["index"], batch["keys"], batch["sources"],
                                                         batch["skipped"], batch["images"]):
            keys, skipped = json.loads(str(keys)), json.loads(str(skipped))
            x = device_images(np.ascontiguousarray(images), self.device)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device == "cuda"):
                feats = embed_all(self.backbone, x, self.batch_size, fn=self.backbone).cpu().numpy()
            rows.append(features.write_part(self.base, int(index), keys, json.loads(str(sources)), feats, skipped))
            skips.append(len(skipped))
        return {"index": batch["index"], "rows": np.array(rows), "skipped": np.array(skips)}


def write_features(todo: list[dict], manifest: dict, cfg: TrainConfig, pool: LabelConfig, gpu: bool,
                   progress: bool) -> dict[int, tuple[int, int]]:
    """Every shard's part of the cache; returns {part index: (rows, skipped images)}, as the actors report them."""
    mode, side, channels = image_policy(cfg, manifest)
    ray.data.DataContext.get_current().raise_original_map_exception = True
    ds = ray.data.from_items(shard_rows(cfg.shards, todo), override_num_blocks=len(todo))
    ds = ds.map_batches(decode_shard, batch_size=1, num_cpus=1, memory=decode_memory(manifest, channels, side),
                        concurrency=pool.decoders, fn_kwargs={"mode": mode, "side": side})
    ds = ds.map_batches(
        FeatureWriter, batch_size=1, compute=ray.data.ActorPoolStrategy(size=min(pool.actors, len(todo))),
        num_gpus=1 if gpu else 0, num_cpus=0 if gpu else pool.cpus_per_actor,
        fn_constructor_kwargs={"cfg": cfg.model_dump(mode="json"), "base": cfg.feature_cache, "gpu": gpu,
                               "batch_size": pool.batch_size, "threads": pool.cpus_per_actor})
    written = {}
    with pool_bar(sum(e["samples"] for e in todo), "features", progress) as bar:
        for done in ds.iter_batches(batch_size=None):
            written.update({int(i): (int(r), int(k)) for i, r, k in zip(done["index"], done["rows"], done["skipped"])})
            bar.update(int(np.sum(done["rows"]) + np.sum(done["skipped"])))
    return written


def run_features(cfg: TrainConfig, pool: LabelConfig, progress: bool = False) -> dict:
    """Compute the feature cache of train.shards by train's backbone, unless the cache there is already this
    backbone's (then it is kept); returns the cache's manifest. A cache of another backbone is refused."""
    cfg = cfg.model_copy(update={"shards": storage.absolute(cfg.shards),
                                 "features": storage.absolute(cfg.feature_cache)})
    manifest = shards.read_manifest(cfg.shards)
    base, existing = cfg.features, features.read_manifest(cfg.features)
    t0 = time.perf_counter()
    fp, dim = fingerprint(cfg, manifest)
    if existing is not None:
        return {**features.check(base, existing, fp, manifest), "reused": True}
    _, side, channels = image_policy(cfg, manifest)
    gpu = want_gpu(pool.use_gpu)
    check_pool("features", min(pool.actors, len(manifest["shards"])), pool.cpus_per_actor, gpu)
    with lease.hold(base, "dicl features"):
        written = write_features(manifest["shards"], manifest, cfg, pool, gpu, progress)
        parts = [{"index": i, "name": e["name"], "rows": written[i][0], "skipped": written[i][1]}
                 for e in manifest["shards"] for i in [shards.part_index(e)]]
        cache = {"encoder": cfg.encoder, "weights": cfg.weights, "backbone_size": cfg.backbone_size,
                 "fingerprint": fp, "content_hash": manifest["content_hash"], "channels": channels, "side": side,
                 "dim": dim, "rows": sum(p["rows"] for p in parts), "parts": parts,
                 "seconds": round(time.perf_counter() - t0, 1)}
        features.write_manifest(base, cache)
    return {**cache, "reused": False}


def describe(cache: dict, base: str) -> str:
    what = "kept (computed by this backbone before)" if cache["reused"] else f"computed in {cache['seconds']:.0f}s"
    return (f"features: {cache['rows']:,} images x {cache['dim']} by {cache['encoder']} at {cache['backbone_size']} px, "
            f"{what}: {base}")
