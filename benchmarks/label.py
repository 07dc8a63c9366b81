"""Label benchmark: images/s of the label job (Ray Data: decoding tasks, then the model's actor pool, one Parquet
part per shard) against a plain in-process loop that only runs the same model on the same images, already
decoded (the ceiling), on MNIST replicated 1x, 4x and 10x; with the peak resident memory of the driver and of the
workers during the job.

    python benchmarks/label.py --data ../shared/data/mnist --factors 1 4 10

The model is the method's network with its initial weights, marked finished: weights do not change the cost.
Prints a table and writes JSON. Not part of the test suite.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from runner import PeakRSS, device, device_name, finish, local_ray, mib, parser, replicated_shards

from clustering import engine
from clustering.data import inputs, shards
from clustering.config import LabelConfig, TrainConfig
from clustering.model.methods import predict_all


def write_checkpoint(folder: str, cfg: TrainConfig, channels: int, side: int) -> str:
    from clustering.checkpoints import CHECKPOINT_FILE

    os.makedirs(folder, exist_ok=True)
    run = engine.new_run(cfg, channels, side, torch.device("cpu"))
    torch.save(run.state(0, finished=True), os.path.join(folder, CHECKPOINT_FILE))
    return folder


def model_only(checkpoint: str, images: torch.Tensor, copies: int, batch: int, device: torch.device) -> float:
    """Images/s of predict_all over `copies` passes of the decoded images: the model and nothing else."""
    from clustering.checkpoints import load as load_checkpoint

    state = load_checkpoint(checkpoint)
    _, model = engine.build_from_spec(state["spec"])
    model.load_state_dict(state["model"])
    model.to(device).eval()
    x = images.to(device)
    predict_all(model, x[:batch], batch)  # warm-up
    t0 = time.perf_counter()
    for _ in range(copies):
        probs, _ = predict_all(model, x, batch)
        probs.argmax(1).cpu()
    return copies * len(x) / (time.perf_counter() - t0)


def main() -> None:
    p = parser(__doc__, "results/label.json", data=None)
    p.add_argument("--factors", type=int, nargs="+", default=[1, 4, 10])
    p.add_argument("--method", default="nmm")
    p.add_argument("--batch-size", type=int, default=4096, help="label.batch_size and the ceiling's batch")
    p.add_argument("--actors", type=int, default=1)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads of the model (label.cpus_per_actor)")
    p.add_argument("--cpus", type=int, default=None, help="CPUs of the local Ray (default: the actors' threads + 1 "
                   "for decoding)")
    p.add_argument("--work", default=None, help="folder for the shards (kept, reused); default a temp folder")
    args = p.parse_args()

    work = args.work or tempfile.mkdtemp(prefix="dicl-label-")
    folders = replicated_shards(args.data, f"{work}/shards", sorted(set(args.factors) | {1}))
    manifest = shards.read_manifest(folders[1])
    checkpoint = write_checkpoint(f"{work}/checkpoint", TrainConfig.of(method=args.method),
                                  manifest["image"]["channels"], shards.image_spec(manifest)[1])
    decoded = shards.load_shards(shards.shard_uris(folders[1], manifest), manifest, workers=os.cpu_count())
    images = inputs.device_images(decoded.images, "cpu")
    torch.set_num_threads(args.threads)
    with local_ray(args.cpus or args.actors * args.threads + 1):
        rows = [label_at(f, folders[f], checkpoint, images, manifest, work, args) for f in sorted(set(args.factors))]
    finish(args.out, {"data": Path(args.data).name, "device": device_name(), "method": args.method,
                      "threads": args.threads, "actors": args.actors, "rows": rows}, (rows, None))


def label_at(f: int, folder: str, checkpoint: str, images, manifest: dict, work: str, args) -> dict:
    """The label job on the data replicated f times, and the model alone on the same images (the ceiling)."""
    from jobs.label import run_label

    ceiling = model_only(checkpoint, images, f, args.batch_size, device())
    out = f"{work}/assignments-{f}x"
    shutil.rmtree(out, ignore_errors=True)
    label = LabelConfig(shards=folder, checkpoint=checkpoint, output=out, batch_size=args.batch_size,
                        actors=args.actors, cpus_per_actor=args.threads, use_gpu="auto")
    with PeakRSS() as rss:
        info = run_label(label)
    assert info["rows"] == info["expected_rows"] == f * manifest["num_samples"], info
    shutil.rmtree(out, ignore_errors=True)
    row = {"data": f"{f}x", "images": info["rows"], "label_s": round(info["seconds"], 1),
           "label_img_s": round(info["images_per_second"]), "model_only_img_s": round(ceiling),
           "ratio": round(info["images_per_second"] / ceiling, 3), "peak_driver_mib": mib(rss.peaks["driver"]),
           "peak_worker_mib": mib(rss.peaks["worker"]), "peak_workers_mib": mib(rss.peaks["workers"])}
    print(row, flush=True)
    return row


if __name__ == "__main__":
    main()
