"""The label job's decoding task, in a module of its own: Ray imports a task's module in each worker process, and
this one imports no torch (nor webdataset, pandas or the model), so a decode worker starts in a fraction of the time
and memory of one that imports the label job (a test holds it so)."""
from __future__ import annotations

import json

import numpy as np

from clustering import shards


def decode_shard(batch: dict, mode: str, side: int) -> dict:
    """A Ray Data task on a CPU: one shard (checked against its manifest sha256) -> one row with its keys, the
    sources its images came from, and its images by the input policy."""
    uri = str(batch["shard"][0])
    samples = shards.read_shard(uri, str(batch["sha256"][0]))
    data = shards.decode_samples(samples, mode, side, shards.name_of(uri))
    return {"shard": np.array([uri]), "keys": np.array([json.dumps(data.keys)]),
            "sources": np.array([json.dumps([shards.source_of(s) for s in samples])]), "images": data.images[None]}
