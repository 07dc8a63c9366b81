"""The feature cache: a frozen backbone's features of every image, computed once (`dicl features`), beside the shards.

One Parquet part per shard (key, source, features: D float32 per image; the shard's undecodable images in its
footer) and `features.json` last: the backbone, the fingerprint of its weights and input policy
(`Backbone.fingerprint`), the shards' content hash and each part's rows. Train, tune and label read the cache
instead of decoding; a cache whose fingerprint or shards differ from the run's is refused (`check`).
"""
from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import shards, storage

MANIFEST = "features.json"
SKIPPED_KEY = b"dicl_skipped"


class CacheMismatch(ValueError):
    """A feature cache computed by another backbone, input policy or corpus than the run's."""


def part_uri(base: str, index: int) -> str:
    return storage.join(base, f"part-{index:06d}.parquet")


def write_part(base: str, index: int, keys: list[str], sources: list[str], features: np.ndarray,
               skipped: list[str]) -> int:
    """One shard's features (N, D); returns N."""
    features = np.ascontiguousarray(features, np.float32)
    column = pa.FixedSizeListArray.from_arrays(pa.array(features.reshape(-1)), features.shape[1])
    table = pa.table({"key": pa.array(keys, pa.string()), "source": pa.array(sources, pa.string()),
                      "features": column})
    table = table.replace_schema_metadata({SKIPPED_KEY: json.dumps(skipped).encode()})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(part_uri(base, index), buf.getvalue())
    return len(keys)


def read_part(base: str, index: int, columns: tuple[str, ...] = ("features",)) -> dict:
    """{column: values} of one part ("features": float32 (N, D)), and "skipped": the shard's undecodable images."""
    uri = part_uri(base, index)
    try:
        table = pq.read_table(io.BytesIO(storage.read_bytes(uri)), columns=list(columns))
    except storage.Missing:
        raise storage.StorageError(f"{uri} is missing from the feature cache: run dicl features again") from None
    out = {c: table.column(c).to_pylist() for c in columns if c != "features"}
    if "features" in columns:
        col = table.column("features").combine_chunks()
        out["features"] = col.values.to_numpy(zero_copy_only=False).reshape(len(col), col.type.list_size)
    out["skipped"] = json.loads((table.schema.metadata or {}).get(SKIPPED_KEY, b"[]"))
    return out


def write_manifest(base: str, manifest: dict) -> None:
    storage.write_bytes(storage.join(base, MANIFEST), json.dumps(manifest, indent=1).encode())


def read_manifest(base: str) -> dict | None:
    """The cache's manifest; None where there is no (finished) cache."""
    try:
        return json.loads(storage.read_bytes(storage.join(base, MANIFEST)))
    except storage.Missing:
        return None


def check(base: str, cache: dict | None, fingerprint: str, shards_manifest: dict) -> dict:
    """The cache's manifest, when it was computed by the run's backbone (fingerprint) from these shards; else
    CacheMismatch, saying what differs and what to do."""
    if cache is None:
        raise CacheMismatch(f"no feature cache at {base}: run `dicl features` with this config first (the pipeline "
                            "does), or fine-tune the backbone (train.backbone_lr > 0), which reads the images")
    if cache["fingerprint"] != fingerprint:
        raise CacheMismatch(
            f"the feature cache at {base} was computed by {cache['encoder']} (weights {cache['weights'] or 'random'}, "
            f"{cache['backbone_size']} px; fingerprint {cache['fingerprint'][:12]}), not by this run's backbone "
            f"(fingerprint {fingerprint[:12]}): its features would not be this model's. Point train.features at a new "
            "folder (or delete this one) and run `dicl features` again")
    if cache["content_hash"] != shards_manifest["content_hash"]:
        raise CacheMismatch(f"the feature cache at {base} was computed from other shards (content hash "
                            f"{cache['content_hash'][:12]}, the shards' is {shards_manifest['content_hash'][:12]}): "
                            "run `dicl features` again into a new train.features folder")
    return cache


def sample_rows(cache: dict, n: int | None, seed: int) -> dict[int, np.ndarray] | None:
    """train.sample on the cache: a seeded uniform sample of n rows across its parts, {part index: rows}."""
    if not n:
        return None
    picked = shards.sample_members({"shards": [{"name": p["index"], "samples": p["rows"]} for p in cache["parts"]]},
                                   n, seed)
    return {int(k): v for k, v in picked.items()}


def load_rank(base: str, cache: dict, rank: int, world: int, n: int | None = None, seed: int = 0) -> np.ndarray:
    """(N, D) float32: the features a rank trains on, its parts round-robin (as the shards are), under
    train.sample=n only the sampled rows."""
    rows = sample_rows(cache, n, seed)
    parts = [p for p in shards.rank_shards(cache["parts"], rank, world) if rows is None or p["index"] in rows]
    loaded = []
    for p in parts:
        feats = read_part(base, p["index"])["features"]
        loaded.append(feats if rows is None else feats[rows[p["index"]]])
    return np.concatenate(loaded) if loaded else np.zeros((0, cache["dim"]), np.float32)
