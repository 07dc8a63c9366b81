"""Throughput benchmark: images/s of the full training step fed from shards vs the same step on synthetic
in-memory tensors (the compute-only ceiling), per method and batch size, on one device.

    python benchmarks/throughput.py --data data/mnist --method dcec --batch-sizes 256 1024 4096

"Shards-fed" reads and decodes the WebDataset shards (written here from --data unless --shards is given)
into uint8 on the device, then trains from them: we report its steady-state rate (per epoch, after the
first), the one-off read+decode time, and the rate amortised over --epochs including that load.
Prints a table and writes JSON. Not part of the test suite.
"""
from __future__ import annotations

import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from runner import device, device_name, finish, parser

from clustering import engine
from clustering.data import shards
from clustering.config import TrainConfig
from clustering.data.sources import open_source


def write_shards(spec: str, out: str, per_shard: int = 10_000) -> dict:
    src = open_source(spec)
    groups = shards.plan_shards(src.plan(), per_shard, 1 << 40)
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        stats = list(pool.map(lambda ig: shards.write_items(src, ig[1], f"{out}/{shards.shard_name(ig[0])}"), enumerate(groups)))
    first = src.load(groups[0][0])
    manifest = {"shards": [s["shard"] for s in stats], "num_samples": sum(s["shard"]["samples"] for s in stats),
                "image": {"height": first.height, "width": first.width, "channels": 1 if first.mode == "L" else 3}}
    shards.write_manifest(out, manifest)
    return manifest


def epoch_rate(images: np.ndarray, cfg: TrainConfig, device) -> float:
    """Images/s of training epochs after the first (warm-up, cudnn autotune)."""
    seconds = []
    engine.fit(images, cfg, device=device, on_epoch=lambda e, m, s: seconds.append(m.get("seconds")), log=lambda s: None)
    steady = [s for s in seconds[1:] if s]
    return len(images) / float(np.median(steady))


def main() -> None:
    p = parser(__doc__, "results/throughput.json")
    p.add_argument("--shards", default=None, help="existing shard folder (else written to a temp folder)")
    p.add_argument("--method", action="append", help="dcec (default), nmm, ...")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[256, 1024, 4096])
    p.add_argument("--epochs", type=int, default=4, help="timed epochs per measurement (the first is warm-up)")
    p.add_argument("--amortise-epochs", type=int, default=50, help="a training run's length, to amortise the load over")
    p.add_argument("--encoder", default="conv")
    args = p.parse_args()

    on = device()
    torch.backends.cudnn.benchmark = True
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.shards or tmp
        manifest = shards.read_manifest(folder) if args.shards else write_shards(args.data, tmp)
        t0 = time.perf_counter()
        data = shards.load_shards(shards.shard_uris(folder, manifest), manifest, workers=os.cpu_count())
        load_s = time.perf_counter() - t0
    images = data.images
    synthetic = np.random.default_rng(0).integers(0, 256, images.shape, dtype=np.uint8)
    print(f"{len(images):,} images {images.shape[1:]} read+decoded from {len(manifest['shards'])} shards in {load_s:.2f}s "
          f"({len(images) / load_s:,.0f} img/s); device {on}", flush=True)
    rows = []
    for method in args.method or ["dcec"]:
        for bs in args.batch_sizes:
            stage = {"pretrain_epochs": args.epochs, "joint_epochs": 0} if method != "nmm" else {"joint_epochs": args.epochs}
            cfg = TrainConfig.of(method=method, batch_size=bs, encoder=args.encoder, **stage)
            real = epoch_rate(images, cfg, on)
            ceiling = epoch_rate(synthetic, cfg, on)
            train_s = args.amortise_epochs * len(images) / real
            amortised = args.amortise_epochs * len(images) / (train_s + load_s)
            rows.append({"method": method, "batch": bs, "shards_img_s": round(real), "compute_img_s": round(ceiling),
                         "ratio": round(real / ceiling, 3), f"amortised_{args.amortise_epochs}ep_img_s": round(amortised),
                         "ratio_amortised": round(amortised / ceiling, 3)})
            print(rows[-1], flush=True)
    finish(args.out, {"data": args.data, "device": device_name(), "load_seconds": load_s, "n": int(len(images)),
                      "rows": rows}, (rows, None))


if __name__ == "__main__":
    main()
