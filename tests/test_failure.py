"""A worker killed mid-training: Ray Train restarts from the latest checkpoint and the model is as good."""
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from clustering import report, storage
from clustering.config import PipelineConfig, load_config

BASE = ["shard.samples_per_shard=450", "train.method=ae_kmeans", "train.pretrain_epochs=40", "train.batch_size=256",
        "train.cpus_per_worker=1", "train.num_workers=1", "train.checkpoint_every=5", "train.max_failures=2"]


@pytest.fixture(scope="module")
def two_node_cluster(s3):
    """Two Ray nodes on this machine (ray.cluster_utils.Cluster), shut down at the end."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


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


def kill_worker_after_checkpoints(run_dir: str, done: threading.Event, killed: list) -> None:
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


def run(work_dir, name, kill=False, extra=()):
    from jobs.label import run_label
    from jobs.shard import run_shard
    from jobs.train import run_train

    cfg = load_config(PipelineConfig, "configs/demo.yaml", BASE + [f"work_dir={work_dir}", f"train.name={name}",
                                                                   f"label.output={work_dir}/a-{name}", *extra])
    if not storage.exists(f"{cfg.shard.output}/manifest.json"):
        run_shard(cfg.shard, progress=False)
    done, killed = threading.Event(), []
    killer = threading.Thread(target=kill_worker_after_checkpoints,
                              args=(f"{storage.absolute(cfg.train.storage_path)}/{name}", done, killed))
    if kill:
        killer.start()
    trained = run_train(cfg.train)
    done.set()
    if kill:
        killer.join()
    run_label(cfg.label, checkpoint=trained.checkpoint)
    return report.summarize(cfg.label.output, cfg.label.shards), trained, killed


@pytest.mark.parametrize("extra", [[], ["train.input=stream", "train.loader_workers=1"]], ids=["memory", "stream"])
def test_killed_worker_resumes_from_checkpoint(two_node_cluster, tmp_path, extra):
    plain, _, _ = run(tmp_path, "plain", extra=extra)
    resumed, trained, killed = run(tmp_path, "killed", kill=True, extra=extra)
    assert killed, "no training worker was found to kill"
    assert trained.metrics["resumed_from"] >= 0  # the final model came from a restored run
    assert trained.metrics["input"] == ("stream" if extra else "memory")
    assert resumed["rows"] == 1797
    assert abs(plain["acc"] - resumed["acc"]) <= 0.02, (plain["acc"], resumed["acc"])
