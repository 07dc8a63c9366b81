"""Shard job: a source (image folder, MNIST IDX, NPZ, sklearn digits) -> WebDataset shards + manifest.json; or an
existing WebDataset corpus (a folder, prefix or brace pattern of tars) -> its index, a manifest.json of the tars
where they lie, and no copy.

One Ray task writes one shard (or indexes a group of tars); unreadable images are counted, skipped and listed in the
manifest. The old manifest goes first and the new one is written last, so a job that fails part-way leaves no
manifest that could describe a mix of old and new shards; readers also check every shard against its manifest
sha256 (or an indexed tar's fingerprint).
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from typing import TYPE_CHECKING

import numpy as np
import ray
from tqdm import tqdm

from clustering import lease
from clustering.data import corpus, shards, sources, storage
from clustering.data.sources import SourceError, open_source

from .runtime import chunks

if TYPE_CHECKING:  # the shard tasks import this module: the config (which imports the methods, and torch) stays out
    from clustering.config import ShardConfig


@ray.remote
def _write_shard(source, items, uri, store_side):
    return shards.write_items(source, items, uri, store_side)


TARS_PER_TASK = 8  # tars one index task walks: a few seconds of header reads each, enough tasks to spread


@ray.remote
def _index_tars(uris):
    try:
        return [corpus.index_tar(u) for u in uris]
    except corpus.CorpusError as e:
        return [{"uri": uris[0], "error": str(e)}]


@ray.remote
def _duplicates(uris):
    return corpus.duplicates(uris)


def index_manifest(cfg: ShardConfig, entries: list[dict], cut: list[str]) -> dict:
    """The manifest of an indexed corpus: its tars where they lie, their sampled shapes, and what was skipped (`cut`:
    the tars cut short or damaged)."""
    skipped = cut + [x for e in entries for x in e["skipped_examples"]]
    shapes = Counter()
    for e in entries:
        for shape, n in e.pop("shapes").items():
            h, w, mode = shape.split("x", 2)
            shapes[(int(h), int(w), mode)] += n
    summary = shards.shape_summary(shapes) if shapes else None
    if summary is None:
        raise SourceError(f"{cfg.source!r}: none of the probed images could be read (their first bytes are no image)")
    return {
        "source": cfg.source,
        "layout": "webdataset",  # the tars are read where they lie; `uri` in each entry says where
        "num_samples": sum(e["samples"] for e in entries),
        "shards": [{k: e[k] for k in ("name", "uri", "index", "samples", "bytes", "fingerprint", "images",
                                      "first_key", "last_key")} for e in entries],
        "image": shards.choose_image(summary),
        "shapes": {**summary, "sampled": f"the first {corpus.SHAPE_PROBES} images of each tar"},
        "labelled": sum(e["labelled"] for e in entries),
        "classes": None,
        "skipped": {"count": len(cut) + sum(e["skipped"] for e in entries), "examples": skipped[:100]},
        "hidden": {"count": 0, "examples": []},
        "content_hash": corpus.content_hash(entries),
    }


PLAN_LINES = 100_000  # files per part of a folder's plan (JSON lines): a shard task reads one or two parts


def write_plan(files: list[tuple[str, int]], base: str) -> list[tuple[str, int, int]]:
    """Files (relative path, size) of one listing task, with their keys, as parts of the plan under `base`:
    [(part URI, files, bytes)]. Keys are unique within a task (a clash gets a hash: sources.unique_keys), and the
    tasks split the tree by top-level folder, whose sanitised names differ."""
    keys = sources.unique_keys([rel for rel, _ in files])
    parts = []
    for n, start in enumerate(range(0, len(files), PLAN_LINES)):
        chunk = list(zip(files[start:start + PLAN_LINES], keys[start:start + PLAN_LINES]))
        uri = f"{base}-{n:04d}.jsonl"
        storage.write_bytes(uri, "".join(json.dumps([rel, size, key]) + "\n" for (rel, size), key in chunk).encode())
        parts.append((uri, len(chunk), sum(size for (_, size), _ in chunk)))
    return parts


def listed(listing: sources.Listing, parts: list) -> dict:
    """What a listing task returns to the driver: O(plan parts + problems), never a file each."""
    names, nested = sources.parent_names(rel for rel, _ in listing.files)
    return {"parts": parts, "names": sorted(names), "nested": nested, "listed": listing.listed,
            "hidden": len(listing.hidden), "hidden_examples": listing.hidden[:20], "unlisted": listing.unlisted,
            "folders": listing.folders}


@ray.remote
def _list_top(root: str, plan: str) -> dict:
    listing = sources.walk_images(root, top_only=True)
    return listed(listing, write_plan(listing.files, f"{plan}/top"))


@ray.remote
def _list_folders(root: str, subs: list[str], plan: str) -> dict:
    listing = sources.walk_images(root, tuple(subs))
    return listed(listing, write_plan(listing.files, plan))


@ray.remote
def _write_planned(root: str, ranges: list[tuple[str, int, int]], classes: list[str] | None, uri: str,
                   store_side: int | None):
    files = []
    for part, start, end in ranges:
        lines = storage.read_bytes(part).decode().splitlines()[start:end]
        files += [tuple(json.loads(line)) for line in lines]
    items = sources.folder_items(root, files, classes)
    return shards.write_items(sources.FileListSource([]), items, uri, store_side)


def run_shard(cfg: ShardConfig, progress: bool = True) -> dict:
    """Shard the source into cfg.output, or index it there when it is a WebDataset corpus, holding the output's
    lock (a second shard job into it is refused)."""
    if corpus.is_webdataset(cfg.source):
        with lease.hold(cfg.output, "dicl shard"):
            return index_corpus(cfg, progress)
    source = open_source(cfg.source, list_files=False)
    with lease.hold(cfg.output, "dicl shard"):
        if isinstance(source, str):  # a folder tree: listed and planned in tasks, the plan kept in storage
            return write_folder(cfg, source, progress)
        return write_corpus(cfg, source, progress)


def write_folder(cfg: ShardConfig, root: str, progress: bool) -> dict:
    """A folder tree's shards, the driver holding O(shards + top-level folders), never a file each: one task lists
    the top level, one task per top-level folder walks it; each writes its files' plan to storage in parts and
    returns their counts. Shards are consecutive runs of the plan (of the corpus' mean file size within
    shard.max_shard_bytes), and each shard task reads its run from the parts."""
    plan, root = storage.join(cfg.output, "_plan"), storage.absolute(root)
    storage.remove_tree(plan)
    top = ray.get(_list_top.remote(root, plan))
    by_name: dict[str, list[str]] = {}  # folders whose names sanitise alike share a task, so their keys cannot clash
    for sub in top["folders"]:
        by_name.setdefault(sources.sanitize_key(sub), []).append(sub)
    tasks = [_list_folders.remote(root, subs, f"{plan}/{i:06d}") for i, subs in enumerate(by_name.values())]
    found = [top] + ray.get(tasks)
    parts = [p for f in found for p in f["parts"]]
    files = sum(n for _, n, _ in parts)
    if files == 0:
        storage.remove_tree(plan)
        raise sources.no_images(cfg.source, sum(f["listed"] for f in found))
    names = sorted({n for f in found for n in f["names"]})
    classes = names if any(f["nested"] for f in found) else None
    mean = max(1, sum(b for _, _, b in parts) // files)
    per_shard = max(1, min(cfg.samples_per_shard, cfg.max_shard_bytes // mean))
    groups = plan_runs([(uri, n) for uri, n, _ in parts], min(files, cfg.limit or files), per_shard)
    storage.remove(storage.join(cfg.output, shards.MANIFEST))
    pending = {_write_planned.remote(root, ranges, classes, storage.join(cfg.output, shards.shard_name(i)),
                                     store_side(cfg)): i for i, (_, ranges) in enumerate(groups)}
    results = gather(pending, [n for n, _ in groups], progress)
    unlisted = [u for f in found for u in f["unlisted"]]
    hidden = {"count": sum(f["hidden"] for f in found), "examples": [h for f in found for h in f["hidden_examples"]][:20]}
    manifest = finish_manifest(cfg, results, unlisted, hidden, classes)
    storage.remove_tree(plan)
    return manifest


def plan_runs(parts: list[tuple[str, int]], total: int, per_shard: int) -> list[tuple[int, list[tuple[str, int, int]]]]:
    """The plan's first `total` files, its parts (URI, files) read in order, cut into shards of `per_shard` files:
    [(files, [(part URI, first line, end line), ...])], a shard spanning parts where a part ends inside it."""
    starts = np.cumsum([0] + [n for _, n in parts])
    groups = []
    for lo in range(0, total, per_shard):
        hi = min(lo + per_shard, total)
        ranges = []
        for j in range(int(np.searchsorted(starts, lo, side="right")) - 1, len(parts)):
            if starts[j] >= hi:
                break
            ranges.append((parts[j][0], int(max(lo, starts[j]) - starts[j]), int(min(hi, starts[j + 1]) - starts[j])))
        groups.append((hi - lo, ranges))
    return groups


def store_side(cfg: ShardConfig) -> int | None:
    return cfg.image_size if cfg.store == "resized" else None


def gather(pending: dict, sizes: list[int], progress: bool, desc: str = "shard", unit: str = "img") -> dict:
    """The tasks' results by number ({ref: number}), a progress bar of their `sizes` as they end."""
    results = {}
    with tqdm(total=sum(sizes), desc=desc, unit=unit, disable=not progress) as bar:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            i = pending.pop(done[0])
            results[i] = ray.get(done[0])
            bar.update(sizes[i])
    return results


def index_corpus(cfg: ShardConfig, progress: bool) -> dict:
    """A manifest of the tars where they lie: tasks walk the tars' headers; the driver holds one entry per tar."""
    uris = corpus.tar_uris(storage.absolute(cfg.source))
    if not uris:
        raise SourceError(f"source {cfg.source!r} names no .tar file")
    storage.remove(storage.join(cfg.output, shards.MANIFEST))  # written again last, when every tar is indexed
    groups = chunks(uris, TARS_PER_TASK)
    found = gather({_index_tars.remote(g): i for i, g in enumerate(groups)}, [len(g) for g in groups], progress,
                   "index", "tar")
    indexed = [e for i in sorted(found) for e in found[i]]
    errors = [e["error"] for e in indexed if "error" in e]
    if errors:
        raise SourceError(f"cannot index {cfg.source!r}: {errors[0]}" + (f" (and {len(errors) - 1} more)" if errors[1:] else ""))
    for entry, name in zip(indexed, corpus.tar_names(uris)):
        entry["name"] = name
    cut = [e["truncated"] for e in indexed if "truncated" in e]
    entries, taken = [], 0
    for e in indexed:
        if e["samples"] and (cfg.limit is None or taken < cfg.limit):  # shard.limit: whole tars, up to the limit
            entries.append(e)
            taken += e["samples"]
    for i, e in enumerate(entries):
        e["index"] = i  # the number of its Parquet part
    clashes = [d for found in ray.get([_duplicates.remote([entries[i]["uri"] for i in g])
                                       for g in corpus.overlapping(entries)]) for d in found]
    if clashes:
        key, a, b = clashes[0]
        raise SourceError(f"the key {key!r} names a sample in {a} and another in {b} ({len(clashes)} such keys found): "
                          "keys must be unique across the corpus, as outputs join back by key. Rename one of them, "
                          "or index the tars apart")
    if not entries:
        raise SourceError(f"no readable samples in {cfg.source!r}: " + "; ".join(
            (cut + [x for e in indexed for x in e.get("skipped_examples", [])])[:3]))
    manifest = index_manifest(cfg, entries, cut)
    shards.write_manifest(cfg.output, manifest)
    for uri in shards.unlisted_shards(cfg.output, manifest):  # an earlier shard job's: no manifest names them now
        storage.remove(uri)
    return manifest


def write_corpus(cfg: ShardConfig, source, progress: bool) -> dict:
    items = source.plan()[: cfg.limit]
    groups = shards.plan_shards(items, cfg.samples_per_shard, cfg.max_shard_bytes)
    storage.remove(storage.join(cfg.output, shards.MANIFEST))  # written again last, when every shard is
    source_ref = ray.put(source)  # shipped once, shared by every task
    pending = {
        _write_shard.remote(source_ref, group, storage.join(cfg.output, shards.shard_name(i)), store_side(cfg)): i
        for i, group in enumerate(groups)
    }
    results = gather(pending, [len(g) for g in groups], progress)
    hidden = getattr(source, "hidden", [])
    return finish_manifest(cfg, results, getattr(source, "unlisted", []),
                           {"count": len(hidden), "examples": hidden[:20]}, getattr(source, "classes", None))


def finish_manifest(cfg: ShardConfig, results: dict, unlisted: list[str], hidden: dict, classes) -> dict:
    """The manifest of the written shards (written last), and the removal of shards no manifest names any more."""
    written = [results[i]["shard"] for i in sorted(results) if results[i]["shard"]]
    skipped = unlisted + [s for i in sorted(results) for s in results[i]["skipped"]]
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
        "classes": classes,
        "skipped": {"count": len(skipped), "examples": skipped[:100]},
        "hidden": hidden,  # dot-named files and folders, not read
        "content_hash": hashlib.sha256("".join(s["sha256"] for s in written).encode()).hexdigest(),
        # What each shard.store costs for this corpus: the originals' bytes, and what was stored.
        "store": {"kind": cfg.store, "side": store_side(cfg), "bytes": sum(s["bytes"] for s in written),
                  "image_bytes": sum(r["image_bytes"] for r in results.values()),
                  "original_bytes": sum(r["original_bytes"] for r in results.values())},
    }
    shards.write_manifest(cfg.output, manifest)
    for uri in shards.unlisted_shards(cfg.output, manifest):
        storage.remove(uri)  # a shard of an earlier, larger corpus: no manifest names it any more
    return manifest


def describe(manifest: dict, output: str) -> str:
    img, shapes = manifest["image"], manifest["shapes"]
    if manifest.get("layout") == "webdataset":
        head = (f"indexed {manifest['num_samples']:,} samples in {len(manifest['shards'])} tars of {manifest['source']} "
                f"in place ({sum(s['bytes'] for s in manifest['shards']) / 2**20:,.1f} MiB, not copied): "
                f"{output}/{shards.MANIFEST} ({manifest['labelled']:,} with labels)")
    else:
        head = (f"wrote {manifest['num_samples']:,} samples in {len(manifest['shards'])} shards to {output} "
                f"({manifest['labelled']:,} with labels)")
    lines = [
        head,
        f"  training input {img['side']}x{img['side']} {'gray' if img['channels'] == 1 else 'RGB'} "
        f"(train.image_size to change): {shards.POLICY}",
    ]
    if shapes["distinct"] > 1:
        q, modes = shapes["shorter_side"], ", ".join(f"{m} {n:,}" for m, n in shapes["modes"].items())
        lines.append(f"  {shapes['distinct']:,} image shapes: shorter side {q['min']}..{q['max']} (median {q['median']}); "
                     f"modes {modes}")
    if manifest.get("store"):
        st, side = manifest["store"], img["side"]
        if st["kind"] == "resized":
            lines.append(f"  stored resized at up to {st['side']} px: images of {st['image_bytes'] / 2**20:,.1f} MiB "
                         f"({st['bytes'] / 2**20:,.1f} MiB of shards), where the originals hold "
                         f"{st['original_bytes'] / 2**20:,.1f} MiB (shard.store=original keeps them)")
        else:
            raw = manifest["num_samples"] * img["channels"] * side ** 2
            lines.append(f"  stored the originals: {st['bytes'] / 2**20:,.1f} MiB. shard.store=resized would store "
                         f"each at the training input instead, at most {raw / 2**20:,.1f} MiB of raw pixels at "
                         f"{side}x{side} before encoding")
    if manifest.get("hidden", {}).get("count"):
        lines.append(f"  left out {manifest['hidden']['count']} hidden (dot-named) files and folders, e.g. "
                     f"{manifest['hidden']['examples'][0]}")
    if manifest["skipped"]["count"]:
        lines.append(f"  skipped {manifest['skipped']['count']} unreadable inputs, e.g. {manifest['skipped']['examples'][0]}")
    return "\n".join(lines)
