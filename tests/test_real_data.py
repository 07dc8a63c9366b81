"""The shard job on the shared real data sets (skipped, with the reason, where the folder is absent)."""
import shutil
import subprocess
import tarfile
from collections import Counter

from clustering.config import ShardConfig
from tests.conftest import need_shared


def test_mnist_idx_gives_70000_labelled_samples(ray_local, ram_tmp):
    from jobs.shard import run_shard

    mnist = need_shared("mnist")
    m = run_shard(ShardConfig(source=str(mnist), output=str(ram_tmp / "mnist")), progress=False)
    assert m["num_samples"] == 70_000 and m["labelled"] == 70_000
    assert {k: m["image"][k] for k in ("side", "channels")} == {"side": 28, "channels": 1}
    assert len(m["shards"]) == 7


def test_cifar_jpeg_folders_list_60000_images_labelled_by_folder(ram_tmp):
    """The listing and the labels of all 60,000 files; a spread 3,000 of them are sharded (sharding at scale is the
    shard job's, tested on the digits and MNIST)."""
    from clustering.data import shards
    from clustering.data.sources import FolderSource

    archive = need_shared("cifar10-jpg.tar.gz")
    (ram_tmp / "cifar").mkdir()
    # GNU tar, where there is one: Python's tarfile takes 10 s over the 60,000 members, tar 2 s
    if shutil.which("tar"):
        subprocess.run(["tar", "xzf", str(archive), "-C", str(ram_tmp / "cifar")], check=True)
    else:
        with tarfile.open(archive) as t:
            t.extractall(ram_tmp / "cifar", filter="data")
    source = FolderSource(str(ram_tmp / "cifar"))
    items = source.plan()
    assert len(items) == 60_000 and len(source.classes) == 10 and "airplane" in source.classes
    assert Counter(it.label for it in items) == {c: 6_000 for c in range(10)}
    out = shards.write_items(source, items[::20], str(ram_tmp / "shard-000000.tar"))
    assert out["shard"]["samples"] == out["labelled"] == 3_000 and not out["skipped"]
    image = shards.choose_image(shards.shape_summary(out["shapes"]))
    assert {k: image[k] for k in ("side", "channels")} == {"side": 32, "channels": 3}
