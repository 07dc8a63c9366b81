"""Assignments as Parquet (docs/DESIGN.md §3): one part per input shard, `_SUCCESS.json` written last.

Every part names, in its Parquet metadata (key `dicl`), the model and corpus that wrote it: the checkpoint, its
method and k, and the shards' content hash. A rerun keeps only the parts of the same model and corpus, and
`_SUCCESS.json` is written only when every part is of the model it names.

Every part also carries its own counts (key `dicl_part`: rows, the images of its shard that were skipped, the
cluster histogram), so completion and counts add up footers alone (`totals`): a few KB read per part, whatever its
rows, in parallel where the caller fans the parts out.
"""
from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from . import shards, storage

SUCCESS = "_SUCCESS.json"
META_KEY = b"dicl"
PART_KEY = b"dicl_part"
WRITER_FIELDS = ("checkpoint", "content_hash")  # what must match for a part to count as this run's


def part_name(shard_index: int) -> str:
    return f"part-{shard_index:06d}.parquet"


def part_uri(output: str, entry: dict) -> str:
    """Where the part of a manifest's shard entry lies under `output`."""
    return storage.join(output, part_name(shards.part_index(entry)))


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


def write_part(output: str, shard_index: int, tbl: pa.Table, writer: dict, skipped: list[str] = ()) -> str:
    """One shard's part, with `writer` (checkpoint, method, k, content_hash, ...) and its own counts (rows, the
    shard's `skipped` images, the cluster histogram over writer's k) in its metadata."""
    k = int(writer.get("k") or 0)
    clusters = tbl.column("cluster").to_numpy() if tbl.num_rows else np.zeros(0, np.int64)
    stats = {"rows": tbl.num_rows, "skipped": len(skipped), "skipped_examples": list(skipped[:5]),
             "counts": np.bincount(clusters, minlength=k).tolist()}
    buf = io.BytesIO()
    pq.write_table(tbl.replace_schema_metadata({META_KEY: json.dumps(writer).encode(),
                                                PART_KEY: json.dumps(stats).encode()}), buf)
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
    return read_parts(parts, columns, writer, output)


def read_parts(parts: list[str], columns: list[str] | None = None, writer: dict | None = None,
               output: str = "") -> pd.DataFrame:
    """These parts as one table (with `writer`: each must be its part)."""
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
    return footer(uri)[0]


def footer(uri: str) -> tuple[dict, dict | None]:
    """(writer, the part's own counts or None for a part of an older release) from a part's footer alone."""
    fs, path = storage.filesystem(uri)
    with fs.open(path, "rb") as f:
        meta = pq.read_metadata(f)
    kv = meta.metadata or {}
    stats = json.loads(kv[PART_KEY]) if PART_KEY in kv else None
    if stats is not None and stats["rows"] != meta.num_rows:
        raise RuntimeError(f"{uri}: its footer counts {stats['rows']} rows where it holds {meta.num_rows}")
    return writer_of(kv), stats


def no_totals() -> dict:
    """Totals of no part; `add_totals` adds others to it."""
    return {"parts": 0, "rows": 0, "skipped": 0, "skipped_examples": [], "counts": [], "foreign": [], "uncounted": []}


def totals(uris: list[str], writer: dict) -> dict:
    """Counts of these parts from their footers: rows, skipped images (with a few examples), the cluster histogram,
    and the parts that are not this writer's or carry no counts. Sums: a caller adds up the totals of groups."""
    out = no_totals()
    for uri in uris:
        found, stats = footer(uri)
        if not same_writer(found, writer):
            out["foreign"].append(f"{uri} (written by {found.get('checkpoint')!r})")
        elif stats is None:
            out["uncounted"].append(uri)
        else:
            out = add_totals(out, {**no_totals(), "parts": 1, **{k: stats[k] for k in
                                                              ("rows", "skipped", "skipped_examples", "counts")}})
    return out


def add_totals(a: dict, b: dict) -> dict:
    n = max(len(a["counts"]), len(b["counts"]))
    counts = (np.pad(np.asarray(a["counts"], np.int64), (0, n - len(a["counts"])))
              + np.pad(np.asarray(b["counts"], np.int64), (0, n - len(b["counts"])))).tolist()
    return {"parts": a["parts"] + b["parts"], "rows": a["rows"] + b["rows"], "skipped": a["skipped"] + b["skipped"],
            "skipped_examples": (a["skipped_examples"] + b["skipped_examples"])[:100], "counts": counts,
            "foreign": (a["foreign"] + b["foreign"])[:20], "uncounted": a["uncounted"] + b["uncounted"]}


def write_success(output: str, info: dict) -> None:
    storage.write_bytes(storage.join(output, SUCCESS), json.dumps(info, indent=1).encode())


def start_run(output: str, writer: dict, writers=None) -> list[str]:
    """Parts already written by this same model and corpus (to skip). Parts of any other are removed, and so is
    `_SUCCESS.json`, which is written again at the end. `writers`: uris -> their writers (default: one after the
    other here; the label job reads the footers in parallel tasks)."""
    storage.remove(storage.join(output, SUCCESS))
    kept, stale = [], []
    uris = storage.list_files(output, ".parquet")
    for uri, found in zip(uris, (writers or (lambda us: [part_writer(u) for u in us]))(uris)):
        (kept if same_writer(found, writer) else stale).append(uri)
    if stale:
        print(f"label: removing {len(stale)} parts under {output} written by another model or corpus")
        for uri in stale:
            storage.remove(uri)
    return kept


def describe_run(info: dict, output: str, done: str, skipped: str) -> str:
    """The lines a labelling run ends with (`dicl label`'s, `dicl predict`'s): where the parts are, the cluster sizes,
    what was skipped, and the model. info: what `_SUCCESS.json` holds."""
    lines = [f"{done} {info['rows']:,} images into {info['k']} clusters in {info['seconds']:.1f}s: "
             f"{output}/part-*.parquet ({SUCCESS} beside them)",
             "  sizes " + " ".join(f"{c}:{n:,}" for c, n in info["counts"].items())]
    if info["skipped"]["count"]:
        lines.append(f"  skipped {info['skipped']['count']:,} {skipped}, e.g. {info['skipped']['examples'][0]}")
    if info.get("checkpoint"):
        lines.append(f"  checkpoint {info['checkpoint']}")
    return "\n".join(lines)
