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
from .data.sources import IMAGE_EXTS, BadImage, FileListSource, SourceError, open_source


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


def source_parts(source, items: list, per_part: int) -> list[Part]:
    """Parts of `per_part` of a source's planned items."""
    parts = []
    for i in range(0, len(items), per_part):
        chunk = items[i:i + per_part]
        parts.append(Part("", len(chunk), lambda chunk=chunk: [
            (it.key, source.describe(it), lambda it=it: source.load(it).data) for it in chunk],
            hashlib.sha256("\n".join(f"{source.describe(it)}:{it.nbytes}" for it in chunk).encode()).hexdigest()))
    return parts


def is_tar(uri: str) -> bool:
    return uri.endswith(".tar")


@dataclass
class Plan:
    """The parts to label, in a stable order; what the inputs hold that is not read (counted as skipped); the keys of
    the inputs other than tars, and where each comes from."""
    parts: list[Part]
    left_out: list[str]
    keys: dict[str, str]


def plan(inputs: list[str], per_part: int) -> Plan:
    if not inputs:
        raise SourceError("no input given: name image files, a folder or s3:// prefix, or WebDataset tars")
    files, tars, sources = [], [], []
    for spec in inputs:
        try:
            kind = input_kind(spec)
        except Exception as e:  # noqa: BLE001 - missing credentials, a denied bucket: name the input
            raise storage.named_error(spec, e) from None
        if kind == "pattern":
            tars += corpus.expand(spec)
        elif kind == "tar":
            tars.append(spec)
        elif kind == "file":
            files.append(spec)
        elif kind == "tars":
            tars += storage.list_files(spec, ".tar")
        else:
            sources.append(open_source(spec))
    if files:
        missing = [f for f in files if not storage.exists(f)]
        if missing:
            raise SourceError(f"input {missing[0]!r} does not exist" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        sources.append(FileListSource(files))
    planned = [(source, source.plan()) for source in sources]  # listed once: for the keys, then the parts
    keys = unique_across(planned)
    parts = [p for source, items in planned for p in source_parts(source, items, per_part)]
    for uri in dict.fromkeys(tars):  # a tar named twice is read once
        fs, path = storage.filesystem(uri)
        if not fs.exists(path):
            raise SourceError(f"input {uri!r} does not exist")
        parts.append(tar_part(uri, int(fs.info(path).get("size") or 0)))
    left_out = [f"{s.uri.rstrip('/')}/{h}: a hidden file, not read" for s in sources for h in getattr(s, "hidden", [])]
    return Plan(parts, left_out + [u for s in sources for u in getattr(s, "unlisted", [])], keys)


def input_kind(spec: str) -> str:
    """pattern (a brace pattern of tars), tar, file (an image), tars (a folder of WebDataset tars), or source (a
    folder or prefix of images, MNIST IDX, an .npz)."""
    if corpus.is_pattern(spec):  # s3://bucket/laion/{00000..00099}.tar
        return "pattern"
    if is_tar(spec):
        return "tar"
    fs, path = storage.filesystem(spec)
    if PurePosixPath(path).suffix.lower() in IMAGE_EXTS and not fs.isdir(path):
        return "file"
    if fs.isdir(path) and storage.list_files(spec, ".tar") and not any(
            PurePosixPath(n).suffix.lower() in IMAGE_EXTS for n in fs.ls(path, detail=False)):
        return "tars"  # a folder of WebDataset tars (dicl's shards or anyone's)
    return "source"


def unique_across(planned: list[tuple]) -> dict[str, str]:
    """{key: its input} of the sources' planned items. Keys are unique within a folder; across inputs two files may
    share one (dir/a.png and other/a.png): refused, naming both, since their rows could not be told apart. (A tar's
    keys are checked as it is read.)"""
    seen: dict[str, str] = {}
    for source, items in planned:
        for item in items:
            claim(seen, item.key, source.describe(item))
    return seen


def claim(owners: dict[str, str], key: str, source: str) -> None:
    """Record that `source` gives `key`; a key another input gave already is refused, naming both."""
    if owners.setdefault(key, source) != source:
        raise SourceError(f"two inputs give the key {key!r}: {owners[key]} and {source}. Keys must be unique across a "
                          "predict run's inputs: rename one, or predict them into separate outputs (predict.output=...)")


def decode_all(rows: list, mode: str, side: int, readers: int) -> tuple[list[int], np.ndarray, list[str]]:
    """(positions decoded, uint8 images, what was skipped and why), reading and decoding in threads."""
    def one(row):
        key, source, load = row
        try:
            return shards.decode_image(load(), mode, side), None
        except BadImage as e:  # it names the input
            return None, str(e)
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
    planned = plan(inputs, cfg.images_per_part)
    parts = planned.parts
    spec = model.state_["spec"]
    writer = {"checkpoint": getattr(model, "checkpoint_", ""), "method": spec["method"], "k": model.config_.k,
              "image_size": model.image_size_, "channels": model.channels_, "run": spec["config"].get("name"),
              "content_hash": hashlib.sha256("\n".join(p.fingerprint for p in parts).encode()).hexdigest(),
              "label_run": uuid.uuid4().hex, "inputs": inputs[:20]}
    t0, skipped, owners = time.perf_counter(), list(planned.left_out), dict(planned.keys)
    with lease.hold(output, "dicl predict"):
        done = {shards.name_of(p) for p in assignments.start_run(output, writer)}
        known = sum(p.count or 0 for p in parts)
        with tqdm(total=known or None, desc="predict", unit="img", disable=not progress) as bar:
            for i, part in enumerate(parts):
                if assignments.part_name(i) in done:
                    bar.update(part.count or 0)
                    continue
                read, why = label_part(model, part, i, cfg, output, writer, owners)
                skipped += why
                bar.update(read)
        table = assignments.read(output, columns=["cluster"], writer=writer)
        counts = Counter(int(c) for c in table["cluster"])
        info = {"run_id": writer["label_run"], "checkpoint": writer["checkpoint"], "method": writer["method"],
                "k": writer["k"], "inputs": inputs, "rows": len(table), "counts": dict(sorted(counts.items())),
                "skipped": {"count": len(skipped), "examples": skipped[:100]},  # this run's: finished parts are kept
                "seconds": round(time.perf_counter() - t0, 2)}
        assignments.write_success(output, info)
    return info


def label_part(model: DeepClusterer, part: Part, i: int, cfg: PredictConfig, output: str, writer: dict,
               owners: dict[str, str]) -> tuple[int, list[str]]:
    """Label one part into part i of the output; returns (inputs read, what was skipped and why). A tar that is not
    whole is a counted skip (an empty part); a tar's key that another input gave already is refused."""
    try:
        listed = part.read()
    except corpus.BrokenTar as e:
        listed, broken = [], [str(e)]
    else:
        broken = []
    if part.shard:  # a tar's keys are known once it is read
        for key, source, _ in listed:
            claim(owners, key, source)
    mode = "L" if model.channels_ == 1 else "RGB"
    kept, images, why = decode_all(listed, mode, model.image_size_, cfg.readers)
    probs, z = model.posteriors(images, cfg.batch_size) if len(images) else (np.zeros((0, model.config_.k)), None)
    tbl = assignments.table([listed[j][0] for j in kept], part.shard, probs, z if cfg.write_embedding else None,
                            cfg.write_probs, sources=[listed[j][1] for j in kept])
    assignments.write_part(output, i, tbl, writer)
    return len(listed), broken + why


def describe(info: dict, output: str) -> str:
    return assignments.describe_run(info, output, "predicted", "inputs (unreadable, hidden, or not a regular file)")
