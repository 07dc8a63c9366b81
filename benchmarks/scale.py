"""Scale benchmark: one training epoch in streaming mode on MNIST replicated 1x, 4x and 10x (70k -> 700k images),
on N Ray Train workers (a local Ray), with the peak resident memory of each worker and the wall time; plus the
same epoch in memory on the 1x data, for the streamed / in-memory images-per-second ratio.

    python benchmarks/scale.py --data ../shared/data/mnist --factors 1 4 10 --workers 2

Prints a table and writes JSON. Not part of the test suite.
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from runner import PeakRSS, device_name, finish, local_ray, mib, parser, replicated_shards

from clustering.data import shards
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
    p = parser(__doc__, "results/scale.json", data=None)
    p.add_argument("--factors", type=int, nargs="+", default=[1, 4, 10])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--loaders", type=int, default=1, help="loader processes per worker")
    p.add_argument("--method", default="ae_kmeans", help="ae_kmeans: one epoch of the conv autoencoder; or nmm")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs of the local Ray")
    p.add_argument("--work", default=None, help="folder for the shards (kept, reused); default a temp folder")
    args = p.parse_args()

    work = args.work or tempfile.mkdtemp(prefix="dicl-scale-")
    folders = replicated_shards(args.data, f"{work}/shards", sorted(set(args.factors) | {1}))
    runs = [(f, "stream") for f in sorted(set(args.factors))] + [(1, "memory")]
    with local_ray(args.cpus):
        rows = [{"data": f"{f}x", **one_epoch(folders[f], f"{work}/runs", f"{mode}-{f}x", args, mode)} for f, mode in runs]
    first, last, memory = rows[0], rows[-2], rows[-1]
    ratios = {"rss_10x_over_1x": round(last["peak_worker_mib"] / first["peak_worker_mib"], 3),
              "time_10x_over_1x": round(last["wall_s"] / first["wall_s"], 2),
              "stream_over_memory_img_s_1x": round(first["epoch_img_s"] / memory["epoch_img_s"], 3)}
    finish(args.out, {"data": Path(args.data).name, "device": device_name(), "method": args.method,
                      "workers": args.workers, "loaders": args.loaders, "rows": rows, **ratios}, (rows, None))
    print(f"largest / 1x: peak worker RSS x{ratios['rss_10x_over_1x']} (target <= 1.3), wall time "
          f"x{ratios['time_10x_over_1x']} (target <= 11); streamed / in-memory epoch images/s on 1x: "
          f"{ratios['stream_over_memory_img_s_1x']}")


if __name__ == "__main__":
    main()
