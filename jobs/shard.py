"""Shard job: a source (image folder, MNIST IDX, NPZ, sklearn digits) -> WebDataset shards + manifest.json.

One Ray task writes one shard; unreadable images are counted, skipped and listed in the manifest. The old
manifest goes first and the new one is written last, so a job that fails part-way leaves no manifest that could
describe a mix of old and new shards; readers also check every shard against its manifest sha256.
"""
from __future__ import annotations

import hashlib
from collections import Counter
from typing import TYPE_CHECKING

import ray
from tqdm import tqdm

from clustering import lease, shards, storage
from clustering.sources import SourceError, open_source

if TYPE_CHECKING:  # the shard tasks import this module: the config (which imports the methods, and torch) stays out
    from clustering.config import ShardConfig


@ray.remote
def _write_shard(source, items, uri):
    return shards.write_items(source, items, uri)


def run_shard(cfg: ShardConfig, progress: bool = True) -> dict:
    """Shard the source into cfg.output, holding its lock (a second shard job into it is refused)."""
    source = open_source(cfg.source)
    with lease.hold(cfg.output, "dicl shard"):
        return write_corpus(cfg, source, progress)


def write_corpus(cfg: ShardConfig, source, progress: bool) -> dict:
    items = source.plan()[: cfg.limit]
    groups = shards.plan_shards(items, cfg.samples_per_shard, cfg.max_shard_bytes)
    storage.remove(storage.join(cfg.output, shards.MANIFEST))  # written again last, when every shard is
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
    skipped = getattr(source, "unlisted", []) + [s for i in sorted(results) for s in results[i]["skipped"]]
    shapes = Counter()
    for r in results.values():
        shapes.update(r["shapes"])
    total = sum(s["samples"] for s in written)
    if total == 0:
        reasons = "; ".join(skipped[:3])
        raise SourceError(f"no readable images in {cfg.source!r}: all {len(skipped)} inputs were skipped ({reasons})")
    summary = shards.shape_summary(shapes)
    hidden = getattr(source, "hidden", [])
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
        "hidden": {"count": len(hidden), "examples": hidden[:20]},  # dot-named files and folders, not read
        "content_hash": hashlib.sha256("".join(s["sha256"] for s in written).encode()).hexdigest(),
    }
    shards.write_manifest(cfg.output, manifest)
    kept = {s["name"] for s in written}
    for uri in storage.list_files(cfg.output, ".tar"):
        if shards.is_shard_name(shards.name_of(uri)) and shards.name_of(uri) not in kept:
            storage.remove(uri)  # a shard of an earlier, larger corpus: no manifest names it any more
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
    if manifest.get("hidden", {}).get("count"):
        lines.append(f"  left out {manifest['hidden']['count']} hidden (dot-named) files and folders, e.g. "
                     f"{manifest['hidden']['examples'][0]}")
    if manifest["skipped"]["count"]:
        lines.append(f"  skipped {manifest['skipped']['count']} unreadable inputs, e.g. {manifest['skipped']['examples'][0]}")
    return "\n".join(lines)
