"""Assignments as Parquet (DESIGN.md §3): one part per input shard, `_SUCCESS.json` written last.

Every part names, in its Parquet metadata (key `dicl`), the model and corpus that wrote it: the checkpoint, its
method and k, and the shards' content hash. A rerun keeps only the parts of the same model and corpus, and
`_SUCCESS.json` is written only when every part is of the model it names.
"""
from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from . import storage

SUCCESS = "_SUCCESS.json"
META_KEY = b"dicl"
WRITER_FIELDS = ("checkpoint", "content_hash")  # what must match for a part to count as this run's


def part_name(shard_index: int) -> str:
    return f"part-{shard_index:06d}.parquet"


def table(keys: list[str], shard: str, probs: np.ndarray, embedding: np.ndarray | None = None,
          with_probs: bool = True, sources: list[str] | None = None) -> pa.Table:
    """probs: (N, K) posteriors; cluster = argmax, confidence = max (the max posterior); source: the original file
    URI (or array row) of each image, to join the labels back to the inputs."""
    cols = {
        "key": pa.array(keys, pa.string()),
        "source": pa.array(sources if sources is not None else [""] * len(keys), pa.string()),
        "shard": pa.array([shard] * len(keys), pa.string()),
        "cluster": pa.array(probs.argmax(1).astype(np.int32)),
        "confidence": pa.array(probs.max(1).astype(np.float32)),
    }
    if with_probs:
        cols["probs"] = pa.array(list(probs.astype(np.float32)), pa.list_(pa.float32()))
    if embedding is not None:
        cols["embedding"] = pa.array(list(embedding.astype(np.float32)), pa.list_(pa.float32()))
    return pa.table(cols)


def write_part(output: str, shard_index: int, tbl: pa.Table, writer: dict) -> str:
    """One shard's part, with `writer` (checkpoint, method, k, content_hash, ...) in its metadata."""
    buf = io.BytesIO()
    pq.write_table(tbl.replace_schema_metadata({META_KEY: json.dumps(writer).encode()}), buf)
    uri = storage.join(output, part_name(shard_index))
    storage.write_bytes(uri, buf.getvalue())  # atomic: a crash leaves no half-written part
    return uri


def writer_of(metadata: dict | None) -> dict:
    return json.loads(metadata.get(META_KEY, b"{}")) if metadata else {}


def same_writer(a: dict, b: dict) -> bool:
    return all(a.get(f) == b.get(f) for f in WRITER_FIELDS)


def read(output: str, columns: list[str] | None = None, writer: dict | None = None) -> pd.DataFrame:
    """Every part as one table. With `writer`, a part written by another model or corpus is an error."""
    parts = storage.list_files(output, ".parquet")
    if not parts:
        raise FileNotFoundError(f"no assignments (part-*.parquet) under {output}")
    tables = []
    for p in parts:
        tbl = pq.read_table(io.BytesIO(storage.read_bytes(p)), columns=columns)
        if writer is not None and not same_writer(found := writer_of(tbl.schema.metadata), writer):
            raise RuntimeError(f"{p} was written by {found.get('checkpoint')!r}, not by "
                               f"{writer.get('checkpoint')!r}: another run wrote into {output}. Re-run dicl label.")
        tables.append(tbl.to_pandas())
    return pd.concat(tables, ignore_index=True)


def part_writer(uri: str) -> dict:
    """The writer a part's footer names (its metadata alone is read)."""
    fs, path = storage.filesystem(uri)
    with fs.open(path, "rb") as f:
        return writer_of(pq.read_schema(f).metadata)


def write_success(output: str, info: dict) -> None:
    storage.write_bytes(storage.join(output, SUCCESS), json.dumps(info, indent=1).encode())


def start_run(output: str, writer: dict) -> list[str]:
    """Parts already written by this same model and corpus (to skip). Parts of any other are removed, and so is
    `_SUCCESS.json`, which is written again at the end."""
    storage.remove(storage.join(output, SUCCESS))
    kept, stale = [], []
    for uri in storage.list_files(output, ".parquet"):
        (kept if same_writer(part_writer(uri), writer) else stale).append(uri)
    if stale:
        print(f"label: removing {len(stale)} parts under {output} written by another model or corpus")
        for uri in stale:
            storage.remove(uri)
    return kept
