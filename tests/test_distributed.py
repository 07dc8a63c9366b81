"""Data-parallel training through Ray Train on two Ray nodes (ray.cluster_utils.Cluster, 1 CPU each): 1 and 2
workers agree, and a streamed run on unequal shards steps alike on both ranks and resumes from its checkpoint
when its worker group is killed (that a resumed run ends where an uninterrupted one does is test_engine's). Both
inputs step the number of times the engine sizes from the global count (test_inputs), so the streamed run proves
for both that unequal shares never hang. The reference: one worker's training loop, uninterrupted, in this process
(DeepClusterer runs engine.fit, as each Ray Train worker does). Runs are scored by their checkpoints' model here;
the label job is test_jobs' and test_cluster_launch's."""
import math
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from sklearn.cluster import KMeans

from clustering import metrics
from clustering.data import storage
from clustering.config import PipelineConfig, load_config
from clustering.estimator import DeepClusterer
from clustering.data.sources import digits_source

BASE = ["shard.samples_per_shard=450", "train.method=ae_kmeans", "train.method.pretrain_epochs=60", "train.method.augment=false",
        "train.batch_size=256", "train.cpus_per_worker=1", "train.checkpoint_every=5", "train.max_failures=2",
        "train.seed=0", "train.image_size=8"]  # the digits as they are (the conv autoencoders' least side is 16)


@pytest.fixture(scope="module")
def two_node_cluster(s3):
    """Two Ray nodes on this machine, shut down at the end."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="module")
def digit_shards(two_node_cluster, tmp_path_factory):
    from jobs.shard import run_shard

    root = tmp_path_factory.mktemp("dist")
    run_shard(load_config(PipelineConfig, "configs/demo.yaml", BASE + [f"work_dir={root}"]).shard, progress=False)
    return root


def train_worker_pids() -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if b"RayTrainWorker" in (proc / "cmdline").read_bytes():
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


def kill_workers_after_checkpoints(run_dir: str, done: threading.Event, killed: list) -> None:
    # Wait for a third checkpoint folder: a worker uploads one only after its previous report was queued,
    # and reports queue one at a time, so by then Ray Train has registered at least the first.
    # Only this run's workers: one of an earlier run may still be exiting.
    earlier = set(train_worker_pids())
    deadline = time.time() + 120
    while time.time() < deadline and not done.is_set():
        if sum("checkpoint_" in d for d in storage.list_dirs(run_dir)) >= 3:
            for pid in set(train_worker_pids()) - earlier:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            return
        time.sleep(0.05)


def digits_acc(model: DeepClusterer) -> float:
    digits = digits_source()
    return metrics.cluster_acc(digits.labels, model.predict(digits.images))


def train(work_dir, name, *overrides, kill=False):
    """A Ray Train run (killing the workers mid-run if asked)."""
    from jobs.train import run_train

    overrides = BASE + [f"work_dir={work_dir}", f"train.name={name}", *overrides]
    cfg = load_config(PipelineConfig, "configs/demo.yaml", overrides)
    done, killed = threading.Event(), []
    killer = threading.Thread(target=kill_workers_after_checkpoints,
                              args=(f"{storage.absolute(cfg.train.storage_path)}/{name}", done, killed))
    if kill:
        killer.start()
    trained = run_train(cfg.train)
    done.set()
    if kill:
        killer.join()
        assert killed, "no training worker was found to kill"
    return trained


@pytest.fixture(scope="module")
def reference_acc() -> float:
    """One worker, in memory, uninterrupted, in this process, on as many threads as a worker has (the ACC moves with
    the thread count: 0.7830 on 1, 0.7807 on 2, whatever tests ran before in this process)."""
    cfg = load_config(PipelineConfig, "configs/demo.yaml", BASE).train
    settings = {**cfg.model_dump(exclude={"method", "k"}), **cfg.method.model_dump(exclude={"name"})}
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.cpus_per_worker)
    try:
        model = DeepClusterer(cfg.method.name, cfg.k, device="cpu", **settings).fit(digits_source().images)
    finally:
        torch.set_num_threads(threads)
    return digits_acc(model)


def test_two_workers_on_two_nodes_reach_the_quality_of_one(digit_shards, reference_acc):
    trained = train(digit_shards, "two", "train.num_workers=2")
    two_acc = digits_acc(DeepClusterer.load(trained.checkpoint, device="cpu"))
    # two workers see other batches, as another seed would: within the seeds' spread (ae_kmeans on the digits:
    # ACC 0.7262 ± 0.0339 over seeds 0-2, docs/RESULTS.md)
    assert abs(reference_acc - two_acc) <= 0.03, (reference_acc, two_acc)
    assert trained.metrics["local_samples"] < 1797  # each worker really held only its share


def test_a_streamed_corpus_over_the_memory_budget_on_unequal_shards_steps_alike_and_survives_a_kill(
        two_node_cluster, tmp_path):
    from clustering.checkpoints import load as load_checkpoint
    from jobs.shard import run_shard

    # Two shards of 1,000 and 797 digits, one per worker: one pass over each would be 8 and 7 steps of 128, and the
    # worker that stopped first would leave the other waiting in a collective. Both must step 8 times.
    uneven = BASE + [f"work_dir={tmp_path}", "shard.samples_per_shard=1000"]
    manifest = run_shard(load_config(PipelineConfig, "configs/demo.yaml", uneven).shard, progress=False)
    assert [s["samples"] for s in manifest["shards"]] == [1000, 797]
    # Each worker's decoded digits (50 KB and more) exceed a 5 KB budget: `auto` streams them. NMM, as the demo
    # trains it.
    trained = train(tmp_path, "stream", "shard.samples_per_shard=1000", "train.method=nmm", "train.joint_epochs=25",
                    "train.num_workers=2", "train.memory_budget_gb=0.000005", "train.loader_workers=1", kill=True)
    assert trained.metrics["resumed_from"] >= 0
    history = load_checkpoint(trained.checkpoint)["history"]
    assert [m["input"] for m in history] == ["stream"] * 25
    steps = math.ceil(1797 / 256)
    assert all(m["steps_min"] == m["steps_max"] == steps for m in history)  # every rank, every epoch
    assert all(m["local_samples"] < 1797 for m in history)  # each worker streamed only its share

    digits = digits_source()
    pixels = KMeans(10, n_init=10, random_state=0).fit_predict(digits.images.reshape(len(digits.images), -1))
    pixel_acc = metrics.cluster_acc(digits.labels, pixels)
    acc = digits_acc(DeepClusterer.load(trained.checkpoint, device="cpu"))
    assert acc > pixel_acc + 0.05, (acc, pixel_acc)
