"""Scale benchmark: one training epoch in streaming mode on MNIST replicated 1x, 4x and 10x (70k -> 700k images),
on N Ray Train workers (a local Ray), with the peak resident memory of each worker and the wall time; plus the
same epoch in memory on the 1x data, for the streamed / in-memory images-per-second ratio.

    python benchmarks/scale.py --data ../shared/data/mnist --factors 1 4 10 --workers 2

Prints a table and writes JSON. Not part of the test suite.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import ray

from common import PeakRSS, mib, print_table, replicated_shards, write_json

from clustering import shards
from clustering.config import TrainConfig


def one_epoch(folder: str, runs: str, name: str, args, input_mode: str) -> dict:
    from jobs.train import run_train

    one = {"joint_epochs": 1} if args.method == "nmm" else {"pretrain_epochs": 1, "joint_epochs": 0, "augment": False}
    cfg = TrainConfig.of(shards=folder, storage_path=runs, name=name, method=args.method, batch_size=args.batch_size,
                         num_workers=args.workers, cpus_per_worker=1, input=input_mode, loader_workers=args.loaders,
                         use_gpu="auto", **one)
    t0 = time.perf_counter()
    with PeakRSS() as rss:
        trained = run_train(cfg)
    wall = time.perf_counter() - t0
    n = shards.read_manifest(folder)["num_samples"]
    epoch_s = trained.metrics["seconds"]
    return {"input": input_mode, "images": n, "wall_s": round(wall, 1), "epoch_s": round(epoch_s, 1),
            "epoch_img_s": round(n / epoch_s), "peak_worker_mib": mib(rss.peaks["worker"]),
            "peak_driver_mib": mib(rss.peaks["driver"])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="MNIST IDX folder (or any source)")
    p.add_argument("--factors", type=int, nargs="+", default=[1, 4, 10])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--loaders", type=int, default=1, help="loader processes per worker")
    p.add_argument("--method", default="ae_kmeans", help="ae_kmeans: one epoch of the conv autoencoder; or nmm")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs of the local Ray")
    p.add_argument("--work", default=None, help="folder for the shards (kept, reused); default a temp folder")
    p.add_argument("--out", default="results/scale.json")
    args = p.parse_args()

    work = args.work or tempfile.mkdtemp(prefix="dicl-scale-")
    folders = replicated_shards(args.data, f"{work}/shards", sorted(set(args.factors) | {1}))
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    ray.init(num_cpus=args.cpus, log_to_driver=False)
    rows = []
    for f in sorted(set(args.factors)):
        rows.append({"data": f"{f}x", **one_epoch(folders[f], f"{work}/runs", f"stream-{f}x", args, "stream")})
        print(rows[-1], flush=True)
    rows.append({"data": "1x", **one_epoch(folders[1], f"{work}/runs", "memory-1x", args, "memory")})
    print(rows[-1], flush=True)
    ray.shutdown()

    first, last = rows[0], rows[len(args.factors) - 1]
    memory = rows[-1]
    ratios = {"rss_10x_over_1x": round(last["peak_worker_mib"] / first["peak_worker_mib"], 3),
              "time_10x_over_1x": round(last["wall_s"] / first["wall_s"], 2),
              "stream_over_memory_img_s_1x": round(first["epoch_img_s"] / memory["epoch_img_s"], 3)}
    print()
    print_table(rows, list(rows[0]))
    print(f"largest / 1x: peak worker RSS x{ratios['rss_10x_over_1x']} (target <= 1.3), wall time "
          f"x{ratios['time_10x_over_1x']} (target <= 11); streamed / in-memory epoch images/s on 1x: "
          f"{ratios['stream_over_memory_img_s_1x']}")
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"
    write_json(args.out, {"data": Path(args.data).name, "device": device, "method": args.method, "workers": args.workers,
                          "loaders": args.loaders, "rows": rows, **ratios})


if __name__ == "__main__":
    main()
