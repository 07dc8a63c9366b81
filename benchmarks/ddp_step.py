"""Step time of a fine-tuned backbone on 2 workers: PyTorch DDP (bucketed all-reduces overlapping the backward pass)
against one flat all-reduce after it (train.gradients=ddp | flat), each worker a gloo process on 127.0.0.1.

    python benchmarks/ddp_step.py --encoder torchvision:resnet50 --size 64 --batch 16 --steps 10

A training step as the engine runs it (the backbone's features, IIC's loss on them, backward, the averaging, Adam),
on random images; random weights (the time does not depend on them). Prints a table and writes JSON. Not part of
the test suite.
"""
from __future__ import annotations

import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from runner import device_name, finish, parser

from clustering import engine
from clustering.comm import Comm
from clustering.config import TrainConfig
from clustering.model.methods import to_float


def worker(rank: int, port: int, args, gradients: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.set_num_threads(args.threads)
        cfg = TrainConfig.of(method="iic", k=10, encoder=args.encoder, backbone_size=args.size, backbone_lr=1e-5,
                             gradients=gradients, batch_size=2 * args.batch)
        comm = Comm(rank, 2, dist.all_reduce)
        run = engine.new_run(cfg, 3, args.size, torch.device("cpu"))
        engine.use_ddp(run, cfg, comm)
        inner, stage = engine.trainee(run.model), run.method.stages()[0]
        x = torch.randint(0, 256, (args.batch, 3, args.size, args.size), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(rank))
        times = []
        for _ in range(args.warmup + args.steps):
            t0 = time.perf_counter()
            loss = run.method.loss(stage, inner, run.features(to_float(x)), None)
            run.opt.zero_grad(set_to_none=True)
            loss.backward()
            run.average_gradients(comm)
            run.opt.step()
            times.append(time.perf_counter() - t0)
        torch.save(times[args.warmup:], f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def measure(args, gradients: str) -> dict:
    from infra.local_s3 import free_port

    with tempfile.TemporaryDirectory() as d:
        out = f"{d}/times"
        mp.start_processes(worker, args=(free_port(), args, gradients, out), nprocs=2, start_method="spawn")
        times = np.array([torch.load(f"{out}.{r}", weights_only=True) for r in (0, 1)]).max(0)  # the slower rank's
    return {"gradients": gradients, "median_step_s": round(float(np.median(times)), 3),
            "mean_step_s": round(float(times.mean()), 3), "steps": len(times)}


def main() -> None:
    p = parser(__doc__, "results/ddp-step.json", data=False)
    p.add_argument("--encoder", default="torchvision:resnet50")
    p.add_argument("--size", type=int, default=64, help="train.backbone_size")
    p.add_argument("--batch", type=int, default=16, help="images per worker and step")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    args = p.parse_args()
    rows = [measure(args, gradients) for gradients in ("ddp", "flat", "ddp", "flat")]  # twice each, interleaved
    finish(args.out, {"encoder": args.encoder, "size": args.size, "batch_per_worker": args.batch, "workers": 2,
                      "threads_per_worker": args.threads, "device": device_name(), "rows": rows}, (rows, None))


if __name__ == "__main__":
    main()
