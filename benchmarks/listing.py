"""Listing benchmark: list and plan the shards of a synthetic local tree of N image files (empty files with image
names, in class folders), the way the shard job does before any image is read; time and peak memory of the
process, at several N.

    python benchmarks/listing.py --files 10000 100000 1000000

Each N runs in a fresh process, so its peak resident memory is its own. Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from runner import finish, parser

PER_FOLDER = 1000


def make_tree(root: Path, n: int) -> None:
    """n empty '.jpg' files, 1,000 a folder, in 10 class folders (made once; reused)."""
    if (root / "DONE").exists():
        return
    for i in range(n):
        j = i // 10  # the file's place in its class
        folder = root / f"class{i % 10}" / f"part{j // PER_FOLDER:04d}"
        if j % PER_FOLDER == 0:
            folder.mkdir(parents=True, exist_ok=True)
        (folder / f"img{i:08d}.jpg").touch()
    (root / "DONE").touch()


def plan_here(root: str) -> dict:
    """In this process: open the source, plan its items and its shards."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from clustering.data import shards
    from clustering.data.sources import open_source

    t0 = time.perf_counter()
    src = open_source(root)
    items = src.plan()
    groups = shards.plan_shards(items, 10_000, 256 * 2**20)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"files": len(items), "shards": len(groups), "seconds": round(seconds, 1), "peak_rss_mib": round(peak / 2**20)}


def main() -> None:
    p = parser(__doc__, "results/listing.json", data=False)
    p.add_argument("--files", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--work", default=None, help="folder for the trees (kept, reused); default a temp folder")
    p.add_argument("--plan", default=None, help=argparse.SUPPRESS)  # internal: plan this tree in this process
    args = p.parse_args()
    if args.plan:
        print(json.dumps(plan_here(args.plan)))
        return
    work = Path(args.work or tempfile.mkdtemp(prefix="dicl-listing-"))
    rows = []
    for n in args.files:
        root = work / f"tree-{n}"
        t0 = time.perf_counter()
        make_tree(root, n)
        made = time.perf_counter() - t0
        out = subprocess.run([sys.executable, __file__, "--plan", str(root)], capture_output=True, text=True, check=True)
        rows.append({"tree": n, "made_s": round(made, 1), **json.loads(out.stdout.strip().splitlines()[-1])})
        print(rows[-1], flush=True)
    finish(args.out, {"rows": rows, "cpus": os.cpu_count()}, (rows, None))


if __name__ == "__main__":
    main()
