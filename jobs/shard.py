"""Shard job: a source (image folder, MNIST IDX, NPZ, sklearn digits) -> WebDataset shards + manifest.json.

One Ray task writes one shard; unreadable images are counted, skipped and listed in the manifest.
"""
from __future__ import annotations

import hashlib
from collections import Counter

import ray
from tqdm import tqdm

from clustering import shards, storage
from clustering.config import ShardConfig
from clustering.sources import SourceError, open_source


@ray.remote
def _write_shard(source, items, uri):
    return shards.write_items(source, items, uri)


def run_shard(cfg: ShardConfig, progress: bool = True) -> dict:
    source = open_source(cfg.source)
    items = source.plan()[: cfg.limit]
    groups = shards.plan_shards(items, cfg.samples_per_shard, cfg.max_shard_bytes)
    storage.check_writable(cfg.output)
    source_ref = ray.put(source)  # shipped once, shared by every task
    pending = {
        _write_shard.remote(source_ref, group, storage.join(cfg.output, shards.shard_name(i))): i
        for i, group in enumerate(groups)
    }
    results = {}
    with tqdm(total=len(items), desc="shard", unit="img", disable=not progress) as bar:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            i = pending.pop(done[0])
            results[i] = ray.get(done[0])
            bar.update(len(groups[i]))

    written = [results[i]["shard"] for i in sorted(results) if results[i]["shard"]]
    skipped = [s for i in sorted(results) for s in results[i]["skipped"]]
    shapes = Counter()
    for r in results.values():
        shapes.update(r["shapes"])
    total = sum(s["samples"] for s in written)
    if total == 0:
        reasons = "; ".join(skipped[:3])
        raise SourceError(f"no readable images in {cfg.source!r}: all {len(skipped)} inputs were skipped ({reasons})")
    summary = shards.shape_summary(shapes)
    labelled = sum(r["labelled"] for r in results.values())
    manifest = {
        "source": cfg.source,
        "num_samples": total,
        "shards": written,
        # What every image becomes when read (shards.POLICY), unless train.image_size sets the side.
        "image": shards.choose_image(summary),
        "shapes": summary,
        "labelled": labelled,
        "classes": getattr(source, "classes", None),
        "skipped": {"count": len(skipped), "examples": skipped[:100]},
        "content_hash": hashlib.sha256("".join(s["sha256"] for s in written).encode()).hexdigest(),
    }
    shards.write_manifest(cfg.output, manifest)
    return manifest


def describe(manifest: dict, output: str) -> str:
    img, shapes = manifest["image"], manifest["shapes"]
    lines = [
        f"wrote {manifest['num_samples']:,} samples in {len(manifest['shards'])} shards to {output} "
        f"({manifest['labelled']:,} with labels)",
        f"  training input {img['side']}x{img['side']} {'gray' if img['channels'] == 1 else 'RGB'} "
        f"(train.image_size to change): {shards.POLICY}",
    ]
    if shapes["distinct"] > 1:
        q, modes = shapes["shorter_side"], ", ".join(f"{m} {n:,}" for m, n in shapes["modes"].items())
        lines.append(f"  {shapes['distinct']:,} image shapes: shorter side {q['min']}..{q['max']} (median {q['median']}); "
                     f"modes {modes}")
    if manifest["skipped"]["count"]:
        lines.append(f"  skipped {manifest['skipped']['count']} unreadable inputs, e.g. {manifest['skipped']['examples'][0]}")
    return "\n".join(lines)
