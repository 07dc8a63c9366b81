"""The label job's decoding task, in a module of its own: Ray imports a task's module in each worker process, and
this one imports no torch (nor webdataset, pandas or the model), so a decode worker starts in a fraction of the time
and memory of one that imports the label job (a test holds it so)."""
from __future__ import annotations

import json

import numpy as np

from clustering.data import shards


def shard_rows(base: str, entries: list[dict]) -> list[dict]:
    """One row per shard, as `decode_shard` and `read_cached` take them: its URI, name, part index and check."""
    return [{"shard": shards.shard_uri(base, e), "name": e["name"], "index": shards.part_index(e),
             "check": json.dumps(shards.check_of(e))} for e in entries]


def decode_memory(manifest: dict, channels: int, side: int) -> int:
    """The memory a decode task asks for, with Ray Data's 25% headroom: a worker process (~200 MiB with its imports,
    measured on MNIST: this module keeps torch out) and its shard twice, read and decoded. It schedules where that
    fits, and the request (which the actors do not make) keeps Ray Data from fusing the decoding into the actors."""
    biggest = max(manifest["shards"], key=lambda s: s["samples"])
    return 250 * 2**20 + 2 * (biggest["bytes"] + biggest["samples"] * channels * side ** 2)


def decode_shard(batch: dict, mode: str, side: int) -> dict:
    """A Ray Data task on a CPU: one shard (checked against its manifest entry's sha256 or fingerprint) -> one row
    with its keys, the sources its images came from, the images that did not decode, and its images by the input
    policy."""
    uri, name = str(batch["shard"][0]), str(batch["name"][0])
    data = shards.decode_samples(shards.read_shard(uri, json.loads(str(batch["check"][0]))), mode, side, name)
    return {"shard": np.array([uri]), "name": np.array([name]), "index": np.array([int(batch["index"][0])]),
            "keys": np.array([json.dumps(data.keys)]), "sources": np.array([json.dumps(data.sources)]),
            "skipped": np.array([json.dumps(data.skipped)]), "images": data.images[None]}


def read_cached(batch: dict, base: str) -> dict:
    """A Ray Data task: one shard's part of the feature cache -> the row `decode_shard` gives, its features (N, D)
    in place of its images (the label job of a frozen backbone's run)."""
    from clustering.data import features

    index = int(batch["index"][0])
    part = features.read_part(base, index, ("key", "source", "features"))
    return {"shard": batch["shard"], "name": batch["name"], "index": np.array([index]),
            "keys": np.array([json.dumps(part["key"])]), "sources": np.array([json.dumps(part["source"])]),
            "skipped": np.array([json.dumps(part["skipped"])]), "images": part["features"][None]}
