"""Data-parallel training through Ray Train: 1 and 2 workers agree; unequal shards never hang."""
import math

import pytest

from clustering import report
from clustering.config import PipelineConfig, load_config

BASE = ["shard.samples_per_shard=450", "train.method=ae_kmeans", "train.pretrain_epochs=60", "train.augment=false",
        "train.batch_size=256", "train.cpus_per_worker=1", "train.checkpoint_every=10", "train.seed=0"]


def train_and_score(work_dir, *overrides):
    from jobs.label import run_label
    from jobs.train import run_train

    cfg = load_config(PipelineConfig, "configs/demo.yaml", BASE + [f"work_dir={work_dir}", *overrides])
    trained = run_train(cfg.train)
    run_label(cfg.label, checkpoint=trained.checkpoint)
    return report.summarize(cfg.label.output, cfg.label.shards), trained


@pytest.fixture(scope="module")
def digit_shards(ray_local, tmp_path_factory):
    from jobs.shard import run_shard

    root = tmp_path_factory.mktemp("dist")
    run_shard(load_config(PipelineConfig, "configs/demo.yaml", BASE + [f"work_dir={root}"]).shard, progress=False)
    return root


def test_one_and_two_workers_reach_the_same_quality(digit_shards):
    one, _ = train_and_score(digit_shards, "train.num_workers=1", "train.name=one", f"label.output={digit_shards}/a1")
    two, trained = train_and_score(digit_shards, "train.num_workers=2", "train.name=two", f"label.output={digit_shards}/a2")
    assert one["rows"] == two["rows"] == 1797
    assert abs(one["acc"] - two["acc"]) <= 0.02, (one["acc"], two["acc"])
    assert trained.metrics["local_samples"] < 1797  # each worker really held only its share


def test_very_unequal_shards_finish_with_equal_steps(ray_local, tmp_path):
    from jobs.shard import run_shard

    cfg = load_config(PipelineConfig, "configs/demo.yaml",
                      BASE + [f"work_dir={tmp_path}", "shard.samples_per_shard=1600", "train.pretrain_epochs=3"])
    manifest = run_shard(cfg.shard, progress=False)
    assert [s["samples"] for s in manifest["shards"]] == [1600, 197]
    summary, trained = train_and_score(tmp_path, "shard.samples_per_shard=1600", "train.pretrain_epochs=3",
                                       "train.num_workers=2", "train.name=uneven")
    steps = math.ceil(1797 / 256)
    assert trained.metrics["steps_min"] == trained.metrics["steps_max"] == steps
    assert summary["rows"] == 1797
