"""The shard job on the shared real data sets (skipped, with the reason, where the folder is absent)."""
import tarfile

from clustering.config import ShardConfig
from tests.conftest import need_shared


def test_mnist_idx_gives_70000_labelled_samples(ray_local, tmp_path):
    from jobs.shard import run_shard

    mnist = need_shared("mnist")
    m = run_shard(ShardConfig(source=str(mnist), output=str(tmp_path / "mnist")), progress=False)
    assert m["num_samples"] == 70_000 and m["labelled"] == 70_000
    assert {k: m["image"][k] for k in ("side", "channels")} == {"side": 28, "channels": 1}
    assert len(m["shards"]) == 7


def test_cifar_jpeg_folders_give_60000_samples_labelled_by_folder(ray_local, tmp_path):
    from jobs.shard import run_shard

    archive = need_shared("cifar10-jpg.tar.gz")
    with tarfile.open(archive) as t:
        t.extractall(tmp_path / "cifar", filter="data")
    m = run_shard(ShardConfig(source=str(tmp_path / "cifar"), output=str(tmp_path / "shards")), progress=False)
    assert m["num_samples"] == 60_000 and m["labelled"] == 60_000
    assert len(m["classes"]) == 10 and "airplane" in m["classes"]
    assert {k: m["image"][k] for k in ("side", "channels")} == {"side": 32, "channels": 3}
