"""Train job: Ray Train's TorchTrainer runs clustering.engine.fit on N workers, each on its own shards, held in
memory or streamed (`train.input`, clustering/data/inputs.py).

Each epoch rank 0 writes a checkpoint (model, head, optimizer, epoch, RNG) to the run's storage path;
a restarted worker group (FailureConfig) or a re-run with the same `train.name` resumes from the latest.
"""
from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import threading
import time
from dataclasses import dataclass

import ray
import ray.train
import torch
import torch.distributed as dist
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from clustering import engine, lease
from clustering.data import inputs, shards, storage
from clustering.checkpoints import CHECKPOINT_FILE
from clustering.comm import Comm
from clustering.config import TrainConfig

from .features import check_cache
from .progress import poster, training_lines
from .signals import resume_with
from .runtime import check_resources, ray_train_environment, remote_uri, train_storage, want_gpu


def worker_input(cfg: TrainConfig, log=lambda s: None):
    """On a Ray Train worker: (its Comm, its device, its input of the shards), its threads set."""
    ctx = ray.train.get_context()
    comm = Comm(ctx.get_world_rank(), ctx.get_world_size(), dist.all_reduce)
    device = ray.train.torch.get_device()
    torch.set_num_threads(cfg.cpus_per_worker)
    data = inputs.open_input(cfg, shards.read_manifest(cfg.shards), comm, device, ctx.get_local_world_size(),
                             log=lambda s: log(f"{s} on {device}"))
    return comm, device, data


def train_loop(config: dict) -> None:
    """Runs on every Ray Train worker."""
    cfg = TrainConfig(**config["train"])
    say = poster(config.get("board"))  # lines go to the driver, which prints them once
    comm, device, data = worker_input(cfg, say)
    rank = comm.rank

    resume = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            resume = torch.load(os.path.join(d, CHECKPOINT_FILE), map_location="cpu", weights_only=True)

    def report(epoch: int, metrics: dict, state_fn) -> None:
        # Every rank reports (Ray Train waits for all), on the same epochs; only rank 0 uploads the checkpoint.
        if (epoch + 1) % cfg.checkpoint_every and metrics["stage"] != "final":
            return
        with tempfile.TemporaryDirectory() as d:
            ckpt = None
            if rank == 0:
                torch.save(state_fn(), os.path.join(d, CHECKPOINT_FILE))
                ckpt = ray.train.Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"checkpoint_{epoch:06d}")

    engine.fit(data, cfg, comm, device, resume=resume, on_epoch=report, log=say if rank == 0 else lambda s: None)


@dataclass
class TrainResult:
    checkpoint: str  # URI of the final checkpoint folder
    metrics: dict
    name: str
    seconds: float


def check_run(cfg: TrainConfig, manifest: dict) -> None:
    """What makes a run impossible, refused on the driver before any worker starts (a worker's error would be
    retried max_failures times): too few shards for the workers, too few images for k, bad restarts."""
    if len(manifest["shards"]) < cfg.num_workers:
        raise ValueError(
            f"{len(manifest['shards'])} shards for {cfg.num_workers} workers: every worker needs a shard. "
            "Lower train.num_workers or re-shard with a smaller shard.samples_per_shard."
        )
    if cfg.frozen_backbone:
        check_cache(cfg, manifest)  # its features are the run's input: computed by this backbone, from these shards
    n = min(cfg.sample or manifest["num_samples"], manifest["num_samples"])
    if cfg.k > n:
        raise ValueError(f"train.k={cfg.k} is more than the {n:,} images training would see: a clustering needs "
                         "more images than clusters. Lower train.k" + (" or raise train.sample" if cfg.sample else ""))
    if cfg.fine_k > n:
        raise ValueError(f"the model would learn {cfg.fine_k} fine clusters (train.k={cfg.k} x train.over_cluster="
                         f"{cfg.fine_k // cfg.k}), more than the {n:,} images training would see: set "
                         "train.over_cluster=1")
    engine.check_restarts(cfg)


def run_train(cfg: TrainConfig, progress: bool = False) -> TrainResult:
    """Train on Ray Train, holding the run's lock; the workers' lines print here, with a bar of epochs when
    `progress`."""
    cfg = cfg.model_copy(update={"shards": storage.absolute(cfg.shards), "storage_path": storage.absolute(cfg.storage_path)})
    manifest = shards.read_manifest(cfg.shards)  # fails early, naming the folder, when shards are missing
    check_run(cfg, manifest)
    name = cfg.name or f"{cfg.method.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if not cfg.name:
        resume_with("train.name", name)
    cfg = cfg.model_copy(update={"name": name})
    gpu = want_gpu(cfg.use_gpu)
    ray_train_environment()
    check_resources(f"train ({cfg.num_workers} workers)", {"CPU": cfg.cpus_per_worker, "GPU": int(gpu)},
                    cfg.num_workers)
    with lease.hold(storage.join(cfg.storage_path, name), f"dicl train {name}"):  # one run per name at a time
        with training_lines(engine.total_epochs(cfg), progress, desc=f"train {name}") as board:
            return fit_on_ray(cfg, gpu, board)


@contextlib.contextmanager
def ctrl_c_as_interrupt():
    """Ray Train answers Ctrl-C itself: it aborts the run, then exits from inside its signal handler (SystemExit,
    with which the process ends with 1). Make that the KeyboardInterrupt every command reports (exit 130, 're-run to
    resume'), and put back the handler it replaced for what runs next (the pipeline's label stage)."""
    previous = signal.getsignal(signal.SIGINT)
    try:
        yield
    except SystemExit:
        raise KeyboardInterrupt from None
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, previous)


def fit_on_ray(cfg: TrainConfig, gpu: bool, board=None) -> TrainResult:
    name = cfg.name
    path, filesystem = train_storage(cfg.storage_path)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"train": cfg.model_dump(mode="json"), "board": board},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker, **({"GPU": 1} if gpu else {})}),
        run_config=RunConfig(
            name=name, storage_path=path, storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    t0 = time.perf_counter()
    with ctrl_c_as_interrupt():
        result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training run {name} ended without a checkpoint (see the log above)")
    return TrainResult(remote_uri(cfg.storage_path, result.checkpoint.path), dict(result.metrics or {}), name,
                       time.perf_counter() - t0)
