"""Predict: label new images with a trained model, in this process (no Ray, no shard job first).

Inputs (one or more): image files, a folder or s3:// prefix of images (as the shard job reads it), MNIST IDX, an
.npz, or WebDataset tars, named one by one or as a folder that holds them, written by dicl or by anyone else
(no manifest needed: every sample with a png/jpg member is an image). The output is the label job's: Parquet parts
with the same columns and writer metadata, then `_SUCCESS.json`. A part is one tar, or `images_per_part` images of
the other inputs; a re-run with the same model and inputs writes only the parts that are missing.
"""
from __future__ import annotations

import hashlib
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Callable

import numpy as np
from tqdm import tqdm

from . import lease
from .data import assignments, corpus, shards, storage
from .config import PredictConfig
from .estimator import DeepClusterer
from .data.sources import IMAGE_EXTS, FileListSource, SourceError, open_source


@dataclass
class Part:
    """What one Parquet part labels: a tar (read when its turn comes) or a run of a source's items."""
    shard: str  # the tar's name, "" for other inputs
    count: int | None  # images, where known before reading (None for a tar)
    read: Callable[[], list[tuple[str, str, Callable[[], bytes]]]]  # -> [(key, source, encoded bytes loader)]
    fingerprint: str  # what identifies its inputs, for resuming


def tar_part(uri: str, size: int) -> Part:
    def read():
        out = []
        for s in shards.read_shard(uri):
            out.append((s["__key__"], shards.source_of(s), lambda s=s: shards.image_of(s)))
        return out
    return Part(shards.name_of(uri), None, read, f"{uri}:{size}")


def source_parts(source, per_part: int) -> list[Part]:
    items = source.plan()
    parts = []
    for i in range(0, len(items), per_part):
        chunk = items[i:i + per_part]
        parts.append(Part("", len(chunk), lambda chunk=chunk: [
            (it.key, source.describe(it), lambda it=it: source.load(it).data) for it in chunk],
            hashlib.sha256("\n".join(f"{source.describe(it)}:{it.nbytes}" for it in chunk).encode()).hexdigest()))
    return parts


def is_tar(uri: str) -> bool:
    return uri.endswith(".tar")


def plan(inputs: list[str], per_part: int) -> list[Part]:
    """The parts to label, in a stable order."""
    if not inputs:
        raise SourceError("no input given: name image files, a folder or s3:// prefix, or WebDataset tars")
    files, tars, parts = [], [], []
    for spec in inputs:
        if corpus.is_pattern(spec):  # s3://bucket/laion/{00000..00099}.tar
            tars += corpus.expand(spec)
            continue
        fs, path = storage.filesystem(spec)
        if is_tar(spec):
            tars.append(spec)
        elif PurePosixPath(path).suffix.lower() in IMAGE_EXTS and not fs.isdir(path):
            files.append(spec)
        elif fs.isdir(path) and (found := storage.list_files(spec, ".tar")) and not any(
                PurePosixPath(n).suffix.lower() in IMAGE_EXTS for n in fs.ls(path, detail=False)):
            tars += found  # a folder of WebDataset tars (dicl's shards or anyone's)
        else:
            parts += source_parts(open_source(spec), per_part)
    for uri in tars:
        fs, path = storage.filesystem(uri)
        if not fs.exists(path):
            raise SourceError(f"input {uri!r} does not exist")
        parts.append(tar_part(uri, int(fs.info(path).get("size") or 0)))
    if files:
        missing = [f for f in files if not storage.exists(f)]
        if missing:
            raise SourceError(f"input {missing[0]!r} does not exist" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        parts += source_parts(FileListSource(files), per_part)
    return parts


def decode_all(rows: list, mode: str, side: int, readers: int) -> tuple[list[int], np.ndarray, list[str]]:
    """(positions decoded, uint8 images, what was skipped and why), reading and decoding in threads."""
    def one(row):
        key, source, load = row
        try:
            return shards.decode_image(load(), mode, side), None
        except Exception as e:  # noqa: BLE001 - one bad input is a counted skip, as in the shard job
            return None, f"{source}: not a readable image ({type(e).__name__}: {e})"

    with ThreadPoolExecutor(readers) as pool:
        results = list(pool.map(one, rows))
    kept = [i for i, (img, _) in enumerate(results) if img is not None]
    c = 1 if mode == "L" else 3
    images = np.stack([results[i][0] for i in kept]) if kept else np.zeros((0, side, side, c), np.uint8)
    return kept, images, [why for _, why in results if why]


def run_predict(model: DeepClusterer, inputs: list[str], cfg: PredictConfig, progress: bool = True) -> dict:
    """Label the inputs into cfg.output (holding its lock); returns what `_SUCCESS.json` holds."""
    output = storage.absolute(cfg.output)
    parts = plan(inputs, cfg.images_per_part)
    spec = model.state_["spec"]
    writer = {"checkpoint": getattr(model, "checkpoint_", ""), "method": spec["method"], "k": model.k,
              "image_size": model.image_size_, "channels": model.channels_, "run": spec["config"].get("name"),
              "content_hash": hashlib.sha256("\n".join(p.fingerprint for p in parts).encode()).hexdigest(),
              "label_run": uuid.uuid4().hex, "inputs": inputs[:20]}
    mode = "L" if model.channels_ == 1 else "RGB"
    t0, skipped = time.perf_counter(), []
    with lease.hold(output, "dicl predict"):
        done = {shards.name_of(p) for p in assignments.start_run(output, writer)}
        known = sum(p.count or 0 for p in parts)
        with tqdm(total=known or None, desc="predict", unit="img", disable=not progress) as bar:
            for i, part in enumerate(parts):
                if assignments.part_name(i) in done:
                    bar.update(part.count or 0)
                    continue
                listed = part.read()
                kept, images, why = decode_all(listed, mode, model.image_size_, cfg.readers)
                skipped += why
                probs, z = model.posteriors(images, cfg.batch_size) if len(images) else (np.zeros((0, model.k)), None)
                tbl = assignments.table([listed[j][0] for j in kept], part.shard, probs,
                                        z if cfg.write_embedding else None, cfg.write_probs,
                                        sources=[listed[j][1] for j in kept])
                assignments.write_part(output, i, tbl, writer)
                bar.update(len(listed))
        table = assignments.read(output, columns=["cluster"], writer=writer)
        counts = Counter(int(c) for c in table["cluster"])
        info = {"run_id": writer["label_run"], "checkpoint": writer["checkpoint"], "method": writer["method"],
                "k": writer["k"], "inputs": inputs, "rows": len(table), "counts": dict(sorted(counts.items())),
                "skipped": {"count": len(skipped), "examples": skipped[:100]},  # this run's: finished parts are kept
                "seconds": round(time.perf_counter() - t0, 2)}
        assignments.write_success(output, info)
    return info


def describe(info: dict, output: str) -> str:
    lines = [f"predicted {info['rows']:,} images into {info['k']} clusters in {info['seconds']:.1f}s: "
             f"{output}/part-*.parquet",
             "  sizes " + " ".join(f"{c}:{n}" for c, n in info["counts"].items())]
    if info["skipped"]["count"]:
        lines.append(f"  skipped {info['skipped']['count']} unreadable inputs, e.g. {info['skipped']['examples'][0]}")
    return "\n".join(lines)
