"""Shared by the benchmarks: load a data set into memory as uint8 (N, H, W, C) with labels; print a table."""
from __future__ import annotations

import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from clustering import shards
from clustering.sources import ArraySource, open_source


def load_arrays(spec: str, limit: int | None = None, sample: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A source (folder, IDX, .npz, sklearn:digits) -> (uint8 (N, H, W, C), int labels (-1 unknown)).

    limit keeps the first N images; sample draws N at random (seed 0), for sources listed class by class."""
    src = open_source(spec)
    items = src.plan()[:limit]
    if sample is not None and sample < len(items):
        pick = np.sort(np.random.default_rng(0).choice(len(items), sample, replace=False))
        items = [items[i] for i in pick]
    if isinstance(src, ArraySource):
        idx = [it.ref for it in items]
        imgs = src.images[idx]
        imgs = imgs[..., None] if imgs.ndim == 3 else imgs
    else:
        first = src.load(items[0])
        mode, side = ("L" if first.mode == "L" else "RGB"), min(first.height, first.width)
        with ThreadPoolExecutor(os.cpu_count()) as pool:
            imgs = np.stack(list(pool.map(lambda it: shards.decode_image(src.load(it).data, mode, side), items, chunksize=512)))
    labels = np.array([-1 if it.label is None else it.label for it in items], dtype=np.int64)
    return imgs, labels


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(str(r.get(c, "")).ljust(w) for c, w in zip(columns, widths)))


def write_json(path: str, payload: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload, indent=1))
    print(f"wrote {path}")
