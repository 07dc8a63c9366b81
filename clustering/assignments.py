"""Assignments as Parquet (DESIGN.md §3): one part per input shard, `_SUCCESS.json` written last."""
from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from . import storage

SUCCESS = "_SUCCESS.json"
RUN = "_RUN.json"  # what the parts under a prefix were labelled with: resume only the same run


def part_name(shard_index: int) -> str:
    return f"part-{shard_index:06d}.parquet"


def table(keys: list[str], shard: str, probs: np.ndarray, embedding: np.ndarray | None = None,
          with_probs: bool = True) -> pa.Table:
    """probs: (N, K) posteriors; cluster = argmax, confidence = max (the max posterior)."""
    cols = {
        "key": pa.array(keys, pa.string()),
        "shard": pa.array([shard] * len(keys), pa.string()),
        "cluster": pa.array(probs.argmax(1).astype(np.int32)),
        "confidence": pa.array(probs.max(1).astype(np.float32)),
    }
    if with_probs:
        cols["probs"] = pa.array(list(probs.astype(np.float32)), pa.list_(pa.float32()))
    if embedding is not None:
        cols["embedding"] = pa.array(list(embedding.astype(np.float32)), pa.list_(pa.float32()))
    return pa.table(cols)


def write_part(output: str, shard_index: int, tbl: pa.Table) -> str:
    buf = io.BytesIO()
    pq.write_table(tbl, buf)
    uri = storage.join(output, part_name(shard_index))
    storage.write_bytes(uri, buf.getvalue())  # atomic: a crash leaves no half-written part
    return uri


def read(output: str, columns: list[str] | None = None) -> pd.DataFrame:
    parts = storage.list_files(output, ".parquet")
    if not parts:
        raise FileNotFoundError(f"no assignments (part-*.parquet) under {output}")
    return pd.concat([pq.read_table(io.BytesIO(storage.read_bytes(p)), columns=columns).to_pandas() for p in parts],
                     ignore_index=True)


def write_success(output: str, info: dict) -> None:
    storage.write_bytes(storage.join(output, SUCCESS), json.dumps(info, indent=1).encode())


def start_run(output: str, run: dict) -> list[str]:
    """Parts already written for this same run (to skip); parts of any other run are removed first."""
    parts = storage.list_files(output, ".parquet")
    marker = storage.join(output, RUN)
    previous = json.loads(storage.read_bytes(marker)) if storage.exists(marker) else None
    if parts and previous != run:
        print(f"label: removing {len(parts)} parts under {output} written by another model or corpus")
        for uri in parts + [storage.join(output, SUCCESS)]:
            storage.remove(uri)
        parts = []
    storage.write_bytes(marker, json.dumps(run, indent=1).encode())
    return parts
